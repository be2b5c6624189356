//! bitsandbytes' NF4, bit for bit: the 16-value normal-float code book; blocks of `blocksize`
//! (64) over the row-major flattened weight, each with an f32 absmax; element 2i in the high
//! nibble. Double quantization stores `absmax - mean(absmax)` through the signed 8-bit dynamic map
//! in blocks of 256, plus that mean. This is the plain reference path: readable, on the host.
//!
//! The rules are those of bitsandbytes' reference kernels (0.50, `backends/default/ops.py`, whose
//! semantics its CUDA kernels share; see `quantize_blockwise`) and `create_dynamic_map` computed
//! in f32 as `torch.linspace` computes it. bitsandbytes' AVX-512 CPU kernels depart from them
//! (scripts/gen_fixtures.py prints by how much); they are not the reference.

/// bitsandbytes' `get_4bit_type("nf4")`, as f32 bit patterns.
const NF4_BITS: [u32; 16] = [
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
];

/// The NF4 code book.
pub fn nf4_code() -> [f32; 16] {
    NF4_BITS.map(f32::from_bits)
}

/// Blocks of the absmax vector under double quantization.
pub const DOUBLE_QUANT_BLOCKSIZE: usize = 256;

/// A weight in NF4.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4 {
    /// Two codes a byte, high nibble first; `ceil(numel / 2)` bytes.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    pub numel: usize,
    pub blocksize: usize,
}

/// The per-block scales, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Double {
        /// Codes into the dynamic map, one a block.
        quantized: Vec<u8>,
        /// One scale per `DOUBLE_QUANT_BLOCKSIZE` absmax values.
        absmax2: Vec<f32>,
        /// The mean of the absmax values, subtracted before quantizing them.
        offset: f32,
    },
}

impl Absmax {
    /// The f32 scale of every block (dequantizing them when double-quantized).
    pub fn values(&self) -> Vec<f32> {
        match self {
            Self::Plain(a) => a.clone(),
            Self::Double {
                quantized,
                absmax2,
                offset,
            } => {
                let code = dynamic_map();
                quantized
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| code[q as usize] * absmax2[i / DOUBLE_QUANT_BLOCKSIZE] + offset)
                    .collect()
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Plain(a) => 4 * a.len(),
            Self::Double {
                quantized, absmax2, ..
            } => quantized.len() + 4 * absmax2.len() + 4,
        }
    }
}

impl Nf4 {
    /// Quantizes a row-major flattened weight.
    pub fn quantize(w: &[f32], blocksize: usize, double_quant: bool) -> Self {
        assert!(blocksize > 0, "blocksize must be positive");
        let (mut codes, absmax) = quantize_blockwise(w, &nf4_code(), blocksize);
        if codes.len() % 2 == 1 {
            codes.push(7); // padding is 0.0, the code of zero
        }
        let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        let absmax = if double_quant {
            double_quantize(&absmax, mean(&absmax))
        } else {
            Absmax::Plain(absmax)
        };
        Self {
            packed,
            absmax,
            numel: w.len(),
            blocksize,
        }
    }

    /// The code of element `i`.
    pub fn code_index(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i % 2 == 0 {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// The f32 weight, as bitsandbytes' `dequantize_4bit` returns it.
    pub fn dequantize(&self) -> Vec<f32> {
        let code = nf4_code();
        let scales = self.absmax.values();
        (0..self.numel)
            .map(|i| code[self.code_index(i) as usize] * scales[i / self.blocksize])
            .collect()
    }

    /// Bytes held: codes, scales and the double-quantization state.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax.bytes()
    }
}

/// The mean of the block scales, correctly rounded. bitsandbytes takes torch's f32 `mean()`,
/// whose summation order depends on the CPU's vector width, so its offset can be 1 ulp away.
pub fn mean(absmax: &[f32]) -> f32 {
    (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32
}

/// Double quantization of the block scales around `offset` (see `mean`).
pub fn double_quantize(absmax: &[f32], offset: f32) -> Absmax {
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let (quantized, absmax2) = quantize_blockwise(&centred, &dynamic_map(), DOUBLE_QUANT_BLOCKSIZE);
    Absmax::Double {
        quantized,
        absmax2,
        offset,
    }
}

/// Blockwise quantization to the nearest entry of a sorted `code` (bitsandbytes' reference
/// kernels, 4-bit and 8-bit alike): scale by the reciprocal of the block's absmax (a partial last
/// block divides instead), clamp to [-1, 1], and take the bucket among the f32 midpoints, so a
/// tie goes to the lower code.
fn quantize_blockwise(x: &[f32], code: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let bounds: Vec<f32> = code.windows(2).map(|p| (p[0] + p[1]) / 2.0).collect();
    let full = x.len() - x.len() % blocksize;
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    let mut codes = Vec::with_capacity(x.len());
    for (b, block) in x.chunks(blocksize).enumerate() {
        let raw = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let am = raw.max(1e-38);
        let whole = b * blocksize < full;
        // The reference stores the clamped scale only for the partial last block.
        absmax.push(if whole { raw } else { am });
        let inv = 1.0 / am;
        for &v in block {
            let scaled = if whole { v * inv } else { v / am }.clamp(-1.0, 1.0);
            // bucketize(right=False): the number of bounds strictly below the value.
            codes.push(bounds.partition_point(|&b| b < scaled) as u8);
        }
    }
    (codes, absmax)
}

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: for each
/// exponent 10^(i-6), i in 0..7, the midpoints of `linspace(0.1, 1, 2^i + 1)` with both signs;
/// then 0 and 1; sorted. 256 values.
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let scale = 10f64.powf((i - 6) as f64) as f32;
        let bounds = linspace_f32(0.1, 1.0, (1usize << i) + 1);
        for m in bounds.windows(2).map(|p| (p[0] + p[1]) / 2.0) {
            data.push(scale * m);
            data.push(-scale * m);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into()
        .expect("7 exponents give 254 values, plus 0 and 1")
}

/// `torch.linspace` in f32: the first half counted up from `start`, the second down from `end`,
/// each value rounded once (torch's vectorised kernel uses fused multiply-adds).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}
