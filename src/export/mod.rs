//! Files other tools read: PEFT adapters, merged Hugging Face model directories and GGUF files,
//! each written whole or not at all (`atomic`).

mod atomic;
pub mod gguf;
pub mod merge;
pub mod peft;

pub use atomic::{exit_removing_staged, write_atomic, AtomicFile, StagedDir};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Load(#[from] crate::model::LoadError),
}
