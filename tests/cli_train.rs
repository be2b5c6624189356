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
    assert!(stdout.contains("swift-rs assistant"), "{stdout}");
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
    assert_eq!(args["model"], "examples/quickstart-model");
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
