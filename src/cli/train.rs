//! `swift-rs train --config FILE [--set section.key=value]...`: a LoRA / QLoRA fine-tune into
//! `output.dir`. A progress bar on a terminal, plain log lines otherwise. Ctrl-C, and SIGTERM (what
//! kill, docker, SLURM and Kubernetes send), finish the step, save a checkpoint and exit 0; a
//! second signal exits at once (130), losing only the step under way.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use burn::backend::Autodiff;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::device::{resolve, with_backend};
use super::Failure;
use swift_rs::config::{
    parse_swift_args, swift_help, versioned_dir, Device, RlhfType, SwiftCommand, TrainConfig,
    TrainPlan,
};
use swift_rs::data::dataset::TrainRow;
use swift_rs::export::exit_removing_staged;
use swift_rs::hub::ms_swift_hub;
use swift_rs::model::{ModelBackend, TrainBackend};
use swift_rs::train::log::LogEntry;
use swift_rs::train::{run_dir, Control, StepReport, TrainError, Trainer};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training config (TOML): [model] [lora] [quant] [data] [train] [output]
    #[arg(long)]
    config: PathBuf,
    /// Override a config key: section.key=value, or an ms-swift name key=value (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// auto, cpu, cuda[:N] or wgpu[:N]; overrides train.device
    #[arg(long)]
    device: Option<Device>,
}

static STOP: AtomicBool = AtomicBool::new(false);

/// The words after `swift-rs sft` (or `pt`), as ms-swift's command line has them.
#[derive(Args, Debug)]
pub struct SwiftLine {
    /// [CONFIG.yaml|CONFIG.json] [--flag value...]...: ms-swift's flags, with its defaults
    /// (`--help` lists them)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..,
          value_name = "FLAGS")]
    words: Vec<String>,
}

pub fn run(args: TrainArgs) -> Result<(), Failure> {
    let mut config = TrainConfig::load(&args.config, &args.set)?;
    refuse_preferences(&config)?;
    // `--device` is written into the config, so config.toml records where the run went.
    if let Some(device) = args.device {
        config.train.device = device;
    }
    train(config)
}

/// `swift-rs sft` and `pt`: ms-swift's command line, onto `--config FILE` when it names one.
pub fn run_swift(command: SwiftCommand, line: SwiftLine) -> Result<(), Failure> {
    if line.words.iter().any(|w| w == "--help" || w == "-h") {
        swift_rs::show!("{}", swift_help(command));
        return Ok(());
    }
    let args = parse_swift_args(command, &line.words)?;
    for (name, value) in &args.env {
        match std::env::var(name) {
            Err(_) => std::env::set_var(name, value),
            Ok(set) if set != *value => swift_rs::say!(
                "warning: {name} is set to {set:?} in the environment, which wins over the \
                 config's {value:?}"
            ),
            Ok(_) => {}
        }
    }
    for notice in &args.notices {
        swift_rs::say!("note: {notice}");
    }
    let mut config = args.load()?;
    if command != SwiftCommand::Rlhf {
        refuse_preferences(&config)?;
    }
    // The TOML form (`--config FILE`) runs as `train --config FILE` does: the same hub for the
    // same `[model] path`, checkpoints right in `output.dir`. ms-swift's flag form (and its
    // YAML/JSON configs) follows ms-swift: its hub for the model and the datasets both where
    // nothing says, and each run in a `vN-YYYYMMDD-HHMMSS` folder of its own.
    if args.config.is_none() {
        let hub = config.model.hub.unwrap_or_else(ms_swift_hub);
        config.model.hub = Some(hub);
        config.data.hub.get_or_insert(hub);
        if args.add_version {
            config.output.dir = versioned_dir(&config.output.dir, std::time::SystemTime::now());
        }
    }
    train(config)
}

/// A config with an `[rlhf]` section (or ms-swift's rlhf flags) is for `swift-rs rlhf`.
fn refuse_preferences(config: &TrainConfig) -> Result<(), Failure> {
    match config.rlhf {
        Some(_) => Err(Failure::Usage(anyhow::anyhow!(
            "[rlhf] (rlhf.type, beta, loss_type, ...) is preference training: run it with \
             `swift-rs rlhf`"
        ))),
        None => Ok(()),
    }
}

/// Trains `config`. A run that fails before its first checkpoint removes the run directory it
/// made, so that a failed try leaves nothing behind (nor takes the next `vN-...` number).
fn train(config: TrainConfig) -> Result<(), Failure> {
    let dir = config.output.dir.clone();
    let made = !dir.exists();
    let result = resolve_and_train(config);
    if result.is_err() && made && dir.exists() && !run_dir::holds_run(&dir) {
        // Best effort: the run's own error is the one to report.
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn resolve_and_train(config: TrainConfig) -> Result<(), Failure> {
    let backend = resolve(config.train.device)?;
    let plan = config.resolve(backend.device())?;
    super::say_dtype_choice(backend.device(), config.model.dtype);
    with_backend!(backend, train_on(plan))
}

fn train_on<B: ModelBackend>(device: B::Device, plan: TrainPlan) -> Result<(), Failure> {
    let fail = |e: TrainError| Failure::of(e, "cannot train");
    let mut trainer = Trainer::<Autodiff<B>>::new(plan, device).map_err(fail)?;
    describe(&trainer);
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            // The checkpoint being written, if any, is incomplete: the last whole one stays.
            exit_removing_staged(130);
        }
        swift_rs::say!(
            "\nstopping after this step to save a checkpoint (Ctrl-C or kill again to quit now)"
        );
    })
    .context("cannot install the SIGINT/SIGTERM handler")?;

    let terminal = std::io::stderr().is_terminal();
    let first = trainer.state.global_step;
    let bar = terminal.then(|| {
        let bar = ProgressBar::new(trainer.state.max_steps).with_position(first);
        let style = ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("a valid template");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(500));
        bar
    });
    let outcome = trainer
        .run(|report: &StepReport| {
            match &bar {
                Some(bar) => {
                    bar.set_position(report.step);
                    if let Some(entry) = &report.logged {
                        bar.set_message(format!(
                            "loss {:.4} lr {:.2e} {:.0} tok/s",
                            entry.loss, entry.learning_rate, entry.tokens_per_sec
                        ));
                        bar.println(log_line(entry, report.max_steps));
                    }
                }
                None => {
                    if let Some(entry) = &report.logged {
                        swift_rs::say!("{}", log_line(entry, report.max_steps));
                    }
                }
            }
            if let Some(dir) = &report.checkpoint {
                let line = format!("saved {}", dir.display());
                match &bar {
                    Some(bar) => bar.println(line),
                    None => swift_rs::say!("{line}"),
                }
            }
            if STOP.load(Ordering::SeqCst) {
                Control::Stop
            } else {
                Control::Continue
            }
        })
        .map_err(fail)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    for warning in &outcome.warnings {
        swift_rs::say!("warning: {warning}");
    }
    let dir = outcome.last_checkpoint.display();
    if outcome.stopped {
        swift_rs::say!(
            "stopped at step {}: {dir} saved; continue with --set train.resume_from=latest",
            outcome.steps
        );
    } else {
        swift_rs::say!("done: {} steps; the adapter is in {dir}", outcome.steps);
    }
    Ok(())
}

fn describe<B: TrainBackend>(trainer: &Trainer<B>) {
    let trainable: usize = trainer
        .model
        .adapters()
        .flat_map(|a| a.trainable())
        .map(|(_, t)| t.dims()[0])
        .sum();
    swift_rs::say!(
        "model {}: {} trainable adapter parameters (r {}, alpha {}{}{})",
        trainer.plan.config.model.path,
        trainable,
        trainer.lora.r,
        trainer.lora.lora_alpha,
        if trainer.lora.use_rslora {
            ", rsLoRA"
        } else {
            ""
        },
        if trainer.lora.use_dora { ", DoRA" } else { "" },
    );
    if trainer.model.is_vision_language() {
        swift_rs::say!(
            "a vision-language checkpoint: its language model trains, its vision tower stays on disk"
        );
    }
    let config = &trainer.plan.config;
    if let Some(text) = trainer
        .bad_rows()
        .and_then(|b| b.describe(config.data.max_length))
    {
        swift_rs::say!("{text}");
    }
    let rlhf = config.rlhf.as_ref().filter(|r| r.kind == RlhfType::Kto);
    if let (Some(rlhf), Some(rows)) = (rlhf, trainer.train_rows()) {
        let desirable = rows
            .iter()
            .filter(|r| {
                matches!(
                    r,
                    TrainRow::Unpaired {
                        desirable: true,
                        ..
                    }
                )
            })
            .count();
        if let Some(advice) = rlhf.kto_weights_advice(desirable, rows.len() - desirable) {
            swift_rs::say!("note: {advice}");
        }
    }
    let s = &trainer.state;
    if trainer.trains_nothing() {
        let t = &config.train;
        swift_rs::say!(
            "warning: the learning rate is 0 at every one of the {} steps (train.lr = {}, \
             warmup_ratio {}, warmup_steps {}): the adapter will not change; train longer \
             (more rows or epochs, or train.max_steps), or warm up less",
            s.max_steps - s.global_step,
            t.lr,
            t.warmup_ratio,
            t.warmup_steps
        );
    }
    if s.global_step > 0 {
        swift_rs::say!("resuming at step {} of {}", s.global_step, s.max_steps);
    } else {
        swift_rs::say!(
            "training {} steps into {}",
            s.max_steps,
            trainer.run_dir.display()
        );
    }
}

fn log_line(e: &LogEntry, max_steps: u64) -> String {
    let mut line = format!(
        "step {}/{max_steps} epoch {:.2} loss {:.4} grad_norm {:.4} lr {:.3e} {:.0} tok/s mem {:.2} GiB",
        e.step, e.epoch, e.loss, e.grad_norm, e.learning_rate, e.tokens_per_sec, e.memory_gib
    );
    if let Some(eval) = e.eval_loss {
        line.push_str(&format!(" eval_loss {eval:.4}"));
    }
    line
}
