//! `ModelBackend` for Flex: f32 runs the kernels here, other dtypes the generic path.

mod attention;
mod elementwise;

use burn::backend::Flex;
use burn::tensor::ops::{BoolTensor, FloatTensor, IntTensor};
use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;

use super::{
    generic_cross_entropy, generic_cross_entropy_backward, generic_rms_norm,
    generic_rms_norm_backward, generic_rope, generic_sdpa, generic_sdpa_grads, generic_swiglu,
    generic_swiglu_backward, ModelBackend,
};

/// Whether every tensor is f32 (the kernels' dtype).
fn all_f32(tensors: &[&FlexTensor]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32)
}

/// The targets of `cross_entropy` as indices.
fn indices(targets: IntTensor<Flex>) -> Vec<usize> {
    let data = targets.into_data().convert::<i64>();
    let ids = data.as_slice::<i64>().expect("converted to i64");
    ids.iter().map(|&id| id as usize).collect()
}

/// A flat tensor holding `data`.
fn vector(data: Vec<f32>) -> FlexTensor {
    let n = data.len();
    FlexTensor::from_data(TensorData::new(data, [n]))
}

/// A tensor of `t`'s shape holding `data`.
fn like(t: &FlexTensor, data: Vec<f32>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, t.layout().shape().clone()))
}

impl ModelBackend for Flex {
    fn sdpa_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        is_causal: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if !all_f32(&[&q, &k, &v]) {
            return (generic_sdpa::<Self>(q, k, v, mask, is_causal), None);
        }
        let (out, lse) = attention::forward(q, k, v, mask, is_causal);
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
            Some(lse) => attention::backward(q, k, v, mask, is_causal, out, lse, d_out),
            None => generic_sdpa_grads::<Self>(q, k, v, mask, is_causal, out, d_out),
        }
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if !all_f32(&[&x, &cos, &sin]) {
            return generic_rope::<Self>(x, cos, sin);
        }
        let shape = x.layout().shape().clone();
        let (heads, dim) = (shape[2], shape[3]);
        let (x, cos, sin) = (x.to_contiguous(), cos.to_contiguous(), sin.to_contiguous());
        let out = elementwise::rope(x.storage(), cos.storage(), sin.storage(), heads, dim);
        like(&x, out)
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        if !all_f32(&[&gate, &up]) {
            return generic_swiglu::<Self>(gate, up);
        }
        let (gate, up) = (gate.to_contiguous(), up.to_contiguous());
        like(&gate, elementwise::swiglu(gate.storage(), up.storage()))
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        if !all_f32(&[&gate, &up, &grad]) {
            return generic_swiglu_backward::<Self>(gate, up, grad);
        }
        let (gate, up, grad) = (
            gate.to_contiguous(),
            up.to_contiguous(),
            grad.to_contiguous(),
        );
        let (d_gate, d_up) =
            elementwise::swiglu_backward(gate.storage(), up.storage(), grad.storage());
        [like(&gate, d_gate), like(&gate, d_up)]
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        if !all_f32(&[&x, &weight]) {
            return generic_rms_norm::<Self>(x, weight, eps);
        }
        let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
        like(
            &x,
            elementwise::rms_norm(x.storage(), weight.storage(), eps as f32),
        )
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        grad: FloatTensor<Self>,
        weight_grad: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if !all_f32(&[&x, &weight, &grad]) {
            return generic_rms_norm_backward::<Self>(x, weight, eps, grad, weight_grad);
        }
        let (x, weight, grad) = (
            x.to_contiguous(),
            weight.to_contiguous(),
            grad.to_contiguous(),
        );
        let (dx, dw) = elementwise::rms_norm_backward(
            x.storage(),
            weight.storage(),
            eps as f32,
            grad.storage(),
            weight_grad,
        );
        (like(&x, dx), dw.map(|dw| like(&weight, dw)))
    }

    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&logits]) {
            return generic_cross_entropy::<Self>(logits, targets);
        }
        let logits = logits.to_contiguous();
        let vocab = logits.layout().shape()[1];
        let (loss, lse) = elementwise::cross_entropy(logits.storage(), &indices(targets), vocab);
        (vector(loss), vector(lse))
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if !all_f32(&[&logits, &grad]) {
            return generic_cross_entropy_backward::<Self>(logits, targets, lse, grad);
        }
        let (logits, lse, grad) = (
            logits.to_contiguous(),
            lse.to_contiguous(),
            grad.to_contiguous(),
        );
        let vocab = logits.layout().shape()[1];
        let d = elementwise::cross_entropy_backward(
            logits.storage(),
            &indices(targets),
            lse.storage(),
            grad.storage(),
            vocab,
        );
        like(&logits, d)
    }
}
