//! FlashAttention on the CPU (Flex, f32): the forward and backward passes of
//! `softmax(q kᵀ * scale, masked) v`, one block of queries at a time, so no `[batch, heads, seq,
//! keys]` tensor is ever made. Flex's own attention runs every (batch, head) on one thread and
//! scores the causal half it then masks; its backward under autodiff is Burn's unfused chain.
//!
//! Per block of query rows, only the keys a row may see are scored (under the causal mask the
//! block's last row sees `offset + last + 1` keys). The forward pass keeps each row's log-sum-exp
//! `lse`; the backward pass rebuilds `P = exp(S * scale - lse)` from it and computes, as
//! FlashAttention-2 does, `dV += Pᵀ dO`, `dP = dO vᵀ`, `dS = P ⊙ (dP - rowsum(dO ⊙ O)) * scale`,
//! `dQ = dS k`, `dK += dSᵀ q`.
//!
//! Grouped-query attention is read in place: query head `i` reads key/value head `i / n_rep`.
//! Inputs are read through their strides (the decoder's `[batch, seq, heads, dim]` projections
//! swapped to `[batch, heads, seq, dim]` are not copied); the output and `dq` are written in
//! `[batch, seq, heads, dim]` order and returned as the swapped view, so the decoder's swap back
//! and reshape are free. A row that may see no key (padding) gets zeros and no gradient.

use burn::tensor::TensorData;
use burn_flex::FlexTensor;
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use multiversion::multiversion;

use super::elementwise::{dot, exp_shifted, softmax};

/// Query rows per block: the scores of a block (`BLOCK_Q * keys` floats) stay in L2 up to a few
/// thousand keys.
const BLOCK_Q: usize = 64;

/// `[batch, heads, rows, dim]` f32 read through its strides (the last one 1).
struct View<'a> {
    data: &'a [f32],
    start: usize,
    batch: usize,
    head: usize,
    row: usize,
}

impl<'a> View<'a> {
    fn new(t: &'a FlexTensor) -> Self {
        let layout = t.layout();
        let s = layout.strides();
        assert!(
            s.len() == 4 && s[3] == 1 && s.iter().all(|&x| x >= 0),
            "strided() first"
        );
        Self {
            data: t.storage::<f32>(),
            start: layout.start_offset(),
            batch: s[0] as usize,
            head: s[1] as usize,
            row: s[2] as usize,
        }
    }

    /// The first element of row `row` of head `head` of batch `b`.
    fn at(&self, b: usize, head: usize, row: usize) -> *const f32 {
        self.data[self.start + b * self.batch + head * self.head + row * self.row..].as_ptr()
    }
}

/// `t` if `View` can read it, else a contiguous copy.
fn strided(t: FlexTensor) -> FlexTensor {
    let s = t.layout().strides();
    if s[3] == 1 && s.iter().all(|&x| x >= 0) {
        t
    } else {
        t.to_contiguous()
    }
}

/// The boolean mask `[batch | 1, heads | 1, seq, keys]` (true: may not see), as bytes with
/// steps per batch and per head (0 where broadcast).
struct Mask {
    t: FlexTensor,
    batch: usize,
    head: usize,
}

impl Mask {
    fn new(t: FlexTensor, s: usize, keys: usize) -> Self {
        let t = t.to_contiguous();
        let shape = t.layout().shape().clone();
        assert!(
            shape[2] == s && shape[3] == keys,
            "mask [.., {}, {}] for {s} queries and {keys} keys",
            shape[2],
            shape[3]
        );
        let batch = if shape[0] == 1 {
            0
        } else {
            shape[1] * s * keys
        };
        let head = if shape[1] == 1 { 0 } else { s * keys };
        Self { t, batch, head }
    }

    fn row(&self, b: usize, h: usize, i: usize, keys: usize) -> &[u8] {
        let start = b * self.batch + h * self.head + i * keys;
        &self.t.bytes()[start..start + keys]
    }
}

/// The problem's sizes and masking, shared by both passes.
struct Dims {
    batch: usize,
    heads: usize,
    n_rep: usize,
    s: usize,
    keys: usize,
    d: usize,
    scale: f32,
    /// Under the causal mask, query `i` sees keys `..= i + offset` (the queries are the last `s`
    /// positions of the keys).
    causal: Option<usize>,
}

impl Dims {
    fn new(q: &FlexTensor, k: &FlexTensor, is_causal: bool) -> Self {
        let [batch, heads, s, d] = dims4(q);
        let [_, kv_heads, keys, _] = dims4(k);
        assert!(
            heads % kv_heads == 0,
            "{heads} query heads, {kv_heads} key/value heads"
        );
        assert!(
            !is_causal || keys >= s,
            "causal with {s} queries but {keys} keys"
        );
        Self {
            batch,
            heads,
            n_rep: heads / kv_heads,
            s,
            keys,
            d,
            scale: 1.0 / (d as f32).sqrt(),
            causal: is_causal.then(|| keys - s),
        }
    }

    /// The keys the rows `q0..q1` may see are among `..self.visible(q1)`.
    fn visible(&self, q1: usize) -> usize {
        self.causal
            .map_or(self.keys, |offset| (q1 + offset).min(self.keys))
    }

    fn blocks(&self) -> usize {
        self.s.div_ceil(BLOCK_Q)
    }

    /// A new `[batch, heads, s, d]` tensor laid out as `[batch, s, heads, d]`.
    fn seq_major(&self, data: Vec<f32>) -> FlexTensor {
        let shape = [self.batch, self.s, self.heads, self.d];
        FlexTensor::from_data(TensorData::new(data, shape)).transpose(1, 2)
    }

    /// Where row `i` of head `h` of batch `b` starts in `seq_major` data.
    fn seq_major_row(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.s + i) * self.heads + h) * self.d
    }
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let shape = t.layout().shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

/// Scores `S * scale` of rows `q0..q1` against keys `..n` into `out` (`[q1 - q0, n]`), masked
/// scores set to -inf.
#[allow(clippy::too_many_arguments)]
fn scores(
    dims: &Dims,
    q: &View,
    k: &View,
    mask: Option<&Mask>,
    (b, h): (usize, usize),
    (q0, q1): (usize, usize),
    n: usize,
    out: &mut [f32],
) {
    let m = q1 - q0;
    // SAFETY: q's rows q0..q1 and k's rows ..n of this head exist (shapes checked by `Dims`) and
    // `out` holds m * n floats.
    unsafe {
        gemm(
            m,
            n,
            dims.d,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            q.at(b, h, q0),
            1,
            q.row as isize,
            k.at(b, h / dims.n_rep, 0),
            k.row as isize,
            1,
            0.0,
            dims.scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
    for (r, row) in out.chunks_exact_mut(n).enumerate() {
        let i = q0 + r;
        if let Some(offset) = dims.causal {
            let seen = (i + offset + 1).min(n);
            row[seen..].fill(f32::NEG_INFINITY);
        }
        if let Some(mask) = mask {
            let bits = &mask.row(b, h, i, dims.keys)[..n];
            for (x, &masked) in row.iter_mut().zip(bits) {
                if masked != 0 {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// A raw pointer that tasks writing disjoint parts of one buffer share.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every task writes only the rows of its own (batch, head), which no other task touches.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Through a method, so closures capture the `Shared` (Send) and not its raw field.
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

/// `dst[rows, n] (= or +=) lhs[rows, inner] · rhs[inner, n]`, each given by pointer and
/// (row, column) strides.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    (rows, n, inner): (usize, usize, usize),
    dst: (*mut f32, usize),
    accumulate: bool,
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) {
    // SAFETY: the caller passes pointers valid for the shapes and strides given.
    unsafe {
        gemm(
            rows,
            n,
            inner,
            dst.0,
            1,
            dst.1 as isize,
            accumulate,
            lhs.0,
            lhs.2,
            lhs.1,
            rhs.0,
            rhs.2,
            rhs.1,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// The forward pass: the output (`[batch, heads, s, d]`, laid out seq-major) and the
/// log-sum-exp of every row (`[batch, heads, s]`; +inf for a row that sees no key).
pub fn forward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    mask: Option<FlexTensor>,
    is_causal: bool,
) -> (FlexTensor, FlexTensor) {
    let (q, k, v) = (strided(q), strided(k), strided(v));
    let dims = Dims::new(&q, &k, is_causal);
    let mask = mask.map(|m| Mask::new(m, dims.s, dims.keys));
    let (qv, kv, vv) = (View::new(&q), View::new(&k), View::new(&v));
    let Dims {
        batch, heads, s, d, ..
    } = dims;
    let mut out = vec![0.0f32; batch * heads * s * d];
    let mut lse = vec![0.0f32; batch * heads * s];
    let (out_ptr, lse_ptr) = (Shared(out.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    (0..batch * heads * dims.blocks())
        .into_par_iter()
        .for_each(|task| {
            let (bh, block) = (task / dims.blocks(), task % dims.blocks());
            let (b, h) = (bh / heads, bh % heads);
            let (q0, q1) = (block * BLOCK_Q, ((block + 1) * BLOCK_Q).min(s));
            let n = dims.visible(q1);
            let mut p = vec![0.0f32; (q1 - q0) * n];
            scores(&dims, &qv, &kv, mask.as_ref(), (b, h), (q0, q1), n, &mut p);
            for (r, row) in p.chunks_exact_mut(n).enumerate() {
                let row_lse = softmax(row);
                // SAFETY: row q0 + r of (b, h) belongs to this task alone.
                unsafe { *lse_ptr.at(bh * s + q0 + r) = row_lse };
            }
            let o_row = dims.seq_major_row(b, h, q0);
            // SAFETY: p is [q1 - q0, n]; v has n rows of d; the output rows q0..q1 of (b, h)
            // sit heads * d apart and belong to this task alone.
            unsafe {
                matmul(
                    (q1 - q0, d, n),
                    (out_ptr.at(o_row), heads * d),
                    false,
                    (p.as_ptr(), n as isize, 1),
                    (vv.at(b, h / dims.n_rep, 0), vv.row as isize, 1),
                );
            }
        });
    let lse = FlexTensor::from_data(TensorData::new(lse, [batch, heads, s]));
    (dims.seq_major(out), lse)
}

/// The backward pass: `[dq, dk, dv]` from the forward pass's inputs, output and log-sum-exp and
/// the output's gradient. dk and dv have the key/value heads of k and v.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    mask: Option<FlexTensor>,
    is_causal: bool,
    out: FlexTensor,
    lse: FlexTensor,
    d_out: FlexTensor,
) -> [FlexTensor; 3] {
    let (q, k, v) = (strided(q), strided(k), strided(v));
    let (out, d_out, lse) = (strided(out), strided(d_out), lse.to_contiguous());
    let dims = Dims::new(&q, &k, is_causal);
    let mask = mask.map(|m| Mask::new(m, dims.s, dims.keys));
    let (qv, kv, vv) = (View::new(&q), View::new(&k), View::new(&v));
    let (ov, dov) = (View::new(&out), View::new(&d_out));
    let lse = lse.storage::<f32>();
    let Dims {
        batch,
        heads,
        s,
        keys,
        d,
        ..
    } = dims;
    let mut dq = vec![0.0f32; batch * heads * s * d];
    let dq_ptr = Shared(dq.as_mut_ptr());
    // Each (batch, query head) accumulates its own dk and dv; the heads sharing a key/value
    // head are summed after.
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..batch * heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / heads, bh % heads);
            let mut dk = vec![0.0f32; keys * d];
            let mut dv = vec![0.0f32; keys * d];
            // P and dP of one block, reused by every block (both products overwrite them).
            let mut p_block = vec![0.0f32; BLOCK_Q.min(s) * keys];
            let mut dp_block = p_block.clone();
            for block in 0..dims.blocks() {
                let (q0, q1) = (block * BLOCK_Q, ((block + 1) * BLOCK_Q).min(s));
                let (m, n) = (q1 - q0, dims.visible(q1));
                let (p, dp) = (&mut p_block[..m * n], &mut dp_block[..m * n]);
                scores(&dims, &qv, &kv, mask.as_ref(), (b, h), (q0, q1), n, p);
                for (r, row) in p.chunks_exact_mut(n).enumerate() {
                    exp_shifted(row, lse[bh * s + q0 + r], 1.0);
                }
                let (k_head, v_head) = (kv.at(b, h / dims.n_rep, 0), vv.at(b, h / dims.n_rep, 0));
                // SAFETY (every product below): p and dp are [m, n]; q, dO and O have rows
                // q0..q1 of d, k and v rows ..n of d (strides from their layouts); dk and dv
                // are [keys, d]; dq's rows q0..q1 of (b, h) sit heads * d apart and belong to
                // this task alone.
                unsafe {
                    // dV[..n] += Pᵀ dO
                    matmul(
                        (n, d, m),
                        (dv.as_mut_ptr(), d),
                        true,
                        (p.as_ptr(), 1, n as isize),
                        (dov.at(b, h, q0), dov.row as isize, 1),
                    );
                    // dP = dO vᵀ
                    matmul(
                        (m, n, d),
                        (dp.as_mut_ptr(), n),
                        false,
                        (dov.at(b, h, q0), dov.row as isize, 1),
                        (v_head, 1, vv.row as isize),
                    );
                }
                for r in 0..m {
                    // SAFETY: rows q0 + r of O and dO have d elements.
                    let (o, g) = unsafe {
                        (
                            std::slice::from_raw_parts(ov.at(b, h, q0 + r), d),
                            std::slice::from_raw_parts(dov.at(b, h, q0 + r), d),
                        )
                    };
                    let (p_row, dp_row) = (&p[r * n..(r + 1) * n], &mut dp[r * n..(r + 1) * n]);
                    score_grads(dp_row, p_row, dot(o, g), dims.scale);
                }
                let ds = &*dp;
                unsafe {
                    // dQ = dS k
                    matmul(
                        (m, d, n),
                        (dq_ptr.at(dims.seq_major_row(b, h, q0)), heads * d),
                        false,
                        (ds.as_ptr(), n as isize, 1),
                        (k_head, kv.row as isize, 1),
                    );
                    // dK[..n] += dSᵀ q
                    matmul(
                        (n, d, m),
                        (dk.as_mut_ptr(), d),
                        true,
                        (ds.as_ptr(), 1, n as isize),
                        (qv.at(b, h, q0), qv.row as isize, 1),
                    );
                }
            }
            (dk, dv)
        })
        .collect();
    // Sum each key/value head's query heads into [batch, keys, kv_heads, d] order (k's own).
    let kv_heads = heads / dims.n_rep;
    let mut dk = vec![0.0f32; batch * keys * kv_heads * d];
    let mut dv = vec![0.0f32; batch * keys * kv_heads * d];
    for (bh, (hk, hv)) in per_head.iter().enumerate() {
        let (b, g) = (bh / heads, bh % heads / dims.n_rep);
        for j in 0..keys {
            let at = ((b * keys + j) * kv_heads + g) * d;
            let src = j * d..(j + 1) * d;
            add(&mut dk[at..at + d], &hk[src.clone()]);
            add(&mut dv[at..at + d], &hv[src]);
        }
    }
    let kv_major = |data| {
        FlexTensor::from_data(TensorData::new(data, [batch, keys, kv_heads, d])).transpose(1, 2)
    };
    [dims.seq_major(dq), kv_major(dk), kv_major(dv)]
}

/// `dS = P ⊙ (dP - rowsum(dO ⊙ O)) * scale` over one row, in place of dP.
#[multiversion(targets("x86_64+avx2+fma"))]
fn score_grads(dp: &mut [f32], p: &[f32], row_dot: f32, scale: f32) {
    for (ds, &pr) in dp.iter_mut().zip(p) {
        *ds = pr * (*ds - row_dot) * scale;
    }
}

fn add(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}
