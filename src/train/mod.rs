//! Training and evaluation: the LoRA/QLoRA training loop (`Trainer`), its optimizers, learning-rate
//! schedules, checkpoints and logs, and the loss of a model over pre-tokenized rows.

pub mod checkpoint;
mod eval;
pub mod feed;
mod grads;
pub mod log;
pub mod optim;
pub mod preference;
pub mod run_dir;
pub mod schedule;
mod trainer;

use std::path::{Path, PathBuf};

pub use eval::{evaluate, mean_loss, EvalReport, RowLoss};
pub use trainer::{Control, Outcome, StepReport, Trainer};

use crate::data::DataError;
use crate::export::ExportError;
use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A config value that cannot work, named by its key.
    #[error("{key}: {reason}")]
    Config { key: String, reason: String },
    #[error(transparent)]
    Settings(#[from] crate::config::ConfigError),
    #[error("{dir} already holds a run: set train.resume_from = \"latest\" to continue it, or output.overwrite = true to start over")]
    RunExists { dir: PathBuf },
    #[error("{dir} is in use by another swift-rs run ({}); wait for it to end, or choose another output.dir", pid.map_or("its process id is not written yet".into(), |p| format!("pid {p}")))]
    Locked { dir: PathBuf, pid: Option<u32> },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("the {what} became {value} at step {step}; training stopped ({last})")]
    NonFinite {
        what: &'static str,
        value: f64,
        step: u64,
        last: String,
    },
    #[error("cannot draw {path}: {reason}")]
    Plot { path: PathBuf, reason: String },
}

impl TrainError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { path, source }
    }

    /// Errors in what the user asked for (the config, the run directory), as opposed to
    /// failures while running.
    pub fn is_usage(&self) -> bool {
        match self {
            Self::Config { .. }
            | Self::Settings(_)
            | Self::RunExists { .. }
            | Self::Locked { .. } => true,
            Self::Hub(e) => e.is_usage(),
            Self::Model(e) => e.is_usage(),
            Self::Data(e) => e.is_usage(),
            _ => false,
        }
    }
}
