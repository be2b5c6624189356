//! The chunked gated delta rule on the CPU (Flex, f32), forward and backward: one task per
//! (batch, head), chunk by chunk as the generic path chunks, each chunk's WY/UT matrix inverted by
//! forward substitution (where the generic path squares it repeatedly, six 64 x 64 products on
//! 5-d tensors) and its products small gemms on the task's own thread, into buffers the task
//! owns. The backward pass recomputes each chunk from its entering state, as the generic one does,
//! and follows the same differentiation (`generic::chunked_delta_rule_backward`).

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
    inputs: [&[f32]; 5],
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
            Task::new(inputs, t, dims).forward(out, state, entering);
        });
    (out, last, entering)
}

/// `[dq, dk, dv, dg, dbeta]` (the inputs' shapes) from the inputs, the states `forward` returned
/// as entering each chunk, and the output's gradient `[tasks, s, dv]`; the final state takes
/// none.
pub fn backward(
    inputs: [&[f32]; 5],
    entering: &[f32],
    d_out: &[f32],
    dims: &Dims,
) -> [Vec<f32>; 5] {
    let (tasks, s, n) = (dims.tasks, dims.s, dims.chunks());
    let (kd, vd) = (dims.dk, dims.dv);
    let mut grads = [s * kd, s * kd, s * vd, s, s].map(|len| vec![0.0f32; tasks * len]);
    let [dq, dk, dv, dg, dbeta] = &mut grads;
    dq.par_chunks_mut(s * kd)
        .zip(dk.par_chunks_mut(s * kd))
        .zip(dv.par_chunks_mut(s * vd))
        .zip(dg.par_chunks_mut(s))
        .zip(dbeta.par_chunks_mut(s))
        .enumerate()
        .for_each(|(t, ((((dq, dk), dv), dg), dbeta))| {
            let task = Task::new(inputs, t, dims);
            let entering = block(entering, t, n * kd * vd);
            let d_out = block(d_out, t, s * vd);
            task.backward(entering, d_out, [dq, dk, dv, dg, dbeta]);
        });
    grads
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

/// One chunk's quantities, which both passes compute: buffers for a whole chunk, used to `len`.
struct Chunk {
    len: usize,
    /// Log decay from the chunk's start through each position.
    cum: Vec<f32>,
    /// `K Kᵀ`, then `(I + N)⁻¹` with `N[i][j] = beta_i · exp(cum_i - cum_j) · kk[i][j]`, j < i.
    kk: Vec<f32>,
    solve: Vec<f32>,
    /// The right-hand sides `beta·V` and `beta·exp(cum)·K`.
    rhs_v: Vec<f32>,
    rhs_k: Vec<f32>,
    /// `T·rhs_v` (then, in place, `v_new = T·rhs_v - W·S`) and `W = T·rhs_k`.
    v_new: Vec<f32>,
    w: Vec<f32>,
    /// `Q Kᵀ`, and `Q Kᵀ ⊙ decay` (causal, with the diagonal).
    qk: Vec<f32>,
    intra: Vec<f32>,
}

impl Chunk {
    fn new(dims: &Dims) -> Self {
        let Dims { c, dk, dv, .. } = *dims;
        Self {
            len: 0,
            cum: vec![0.0; c],
            kk: vec![0.0; c * c],
            solve: vec![0.0; c * c],
            rhs_v: vec![0.0; c * dv],
            rhs_k: vec![0.0; c * dk],
            v_new: vec![0.0; c * dv],
            w: vec![0.0; c * dk],
            qk: vec![0.0; c * c],
            intra: vec![0.0; c * c],
        }
    }

    /// `exp(cum_i - cum_j)` for j ≤ i, else 0.
    fn decay(&self, i: usize, j: usize) -> f32 {
        match j <= i {
            true => (self.cum[i] - self.cum[j]).exp(),
            false => 0.0,
        }
    }

    /// The chunk of `len` positions from `start`, entered with `state` `[dk, dv]`.
    fn compute(&mut self, task: &Task, start: usize, len: usize, state: &[f32]) {
        let Dims { dk, dv, .. } = *task.dims;
        self.len = len;
        let (q, k) = (
            task.rows(task.q, start, len, dk),
            task.rows(task.k, start, len, dk),
        );
        let beta = &task.beta[start..start + len];
        let mut total = 0.0;
        for (cum, &g) in self.cum[..len].iter_mut().zip(&task.g[start..start + len]) {
            total += g;
            *cum = total;
        }
        let kk = &mut self.kk[..len * len];
        product_here(kk, false, k, k.t(), 1.0);
        // T = (I + N)⁻¹ row by row: T_i = e_i - Σ_{j<i} N[i][j]·T_j, where row j of the
        // lower-triangular T is zero past column j.
        let solve = &mut self.solve[..len * len];
        solve.fill(0.0);
        for i in 0..len {
            let (done, row) = solve.split_at_mut(i * len);
            row[i] = 1.0;
            for j in 0..i {
                let n = beta[i] * (self.cum[i] - self.cum[j]).exp() * kk[i * len + j];
                axpy(&mut row[..=j], -n, &done[j * len..j * len + j + 1]);
            }
        }
        let rhs_v = &mut self.rhs_v[..len * dv];
        let v_rows = task.v[start * dv..(start + len) * dv].chunks_exact(dv);
        for ((row, v_row), &b) in rhs_v.chunks_exact_mut(dv).zip(v_rows).zip(beta) {
            row.iter_mut().zip(v_row).for_each(|(x, &v)| *x = b * v);
        }
        let rhs_k = &mut self.rhs_k[..len * dk];
        let k_rows = task.k[start * dk..(start + len) * dk].chunks_exact(dk);
        let scales = beta.iter().zip(&self.cum).map(|(&b, &cum)| b * cum.exp());
        for ((row, k_row), scale) in rhs_k.chunks_exact_mut(dk).zip(k_rows).zip(scales) {
            row.iter_mut().zip(k_row).for_each(|(x, &k)| *x = scale * k);
        }
        let t = Mat::new(solve, len, len);
        let (v_new, w) = (&mut self.v_new[..len * dv], &mut self.w[..len * dk]);
        product_here(v_new, false, t, Mat::new(rhs_v, len, dv), 1.0);
        product_here(w, false, t, Mat::new(rhs_k, len, dk), 1.0);
        product_here(
            v_new,
            true,
            Mat::new(w, len, dk),
            Mat::new(state, dk, dv),
            -1.0,
        );
        let qk = &mut self.qk[..len * len];
        product_here(qk, false, q, k.t(), 1.0);
        for i in 0..len {
            for j in 0..len {
                let decayed = self.qk[i * len + j] * self.decay(i, j);
                self.intra[i * len + j] = decayed;
            }
        }
    }

    fn mat<'a>(&self, buffer: &'a [f32], cols: usize) -> Mat<'a> {
        Mat::new(&buffer[..self.len * cols], self.len, cols)
    }
}

impl<'a> Task<'a> {
    fn new([q, k, v, g, beta]: [&'a [f32]; 5], t: usize, dims: &'a Dims) -> Self {
        let Dims { s, dk, dv, .. } = *dims;
        Self {
            q: block(q, t, s * dk),
            k: block(k, t, s * dk),
            v: block(v, t, s * dv),
            g: block(g, t, s),
            beta: block(beta, t, s),
            dims,
        }
    }

    fn rows<'b>(&self, x: &'b [f32], start: usize, len: usize, d: usize) -> Mat<'b> {
        Mat::new(&x[start * d..(start + len) * d], len, d)
    }

    /// Rows `start..start + len` of `x` (`d` wide), each times `scale(i)`, into `dst`.
    fn scaled_rows(
        &self,
        dst: &mut [f32],
        x: &[f32],
        start: usize,
        d: usize,
        scale: impl Fn(usize) -> f32,
    ) {
        let rows = x[start * d..].chunks_exact(d);
        for (i, (row, x)) in dst.chunks_exact_mut(d).zip(rows).enumerate() {
            let e = scale(i);
            row.iter_mut().zip(x).for_each(|(y, &x)| *y = e * x);
        }
    }

    fn forward(&self, out: &mut [f32], state: &mut [f32], entering: &mut [f32]) {
        let Dims { s, dk, dv, c, .. } = *self.dims;
        let mut ch = Chunk::new(self.dims);
        let mut k_decayed = vec![0.0f32; c * dk];
        for (i, start) in (0..s).step_by(c).enumerate() {
            entering[i * dk * dv..(i + 1) * dk * dv].copy_from_slice(state);
            let len = c.min(s - start);
            ch.compute(self, start, len, state);
            let q = self.rows(self.q, start, len, dk);
            // out = exp(cum)·(q S) + intra · v_new.
            let o = &mut out[start * dv..(start + len) * dv];
            product_here(o, false, q, Mat::new(state, dk, dv), 1.0);
            for (row, cum) in o.chunks_exact_mut(dv).zip(&ch.cum) {
                let e = cum.exp();
                row.iter_mut().for_each(|x| *x *= e);
            }
            let v_new = ch.mat(&ch.v_new, dv);
            product_here(o, true, ch.mat(&ch.intra, len), v_new, 1.0);
            // S = exp(last)·S + (exp(last - cum)·k)ᵀ v_new.
            let end = ch.cum[len - 1];
            let k_decayed = &mut k_decayed[..len * dk];
            self.scaled_rows(k_decayed, self.k, start, dk, |i| (end - ch.cum[i]).exp());
            state.iter_mut().for_each(|x| *x *= end.exp());
            product_here(state, true, Mat::new(k_decayed, len, dk).t(), v_new, 1.0);
        }
    }

    fn backward(&self, entering: &[f32], d_out: &[f32], [dq, dk, dv, dg, dbeta]: [&mut [f32]; 5]) {
        let Dims {
            s,
            dk: kd,
            dv: vd,
            c,
            ..
        } = *self.dims;
        let mut ch = Chunk::new(self.dims);
        let buf = |n: usize| vec![0.0f32; n];
        let (mut d_next, mut d_entering) = (buf(kd * vd), buf(kd * vd));
        let (mut q_decayed, mut k_decayed) = (buf(c * kd), buf(c * kd));
        let (mut d_v_new, mut d_w, mut tmp_k) = (buf(c * vd), buf(c * kd), buf(c * kd));
        let (mut d_intra, mut d_solve, mut tmp_cc) = (buf(c * c), buf(c * c), buf(c * c));
        let (mut d_rhs_v, mut d_rhs_k, mut d_cum) = (buf(c * vd), buf(c * kd), buf(c));
        let n = self.dims.chunks();
        for i in (0..n).rev() {
            let start = i * c;
            let len = c.min(s - start);
            let state = &entering[i * kd * vd..(i + 1) * kd * vd];
            ch.compute(self, start, len, state);
            let (cum, end) = (&ch.cum[..len], ch.cum[len - 1]);
            let s_mat = Mat::new(state, kd, vd);
            let d_o = self.rows(d_out, start, len, vd);
            let (q, k) = (
                self.rows(self.q, start, len, kd),
                self.rows(self.k, start, len, kd),
            );
            let q_decayed = &mut q_decayed[..len * kd];
            self.scaled_rows(q_decayed, self.q, start, kd, |i| cum[i].exp());
            let k_decayed = &mut k_decayed[..len * kd];
            self.scaled_rows(k_decayed, self.k, start, kd, |i| (end - cum[i]).exp());
            let (q_dec, k_dec) = (Mat::new(q_decayed, len, kd), Mat::new(k_decayed, len, kd));
            let next = Mat::new(&d_next, kd, vd);
            // v_new's gradient, and the entering state's: d_next for the chunk before.
            let d_v_new = &mut d_v_new[..len * vd];
            product_here(d_v_new, false, ch.mat(&ch.intra, len).t(), d_o, 1.0);
            product_here(d_v_new, true, k_dec, next, 1.0);
            product_here(&mut d_entering, false, q_dec.t(), d_o, 1.0);
            d_entering
                .iter_mut()
                .zip(&d_next)
                .for_each(|(d, &n)| *d += end.exp() * n);
            let dvn = Mat::new(d_v_new, len, vd);
            product_here(&mut d_entering, true, ch.mat(&ch.w, kd).t(), dvn, -1.0);
            let d_cum = &mut d_cum[..len];
            d_cum.fill(0.0);
            let (dq, dk, dv) = (
                &mut dq[start * kd..(start + len) * kd],
                &mut dk[start * kd..(start + len) * kd],
                &mut dv[start * vd..(start + len) * vd],
            );
            let (dbeta, dg) = (&mut dbeta[start..start + len], &mut dg[start..start + len]);
            // out = exp(cum)·Q S + intra v_new.
            let tmp_k = &mut tmp_k[..len * kd];
            product_here(tmp_k, false, d_o, s_mat.t(), 1.0); // d(exp(cum)·Q)
            for r in 0..len {
                let (d_row, qd_row) = (
                    &tmp_k[r * kd..(r + 1) * kd],
                    &q_decayed[r * kd..(r + 1) * kd],
                );
                d_cum[r] += dot(d_row, qd_row);
                let e = cum[r].exp();
                dq[r * kd..(r + 1) * kd]
                    .iter_mut()
                    .zip(d_row)
                    .for_each(|(d, &x)| *d = e * x);
            }
            let d_intra = &mut d_intra[..len * len];
            product_here(d_intra, false, d_o, ch.mat(&ch.v_new, vd).t(), 1.0);
            // leaving = exp(last)·S + (exp(last - cum)·K)ᵀ v_new.
            product_here(tmp_k, false, ch.mat(&ch.v_new, vd), next.t(), 1.0); // d(k_decayed)
            let mut d_last = end.exp() * dot(state, &d_next);
            for r in 0..len {
                let (d_row, kd_row) = (
                    &tmp_k[r * kd..(r + 1) * kd],
                    &k_decayed[r * kd..(r + 1) * kd],
                );
                let pull = dot(d_row, kd_row);
                d_cum[r] -= pull;
                d_last += pull;
                let e = (end - cum[r]).exp();
                dk[r * kd..(r + 1) * kd]
                    .iter_mut()
                    .zip(d_row)
                    .for_each(|(d, &x)| *d = e * x);
            }
            // v_new = T rhs_v - (T rhs_k) S.
            let d_w = &mut d_w[..len * kd];
            product_here(d_w, false, dvn, s_mat.t(), -1.0);
            let d_solve = &mut d_solve[..len * len];
            product_here(d_solve, false, dvn, ch.mat(&ch.rhs_v, vd).t(), 1.0);
            product_here(
                d_solve,
                true,
                Mat::new(d_w, len, kd),
                ch.mat(&ch.rhs_k, kd).t(),
                1.0,
            );
            let t = ch.mat(&ch.solve, len);
            let d_rhs_v = &mut d_rhs_v[..len * vd];
            product_here(d_rhs_v, false, t.t(), dvn, 1.0);
            let d_rhs_k = &mut d_rhs_k[..len * kd];
            product_here(d_rhs_k, false, t.t(), Mat::new(d_w, len, kd), 1.0);
            // T = (I + N)⁻¹: dN = -Tᵀ dT Tᵀ, strictly lower. It overwrites d_solve.
            let tmp_cc = &mut tmp_cc[..len * len];
            product_here(tmp_cc, false, t.t(), Mat::new(d_solve, len, len), 1.0);
            product_here(d_solve, false, Mat::new(tmp_cc, len, len), t.t(), -1.0);
            // N[i][j] = beta_i · kk[i][j] · decay[i][j]: into d_beta, and into the gradient
            // of kk (kept in tmp_cc) and of the decay, with intra's (intra = qk ⊙ decay).
            let (kk, qk) = (&ch.kk[..len * len], &ch.qk[..len * len]);
            for r in 0..len {
                dbeta[r] = 0.0;
                for j in 0..len {
                    let at = r * len + j;
                    let decay = ch.decay(r, j);
                    let d_n = if j < r { d_solve[at] } else { 0.0 };
                    dbeta[r] += d_n * kk[at] * decay;
                    let d_kk_decay = d_n * self.beta[start + r];
                    tmp_cc[at] = d_kk_decay * decay;
                    let d_decay = (d_intra[at] * qk[at] + d_kk_decay * kk[at]) * decay;
                    d_cum[r] += d_decay;
                    d_cum[j] -= d_decay;
                    d_intra[at] *= decay; // d(qk)
                }
            }
            // kk = K Kᵀ: dK += (dkk + dkkᵀ) K; qk = Q Kᵀ: dQ += dqk K, dK += dqkᵀ Q.
            let dkk = Mat::new(tmp_cc, len, len);
            product_here(dk, true, dkk, k, 1.0);
            product_here(dk, true, dkk.t(), k, 1.0);
            let dqk = Mat::new(d_intra, len, len);
            product_here(dq, true, dqk, k, 1.0);
            product_here(dk, true, dqk.t(), q, 1.0);
            // rhs_v = beta·V and rhs_k = beta·exp(cum)·K.
            for r in 0..len {
                let b = self.beta[start + r];
                let e = cum[r].exp();
                let (drv, v_row) = (
                    &d_rhs_v[r * vd..(r + 1) * vd],
                    &self.v[(start + r) * vd..(start + r + 1) * vd],
                );
                dv[r * vd..(r + 1) * vd]
                    .iter_mut()
                    .zip(drv)
                    .for_each(|(d, &x)| *d = b * x);
                dbeta[r] += dot(drv, v_row);
                let (drk, k_row) = (
                    &d_rhs_k[r * kd..(r + 1) * kd],
                    &self.k[(start + r) * kd..(start + r + 1) * kd],
                );
                dk[r * kd..(r + 1) * kd]
                    .iter_mut()
                    .zip(drk)
                    .for_each(|(d, &x)| *d += b * e * x);
                let pull = e * dot(drk, k_row);
                dbeta[r] += pull;
                d_cum[r] += b * pull;
            }
            d_cum[len - 1] += d_last;
            // cum = cumsum(g): g_j takes every cum_i's gradient for i ≥ j.
            let mut total = 0.0;
            for r in (0..len).rev() {
                total += d_cum[r];
                dg[r] = total;
            }
            std::mem::swap(&mut d_next, &mut d_entering);
        }
    }
}

/// Block `i` of `x`, in blocks of `len`.
fn block(x: &[f32], i: usize, len: usize) -> &[f32] {
    &x[i * len..(i + 1) * len]
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// `y += a·x`.
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
