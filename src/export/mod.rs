//! Files other tools read: PEFT adapters and merged Hugging Face model directories.

pub mod merge;
pub mod peft;

use std::path::{Path, PathBuf};

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

/// A directory built under a temporary name beside its target and renamed into place by
/// `commit`, so the target is never seen half-written; dropped uncommitted, it is removed.
pub struct StagedDir {
    tmp: tempfile::TempDir,
    target: PathBuf,
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError {
    let path = path.to_path_buf();
    move |source| ExportError::Write { path, source }
}

impl StagedDir {
    pub fn new(target: &Path) -> Result<Self, ExportError> {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(parent).map_err(write_error(parent))?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(parent)
            .map_err(write_error(parent))?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Writes one file into the staged directory.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), ExportError> {
        let path = self.path().join(name);
        std::fs::write(&path, bytes).map_err(write_error(&path))
    }

    /// Moves the directory into place, replacing an existing target.
    pub fn commit(self) -> Result<(), ExportError> {
        if self.target.exists() {
            std::fs::remove_dir_all(&self.target).map_err(write_error(&self.target))?;
        }
        let tmp = self.tmp.keep();
        std::fs::rename(&tmp, &self.target).map_err(write_error(&self.target))
    }
}
