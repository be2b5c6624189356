//! ModelScope, which hf-hub does not speak: a repo's file list (paths, sizes, SHA-256s), from
//! `GET /api/v1/models/{repo}/repo/files`, or for a dataset page by page from
//! `GET /api/v1/datasets/{repo}/repo/tree`, and each file from
//! `GET /api/v1/{models|datasets}/{repo}/repo?FilePath=...`, into modelscope's cache:
//! `{models|datasets}/{owner}--{name}/snapshots/{revision}/`, or the directory an older
//! modelscope (1.37 and before) left at `[hub/]{models|datasets}/{owner}/{name with . as ___}`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::transfer::{agent, download, Bar, Expected};
use super::{
    cached_or, complete, fetch_data, fetch_model, holds_data, Fetch, HubEnv, HubError, HubId,
};

pub(super) fn snapshot(env: &HubEnv, id: &HubId) -> Result<PathBuf, HubError> {
    in_cache(env, id, Kind::Model, complete, |fetch, listed, dir| {
        fetch_model(id, fetch, listed, dir)
    })
}

/// A dataset repo's data files, in `datasets/` of the same cache.
pub(super) fn dataset_snapshot(env: &HubEnv, id: &HubId) -> Result<PathBuf, HubError> {
    in_cache(env, id, Kind::Dataset, holds_data, |fetch, listed, _| {
        fetch_data(id, fetch, listed)
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Model,
    Dataset,
}

impl Kind {
    /// The segment of the API's paths and of the cache's.
    fn segment(self) -> &'static str {
        match self {
            Kind::Model => "models",
            Kind::Dataset => "datasets",
        }
    }
}

/// A dataset's file list comes this many files a page (modelscope's own page size).
const PAGE_SIZE: usize = 200;

/// The snapshot of `id` in the cache, with the files `pick` asks `fetch` for, given the
/// repo's file list and the snapshot directory. Offline, or when the hub fails, a cached snapshot
/// that `complete` accepts is used.
fn in_cache(
    env: &HubEnv,
    id: &HubId,
    kind: Kind,
    complete: fn(&Path) -> bool,
    pick: impl FnOnce(Fetch, &[&str], &Path) -> Result<(), HubError>,
) -> Result<PathBuf, HubError> {
    let revision = id.revision.as_deref().unwrap_or("master");
    let dir = cache_dir(env, id, kind, revision);
    if env.offline {
        return if complete(&dir) {
            Ok(dir)
        } else {
            Err(HubError::Offline {
                id: id.to_string(),
                cache: dir,
            })
        };
    }
    let (listing_agent, download_agent) =
        (agent(env.metadata_timeout), agent(env.download_timeout));
    let get = |agent: &ureq::Agent, url: String| {
        let request = agent.get(&url);
        match &env.token {
            Some(token) => request
                .set("Authorization", &format!("Bearer {token}"))
                .set("Cookie", &format!("m_session_id={token}")),
            None => request,
        }
    };
    let base = format!("{}/api/v1/{}/{}", env.endpoint, kind.segment(), id.repo);
    let list_page = |page: usize, revision: &str| {
        let request = match kind {
            Kind::Model => get(&listing_agent, format!("{base}/repo/files")),
            Kind::Dataset => get(&listing_agent, format!("{base}/repo/tree"))
                .query("PageNumber", &page.to_string())
                .query("PageSize", &PAGE_SIZE.to_string()),
        };
        request
            .query("Revision", revision)
            .query("Recursive", "True")
            .call()
            .map_err(|e| classify(env, id, None, e))
            .and_then(|response| read_listing(env, id, response))
    };
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    for page in 1.. {
        match list_page(page, revision) {
            Ok(listed) => {
                let before = files.len();
                let last = kind == Kind::Model || listed.len() < PAGE_SIZE;
                for entry in listed {
                    if seen.insert(entry.path.clone()) {
                        files.push(entry);
                    }
                }
                // A server that ignores the paging sends the same page again: nothing new.
                if last || files.len() == before {
                    break;
                }
            }
            Err(e) => {
                let e = match (&e, &id.revision) {
                    (HubError::Http { status: 404, .. }, Some(missing)) => {
                        missing_revision_or_repo(env, id, missing, list_page(1, "master"), e)
                    }
                    _ => e,
                };
                return cached_or(id, e, Some(dir.clone()).filter(|d| complete(d)));
            }
        }
    }
    let listed: Vec<&str> = files
        .iter()
        .filter(|f| f.kind.as_deref() != Some("tree"))
        .map(|f| f.path.as_str())
        .collect();
    let fetch = |file: &str| {
        let entry = files.iter().find(|f| f.path == file);
        let size = entry.and_then(|f| f.size);
        let dest = dir.join(file);
        // Hashing every cached shard on each start would cost minutes for a large model; a file
        // is only renamed into place once checked, so its size is enough here.
        if let Ok(meta) = dest.metadata() {
            if size.is_none_or(|size| size == meta.len()) {
                return Ok(());
            }
        }
        let request = || {
            get(&download_agent, format!("{base}/repo"))
                .query("Revision", revision)
                .query("FilePath", file)
        };
        let expected = Expected {
            size,
            hash: entry.and_then(|f| f.sha256.as_deref()),
        };
        download(
            &request,
            &|e| classify(env, id, Some(file), e),
            &dest,
            expected,
            Bar::new(env, id, file),
            id,
            file,
        )
    };
    pick(&fetch, &listed, &dir)?;
    Ok(dir)
}

/// What a 404 (`error`) for the listing of `id` at the revision `missing` means: ModelScope
/// answers so for a missing revision as for a missing repo, and `default_branch` (the listing of
/// "master") tells the two apart.
fn missing_revision_or_repo<T>(
    env: &HubEnv,
    id: &HubId,
    missing: &str,
    default_branch: Result<T, HubError>,
    error: HubError,
) -> HubError {
    match default_branch {
        Ok(_) => HubError::RevisionNotFound {
            repo: id.repo.clone(),
            revision: missing.to_string(),
            endpoint: env.endpoint.clone(),
        },
        Err(HubError::Http { status: 404, .. }) => {
            HubError::repo_not_found(env, id, " (a private repo needs MODELSCOPE_API_TOKEN)")
        }
        Err(_) => error,
    }
}

/// Where the snapshot of `id` at `revision` is: an older modelscope's directory when it holds
/// anything, else the current layout.
fn cache_dir(env: &HubEnv, id: &HubId, kind: Kind, revision: &str) -> PathBuf {
    let (owner, name) = id.repo.split_once('/').unwrap_or(("", &id.repo));
    let safe_name = name.replace('.', "___");
    let segment = kind.segment();
    let legacy = [
        env.cache.join(segment).join(owner).join(&safe_name),
        env.cache
            .join("hub")
            .join(segment)
            .join(owner)
            .join(&safe_name),
    ]
    .into_iter()
    .find(|dir| {
        dir.read_dir()
            .is_ok_and(|mut entries| entries.next().is_some())
    });
    legacy.unwrap_or_else(|| {
        env.cache
            .join(segment)
            .join(format!("{owner}--{name}"))
            .join("snapshots")
            .join(revision)
    })
}

#[derive(Deserialize)]
struct Listing {
    #[serde(rename = "Data")]
    data: Option<ListingData>,
    #[serde(rename = "Message", default)]
    message: String,
}

#[derive(Deserialize)]
struct ListingData {
    #[serde(rename = "Files", default)]
    files: Vec<FileEntry>,
}

#[derive(Deserialize)]
struct FileEntry {
    #[serde(rename = "Path")]
    path: String,
    /// "blob" or "tree".
    #[serde(rename = "Type")]
    kind: Option<String>,
    #[serde(rename = "Size")]
    size: Option<u64>,
    #[serde(rename = "Sha256")]
    sha256: Option<String>,
}

fn read_listing(
    env: &HubEnv,
    id: &HubId,
    response: ureq::Response,
) -> Result<Vec<FileEntry>, HubError> {
    let status = response.status();
    let listing: Listing = response.into_json().map_err(|e| HubError::BadAnswer {
        endpoint: env.endpoint.clone(),
        what: format!("the file list of {id}"),
        reason: e.to_string(),
    })?;
    match listing.data {
        Some(data) => Ok(data.files),
        None => Err(HubError::Http {
            endpoint: env.endpoint.clone(),
            what: format!("the file list of {id}"),
            status,
            message: listing.message,
        }),
    }
}

fn classify(env: &HubEnv, id: &HubId, file: Option<&str>, e: ureq::Error) -> HubError {
    match e {
        // With a revision, a 404 may mean the revision is missing: the server's message says.
        ureq::Error::Status(404, _) if file.is_none() && id.revision.is_none() => {
            HubError::repo_not_found(env, id, " (a private repo needs MODELSCOPE_API_TOKEN)")
        }
        ureq::Error::Status(status, response) => {
            let body = response.into_string().unwrap_or_default();
            // The API wraps its reason in {"Message": ...}.
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("Message")?.as_str().map(str::to_string))
                .unwrap_or(body);
            HubError::http(env, id, file, status, message)
        }
        ureq::Error::Transport(t) => HubError::network(env, id, t.to_string()),
    }
}
