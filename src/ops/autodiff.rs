//! `Autodiff` over a `ModelBackend`: each op one tracked node whose backward pass is the inner
//! backend's.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, FloatDType, TensorMetadata};

use super::{generic, AttnMask, LoraParts, ModelBackend, Nf4Absmax, Nf4Parts, SeedGradient};

#[derive(Debug)]
struct LoraLinearBackward;

impl<B: ModelBackend> Backward<B, 3> for LoraLinearBackward {
    /// x, the layer, `h = s·x·A` when the forward pass ran, and the seeded gradient of a
    /// `lora_linear_seed` (which the node's own gradient replaces otherwise).
    type State = (
        FloatTensor<B>,
        LoraParts<B>,
        Option<FloatTensor<B>>,
        Option<FloatTensor<B>>,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let inputs = ops.parents.map(|n| n.map(|n| n.id));
        let received = grads.consume::<B>(&ops.node);
        let (x, layer, h, seeded) = ops.state;
        let grad = seeded.unwrap_or(received);
        let (dx, da, db) = B::lora_linear_backward(x, layer, h, grad, inputs[0].is_some());
        register::<B, 3>(grads, inputs, [dx, Some(da), Some(db)]);
    }
}

#[derive(Debug)]
struct BaseLinearBackward;

impl<B: ModelBackend> Backward<B, 1> for BaseLinearBackward {
    /// The weight.
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let inputs = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let dx = inputs[0].map(|_| B::base_linear(grad, B::float_transpose(ops.state), None));
        register::<B, 1>(grads, inputs, [dx]);
    }
}

#[derive(Debug)]
struct SeedBackward;

impl<B: Backend> Backward<B, 1> for SeedBackward {
    /// The gradient to hand on.
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let inputs = ops.parents.map(|n| n.map(|n| n.id));
        grads.consume::<B>(&ops.node);
        register::<B, 1>(grads, inputs, [Some(ops.state)]);
    }
}

/// What the backward pass keeps: q, k, v, the mask, the output and what the backend's forward
/// pass saved.
type SdpaState<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    AttnMask<B>,
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
        let inputs = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, mask, out, saved) = ops.state;
        let d = B::sdpa_backward(q, k, v, mask, out, saved, grad);
        register::<B, 3>(grads, inputs, d.map(Some));
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<B: ModelBackend> Backward<B, 1> for RopeBackward {
    /// cos and sin.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let inputs = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let (cos, sin) = ops.state;
        let dx = inputs[0].map(|_| B::rope(grad, cos, B::float_neg(sin)));
        register::<B, 1>(grads, inputs, [dx]);
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<B: ModelBackend> Backward<B, 2> for SwigluBackward {
    /// gate and up.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let inputs = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let (gate, up) = ops.state;
        let d = B::swiglu_backward(gate, up, grad);
        register::<B, 2>(grads, inputs, d.map(Some));
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: ModelBackend> Backward<B, 2> for RmsNormBackward {
    /// x, weight and eps.
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let inputs = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight, eps) = ops.state;
        let (dx, dw) = B::rms_norm_backward(x, weight, eps, grad, inputs[1].is_some());
        register::<B, 2>(grads, inputs, [Some(dx), dw]);
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: ModelBackend> Backward<B, 1> for CrossEntropyBackward {
    /// The logits, the targets and the rows' log-sum-exps.
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let inputs = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let (logits, targets, lse) = ops.state;
        let d = inputs[0].map(|_| B::cross_entropy_backward(logits, targets, lse, grad));
        register::<B, 1>(grads, inputs, [d]);
    }
}

#[derive(Debug)]
struct LmHeadCrossEntropyBackward;

impl<B: ModelBackend> Backward<B, 1> for LmHeadCrossEntropyBackward {
    /// The hidden states, the lm_head weight, the targets and the rows' log-sum-exps: not the
    /// logits, which the backward pass recomputes.
    type State = (FloatTensor<B>, FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let inputs = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let (hidden, weight, targets, lse) = ops.state;
        let d_hidden = inputs[0].map(|_| {
            let logits = B::base_linear(hidden, weight.clone(), None); // [n, vocab]
            let d_logits = B::cross_entropy_backward(logits, targets, lse, grad);
            B::base_linear(d_logits, B::float_transpose(weight), None)
        });
        register::<B, 1>(grads, inputs, [d_hidden]);
    }
}

#[derive(Debug)]
struct DeltaRuleBackward;

impl<B: ModelBackend> Backward<B, 5> for DeltaRuleBackward {
    /// The prepared q, k, v, g and beta, and the state entering each chunk.
    type State = ([FloatTensor<B>; 5], FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 5>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let inputs = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let (x, entering) = ops.state;
        let d = B::delta_rule_backward(x, entering, grad);
        register::<B, 5>(grads, inputs, d.map(Some));
    }
}

#[derive(Debug)]
struct CausalConv1dBackward;

impl<B: ModelBackend> Backward<B, 1> for CausalConv1dBackward {
    /// The weight: the input's gradient needs nothing else.
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let inputs = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let dx = B::causal_conv1d_backward(ops.state, grad);
        register::<B, 1>(grads, inputs, [Some(dx)]);
    }
}

#[derive(Debug)]
struct GatedRmsNormBackward;

impl<B: ModelBackend> Backward<B, 2> for GatedRmsNormBackward {
    /// x, the gate, the weight and eps.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let inputs = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let (x, gate, weight, eps) = ops.state;
        let d = B::gated_rms_norm_backward(x, gate, weight, eps, grad);
        register::<B, 2>(grads, inputs, d.map(Some));
    }
}

/// Hands each gradient the op computed to its input, where that input is tracked (`inputs`: the
/// ids of the op's parents, None for an untracked one).
fn register<B: Backend, const N: usize>(
    grads: &mut Gradients,
    inputs: [Option<NodeId>; N],
    values: [Option<FloatTensor<B>>; N],
) {
    for (id, g) in inputs.into_iter().zip(values) {
        if let (Some(id), Some(g)) = (id, g) {
            grads.register::<B>(id, g);
        }
    }
}

/// Whether a frozen-layer op's weight or bias is trained after all: `BaseLinearBackward` and
/// `LoraLinearBackward` give them no gradient, so such a layer takes Burn's op-by-op path.
fn base_tracked<B: Backend, C: CheckpointStrategy>(
    weight: &FloatTensor<Autodiff<B, C>>,
    bias: Option<&FloatTensor<Autodiff<B, C>>>,
) -> bool {
    weight.is_tracked() || bias.is_some_and(|b| b.is_tracked())
}

/// The one-element zero a seed returns (see `SeedGradient::seed_gradient`).
fn seed_root<B: Backend>(like: &FloatTensor<B>) -> FloatTensor<B> {
    B::float_zeros([1].into(), &B::float_device(like), FloatDType::F32)
}

/// `lora_linear(x, layer)` as one tracked op on x, A and B; or with `seeded`, a seed whose
/// backward pass is that op's from the gradient `seeded`, and which computes no output.
fn lora_linear_node<B: ModelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    layer: LoraParts<Autodiff<B, C>>,
    seeded: Option<FloatTensor<B>>,
) -> FloatTensor<Autodiff<B, C>> {
    let nodes = [
        x.node.clone(),
        layer.lora_a.node.clone(),
        layer.lora_b.node.clone(),
    ];
    let x = x.primitive;
    let layer = LoraParts {
        weight: layer.weight.primitive,
        bias: layer.bias.map(|b| b.primitive),
        lora_a: layer.lora_a.primitive,
        lora_b: layer.lora_b.primitive,
        scaling: layer.scaling,
    };
    let prep = LoraLinearBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful();
    match (prep, seeded) {
        (OpsKind::Tracked(prep), None) => {
            let (y, h) = B::lora_linear_forward(x.clone(), layer.clone());
            prep.finish((x, layer, Some(h), None), y)
        }
        (OpsKind::Tracked(prep), Some(grad)) => {
            let root = seed_root::<B>(&x);
            prep.finish((x, layer, None, Some(grad)), root)
        }
        (OpsKind::UnTracked(prep), None) => prep.finish(B::lora_linear(x, layer)),
        (OpsKind::UnTracked(prep), Some(_)) => prep.finish(seed_root::<B>(&x)),
    }
}

impl<B: ModelBackend, C: CheckpointStrategy> SeedGradient for Autodiff<B, C> {
    fn seed_gradient(t: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let root = seed_root::<B>(&grad.primitive);
        match SeedBackward
            .prepare::<C>([t.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(grad.primitive, root),
            OpsKind::UnTracked(prep) => prep.finish(root),
        }
    }

    fn lora_linear_seed(
        x: FloatTensor<Self>,
        layer: LoraParts<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if base_tracked::<B, C>(&layer.weight, layer.bias.as_ref()) {
            return Self::seed_gradient(generic::lora_linear::<Self>(x, layer).0, grad);
        }
        lora_linear_node(x, layer, Some(grad.primitive))
    }
}

impl<B: ModelBackend, C: CheckpointStrategy> ModelBackend for Autodiff<B, C> {
    fn device_memory_bytes(device: &Self::Device) -> Option<u64> {
        B::device_memory_bytes(device)
    }

    /// A frozen weight: the inner backend's, untracked.
    fn nf4_dequantize(w: Nf4Parts<Self>, dtype: DType) -> Option<FloatTensor<Self>> {
        let absmax = match w.absmax {
            Nf4Absmax::Plain(a) => Nf4Absmax::Plain(Self::inner(a)),
            Nf4Absmax::Double {
                quantized,
                absmax2,
                offset,
            } => Nf4Absmax::Double {
                quantized,
                absmax2: Self::inner(absmax2),
                offset,
            },
        };
        let inner = Nf4Parts {
            packed: w.packed,
            absmax,
            nf4_code: Self::inner(w.nf4_code),
            dynamic_map: Self::inner(w.dynamic_map),
            shape: w.shape,
            blocksize: w.blocksize,
        };
        B::nf4_dequantize(inner, dtype).map(Self::from_inner)
    }

    fn base_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        if base_tracked::<B, C>(&weight, bias.as_ref()) {
            return generic::linear::<Self>(x, weight, bias);
        }
        let (weight, bias) = (weight.primitive, bias.map(|b| b.primitive));
        match BaseLinearBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::base_linear(x.primitive, weight.clone(), bias);
                prep.finish(weight, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::base_linear(x.primitive, weight, bias)),
        }
    }

    fn lora_linear(x: FloatTensor<Self>, layer: LoraParts<Self>) -> FloatTensor<Self> {
        if base_tracked::<B, C>(&layer.weight, layer.bias.as_ref()) {
            return generic::lora_linear::<Self>(x, layer).0;
        }
        lora_linear_node(x, layer, None)
    }

    fn sdpa(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: AttnMask<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        let (q, k, v) = (q.primitive, k.primitive, v.primitive);
        // Masks are not tracked: their tensors are the inner backend's.
        let mask = match mask {
            AttnMask::All => AttnMask::All,
            AttnMask::Causal => AttnMask::Causal,
            AttnMask::Tokens { ids, window } => AttnMask::Tokens { ids, window },
            AttnMask::Dense(mask) => AttnMask::Dense(mask),
        };
        match SdpaBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, saved) = B::sdpa_forward(q.clone(), k.clone(), v.clone(), mask.clone());
                prep.finish((q, k, v, mask, out.clone(), saved), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::sdpa(q, k, v, mask)),
        }
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (cos, sin) = (cos.primitive, sin.primitive);
        match RopeBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::rope(x.primitive, cos.clone(), sin.clone());
                prep.finish((cos, sin), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rope(x.primitive, cos, sin)),
        }
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [gate.node.clone(), up.node.clone()];
        let (gate, up) = (gate.primitive, up.primitive);
        match SwigluBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::swiglu(gate.clone(), up.clone());
                prep.finish((gate, up), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gate, up)),
        }
    }

    /// From a zero state (training's case), the chunked rule is one tracked op whose backward
    /// pass is `delta_rule_backward`, the normalisation before it and the layout after it tracked
    /// tensor ops; the final state is not tracked (nothing trained reads it). From a given state,
    /// the generic path's tensor ops, each tracked.
    fn gated_delta_rule(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        state: Option<FloatTensor<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if state.is_some() {
            return generic::gated_delta_rule::<Self>(q, k, v, g, beta, state);
        }
        let dtype = v.dtype();
        let x = generic::DeltaRuleInputs::<Self>::new(q, k, v, g, beta).primitives();
        let nodes = x.clone().map(|t| t.node);
        let x = x.map(|t| t.primitive);
        let (out, last) = match DeltaRuleBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, last, entering) = B::delta_rule_forward(x.clone(), None);
                (prep.finish((x, entering), out), last)
            }
            OpsKind::UnTracked(prep) => {
                let (out, last, _) = B::delta_rule_forward(x, None);
                (prep.finish(out), last)
            }
        };
        let out = generic::delta_rule_output::<Self>(super::float(out), dtype);
        (out, Self::from_inner(last))
    }

    /// From a zero state (training's case) with a frozen weight, one tracked op that keeps
    /// only the weight; the next state is not tracked. Otherwise the generic path, tracked.
    fn causal_conv1d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        state: Option<FloatTensor<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if state.is_some() || weight.is_tracked() {
            return generic::causal_conv1d::<Self>(x, weight, state);
        }
        let weight = weight.primitive;
        let (out, next) = B::causal_conv1d(x.primitive, weight.clone(), None);
        let out = match CausalConv1dBackward
            .prepare::<C>([x.node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(weight, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        (out, Self::from_inner(next))
    }

    /// One tracked op of x and the gate when the norm's weight is frozen (always, under LoRA);
    /// a trained weight takes the generic path.
    fn gated_rms_norm(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        if weight.is_tracked() {
            return generic::gated_rms_norm::<Self>(x, gate, weight, eps);
        }
        let nodes = [x.node.clone(), gate.node.clone()];
        let (x, gate, weight) = (x.primitive, gate.primitive, weight.primitive);
        match GatedRmsNormBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::gated_rms_norm(x.clone(), gate.clone(), weight.clone(), eps);
                prep.finish((x, gate, weight, eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gated_rms_norm(x, gate, weight, eps)),
        }
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let nodes = [x.node.clone(), weight.node.clone()];
        let (x, weight) = (x.primitive, weight.primitive);
        match RmsNormBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::rms_norm(x.clone(), weight.clone(), eps);
                prep.finish((x, weight, eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x, weight, eps)),
        }
    }

    const RECOMPUTE_LOGITS: bool = B::RECOMPUTE_LOGITS;

    fn lm_head_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        if !B::RECOMPUTE_LOGITS || base_tracked::<B, C>(&weight, None) {
            return Self::cross_entropy(Self::base_linear(hidden, weight, None), targets);
        }
        let weight = weight.primitive;
        match LmHeadCrossEntropyBackward
            .prepare::<C>([hidden.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let hidden = hidden.primitive;
                let logits = B::base_linear(hidden.clone(), weight.clone(), None);
                let (loss, lse) = B::cross_entropy_forward(logits, targets.clone());
                prep.finish((hidden, weight, targets, lse), loss)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::lm_head_cross_entropy(hidden.primitive, weight, targets))
            }
        }
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        match CrossEntropyBackward
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let logits = logits.primitive;
                let (loss, lse) = B::cross_entropy_forward(logits.clone(), targets.clone());
                prep.finish((logits, targets, lse), loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::cross_entropy(logits.primitive, targets)),
        }
    }
}
