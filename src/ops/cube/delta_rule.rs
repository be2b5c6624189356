//! The chunked delta rule's sequential part in CubeCL (`ModelBackend::delta_rule_scan`): the
//! state carried from chunk to chunk, forward (each chunk's new values and entering state) and
//! backward (the state's gradient carried back). Where the generic path launches a few tensor
//! ops a chunk, one after the other, this is one launch for the whole sequence. The chunks'
//! parallel parts (the WY/UT systems, the outputs, the gradients but the state's) stay batched
//! tensor ops over all chunks at once (`generic::chunked_delta_rule`), as flash-linear-attention
//! splits its `chunk_gated_delta_rule` around `chunk_gated_delta_rule_fwd_h`.
//!
//! Each column of the state evolves on its own (`r[:, j]` reads only `S[:, j]`, and `S[:, j]`
//! takes only `r[:, j]`), so a unit owns one column in registers for the whole sequence and no
//! unit waits on another.

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

/// Units a cube: columns of the state.
const UNITS: usize = 32;

/// The largest key dim and chunk the kernel takes: a unit holds a state column (dk) and a
/// chunk's r (c) in registers.
pub const MAX_KEY_DIM: usize = 256;
pub const MAX_CHUNK: usize = 64;

/// A cube: `UNITS` columns of one (batch, head)'s state; a unit: one column, through every chunk
/// (last to first when `backward`). Shapes as `DeltaScan`'s, (batch, head) flattened.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn scan_kernel(
    pull: &Tensor<f32>,
    push: &Tensor<f32>,
    base: &Tensor<f32>,
    add: &Tensor<f32>,
    decay: &Tensor<f32>,
    state: &Tensor<f32>,
    r: &mut Tensor<f32>,
    before: &mut Tensor<f32>,
    last: &mut Tensor<f32>,
    #[comptime] c: usize,
    #[comptime] dk: usize,
    #[comptime] backward: bool,
) {
    let n = base.shape(2);
    let dv = base.shape(4);
    let bh = CUBE_POS_Y as usize;
    let col = CUBE_POS_X as usize * UNITS + UNIT_POS_X as usize;
    if col >= dv {
        terminate!();
    }
    let mut s = Array::<f32>::new(dk);
    for d in 0..dk {
        s[d] = state[(bh * dk + d) * dv + col];
    }
    let mut rows = Array::<f32>::new(c);
    for step in 0..n {
        let mut i = step;
        if backward {
            i = n - 1 - step;
        }
        let chunk = bh * n + i;
        for d in 0..dk {
            before[(chunk * dk + d) * dv + col] = s[d];
        }
        // r = base ∓ pull · S
        for row in 0..c {
            let at = (chunk * c + row) * dk;
            let mut pulled = 0.0f32;
            for d in 0..dk {
                pulled += pull[at + d] * s[d];
            }
            let mut value = base[(chunk * c + row) * dv + col];
            if backward {
                value += pulled;
            } else {
                value -= pulled;
            }
            rows[row] = value;
            r[(chunk * c + row) * dv + col] = value;
        }
        // S = decay · S + add ± pushᵀ · r
        let e = decay[chunk];
        for d in 0..dk {
            let mut pushed = 0.0f32;
            for row in 0..c {
                pushed += push[(chunk * c + row) * dk + d] * rows[row];
            }
            let mut next = e * s[d];
            if backward {
                next += add[(chunk * dk + d) * dv + col] - pushed;
            } else {
                next += pushed;
            }
            s[d] = next;
        }
    }
    for d in 0..dk {
        last[(bh * dk + d) * dv + col] = s[d];
    }
}

/// `[r, before, last]` of the scan (`DeltaScan`'s fields, f32, `add` present exactly when
/// `backward`).
#[allow(clippy::too_many_arguments)]
pub fn scan<R: CubeRuntime>(
    pull: CubeTensor<R>,
    push: CubeTensor<R>,
    base: CubeTensor<R>,
    add: Option<CubeTensor<R>>,
    decay: CubeTensor<R>,
    state: CubeTensor<R>,
    backward: bool,
) -> [CubeTensor<R>; 3] {
    assert_eq!(add.is_some(), backward, "the backward scan alone adds");
    let [pull, push, base, decay, state] = [pull, push, base, decay, state].map(into_contiguous);
    let dims = pull.meta.shape().clone();
    let (b, h, n, c, dk) = (dims[0], dims[1], dims[2], dims[3], dims[4]);
    let dv = base.meta.shape()[4];
    let client = pull.client.clone();
    let device = pull.device.clone();
    let empty = |shape: Vec<usize>| {
        empty_device_dtype(
            client.clone(),
            device.clone(),
            Shape::from(shape),
            DType::F32,
        )
    };
    // The forward scan adds nothing; a one-element tensor stands in for `add`.
    let add = add.map(into_contiguous).unwrap_or_else(|| empty(vec![1]));
    let r = empty(vec![b, h, n, c, dv]);
    let before = empty(vec![b, h, n, dk, dv]);
    let last = empty(vec![b, h, dk, dv]);
    scan_kernel::launch::<R>(
        &client,
        CubeCount::Static(dv.div_ceil(UNITS) as u32, (b * h) as u32, 1),
        CubeDim::new_1d(UNITS as u32),
        pull.into_tensor_arg(),
        push.into_tensor_arg(),
        base.into_tensor_arg(),
        add.into_tensor_arg(),
        decay.into_tensor_arg(),
        state.into_tensor_arg(),
        r.clone().into_tensor_arg(),
        before.clone().into_tensor_arg(),
        last.clone().into_tensor_arg(),
        c,
        dk,
        backward,
    );
    [r, before, last]
}
