//! ModelScope, which hf-hub does not speak: the listing `GET /api/v1/models/{repo}/repo/files`
//! (paths, sizes, SHA-256s) and each file from `GET /api/v1/models/{repo}/repo?FilePath=...`,
//! into modelscope's cache: `models/{owner}--{name}/snapshots/{revision}/`, or the directory an
//! older modelscope (1.37 and before) left at `[hub/]models/{owner}/{name with . as ___}`.

use std::path::PathBuf;

use serde::Deserialize;

use super::transfer::{agent, download, Bar, Expected};
use super::{cached_or, complete, first_files, weight_files, HubEnv, HubError, HubId};

pub(super) fn snapshot(env: &HubEnv, id: &HubId) -> Result<PathBuf, HubError> {
    let revision = id.revision.as_deref().unwrap_or("master");
    let (owner, name) = id.repo.split_once('/').unwrap_or(("", &id.repo));
    let safe_name = name.replace('.', "___");
    let legacy = [
        env.cache.join("models").join(owner).join(&safe_name),
        env.cache
            .join("hub")
            .join("models")
            .join(owner)
            .join(&safe_name),
    ]
    .into_iter()
    .find(|dir| {
        dir.read_dir()
            .is_ok_and(|mut entries| entries.next().is_some())
    });
    let dir = legacy.unwrap_or_else(|| {
        env.cache
            .join("models")
            .join(format!("{owner}--{name}"))
            .join("snapshots")
            .join(revision)
    });
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
    let base = format!("{}/api/v1/models/{}", env.endpoint, id.repo);
    let listing = get(&listing_agent, format!("{base}/repo/files"))
        .query("Revision", revision)
        .query("Recursive", "True")
        .call()
        .map_err(|e| classify(env, id, None, e))
        .and_then(|response| read_listing(env, id, response));
    let files = match listing {
        Ok(files) => files,
        Err(e) => return cached_or(id, e, Some(dir.clone()).filter(|d| complete(d))),
    };
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
    for file in first_files(id, &listed)? {
        fetch(file)?;
    }
    for file in weight_files(id, &dir, &listed)? {
        fetch(&file)?;
    }
    Ok(dir)
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
