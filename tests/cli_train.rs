//! `swift-rs train` as a user runs it: the quickstart end to end (run directory, logs, plots,
//! TensorBoard events, a falling loss, an adapter that answers as taught), config errors, a refused run directory, and Ctrl-C.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::fake_hub::{FakeHub, Repo};
use common::swift_rs_fails;
use serde_json::Value;
use swift_rs::config::{Dtype, TrainConfig};

const QUICKSTART: &str = "configs/quickstart.toml";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn quickstart_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--config", QUICKSTART, "--set"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(format!("output.dir={}", out.display()));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run_in_root(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_swift-rs"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run swift-rs")
}

#[test]
fn the_quickstart_trains_and_fills_the_run_directory() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let result = run_in_root(&quickstart_args(&run, &[]));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("done: 360 steps"), "{stderr}");

    // config.toml: every default resolved, and it loads back as the config that ran.
    let written = TrainConfig::load(&run.join("config.toml"), &[]).unwrap();
    let mut expected = TrainConfig::load(
        &root().join(QUICKSTART),
        &[format!("output.dir={}", run.display())],
    )
    .unwrap();
    expected.model.dtype = Some(Dtype::F32); // "auto" on a CPU
                                             // A local model is recorded by its absolute path, so the checkpoints find it from anywhere.
    expected.model.path = root()
        .join("examples/quickstart-model")
        .display()
        .to_string();
    assert_eq!(written, expected);

    let lines: Vec<Value> = std::fs::read_to_string(run.join("logging.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 36, "every 10th of 360 steps");
    for key in [
        "step",
        "epoch",
        "loss",
        "grad_norm",
        "learning_rate",
        "tokens_per_sec",
        "memory_gib",
        "elapsed_s",
        "eta_s",
    ] {
        assert!(
            lines.iter().all(|l| l[key].is_number()),
            "{key} in every line"
        );
    }
    let loss = |i: usize| lines[i]["loss"].as_f64().unwrap();
    assert!(
        loss(0) > 5.0,
        "a random model starts near ln(vocab): {}",
        loss(0)
    );
    assert!(
        loss(35) < 1.0,
        "the loss falls: {} -> {}",
        loss(0),
        loss(35)
    );
    assert_eq!(lines[35]["epoch"].as_f64(), Some(expected.train.epochs));

    for step in [180, 360] {
        let dir = run.join(format!("checkpoint-{step}"));
        assert!(dir.join("adapter_model.safetensors").is_file());
    }
    for png in ["train_loss.png", "learning_rate.png"] {
        let bytes = std::fs::read(run.join("images").join(png)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png}");
    }
    assert!(
        !run.join("images/eval_loss.png").exists(),
        "no validation set"
    );
    let events: Vec<_> = std::fs::read_dir(run.join("runs"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(events.len(), 1);
    let name = events[0].file_name().to_string_lossy().to_string();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let bytes = std::fs::read(events[0].path()).unwrap();
    assert!(
        bytes.windows(10).any(|w| w == b"train/loss"),
        "the event file holds the loss"
    );

    // The adapter loads where any PEFT adapter does: `swift-rs eval --adapter`.
    let (loss_with, _) = common::eval_loss(&[
        "eval",
        "--model",
        &root()
            .join("examples/quickstart-model")
            .display()
            .to_string(),
        "--adapter",
        &run.join("checkpoint-360").display().to_string(),
        "--dataset",
        &write_encoded(&run, out.path()),
    ]);
    assert!(loss_with < 1.0, "{loss_with}");

    // And it answers as it was taught, as the README's `infer` command shows.
    let reply = run_in_root(&[
        "infer".into(),
        "--model".into(),
        "examples/quickstart-model".into(),
        "--adapter".into(),
        run.join("checkpoint-360").display().to_string(),
        "--prompt".into(),
        "Who are you?".into(),
    ]);
    let stdout = String::from_utf8_lossy(&reply.stdout);
    assert!(
        reply.status.success(),
        "{}",
        String::from_utf8_lossy(&reply.stderr)
    );
    // One of the answers it was taught, word for word. Which one is not fixed: a run under other
    // CPU load answered "Who are you?" with the one taught for "Who trained you?".
    let taught: Vec<String> = std::fs::read_to_string(root().join("datasets/self_cognition.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let row: Value = serde_json::from_str(l).unwrap();
            row["messages"][1]["content"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(
        taught.iter().any(|a| stdout.contains(a.as_str())),
        "{stdout}"
    );
}

#[test]
fn a_hub_id_trains_and_is_the_adapters_base_model() {
    let hub = FakeHub::start(vec![(
        "org/quick",
        Repo::from_dir(&root().join("examples/quickstart-model"), &[]),
    )]);
    let home = tempfile::tempdir().unwrap();
    for (hub_setting, cache) in [
        ("model.hub=huggingface", "hf/hub/models--org--quick"),
        ("model.hub=modelscope", "modelscope/models/org--quick"),
    ] {
        let run = home.path().join(hub_setting);
        let args = quickstart_args(
            &run,
            &[
                "--set",
                "model.path=org/quick",
                "--set",
                hub_setting,
                "--set",
                "train.max_steps=2",
            ],
        );
        let mut command = Command::new(env!("CARGO_BIN_EXE_swift-rs"));
        let out = hub
            .point_at(&mut command, home.path())
            .args(&args)
            .current_dir(root())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{hub_setting}: {stderr}");
        assert!(home.path().join(cache).is_dir(), "{cache}");
        // As PEFT writes it: the id the model was named by, which PEFT and vLLM resolve again.
        let adapter: Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("checkpoint-2/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(adapter["base_model_name_or_path"], "org/quick");
        let config = TrainConfig::load(&run.join("config.toml"), &[]).unwrap();
        assert_eq!(config.model.path, "org/quick");
    }
}

/// `--dataset org/name[:subset][#N]` from ModelScope (ms-swift's default) or from the Hugging
/// Face Hub, by prefix, ms-swift's --use_hf or USE_HF, into each hub's own dataset cache; the
/// train split only.
#[test]
fn ms_swift_datasets_by_hub_id_train() {
    let rows = std::fs::read(root().join("datasets/self_cognition.jsonl")).unwrap();
    let hub = FakeHub::start(vec![(
        "datasets/org/self-cognition",
        Repo::from_files(&[
            ("README.md", b"#"),
            ("default/train.jsonl", &rows),
            // Not the train split, which is all ms-swift reads: a bad row here is never seen.
            ("default/test.jsonl", b"not json\n"),
        ]),
    )]);
    let home = tempfile::tempdir().unwrap();
    let hf_cache = "hf/hub/datasets--org--self-cognition/snapshots";
    let ms_cache = "modelscope/datasets/org--self-cognition/snapshots/master";
    for (dataset, use_hf, cache) in [
        (
            &["--dataset", "hf::org/self-cognition:default#8"][..],
            "",
            hf_cache,
        ),
        (
            &["--dataset", "org/self-cognition#8", "--use_hf", "true"][..],
            "",
            hf_cache,
        ),
        (&["--dataset", "org/self-cognition#8"][..], "1", hf_cache),
        (
            &["--dataset", "org/self-cognition:default#8"][..],
            "",
            ms_cache,
        ),
        (
            &["--dataset", "ms::org/self-cognition#8"][..],
            "1",
            ms_cache,
        ),
    ] {
        let run = home.path().join("run");
        let mut args = vec![
            "sft",
            "--model",
            "examples/quickstart-model",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "1",
            "--output_dir",
            run.to_str().unwrap(),
            "--add_version",
            "false",
            "--overwrite_output_dir",
            "true",
        ];
        args.extend_from_slice(dataset);
        let mut command = Command::new(env!("CARGO_BIN_EXE_swift-rs"));
        hub.point_at(&mut command, home.path());
        let _ = std::fs::remove_dir_all(home.path().join("hf"));
        let _ = std::fs::remove_dir_all(home.path().join("modelscope"));
        let out = command
            .env("USE_HF", use_hf)
            .args(&args)
            .current_dir(root())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{dataset:?}: {stderr}");
        assert!(stderr.contains("done: 2 steps"), "{stderr}");
        assert!(
            home.path().join(cache).is_dir(),
            "{dataset:?} USE_HF={use_hf}: {stderr}"
        );
    }
    // A subset the repo does not have is named with the ones it has.
    let mut command = Command::new(env!("CARGO_BIN_EXE_swift-rs"));
    let out = hub
        .point_at(&mut command, home.path())
        .args(["sft", "--model", "examples/quickstart-model"])
        .args([
            "--dataset",
            "hf::org/self-cognition:nope",
            "--max_steps",
            "1",
        ])
        .args(["--output_dir", home.path().join("x").to_str().unwrap()])
        .current_dir(root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no subset \"nope\" (its folders: default)"),
        "{stderr}"
    );
}

/// ms-swift's `swift/self-cognition` (on the Hugging Face Hub `modelscope/self-cognition`), in its
/// real schema: `{{NAME}}` / `{{AUTHOR}}` filled in by language from --model_name and
/// --model_author, and its `empty_think` subset's empty reasoning block before each answer.
#[test]
fn swift_self_cognition_is_made_as_ms_swift_makes_it() {
    let rows = concat!(
        r#"{"query": "你是谁？", "response": "我是{{NAME}}，由{{AUTHOR}}训练。", "tag": "zh"}"#,
        "\n",
        r#"{"query": "Who are you?", "response": "I am {{NAME}}, trained by {{AUTHOR}}.", "tag": "en"}"#,
        "\n"
    );
    let hub = FakeHub::start(vec![(
        "datasets/modelscope/self-cognition",
        Repo::from_files(&[("self_cognition.jsonl", rows.as_bytes())]),
    )]);
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\n[data]\ntrain = [\"swift/self-cognition:empty_think\"]\n\
             hub = \"huggingface\"\nshuffle = false\nmodel_name = [\"小黄\", \"Xiao Huang\"]\n\
             model_author = [\"魔搭\", \"ModelScope\"]\n",
            root()
                .join("examples/quickstart-model")
                .display()
                .to_string()
        ),
    )
    .unwrap();
    let out = home.path().join("rows.jsonl");
    let mut command = Command::new(env!("CARGO_BIN_EXE_swift-rs"));
    let run = hub
        .point_at(&mut command, home.path())
        .args(["encode", "--config", config.to_str().unwrap(), "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let tokenizer =
        tokenizers::Tokenizer::from_file(root().join("examples/quickstart-model/tokenizer.json"))
            .unwrap();
    let answers: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).unwrap();
            let labels: Vec<u32> = row["labels"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|l| l.as_i64().filter(|&l| l >= 0).map(|l| l as u32))
                .collect();
            tokenizer.decode(&labels, false).unwrap()
        })
        .collect();
    assert_eq!(answers.len(), 2);
    assert!(
        answers[0].starts_with("<think>\n\n</think>\n\n我是小黄，由魔搭训练。"),
        "{answers:?}"
    );
    assert!(
        answers[1].starts_with("<think>\n\n</think>\n\nI am Xiao Huang, trained by ModelScope."),
        "{answers:?}"
    );
}

/// The quickstart's rows as `swift-rs encode` writes them, for `eval`.
fn write_encoded(run: &Path, dir: &Path) -> String {
    let path = dir.join("encoded.jsonl");
    let out = run_in_root(&[
        "encode".into(),
        "--config".into(),
        run.join("config.toml").display().to_string(),
        "--output".into(),
        path.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path.display().to_string()
}

#[test]
fn config_errors_name_the_key_and_exit_2() {
    let out = tempfile::tempdir().unwrap();
    let config = out.path().join("bad.toml");
    std::fs::write(
        &config,
        "[model]\npath = \"examples/quickstart-model\"\n[data]\ntrain = [\"x.jsonl\"]\n[train]\nlearning_rat = 1e-4\n",
    )
    .unwrap();
    let stderr = swift_rs_fails(&["train", "--config", &config.display().to_string()], 2);
    assert!(
        stderr.contains("train.learning_rat") && stderr.contains(":6"),
        "{stderr}"
    );

    let result = run_in_root(&quickstart_args(
        out.path(),
        &["--set", "train.optimizer=adam"],
    ));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("train.optimizer"), "{stderr}");
}

/// A LoRA config that fits no layer is the config's fault: exit 2, as SPEC says (it was 1).
#[test]
fn a_lora_config_that_fits_no_layer_exits_2() {
    let out = tempfile::tempdir().unwrap();
    let args = quickstart_args(
        &out.path().join("run"),
        &["--set", "lora.target_modules=[\"nope_proj\"]"],
    );
    let stderr = swift_rs_fails(&args, 2);
    assert!(
        stderr.contains("[\"nope_proj\"] matches no linear layer"),
        "{stderr}"
    );
}

#[test]
fn a_directory_holding_a_run_is_refused_with_exit_2() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let first = run_in_root(&quickstart_args(&run, &["--set", "train.max_steps=2"]));
    assert!(first.status.success());
    let again = run_in_root(&quickstart_args(&run, &["--set", "train.max_steps=2"]));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("resume_from") && stderr.contains("overwrite"),
        "{stderr}"
    );
}

#[test]
fn ctrl_c_finishes_the_step_saves_and_exits_0() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let args = quickstart_args(
        &run,
        &[
            "--set",
            "train.max_steps=100000",
            "--set",
            "train.logging_steps=1",
        ],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_swift-rs"))
        .args(&args)
        .current_dir(root())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut text = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        text.push_str(&line);
        if line.starts_with("step 2/") {
            let ok = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(ok.success());
            break;
        }
        line.clear();
    }
    std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("stopped at step"), "{text}");
    let saved = swift_rs::train::checkpoint::list(&run);
    assert_eq!(saved.len(), 1, "{text}");
    assert!(saved[0].0 >= 2 && saved[0].0 < 100000);
}

fn args_of(line: &str, extra: &[&str]) -> Vec<String> {
    let words = line.split_whitespace().chain(extra.iter().copied());
    words.map(str::to_string).collect()
}

/// ms-swift's examples/train/lora_sft.sh with `swift` replaced by `swift-rs`, and the tiny local
/// model and dataset in place of the hub ids.
#[test]
fn ms_swifts_lora_sft_command_line_runs_as_it_is() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("output");
    let system = out.path().join("system.txt");
    std::fs::write(&system, "You are a helpful assistant.\n").unwrap();
    let line = format!(
        "sft --model examples/quickstart-model --tuner_type lora \
         --dataset datasets/self_cognition.jsonl#20 --torch_dtype float32 --num_train_epochs 1 \
         --per_device_train_batch_size 4 --per_device_eval_batch_size 1 --learning_rate 1e-4 \
         --lora_rank 8 --lora_alpha 32 --target_modules all-linear \
         --gradient_accumulation_steps 2 --eval_steps 50 --save_steps 50 --save_total_limit 2 \
         --logging_steps 1 --max_length 256 --output_dir {} --system {} --warmup_ratio 0.05 \
         --dataset_num_proc 4 --dataloader_num_workers 4",
        run.display(),
        system.display()
    );
    let result = run_in_root(&args_of(&line, &[]));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("done: 3 steps"), "{stderr}");
    for flag in ["dataloader_num_workers", "per_device_eval_batch_size"] {
        assert!(
            stderr.contains(&format!("note: --{flag} has no effect")),
            "{stderr}"
        );
    }
    // ms-swift's layout: the run in output_dir/v0-YYYYMMDD-HHMMSS, args.json beside the adapter.
    let versions: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(versions.len(), 1, "{versions:?}");
    let version = &versions[0];
    let name = version.file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with("v0-") && name.len() == "v0-20261130-102930".len(),
        "{name}"
    );
    let ran = TrainConfig::load(&version.join("config.toml"), &[]).unwrap();
    assert_eq!(
        (ran.lora.r, ran.lora.alpha, ran.train.grad_accum),
        (8, 32.0, 2)
    );
    assert_eq!(
        ran.model.system.as_deref(),
        Some("You are a helpful assistant.")
    );
    assert_eq!(ran.data.train, ["datasets/self_cognition.jsonl#20"]);
    assert_eq!(ran.data.num_proc, Some(4));
    let checkpoint = version.join("checkpoint-3");
    assert!(checkpoint.join("adapter_model.safetensors").exists());
    let args: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("args.json")).unwrap())
            .unwrap();
    let model = root().join("examples/quickstart-model");
    assert_eq!(args["model"], model.display().to_string());
    assert_eq!(args["system"], "You are a helpful assistant.");
    assert_eq!(args["lora_rank"], 8);

    // ms-swift's next steps, as its docs write them: infer and export find the model, template
    // and system prompt in the checkpoint; the merged model answers as base + adapter.
    let ck = checkpoint.to_str().unwrap().to_string();
    let ask = |model: &[&str]| {
        let mut args = vec!["infer"];
        args.extend_from_slice(model);
        args.extend([
            "--prompt",
            "Who are you?",
            "--max_new_tokens",
            "6",
            "--temperature",
            "0",
            "--stream",
            "true",
            "--device",
            "cpu",
            "--torch_dtype",
            "float32",
        ]);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = run_in_root(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        (String::from_utf8_lossy(&out.stdout).to_string(), stderr)
    };
    let (with_adapter, stderr) = ask(&["--adapters", &ck]);
    assert!(stderr.contains("note: --stream has no effect"), "{stderr}");
    let export = args_of(
        &format!("export --adapters {ck} --merge_lora true --device cpu"),
        &[],
    );
    let exported = run_in_root(&export);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let merged = format!("{ck}-merged");
    assert!(Path::new(&merged).join("config.json").exists());
    // The merged model has no args.json: the template and system prompt are given again.
    let (from_merged, _) = ask(&[
        "--model",
        &merged,
        "--template",
        "qwen2_5",
        "--system",
        "You are a helpful assistant.",
    ]);
    assert_eq!(with_adapter, from_merged);

    // The next run goes into v1-..., and --add_version false writes into output_dir itself.
    let again: Vec<String> = args_of(&line, &["--max_steps", "1"]);
    assert!(run_in_root(&again).status.success());
    assert!(std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .any(|e| { e.file_name().to_string_lossy().starts_with("v1-") }));
    let flat = out.path().join("flat");
    let line = line.replace(&run.display().to_string(), &flat.display().to_string());
    let unversioned = args_of(&line, &["--max_steps", "1", "--add_version", "false"]);
    assert!(run_in_root(&unversioned).status.success());
    assert!(flat.join("checkpoint-1/args.json").exists());

    // What swift-rs cannot do is refused before anything runs, naming the flag.
    let refused: Vec<String> = ["sft", "--model", "m", "--deepspeed", "zero2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let stderr = swift_rs_fails(&refused, 2);
    assert!(
        stderr.contains("--deepspeed zero2: not supported"),
        "{stderr}"
    );
}

#[test]
fn every_recipe_loads() {
    for entry in std::fs::read_dir(root().join("configs")).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config = TrainConfig::load(&path, &[]);
            assert!(
                config.is_ok(),
                "{}: {}",
                path.display(),
                config.unwrap_err()
            );
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("# swift-rs "),
                "{} opens with its command",
                path.display()
            );
        }
    }
}

/// `swift-rs sft ...` from the repository root, for `steps` steps into `out`, with `extra` flags.
fn sft_steps(out: &Path, steps: u32, extra: &[&str]) -> std::process::Output {
    let line = format!(
        "sft --model examples/quickstart-model --dataset datasets/self_cognition.jsonl#8 \
         --max_steps {steps} --per_device_train_batch_size 2 --gradient_accumulation_steps 1 \
         --max_length 64 --output_dir {} --add_version false",
        out.display()
    );
    run_in_root(&args_of(&line, extra))
}

/// Checks that a run of swift-rs exited 0, showing its stderr when not.
fn succeeded(result: &std::process::Output) {
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
}

/// Qwen3.5 from scratch through `sft`: LoRA, rsLoRA and DoRA, each also on NF4 and packed, two
/// steps each, on every linear of both layer kinds (PEFT's all-linear on this model), under the
/// vision-language checkpoint's own key layout.
#[test]
fn qwen3_5_trains_every_adapter_kind_from_scratch() {
    let adapted = [
        "model.language_model.layers.0.linear_attn.in_proj_qkv",
        "model.language_model.layers.0.linear_attn.in_proj_b",
        "model.language_model.layers.0.linear_attn.out_proj",
        "model.language_model.layers.2.self_attn.q_proj",
        "model.language_model.layers.3.mlp.down_proj",
    ];
    every_adapter_kind_trains_from_scratch("qwen3_5_vl", &adapted, &[], |stderr| {
        assert!(
            stderr.contains("its vision tower stays on disk"),
            "{stderr}"
        );
    });
}

/// The mixture-of-experts families from scratch, as Qwen3.5 above. all-linear puts adapters on
/// attention (and Qwen3.5-MoE's linear attention, shared expert and its gate) and on Qwen3-MoE's
/// dense layers, never on the router or the routed experts.
#[test]
fn moe_models_train_every_adapter_kind_from_scratch() {
    let adapted = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ];
    let not_adapted = ["model.layers.0.mlp.gate", "model.layers.0.mlp.experts"];
    every_adapter_kind_trains_from_scratch("qwen3_moe", &adapted, &not_adapted, |_| {});
    let adapted = [
        "model.language_model.layers.0.linear_attn.in_proj_qkv",
        "model.language_model.layers.2.self_attn.o_proj",
        "model.language_model.layers.3.mlp.shared_expert.up_proj",
        "model.language_model.layers.3.mlp.shared_expert_gate",
    ];
    let not_adapted = [
        "model.language_model.layers.3.mlp.gate",
        "model.language_model.layers.3.mlp.experts",
    ];
    every_adapter_kind_trains_from_scratch("qwen3_5_moe", &adapted, &not_adapted, |_| {});
}

/// LoRA and rsLoRA on the routed experts' stacks (`--target_parameters`, PEFT's form for
/// transformers 5's fused experts), plain and on NF4, train from scratch; the checkpoint holds
/// PEFT's ParamWrapper keys and the config its target_parameters, and serves again.
#[test]
fn routed_experts_train_from_scratch_when_target_parameters_name_them() {
    let out = tempfile::tempdir().unwrap();
    for (model, params, keys) in [
        (
            "qwen3_moe",
            "mlp.experts.gate_up_proj mlp.experts.down_proj",
            &[
                "model.layers.0.mlp.experts.base_layer",
                "model.layers.2.mlp.experts",
            ][..],
        ),
        (
            "qwen3_5_moe",
            "mlp.experts.down_proj",
            &["model.language_model.layers.3.mlp.experts"][..],
        ),
    ] {
        for (kind, nf4) in [("lora", false), ("rslora", true)] {
            let run = out.path().join(format!("{model}-{kind}"));
            let line = format!(
                "sft --model {} --dataset datasets/pretokenized_sample.jsonl#6 --max_steps 2 \
                 --per_device_train_batch_size 2 --template chatml --target_modules q_proj \
                 --target_parameters {params} --lora_dropout 0 --use_rslora {} \
                 --output_dir {} --add_version false",
                root().join("tests/fixtures/models").join(model).display(),
                kind == "rslora",
                run.display()
            );
            // The QLoRA runs add the routers' load-balancing loss, as ms-swift's MoE examples do.
            let extra = match nf4 {
                true => &["--quant_bits", "4", "--router_aux_loss_coef", "1e-3"][..],
                false => &[],
            };
            let result = run_in_root(&args_of(&line, extra));
            let stderr = String::from_utf8_lossy(&result.stderr);
            assert!(result.status.success(), "{model} {kind}: {stderr}");
            let log = std::fs::read_to_string(run.join("logging.jsonl")).unwrap();
            for entry in log.lines() {
                let entry: serde_json::Value = serde_json::from_str(entry).unwrap();
                match nf4 {
                    // Positive whenever a token is routed (top_k for a perfectly even routing).
                    true => assert!(entry["aux_loss"].as_f64().unwrap() > 0.0, "{entry}"),
                    false => assert!(entry.get("aux_loss").is_none(), "{entry}"),
                }
            }
            let checkpoint = run.join("checkpoint-2");
            let (config, names) = adapter_of(&checkpoint);
            let written: Vec<&str> = params.split(' ').collect();
            assert_eq!(config["target_parameters"], serde_json::json!(written));
            // Modules only: PEFT refuses to wrap the experts' module as a linear.
            assert_eq!(config["target_modules"], serde_json::json!(["q_proj"]));
            for module in keys {
                for part in ["lora_A", "lora_B"] {
                    let key = format!("base_model.model.{module}.{part}.weight");
                    assert!(
                        names.contains(&key),
                        "{model} {kind}: no {key} in {names:?}"
                    );
                }
            }
            let line = format!(
                "infer --model {} --adapters {} --dtype f32 --prompt hi --max_new_tokens 2",
                root().join("tests/fixtures/models").join(model).display(),
                checkpoint.display()
            );
            let served = run_in_root(&args_of(&line, &[]));
            let stderr = String::from_utf8_lossy(&served.stderr);
            assert!(served.status.success(), "{model} {kind} infer: {stderr}");
        }
    }
}

/// Naming transformers 4.x's per-expert linears and the router (`gate`) in target_modules adapts
/// them as PEFT did there, on QLoRA too: trained, written under their v4 names, served; merging
/// them into a checkpoint that holds its experts fused is refused, writing nothing.
#[test]
fn v4_expert_linears_and_the_router_train_from_scratch_when_named() {
    let out = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/models/qwen3_moe_fused");
    for nf4 in [false, true] {
        let run = out.path().join(format!("nf4-{nf4}"));
        let line = format!(
            "sft --model {} --dataset datasets/pretokenized_sample.jsonl#6 --max_steps 2 \
             --per_device_train_batch_size 2 --template chatml \
             --target_modules q_proj gate gate_proj up_proj down_proj --lora_dropout 0.05 \
             --output_dir {} --add_version false",
            model.display(),
            run.display()
        );
        let extra = if nf4 { &["--quant_bits", "4"][..] } else { &[] };
        let result = run_in_root(&args_of(&line, extra));
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(result.status.success(), "nf4 {nf4}: {stderr}");
        let checkpoint = run.join("checkpoint-2");
        let (config, names) = adapter_of(&checkpoint);
        let modules = ["down_proj", "gate", "gate_proj", "q_proj", "up_proj"];
        assert_eq!(config["target_modules"], serde_json::json!(modules));
        // Layers 1 and 3 are sparse (decoder_sparse_step 2), each of 8 experts three linears.
        for module in [
            "model.layers.1.mlp.gate",
            "model.layers.1.mlp.experts.0.gate_proj",
            "model.layers.3.mlp.experts.7.down_proj",
        ] {
            let key = format!("base_model.model.{module}.lora_B.weight");
            assert!(names.contains(&key), "nf4 {nf4}: no {key} in {names:?}");
        }
        let per_expert = names.iter().filter(|n| n.contains(".experts.")).count();
        assert_eq!(per_expert, 2 * 8 * 3 * 2, "{names:?}");
        let line = format!(
            "infer --model {} --adapters {} --dtype f32 --prompt hi --max_new_tokens 2",
            model.display(),
            checkpoint.display()
        );
        let served = run_in_root(&args_of(&line, &[]));
        let stderr = String::from_utf8_lossy(&served.stderr);
        assert!(served.status.success(), "nf4 {nf4} infer: {stderr}");
    }
    let merged = out.path().join("merged");
    let line = format!(
        "merge --model {} --adapter {} --output {}",
        model.display(),
        out.path().join("nf4-false/checkpoint-2").display(),
        merged.display()
    );
    let result = run_in_root(&args_of(&line, &[]));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("into fused experts is not supported yet"),
        "{stderr}"
    );
    assert!(!merged.exists());
    // DoRA is refused on them, as PEFT 0.21 refuses it there, before training starts.
    let run = out.path().join("dora");
    let line = format!(
        "sft --model {} --dataset datasets/pretokenized_sample.jsonl#6 --max_steps 2 \
         --template chatml --target_modules q_proj gate_proj --use_dora true \
         --output_dir {} --add_version false",
        model.display(),
        run.display()
    );
    let result = run_in_root(&args_of(&line, &[]));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("model.layers.1.mlp.experts.0.gate_proj: DoRA is not supported"),
        "{stderr}"
    );
}

/// `sft` of the fixture `model` with LoRA, rsLoRA and DoRA, each plain and on NF4 (packed), two
/// steps each on all-linear: the checkpoint's adapter holds the `adapted` modules and none under
/// `not_adapted`; `check` reads each run's stderr.
fn every_adapter_kind_trains_from_scratch(
    model: &str,
    adapted: &[&str],
    not_adapted: &[&str],
    check: impl Fn(&str),
) {
    let out = tempfile::tempdir().unwrap();
    let fixture = root().join("tests/fixtures/models").join(model);
    for (kind, flags) in [
        ("lora", &[][..]),
        ("rslora", &["--use_rslora", "true"][..]),
        ("dora", &["--use_dora", "true"][..]),
    ] {
        for nf4 in [false, true] {
            let run = out.path().join(format!("{kind}-{nf4}"));
            let line = format!(
                "sft --model {} --dataset datasets/pretokenized_sample.jsonl#6 --max_steps 2 \
                 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 --template chatml \
                 --target_modules all-linear --output_dir {} --add_version false",
                fixture.display(),
                run.display()
            );
            let mut extra = flags.to_vec();
            if nf4 {
                extra.extend(["--quant_bits", "4", "--packing", "true"]);
            }
            let result = run_in_root(&args_of(&line, &extra));
            let stderr = String::from_utf8_lossy(&result.stderr);
            assert!(
                result.status.success(),
                "{model} {kind} nf4 {nf4}: {stderr}"
            );
            assert!(stderr.contains("done: 2 steps"), "{stderr}");
            check(&stderr);
            let (config, names) = adapter_of(&run.join("checkpoint-2"));
            assert_eq!(config["use_dora"], kind == "dora", "{kind}");
            for module in adapted {
                let key = format!("base_model.model.{module}.lora_A.weight");
                assert!(
                    names.contains(&key),
                    "{model} {kind} nf4 {nf4}: no {key} in {names:?}"
                );
            }
            for module in not_adapted {
                let prefix = format!("base_model.model.{module}.");
                assert!(
                    !names.iter().any(|n| n.starts_with(&prefix)),
                    "{model} {kind}: {module} adapted"
                );
            }
        }
    }
}

/// The adapter_config.json and tensor names of a checkpoint.
fn adapter_of(checkpoint: &Path) -> (Value, Vec<String>) {
    let config = std::fs::read_to_string(checkpoint.join("adapter_config.json")).unwrap();
    let bytes = std::fs::read(checkpoint.join("adapter_model.safetensors")).unwrap();
    let names = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    (serde_json::from_str(&config).unwrap(), names)
}

/// Every adapter kind trains from scratch through the CLI: LoRA, rsLoRA and DoRA, each on the
/// plain base and on NF4 (DoRA from scratch panicked in `Lora::init`: its magnitude was made a
/// parameter from a tensor computed from A), with and without gradient checkpointing, through
/// `sft`, `train --set` and `rlhf`, and on the f16 Qwen3 fixture.
#[test]
fn every_adapter_kind_trains_from_scratch_for_two_steps() {
    let out = tempfile::tempdir().unwrap();
    let kinds: [(&str, &[&str]); 3] = [
        ("lora", &[]),
        ("rslora", &["--use_rslora", "true"]),
        ("dora", &["--use_dora", "true"]),
    ];
    for (kind, flags) in kinds {
        for nf4 in [false, true] {
            let run = out.path().join(format!("{kind}-{nf4}"));
            let mut extra = flags.to_vec();
            if nf4 {
                extra.extend(["--quant_bits", "4"]);
            }
            let result = sft_steps(&run, 2, &extra);
            let stderr = String::from_utf8_lossy(&result.stderr);
            assert!(result.status.success(), "{kind} nf4 {nf4}: {stderr}");
            assert!(
                stderr.contains("done: 2 steps"),
                "{kind} nf4 {nf4}: {stderr}"
            );
            let (config, names) = adapter_of(&run.join("checkpoint-2"));
            assert_eq!(config["use_dora"], kind == "dora", "{kind}");
            assert_eq!(config["use_rslora"], kind == "rslora", "{kind}");
            let magnitudes = names
                .iter()
                .filter(|n| n.ends_with("lora_magnitude_vector"));
            assert_eq!(magnitudes.count() > 0, kind == "dora", "{kind}: {names:?}");
        }
    }
    let dora = ["--use_dora", "true"];
    let result = sft_steps(
        &out.path().join("no-checkpointing"),
        2,
        &[&dora[..], &["--gradient_checkpointing", "false"]].concat(),
    );
    succeeded(&result);

    let fixture = root().join("tests/fixtures/models/qwen3_f16");
    let line = format!(
        "sft --model {} --dataset datasets/pretokenized_sample.jsonl#4 --max_steps 2 \
         --per_device_train_batch_size 2 --gradient_accumulation_steps 1 --use_dora true \
         --output_dir {} --add_version false",
        fixture.display(),
        out.path().join("qwen3").display()
    );
    let result = run_in_root(&args_of(&line, &[]));
    succeeded(&result);

    let result = run_in_root(&quickstart_args(
        &out.path().join("train-set"),
        &[
            "--set",
            "lora.use_dora=true",
            "--set",
            "train.max_steps=2",
            "--set",
            "data.train=[\"datasets/self_cognition.jsonl#8\"]",
        ],
    ));
    succeeded(&result);
    let (config, _) = adapter_of(&out.path().join("train-set/checkpoint-2"));
    assert_eq!(config["use_dora"], true);

    let line = format!(
        "rlhf --rlhf_type dpo --model examples/quickstart-model --dataset datasets/dpo_sample.jsonl#4 \
         --max_steps 2 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 \
         --use_dora true --output_dir {} --add_version false",
        out.path().join("rlhf").display()
    );
    let result = run_in_root(&args_of(&line, &[]));
    succeeded(&result);
    let (config, _) = adapter_of(&out.path().join("rlhf/checkpoint-2"));
    assert_eq!(config["use_dora"], true);
}

/// `swift-rs train ... 2>&1 | head -n 2`: stderr closed under the run (a pipe whose reader
/// left, a terminal gone under nohup) must not end it; it used to panic in eprintln!.
#[test]
fn a_closed_stderr_does_not_end_a_run() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let line = format!(
        "sft --model examples/quickstart-model --dataset datasets/self_cognition.jsonl#8 \
         --max_steps 3 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 \
         --logging_steps 1 --output_dir {} --add_version false",
        run.display()
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_swift-rs"))
        .args(args_of(&line, &[]))
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the first line, as `head -n 1` does, then go away.
    let mut first = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}; first line: {first}");
    assert!(run.join("checkpoint-3/adapter_model.safetensors").is_file());
    let log = std::fs::read_to_string(run.join("logging.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3, "{log}");
}

/// A run that fails before its first checkpoint leaves no run folder behind: each failure used to
/// leave a `vN-...` folder, so the next run was numbered v1, v2, ...
#[test]
fn a_run_that_fails_before_its_first_step_leaves_no_version_folder() {
    let out = tempfile::tempdir().unwrap();
    let data = out.path().join("ids.jsonl");
    std::fs::write(&data, "{\"input_ids\": [1, 2, 99999]}\n").unwrap();
    let output = out.path().join("output");
    let line = format!(
        "sft --model examples/quickstart-model --dataset {} --max_steps 1 --output_dir {}",
        data.display(),
        output.display()
    );
    for _ in 0..2 {
        swift_rs_fails(&args_of(&line, &[]), 2);
    }
    let left: Vec<_> = std::fs::read_dir(&output).map_or(Vec::new(), |d| d.flatten().collect());
    assert!(left.is_empty(), "{left:?}");
}

/// Token ids and labels past the model's vocabulary are refused with their file and line before
/// any tensor is built (they panicked in a gather): JSONL and Parquet `input_ids`, `labels`,
/// TRL's `chosen_ids` in rlhf, and `encode`.
#[test]
fn token_ids_outside_the_vocabulary_are_refused_naming_the_row() {
    let out = tempfile::tempdir().unwrap();
    let vocab = {
        let config = std::fs::read_to_string(root().join("examples/quickstart-model/config.json"));
        let config: Value = serde_json::from_str(&config.unwrap()).unwrap();
        config["vocab_size"].as_u64().unwrap()
    };
    let jsonl = |name: &str, rows: &[&str]| {
        let path = out.path().join(name);
        std::fs::write(&path, rows.join("\n") + "\n").unwrap();
        path.display().to_string()
    };
    let good = "{\"input_ids\": [1, 2, 3]}";
    let ids = jsonl("ids.jsonl", &[good, "{\"input_ids\": [1, 99999, 3]}"]);
    let labels = jsonl(
        "labels.jsonl",
        &[
            good,
            "{\"input_ids\": [1, 2, 3], \"labels\": [-100, 5000, 3]}",
        ],
    );
    let trl = jsonl(
        "trl.jsonl",
        &["{\"prompt_ids\": [1, 2], \"chosen_ids\": [99999], \"rejected_ids\": [3]}"],
    );
    let parquet = out.path().join("ids.parquet");
    write_ids_parquet(&parquet, vec![vec![1, 2, 3], vec![1, 99999, 3]]);
    let parquet = parquet.display().to_string();
    let at_ids = format!("input_ids holds token id 99999, outside the vocabulary [0, {vocab})");
    let at_labels = format!("labels holds 5000, neither -100 nor a token id in [0, {vocab})");
    let at_chosen = format!("chosen_ids holds token id 99999, outside the vocabulary [0, {vocab})");
    let cases = [
        ("sft", ids.clone(), format!("{ids}:2: {at_ids}")),
        ("sft", labels.clone(), format!("{labels}:2: {at_labels}")),
        ("sft", parquet.clone(), format!("{parquet}:row 1: {at_ids}")),
        ("rlhf", trl.clone(), format!("{trl}:1: {at_chosen}")),
    ];
    for (command, dataset, says) in cases {
        let line = format!(
            "{command} --model examples/quickstart-model --dataset {dataset} --max_steps 1 \
             --output_dir {}",
            out.path().join("run").display()
        );
        let stderr = swift_rs_fails(&args_of(&line, &[]), 2);
        assert!(stderr.contains(&says), "{command} {dataset}: {stderr}");
    }
    let config = out.path().join("encode.toml");
    std::fs::write(
        &config,
        format!("[model]\npath = \"examples/quickstart-model\"\n[data]\ntrain = [\"{ids}\"]\n"),
    )
    .unwrap();
    let config = config.display().to_string();
    let stderr = swift_rs_fails(&["encode", "--config", &config], 2);
    assert!(stderr.contains(&format!("{ids}:2: {at_ids}")), "{stderr}");
}

/// A Parquet file with one `input_ids` column (a list of int64 per row), as `datasets` writes one.
fn write_ids_parquet(path: &Path, rows: Vec<Vec<i64>>) {
    use arrow_array::types::Int64Type;
    use arrow_array::{ArrayRef, ListArray, RecordBatch};
    let rows = rows.into_iter().map(|r| Some(r.into_iter().map(Some)));
    let ids: ArrayRef =
        std::sync::Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(rows));
    let batch = RecordBatch::try_from_iter([("input_ids", ids)]).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// A checkpoint of a run given a relative `--model` finds its model from another directory: it
/// records the model's absolute path (it asked modelscope.cn for `examples/quickstart-model`);
/// once that directory is gone, it says so instead of asking a hub.
#[test]
fn a_checkpoint_finds_its_relative_model_from_another_directory() {
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(root().join("examples/quickstart-model")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    let dataset = root().join("datasets/self_cognition.jsonl#4");
    let line = format!(
        "sft --model model --dataset {} --max_steps 1 --per_device_train_batch_size 4 \
         --gradient_accumulation_steps 1 --output_dir out --add_version false",
        dataset.display()
    );
    let run = |args: &[String], cwd: &Path| {
        Command::new(env!("CARGO_BIN_EXE_swift-rs"))
            .args(args)
            .current_dir(cwd)
            // No hub may be asked: a request would fail at once and show.
            .env("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .output()
            .unwrap()
    };
    let trained = run(&args_of(&line, &[]), work.path());
    succeeded(&trained);
    let checkpoint = work.path().join("out/checkpoint-1");
    let (config, _) = adapter_of(&checkpoint);
    let absolute = model.display().to_string();
    assert_eq!(config["base_model_name_or_path"], absolute);
    let args: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("args.json")).unwrap())
            .unwrap();
    assert_eq!(args["model"], absolute);

    let elsewhere = tempfile::tempdir().unwrap();
    let infer = args_of(
        &format!(
            "infer --adapters {} --prompt hi --max_new_tokens 2",
            checkpoint.display()
        ),
        &[],
    );
    let answered = run(&infer, elsewhere.path());
    succeeded(&answered);

    std::fs::rename(&model, work.path().join("moved")).unwrap();
    let missing = run(&infer, elsewhere.path());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "trained on the model in {absolute}, which is not there"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("127.0.0.1:9"), "a hub was asked: {stderr}");
}

/// The same TOML `[model] path` goes to the same hub under `train`, `sft --config` and `rlhf
/// --config` (the Hugging Face Hub, as SPEC says; `sft`/`rlhf` asked ModelScope), and the error
/// names the hub it asked.
#[test]
fn the_same_toml_model_goes_to_the_same_hub_under_train_sft_and_rlhf() {
    let out = tempfile::tempdir().unwrap();
    for (command, rlhf) in [
        ("train", ""),
        ("sft", ""),
        ("rlhf", "[rlhf]\ntype = \"dpo\"\n"),
    ] {
        let config = out.path().join(format!("{command}.toml"));
        std::fs::write(
            &config,
            format!(
                "[model]\npath = \"org/not-here\"\n[data]\ntrain = [\"datasets/dpo_sample.jsonl\"]\n\
                 {rlhf}[output]\ndir = \"{}\"\n",
                out.path().join(command).display()
            ),
        )
        .unwrap();
        let result = Command::new(env!("CARGO_BIN_EXE_swift-rs"))
            .args([command, "--config", &config.display().to_string()])
            .current_dir(root())
            .env_remove("USE_HF")
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HUB_OFFLINE")
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("MODELSCOPE_ENDPOINT", "http://127.0.0.1:8")
            .env("HF_HOME", out.path().join("hf"))
            .env("MODELSCOPE_CACHE", out.path().join("ms"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(1), "{command}: {stderr}");
        assert!(stderr.contains("http://127.0.0.1:9"), "{command}: {stderr}");
    }
}

/// `rlhf --config` and `train --config` put checkpoints at the same depth: right in the TOML's
/// `[output] dir` (rlhf added a `vN-...` folder); ms-swift's flag form keeps its `vN-...`.
#[test]
fn rlhf_and_train_with_a_toml_config_write_checkpoints_in_output_dir() {
    let out = tempfile::tempdir().unwrap();
    for command in ["train", "rlhf"] {
        let dir = out.path().join(command);
        let config = out.path().join(format!("{command}.toml"));
        let (data, rlhf) = match command {
            "rlhf" => ("datasets/dpo_sample.jsonl#2", "[rlhf]\ntype = \"dpo\"\n"),
            _ => ("datasets/self_cognition.jsonl#2", ""),
        };
        std::fs::write(
            &config,
            format!(
                "[model]\npath = \"examples/quickstart-model\"\n[data]\ntrain = [\"{data}\"]\n\
                 {rlhf}[train]\nmax_steps = 1\nbatch_size = 2\ngrad_accum = 1\n\
                 [output]\ndir = \"{}\"\n",
                dir.display()
            ),
        )
        .unwrap();
        let result = run_in_root(&[
            command.into(),
            "--config".into(),
            config.display().to_string(),
        ]);
        assert!(
            result.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        assert!(
            dir.join("checkpoint-1/adapter_model.safetensors").is_file(),
            "{command}"
        );
    }
}

/// Flag values that train nothing are refused naming the key (`--num_train_epochs 0` or `-1`
/// trained a step and exited 0), and `sft` without a model names `--model`.
#[test]
fn epochs_that_train_nothing_and_a_missing_model_are_refused_by_name() {
    let out = tempfile::tempdir().unwrap();
    for epochs in ["0", "-1"] {
        let line = format!(
            "sft --model examples/quickstart-model --dataset datasets/self_cognition.jsonl \
             --num_train_epochs {epochs} --output_dir {}",
            out.path().display()
        );
        let stderr = swift_rs_fails(&args_of(&line, &[]), 2);
        assert!(stderr.contains("train.epochs"), "{stderr}");
        assert!(
            stderr.contains(&format!("--num_train_epochs {epochs}")),
            "{stderr}"
        );
    }
    let stderr = swift_rs_fails(
        &args_of("sft --dataset datasets/self_cognition.jsonl", &[]),
        2,
    );
    assert!(stderr.contains("--model"), "{stderr}");
}

/// `--help` anywhere on an ms-swift command line shows the command's flags (it was refused as an
/// unknown flag after others, and clap's help said only `[WORDS]...`); `rlhf --help` names every
/// objective.
#[test]
fn help_anywhere_on_an_ms_swift_line_lists_its_flags() {
    for line in [
        "sft --help",
        "sft --model examples/quickstart-model --help",
        "pt -h",
        "rlhf --rlhf_type dpo --help",
    ] {
        let result = run_in_root(&args_of(line, &[]));
        let stdout = String::from_utf8_lossy(&result.stdout);
        assert!(
            result.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        for flag in [
            "--model ",
            "--lora_rank ",
            "--use_dora ",
            "--num_train_epochs ",
        ] {
            assert!(stdout.contains(flag), "{line}: {flag} in {stdout}");
        }
        assert_eq!(
            stdout.contains("--beta "),
            line.starts_with("rlhf"),
            "{line}"
        );
        if line.starts_with("rlhf") {
            for objective in ["dpo", "orpo", "simpo", "cpo", "kto"] {
                assert!(stdout.contains(objective), "{objective}: {stdout}");
            }
        }
    }
    let top = run_in_root(&["--help".into()]);
    let stdout = String::from_utf8_lossy(&top.stdout);
    assert!(stdout.contains("DPO, ORPO, SimPO, CPO or KTO"), "{stdout}");
}

/// A run whose every step is at a learning rate of 0 says so before it starts: the DPO recipe on
/// the 16-pair sample was one step of 16 pairs, spent in warmup, and trained nothing unsaid.
#[test]
fn a_run_that_would_train_nothing_warns_before_it_starts() {
    let out = tempfile::tempdir().unwrap();
    let line = format!(
        "rlhf --rlhf_type dpo --model examples/quickstart-model --dataset datasets/dpo_sample.jsonl \
         --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --num_train_epochs 1 \
         --warmup_ratio 0.05 --output_dir {} --add_version false",
        out.path().display()
    );
    let result = run_in_root(&args_of(&line, &[]));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: the learning rate is 0 at every one of the 1 steps"),
        "{stderr}"
    );
}
