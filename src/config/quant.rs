//! `Nf4Config`: QLoRA's `[quant]` settings (and `--quant nf4`'s) for NF4 frozen weights.

/// Blocks of `blocksize` weights share one absmax; double quantization stores those absmax
/// values in 8 bits, as bitsandbytes' `bnb_4bit_use_double_quant`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nf4Config {
    pub blocksize: usize,
    pub double_quant: bool,
}

impl Default for Nf4Config {
    /// bitsandbytes' and ms-swift's QLoRA defaults.
    fn default() -> Self {
        Self {
            blocksize: 64,
            double_quant: true,
        }
    }
}
