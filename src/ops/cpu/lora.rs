//! A linear layer, with or without a LoRA adapter, on the CPU (Flex, f32): forward and backward
//! as a few `gemm` calls into the same buffers. Flex's own matmul writes into a zero-filled
//! buffer that it then copies to align it. Op by op, Burn writes the base output, the adapter's
//! output, and their sum (an elementwise add it runs on one thread); backward, it writes the
//! input's gradient twice and adds them again. Here the adapter's product accumulates into the
//! base output, and its gradient into the input's.

use gemm::{gemm, Parallelism};

/// A matrix read in place: a contiguous row-major `[rows, cols]` buffer, or its transpose.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> Mat<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "a [{rows}, {cols}] matrix");
        Self {
            data,
            rows,
            cols,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// `dst += lhs · rhs * scale`; `dst` is `[lhs.rows, rhs.cols]`, row-major.
fn add_product(dst: &mut [f32], lhs: Mat, rhs: Mat, scale: f32) {
    assert_eq!(dst.len(), lhs.rows * rhs.cols, "output size");
    // SAFETY: `dst` holds the output's floats (asserted).
    unsafe {
        gemm_into(
            dst.as_mut_ptr(),
            true,
            lhs,
            rhs,
            scale,
            Parallelism::Rayon(0),
        )
    };
}

/// `dst (+)= lhs · rhs * scale` on the calling thread, for kernels that already run a task per
/// core; `dst` is `[lhs.rows, rhs.cols]`, row-major.
pub fn product_here(dst: &mut [f32], accumulate: bool, lhs: Mat, rhs: Mat, scale: f32) {
    assert_eq!(dst.len(), lhs.rows * rhs.cols, "output size");
    // SAFETY: `dst` holds the output's floats (asserted), each of which gemm writes.
    unsafe {
        gemm_into(
            dst.as_mut_ptr(),
            accumulate,
            lhs,
            rhs,
            scale,
            Parallelism::None,
        )
    };
}

/// `lhs · rhs * scale` `[lhs.rows, rhs.cols]`, row-major, in a new buffer that is not zeroed
/// first: zeroing each output ran on the calling thread while the pool waited (2% of a step).
fn product(lhs: Mat, rhs: Mat, scale: f32) -> Vec<f32> {
    let len = lhs.rows * rhs.cols;
    let mut dst = Vec::with_capacity(len);
    // SAFETY: without `accumulate`, gemm writes every element of `dst` and reads none (its
    // first pass over the inner dimension stores `scale * lhs·rhs`, or zeros when it is empty).
    unsafe {
        gemm_into(
            dst.as_mut_ptr(),
            false,
            lhs,
            rhs,
            scale,
            Parallelism::Rayon(0),
        );
        dst.set_len(len);
    }
    dst
}

/// `dst (+)= lhs · rhs * scale` for `dst` `[lhs.rows, rhs.cols]`, row-major.
///
/// # Safety
/// `dst` is valid for writes of `lhs.rows * rhs.cols` floats, and for reads too when
/// `accumulate`.
unsafe fn gemm_into(
    dst: *mut f32,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallelism: Parallelism,
) {
    assert_eq!(lhs.cols, rhs.rows, "inner dimensions");
    // SAFETY: `Mat::new` keeps every read of lhs and rhs inside their buffers, and the caller
    // vouches for `dst`.
    unsafe {
        gemm(
            lhs.rows,
            rhs.cols,
            lhs.cols,
            dst,
            1,
            rhs.cols as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride,
            lhs.row_stride,
            rhs.data.as_ptr(),
            rhs.col_stride,
            rhs.row_stride,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The frozen layer and its adapter, in Burn's `[in, out]` orientation: `weight` `[in, out]`,
/// `bias` `[out]`, `lora_a` `[in, r]`, `lora_b` `[r, out]`.
pub struct Layer<'a> {
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub lora_a: &'a [f32],
    pub lora_b: &'a [f32],
    pub scaling: f32,
    pub in_features: usize,
    pub rank: usize,
}

impl Layer<'_> {
    /// `(in, r, out)`.
    fn dims(&self) -> (usize, usize, usize) {
        let n_in = self.in_features;
        (n_in, self.rank, self.weight.len() / n_in)
    }
}

/// `h = s·x·A` `[rows, r]` for `x` `[rows, in]`.
fn hidden(x: Mat, layer: &Layer) -> Vec<f32> {
    let (n_in, r, _) = layer.dims();
    product(x, Mat::new(layer.lora_a, n_in, r), layer.scaling)
}

/// `y = x·W + b` `[rows, out]` for `x` `[rows, in]` and `weight` `[in, out]`.
pub fn linear(x: Mat, weight: Mat, bias: Option<&[f32]>) -> Vec<f32> {
    match bias {
        Some(bias) => {
            let mut y = bias.repeat(x.rows);
            add_product(&mut y, x, weight, 1.0);
            y
        }
        None => product(x, weight, 1.0),
    }
}

/// `y = x·W + b + h·B` with `h = s·x·A`, for `x` in rows of `in`: `y` `[rows, out]` and `h`
/// `[rows, r]`, which the backward pass reuses.
pub fn forward(x: &[f32], layer: &Layer) -> (Vec<f32>, Vec<f32>) {
    let (n_in, r, n_out) = layer.dims();
    let rows = x.len() / n_in;
    let mut y = linear(
        Mat::new(x, rows, n_in),
        Mat::new(layer.weight, n_in, n_out),
        layer.bias,
    );
    let adapter = Adapter {
        lora_a: layer.lora_a,
        lora_b: layer.lora_b,
        scaling: layer.scaling,
        in_features: n_in,
        rank: r,
    };
    let h = add_update(&mut y, x, &adapter);
    (y, h)
}

/// An adapter alone: `lora_a` `[in, r]`, `lora_b` `[r, out]`.
pub struct Adapter<'a> {
    pub lora_a: &'a [f32],
    pub lora_b: &'a [f32],
    pub scaling: f32,
    pub in_features: usize,
    pub rank: usize,
}

/// `y += h·B` with `h = s·x·A` (returned, `[rows, r]`), for `x` in rows of `in`: the adapter's part
/// of `forward`, added to a base output `y` `[rows, out]` computed apart.
pub fn add_update(y: &mut [f32], x: &[f32], adapter: &Adapter) -> Vec<f32> {
    let (n_in, r) = (adapter.in_features, adapter.rank);
    let n_out = adapter.lora_b.len() / r;
    let rows = x.len() / n_in;
    let h = product(
        Mat::new(x, rows, n_in),
        Mat::new(adapter.lora_a, n_in, r),
        adapter.scaling,
    );
    add_product(
        y,
        Mat::new(&h, rows, r),
        Mat::new(adapter.lora_b, r, n_out),
        1.0,
    );
    h
}

/// The gradients `(dx, dA, dB)` from `dy`, the gradient of `forward`'s `y`, dx only when
/// `x_grad`; `h` is what `forward` returned beside `y`, or None to compute it. With
/// `g = s·dy·Bᵀ`: `dx = dy·Wᵀ + g·Aᵀ`, `dA = xᵀ·g`, `dB = hᵀ·dy`.
pub fn backward(
    x: &[f32],
    layer: &Layer,
    h: Option<&[f32]>,
    dy: &[f32],
    x_grad: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let (n_in, r, n_out) = layer.dims();
    let rows = x.len() / n_in;
    let (x, dy) = (Mat::new(x, rows, n_in), Mat::new(dy, rows, n_out));
    let computed;
    let h = match h {
        Some(h) => h,
        None => {
            computed = hidden(x, layer);
            &computed
        }
    };
    let h = Mat::new(h, rows, r);
    let (a, b) = (
        Mat::new(layer.lora_a, n_in, r),
        Mat::new(layer.lora_b, r, n_out),
    );
    let g = product(dy, b.t(), layer.scaling);
    let g = Mat::new(&g, rows, r);
    let dx = x_grad.then(|| {
        let w = Mat::new(layer.weight, n_in, n_out);
        let mut dx = product(dy, w.t(), 1.0);
        add_product(&mut dx, g, a.t(), 1.0);
        dx
    });
    let da = product(x.t(), g, 1.0);
    let db = product(h.t(), dy, 1.0);
    (dx, da, db)
}
