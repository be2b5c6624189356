//! The training loop (`swift-rs train`, and `Trainer` for research code): LoRA/QLoRA on a frozen
//! base as transformers' Trainer + PEFT runs it. Every optimizer step takes `grad_accum`
//! micro-batches of `batch_size` rows; the loss is the mean over every label token of the whole
//! step (the micro-batches' summed losses divided by the step's label count, which is the fix of
//! transformers PR #34191, not a mean of micro-batch means); the adapter gradients are clipped by
//! their global norm and applied by AdamW or SGD at the scheduled learning rate.
//!
//! Gradient checkpointing keeps only each decoder layer's input from the forward pass and
//! recomputes the layer in the backward pass (as transformers checkpoints each decoder layer).
//! Dropout draws come from the seed, the step, the micro-batch and the layer, so the recomputed
//! layer sees the masks of its forward pass and a resumed run draws what an unbroken one would.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use super::checkpoint::{self, DataPosition, TrainerState};
use super::feed::{Feed, Source};
use super::log::{self, LogEntry, RunLog};
use super::optim::{clip_grad_norm, Optimizer, OptimizerConfig, OptimizerKind};
use super::schedule::{LrSchedule, ScheduleKind};
use super::{mean_loss, TrainError};
use crate::config::{Dtype, InitLoraWeights, LoraConfig, TargetModules, TrainConfig};
use crate::data::dataset::{collate, Dataset, TrainRow};
use crate::data::encode::Encoder;
use crate::export::peft::read_adapter;
use crate::hub;
use crate::model::loss::{token_losses, LossTargets};
use crate::model::ops::seed_gradient;
use crate::model::TrainBackend;
use crate::model::{self, AdapterSource, Batch, CausalLm, DecoderLayer, LoadOptions, LoraPlan};
use crate::quant::Nf4Config;

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
    /// Mean loss over the label tokens of this step.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
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
}

pub struct Trainer<B: TrainBackend> {
    /// The config as resolved (written to `<output.dir>/config.toml`).
    pub config: TrainConfig,
    pub run_dir: PathBuf,
    pub model: CausalLm<B>,
    /// The adapter's PEFT config, as checkpoints write it.
    pub lora: LoraConfig,
    pub state: TrainerState,
    encoder: Encoder,
    /// None when streaming.
    dataset: Option<Dataset>,
    optimizer: Optimizer<B::InnerBackend>,
    schedule: LrSchedule,
    device: B::Device,
    /// Trainable tensors of each decoder layer, to place a layer's gradients in the flat list.
    layer_tensors: Vec<usize>,
}

impl<B: TrainBackend> Trainer<B> {
    /// Reads the data, loads the model with its adapter (fresh, from `lora.init_adapter`, or
    /// from the checkpoint `train.resume_from` names) and checks the run directory.
    pub fn new(config: TrainConfig, device: B::Device) -> Result<Self, TrainError> {
        // Configs read from a file were checked there; one built in code is checked here.
        config.check(Path::new("the training config"))?;
        let t = &config.train;
        let optimizer_kind: OptimizerKind =
            t.optimizer.parse().map_err(|e| bad("train.optimizer", e))?;
        let schedule_kind: ScheduleKind = t
            .lr_scheduler
            .parse()
            .map_err(|e| bad("train.lr_scheduler", e))?;
        for (key, value) in [
            ("train.batch_size", t.batch_size),
            ("train.grad_accum", t.grad_accum),
            ("train.logging_steps", t.logging_steps),
            ("train.save_steps", t.save_steps),
            ("train.eval_steps", t.eval_steps.unwrap_or(1)),
        ] {
            if value == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        let run_dir = config.output.dir.clone();
        let resume = resume_dir(&config, &run_dir)?;
        if resume.is_none() && holds_run(&run_dir) && !config.output.overwrite {
            return Err(TrainError::RunExists { dir: run_dir });
        }

        let model_dir = hub::local_dir(&config.model.path, config.model.hub)?;
        let encoder = Encoder::from_config(&model_dir, &config.model, &config.data)?;
        let dataset = if config.data.streaming {
            None
        } else {
            Some(Dataset::build(&config.data, t.seed, &encoder)?)
        };

        let mut plan = match (&resume, &config.lora.init_adapter) {
            (Some(dir), _) => read_adapter(dir)?,
            (None, Some(dir)) => read_adapter(&hub::local_dir(dir, config.model.hub)?)?,
            (None, None) => LoraPlan {
                config: lora_config(&config)?,
                source: AdapterSource::Init { seed: t.seed },
            },
        };
        let options = LoadOptions {
            dtype: match config.model.dtype.as_str() {
                "auto" => None,
                name => Dtype::parse(name),
            },
            quant: quant_config(&config)?,
        };
        let (_, model) = model::load::<B>(&model_dir, options, Some(&mut plan), &device)?;
        let lora = plan.config;
        let layer_tensors = model
            .model
            .layers
            .iter()
            .map(|layer| {
                layer
                    .linears()
                    .iter()
                    .filter_map(|l| l.adapter.as_ref())
                    .map(|a| a.trainable_count())
                    .sum()
            })
            .collect();

        let max_steps = match (t.max_steps, &dataset) {
            (n, _) if n > 0 => n as u64,
            (_, Some(d)) => {
                let batches = d.train.len().div_ceil(t.batch_size);
                let per_epoch = batches.div_ceil(t.grad_accum) as f64;
                ((t.epochs * per_epoch).ceil() as u64).max(1)
            }
            (_, None) => {
                return Err(bad(
                    "train.max_steps",
                    "a streamed dataset has no known length: set train.max_steps".into(),
                ))
            }
        };
        let schedule = LrSchedule::new(
            schedule_kind,
            t.lr,
            max_steps as usize,
            t.warmup_steps,
            t.warmup_ratio,
        );
        let optimizer_config = OptimizerConfig {
            kind: optimizer_kind,
            weight_decay: t.weight_decay,
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_eps,
        };
        let mut optimizer = Optimizer::new(optimizer_config, &flat_params(&model));
        let state = match &resume {
            Some(dir) => {
                let mut state = checkpoint::load_state(dir)?;
                let keys = checkpoint::trainable_keys(&model);
                checkpoint::load_optimizer(dir, &state, &keys, &mut optimizer, &device)?;
                state.max_steps = max_steps;
                state
            }
            None => TrainerState {
                global_step: 0,
                max_steps,
                epoch: 0.0,
                data_position: DataPosition::default(),
                seed: t.seed,
                optimizer: optimizer_kind.name().into(),
                elapsed_s: 0.0,
                unlogged_loss: (0.0, 0),
                best_metric: None,
                best_model_checkpoint: None,
                log_history: Vec::new(),
            },
        };
        Ok(Self {
            config,
            run_dir,
            model,
            lora,
            state,
            encoder,
            dataset,
            optimizer,
            schedule,
            device,
            layer_tensors,
        })
    }

    /// Rows skipped as bad while reading the data (`data.on_bad_row = "skip"`).
    pub fn bad_rows(&self) -> Option<&crate::data::dataset::BadRows> {
        self.dataset.as_ref().map(|d| &d.bad_rows)
    }

    /// Trains to the last step, calling `on_step` after every optimizer step; saves every
    /// `save_steps`, at the last step, and when `on_step` says stop.
    pub fn run(
        &mut self,
        mut on_step: impl FnMut(&StepReport) -> Control,
    ) -> Result<Outcome, TrainError> {
        self.prepare_run_dir()?;
        let Self {
            config,
            run_dir,
            model,
            lora,
            state,
            encoder,
            dataset,
            optimizer,
            schedule,
            device,
            layer_tensors,
        } = self;
        let (t, dataset) = (&config.train, &*dataset);
        let source = match dataset {
            Some(d) => Source::Memory(d),
            None => Source::Stream {
                data: &config.data,
                encoder,
                seed: t.seed,
            },
        };
        let mut feed = Feed::new(source, state.data_position)?;
        let mut log = RunLog::create(run_dir, &state.log_history, config.output.tensorboard)?;
        let val: &[TrainRow] = dataset.as_ref().map_or(&[], |d| &d.val);
        let eval_steps = t.eval_steps.unwrap_or(t.save_steps) as u64;
        let started = Instant::now();
        let (first_step, elapsed_before) = (state.global_step, state.elapsed_s);
        let mut window = Window::new();
        let mut last_checkpoint = None;
        let step_grads = StepGrads {
            seed: t.seed,
            dropout: lora.lora_dropout > 0.0,
            checkpointing: t.gradient_checkpointing,
            layer_tensors,
            device,
        };
        while state.global_step < state.max_steps {
            let step = state.global_step;
            let batches = feed.next_step(t.batch_size, t.grad_accum)?;
            let lr = schedule.lr(step as usize);
            let (loss, tokens, grads) = step_grads.compute(model, &batches, step);
            let params = flat_params(model);
            let grads = grads
                .into_iter()
                .zip(&params)
                .map(|(g, p)| g.unwrap_or_else(|| p.zeros_like()))
                .collect();
            let (grad_norm, grads) = clip_grad_norm(grads, t.max_grad_norm);
            for (what, value) in [("loss", loss), ("gradient norm", grad_norm)] {
                if !value.is_finite() {
                    let last = match checkpoint::list(run_dir).pop() {
                        Some((_, dir)) => format!("the last good checkpoint is {}", dir.display()),
                        None => "no checkpoint was saved before it".into(),
                    };
                    return Err(TrainError::NonFinite {
                        what,
                        value,
                        step: step + 1,
                        last,
                    });
                }
            }
            let updated = optimizer.step(lr, params, grads);
            set_params(model, updated);

            state.global_step += 1;
            state.data_position = feed.position();
            state.epoch = feed.epoch_progress();
            state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
            window.tokens += tokens;
            state.unlogged_loss.0 += loss;
            state.unlogged_loss.1 += 1;
            let step = state.global_step;
            let last = step == state.max_steps;

            let eval_loss = (!val.is_empty() && (step % eval_steps == 0 || last))
                .then(|| mean_loss(&model.valid(), val, t.batch_size).0);
            let logged =
                (step % t.logging_steps as u64 == 0 || eval_loss.is_some() || last).then(|| {
                    let per_step = started.elapsed().as_secs_f64() / (step - first_step) as f64;
                    LogEntry {
                        step,
                        epoch: state.epoch,
                        loss: state.unlogged_loss.0 / state.unlogged_loss.1 as f64,
                        grad_norm,
                        learning_rate: lr,
                        tokens_per_sec: window.tokens_per_sec(),
                        memory_gib: log::peak_memory_gib(),
                        elapsed_s: state.elapsed_s,
                        eta_s: per_step * (state.max_steps - step) as f64,
                        eval_loss,
                    }
                });
            if let Some(entry) = &logged {
                log.write(entry)?;
                state.log_history.push(entry.clone());
                window = Window::new();
                state.unlogged_loss = (0.0, 0);
            }
            // transformers' best_model_checkpoint: the saved checkpoint with the lowest eval loss.
            let save = |state: &mut TrainerState| -> Result<PathBuf, TrainError> {
                let dir = checkpoint::checkpoint_dir(run_dir, step);
                if let Some(loss) = eval_loss.filter(|&l| state.best_metric.is_none_or(|b| l < b)) {
                    state.best_metric = Some(loss);
                    state.best_model_checkpoint = Some(dir);
                }
                let dir = checkpoint::save(run_dir, &model.valid(), lora, optimizer, state)?;
                if let Some(limit) = t.save_total_limit {
                    let best = state.best_model_checkpoint.as_deref();
                    checkpoint::rotate(run_dir, limit.max(1), best)?;
                }
                Ok(dir)
            };
            let mut report = StepReport {
                step,
                max_steps: state.max_steps,
                epoch: state.epoch,
                loss,
                grad_norm,
                learning_rate: lr,
                tokens,
                logged,
                checkpoint: None,
            };
            if step % t.save_steps as u64 == 0 || last {
                report.checkpoint = Some(save(state)?);
            }
            last_checkpoint = report.checkpoint.clone().or(last_checkpoint);
            if on_step(&report) == Control::Stop && !last {
                let dir = match report.checkpoint {
                    Some(dir) => dir,
                    None => save(state)?,
                };
                if config.output.plots {
                    log::plot(run_dir, &state.log_history)?;
                }
                return Ok(Outcome {
                    steps: step,
                    last_checkpoint: dir,
                    stopped: true,
                });
            }
        }
        if config.output.plots {
            log::plot(run_dir, &state.log_history)?;
        }
        let last_checkpoint = match last_checkpoint {
            Some(dir) => dir,
            // Resumed from the last step: nothing was left to do.
            None => checkpoint::checkpoint_dir(run_dir, state.global_step),
        };
        Ok(Outcome {
            steps: state.global_step,
            last_checkpoint,
            stopped: false,
        })
    }

    /// Clears a previous run under `output.overwrite` (not when resuming it) and writes the
    /// resolved config.
    fn prepare_run_dir(&self) -> Result<(), TrainError> {
        let dir = &self.run_dir;
        if self.config.train.resume_from.is_none() && holds_run(dir) {
            for (_, path) in checkpoint::list(dir) {
                std::fs::remove_dir_all(&path).map_err(TrainError::io(&path))?;
            }
            for name in [log::TENSORBOARD_DIR, log::IMAGES_DIR] {
                let path = dir.join(name);
                if path.exists() {
                    std::fs::remove_dir_all(&path).map_err(TrainError::io(&path))?;
                }
            }
        }
        std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
        let path = dir.join(CONFIG_FILE);
        let staged = tempfile::NamedTempFile::new_in(dir).map_err(TrainError::io(dir))?;
        std::fs::write(staged.path(), self.config.to_toml()).map_err(TrainError::io(&path))?;
        staged
            .persist(&path)
            .map_err(|e| TrainError::io(&path)(e.error))?;
        Ok(())
    }
}

pub const CONFIG_FILE: &str = "config.toml";

fn bad(key: &str, reason: String) -> TrainError {
    TrainError::Config {
        key: key.into(),
        reason,
    }
}

/// A directory holds a run when it has a config, a log or a checkpoint of one.
fn holds_run(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).exists()
        || dir.join(log::LOGGING_FILE).exists()
        || !checkpoint::list(dir).is_empty()
}

/// The checkpoint `train.resume_from` names: a directory, or "latest" in `output.dir`.
fn resume_dir(config: &TrainConfig, run_dir: &Path) -> Result<Option<PathBuf>, TrainError> {
    let Some(from) = &config.train.resume_from else {
        return Ok(None);
    };
    let dir = if from == "latest" {
        let (_, dir) = checkpoint::list(run_dir).pop().ok_or_else(|| {
            bad(
                "train.resume_from",
                format!("\"latest\": {} holds no checkpoint", run_dir.display()),
            )
        })?;
        dir
    } else {
        PathBuf::from(from)
    };
    if !dir.join(checkpoint::TRAINER_STATE_FILE).is_file() {
        return Err(bad(
            "train.resume_from",
            format!(
                "{} is not a checkpoint (no {})",
                dir.display(),
                checkpoint::TRAINER_STATE_FILE
            ),
        ));
    }
    Ok(Some(dir))
}

/// The PEFT config of a fresh adapter from `[lora]`.
fn lora_config(config: &TrainConfig) -> Result<LoraConfig, TrainError> {
    let l = &config.lora;
    let targets = match &l.target_regex {
        Some(regex) => TargetModules::Regex(regex.clone()),
        None => TargetModules::Names(l.target_modules.clone()),
    };
    let mut c = LoraConfig::new(l.r, l.alpha, targets);
    c.lora_dropout = l.dropout;
    c.use_rslora = l.use_rslora;
    c.use_dora = l.use_dora;
    c.init_lora_weights = match l.init.as_str() {
        "default" => InitLoraWeights::Flag(true),
        "gaussian" => InitLoraWeights::Method("gaussian".into()),
        other => {
            return Err(bad(
                "lora.init",
                format!("{other:?} is not default or gaussian"),
            ))
        }
    };
    c.base_model_name_or_path = Some(config.model.path.clone());
    Ok(c)
}

/// `[quant]`: NF4 base weights when `bits = 4`.
fn quant_config(config: &TrainConfig) -> Result<Option<Nf4Config>, TrainError> {
    let q = &config.quant;
    match q.bits {
        None => Ok(None),
        Some(4) if q.kind == "nf4" => Ok(Some(Nf4Config {
            blocksize: q.block_size,
            double_quant: q.double_quant,
        })),
        Some(4) => Err(bad(
            "quant.type",
            format!("{:?} is not supported (nf4)", q.kind),
        )),
        Some(bits) => Err(bad("quant.bits", format!("{bits} is not supported (4)"))),
    }
}

/// Every trainable tensor of the model, flattened, in layer and module order (the optimizer's).
fn flat_params<B: TrainBackend>(model: &CausalLm<B>) -> Vec<Tensor<B::InnerBackend, 1>> {
    model
        .model
        .layers
        .iter()
        .flat_map(|layer| layer.linears())
        .filter_map(|l| l.adapter.as_ref())
        .flat_map(|a| a.trainable())
        .map(|(_, t)| t.inner())
        .collect()
}

/// Puts `values` (in `flat_params`'s order) into the model.
fn set_params<B: TrainBackend>(model: &mut CausalLm<B>, values: Vec<Tensor<B::InnerBackend, 1>>) {
    let mut values = values.into_iter();
    for layer in &mut model.model.layers {
        for lin in layer.linears_mut() {
            if let Some(a) = &mut lin.adapter {
                let n = a.trainable_count();
                a.set_trainable(values.by_ref().take(n).map(Tensor::from_inner).collect());
            }
        }
    }
}

/// Tokens and time since the last log line (their loss is `TrainerState::unlogged_loss`, which
/// checkpoints carry across a resume).
struct Window {
    tokens: usize,
    since: Instant,
}

impl Window {
    fn new() -> Self {
        Self {
            tokens: 0,
            since: Instant::now(),
        }
    }

    fn tokens_per_sec(&self) -> f64 {
        self.tokens as f64 / self.since.elapsed().as_secs_f64().max(1e-9)
    }
}

/// The gradient computation of one optimizer step.
struct StepGrads<'a, B: TrainBackend> {
    seed: u64,
    dropout: bool,
    checkpointing: bool,
    layer_tensors: &'a [usize],
    device: &'a B::Device,
}

type Grads<B> = Vec<Option<Tensor<<B as AutodiffBackend>::InnerBackend, 1>>>;

impl<B: TrainBackend> StepGrads<'_, B> {
    /// The mean loss over the step's label tokens, its tokens (padding excluded) and the
    /// gradient of that loss for every trainable tensor (flattened, in `flat_params`'s order;
    /// None where the backward pass did not reach one).
    fn compute(
        &self,
        model: &CausalLm<B>,
        batches: &[Vec<TrainRow>],
        step: u64,
    ) -> (f64, usize, Grads<B>) {
        let micro: Vec<(Batch, LossTargets)> = batches
            .iter()
            .map(|rows| {
                let refs: Vec<&TrainRow> = rows.iter().collect();
                let (batch, labels) = collate(&refs);
                (batch, LossTargets::shifted(&labels))
            })
            .collect();
        let label_tokens: usize = micro.iter().map(|(_, t)| t.len()).sum();
        let tokens = batches.iter().flatten().map(|r| r.input_ids().len()).sum();
        let n_tensors: usize = self.layer_tensors.iter().sum();
        let mut grads: Grads<B> = vec![None; n_tensors];
        // Frozen copies for the forward pass of checkpointing: cheap (tensors are shared) and
        // they record no graph.
        let frozen: Vec<DecoderLayer<B>> = if self.checkpointing {
            model
                .model
                .layers
                .iter()
                .map(|l| l.clone().no_grad())
                .collect()
        } else {
            Vec::new()
        };
        let scale = 1.0 / label_tokens.max(1) as f64;
        let mut loss_sum = 0.0;
        for (i, (batch, targets)) in micro.iter().enumerate() {
            if targets.is_empty() {
                continue;
            }
            let seed_layer = |layer: usize| self.seed_dropout(step, i, layer);
            loss_sum += if self.checkpointing {
                self.checkpointed(
                    model,
                    &frozen,
                    batch,
                    targets,
                    scale,
                    &seed_layer,
                    &mut grads,
                )
            } else {
                self.whole(model, batch, targets, scale, &seed_layer, &mut grads)
            };
        }
        (loss_sum * scale, tokens, grads)
    }

    /// One graph over the whole model; returns the summed loss.
    fn whole(
        &self,
        model: &CausalLm<B>,
        batch: &Batch,
        targets: &LossTargets,
        scale: f64,
        seed_layer: &dyn Fn(usize),
        grads: &mut Grads<B>,
    ) -> f64 {
        let (mut x, inputs) = model.embed(batch);
        for (i, layer) in model.model.layers.iter().enumerate() {
            seed_layer(i);
            x = layer.forward(x, &inputs.rope, inputs.masks[i].clone(), None);
        }
        let sum = token_losses(model, model.model.norm.forward(x), targets).sum();
        let backward = (sum.clone() * scale).backward();
        let mut offset = 0;
        for (layer, n) in model.model.layers.iter().zip(self.layer_tensors) {
            add_layer_grads(grads, offset, layer, &backward);
            offset += n;
        }
        scalar(sum.inner())
    }

    /// Layer by layer: a forward pass that keeps only each layer's input, then per layer, last
    /// to first, the layer recomputed with a graph and its backward pass seeded with the
    /// gradient of its output. The last layer keeps its graph from the forward pass instead, as
    /// its backward pass follows at once. Returns the summed loss.
    #[allow(clippy::too_many_arguments)]
    fn checkpointed(
        &self,
        model: &CausalLm<B>,
        frozen: &[DecoderLayer<B>],
        batch: &Batch,
        targets: &LossTargets,
        scale: f64,
        seed_layer: &dyn Fn(usize),
        grads: &mut Grads<B>,
    ) -> f64 {
        let layers = &model.model.layers;
        let last = layers.len() - 1;
        // The first layer's input is the frozen embedding: its gradient is not needed.
        let tracked = |i: usize, x: Tensor<B, 3>| if i > 0 { x.require_grad() } else { x };
        let (mut x, inputs) = model.embed(batch);
        let mut layer_inputs = Vec::with_capacity(last);
        for (i, layer) in frozen[..last].iter().enumerate() {
            seed_layer(i);
            layer_inputs.push(x.clone());
            x = layer.forward(x, &inputs.rope, inputs.masks[i].clone(), None);
        }
        seed_layer(last);
        let input = tracked(last, x.detach());
        let out = layers[last].forward(
            input.clone(),
            &inputs.rope,
            inputs.masks[last].clone(),
            None,
        );
        let sum = token_losses(model, model.model.norm.forward(out), targets).sum();
        let backward = (sum.clone() * scale).backward();
        let mut offset: usize = self.layer_tensors[..last].iter().sum();
        add_layer_grads(grads, offset, &layers[last], &backward);
        let mut grad_out = input.grad(&backward);
        for i in (0..last).rev() {
            offset -= self.layer_tensors[i];
            seed_layer(i);
            let layer = &layers[i];
            let input = tracked(i, layer_inputs.pop().expect("one input per layer"));
            let (h, act) = layer.forward_to_down_proj(
                input.clone(),
                &inputs.rope,
                inputs.masks[i].clone(),
                None,
            );
            let grad = Tensor::from_inner(grad_out.expect("the layer above depends on its input"));
            let backward =
                (seed_gradient(h, grad.clone()) + layer.mlp.down_proj.seed(act, grad)).backward();
            add_layer_grads(grads, offset, layer, &backward);
            grad_out = input.grad(&backward);
        }
        scalar(sum.inner())
    }

    /// Reseeds the backend's generator for the dropout of one layer of one micro-batch.
    fn seed_dropout(&self, step: u64, micro: usize, layer: usize) {
        if self.dropout {
            let seed = [step, micro as u64, layer as u64]
                .iter()
                .fold(self.seed, |h, &v| splitmix64(h ^ splitmix64(v)));
            B::seed(self.device, seed);
        }
    }
}

/// Adds the adapter gradients of one layer to `grads`, from `offset` on.
fn add_layer_grads<B: TrainBackend>(
    grads: &mut Grads<B>,
    offset: usize,
    layer: &DecoderLayer<B>,
    backward: &B::Gradients,
) {
    let layer_grads = layer
        .linears()
        .into_iter()
        .filter_map(|l| l.adapter.as_ref())
        .flat_map(|a| a.trainable_grads(backward));
    for (slot, g) in grads[offset..].iter_mut().zip(layer_grads) {
        *slot = match (slot.take(), g) {
            (Some(acc), Some(g)) => Some(acc + g),
            (acc, g) => acc.or(g),
        };
    }
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    use burn::tensor::ElementConversion;
    t.into_scalar().elem::<f64>()
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}
