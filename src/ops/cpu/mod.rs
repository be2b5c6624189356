//! `ModelBackend` for Flex: f32 runs the kernels here, other dtypes the generic path.

mod attention;
mod delta_rule;
mod elementwise;
mod lora;

use burn::backend::Flex;
use burn::tensor::ops::{BoolTensor, FloatTensor, IntTensor};
use burn::tensor::{DType, TensorData, TensorMetadata};
use burn_flex::FlexTensor;

use super::{generic, AttnMask, LoraGrads, LoraParts, ModelBackend, RowsAdapter};

/// `mask` as the attention kernel takes it: a dense mask and whether to add the causal one.
fn dense(mask: AttnMask<Flex>, q: &FlexTensor) -> (Option<BoolTensor<Flex>>, bool) {
    let (mask, is_causal) = generic::dense_mask(mask, q.shape()[2]);
    (mask.map(|m| m.into_primitive()), is_causal)
}

/// Whether every tensor is f32 (the kernels' dtype).
fn all_f32(tensors: &[&FlexTensor]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32)
}

/// The layer's tensors made contiguous, when every one is f32 (else None: the generic path).
fn contiguous_f32(layer: &LoraParts<Flex>) -> Option<LoraParts<Flex>> {
    let mut tensors = vec![&layer.weight, &layer.lora_a, &layer.lora_b];
    tensors.extend(&layer.bias);
    all_f32(&tensors).then(|| LoraParts {
        weight: layer.weight.to_contiguous(),
        bias: layer.bias.as_ref().map(FlexTensor::to_contiguous),
        lora_a: layer.lora_a.to_contiguous(),
        lora_b: layer.lora_b.to_contiguous(),
        scaling: layer.scaling,
    })
}

/// The kernel's view of a layer from `contiguous_f32`.
fn kernel_layer(layer: &LoraParts<Flex>) -> lora::Layer<'_> {
    let a_shape = layer.lora_a.layout().shape();
    lora::Layer {
        weight: layer.weight.storage(),
        bias: layer.bias.as_ref().map(FlexTensor::storage),
        lora_a: layer.lora_a.storage(),
        lora_b: layer.lora_b.storage(),
        scaling: layer.scaling as f32,
        in_features: a_shape[0],
        rank: a_shape[1],
    }
}

/// The delta rule kernel's sizes for its prepared inputs (`[q, k, v, g, beta]`, q
/// `[batch, heads, seq, dk]`, v `[batch, heads, seq, dv]`).
fn delta_rule_dims(x: &[FlexTensor; 5]) -> delta_rule::Dims {
    let [b, h, s, dk] = x[0].layout().shape()[..] else {
        unreachable!("q is [batch, heads, seq, dk]")
    };
    delta_rule::Dims {
        tasks: b * h,
        s,
        dk,
        dv: x[2].layout().shape()[3],
        c: generic::delta_rule_chunk(s),
    }
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

/// A 2-d f32 tensor read in place, when it is contiguous or the transpose of a contiguous one
/// (as a tied lm_head reads the embedding).
fn matrix(t: &FlexTensor) -> Option<lora::Mat<'_>> {
    let layout = t.layout();
    let [rows, cols] = [layout.shape()[0], layout.shape()[1]];
    let whole = layout.start_offset() == 0 && t.storage::<f32>().len() == rows * cols;
    if whole && layout.is_contiguous() {
        Some(lora::Mat::new(t.storage(), rows, cols))
    } else if whole && layout.strides() == [1, rows as isize] {
        Some(lora::Mat::new(t.storage(), cols, rows).t())
    } else {
        None
    }
}

impl ModelBackend for Flex {
    const RECOMPUTE_LOGITS: bool = false;

    fn base_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        let mut tensors = vec![&x, &weight];
        tensors.extend(&bias);
        if !all_f32(&tensors) {
            return generic::linear::<Self>(x, weight, bias);
        }
        let weight = match matrix(&weight) {
            Some(_) => weight,
            None => weight.to_contiguous(),
        };
        let w = matrix(&weight).expect("contiguous");
        let (x, bias) = (x.to_contiguous(), bias.map(|b| b.to_contiguous()));
        let rows = x.layout().num_elements() / w.rows;
        let y = lora::linear(
            lora::Mat::new(x.storage(), rows, w.rows),
            w,
            bias.as_ref().map(FlexTensor::storage),
        );
        let shape = super::with_last_dim(x.layout().shape(), w.cols);
        FlexTensor::from_data(TensorData::new(y, shape))
    }

    fn lora_linear_forward(
        x: FloatTensor<Self>,
        layer: LoraParts<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let Some(parts) = contiguous_f32(&layer).filter(|_| all_f32(&[&x])) else {
            return generic::lora_linear::<Self>(x, layer);
        };
        let x = x.to_contiguous();
        let l = kernel_layer(&parts);
        let (y, h) = lora::forward(x.storage(), &l);
        let n_out = layer.weight.layout().shape()[1];
        let shape = super::with_last_dim(x.layout().shape(), n_out);
        let rows = h.len() / l.rank;
        (
            FlexTensor::from_data(TensorData::new(y, shape)),
            FlexTensor::from_data(TensorData::new(h, [rows, l.rank])),
        )
    }

    fn lora_add(
        base: FloatTensor<Self>,
        x: FloatTensor<Self>,
        adapters: Vec<RowsAdapter<Self>>,
    ) -> FloatTensor<Self> {
        let mut tensors = vec![&base, &x];
        tensors.extend(adapters.iter().flat_map(|a| [&a.lora_a, &a.lora_b]));
        if !all_f32(&tensors) {
            return generic::lora_add::<Self>(base, x, adapters);
        }
        let (base, x) = (base.to_contiguous(), x.to_contiguous());
        let batch = base.layout().shape()[0];
        let mut y = base.storage::<f32>().to_vec();
        let x_all: &[f32] = x.storage();
        let (y_row, x_row) = (y.len() / batch, x_all.len() / batch);
        for a in &adapters {
            let (lora_a, lora_b) = (a.lora_a.to_contiguous(), a.lora_b.to_contiguous());
            let a_shape = lora_a.layout().shape();
            let adapter = lora::Adapter {
                lora_a: lora_a.storage(),
                lora_b: lora_b.storage(),
                scaling: a.scaling as f32,
                in_features: a_shape[0],
                rank: a_shape[1],
            };
            // The adapter's rows gathered, updated as one block, and put back.
            let gather = |all: &[f32], width: usize| -> Vec<f32> {
                a.rows
                    .iter()
                    .flat_map(|&r| &all[r * width..(r + 1) * width])
                    .copied()
                    .collect()
            };
            let x_rows = gather(x_all, x_row);
            let mut y_rows = gather(&y, y_row);
            lora::add_update(&mut y_rows, &x_rows, &adapter);
            for (&r, row) in a.rows.iter().zip(y_rows.chunks_exact(y_row)) {
                y[r * y_row..(r + 1) * y_row].copy_from_slice(row);
            }
        }
        like(&base, y)
    }

    fn lora_linear_backward(
        x: FloatTensor<Self>,
        layer: LoraParts<Self>,
        h: Option<FloatTensor<Self>>,
        grad: FloatTensor<Self>,
        x_grad: bool,
    ) -> LoraGrads<Self> {
        let mut tensors = vec![&x, &grad];
        tensors.extend(&h);
        let Some(parts) = contiguous_f32(&layer).filter(|_| all_f32(&tensors)) else {
            return generic::lora_linear_backward::<Self>(x, layer, h, grad, x_grad);
        };
        let (x, grad) = (x.to_contiguous(), grad.to_contiguous());
        let h = h.map(|h| h.to_contiguous());
        let l = kernel_layer(&parts);
        let h = h.as_ref().map(FlexTensor::storage);
        let (dx, da, db) = lora::backward(x.storage(), &l, h, grad.storage(), x_grad);
        (
            dx.map(|dx| like(&x, dx)),
            like(&parts.lora_a, da),
            like(&parts.lora_b, db),
        )
    }

    fn sdpa_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: AttnMask<Self>,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if !all_f32(&[&q, &k, &v]) {
            return (generic::sdpa::<Self>(q, k, v, mask), None);
        }
        let (mask, is_causal) = dense(mask, &q);
        let (out, lse) = attention::forward(q, k, v, mask, is_causal);
        (out, Some(lse))
    }

    fn delta_rule_forward(
        x: [FloatTensor<Self>; 5],
        state: Option<FloatTensor<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let mut tensors: Vec<_> = x.iter().collect();
        tensors.extend(&state);
        if !all_f32(&tensors) {
            return generic::delta_rule_forward::<Self>(x, state);
        }
        let x = x.map(|t| t.to_contiguous());
        let state = state.map(|t| t.to_contiguous());
        let dims = delta_rule_dims(&x);
        let [b, h, s, dk] = x[0].layout().shape()[..] else {
            unreachable!("q is [batch, heads, seq, dk]")
        };
        let (dv, c) = (dims.dv, dims.c);
        let inputs = [0, 1, 2, 3, 4].map(|i| x[i].storage::<f32>());
        let (out, last, entering) =
            delta_rule::forward(inputs, state.as_ref().map(FlexTensor::storage), &dims);
        let tensor =
            |data: Vec<f32>, shape: Vec<usize>| FlexTensor::from_data(TensorData::new(data, shape));
        (
            tensor(out, vec![b, h, s, dv]),
            tensor(last, vec![b, h, dk, dv]),
            tensor(entering, vec![b, h, s.div_ceil(c), dk, dv]),
        )
    }

    fn delta_rule_backward(
        x: [FloatTensor<Self>; 5],
        entering: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 5] {
        let mut tensors: Vec<_> = x.iter().collect();
        tensors.extend([&entering, &d_out]);
        if !all_f32(&tensors) {
            return generic::delta_rule_backward::<Self>(x, entering, d_out);
        }
        let x = x.map(|t| t.to_contiguous());
        let (entering, d_out) = (entering.to_contiguous(), d_out.to_contiguous());
        let dims = delta_rule_dims(&x);
        let inputs = [0, 1, 2, 3, 4].map(|i| x[i].storage::<f32>());
        let grads = delta_rule::backward(inputs, entering.storage(), d_out.storage(), &dims);
        let mut x = x.into_iter();
        grads.map(|g| like(&x.next().expect("five inputs"), g))
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
        match saved {
            Some(lse) => {
                let (mask, is_causal) = dense(mask, &q);
                attention::backward(q, k, v, mask, is_causal, out, lse, d_out)
            }
            None => generic::sdpa_grads::<Self>(q, k, v, mask, out, d_out),
        }
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if !all_f32(&[&x, &cos, &sin]) {
            return generic::rope::<Self>(x, cos, sin);
        }
        let shape = x.layout().shape().clone();
        let (heads, dim) = (shape[2], shape[3]);
        let (x, cos, sin) = (x.to_contiguous(), cos.to_contiguous(), sin.to_contiguous());
        let out = elementwise::rope(x.storage(), cos.storage(), sin.storage(), heads, dim);
        like(&x, out)
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        if !all_f32(&[&gate, &up]) {
            return generic::swiglu::<Self>(gate, up);
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
            return generic::swiglu_backward::<Self>(gate, up, grad);
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
            return generic::rms_norm::<Self>(x, weight, eps);
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
            return generic::rms_norm_backward::<Self>(x, weight, eps, grad, weight_grad);
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
            return generic::cross_entropy::<Self>(logits, targets);
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
            return generic::cross_entropy_backward::<Self>(logits, targets, lse, grad);
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
