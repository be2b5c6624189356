//! Writing files and directories whole or not at all: each is built under a temporary name
//! beside its target and renamed into place, so a crash or a full disk never leaves a
//! half-written file under the final name.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::ExportError;

/// A directory built under a temporary name beside its target and renamed into place by
/// `commit`, so the target is never seen half-written; dropped uncommitted, it is removed.
pub struct StagedDir {
    tmp: tempfile::TempDir,
    target: PathBuf,
}

/// The directory `path` is in (`.` for a bare file name): where its temporary twin is made, so
/// that the rename stays on one file system.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError {
    let path = path.to_path_buf();
    move |source| ExportError::Write { path, source }
}

impl StagedDir {
    pub fn new(target: &Path) -> Result<Self, ExportError> {
        let parent = parent_dir(target);
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

/// A file written under a temporary name in its final directory and renamed on `commit`.
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self, ExportError> {
        let dir = parent_dir(path);
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(write_error(dir))?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
        })
    }

    pub fn commit(self) -> Result<(), ExportError> {
        let path = self.path;
        self.tmp
            .persist(&path)
            .map_err(|e| write_error(&path)(e.error))?;
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tmp.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tmp.flush()
    }
}

/// Writes `bytes` to `path` atomically (see `AtomicFile`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes).map_err(write_error(path))?;
    file.commit()
}
