//! Each op against the generic path and Burn's unfused chain, differentiated op by op.

use super::generic;
use super::*;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Bool, DType, Distribution, TensorData, Tolerance};

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
    let [q, k, v, w] = inputs(heads, kv_heads, s, keys);
    let mask = mask.map(|bits| {
        Tensor::<Flex, 4, Bool>::from_data(TensorData::new(bits, [2, 1, s, keys]), &q.device())
            .into_primitive()
    });
    // The same mask for Flex and for Autodiff<Flex>, whose bool tensors are Flex's.
    let (mask_ad, mask) = match mask {
        Some(m) => (AttnMask::<Ad>::Dense(m.clone()), AttnMask::<Flex>::Dense(m)),
        None => (AttnMask::Causal, AttnMask::Causal),
    };
    let leaf = |t: &Tensor<Flex, 4>| Tensor::<Ad, 4>::from_inner(t.clone()).require_grad();
    let run = |ours: bool| {
        let (q, k, v) = (leaf(&q), leaf(&k), leaf(&v));
        let mask = mask_ad.clone();
        let out = if ours {
            sdpa(q.clone(), k.clone(), v.clone(), mask)
        } else {
            let [q, k, v] = [&q, &k, &v].map(|t| primitive(t.clone()));
            float(generic::sdpa::<Ad>(q, k, v, mask))
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
    let generic = generic::sdpa_grads::<Flex>(q, k, v, mask, out_, w).map(float);
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

/// Equal to f32 rounding: 1e-5 absolute, or relative for values that reach tens.
fn close<const D: usize>(a: Tensor<Flex, D>, b: &Tensor<Flex, D>) {
    a.into_data()
        .assert_approx_eq::<f32>(&b.clone().into_data(), Tolerance::rel_abs(1e-5, 1e-5));
}

/// `close` for a sum of `terms` products of order one, summed in another order than the
/// reference: its rounding error grows with the terms, not with the sum, which may cancel to
/// near zero (where a relative tolerance gives nothing). Bounded by terms x f32 epsilon x 4, a
/// product's size reaching about 4 for normal inputs.
fn close_sum<const D: usize>(a: Tensor<Flex, D>, b: &Tensor<Flex, D>, terms: usize) {
    let abs = terms as f64 * f64::from(f32::EPSILON) * 4.0;
    a.into_data()
        .assert_approx_eq::<f32>(&b.clone().into_data(), Tolerance::rel_abs(1e-5, abs));
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
    // 300 positions of 4 heads: several tasks; packed-style positions that restart. The tables
    // are `[b, s, 1, d]`, both halves of a head sharing the angles (as `model::rope` builds them).
    let [b, s, h, d] = [2, 300, 4, 16];
    let angles: Vec<f32> = (0..b)
        .flat_map(|row| (0..s).map(move |t| (t * (row + 1) % 257) as f32))
        .flat_map(|p| {
            let half = (0..d / 2).map(move |i| p / 10_000f32.powf(2.0 * i as f32 / d as f32));
            half.clone().chain(half)
        })
        .collect();
    let table = |f: fn(f32) -> f32| {
        let values = angles.iter().map(|&a| f(a)).collect::<Vec<_>>();
        Tensor::<Flex, 4>::from_data(TensorData::new(values, [b, s, 1, d]), &Default::default())
    };
    let (table_cos, table_sin) = (table(f32::cos), table(f32::sin));
    let (x, w) = (rand([b, s, h, d]), rand([b, s, h, d]));
    let (cos, sin) = (
        Tensor::from_inner(table_cos.clone()),
        Tensor::from_inner(table_sin.clone()),
    );
    let run = |ours: bool| {
        let x = leaf(&x);
        let out = if ours {
            rope(x.clone(), cos.clone(), sin.clone())
        } else {
            let [x, cos, sin] = [&x, &cos, &sin].map(|t| primitive(t.clone()));
            float(generic::rope::<Ad>(x, cos, sin))
        };
        let [dx] = grads(out.clone(), &w, [&x]);
        (out.inner(), dx)
    };
    let ((out, dx), (reference_out, reference_dx)) = (run(true), run(false));
    close(out, &reference_out);
    close(dx, &reference_dx);
    // The generic backward pass: rope of the gradient with -sin.
    close(
        float(generic::rope::<Flex>(
            primitive(w.clone()),
            primitive(table_cos),
            primitive(table_sin.neg()),
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
            float(generic::swiglu::<Ad>(
                primitive(g.clone()),
                primitive(u.clone()),
            ))
        };
        let [dg, du] = grads(out.clone(), &w, [&g, &u]);
        (out.inner(), [dg, du])
    };
    let ((out, kernel), (reference_out, reference)) = (run(true), run(false));
    close(out, &reference_out);
    let generic = generic::swiglu_backward::<Flex>(primitive(gate), primitive(up), primitive(w));
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
            float(generic::rms_norm::<Ad>(
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
    close_sum(dw, &reference_dw, 200);
    let (generic_dx, generic_dw) = generic::rms_norm_backward::<Flex>(
        primitive(x),
        primitive(weight),
        eps,
        primitive(w),
        true,
    );
    close(float::<Flex, 3>(generic_dx), &reference_dx);
    close_sum(
        float::<Flex, 1>(generic_dw.expect("asked")),
        &reference_dw,
        200,
    );
}

/// Gated DeltaNet's convolution from a zero state (training's case) as one op, against the
/// generic path differentiated op by op: a kernel of 4 over 70 positions, and a sequence
/// shorter than the kernel; in f32 and in bf16 (the gradient rounded once, as the chain's is
/// at its end).
#[test]
fn causal_conv1d_matches_the_unfused_chain() {
    for (s, dtype) in [(70, DType::F32), (2, DType::F32), (70, DType::BF16)] {
        let (x, weight, w) = (rand([2, s, 24]), rand([24, 4]), rand([2, s, 24]));
        let run = |ours: bool| {
            let x = leaf(&x.clone().cast(dtype));
            let weight = Tensor::<Ad, 2>::from_inner(weight.clone());
            let (out, next) = match ours {
                true => causal_conv1d(x.clone(), weight, None),
                false => {
                    let (out, next) =
                        generic::causal_conv1d::<Ad>(primitive(x.clone()), primitive(weight), None);
                    (float(out), float(next))
                }
            };
            let [dx] = grads(out.clone().cast(DType::F32), &w, [&x]);
            let f32 = |t: Tensor<Flex, 3>| t.cast(DType::F32);
            (f32(out.inner()), f32(next.inner()), f32(dx))
        };
        let ((out, next, dx), (want_out, want_next, want_dx)) = (run(true), run(false));
        assert_eq!(out.to_data(), want_out.to_data(), "s = {s}, {dtype:?}");
        assert_eq!(next.to_data(), want_next.to_data(), "s = {s}, {dtype:?}");
        match dtype {
            DType::F32 => close(dx, &want_dx),
            // The chain rounds each tap's product to bf16 on its way back; the op sums in f32.
            _ => dx
                .into_data()
                .assert_approx_eq::<f32>(&want_dx.into_data(), Tolerance::rel_abs(1e-2, 1e-2)),
        }
    }
}

/// The gated norm as one op against the generic path differentiated op by op: x's and the
/// gate's gradients, gates large enough that silu saturates.
#[test]
fn gated_rms_norm_matches_the_unfused_chain() {
    let (x, gate, weight, w) = (
        rand([2, 50, 3, 16]),
        rand([2, 50, 3, 16]) * 4.0,
        rand([16]),
        rand([2, 50, 3, 16]),
    );
    let eps = 1e-6;
    let run = |ours: bool| {
        let (x, gate) = (leaf(&x), leaf(&gate));
        let weight = Tensor::<Ad, 1>::from_inner(weight.clone());
        let out = match ours {
            true => gated_rms_norm(x.clone(), gate.clone(), weight, eps),
            false => float(generic::gated_rms_norm::<Ad>(
                primitive(x.clone()),
                primitive(gate.clone()),
                primitive(weight),
                eps,
            )),
        };
        let [dx, d_gate] = grads(out.clone(), &w, [&x, &gate]);
        (out.inner(), dx, d_gate)
    };
    let ((out, dx, d_gate), (want_out, want_dx, want_gate)) = (run(true), run(false));
    close(out, &want_out);
    close(dx, &want_dx);
    close(d_gate, &want_gate);
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
    let (generic_out, lse) =
        generic::cross_entropy::<Flex>(primitive(logits.clone()), targets.clone().into_primitive());
    close(float::<Flex, 1>(generic_out), &reference_out);
    let generic_dx = generic::cross_entropy_backward::<Flex>(
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
        // dA sums 60 rows x 40 outputs of products, dB 60 rows x 24 inputs.
        close_sum(da, &reference_da, 60 * 40);
        close_sum(db, &reference_db, 60 * 24);
        let layer = LoraParts {
            weight: primitive(weight.clone()),
            bias: bias.map(primitive),
            lora_a: primitive(a.clone()),
            lora_b: primitive(b.clone()),
            scaling,
        };
        let (generic_out, h) = generic::lora_linear::<Flex>(primitive(x.clone()), layer.clone());
        close(float::<Flex, 3>(generic_out), &reference_out);
        let (generic_dx, generic_da, generic_db) = generic::lora_linear_backward::<Flex>(
            primitive(x.clone()),
            layer,
            Some(h),
            primitive(w.clone()),
            true,
        );
        close(float::<Flex, 3>(generic_dx.expect("asked")), &reference_dx);
        close_sum(float::<Flex, 2>(generic_da), &reference_da, 60 * 40);
        close_sum(float::<Flex, 2>(generic_db), &reference_db, 60 * 24);
    }
}

/// A server's batch of several adapters shares one base product: `lora_add` with two adapters on
/// rows {3, 0} and {4} of a batch of 6 gives, bit for bit, what `lora_linear` gives on each
/// adapter's rows alone, and the base's output on the other rows (the kernel, and the generic path
/// against the generic `lora_linear`), so that a row's reply does not depend on the other rows'
/// adapters.
#[test]
fn lora_add_on_a_shared_base_equals_lora_linear_on_each_adapters_rows() {
    let (n_in, n_out) = (24, 40);
    let x = rand([6, 3, n_in]);
    let (weight, bias) = (rand([n_in, n_out]), rand([n_out]));
    let adapters = [(vec![0, 3], 4, 0.5), (vec![4], 8, 2.0)]
        .map(|(rows, r, scaling)| (rows, rand([n_in, r]), rand([r, n_out]), scaling));
    let index = |rows: &[usize]| {
        let ids: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        Tensor::<Flex, 1, Int>::from_data(TensorData::new(ids, [rows.len()]), &x.device())
    };
    let plain = [1, 2, 5];
    for bias in [None, Some(bias)] {
        let what = format!("bias {}", bias.is_some());
        let row_adapters = adapters
            .iter()
            .map(|(rows, a, b, s)| RowsAdapter::new(rows.clone(), a.clone(), b.clone(), *s))
            .collect::<Vec<_>>();
        // The kernel.
        let base = base_linear(x.clone(), weight.clone(), bias.clone());
        let added = lora_add(base.clone(), x.clone(), row_adapters.clone());
        for (rows, a, b, s) in &adapters {
            let layer = LoraParts::new(weight.clone(), bias.clone(), a.clone(), b.clone(), *s);
            let alone = lora_linear(x.clone().select(0, index(rows)), layer);
            let got = added.clone().select(0, index(rows));
            assert_eq!(
                got.into_data(),
                alone.into_data(),
                "kernel, {what}, rows {rows:?}"
            );
        }
        let got = added.select(0, index(&plain));
        assert_eq!(
            got.into_data(),
            base.select(0, index(&plain)).into_data(),
            "{what}"
        );
        // The generic path.
        let base = generic::linear::<Flex>(
            primitive(x.clone()),
            primitive(weight.clone()),
            bias.clone().map(primitive),
        );
        let added = float::<Flex, 3>(generic::lora_add::<Flex>(
            base.clone(),
            primitive(x.clone()),
            row_adapters,
        ));
        for (rows, a, b, s) in &adapters {
            let layer = LoraParts::new(weight.clone(), bias.clone(), a.clone(), b.clone(), *s);
            let x_rows = primitive(x.clone().select(0, index(rows)));
            let (alone, _) = generic::lora_linear::<Flex>(x_rows, layer);
            let got = added.clone().select(0, index(rows));
            let alone = float::<Flex, 3>(alone);
            assert_eq!(
                got.into_data(),
                alone.into_data(),
                "generic, {what}, rows {rows:?}"
            );
        }
        let base = float::<Flex, 3>(base).select(0, index(&plain));
        assert_eq!(
            added.select(0, index(&plain)).into_data(),
            base.into_data(),
            "{what}"
        );
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
                (seed_gradient(residual.clone(), w.clone()) + lora_linear_seed(x.clone(), layer, w))
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

#[test]
fn bf16_attention_runs_in_f32() {
    // On bf16 inputs the generic path gives the f32 computation on those values, rounded once
    // to bf16, forward and backward: a bf16 softmax over 150 keys would not.
    let [q, k, v, w] = inputs(4, 2, 150, 150).map(|t| t.cast(DType::BF16));
    let as_bf16 = |t| {
        float::<Flex, 4>(t)
            .cast(DType::BF16)
            .cast(DType::F32)
            .into_data()
    };
    let mut saved_out = None;
    let mut run = |dtype: DType| {
        let [q, k, v, w] = [&q, &k, &v, &w].map(|t| primitive(t.clone().cast(dtype)));
        let out = generic::sdpa::<Flex>(q.clone(), k.clone(), v.clone(), AttnMask::Causal);
        // Both backward passes get the output as the bf16 forward saved it.
        let saved = saved_out
            .get_or_insert_with(|| float::<Flex, 4>(out.clone()))
            .clone();
        let saved = primitive(saved.cast(dtype));
        let grads = generic::sdpa_grads::<Flex>(q, k, v, AttnMask::Causal, saved, w);
        (as_bf16(out), grads.map(as_bf16))
    };
    let (out, grads) = run(DType::BF16);
    let (want_out, want_grads) = run(DType::F32);
    assert_eq!(out, want_out);
    for (got, want) in grads.into_iter().zip(want_grads) {
        assert_eq!(got, want);
    }
}

/// Inputs of the gated delta rule as Gated DeltaNet makes them: q, k `[b, s, 2, 8]`, v
/// `[b, s, 4, 6]` (each key head serves two value heads), a log decay `g <= 0` mixing heads that
/// keep their state and heads that forget it at once, `beta` in (0, 1), and a starting state.
pub(super) fn delta_rule_inputs(s: usize) -> [Tensor<Flex, 4>; 6] {
    let softplus = |x: Tensor<Flex, 4>| (x.exp() + 1.0).log();
    let rate = Tensor::<Flex, 1>::from_floats([0.02, 0.3, 1.0, 4.0], &Default::default());
    let g = softplus(rand([2, s, 4, 1])) * rate.reshape([1, 1, 4, 1]).neg();
    [
        rand([2, s, 2, 8]),
        rand([2, s, 2, 8]),
        rand([2, s, 4, 6]),
        g,
        burn::tensor::activation::sigmoid(rand([2, s, 4, 1])),
        rand([2, 4, 8, 6]),
    ]
}

/// transformers' `torch_recurrent_gated_delta_rule`, token by token: the rule's definition.
fn delta_rule_by_token<B: Backend>(
    [q, k, v, g, beta, state]: [Tensor<B, 4>; 6],
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, s, hk, dk] = q.dims();
    let hv = v.dims()[2];
    let heads = |x: Tensor<B, 4>| {
        let x = x.swap_dims(1, 2); // [b, hk, s, dk]
        let x = Tensor::cat(vec![x.unsqueeze_dim::<5>(2); hv / hk], 2).reshape([b, hv, s, dk]);
        x.clone() / (x.powi_scalar(2).sum_dim(3) + 1e-6).sqrt()
    };
    let q = heads(q) / (dk as f64).sqrt();
    let k = heads(k);
    let (v, g, beta) = (v.swap_dims(1, 2), g.swap_dims(1, 2), beta.swap_dims(1, 2));
    let mut state = state;
    let mut outs = Vec::new();
    for t in 0..s {
        let at = |x: &Tensor<B, 4>| x.clone().narrow(2, t, 1); // [b, hv, 1, d]
        state = state * at(&g).exp(); // [b, hv, dk, dv]
        let (k_t, q_t) = (at(&k), at(&q));
        let remembered = k_t.clone().matmul(state.clone()); // [b, hv, 1, dv]
        let delta = (at(&v) - remembered) * at(&beta);
        state = state + k_t.swap_dims(2, 3).matmul(delta);
        outs.push(q_t.matmul(state.clone()));
    }
    (Tensor::cat(outs, 2).swap_dims(1, 2), state)
}

fn delta_rule<B: ModelBackend>(
    [q, k, v, g, beta, state]: [Tensor<B, 4>; 6],
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let squeeze = |x: Tensor<B, 4>| x.squeeze_dim::<3>(3);
    gated_delta_rule(q, k, v, squeeze(g), squeeze(beta), Some(state))
}

/// Chunks of 64 over 150 tokens (two whole chunks and a ragged one), with the WY/UT solve,
/// against the rule applied token by token; gradients of every input through autodiff of both.
#[test]
fn gated_delta_rule_matches_the_token_by_token_rule() {
    let inputs = delta_rule_inputs(150);
    let [w_out, w_state] = [rand([2, 150, 4, 6]), rand([2, 4, 8, 6])];
    let run = |chunked: bool| {
        let leaves = inputs.clone().map(|t| leaf(&t));
        let (out, state) = match chunked {
            true => delta_rule(leaves.clone()),
            false => delta_rule_by_token(leaves.clone()),
        };
        let loss = (out.clone() * Tensor::from_inner(w_out.clone())).sum()
            + (state.clone() * Tensor::from_inner(w_state.clone())).sum();
        let g = loss.backward();
        let grads = leaves.map(|t| t.grad(&g).expect("reached"));
        (out.inner(), state.inner(), grads)
    };
    let (out, state, grads) = run(true);
    let (want_out, want_state, want_grads) = run(false);
    close_sum(out, &want_out, 150);
    close_sum(state, &want_state, 150);
    for (got, want) in grads.into_iter().zip(&want_grads) {
        close_sum(got, want, 150 * 8);
    }
}

/// Training's path, from a zero state: the chunked rule as one op whose backward pass is
/// `delta_rule_backward`, against the token-by-token rule differentiated op by op, over a
/// ragged last chunk, whole chunks and one short chunk.
#[test]
fn the_delta_rules_own_backward_pass_matches_the_token_by_token_rule() {
    for s in [150, 64, 3] {
        let [q, k, v, g, beta, state] = delta_rule_inputs(s);
        let zero = state.zeros_like();
        let w_out = rand([2, s, 4, 6]);
        let run = |chunked: bool| {
            let leaves =
                [q.clone(), k.clone(), v.clone(), g.clone(), beta.clone()].map(|t| leaf(&t));
            let [lq, lk, lv, lg, lb] = leaves.clone();
            let out = match chunked {
                true => {
                    let squeeze = |x: Tensor<Ad, 4>| x.squeeze_dim::<3>(3);
                    gated_delta_rule(lq, lk, lv, squeeze(lg), squeeze(lb), None).0
                }
                false => {
                    delta_rule_by_token([lq, lk, lv, lg, lb, Tensor::from_inner(zero.clone())]).0
                }
            };
            let loss = (out.clone() * Tensor::from_inner(w_out.clone())).sum();
            let grads = loss.backward();
            (
                out.inner(),
                leaves.map(|t| t.grad(&grads).expect("reached")),
            )
        };
        let (out, grads) = run(true);
        let (want_out, want_grads) = run(false);
        close_sum(out, &want_out, s);
        for (i, (got, want)) in grads.into_iter().zip(&want_grads).enumerate() {
            let scale = want.clone().abs().max().into_scalar();
            let d = (got - want.clone()).abs().max().into_scalar();
            assert!(
                d <= 1e-4 * scale.max(1.0),
                "s = {s}, input {i}: max |diff| {d} of {scale}"
            );
        }
    }
}

/// Flex's kernels (f32) against the generic path on the same prepared inputs: the output, the
/// final state and every chunk's entering state, from a given state, and the gradients from a
/// zero state, over a ragged last chunk, whole chunks, a short chunk and one token.
#[test]
fn the_delta_rule_kernel_matches_the_generic_path() {
    for s in [150, 64, 3, 1] {
        let [q, k, v, g, beta, state] = delta_rule_inputs(s);
        let squeeze = |x: Tensor<Flex, 4>| x.squeeze_dim::<3>(3).into_primitive().tensor();
        let x = generic::DeltaRuleInputs::<Flex>::new(
            q.into_primitive().tensor(),
            k.into_primitive().tensor(),
            v.into_primitive().tensor(),
            squeeze(g),
            squeeze(beta),
        )
        .primitives();
        let state = Some(state.into_primitive().tensor());
        let kernel = Flex::delta_rule_forward(x.clone(), state.clone());
        let generic = generic::delta_rule_forward::<Flex>(x.clone(), state);
        let pairs = [(kernel.0, generic.0), (kernel.1, generic.1)];
        for (got, want) in pairs {
            close_sum(float::<Flex, 4>(got), &float(want), s);
        }
        close_sum(
            float::<Flex, 5>(kernel.2).flatten::<4>(0, 1),
            &float::<Flex, 5>(generic.2).flatten(0, 1),
            s,
        );
        // The backward pass, from a zero state as training runs it.
        let (_, _, entering) = generic::delta_rule_forward::<Flex>(x.clone(), None);
        let d_out = rand([2, 4, s, 6]).into_primitive().tensor();
        let kernel = Flex::delta_rule_backward(x.clone(), entering.clone(), d_out.clone());
        let generic = generic::delta_rule_backward::<Flex>(x.clone(), entering, d_out);
        for (i, (got, want)) in kernel.into_iter().zip(generic).enumerate() {
            let values = |t: FloatTensor<Flex>| t.into_data().to_vec::<f32>().unwrap();
            let (got, want) = (values(got), values(want));
            let scale = want.iter().fold(1f32, |m, w| m.max(w.abs()));
            let d = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                d <= 1e-4 * scale,
                "s = {s}, gradient {i}: max |diff| {d} of {scale}"
            );
        }
    }
}

/// Generation runs the rule on a prompt and then a token at a time from the state it left: the
/// same as the whole sequence at once.
#[test]
fn gated_delta_rule_continues_from_its_state() {
    let inputs = delta_rule_inputs(75);
    let (whole, whole_state) = delta_rule(inputs.clone());
    let part = |start: usize, len: usize, state: Tensor<Flex, 4>| {
        let [q, k, v, g, beta, _] = inputs.clone();
        let [q, k, v, g, beta] = [q, k, v, g, beta].map(|t| t.narrow(1, start, len));
        delta_rule([q, k, v, g, beta, state])
    };
    let (prompt, mut state) = part(0, 70, inputs[5].clone());
    let mut outs = vec![prompt];
    for t in 70..75 {
        let (out, next) = part(t, 1, state);
        outs.push(out);
        state = next;
    }
    close_sum(Tensor::cat(outs, 1), &whole, 75);
    close_sum(state, &whole_state, 75);
}

/// The causal convolution against its definition, and a split input continuing from the state.
#[test]
fn causal_conv1d_matches_its_definition_and_continues_from_its_state() {
    let (x, w) = (rand([2, 9, 5]), rand([5, 4]));
    let (out, state) = causal_conv1d(x.clone(), w.clone(), None);
    let xs = x.clone().into_data().to_vec::<f32>().unwrap();
    let ws = w.clone().into_data().to_vec::<f32>().unwrap();
    let mut want = vec![0f32; 2 * 9 * 5];
    for b in 0..2 {
        for t in 0..9 {
            for c in 0..5 {
                want[(b * 9 + t) * 5 + c] = (0..4)
                    .filter(|&j| t + j >= 3)
                    .map(|j| ws[c * 4 + j] * xs[(b * 9 + t + j - 3) * 5 + c])
                    .sum();
            }
        }
    }
    close(
        out.clone(),
        &Tensor::from_data(TensorData::new(want, [2, 9, 5]), &x.device()),
    );
    close(state, &x.clone().narrow(1, 6, 3));
    let (head, head_state) = causal_conv1d(x.clone().narrow(1, 0, 4), w.clone(), None);
    let (tail, _) = causal_conv1d(x.narrow(1, 4, 5), w, Some(head_state));
    close(Tensor::cat(vec![head, tail], 1), &out);
}
