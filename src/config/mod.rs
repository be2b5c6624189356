//! Configuration types: the checkpoint's `config.json` (`HfConfig` → `ModelConfig`).
//! Later: `LoraConfig` (PEFT field names) and `TrainConfig` (TOML).

mod model;

use std::path::PathBuf;

pub use model::{Arch, Dtype, HfConfig, ModelConfig, RopeConfig, RopeScaling};

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
