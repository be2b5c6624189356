//! `swift-rs merge` and `eval --adapter` end to end: the merged model computes what the adapter
//! model computes (PEFT's logits), in a directory transformers reads, written all or nothing.

mod common;

use std::path::Path;
use std::process::Output;

use common::{adapter_dir, check_losses, eval_loss, golden, model_dir, swift_rs, B};
use swift_rs::config::Dtype;
use swift_rs::model::{self, LoadOptions};

fn merge(adapter: &str, base: &str, out: &Path, extra: &[&str]) -> Output {
    let (m, a) = (model_dir(base), adapter_dir(adapter));
    let mut args = vec![
        "merge",
        "--model",
        m.to_str().unwrap(),
        "--adapter",
        a.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    swift_rs(&args)
}

#[test]
fn merged_models_compute_what_the_adapters_compute() {
    for (adapter, base) in [
        ("llama_qv", "llama"),
        ("qwen2_rslora", "qwen2_bf16"),
        ("qwen3_dora", "qwen3_f16"),
        ("mistral_regex", "mistral"),
        ("qwen3_5_vl_lora", "qwen3_5_vl"),
        ("qwen3_5_text_dora", "qwen3_5_text"),
        ("qwen3_moe_lora", "qwen3_moe"),
        ("qwen3_5_moe_lora", "qwen3_5_moe"),
        // transformers 4.x's per-expert linears and the router, each merged as a linear.
        ("qwen3_moe_v4_lora", "qwen3_moe"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let run = merge(adapter, base, &out, &["--dtype", "f32"]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let (cfg, merged) =
            model::load::<B>(&out, LoadOptions::default(), None, &Default::default()).unwrap();
        assert_eq!(cfg.dtype, Some(Dtype::F32));
        let g = golden(
            &adapter_dir(adapter),
            &model_dir(base),
            "logits",
            cfg.vocab_size,
        );
        check_losses(&format!("{adapter} merged"), &merged, &g, 1e-4);
        assert!(out.join("tokenizer.json").exists() && out.join("generation_config.json").exists());
        if base.starts_with("qwen3_5") || base == "qwen3_moe" {
            // The vision tower, the mtp head and the experts (the hub's per-expert linears) go
            // along as they were, so transformers loads the merged directory as the class it
            // came from.
            let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
            let names = safetensors::SafeTensors::deserialize(&bytes)
                .unwrap()
                .names()
                .len();
            let source = std::fs::read(model_dir(base).join("model.safetensors")).unwrap();
            let source = safetensors::SafeTensors::deserialize(&source)
                .unwrap()
                .names()
                .len();
            assert_eq!(names, source, "{adapter}: merged tensors");
        }
    }
}

#[test]
fn merge_shards_with_an_index_and_writes_the_output_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    // qwen2_bf16 is a bf16 checkpoint: with no --dtype the merge is written in bf16.
    let run = merge(
        "qwen2_rslora",
        "qwen2_bf16",
        &out,
        &["--max-shard-size", "100KB"],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let files: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(files.len() > 1, "{files:?}");
    for f in &files {
        let bytes = std::fs::read(out.join(f)).unwrap();
        assert!(
            bytes.len() <= 100_000 + 4096,
            "{f} is {} bytes",
            bytes.len()
        );
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (_, view) in st.tensors() {
            assert_eq!(view.dtype(), safetensors::Dtype::BF16);
        }
    }
    // bf16 rounding of the merged weights moves the loss only slightly.
    let (_, merged) = model::load::<B>(
        &out,
        LoadOptions::dtype(Dtype::F32),
        None,
        &Default::default(),
    )
    .unwrap();
    let g = golden(
        &adapter_dir("qwen2_rslora"),
        &model_dir("qwen2_bf16"),
        "logits",
        331,
    );
    check_losses("qwen2_rslora merged to bf16", &merged, &g, 2e-2);
}

#[test]
fn a_misfit_adapter_writes_nothing_and_an_existing_output_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let run = merge("qwen3_dora", "llama", &out, &[]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.starts_with("error: cannot merge")
            && err.contains("has shape [96, 4], expected [64, 4]"),
        "{err}"
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "temporary files left behind"
    );
    // Not yet merged: adapters on the routed experts' stacks, refused before anything is read.
    let run = merge("qwen3_moe_experts_lora", "qwen3_moe", &out, &[]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("target_parameters") && err.contains("not supported yet"),
        "{err}"
    );
    assert!(!out.exists());
    std::fs::create_dir(&out).unwrap();
    let run = merge("llama_qv", "llama", &out, &[]);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("already exists"));
}

#[test]
fn eval_with_an_adapter_matches_peft_dense_and_on_nf4() {
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_dir("qwen3_dora").join("expected/losses.json")).unwrap(),
    )
    .unwrap();
    let (m, a) = (model_dir("qwen3_f16"), adapter_dir("qwen3_dora"));
    let data = model_dir("qwen3_f16").join("expected/inputs.jsonl");
    for (tag, extra) in [("logits", &[][..]), ("logits_nf4", &["--quant", "nf4"][..])] {
        let mut args = vec![
            "eval",
            "--model",
            m.to_str().unwrap(),
            "--adapter",
            a.to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
            "--dtype",
            "f32",
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let (loss, stdout) = eval_loss(&args);
        let expected = want[tag]["loss"].as_f64().unwrap();
        assert!(
            (loss - expected).abs() < 1e-4,
            "{tag}: {stdout} vs {expected}"
        );
    }
}
