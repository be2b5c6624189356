//! Models and adapters named by hub id, `org/name[@revision]`, as ms-swift takes them.
//!
//! Files go into the cache layout of each hub's own Python client, so that whatever one side has
//! downloaded the other reuses: huggingface_hub's `models--org--name/{blobs,snapshots,refs}` and
//! modelscope's `models/org--name/snapshots/<revision>` (or its older `models/org/name___x`).
//! Only what loading reads is fetched: config, tokenizer and generation files, and the safetensors
//! weights (the shards the index names, not the `.bin` or `consolidated` copies beside them).

mod huggingface;
mod modelscope;
mod transfer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Hub, COMPANION_FILES};

/// `org/name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: Option<String>,
}

impl HubId {
    /// None for anything that is not spelled as a hub id (a path with more or fewer than two
    /// parts, or characters a hub does not allow in names).
    pub fn parse(spec: &str) -> Option<Self> {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, revision)) if !revision.is_empty() => (repo, Some(revision.to_string())),
            Some(_) => return None,
            None => (spec, None),
        };
        let (org, name) = repo.split_once('/')?;
        let valid = |part: &str| {
            !part.is_empty()
                && !part.starts_with(['.', '-'])
                && !part.contains("..")
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        (valid(org) && valid(name)).then(|| Self {
            repo: repo.to_string(),
            revision,
        })
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match &self.revision {
            Some(revision) => write!(f, "{}@{revision}", self.repo),
            None => f.write_str(&self.repo),
        }
    }
}

/// Where and how to reach a hub: the environment variables of its Python client, resolved.
#[derive(Debug, Clone)]
pub struct HubEnv {
    pub hub: Hub,
    /// Base URL without a trailing slash.
    pub endpoint: String,
    /// The root of the hub's cache (`~/.cache/huggingface/hub`, `~/.cache/modelscope`).
    pub cache: PathBuf,
    pub token: Option<String>,
    /// HF_HUB_OFFLINE: the cache only, no request.
    pub offline: bool,
    /// Progress bars; one line per file when false.
    pub progress: bool,
    /// How long a request for a repo's file list may wait to connect, and then for each read
    /// (HF_HUB_ETAG_TIMEOUT, 10 s as in huggingface_hub).
    pub metadata_timeout: Duration,
    /// The same for a file's download: a transfer that stalls this long breaks off, and resumes
    /// from where it stopped on the next run (HF_HUB_DOWNLOAD_TIMEOUT, 10 s).
    pub download_timeout: Duration,
}

impl HubEnv {
    /// Hugging Face: HF_ENDPOINT, HF_HUB_CACHE or HF_HOME, HF_TOKEN (else the token file that
    /// `hf auth login` writes). ModelScope: MODELSCOPE_ENDPOINT (or MODELSCOPE_DOMAIN),
    /// MODELSCOPE_CACHE, MODELSCOPE_API_TOKEN. HF_HUB_OFFLINE, HF_HUB_ETAG_TIMEOUT and
    /// HF_HUB_DOWNLOAD_TIMEOUT apply to both.
    pub fn from_env(hub: Hub) -> Result<Self, HubError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let home = || dirs::home_dir().ok_or(HubError::NoHome);
        let offline = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
            .iter()
            .any(|name| var(name).is_some_and(|v| is_true(&v)));
        let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let seconds = |name: &'static str| match var(name) {
            None => Ok(DEFAULT_TIMEOUT),
            Some(value) => value
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .filter(|d| !d.is_zero())
                .ok_or(HubError::BadTimeout { name, value }),
        };
        let metadata_timeout = seconds("HF_HUB_ETAG_TIMEOUT")?;
        let download_timeout = seconds("HF_HUB_DOWNLOAD_TIMEOUT")?;
        match hub {
            Hub::HuggingFace => {
                let hf_home = match (var("HF_HOME"), var("XDG_CACHE_HOME")) {
                    (Some(dir), _) => PathBuf::from(dir),
                    (None, Some(dir)) => Path::new(&dir).join("huggingface"),
                    (None, None) => home()?.join(".cache").join("huggingface"),
                };
                let token = var("HF_TOKEN")
                    .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
                    .or_else(|| {
                        let text = std::fs::read_to_string(hf_home.join("token")).ok()?;
                        Some(text.trim().to_string()).filter(|t| !t.is_empty())
                    });
                Ok(Self {
                    hub,
                    endpoint: var("HF_ENDPOINT")
                        .unwrap_or_else(|| "https://huggingface.co".into())
                        .trim_end_matches('/')
                        .to_string(),
                    cache: var("HF_HUB_CACHE")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| hf_home.join("hub")),
                    token,
                    offline,
                    progress,
                    metadata_timeout,
                    download_timeout,
                })
            }
            Hub::ModelScope => {
                let endpoint = match var("MODELSCOPE_ENDPOINT").or_else(|| var("MODELSCOPE_DOMAIN"))
                {
                    Some(e) if e.contains("://") => e,
                    Some(domain) => format!("https://{domain}"),
                    None => "https://modelscope.cn".into(),
                };
                let cache = match var("MODELSCOPE_CACHE") {
                    Some(dir) => PathBuf::from(dir),
                    None => home()?.join(".cache").join("modelscope"),
                };
                Ok(Self {
                    hub,
                    endpoint: endpoint.trim_end_matches('/').to_string(),
                    cache,
                    token: var("MODELSCOPE_API_TOKEN"),
                    offline,
                    progress,
                    metadata_timeout,
                    download_timeout,
                })
            }
        }
    }
}

/// huggingface_hub's default for both of its timeouts.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// huggingface_hub's reading of a boolean environment variable.
fn is_true(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

/// ms-swift's default: the Hugging Face Hub when USE_HF is true, else ModelScope. Here the
/// Hugging Face Hub is the default, and USE_HF=0 picks ModelScope.
pub fn default_hub() -> Hub {
    match std::env::var("USE_HF") {
        Ok(v) if !v.trim().is_empty() && !is_true(&v) => Hub::ModelScope,
        _ => Hub::HuggingFace,
    }
}

/// ms-swift's own default, for its command lines (`swift-rs sft`): ModelScope, unless USE_HF is
/// true.
pub fn ms_swift_hub() -> Hub {
    match std::env::var("USE_HF") {
        Ok(v) if is_true(&v) => Hub::HuggingFace,
        _ => Hub::ModelScope,
    }
}

/// The local directory `spec` stands for: `spec` itself when it exists (a local path wins over a
/// hub id of the same spelling, as in ms-swift), else the downloaded snapshot of the hub id it
/// spells. Anything else comes back unchanged, for the loader to report as missing.
pub fn local_dir(spec: impl AsRef<Path>, hub: Option<Hub>) -> Result<PathBuf, HubError> {
    let path = spec.as_ref();
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match path.to_str().and_then(HubId::parse) {
        Some(id) => snapshot(&HubEnv::from_env(hub.unwrap_or_else(default_hub))?, &id),
        None => Ok(path.to_path_buf()),
    }
}

/// The directory holding the files of `id` that loading needs, downloading those not yet in the
/// cache. When the hub cannot be reached, a complete cached snapshot of the revision is used.
pub fn snapshot(env: &HubEnv, id: &HubId) -> Result<PathBuf, HubError> {
    match env.hub {
        Hub::HuggingFace => huggingface::snapshot(env, id),
        Hub::ModelScope => modelscope::snapshot(env, id),
    }
}

/// The complete `cached` snapshot when the hub failed in a way that says nothing about the repo
/// (unreachable, too slow, a server error, an answer that is not the hub's), with a warning, as
/// huggingface_hub falls back on its cache; else `error`.
fn cached_or(id: &HubId, error: HubError, cached: Option<PathBuf>) -> Result<PathBuf, HubError> {
    match cached {
        Some(dir) if error.is_hub_failure() => {
            let failure = match &error {
                // Its own text goes on to say the cache cannot help.
                HubError::Network {
                    endpoint, reason, ..
                } => format!("cannot reach {endpoint} ({reason})"),
                other => other.to_string(),
            };
            crate::say!(
                "warning: {failure}: using the cached {id} in {}",
                dir.display()
            );
            Ok(dir)
        }
        _ => Err(error),
    }
}

/// The directory holding the data files of the dataset repo `id` (its .jsonl, .json, .csv and
/// .parquet files, in the repo's folders), downloading those not yet in the cache.
pub fn dataset_snapshot(env: &HubEnv, id: &HubId) -> Result<PathBuf, HubError> {
    match env.hub {
        Hub::HuggingFace => huggingface::dataset_snapshot(env, id),
        Hub::ModelScope => modelscope::dataset_snapshot(env, id),
    }
}

/// Downloads one file of the repo into the snapshot, unless it is there already.
type Fetch<'a> = &'a dyn Fn(&str) -> Result<(), HubError>;

/// What a model or adapter repo's snapshot needs, given its file list: the first files, then
/// the weights they name.
fn fetch_model(id: &HubId, fetch: Fetch, listed: &[&str], dir: &Path) -> Result<(), HubError> {
    for file in first_files(id, listed)? {
        fetch(file)?;
    }
    for file in weight_files(id, dir, listed)? {
        fetch(&file)?;
    }
    Ok(())
}

/// What a dataset repo's snapshot needs: every data file it lists (README and scripts left out).
fn fetch_data(id: &HubId, fetch: Fetch, listed: &[&str]) -> Result<(), HubError> {
    let files: Vec<&str> = listed.iter().copied().filter(|f| is_data_file(f)).collect();
    if files.is_empty() {
        return Err(HubError::NotADataset { id: id.to_string() });
    }
    files.into_iter().try_for_each(fetch)
}

/// The extensions of the files a dataset repo holds its rows in.
pub const DATA_EXTENSIONS: [&str; 4] = ["jsonl", "json", "csv", "parquet"];

/// Whether `path` names a data file (by its extension).
pub fn is_data_file(path: impl AsRef<Path>) -> bool {
    path.as_ref()
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| DATA_EXTENSIONS.contains(&e))
}

/// Every data file under `dir`, in all its folders.
pub fn data_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, into: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, into);
            } else if is_data_file(&path) {
                into.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    files
}

/// Whether a cached dataset snapshot holds any data file (what the file list would have said is
/// not known offline).
fn holds_data(dir: &Path) -> bool {
    !data_files(dir).is_empty()
}

/// The files to fetch first: configs, tokenizer files, the weight index. `listed` holds the
/// repo's files; a repo with neither a model nor an adapter config is refused.
fn first_files<'a>(id: &HubId, listed: &[&'a str]) -> Result<Vec<&'a str>, HubError> {
    if !listed
        .iter()
        .any(|f| *f == "config.json" || *f == ADAPTER_CONFIG)
    {
        return Err(HubError::NotAModel { id: id.to_string() });
    }
    Ok(listed
        .iter()
        .copied()
        .filter(|f| {
            ["config.json", ADAPTER_CONFIG, INDEX].contains(f) || COMPANION_FILES.contains(f)
        })
        .collect())
}

/// The weight files, once the first files are in `dir`: the shards its index names, else the
/// single file of a model or an adapter.
fn weight_files(id: &HubId, dir: &Path, listed: &[&str]) -> Result<Vec<String>, HubError> {
    let index = dir.join(INDEX);
    if index.exists() {
        return shards(&id.to_string(), &index);
    }
    Ok(["model.safetensors", "adapter_model.safetensors"]
        .into_iter()
        .filter(|f| listed.contains(f))
        .map(String::from)
        .collect())
}

/// The shard names of `model.safetensors.index.json`, each once, refusing names that would
/// leave the snapshot directory.
fn shards(id: &str, index: &Path) -> Result<Vec<String>, HubError> {
    let bad = |reason: String| HubError::BadIndex {
        id: id.to_string(),
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no weight_map object".into()))?;
    let mut names = Vec::new();
    for file in map.values() {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map value {file} is not a file name")))?;
        if file.starts_with('/') || file.split('/').any(|part| part == ".." || part.is_empty()) {
            return Err(bad(format!("shard {file:?} is outside the repo")));
        }
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
    }
    Ok(names)
}

/// Whether `dir` holds a model or adapter with all its weights: what a cached snapshot must
/// hold to be used without asking the hub.
fn complete(dir: &Path) -> bool {
    let has = |f: &str| dir.join(f).exists();
    if !(has("config.json") || has(ADAPTER_CONFIG)) {
        return false;
    }
    let index = dir.join(INDEX);
    if index.exists() {
        return shards("", &index).is_ok_and(|names| names.iter().all(|n| has(n)));
    }
    has("model.safetensors") || has("adapter_model.safetensors")
}

const ADAPTER_CONFIG: &str = "adapter_config.json";
const INDEX: &str = "model.safetensors.index.json";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{id} is neither a local directory nor a repo on {endpoint}{hint}")]
    RepoNotFound {
        id: String,
        endpoint: String,
        hint: &'static str,
    },
    #[error("{repo} has no revision {revision:?} on {endpoint}")]
    RevisionNotFound {
        repo: String,
        revision: String,
        endpoint: String,
    },
    #[error("{repo} is gated: accept its conditions at {endpoint}/{repo}, then {hint}")]
    Gated {
        repo: String,
        endpoint: String,
        hint: &'static str,
    },
    #[error("{id} has neither config.json nor adapter_config.json: not a model or adapter repo")]
    NotAModel { id: String },
    #[error("the dataset repo {id} holds no .jsonl, .json, .csv or .parquet file")]
    NotADataset { id: String },
    #[error("{id}: bad weight index {path}: {reason}")]
    BadIndex {
        id: String,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot reach {endpoint} for {id} ({reason}), and the cache at {cache} holds no complete copy; run with HF_HUB_OFFLINE=1 only once the files are cached")]
    Network {
        id: String,
        endpoint: String,
        cache: PathBuf,
        reason: String,
    },
    #[error("the download of {file} of {id} broke off ({reason}); run again to resume it")]
    Interrupted {
        id: String,
        file: String,
        reason: String,
    },
    #[error("HF_HUB_OFFLINE is set and the cache at {cache} holds no complete copy of {id}; download it once without HF_HUB_OFFLINE")]
    Offline { id: String, cache: PathBuf },
    #[error("{endpoint} answered {what} with something other than the hub's JSON ({reason})")]
    BadAnswer {
        endpoint: String,
        what: String,
        reason: String,
    },
    #[error("{name}={value:?} is not a number of seconds above 0")]
    BadTimeout { name: &'static str, value: String },
    #[error("{endpoint} answered {status} for {what}: {message}")]
    Http {
        endpoint: String,
        what: String,
        status: u16,
        message: String,
    },
    #[error(
        "{file} of {id} arrived damaged ({reason}); it was deleted, run again to download it anew"
    )]
    Checksum {
        id: String,
        file: String,
        reason: String,
    },
    #[error("the disk is full: cannot write {path} ({source}); free space and run again (the part already downloaded is kept and resumes)")]
    DiskFull {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{id}: {message}")]
    Other { id: String, message: String },
    #[error("no home directory for the hub cache: set HF_HOME (or MODELSCOPE_CACHE)")]
    NoHome,
}

impl HubError {
    /// Errors in what was asked for (a repo or revision that does not exist), as opposed to
    /// failures while fetching.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::RepoNotFound { .. }
                | Self::RevisionNotFound { .. }
                | Self::NotAModel { .. }
                | Self::NotADataset { .. }
        )
    }

    /// The hub failed, rather than said no: a cached copy can stand in.
    fn is_hub_failure(&self) -> bool {
        match self {
            Self::Network { .. } | Self::BadAnswer { .. } => true,
            Self::Http { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// No such repo, or a private one: `no_token_hint` says which token it needs, when none
    /// was given.
    fn repo_not_found(env: &HubEnv, id: &HubId, no_token_hint: &'static str) -> Self {
        Self::RepoNotFound {
            id: id.to_string(),
            endpoint: env.endpoint.clone(),
            hint: if env.token.is_some() {
                ""
            } else {
                no_token_hint
            },
        }
    }

    /// Another HTTP error answering for the repo or one of its files.
    fn http(env: &HubEnv, id: &HubId, file: Option<&str>, status: u16, message: String) -> Self {
        Self::Http {
            endpoint: env.endpoint.clone(),
            what: match file {
                Some(file) => format!("{file} of {id}"),
                None => id.to_string(),
            },
            status,
            message,
        }
    }

    /// The hub could not be reached.
    fn network(env: &HubEnv, id: &HubId, reason: String) -> Self {
        Self::Network {
            id: id.to_string(),
            endpoint: env.endpoint.clone(),
            cache: env.cache.clone(),
            reason,
        }
    }

    /// An I/O error writing `path`, told apart when the disk is full.
    fn io(path: &Path, source: std::io::Error) -> Self {
        // ENOSPC; `ErrorKind::StorageFull` is what std makes of it.
        if source.kind() == std::io::ErrorKind::StorageFull || source.raw_os_error() == Some(28) {
            Self::DiskFull {
                path: path.to_path_buf(),
                source,
            }
        } else {
            Self::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths() {
        let id = HubId::parse("Qwen/Qwen2.5-7B-Instruct@v1.0").unwrap();
        assert_eq!(id.repo, "Qwen/Qwen2.5-7B-Instruct");
        assert_eq!(id.revision.as_deref(), Some("v1.0"));
        assert_eq!(HubId::parse("org/name").unwrap().revision, None);
        for not_an_id in [
            "./model",
            "/models/qwen",
            "runs/a/checkpoint-10",
            "model",
            "org/",
            "org/name@",
            "../name",
            "org/na me",
            "~/x",
        ] {
            assert_eq!(HubId::parse(not_an_id), None, "{not_an_id}");
        }
    }

    #[test]
    fn a_full_disk_is_named() {
        let full = std::io::Error::from_raw_os_error(28);
        let e = HubError::io(Path::new("/cache/blobs/abc.incomplete"), full);
        assert!(matches!(e, HubError::DiskFull { .. }));
        assert!(e.to_string().contains("disk is full"), "{e}");
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(matches!(
            HubError::io(Path::new("/x"), denied),
            HubError::Io { .. }
        ));
    }

    #[test]
    fn shard_names_stay_inside_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join(INDEX);
        let id = "a/b";
        std::fs::write(
            &index,
            r#"{"weight_map": {"x": "model-1.safetensors", "y": "model-2.safetensors", "z": "model-1.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            shards(id, &index).unwrap(),
            ["model-1.safetensors", "model-2.safetensors"]
        );
        std::fs::write(&index, r#"{"weight_map": {"x": "../../etc/passwd"}}"#).unwrap();
        let e = shards(id, &index).unwrap_err();
        assert!(e.to_string().contains("outside the repo"), "{e}");
    }
}
