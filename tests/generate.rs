//! KV-cache generation: greedy tokens equal transformers' `generate` on the fixture models (with
//! and without adapters, past Mistral's sliding window, with a repetition penalty); the sampling
//! processors equal transformers'; the cache equals recomputing the whole prefix; a batch equals
//! its rows one at a time, also when rows of several adapters join a running batch; chat prompts
//! and streamed text equal transformers'.

mod common;

use burn::tensor::ElementConversion;
use common::{fixtures, model_dir, B};
use rand::SeedableRng;
use serde_json::Value;
use swift_rs::config::{Dtype, LossScale, Nf4Config, TemplateName};
use swift_rs::data::encode::Encoder;
use swift_rs::data::format::{Message, Role};
use swift_rs::export::peft::read_adapter;
use swift_rs::infer::{generate, Batcher, GenerateOptions, Request, Row, Sampling, TextStream};
use swift_rs::model::{AdapterSource, Batch, CausalLm, LoadOptions};

fn load(base: &str, adapter: Option<&str>) -> CausalLm<B> {
    let options = LoadOptions::dtype(Dtype::F32);
    common::load_model(base, adapter, options, &Default::default())
}

fn golden(section: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join("generation.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()[section].clone()
}

fn greedy(max_new_tokens: usize, stop: &[u32]) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        stop: stop.to_vec(),
        sampling: Sampling::GREEDY,
    }
}

/// One request alone.
fn reply(model: &CausalLm<B>, prompt: &[u32], options: &GenerateOptions) -> Vec<u32> {
    let request = Request {
        prompt: prompt.to_vec(),
        seed: 0,
    };
    generate(model, &[request], options, |_, _| {}).remove(0)
}

#[test]
fn greedy_generation_equals_transformers() {
    for case in golden("greedy").as_array().unwrap() {
        let base = case["model"].as_str().unwrap();
        let adapter = case["adapter"].as_str();
        let model = load(base, adapter);
        let prompt = common::ids(&case["prompt"]);
        let stop = common::ids(&case["stop"]);
        let want = common::ids(&case["tokens"]);
        let mut options = greedy(want.len(), &stop);
        options.sampling.repetition_penalty = case["repetition_penalty"].as_f64().unwrap() as f32;
        let got = reply(&model, &prompt, &options);
        assert_eq!(
            got,
            want,
            "{base} + {adapter:?}, penalty {}, after {} tokens",
            options.sampling.repetition_penalty,
            prompt.len()
        );
        // A stop token ends the reply and is kept.
        options.max_new_tokens = 10;
        options.stop = want[..1].to_vec();
        assert_eq!(reply(&model, &prompt, &options), want[..1].to_vec());
    }
}

/// Qwen3.5: the Gated DeltaNet layers decode from their convolution and recurrent state, with
/// and without adapters, and on an NF4 base (scripts/gen_qwen3_5_fixtures.py); the
/// mixture-of-experts models route every new token (scripts/gen_moe_fixtures.py).
#[test]
fn qwen3_5_and_moe_greedy_generation_equals_transformers() {
    for fixture in ["qwen3_5_vl", "qwen3_moe"] {
        greedy_generation_from_its_states_equals_transformers(fixture);
    }
}

fn greedy_generation_from_its_states_equals_transformers(fixture: &str) {
    let path = model_dir(fixture).join("expected/generation.json");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for case in golden["greedy"].as_array().unwrap() {
        let base = case["model"].as_str().unwrap();
        let adapter = case["adapter"].as_str();
        let nf4 = case["nf4"].as_bool().unwrap();
        let options = LoadOptions {
            dtype: Some(Dtype::F32),
            quant: nf4.then(Nf4Config::default),
        };
        let model = common::load_model(base, adapter, options, &Default::default());
        let prompt = common::ids(&case["prompt"]);
        let want = common::ids(&case["tokens"]);
        let got = reply(&model, &prompt, &greedy(want.len(), &[]));
        assert_eq!(
            got,
            want,
            "{base} + {adapter:?} (nf4 {nf4}), after {} tokens",
            prompt.len()
        );
    }
}

#[test]
fn sampling_processors_equal_transformers() {
    for case in golden("sampling").as_array().unwrap() {
        let f = |key: &str| case[key].as_f64().unwrap() as f32;
        let sampling = Sampling {
            temperature: f("temperature"),
            top_k: case["top_k"].as_u64().unwrap() as usize,
            top_p: f("top_p"),
            repetition_penalty: f("repetition_penalty"),
        };
        let mut logits: Vec<f32> = case["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        sampling.process(&mut logits, &common::ids(&case["seen"]));
        let want = case["processed"].as_array().unwrap();
        assert_eq!(logits.len(), want.len());
        for (i, (got, want)) in logits.iter().zip(want).enumerate() {
            match want.as_f64() {
                None => assert_eq!(
                    *got,
                    f32::NEG_INFINITY,
                    "{sampling:?}: token {i} is removed"
                ),
                Some(w) => assert!(
                    (*got - w as f32).abs() <= 1e-5 * w.abs().max(1.0) as f32,
                    "{sampling:?}: token {i}: {got} vs {w}"
                ),
            }
        }
    }
}

#[test]
fn sampling_is_reproducible_and_top_k_1_is_greedy() {
    let model = load("llama", Some("llama_qv"));
    let prompt: Vec<u32> = (0..9).map(|i| (i * 41 + 7) % 300).collect();
    let sampled = |seed, top_k| {
        let options = GenerateOptions {
            max_new_tokens: 12,
            stop: Vec::new(),
            sampling: Sampling {
                temperature: 1.5,
                top_k,
                top_p: 1.0,
                repetition_penalty: 1.0,
            },
        };
        let request = Request {
            prompt: prompt.clone(),
            seed,
        };
        generate(&model, &[request], &options, |_, _| {}).remove(0)
    };
    assert_eq!(sampled(7, 0), sampled(7, 0));
    let seeds: Vec<Vec<u32>> = (0..4).map(|s| sampled(s, 0)).collect();
    assert!(
        seeds.iter().any(|s| *s != seeds[0]),
        "different seeds draw differently at temperature 1.5"
    );
    assert_eq!(sampled(3, 1), reply(&model, &prompt, &greedy(12, &[])));
}

#[test]
fn draws_follow_the_processed_distribution() {
    // Two tokens left by top-k, at probabilities 0.73 / 0.27 (logits 1 and 0).
    let sampling = Sampling {
        temperature: 1.0,
        top_k: 2,
        top_p: 1.0,
        repetition_penalty: 1.0,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let n = 20_000;
    let mut first = 0;
    for _ in 0..n {
        let mut logits = vec![-3.0, 1.0, -2.0, 0.0, -5.0];
        match sampling.choose(&mut logits, &[], &mut rng) {
            1 => first += 1,
            3 => {}
            other => panic!("token {other} was filtered out"),
        }
    }
    let p = 1.0 / (1.0 + (-1.0f64).exp());
    let share = first as f64 / n as f64;
    // Four standard deviations of a binomial share.
    assert!(
        (share - p).abs() < 4.0 * (p * (1.0 - p) / n as f64).sqrt(),
        "{share} vs {p}"
    );
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

const CACHE_CASES: [(&str, Option<&str>); 7] = [
    ("mistral", None),
    ("qwen2_bf16", None),
    ("qwen3_f16", Some("qwen3_dora")),
    ("qwen3_5_vl", Some("qwen3_5_vl_lora")),
    ("qwen3_5_text", None),
    ("qwen3_moe_fused", None),
    ("qwen3_5_moe", Some("qwen3_5_moe_lora")),
];

#[test]
fn the_kv_cache_gives_what_recomputing_the_prefix_gives() {
    for (base, adapter) in CACHE_CASES {
        let model = load(base, adapter);
        let prompt: Vec<u32> = (0..9).map(|i| (i * 37 + 5) % 300).collect();
        // 24 steps: well past Mistral's window of 5.
        let cached = reply(&model, &prompt, &greedy(24, &[]));
        assert_eq!(cached, greedy_recomputed(&model, &prompt, 24), "{base}");
    }
}

#[test]
fn a_batch_generates_what_its_rows_generate_alone() {
    for (base, adapter) in CACHE_CASES {
        let model = load(base, adapter);
        // Lengths 3 to 11: left padding up to 8, past Mistral's window.
        let prompts: Vec<Vec<u32>> = [11, 3, 7, 5]
            .iter()
            .enumerate()
            .map(|(r, &n)| {
                (0..n)
                    .map(|i| ((i * 53 + r * 17 + 2) % 300) as u32)
                    .collect()
            })
            .collect();
        // Row 1's first token stops it at once: the batch goes on without it.
        let alone_open: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| reply(&model, p, &greedy(14, &[])))
            .collect();
        let stop = [alone_open[1][0]];
        let requests: Vec<Request> = prompts
            .iter()
            .map(|p| Request {
                prompt: p.clone(),
                seed: 0,
            })
            .collect();
        for sampling in [
            Sampling::GREEDY,
            Sampling {
                temperature: 1.2,
                top_k: 40,
                top_p: 0.9,
                repetition_penalty: 1.1,
            },
        ] {
            let options = GenerateOptions {
                max_new_tokens: 14,
                stop: stop.to_vec(),
                sampling,
            };
            let mut streamed = vec![Vec::new(); prompts.len()];
            let batch = generate(&model, &requests, &options, |i, t| streamed[i].push(t));
            let alone: Vec<Vec<u32>> = prompts.iter().map(|p| reply(&model, p, &options)).collect();
            assert_eq!(batch, alone, "{base}, {sampling:?}");
            assert_eq!(streamed, batch, "on_token sees every token");
            if sampling.is_greedy() {
                assert_eq!(batch[1].len(), 1, "row 1 stops at its first token");
                assert!(batch.iter().any(|r| r.len() == 14), "other rows go on");
            }
        }
    }
}

/// A server's batch: rows of the base and of a served adapter join a running batch between
/// steps (prompts of other lengths, so the cache is padded on either side), and each row's
/// tokens equal that row generated alone by a model loaded with its adapter. A plain LoRA adds
/// to the batch's shared base product; DoRA runs its rows whole.
#[test]
fn rows_that_join_a_running_batch_with_their_own_adapters_generate_what_they_generate_alone() {
    for (model, adapter) in [
        ("qwen2_chat", "qwen2_rslora"),
        ("qwen3_f16", "qwen3_dora"),
        ("qwen3_5_vl", "qwen3_5_vl_lora"),
        ("qwen3_5_moe", "qwen3_5_moe_lora"),
    ] {
        rows_join_with_their_adapters(model, adapter);
    }
}

fn rows_join_with_their_adapters(model: &str, adapter: &str) {
    let base = load(model, None);
    let adapted = load(model, Some(adapter));
    let mut served = base.clone();
    let mut plan = read_adapter(&common::adapter_dir(adapter)).unwrap();
    let AdapterSource::Weights(ckpt) = &mut plan.source else {
        unreachable!()
    };
    assert_eq!(served.add_served_adapter(ckpt, &plan.config).unwrap(), 0);
    let prompt = |n: usize, r: usize| -> Vec<u32> {
        (0..n)
            .map(|i| ((i * 31 + r * 13 + 7) % 300) as u32)
            .collect()
    };
    // (prompt, adapter, step at which it joins)
    let rows: Vec<(Vec<u32>, Option<usize>, usize)> = vec![
        (prompt(6, 0), None, 0),
        (prompt(9, 1), Some(0), 0),
        (prompt(3, 2), Some(0), 2),
        (prompt(14, 3), None, 2),
        (prompt(5, 4), Some(0), 5),
    ];
    let options = greedy(10, &[]);
    let mut got = vec![Vec::new(); rows.len()];
    let mut batcher = Batcher::new(&served);
    for step in 0..30 {
        let joining: Vec<(usize, Row)> = (0..rows.len())
            .filter(|&i| rows[i].2 == step)
            .map(|i| {
                let row = Row {
                    request: Request {
                        prompt: rows[i].0.clone(),
                        seed: 0,
                    },
                    options: options.clone(),
                    adapter: rows[i].1,
                    top_logprobs: None,
                };
                (i, row)
            })
            .collect();
        for c in batcher.start(joining).into_iter().chain(batcher.step()) {
            got[c.key].push(c.token);
        }
    }
    for (i, (p, adapter, _)) in rows.iter().enumerate() {
        let alone = match adapter {
            None => reply(&base, p, &options),
            Some(_) => reply(&adapted, p, &options),
        };
        assert_eq!(got[i], alone, "{model}: row {i} ({adapter:?})");
    }
    assert_ne!(
        reply(&base, &rows[1].0, &options),
        reply(&adapted, &rows[1].0, &options),
        "the adapter changes the reply, so a row on the wrong adapter would show"
    );
}

#[test]
fn chat_prompts_and_streamed_text_equal_transformers() {
    let chat = golden("chat");
    let dir = model_dir(chat["model"].as_str().unwrap());
    let encoder =
        Encoder::for_model_dir(&dir, TemplateName::Auto, None, LossScale::Default).unwrap();
    assert_eq!(encoder.stop_token_ids(), vec![2], "<|im_end|>");
    for case in chat["cases"].as_array().unwrap() {
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message {
                role: match m["role"].as_str().unwrap() {
                    "system" => Role::System,
                    "user" => Role::User,
                    _ => Role::Assistant,
                },
                content: m["content"].as_str().unwrap().to_string(),
            })
            .collect();
        assert_eq!(
            encoder.prompt(&messages).unwrap(),
            common::ids(&case["prompt"])
        );
        let mut tokens = common::ids(&case["tokens"]);
        if tokens.last().is_some_and(|t| [0, 2].contains(t)) {
            tokens.pop();
        }
        let mut stream = TextStream::new(encoder.tokenizer());
        let mut text = String::new();
        for t in tokens {
            text.extend(stream.push(t).unwrap());
        }
        text.push_str(&stream.finish().unwrap());
        assert_eq!(text, case["response"].as_str().unwrap());
    }
}
