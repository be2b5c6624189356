//! `Trainer` against PyTorch + PEFT (fixtures from scripts/gen_fixtures.py, `make_training`):
//! one SGD step from a PEFT adapter for batch 4 x accum 1, 1 x 4 and 2 x 2, three AdamW steps with
//! clipping and a schedule; gradient checkpointing against one whole graph; bit-exact resume;
//! checkpoints, rotation and a loss that goes non-finite.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burn::backend::{Autodiff, Flex};
use common::{adapter_dir, fixtures, model_dir};
use safetensors::SafeTensors;
use serde_json::Value;
use swift_rs::config::{Device, Dtype, OptimizerKind, ScheduleKind, TrainConfig};
use swift_rs::train::checkpoint;
use swift_rs::train::{Control, Outcome, StepReport, TrainError, Trainer};

type AB = Autodiff<Flex>;

/// Flex's random generator is global and dropout reseeds it: tests that train run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A config on a fixture model and the training fixture rows, in file order, f32, no logs.
fn config(model: &str, out: &Path) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.model.path = model_dir(model).display().to_string();
    c.model.dtype = Some(Dtype::F32);
    c.data.train = vec![fixtures().join("training/rows.jsonl").display().to_string()];
    c.data.shuffle = false;
    c.output.dir = out.to_path_buf();
    c.output.tensorboard = false;
    c.output.plots = false;
    c.train.save_steps = 1000;
    c.train.logging_steps = 1;
    c
}

/// The trainer of `config`, resolved for the CPU as the CLI resolves it.
fn trainer(config: TrainConfig) -> Result<Trainer<AB>, TrainError> {
    Ok(Trainer::new(
        config.resolve(Device::Cpu)?,
        Default::default(),
    )?)
}

/// Runs to the end; returns each step's report.
fn train(config: TrainConfig) -> Vec<StepReport> {
    let mut trainer = trainer(config).unwrap();
    let mut reports = Vec::new();
    trainer
        .run(|r| {
            reports.push(r.clone());
            Control::Continue
        })
        .unwrap();
    reports
}

/// Runs until the callback stops it after step `stop`.
fn train_until(config: TrainConfig, stop: u64) -> Outcome {
    let mut trainer = trainer(config).unwrap();
    trainer
        .run(|r| {
            if r.step == stop {
                Control::Stop
            } else {
                Control::Continue
            }
        })
        .unwrap()
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let values = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (k, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every tensor of the adapter in `dir` within `tol` of PyTorch's, and moved by training.
fn check_adapter(dir: &Path, expected: &Path, start: &Path, tol: f32) {
    let got = tensors(&dir.join("adapter_model.safetensors"));
    let want = tensors(expected);
    let before = tensors(&start.join("adapter_model.safetensors"));
    assert_eq!(
        got.iter().map(|t| &t.0).collect::<Vec<_>>(),
        want.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for (((key, g), (_, w)), (_, b)) in got.iter().zip(&want).zip(&before) {
        let diff = common::max_abs_diff(g, w);
        let moved = common::max_abs_diff(w, b);
        assert!(
            diff < tol,
            "{key}: max |diff| {diff} >= {tol} (the step moved it by {moved})"
        );
        assert!(
            moved > 10.0 * tol,
            "{key}: PyTorch's step moved it by only {moved}"
        );
    }
}

fn steps_fixture() -> Value {
    let text = std::fs::read_to_string(fixtures().join("training/steps.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check_trace(reports: &[StepReport], want: &Value, tol: f64) {
    let want = want.as_array().unwrap();
    assert_eq!(reports.len(), want.len());
    for (r, w) in reports.iter().zip(want) {
        let (loss, norm) = (
            w["loss"].as_f64().unwrap(),
            w["grad_norm"].as_f64().unwrap(),
        );
        assert!(
            (r.loss - loss).abs() < tol,
            "step {}: loss {} vs {loss}",
            r.step,
            r.loss
        );
        assert!(
            (r.grad_norm - norm).abs() < tol,
            "step {}: grad norm {} vs {norm}",
            r.step,
            r.grad_norm
        );
    }
}

#[test]
fn one_sgd_step_equals_pytorch_peft_for_every_accumulation() {
    let _serial = serial();
    let steps = steps_fixture();
    // (batch, accum, gradient checkpointing)
    for (batch, accum, checkpointing) in [(4, 1, false), (1, 4, true), (2, 2, true)] {
        let out = tempfile::tempdir().unwrap();
        let mut c = config("qwen2_bf16", out.path());
        c.lora.init_adapter = Some(adapter_dir("qwen2_rslora"));
        c.train.batch_size = batch;
        c.train.grad_accum = accum;
        c.train.max_steps = 1;
        c.train.optimizer = OptimizerKind::Sgd;
        c.train.lr = 1.0;
        c.train.lr_scheduler = ScheduleKind::Constant;
        c.train.weight_decay = 0.1;
        c.train.max_grad_norm = 0.0;
        c.train.gradient_checkpointing = checkpointing;
        let reports = train(c);
        let name = format!("sgd_{batch}x{accum}");
        check_trace(&reports, &steps[&name], 1e-5);
        check_adapter(
            &out.path().join("checkpoint-1"),
            &fixtures().join(format!("training/{name}.safetensors")),
            &adapter_dir("qwen2_rslora"),
            2e-5,
        );
    }
}

#[test]
fn three_adamw_steps_with_clipping_equal_pytorch_peft() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let mut c = config("qwen3_f16", out.path());
    c.lora.init_adapter = Some(adapter_dir("qwen3_dora"));
    c.train.batch_size = 2;
    c.train.grad_accum = 1;
    c.train.max_steps = 3;
    c.train.lr = 1e-2;
    c.train.lr_scheduler = ScheduleKind::Linear;
    c.train.weight_decay = 0.1;
    c.train.adam_beta1 = 0.9;
    c.train.adam_beta2 = 0.95;
    c.train.adam_eps = 1e-8;
    c.train.max_grad_norm = 0.5;
    let reports = train(c);
    check_trace(&reports, &steps_fixture()["adamw"], 1e-4);
    check_adapter(
        &out.path().join("checkpoint-3"),
        &fixtures().join("training/adamw.safetensors"),
        &adapter_dir("qwen3_dora"),
        1e-4,
    );
}

/// A fresh adapter with dropout on the quickstart model: what resume and checkpoint tests train.
fn quickstart(out: &Path, max_steps: i64) -> TrainConfig {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut c = TrainConfig::load(&root.join("configs/quickstart.toml"), &[]).unwrap();
    c.model.path = root.join("examples/quickstart-model").display().to_string();
    c.model.dtype = Some(Dtype::F32);
    c.data.train = vec![root
        .join("datasets/self_cognition.jsonl")
        .display()
        .to_string()];
    c.lora.dropout = 0.1;
    c.lora.r = 4;
    c.train.batch_size = 4;
    c.train.grad_accum = 2;
    c.train.max_steps = max_steps;
    c.train.save_steps = 3;
    c.output.dir = out.to_path_buf();
    c.output.tensorboard = false;
    c.output.plots = false;
    c
}

#[test]
fn a_resumed_run_ends_bit_for_bit_where_an_unbroken_one_does() {
    let _serial = serial();
    // Rows read whole, and streamed (read again and skipped to the checkpoint's position).
    for streaming in [false, true] {
        let config = |out: &Path| {
            let mut c = quickstart(out, 8);
            c.data.streaming = streaming;
            c
        };
        let whole = tempfile::tempdir().unwrap();
        train(config(whole.path()));

        let broken = tempfile::tempdir().unwrap();
        let stopped = train_until(config(broken.path()), 4);
        assert!(stopped.stopped);
        assert_eq!(stopped.last_checkpoint, broken.path().join("checkpoint-4"));
        let mut resumed = config(broken.path());
        resumed.train.resume_from = Some("latest".into());
        let reports = train(resumed);
        assert_eq!(reports.first().map(|r| r.step), Some(5));

        for file in ["adapter_model.safetensors", "optimizer.safetensors"] {
            let a = std::fs::read(whole.path().join("checkpoint-8").join(file)).unwrap();
            let b = std::fs::read(broken.path().join("checkpoint-8").join(file)).unwrap();
            assert!(
                a == b,
                "{file} differs after resuming (streaming {streaming})"
            );
        }
        let log = |dir: &Path| std::fs::read_to_string(dir.join("logging.jsonl")).unwrap();
        let losses = |text: String| -> Vec<f64> {
            text.lines()
                .map(|l| {
                    serde_json::from_str::<Value>(l).unwrap()["loss"]
                        .as_f64()
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(losses(log(whole.path())), losses(log(broken.path())));
    }
}

#[test]
fn gradient_checkpointing_changes_nothing_with_dropout() {
    let _serial = serial();
    let run = |checkpointing: bool| -> PathBuf {
        let out = tempfile::tempdir().unwrap().keep();
        let mut c = quickstart(&out, 2);
        c.train.gradient_checkpointing = checkpointing;
        train(c);
        out.join("checkpoint-2")
    };
    let (a, b) = (run(true), run(false));
    for ((key, x), (_, y)) in tensors(&a.join("adapter_model.safetensors"))
        .iter()
        .zip(&tensors(&b.join("adapter_model.safetensors")))
    {
        let d = common::max_abs_diff(x, y);
        assert!(d < 1e-6, "{key}: {d}");
    }
}

#[test]
fn checkpoints_are_whole_and_rotated_keeping_best_and_newest() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let mut c = quickstart(out.path(), 9);
    c.data.val_ratio = 0.25;
    c.train.save_total_limit = Some(2);
    let reports = train(c);
    let saved: Vec<u64> = checkpoint::list(out.path())
        .iter()
        .map(|(s, _)| *s)
        .collect();
    let state = checkpoint::load_state(&out.path().join("checkpoint-9")).unwrap();
    let best = state.best_model_checkpoint.clone().unwrap();
    let evals: Vec<(u64, f64)> = reports
        .iter()
        .filter_map(|r| Some((r.step, r.logged.as_ref()?.eval_loss?)))
        .collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 6, 9]);
    let best_step = evals
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|e| e.0)
        .unwrap();
    assert_eq!(best, checkpoint::checkpoint_dir(out.path(), best_step));
    // Two kept: the newest, and the best when it is older, else the one before the newest.
    let want = if best_step < 6 {
        vec![best_step, 9]
    } else {
        vec![6, 9]
    };
    assert_eq!(saved, want);
    for (_, dir) in checkpoint::list(out.path()) {
        for file in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
        ] {
            assert!(dir.join(file).is_file(), "{} lacks {file}", dir.display());
        }
    }
}

#[test]
fn an_interrupted_checkpoint_write_leaves_the_previous_one_in_use() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    train_until(quickstart(out.path(), 9), 3);
    // What a kill during the next save leaves: the staged directory, half-written.
    let staged = out.path().join(".tmp-killed");
    std::fs::create_dir(&staged).unwrap();
    let whole = std::fs::read(out.path().join("checkpoint-3/adapter_model.safetensors")).unwrap();
    std::fs::write(
        staged.join("adapter_model.safetensors"),
        &whole[..whole.len() / 2],
    )
    .unwrap();
    assert_eq!(checkpoint::list(out.path()).len(), 1);

    // A save that fails (the name it must take is held by a file) keeps the previous one whole.
    std::fs::write(out.path().join("checkpoint-6"), b"in the way").unwrap();
    let mut resumed = quickstart(out.path(), 9);
    resumed.train.resume_from = Some("latest".into());
    let mut trainer = trainer(resumed).unwrap();
    assert_eq!(trainer.state.global_step, 3);
    let err = trainer.run(|_| Control::Continue).unwrap_err();
    assert!(matches!(err, TrainError::Export(_)), "{err}");
    let after = std::fs::read(out.path().join("checkpoint-3/adapter_model.safetensors")).unwrap();
    assert!(after == whole);
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-") && e.path() != staged)
        .collect();
    assert!(leftovers.is_empty(), "the failed save left {leftovers:?}");
}

#[test]
fn a_non_finite_loss_stops_with_the_last_good_checkpoint_named() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let mut c = quickstart(out.path(), 6);
    c.train.optimizer = OptimizerKind::Sgd;
    c.train.lr = 1e30;
    c.train.lr_scheduler = ScheduleKind::Constant;
    c.train.warmup_ratio = 0.0;
    c.train.max_grad_norm = 0.0;
    c.train.save_steps = 1;
    let mut trainer = trainer(c).unwrap();
    let err = trainer.run(|_| Control::Continue).unwrap_err();
    let TrainError::NonFinite { step, ref last, .. } = err else {
        panic!("{err}");
    };
    let good = checkpoint::list(out.path());
    assert_eq!(good.last().map(|(s, _)| s + 1), Some(step));
    assert!(last.contains(&format!("checkpoint-{}", step - 1)), "{err}");
}

#[test]
fn a_directory_that_holds_a_run_is_refused_unless_overwriting() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    train(quickstart(out.path(), 3));
    let again = trainer(quickstart(out.path(), 3));
    assert!(matches!(again, Err(TrainError::RunExists { .. })));
    let mut c = quickstart(out.path(), 2);
    c.output.overwrite = true;
    train(c);
    let saved: Vec<u64> = checkpoint::list(out.path())
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(saved, vec![2], "the old run's checkpoints are gone");
}

#[test]
fn qlora_trains_adapters_on_an_nf4_base() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let mut c = config("llama", out.path());
    c.lora.init_adapter = Some(adapter_dir("llama_qv"));
    c.quant.bits = Some(4);
    c.train.batch_size = 4;
    c.train.grad_accum = 1;
    c.train.max_steps = 4;
    c.train.lr = 1e-2;
    c.train.lr_scheduler = ScheduleKind::Constant;
    let mut trainer = trainer(c).unwrap();
    let base = &trainer.model.model.layers[0].self_attn.q_proj.base;
    assert!(matches!(base, swift_rs::lora::BaseLinear::Nf4(_)));
    let mut losses = Vec::new();
    trainer
        .run(|r| {
            losses.push(r.loss);
            Control::Continue
        })
        .unwrap();
    // The same rows every step: the loss on them falls as the adapter learns.
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "{losses:?}");
    let before = tensors(&adapter_dir("llama_qv").join("adapter_model.safetensors"));
    let after = tensors(&out.path().join("checkpoint-4/adapter_model.safetensors"));
    for ((key, a), (_, b)) in before.iter().zip(&after) {
        assert!(common::max_abs_diff(a, b) > 1e-4, "{key} did not move");
    }
}

#[test]
fn a_config_built_in_code_is_checked_with_its_key_named() {
    let err = trainer(TrainConfig::default()).err().unwrap();
    assert!(
        err.is_usage() && err.to_string().contains("model.path"),
        "{err}"
    );
    let out = tempfile::tempdir().unwrap();
    let mut c = config("qwen2_bf16", out.path());
    c.train.grad_accum = 0;
    let err = trainer(c).err().unwrap();
    assert!(
        err.is_usage() && err.to_string().contains("train.grad_accum"),
        "{err}"
    );
}
