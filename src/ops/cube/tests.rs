//! The kernels against the generic path on the same device (Mesa's lavapipe in CI), forward and
//! backward, on shapes that do not divide into blocks and masks of every kind.

use burn::backend::wgpu::WgpuDevice;
use burn::backend::{Autodiff, Wgpu};
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{
    DType, Distribution, Int, Shape, Tensor, TensorData, TensorMetadata, Tolerance,
};

use super::super::{float, generic, primitive, sdpa, AttnMask, DeltaScan, LoraParts, ModelBackend};
use crate::ops::test_gpu as gpu;

type Ad = Autodiff<Wgpu>;

/// Token ids `[3, batch, s]` (real, sample, position) of `rows`, each a list of
/// `(padding, sample lengths)`: left padding, then packed samples whose positions restart.
fn ids(rows: &[(usize, &[usize])], s: usize, device: &WgpuDevice) -> Tensor<Wgpu, 3, Int> {
    let (mut real, mut segment, mut position) = (vec![], vec![], vec![]);
    for (pad, samples) in rows {
        real.extend(std::iter::repeat_n(0, *pad));
        segment.extend(std::iter::repeat_n(0, *pad));
        position.extend(std::iter::repeat_n(0, *pad));
        for (i, &len) in samples.iter().enumerate() {
            real.extend(std::iter::repeat_n(1, len));
            segment.extend(std::iter::repeat_n(i as i32, len));
            position.extend(0..len as i32);
        }
        assert_eq!(real.len() % s, 0, "a row of {s} tokens");
    }
    let data: Vec<i32> = real.into_iter().chain(segment).chain(position).collect();
    let b = rows.len();
    Tensor::from_data(TensorData::new(data, [3, b, s]), (device, DType::I32))
}

/// `sum(sdpa(q, k, v) * w)`'s output and `[dq, dk, dv]` through the kernels (autodiff over
/// `ModelBackend::sdpa`) against the generic forward and backward passes.
fn check(heads: usize, kv_heads: usize, s: usize, d: usize, mask: impl Fn() -> AttnMask<Ad>) {
    check_in(DType::F32, heads, kv_heads, s, d, mask)
}

fn check_in(
    dtype: DType,
    heads: usize,
    kv_heads: usize,
    s: usize,
    d: usize,
    mask: impl Fn() -> AttnMask<Ad>,
) {
    let Some(device) = gpu() else { return };
    let b = 2;
    let rand = |shape: [usize; 4]| {
        Tensor::<Wgpu, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device).cast(dtype)
    };
    let (q, k, v, w) = (
        rand([b, heads, s, d]),
        rand([b, kv_heads, s, d]),
        rand([b, kv_heads, s, d]),
        rand([b, heads, s, d]),
    );
    let leaf = |t: &Tensor<Wgpu, 4>| Tensor::<Ad, 4>::from_inner(t.clone()).require_grad();
    let (lq, lk, lv) = (leaf(&q), leaf(&k), leaf(&v));
    let out = sdpa(lq.clone(), lk.clone(), lv.clone(), mask());
    let grads = (out.clone() * Tensor::from_inner(w.clone()))
        .sum()
        .backward();
    let kernel = [lq, lk, lv].map(|t| t.grad(&grads).expect("reached"));

    let inner = |m: AttnMask<Ad>| match m {
        AttnMask::Causal => AttnMask::<Wgpu>::Causal,
        AttnMask::Tokens { ids, window } => AttnMask::Tokens { ids, window },
        _ => unreachable!("the kernels' masks"),
    };
    let [pq, pk, pv, pw] = [&q, &k, &v, &w].map(|t| primitive(t.clone()));
    let want: Tensor<Wgpu, 4> = float(generic::sdpa::<Wgpu>(
        pq.clone(),
        pk.clone(),
        pv.clone(),
        inner(mask()),
    ));
    let generic =
        generic::sdpa_grads::<Wgpu>(pq, pk, pv, inner(mask()), primitive(want.clone()), pw);
    // f16: the two paths round the same f32 results to f16, at most an ulp apart.
    let tolerance = match dtype {
        DType::F16 => Tolerance::<f32>::absolute(2e-3).set_relative(2e-3),
        _ => Tolerance::<f32>::absolute(2e-5),
    };
    let f32_data = |t: Tensor<Wgpu, 4>| t.cast(DType::F32).into_data();
    assert_eq!(out.dtype(), dtype);
    f32_data(out.inner()).assert_approx_eq(&f32_data(want), tolerance);
    for (name, (got, want)) in ["dq", "dk", "dv"]
        .into_iter()
        .zip(kernel.into_iter().zip(generic))
    {
        let want: Tensor<Wgpu, 4> = float(want);
        eprintln!("{name}");
        got.into_data()
            .assert_approx_eq(&want.into_data(), tolerance);
    }
}

#[test]
fn causal_attention_with_grouped_heads_matches_the_generic_path() {
    // 37 queries: one block and a ragged one; two query heads a key/value head.
    check(4, 2, 37, 16, || AttnMask::Causal);
    // head_dim 64: blocks of 32 keys.
    check(2, 1, 45, 64, || AttnMask::Causal);
}

#[test]
fn padded_and_packed_rows_match_the_generic_path() {
    let Some(device) = gpu() else { return };
    // Row 0: 6 tokens of left padding (queries that see no key), then one sample; row 1: three
    // packed samples whose positions restart.
    let rows: [(usize, &[usize]); 2] = [(6, &[31]), (0, &[10, 20, 7])];
    let ids = ids(&rows, 37, &device).into_primitive();
    check(4, 2, 37, 16, || AttnMask::Tokens {
        ids: ids.clone(),
        window: None,
    });
}

#[test]
fn a_sliding_window_matches_the_generic_path() {
    let Some(device) = gpu() else { return };
    let rows: [(usize, &[usize]); 2] = [(3, &[34]), (0, &[20, 17])];
    let ids = ids(&rows, 37, &device).into_primitive();
    check(2, 2, 37, 16, || AttnMask::Tokens {
        ids: ids.clone(),
        window: Some(5),
    });
}

#[test]
fn f16_inputs_are_computed_in_f32_as_the_generic_path_does() {
    check_in(DType::F16, 4, 2, 37, 16, || AttnMask::Causal);
}

/// `t` as f32 data, for comparing across dtypes.
fn data(t: FloatTensor<Wgpu>) -> TensorData {
    float::<Wgpu, 1>(<Wgpu as FloatTensorOps<Wgpu>>::float_reshape(
        t.clone(),
        Shape::new([t.shape().num_elements()]),
    ))
    .cast(DType::F32)
    .into_data()
}

/// Each of `got` equal to `want`: to f32 rounding in f32, to an f16 rounding in f16.
fn close_all<const N: usize>(
    dtype: DType,
    got: [FloatTensor<Wgpu>; N],
    want: [FloatTensor<Wgpu>; N],
) {
    let tolerance = match dtype {
        DType::F16 => Tolerance::<f32>::absolute(2e-3).set_relative(2e-3),
        _ => Tolerance::<f32>::absolute(1e-5).set_relative(1e-5),
    };
    for (got, want) in got.into_iter().zip(want) {
        assert_eq!(got.dtype(), dtype);
        data(got).assert_approx_eq(&data(want), tolerance);
    }
}

#[test]
fn rope_swiglu_and_rms_norm_match_the_generic_path() {
    let Some(device) = gpu() else { return };
    let rand = |shape: Vec<usize>, dtype: DType| {
        let t = Tensor::<Wgpu, 1>::random(
            [shape.iter().product::<usize>()],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        <Wgpu as FloatTensorOps<Wgpu>>::float_reshape(primitive(t.cast(dtype)), Shape::from(shape))
    };
    for dtype in [DType::F32, DType::F16] {
        // RoPE on [2, 37, 3, 16] with per-row tables, and its backward (-sin).
        let (x, cos, sin) = (
            rand(vec![2, 37, 3, 16], dtype),
            rand(vec![2, 37, 1, 16], dtype),
            rand(vec![2, 37, 1, 16], dtype),
        );
        close_all(
            dtype,
            [<Wgpu as ModelBackend>::rope(
                x.clone(),
                cos.clone(),
                sin.clone(),
            )],
            [generic::rope::<Wgpu>(x, cos, sin)],
        );
        // SwiGLU on an odd size.
        let (gate, up, grad) = (
            rand(vec![5, 77], dtype),
            rand(vec![5, 77], dtype),
            rand(vec![5, 77], dtype),
        );
        close_all(
            dtype,
            [<Wgpu as ModelBackend>::swiglu(gate.clone(), up.clone())],
            [generic::swiglu::<Wgpu>(gate.clone(), up.clone())],
        );
        close_all(
            dtype,
            <Wgpu as ModelBackend>::swiglu_backward(gate.clone(), up.clone(), grad.clone()),
            generic::swiglu_backward::<Wgpu>(gate, up, grad),
        );
        // RMSNorm over rows of 150 (more than a cube's units, not a power of two).
        let (x, weight, grad) = (
            rand(vec![2, 37, 150], dtype),
            rand(vec![150], dtype),
            rand(vec![2, 37, 150], dtype),
        );
        close_all(
            dtype,
            [<Wgpu as ModelBackend>::rms_norm(
                x.clone(),
                weight.clone(),
                1e-6,
            )],
            [generic::rms_norm::<Wgpu>(x.clone(), weight.clone(), 1e-6)],
        );
        let (dx, _) = <Wgpu as ModelBackend>::rms_norm_backward(
            x.clone(),
            weight.clone(),
            1e-6,
            grad.clone(),
            false,
        );
        let (want, _) = generic::rms_norm_backward::<Wgpu>(x, weight, 1e-6, grad, false);
        close_all(dtype, [dx], [want]);
    }
}

#[test]
fn the_cross_entropy_matches_the_generic_path() {
    let Some(device) = gpu() else { return };
    // 7 rows of a vocabulary of 1000 (not a multiple of a cube's units), targets anywhere.
    let targets: Vec<i32> = vec![0, 999, 17, 500, 3, 998, 64];
    let targets = || {
        Tensor::<Wgpu, 1, Int>::from_data(
            TensorData::new(targets.clone(), [7]),
            (&device, DType::I32),
        )
        .into_primitive()
    };
    let grad = primitive(Tensor::<Wgpu, 1>::random(
        [7],
        Distribution::Normal(0.0, 1.0),
        &device,
    ));
    for dtype in [DType::F32, DType::F16] {
        let logits = Tensor::<Wgpu, 2>::random([7, 1000], Distribution::Normal(0.0, 3.0), &device);
        let logits = primitive(logits.cast(dtype));
        let (loss, lse) = <Wgpu as ModelBackend>::cross_entropy_forward(logits.clone(), targets());
        let (want_loss, want_lse) = generic::cross_entropy::<Wgpu>(logits.clone(), targets());
        // Both are f32 whatever the logits' dtype.
        close_all(DType::F32, [loss, lse.clone()], [want_loss, want_lse]);
        let d = <Wgpu as ModelBackend>::cross_entropy_backward(
            logits.clone(),
            targets(),
            lse.clone(),
            grad.clone(),
        );
        let want = generic::cross_entropy_backward::<Wgpu>(logits, targets(), lse, grad.clone());
        close_all(dtype, [d], [want]);
    }
}

#[test]
fn the_lora_layer_matches_the_generic_path() {
    let Some(device) = gpu() else { return };
    let rand = |shape: [usize; 2]| {
        Tensor::<Wgpu, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device)
    };
    for dtype in [DType::F32, DType::F16] {
        // [3, 11, 40] rows into 37 outputs through rank 5, with a bias.
        let x = Tensor::<Wgpu, 3>::random([3, 11, 40], Distribution::Normal(0.0, 1.0), &device);
        let bias = Tensor::<Wgpu, 1>::random([37], Distribution::Normal(0.0, 1.0), &device);
        let layer = LoraParts::new(
            rand([40, 37]).cast(dtype),
            Some(bias.cast(dtype)),
            rand([40, 5]),
            rand([5, 37]),
            0.5,
        );
        let x = primitive(x.cast(dtype));
        let (y, h) = <Wgpu as ModelBackend>::lora_linear_forward(x.clone(), layer.clone());
        let (want_y, want_h) = generic::lora_linear::<Wgpu>(x, layer);
        assert_eq!(y.shape(), want_y.shape());
        close_all(dtype, [y], [want_y]);
        close_all(DType::F32, [h], [want_h]);
    }
}

/// `got` within `rel` of `want`'s largest magnitude (at least 1): sums whose order differs
/// between the kernel (one unit, in sequence) and the tensor ops (blocked matmuls).
fn near(name: &str, got: FloatTensor<Wgpu>, want: FloatTensor<Wgpu>, rel: f32) {
    assert_eq!(got.shape(), want.shape(), "{name}");
    let values = |t| data(t).to_vec::<f32>().expect("f32");
    let (got, want) = (values(got), values(want));
    let scale = want.iter().fold(1f32, |m, w| m.max(w.abs()));
    let d = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(d <= rel * scale, "{name}: max |diff| {d} of {scale}");
}

/// The delta rule's state through its chunks, by the kernel against the generic path's tensor
/// ops, forward and backward: chunks of 64 and of 4 (a short prompt), key dims of 16 and 128,
/// value dims that fill no cube (40, 8) and more than two (70).
#[test]
fn the_delta_rule_scan_matches_the_generic_path() {
    let Some(device) = gpu() else { return };
    let rand = |shape: &[usize], dist: Distribution| {
        let len: usize = shape.iter().product();
        let t = Tensor::<Wgpu, 1>::random([len], dist, &device)
            .into_primitive()
            .tensor();
        <Wgpu as FloatTensorOps<Wgpu>>::float_reshape(t, Shape::from(shape.to_vec()))
    };
    let b = 2;
    for (h, n, c, dk, dv) in [(3, 3, 64, 16, 40), (1, 1, 4, 128, 8), (2, 2, 64, 128, 70)] {
        // Keys of unit length and decays in (0, 1), as the rule's are.
        let key = Distribution::Normal(0.0, (dk as f64).powf(-0.5));
        for backward in [false, true] {
            let scan = DeltaScan {
                pull: rand(&[b, h, n, c, dk], key),
                push: rand(&[b, h, n, c, dk], key),
                base: rand(&[b, h, n, c, dv], Distribution::Normal(0.0, 1.0)),
                add: backward.then(|| rand(&[b, h, n, dk, dv], Distribution::Normal(0.0, 1.0))),
                decay: rand(&[b, h, n], Distribution::Uniform(0.0, 1.0)),
                state: rand(&[b, h, dk, dv], Distribution::Normal(0.0, 1.0)),
                backward,
            };
            let got = <Wgpu as ModelBackend>::delta_rule_scan(scan.clone());
            let want = generic::delta_rule_scan::<Wgpu>(scan);
            for ((name, got), want) in ["r", "before", "last"].into_iter().zip(got).zip(want) {
                near(
                    &format!("{name} ({n} x {c}, dk {dk}, dv {dv}, backward {backward})"),
                    got,
                    want,
                    1e-5,
                );
            }
        }
    }
}

/// The gated delta rule on the GPU (the scan kernel inside the chunked path) against the CPU's
/// (Flex's kernels, themselves tested against the rule token by token): training's path (one
/// tracked op from a zero state) with every input's gradient, and inference's (from a given
/// state) with the final state, over a ragged last chunk and a short one.
#[test]
fn the_delta_rule_on_the_gpu_matches_the_cpu() {
    use super::super::gated_delta_rule;
    use super::super::tests::delta_rule_inputs;
    use burn::backend::Flex;
    let Some(device) = gpu() else { return };
    let on_gpu = |p: FloatTensor<Flex>| -> FloatTensor<Wgpu> {
        let t: Tensor<Flex, 4> = float(p);
        primitive(Tensor::<Wgpu, 4>::from_data(t.into_data(), &device))
    };
    // Training's path on backend B: the output and the gradients of q, k, v, g and beta.
    fn train<B: ModelBackend>(
        [q, k, v, g, beta]: [Tensor<B, 4>; 5],
        w_out: Tensor<B, 4>,
    ) -> Vec<FloatTensor<B>> {
        let leaves =
            [q, k, v, g, beta].map(|t| Tensor::<Autodiff<B>, 4>::from_inner(t).require_grad());
        let [lq, lk, lv, lg, lb] = leaves.clone();
        let squeeze = |x: Tensor<Autodiff<B>, 4>| x.squeeze_dim::<3>(3);
        let (out, _) = gated_delta_rule(lq, lk, lv, squeeze(lg), squeeze(lb), None);
        let grads = (out.clone() * Tensor::from_inner(w_out)).sum().backward();
        let mut all = vec![primitive(out.inner())];
        all.extend(leaves.map(|t| primitive(t.grad(&grads).expect("reached"))));
        all
    }
    // Inference's: the output and the final state from a given state.
    fn infer<B: ModelBackend>([q, k, v, g, beta, state]: [Tensor<B, 4>; 6]) -> Vec<FloatTensor<B>> {
        let squeeze = |x: Tensor<B, 4>| x.squeeze_dim::<3>(3);
        let (out, last) = gated_delta_rule(q, k, v, squeeze(g), squeeze(beta), Some(state));
        vec![primitive(out), primitive(last)]
    }
    for s in [150, 3] {
        let inputs = delta_rule_inputs(s);
        let w_out = Tensor::<Flex, 4>::random(
            [2, s, 4, 6],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        );
        let gpu_of = |t: &Tensor<Flex, 4>| float::<Wgpu, 4>(on_gpu(primitive(t.clone())));
        let [q, k, v, g, beta, _] = inputs.clone();
        let cpu = train([q, k, v, g, beta], w_out.clone());
        let [q, k, v, g, beta, _] = inputs.each_ref().map(gpu_of);
        let got = train([q, k, v, g, beta], gpu_of(&w_out));
        let names = ["out", "dq", "dk", "dv", "dg", "dbeta"];
        for ((name, got), want) in names.into_iter().zip(got).zip(cpu) {
            near(&format!("{name}, s = {s}"), got, on_gpu(want), 1e-4);
        }
        let cpu = infer(inputs.clone());
        let got = infer(inputs.each_ref().map(gpu_of));
        for ((name, got), want) in ["out from a state", "final state"]
            .into_iter()
            .zip(got)
            .zip(cpu)
        {
            near(&format!("{name}, s = {s}"), got, on_gpu(want), 1e-4);
        }
    }
}

/// `ops::sum` gives the same bits every time on the same tensor. Burn's own `sum` adds with
/// atomics here: in 7 runs on lavapipe it gave two different last bits.
#[test]
fn a_sum_is_the_same_on_every_run() {
    let Some(device) = gpu() else { return };
    let t = Tensor::<Wgpu, 2>::random([1000, 1000], Distribution::Normal(0.0, 1.0), &device);
    let bits = |s: Tensor<Wgpu, 1>| s.into_data().to_vec::<f32>().unwrap()[0].to_bits();
    let first = bits(super::super::sum(t.clone()));
    for run in 1..8 {
        assert_eq!(bits(super::super::sum(t.clone())), first, "run {run}");
    }
}
