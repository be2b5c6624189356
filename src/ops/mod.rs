//! The model's compute-heavy ops as single ops with backward passes of their own: a linear
//! layer with its LoRA adapter, attention, RoPE, SwiGLU, RMSNorm, the cross-entropy of the
//! logits, and Gated DeltaNet's chunked delta rule, causal convolution and gated norm.
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
//! kernels of `cpu`; every other backend and dtype runs the generic path (`generic`: Burn's tensor
//! ops, the backend's fused attention forward), which is also the reference the kernels are
//! tested against (`tests`). `autodiff` makes each op one tracked node. This folder is the only
//! Burn-internal code (primitives, autodiff nodes), so a Burn upgrade touches it alone.
//!
//! Attention's q is `[batch, heads, seq, head_dim]`; k and v are `[batch, kv_heads, keys,
//! head_dim]` with `heads` a multiple of `kv_heads` (grouped-query attention: query head `i` reads
//! key/value head `i / (heads / kv_heads)`, as transformers' `repeat_kv` lays them out).

mod autodiff;
mod cpu;
#[cfg(feature = "cube")]
mod cube;
mod generic;
#[cfg(test)]
mod tests;
#[cfg(feature = "wgpu")]
mod wgpu;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{BoolTensor, FloatTensor, IntTensor};
use burn::tensor::{DType, Int, Shape, Tensor, TensorPrimitive};

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

/// One adapter of `lora_add` and the batch rows it applies to (ascending, each in one adapter at
/// most).
#[derive(Clone, Debug)]
pub struct RowsAdapter<B: Backend> {
    pub rows: Vec<usize>,
    pub lora_a: FloatTensor<B>, // [in, r], f32
    pub lora_b: FloatTensor<B>, // [r, out], f32
    pub scaling: f64,
}

impl<B: Backend> RowsAdapter<B> {
    pub fn new(rows: Vec<usize>, lora_a: Tensor<B, 2>, lora_b: Tensor<B, 2>, scaling: f64) -> Self {
        Self {
            rows,
            lora_a: primitive(lora_a),
            lora_b: primitive(lora_b),
            scaling,
        }
    }
}

/// Which keys each query of an attention may see; the `s` queries are the last `s` of the keys.
#[derive(Clone, Debug)]
pub enum AttnMask<B: Backend> {
    /// Every key (a new token after a cache).
    All,
    /// Each query sees its own key and those before it.
    Causal,
    /// `Causal`, and each key's token in `ids` `[3, batch, keys]` (I32): 1 for a real token, 0
    /// for padding; the sample it belongs to in a packed row; its position. A query does not see
    /// padding, keys of another sample, or, with `window`, keys `window` or more positions back
    /// (transformers' `sliding_window_overlay`). Kernels read the ids directly; the generic path
    /// builds the `[batch, 1, s, keys]` mask from them.
    Tokens {
        ids: IntTensor<B>,
        window: Option<usize>,
    },
    /// `[batch, 1, s, keys]`, true where the query may not see the key; nothing added.
    Dense(BoolTensor<B>),
}

/// An NF4 weight as `quant::Nf4Linear` holds it (bitsandbytes' layout), for `nf4_dequantize`.
#[derive(Clone, Debug)]
pub struct Nf4Parts<B: Backend> {
    /// Two 4-bit codes a byte over the `[out, in]` weight flattened row-major, high nibble first,
    /// four bytes an I32 word, little-endian: `[ceil(out * in / 8)]`.
    pub packed: IntTensor<B>,
    pub absmax: Nf4Absmax<B>,
    pub nf4_code: FloatTensor<B>,    // [16], f32
    pub dynamic_map: FloatTensor<B>, // [256], f32
    /// `[out, in]`
    pub shape: [usize; 2],
    pub blocksize: usize,
}

/// The scale of each block of `blocksize` codes.
#[derive(Clone, Debug)]
pub enum Nf4Absmax<B: Backend> {
    Plain(FloatTensor<B>), // [blocks], f32
    /// Double quantization: a byte a block (four to an I32 word) into `dynamic_map`, times the
    /// f32 `absmax2` of its group of 256 blocks, plus `offset`.
    Double {
        quantized: IntTensor<B>,
        absmax2: FloatTensor<B>,
        offset: f64,
    },
}

/// The chunked delta rule's sequential part (`ModelBackend::delta_rule_scan`): the state carried
/// from chunk to chunk, forward or, for its gradient, backward. Chunk by chunk (last to first
/// when `backward`), from `state`: `r = base - σ·pull·S`, then `S = decay·S + add + σ·pushᵀ·r`,
/// σ = 1 forward and -1 backward. Forward: r is each chunk's new values `v_new` (`pull` the
/// keys' pull on the state, `push` the keys decayed to the chunk's end, no `add`); backward: r is
/// v_new's gradient and S the state's. All f32, n chunks of c positions.
#[derive(Clone, Debug)]
pub struct DeltaScan<B: Backend> {
    pub pull: FloatTensor<B>,        // [b, h, n, c, dk]
    pub push: FloatTensor<B>,        // [b, h, n, c, dk]
    pub base: FloatTensor<B>,        // [b, h, n, c, dv]
    pub add: Option<FloatTensor<B>>, // [b, h, n, dk, dv]
    pub decay: FloatTensor<B>,       // [b, h, n]
    pub state: FloatTensor<B>,       // [b, h, dk, dv]
    pub backward: bool,
}

/// The gradients of a LoRA layer's input (when asked for) and of its adapter.
pub type LoraGrads<B> = (Option<FloatTensor<B>>, FloatTensor<B>, FloatTensor<B>);

/// A backend the model runs on: Burn's `Backend` plus the ops autodiff differentiates as one.
/// Every method has the generic implementation; a backend overrides what it has kernels for.
pub trait ModelBackend: Backend {
    /// Bytes of device memory the backend's pools hold (the high-water mark of what training
    /// allocated; they are not given back), where it has a device of its own. None on the CPU,
    /// whose use is the process's resident memory.
    fn device_memory_bytes(_device: &Self::Device) -> Option<u64> {
        None
    }

    /// `x·W + bias` on `x` `[.., in]`, `W` `[in, out]`: Burn's `linear`, for frozen layers (a
    /// base layer without adapter, the lm_head). A tracked weight or bias takes Burn's path,
    /// which gives them their gradients.
    fn base_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        generic::linear::<Self>(x, weight, bias)
    }

    /// `x·W + bias + s·(x·A)·B` on `x` `[.., in]`, as PEFT's `lora.Linear` computes it: the
    /// adapter in f32 whatever the base dtype, its product added to the base output in f32 and
    /// the sum cast back. The frozen weight and bias take no gradient. PEFT scales B's output;
    /// scaling A's is the same product (to rounding) and multiplies r columns rather than every
    /// output feature.
    fn lora_linear(x: FloatTensor<Self>, layer: LoraParts<Self>) -> FloatTensor<Self> {
        Self::lora_linear_forward(x, layer).0
    }

    /// `base` `[batch, .., out]`, the frozen layer's output on `x` `[batch, .., in]`, with each
    /// adapter's `s·(x·A)·B` added to its rows of the batch (other rows as they are): the
    /// adapter part of `lora_linear`, added the same way, so that each row is what `lora_linear`
    /// gives on it. A server's batch of several adapters shares one base product this way. No
    /// gradient (serving only).
    fn lora_add(
        base: FloatTensor<Self>,
        x: FloatTensor<Self>,
        adapters: Vec<RowsAdapter<Self>>,
    ) -> FloatTensor<Self> {
        generic::lora_add::<Self>(base, x, adapters)
    }

    /// `lora_linear` and `h = s·x·A` (`[rows, r]`, f32), which the backward pass reuses.
    fn lora_linear_forward(
        x: FloatTensor<Self>,
        layer: LoraParts<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        generic::lora_linear::<Self>(x, layer)
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
        generic::lora_linear_backward::<Self>(x, layer, h, grad, x_grad)
    }

    /// `softmax(q kᵀ / sqrt(head_dim), masked) v`: `[batch, heads, s, head_dim]` in q's dtype,
    /// zeros for a query that sees no key.
    fn sdpa(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: AttnMask<Self>,
    ) -> FloatTensor<Self> {
        Self::sdpa_forward(q, k, v, mask).0
    }

    /// `sdpa` and what `sdpa_backward` needs besides its inputs and output (the generic path:
    /// nothing).
    fn sdpa_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: AttnMask<Self>,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        (generic::sdpa::<Self>(q, k, v, mask), None)
    }

    /// `[dq, dk, dv]` from the gradient `d_out` of `out = sdpa(q, k, v)`; `saved` is what
    /// `sdpa_forward` returned beside `out`.
    #[allow(clippy::too_many_arguments)]
    fn sdpa_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: AttnMask<Self>,
        out: FloatTensor<Self>,
        _saved: Option<FloatTensor<Self>>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        generic::sdpa_grads::<Self>(q, k, v, mask, out, d_out)
    }

    /// `x * cos + rotate_half(x) * sin` on `x` `[batch, seq, heads, head_dim]` with the tables
    /// `[batch, seq, 1, head_dim]`. Its gradient is `rope(grad, cos, -sin)`: the rotation's
    /// transpose, given that both halves of a table row hold the same angles.
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        generic::rope::<Self>(x, cos, sin)
    }

    /// `silu(gate) * up`, elementwise.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        generic::swiglu::<Self>(gate, up)
    }

    /// `[d_gate, d_up]` from the gradient of `swiglu(gate, up)`.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        generic::swiglu_backward::<Self>(gate, up, grad)
    }

    /// `weight * x / sqrt(mean(x²) + eps)` over the last dim, the normalisation done in f32 and
    /// cast back before the weight is applied, as `LlamaRMSNorm` does (this order matters in
    /// bf16).
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        generic::rms_norm::<Self>(x, weight, eps)
    }

    /// The gradient of `x`, and of `weight` when `weight_grad`, from that of `rms_norm`.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        grad: FloatTensor<Self>,
        weight_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        generic::rms_norm_backward::<Self>(x, weight, eps, grad, weight_grad)
    }

    /// Qwen3.5's gated delta rule (Gated DeltaNet's token mixing) over `q`, `k` `[batch, seq,
    /// key_heads, dk]`, `v` `[batch, seq, heads, dv]`, the log decay `g` and the write strength
    /// `beta` `[batch, seq, heads]`, from `state` `[batch, heads, dk, dv]` (zeros when None),
    /// q and k L2-normalised first and q scaled by `1/sqrt(dk)`, as transformers'
    /// `torch_chunk_gated_delta_rule` with `use_qk_l2norm_in_kernel`: for each token,
    /// `S = exp(g)·S`, `S += k ⊗ beta·(v - kᵀS)`, `out = qᵀS`. Returns the output `[batch, seq,
    /// heads, dv]` in v's dtype and the final state, in f32 whatever the input dtype.
    fn gated_delta_rule(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        state: Option<FloatTensor<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        generic::gated_delta_rule::<Self>(q, k, v, g, beta, state)
    }

    /// The chunked delta rule over inputs as `gated_delta_rule` prepares them (`[q, k, v, g,
    /// beta]`: f32, heads before positions, q and k normalised and repeated per value head, q
    /// scaled), from `state` (zeros when None): the output `[batch, heads, seq, dv]` in f32, the
    /// final state, and the state entering each chunk `[batch, heads, chunks, dk, dv]`, which
    /// `delta_rule_backward` starts from.
    fn delta_rule_forward(
        x: [FloatTensor<Self>; 5],
        state: Option<FloatTensor<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        generic::delta_rule_forward::<Self>(x, state)
    }

    /// The gradients of `delta_rule_forward`'s inputs from that of its output, from a zero state.
    fn delta_rule_backward(
        x: [FloatTensor<Self>; 5],
        entering: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 5] {
        generic::delta_rule_backward::<Self>(x, entering, d_out)
    }

    /// `DeltaScan`'s recurrence: every r `[b, h, n, c, dv]`, the state before each chunk's
    /// update `[b, h, n, dk, dv]`, and the state after the last one.
    fn delta_rule_scan(scan: DeltaScan<Self>) -> [FloatTensor<Self>; 3] {
        generic::delta_rule_scan::<Self>(scan)
    }

    /// The depthwise causal convolution of `x` `[batch, seq, channels]` with `weight`
    /// `[channels, kernel]`, continuing from `state` `[batch, kernel - 1, channels]` (the inputs
    /// before `x`; zeros when None): the output in x's dtype, and the next state.
    fn causal_conv1d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        state: Option<FloatTensor<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        generic::causal_conv1d::<Self>(x, weight, state)
    }

    /// The gradient of `causal_conv1d`'s input from that of its output `d_out` (x's dtype), from
    /// a zero state (training's case); the weight, a frozen layer's, takes none.
    fn causal_conv1d_backward(
        weight: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        generic::causal_conv1d_backward::<Self>(weight, d_out)
    }

    /// `rms_norm(x, weight, eps) * silu(gate)` over the last dim, the gate's product in f32
    /// (`Qwen3_5RMSNormGated`).
    fn gated_rms_norm(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        generic::gated_rms_norm::<Self>(x, gate, weight, eps)
    }

    /// The gradients `[dx, d_gate]` of `gated_rms_norm` from that of its output; the weight, a
    /// frozen norm's, takes none.
    fn gated_rms_norm_backward(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        generic::gated_rms_norm_backward::<Self>(x, gate, weight, eps, d_out)
    }

    /// The NF4 weight `w` decoded to `[out, in]` in `dtype` by one kernel, where the backend has
    /// one; None leaves it to `quant::Nf4Linear::dequantize`'s chain of tensor ops (the generic
    /// path, which gives the same values).
    fn nf4_dequantize(_w: Nf4Parts<Self>, _dtype: DType) -> Option<FloatTensor<Self>> {
        None
    }

    /// Whether `lm_head_cross_entropy` under autodiff recomputes the logits in the backward pass
    /// instead of keeping them. On a GPU they are a step's largest tensors (`[tokens, vocab]`:
    /// 5 GB for 16k tokens of a 152k vocabulary in bf16) and one more lm_head product costs
    /// little; on the CPU memory is plentiful and that product is not.
    const RECOMPUTE_LOGITS: bool = true;

    /// `cross_entropy(hidden · weight)` for the frozen lm_head `weight` `[hidden, vocab]` and
    /// `hidden` `[n, hidden]`: `[n]`, f32.
    fn lm_head_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::cross_entropy(Self::base_linear(hidden, weight, None), targets)
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
        generic::cross_entropy::<Self>(logits, targets)
    }

    /// The logits' gradient, `(softmax(logits) - onehot(targets)) * grad` row by row, in their
    /// dtype; `lse` is what `cross_entropy_forward` returned beside the losses.
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        generic::cross_entropy_backward::<Self>(logits, targets, lse, grad)
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

/// The sum of every element of `t`, `[1]`, bit for bit the same on every run. Burn's `sum` adds
/// partial sums with atomics on CubeCL backends (its untuned strategy, and a candidate autotune may
/// pick), so its last bits change from run to run and a resumed run would not end where an
/// unbroken one does; a reduction along a dimension adds in a fixed order.
pub fn sum<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, 1> {
    t.flatten::<1>(0, D - 1).sum_dim(0)
}

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

/// `ModelBackend::lora_add` on tensors.
pub fn lora_add<B: ModelBackend, const D: usize>(
    base: Tensor<B, D>,
    x: Tensor<B, D>,
    adapters: Vec<RowsAdapter<B>>,
) -> Tensor<B, D> {
    float(B::lora_add(primitive(base), primitive(x), adapters))
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
    mask: AttnMask<B>,
) -> Tensor<B, 4> {
    float(B::sdpa(primitive(q), primitive(k), primitive(v), mask))
}

/// `ModelBackend::nf4_dequantize` on tensors.
pub fn nf4_dequantize<B: ModelBackend>(w: Nf4Parts<B>, dtype: DType) -> Option<Tensor<B, 2>> {
    B::nf4_dequantize(w, dtype).map(float)
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

/// `ModelBackend::lm_head_cross_entropy` on tensors.
pub fn lm_head_cross_entropy<B: ModelBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    float(B::lm_head_cross_entropy(
        primitive(hidden),
        primitive(weight),
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

/// `ModelBackend::gated_delta_rule` on tensors: `(out, final state)`.
pub fn gated_delta_rule<B: ModelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    g: Tensor<B, 3>,
    beta: Tensor<B, 3>,
    state: Option<Tensor<B, 4>>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let (out, state) = B::gated_delta_rule(
        primitive(q),
        primitive(k),
        primitive(v),
        primitive(g),
        primitive(beta),
        state.map(primitive),
    );
    (float(out), float(state))
}

/// `ModelBackend::causal_conv1d` on tensors: `(out, next state)`.
pub fn causal_conv1d<B: ModelBackend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    state: Option<Tensor<B, 3>>,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let (out, next) = B::causal_conv1d(primitive(x), primitive(weight), state.map(primitive));
    (float(out), float(next))
}

/// `ModelBackend::gated_rms_norm` on tensors.
pub fn gated_rms_norm<B: ModelBackend, const D: usize>(
    x: Tensor<B, D>,
    gate: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    float(B::gated_rms_norm(
        primitive(x),
        primitive(gate),
        primitive(weight),
        eps,
    ))
}

fn float<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// `x`'s shape with the last dim `n`.
fn with_last_dim(shape: &Shape, n: usize) -> Shape {
    let mut shape = shape.clone();
    let last = shape.num_dims() - 1;
    shape[last] = n;
    shape
}

#[cfg(all(test, feature = "wgpu"))]
pub(crate) use self::wgpu::test_gpu;
#[cfg(feature = "wgpu")]
pub use self::wgpu::{wgpu_adapters, WgpuAdapter};
