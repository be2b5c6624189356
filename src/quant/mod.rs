//! Quantized base weights for QLoRA. So far: bitsandbytes-exact NF4 quantize / dequantize
//! (the reference path that fast paths are tested against).

pub mod nf4;

pub use nf4::{nf4_code, Absmax, Nf4};
