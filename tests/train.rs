//! `Trainer` against PyTorch + PEFT (fixtures from scripts/gen_fixtures.py, `make_training`):
//! one SGD step from a PEFT adapter for batch 4 x accum 1, 1 x 4 and 2 x 2, three AdamW steps with
//! clipping and a schedule; gradient checkpointing against one whole graph; bit-exact resume;
//! checkpoints, rotation and a loss that goes non-finite.

mod common;

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use common::adapter_dir;
use common::training::{self, config, quickstart, serial, tensors, On};
use swift_rs::config::{Device, OptimizerKind, ScheduleKind, TrainConfig};
use swift_rs::train::checkpoint;
use swift_rs::train::{Control, Outcome, StepReport, TrainError, Trainer};

type AB = Autodiff<Flex>;

fn cpu() -> On<AB> {
    On {
        device: Device::Cpu,
        backend: Default::default(),
    }
}

fn trainer(config: TrainConfig) -> Result<Trainer<AB>, TrainError> {
    training::trainer(config, &cpu())
}

fn train(config: TrainConfig) -> Vec<StepReport> {
    training::train(config, &cpu())
}

fn train_until(config: TrainConfig, stop: u64) -> Outcome {
    training::train_until(config, &cpu(), stop)
}

#[test]
fn one_sgd_step_equals_pytorch_peft_for_every_accumulation() {
    let _serial = serial();
    training::one_sgd_step_equals_pytorch_peft(&cpu());
}

#[test]
fn three_adamw_steps_with_clipping_equal_pytorch_peft() {
    let _serial = serial();
    training::three_adamw_steps_equal_pytorch_peft(&cpu());
}

#[test]
fn qwen3_5_steps_equal_pytorch_peft() {
    let _serial = serial();
    training::qwen3_5_sgd_step_equals_pytorch_peft(&cpu(), 2, 2, true);
    training::qwen3_5_sgd_step_equals_pytorch_peft(&cpu(), 4, 1, false);
    training::qwen3_5_adamw_steps_equal_pytorch_peft(&cpu());
}

#[test]
fn moe_steps_equal_pytorch_peft() {
    let _serial = serial();
    training::moe_steps_equal_pytorch_peft(&cpu());
}

#[test]
fn a_resumed_run_ends_bit_for_bit_where_an_unbroken_one_does() {
    let _serial = serial();
    // Rows read whole, and streamed (read again and skipped to the checkpoint's position).
    for streaming in [false, true] {
        training::a_resumed_run_ends_where_an_unbroken_one_does(&cpu(), 8, |out| {
            let mut c = quickstart(out, 8);
            c.data.streaming = streaming;
            c
        });
    }
}

/// Qwen3.5's layers resume bit for bit too (packed rows, each sample's state starting afresh).
#[test]
fn a_resumed_qwen3_5_run_ends_bit_for_bit_where_an_unbroken_one_does() {
    let _serial = serial();
    training::a_resumed_run_ends_where_an_unbroken_one_does(&cpu(), 4, |out| {
        let mut c = config("qwen3_5_vl", out);
        c.model.template = swift_rs::config::TemplateName::Chatml;
        c.data.train = vec![common::fixtures()
            .join("training/qwen3_5_rows.jsonl")
            .display()
            .to_string()];
        c.data.packing = true;
        c.data.max_length = 128;
        c.lora.dropout = 0.1;
        c.train.batch_size = 2;
        c.train.max_steps = 4;
        c.train.save_steps = 2;
        c
    });
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
    let run = |reads_every: usize| {
        let out = tempfile::tempdir().unwrap();
        let mut c = quickstart(out.path(), 6);
        c.train.optimizer = OptimizerKind::Sgd;
        c.train.lr = 1e30;
        // Warm-up from 0: step 1 leaves the weights as they are, step 2 blows them up, and step
        // 3's loss is not finite.
        c.train.lr_scheduler = ScheduleKind::Constant;
        c.train.warmup_steps = 3;
        c.train.max_grad_norm = 0.0;
        c.train.save_steps = reads_every;
        c.train.logging_steps = reads_every;
        let mut trainer = trainer(c).unwrap();
        let err = trainer.run(|_| Control::Continue).unwrap_err();
        (out, trainer, err)
    };
    // Read (and saved) every step: stopped at the first bad step.
    let (out, _, err) = run(1);
    let TrainError::NonFinite { step, ref last, .. } = err else {
        panic!("{err}");
    };
    let saved = checkpoint::list(out.path());
    assert_eq!(saved.last().map(|(s, _)| s + 1), Some(step));
    // The checkpoint of step - 1 holds the weights whose loss was not finite: it is not the
    // good one (it was named before, and evaluated to NaN).
    assert!(!last.contains(&format!("checkpoint-{}", step - 1)), "{err}");
    assert_eq!(step, 3, "{err}");
    assert!(last.contains("checkpoint-1"), "{err}");

    // Read only at the last step: the same step is named, and the device skipped its update
    // and every later one, so no weight took the non-finite values.
    let (_, trainer, err) = run(6);
    let TrainError::NonFinite { step: named, .. } = err else {
        panic!("{err}");
    };
    assert_eq!(named, step);
    for lora in trainer.model.adapters() {
        for t in [&lora.lora_a, &lora.lora_b] {
            let values: Vec<f32> = t.val().into_data().to_vec().unwrap();
            assert!(values.iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn losses_are_read_once_a_logging_step_and_logged_as_the_window_mean() {
    let _serial = serial();
    let run = |logging_steps: usize| {
        let out = tempfile::tempdir().unwrap();
        let mut c = quickstart(out.path(), 6);
        c.train.logging_steps = logging_steps;
        c.train.save_steps = 6;
        train(c)
    };
    let every = run(1);
    let windowed = run(3);
    let read: Vec<u64> = windowed
        .iter()
        .filter(|r| r.loss.is_some() && r.grad_norm.is_some())
        .map(|r| r.step)
        .collect();
    assert_eq!(read, vec![3, 6]);
    for r in windowed.iter().filter(|r| r.loss.is_some()) {
        let window = &every[r.step as usize - 3..r.step as usize];
        let mean = window.iter().map(|w| w.loss.unwrap()).sum::<f64>() / 3.0;
        assert_eq!(r.logged.as_ref().unwrap().loss, mean, "step {}", r.step);
        assert_eq!(r.loss, every[r.step as usize - 1].loss);
        assert_eq!(r.grad_norm, every[r.step as usize - 1].grad_norm);
    }
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
fn a_live_trainer_locks_its_run_directory_until_dropped() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let first = trainer(quickstart(out.path(), 2)).unwrap();
    let mut c = quickstart(out.path(), 2);
    c.output.overwrite = true;
    match trainer(c.clone()) {
        Err(TrainError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
        other => panic!("not refused: {:?}", other.err()),
    }
    drop(first);
    trainer(c).unwrap();
}

/// A run that failed before its first checkpoint left config.toml and logging.jsonl, and the
/// rerun was refused as "already holds a run" while "latest" said there was no checkpoint.
#[test]
fn a_run_that_failed_before_its_first_checkpoint_is_simply_run_again() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("config.toml"), "# an earlier run\n").unwrap();
    std::fs::write(out.path().join("logging.jsonl"), "{\"step\": 99}\n").unwrap();
    std::fs::create_dir(out.path().join(".tmp-swift-rs-1-killed")).unwrap();
    let reports = train(quickstart(out.path(), 2));
    assert_eq!(reports.len(), 2);
    let log = std::fs::read_to_string(out.path().join("logging.jsonl")).unwrap();
    assert!(!log.contains("\"step\": 99"), "{log}");
    assert!(!out.path().join(".tmp-swift-rs-1-killed").exists());

    // "latest" with no checkpoint yet starts the run (a job script that always says it).
    let fresh = tempfile::tempdir().unwrap();
    let mut c = quickstart(fresh.path(), 2);
    c.train.resume_from = Some("latest".into());
    assert_eq!(train(c).len(), 2);
}

#[test]
fn resuming_with_other_lora_settings_is_refused_naming_the_key() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    train(quickstart(out.path(), 2));
    let resumed = |edit: &dyn Fn(&mut TrainConfig)| {
        let mut c = quickstart(out.path(), 4);
        c.train.resume_from = Some("latest".into());
        edit(&mut c);
        trainer(c).err()
    };
    // The same settings, "all-linear" included (the checkpoint lists the modules it resolved to).
    assert!(resumed(&|_| {}).is_none());
    type Edit<'a> = (&'a str, &'a dyn Fn(&mut TrainConfig));
    let edits: [Edit; 5] = [
        ("lora.r", &|c| c.lora.r *= 2),
        ("lora.alpha", &|c| c.lora.alpha += 1.0),
        ("lora.target_modules", &|c| {
            c.lora.target_modules = vec!["q_proj".into()]
        }),
        ("lora.use_dora", &|c| c.lora.use_dora = true),
        ("lora.target_parameters", &|c| {
            c.lora.target_parameters = vec!["mlp.experts.down_proj".into()]
        }),
    ];
    for (key, edit) in edits {
        match resumed(edit) {
            Some(TrainError::Config { key: named, reason }) => {
                assert_eq!(named, key, "{reason}");
                assert!(reason.contains("checkpoint-2"), "{reason}");
            }
            other => panic!("{key}: {other:?}"),
        }
    }
}

#[test]
fn a_plot_that_cannot_be_written_is_a_warning_and_leaves_no_temporary() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let mut c = quickstart(out.path(), 2);
    c.output.plots = true;
    let images = out.path().join("images");
    let mut trainer = trainer(c).unwrap();
    let outcome = trainer
        .run(|r| {
            if r.step == 2 {
                // The plot's name is taken by a directory: its rename fails, as on a full disk.
                std::fs::create_dir_all(images.join("train_loss.png")).unwrap();
            }
            Control::Continue
        })
        .unwrap();
    assert_eq!(outcome.steps, 2);
    assert!(
        outcome
            .warnings
            .iter()
            .any(|w| w.contains("train_loss.png")),
        "{:?}",
        outcome.warnings
    );
    let left: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
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
    let base = &trainer.model.model.layers[0].linears()[0].1.base;
    assert!(matches!(base, swift_rs::lora::BaseLinear::Nf4(_)));
    let mut losses = Vec::new();
    trainer
        .run(|r| {
            losses.push(r.loss.unwrap());
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

/// ms-swift's `max_epochs`: a run (a stream's, whose length is only its max_steps) ends with the
/// epoch that reaches it, its last step saved and evaluated as a last step is, and a resume of it
/// finds nothing left to do.
#[test]
fn max_epochs_ends_the_run_with_its_epoch() {
    let _serial = serial();
    // 4 rows, a row a step: 4 steps an epoch.
    for streaming in [true, false] {
        let out = tempfile::tempdir().unwrap();
        let mut c = config("llama", out.path());
        c.data.streaming = streaming;
        c.data.val = c.data.train.clone();
        c.train.max_steps = if streaming { 100 } else { -1 };
        c.train.epochs = 3.0;
        c.train.batch_size = 1;
        c.train.grad_accum = 1;
        c.train.max_epochs = Some(2);
        let reports = train(c.clone());
        let last = reports.last().unwrap();
        assert_eq!(
            (reports.len(), last.step, last.max_steps),
            (8, 8, 8),
            "streaming {streaming}"
        );
        assert!(last.checkpoint.is_some());
        assert!(
            last.logged.as_ref().is_some_and(|l| l.eval_loss.is_some()),
            "{:?}",
            last.logged
        );
        assert_eq!(last.epoch, 2.0);
        c.train.resume_from = Some("latest".into());
        assert!(train(c).is_empty());
    }
}
