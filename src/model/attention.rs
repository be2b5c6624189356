//! Scaled dot-product attention with a backward pass of its own.
//!
//! Burn's `Autodiff` runs its attention as the unfused chain of tracked ops (matmul, scale, mask,
//! a NaN-safe softmax of five ops, matmul), so training kept several `[batch, heads, seq, seq]`
//! tensors per layer and ran their backward ops one by one. Here the forward pass is the
//! backend's fused attention and the backward pass recomputes the probabilities from q and k, as
//! FlashAttention does:
//!
//! `P = softmax(q kᵀ * scale)`, `dV = Pᵀ dO`, `dS = P ⊙ (dO vᵀ - rowsum(dO ⊙ O)) * scale`,
//! `dQ = dS k`, `dK = dSᵀ q`.
//!
//! `ModelBackend` is the backend bound of everything that runs the model: Burn's backends get it
//! here (their own fused attention), and `Autodiff` over any of them gets the backward above.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::module::attention;
use burn::tensor::ops::{AttentionModuleOptions, BoolTensor, FloatTensor};
use burn::tensor::{Bool, Tensor, TensorPrimitive};

/// A backend the model runs on: Burn's `Backend` plus attention that autodiff differentiates
/// as one op.
pub trait ModelBackend: Backend {
    /// `softmax(q kᵀ / sqrt(head_dim), masked) v` on `[batch, heads, seq, head_dim]`; `mask[b, 1,
    /// q, k]` is true where query q may not see key k, `is_causal` adds the causal mask.
    fn sdpa(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        is_causal: bool,
    ) -> FloatTensor<Self>;
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

/// The backend's own (fused, where it has one) attention.
fn fused<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    is_causal: bool,
) -> Tensor<B, 4> {
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal,
    };
    attention(q, k, v, mask, None, options)
}

macro_rules! fused_sdpa {
    ($($backend:ty),*) => {$(
        impl ModelBackend for $backend {
            fn sdpa(
                q: FloatTensor<Self>,
                k: FloatTensor<Self>,
                v: FloatTensor<Self>,
                mask: Option<BoolTensor<Self>>,
                is_causal: bool,
            ) -> FloatTensor<Self> {
                let t = |p| Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(p));
                let mask = mask.map(Tensor::<Self, 4, Bool>::from_primitive);
                fused(t(q), t(k), t(v), mask, is_causal).into_primitive().tensor()
            }
        }
    )*};
}

fused_sdpa!(burn::backend::Flex);
#[cfg(feature = "cuda")]
fused_sdpa!(burn::backend::Cuda);

/// What the backward pass keeps: q, k, v, the mask and the output.
type SdpaState<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Option<BoolTensor<B>>,
    bool,
    FloatTensor<B>,
);

#[derive(Debug)]
struct SdpaBackward;

impl<B: Backend> Backward<B, 3> for SdpaBackward {
    type State = SdpaState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, mask, is_causal, out) = ops.state;
        let t = |p| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p));
        let mask = mask.map(Tensor::<B, 4, Bool>::from_primitive);
        let [dq, dk, dv] = sdpa_grads(t(q), t(k), t(v), mask, is_causal, t(out), t(grad));
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g.into_primitive().tensor());
            }
        }
    }
}

/// The gradients of q, k and v from the gradient `d_out` of `out = sdpa(q, k, v)`.
fn sdpa_grads<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    is_causal: bool,
    out: Tensor<B, 4>,
    d_out: Tensor<B, 4>,
) -> [Tensor<B, 4>; 3] {
    let [_, _, s, d] = q.dims();
    let keys = k.dims()[2];
    let scale = 1.0 / (d as f64).sqrt();
    let mut scores = q.clone().matmul(k.clone().transpose()) * scale; // [b, h, s, keys]
    if let Some(mask) = mask {
        scores = scores.mask_fill(mask, f32::NEG_INFINITY);
    }
    if is_causal {
        // Queries are the last s of the keys' positions.
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
    [d_q, d_k, d_v]
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
                let out = B::sdpa(q.clone(), k.clone(), v.clone(), mask.clone(), is_causal);
                prep.finish((q, k, v, mask, is_causal, out.clone()), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::sdpa(q, k, v, mask, is_causal)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tolerance};

    type Ad = Autodiff<Flex>;

    /// The gradients of `sum(sdpa(q, k, v) * w)` through our backward pass and through Burn's
    /// unfused attention differentiated op by op.
    fn grads_both_ways(
        mask: Option<Tensor<Ad, 4, Bool>>,
        is_causal: bool,
        s: usize,
        keys: usize,
    ) -> [(Tensor<Flex, 4>, Tensor<Flex, 4>); 3] {
        let device = Default::default();
        let rand = |shape: [usize; 4]| {
            Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        let (q, k, v) = (
            rand([2, 3, s, 8]),
            rand([2, 3, keys, 8]),
            rand([2, 3, keys, 8]),
        );
        let w = Tensor::<Ad, 4>::from_inner(rand([2, 3, s, 8]));
        let run = |ours: bool| {
            let leaf = |t: &Tensor<Flex, 4>| Tensor::<Ad, 4>::from_inner(t.clone()).require_grad();
            let (q, k, v) = (leaf(&q), leaf(&k), leaf(&v));
            let out = if ours {
                sdpa(q.clone(), k.clone(), v.clone(), mask.clone(), is_causal)
            } else {
                fused(q.clone(), k.clone(), v.clone(), mask.clone(), is_causal)
            };
            let g = (out * w.clone()).sum().backward();
            [q, k, v].map(|t| t.grad(&g).expect("reached"))
        };
        let [a, b] = [run(true), run(false)];
        let mut pairs = a.into_iter().zip(b);
        [(); 3].map(|_| pairs.next().expect("three"))
    }

    fn assert_close(pairs: [(Tensor<Flex, 4>, Tensor<Flex, 4>); 3]) {
        for (ours, burns) in pairs {
            ours.into_data()
                .assert_approx_eq::<f32>(&burns.into_data(), Tolerance::absolute(1e-5));
        }
    }

    #[test]
    fn causal_gradients_match_the_unfused_chain() {
        assert_close(grads_both_ways(None, true, 7, 7));
    }

    #[test]
    fn masked_gradients_match_the_unfused_chain() {
        // Row 0 sees keys 0..=q; row 1 pads its first two keys; the mask is what a batch with
        // padding passes.
        let device = Default::default();
        let mut bits = vec![false; 2 * 6 * 6];
        for row in 0..2 {
            for q in 0..6 {
                for key in 0..6 {
                    bits[row * 36 + q * 6 + key] = key > q || (row == 1 && key < 2);
                }
            }
        }
        let mask = Tensor::<Ad, 4, Bool>::from_data(
            burn::tensor::TensorData::new(bits, [2, 1, 6, 6]),
            &device,
        );
        assert_close(grads_both_ways(Some(mask), false, 6, 6));
    }

    #[test]
    fn a_decoding_step_sees_every_cached_key() {
        assert_close(grads_both_ways(None, true, 1, 5));
    }
}
