//! KV-cache generation: greedy tokens equal transformers' `generate` on the fixture models (with
//! and without adapters, past Mistral's sliding window), and equal decoding that recomputes the
//! whole prefix every step.

mod common;

use burn::tensor::ElementConversion;
use common::{adapter_dir, fixtures, model_dir, B};
use serde_json::Value;
use swift_rs::config::Dtype;
use swift_rs::export::peft::read_adapter;
use swift_rs::infer::greedy;
use swift_rs::model::{self, Batch, CausalLm, LoadOptions};

fn load(base: &str, adapter: Option<&str>) -> CausalLm<B> {
    let mut plan = adapter.map(|a| read_adapter(&adapter_dir(a)).unwrap());
    let options = LoadOptions::dtype(Dtype::F32);
    model::load::<B>(
        &model_dir(base),
        options,
        plan.as_mut(),
        &Default::default(),
    )
    .unwrap()
    .1
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("generation.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn greedy_generation_equals_transformers() {
    for case in cases() {
        let base = case["model"].as_str().unwrap();
        let adapter = case["adapter"].as_str();
        let model = load(base, adapter);
        let prompt = common::ids(&case["prompt"]);
        let stop = common::ids(&case["stop"]);
        let want = common::ids(&case["tokens"]);
        let got = greedy(&model, &prompt, want.len(), &stop);
        assert_eq!(
            got,
            want,
            "{base} + {adapter:?} after {} tokens",
            prompt.len()
        );
        // A stop token ends the reply and is kept.
        assert_eq!(greedy(&model, &prompt, 10, &want[..1]), want[..1].to_vec());
    }
}

/// Greedy decoding without a cache: the whole sequence through the model at every step.
fn greedy_recomputed(model: &CausalLm<B>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let logits = model.forward(&Batch::right_padded(&[&seq])); // [1, len, vocab]
        let [_, len, vocab] = logits.dims();
        let last = logits
            .slice([0..1, len - 1..len, 0..vocab])
            .reshape([vocab]);
        seq.push(last.argmax(0).into_scalar().elem::<i64>() as u32);
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn the_kv_cache_gives_what_recomputing_the_prefix_gives() {
    for (base, adapter) in [
        ("mistral", None),
        ("qwen2_bf16", None),
        ("qwen3_f16", Some("qwen3_dora")),
    ] {
        let model = load(base, adapter);
        let prompt: Vec<u32> = (0..9).map(|i| (i * 37 + 5) % 300).collect();
        // 24 steps: well past Mistral's window of 5.
        let cached = greedy(&model, &prompt, 24, &[]);
        assert_eq!(cached, greedy_recomputed(&model, &prompt, 24), "{base}");
    }
}
