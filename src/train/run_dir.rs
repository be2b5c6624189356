//! The run directory (`output.dir`): whether it already holds a run, which checkpoint a resume
//! starts from, and clearing it for a new run (`output.overwrite`) with the resolved config
//! written in.

use std::path::{Path, PathBuf};

use super::checkpoint::{self, TRAINER_STATE_FILE};
use super::{log, TrainError};
use crate::config::{Resume, TrainPlan};
use crate::export::write_atomic;

/// The resolved config of the run, as TOML.
pub const CONFIG_FILE: &str = "config.toml";

/// A directory holds a run when it has a config, a log or a checkpoint of one.
pub fn holds_run(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).exists()
        || dir.join(log::LOGGING_FILE).exists()
        || !checkpoint::list(dir).is_empty()
}

/// The checkpoint `train.resume_from` names: a directory, or the newest in `run_dir`.
pub fn resume_dir(resume: Option<&Resume>, run_dir: &Path) -> Result<Option<PathBuf>, TrainError> {
    let bad = |reason: String| TrainError::Config {
        key: "train.resume_from".into(),
        reason,
    };
    let dir = match resume {
        None => return Ok(None),
        Some(Resume::Checkpoint(dir)) => dir.clone(),
        Some(Resume::Latest) => {
            let (_, dir) = checkpoint::list(run_dir).pop().ok_or_else(|| {
                bad(format!(
                    "\"latest\": {} holds no checkpoint",
                    run_dir.display()
                ))
            })?;
            dir
        }
    };
    if !dir.join(TRAINER_STATE_FILE).is_file() {
        return Err(bad(format!(
            "{} is not a checkpoint (no {TRAINER_STATE_FILE})",
            dir.display()
        )));
    }
    Ok(Some(dir))
}

/// Clears a previous run under `output.overwrite` (not when resuming it) and writes the
/// resolved config.
pub fn prepare(dir: &Path, plan: &TrainPlan) -> Result<(), TrainError> {
    if plan.resume.is_none() && holds_run(dir) {
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
    write_atomic(&dir.join(CONFIG_FILE), plan.config.to_toml().as_bytes())?;
    Ok(())
}
