//! The training loop (`swift-rs train`, and `Trainer` for research code): LoRA/QLoRA on a frozen
//! base as transformers' Trainer + PEFT runs it. Every optimizer step takes `grad_accum`
//! micro-batches of `batch_size` rows; the loss is the mean over every label token of the whole
//! step (the micro-batches' summed losses divided by the step's label count, which is the fix of
//! transformers PR #34191, not a mean of micro-batch means); the adapter gradients
//! (`grads`) are clipped by their global norm and applied by AdamW or SGD at the scheduled
//! learning rate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::Tensor;

use super::checkpoint::{self, TrainerState};
use super::feed::{Feed, Source};
use super::grads::{flat_params, set_params, Preference, StepGrads};
use super::log::{self, LogEntry, PreferenceLog, RunLog};
use super::optim::{clip_grad_norm, Optimizer};
use super::preference::{CpoLoss, CpoSettings, DpoSettings, KtoSettings, LossType, Objective};
use super::run_dir;
use super::schedule::LrSchedule;
use super::{mean_loss, TrainError};
use crate::config::{
    DataSection, Length, LoraConfig, ModelConfig, RlhfSection, RlhfType, TrainPlan,
};
use crate::data::dataset::{BadRows, Dataset, TrainRow};
use crate::data::encode::Encoder;
use crate::export::peft::read_adapter;
use crate::hub;
use crate::lora::target::Targets;
use crate::model::{self, AdapterSource, CausalLm, LoadOptions, LoraPlan, TrainBackend};

/// What the callback of `Trainer::run` says after each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Save a checkpoint of this step and return (Ctrl-C, an early stop).
    Stop,
}

/// One optimizer step, as the callback sees it.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Steps done (from 1).
    pub step: u64,
    pub max_steps: u64,
    pub epoch: f64,
    /// Mean loss over the label tokens of this step, on the steps that read it from the device:
    /// logging, evaluation and save steps and the last. None in between, where a read would stall
    /// a GPU every step (`train.logging_steps = 1` reads every step).
    pub loss: Option<f64>,
    /// Global gradient norm before clipping, when `loss` is read.
    pub grad_norm: Option<f64>,
    pub learning_rate: f64,
    /// Tokens (padding excluded) of this step.
    pub tokens: usize,
    /// The `logging.jsonl` entry of this step, on logging and evaluation steps.
    pub logged: Option<LogEntry>,
    /// The checkpoint saved at this step, if one was.
    pub checkpoint: Option<PathBuf>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub steps: u64,
    pub last_checkpoint: PathBuf,
    /// The callback asked to stop before the last step.
    pub stopped: bool,
    /// What went wrong after the last checkpoint was saved and did not fail the run (a plot that
    /// could not be drawn).
    pub warnings: Vec<String>,
}

pub struct Trainer<B: TrainBackend> {
    /// The run as resolved (its config is written to `<output.dir>/config.toml`).
    pub plan: TrainPlan,
    pub run_dir: PathBuf,
    pub model: CausalLm<B>,
    /// The adapter's PEFT config, as checkpoints write it.
    pub lora: LoraConfig,
    pub state: TrainerState,
    /// Shared with the loop's `Feed`, which borrows it while the step mutates the rest.
    data: Arc<TrainData>,
    optimizer: Optimizer<B::InnerBackend>,
    schedule: LrSchedule,
    grads: StepGrads<B>,
    /// `[loss, grad_norm]` of each step since the last read, still on the device.
    unread: Vec<Tensor<B::InnerBackend, 1>>,
    /// Started from a checkpoint (else the run directory is cleared of an earlier run).
    resumed: bool,
    /// Held for the trainer's life, so that no other run writes into `run_dir` meanwhile.
    _lock: run_dir::RunLock,
}

/// The rows: read whole, or (`data.streaming`) read as the steps take them.
struct TrainData {
    section: DataSection,
    seed: u64,
    encoder: Encoder,
    /// None when streaming.
    dataset: Option<Dataset>,
    /// A stream's validation rows (`data.val`), read whole.
    stream_val: Vec<TrainRow>,
}

impl TrainData {
    fn source(&self) -> Source<'_> {
        match &self.dataset {
            Some(d) => Source::Memory(d),
            None => Source::Stream {
                data: &self.section,
                encoder: &self.encoder,
                seed: self.seed,
            },
        }
    }

    fn val(&self) -> &[TrainRow] {
        self.dataset.as_ref().map_or(&self.stream_val, |d| &d.val)
    }
}

impl<B: TrainBackend> Trainer<B> {
    /// Reads the data, loads the model with its adapter (fresh, from `lora.init_adapter`, or
    /// from the checkpoint `train.resume_from` names) and checks the run directory.
    pub fn new(plan: TrainPlan, device: B::Device) -> Result<Self, TrainError> {
        let config = &plan.config;
        let run_dir = config.output.dir.clone();
        let lock = run_dir::lock(&run_dir)?;
        let resume = run_dir::resume_dir(plan.resume.as_ref(), &run_dir)?;
        if resume.is_none() && run_dir::holds_run(&run_dir) && !config.output.overwrite {
            return Err(TrainError::RunExists { dir: run_dir });
        }
        let model_dir = hub::local_dir(&config.model.path, config.model.hub)?;
        let (data, max_steps) = read_data(&plan, &model_dir)?;
        let (mut model, lora) = load_model(&plan, &model_dir, resume.as_deref(), &device)?;
        if config.rlhf.is_some() {
            // TRL's `disable_dropout` (on by default, and in ms-swift): the policy's log-ratios
            // are compared with the reference's, which has none.
            for adapter in model.adapters_mut() {
                adapter.dropout = burn::nn::DropoutConfig::new(0.0).init();
            }
        }
        let mut optimizer = Optimizer::new(plan.optimizer, &flat_params(&model));
        let state = match &resume {
            Some(dir) => {
                let mut state = checkpoint::load_state(dir)?;
                let keys = checkpoint::trainable_keys(&model);
                checkpoint::load_optimizer(dir, &state, &keys, &mut optimizer, &device)?;
                state.max_steps = max_steps;
                state
            }
            None => TrainerState::new(max_steps, config.train.seed, plan.optimizer.kind),
        };
        let t = &config.train;
        let mut grads = StepGrads::new(&model, t.seed, t.gradient_checkpointing, device);
        grads.router_aux_loss_coef =
            Some(t.router_aux_loss_coef).filter(|&c| c > 0.0 && model.has_routers());
        if let Some(rlhf) = &config.rlhf {
            let objective = objective(rlhf);
            let reference = match objective.needs_reference() {
                true => Some(reference(&plan, &model, resume.is_some())?),
                false => None,
            };
            grads.preference = Some(Preference {
                reference,
                objective,
                max_length: config.data.max_length,
            });
        }
        Ok(Self {
            run_dir,
            schedule: LrSchedule::new(plan.schedule, max_steps as usize),
            grads,
            data: Arc::new(data),
            model,
            lora,
            state,
            optimizer,
            plan,
            unread: Vec::new(),
            resumed: resume.is_some(),
            _lock: lock,
        })
    }

    /// True when every step of the run is scheduled at a learning rate of 0 (a zero rate, or a
    /// run no longer than its warmup, which starts at 0): the adapter would not change.
    pub fn trains_nothing(&self) -> bool {
        let steps = self.state.global_step..self.state.max_steps;
        steps
            .into_iter()
            .all(|step| self.schedule.lr(step as usize) == 0.0)
    }

    /// The training rows, when read whole (not streamed).
    pub fn train_rows(&self) -> Option<&[TrainRow]> {
        self.data.dataset.as_ref().map(|d| d.train.as_slice())
    }

    /// Rows skipped as bad while reading the data (`data.on_bad_row = "skip"`).
    pub fn bad_rows(&self) -> Option<&BadRows> {
        self.data.dataset.as_ref().map(|d| &d.bad_rows)
    }

    /// Trains to the last step, calling `on_step` after every optimizer step; saves every
    /// `save_steps`, at the last step, and when `on_step` says stop.
    pub fn run(
        &mut self,
        mut on_step: impl FnMut(&StepReport) -> Control,
    ) -> Result<Outcome, TrainError> {
        run_dir::prepare(&self.run_dir, &self.plan, self.resumed)?;
        let data = Arc::clone(&self.data);
        let mut feed = Feed::new(data.source(), self.state.data_position)?;
        let output = &self.plan.config.output;
        let mut log = RunLog::create(&self.run_dir, &self.state.log_history, output.tensorboard)?;
        let mut clock = Clock::new(&self.state);
        let mut last_checkpoint = None;
        let max_epochs = self.plan.config.train.max_epochs;
        // A resumed run that max_epochs ended has nothing left to do.
        while self.state.global_step < self.state.max_steps
            && !max_epochs.is_some_and(|max| feed.epochs_done() >= max)
        {
            let t = &self.plan.config.train;
            let batches = feed.next_step(t.batch_size, t.grad_accum)?;
            let mut report = self.step(&batches, &mut clock);
            self.state.data_position = feed.position();
            self.state.epoch = feed.epoch_progress();
            report.epoch = self.state.epoch;
            if let Some(max) = max_epochs.filter(|&max| feed.epochs_done() >= max) {
                // ms-swift's max_epochs: the epoch's last step is the run's last (evaluated,
                // logged and saved as one), and a resume finds nothing left to do.
                self.state.max_steps = self.state.global_step;
                self.state.epoch = max as f64;
                report.max_steps = self.state.max_steps;
                report.epoch = self.state.epoch;
            }
            let eval_loss = self.evaluate_if_due(data.val());
            let last = report.step == self.state.max_steps;
            let save = report
                .step
                .is_multiple_of(self.plan.config.train.save_steps as u64)
                || last;
            if save || self.log_due(eval_loss) {
                [report.loss, report.grad_norm] = self.read_unread()?.map(Some);
            }
            report.logged = self.log_if_due(&report, eval_loss, &mut clock, &mut log)?;
            if save {
                report.checkpoint = Some(self.save(eval_loss)?);
            }
            last_checkpoint = report.checkpoint.clone().or(last_checkpoint);
            if on_step(&report) == Control::Stop && !last {
                let dir = match report.checkpoint {
                    Some(dir) => dir,
                    None => self.save(eval_loss)?,
                };
                return self.finish(dir, true);
            }
        }
        // None: resumed from the last step, nothing was left to do.
        let dir = last_checkpoint
            .unwrap_or_else(|| checkpoint::checkpoint_dir(&self.run_dir, self.state.global_step));
        self.finish(dir, false)
    }

    /// One optimizer step on `batches`: gradients, clipping, the update. Its loss and gradient
    /// norm stay on the device until `read_unread`; the device skips the update when either is
    /// not finite.
    fn step(&mut self, batches: &[Vec<TrainRow>], clock: &mut Clock) -> StepReport {
        let step = self.state.global_step;
        let lr = self.schedule.lr(step as usize);
        let (loss, tokens, grads, metrics) = self.grads.compute(&self.model, batches, step);
        let params = flat_params(&self.model);
        let grads = grads
            .into_iter()
            .zip(&params)
            .map(|(g, p)| g.unwrap_or_else(|| p.zeros_like()))
            .collect();
        let max_grad_norm = self.plan.config.train.max_grad_norm;
        let (grad_norm, grads) = clip_grad_norm(grads, max_grad_norm);
        let values = Tensor::cat(vec![loss, grad_norm], 0);
        let skip = values.clone().is_finite().bool_not().any();
        // A preference step's metrics ride along.
        let values = match metrics {
            Some(sums) => Tensor::cat(vec![values, sums], 0),
            None => values,
        };
        let updated: Vec<Tensor<B::InnerBackend, 1>> = self.optimizer.step(lr, params, grads, skip);
        set_params(&mut self.model, updated);
        self.unread.push(values);

        let state = &mut self.state;
        state.global_step += 1;
        state.elapsed_s = clock.elapsed_s();
        clock.tokens += tokens;
        StepReport {
            step: state.global_step,
            max_steps: state.max_steps,
            epoch: state.epoch,
            loss: None,
            grad_norm: None,
            learning_rate: lr,
            tokens,
            logged: None,
            checkpoint: None,
        }
    }

    /// Reads the losses and gradient norms of the steps since the last read, in one host read,
    /// into the log window's loss; returns the last step's `[loss, grad_norm]`. Stops with an
    /// error naming the last good checkpoint at the first step where either was not finite (the
    /// device skipped its update, and every one after it).
    fn read_unread(&mut self) -> Result<[f64; 2], TrainError> {
        let n = self.unread.len() as u64;
        let data = Tensor::cat(std::mem::take(&mut self.unread), 0).into_data();
        let values: Vec<f64> = data.convert::<f64>().to_vec().expect("f64 values");
        let first = self.state.global_step + 1 - n;
        let width = values.len() / n as usize;
        for (step, pair) in (first..).zip(values.chunks_exact(width)) {
            for (what, value) in [("loss", pair[0]), ("gradient norm", pair[1])] {
                if !value.is_finite() {
                    // The checkpoint of step - 1 holds the weights that gave this value: the
                    // last good one is older.
                    let good = checkpoint::list(&self.run_dir)
                        .into_iter()
                        .rfind(|(saved, _)| saved + 1 < step);
                    let last = match good {
                        Some((_, dir)) => format!("the last good checkpoint is {}", dir.display()),
                        None => "no checkpoint holds weights that gave a finite loss".into(),
                    };
                    return Err(TrainError::NonFinite {
                        what,
                        value,
                        step,
                        last,
                    });
                }
            }
            self.state.unlogged_loss.0 += pair[0];
            self.state.unlogged_loss.1 += 1;
            let metrics = &mut self.state.unlogged_metrics;
            metrics.resize(width - 2, 0.0);
            for (sum, value) in metrics.iter_mut().zip(&pair[2..]) {
                *sum += value;
            }
        }
        let last = values.len() - width;
        Ok([values[last], values[last + 1]])
    }

    /// The eval loss on the validation rows, every `eval_steps` and at the last step.
    fn evaluate_if_due(&self, val: &[TrainRow]) -> Option<f64> {
        let step = self.state.global_step;
        let due = step.is_multiple_of(self.plan.eval_steps) || step == self.state.max_steps;
        let batch_size = self.plan.config.train.batch_size;
        if val.is_empty() || !due {
            return None;
        }
        let model = self.model.valid();
        Some(match &self.grads.preference {
            Some(preference) => preference.eval_loss(&model, val, batch_size),
            None => mean_loss(&model, val, batch_size).0,
        })
    }

    /// Whether this step is logged: every `logging_steps`, with an eval loss, and at the last.
    fn log_due(&self, eval_loss: Option<f64>) -> bool {
        let step = self.state.global_step;
        let logging_steps = self.plan.config.train.logging_steps as u64;
        step.is_multiple_of(logging_steps) || eval_loss.is_some() || step == self.state.max_steps
    }

    /// The log entry of this step, written when one is due (`report` was read then).
    fn log_if_due(
        &mut self,
        report: &StepReport,
        eval_loss: Option<f64>,
        clock: &mut Clock,
        log: &mut RunLog,
    ) -> Result<Option<LogEntry>, TrainError> {
        let (Some(grad_norm), true) = (report.grad_norm, self.log_due(eval_loss)) else {
            return Ok(None);
        };
        let state = &mut self.state;
        let step = state.global_step;
        // `StepGrads::compute`'s layout: the preference metrics, then the load-balancing loss.
        let (preference, aux_loss) = match self.grads.router_aux_loss_coef {
            Some(_) => {
                let (preference, aux) = state
                    .unlogged_metrics
                    .split_at(state.unlogged_metrics.len().saturating_sub(2));
                (preference, aux.first().map(|sum| sum / aux[1].max(1.0)))
            }
            None => (&state.unlogged_metrics[..], None),
        };
        let entry = LogEntry {
            step,
            epoch: state.epoch,
            loss: state.unlogged_loss.0 / state.unlogged_loss.1 as f64,
            grad_norm,
            learning_rate: report.learning_rate,
            tokens_per_sec: clock.tokens_per_sec(),
            memory_gib: log::memory_gib::<B>(&self.grads.device),
            elapsed_s: state.elapsed_s,
            eta_s: clock.per_step(step) * (state.max_steps - step) as f64,
            eval_loss,
            preference: PreferenceLog::from_sums(preference),
            aux_loss,
        };
        log.write(&entry)?;
        state.log_history.push(entry.clone());
        state.unlogged_loss = (0.0, 0);
        state.unlogged_metrics.clear();
        clock.window();
        Ok(Some(entry))
    }

    /// Saves the checkpoint of this step and rotates older ones; transformers'
    /// best_model_checkpoint is the saved checkpoint with the lowest eval loss.
    fn save(&mut self, eval_loss: Option<f64>) -> Result<PathBuf, TrainError> {
        // A stop asked between reads: the checkpoint holds the window's losses so far.
        if !self.unread.is_empty() {
            self.read_unread()?;
        }
        let (state, run_dir) = (&mut self.state, &self.run_dir);
        if let Some(loss) = eval_loss.filter(|&l| state.best_metric.is_none_or(|b| l < b)) {
            state.best_metric = Some(loss);
            state.best_model_checkpoint =
                Some(checkpoint::checkpoint_dir(run_dir, state.global_step));
        }
        let model = self.model.valid();
        let args = self.plan.config.swift_args();
        let dir = checkpoint::save(run_dir, &model, &self.lora, &self.optimizer, state, &args)?;
        if let Some(limit) = self.plan.config.train.save_total_limit {
            let best = state.best_model_checkpoint.as_deref();
            checkpoint::rotate(run_dir, limit.max(1), best)?;
        }
        Ok(dir)
    }

    /// The outcome, with the plots drawn: a plot that cannot be drawn (a full disk) is a warning,
    /// as the run's work is saved by then.
    fn finish(&self, last_checkpoint: PathBuf, stopped: bool) -> Result<Outcome, TrainError> {
        let mut warnings = Vec::new();
        if self.plan.config.output.plots {
            if let Err(e) = log::plot(&self.run_dir, &self.state.log_history) {
                warnings.push(e.to_string());
            }
        }
        Ok(Outcome {
            steps: self.state.global_step,
            last_checkpoint,
            stopped,
            warnings,
        })
    }
}

/// The training rows (read whole unless streaming) and the run's length in steps, which an
/// epoch count turns into steps over the rows read.
fn read_data(plan: &TrainPlan, model_dir: &Path) -> Result<(TrainData, u64), TrainError> {
    let (config, t) = (&plan.config, &plan.config.train);
    let encoder = Encoder::from_config(model_dir, config)?;
    let mut stream_val = Vec::new();
    let (dataset, max_steps) = match plan.length {
        // `resolve` gives a stream a length in steps.
        Length::Steps(n) if config.data.streaming => {
            stream_val = Dataset::validation(&config.data, t.seed, &encoder)?;
            (None, n)
        }
        length => {
            let dataset = Dataset::build(&config.data, t.seed, &encoder)?;
            let rows = dataset.train.len();
            (
                Some(dataset),
                length.max_steps(rows, t.batch_size, t.grad_accum),
            )
        }
    };
    let data = TrainData {
        section: config.data.clone(),
        seed: t.seed,
        encoder,
        dataset,
        stream_val,
    };
    Ok((data, max_steps))
}

/// The model with its adapter built in: the checkpoint's when resuming, else the one in
/// `lora.init_adapter`, else a fresh one from the plan. Returns the adapter's PEFT config too.
fn load_model<B: TrainBackend>(
    plan: &TrainPlan,
    model_dir: &Path,
    resume: Option<&Path>,
    device: &B::Device,
) -> Result<(CausalLm<B>, LoraConfig), TrainError> {
    let config = &plan.config;
    let mut adapter = match (resume, &config.lora.init_adapter) {
        (Some(dir), None) => {
            let adapter = read_adapter(dir)?;
            let linears = ModelConfig::from_dir(model_dir)?.adaptable_linears();
            let names: Vec<String> = linears.into_iter().map(|(name, ..)| name).collect();
            same_lora(&adapter.config, &plan.lora, dir, &names)?;
            adapter
        }
        (Some(dir), Some(_)) => read_adapter(dir)?,
        (None, Some(dir)) => read_adapter(&hub::local_dir(dir, config.model.hub)?)?,
        (None, None) => LoraPlan {
            config: plan.lora.clone(),
            source: AdapterSource::Init {
                seed: config.train.seed,
            },
        },
    };
    let options = LoadOptions {
        dtype: plan.dtype(),
        quant: plan.quant,
    };
    let (_, model) = model::load::<B>(model_dir, options, Some(&mut adapter), device)?;
    Ok((model, adapter.config))
}

/// Preference training's reference, from the policy's own weights: the base with the adapter of
/// `rlhf.ref_adapter` in place of the policy's (ms-swift's `--ref_adapters`, TRL's "ref"
/// adapter), else the base with the adapters off. That is ms-swift's reference also when
/// training goes on from `lora.init_adapter` (`--adapters X`): its docs have users name the SFT
/// adapter as `--ref_adapters X` to compare with it.
fn reference<B: TrainBackend>(
    plan: &TrainPlan,
    model: &CausalLm<B>,
    resumed: bool,
) -> Result<CausalLm<B::InnerBackend>, TrainError> {
    let config = &plan.config;
    let starting = config.lora.init_adapter.as_deref();
    let ref_adapter = config.rlhf.as_ref().and_then(|r| r.ref_adapter.as_deref());
    let ref_adapter = ref_adapter.map(Path::new);
    // `--adapters X --ref_adapters X`: while the policy still holds X (before its first step),
    // it is shared; a resumed run reads X again.
    let read = match (ref_adapter, resumed) {
        (None, _) => return Ok(model.valid().without_adapters()),
        (Some(dir), false) if Some(dir) == starting => return Ok(model.valid()),
        (Some(dir), _) => dir,
    };
    let mut adapter = read_adapter(&hub::local_dir(read, config.model.hub)?)?;
    let AdapterSource::Weights(ckpt) = &mut adapter.source else {
        unreachable!("an adapter read from files holds weights")
    };
    Ok(model.valid().with_adapter_weights(ckpt, &adapter.config)?)
}

/// What `[rlhf]` asks for, as ms-swift sets TRL up: DPO (`rpo_alpha` the weight of an `sft`
/// term), CPO (TRL's CPOTrainer), SimPO (CPO's `simpo` loss type), ORPO, KTO.
fn objective(rlhf: &RlhfSection) -> Objective {
    let beta = rlhf.beta();
    let cpo = |loss| {
        Objective::Cpo(CpoSettings {
            beta,
            loss,
            label_smoothing: rlhf.label_smoothing,
            simpo_gamma: rlhf.simpo_gamma,
            cpo_alpha: rlhf.cpo_alpha,
        })
    };
    match rlhf.kind {
        RlhfType::Orpo => Objective::Orpo { beta },
        RlhfType::Kto => Objective::Kto(KtoSettings {
            beta,
            desirable_weight: rlhf.desirable_weight,
            undesirable_weight: rlhf.undesirable_weight,
            kl: rlhf.kl_estimate(),
        }),
        RlhfType::Simpo => cpo(CpoLoss::Simpo),
        RlhfType::Cpo => cpo(match rlhf.loss_type {
            Some(LossType::Hinge) => CpoLoss::Hinge,
            Some(LossType::Ipo) => CpoLoss::Ipo,
            _ => CpoLoss::Sigmoid,
        }),
        RlhfType::Dpo => {
            let mut losses = vec![(rlhf.loss_type.unwrap_or(LossType::Sigmoid), 1.0)];
            if let Some(alpha) = rlhf.rpo_alpha {
                losses.push((LossType::Sft, alpha));
            }
            Objective::Dpo(DpoSettings {
                beta,
                losses,
                label_smoothing: rlhf.label_smoothing,
            })
        }
    }
}

/// A resumed run trains the checkpoint's adapter: a config that now says another rank, alpha,
/// dropout, target set or variant would be recorded in config.toml but not trained, so it is an
/// error naming the first key that differs. Targets are compared by the `linears` they select
/// (checkpoints write "all-linear" resolved to module names, as PEFT does).
fn same_lora(
    saved: &LoraConfig,
    config: &LoraConfig,
    dir: &Path,
    linears: &[String],
) -> Result<(), TrainError> {
    fn json(value: &impl serde::Serialize) -> String {
        serde_json::to_string(value).expect("config values serialize")
    }
    let selected = |c: &LoraConfig| -> Option<Vec<&String>> {
        let targets = Targets::new(c.target_modules.as_ref()?, c.exclude_modules.as_ref()).ok()?;
        Some(linears.iter().filter(|n| targets.matches(n)).collect())
    };
    let targets = |c: &LoraConfig| {
        c.target_modules
            .as_ref()
            .map_or_else(|| "none".into(), ToString::to_string)
    };
    // PEFT writes target_parameters from a set: their order is not the config's.
    let parameters = |c: &LoraConfig| {
        let mut names = c.target_parameters.clone().unwrap_or_default();
        names.sort();
        json(&names)
    };
    let differ = [
        ("lora.r", json(&saved.r), json(&config.r)),
        (
            "lora.alpha",
            json(&saved.lora_alpha),
            json(&config.lora_alpha),
        ),
        (
            "lora.dropout",
            json(&saved.lora_dropout),
            json(&config.lora_dropout),
        ),
        (
            "lora.use_rslora",
            json(&saved.use_rslora),
            json(&config.use_rslora),
        ),
        (
            "lora.use_dora",
            json(&saved.use_dora),
            json(&config.use_dora),
        ),
        (
            "lora.target_parameters",
            parameters(saved),
            parameters(config),
        ),
    ]
    .into_iter()
    .find(|(_, a, b)| a != b)
    .or_else(|| {
        (selected(saved) != selected(config))
            .then(|| ("lora.target_modules", targets(saved), targets(config)))
    });
    match differ {
        None => Ok(()),
        Some((key, saved, now)) => Err(TrainError::Config {
            key: key.into(),
            reason: format!(
                "the checkpoint {} was trained with {saved} and the config now says {now}: \
                 resume with the checkpoint's value, or start a new run (another output.dir, \
                 or output.overwrite = true)",
                dir.display()
            ),
        }),
    }
}

/// Time and tokens: the whole run's (resumed runs included) and the log window's (tokens since
/// the last log line; their loss is `TrainerState::unlogged_loss`, which checkpoints carry
/// across a resume).
struct Clock {
    started: Instant,
    first_step: u64,
    elapsed_before: f64,
    tokens: usize,
    window_start: Instant,
}

impl Clock {
    fn new(state: &TrainerState) -> Self {
        Self {
            started: Instant::now(),
            first_step: state.global_step,
            elapsed_before: state.elapsed_s,
            tokens: 0,
            window_start: Instant::now(),
        }
    }

    fn elapsed_s(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// Seconds per step in this run so far, `step` being the steps done.
    fn per_step(&self, step: u64) -> f64 {
        self.started.elapsed().as_secs_f64() / (step - self.first_step) as f64
    }

    fn tokens_per_sec(&self) -> f64 {
        self.tokens as f64 / self.window_start.elapsed().as_secs_f64().max(1e-9)
    }

    /// Starts a new log window.
    fn window(&mut self) {
        self.tokens = 0;
        self.window_start = Instant::now();
    }
}
