//! NF4 dequantization in one kernel: codes, code book, block scales (double-quantized or not)
//! and the cast to the compute dtype in one pass, instead of a chain of unpacking, gathers and
//! products through an f32 copy of the weight.

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;

/// Blocks a double-quantization scale covers (bitsandbytes' nested blocksize).
const GROUP: usize = 256;

/// One unit a packed word: its 8 weights `w[e] = code[nibble] * scale[e / blocksize]`, written in
/// `F`. Byte k of a word holds codes 2k (high nibble) and 2k + 1.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn dequantize_kernel<F: Float>(
    packed: &Tensor<i32>,
    absmax: &Tensor<f32>,
    quantized: &Tensor<i32>,
    absmax2: &Tensor<f32>,
    code: &Tensor<f32>,
    dynamic_map: &Tensor<f32>,
    out: &mut Tensor<F>,
    offset: f32,
    #[comptime] blocksize: usize,
    #[comptime] double: bool,
    #[define(F)] _dtype: StorageType,
) {
    let w = ABSOLUTE_POS;
    if w >= packed.len() {
        terminate!();
    }
    let word = packed[w];
    #[unroll]
    for i in 0..8usize {
        let e = w * 8 + i;
        if e < out.len() {
            let byte = (word >> (8 * (i / 2)) as i32) & 255;
            let mut nibble = byte & 15;
            if i % 2 == 0 {
                nibble = byte >> 4;
            }
            let block = e / blocksize;
            let scale = if double {
                let q = (quantized[block / 4] >> (8 * (block % 4)) as i32) & 255;
                dynamic_map[q as usize] * absmax2[block / GROUP] + offset
            } else {
                absmax[block]
            };
            out[e] = F::cast_from(code[nibble as usize] * scale);
        }
    }
}

/// The block scales as the kernel reads them (`ops::Nf4Absmax` on CubeCL tensors).
pub enum Scales<R: CubeRuntime> {
    Plain(CubeTensor<R>),
    Double {
        quantized: CubeTensor<R>,
        absmax2: CubeTensor<R>,
        offset: f64,
    },
}

/// The `[out, in]` weight in `dtype`.
pub fn dequantize<R: CubeRuntime>(
    packed: CubeTensor<R>,
    scales: Scales<R>,
    code: CubeTensor<R>,
    dynamic_map: CubeTensor<R>,
    shape: [usize; 2],
    blocksize: usize,
    dtype: DType,
) -> CubeTensor<R> {
    let (client, device) = (packed.client.clone(), packed.device.clone());
    let out = empty_device_dtype(client.clone(), device, Shape::new(shape), dtype);
    let words = packed.meta.shape().num_elements();
    let double = matches!(scales, Scales::Double { .. });
    // The operands the other variant reads stand in for the ones this one does not.
    let (absmax, quantized, absmax2, offset) = match scales {
        Scales::Plain(a) => (a, packed.clone(), dynamic_map.clone(), 0.0),
        Scales::Double {
            quantized,
            absmax2,
            offset,
        } => (dynamic_map.clone(), quantized, absmax2, offset),
    };
    let [packed, absmax, quantized, absmax2, code, dynamic_map] =
        [packed, absmax, quantized, absmax2, code, dynamic_map].map(into_contiguous);
    let cube_dim = CubeDim::new(&client, words);
    dequantize_kernel::launch::<R>(
        &client,
        calculate_cube_count_elemwise(&client, words, cube_dim),
        cube_dim,
        packed.into_tensor_arg(),
        absmax.into_tensor_arg(),
        quantized.into_tensor_arg(),
        absmax2.into_tensor_arg(),
        code.into_tensor_arg(),
        dynamic_map.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        offset as f32,
        blocksize,
        double,
        dtype.into(),
    );
    out
}
