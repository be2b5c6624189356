//! Scaled dot-product attention with a backward pass of its own.
//!
//! Burn's `Autodiff` runs its attention as the unfused chain of tracked ops (matmul, scale, mask,
//! a NaN-safe softmax of five ops, matmul), so training kept several `[batch, heads, seq, seq]`
//! tensors per layer and ran their backward ops one by one. Here attention is one tracked op whose
//! backward pass recomputes the probabilities from q and k, as FlashAttention does:
//!
//! `P = softmax(q kᵀ * scale)`, `dV = Pᵀ dO`, `dS = P ⊙ (dO vᵀ - rowsum(dO ⊙ O)) * scale`,
//! `dQ = dS k`, `dK = dSᵀ q`.
//!
//! `ModelBackend` is the backend bound of everything that runs the model. Flex on f32 runs both
//! passes in the blocked kernel of `cpu`; every other backend and dtype runs the generic path
//! (the backend's fused attention forward, the formulas above in tensor ops backward), which is
//! also the reference the kernel is tested against. `Autodiff` over any of them gets the op.
//!
//! q is `[batch, heads, seq, head_dim]`; k and v are `[batch, kv_heads, keys, head_dim]` with
//! `heads` a multiple of `kv_heads` (grouped-query attention: query head `i` reads key/value head
//! `i / (heads / kv_heads)`, as transformers' `repeat_kv` lays them out).

mod cpu;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::module::attention;
use burn::tensor::ops::{AttentionModuleOptions, BoolTensor, FloatTensor};
use burn::tensor::{Bool, Tensor, TensorPrimitive};

/// A backend the model runs on: Burn's `Backend` plus attention that autodiff differentiates
/// as one op.
pub trait ModelBackend: Backend {
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
        let t = |p| Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(p));
        let mask = mask.map(Tensor::<Self, 4, Bool>::from_primitive);
        let out = generic_sdpa(t(q), t(k), t(v), mask, is_causal);
        (out.into_primitive().tensor(), None)
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
        let t = |p| Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(p));
        let mask = mask.map(Tensor::<Self, 4, Bool>::from_primitive);
        generic_sdpa_grads(t(q), t(k), t(v), mask, is_causal, t(out), t(d_out))
            .map(|g| g.into_primitive().tensor())
    }
}

/// A training backend whose inner backend runs the model too (`model.valid()` evaluates).
pub trait TrainBackend: AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend {}

impl<B: AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend> TrainBackend for B {}

/// `ModelBackend::sdpa` on tensors.
pub fn sdpa<B: ModelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    is_causal: bool,
) -> Tensor<B, 4> {
    let out = B::sdpa(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        mask.map(Tensor::into_primitive),
        is_causal,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

impl ModelBackend for Flex {
    fn sdpa_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        is_causal: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if !cpu::handles(&q) {
            let t = |p| Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(p));
            let mask = mask.map(Tensor::<Self, 4, Bool>::from_primitive);
            let out = generic_sdpa(t(q), t(k), t(v), mask, is_causal);
            return (out.into_primitive().tensor(), None);
        }
        let (out, lse) = cpu::forward(q, k, v, mask, is_causal);
        (out, Some(lse))
    }

    fn sdpa_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        is_causal: bool,
        out: FloatTensor<Self>,
        saved: Option<FloatTensor<Self>>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        match saved {
            Some(lse) => cpu::backward(q, k, v, mask, is_causal, out, lse, d_out),
            None => {
                let t = |p| Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(p));
                let mask = mask.map(Tensor::<Self, 4, Bool>::from_primitive);
                generic_sdpa_grads(t(q), t(k), t(v), mask, is_causal, t(out), t(d_out))
                    .map(|g| g.into_primitive().tensor())
            }
        }
    }
}

#[cfg(feature = "cuda")]
impl ModelBackend for burn::backend::Cuda {}

/// The generic forward pass: the backend's own (fused, where it has one) attention over the
/// key/value heads repeated to one per query head.
fn generic_sdpa<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    is_causal: bool,
) -> Tensor<B, 4> {
    let n_rep = q.dims()[1] / k.dims()[1];
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal,
    };
    attention(
        q,
        repeat_kv(k, n_rep),
        repeat_kv(v, n_rep),
        mask,
        None,
        options,
    )
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

/// What the backward pass keeps: q, k, v, the mask, causality, the output and what the
/// backend's forward pass saved.
type SdpaState<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Option<BoolTensor<B>>,
    bool,
    FloatTensor<B>,
    Option<FloatTensor<B>>,
);

#[derive(Debug)]
struct SdpaBackward;

impl<B: ModelBackend> Backward<B, 3> for SdpaBackward {
    type State = SdpaState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, mask, is_causal, out, saved) = ops.state;
        let d = B::sdpa_backward(q, k, v, mask, is_causal, out, saved, grad);
        for (node, g) in [node_q, node_k, node_v].into_iter().zip(d) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// The generic backward pass: the gradients of q, k and v from the gradient `d_out` of
/// `out = sdpa(q, k, v)`.
fn generic_sdpa_grads<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    is_causal: bool,
    out: Tensor<B, 4>,
    d_out: Tensor<B, 4>,
) -> [Tensor<B, 4>; 3] {
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
    [d_q, group_sum(d_k), group_sum(d_v)]
}

impl<B: ModelBackend, C: CheckpointStrategy> ModelBackend for Autodiff<B, C> {
    fn sdpa(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        is_causal: bool,
    ) -> FloatTensor<Self> {
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        let (q, k, v) = (q.primitive, k.primitive, v.primitive);
        match SdpaBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, saved) =
                    B::sdpa_forward(q.clone(), k.clone(), v.clone(), mask.clone(), is_causal);
                prep.finish((q, k, v, mask, is_causal, out.clone(), saved), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::sdpa(q, k, v, mask, is_causal)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                generic_sdpa(q.clone(), k.clone(), v.clone(), mask, is_causal)
            };
            let g = (out.clone() * Tensor::from_inner(w.clone()))
                .sum()
                .backward();
            let grads = [q, k, v].map(|t| t.grad(&g).expect("reached"));
            (out.inner(), grads)
        };
        let (out, kernel) = run(true);
        let (reference_out, reference) = run(false);
        let generic = generic_sdpa_grads(
            q.clone(),
            k.clone(),
            v.clone(),
            mask.clone(),
            is_causal,
            reference_out.clone(),
            w.clone(),
        );
        let close = |a: Tensor<Flex, 4>, b: &Tensor<Flex, 4>| {
            a.into_data()
                .assert_approx_eq::<f32>(&b.clone().into_data(), Tolerance::absolute(1e-5));
        };
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
}
