//! The Hugging Face Hub, through `hf-hub`: the repo listing (`/api/models/{repo}/revision/{rev}`)
//! and each file's download into huggingface_hub's cache (`blobs/<etag>` with the snapshot entry a
//! symlink to it, `refs/<revision>` holding the commit), resumed from `blobs/<etag>.part`
//! (hf-hub's name; huggingface_hub's own `.incomplete` files are not picked up).
//! What hf-hub leaves out is done here: the hash check of what arrived, HF_HUB_OFFLINE, falling
//! back on the cache when the hub is unreachable, and errors that say what went wrong.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::api::RepoInfo;
use hf_hub::{Cache, Repo, RepoType};

use super::transfer::{agent, check, Bar};
use super::{cached_or, complete, first_files, weight_files, HubEnv, HubError, HubId};

pub(super) fn snapshot(env: &HubEnv, id: &HubId) -> Result<PathBuf, HubError> {
    let revision = id.revision.clone().unwrap_or_else(|| "main".into());
    let repo = Repo::with_revision(id.repo.clone(), RepoType::Model, revision.clone());
    let root = env.cache.join(repo.folder_name());
    let cached = || cached_snapshot(&root, &revision).filter(|dir| complete(dir));
    if env.offline {
        return cached().ok_or_else(|| HubError::Offline {
            id: id.to_string(),
            cache: root.clone(),
        });
    }
    let api = ApiBuilder::from_cache(Cache::new(env.cache.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_token(env.token.clone())
        .build()
        .map_err(|e| classify(env, id, None, e))?;
    let api_repo = api.repo(repo.clone());
    let info = match info(env, id, &api_repo) {
        Ok(info) => info,
        Err(e) => return cached_or(id, e, cached()),
    };
    let dir = root.join("snapshots").join(&info.sha);
    let listed: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    for file in first_files(id, &listed)? {
        fetch(env, id, &api_repo, &dir, file)?;
    }
    for file in weight_files(id, &dir, &listed)? {
        fetch(env, id, &api_repo, &dir, &file)?;
    }
    // hf-hub records the ref with each download; this covers a snapshot that was all cached.
    if info.sha != revision {
        Cache::new(env.cache.clone())
            .repo(repo)
            .create_ref(&info.sha)
            .map_err(|e| HubError::io(&root.join("refs"), e))?;
    }
    Ok(dir)
}

/// The repo's commit and file list (`/api/models/{repo}/revision/{rev}`), asked with
/// `metadata_timeout` (hf-hub's own request waits for ever for an answer).
fn info(env: &HubEnv, id: &HubId, repo: &ApiRepo) -> Result<RepoInfo, HubError> {
    let mut request = agent(env.metadata_timeout).get(repo.info_request().url());
    if let Some(token) = &env.token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    let response = request
        .call()
        .map_err(|e| classify(env, id, None, ApiError::RequestError(Box::new(e))))?;
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

fn fetch(env: &HubEnv, id: &HubId, repo: &ApiRepo, dir: &Path, file: &str) -> Result<(), HubError> {
    let entry = dir.join(file);
    if entry.exists() {
        return Ok(());
    }
    let path = repo
        .download_with_progress(file, Bar::new(env, id, file))
        .map_err(|e| classify(env, id, Some(file), e))?;
    if path != entry {
        return Err(HubError::Other {
            id: id.to_string(),
            message: format!(
                "the revision moved to another commit while {file} was downloading; run again"
            ),
        });
    }
    // hf-hub names the blob after the file's ETag: the SHA-256 of an LFS file, the git SHA-1
    // of others.
    let blob = fs::canonicalize(&entry).map_err(|e| HubError::io(&entry, e))?;
    let etag = blob
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    check(&blob, etag).map_err(|reason| {
        let _ = fs::remove_file(&entry);
        let _ = fs::remove_file(&blob);
        HubError::Checksum {
            id: id.to_string(),
            file: file.to_string(),
            reason,
        }
    })
}

/// The hub's answer in words. It says which error it is in `X-Error-Code`, and answers 401 for
/// a repo that does not exist as for a private one.
fn classify(env: &HubEnv, id: &HubId, file: Option<&str>, e: ApiError) -> HubError {
    let token_hint = if env.token.is_some() {
        "check that the account of HF_TOKEN has been granted access"
    } else {
        "set HF_TOKEN to a token of an account with access"
    };
    match e {
        ApiError::RequestError(e) => match *e {
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
        },
        ApiError::IoError(e)
            if matches!(
                e.kind(),
                ErrorKind::StorageFull
                    | ErrorKind::PermissionDenied
                    | ErrorKind::ReadOnlyFilesystem
            ) || e.raw_os_error() == Some(28) =>
        {
            HubError::io(&env.cache, e)
        }
        // hf-hub copies the body to the file in one call: other I/O errors there are most
        // likely the connection breaking off.
        ApiError::IoError(e) => match file {
            Some(file) => HubError::Interrupted {
                id: id.to_string(),
                file: file.to_string(),
                reason: e.to_string(),
            },
            None => HubError::io(&env.cache, e),
        },
        ApiError::TooManyRetries(e) => classify(env, id, file, *e),
        e => HubError::Other {
            id: id.to_string(),
            message: e.to_string(),
        },
    }
}
