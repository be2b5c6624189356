//! ggml's storage types and the encoding of f32 rows into them, block for block as ggml's
//! reference quantizers (`quantize_row_*_ref` in ggml-quants.c) encode them: `llama-quantize`
//! without an importance matrix uses those.

use half::{bf16, f16};
use rayon::prelude::*;

/// The ggml types swift-rs writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// Values in a k-quant super-block.
const QK_K: usize = 256;

impl GgmlType {
    const ALL: [Self; 10] = [
        Self::F32,
        Self::F16,
        Self::Bf16,
        Self::Q4_0,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    /// ggml's `enum ggml_type` value.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Bf16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's name for the type (`ggml_type_name`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q4_0 => "q4_0",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_K",
            Self::Q5K => "q5_K",
            Self::Q6K => "q6_K",
        }
    }

    /// Values per block, and bytes per block (ggml-common.h's block structs).
    fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
        }
    }

    pub fn block_size(self) -> usize {
        self.block().0
    }

    /// Bytes of a row of `n` values (`n` a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        let (values, bytes) = self.block();
        n / values * bytes
    }

    /// `values` (whole rows of this type's blocks) encoded; quantized blocks are independent, so
    /// they are encoded in parallel.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        assert_eq!(values.len() % self.block_size(), 0, "whole blocks");
        let encode_block: fn(&[f32]) -> Vec<u8> = match self {
            Self::F32 => return values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            // Both round to nearest even, as numpy's astype and ggml's conversions do.
            Self::F16 => return values.iter().flat_map(|&v| f16_bytes(v)).collect(),
            Self::Bf16 => {
                return values
                    .iter()
                    .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                    .collect()
            }
            Self::Q4_0 => q4_0,
            Self::Q5_0 => q5_0,
            Self::Q5_1 => q5_1,
            Self::Q8_0 => q8_0,
            Self::Q4K => |x| q4_k_or_q5_k(x, false),
            Self::Q5K => |x| q4_k_or_q5_k(x, true),
            Self::Q6K => q6_k,
        };
        // Chunks of whole blocks, large enough that the threads' overhead does not show.
        let chunk = self.block_size() * 1024;
        values
            .par_chunks(chunk)
            .map(|part| {
                part.chunks(self.block_size())
                    .flat_map(encode_block)
                    .collect::<Vec<u8>>()
            })
            .collect::<Vec<_>>()
            .concat()
    }
}

// Each encoder below follows its `quantize_row_*_ref` operation by operation, in f32 and in C's
// order of evaluation, so that the rounding is the same and the blocks are equal.

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// ggml's `nearest_int`: round half to even through the float's mantissa (|v| < 2^22).
fn nearest_int(v: f32) -> i32 {
    ((v + 12582912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The value of largest magnitude (the first of equals), as the 4- and 5-bit encoders pick it.
fn signed_max(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// Block of 32: scale `d = max / -8` (the value of largest magnitude maps to -8), 4-bit quants.
fn q4_0(x: &[f32]) -> Vec<u8> {
    let d = signed_max(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut block = f16_bytes(d).to_vec();
    // C's (int8_t) cast truncates toward zero; `as` does too, in range.
    let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    block.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
    block
}

/// Five-bit quants: their low nibbles, and the fifth bits gathered into a little-endian u32.
fn nibbles_and_high_bits(q: impl Fn(usize) -> u8) -> (Vec<u8>, [u8; 4]) {
    let mut qh = 0u32;
    let mut qs = Vec::with_capacity(16);
    for j in 0..16 {
        let (q0, q1) = (q(j), q(j + 16));
        qs.push((q0 & 0x0f) | ((q1 & 0x0f) << 4));
        qh |= u32::from((q0 & 0x10) >> 4) << j;
        qh |= u32::from((q1 & 0x10) >> 4) << (j + 16);
    }
    (qs, qh.to_le_bytes())
}

/// Block of 32: `d = max / -16`, 5-bit quants.
fn q5_0(x: &[f32]) -> Vec<u8> {
    let d = signed_max(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (qs, qh) = nibbles_and_high_bits(|j| ((x[j] * id + 16.5) as i8).min(31) as u8);
    [&f16_bytes(d)[..], &qh, &qs].concat()
}

/// Block of 32: `d = (max - min) / 31` and the min, 5-bit quants from the min up.
fn q5_1(x: &[f32]) -> Vec<u8> {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (qs, qh) = nibbles_and_high_bits(|j| ((x[j] - min) * id + 0.5) as u8);
    [&f16_bytes(d)[..], &f16_bytes(min), &qh, &qs].concat()
}

/// Block of 32: an f16 scale `d = max|x| / 127`, then each `round(x / d)` as i8.
fn q8_0(x: &[f32]) -> Vec<u8> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut block = f16_bytes(d).to_vec();
    // f32::round rounds half away from zero, as C's roundf.
    block.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
    block
}

/// `make_qkx2_quants`: quants in 0..=nmax for `x` as `scale * q - min`, the scale and min
/// refined over `nstep` trial scales for the least weighted squared error. Returns (scale, min).
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    quants: &mut [u8],
    (rmin, rdelta, nstep): (f32, f32, i32),
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        quants.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        quants[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut trial = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            trial[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0f32;
            for i in 0..n {
                let diff = this_scale * trial[i] as f32 + this_min - x[i];
                error += weights[i] * (diff * diff);
            }
            if error < best_error {
                quants[..n].copy_from_slice(&trial[..n]);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The 6-bit scale and min of sub-block `j` from a k-quant's 12 packed bytes
/// (`get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// A q4_K (or q5_K) super-block of 256: eight sub-blocks of 32, each with a 6-bit scale and min
/// relative to the block's f16 `d` and `dmin`, and 4-bit (5-bit) quants.
fn q4_k_or_q5_k(x: &[f32], five_bits: bool) -> Vec<u8> {
    let nmax = if five_bits { 31 } else { 15 };
    let trials = if five_bits {
        (-0.5, 0.1, 15)
    } else {
        (-1.0, 0.1, 20)
    };
    let mut quants = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let sub = &x[32 * j..32 * j + 32];
        let sum_x2 = sub.iter().fold(0f32, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: Vec<f32> = sub.iter().map(|v| av_x + v.abs()).collect();
        let quants = &mut quants[32 * j..32 * j + 32];
        (scales[j], mins[j]) = make_qkx2_quants(nmax, sub, &weights, quants, trials);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // C stores nearest_int's int in a uint8_t, then clamps.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let (d, dmin) = (max_scale / 63.0, max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let d = f16_round(d) * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = f16_round(dmin) * f32::from(m);
        for i in 0..32 {
            quants[32 * j + i] = nearest_int((x[32 * j + i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    let mut block = [&f16_bytes(d)[..], &f16_bytes(dmin), &packed].concat();
    if five_bits {
        let mut qh = [0u8; 32];
        let mut qs = Vec::with_capacity(128);
        for (pair, n) in (0..QK_K).step_by(64).enumerate() {
            let (m1, m2) = (1u8 << (2 * pair), 2u8 << (2 * pair));
            for j in 0..32 {
                let (mut l1, mut l2) = (quants[n + j], quants[n + j + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                qs.push(l1 | (l2 << 4));
            }
        }
        block.extend(qh);
        block.extend(qs);
    } else {
        for n in (0..QK_K).step_by(64) {
            block.extend((0..32).map(|l| quants[n + l] | (quants[n + l + 32] << 4)));
        }
    }
    block
}

/// `make_qx_quants` with rmse_type 1 and no importance: signed quants in -nmax..nmax, offset by
/// nmax, for `x` as `scale * q`, the scale chosen among 19 trials for the least error weighted
/// by `x * x`. Returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32], quants: &mut [i8]) -> f32 {
    let max = signed_max(x);
    // ggml's GROUP_MAX_EPS: all zero.
    if max.abs() < 1e-15 {
        quants.fill(0);
        return 0.0;
    }
    let quantize = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let l = quantize(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (q, &v) in quants.iter_mut().zip(x) {
        *q = (quantize(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (q, &v) in quants.iter_mut().zip(x) {
                *q = (quantize(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// A q6_K super-block of 256: sixteen sub-blocks of 16, each with an 8-bit scale relative to the
/// block's f16 `d`, and 6-bit quants split into low nibbles and high pairs.
fn q6_k(x: &[f32]) -> Vec<u8> {
    let mut quants = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let scale = make_qx_quants(
            32,
            &x[16 * ib..16 * ib + 16],
            &mut quants[16 * ib..16 * ib + 16],
        );
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < 1e-15 {
        return vec![0; 210];
    }
    let iscale = -128.0 / max_scale;
    let d = 1.0 / iscale;
    let packed: Vec<i8> = scales
        .iter()
        .map(|&s| nearest_int(iscale * s).min(127) as i8)
        .collect();
    for j in 0..16 {
        let d = f16_round(d) * f32::from(packed[j]);
        if d == 0.0 {
            continue;
        }
        for i in 0..16 {
            let l = nearest_int(x[16 * j + i] / d).clamp(-32, 31);
            quants[16 * j + i] = (l + 32) as i8;
        }
    }
    let (mut ql, mut qh) = (vec![0u8; 128], vec![0u8; 64]);
    let q = |i: usize| quants[i] as u8;
    for (half, j) in (0..QK_K).step_by(128).enumerate() {
        for l in 0..32 {
            ql[64 * half + l] = (q(j + l) & 0xf) | ((q(j + l + 64) & 0xf) << 4);
            ql[64 * half + l + 32] = (q(j + l + 32) & 0xf) | ((q(j + l + 96) & 0xf) << 4);
            qh[32 * half + l] = (q(j + l) >> 4)
                | ((q(j + l + 32) >> 4) << 2)
                | ((q(j + l + 64) >> 4) << 4)
                | ((q(j + l + 96) >> 4) << 6);
        }
    }
    let scale_bytes = packed.iter().map(|&s| s as u8);
    ql.into_iter()
        .chain(qh)
        .chain(scale_bytes)
        .chain(f16_bytes(d))
        .collect()
}
