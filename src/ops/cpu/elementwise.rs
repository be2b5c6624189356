//! RoPE, SwiGLU, RMSNorm and cross-entropy on the CPU (Flex, f32), forward and backward, each
//! one pass over its rows split across the thread pool. Flex runs elementwise ops on one thread, its sigmoid
//! calls libm's `expf` per element, and RoPE's broadcast of the `[batch, seq, 1, dim]` tables
//! over heads went through its strided iterator: together about a fifth of a training step.

use multiversion::multiversion;
use rayon::prelude::*;

/// Rows of work handed to one task at least (a few thousand floats).
const MIN_TASK: usize = 4096;

/// Rows per task for rows of `len` floats.
fn rows_per_task(len: usize) -> usize {
    MIN_TASK.div_ceil(len.max(1))
}

/// `e^x` in f32 without libm, so loops over slices vectorize: Cephes' `expf` (range reduction
/// by ln 2 split in two constants, a degree-6 polynomial; within 2 ulp of libm over the range
/// used). `e^x` is exactly 0 below -87.3 (and for -inf), as the attention kernel needs for
/// masked scores.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Rounds to the nearest integer by adding and subtracting 1.5 * 2^23: `floor` is a libm call
    // on baseline x86-64 (no SSE4.1) and would keep the loops from vectorizing. The sum's bits
    // hold that integer plus those of 1.5 * 2^23, read back without a float-to-int cast (Rust's
    // saturating cast stays scalar in the partial-sum loops).
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.3, 88.7);
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let p = p * r * r + r + 1.0;
    let scale = f32::from_bits(shifted.to_bits().wrapping_sub(ROUND.to_bits() - 127) << 23);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `x * cos + rotate_half(x) * sin` for `x` `[positions, heads, dim]` and the tables
/// `[positions, dim]` (both halves of a table row hold the same angles).
pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], heads: usize, dim: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let per_position = heads * dim;
    let positions = rows_per_task(per_position);
    out.par_chunks_mut(positions * per_position)
        .zip(x.par_chunks(positions * per_position))
        .enumerate()
        .for_each(|(task, (out, x))| {
            let tables = task * positions * dim..;
            rope_positions(out, x, &cos[tables.clone()], &sin[tables], heads, dim);
        });
    out
}

/// `rope` over whole positions of `x`, the tables from the first of them on.
#[multiversion(targets("x86_64+avx2+fma"))]
fn rope_positions(out: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], heads: usize, dim: usize) {
    let half = dim / 2;
    for (p, (out, x)) in out
        .chunks_exact_mut(heads * dim)
        .zip(x.chunks_exact(heads * dim))
        .enumerate()
    {
        let (c, s) = (&cos[p * dim..(p + 1) * dim], &sin[p * dim..(p + 1) * dim]);
        for (out, x) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
            let (x1, x2) = x.split_at(half);
            let (o1, o2) = out.split_at_mut(half);
            for i in 0..half {
                o1[i] = x1[i] * c[i] - x2[i] * s[i];
                o2[i] = x2[i] * c[half + i] + x1[i] * s[half + i];
            }
        }
    }
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; gate.len()];
    out.par_chunks_mut(MIN_TASK)
        .zip(gate.par_chunks(MIN_TASK).zip(up.par_chunks(MIN_TASK)))
        .for_each(|(out, (g, u))| swiglu_chunk(out, g, u));
    out
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn swiglu_chunk(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid(g) * u;
    }
}

/// The gradients of `gate` and `up` from that of `silu(gate) * up`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut d_gate = vec![0.0f32; gate.len()];
    let mut d_up = vec![0.0f32; gate.len()];
    d_gate
        .par_chunks_mut(MIN_TASK)
        .zip(d_up.par_chunks_mut(MIN_TASK))
        .zip(gate.par_chunks(MIN_TASK).zip(up.par_chunks(MIN_TASK)))
        .zip(grad.par_chunks(MIN_TASK))
        .for_each(|(((dg, du), (g, u)), dy)| swiglu_backward_chunk(dg, du, g, u, dy));
    (d_gate, d_up)
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn swiglu_backward_chunk(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
    for i in 0..dg.len() {
        let s = sigmoid(g[i]);
        du[i] = dy[i] * g[i] * s;
        dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
    }
}

/// `1 / sqrt(mean(row²) + eps)`.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let sum = sum_of(row, |x| x * x);
    1.0 / (sum / row.len() as f32 + eps).sqrt()
}

/// `weight * x / sqrt(mean(x²) + eps)` over rows of `weight.len()`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let dim = weight.len();
    let chunk = rows_per_task(dim) * dim;
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(out, x)| rms_norm_rows(out, x, weight, eps));
    out
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn rms_norm_rows(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for (out, x) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
        let r = inv_rms(x, eps);
        for ((o, &x), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = x * r * w;
        }
    }
}

/// The gradient of `x` (and of `weight` when asked) from that of `rms_norm(x, weight)`: with
/// `n = x * r`, `dn = grad * weight`: `dx = r * (dn - n * mean(dn * n))`, `dweight = Σ grad * n`.
pub fn rms_norm_backward(
    x: &[f32],
    weight: &[f32],
    eps: f32,
    grad: &[f32],
    weight_grad: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let dim = weight.len();
    let chunk = rows_per_task(dim) * dim;
    let mut dx = vec![0.0f32; x.len()];
    let partial_dw: Vec<Vec<f32>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(grad.par_chunks(chunk)))
        .map(|(dx, (x, grad))| {
            let mut dw = vec![0.0f32; if weight_grad { dim } else { 0 }];
            rms_norm_backward_rows(dx, &mut dw, x, grad, weight, eps);
            dw
        })
        .collect();
    let dw = weight_grad.then(|| {
        let mut dw = vec![0.0f32; dim];
        for part in &partial_dw {
            dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        dw
    });
    (dx, dw)
}

/// `rms_norm_backward` over whole rows; `dw` is empty when the weight's gradient is not asked
/// for, else it accumulates.
#[multiversion(targets("x86_64+avx2+fma"))]
fn rms_norm_backward_rows(
    dx: &mut [f32],
    dw: &mut [f32],
    x: &[f32],
    grad: &[f32],
    weight: &[f32],
    eps: f32,
) {
    let dim = weight.len();
    for ((dx, x), g) in dx
        .chunks_exact_mut(dim)
        .zip(x.chunks_exact(dim))
        .zip(grad.chunks_exact(dim))
    {
        let r = inv_rms(x, eps);
        let dot = sum_of_products(g, weight, x) * r;
        let mean = dot / dim as f32;
        for i in 0..dim {
            let n = x[i] * r;
            dx[i] = r * (g[i] * weight[i] - n * mean);
        }
        for i in 0..dw.len() {
            dw[i] += g[i] * x[i] * r;
        }
    }
}

/// Independent partial maxima and sums per row: one f32 accumulator fixes the order of the
/// additions, and the loop would not vectorize. Results do not depend on the vector width.
const LANES: usize = 8;

/// `Σ f(row_0[i], row_1[i], ..)` over rows of one length, in `LANES` partial sums. The loop body
/// sees whole `LANES`-float arrays, with no bounds check left per element, so that it vectorizes.
#[inline(always)]
fn sum_by<const K: usize>(rows: [&[f32]; K], f: impl Fn([f32; K]) -> f32) -> f32 {
    let n = rows[0].len();
    let whole = n / LANES * LANES;
    let mut lanes = [0.0f32; LANES];
    for j in (0..whole).step_by(LANES) {
        let chunks: [&[f32; LANES]; K] = rows.map(|r| r[j..j + LANES].try_into().unwrap());
        for (i, lane) in lanes.iter_mut().enumerate() {
            *lane += f(chunks.map(|c| c[i]));
        }
    }
    lanes.iter().sum::<f32>() + (whole..n).map(|i| f(rows.map(|r| r[i]))).sum::<f32>()
}

/// `Σ f(x)` over `row`.
#[inline(always)]
fn sum_of(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    sum_by([row], |[x]| f(x))
}

/// `Σ a·b·c`.
#[inline(always)]
fn sum_of_products(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    sum_by([a, &b[..a.len()], &c[..a.len()]], |[a, b, c]| a * b * c)
}

/// `Σ a·b`.
#[multiversion(targets("x86_64+avx2+fma"))]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum_by([a, &b[..a.len()]], |[a, b]| a * b)
}

/// The maximum of `row`, -inf when empty.
#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for c in chunks {
        for i in 0..LANES {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// `log(sum(exp(row)))`, shifted by the row's maximum so that no `exp` overflows.
#[multiversion(targets("x86_64+avx2+fma"))]
fn log_sum_exp(row: &[f32]) -> f32 {
    // The exponentials go through a block on the stack: `exp` vectorizes in a plain loop over a
    // slice, not inside the partial sums' loop.
    const BLOCK: usize = 512;
    let max = max_of(row);
    let mut block = [0.0f32; BLOCK];
    let sum: f32 = row
        .chunks(BLOCK)
        .map(|chunk| {
            let block = &mut block[..chunk.len()];
            block
                .iter_mut()
                .zip(chunk)
                .for_each(|(e, &x)| *e = exp(x - max));
            sum_of(block, |e| e)
        })
        .sum();
    max + sum.ln()
}

/// `row` turned into `softmax(row)` in place; returns its log-sum-exp. A row of -inf (a query
/// that may see no key) becomes zeros, with log-sum-exp +inf.
#[multiversion(targets("x86_64+avx2+fma"))]
pub fn softmax(row: &mut [f32]) -> f32 {
    let max = max_of(row);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return f32::INFINITY;
    }
    row.iter_mut().for_each(|x| *x = exp(*x - max));
    let sum = sum_of(row, |x| x);
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
    max + sum.ln()
}

/// `x = exp(x - shift) * scale` over `row` (softmax from a saved log-sum-exp).
#[multiversion(targets("x86_64+avx2+fma"))]
pub fn exp_shifted(row: &mut [f32], shift: f32, scale: f32) {
    row.iter_mut().for_each(|x| *x = exp(*x - shift) * scale);
}

/// Each row's loss `logsumexp(row) - row[target]` and its log-sum-exp, for `logits` in rows of
/// `vocab`, one row per target.
pub fn cross_entropy(logits: &[f32], targets: &[usize], vocab: usize) -> (Vec<f32>, Vec<f32>) {
    let lse: Vec<f32> = logits.par_chunks_exact(vocab).map(log_sum_exp).collect();
    let loss = lse
        .iter()
        .zip(logits.chunks_exact(vocab).zip(targets))
        .map(|(lse, (row, &t))| lse - row[t])
        .collect();
    (loss, lse)
}

/// The logits' gradient from the losses' (`grad`): `(exp(row - lse) - onehot(target)) * grad`.
pub fn cross_entropy_backward(
    logits: &[f32],
    targets: &[usize],
    lse: &[f32],
    grad: &[f32],
    vocab: usize,
) -> Vec<f32> {
    let mut d = vec![0.0f32; logits.len()];
    d.par_chunks_exact_mut(vocab)
        .zip(logits.par_chunks_exact(vocab))
        .zip(targets.par_iter().zip(lse.par_iter().zip(grad)))
        .for_each(|((d, row), (&t, (&lse, &g)))| {
            d.copy_from_slice(row);
            exp_shifted(d, lse, g);
            d[t] -= g;
        });
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_zero_for_minus_infinity() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, libm) = (exp(x), x.exp());
            let ulp = (ours.to_bits() as i64 - libm.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {ours}, libm {libm} ({ulp} ulp)");
            x += 0.001_37;
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
    }
}
