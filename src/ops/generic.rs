//! The generic path of every op: Burn's tensor ops on any backend and dtype. It is what cuda,
//! wgpu and Flex's non-f32 dtypes run, and the reference the fused kernels are tested against.
//! Softmax and RMS statistics are computed in f32 whatever the input dtype, as transformers does.

use burn::tensor::activation::{sigmoid, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::{AttentionModuleOptions, FloatTensor, IntTensor};
use burn::tensor::{Bool, DType, IndexingUpdateOp, Int, Shape, Tensor, TensorData, TensorMetadata};

use super::{float, primitive, with_last_dim, AttnMask, LoraGrads, LoraParts, RowsAdapter};

/// Any-rank `p` as a rank-D tensor of `dims`.
fn reshaped<B: Backend, const D: usize>(p: FloatTensor<B>, dims: [usize; D]) -> Tensor<B, D> {
    float(B::float_reshape(p, Shape::new(dims)))
}

/// Any-rank `p` as a flat tensor.
fn flat<B: Backend>(p: FloatTensor<B>) -> Tensor<B, 1> {
    let n = p.shape().num_elements();
    reshaped(p, [n])
}

/// Any-rank `p` as `[rows, last dim]`.
pub(super) fn rows<B: Backend>(p: FloatTensor<B>) -> Tensor<B, 2> {
    let shape = p.shape();
    let dim = shape[shape.num_dims() - 1];
    reshaped(p, [shape.num_elements() / dim, dim])
}

/// Any-rank `x` as `[rows, last dim]`, and each row's `1 / sqrt(mean(x²) + eps)` in f32
/// (`[rows, 1]`).
fn rows_and_inv_rms<B: Backend>(x: FloatTensor<B>, eps: f64) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let x = rows(x);
    let variance = x.clone().cast(DType::F32).powi_scalar(2).mean_dim(1);
    (x, (variance + eps).sqrt().recip())
}

/// `silu(gate)` is computed in f32 and rounded once, as torch's `F.silu` is; Burn's
/// `x * sigmoid(x)` in bf16 rounds at every step of its chain. The product is in the dtype.
pub(super) fn swiglu<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let shape = gate.shape();
    let gate = flat::<B>(gate);
    let dtype = gate.dtype();
    let act = silu(gate.cast(DType::F32)).cast(dtype);
    B::float_reshape(primitive(act * flat::<B>(up)), shape)
}

pub(super) fn swiglu_backward<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> [FloatTensor<B>; 2] {
    let shape = gate.shape();
    let (gate, up, grad) = (flat::<B>(gate), flat::<B>(up), flat::<B>(grad));
    let sig = sigmoid(gate.clone());
    let d_up = grad.clone() * gate.clone() * sig.clone();
    let d_gate = grad * up * sig.clone() * (gate * (sig.neg() + 1.0) + 1.0);
    [d_gate, d_up].map(|t| B::float_reshape(primitive(t), shape.clone()))
}

pub(super) fn rms_norm<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    eps: f64,
) -> FloatTensor<B> {
    let shape = x.shape();
    let (x, r) = rows_and_inv_rms::<B>(x, eps);
    let dtype = x.dtype();
    let normed = (x.cast(DType::F32) * r).cast(dtype) * float::<B, 1>(weight).unsqueeze();
    B::float_reshape(primitive(normed), shape)
}

/// With `n = x * r` and `dn = grad * weight`: `dx = r * (dn - n * mean(dn * n))`, `dweight =
/// Σ grad * n`, in f32 and cast back.
pub(super) fn rms_norm_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    eps: f64,
    grad: FloatTensor<B>,
    weight_grad: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let shape = x.shape();
    let (x, r) = rows_and_inv_rms::<B>(x, eps);
    let dtype = x.dtype();
    let n = x.cast(DType::F32) * r.clone();
    let grad = rows(grad).cast(DType::F32);
    let weight = float::<B, 1>(weight);
    let w_dtype = weight.dtype();
    let dn = grad.clone() * weight.cast(DType::F32).unsqueeze();
    let mean = (dn.clone() * n.clone()).mean_dim(1);
    let dx = (dn - n.clone() * mean) * r;
    let dw =
        weight_grad.then(|| primitive((grad * n).sum_dim(0).squeeze_dim::<1>(0).cast(w_dtype)));
    (B::float_reshape(primitive(dx.cast(dtype)), shape), dw)
}

pub(super) fn linear<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
) -> FloatTensor<B> {
    let shape = x.shape();
    let weight = float::<B, 2>(weight);
    let n_out = weight.dims()[1];
    let y = burn::tensor::module::linear(rows::<B>(x), weight, bias.map(float));
    B::float_reshape(primitive(y), with_last_dim(&shape, n_out))
}

pub(super) fn lora_linear<B: Backend>(
    x: FloatTensor<B>,
    layer: LoraParts<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let lora_b = layer.lora_b.clone();
    let (base, h, shape) = lora_base_and_hidden(x, layer);
    let y = lora_sum::<B>(base, h.clone(), lora_b);
    (B::float_reshape(y, shape), h)
}

/// The two products of a LoRA layer on `x` `[.., in]`: the base's `x·W + bias` `[rows, out]` in
/// x's dtype and `h = s·x·A` `[rows, r]` in f32, with the output's shape.
pub(super) fn lora_base_and_hidden<B: Backend>(
    x: FloatTensor<B>,
    layer: LoraParts<B>,
) -> (FloatTensor<B>, FloatTensor<B>, Shape) {
    let shape = x.shape();
    let x = rows::<B>(x);
    let h = lora_hidden(x.clone(), layer.lora_a.clone(), layer.scaling);
    let weight = float::<B, 2>(layer.weight);
    let n_out = weight.dims()[1];
    let mut base = x.matmul(weight);
    if let Some(bias) = layer.bias {
        base = base + float::<B, 1>(bias).unsqueeze();
    }
    (primitive(base), primitive(h), with_last_dim(&shape, n_out))
}

/// `base + h·B` in f32, cast to base's dtype: the LoRA layer's output from its two products.
pub(super) fn lora_sum<B: Backend>(
    base: FloatTensor<B>,
    h: FloatTensor<B>,
    lora_b: FloatTensor<B>,
) -> FloatTensor<B> {
    let base = float::<B, 2>(base);
    let dtype = base.dtype();
    let update = float::<B, 2>(h).matmul(float(lora_b));
    primitive((base.cast(DType::F32) + update).cast(dtype))
}

/// `h = s·x·A` in f32, for `x` `[rows, in]`.
fn lora_hidden<B: Backend>(x: Tensor<B, 2>, lora_a: FloatTensor<B>, scaling: f64) -> Tensor<B, 2> {
    x.cast(DType::F32).matmul(float(lora_a)) * scaling
}

pub(super) fn lora_add<B: Backend>(
    base: FloatTensor<B>,
    x: FloatTensor<B>,
    adapters: Vec<RowsAdapter<B>>,
) -> FloatTensor<B> {
    let (base_shape, x_shape) = (base.shape(), x.shape());
    let batch = base_shape[0];
    let (base, x) = (batch_rows::<B>(base), batch_rows::<B>(x)); // [batch, per, out], [batch, per, in]
    let [_, per, n_out] = base.dims();
    let device = base.device();
    let index = |rows: &[usize]| {
        let ids: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [rows.len()]), &device)
    };
    // The rows of no adapter first, then each adapter's; `order` says which row each part holds.
    let mut adapted = vec![false; batch];
    for a in &adapters {
        a.rows.iter().for_each(|&r| adapted[r] = true);
    }
    let mut order: Vec<usize> = (0..batch).filter(|&r| !adapted[r]).collect();
    let mut parts = Vec::with_capacity(adapters.len() + 1);
    if !order.is_empty() {
        parts.push(base.clone().select(0, index(&order)));
    }
    for a in adapters {
        let rows = index(&a.rows);
        let n = a.rows.len();
        let x_rows = x
            .clone()
            .select(0, rows.clone())
            .reshape([n * per, x_shape[x_shape.num_dims() - 1]]);
        let base_rows = base.clone().select(0, rows).reshape([n * per, n_out]);
        let h = lora_hidden(x_rows, a.lora_a, a.scaling);
        let y = float::<B, 2>(lora_sum::<B>(primitive(base_rows), primitive(h), a.lora_b));
        parts.push(y.reshape([n, per, n_out]));
        order.extend(a.rows);
    }
    let mut restore = vec![0; batch];
    for (at, &r) in order.iter().enumerate() {
        restore[r] = at;
    }
    let y = Tensor::cat(parts, 0).select(0, index(&restore));
    B::float_reshape(primitive(y), base_shape)
}

/// Any-rank `[batch, .., last]` as `[batch, rows of the rest, last]`.
fn batch_rows<B: Backend>(p: FloatTensor<B>) -> Tensor<B, 3> {
    let shape = p.shape();
    let (batch, last) = (shape[0], shape[shape.num_dims() - 1]);
    reshaped(p, [batch, shape.num_elements() / (batch * last), last])
}

/// With `g = s·dy·Bᵀ`: `dx = dy·Wᵀ + g·Aᵀ`, `dA = xᵀ·g`, `dB = hᵀ·dy`; the adapter's part in
/// f32, the base's in its dtype.
pub(super) fn lora_linear_backward<B: Backend>(
    x: FloatTensor<B>,
    layer: LoraParts<B>,
    h: Option<FloatTensor<B>>,
    grad: FloatTensor<B>,
    x_grad: bool,
) -> LoraGrads<B> {
    let shape = x.shape();
    let x = rows::<B>(x);
    let dtype = x.dtype();
    let h = h.map_or_else(
        || lora_hidden(x.clone(), layer.lora_a.clone(), layer.scaling),
        float::<B, 2>,
    );
    let grad = rows::<B>(grad);
    let grad_f32 = grad.clone().cast(DType::F32);
    let d_b = h.transpose().matmul(grad_f32.clone());
    let g = grad_f32.matmul(float::<B, 2>(layer.lora_b).transpose()) * layer.scaling;
    let d_a = x.cast(DType::F32).transpose().matmul(g.clone());
    let d_x = x_grad.then(|| {
        let d_x = grad.matmul(float::<B, 2>(layer.weight).transpose())
            + g.matmul(float::<B, 2>(layer.lora_a).transpose())
                .cast(dtype);
        B::float_reshape(primitive(d_x), shape)
    });
    (d_x, primitive(d_a), primitive(d_b))
}

pub(super) fn cross_entropy<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let logits = float::<B, 2>(logits).cast(DType::F32);
    let n = logits.dims()[0];
    let max = logits.clone().max_dim(1); // [n, 1]
    let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let targets = Tensor::<B, 1, Int>::from_primitive(targets).reshape([n, 1]);
    let picked = logits.gather(1, targets);
    (
        primitive((lse.clone() - picked).reshape([n])),
        primitive(lse.reshape([n])),
    )
}

pub(super) fn cross_entropy_backward<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    lse: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let logits = float::<B, 2>(logits);
    let dtype = logits.dtype();
    let n = logits.dims()[0];
    let [lse, grad] = [lse, grad].map(|t| reshaped::<B, 2>(t, [n, 1]));
    let probs = (logits.cast(DType::F32) - lse).exp();
    let targets = Tensor::<B, 1, Int>::from_primitive(targets).reshape([n, 1]);
    let picked = probs
        .zeros_like()
        .scatter(1, targets, grad.clone(), IndexingUpdateOp::Add);
    primitive((probs * grad - picked).cast(dtype))
}

/// The generic RoPE.
pub(super) fn rope<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    let (x, cos, sin) = (float::<B, 4>(x), float::<B, 4>(cos), float::<B, 4>(sin));
    let [b, s, h, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..s, 0..h, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..s, 0..h, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    primitive(x * cos + rotated * sin)
}

/// The generic forward pass: the backend's own (fused, where it has one) attention over the
/// key/value heads repeated to one per query head.
pub(super) fn sdpa<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: AttnMask<B>,
) -> FloatTensor<B> {
    let dtype = float::<B, 4>(q.clone()).dtype();
    let [q, k, v] = [q, k, v].map(in_f32::<B>);
    let (mask, is_causal) = dense_mask(mask, q.dims()[2]);
    let n_rep = q.dims()[1] / k.dims()[1];
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal,
    };
    let (k, v) = (repeat_kv(k, n_rep), repeat_kv(v, n_rep));
    primitive(attention(q, k, v, mask, None, options).cast(dtype))
}

/// `mask` as Burn's attention takes it, for `s` queries: a `[batch, 1, s, keys]` mask (true =
/// masked) and whether to add the causal mask.
pub(super) fn dense_mask<B: Backend>(
    mask: AttnMask<B>,
    s: usize,
) -> (Option<Tensor<B, 4, Bool>>, bool) {
    match mask {
        AttnMask::All => (None, false),
        AttnMask::Causal => (None, true),
        AttnMask::Dense(mask) => (Some(Tensor::from_primitive(mask)), false),
        AttnMask::Tokens { ids, window } => (Some(tokens_mask(ids, window, s)), false),
    }
}

/// `AttnMask::Tokens` as a `[batch, 1, s, keys]` mask, causal part included.
fn tokens_mask<B: Backend>(
    ids: IntTensor<B>,
    window: Option<usize>,
    s: usize,
) -> Tensor<B, 4, Bool> {
    let ids = Tensor::<B, 3, Int>::from_primitive(ids);
    let [_, b, keys] = ids.dims();
    let device = ids.device();
    let id = |i: usize| {
        ids.clone()
            .slice([i..i + 1, 0..b, 0..keys])
            .reshape([b, keys])
    };
    let (real, segment, position) = (id(0), id(1), id(2));
    // As keys `[b, 1, 1, keys]` and as queries (the last `s` keys) `[b, 1, s, 1]`, both spread
    // to `[b, 1, s, keys]`.
    let as_keys =
        |t: &Tensor<B, 2, Int>| t.clone().reshape([b, 1, 1, keys]).expand([b, 1, s, keys]);
    let as_queries = |t: &Tensor<B, 2, Int>| {
        t.clone()
            .slice([0..b, keys - s..keys])
            .reshape([b, 1, s, 1])
            .expand([b, 1, s, keys])
    };
    let future = Tensor::<B, 2, Bool>::tril_mask([s, keys], (keys - s) as i64, &device)
        .reshape([1, 1, s, keys])
        .expand([b, 1, s, keys]);
    let mut mask = future
        .bool_or(as_keys(&real).equal_elem(0))
        .bool_or(as_keys(&segment).not_equal(as_queries(&segment)));
    if let Some(w) = window {
        let distance = as_queries(&position) - as_keys(&position);
        mask = mask.bool_or(distance.greater_equal_elem(w as i32));
    }
    mask
}

/// `t` as an f32 tensor: attention's scores, softmax and products run in f32 whatever the input
/// dtype, as transformers' softmax upcasts (a bf16 softmax over long rows loses whole digits).
pub(super) fn in_f32<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 4> {
    float::<B, 4>(t).cast(DType::F32)
}

/// GQA: each key/value head serves `n_rep` query heads. [b, kv, s, d] -> [b, kv * n_rep, s, d]
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kv, s, d] = x.dims();
    // Copies by concatenation: an expanded view made contiguous goes element by element
    // through flex's strided iterator, about 20 times slower (it dominated decoding).
    let x = x.unsqueeze_dim::<5>(2); // [b, kv, 1, s, d]
    Tensor::cat(vec![x; n_rep], 2).reshape([b, kv * n_rep, s, d])
}

/// The generic backward pass: the gradients of q, k and v from the gradient `d_out` of
/// `out = sdpa(q, k, v)`.
pub(super) fn sdpa_grads<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: AttnMask<B>,
    out: FloatTensor<B>,
    d_out: FloatTensor<B>,
) -> [FloatTensor<B>; 3] {
    let dtype = float::<B, 4>(q.clone()).dtype();
    let [q, k, v, out, d_out] = [q, k, v, out, d_out].map(in_f32::<B>);
    let [_, heads, s, d] = q.dims();
    let (mask, is_causal) = dense_mask(mask, s);
    let [b, kv_heads, keys, _] = k.dims();
    let n_rep = heads / kv_heads;
    let (k, v) = (repeat_kv(k, n_rep), repeat_kv(v, n_rep));
    let scale = 1.0 / (d as f64).sqrt();
    let mut scores = q.clone().matmul(k.clone().transpose()) * scale; // [b, h, s, keys]
    if let Some(mask) = mask {
        scores = scores.mask_fill(mask, f32::NEG_INFINITY);
    }
    if is_causal {
        let offset = keys as i64 - s as i64;
        let causal = Tensor::<B, 2, Bool>::tril_mask([s, keys], offset, &q.device());
        scores = scores.mask_fill(causal.unsqueeze::<4>(), f32::NEG_INFINITY);
    }
    // A row that sees no key (padding) has no probabilities and no gradient: its scores are all
    // -inf, and softmax of them would be NaN.
    let probs = softmax(scores, 3); // [b, h, s, keys]
    let probs = probs.clone().mask_fill(probs.is_nan(), 0.0);
    let d_v = probs.clone().transpose().matmul(d_out.clone());
    let d_probs = d_out.clone().matmul(v.transpose());
    let row_dot = (d_out * out).sum_dim(3); // [b, h, s, 1]
    let d_scores = probs * (d_probs - row_dot) * scale;
    let d_q = d_scores.clone().matmul(k);
    let d_k = d_scores.transpose().matmul(q);
    // The query heads that shared a key/value head sum their gradients.
    let group_sum = |g: Tensor<B, 4>| {
        g.reshape([b, kv_heads, n_rep, keys, d])
            .sum_dim(2)
            .reshape([b, kv_heads, keys, d])
    };
    [d_q, group_sum(d_k), group_sum(d_v)].map(|g| primitive(g.cast(dtype)))
}

/// The generic gated delta rule, chunked as flash-linear-attention and transformers'
/// `torch_chunk_gated_delta_rule` compute it (Yang et al., "Gated Delta Networks", §3): within a
/// chunk of `c` tokens the rule's updates are one lower-triangular system `(I + N) x = rhs`
/// (the WY/UT representation), across chunks the state `[b, h, dk, dv]` carries on, in f32.
/// `(I + N)⁻¹` for the nilpotent `N` is `Π (I + (-N)^(2^j))`: log₂(c) products of tensor ops
/// instead of a triangular solve, which Burn lacks. Every step is a tracked tensor op, so
/// autodiff differentiates it as it stands.
pub(super) fn gated_delta_rule<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    g: FloatTensor<B>,
    beta: FloatTensor<B>,
    state: Option<FloatTensor<B>>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let dtype = float::<B, 4>(v.clone()).dtype();
    let f32_4 = |t: FloatTensor<B>| float::<B, 4>(t).cast(DType::F32);
    let f32_3 = |t: FloatTensor<B>| float::<B, 3>(t).cast(DType::F32);
    let (q, k, v) = (f32_4(q), f32_4(k), f32_4(v)); // [b, s, heads, dim]
    let (g, beta) = (f32_3(g), f32_3(beta)); // [b, s, hv]
    let [b, s, hk, dk] = q.dims();
    let [_, _, hv, dv] = v.dims();
    let device = q.device();
    // Each key head serves hv / hk consecutive value heads, as transformers' repeat_interleave.
    // L2-normalised per key head, then repeated: the norm is taken once a key head.
    let per_key = |x: Tensor<B, 4>| {
        let x = x.swap_dims(1, 2); // [b, hk, s, dk]
        let norm = (x.clone().powi_scalar(2).sum_dim(3) + 1e-6).sqrt().recip();
        repeat_kv::<B>(x * norm, hv / hk) // [b, hv, s, dk]
    };
    let q = per_key(q) * (dk as f64).powf(-0.5);
    let k = per_key(k);
    let v = v.swap_dims(1, 2); // [b, hv, s, dv]
    let (g, beta) = (g.swap_dims(1, 2), beta.swap_dims(1, 2)); // [b, hv, s]
                                                               // Short inputs (a decoding step) take one chunk of their own length, rounded up.
    let c = s.next_power_of_two().clamp(1, 64);
    let chunks = s.div_ceil(c);
    let padded = chunks * c;
    // Zero padding leaves the state as it was: k = 0 writes nothing, g = 0 decays nothing.
    let pad4 = |x: Tensor<B, 4>| {
        let [b, h, _, d] = x.dims();
        match padded - s {
            0 => x,
            p => Tensor::cat(vec![x, Tensor::zeros([b, h, p, d], &device)], 2),
        }
        .reshape([b, h, chunks, c, d])
    };
    let pad3 = |x: Tensor<B, 3>| pad4(x.unsqueeze_dim(3)).squeeze_dim::<4>(4); // [b, h, n, c]
    let beta = pad3(beta).unsqueeze_dim::<5>(4); // [b, h, n, c, 1]
    let (q, k, v) = (pad4(q), pad4(k), pad4(v)); // [b, h, n, c, d]
    let (k_beta, v_beta) = (k.clone() * beta.clone(), v * beta);
    let cum = pad3(g).cumsum(3); // [b, h, n, c]: log decay from the chunk's start
    let row = Tensor::<B, 1, Int>::arange(0..c as i64, &device);
    let upper = row.clone().reshape([1, c]).greater(row.reshape([c, 1])); // [c, c], j > i
    let upper = upper.reshape([1, 1, 1, c, c]);
    // decay[i, j] = exp(cum_i - cum_j) for j <= i: what position j's write has decayed by at i.
    let decay = (cum.clone().unsqueeze_dim::<5>(4) - cum.clone().unsqueeze_dim::<5>(3))
        .mask_fill(
            upper.clone().expand([b, hv, chunks, c, c]),
            f32::NEG_INFINITY,
        )
        .exp(); // [b, h, n, c, c]
    let kt = k.clone().swap_dims(3, 4); // [b, h, n, dk, c]
    let not_below = upper.bool_or(diagonal::<B>(c, &device));
    let lower_strict = (k_beta.clone().matmul(kt.clone()) * decay.clone())
        .mask_fill(not_below.expand([b, hv, chunks, c, c]), 0.0); // N: [b, h, n, c, c]
    let intra = q.clone().matmul(kt) * decay; // [b, h, n, c, c], causal within the chunk
    let cum_exp = cum.clone().exp().unsqueeze_dim::<5>(4); // [b, h, n, c, 1]
    let decayed_k_beta = k_beta * cum_exp.clone();
    let solve = unit_lower_inverse(lower_strict); // (I + N)⁻¹
    let new_values = solve.clone().matmul(v_beta); // [b, h, n, c, dv]
    let k_cumdecay = solve.matmul(decayed_k_beta); // [b, h, n, c, dk]
    let q = q * cum_exp;
    let last = cum.clone().narrow(3, c - 1, 1); // [b, h, n, 1]
    let k = k * (last.clone() - cum).exp().unsqueeze_dim::<5>(4);
    let chunk_decay = last.exp().unsqueeze_dim::<5>(4); // [b, h, n, 1, 1]
    let mut state = match state {
        Some(s) => float::<B, 4>(s).cast(DType::F32),
        None => Tensor::zeros([b, hv, dk, dv], &device),
    };
    let chunk = |x: &Tensor<B, 5>, i: usize| {
        let [b, h, _, r, d] = x.dims();
        x.clone().narrow(2, i, 1).reshape([b, h, r, d])
    };
    let mut outs = Vec::with_capacity(chunks);
    for i in 0..chunks {
        let v_new = chunk(&new_values, i) - chunk(&k_cumdecay, i).matmul(state.clone());
        let out = chunk(&q, i).matmul(state.clone()) + chunk(&intra, i).matmul(v_new.clone());
        outs.push(out); // [b, h, c, dv]
        state = state * chunk(&chunk_decay, i) + chunk(&k, i).swap_dims(2, 3).matmul(v_new);
    }
    let out = Tensor::cat(outs, 2).narrow(2, 0, s).swap_dims(1, 2); // [b, s, hv, dv]
    (primitive(out.cast(dtype)), primitive(state))
}

/// `[1, 1, 1, c, c]`, true on the diagonal.
fn diagonal<B: Backend>(c: usize, device: &B::Device) -> Tensor<B, 5, Bool> {
    let row = Tensor::<B, 1, Int>::arange(0..c as i64, device);
    row.clone()
        .reshape([1, c])
        .equal(row.reshape([c, 1]))
        .reshape([1, 1, 1, c, c])
}

/// `(I + N)⁻¹` of a strictly lower-triangular `N` `[.., c, c]`: with `P = -N`, `Pᶜ = 0`, so
/// `Σ Pⁱ = (I + P)(I + P²)(I + P⁴)...` up to `P^(c/2)`.
fn unit_lower_inverse<B: Backend>(n: Tensor<B, 5>) -> Tensor<B, 5> {
    let dims = n.dims();
    let c = dims[4];
    let eye = diagonal::<B>(c, &n.device()).float().expand(dims);
    let mut power = n.neg();
    let mut inverse = eye.clone() + power.clone();
    let mut reach = 2;
    while reach < c {
        power = power.clone().matmul(power);
        inverse = inverse.matmul(eye.clone() + power.clone());
        reach *= 2;
    }
    inverse
}

/// The generic depthwise causal convolution: `out[t, c] = Σ_j w[c, j] · x[t - K + 1 + j, c]`
/// over `x` `[b, s, ch]` preceded by `state` `[b, K - 1, ch]` (zeros when None), in f32 and cast
/// back; returns it and the last `K - 1` inputs, the next call's state.
pub(super) fn causal_conv1d<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    state: Option<FloatTensor<B>>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let x = float::<B, 3>(x);
    let dtype = x.dtype();
    let [b, s, ch] = x.dims();
    let weight = float::<B, 2>(weight).cast(DType::F32); // [ch, K]
    let kernel = weight.dims()[1];
    let state = match state {
        Some(p) => float::<B, 3>(p).cast(dtype),
        None => Tensor::<B, 3>::zeros([b, kernel - 1, ch], &x.device()).cast(dtype),
    };
    let full: Tensor<B, 3> = Tensor::cat(vec![state, x], 1); // [b, K - 1 + s, ch]
    let next = full.clone().narrow(1, s, kernel - 1);
    let full = full.cast(DType::F32);
    let mut out = Tensor::<B, 3>::zeros([b, s, ch], &full.device());
    for j in 0..kernel {
        let w = weight.clone().narrow(1, j, 1).reshape([1, 1, ch]);
        out = out + full.clone().narrow(1, j, s) * w;
    }
    (primitive(out.cast(dtype)), primitive(next))
}

/// The generic gated RMSNorm of Qwen3.5's Gated DeltaNet (`Qwen3_5RMSNormGated`):
/// `rms_norm(x, weight) · silu(gate)`, the gate's product in f32 and cast back.
pub(super) fn gated_rms_norm<B: Backend>(
    x: FloatTensor<B>,
    gate: FloatTensor<B>,
    weight: FloatTensor<B>,
    eps: f64,
) -> FloatTensor<B> {
    let shape = x.shape();
    let normed = rows::<B>(rms_norm::<B>(x, weight, eps));
    let dtype = normed.dtype();
    let gate = silu(rows::<B>(gate).cast(DType::F32));
    B::float_reshape(
        primitive((normed.cast(DType::F32) * gate).cast(dtype)),
        shape,
    )
}
