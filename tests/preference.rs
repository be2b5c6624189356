//! Preference training against TRL 1.16's DPOTrainer, CPOTrainer, ORPOTrainer and KTOTrainer
//! (fixtures from scripts/gen_preference_fixtures.py): from the fixture PEFT adapter, on the same
//! token ids, one SGD step for each DPO and CPO loss type, SimPO and ORPO at batch x accumulation
//! 2 x 1 and 1 x 2, for each KTO loss type, and for DPO against a reference adapter of its own;
//! three AdamW steps of DPO and of KTO; DPO from an adapter against the plain base (ms-swift's
//! reference when no reference adapter is named); the step's loss, gradient norm and TRL's
//! metrics, and the adapter after.

mod common;

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use common::training::{check_adapter, config, one_sgd_step, serial, three_adamw_steps, train, On};
use common::{adapter_dir, fixtures};
use serde_json::Value;
use swift_rs::config::{Device, LossType, RlhfSection, RlhfType, ScheduleKind, TrainConfig};
use swift_rs::train::log::PreferenceLog;
use swift_rs::train::StepReport;

type AB = Autodiff<Flex>;

fn cpu() -> On<AB> {
    On {
        device: Device::Cpu,
        backend: Default::default(),
    }
}

fn steps() -> Value {
    let text = std::fs::read_to_string(fixtures().join("preference/steps.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A DPO run from the fixture adapter on the first `pairs` pairs, in file order.
fn dpo(out: &Path, pairs: usize, loss: LossType) -> TrainConfig {
    preference(out, pairs, RlhfType::Dpo, Some(loss))
}

/// A preference run of `kind` from the fixture adapter on the first `pairs` pairs, in file order.
fn preference(out: &Path, pairs: usize, kind: RlhfType, loss: Option<LossType>) -> TrainConfig {
    rows_of(out, "pairs.jsonl", pairs, kind, loss)
}

/// A KTO run from the fixture adapter on the first `n` unpaired rows, in file order.
fn kto(out: &Path, n: usize, loss: LossType) -> TrainConfig {
    rows_of(out, "unpaired.jsonl", n, RlhfType::Kto, Some(loss))
}

/// A run of `kind` from the fixture adapter on the first `n` rows of the fixture `file`.
fn rows_of(
    out: &Path,
    file: &str,
    n: usize,
    kind: RlhfType,
    loss: Option<LossType>,
) -> TrainConfig {
    let lines: Vec<String> = std::fs::read_to_string(fixtures().join("preference").join(file))
        .unwrap()
        .lines()
        .take(n)
        .map(str::to_string)
        .collect();
    let data = out.join("pairs.jsonl");
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let mut c = config("qwen2_bf16", &out.join("run"));
    c.data.train = vec![data.display().to_string()];
    c.lora.init_adapter = Some(adapter_dir("qwen2_rslora"));
    c.rlhf = Some(RlhfSection {
        kind,
        // TRL's reference in the fixtures is a frozen copy of the adapter training starts from:
        // ms-swift's `--adapters X --ref_adapters X`.
        ref_adapter: Some(adapter_dir("qwen2_rslora").display().to_string()),
        loss_type: loss,
        label_smoothing: if loss == Some(LossType::Robust) {
            0.1
        } else {
            0.0
        },
        ..RlhfSection::default()
    });
    c.train.weight_decay = 0.1;
    c
}

/// Each step's loss, gradient norm and TRL's metrics against TRL's log history.
fn check_steps(reports: &[StepReport], want: &Value, tol: f64) {
    let want = want.as_array().unwrap();
    assert_eq!(reports.len(), want.len());
    for (r, w) in reports.iter().zip(want) {
        let logged = r.logged.as_ref().expect("every step is logged");
        let got = serde_json::to_value(logged).unwrap();
        // Each metric TRL logged, and no other: KTO has no accuracy, DPO no kl, and a KTO batch
        // of one kind of answer no margin.
        for key in ["loss", "grad_norm"]
            .into_iter()
            .chain(PreferenceLog::NAMES)
        {
            let (g, w) = match (got.get(key), w.get(key)) {
                (Some(g), Some(w)) => (g.as_f64().unwrap(), w.as_f64().unwrap()),
                (None, None) => continue,
                (g, w) => panic!("step {}: {key}: ours {g:?}, TRL's {w:?}", r.step),
            };
            assert!(
                (g - w).abs() < tol * w.abs().max(1.0),
                "step {}: {key} {g} vs TRL's {w}",
                r.step
            );
        }
    }
}

/// The adapter of `run`'s checkpoint after `step` against TRL's.
fn check_trls_adapter(out: &Path, step: u64, run: &str) {
    check_adapter(
        &out.join(format!("run/checkpoint-{step}")),
        &fixtures().join(format!("preference/{run}.safetensors")),
        &adapter_dir("qwen2_rslora"),
        1e-4,
    );
}

/// One SGD step of each DPO loss type (TRL's DPOTrainer), of each CPO loss type (ms-swift's cpo),
/// of SimPO and of ORPO (TRL's CPOTrainer and ORPOTrainer under ms-swift), at batch x
/// accumulation 2 x 1 and 1 x 2.
#[test]
fn one_sgd_step_of_each_objective_equals_trls() {
    let _serial = serial();
    let steps = steps();
    for (kind, loss, name) in [
        (RlhfType::Dpo, Some(LossType::Sigmoid), "dpo_sigmoid"),
        (RlhfType::Dpo, Some(LossType::Ipo), "dpo_ipo"),
        (RlhfType::Dpo, Some(LossType::Hinge), "dpo_hinge"),
        (RlhfType::Dpo, Some(LossType::Robust), "dpo_robust"),
        (RlhfType::Cpo, None, "cpo_sigmoid"),
        (RlhfType::Cpo, Some(LossType::Hinge), "cpo_hinge"),
        (RlhfType::Cpo, Some(LossType::Ipo), "cpo_ipo"),
        (RlhfType::Simpo, None, "cpo_simpo"),
        (RlhfType::Orpo, None, "orpo"),
    ] {
        for (batch, accum) in [(2, 1), (1, 2)] {
            let out = tempfile::tempdir().unwrap();
            let mut c = preference(out.path(), 2, kind, loss);
            one_sgd_step(&mut c, batch, accum);
            let reports = train(c, &cpu());
            let run = format!("{name}_{batch}x{accum}");
            check_steps(&reports, &steps[&run], 1e-4);
            check_trls_adapter(out.path(), 1, &run);
        }
    }
}

/// One SGD step of KTO and of APO-zero unpaired (TRL's KTOTrainer) on a desirable and an
/// undesirable answer, and of KTO weighted on three answers.
#[test]
fn one_sgd_step_of_each_kto_loss_equals_trls() {
    let _serial = serial();
    let steps = steps();
    for (loss, rows, weights, run) in [
        (LossType::Kto, 2, (1.0, 1.0), "kto_kto_2x1"),
        (
            LossType::ApoZeroUnpaired,
            2,
            (1.0, 1.0),
            "kto_apo_zero_unpaired_2x1",
        ),
        (LossType::Kto, 3, (1.5, 0.5), "kto_weighted_3x1"),
    ] {
        let out = tempfile::tempdir().unwrap();
        let mut c = kto(out.path(), rows, loss);
        let rlhf = c.rlhf.as_mut().unwrap();
        (rlhf.desirable_weight, rlhf.undesirable_weight) = weights;
        one_sgd_step(&mut c, rows, 1);
        let reports = train(c, &cpu());
        check_steps(&reports, &steps[run], 1e-4);
        check_trls_adapter(out.path(), 1, run);
    }
}

/// One SGD step of DPO against a reference adapter of its own (another rank and other targets
/// than the policy's), as TRL runs it with that model as its `ref_model`.
#[test]
fn dpo_against_a_reference_adapter_of_its_own_equals_trls() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let mut c = dpo(out.path(), 2, LossType::Sigmoid);
    let reference = fixtures().join("preference/ref_adapter");
    c.rlhf.as_mut().unwrap().ref_adapter = Some(reference.display().to_string());
    one_sgd_step(&mut c, 2, 1);
    let reports = train(c, &cpu());
    check_steps(&reports, &steps()["dpo_ref_adapter_2x1"], 1e-4);
    check_trls_adapter(out.path(), 1, "dpo_ref_adapter_2x1");
}

/// DPO going on from an adapter with no reference adapter named compares with the base with the
/// adapters off, as ms-swift does (`--adapters X` without `--ref_adapters`): one SGD step equals
/// TRL's with the plain base as its `ref_model`.
#[test]
fn dpo_from_an_adapter_compares_with_the_base_as_ms_swift_does() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let mut c = dpo(out.path(), 2, LossType::Sigmoid);
    c.rlhf.as_mut().unwrap().ref_adapter = None;
    one_sgd_step(&mut c, 2, 1);
    let reports = train(c, &cpu());
    check_steps(&reports, &steps()["dpo_base_ref_2x1"], 1e-4);
    check_trls_adapter(out.path(), 1, "dpo_base_ref_2x1");
}

/// Three AdamW steps of DPO, and of KTO over micro-batches with both kinds of answer, only
/// desirable ones and only undesirable ones (its KL estimate then above 0).
#[test]
fn three_adamw_steps_of_dpo_and_kto_equal_trls() {
    let _serial = serial();
    let runs: [(&str, fn(&Path) -> TrainConfig, f64); 2] = [
        ("dpo_adamw", |out| dpo(out, 6, LossType::Sigmoid), 1e-8),
        // Adam's epsilon as the fixture's (see gen_preference_fixtures.py).
        ("kto_adamw", |out| kto(out, 6, LossType::Kto), 1e-6),
    ];
    for (run, config, eps) in runs {
        let out = tempfile::tempdir().unwrap();
        let mut c = config(out.path());
        three_adamw_steps(&mut c);
        c.train.adam_eps = eps;
        let reports = train(c, &cpu());
        check_steps(&reports, &steps()[run], 1e-4);
        check_trls_adapter(out.path(), 3, run);
    }
}

/// `swift-rs ARGS` run from the repository's root.
fn swift_rs(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_swift-rs"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

/// A run directory's logging.jsonl, an object a line.
fn log_of(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("logging.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A DPO run as ms-swift's command line writes it, on the quickstart model and the sample pairs
/// (`datasets/dpo_sample.jsonl`, ms-swift's messages + rejected_response): the chosen answer's
/// reward margin grows, every step logs TRL's metrics, and the run's config.toml is for
/// `swift-rs rlhf` (which `train` refuses).
#[test]
fn a_dpo_run_from_ms_swifts_command_line_grows_its_reward_margin() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let done = swift_rs(&[
        "rlhf",
        "--rlhf_type",
        "dpo",
        "--model",
        "examples/quickstart-model",
        "--dataset",
        "datasets/dpo_sample.jsonl",
        "--torch_dtype",
        "float32",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--learning_rate",
        "5e-4",
        "--lora_rank",
        "8",
        "--lora_alpha",
        "32",
        "--max_steps",
        "6",
        "--logging_steps",
        "1",
        "--beta",
        "0.1",
        "--output_dir",
        run.to_str().unwrap(),
        "--add_version",
        "false",
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    let log = log_of(&run);
    assert_eq!(log.len(), 6);
    let margin = |e: &Value| e["rewards/margins"].as_f64().unwrap();
    // The first step's policy is its reference (a fresh adapter): no margin yet.
    assert_eq!(margin(&log[0]), 0.0);
    assert!(margin(&log[5]) > 1.0, "{log:?}");
    assert_eq!(log[5]["rewards/accuracies"], 1.0);
    assert!(run.join("images/rewards_margins.png").is_file());
    let config = TrainConfig::load(&run.join("config.toml"), &[]).unwrap();
    assert!(config.rlhf.is_some());
    assert_eq!(
        config.data.loss_scale,
        swift_rs::config::LossScale::LastRound
    );
    // `encode` shows the pairs as training sees them.
    let config_path = run.join("config.toml");
    let shown = swift_rs(&[
        "encode",
        "--config",
        config_path.to_str().unwrap(),
        "--limit",
        "1",
    ]);
    let line: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert!(
        line["chosen_input_ids"].is_array() && line["rejected_labels"].is_array(),
        "{line}"
    );
    let refused = swift_rs(&[
        "train",
        "--config",
        run.join("config.toml").to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("swift-rs rlhf"));
}

/// A KTO run as ms-swift's example writes it (one answer a micro-batch, its KL term from the
/// other answers of the step), on the quickstart model and `datasets/kto_sample.jsonl`: the
/// desirable answers' rewards rise above the undesirable ones', TRL's `kl` is logged, and with
/// one answer a micro-batch there is no margin to log, as in TRL.
#[test]
fn a_kto_run_from_ms_swifts_command_line_separates_the_answers() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let line = "rlhf --rlhf_type kto --model examples/quickstart-model \
                --dataset datasets/kto_sample.jsonl --torch_dtype float32 \
                --per_device_train_batch_size 1 --gradient_accumulation_steps 4 \
                --learning_rate 5e-4 --lora_rank 8 --lora_alpha 32 --max_steps 6 \
                --logging_steps 1 --add_version false --device cpu --output_dir";
    let mut args: Vec<&str> = line.split_whitespace().collect();
    args.push(run.to_str().unwrap());
    let done = swift_rs(&args);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let log = log_of(&run);
    assert_eq!(log.len(), 6);
    let gap =
        |e: &Value| e["rewards/chosen"].as_f64().unwrap() - e["rewards/rejected"].as_f64().unwrap();
    assert_eq!(gap(&log[0]), 0.0);
    assert!(gap(&log[5]) > 0.5, "{log:?}");
    assert!(log
        .iter()
        .all(|e| e["kl"].is_f64() && e.get("rewards/margins").is_none()));
    // `encode` shows each answer with its label.
    let config = run.join("config.toml");
    let shown = swift_rs(&[
        "encode",
        "--config",
        config.to_str().unwrap(),
        "--limit",
        "1",
    ]);
    let line: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(line["label"], true, "{line}");
    // One answer a step would leave KTO no other answer to estimate its KL term from.
    let alone = swift_rs(&[
        "rlhf",
        "--config",
        config.to_str().unwrap(),
        "--set",
        "train.grad_accum=1",
        "--set",
        "output.overwrite=true",
    ]);
    assert_eq!(alone.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&alone.stderr).contains("train.batch_size"));
}

/// A pair in a KTO run, and a KTO row in a DPO run, are bad rows, named.
#[test]
fn rows_of_the_other_kind_are_named_bad_rows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (kind, file, says) in [
        (
            RlhfType::Kto,
            "dpo_sample.jsonl",
            "takes rows with a \"label\"",
        ),
        (RlhfType::Dpo, "kto_sample.jsonl", "set rlhf.type = \"kto\""),
    ] {
        let out = tempfile::tempdir().unwrap();
        let mut c = common::training::quickstart(out.path(), 2);
        c.data.train = vec![root.join("datasets").join(file).display().to_string()];
        c.rlhf = Some(RlhfSection {
            kind,
            ..RlhfSection::default()
        });
        let model = Path::new(&c.model.path);
        let encoder = swift_rs::data::encode::Encoder::from_config(model, &c).unwrap();
        let e = swift_rs::data::dataset::Dataset::build(&c.data, 0, &encoder)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&format!("{file}:1:")) && e.contains(says), "{e}");
    }
}

/// A DPO run stopped halfway and resumed ends bit for bit where an unbroken one does, its pairs
/// read whole or streamed; so does a KTO run.
#[test]
fn a_resumed_dpo_or_kto_run_ends_bit_for_bit_where_an_unbroken_one_does() {
    let _serial = serial();
    for (kind, file, streaming) in [
        (RlhfType::Dpo, "dpo_sample.jsonl", false),
        (RlhfType::Dpo, "dpo_sample.jsonl", true),
        (RlhfType::Kto, "kto_sample.jsonl", false),
    ] {
        common::training::a_resumed_run_ends_where_an_unbroken_one_does(&cpu(), 4, |out| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let mut c = common::training::quickstart(out, 4);
            c.data.train = vec![root.join("datasets").join(file).display().to_string()];
            c.data.loss_scale = swift_rs::config::LossScale::LastRound;
            c.data.streaming = streaming;
            c.rlhf = Some(RlhfSection {
                kind,
                ..RlhfSection::default()
            });
            c.train.save_steps = 2;
            c
        });
    }
}

/// DPO on an NF4 base (QLoRA): the reference is that same quantized base with the adapters off,
/// so a fresh adapter starts at TRL's ln 2 and the loss on the same pairs falls step by step.
#[test]
fn dpo_trains_on_an_nf4_base_against_itself_as_the_reference() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let mut c = dpo(out.path(), 2, LossType::Sigmoid);
    c.lora.init_adapter = None;
    c.rlhf.as_mut().unwrap().ref_adapter = None;
    c.quant.bits = Some(4);
    c.train.batch_size = 2;
    c.train.grad_accum = 1;
    c.train.max_steps = 4;
    c.train.lr = 1e-2;
    c.train.lr_scheduler = ScheduleKind::Constant;
    let losses: Vec<f64> = train(c, &cpu()).iter().map(|r| r.loss.unwrap()).collect();
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-6,
        "{losses:?}"
    );
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "{losses:?}");
}

/// Evaluation reports the preference loss of the validation pairs (TRL's eval loss): ln 2 for a
/// policy still equal to its reference, less once it has learned those pairs.
#[test]
fn evaluation_reports_the_preference_loss() {
    let _serial = serial();
    for (lr, learned) in [(0.0, false), (1e-2, true)] {
        let out = tempfile::tempdir().unwrap();
        let mut c = dpo(out.path(), 2, LossType::Sigmoid);
        c.lora.init_adapter = None;
        c.rlhf.as_mut().unwrap().ref_adapter = None;
        c.data.val = c.data.train.clone();
        c.train.batch_size = 2;
        c.train.grad_accum = 1;
        c.train.max_steps = 3;
        c.train.lr = lr;
        c.train.lr_scheduler = ScheduleKind::Constant;
        let reports = train(c, &cpu());
        let eval = reports[2].logged.as_ref().unwrap().eval_loss.unwrap();
        match learned {
            false => assert!((eval - std::f64::consts::LN_2).abs() < 1e-6, "{eval}"),
            true => assert!(eval < 0.6, "{eval}"),
        }
    }
}

/// A DPO run that went on from a saved adapter resumes with the reference it started with: that
/// adapter when it is also the reference adapter (read anew: the checkpoint holds the trained
/// one), else the base; either ends bit for bit where an unbroken run does.
#[test]
fn a_resumed_dpo_run_from_a_saved_adapter_keeps_its_reference() {
    let _serial = serial();
    let data = tempfile::tempdir().unwrap();
    let pairs = dpo(data.path(), 6, LossType::Sigmoid).data.train;
    for shared in [true, false] {
        common::training::a_resumed_run_ends_where_an_unbroken_one_does(&cpu(), 4, |out| {
            let mut c = dpo(data.path(), 6, LossType::Sigmoid);
            if !shared {
                c.rlhf.as_mut().unwrap().ref_adapter = None;
            }
            c.data.train = pairs.clone();
            c.output.dir = out.to_path_buf();
            c.train.batch_size = 2;
            c.train.grad_accum = 1;
            c.train.max_steps = 4;
            c.train.save_steps = 2;
            c.train.lr = 1e-2;
            c
        });
    }
}
