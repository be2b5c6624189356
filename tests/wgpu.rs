//! The GPU path (Burn's wgpu backend through CubeCL, the kernels and fusion cuda runs too) against
//! the same transformers / PEFT / PyTorch fixtures as the CPU path. CI runs it on Mesa's lavapipe
//! (software Vulkan): `cargo test --features wgpu`. Without an adapter each test says so and
//! passes, except under `CI=true`, where a missing Vulkan device is a failure.
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::wgpu::WgpuDevice;
use burn::backend::{Autodiff, Flex, Wgpu};
use common::training::{self, serial, On};
use common::{adapter_dir, check_logits, check_losses, fixtures, golden, load_model, model_dir};
use serde_json::Value;
use std::io::Write;
use std::sync::{MutexGuard, Once};
use swift_rs::config::{Device, Dtype, Nf4Config};
use swift_rs::infer::{generate, GenerateOptions, Request, Sampling};
use swift_rs::model::loss::{token_losses, LossTargets};
use swift_rs::model::{Batch, CausalLm, LoadOptions, ModelBackend};
use swift_rs::ops::wgpu_adapters;

/// The first adapter wgpu lists, held by one test at a time, or None (and a line saying so) when
/// there is none and this is not CI. One at a time: tests that train reseed the backends' global
/// generators, and CI once failed a test that read a tensor while the others ran their own fusion
/// streams on the device (lavapipe gains nothing from concurrent tests: it uses every core).
fn gpu() -> Option<(WgpuDevice, MutexGuard<'static, ()>)> {
    let serial = serial();
    report_device_thread_panics();
    match wgpu_adapters().into_iter().next() {
        Some(a) => Some((a.device, serial)),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and wgpu finds no adapter: install mesa-vulkan-drivers")
        }
        None => {
            eprintln!("no wgpu adapter: skipped");
            None
        }
    }
}

/// A panic on CubeCL's device thread reaches the test only as `CallError`; its message went to the
/// output of whichever test started that thread. Write it to the process's stderr instead.
fn report_device_thread_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if thread.name().is_some_and(|n| n.starts_with("DS")) {
                let line = format!("device thread {:?} panicked: {info}\n", thread.name());
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
            default(info);
        }));
    });
}

/// Logits and per-row losses of `base` (+ `adapter`) against the fixture `tag`, 1e-4 in f32.
fn check_parity(base: &str, adapter: Option<&str>, options: LoadOptions, tag: &str) {
    let Some((device, _serial)) = gpu() else {
        return;
    };
    let model = load_model::<Wgpu>(base, adapter, options, &device);
    // What `memory_gib` reports on a GPU: the device memory the pools hold, here the weights'.
    let held = <Wgpu as ModelBackend>::device_memory_bytes(&device).unwrap_or(0);
    assert!(held > 0, "no device memory reported");
    let vocab = model.model.embed_tokens.val().dims()[0];
    let dir = adapter.map_or_else(|| model_dir(base), adapter_dir);
    let g = golden(&dir, &model_dir(base), tag, vocab);
    let what = format!("{base} + {adapter:?} ({tag}) on wgpu");
    check_logits(&what, &model, &g, 1e-4);
    check_losses(&what, &model, &g, 1e-4);
}

#[test]
fn f32_logits_and_losses_match_transformers() {
    for base in ["llama", "qwen3_f16", "mistral"] {
        check_parity(base, None, LoadOptions::dtype(Dtype::F32), "logits");
    }
}

/// Qwen3.5's Gated DeltaNet layers (the generic delta rule, conv and gated norm) on the GPU path:
/// every fixture row in one padded batch (one shape: lavapipe compiles kernels per shape, and
/// these rows of 3 to 150 tokens alone took minutes).
#[test]
fn qwen3_5_matches_transformers() {
    let Some((device, _serial)) = gpu() else {
        return;
    };
    let (base, adapter) = ("qwen3_5_vl", "qwen3_5_vl_lora");
    let model = load_model::<Wgpu>(base, Some(adapter), LoadOptions::dtype(Dtype::F32), &device);
    let g = golden(&adapter_dir(adapter), &model_dir(base), "logits", 331);
    let ids: Vec<&[u32]> = g.rows.iter().map(|r| r.input_ids.as_slice()).collect();
    for (i, got) in common::logits_of(&model, &ids).iter().enumerate() {
        let d = common::max_abs_diff(got, &g.logits[i]);
        assert!(
            d < 1e-4,
            "{base} + {adapter} on wgpu, row {i}: max |logit diff| {d}"
        );
    }
}

#[test]
fn peft_adapters_match_peft() {
    for (adapter, base) in [("qwen2_rslora", "qwen2_bf16"), ("qwen3_dora", "qwen3_f16")] {
        check_parity(
            base,
            Some(adapter),
            LoadOptions::dtype(Dtype::F32),
            "logits",
        );
    }
}

#[test]
fn an_nf4_base_matches_transformers_on_bitsandbytes_weights() {
    let options = LoadOptions {
        dtype: Some(Dtype::F32),
        quant: Some(Nf4Config::default()),
    };
    check_parity("llama", None, options, "logits_nf4");
    check_parity("llama", Some("llama_qv"), options, "logits_nf4");
}

#[test]
fn greedy_generation_equals_the_cpu_path_and_transformers() {
    let Some((device, _serial)) = gpu() else {
        return;
    };
    let text = std::fs::read_to_string(fixtures().join("generation.json")).unwrap();
    let cases = serde_json::from_str::<Value>(&text).unwrap()["greedy"].clone();
    for case in cases.as_array().unwrap().iter().take(2) {
        let (base, adapter) = (case["model"].as_str().unwrap(), case["adapter"].as_str());
        let want = common::ids(&case["tokens"]);
        let mut options = GenerateOptions {
            max_new_tokens: want.len(),
            stop: common::ids(&case["stop"]),
            sampling: Sampling::GREEDY,
        };
        options.sampling.repetition_penalty = case["repetition_penalty"].as_f64().unwrap() as f32;
        let prompt = common::ids(&case["prompt"]);
        let request = || {
            vec![Request {
                prompt: prompt.clone(),
                seed: 0,
            }]
        };
        let f32 = LoadOptions::dtype(Dtype::F32);
        let gpu_model = load_model::<Wgpu>(base, adapter, f32, &device);
        let cpu_model = load_model::<Flex>(base, adapter, f32, &Default::default());
        let on_gpu = generate(&gpu_model, &request(), &options, |_, _| {}).remove(0);
        let on_cpu = generate(&cpu_model, &request(), &options, |_, _| {}).remove(0);
        assert_eq!(on_gpu, on_cpu, "{base} + {adapter:?}");
        assert_eq!(on_gpu, want, "{base} + {adapter:?}");
    }
}

fn on() -> Option<(On<Autodiff<Wgpu>>, MutexGuard<'static, ()>)> {
    let (backend, serial) = gpu()?;
    let on = On {
        device: Device::Wgpu(0),
        backend,
    };
    Some((on, serial))
}

#[test]
fn one_sgd_step_equals_pytorch_peft_for_every_accumulation() {
    if let Some((on, _serial)) = on() {
        training::one_sgd_step_equals_pytorch_peft(&on);
    }
}

#[test]
fn three_adamw_steps_with_clipping_equal_pytorch_peft() {
    if let Some((on, _serial)) = on() {
        training::three_adamw_steps_equal_pytorch_peft(&on);
    }
}

/// One micro-batch (one shape for lavapipe to compile) through the delta rule's backward pass.
#[test]
fn a_qwen3_5_sgd_step_equals_pytorch_peft() {
    if let Some((on, _serial)) = on() {
        training::qwen3_5_sgd_step_equals_pytorch_peft(&on, 4, 1, false);
    }
}

#[test]
fn a_resumed_run_ends_bit_for_bit_where_an_unbroken_one_does() {
    if let Some((on, _serial)) = on() {
        // A fresh adapter with dropout on a fixture model: the quickstart's longer rows make
        // lavapipe compile kernels for many more shapes.
        training::a_resumed_run_ends_where_an_unbroken_one_does(&on, 4, |out| {
            let mut c = training::config("qwen2_bf16", out);
            c.lora.dropout = 0.1;
            c.train.batch_size = 2;
            c.train.grad_accum = 2;
            c.train.max_steps = 4;
            c.train.save_steps = 2;
            c
        });
    }
}

/// What one forward and backward pass of batch 1 at sequence `s` leaves the device's memory pools
/// holding (their high-water mark: they are not given back).
fn step_memory(model: &CausalLm<Autodiff<Wgpu>>, s: usize, device: &WgpuDevice) -> u64 {
    let ids: Vec<u32> = (0..s).map(|t| (t * 7 % 300) as u32).collect();
    let batch = Batch::right_padded(&[&ids]);
    let labels = vec![ids.iter().map(|&t| t as i64).collect()];
    let hidden = model.hidden_states(&batch);
    let loss = token_losses(model, hidden, &LossTargets::shifted(&labels)).mean();
    let grads = loss.backward();
    // Read a gradient back: the step has run, whole, before its memory is read.
    let lora_a = &model.adapters().next().expect("an adapter").lora_a;
    let grad: Vec<f32> = lora_a
        .grad(&grads)
        .expect("a gradient")
        .into_data()
        .to_vec()
        .unwrap();
    assert!(grad.iter().all(|g| g.is_finite()) && grad.iter().any(|&g| g != 0.0));
    <Wgpu as ModelBackend>::device_memory_bytes(device).expect("a GPU reports its memory")
}

#[test]
fn attention_memory_grows_linearly_with_the_sequence() {
    let Some((device, _serial)) = gpu() else {
        return;
    };
    let options = LoadOptions::dtype(Dtype::F32);
    let model = load_model::<Autodiff<Wgpu>>("llama", Some("llama_qv"), options, &device);
    // Materialised scores would be 4 heads x s² x 4 bytes a tensor: 16x from 1024 to 4096.
    let short = step_memory(&model, 1024, &device);
    let long = step_memory(&model, 4096, &device);
    eprintln!("device memory after a step: s=1024 {short} B, s=4096 {long} B");
    assert!(
        long < 6 * short,
        "4x the sequence took {:.1}x the memory",
        long as f64 / short as f64
    );
}
