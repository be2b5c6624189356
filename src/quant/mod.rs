//! Quantized base weights for QLoRA: bitsandbytes-exact NF4 (`nf4`, the plain host reference
//! path) and the linear layer that holds its weight in NF4 on the device (`linear`).

pub mod linear;
pub mod nf4;

pub use linear::Nf4Linear;
pub use nf4::{nf4_code, Absmax, Nf4};
