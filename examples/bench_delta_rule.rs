//! The gated delta rule op alone on the CPU (Flex, f32): the median time of its forward pass, and
//! of forward and backward from a zero state (training's case), over random inputs of one shape.
//! scripts/bench_delta_rule.py runs it beside transformers' `torch_chunk_gated_delta_rule`.
//!
//!     cargo run --release --example bench_delta_rule -- BATCH SEQ KEY_HEADS VALUE_HEADS DK DV REPS
//!
//! Prints one JSON line: `{"forward_ms": .., "forward_backward_ms": ..}`.

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Distribution, Tensor};
use swift_rs::ops::gated_delta_rule;

type Ad = Autodiff<Flex>;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let [b, s, hk, hv, dk, dv, reps] = args[..] else {
        anyhow::bail!("usage: bench_delta_rule BATCH SEQ KEY_HEADS VALUE_HEADS DK DV REPS");
    };
    let device = Default::default();
    let rand = |shape: [usize; 4]| {
        Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
    };
    let (q, k, v) = (
        rand([b, s, hk, dk]),
        rand([b, s, hk, dk]),
        rand([b, s, hv, dv]),
    );
    // Decays and write strengths in the model's ranges: g = -softplus(.) · rate, beta = sigmoid.
    let g = ((rand([b, s, hv, 1]).exp() + 1.0).log() * -0.5).squeeze_dim::<3>(3);
    let beta = sigmoid(rand([b, s, hv, 1])).squeeze_dim::<3>(3);
    let w = rand([b, s, hv, dv]);
    let median = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let time = |f: &dyn Fn()| {
        f(); // warm-up
        median(
            (0..reps)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        )
    };
    let forward_ms = time(&|| {
        let (out, _) = gated_delta_rule::<Flex>(
            q.clone(),
            k.clone(),
            v.clone(),
            g.clone(),
            beta.clone(),
            None,
        );
        out.into_data();
    });
    let forward_backward_ms = time(&|| {
        let leaf = |t: &Tensor<Flex, 4>| Tensor::<Ad, 4>::from_inner(t.clone()).require_grad();
        let leaf3 = |t: &Tensor<Flex, 3>| Tensor::<Ad, 3>::from_inner(t.clone()).require_grad();
        let (lq, lk, lv, lg, lb) = (leaf(&q), leaf(&k), leaf(&v), leaf3(&g), leaf3(&beta));
        let (out, _) = gated_delta_rule::<Ad>(
            lq.clone(),
            lk.clone(),
            lv.clone(),
            lg.clone(),
            lb.clone(),
            None,
        );
        let grads = (out * Tensor::from_inner(w.clone())).sum().backward();
        for grad in [&lq, &lk, &lv].map(|t| t.grad(&grads)) {
            grad.expect("a gradient").into_data();
        }
        for grad in [&lg, &lb].map(|t| t.grad(&grads)) {
            grad.expect("a gradient").into_data();
        }
    });
    println!(
        "{{\"forward_ms\": {forward_ms:.3}, \"forward_backward_ms\": {forward_backward_ms:.3}}}"
    );
    Ok(())
}
