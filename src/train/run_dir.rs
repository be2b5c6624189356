//! The run directory (`output.dir`): the lock a live run holds on it, whether it already holds a
//! run, which checkpoint a resume starts from, and clearing it for a new run (`output.overwrite`)
//! with the resolved config written in.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::checkpoint::{self, TRAINER_STATE_FILE};
use super::{log, TrainError};
use crate::config::{Resume, TrainPlan};
use crate::export::write_atomic;

/// The resolved config of the run, as TOML.
pub const CONFIG_FILE: &str = "config.toml";

/// The file a live run locks; it holds the run's process id.
pub const LOCK_FILE: &str = "swift-rs.lock";

/// An exclusive lock on a run directory, held while a `Trainer` lives. The operating system
/// releases it however the process ends (even `kill -9`), so a stale lock never blocks a rerun.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

/// Locks `dir` (created if missing) for this process, or fails naming the process that holds it.
pub fn lock(dir: &Path) -> Result<RunLock, TrainError> {
    std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(TrainError::io(&path))?;
    match file.try_lock() {
        Ok(()) => {
            let pid = std::process::id().to_string();
            file.set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| file.write_all(pid.as_bytes()))
                .map_err(TrainError::io(&path))?;
            Ok(RunLock { _file: file })
        }
        Err(TryLockError::WouldBlock) => {
            // The holder writes its id just after locking: it may not be there yet.
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            Err(TrainError::Locked {
                dir: dir.to_path_buf(),
                pid,
            })
        }
        Err(TryLockError::Error(e)) => Err(TrainError::io(&path)(e)),
    }
}

/// A directory holds a run when it has a checkpoint: a run that failed before its first one left
/// only a config and a log, which a new run replaces.
pub fn holds_run(dir: &Path) -> bool {
    !checkpoint::list(dir).is_empty()
}

/// The checkpoint `train.resume_from` names: a directory, or the newest in `run_dir`; None for
/// "latest" in a directory with no checkpoint yet, so that a job script that always says
/// "latest" (a SLURM requeue) starts its first run as it continues the others.
pub fn resume_dir(resume: Option<&Resume>, run_dir: &Path) -> Result<Option<PathBuf>, TrainError> {
    let bad = |reason: String| TrainError::Config {
        key: "train.resume_from".into(),
        reason,
    };
    let dir = match resume {
        None => return Ok(None),
        Some(Resume::Checkpoint(dir)) => dir.clone(),
        Some(Resume::Latest) => match checkpoint::list(run_dir).pop() {
            Some((_, dir)) => dir,
            None => return Ok(None),
        },
    };
    if !dir.join(TRAINER_STATE_FILE).is_file() {
        return Err(bad(format!(
            "{} is not a checkpoint (no {TRAINER_STATE_FILE})",
            dir.display()
        )));
    }
    Ok(Some(dir))
}

/// Clears what a killed write left (`.tmp*` files and directories), and a previous run when this
/// one starts afresh (`resumed` false: `output.overwrite`, or a run with no checkpoint), then
/// writes the resolved config. Called under the run's lock: no other process writes here.
pub fn prepare(dir: &Path, plan: &TrainPlan, resumed: bool) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    remove_stale_temporaries(dir)?;
    remove_stale_temporaries(&dir.join(log::IMAGES_DIR))?;
    if !resumed {
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
    write_atomic(&dir.join(CONFIG_FILE), plan.config.to_toml().as_bytes())?;
    Ok(())
}

/// Removes the temporaries (`.tmp` names: `StagedDir`, `AtomicFile`, a plot's) that a process
/// killed while writing left in `dir`.
fn remove_stale_temporaries(dir: &Path) -> Result<(), TrainError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(".tmp") {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(TrainError::io(&path))?;
    }
    Ok(())
}
