//! Configuration types: the checkpoint's `config.json` (`HfConfig` → `ModelConfig`) and
//! `generation_config.json` (`GenerationConfig`), `LoraConfig` (PEFT field names), and the
//! training config `TrainConfig` (TOML).

mod generation;
mod lora;
mod model;
mod train;

use std::path::PathBuf;

pub use generation::{GenerationConfig, TokenIds};
pub use lora::{InitLoraWeights, LoraConfig, TargetModules};
pub use model::{Arch, Dtype, HfConfig, ModelConfig, RopeConfig, RopeScaling};
pub use train::{
    DataSection, Hub, LoraSection, ModelSection, OutputSection, QuantSection, TrainConfig,
    TrainConfigError, TrainSection,
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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON for a model config: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}
