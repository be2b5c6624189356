//! The Hugging Face Hub: the repo listing (`/api/models/{repo}/revision/{rev}`) and each file's
//! download into huggingface_hub's cache (`blobs/<etag>` with the snapshot entry a relative
//! symlink to it, `refs/<revision>` holding the commit), resumed from `blobs/<etag>.incomplete`
//! as huggingface_hub resumes its own. `hf-hub` gives the cache's names; the requests are made
//! here, each with a timeout (hf-hub's wait for ever), as huggingface_hub makes them: a probe of
//! `resolve/<rev>/<file>` that follows only the hub's own (relative) redirects, for the ETag and
//! the commit, then the file from where it points (an LFS file's CDN).

use std::fs;
use std::path::{Path, PathBuf};

use hf_hub::api::RepoInfo;
use hf_hub::{Cache, Repo, RepoType};

use super::transfer::{agent, agent_builder, download, Bar, Expected};
use super::{
    cached_or, complete, fetch_data, fetch_model, holds_data, Fetch, HubEnv, HubError, HubId,
};

pub(super) fn snapshot(env: &HubEnv, id: &HubId) -> Result<PathBuf, HubError> {
    in_cache(env, id, RepoType::Model, complete, |fetch, listed, dir| {
        fetch_model(id, fetch, listed, dir)
    })
}

/// A dataset repo's data files, in `datasets--org--name` of the same cache. A repo without any
/// (a loading script's) is read from the Hub's own conversion to Parquet, as `datasets` reads it:
/// the revision `refs/convert/parquet`, laid out `{subset}/{split}/0000.parquet`.
pub(super) fn dataset_snapshot(env: &HubEnv, id: &HubId) -> Result<PathBuf, HubError> {
    let files = |id: &HubId| {
        in_cache(
            env,
            id,
            RepoType::Dataset,
            holds_data,
            |fetch, listed, _| fetch_data(id, fetch, listed),
        )
    };
    match files(id) {
        Err(e @ (HubError::NotADataset { .. } | HubError::Offline { .. }))
            if id.revision.is_none() =>
        {
            let converted = HubId {
                repo: id.repo.clone(),
                revision: Some(PARQUET_CONVERSION.into()),
            };
            // With no conversion either, what the repo itself said is the answer.
            files(&converted).map_err(|converted| match converted {
                HubError::RevisionNotFound { .. }
                | HubError::NotADataset { .. }
                | HubError::Offline { .. } => e,
                other => other,
            })
        }
        other => other,
    }
}

/// The revision where the Hub keeps a dataset converted to Parquet.
const PARQUET_CONVERSION: &str = "refs/convert/parquet";

/// The snapshot of `id` in the cache, with the files `pick` asks `fetch` for, given the
/// repo's file list and the snapshot directory. Offline, or when the hub fails, a cached snapshot
/// that `complete` accepts is used.
fn in_cache(
    env: &HubEnv,
    id: &HubId,
    kind: RepoType,
    complete: fn(&Path) -> bool,
    pick: impl FnOnce(Fetch, &[&str], &Path) -> Result<(), HubError>,
) -> Result<PathBuf, HubError> {
    let revision = id.revision.clone().unwrap_or_else(|| "main".into());
    let repo = Repo::with_revision(id.repo.clone(), kind, revision.clone());
    let root = env.cache.join(repo.folder_name());
    let cached = || cached_snapshot(&root, &revision).filter(|dir| complete(dir));
    if env.offline {
        return cached().ok_or_else(|| HubError::Offline {
            id: id.to_string(),
            cache: root.clone(),
        });
    }
    let info = match info(env, id, &repo) {
        Ok(info) => info,
        Err(e) => return cached_or(id, e, cached()),
    };
    let dir = root.join("snapshots").join(&info.sha);
    let listed: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let fetch = |file: &str| fetch(env, id, &repo, &info.sha, &root, file);
    pick(&fetch, &listed, &dir)?;
    if info.sha != revision {
        Cache::new(env.cache.clone())
            .repo(repo)
            .create_ref(&info.sha)
            .map_err(|e| HubError::io(&root.join("refs"), e))?;
    }
    Ok(dir)
}

/// A request that carries the token, when there is one.
fn authorized(env: &HubEnv, request: ureq::Request) -> ureq::Request {
    match &env.token {
        Some(token) => request.set("Authorization", &format!("Bearer {token}")),
        None => request,
    }
}

/// The repo's commit and file list (`/api/models/{repo}/revision/{rev}`).
fn info(env: &HubEnv, id: &HubId, repo: &Repo) -> Result<RepoInfo, HubError> {
    let url = format!("{}/api/{}", env.endpoint, repo.api_url());
    let response = authorized(env, agent(env.metadata_timeout).get(&url))
        .call()
        .map_err(|e| classify(env, id, None, e))?;
    response.into_json().map_err(|e| HubError::BadAnswer {
        endpoint: env.endpoint.clone(),
        what: format!("the file list of {id}"),
        reason: e.to_string(),
    })
}

/// The snapshot a revision points at in the cache: a commit names its own directory, a branch
/// or tag is looked up in `refs/`.
fn cached_snapshot(root: &Path, revision: &str) -> Option<PathBuf> {
    let is_commit = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
    let commit = if is_commit {
        revision.to_string()
    } else {
        fs::read_to_string(root.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    Some(root.join("snapshots").join(commit))
}

/// Downloads `file` of the revision `commit` into the cache under `root` unless its snapshot
/// entry is there: the blob, checked against its ETag (the SHA-256 of an LFS file, the git blob
/// SHA-1 of others), then the entry linking to it.
fn fetch(
    env: &HubEnv,
    id: &HubId,
    repo: &Repo,
    commit: &str,
    root: &Path,
    file: &str,
) -> Result<(), HubError> {
    let entry = root.join("snapshots").join(commit).join(file);
    if entry.exists() {
        return Ok(());
    }
    let refused = |e| classify(env, id, Some(file), e);
    let resolve = format!(
        "{}/{}/resolve/{}/{file}",
        env.endpoint,
        repo.url(),
        repo.url_revision()
    );
    let probe = probe(env, &resolve, &refused)?;
    let header = |name: &str| {
        let value = probe.header(name).map(|v| v.trim_matches('"').to_string());
        value.ok_or_else(|| HubError::BadAnswer {
            endpoint: env.endpoint.clone(),
            what: format!("{file} of {id}"),
            reason: format!("no {name} header"),
        })
    };
    let etag = header("X-Linked-Etag").or_else(|_| header("ETag"))?;
    if header("X-Repo-Commit")? != commit {
        return Err(HubError::Other {
            id: id.to_string(),
            message: format!(
                "the revision moved to another commit while {file} was downloading; run again"
            ),
        });
    }
    // An LFS file is served from where the hub redirects (a CDN); others by the hub itself.
    let source = match probe.status() {
        300..=399 => header("Location")?,
        _ => probe.get_url().to_string(),
    };
    if etag.contains(['/', '\\']) || etag.starts_with('.') {
        return Err(HubError::BadAnswer {
            endpoint: env.endpoint.clone(),
            what: format!("{file} of {id}"),
            reason: format!("the ETag {etag:?} is not a blob name"),
        });
    }
    let blob = root.join("blobs").join(&etag);
    if !blob.exists() {
        let files = agent(env.download_timeout);
        let same_host = source.starts_with(&env.endpoint);
        let request = || {
            let get = files.get(&source);
            if same_host {
                authorized(env, get)
            } else {
                get
            }
        };
        let size = probe.header("X-Linked-Size").and_then(|s| s.parse().ok());
        let expected = Expected {
            size,
            hash: Some(&etag),
        };
        let bar = Bar::new(env, id, file);
        download(&request, &refused, &blob, expected, bar, id, file)?;
    }
    link(&blob, &entry).map_err(|e| HubError::io(&entry, e))
}

/// The hub's answer to a one-byte request of `url`, following its own relative redirects (a
/// renamed repo) but not the absolute one to a CDN, whose answer lacks the hub's headers.
fn probe(
    env: &HubEnv,
    url: &str,
    refused: &dyn Fn(ureq::Error) -> HubError,
) -> Result<ureq::Response, HubError> {
    let hub = agent_builder(env.metadata_timeout).redirects(0).build();
    let mut url = url.to_string();
    for _ in 0..5 {
        let response = authorized(env, hub.get(&url))
            .set("Range", "bytes=0-0")
            .call()
            .map_err(refused)?;
        match response.header("Location") {
            Some(to) if (300..400).contains(&response.status()) && to.starts_with('/') => {
                url = format!("{}{to}", env.endpoint);
            }
            _ => return Ok(response),
        }
    }
    authorized(env, hub.get(&url))
        .set("Range", "bytes=0-0")
        .call()
        .map_err(refused)
}

/// The snapshot entry `entry`: a relative symlink to `blob`, as huggingface_hub makes it (a copy
/// where the file system has no symlinks).
fn link(blob: &Path, entry: &Path) -> std::io::Result<()> {
    let parent = entry.parent().expect("an entry is in its snapshot");
    fs::create_dir_all(parent)?;
    // From the entry's directory up to the repo's root, then down to the blob.
    let snapshot_depth = entry
        .strip_prefix(
            blob.parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("")),
        )
        .map_or(0, |rel| rel.components().count() - 1);
    let mut target = PathBuf::new();
    for _ in 0..snapshot_depth {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob.file_name().expect("a blob has a name"));
    #[cfg(unix)]
    let linked = std::os::unix::fs::symlink(&target, entry);
    #[cfg(not(unix))]
    let linked = fs::copy(blob, entry).map(|_| ());
    match linked {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// The hub's answer in words. It says which error it is in `X-Error-Code`, and answers 401 for
/// a repo that does not exist as for a private one.
fn classify(env: &HubEnv, id: &HubId, file: Option<&str>, e: ureq::Error) -> HubError {
    let token_hint = if env.token.is_some() {
        "check that the account of HF_TOKEN has been granted access"
    } else {
        "set HF_TOKEN to a token of an account with access"
    };
    match e {
        ureq::Error::Status(status, response) => {
            let code = response.header("X-Error-Code").map(str::to_string);
            let message = response
                .header("X-Error-Message")
                .map(str::to_string)
                .unwrap_or_else(|| response.into_string().unwrap_or_default());
            match (code.as_deref(), status, file) {
                (Some("GatedRepo"), ..) => HubError::Gated {
                    repo: id.repo.clone(),
                    endpoint: env.endpoint.clone(),
                    hint: token_hint,
                },
                (Some("RevisionNotFound"), ..) => HubError::RevisionNotFound {
                    repo: id.repo.clone(),
                    revision: id.revision.clone().unwrap_or_else(|| "main".into()),
                    endpoint: env.endpoint.clone(),
                },
                (Some("RepoNotFound"), ..) | (None, 401 | 404, None) => {
                    HubError::repo_not_found(env, id, " (a private repo needs HF_TOKEN)")
                }
                _ => HubError::http(env, id, file, status, message),
            }
        }
        ureq::Error::Transport(t) => HubError::network(env, id, t.to_string()),
    }
}
