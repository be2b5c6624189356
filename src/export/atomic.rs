//! Writing files and directories whole or not at all: each is built under a temporary name
//! beside its target and renamed into place, so a crash or a full disk never leaves a
//! half-written file under the final name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::ExportError;

/// A directory built under a temporary name beside its target and renamed into place by
/// `commit`, so the target is never seen half-written; dropped uncommitted, it is removed.
/// Its name, `.tmp-swift-rs-<pid>-XXXXXX`, says which process writes it: a later one removes
/// those of processes that are gone (killed with SIGKILL, or the machine lost power).
pub struct StagedDir {
    /// None once committed.
    tmp: Option<tempfile::TempDir>,
    target: PathBuf,
}

/// The staged directories of this process that are not committed yet.
static STAGED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

const STAGED_PREFIX: &str = ".tmp-swift-rs-";

/// Ends the process with `code`, removing first every staged directory of this process that is
/// not committed yet: for a signal handler, as exiting unwinds nothing. Each is renamed away
/// before it is removed, so that a thread still writing into it cannot add files meanwhile (its
/// writes fail), and the list stays locked until the end, so that such a thread, which drops its
/// `StagedDir` on the failure, waits there instead of exiting first with its own error.
pub fn exit_removing_staged(code: i32) -> ! {
    let mut staged = STAGED.lock().unwrap_or_else(|e| e.into_inner());
    for dir in staged.drain(..) {
        let mut doomed = dir.clone().into_os_string();
        doomed.push(".removing");
        // Best effort: the process is ending, and nothing can be done about a failure.
        let _ = std::fs::rename(&dir, &doomed);
        let _ = std::fs::remove_dir_all(&doomed);
    }
    std::process::exit(code)
}

/// Removes the staged directories in `parent` whose process is gone. Only where the system says
/// which processes live (Linux's /proc); elsewhere they stay.
fn remove_orphans(parent: &Path) {
    let proc = Path::new("/proc/self");
    if !proc.exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(STAGED_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            // Best effort: a leftover that cannot be removed harms nothing but space.
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
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
        remove_orphans(parent);
        // Listed as it is made: a signal between the two would leave it unlisted, and behind.
        let mut staged = STAGED.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{STAGED_PREFIX}{}-", std::process::id()))
            .tempdir_in(parent)
            .map_err(write_error(parent))?;
        staged.push(tmp.path().to_path_buf());
        drop(staged);
        Ok(Self {
            tmp: Some(tmp),
            target: target.to_path_buf(),
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        self.tmp.as_ref().expect("not committed").path()
    }

    /// Writes one file into the staged directory.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), ExportError> {
        let path = self.path().join(name);
        std::fs::write(&path, bytes).map_err(write_error(&path))
    }

    /// Moves the directory into place, replacing an existing target.
    pub fn commit(mut self) -> Result<(), ExportError> {
        // Held to the end: a signal's `exit_removing_staged` removes it first or not at all.
        let mut staged = STAGED.lock().unwrap_or_else(|e| e.into_inner());
        if self.target.exists() {
            std::fs::remove_dir_all(&self.target).map_err(write_error(&self.target))?;
        }
        let tmp = self.tmp.take().expect("committed once").keep();
        let renamed = std::fs::rename(&tmp, &self.target).map_err(write_error(&self.target));
        if renamed.is_err() {
            // Best effort: the rename's error is the one to report.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        staged.retain(|d| *d != tmp);
        renamed
    }
}

impl StagedDir {
    /// Moves the file `name` written here into place as the target (one file, not a directory),
    /// then removes the staged directory.
    pub fn commit_file(mut self, name: &str) -> Result<(), ExportError> {
        // Held to the end, as in `commit`.
        let mut staged = STAGED.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = self.tmp.take().expect("committed once").keep();
        let renamed =
            std::fs::rename(tmp.join(name), &self.target).map_err(write_error(&self.target));
        // Best effort: what is left is an empty directory, or the file of a failed rename.
        let _ = std::fs::remove_dir_all(&tmp);
        staged.retain(|d| *d != tmp);
        renamed
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let mut staged = STAGED.lock().unwrap_or_else(|e| e.into_inner());
            staged.retain(|d| d != tmp.path());
        }
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
        let mut builder = tempfile::Builder::new();
        // tempfile's own 0600 would stay on the renamed file: config.toml, a merged model's
        // config.json and an eval's output are for everyone who may read the directory.
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
        let tmp = builder.tempfile_in(dir).map_err(write_error(dir))?;
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
