//! The model's compute-heavy ops as single ops with backward passes of their own: a linear
//! layer with its LoRA adapter, attention, RoPE, SwiGLU, RMSNorm and the cross-entropy of the
//! logits.
//!
//! Burn's `Autodiff` runs each of them as a chain of tracked elementwise ops, each one a full
//! pass over its tensor with a tensor kept for backward, and its attention as the unfused chain
//! (matmul, scale, mask, a NaN-safe softmax of five ops, matmul) that keeps several `[batch,
//! heads, seq, seq]` tensors per layer. Here each is one tracked op (`autodiff`); attention's
//! backward pass recomputes the probabilities from q and k, as FlashAttention does:
//!
//! `P = softmax(q kᵀ * scale)`, `dV = Pᵀ dO`, `dS = P ⊙ (dO vᵀ - rowsum(dO ⊙ O)) * scale`,
//! `dQ = dS k`, `dK = dSᵀ q`.
//!
//! `ModelBackend` is the backend bound of everything that runs the model. Flex on f32 runs the
//! kernels of `cpu`; every other backend and dtype runs the generic path here (Burn's tensor ops,
//! the backend's fused attention forward), which is also the reference the kernels are tested
//! against.
//!
//! Attention's q is `[batch, heads, seq, head_dim]`; k and v are `[batch, kv_heads, keys,
//! head_dim]` with `heads` a multiple of `kv_heads` (grouped-query attention: query head `i` reads
//! key/value head `i / (heads / kv_heads)`, as transformers' `repeat_kv` lays them out).

mod autodiff;
mod cpu;

use burn::tensor::activation::{sigmoid, silu, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::module::attention;
use burn::tensor::ops::{AttentionModuleOptions, BoolTensor, FloatTensor, IntTensor};
use burn::tensor::{
    Bool, DType, IndexingUpdateOp, Int, Shape, Tensor, TensorMetadata, TensorPrimitive,
};

/// A frozen linear layer and its LoRA adapter, in Burn's `[in, out]` orientation.
#[derive(Clone, Debug)]
pub struct LoraParts<B: Backend> {
    pub weight: FloatTensor<B>,       // [in, out]
    pub bias: Option<FloatTensor<B>>, // [out]
    pub lora_a: FloatTensor<B>,       // [in, r], f32
    pub lora_b: FloatTensor<B>,       // [r, out], f32
    pub scaling: f64,
}

impl<B: Backend> LoraParts<B> {
    pub fn new(
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
        lora_a: Tensor<B, 2>,
        lora_b: Tensor<B, 2>,
        scaling: f64,
    ) -> Self {
        Self {
            weight: primitive(weight),
            bias: bias.map(primitive),
            lora_a: primitive(lora_a),
            lora_b: primitive(lora_b),
            scaling,
        }
    }
}

/// The gradients of a LoRA layer's input (when asked for) and of its adapter.
pub type LoraGrads<B> = (Option<FloatTensor<B>>, FloatTensor<B>, FloatTensor<B>);

/// A backend the model runs on: Burn's `Backend` plus the ops autodiff differentiates as one.
/// Every method has the generic implementation; a backend overrides what it has kernels for.
pub trait ModelBackend: Backend {
    /// `x·W + bias` on `x` `[.., in]`, `W` `[in, out]`: Burn's `linear`, for frozen layers (a
    /// base layer without adapter, the lm_head). A tracked weight or bias takes Burn's path,
    /// which gives them their gradients.
    fn base_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        generic_linear::<Self>(x, weight, bias)
    }

    /// `x·W + bias + s·(x·A)·B` on `x` `[.., in]`, as PEFT's `lora.Linear` computes it: the
    /// adapter in f32 whatever the base dtype, its product added to the base output in f32 and
    /// the sum cast back. The frozen weight and bias take no gradient. PEFT scales B's output;
    /// scaling A's is the same product (to rounding) and multiplies r columns rather than every
    /// output feature.
    fn lora_linear(x: FloatTensor<Self>, layer: LoraParts<Self>) -> FloatTensor<Self> {
        Self::lora_linear_forward(x, layer).0
    }

    /// `lora_linear` and `h = s·x·A` (`[rows, r]`, f32), which the backward pass reuses.
    fn lora_linear_forward(
        x: FloatTensor<Self>,
        layer: LoraParts<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        generic_lora_linear::<Self>(x, layer)
    }

    /// `(dx, dA, dB)` from the gradient `grad` of `lora_linear`'s output, dx only when
    /// `x_grad` (the first layer's input needs none); `h` is what `lora_linear_forward` returned
    /// beside the output, or None to compute it here (after `lora_linear_seed`, which runs no
    /// forward pass).
    fn lora_linear_backward(
        x: FloatTensor<Self>,
        layer: LoraParts<Self>,
        h: Option<FloatTensor<Self>>,
        grad: FloatTensor<Self>,
        x_grad: bool,
    ) -> LoraGrads<Self> {
        generic_lora_linear_backward::<Self>(x, layer, h, grad, x_grad)
    }

    /// `softmax(q kᵀ / sqrt(head_dim), masked) v`; `mask[b, 1, q, k]` is true where query q may
    /// not see key k, `is_causal` adds the causal mask (the queries being the last of the keys).
    fn sdpa(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        is_causal: bool,
    ) -> FloatTensor<Self> {
        Self::sdpa_forward(q, k, v, mask, is_causal).0
    }

    /// `sdpa` and what `sdpa_backward` needs besides its inputs and output (the generic path:
    /// nothing).
    fn sdpa_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        is_causal: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        (generic_sdpa::<Self>(q, k, v, mask, is_causal), None)
    }

    /// `[dq, dk, dv]` from the gradient `d_out` of `out = sdpa(q, k, v)`; `saved` is what
    /// `sdpa_forward` returned beside `out`.
    #[allow(clippy::too_many_arguments)]
    fn sdpa_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        is_causal: bool,
        out: FloatTensor<Self>,
        _saved: Option<FloatTensor<Self>>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        generic_sdpa_grads::<Self>(q, k, v, mask, is_causal, out, d_out)
    }

    /// `x * cos + rotate_half(x) * sin` on `x` `[batch, seq, heads, head_dim]` with the tables
    /// `[batch, seq, 1, head_dim]`. Its gradient is `rope(grad, cos, -sin)`: the rotation's
    /// transpose, given that both halves of a table row hold the same angles.
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        generic_rope::<Self>(x, cos, sin)
    }

    /// `silu(gate) * up`, elementwise.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        generic_swiglu::<Self>(gate, up)
    }

    /// `[d_gate, d_up]` from the gradient of `swiglu(gate, up)`.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        generic_swiglu_backward::<Self>(gate, up, grad)
    }

    /// `weight * x / sqrt(mean(x²) + eps)` over the last dim, the normalisation done in f32 and
    /// cast back before the weight is applied, as `LlamaRMSNorm` does (this order matters in
    /// bf16).
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        generic_rms_norm::<Self>(x, weight, eps)
    }

    /// The gradient of `x`, and of `weight` when `weight_grad`, from that of `rms_norm`.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        grad: FloatTensor<Self>,
        weight_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        generic_rms_norm_backward::<Self>(x, weight, eps, grad, weight_grad)
    }

    /// `logsumexp(logits[i]) - logits[i, targets[i]]` for every row of `logits` `[n, vocab]`,
    /// computed in f32 whatever their dtype (transformers upcasts them): `[n]`, f32.
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        Self::cross_entropy_forward(logits, targets).0
    }

    /// `cross_entropy` and each row's log-sum-exp (`[n]`, f32), which the backward pass reuses.
    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        generic_cross_entropy::<Self>(logits, targets)
    }

    /// The logits' gradient, `(softmax(logits) - onehot(targets)) * grad` row by row, in their
    /// dtype; `lse` is what `cross_entropy_forward` returned beside the losses.
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        generic_cross_entropy_backward::<Self>(logits, targets, lse, grad)
    }
}

/// Backward passes from a gradient that is given rather than computed from a loss. Gradient
/// checkpointing recomputes each layer knowing the gradient of its output: seeding it directly
/// spares the product and sum of `sum(out * grad).backward()`, and for a layer whose output ends
/// in a linear layer, that layer's output altogether, which its backward pass never reads.
pub trait SeedGradient: AutodiffBackend {
    /// A one-element zero whose backward pass hands `grad` to `t`: the gradients of
    /// `sum(t * grad)` without computing it. The gradient the seed itself receives is not read,
    /// so a seed must be the root of `backward()`, alone or in a sum of seeds.
    fn seed_gradient(t: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `seed_gradient(lora_linear(x, layer), grad)` without computing `lora_linear`.
    fn lora_linear_seed(
        x: FloatTensor<Self>,
        layer: LoraParts<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// A training backend whose inner backend runs the model too (`model.valid()` evaluates).
pub trait TrainBackend:
    AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend + SeedGradient
{
}

impl<B: AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend + SeedGradient> TrainBackend
    for B
{
}

#[cfg(feature = "cuda")]
impl ModelBackend for burn::backend::Cuda {}

/// `ModelBackend::base_linear` on tensors.
pub fn base_linear<B: ModelBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    float(B::base_linear(
        primitive(x),
        primitive(weight),
        bias.map(primitive),
    ))
}

/// `ModelBackend::lora_linear` on tensors.
pub fn lora_linear<B: ModelBackend, const D: usize>(
    x: Tensor<B, D>,
    layer: LoraParts<B>,
) -> Tensor<B, D> {
    float(B::lora_linear(primitive(x), layer))
}

/// `SeedGradient::lora_linear_seed` on tensors.
pub fn lora_linear_seed<B: SeedGradient, const D: usize>(
    x: Tensor<B, D>,
    layer: LoraParts<B>,
    grad: Tensor<B, D>,
) -> Tensor<B, 1> {
    float(B::lora_linear_seed(primitive(x), layer, primitive(grad)))
}

/// `SeedGradient::seed_gradient` on tensors.
pub fn seed_gradient<B: SeedGradient, const D: usize>(
    t: Tensor<B, D>,
    grad: Tensor<B, D>,
) -> Tensor<B, 1> {
    float(B::seed_gradient(primitive(t), primitive(grad)))
}

/// `ModelBackend::sdpa` on tensors.
pub fn sdpa<B: ModelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    is_causal: bool,
) -> Tensor<B, 4> {
    let mask = mask.map(Tensor::into_primitive);
    float(B::sdpa(
        primitive(q),
        primitive(k),
        primitive(v),
        mask,
        is_causal,
    ))
}

/// `ModelBackend::rope` on tensors.
pub fn rope<B: ModelBackend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
) -> Tensor<B, 4> {
    float(B::rope(primitive(x), primitive(cos), primitive(sin)))
}

/// `ModelBackend::swiglu` on tensors.
pub fn swiglu<B: ModelBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    float(B::swiglu(primitive(gate), primitive(up)))
}

/// `ModelBackend::cross_entropy` on tensors.
pub fn cross_entropy<B: ModelBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    float(B::cross_entropy(
        primitive(logits),
        targets.into_primitive(),
    ))
}

/// `ModelBackend::rms_norm` on tensors.
pub fn rms_norm<B: ModelBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    float(B::rms_norm(primitive(x), primitive(weight), eps))
}

fn float<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

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
fn rows<B: Backend>(p: FloatTensor<B>) -> Tensor<B, 2> {
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

fn generic_swiglu<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let shape = gate.shape();
    B::float_reshape(primitive(silu(flat::<B>(gate)) * flat::<B>(up)), shape)
}

fn generic_swiglu_backward<B: Backend>(
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

fn generic_rms_norm<B: Backend>(
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
fn generic_rms_norm_backward<B: Backend>(
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

/// `x`'s shape with the last dim `n`.
fn with_last_dim(shape: &Shape, n: usize) -> Shape {
    let mut shape = shape.clone();
    let last = shape.num_dims() - 1;
    shape[last] = n;
    shape
}

fn generic_linear<B: Backend>(
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

fn generic_lora_linear<B: Backend>(
    x: FloatTensor<B>,
    layer: LoraParts<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let shape = x.shape();
    let x = rows::<B>(x);
    let dtype = x.dtype();
    let h = lora_hidden(x.clone(), &layer);
    let weight = float::<B, 2>(layer.weight);
    let n_out = weight.dims()[1];
    let mut base = x.matmul(weight);
    if let Some(bias) = layer.bias {
        base = base + float::<B, 1>(bias).unsqueeze();
    }
    let y = (base.cast(DType::F32) + h.clone().matmul(float(layer.lora_b))).cast(dtype);
    let y = B::float_reshape(primitive(y), with_last_dim(&shape, n_out));
    (y, primitive(h))
}

/// `h = s·x·A` in f32, for `x` `[rows, in]`.
fn lora_hidden<B: Backend>(x: Tensor<B, 2>, layer: &LoraParts<B>) -> Tensor<B, 2> {
    x.cast(DType::F32).matmul(float(layer.lora_a.clone())) * layer.scaling
}

/// With `g = s·dy·Bᵀ`: `dx = dy·Wᵀ + g·Aᵀ`, `dA = xᵀ·g`, `dB = hᵀ·dy`; the adapter's part in
/// f32, the base's in its dtype.
fn generic_lora_linear_backward<B: Backend>(
    x: FloatTensor<B>,
    layer: LoraParts<B>,
    h: Option<FloatTensor<B>>,
    grad: FloatTensor<B>,
    x_grad: bool,
) -> LoraGrads<B> {
    let shape = x.shape();
    let x = rows::<B>(x);
    let dtype = x.dtype();
    let h = h.map_or_else(|| lora_hidden(x.clone(), &layer), float::<B, 2>);
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

fn generic_cross_entropy<B: Backend>(
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

fn generic_cross_entropy_backward<B: Backend>(
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
fn generic_rope<B: Backend>(
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
fn generic_sdpa<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: Option<BoolTensor<B>>,
    is_causal: bool,
) -> FloatTensor<B> {
    let (q, k, v) = (float::<B, 4>(q), float::<B, 4>(k), float::<B, 4>(v));
    let mask = mask.map(Tensor::<B, 4, Bool>::from_primitive);
    let n_rep = q.dims()[1] / k.dims()[1];
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal,
    };
    let (k, v) = (repeat_kv(k, n_rep), repeat_kv(v, n_rep));
    primitive(attention(q, k, v, mask, None, options))
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
fn generic_sdpa_grads<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: Option<BoolTensor<B>>,
    is_causal: bool,
    out: FloatTensor<B>,
    d_out: FloatTensor<B>,
) -> [FloatTensor<B>; 3] {
    let [q, k, v, out, d_out] = [q, k, v, out, d_out].map(float::<B, 4>);
    let mask = mask.map(Tensor::<B, 4, Bool>::from_primitive);
    let [_, heads, s, d] = q.dims();
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
    [d_q, group_sum(d_k), group_sum(d_v)].map(primitive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, TensorData, Tolerance};

    type Ad = Autodiff<Flex>;

    /// Random q ([2, heads, s, 8], made as [2, s, heads, 8] and swapped, as the decoder makes
    /// it), k and v ([2, kv_heads, keys, 8]) and the weights of the loss `sum(out * w)`.
    fn inputs(heads: usize, kv_heads: usize, s: usize, keys: usize) -> [Tensor<Flex, 4>; 4] {
        let device = Default::default();
        let rand = |shape: [usize; 4]| {
            Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        [
            rand([2, s, heads, 8]).swap_dims(1, 2),
            rand([2, kv_heads, keys, 8]),
            rand([2, kv_heads, keys, 8]),
            rand([2, heads, s, 8]),
        ]
    }

    /// The output and `[dq, dk, dv]` of `sum(sdpa(q, k, v) * w)` three ways: the backend's op
    /// under autodiff (Flex f32: the kernel), the generic backward pass, and Burn's unfused
    /// attention differentiated op by op (the reference); the first two are checked against
    /// the third.
    fn check(heads: usize, kv_heads: usize, s: usize, keys: usize, mask: Option<Vec<bool>>) {
        let is_causal = mask.is_none();
        let [q, k, v, w] = inputs(heads, kv_heads, s, keys);
        let mask = mask.map(|bits| {
            Tensor::<Flex, 4, Bool>::from_data(TensorData::new(bits, [2, 1, s, keys]), &q.device())
        });
        let leaf = |t: &Tensor<Flex, 4>| Tensor::<Ad, 4>::from_inner(t.clone()).require_grad();
        let run = |ours: bool| {
            let (q, k, v) = (leaf(&q), leaf(&k), leaf(&v));
            let mask = mask.clone().map(Tensor::from_inner);
            let out = if ours {
                sdpa(q.clone(), k.clone(), v.clone(), mask, is_causal)
            } else {
                let [q, k, v] = [&q, &k, &v].map(|t| primitive(t.clone()));
                float(generic_sdpa::<Ad>(
                    q,
                    k,
                    v,
                    mask.map(Tensor::into_primitive),
                    is_causal,
                ))
            };
            let g = (out.clone() * Tensor::from_inner(w.clone()))
                .sum()
                .backward();
            let grads = [q, k, v].map(|t| t.grad(&g).expect("reached"));
            (out.inner(), grads)
        };
        let (out, kernel) = run(true);
        let (reference_out, reference) = run(false);
        let [q, k, v, out_, w] = [q, k, v, reference_out.clone(), w].map(primitive);
        let mask = mask.map(Tensor::into_primitive);
        let generic = generic_sdpa_grads::<Flex>(q, k, v, mask, is_causal, out_, w).map(float);
        close(out, &reference_out);
        for ((kernel, generic), reference) in kernel.into_iter().zip(generic).zip(&reference) {
            close(kernel, reference);
            close(generic, reference);
        }
    }

    #[test]
    fn causal_attention_matches_the_unfused_chain() {
        check(3, 3, 7, 7, None);
    }

    #[test]
    fn several_query_blocks_and_grouped_heads_match_the_unfused_chain() {
        // 150 queries: two full blocks of 64 and a partial one; 4 query heads on 2 kv heads.
        check(4, 2, 150, 150, None);
    }

    #[test]
    fn masked_attention_matches_the_unfused_chain() {
        // Row 0 sees keys 0..=q; row 1 pads its first two keys, so its query 0 and 1 see
        // nothing at all (a padded row: zeros out, no gradient).
        let mut bits = vec![false; 2 * 6 * 6];
        for row in 0..2 {
            for q in 0..6 {
                for key in 0..6 {
                    bits[row * 36 + q * 6 + key] = key > q || (row == 1 && key < 2);
                }
            }
        }
        check(2, 1, 6, 6, Some(bits));
    }

    #[test]
    fn a_decoding_step_sees_every_cached_key() {
        check(2, 2, 1, 5, None);
    }

    fn rand<const D: usize>(shape: [usize; D]) -> Tensor<Flex, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn leaf<const D: usize>(t: &Tensor<Flex, D>) -> Tensor<Ad, D> {
        Tensor::from_inner(t.clone()).require_grad()
    }

    /// Equal to f32 rounding: 1e-5 absolute, or relative for sums that reach tens (RMSNorm's
    /// weight gradient sums 200 rows, in another order than the reference).
    fn close<const D: usize>(a: Tensor<Flex, D>, b: &Tensor<Flex, D>) {
        a.into_data()
            .assert_approx_eq::<f32>(&b.clone().into_data(), Tolerance::rel_abs(1e-5, 1e-5));
    }

    /// `sum(out * w)`'s gradients of `leaves`.
    fn grads<const D: usize, const L: usize>(
        out: Tensor<Ad, D>,
        w: &Tensor<Flex, D>,
        leaves: [&Tensor<Ad, D>; L],
    ) -> [Tensor<Flex, D>; L] {
        let g = (out * Tensor::from_inner(w.clone())).sum().backward();
        leaves.map(|t| t.grad(&g).expect("reached"))
    }

    #[test]
    fn rope_matches_the_unfused_chain() {
        // 300 positions of 4 heads: several tasks; packed-style positions that restart.
        let [b, s, h, d] = [2, 300, 4, 16];
        let positions: Vec<Vec<usize>> = (0..b)
            .map(|row| (0..s).map(|t| t * (row + 1) % 257).collect())
            .collect();
        let inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let tables = crate::model::rope::RopeTables::<Flex>::new(
            &inv_freq,
            &positions,
            DType::F32,
            &Default::default(),
        );
        let (x, w) = (rand([b, s, h, d]), rand([b, s, h, d]));
        let (cos, sin) = (
            Tensor::from_inner(tables.cos.clone()),
            Tensor::from_inner(tables.sin.clone()),
        );
        let run = |ours: bool| {
            let x = leaf(&x);
            let out = if ours {
                rope(x.clone(), cos.clone(), sin.clone())
            } else {
                let [x, cos, sin] = [&x, &cos, &sin].map(|t| primitive(t.clone()));
                float(generic_rope::<Ad>(x, cos, sin))
            };
            let [dx] = grads(out.clone(), &w, [&x]);
            (out.inner(), dx)
        };
        let ((out, dx), (reference_out, reference_dx)) = (run(true), run(false));
        close(out, &reference_out);
        close(dx, &reference_dx);
        // The generic backward pass: rope of the gradient with -sin.
        close(
            float(generic_rope::<Flex>(
                primitive(w.clone()),
                primitive(tables.cos.clone()),
                primitive(tables.sin.clone().neg()),
            )),
            &reference_dx,
        );
    }

    #[test]
    fn swiglu_matches_the_unfused_chain() {
        let (gate, up, w) = (rand([2, 50, 100]), rand([2, 50, 100]), rand([2, 50, 100]));
        let run = |ours: bool| {
            let (g, u) = (leaf(&gate), leaf(&up));
            let out = if ours {
                swiglu(g.clone(), u.clone())
            } else {
                float(generic_swiglu::<Ad>(
                    primitive(g.clone()),
                    primitive(u.clone()),
                ))
            };
            let [dg, du] = grads(out.clone(), &w, [&g, &u]);
            (out.inner(), [dg, du])
        };
        let ((out, kernel), (reference_out, reference)) = (run(true), run(false));
        close(out, &reference_out);
        let generic = generic_swiglu_backward::<Flex>(primitive(gate), primitive(up), primitive(w));
        for ((kernel, generic), reference) in kernel.into_iter().zip(generic).zip(&reference) {
            close(kernel, reference);
            close(float(generic), reference);
        }
    }

    #[test]
    fn rms_norm_matches_the_unfused_chain() {
        let (x, weight, w) = (rand([2, 100, 48]), rand([48]), rand([2, 100, 48]));
        let eps = 1e-6;
        let run = |ours: bool| {
            let (x, weight) = (leaf(&x), leaf(&weight));
            let out = if ours {
                rms_norm(x.clone(), weight.clone(), eps)
            } else {
                float(generic_rms_norm::<Ad>(
                    primitive(x.clone()),
                    primitive(weight.clone()),
                    eps,
                ))
            };
            let g = (out.clone() * Tensor::from_inner(w.clone()))
                .sum()
                .backward();
            let dx = x.grad(&g).expect("reached");
            (out.inner(), dx, weight.grad(&g).expect("reached"))
        };
        let ((out, dx, dw), (reference_out, reference_dx, reference_dw)) = (run(true), run(false));
        close(out, &reference_out);
        close(dx, &reference_dx);
        close(dw, &reference_dw);
        let (generic_dx, generic_dw) = generic_rms_norm_backward::<Flex>(
            primitive(x),
            primitive(weight),
            eps,
            primitive(w),
            true,
        );
        close(float::<Flex, 3>(generic_dx), &reference_dx);
        close(float::<Flex, 1>(generic_dw.expect("asked")), &reference_dw);
    }

    #[test]
    fn cross_entropy_matches_the_unfused_chain() {
        // A vocabulary of 37: four full lanes of 8 and a remainder; logits up to ±30 so that
        // an unshifted exp would lose the small terms.
        let (n, vocab) = (50, 37);
        let logits = rand([n, vocab]) * 10.0;
        let w = rand([n]);
        let targets: Vec<i64> = (0..n as i64).map(|i| i * 7 % vocab as i64).collect();
        let targets =
            Tensor::<Flex, 1, Int>::from_data(TensorData::new(targets, [n]), &Default::default());
        let run = |ours: bool| {
            let x = leaf(&logits);
            let tgt = Tensor::<Ad, 1, Int>::from_inner(targets.clone());
            let out = if ours {
                cross_entropy(x.clone(), tgt)
            } else {
                burn::tensor::activation::log_softmax(x.clone(), 1)
                    .gather(1, tgt.reshape([n, 1]))
                    .reshape([n])
                    .neg()
            };
            let g = (out.clone() * Tensor::from_inner(w.clone()))
                .sum()
                .backward();
            (out.inner(), x.grad(&g).expect("reached"))
        };
        let ((out, dx), (reference_out, reference_dx)) = (run(true), run(false));
        close(out, &reference_out);
        close(dx, &reference_dx);
        let (generic_out, lse) = generic_cross_entropy::<Flex>(
            primitive(logits.clone()),
            targets.clone().into_primitive(),
        );
        close(float::<Flex, 1>(generic_out), &reference_out);
        let generic_dx = generic_cross_entropy_backward::<Flex>(
            primitive(logits),
            targets.into_primitive(),
            lse,
            primitive(w),
        );
        close(float::<Flex, 2>(generic_dx), &reference_dx);
    }

    #[test]
    fn lora_linear_matches_the_unfused_chain() {
        let (n_in, r, n_out) = (24, 4, 40);
        let (x, w) = (rand([2, 30, n_in]), rand([2, 30, n_out]));
        let (weight, bias) = (rand([n_in, n_out]), rand([n_out]));
        let (a, b) = (rand([n_in, r]), rand([r, n_out]));
        let scaling = 0.5;
        for bias in [None, Some(bias)] {
            let run = |ours: bool| {
                let (x, a, b) = (leaf(&x), leaf(&a), leaf(&b));
                let weight = Tensor::<Ad, 2>::from_inner(weight.clone());
                let bias = bias.clone().map(Tensor::<Ad, 1>::from_inner);
                let out = if ours {
                    let layer = LoraParts::new(weight, bias, a.clone(), b.clone(), scaling);
                    lora_linear(x.clone(), layer)
                } else {
                    let base = burn::tensor::module::linear(x.clone(), weight, bias);
                    base + x
                        .clone()
                        .matmul(a.clone().unsqueeze())
                        .mul_scalar(scaling)
                        .matmul(b.clone().unsqueeze())
                };
                let g = (out.clone() * Tensor::from_inner(w.clone()))
                    .sum()
                    .backward();
                let [da, db] = [&a, &b].map(|t| t.grad(&g).expect("reached"));
                (out.inner(), x.grad(&g).expect("reached"), [da, db])
            };
            let ((out, dx, [da, db]), (reference_out, reference_dx, [reference_da, reference_db])) =
                (run(true), run(false));
            close(out, &reference_out);
            close(dx, &reference_dx);
            close(da, &reference_da);
            close(db, &reference_db);
            let layer = LoraParts {
                weight: primitive(weight.clone()),
                bias: bias.map(primitive),
                lora_a: primitive(a.clone()),
                lora_b: primitive(b.clone()),
                scaling,
            };
            let (generic_out, h) = generic_lora_linear::<Flex>(primitive(x.clone()), layer.clone());
            close(float::<Flex, 3>(generic_out), &reference_out);
            let (generic_dx, generic_da, generic_db) = generic_lora_linear_backward::<Flex>(
                primitive(x.clone()),
                layer,
                Some(h),
                primitive(w.clone()),
                true,
            );
            close(float::<Flex, 3>(generic_dx.expect("asked")), &reference_dx);
            close(float::<Flex, 2>(generic_da), &reference_da);
            close(float::<Flex, 2>(generic_db), &reference_db);
        }
    }

    #[test]
    fn base_linear_matches_burns_linear() {
        // The weight as stored and as the transpose of an [out, in] matrix (a tied lm_head);
        // with and without bias; and a trained weight, which takes Burn's path.
        let (n_in, n_out) = (24, 40);
        let (x, w) = (rand([2, 30, n_in]), rand([2, 30, n_out]));
        let (weight, bias) = (rand([n_in, n_out]), rand([n_out]));
        let stored_transposed =
            Tensor::<Flex, 2>::from_data(weight.clone().transpose().into_data(), &weight.device());
        let weights = [weight, stored_transposed.transpose()];
        for (weight, bias, trained) in [
            (&weights[0], None, false),
            (&weights[0], Some(bias.clone()), false),
            (&weights[1], Some(bias.clone()), false),
            (&weights[1], None, true),
        ] {
            let run = |ours: bool| {
                let x = leaf(&x);
                let weight = Tensor::<Ad, 2>::from_inner(weight.clone());
                let weight = if trained {
                    weight.require_grad()
                } else {
                    weight
                };
                let bias = bias.clone().map(Tensor::<Ad, 1>::from_inner);
                let out = if ours {
                    base_linear(x.clone(), weight.clone(), bias)
                } else {
                    burn::tensor::module::linear(x.clone(), weight.clone(), bias)
                };
                let [dx] = grads(out.clone(), &w, [&x]);
                (out.inner(), dx)
            };
            let ((out, dx), (reference_out, reference_dx)) = (run(true), run(false));
            close(out, &reference_out);
            close(dx, &reference_dx);
        }
    }

    #[test]
    fn seeded_backward_passes_match_the_summed_product() {
        // A recomputed layer's end, `out = residual + lora_linear(x)`, seeded with the gradient
        // w of out, against `sum(out * w).backward()`; a trained base weight takes the generic
        // path.
        let (n_in, r, n_out) = (24, 4, 40);
        let (x, residual, w) = (
            rand([2, 30, n_in]),
            rand([2, 30, n_out]),
            rand([2, 30, n_out]),
        );
        let (weight, bias) = (rand([n_in, n_out]), rand([n_out]));
        let (a, b) = (rand([n_in, r]), rand([r, n_out]));
        for base_trained in [false, true] {
            let run = |seeded: bool| {
                let (x, residual, a, b) = (leaf(&x), leaf(&residual), leaf(&a), leaf(&b));
                let weight = Tensor::<Ad, 2>::from_inner(weight.clone());
                let weight = if base_trained {
                    weight.require_grad()
                } else {
                    weight
                };
                let bias = Tensor::from_inner(bias.clone());
                let layer = LoraParts::new(weight.clone(), Some(bias), a.clone(), b.clone(), 0.5);
                let w = Tensor::<Ad, 3>::from_inner(w.clone());
                let g = if seeded {
                    (seed_gradient(residual.clone(), w.clone())
                        + lora_linear_seed(x.clone(), layer, w))
                    .backward()
                } else {
                    ((residual.clone() + lora_linear(x.clone(), layer)) * w)
                        .sum()
                        .backward()
                };
                let [dx, d_residual] = [&x, &residual].map(|t| t.grad(&g).expect("reached"));
                let [da, db] = [&a, &b].map(|t| t.grad(&g).expect("reached"));
                (dx, d_residual, [da, db], weight.grad(&g))
            };
            let (seeded, reference) = (run(true), run(false));
            close(seeded.0, &reference.0);
            close(seeded.1, &reference.1);
            for (seeded, reference) in seeded.2.into_iter().zip(&reference.2) {
                close(seeded, reference);
            }
            assert_eq!(seeded.3.is_some(), base_trained);
            if let (Some(seeded), Some(reference)) = (seeded.3, reference.3) {
                close(seeded, &reference);
            }
        }
    }
}
