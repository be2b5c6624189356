//! Configuration types: the checkpoint's `config.json` (`HfConfig` → `ModelConfig`) and
//! `generation_config.json` (`GenerationConfig`), `LoraConfig` (PEFT field names), `Nf4Config`,
//! and the training config `TrainConfig` (TOML) → `resolve()` → `TrainPlan`. The bottom layer:
//! it imports nothing else of the crate.

mod generation;
mod lora;
mod model;
mod quant;
mod train;

use std::path::PathBuf;

pub use generation::{GenerationConfig, TokenIds};
pub use lora::{InitLoraWeights, LoraConfig, TargetModules};
pub use model::{
    Arch, Dtype, HfConfig, LinearAttention, MlpKind, ModelConfig, ModelConfigError, Moe,
    RopeConfig, RopeScaling, TokenMixer, LINEAR_ATTN_LINEARS, MLP_LINEARS, SELF_ATTN_LINEARS,
    SHARED_EXPERT_LINEARS,
};
pub use quant::Nf4Config;
pub use train::{
    auto_dtype, parse_swift_args, swift_bool, swift_help, versioned_dir, DataSection, Device, Hub,
    Length, LoraInit, LoraSection, LossScale, LossType, ModelSection, OnBadRow, OptimizerConfig,
    OptimizerKind, OutputSection, Override, QuantSection, QuantType, Resume, RlhfSection, RlhfType,
    RunArgs, ScheduleConfig, ScheduleKind, SwiftArgs, SwiftCommand, TemplateName, TrainConfig,
    TrainPlan, TrainSection, Truncation, Warmup, ARGS_FILE,
};

/// Files of a model directory besides config.json and the weights that loading, inference and a
/// merged copy use when present: tokenizer, chat template, generation settings.
pub const COMPANION_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// A config file or value that cannot be used; `Display` names the file (and line) and the key.
/// Always the user's to fix: a usage error.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON for a model config: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Model {
        path: PathBuf,
        source: ModelConfigError,
    },
    /// A key of the training config; `at` is "file:line", the file, or `--set KEY=VALUE`.
    #[error("{at}: {message}")]
    Key { at: String, message: String },
}

impl ConfigError {
    /// Always: a config is what the user gave.
    pub fn is_usage(&self) -> bool {
        true
    }
}
