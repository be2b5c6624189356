//! ggml's storage types and the encoding of f32 rows into them, block for block as ggml's
//! reference quantizers (`quantize_row_*_ref` in ggml-quants.c) encode them: `llama-quantize`
//! without an importance matrix uses those.

use half::{bf16, f16};

/// The ggml types swift-rs writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl GgmlType {
    /// ggml's `enum ggml_type` value.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 8,
            Self::Bf16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<Self> {
        [Self::F32, Self::F16, Self::Bf16, Self::Q8_0]
            .into_iter()
            .find(|t| t.id() == id)
    }

    /// ggml's name for the type (`ggml_type_name`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
        }
    }

    /// Values per block, and bytes per block.
    fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q8_0 => (32, 34),
        }
    }

    pub fn block_size(self) -> usize {
        self.block().0
    }

    /// Bytes of a row of `n` values (`n` a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        let (values, bytes) = self.block();
        n / values * bytes
    }

    /// `values` (whole rows of this type's blocks) encoded.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        assert_eq!(values.len() % self.block_size(), 0, "whole blocks");
        match self {
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            // Both round to nearest even, as numpy's astype and ggml's conversions do.
            Self::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            Self::Bf16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            Self::Q8_0 => values.chunks(32).flat_map(q8_0).collect(),
        }
    }
}

/// One block of 32: an f16 scale `d = max|x| / 127`, then each `round(x / d)` as i8.
fn q8_0(x: &[f32]) -> Vec<u8> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut block = f16::from_f32(d).to_le_bytes().to_vec();
    // f32::round rounds half away from zero, as C's roundf.
    block.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
    block
}
