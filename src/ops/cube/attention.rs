//! FlashAttention-2 in CubeCL: causal attention whose memory is linear in the sequence. The
//! forward pass walks blocks of keys with an online softmax (f32 statistics) and saves each
//! row's log-sum-exp; the backward pass recomputes the probabilities from it, one kernel for dq
//! (a unit a query) and one for dk and dv (a unit a key, summing the query heads that share its
//! key/value head, so grouped-query attention needs no `repeat_kv` copies and no atomics).
//! Keys past a block's last query are never visited. Padding, packed samples and sliding
//! windows are read from each token's ids (`AttnMask::Tokens`) inside the kernels: no
//! `[batch, s, s]` mask exists.
//!
//! This is the unit path (no tensor cores): one unit holds one row in registers and a cube
//! shares a block of the other side in shared memory. q, k, v are read in their dtype and
//! computed in f32.

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

/// Units a cube: rows of the side a unit holds.
const UNITS: usize = 32;
/// Sentinel score of a key a query does not see (WGSL has no infinity literal).
const HIDDEN: f32 = -1.0e30;
/// The log-sum-exp of a row that sees no key: its probabilities, `exp(score - lse)`, are 0.
const NO_KEY: f32 = 1.0e30;

/// The largest head_dim the kernels take: registers hold 4 rows of it, shared memory 2 blocks.
pub const MAX_HEAD_DIM: usize = 256;

/// Rows of the other side a cube shares, so its blocks stay within 32 KiB of shared memory.
fn block(head_dim: usize) -> usize {
    (2048 / head_dim).clamp(1, UNITS)
}

/// Whether query `qi` (its index among the keys) sees key `key`, given their ids when masked.
#[cube]
#[allow(clippy::too_many_arguments)]
fn sees(
    qi: usize,
    key: usize,
    keys: usize,
    q_segment: i32,
    q_position: i32,
    k_real: i32,
    k_segment: i32,
    k_position: i32,
    window: u32,
    #[comptime] masked: bool,
) -> bool {
    let mut visible = key <= qi && key < keys;
    if masked {
        visible = visible && k_real != 0 && k_segment == q_segment;
        if window > 0 {
            visible = visible && q_position - k_position < window as i32;
        }
    }
    visible
}

/// Id `c` (0 real, 1 sample, 2 position) of token `key` of row `batch`, from `ids`
/// `[3, batch, keys]`; 0 past the end (padding).
#[cube]
fn token_id(ids: &Tensor<i32>, #[comptime] c: usize, batch: usize, key: usize) -> i32 {
    let keys = ids.shape(2);
    let mut id = 0i32;
    if key < keys {
        id = ids[(c * ids.shape(1) + batch) * keys + key];
    }
    id
}

/// Reads token `key`'s ids into the three shared slots `j`.
#[cube]
fn load_ids(
    ids: &Tensor<i32>,
    batch: usize,
    key: usize,
    j: usize,
    real: &mut SharedMemory<i32>,
    segment: &mut SharedMemory<i32>,
    position: &mut SharedMemory<i32>,
) {
    real[j] = token_id(ids, 0usize, batch, key);
    segment[j] = token_id(ids, 1usize, batch, key);
    position[j] = token_id(ids, 2usize, batch, key);
}

/// Copies rows `first..first + rows` of the `[.., len, d]` matrix at `base` into `shared` as f32,
/// zeros past `len`; every unit of the cube takes part.
#[cube]
fn load_rows<F: Float>(
    src: &Tensor<F>,
    base: usize,
    first: usize,
    len: usize,
    shared: &mut SharedMemory<f32>,
    #[comptime] rows: usize,
    #[comptime] d: usize,
) {
    let mut i = UNIT_POS_X as usize;
    while i < rows * d {
        let row = first + i / d;
        let mut value = 0.0f32;
        if row < len {
            value = f32::cast_from(src[base + row * d + i % d]);
        }
        shared[i] = value;
        i += UNITS;
    }
}

/// Loads the block of `bc` keys from `start` (k and v as f32, and their ids when masked) into
/// shared memory, for every unit of the cube.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_key_block<F: Float>(
    k: &Tensor<F>,
    v: &Tensor<F>,
    ids: &Tensor<i32>,
    kv_base: usize,
    batch: usize,
    start: usize,
    ks: &mut SharedMemory<f32>,
    vs: &mut SharedMemory<f32>,
    k_real: &mut SharedMemory<i32>,
    k_segment: &mut SharedMemory<i32>,
    k_position: &mut SharedMemory<i32>,
    #[comptime] bc: usize,
    #[comptime] d: usize,
    #[comptime] masked: bool,
) {
    let keys = k.shape(2);
    load_rows::<F>(k, kv_base, start, keys, ks, bc, d);
    load_rows::<F>(v, kv_base, start, keys, vs, bc, d);
    if masked && (UNIT_POS_X as usize) < bc {
        let j = UNIT_POS_X as usize;
        load_ids(ids, batch, start + j, j, k_real, k_segment, k_position);
    }
    sync_cube();
}

/// `sees` for key `start + j` of the loaded block.
#[cube]
#[allow(clippy::too_many_arguments)]
fn sees_slot(
    qi: usize,
    start: usize,
    j: usize,
    keys: usize,
    q_segment: i32,
    q_position: i32,
    k_real: &SharedMemory<i32>,
    k_segment: &SharedMemory<i32>,
    k_position: &SharedMemory<i32>,
    window: u32,
    #[comptime] masked: bool,
) -> bool {
    let mut real = 1i32;
    let mut segment = 0i32;
    let mut position = 0i32;
    if masked {
        real = k_real[j];
        segment = k_segment[j];
        position = k_position[j];
    }
    sees(
        qi,
        start + j,
        keys,
        q_segment,
        q_position,
        real,
        segment,
        position,
        window,
        masked,
    )
}

/// `out` `[b, h, s, d]` and `lse` `[b, h, s]` (f32; +1e30 for a row that sees no key, whose
/// output is zeros). A cube: `UNITS` queries of one (batch, head); a unit: one query.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    ids: &Tensor<i32>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    window: u32,
    #[comptime] d: usize,
    #[comptime] bc: usize,
    #[comptime] masked: bool,
    #[define(F)] _dtype: StorageType,
) {
    let heads = q.shape(1);
    let s = q.shape(2);
    let kv_heads = k.shape(1);
    let keys = k.shape(2);
    let bh = CUBE_POS_Y as usize;
    let batch = bh / heads;
    let kv_base = (batch * kv_heads + (bh % heads) / (heads / kv_heads)) * keys * d;
    let first_row = CUBE_POS_X as usize * UNITS;
    let row = first_row + UNIT_POS_X as usize;
    let live = row < s;
    let offset = keys - s;
    let qi = row + offset;

    let mut qr = Array::<f32>::new(d);
    let mut acc = Array::<f32>::new(d);
    for x in 0..d {
        qr[x] = 0.0;
        acc[x] = 0.0;
    }
    let mut q_segment = 0i32;
    let mut q_position = 0i32;
    if live {
        for x in 0..d {
            qr[x] = f32::cast_from(q[(bh * s + row) * d + x]) * scale;
        }
        if masked {
            q_segment = token_id(ids, 1usize, batch, qi);
            q_position = token_id(ids, 2usize, batch, qi);
        }
    }

    let mut ks = SharedMemory::<f32>::new(bc * d);
    let mut vs = SharedMemory::<f32>::new(bc * d);
    let mut k_real = SharedMemory::<i32>::new(bc);
    let mut k_segment = SharedMemory::<i32>::new(bc);
    let mut k_position = SharedMemory::<i32>::new(bc);
    let mut scores = Array::<f32>::new(bc);
    let mut m = f32::new(HIDDEN);
    let mut l = 0.0f32;
    // The block's last query sees no key after its own.
    let mut end = first_row + UNITS + offset;
    if end > keys {
        end = keys;
    }
    let mut start = 0usize;
    while start < end {
        load_key_block::<F>(
            k,
            v,
            ids,
            kv_base,
            batch,
            start,
            &mut ks,
            &mut vs,
            &mut k_real,
            &mut k_segment,
            &mut k_position,
            bc,
            d,
            masked,
        );
        if live {
            let mut block_max = m;
            for j in 0..bc {
                let mut score = f32::new(HIDDEN);
                let visible = sees_slot(
                    qi,
                    start,
                    j,
                    keys,
                    q_segment,
                    q_position,
                    &k_real,
                    &k_segment,
                    &k_position,
                    window,
                    masked,
                );
                if visible {
                    let mut dot = 0.0f32;
                    for x in 0..d {
                        dot += qr[x] * ks[j * d + x];
                    }
                    score = dot;
                    if dot > block_max {
                        block_max = dot;
                    }
                }
                scores[j] = score;
            }
            let correction = (m - block_max).exp();
            l *= correction;
            for x in 0..d {
                acc[x] *= correction;
            }
            for j in 0..bc {
                if scores[j] > HIDDEN {
                    let p = (scores[j] - block_max).exp();
                    l += p;
                    for x in 0..d {
                        acc[x] += p * vs[j * d + x];
                    }
                }
            }
            m = block_max;
        }
        sync_cube();
        start += bc;
    }
    if live {
        let mut inv = 0.0f32;
        let mut row_lse = f32::new(NO_KEY);
        if l > 0.0 {
            inv = 1.0 / l;
            row_lse = m + l.ln();
        }
        for x in 0..d {
            out[(bh * s + row) * d + x] = F::cast_from(acc[x] * inv);
        }
        lse[bh * s + row] = row_lse;
    }
}

/// `dq` `[b, h, s, d]` from `delta = rowsum(d_out ⊙ out)` `[b, h, s]`. A cube: `UNITS` queries
/// of one (batch, head); a unit: one query, over every key it sees.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn dq_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    ids: &Tensor<i32>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dq: &mut Tensor<F>,
    scale: f32,
    window: u32,
    #[comptime] d: usize,
    #[comptime] bc: usize,
    #[comptime] masked: bool,
    #[define(F)] _dtype: StorageType,
) {
    let heads = q.shape(1);
    let s = q.shape(2);
    let kv_heads = k.shape(1);
    let keys = k.shape(2);
    let bh = CUBE_POS_Y as usize;
    let batch = bh / heads;
    let kv_base = (batch * kv_heads + (bh % heads) / (heads / kv_heads)) * keys * d;
    let first_row = CUBE_POS_X as usize * UNITS;
    let row = first_row + UNIT_POS_X as usize;
    let live = row < s;
    let offset = keys - s;
    let qi = row + offset;

    let mut qr = Array::<f32>::new(d);
    let mut dor = Array::<f32>::new(d);
    let mut acc = Array::<f32>::new(d);
    for x in 0..d {
        qr[x] = 0.0;
        dor[x] = 0.0;
        acc[x] = 0.0;
    }
    let mut row_lse = 0.0f32;
    let mut row_delta = 0.0f32;
    let mut q_segment = 0i32;
    let mut q_position = 0i32;
    if live {
        for x in 0..d {
            qr[x] = f32::cast_from(q[(bh * s + row) * d + x]) * scale;
            dor[x] = f32::cast_from(d_out[(bh * s + row) * d + x]);
        }
        row_lse = lse[bh * s + row];
        row_delta = delta[bh * s + row];
        if masked {
            q_segment = token_id(ids, 1usize, batch, qi);
            q_position = token_id(ids, 2usize, batch, qi);
        }
    }

    let mut ks = SharedMemory::<f32>::new(bc * d);
    let mut vs = SharedMemory::<f32>::new(bc * d);
    let mut k_real = SharedMemory::<i32>::new(bc);
    let mut k_segment = SharedMemory::<i32>::new(bc);
    let mut k_position = SharedMemory::<i32>::new(bc);
    let mut end = first_row + UNITS + offset;
    if end > keys {
        end = keys;
    }
    let mut start = 0usize;
    while start < end {
        load_key_block::<F>(
            k,
            v,
            ids,
            kv_base,
            batch,
            start,
            &mut ks,
            &mut vs,
            &mut k_real,
            &mut k_segment,
            &mut k_position,
            bc,
            d,
            masked,
        );
        if live {
            for j in 0..bc {
                let visible = sees_slot(
                    qi,
                    start,
                    j,
                    keys,
                    q_segment,
                    q_position,
                    &k_real,
                    &k_segment,
                    &k_position,
                    window,
                    masked,
                );
                if visible {
                    let mut score = 0.0f32;
                    let mut dp = 0.0f32;
                    for x in 0..d {
                        score += qr[x] * ks[j * d + x];
                        dp += dor[x] * vs[j * d + x];
                    }
                    let ds = (score - row_lse).exp() * (dp - row_delta);
                    for x in 0..d {
                        acc[x] += ds * ks[j * d + x];
                    }
                }
            }
        }
        sync_cube();
        start += bc;
    }
    if live {
        for x in 0..d {
            dq[(bh * s + row) * d + x] = F::cast_from(acc[x] * scale);
        }
    }
}

/// `dk` and `dv` `[b, kv_heads, keys, d]`. A cube: `UNITS` keys of one (batch, key/value head);
/// a unit: one key, over every query of the heads that share it which sees it.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn dkv_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    ids: &Tensor<i32>,
    d_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    window: u32,
    #[comptime] d: usize,
    #[comptime] br: usize,
    #[comptime] masked: bool,
    #[define(F)] _dtype: StorageType,
) {
    let heads = q.shape(1);
    let s = q.shape(2);
    let kv_heads = k.shape(1);
    let keys = k.shape(2);
    let bkv = CUBE_POS_Y as usize;
    let batch = bkv / kv_heads;
    let group = heads / kv_heads;
    let first_key = CUBE_POS_X as usize * UNITS;
    let key = first_key + UNIT_POS_X as usize;
    let live = key < keys;
    let offset = keys - s;

    let mut kr = Array::<f32>::new(d);
    let mut vr = Array::<f32>::new(d);
    let mut dk_acc = Array::<f32>::new(d);
    let mut dv_acc = Array::<f32>::new(d);
    for x in 0..d {
        kr[x] = 0.0;
        vr[x] = 0.0;
        dk_acc[x] = 0.0;
        dv_acc[x] = 0.0;
    }
    let mut real = 1i32;
    let mut segment = 0i32;
    let mut position = 0i32;
    if live {
        for x in 0..d {
            kr[x] = f32::cast_from(k[(bkv * keys + key) * d + x]) * scale;
            vr[x] = f32::cast_from(v[(bkv * keys + key) * d + x]);
        }
        if masked {
            real = token_id(ids, 0usize, batch, key);
            segment = token_id(ids, 1usize, batch, key);
            position = token_id(ids, 2usize, batch, key);
        }
    }

    let mut qs = SharedMemory::<f32>::new(br * d);
    let mut dos = SharedMemory::<f32>::new(br * d);
    let mut lse_s = SharedMemory::<f32>::new(br);
    let mut delta_s = SharedMemory::<f32>::new(br);
    let mut q_real = SharedMemory::<i32>::new(br);
    let mut q_segment = SharedMemory::<i32>::new(br);
    let mut q_position = SharedMemory::<i32>::new(br);
    // Queries before the block's first key see none of its keys.
    let mut first_query = 0usize;
    if first_key > offset {
        first_query = first_key - offset;
    }
    for g in 0..group {
        let bh = batch * heads + (bkv % kv_heads) * group + g;
        let mut start = first_query;
        while start < s {
            load_rows::<F>(q, bh * s * d, start, s, &mut qs, br, d);
            load_rows::<F>(d_out, bh * s * d, start, s, &mut dos, br, d);
            if (UNIT_POS_X as usize) < br {
                let i = UNIT_POS_X as usize;
                let row = start + i;
                let mut row_lse = f32::new(NO_KEY);
                let mut row_delta = 0.0f32;
                if row < s {
                    row_lse = lse[bh * s + row];
                    row_delta = delta[bh * s + row];
                }
                lse_s[i] = row_lse;
                delta_s[i] = row_delta;
                if masked {
                    load_ids(
                        ids,
                        batch,
                        row + offset,
                        i,
                        &mut q_real,
                        &mut q_segment,
                        &mut q_position,
                    );
                }
            }
            sync_cube();
            if live {
                for i in 0..br {
                    let row = start + i;
                    let mut qseg = 0i32;
                    let mut qpos = 0i32;
                    if masked {
                        qseg = q_segment[i];
                        qpos = q_position[i];
                    }
                    let visible = row < s
                        && sees(
                            row + offset,
                            key,
                            keys,
                            qseg,
                            qpos,
                            real,
                            segment,
                            position,
                            window,
                            masked,
                        );
                    if visible {
                        let mut score = 0.0f32;
                        let mut dp = 0.0f32;
                        for x in 0..d {
                            score += qs[i * d + x] * kr[x];
                            dp += dos[i * d + x] * vr[x];
                        }
                        let p = (score - lse_s[i]).exp();
                        let ds = p * (dp - delta_s[i]);
                        for x in 0..d {
                            dv_acc[x] += p * dos[i * d + x];
                            dk_acc[x] += ds * qs[i * d + x];
                        }
                    }
                }
            }
            sync_cube();
            start += br;
        }
    }
    if live {
        for x in 0..d {
            dk[(bkv * keys + key) * d + x] = F::cast_from(dk_acc[x] * scale);
            dv[(bkv * keys + key) * d + x] = F::cast_from(dv_acc[x]);
        }
    }
}

/// The token ids of a masked attention, or a stand-in the kernels do not read.
fn ids_or_dummy<R: CubeRuntime>(ids: Option<CubeTensor<R>>, like: &CubeTensor<R>) -> CubeTensor<R> {
    ids.map(into_contiguous).unwrap_or_else(|| {
        empty_device_dtype(
            like.client.clone(),
            like.device.clone(),
            Shape::new([1]),
            DType::I32,
        )
    })
}

fn cubes(rows: usize) -> u32 {
    rows.div_ceil(UNITS) as u32
}

/// The attention of `q` `[b, h, s, d]` over `k`, `v` `[b, kv_heads, keys, d]`, causal, with
/// the token `ids` of `AttnMask::Tokens` when given: `(out, lse)`.
pub fn forward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    ids: Option<CubeTensor<R>>,
    window: Option<usize>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [q, k, v] = [q, k, v].map(into_contiguous);
    let dims = q.meta.shape().clone();
    let b = dims[0];
    let h = dims[1];
    let s = dims[2];
    let d = dims[3];
    let masked = ids.is_some();
    let ids = ids_or_dummy(ids, &q);
    let client = q.client.clone();
    let device = q.device.clone();
    let out = empty_device_dtype(client.clone(), device.clone(), dims.clone(), q.dtype);
    let lse = empty_device_dtype(client.clone(), device, Shape::new([b, h, s]), DType::F32);
    forward_kernel::launch::<R>(
        &client,
        CubeCount::Static(cubes(s), (b * h) as u32, 1),
        CubeDim::new_1d(UNITS as u32),
        q.clone().into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        ids.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        1.0 / (d as f32).sqrt(),
        window.unwrap_or(0) as u32,
        d,
        block(d),
        masked,
        q.dtype.into(),
    );
    (out, lse)
}

/// `[dq, dk, dv]` of `forward`'s attention from the gradient `d_out` of its output `out`;
/// `delta` is `rowsum(d_out ⊙ out)` `[b, h, s]`, f32.
#[allow(clippy::too_many_arguments)]
pub fn backward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    ids: Option<CubeTensor<R>>,
    window: Option<usize>,
    lse: CubeTensor<R>,
    delta: CubeTensor<R>,
    d_out: CubeTensor<R>,
) -> [CubeTensor<R>; 3] {
    let [q, k, v, lse, delta, d_out] = [q, k, v, lse, delta, d_out].map(into_contiguous);
    let q_dims = q.meta.shape().clone();
    let k_dims = k.meta.shape().clone();
    let b = q_dims[0];
    let h = q_dims[1];
    let s = q_dims[2];
    let d = q_dims[3];
    let kv_heads = k_dims[1];
    let keys = k_dims[2];
    let masked = ids.is_some();
    let ids = ids_or_dummy(ids, &q);
    let client = q.client.clone();
    let device = q.device.clone();
    let empty =
        |dims: &Shape| empty_device_dtype(client.clone(), device.clone(), dims.clone(), q.dtype);
    let dq = empty(&q_dims);
    let dk = empty(&k_dims);
    let dv = empty(&k_dims);
    let scale = 1.0 / (d as f32).sqrt();
    let window = window.unwrap_or(0) as u32;
    dq_kernel::launch::<R>(
        &client,
        CubeCount::Static(cubes(s), (b * h) as u32, 1),
        CubeDim::new_1d(UNITS as u32),
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        ids.clone().into_tensor_arg(),
        d_out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        dq.clone().into_tensor_arg(),
        scale,
        window,
        d,
        block(d),
        masked,
        q.dtype.into(),
    );
    dkv_kernel::launch::<R>(
        &client,
        CubeCount::Static(cubes(keys), (b * kv_heads) as u32, 1),
        CubeDim::new_1d(UNITS as u32),
        q.clone().into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        ids.into_tensor_arg(),
        d_out.into_tensor_arg(),
        lse.into_tensor_arg(),
        delta.into_tensor_arg(),
        dk.clone().into_tensor_arg(),
        dv.clone().into_tensor_arg(),
        scale,
        window,
        d,
        block(d),
        masked,
        q.dtype.into(),
    );
    [dq, dk, dv]
}
