//! `TrainConfig::resolve`: the config checked, and every choice it leaves open made once (the
//! compute dtype for the device, the adapter's PEFT config, NF4, the optimizer, the schedule's
//! warmup, the run's length, the eval cadence), so the CLI and a library caller that hold the same
//! config train the same run.

use std::path::{Path, PathBuf};

use super::{Device, LoraInit, OptimizerKind, ScheduleKind, TrainConfig};
use crate::config::{ConfigError, Dtype, InitLoraWeights, LoraConfig, Nf4Config, TargetModules};

/// A run, every choice made: what `Trainer::new` builds from.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPlan {
    /// The config as resolved (`model.dtype` as chosen for the device, see `dtype`): what
    /// `<output.dir>/config.toml` records.
    pub config: TrainConfig,
    /// NF4 frozen weights (QLoRA).
    pub quant: Option<Nf4Config>,
    /// A fresh adapter's PEFT config (one read from `lora.init_adapter` or a checkpoint brings
    /// its own).
    pub lora: LoraConfig,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    pub length: Length,
    /// Evaluate every this many steps (`train.eval_steps`, else `train.save_steps`).
    pub eval_steps: u64,
    pub resume: Option<Resume>,
}

/// `train.optimizer`, `train.weight_decay`, `train.adam_beta1/2`, `train.adam_eps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// `train.lr`, `train.lr_scheduler` and the warmup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub warmup: Warmup,
}

/// The warmup as ms-swift / transformers take it: `warmup_steps` when above 0, else a ratio of
/// the run's steps (known once the data is read).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Warmup {
    Steps(usize),
    Ratio(f64),
}

impl Warmup {
    pub fn steps(self, total_steps: usize) -> usize {
        match self {
            Self::Steps(n) => n,
            Self::Ratio(r) => (total_steps as f64 * r).ceil() as usize,
        }
    }
}

/// How long the run is: `train.max_steps` when above 0 (always so when streaming), else
/// `train.epochs` over the training rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Length {
    Steps(u64),
    Epochs(f64),
}

impl Length {
    /// Optimizer steps for `rows` training rows: a partial last batch and a partial last step
    /// count, as in transformers; at least one.
    pub fn max_steps(self, rows: usize, batch_size: usize, grad_accum: usize) -> u64 {
        match self {
            Self::Steps(n) => n,
            Self::Epochs(epochs) => {
                let per_epoch = rows.div_ceil(batch_size).div_ceil(grad_accum) as f64;
                ((epochs * per_epoch).ceil() as u64).max(1)
            }
        }
    }
}

/// `train.resume_from`.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The newest checkpoint in `output.dir`.
    Latest,
    Checkpoint(PathBuf),
}

impl TrainPlan {
    /// The frozen weights' compute dtype; None: the checkpoint's own.
    pub fn dtype(&self) -> Option<Dtype> {
        self.config.model.dtype
    }
}

impl TrainConfig {
    /// Checks the config (as `check`, for one built in code) and makes its choices for a run on
    /// `device`, which is where the run goes (the CLI resolves `train.device` first): "auto"
    /// dtype is f32 on the CPU and on wgpu, the checkpoint's dtype on CUDA.
    pub fn resolve(&self, device: Device) -> Result<TrainPlan, ConfigError> {
        self.check(Path::new("the training config"))?;
        let (m, l, t) = (&self.model, &self.lora, &self.train);
        let dtype = device
            .compute_dtype(m.dtype)
            .map_err(|reason| ConfigError::Key {
                at: format!("model.dtype on {device}"),
                message: reason,
            })?;
        let mut config = self.clone();
        config.model.dtype = dtype;

        let targets = match &l.target_regex {
            Some(regex) => TargetModules::Regex(regex.clone()),
            None => TargetModules::Names(l.target_modules.clone()),
        };
        let mut lora = LoraConfig::new(l.r, l.alpha, targets);
        lora.target_parameters = Some(l.target_parameters.clone()).filter(|t| !t.is_empty());
        lora.lora_dropout = l.dropout;
        lora.use_rslora = l.use_rslora;
        lora.use_dora = l.use_dora;
        lora.init_lora_weights = match l.init {
            LoraInit::Default => InitLoraWeights::Flag(true),
            LoraInit::Gaussian => InitLoraWeights::Method("gaussian".into()),
        };
        // A local model is recorded by its absolute path (config.toml, args.json,
        // adapter_config.json's base_model_name_or_path), so that a checkpoint finds its model
        // from any directory; a hub id stays an id, as PEFT records it.
        if Path::new(&m.path).is_dir() {
            let absolute = std::path::absolute(&m.path).ok();
            if let Some(path) = absolute.as_ref().and_then(|p| p.to_str()) {
                config.model.path = path.to_string();
            }
        }
        lora.base_model_name_or_path = Some(config.model.path.clone());

        // `check` allows no other bits, and NF4 is the only 4-bit type.
        let quant = self.quant.bits.map(|_| Nf4Config {
            blocksize: self.quant.block_size,
            double_quant: self.quant.double_quant,
        });
        Ok(TrainPlan {
            quant,
            lora,
            optimizer: OptimizerConfig {
                kind: t.optimizer,
                weight_decay: t.weight_decay,
                beta1: t.adam_beta1,
                beta2: t.adam_beta2,
                eps: t.adam_eps,
            },
            schedule: ScheduleConfig {
                kind: t.lr_scheduler,
                lr: t.lr,
                warmup: match t.warmup_steps {
                    0 => Warmup::Ratio(t.warmup_ratio),
                    n => Warmup::Steps(n),
                },
            },
            length: match t.max_steps {
                n if n > 0 => Length::Steps(n as u64),
                _ => Length::Epochs(t.epochs),
            },
            eval_steps: t.eval_steps.unwrap_or(t.save_steps) as u64,
            resume: t.resume_from.as_ref().map(|from| match from.as_str() {
                "latest" => Resume::Latest,
                dir => Resume::Checkpoint(dir.into()),
            }),
            config,
        })
    }
}
