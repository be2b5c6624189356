//! ms-swift's example command lines, as its examples/ folder writes them with `swift` replaced by
//! `swift-rs`: LoRA SFT (examples/train/lora_sft.sh), QLoRA (qlora/bnb/train.sh), streaming
//! (packing/streaming.sh), Qwen3 thinking (think_model/qwen3_demo1.sh) and lora_sft.sh on
//! Qwen3.5 from either hub. A fake ModelScope and Hugging Face Hub serve tiny models under the examples' model ids and small datasets in the real
//! datasets' schemas; each run then goes on as ms-swift's docs do, to `infer --adapters` and
//! `export --adapters ... --merge_lora true` from its last checkpoint.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fake_hub::{FakeHub, Repo};
use serde_json::{json, Value};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Rows in `swift/self-cognition`'s schema: `{{NAME}}` / `{{AUTHOR}}` placeholders and a
/// language tag.
fn self_cognition() -> Vec<u8> {
    let mut rows = String::new();
    for i in 0..6 {
        let zh = json!({"query": format!("你是谁？{i}"), "response": "我是{{NAME}}，由{{AUTHOR}}训练的人工智能助手。", "tag": "zh"});
        let en = json!({"query": format!("Who are you? {i}"), "response": "I am {{NAME}}, an assistant trained by {{AUTHOR}}.", "tag": "en"});
        rows += &format!("{zh}\n{en}\n");
    }
    rows.into_bytes()
}

/// Rows in Alpaca's schema (alpaca-gpt4-data-zh's inputs carry an "输入：" label).
fn alpaca(zh: bool) -> Vec<u8> {
    let rows: Vec<Value> = (0..8)
        .map(|i| {
            if zh {
                json!({"instruction": "把这句话翻译成英文。", "input": format!("输入：你好{i}"), "output": format!("Hello {i}")})
            } else {
                json!({"instruction": "Add one.", "input": if i % 2 == 0 { format!("{i}") } else { String::new() }, "output": format!("{}", i + 1)})
            }
        })
        .collect();
    serde_json::to_vec(&rows).unwrap()
}

/// Conversations in `swift/Qwen3-SFT-Mixin`'s schema: answers with a reasoning block, some of it
/// empty.
fn qwen3_mixin() -> Vec<u8> {
    let mut rows = String::new();
    for i in 0..8 {
        let think = if i % 2 == 0 {
            "\n\n"
        } else {
            "\nadd the numbers\n"
        };
        let row = json!({"messages": [
            {"role": "user", "content": format!("What is {i} + 1?")},
            {"role": "assistant", "content": format!("<think>{think}</think>\n\n{}", i + 1)},
        ]});
        rows += &format!("{row}\n");
    }
    rows.into_bytes()
}

struct Hubs {
    hub: FakeHub,
    home: tempfile::TempDir,
}

fn hubs() -> Hubs {
    let quickstart = root().join("examples/quickstart-model");
    let qwen3 = root().join("tests/fixtures/models/qwen3_f16");
    let qwen3_5 = root().join("tests/fixtures/models/qwen3_5_vl");
    // The hub's Qwen3.5 repos hold the vision model's processor files, which text training does
    // not fetch, and a chat template (ChatML stands in for Qwen3.5's own here).
    let chatml = include_bytes!("../src/data/templates/chatml.jinja");
    let qwen3_5_extra: Vec<(&str, &[u8])> = vec![
        ("preprocessor_config.json", b"{}"),
        ("video_preprocessor_config.json", b"{}"),
        ("chat_template.jinja", chatml),
    ];
    let text: Vec<u8> = (0..30)
        .map(|i| {
            format!(
                "{}\n",
                json!({"text": format!("\\frac{{{i}}}{{2}} is a fraction")})
            )
        })
        .collect::<String>()
        .into_bytes();
    let hub = FakeHub::start(vec![
        ("Qwen/Qwen2.5-7B-Instruct", Repo::from_dir(&quickstart, &[])),
        ("Qwen/Qwen3-8B", Repo::from_dir(&qwen3, &[])),
        (
            "Qwen/Qwen3.5-0.8B",
            Repo::from_dir(&qwen3_5, &qwen3_5_extra),
        ),
        (
            "datasets/AI-ModelScope/alpaca-gpt4-data-zh",
            Repo::from_files(&[
                ("README.md", b"#"),
                ("alpaca_gpt4_data_zh.json", &alpaca(true)),
            ]),
        ),
        (
            "datasets/AI-ModelScope/alpaca-gpt4-data-en",
            Repo::from_files(&[("alpaca_gpt4_data_en.json", &alpaca(false))]),
        ),
        (
            "datasets/swift/self-cognition",
            Repo::from_files(&[("self_cognition.jsonl", &self_cognition())]),
        ),
        // Its id on the Hugging Face Hub, in ms-swift's dataset registry.
        (
            "datasets/modelscope/self-cognition",
            Repo::from_files(&[("self_cognition.jsonl", &self_cognition())]),
        ),
        (
            "datasets/swift/Qwen3-SFT-Mixin",
            Repo::from_files(&[("train.jsonl", &qwen3_mixin())]),
        ),
        // A text stand-in for the streaming example's image dataset, laid out as the Hub's
        // subsets and splits are.
        (
            "datasets/swift-rs/latex-text",
            Repo::from_files(&[
                ("full/train-00000-of-00001.jsonl", &text),
                ("full/test-00000-of-00001.jsonl", b"not json\n"),
            ]),
        ),
    ]);
    Hubs {
        hub,
        home: tempfile::tempdir().unwrap(),
    }
}

impl Hubs {
    /// `line` as a shell runs it (leading VAR=value words set the environment), in `dir`.
    fn run(&self, line: &str, dir: &Path) -> Output {
        let words = shlex::split(&line.replace("\\\n", " ")).expect("a shell line");
        let mut command = Command::new(env!("CARGO_BIN_EXE_swift-rs"));
        self.hub.point_at(&mut command, self.home.path());
        let mut words = words.into_iter().peekable();
        while let Some((name, value)) = words.peek().and_then(|w| w.split_once('=')) {
            command.env(name, value);
            words.next();
        }
        assert_eq!(words.next().as_deref(), Some("swift-rs"), "{line}");
        let out = command.args(words).current_dir(dir).output().unwrap();
        assert!(
            out.status.success(),
            "{line}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs an example line in a directory of its own; returns its last checkpoint and stderr.
    fn train(&self, line: &str) -> (PathBuf, String) {
        let dir = self.home.path().join("work");
        std::fs::create_dir(&dir).unwrap();
        let out = self.run(line, &dir);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let versions: Vec<PathBuf> = std::fs::read_dir(dir.join("output"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(versions.len(), 1, "{versions:?}");
        let last = swift_rs::train::checkpoint::list(&versions[0])
            .pop()
            .expect("a checkpoint")
            .1;
        (last, stderr)
    }

    /// ms-swift's next steps from `checkpoint`: infer with the adapter, export the merged model.
    fn infer_and_export(&self, checkpoint: &Path) -> String {
        let ck = checkpoint.display();
        let dir = checkpoint.parent().unwrap();
        let answer = self.run(
            &format!(
                "swift-rs infer --adapters {ck} --stream true --temperature 0 --max_new_tokens 4 \
                 --prompt 'Who are you?'"
            ),
            dir,
        );
        self.run(
            &format!("swift-rs export --adapters {ck} --merge_lora true"),
            dir,
        );
        let merged = PathBuf::from(format!("{ck}-merged"));
        assert!(merged.join("config.json").exists() && merged.join("model.safetensors").exists());
        String::from_utf8_lossy(&answer.stdout).to_string()
    }
}

fn args_json(checkpoint: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(checkpoint.join("args.json")).unwrap()).unwrap()
}

/// examples/train/lora_sft.sh: the model and datasets from ModelScope (ms-swift's default), each
/// made as ms-swift makes it.
#[test]
fn lora_sft() {
    let hubs = hubs();
    let (checkpoint, stderr) = hubs.train(
        "CUDA_VISIBLE_DEVICES=0 \\
swift-rs sft \\
    --model Qwen/Qwen2.5-7B-Instruct \\
    --tuner_type lora \\
    --dataset 'AI-ModelScope/alpaca-gpt4-data-zh#8' \\
              'AI-ModelScope/alpaca-gpt4-data-en#8' \\
              'swift/self-cognition#8' \\
    --torch_dtype float32 \\
    --num_train_epochs 1 \\
    --per_device_train_batch_size 1 \\
    --per_device_eval_batch_size 1 \\
    --learning_rate 1e-4 \\
    --lora_rank 8 \\
    --lora_alpha 32 \\
    --target_modules all-linear \\
    --gradient_accumulation_steps 4 \\
    --eval_steps 50 \\
    --save_steps 50 \\
    --save_total_limit 2 \\
    --logging_steps 5 \\
    --max_length 2048 \\
    --output_dir output \\
    --system 'You are a helpful assistant.' \\
    --warmup_ratio 0.05 \\
    --dataset_num_proc 4 \\
    --dataloader_num_workers 4 \\
    --model_author swift \\
    --model_name swift-robot",
    );
    // 24 rows, 4 a step.
    assert!(stderr.contains("done: 6 steps"), "{stderr}");
    let cache = hubs.home.path().join("modelscope");
    for repo in [
        "models/Qwen--Qwen2.5-7B-Instruct",
        "datasets/AI-ModelScope--alpaca-gpt4-data-zh",
        "datasets/swift--self-cognition",
    ] {
        assert!(cache.join(repo).join("snapshots/master").is_dir(), "{repo}");
    }
    let args = args_json(&checkpoint);
    assert_eq!(args["model"], "Qwen/Qwen2.5-7B-Instruct");
    assert_eq!(args["use_hf"], false);
    assert_eq!(args["model_name"], json!(["swift-robot"]));
    hubs.infer_and_export(&checkpoint);
}

/// examples/train/qlora/bnb/train.sh: an NF4 base, which infer and export take from args.json.
#[test]
fn qlora() {
    let hubs = hubs();
    let (checkpoint, _) = hubs.train(
        "CUDA_VISIBLE_DEVICES=0 \\
swift-rs sft \\
    --model Qwen/Qwen2.5-7B-Instruct \\
    --tuner_type lora \\
    --dataset 'AI-ModelScope/alpaca-gpt4-data-zh#8' \\
              'AI-ModelScope/alpaca-gpt4-data-en#8' \\
              'swift/self-cognition#8' \\
    --torch_dtype float32 \\
    --bnb_4bit_compute_dtype float32 \\
    --bnb_4bit_quant_type nf4 \\
    --bnb_4bit_use_double_quant true \\
    --quant_method bnb \\
    --quant_bits 4 \\
    --num_train_epochs 1 \\
    --per_device_train_batch_size 1 \\
    --per_device_eval_batch_size 1 \\
    --learning_rate 1e-4 \\
    --lora_rank 8 \\
    --lora_alpha 32 \\
    --target_modules all-linear \\
    --gradient_accumulation_steps 8 \\
    --eval_steps 50 \\
    --save_steps 50 \\
    --save_total_limit 2 \\
    --logging_steps 5 \\
    --max_length 2048 \\
    --output_dir output \\
    --system 'You are a helpful assistant.' \\
    --warmup_ratio 0.05 \\
    --dataloader_num_workers 4 \\
    --model_author swift \\
    --model_name swift-robot",
    );
    let args = args_json(&checkpoint);
    assert_eq!(
        (args["quant_method"].as_str(), args["quant_bits"].as_u64()),
        (Some("bnb"), Some(4))
    );
    hubs.infer_and_export(&checkpoint);
}

/// examples/train/packing/streaming.sh with a text dataset for its images (and the one GPU
/// swift-rs trains on): `HF::` in upper case, a subset folder and its train split, streamed
/// and packed, ended by --max_epochs long before --max_steps.
#[test]
fn streaming() {
    let hubs = hubs();
    let (checkpoint, stderr) = hubs.train(
        "MAX_PIXELS=1003520 \\
CUDA_VISIBLE_DEVICES=0 \\
swift-rs sft \\
    --model Qwen/Qwen2.5-7B-Instruct \\
    --tuner_type lora \\
    --dataset 'HF::swift-rs/latex-text:full#20' \\
    --torch_dtype float32 \\
    --attn_impl flash_attn \\
    --streaming true \\
    --shuffle_buffer_size 1000 \\
    --packing true \\
    --save_strategy epoch \\
    --max_steps 1000 \\
    --max_epochs 2 \\
    --per_device_train_batch_size 1 \\
    --per_device_eval_batch_size 1 \\
    --learning_rate 1e-4 \\
    --lora_rank 8 \\
    --lora_alpha 32 \\
    --target_modules all-linear \\
    --gradient_accumulation_steps 1 \\
    --save_total_limit 2 \\
    --logging_steps 5 \\
    --max_length 512 \\
    --output_dir output \\
    --warmup_ratio 0.05 \\
    --dataloader_num_workers 1 \\
    --dataset_num_proc 8",
    );
    // 20 rows of ~15 tokens pack into one 512-token row an epoch: two epochs, two steps.
    assert!(stderr.contains("done: 2 steps"), "{stderr}");
    assert!(
        checkpoint.ends_with("checkpoint-2"),
        "{}",
        checkpoint.display()
    );
    let cached = hubs
        .home
        .path()
        .join("hf/hub/datasets--swift-rs--latex-text");
    assert!(cached.is_dir());
    hubs.infer_and_export(&checkpoint);
}

/// examples/train/think_model/qwen3_demo1.sh: no loss on an empty reasoning block.
#[test]
fn qwen3_thinking() {
    let hubs = hubs();
    let (checkpoint, stderr) = hubs.train(
        "CUDA_VISIBLE_DEVICES=0 \\
swift-rs sft \\
    --model Qwen/Qwen3-8B \\
    --tuner_type lora \\
    --dataset 'swift/Qwen3-SFT-Mixin#8' \\
              'swift/self-cognition:empty_think#6' \\
    --torch_dtype float32 \\
    --num_train_epochs 1 \\
    --per_device_train_batch_size 1 \\
    --per_device_eval_batch_size 1 \\
    --learning_rate 1e-4 \\
    --lora_rank 8 \\
    --lora_alpha 32 \\
    --target_modules all-linear \\
    --gradient_accumulation_steps 7 \\
    --eval_steps 50 \\
    --save_steps 50 \\
    --save_total_limit 2 \\
    --logging_steps 5 \\
    --max_length 2048 \\
    --output_dir output \\
    --warmup_ratio 0.05 \\
    --dataloader_num_workers 4 \\
    --use_liger_kernel true \\
    --load_from_cache_file false \\
    --loss_scale ignore_empty_think \\
    --model_author swift \\
    --model_name swift-robot",
    );
    assert!(stderr.contains("done: 2 steps"), "{stderr}");
    for flag in ["use_liger_kernel", "load_from_cache_file"] {
        assert!(
            stderr.contains(&format!("note: --{flag} has no effect")),
            "{stderr}"
        );
    }
    assert_eq!(args_json(&checkpoint)["loss_scale"], "ignore_empty_think");
    hubs.infer_and_export(&checkpoint);
}

/// ms-swift's LoRA line with Qwen3.5 (a vision-language checkpoint, whose id has a dot) from
/// ModelScope, then from the Hugging Face Hub (`USE_HF=1`), with ms-swift's vision-language
/// flags at their defaults; the processor files are not fetched.
#[test]
fn qwen3_5_lora_sft_from_either_hub() {
    for (env, cache) in [
        ("", "modelscope/models/Qwen--Qwen3.5-0.8B"),
        ("USE_HF=1 ", "hf/hub/models--Qwen--Qwen3.5-0.8B"),
    ] {
        let hubs = hubs();
        let (checkpoint, stderr) = hubs.train(&format!(
            "{env}swift-rs sft \\
    --model Qwen/Qwen3.5-0.8B \\
    --tuner_type lora \\
    --dataset 'swift/self-cognition#8' \\
    --torch_dtype float32 \\
    --per_device_train_batch_size 2 \\
    --learning_rate 1e-4 \\
    --lora_rank 8 \\
    --lora_alpha 32 \\
    --target_modules all-linear \\
    --freeze_vit true \\
    --freeze_aligner true \\
    --gradient_accumulation_steps 2 \\
    --max_length 2048 \\
    --output_dir output \\
    --model_author swift \\
    --model_name swift-robot"
        ));
        // 8 rows, 4 a step, ms-swift's 3 epochs.
        assert!(stderr.contains("done: 6 steps"), "{env}: {stderr}");
        assert!(
            stderr.contains("its vision tower stays on disk"),
            "{stderr}"
        );
        assert!(hubs.home.path().join(cache).is_dir(), "{env}: no {cache}");
        let fetched = hubs.hub.downloads();
        assert!(
            !fetched.iter().any(|d| d.contains("preprocessor_config")),
            "{fetched:?}"
        );
        let args = args_json(&checkpoint);
        assert_eq!(args["model"], "Qwen/Qwen3.5-0.8B");
        hubs.infer_and_export(&checkpoint);
    }
}
