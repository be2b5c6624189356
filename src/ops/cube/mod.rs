//! The GPU backends' kernels, written once in CubeCL for CUDA and wgpu, and the bridge that runs
//! them inside Burn's fused streams.
//!
//! Both backends are `Fusion<CubeBackend<R, ..>>`: Burn queues tensor ops and fuses chains of
//! them before it launches anything. A kernel of ours enters that queue as one custom operation
//! (`custom`) whose inputs are resolved to CubeCL tensors when the queue reaches it, so fusion
//! still runs on both sides of it.

mod attention;
mod delta_rule;
mod nf4;
mod rowwise;

use std::marker::PhantomData;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{generic, AttnMask, DeltaScan, LoraParts, ModelBackend, Nf4Absmax, Nf4Parts};

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

impl<R, F, I, BT> ModelBackend for Fusion<Cube<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn device_memory_bytes(device: &Self::Device) -> Option<u64> {
        R::client(device)
            .memory_usage()
            .ok()
            .map(|u| u.bytes_reserved)
    }

    fn nf4_dequantize(w: Nf4Parts<Self>, dtype: DType) -> Option<FloatTensor<Self>> {
        let (shape, blocksize) = (w.shape, w.blocksize);
        let (offset, scales) = match w.absmax {
            Nf4Absmax::Plain(a) => (None, vec![a]),
            Nf4Absmax::Double {
                quantized,
                absmax2,
                offset,
            } => (Some(offset), vec![quantized, absmax2]),
        };
        let inputs = [w.packed, w.nf4_code, w.dynamic_map]
            .into_iter()
            .chain(scales)
            .collect();
        let [weight] = custom::<R, F, I, BT, 1>(
            "swift_rs.nf4_dequantize",
            inputs,
            [(Shape::new(shape), dtype)],
            move |mut t| {
                let scales = match offset {
                    None => nf4::Scales::Plain(t.pop().expect("absmax")),
                    Some(offset) => {
                        let absmax2 = t.pop().expect("absmax2");
                        let quantized = t.pop().expect("quantized");
                        nf4::Scales::Double {
                            quantized,
                            absmax2,
                            offset,
                        }
                    }
                };
                let [packed, code, dynamic_map] = take(t);
                [nf4::dequantize(
                    packed,
                    scales,
                    code,
                    dynamic_map,
                    shape,
                    blocksize,
                    dtype,
                )]
            },
        );
        Some(weight)
    }

    fn lora_linear_forward(
        x: FloatTensor<Self>,
        layer: LoraParts<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if layer.lora_b.dtype() != DType::F32 {
            return generic::lora_linear::<Self>(x, layer);
        }
        let lora_b = layer.lora_b.clone();
        let (base, h, shape) = generic::lora_base_and_hidden::<Self>(x, layer);
        let output = [(base.shape(), base.dtype())];
        let inputs = vec![base, h.clone(), lora_b];
        let [y] = custom::<R, F, I, BT, 1>("swift_rs.lora_sum", inputs, output, |t| {
            let [base, h, lora_b] = take(t);
            [rowwise::lora_sum(base, h, lora_b)]
        });
        (Self::float_reshape(y, shape), h)
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // The kernel reads a table row per (batch, position) of x.
        let rows = |t: &FloatTensor<Self>| [t.shape()[0], t.shape()[1]];
        if !same_dtype(&[&x, &cos, &sin]) || rows(&cos) != rows(&x) || rows(&sin) != rows(&x) {
            return generic::rope::<Self>(x, cos, sin);
        }
        let output = [(x.shape(), x.dtype())];
        let [out] = custom::<R, F, I, BT, 1>("swift_rs.rope", vec![x, cos, sin], output, |t| {
            let [x, cos, sin] = take(t);
            [rowwise::rope(x, cos, sin)]
        });
        out
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        if !same_dtype(&[&gate, &up]) {
            return generic::swiglu::<Self>(gate, up);
        }
        let output = [(gate.shape(), gate.dtype())];
        let [out] = custom::<R, F, I, BT, 1>("swift_rs.swiglu", vec![gate, up], output, |t| {
            let [gate, up] = take(t);
            [rowwise::swiglu(gate, up)]
        });
        out
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        if !same_dtype(&[&gate, &up, &grad]) {
            return generic::swiglu_backward::<Self>(gate, up, grad);
        }
        let outputs = [(gate.shape(), gate.dtype()), (gate.shape(), gate.dtype())];
        let inputs = vec![gate, up, grad];
        custom::<R, F, I, BT, 2>("swift_rs.swiglu_backward", inputs, outputs, |t| {
            let [gate, up, grad] = take(t);
            rowwise::swiglu_backward(gate, up, grad)
        })
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        if !same_dtype(&[&x, &weight]) {
            return generic::rms_norm::<Self>(x, weight, eps);
        }
        let shape = x.shape();
        let x = generic::rows::<Self>(x).into_primitive().tensor();
        let output = [(x.shape(), x.dtype())];
        let [out] =
            custom::<R, F, I, BT, 1>("swift_rs.rms_norm", vec![x, weight], output, move |t| {
                let [x, weight] = take(t);
                [rowwise::rms_norm(x, weight, eps)]
            });
        Self::float_reshape(out, shape)
    }

    /// The weight's gradient (a sum over rows; frozen norms need none) takes the generic path.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        grad: FloatTensor<Self>,
        weight_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if weight_grad || !same_dtype(&[&x, &weight, &grad]) {
            return generic::rms_norm_backward::<Self>(x, weight, eps, grad, weight_grad);
        }
        let shape = x.shape();
        let [x, grad] = [x, grad].map(|t| generic::rows::<Self>(t).into_primitive().tensor());
        let output = [(x.shape(), x.dtype())];
        let inputs = vec![x, weight, grad];
        let [dx] =
            custom::<R, F, I, BT, 1>("swift_rs.rms_norm_backward", inputs, output, move |t| {
                let [x, weight, grad] = take(t);
                [rowwise::rms_norm_backward(x, weight, eps, grad)]
            });
        (Self::float_reshape(dx, shape), None)
    }

    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if targets.dtype() != DType::I32 {
            return generic::cross_entropy::<Self>(logits, targets);
        }
        let rows = Shape::new([logits.shape()[0]]);
        let outputs = [(rows.clone(), DType::F32), (rows, DType::F32)];
        let inputs = vec![logits, targets];
        let [loss, lse] =
            custom::<R, F, I, BT, 2>("swift_rs.cross_entropy", inputs, outputs, |t| {
                let [logits, targets] = take(t);
                rowwise::cross_entropy(logits, targets)
            });
        (loss, lse)
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if targets.dtype() != DType::I32 || grad.dtype() != DType::F32 {
            return generic::cross_entropy_backward::<Self>(logits, targets, lse, grad);
        }
        let output = [(logits.shape(), logits.dtype())];
        let inputs = vec![logits, targets, lse, grad];
        let [d_logits] =
            custom::<R, F, I, BT, 1>("swift_rs.cross_entropy_backward", inputs, output, |t| {
                let [logits, targets, lse, grad] = take(t);
                [rowwise::cross_entropy_backward(logits, targets, lse, grad)]
            });
        d_logits
    }

    fn delta_rule_scan(scan: DeltaScan<Self>) -> [FloatTensor<Self>; 3] {
        let [b, h, n, c, dk] = scan.pull.shape()[..] else {
            unreachable!("pull is [b, h, n, c, dk]")
        };
        let dv = scan.base.shape()[4];
        let mut tensors = vec![&scan.pull, &scan.push, &scan.base, &scan.decay, &scan.state];
        tensors.extend(&scan.add);
        let f32_only = tensors.iter().all(|t| t.dtype() == DType::F32);
        if !f32_only || c > delta_rule::MAX_CHUNK || dk > delta_rule::MAX_KEY_DIM {
            return generic::delta_rule_scan::<Self>(scan);
        }
        let outputs = [
            Shape::new([b, h, n, c, dv]),
            Shape::new([b, h, n, dk, dv]),
            Shape::new([b, h, dk, dv]),
        ]
        .map(|shape| (shape, DType::F32));
        let DeltaScan {
            pull,
            push,
            base,
            add,
            decay,
            state,
            backward,
        } = scan;
        let added = add.is_some();
        let inputs = [pull, push, base, decay, state]
            .into_iter()
            .chain(add)
            .collect();
        custom::<R, F, I, BT, 3>("swift_rs.delta_rule_scan", inputs, outputs, move |mut t| {
            let add = added.then(|| t.pop().expect("add"));
            let [pull, push, base, decay, state] = take(t);
            delta_rule::scan(pull, push, base, add, decay, state, backward)
        })
    }

    fn sdpa_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: AttnMask<Self>,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let Some((ids, window)) = kernel_mask(&mask, &q) else {
            return (generic::sdpa::<Self>(q, k, v, mask), None);
        };
        let [b, h, s, _] = dims(&q);
        let outputs = [(q.shape(), q.dtype()), (Shape::new([b, h, s]), DType::F32)];
        let masked = ids.is_some();
        let inputs = [q, k, v].into_iter().chain(ids).collect();
        let [out, lse] = custom::<R, F, I, BT, 2>(
            "swift_rs.attention_forward",
            inputs,
            outputs,
            move |mut t| {
                let ids = masked.then(|| t.pop().expect("ids"));
                let [q, k, v] = take(t);
                let (out, lse) = attention::forward(q, k, v, ids, window);
                [out, lse]
            },
        );
        (out, Some(lse))
    }

    fn sdpa_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: AttnMask<Self>,
        out: FloatTensor<Self>,
        saved: Option<FloatTensor<Self>>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        let (Some(lse), Some((ids, window))) = (saved, kernel_mask(&mask, &q)) else {
            return generic::sdpa_grads::<Self>(q, k, v, mask, out, d_out);
        };
        // delta = rowsum(d_out ⊙ out) in f32, queued with the ops before it.
        let [b, h, s, _] = dims(&q);
        let delta = (generic::in_f32::<Self>(d_out.clone()) * generic::in_f32::<Self>(out))
            .sum_dim(3)
            .reshape([b, h, s]);
        let delta = delta.into_primitive().tensor();
        let outputs = [&q, &k, &v].map(|t| (t.shape(), t.dtype()));
        let masked = ids.is_some();
        let inputs = [q, k, v, lse, delta, d_out]
            .into_iter()
            .chain(ids)
            .collect();
        custom::<R, F, I, BT, 3>(
            "swift_rs.attention_backward",
            inputs,
            outputs,
            move |mut t| {
                let ids = masked.then(|| t.pop().expect("ids"));
                let [q, k, v, lse, delta, d_out] = take(t);
                attention::backward(q, k, v, ids, window, lse, delta, d_out)
            },
        )
    }
}

/// What the attention kernels take of `mask`: the token ids (None: plain causal) and the window;
/// None when they do not apply (a mask given whole, a query that sees every key, a head_dim
/// past their registers) and the generic path runs.
#[allow(clippy::type_complexity)]
fn kernel_mask<R: CubeRuntime>(
    mask: &AttnMask<impl Backend<IntTensorPrimitive = FusionTensor<FusionCubeRuntime<R>>>>,
    q: &FusionTensor<FusionCubeRuntime<R>>,
) -> Option<(Option<FusionTensor<FusionCubeRuntime<R>>>, Option<usize>)> {
    if q.shape()[3] > attention::MAX_HEAD_DIM {
        return None;
    }
    match mask {
        AttnMask::Causal => Some((None, None)),
        AttnMask::Tokens { ids, window } => Some((Some(ids.clone()), *window)),
        AttnMask::All | AttnMask::Dense(_) => None,
    }
}

/// Whether the tensors share a dtype (the kernels read them all as one element type).
fn same_dtype<T: TensorMetadata>(tensors: &[&T]) -> bool {
    tensors.iter().all(|t| t.dtype() == tensors[0].dtype())
}

fn dims<T: TensorMetadata>(t: &T) -> [usize; 4] {
    let shape = t.shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

/// The `N` tensors of `t`, in order.
fn take<T: std::fmt::Debug, const N: usize>(t: Vec<T>) -> [T; N] {
    t.try_into().expect("the inputs the op was queued with")
}

type Run<R, const N: usize> = Arc<dyn Fn(Vec<CubeTensor<R>>) -> [CubeTensor<R>; N] + Send + Sync>;

/// Queues `run` as one operation of `inputs`' fusion stream: it gets their CubeCL tensors, in
/// order, and returns the `outputs` (shape, dtype) it promised.
fn custom<R, F, I, BT, const N: usize>(
    name: &'static str,
    inputs: Vec<FusionTensor<FusionCubeRuntime<R>>>,
    outputs: [(Shape, DType); N],
    run: impl Fn(Vec<CubeTensor<R>>) -> [CubeTensor<R>; N] + Send + Sync + 'static,
) -> [FusionTensor<FusionCubeRuntime<R>>; N]
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(&inputs);
    let outputs =
        outputs.map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype));
    let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    let op = CustomOp::<R, F, I, BT, N> {
        desc: desc.clone(),
        run: Arc::new(run),
        _backend: PhantomData,
    };
    let outputs: Vec<_> = client.register(streams, OperationIr::Custom(desc), op);
    take(outputs)
}

/// `run` as a fusion operation of the backend `Cube<R, F, I, BT>`.
struct CustomOp<R, F, I, BT, const N: usize>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    desc: CustomOpIr,
    run: Run<R, N>,
    _backend: PhantomData<Cube<R, F, I, BT>>,
}

impl<R, F, I, BT, const N: usize> std::fmt::Debug for CustomOp<R, F, I, BT, N>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.desc.id)
    }
}

impl<R, F, I, BT, const N: usize> Operation<FusionCubeRuntime<R>> for CustomOp<R, F, I, BT, N>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn execute(
        &self,
        handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = self
            .desc
            .inputs
            .iter()
            .map(|t| handles.get_float_tensor::<Cube<R, F, I, BT>>(t))
            .collect();
        for (ir, out) in self.desc.outputs.iter().zip((self.run)(inputs)) {
            handles.register_float_tensor::<Cube<R, F, I, BT>>(&ir.id, out);
        }
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests;
