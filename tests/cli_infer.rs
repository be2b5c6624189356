//! `swift-rs infer` as a user runs it: replies equal transformers' greedy `generate` through the
//! chat template (with and without an adapter, on NF4 weights), for `--prompt`, `--dataset` in
//! batches and the interactive chat; stop ids from generation_config.json; seeded sampling that
//! does not depend on the batch; bad input named, with the SPEC's exit codes.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::fake_hub::{FakeHub, Repo};
use common::{adapter_dir, fixtures, model_dir, swift_rs_fails, swift_rs_ok};
use serde_json::{json, Value};

fn chat() -> Value {
    let text = std::fs::read_to_string(fixtures().join("generation.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["chat"].clone()
}

fn chat_model() -> PathBuf {
    model_dir(chat()["model"].as_str().unwrap())
}

/// `infer` on the chat model in f32, greedy, as long as the fixture's replies; `extra` after.
fn infer_args(model: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--dtype",
        "f32",
        "--temperature",
        "0",
        "--device",
        "cpu",
        "--max-new-tokens",
        &chat()["max_new_tokens"].to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The fixture's adapter and quantization flags of a case.
fn case_flags(case: &Value) -> Vec<String> {
    let mut flags = Vec::new();
    if let Some(adapter) = case["adapter"].as_str() {
        flags.push("--adapter".to_string());
        flags.push(adapter_dir(adapter).to_str().unwrap().to_string());
    }
    if case["nf4"].as_bool().unwrap() {
        flags.extend(["--quant".to_string(), "nf4".to_string()]);
    }
    flags
}

#[test]
fn prompt_replies_equal_transformers() {
    let chat = chat();
    let mut checked = 0;
    for case in chat["cases"].as_array().unwrap() {
        let messages = case["messages"].as_array().unwrap();
        let user = messages.last().unwrap()["content"].as_str().unwrap();
        let mut flags = case_flags(case);
        match messages.len() {
            1 => {}
            2 => flags.extend([
                "--system".to_string(),
                messages[0]["content"].as_str().unwrap().to_string(),
            ]),
            _ => continue, // a second turn: the chat test's
        }
        flags.extend(["--prompt".to_string(), user.to_string()]);
        let stdout = swift_rs_ok(&infer_args(
            &chat_model(),
            &flags.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        let want = case["response"].as_str().unwrap();
        assert_eq!(stdout, format!("{want}\n"), "{case}");
        checked += 1;
    }
    assert_eq!(checked, 7);
}

#[test]
fn dataset_replies_in_batches_equal_transformers_in_input_order() {
    let chat = chat();
    let cases: Vec<&Value> = chat["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["adapter"].as_str() == Some("qwen2_rslora") && !c["nf4"].as_bool().unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("rows.jsonl");
    let mut text = String::new();
    for case in &cases {
        // The reference answer after the last user turn is not part of the prompt.
        let mut messages = case["messages"].as_array().unwrap().clone();
        messages.push(json!({"role": "assistant", "content": "a reference answer"}));
        text.push_str(&json!({ "messages": messages }).to_string());
        text.push('\n');
    }
    std::fs::write(&dataset, text).unwrap();
    let output = dir.path().join("out.jsonl");
    swift_rs_ok(&infer_args(
        &chat_model(),
        &[
            "--adapter",
            adapter_dir("qwen2_rslora").to_str().unwrap(),
            "--dataset",
            dataset.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--batch-size",
            "3",
        ],
    ));
    let rows: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), cases.len());
    for (i, (row, case)) in rows.iter().zip(&cases).enumerate() {
        assert_eq!(row["index"], i);
        assert_eq!(row["messages"], case["messages"]);
        assert_eq!(row["response"], case["response"], "row {i}");
        assert_eq!(row["labels"], "a reference answer");
    }
}

/// Runs `infer` with `input` on standard input (not a terminal: no prompts are printed).
fn infer_with_input(args: &[String], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_swift-rs"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn the_chat_keeps_history_until_cleared() {
    let chat = chat();
    let cases: Vec<&Value> = chat["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["adapter"].is_null())
        .collect();
    let response = |content: &str, turns: usize| {
        cases
            .iter()
            .find(|c| {
                let m = c["messages"].as_array().unwrap();
                m.len() == turns && m.last().unwrap()["content"] == content
            })
            .unwrap()["response"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (hello, then) = (response("Hello", 1), response("What can you do?", 3));
    let out = infer_with_input(
        &infer_args(&chat_model(), &[]),
        "Hello\nWhat can you do?\nclear\nHello\nmulti-line\nWhat can\nyou do?#\nquit\nHello\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Multi-line input is one turn ("What can\nyou do?"): not the fixture's turn, so only its
    // presence is checked, then `quit` ends the chat before the last line.
    let stdout = String::from_utf8(out.stdout).unwrap();
    let expected = format!("{hello}\n{then}\n{hello}\n");
    assert!(
        stdout.starts_with(&expected),
        "{stdout:?}\nvs\n{expected:?}"
    );
    assert!(
        stdout.len() > expected.len(),
        "the multi-line turn is answered"
    );
    assert!(
        !stdout[expected.len()..].contains(&hello),
        "quit ends the chat"
    );
}

/// A copy of the chat model whose generation_config.json is `config`.
fn with_generation_config(config: Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(chat_model()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.path().join("generation_config.json"),
        config.to_string(),
    )
    .unwrap();
    dir
}

#[test]
fn replies_stop_at_the_eos_ids_of_generation_config() {
    let chat = chat();
    let case = &chat["cases"][0];
    let tokens = common::ids(&case["tokens"]);
    // The fourth token is a stop id: the reply is the three before it.
    let model = with_generation_config(json!({"eos_token_id": tokens[3]}));
    let stdout = swift_rs_ok(&infer_args(model.path(), &["--prompt", "Who are you?"]));
    let tokenizer = tokenizers::Tokenizer::from_file(chat_model().join("tokenizer.json")).unwrap();
    assert_eq!(
        stdout,
        format!("{}\n", tokenizer.decode(&tokens[..3], false).unwrap())
    );
}

/// `infer_args` without its `--temperature 0`: `extra` sets its own, or leaves it to
/// generation_config.json.
fn sampling_args(model: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = infer_args(model, extra);
    let t = args.iter().position(|a| a == "--temperature").unwrap();
    args.drain(t..t + 2);
    args
}

/// `--dataset` replies of five prompts, sampled.
fn sampled_replies(model: &Path, extra: &[&str], batch_size: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("rows.jsonl");
    let rows: String = ["Hello", "Who are you?", "你好", "What can you do?", "Hi"]
        .iter()
        .map(|q| json!({"query": q}).to_string() + "\n")
        .collect();
    std::fs::write(&dataset, rows).unwrap();
    let output = dir.path().join("out.jsonl");
    let mut flags = vec![
        "--dataset",
        dataset.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--batch-size",
        batch_size,
    ];
    flags.extend_from_slice(extra);
    swift_rs_ok(&sampling_args(model, &flags));
    std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["response"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn seeded_sampling_is_reproducible_and_independent_of_the_batch() {
    let model = chat_model();
    let sample = ["--temperature", "1.0", "--top-k", "0", "--seed", "11"];
    let one_by_one = sampled_replies(&model, &sample, "1");
    assert_eq!(sampled_replies(&model, &sample, "4"), one_by_one);
    let other_seed = ["--temperature", "1.0", "--top-k", "0", "--seed", "12"];
    assert_ne!(sampled_replies(&model, &other_seed, "4"), one_by_one);
    // With no --temperature the model's generation_config decides: do_sample there samples.
    let sampling_model = with_generation_config(
        json!({"eos_token_id": [2, 0], "do_sample": true, "temperature": 1.0, "top_k": 0}),
    );
    let greedy = sampled_replies(&model, &["--seed", "11"], "4");
    assert_eq!(
        sampled_replies(sampling_model.path(), &["--seed", "11"], "4"),
        one_by_one
    );
    assert_ne!(greedy, one_by_one);
}

#[test]
fn bad_input_is_named_with_the_spec_exit_codes() {
    let model = chat_model();
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("rows.jsonl");
    std::fs::write(
        &dataset,
        "{\"query\": \"Hi\"}\n{\"messages\": [{\"role\": \"system\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let (d, o) = (dataset.to_str().unwrap(), output.to_str().unwrap());
    let stderr = swift_rs_fails(&infer_args(&model, &["--dataset", d, "--output", o]), 2);
    assert!(
        stderr.contains("rows.jsonl:2") && stderr.contains("no user turn"),
        "{stderr}"
    );
    assert!(!output.exists(), "nothing is written for a bad dataset");

    let stderr = swift_rs_fails(&infer_args(&model, &["--dataset", d]), 2);
    assert!(stderr.contains("--output"), "{stderr}");
    let stderr = swift_rs_fails(&infer_args(&model, &["--top-p", "1.5", "--prompt", "x"]), 2);
    assert!(stderr.contains("top_p"), "{stderr}");
    let stderr = swift_rs_fails(
        &sampling_args(&model, &["--temperature=-1", "--prompt", "x"]),
        2,
    );
    assert!(stderr.contains("temperature"), "{stderr}");

    let broken = with_generation_config(json!({"eos_token_id": "not an id"}));
    let stderr = swift_rs_fails(&infer_args(broken.path(), &["--prompt", "x"]), 2);
    assert!(stderr.contains("generation_config.json"), "{stderr}");

    let missing = dir.path().join("no-model");
    let stderr = swift_rs_fails(&infer_args(&missing, &["--prompt", "x"]), 2);
    assert!(stderr.contains("no-model"), "{stderr}");
    let stderr = swift_rs_fails(
        &infer_args(
            &model,
            &["--adapter", missing.to_str().unwrap(), "--prompt", "x"],
        ),
        1,
    );
    assert!(stderr.contains("no-model"), "{stderr}");
}

/// `--output` used to be opened only once every reply was generated.
#[test]
fn a_bad_output_path_fails_before_generating_and_an_input_is_never_overwritten() {
    let model = chat_model();
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("rows.jsonl");
    std::fs::write(&dataset, "{\"query\": \"Hi\"}\n").unwrap();
    let d = dataset.to_str().unwrap();
    let nowhere = dir.path().join("no/such/dir/out.jsonl");
    let stderr = swift_rs_fails(
        &infer_args(
            &model,
            &["--dataset", d, "--output", nowhere.to_str().unwrap()],
        ),
        2,
    );
    assert!(stderr.contains("--output"), "{stderr}");
    assert!(
        !stderr.contains("generation:"),
        "it generated first:\n{stderr}"
    );
    let stderr = swift_rs_fails(&infer_args(&model, &["--dataset", d, "--output", d]), 2);
    assert!(stderr.contains("is the input"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&dataset).unwrap(),
        "{\"query\": \"Hi\"}\n"
    );
}

#[test]
fn a_prompt_past_the_models_positions_is_warned_about() {
    let model = with_generation_config(json!({}));
    common::edit_config(model.path(), |c| c["max_position_embeddings"] = 8.into());
    let args = infer_args(model.path(), &["--prompt", "Who are you? Tell me."]);
    let out = common::swift_rs(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("max_position_embeddings = 8"), "{stderr}");
    let args = infer_args(&chat_model(), &["--prompt", "Who are you?"]);
    let out = common::swift_rs(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("max_position_embeddings"));
}

#[test]
fn a_merged_model_directory_answers_as_base_plus_adapter() {
    let chat = chat();
    let case = chat["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["adapter"].as_str() == Some("qwen2_rslora") && !c["nf4"].as_bool().unwrap())
        .unwrap()
        .clone();
    let dir = tempfile::tempdir().unwrap();
    let merged = dir.path().join("merged");
    swift_rs_ok(
        &[
            "merge",
            "--model",
            chat_model().to_str().unwrap(),
            "--adapter",
            adapter_dir("qwen2_rslora").to_str().unwrap(),
            "--output",
            merged.to_str().unwrap(),
            "--dtype",
            "f32",
        ]
        .map(String::from),
    );
    let user = case["messages"][0]["content"].as_str().unwrap();
    let stdout = swift_rs_ok(&infer_args(&merged, &["--prompt", user]));
    assert_eq!(stdout, format!("{}\n", case["response"].as_str().unwrap()));
}

#[test]
fn hub_ids_answer_as_the_local_directories() {
    let chat = chat();
    let case = chat["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["adapter"].as_str() == Some("qwen2_rslora") && !c["nf4"].as_bool().unwrap())
        .unwrap()
        .clone();
    let user = case["messages"][0]["content"].as_str().unwrap();
    let want = format!("{}\n", case["response"].as_str().unwrap());
    let hub = FakeHub::start(vec![
        ("org/chat", Repo::from_dir(&chat_model(), &[])),
        (
            "org/rslora",
            Repo::from_dir(&adapter_dir("qwen2_rslora"), &[]),
        ),
    ]);
    let home = tempfile::tempdir().unwrap();
    let infer = |hub: &FakeHub, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = infer_args(Path::new("org/chat"), &["--adapter", "org/rslora"]);
        args.extend(["--prompt", user].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_swift-rs"));
        hub.point_at(&mut command, home.path())
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    // The Hugging Face Hub by default; ModelScope by --hub or by ms-swift's USE_HF=0.
    for (extra, env, cache) in [
        (&[][..], &[][..], "hf/hub/models--org--chat"),
        (
            &["--hub", "modelscope"][..],
            &[][..],
            "modelscope/models/org--chat",
        ),
        (
            &[][..],
            &[("USE_HF", "0")][..],
            "modelscope/models/org--chat",
        ),
    ] {
        let out = infer(&hub, extra, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?} {env:?}: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            want,
            "{extra:?} {env:?}"
        );
        assert!(home.path().join(cache).is_dir(), "{cache}");
    }
    // Offline, from the cache, with the hub gone.
    drop(hub);
    let hub = FakeHub::start(vec![]);
    let out = infer(&hub, &[], &[("HF_HUB_OFFLINE", "1")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    assert!(hub.seen().is_empty(), "{:?}", hub.seen());

    let mut command = Command::new(env!("CARGO_BIN_EXE_swift-rs"));
    let out = hub
        .point_at(&mut command, home.path())
        .args(infer_args(Path::new("org/nothing"), &["--prompt", "Hi"]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("org/nothing is neither a local directory nor a repo on")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// `--temperature -1` (a space, not `=`) was clap's "unexpected argument"; a directory without
/// config.json was reported as a missing chat template; `--max-new-tokens` past the model's
/// positions went unsaid.
#[test]
fn negative_values_empty_directories_and_long_replies_are_named() {
    let model = chat_model();
    let stderr = swift_rs_fails(
        &sampling_args(&model, &["--temperature", "-1", "--prompt", "x"]),
        2,
    );
    assert!(stderr.contains("temperature"), "{stderr}");
    assert!(!stderr.contains("unexpected argument"), "{stderr}");

    let empty = tempfile::tempdir().unwrap();
    let stderr = swift_rs_fails(&infer_args(empty.path(), &["--prompt", "x"]), 2);
    assert!(
        stderr.contains(&format!(
            "no {}: ",
            empty.path().join("config.json").display()
        )) && stderr.contains("is not a model directory"),
        "{stderr}"
    );
    assert!(!stderr.contains("template"), "{stderr}");

    let short = with_generation_config(json!({}));
    common::edit_config(short.path(), |c| c["max_position_embeddings"] = 8.into());
    let mut args = infer_args(short.path(), &["--prompt", "Hi"]);
    let n = args.iter().position(|a| a == "--max-new-tokens").unwrap();
    args[n + 1] = "9".into();
    let out = common::swift_rs(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--max-new-tokens 9 is past the model's max_position_embeddings = 8"),
        "{stderr}"
    );
}
