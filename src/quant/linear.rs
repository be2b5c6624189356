//! A frozen linear layer whose weight is held in NF4 (about 0.52 bytes a parameter with double
//! quantization) and dequantized on the fly, in the compute dtype, for every forward: QLoRA's
//! base layer (bitsandbytes' `Linear4bit`).

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::config::Nf4Config;

use super::nf4::{dynamic_map, nf4_code, Absmax, Nf4, DOUBLE_QUANT_BLOCKSIZE};

#[derive(Module, Debug)]
pub struct Nf4Linear<B: Backend> {
    /// Two 4-bit codes a byte, high nibble first, over the `[out, in]` weight flattened row-major.
    pub packed: Tensor<B, 1, Int>, // [ceil(out * in / 2)], u8
    pub scales: Nf4Scales<B>,
    pub bias: Option<Param<Tensor<B, 1>>>, // [out]
    pub n_in: usize,
    pub n_out: usize,
    pub blocksize: usize,
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
    pub quantized: Tensor<B, 1, Int>, // [blocks], u8
    pub absmax2: Tensor<B, 1>,        // [ceil(blocks / 256)], f32
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
        let u8_tensor = |v: Vec<u8>| {
            let n = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), (device, DType::U8))
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
                quantized: u8_tensor(quantized),
                absmax2: f32_tensor(absmax2),
                offset: offset as f64,
            }),
        };
        Self {
            packed: u8_tensor(q.packed),
            scales,
            bias,
            n_in,
            n_out,
            blocksize: config.blocksize,
        }
    }

    /// The weight, `[out, in]`, in `dtype`. Element for element what `Nf4::dequantize` gives.
    pub fn dequantize(&self, dtype: DType) -> Tensor<B, 2> {
        let device = self.packed.device();
        let numel = self.n_in * self.n_out;
        let bytes = self.packed.dims()[0];
        let packed = self.packed.clone().cast(DType::I32);
        let high = packed.clone().div_scalar(16); // [bytes]
        let low = packed.remainder_scalar(16); // [bytes]
        let codes = Tensor::stack::<2>(vec![high, low], 1).reshape([2 * bytes]); // [2 * bytes]
        let book = f32_table(&nf4_code(), &device);
        let values = book.select(0, codes); // [2 * bytes], f32
        let blocks = numel.div_ceil(self.blocksize);
        let padded = blocks * self.blocksize;
        let values = if padded > 2 * bytes {
            Tensor::cat(
                vec![values, Tensor::zeros([padded - 2 * bytes], &device)],
                0,
            )
        } else {
            values.slice([0..padded])
        };
        let scales = self.block_scales(&device).reshape([blocks, 1]); // [blocks, 1]
        let w = (values.reshape([blocks, self.blocksize]) * scales).reshape([padded]); // f32
        w.slice([0..numel])
            .reshape([self.n_out, self.n_in])
            .cast(dtype)
    }

    /// The f32 scale of every block, `[blocks]`.
    fn block_scales(&self, device: &B::Device) -> Tensor<B, 1> {
        match &self.scales {
            Nf4Scales::Plain(a) => a.clone(),
            Nf4Scales::Double(d) => {
                let blocks = d.quantized.dims()[0];
                let groups = d.absmax2.dims()[0];
                let codes = f32_table(&dynamic_map(), device)
                    .select(0, d.quantized.clone().cast(DType::I32));
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

    /// `x @ W^T + b` in x's dtype.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let w = self.dequantize(x.dtype()).transpose(); // [in, out]
        let out = x.matmul(w.unsqueeze());
        match &self.bias {
            Some(b) => out + b.val().unsqueeze(),
            None => out,
        }
    }

    /// Bytes held by the quantized weight (codes and scales; not the bias).
    pub fn weight_bytes(&self) -> usize {
        let scales = match &self.scales {
            Nf4Scales::Plain(a) => 4 * a.dims()[0],
            Nf4Scales::Double(d) => d.quantized.dims()[0] + 4 * d.absmax2.dims()[0] + 8,
        };
        self.packed.dims()[0] + scales
    }
}

fn f32_table<B: Backend>(values: &[f32], device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), [values.len()]),
        (device, DType::F32),
    )
}
