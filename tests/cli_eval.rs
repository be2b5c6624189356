//! `swift-rs eval` as a user runs it: results equal transformers', and bad input gives one clear
//! `error:` line naming the culprit, the SPEC's exit code, and never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::{edit_config, eval_loss, model_copy, model_dir, printed, swift_rs_fails};

fn expected_losses(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(model_dir(name).join("expected/losses.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["logits"].clone()
}

/// Runs eval expecting failure; returns stderr after checking the error contract.
fn eval_fails(model: &Path, dataset: &Path, extra: &[&str], code: i32) -> String {
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        dataset.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--device") {
        args.extend(["--device", "cpu"]);
    }
    swift_rs_fails(&args, code)
}

fn inputs(name: &str) -> PathBuf {
    model_dir(name).join("expected/inputs.jsonl")
}

#[test]
fn eval_matches_transformers_and_writes_rows_in_order() {
    let want = expected_losses("llama_v4_sharded");
    let out_dir = tempfile::tempdir().unwrap();
    let out_file = out_dir.path().join("losses.jsonl");
    let model = model_dir("llama_v4_sharded");
    let data = inputs("llama_v4_sharded");
    let (loss, stdout) = eval_loss(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--output",
        out_file.to_str().unwrap(),
    ]);
    assert!(
        (loss - want["loss"].as_f64().unwrap()).abs() < 1e-4,
        "{stdout}"
    );
    let ppl = printed(&stdout, "perplexity");
    assert!((ppl.ln() - loss).abs() < 1e-5);
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want_rows = want["rows"].as_array().unwrap();
    assert_eq!(rows.len(), want_rows.len());
    for (i, (got, want)) in rows.iter().zip(want_rows).enumerate() {
        assert_eq!(got["index"], i);
        assert_eq!(got["tokens"], want["tokens"]);
        let d = got["loss"].as_f64().unwrap() - want["loss"].as_f64().unwrap();
        assert!(d.abs() < 1e-4, "row {i}: {got} vs {want}");
    }
}

#[test]
fn missing_model_directory_names_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let err = eval_fails(&dir.path().join("nope"), &inputs("llama"), &[], 2);
    assert!(err.contains("nope/config.json"), "{err}");
}

#[test]
fn missing_weights_are_named() {
    let dir = model_copy("llama");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = eval_fails(dir.path(), &inputs("llama"), &[], 1);
    assert!(
        err.contains("neither model.safetensors nor model.safetensors.index.json"),
        "{err}"
    );
}

#[test]
fn truncated_and_garbage_safetensors_are_named() {
    let dir = model_copy("llama");
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = eval_fails(dir.path(), &inputs("llama"), &[], 1);
    assert!(
        err.contains("model.safetensors is not a valid safetensors file"),
        "{err}"
    );
    std::fs::write(&file, b"this is not a checkpoint at all").unwrap();
    let err = eval_fails(dir.path(), &inputs("llama"), &[], 1);
    assert!(
        err.contains("model.safetensors is not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn missing_shard_is_named() {
    let dir = model_copy("llama_v4_sharded");
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let err = eval_fails(dir.path(), &inputs("llama_v4_sharded"), &[], 1);
    assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");
}

#[test]
fn unsupported_model_type_is_a_config_error() {
    let dir = model_copy("llama");
    edit_config(dir.path(), |c| c["model_type"] = "gpt2".into());
    let err = eval_fails(dir.path(), &inputs("llama"), &[], 2);
    assert!(err.contains("unsupported model_type \"gpt2\""), "{err}");
}

#[test]
fn every_missing_unexpected_and_misshaped_tensor_is_listed_at_once() {
    let dir = model_copy("mistral");
    // Two layers instead of three: layer 2's tensors are unexpected. A wider MLP: every
    // gate/up/down projection has the wrong shape. Bias on nothing changes; Llama with
    // attention_bias expects q/k/v/o biases the file lacks.
    edit_config(dir.path(), |c| {
        c["model_type"] = "llama".into();
        c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        c["num_hidden_layers"] = 2.into();
        c["intermediate_size"] = 90.into();
        c["attention_bias"] = true.into();
    });
    let err = eval_fails(dir.path(), &inputs("mistral"), &[], 1);
    for needle in [
        "unexpected tensor model.layers.2.mlp.down_proj.weight",
        "unexpected tensor model.layers.2.self_attn.q_proj.weight",
        "tensor model.layers.0.mlp.gate_proj.weight has shape [88, 64], expected [90, 64]",
        "tensor model.layers.1.mlp.down_proj.weight has shape [64, 88], expected [64, 90]",
        "missing tensor model.layers.0.self_attn.q_proj.bias",
        "missing tensor model.layers.1.self_attn.o_proj.bias",
    ] {
        assert!(err.contains(needle), "no {needle:?} in:\n{err}");
    }
}

/// A config saying 100000 layers printed 1.2 million lines.
#[test]
fn a_model_missing_thousands_of_tensors_lists_the_first_and_counts_the_rest() {
    let dir = model_copy("mistral");
    edit_config(dir.path(), |c| c["num_hidden_layers"] = 1000.into());
    let err = eval_fails(dir.path(), &inputs("mistral"), &[], 1);
    assert!(err.lines().count() < 60, "{} lines", err.lines().count());
    assert!(err.contains("missing tensor model.layers.3."), "{err}");
    assert!(err.contains("... and 8923 more"), "{err}");
}

#[test]
fn eval_output_may_not_name_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("rows.jsonl");
    std::fs::copy(inputs("mistral"), &dataset).unwrap();
    let before = std::fs::read(&dataset).unwrap();
    let same = dataset.to_str().unwrap();
    let err = eval_fails(&model_dir("mistral"), &dataset, &["--output", same], 2);
    assert!(err.contains("is the input"), "{err}");
    assert_eq!(std::fs::read(&dataset).unwrap(), before);
}

#[test]
fn token_ids_outside_the_vocabulary_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 331, 3]}\n",
    )
    .unwrap();
    let err = eval_fails(&model_dir("llama"), &data, &[], 1);
    assert!(err.contains("data.jsonl:2"), "{err}");
    assert!(
        err.contains("token id 331, outside the vocabulary [0, 331)"),
        "{err}"
    );
    std::fs::write(&data, "{\"input_ids\": [1, 2], \"labels\": [5]}\n").unwrap();
    let err = eval_fails(&model_dir("llama"), &data, &[], 1);
    assert!(
        err.contains("data.jsonl:1: labels has 1 entries, input_ids 2"),
        "{err}"
    );
}

#[test]
fn malformed_jsonl_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        "{\"input_ids\": [1, 2, 3]}\n\n{\"input_ids\": [1, 2,\n",
    )
    .unwrap();
    let err = eval_fails(&model_dir("llama"), &data, &[], 1);
    assert!(
        err.contains("data.jsonl:3: malformed JSON at column 20: EOF while parsing"),
        "{err}"
    );
    std::fs::write(&data, "{\"text\": \"raw text is not tokenized\"}\n").unwrap();
    let err = eval_fails(&model_dir("llama"), &data, &[], 1);
    assert!(
        err.contains("data.jsonl:1") && err.contains("input_ids"),
        "{err}"
    );
    std::fs::write(&data, "").unwrap();
    let err = eval_fails(&model_dir("llama"), &data, &[], 1);
    assert!(err.contains("data.jsonl holds no rows"), "{err}");
    let err = eval_fails(
        &model_dir("llama"),
        &dir.path().join("absent.jsonl"),
        &[],
        1,
    );
    assert!(err.contains("absent.jsonl"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    let err = eval_fails(
        &model_dir("llama"),
        &inputs("llama"),
        &["--dtype", "int8"],
        2,
    );
    assert!(err.contains("int8"), "{err}");
    let err = eval_fails(
        &model_dir("llama"),
        &inputs("llama"),
        &["--batch-size", "0"],
        2,
    );
    assert!(err.contains("--batch-size"), "{err}");
    #[cfg(not(feature = "cuda"))]
    {
        let err = eval_fails(
            &model_dir("llama"),
            &inputs("llama"),
            &["--device", "cuda"],
            2,
        );
        assert!(err.contains("built without CUDA"), "{err}");
    }
}

#[test]
fn malformed_config_json_is_named() {
    let dir = model_copy("qwen3_f16");
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"qwen3\",",
    )
    .unwrap();
    let err = eval_fails(dir.path(), &inputs("qwen3_f16"), &[], 2);
    assert!(err.contains("config.json is not valid JSON"), "{err}");
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"qwen3\"}",
    )
    .unwrap();
    let err = eval_fails(dir.path(), &inputs("qwen3_f16"), &[], 2);
    assert!(
        err.contains("config.json") && err.contains("vocab_size"),
        "{err}"
    );
}
