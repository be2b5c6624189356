//! RoPE, SwiGLU, RMSNorm and the cross-entropy of logits as one CubeCL kernel a direction each,
//! where Burn runs a chain of tensor ops (each a pass over the tensor unless its fusion joins
//! them, and the loss through an f32 copy of the logits). Statistics and the nonlinearities are
//! computed in f32 and rounded to the tensor's dtype once, as PyTorch's kernels do for bf16 and
//! f16.

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;

/// Units a cube in the row kernels (a power of two: the sum halves it).
const ROW_UNITS: usize = 64;

/// `x * cos + rotate_half(x) * sin` for `x` `[b, s, heads, d]` and tables `[b, s, 1, d]`, an
/// element a unit, in `F` as transformers computes it.
#[cube(launch)]
fn rope_kernel<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS;
    if e >= x.len() {
        terminate!();
    }
    let d = x.shape(3);
    let half = d / 2;
    let i = e % d;
    let t = (e / (x.shape(2) * d)) * d + i;
    let rotated = if i < half { -x[e + half] } else { x[e - half] };
    out[e] = x[e] * cos[t] + rotated * sin[t];
}

/// `silu(gate) * up`, silu in f32.
#[cube(launch)]
fn swiglu_kernel<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS;
    if e >= gate.len() {
        terminate!();
    }
    let g = f32::cast_from(gate[e]);
    let silu = g / (1.0 + (-g).exp());
    out[e] = F::cast_from(silu) * up[e];
}

/// `d_gate = grad * up * σ(g) * (1 + g * (1 - σ(g)))`, `d_up = grad * silu(g)`, in f32.
#[cube(launch)]
fn swiglu_backward_kernel<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    grad: &Tensor<F>,
    d_gate: &mut Tensor<F>,
    d_up: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS;
    if e >= gate.len() {
        terminate!();
    }
    let g = f32::cast_from(gate[e]);
    let dy = f32::cast_from(grad[e]);
    let sig = 1.0 / (1.0 + (-g).exp());
    d_up[e] = F::cast_from(dy * g * sig);
    d_gate[e] = F::cast_from(dy * f32::cast_from(up[e]) * sig * (g * (1.0 - sig) + 1.0));
}

/// The sum (or, with `max`, the maximum) of every unit's `value` in the cube, given to every
/// unit. Ends with a barrier, so `shared` can be used again at once.
#[cube]
fn cube_reduce(value: f32, shared: &mut SharedMemory<f32>, #[comptime] max: bool) -> f32 {
    let unit = UNIT_POS_X as usize;
    shared[unit] = value;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            if max {
                if shared[unit + stride] > shared[unit] {
                    shared[unit] = shared[unit + stride];
                }
            } else {
                shared[unit] += shared[unit + stride];
            }
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
}

/// `1 / sqrt(mean(x²) + eps)` of row `row` of `x` `[rows, n]`, in f32.
#[cube]
fn inv_rms<F: Float>(x: &Tensor<F>, row: usize, eps: f32, shared: &mut SharedMemory<f32>) -> f32 {
    let n = x.shape(1);
    let mut squares = 0.0f32;
    let mut i = UNIT_POS_X as usize;
    while i < n {
        let v = f32::cast_from(x[row * n + i]);
        squares += v * v;
        i += ROW_UNITS;
    }
    let mean = cube_reduce(squares, shared, false) / f32::cast_from(n);
    1.0 / (mean + eps).sqrt()
}

/// `weight * F(x * r)`, a cube a row of `x` `[rows, n]`.
#[cube(launch)]
fn rms_norm_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    out: &mut Tensor<F>,
    eps: f32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X as usize;
    let n = x.shape(1);
    let mut shared = SharedMemory::<f32>::new(ROW_UNITS);
    let r = inv_rms::<F>(x, row, eps, &mut shared);
    let mut i = UNIT_POS_X as usize;
    while i < n {
        out[row * n + i] = F::cast_from(f32::cast_from(x[row * n + i]) * r) * weight[i];
        i += ROW_UNITS;
    }
}

/// With `n = x * r` and `dn = grad * weight`: `dx = r * (dn - n * mean(dn * n))`, in f32.
#[cube(launch)]
fn rms_norm_backward_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    grad: &Tensor<F>,
    dx: &mut Tensor<F>,
    eps: f32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X as usize;
    let n = x.shape(1);
    let mut shared = SharedMemory::<f32>::new(ROW_UNITS);
    let r = inv_rms::<F>(x, row, eps, &mut shared);
    let mut dot = 0.0f32;
    let mut i = UNIT_POS_X as usize;
    while i < n {
        let normed = f32::cast_from(x[row * n + i]) * r;
        dot += f32::cast_from(grad[row * n + i]) * f32::cast_from(weight[i]) * normed;
        i += ROW_UNITS;
    }
    let mean = cube_reduce(dot, &mut shared, false) / f32::cast_from(n);
    let mut i = UNIT_POS_X as usize;
    while i < n {
        let normed = f32::cast_from(x[row * n + i]) * r;
        let dn = f32::cast_from(grad[row * n + i]) * f32::cast_from(weight[i]);
        dx[row * n + i] = F::cast_from((dn - normed * mean) * r);
        i += ROW_UNITS;
    }
}

/// Each row's `loss = lse - logits[target]` and `lse = logsumexp(logits)`, f32, a cube a row of
/// `logits` `[rows, vocab]`: one pass for the maximum, one for the sum of exponentials.
#[cube(launch)]
fn cross_entropy_kernel<F: Float>(
    logits: &Tensor<F>,
    targets: &Tensor<i32>,
    loss: &mut Tensor<f32>,
    lse: &mut Tensor<f32>,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X as usize;
    let vocab = logits.shape(1);
    let mut shared = SharedMemory::<f32>::new(ROW_UNITS);
    let mut max = f32::cast_from(logits[row * vocab]);
    let mut i = UNIT_POS_X as usize;
    while i < vocab {
        let v = f32::cast_from(logits[row * vocab + i]);
        if v > max {
            max = v;
        }
        i += ROW_UNITS;
    }
    let max = cube_reduce(max, &mut shared, true);
    let mut sum = 0.0f32;
    let mut i = UNIT_POS_X as usize;
    while i < vocab {
        sum += (f32::cast_from(logits[row * vocab + i]) - max).exp();
        i += ROW_UNITS;
    }
    let row_lse = cube_reduce(sum, &mut shared, false).ln() + max;
    if UNIT_POS_X == 0 {
        let target = targets[row] as usize;
        loss[row] = row_lse - f32::cast_from(logits[row * vocab + target]);
        lse[row] = row_lse;
    }
}

/// `d_logits = (softmax(logits) - onehot(target)) * grad`, row by row, in the logits' dtype; an
/// element a unit.
#[cube(launch)]
fn cross_entropy_backward_kernel<F: Float>(
    logits: &Tensor<F>,
    targets: &Tensor<i32>,
    lse: &Tensor<f32>,
    grad: &Tensor<f32>,
    d_logits: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS;
    if e >= logits.len() {
        terminate!();
    }
    let vocab = logits.shape(1);
    let row = e / vocab;
    let mut d = (f32::cast_from(logits[e]) - lse[row]).exp() * grad[row];
    if e % vocab == targets[row] as usize {
        d -= grad[row];
    }
    d_logits[e] = F::cast_from(d);
}

/// The LoRA layer's output `F(f32(base) + h·B)` for `base` `[rows, out]`, `h` `[rows, r]` and `B`
/// `[r, out]` (f32): an element a unit, the rank-r product summed in registers, so neither
/// `h·B` nor an f32 copy of the base output is ever written.
#[cube(launch)]
fn lora_sum_kernel<F: Float>(
    base: &Tensor<F>,
    h: &Tensor<f32>,
    lora_b: &Tensor<f32>,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let e = ABSOLUTE_POS;
    if e >= base.len() {
        terminate!();
    }
    let n_out = base.shape(1);
    let r = h.shape(1);
    let row = e / n_out;
    let col = e % n_out;
    let mut sum = f32::cast_from(base[e]);
    for k in 0..r {
        sum += h[row * r + k] * lora_b[k * n_out + col];
    }
    out[e] = F::cast_from(sum);
}

fn like<R: CubeRuntime>(t: &CubeTensor<R>) -> CubeTensor<R> {
    empty_device_dtype(
        t.client.clone(),
        t.device.clone(),
        t.meta.shape().clone(),
        t.dtype,
    )
}

/// An element a unit over `t`'s elements.
fn elementwise<R: CubeRuntime>(t: &CubeTensor<R>) -> (CubeCount, CubeDim) {
    let n = t.meta.shape().num_elements();
    let dim = CubeDim::new(&t.client, n);
    (calculate_cube_count_elemwise(&t.client, n, dim), dim)
}

pub fn rope<R: CubeRuntime>(
    x: CubeTensor<R>,
    cos: CubeTensor<R>,
    sin: CubeTensor<R>,
) -> CubeTensor<R> {
    let [x, cos, sin] = [x, cos, sin].map(into_contiguous);
    let out = like(&x);
    let (count, dim) = elementwise(&x);
    rope_kernel::launch::<R>(
        &x.client,
        count,
        dim,
        x.clone().into_tensor_arg(),
        cos.into_tensor_arg(),
        sin.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        x.dtype.into(),
    );
    out
}

pub fn swiglu<R: CubeRuntime>(gate: CubeTensor<R>, up: CubeTensor<R>) -> CubeTensor<R> {
    let [gate, up] = [gate, up].map(into_contiguous);
    let out = like(&gate);
    let (count, dim) = elementwise(&gate);
    swiglu_kernel::launch::<R>(
        &gate.client,
        count,
        dim,
        gate.clone().into_tensor_arg(),
        up.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        gate.dtype.into(),
    );
    out
}

pub fn swiglu_backward<R: CubeRuntime>(
    gate: CubeTensor<R>,
    up: CubeTensor<R>,
    grad: CubeTensor<R>,
) -> [CubeTensor<R>; 2] {
    let [gate, up, grad] = [gate, up, grad].map(into_contiguous);
    let (d_gate, d_up) = (like(&gate), like(&gate));
    let (count, dim) = elementwise(&gate);
    swiglu_backward_kernel::launch::<R>(
        &gate.client,
        count,
        dim,
        gate.clone().into_tensor_arg(),
        up.into_tensor_arg(),
        grad.into_tensor_arg(),
        d_gate.clone().into_tensor_arg(),
        d_up.clone().into_tensor_arg(),
        gate.dtype.into(),
    );
    [d_gate, d_up]
}

/// RMSNorm of `x` `[rows, n]`.
pub fn rms_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    eps: f64,
) -> CubeTensor<R> {
    let [x, weight] = [x, weight].map(into_contiguous);
    let out = like(&x);
    rms_norm_kernel::launch::<R>(
        &x.client,
        CubeCount::Static(x.meta.shape()[0] as u32, 1, 1),
        CubeDim::new_1d(ROW_UNITS as u32),
        x.clone().into_tensor_arg(),
        weight.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        eps as f32,
        x.dtype.into(),
    );
    out
}

/// The gradient of `x` `[rows, n]` from that of `rms_norm`'s output.
pub fn rms_norm_backward<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    eps: f64,
    grad: CubeTensor<R>,
) -> CubeTensor<R> {
    let [x, weight, grad] = [x, weight, grad].map(into_contiguous);
    let dx = like(&x);
    rms_norm_backward_kernel::launch::<R>(
        &x.client,
        CubeCount::Static(x.meta.shape()[0] as u32, 1, 1),
        CubeDim::new_1d(ROW_UNITS as u32),
        x.clone().into_tensor_arg(),
        weight.into_tensor_arg(),
        grad.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        eps as f32,
        x.dtype.into(),
    );
    dx
}

/// Each row's loss and log-sum-exp (`[rows]`, f32) of `logits` `[rows, vocab]` at `targets` (I32).
pub fn cross_entropy<R: CubeRuntime>(
    logits: CubeTensor<R>,
    targets: CubeTensor<R>,
) -> [CubeTensor<R>; 2] {
    let [logits, targets] = [logits, targets].map(into_contiguous);
    let rows = logits.meta.shape()[0];
    let f32_rows = || {
        empty_device_dtype(
            logits.client.clone(),
            logits.device.clone(),
            [rows].into(),
            DType::F32,
        )
    };
    let (loss, lse) = (f32_rows(), f32_rows());
    cross_entropy_kernel::launch::<R>(
        &logits.client,
        CubeCount::Static(rows as u32, 1, 1),
        CubeDim::new_1d(ROW_UNITS as u32),
        logits.clone().into_tensor_arg(),
        targets.into_tensor_arg(),
        loss.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        logits.dtype.into(),
    );
    [loss, lse]
}

/// The gradient of `logits` from `cross_entropy`'s `lse` and the losses' gradient `grad` (f32).
pub fn cross_entropy_backward<R: CubeRuntime>(
    logits: CubeTensor<R>,
    targets: CubeTensor<R>,
    lse: CubeTensor<R>,
    grad: CubeTensor<R>,
) -> CubeTensor<R> {
    let [logits, targets, lse, grad] = [logits, targets, lse, grad].map(into_contiguous);
    let d_logits = like(&logits);
    let (count, dim) = elementwise(&logits);
    cross_entropy_backward_kernel::launch::<R>(
        &logits.client,
        count,
        dim,
        logits.clone().into_tensor_arg(),
        targets.into_tensor_arg(),
        lse.into_tensor_arg(),
        grad.into_tensor_arg(),
        d_logits.clone().into_tensor_arg(),
        logits.dtype.into(),
    );
    d_logits
}

/// `F(f32(base) + h·B)`: see `lora_sum_kernel`.
pub fn lora_sum<R: CubeRuntime>(
    base: CubeTensor<R>,
    h: CubeTensor<R>,
    lora_b: CubeTensor<R>,
) -> CubeTensor<R> {
    let [base, h, lora_b] = [base, h, lora_b].map(into_contiguous);
    let out = like(&base);
    let (count, dim) = elementwise(&base);
    lora_sum_kernel::launch::<R>(
        &base.client,
        count,
        dim,
        base.clone().into_tensor_arg(),
        h.into_tensor_arg(),
        lora_b.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        base.dtype.into(),
    );
    out
}
