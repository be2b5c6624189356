//! A frozen linear layer whose weight is held in NF4 (about 0.52 bytes a parameter with double
//! quantization) and dequantized on the fly, in the compute dtype, for every forward: QLoRA's
//! base layer (bitsandbytes' `Linear4bit`).

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};

use crate::config::Nf4Config;
use crate::ops::{nf4_dequantize, ModelBackend, Nf4Absmax, Nf4Parts};

use super::nf4::{dynamic_map, nf4_code, Absmax, Nf4, DOUBLE_QUANT_BLOCKSIZE};

#[derive(Module, Debug)]
pub struct Nf4Linear<B: Backend> {
    /// bitsandbytes' bytes (two 4-bit codes a byte, high nibble first, over the `[out, in]`
    /// weight flattened row-major), four to an i32 word, little-endian: WGSL has no 8-bit
    /// integers, and every backend has 32-bit ones.
    pub packed: Tensor<B, 1, Int>, // [ceil(out * in / 8)], i32
    pub scales: Nf4Scales<B>,
    pub bias: Option<Param<Tensor<B, 1>>>, // [out]
    /// Code books and bit positions, uploaded once with the weight rather than every forward.
    pub tables: Nf4Tables<B>,
    pub n_in: usize,
    pub n_out: usize,
    pub blocksize: usize,
}

#[derive(Module, Debug)]
pub struct Nf4Tables<B: Backend> {
    pub nf4_code: Tensor<B, 1>,           // [16], f32
    pub dynamic_map: Tensor<B, 1>,        // [256], f32 (double quantization's code book)
    pub nibble_shifts: Tensor<B, 2, Int>, // [1, 8]: codes 2k and 2k + 1 of byte k of a word
    pub byte_shifts: Tensor<B, 2, Int>,   // [1, 4]
}

impl<B: Backend> Nf4Tables<B> {
    fn new(device: &B::Device) -> Self {
        let shifts = |s: &[i32]| {
            Tensor::from_data(
                TensorData::new(s.to_vec(), [1, s.len()]),
                (device, DType::I32),
            )
        };
        Self {
            nf4_code: f32_table(&nf4_code(), device),
            dynamic_map: f32_table(&dynamic_map(), device),
            // Byte k of a word holds codes 2k (its high nibble) and 2k + 1.
            nibble_shifts: shifts(&[4, 0, 12, 8, 20, 16, 28, 24]),
            byte_shifts: shifts(&[0, 8, 16, 24]),
        }
    }
}

/// The per-block scales as stored: plain f32, or double-quantized (8-bit codes into the dynamic
/// map, an f32 scale per 256 of them, and the mean that was subtracted).
#[derive(Module, Debug)]
pub enum Nf4Scales<B: Backend> {
    Plain(Tensor<B, 1>), // [blocks], f32
    Double(DoubleQuantScales<B>),
}

#[derive(Module, Debug)]
pub struct DoubleQuantScales<B: Backend> {
    /// One byte a block, four to an i32 word as `Nf4Linear::packed`.
    pub quantized: Tensor<B, 1, Int>, // [ceil(blocks / 4)], i32
    pub blocks: usize,
    pub absmax2: Tensor<B, 1>, // [ceil(blocks / 256)], f32
    pub offset: f64,
}

impl<B: Backend> Nf4Linear<B> {
    /// Quantizes `weight` (Hugging Face's `[out, in]`, row-major) as bitsandbytes does.
    pub fn quantize(
        weight: &[f32],
        [n_out, n_in]: [usize; 2],
        bias: Option<Param<Tensor<B, 1>>>,
        config: Nf4Config,
        device: &B::Device,
    ) -> Self {
        assert_eq!(weight.len(), n_out * n_in, "weight size");
        let q = Nf4::quantize(weight, config.blocksize, config.double_quant);
        let words = |bytes: Vec<u8>| {
            let words: Vec<i32> = bytes
                .chunks(4)
                .map(|c| {
                    let mut word = [0u8; 4];
                    word[..c.len()].copy_from_slice(c);
                    i32::from_le_bytes(word)
                })
                .collect();
            let n = words.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(words, [n]), (device, DType::I32))
        };
        let f32_tensor = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<B, 1>::from_data(TensorData::new(v, [n]), (device, DType::F32))
        };
        let scales = match q.absmax {
            Absmax::Plain(a) => Nf4Scales::Plain(f32_tensor(a)),
            Absmax::Double {
                quantized,
                absmax2,
                offset,
            } => Nf4Scales::Double(DoubleQuantScales {
                blocks: quantized.len(),
                quantized: words(quantized),
                absmax2: f32_tensor(absmax2),
                offset: offset as f64,
            }),
        };
        Self {
            packed: words(q.packed),
            scales,
            bias,
            tables: Nf4Tables::new(device),
            n_in,
            n_out,
            blocksize: config.blocksize,
        }
    }

    /// The weight, `[out, in]`, in `dtype`. Element for element what `Nf4::dequantize` gives.
    pub fn dequantize(&self, dtype: DType) -> Tensor<B, 2> {
        let device = self.packed.device();
        let numel = self.n_in * self.n_out;
        let t = &self.tables;
        let codes = unpack(&self.packed, &t.nibble_shifts, 0xF); // [8 * words]
        let n_codes = codes.dims()[0];
        let values = t.nf4_code.clone().select(0, codes); // [8 * words], f32
        let blocks = numel.div_ceil(self.blocksize);
        let padded = blocks * self.blocksize;
        let values = if padded > n_codes {
            Tensor::cat(vec![values, Tensor::zeros([padded - n_codes], &device)], 0)
        } else {
            values.slice([0..padded])
        };
        let scales = self.block_scales().reshape([blocks, 1]); // [blocks, 1]
        let w = (values.reshape([blocks, self.blocksize]) * scales).reshape([padded]); // f32
        w.slice([0..numel])
            .reshape([self.n_out, self.n_in])
            .cast(dtype)
    }

    /// The f32 scale of every block, `[blocks]`.
    fn block_scales(&self) -> Tensor<B, 1> {
        match &self.scales {
            Nf4Scales::Plain(a) => a.clone(),
            Nf4Scales::Double(d) => {
                let blocks = d.blocks;
                let groups = d.absmax2.dims()[0];
                let bytes = unpack(&d.quantized, &self.tables.byte_shifts, 0xFF);
                let codes = (self.tables.dynamic_map.clone()).select(0, bytes.slice([0..blocks]));
                let absmax2 = d
                    .absmax2
                    .clone()
                    .reshape([groups, 1])
                    .expand([groups, DOUBLE_QUANT_BLOCKSIZE])
                    .reshape([groups * DOUBLE_QUANT_BLOCKSIZE])
                    .slice([0..blocks]);
                codes * absmax2 + d.offset
            }
        }
    }

    /// The weight as `ops::nf4_dequantize` takes it.
    pub(crate) fn parts(&self) -> Nf4Parts<B> {
        let absmax = match &self.scales {
            Nf4Scales::Plain(a) => Nf4Absmax::Plain(a.clone().into_primitive().tensor()),
            Nf4Scales::Double(d) => Nf4Absmax::Double {
                quantized: d.quantized.clone().into_primitive(),
                absmax2: d.absmax2.clone().into_primitive().tensor(),
                offset: d.offset,
            },
        };
        Nf4Parts {
            packed: self.packed.clone().into_primitive(),
            absmax,
            nf4_code: self.tables.nf4_code.clone().into_primitive().tensor(),
            dynamic_map: self.tables.dynamic_map.clone().into_primitive().tensor(),
            shape: [self.n_out, self.n_in],
            blocksize: self.blocksize,
        }
    }

    /// Bytes held by the quantized weight (codes and scales; not the bias).
    pub fn weight_bytes(&self) -> usize {
        let scales = match &self.scales {
            Nf4Scales::Plain(a) => 4 * a.dims()[0],
            Nf4Scales::Double(d) => 4 * d.quantized.dims()[0] + 4 * d.absmax2.dims()[0] + 8,
        };
        4 * self.packed.dims()[0] + scales
    }
}

impl<B: ModelBackend> Nf4Linear<B> {
    /// `x @ W^T + b` in x's dtype, the weight decoded by the backend's kernel where it has one.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let w = nf4_dequantize(self.parts(), dtype).unwrap_or_else(|| self.dequantize(dtype));
        let out = x.matmul(w.transpose().unsqueeze()); // W^T: [in, out]
        match &self.bias {
            Some(b) => out + b.val().unsqueeze(),
            None => out,
        }
    }
}

/// The fields of every word at `shifts` (`[1, k]`, in that order, each `mask` wide), flattened:
/// `[words * k]`.
fn unpack<B: Backend>(
    words: &Tensor<B, 1, Int>,
    shifts: &Tensor<B, 2, Int>,
    mask: i32,
) -> Tensor<B, 1, Int> {
    let (n, k) = (words.dims()[0], shifts.dims()[1]);
    let fields = words
        .clone()
        .reshape([n, 1])
        .bitwise_right_shift(shifts.clone()); // [n, k]
    fields.bitwise_and_scalar(mask.elem()).reshape([n * k])
}

fn f32_table<B: Backend>(values: &[f32], device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), [values.len()]),
        (device, DType::F32),
    )
}

#[cfg(all(test, feature = "wgpu"))]
mod gpu_tests {
    use burn::backend::Wgpu;
    use burn::tensor::{DType, Tensor};

    use super::Nf4Linear;
    use crate::config::Nf4Config;
    use crate::ops::{nf4_dequantize, test_gpu};
    use crate::quant::Nf4;

    /// The CubeCL kernel decodes every weight as bitsandbytes' layout says (the host decoder is
    /// checked against bitsandbytes in tests/qlora.rs), with and without double quantization, in
    /// f32 and f16, on a size that fills neither its last word nor its last block and spans two
    /// groups of 256 double-quantized scales.
    #[test]
    fn the_nf4_kernel_decodes_as_the_host_does() {
        let Some(device) = test_gpu() else { return };
        let [n_out, n_in] = [130, 129]; // 16770 weights: 263 blocks of 64
        let w: Vec<f32> = (0..n_out * n_in)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
            .collect();
        for double_quant in [false, true] {
            let config = Nf4Config {
                blocksize: 64,
                double_quant,
            };
            let layer = Nf4Linear::<Wgpu>::quantize(&w, [n_out, n_in], None, config, &device);
            let want = Nf4::quantize(&w, 64, double_quant).dequantize();
            for dtype in [DType::F32, DType::F16] {
                let got: Tensor<Wgpu, 2> = nf4_dequantize(layer.parts(), dtype).expect("a kernel");
                assert_eq!((got.dims(), got.dtype()), ([n_out, n_in], dtype));
                let got: Vec<f32> = got.cast(DType::F32).into_data().to_vec().unwrap();
                for (i, (g, v)) in got.iter().zip(&want).enumerate() {
                    // f16: the f32 value rounded once; f32: to the ulp (a fused multiply-add
                    // may round the double-quantized scale once instead of twice).
                    let v = match dtype {
                        DType::F16 => half::f16::from_f32(*v).to_f32(),
                        _ => *v,
                    };
                    let tolerance = match dtype {
                        DType::F16 => 1e-3 * v.abs(),
                        _ => 2.0 * f32::EPSILON * v.abs(),
                    };
                    assert!(
                        (g - v).abs() <= tolerance,
                        "weight {i} ({dtype:?}, double quant {double_quant}): {g} vs {v}"
                    );
                }
            }
        }
    }
}
