//! The generic path of every op: Burn's tensor ops on any backend and dtype. It is what cuda,
//! wgpu and Flex's non-f32 dtypes run, and the reference the fused kernels are tested against.
//! Softmax and RMS statistics are computed in f32 whatever the input dtype, as transformers does.

use burn::tensor::activation::{sigmoid, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::{AttentionModuleOptions, FloatTensor, IntTensor};
use burn::tensor::{Bool, DType, IndexingUpdateOp, Int, Shape, Tensor, TensorData, TensorMetadata};

use super::{
    float, primitive, with_last_dim, AttnMask, DeltaScan, LoraGrads, LoraParts, ModelBackend,
    RowsAdapter,
};

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
/// instead of a triangular solve, which Burn lacks.
pub(super) fn gated_delta_rule<B: ModelBackend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    g: FloatTensor<B>,
    beta: FloatTensor<B>,
    state: Option<FloatTensor<B>>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let dtype = float::<B, 4>(v.clone()).dtype();
    let x = DeltaRuleInputs::<B>::new(q, k, v, g, beta).primitives();
    let (out, state, _) = B::delta_rule_forward(x, state);
    (delta_rule_output::<B>(float(out), dtype), state)
}

/// The chunk length of the chunked rule over `s` positions: 64, or for shorter inputs (a decoding
/// step) their own length rounded up to a power of two.
pub(super) fn delta_rule_chunk(s: usize) -> usize {
    s.next_power_of_two().clamp(1, 64)
}

/// The delta rule's inputs as the chunked rule takes them: f32, heads before positions (q, k
/// `[b, h, s, dk]`, v `[b, h, s, dv]`, g, beta `[b, h, s]`), q and k L2-normalised per key head
/// and repeated for the value heads it serves (the norm taken once a key head, as transformers
/// repeats after it), q scaled by `1/sqrt(dk)`.
pub(super) struct DeltaRuleInputs<B: Backend> {
    pub q: Tensor<B, 4>,
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    pub g: Tensor<B, 3>,
    pub beta: Tensor<B, 3>,
}

impl<B: Backend> DeltaRuleInputs<B> {
    /// From `ModelBackend::gated_delta_rule`'s arguments.
    pub fn new(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        g: FloatTensor<B>,
        beta: FloatTensor<B>,
    ) -> Self {
        let f32_4 = |t: FloatTensor<B>| float::<B, 4>(t).cast(DType::F32);
        let f32_3 = |t: FloatTensor<B>| float::<B, 3>(t).cast(DType::F32);
        let (q, k, v) = (f32_4(q), f32_4(k), f32_4(v)); // [b, s, heads, dim]
        let [_, _, hk, dk] = q.dims();
        let hv = v.dims()[2];
        let per_key = |x: Tensor<B, 4>| {
            let x = x.swap_dims(1, 2); // [b, hk, s, dk]
            let norm = (x.clone().powi_scalar(2).sum_dim(3) + 1e-6).sqrt().recip();
            repeat_kv::<B>(x * norm, hv / hk) // [b, hv, s, dk]
        };
        Self {
            q: per_key(q) * (dk as f64).powf(-0.5),
            k: per_key(k),
            v: v.swap_dims(1, 2),
            g: f32_3(g).swap_dims(1, 2),
            beta: f32_3(beta).swap_dims(1, 2),
        }
    }

    /// As primitives: `[q, k, v, g, beta]`.
    pub fn primitives(self) -> [FloatTensor<B>; 5] {
        let Self { q, k, v, g, beta } = self;
        [
            primitive(q),
            primitive(k),
            primitive(v),
            primitive(g),
            primitive(beta),
        ]
    }

    pub fn from_primitives([q, k, v, g, beta]: [FloatTensor<B>; 5]) -> Self {
        Self {
            q: float(q),
            k: float(k),
            v: float(v),
            g: float(g),
            beta: float(beta),
        }
    }
}

/// `ModelBackend::delta_rule_forward`'s generic path.
pub(super) fn delta_rule_forward<B: ModelBackend>(
    x: [FloatTensor<B>; 5],
    state: Option<FloatTensor<B>>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let x = DeltaRuleInputs::<B>::from_primitives(x);
    let state = state.map(|s| float::<B, 4>(s).cast(DType::F32));
    let (out, last, entering) = chunked_delta_rule(&x, state);
    (primitive(out), primitive(last), primitive(entering))
}

/// `ModelBackend::delta_rule_backward`'s generic path.
pub(super) fn delta_rule_backward<B: ModelBackend>(
    x: [FloatTensor<B>; 5],
    entering: FloatTensor<B>,
    d_out: FloatTensor<B>,
) -> [FloatTensor<B>; 5] {
    let x = DeltaRuleInputs::<B>::from_primitives(x);
    chunked_delta_rule_backward(&x, float(entering), float(d_out)).primitives()
}

/// The chunked rule's output `[b, h, s, dv]` as `gated_delta_rule` returns it: `[b, s, h, dv]`
/// in `dtype`.
pub(super) fn delta_rule_output<B: Backend>(out: Tensor<B, 4>, dtype: DType) -> FloatTensor<B> {
    primitive(out.swap_dims(1, 2).cast(dtype))
}

/// One chunking of the rule's inputs, and what the forward and the backward pass both compute
/// from it. Shapes `[b, h, n, c, ..]`: n chunks of c positions, the last padded with zeros, which
/// leave the state as it was (k = 0 writes nothing, g = 0 decays nothing).
struct DeltaChunks<B: Backend> {
    q: Tensor<B, 5>,
    k: Tensor<B, 5>,
    v: Tensor<B, 5>,
    beta: Tensor<B, 5>,
    /// Log decay from the chunk's start, through each position: `[b, h, n, c]`.
    cum: Tensor<B, 4>,
    /// `exp(cum_i - cum_j)` for j ≤ i, else 0: what position j's write has decayed by at i.
    decay: Tensor<B, 5>,
    /// True above the diagonal, and on it: where `N` is zero.
    not_below: Tensor<B, 5, Bool>,
    /// `K Kᵀ`.
    kk: Tensor<B, 5>,
    /// `(I + N)⁻¹`, `N = strict_lower(diag(beta) K Kᵀ ⊙ decay)`.
    solve: Tensor<B, 5>,
    /// `diag(beta) V` and `diag(beta·exp(cum)) K`, the right-hand sides.
    v_beta: Tensor<B, 5>,
    k_beta_decayed: Tensor<B, 5>,
    /// `(I + N)⁻¹` of each: the chunk's new values, and its keys' pull on the entering state.
    new_values: Tensor<B, 5>,
    k_cumdecay: Tensor<B, 5>,
    /// `Q Kᵀ ⊙ decay`: causal attention within the chunk.
    intra: Tensor<B, 5>,
}

impl<B: Backend> DeltaChunks<B> {
    fn new(x: &DeltaRuleInputs<B>) -> Self {
        let [b, h, s, _] = x.q.dims();
        let device = x.q.device();
        let c = delta_rule_chunk(s);
        let n = s.div_ceil(c);
        let pad4 = |x: Tensor<B, 4>| {
            let [b, h, _, d] = x.dims();
            match n * c - s {
                0 => x,
                p => Tensor::cat(vec![x, Tensor::zeros([b, h, p, d], &device)], 2),
            }
            .reshape([b, h, n, c, d])
        };
        let pad3 = |x: Tensor<B, 3>| pad4(x.unsqueeze_dim(3)).squeeze_dim::<4>(4); // [b, h, n, c]
        let beta = pad3(x.beta.clone()).unsqueeze_dim::<5>(4); // [b, h, n, c, 1]
        let (q, k, v) = (pad4(x.q.clone()), pad4(x.k.clone()), pad4(x.v.clone()));
        let cum = pad3(x.g.clone()).cumsum(3);
        let row = Tensor::<B, 1, Int>::arange(0..c as i64, &device);
        let upper = row.clone().reshape([1, c]).greater(row.reshape([c, 1])); // j > i
        let upper = upper.reshape([1, 1, 1, c, c]).expand([b, h, n, c, c]);
        let decay = (cum.clone().unsqueeze_dim::<5>(4) - cum.clone().unsqueeze_dim::<5>(3))
            .mask_fill(upper.clone(), f32::NEG_INFINITY)
            .exp();
        let not_below = upper.bool_or(diagonal::<B>(c, &device).expand([b, h, n, c, c]));
        let kt = k.clone().swap_dims(3, 4);
        let kk = k.clone().matmul(kt.clone());
        let lower_strict =
            (kk.clone() * decay.clone() * beta.clone()).mask_fill(not_below.clone(), 0.0);
        let solve = unit_lower_inverse(lower_strict);
        let v_beta = v.clone() * beta.clone();
        let k_beta_decayed = k.clone() * beta.clone() * cum.clone().exp().unsqueeze_dim::<5>(4);
        Self {
            new_values: solve.clone().matmul(v_beta.clone()),
            k_cumdecay: solve.clone().matmul(k_beta_decayed.clone()),
            intra: q.clone().matmul(kt) * decay.clone(),
            q,
            k,
            v,
            beta,
            cum,
            decay,
            not_below,
            kk,
            solve,
            v_beta,
            k_beta_decayed,
        }
    }

    /// `exp(cum)`, each position's decay since the chunk's start: `[b, h, n, c, 1]`.
    fn cum_exp(&self) -> Tensor<B, 5> {
        self.cum.clone().exp().unsqueeze_dim(4)
    }

    /// The chunk's whole log decay: `[b, h, n, 1]`.
    fn last(&self) -> Tensor<B, 4> {
        let c = self.cum.dims()[3];
        self.cum.clone().narrow(3, c - 1, 1)
    }

    /// The decay of the state across each chunk: `[b, h, n]`.
    fn chunk_decay(&self) -> Tensor<B, 3> {
        self.last().exp().squeeze_dim(3)
    }

    /// Each position's decay from it to the chunk's end: `[b, h, n, c, 1]`.
    fn to_end(&self) -> Tensor<B, 5> {
        (self.last() - self.cum.clone()).exp().unsqueeze_dim(4)
    }
}

/// `[b, h, r, d]`: chunk `i` of `x` `[b, h, n, r, d]`.
fn chunk_of<B: Backend>(x: &Tensor<B, 5>, i: usize) -> Tensor<B, 4> {
    let [b, h, _, r, d] = x.dims();
    x.clone().narrow(2, i, 1).reshape([b, h, r, d])
}

/// The chunked rule: the output `[b, h, s, dv]`, the final state, and the state entering each
/// chunk `[b, h, n, dk, dv]` (what the backward pass starts from). The state's trip through the
/// chunks is `ModelBackend::delta_rule_scan`; everything else is one pass over all chunks at once.
pub(super) fn chunked_delta_rule<B: ModelBackend>(
    x: &DeltaRuleInputs<B>,
    state: Option<Tensor<B, 4>>,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 5>) {
    let [b, h, s, dk] = x.q.dims();
    let dv = x.v.dims()[3];
    let ch = DeltaChunks::new(x);
    let [_, _, n, c, _] = ch.q.dims();
    let state = state.unwrap_or_else(|| Tensor::zeros([b, h, dk, dv], &x.q.device()));
    let [v_new, entering, last] = B::delta_rule_scan(DeltaScan {
        pull: primitive(ch.k_cumdecay.clone()),
        push: primitive(ch.k.clone() * ch.to_end()),
        base: primitive(ch.new_values.clone()),
        add: None,
        decay: primitive(ch.chunk_decay()),
        state: primitive(state),
        backward: false,
    });
    let (v_new, entering): (Tensor<B, 5>, Tensor<B, 5>) = (float(v_new), float(entering));
    // out = exp(cum)·Q S + intra · v_new, per chunk from the state entering it.
    let q = ch.q.clone() * ch.cum_exp();
    let out = q.matmul(entering.clone()) + ch.intra.clone().matmul(v_new);
    let out = out.reshape([b, h, n * c, dv]).narrow(2, 0, s);
    (out, float(last), entering)
}

/// `ModelBackend::delta_rule_scan`'s generic path: a few tensor ops a chunk.
pub(super) fn delta_rule_scan<B: Backend>(scan: DeltaScan<B>) -> [FloatTensor<B>; 3] {
    let (pull, push, base): (Tensor<B, 5>, Tensor<B, 5>, Tensor<B, 5>) =
        (float(scan.pull), float(scan.push), float(scan.base));
    let add = scan.add.map(float::<B, 5>);
    let decay: Tensor<B, 3> = float(scan.decay);
    let [b, h, n] = decay.dims();
    let mut state: Tensor<B, 4> = float(scan.state);
    let sign = if scan.backward { -1.0 } else { 1.0 };
    let order: Vec<usize> = match scan.backward {
        true => (0..n).rev().collect(),
        false => (0..n).collect(),
    };
    let (mut rs, mut before) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in order {
        before.push(state.clone());
        let r = chunk_of(&base, i) - chunk_of(&pull, i).matmul(state.clone()) * sign;
        let decay = decay.clone().narrow(2, i, 1).reshape([b, h, 1, 1]);
        state = state * decay + chunk_of(&push, i).swap_dims(2, 3).matmul(r.clone()) * sign;
        if let Some(add) = &add {
            state = state + chunk_of(add, i);
        }
        rs.push(r);
    }
    if scan.backward {
        rs.reverse();
        before.reverse();
    }
    [
        primitive(Tensor::stack::<5>(rs, 2)),
        primitive(Tensor::stack::<5>(before, 2)),
        primitive(state),
    ]
}

/// The gradients of the chunked rule's inputs from that of its output `[b, h, s, dv]`, given the
/// states entering each chunk (`chunked_delta_rule`'s third result); the final state takes no
/// gradient (training starts every row from zeros and reads only the output). Each chunk's
/// forward pass, differentiated by hand: the entering state's gradient runs back through the
/// chunks, the rest is one pass over all chunks at once.
pub(super) fn chunked_delta_rule_backward<B: ModelBackend>(
    x: &DeltaRuleInputs<B>,
    entering: Tensor<B, 5>,
    d_out: Tensor<B, 4>,
) -> DeltaRuleInputs<B> {
    let [b, h, s, dk] = x.q.dims();
    let dv = x.v.dims()[3];
    let ch = DeltaChunks::new(x);
    let [_, _, n, c, _] = ch.q.dims();
    let d_out = match n * c - s {
        0 => d_out,
        p => Tensor::cat(vec![d_out, Tensor::zeros([b, h, p, dv], &x.q.device())], 2),
    }
    .reshape([b, h, n, c, dv]);
    let (cum_exp, to_end) = (ch.cum_exp(), ch.to_end());
    let q_decayed = ch.q.clone() * cum_exp.clone();
    let k_decayed = ch.k.clone() * to_end.clone();
    // v_new = new_values - k_cumdecay · S, per chunk from the state entering it.
    let v_new = ch.new_values.clone() - ch.k_cumdecay.clone().matmul(entering.clone());

    // Backwards through the chunks: the gradient of the state leaving chunk i (`d_leaving`)
    // gives that of its v_new, `intraᵀ dO + k_decayed · d_leaving`, and of the state entering
    // it, `exp(cum)·Qᵀ dO + exp(last)·d_leaving - k_cumdecayᵀ d_v_new`.
    let [d_v_new, d_leaving, _] = B::delta_rule_scan(DeltaScan {
        pull: primitive(k_decayed.clone()),
        push: primitive(ch.k_cumdecay.clone()),
        base: primitive(ch.intra.clone().swap_dims(3, 4).matmul(d_out.clone())),
        add: Some(primitive(
            q_decayed.clone().swap_dims(3, 4).matmul(d_out.clone()),
        )),
        decay: primitive(ch.chunk_decay()),
        state: primitive(Tensor::<B, 4>::zeros([b, h, dk, dv], &x.q.device())),
        backward: true,
    });
    let (d_v_new, d_leaving): (Tensor<B, 5>, Tensor<B, 5>) = (float(d_v_new), float(d_leaving));
    let row_dot = |a: Tensor<B, 5>, b: Tensor<B, 5>| (a * b).sum_dim(4).squeeze_dim::<4>(4);

    // out = (exp(cum)·Q) S + intra · v_new.
    let d_q_decayed = d_out.clone().matmul(entering.clone().swap_dims(3, 4));
    let mut d_q = d_q_decayed.clone() * cum_exp.clone();
    let mut d_cum = row_dot(d_q_decayed, q_decayed);
    let d_intra = d_out.matmul(v_new.clone().swap_dims(3, 4));
    // leaving = exp(last)·S + (exp(last - cum)·K)ᵀ v_new.
    let d_k_decayed = v_new.matmul(d_leaving.clone().swap_dims(3, 4)); // [b, h, n, c, dk]
    let mut d_k = d_k_decayed.clone() * to_end;
    let pull = row_dot(d_k_decayed, k_decayed); // [b, h, n, c]
    d_cum = d_cum - pull.clone();
    let state_decay = (entering.clone() * d_leaving)
        .sum_dim(4)
        .sum_dim(3)
        .squeeze_dim::<4>(4)
        * ch.last().exp(); // [b, h, n, 1]
    let d_last = pull.sum_dim(3) + state_decay;
    // v_new = T (beta·V) - T (beta·exp(cum)·K) S.
    let d_k_cumdecay = -d_v_new.clone().matmul(entering.swap_dims(3, 4)); // [b, h, n, c, dk]
    let solve_t = ch.solve.clone().swap_dims(3, 4);
    let d_solve = d_v_new.clone().matmul(ch.v_beta.clone().swap_dims(3, 4))
        + d_k_cumdecay
            .clone()
            .matmul(ch.k_beta_decayed.clone().swap_dims(3, 4));
    let d_v_beta = solve_t.clone().matmul(d_v_new);
    let d_k_beta_decayed = solve_t.clone().matmul(d_k_cumdecay);
    // T = (I + N)⁻¹: dN = -Tᵀ dT Tᵀ, on N's strictly lower part.
    let d_lower =
        (-solve_t.clone().matmul(d_solve).matmul(solve_t)).mask_fill(ch.not_below.clone(), 0.0);
    // N = beta_i · (K Kᵀ ⊙ decay), strictly lower.
    let kk_decay = ch.kk.clone() * ch.decay.clone();
    let mut d_beta = row_dot(d_lower.clone(), kk_decay);
    let d_kk_decay = d_lower * ch.beta.clone(); // strictly lower
    let d_kk = d_kk_decay.clone() * ch.decay.clone();
    d_k = d_k + (d_kk.clone() + d_kk.swap_dims(3, 4)).matmul(ch.k.clone());
    // intra = Q Kᵀ ⊙ decay, lower with the diagonal.
    let d_qk = d_intra.clone() * ch.decay.clone();
    d_q = d_q + d_qk.clone().matmul(ch.k.clone());
    d_k = d_k + d_qk.swap_dims(3, 4).matmul(ch.q.clone());
    // decay[i, j] = exp(cum_i - cum_j): each entry's gradient, times the entry, goes to cum_i
    // and, negated, to cum_j.
    let qk = ch.q.clone().matmul(ch.k.clone().swap_dims(3, 4));
    let d_decay = (d_intra * qk + d_kk_decay * ch.kk.clone()) * ch.decay.clone();
    d_cum = d_cum + d_decay.clone().sum_dim(4).squeeze_dim::<4>(4)
        - d_decay.sum_dim(3).squeeze_dim::<4>(3);
    // The right-hand sides: beta·V and beta·exp(cum)·K.
    let d_v = d_v_beta.clone() * ch.beta.clone();
    d_beta = d_beta + row_dot(d_v_beta, ch.v.clone());
    d_k = d_k + d_k_beta_decayed.clone() * ch.beta.clone() * cum_exp.clone();
    let k_pull = row_dot(d_k_beta_decayed, ch.k.clone()) * cum_exp.squeeze_dim::<4>(4);
    d_beta = d_beta + k_pull.clone();
    d_cum = d_cum + k_pull * ch.beta.clone().squeeze_dim::<4>(4);
    // The chunk's whole decay is its last position's cumulative one.
    let last_only = Tensor::<B, 1, Int>::arange(0..c as i64, &x.q.device())
        .equal_elem(c as i64 - 1)
        .float()
        .reshape([1, 1, 1, c]);
    d_cum = d_cum + last_only * d_last;
    // cum = cumsum(g) within the chunk: g_j takes the gradient of every cum_i with i ≥ j.
    let d_g = d_cum.clone().sum_dim(3) - d_cum.clone().cumsum(3) + d_cum;
    let unpad4 = |t: Tensor<B, 5>| {
        let d = t.dims()[4];
        t.reshape([b, h, n * c, d]).narrow(2, 0, s)
    };
    let unpad3 = |t: Tensor<B, 4>| t.reshape([b, h, n * c]).narrow(2, 0, s);
    DeltaRuleInputs {
        q: unpad4(d_q),
        k: unpad4(d_k),
        v: unpad4(d_v),
        g: unpad3(d_g),
        beta: unpad3(d_beta),
    }
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

/// `causal_conv1d`'s input gradient: `dx[t, c] = Σ_j w[c, j] · d_out[t + K - 1 - j, c]`, the
/// taps read backwards over `d_out` followed by `K - 1` zeros.
pub(super) fn causal_conv1d_backward<B: Backend>(
    weight: FloatTensor<B>,
    d_out: FloatTensor<B>,
) -> FloatTensor<B> {
    let d_out = float::<B, 3>(d_out);
    let dtype = d_out.dtype();
    let [b, s, ch] = d_out.dims();
    let weight = float::<B, 2>(weight).cast(DType::F32); // [ch, K]
    let kernel = weight.dims()[1];
    let tail = Tensor::<B, 3>::zeros([b, kernel - 1, ch], &d_out.device());
    let full = Tensor::cat(vec![d_out.cast(DType::F32), tail], 1); // [b, s + K - 1, ch]
    let mut dx = Tensor::<B, 3>::zeros([b, s, ch], &full.device());
    for j in 0..kernel {
        let w = weight.clone().narrow(1, j, 1).reshape([1, 1, ch]);
        dx = dx + full.clone().narrow(1, kernel - 1 - j, s) * w;
    }
    primitive(dx.cast(dtype))
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

/// `gated_rms_norm`'s gradients: with `y = rms_norm(x, w)` (in x's dtype, as the forward pass
/// rounds it) and `out = y · silu(gate)`, `d_gate = d_out · y · silu'(gate)` and `dy = d_out ·
/// silu(gate)` into RMSNorm's backward pass.
pub(super) fn gated_rms_norm_backward<B: ModelBackend>(
    x: FloatTensor<B>,
    gate: FloatTensor<B>,
    weight: FloatTensor<B>,
    eps: f64,
    d_out: FloatTensor<B>,
) -> [FloatTensor<B>; 2] {
    let (shape, gate_dtype) = (x.shape(), gate.dtype());
    let normed = rows::<B>(rms_norm::<B>(x.clone(), weight.clone(), eps));
    let dtype = normed.dtype();
    let gate = rows::<B>(gate).cast(DType::F32);
    let sig = sigmoid(gate.clone());
    let d_out = rows::<B>(d_out).cast(DType::F32);
    // silu'(z) = σ(z) · (1 + z · (1 - σ(z)))
    let d_silu = sig.clone() * (gate.clone() * (sig.clone().neg() + 1.0) + 1.0);
    let d_gate = d_out.clone() * normed.cast(DType::F32) * d_silu;
    let d_normed = (d_out * gate * sig).cast(dtype);
    let (dx, _) = B::rms_norm_backward(x, weight, eps, primitive(d_normed), false);
    [
        dx,
        B::float_reshape(primitive(d_gate.cast(gate_dtype)), shape),
    ]
}
