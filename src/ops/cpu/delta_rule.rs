//! The chunked gated delta rule's forward pass on the CPU (Flex, f32): one task per (batch, head),
//! chunk by chunk as the generic path chunks, each chunk's WY/UT matrix inverted by forward
//! substitution (where the generic path squares it repeatedly, six 64 x 64 products on 5-d
//! tensors) and its products small gemms on the task's own thread, into buffers the task owns.

use rayon::prelude::*;

use super::lora::{product_here, Mat};

/// Sizes: batch x heads tasks over `s` positions, chunks of `c`.
pub struct Dims {
    pub tasks: usize,
    pub s: usize,
    pub dk: usize,
    pub dv: usize,
    pub c: usize,
}

impl Dims {
    fn chunks(&self) -> usize {
        self.s.div_ceil(self.c)
    }
}

/// The output `[tasks, s, dv]`, the final state `[tasks, dk, dv]` and the state entering each
/// chunk `[tasks, chunks, dk, dv]`, from q, k `[tasks, s, dk]`, v `[tasks, s, dv]` and g, beta
/// `[tasks, s]` (row-major, contiguous), from `state` `[tasks, dk, dv]` (zeros when None).
pub fn forward(
    [q, k, v, g, beta]: [&[f32]; 5],
    state: Option<&[f32]>,
    dims: &Dims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims {
        tasks, s, dk, dv, ..
    } = *dims;
    let n = dims.chunks();
    let mut out = vec![0.0f32; tasks * s * dv];
    let mut last = match state {
        Some(state) => state.to_vec(),
        None => vec![0.0f32; tasks * dk * dv],
    };
    let mut entering = vec![0.0f32; tasks * n * dk * dv];
    out.par_chunks_mut(s * dv)
        .zip(last.par_chunks_mut(dk * dv))
        .zip(entering.par_chunks_mut(n * dk * dv))
        .enumerate()
        .for_each(|(t, ((out, state), entering))| {
            let task = Task {
                q: block(q, t, s * dk),
                k: block(k, t, s * dk),
                v: block(v, t, s * dv),
                g: block(g, t, s),
                beta: block(beta, t, s),
                dims,
            };
            task.run(out, state, entering);
        });
    (out, last, entering)
}

/// One (batch, head)'s inputs.
struct Task<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    g: &'a [f32],
    beta: &'a [f32],
    dims: &'a Dims,
}

impl Task<'_> {
    fn run(&self, out: &mut [f32], state: &mut [f32], entering: &mut [f32]) {
        let Dims { s, dk, dv, c, .. } = *self.dims;
        let mut cum = vec![0.0f32; c];
        let (mut kk, mut qk) = (vec![0.0f32; c * c], vec![0.0f32; c * c]);
        let (mut u, mut w) = (vec![0.0f32; c * dv], vec![0.0f32; c * dk]);
        let (mut rhs_v, mut rhs_k) = (vec![0.0f32; c * dv], vec![0.0f32; c * dk]);
        let mut solve = vec![0.0f32; c * c];
        let mut scaled = vec![0.0f32; c * dk];
        for (i, start) in (0..s).step_by(c).enumerate() {
            entering[i * dk * dv..(i + 1) * dk * dv].copy_from_slice(state);
            let len = c.min(s - start);
            let q = Mat::new(&self.q[start * dk..(start + len) * dk], len, dk);
            let k = Mat::new(&self.k[start * dk..(start + len) * dk], len, dk);
            let (g, beta) = (&self.g[start..start + len], &self.beta[start..start + len]);
            let cum = &mut cum[..len];
            let mut total = 0.0;
            for (cum, &g) in cum.iter_mut().zip(g) {
                total += g;
                *cum = total;
            }
            // N[i][j] = beta_i · exp(cum_i - cum_j) · k_i·k_j below the diagonal, and
            // T = (I + N)⁻¹ row by row: T_i = e_i - Σ_{j<i} N[i][j]·T_j, where row j of the
            // lower-triangular T is zero past column j.
            let kk = &mut kk[..len * len];
            product_here(kk, false, k, k.t(), 1.0);
            let solve = &mut solve[..len * len];
            solve.fill(0.0);
            for i in 0..len {
                let (done, row) = solve.split_at_mut(i * len);
                row[i] = 1.0;
                for j in 0..i {
                    let n = beta[i] * (cum[i] - cum[j]).exp() * kk[i * len + j];
                    axpy(&mut row[..=j], -n, &done[j * len..j * len + j + 1]);
                }
            }
            // The new values T·(beta·v), and the keys' pull on the state T·(beta·exp(cum)·k).
            let (rhs_v, rhs_k) = (&mut rhs_v[..len * dv], &mut rhs_k[..len * dk]);
            let v_rows = self.v[start * dv..(start + len) * dv].chunks_exact(dv);
            for ((row, v_row), &b) in rhs_v.chunks_exact_mut(dv).zip(v_rows).zip(beta) {
                row.iter_mut().zip(v_row).for_each(|(x, &v)| *x = b * v);
            }
            let k_rows = self.k[start * dk..(start + len) * dk].chunks_exact(dk);
            for (((row, k_row), &b), &cum) in rhs_k
                .chunks_exact_mut(dk)
                .zip(k_rows)
                .zip(beta)
                .zip(cum.iter())
            {
                let scale = b * cum.exp();
                row.iter_mut().zip(k_row).for_each(|(x, &k)| *x = scale * k);
            }
            let (u, w) = (&mut u[..len * dv], &mut w[..len * dk]);
            let t = Mat::new(solve, len, len);
            product_here(u, false, t, Mat::new(rhs_v, len, dv), 1.0);
            product_here(w, false, t, Mat::new(rhs_k, len, dk), 1.0);
            // v_new = u - w·S.
            let s_mat = Mat::new(state, dk, dv);
            product_here(u, true, Mat::new(w, len, dk), s_mat, -1.0);
            // out = exp(cum)·(q S) + (q kᵀ ⊙ decay) v_new.
            let o = &mut out[start * dv..(start + len) * dv];
            product_here(o, false, q, s_mat, 1.0);
            for (i, row) in o.chunks_exact_mut(dv).enumerate() {
                let e = cum[i].exp();
                row.iter_mut().for_each(|x| *x *= e);
            }
            let qk = &mut qk[..len * len];
            product_here(qk, false, q, k.t(), 1.0);
            for i in 0..len {
                for j in 0..len {
                    let decay = if j <= i { (cum[i] - cum[j]).exp() } else { 0.0 };
                    qk[i * len + j] *= decay;
                }
            }
            let v_new = Mat::new(u, len, dv);
            product_here(o, true, Mat::new(qk, len, len), v_new, 1.0);
            // S = exp(last)·S + (exp(last - cum)·k)ᵀ v_new.
            let end = cum[len - 1];
            let scaled = &mut scaled[..len * dk];
            let k_rows = self.k[start * dk..(start + len) * dk].chunks_exact(dk);
            for ((row, k_row), &cum) in scaled.chunks_exact_mut(dk).zip(k_rows).zip(cum.iter()) {
                let e = (end - cum).exp();
                row.iter_mut().zip(k_row).for_each(|(x, &k)| *x = k * e);
            }
            state.iter_mut().for_each(|x| *x *= end.exp());
            let kt = Mat::new(scaled, len, dk).t();
            product_here(state, true, kt, v_new, 1.0);
        }
    }
}

/// Block `i` of `x`, in blocks of `len`.
fn block(x: &[f32], i: usize, len: usize) -> &[f32] {
    &x[i * len..(i + 1) * len]
}

/// `y += a·x`.
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
