//! What both hubs share: the progress display, checking what arrived, and a resumable download
//! into `<file>.incomplete`, renamed to its real name only once its size and hash are right.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use sha1::Digest;

use super::{HubEnv, HubError, HubId};

/// An HTTP client that gives up on a connection or a read that waits longer than `timeout`
/// (ureq waits for ever to read by default: a hub that accepts the connection and never
/// answers hung every command).
pub(super) fn agent(timeout: std::time::Duration) -> ureq::Agent {
    agent_builder(timeout).build()
}

/// `agent`'s settings, for a client that needs one more (the Hugging Face probe's no redirects).
pub(super) fn agent_builder(timeout: std::time::Duration) -> ureq::AgentBuilder {
    ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout_connect(timeout)
        .timeout_read(timeout)
        .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
}

/// A progress bar per file on a terminal, else one line per file.
pub(super) struct Bar(ProgressBar);

impl Bar {
    pub fn new(env: &HubEnv, id: &HubId, file: &str) -> Self {
        if !env.progress {
            crate::say!("{id}: downloading {file}");
            return Self(ProgressBar::hidden());
        }
        let style = ProgressStyle::with_template(
            "{msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        )
        .expect("a valid template");
        Self(
            ProgressBar::new(0)
                .with_style(style)
                .with_message(file.to_string()),
        )
    }
}

impl hf_hub::api::Progress for Bar {
    fn init(&mut self, size: usize, _filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_position(0);
    }

    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    fn finish(&mut self) {
        self.0.finish();
    }
}

/// Checks the file at `path` against `expected`: a hex SHA-256 (what the hubs give for large
/// files) or a git blob SHA-1 (Hugging Face's ETag of small files). Other values are not hashes
/// and are not checked.
pub(super) fn check(path: &Path, expected: &str) -> Result<(), String> {
    let expected = expected.to_ascii_lowercase();
    if !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(());
    }
    let (name, got) = match expected.len() {
        64 => ("SHA-256", digest(sha2::Sha256::new(), path)),
        40 => {
            let len = fs::metadata(path).map_err(|e| e.to_string())?.len();
            let mut git = sha1::Sha1::new();
            git.update(format!("blob {len}\0"));
            ("git SHA-1", digest(git, path))
        }
        _ => return Ok(()),
    };
    let got = got.map_err(|e| e.to_string())?;
    if got == expected {
        Ok(())
    } else {
        Err(format!("{name} {got}, expected {expected}"))
    }
}

fn digest<D: Digest>(mut hasher: D, path: &Path) -> std::io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => break,
            n => hasher.update(&buf[..n]),
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// What the listing says a file should be.
pub(super) struct Expected<'a> {
    pub size: Option<u64>,
    /// A SHA-256 or a git blob SHA-1, as `check` takes it.
    pub hash: Option<&'a str>,
}

/// Downloads into `dest`. A `.incomplete` file left by an earlier attempt is resumed with a
/// range request (and started over when the server ignores the range). `request` builds the
/// GET; `refused` turns an HTTP error into the hub's error.
pub(super) fn download(
    request: &dyn Fn() -> ureq::Request,
    refused: &dyn Fn(ureq::Error) -> HubError,
    dest: &Path,
    expected: Expected,
    mut bar: Bar,
    id: &HubId,
    file: &str,
) -> Result<(), HubError> {
    let partial = incomplete(dest);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(|e| HubError::io(parent, e))?;
    }
    let have = fs::metadata(&partial).map_or(0, |m| m.len());
    let mut get = request();
    if have > 0 {
        get = get.set("Range", &format!("bytes={have}-"));
    }
    let response = get.call().map_err(refused)?;
    let resumed = have > 0
        && response.status() == 206
        && response
            .header("Content-Range")
            .is_some_and(|r| r.starts_with(&format!("bytes {have}-")));
    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(&partial)
        .map_err(|e| HubError::io(&partial, e))?;
    let start = if resumed { have } else { 0 };
    let total = expected.size.or_else(|| {
        let len: u64 = response.header("Content-Length")?.parse().ok()?;
        Some(start + len)
    });
    hf_hub::api::Progress::init(&mut bar, total.unwrap_or(0) as usize, file);
    hf_hub::api::Progress::update(&mut bar, start as usize);
    let interrupted = |reason: String| HubError::Interrupted {
        id: id.to_string(),
        file: file.to_string(),
        reason,
    };
    let mut body = response.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = body
            .read(&mut buf)
            .map_err(|e| interrupted(e.to_string()))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(|e| HubError::io(&partial, e))?;
        hf_hub::api::Progress::update(&mut bar, n);
    }
    out.sync_all().map_err(|e| HubError::io(&partial, e))?;
    drop(out);
    hf_hub::api::Progress::finish(&mut bar);

    let damaged = |reason: String| {
        let _ = fs::remove_file(&partial);
        HubError::Checksum {
            id: id.to_string(),
            file: file.to_string(),
            reason,
        }
    };
    let len = fs::metadata(&partial)
        .map_err(|e| HubError::io(&partial, e))?
        .len();
    match expected.size {
        Some(size) if len < size => {
            return Err(interrupted(format!(
                "the transfer ended after {len} of {size} bytes"
            )))
        }
        Some(size) if len > size => {
            return Err(damaged(format!("{len} bytes, expected {size}")));
        }
        _ => {}
    }
    if let Some(hash) = expected.hash {
        check(&partial, hash).map_err(damaged)?;
    }
    fs::rename(&partial, dest).map_err(|e| HubError::io(dest, e))
}

/// Where a download in progress is kept: beside its destination, as both Python clients do.
fn incomplete(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".incomplete");
    dest.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"hello\n").unwrap();
        // `sha256sum` and `git hash-object` of "hello\n".
        let sha256 = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        let git = "ce013625030ba8dba906f756967f9e9ca394464a";
        assert_eq!(check(&path, sha256), Ok(()));
        assert_eq!(check(&path, &git.to_uppercase()), Ok(()));
        fs::write(&path, b"hellO\n").unwrap();
        assert!(check(&path, sha256).unwrap_err().starts_with("SHA-256 "));
        assert!(check(&path, git).unwrap_err().starts_with("git SHA-1 "));
        assert_eq!(check(&path, "not-a-hash"), Ok(()));
    }
}
