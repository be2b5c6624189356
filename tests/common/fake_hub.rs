//! A hub on 127.0.0.1 that serves fixture files under the URL layouts of the Hugging Face Hub and
//! of ModelScope: repo listings, files by branch, tag or commit (and both hubs' dataset repos, kept
//! as "datasets/org/name", listed by ModelScope page by page), LFS files through a redirect to
//! a CDN path, a renamed repo's relative redirect, range requests, gated repos, and the errors
//! each hub gives. Faults on demand: a transfer cut in the middle, a damaged file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::json;
use sha1::Digest;

/// The token that opens gated repos.
pub const GOOD_TOKEN: &str = "hf_good_token";

pub struct Revision {
    pub name: String,
    pub commit: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

#[derive(Default)]
pub struct Repo {
    pub revisions: Vec<Revision>,
    pub gated: bool,
}

impl Repo {
    /// One revision `name` holding the files of `dir` plus `extra`.
    pub fn from_dir(dir: &Path, extra: &[(&str, &[u8])]) -> Self {
        let mut repo = Self::default();
        repo.add_revision("main", dir, extra);
        repo
    }

    /// One revision "main" holding `files` only.
    pub fn from_files(files: &[(&str, &[u8])]) -> Self {
        let mut repo = Self::default();
        repo.add("main", "files", files);
        repo
    }

    /// One more revision `name` holding `files` only.
    pub fn with_files(mut self, name: &str, files: &[(&str, &[u8])]) -> Self {
        self.add(name, "files", files);
        self
    }

    pub fn add_revision(&mut self, name: &str, dir: &Path, extra: &[(&str, &[u8])]) {
        self.add(name, &dir.display().to_string(), extra);
        let files = &mut self.revisions.last_mut().unwrap().files;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                let name = path.file_name().unwrap().to_str().unwrap().to_string();
                files.insert(name, std::fs::read(&path).unwrap());
            }
        }
    }

    fn add(&mut self, name: &str, source: &str, files: &[(&str, &[u8])]) {
        self.revisions.push(Revision {
            name: name.into(),
            commit: hex(&sha1::Sha1::digest(format!("{source}@{name}"))),
            files: files
                .iter()
                .map(|(f, bytes)| (f.to_string(), bytes.to_vec()))
                .collect(),
        });
    }

    fn revision(&self, rev: &str) -> Option<&Revision> {
        self.revisions
            .iter()
            .find(|r| r.name == rev || r.commit == rev)
    }

    /// ModelScope calls the default branch "master" where the Hugging Face Hub says "main": the
    /// first revision is both.
    fn ms_revision(&self, rev: &str) -> Option<&Revision> {
        match rev {
            "master" => self.revisions.first(),
            _ => self.revision(rev),
        }
    }
}

/// A request as the hub saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub auth: Option<String>,
}

#[derive(Default)]
pub struct State {
    pub repos: HashMap<String, Repo>,
    /// old id -> new id: answered with a relative redirect, as the hub does for renamed repos.
    pub renamed: HashMap<String, String>,
    pub seen: Vec<Seen>,
    /// File names whose next transfer stops halfway through (the headers promise all of it).
    pub cut: HashSet<String>,
    /// File names served with one byte changed.
    pub damaged: HashSet<String>,
    /// ModelScope's dataset listing sends every file on every page (a server that ignores the
    /// paging).
    pub unpaged: bool,
    /// File names whose next transfer sends half its bytes, then nothing more for a minute
    /// with the connection open (a hub or proxy that hangs).
    pub stalled: HashSet<String>,
}

pub struct FakeHub {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

impl FakeHub {
    pub fn start(repos: Vec<(&str, Repo)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            repos: repos
                .into_iter()
                .map(|(id, r)| (id.to_string(), r))
                .collect(),
            ..State::default()
        }));
        let shared = state.clone();
        let base = url.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                let base = base.clone();
                std::thread::spawn(move || serve(stream, &state, &base));
            }
        });
        Self { url, state }
    }

    /// Paths of the file transfers seen so far (listings and range probes left out).
    pub fn downloads(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| {
                let listing = ["/api/models/", "/api/datasets/"]
                    .iter()
                    .any(|p| s.path.starts_with(p));
                !listing && !s.path.ends_with("/repo/files") && !s.path.ends_with("/repo/tree")
            })
            .filter(|s| s.range.as_deref() != Some("bytes=0-0"))
            .map(|s| s.path.clone())
            .collect()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Points a `swift-rs` process at this hub (as both hubs), with its caches under `home`
    /// (`home/hf`, `home/modelscope`) and no hub setting of the machine running the tests.
    pub fn point_at<'c>(&self, command: &'c mut Command, home: &Path) -> &'c mut Command {
        for var in [
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_HUB_CACHE",
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "USE_HF",
            "MODELSCOPE_API_TOKEN",
            "MODELSCOPE_DOMAIN",
            "XDG_CACHE_HOME",
        ] {
            command.env_remove(var);
        }
        command
            .env("HOME", home)
            .env("HF_ENDPOINT", &self.url)
            .env("HF_HOME", home.join("hf"))
            .env("MODELSCOPE_ENDPOINT", &self.url)
            .env("MODELSCOPE_CACHE", home.join("modelscope"))
    }
}

/// A port nothing listens on: the hub "down".
pub fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

pub fn git_sha1(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()));
    h.update(bytes);
    hex(&h.finalize())
}

fn is_lfs(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".bin")
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only the first half of the body.
    cut: bool,
    /// After the first half, wait with the connection open.
    stall: bool,
}

impl Response {
    fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut: false,
            stall: false,
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn json(self, value: serde_json::Value) -> Self {
        let mut r = self.header("Content-Type", "application/json");
        r.body = value.to_string().into_bytes();
        r
    }

    fn hf_error(status: u16, code: &str, message: &str) -> Self {
        Self::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", message)
            .json(json!({ "error": message }))
    }

    fn redirect(status: u16, location: String) -> Self {
        Self::new(status).header("Location", location)
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hexpair = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hexpair, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn serve(stream: TcpStream, state: &Mutex<State>, base: &str) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query: HashMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), decode(v)))
        .collect();
    let seen = Seen {
        path: path.to_string(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
    };
    let response = {
        let mut state = state.lock().unwrap();
        state.seen.push(seen.clone());
        route(&mut state, &seen, &query, base)
    };
    write(stream, response);
}

fn write(mut stream: TcpStream, r: Response) {
    let mut head = format!("HTTP/1.1 {} X\r\n", r.status);
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        r.body.len()
    ));
    let body = if r.cut || r.stall {
        &r.body[..r.body.len() / 2]
    } else {
        &r.body[..]
    };
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
    let _ = stream.flush();
    if r.stall {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

fn route(state: &mut State, seen: &Seen, query: &HashMap<String, String>, base: &str) -> Response {
    let parts: Vec<String> = seen.path.split('/').skip(1).map(decode).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    match parts.as_slice() {
        ["api", "models", org, name, "revision", rev] => hf_info(state, org, name, rev),
        // Dataset repos are kept under "datasets/org/name".
        ["api", "datasets", org, name, "revision", rev] => {
            hf_info(state, &format!("datasets/{org}"), name, rev)
        }
        ["datasets", org, name, "resolve", rev, file @ ..] => hf_file(
            state,
            &format!("datasets/{org}"),
            name,
            rev,
            &file.join("/"),
            seen,
            base,
        ),
        ["api", "v1", "models", org, name, "repo", "files"] => {
            ms_listing(state, &format!("{org}/{name}"), query)
        }
        ["api", "v1", "models", org, name, "repo"] => {
            ms_file(state, &format!("{org}/{name}"), query, seen, base)
        }
        ["api", "v1", "datasets", org, name, "repo", "tree"] => {
            ms_listing(state, &format!("datasets/{org}/{name}"), query)
        }
        ["api", "v1", "datasets", org, name, "repo"] => {
            ms_file(state, &format!("datasets/{org}/{name}"), query, seen, base)
        }
        ["cdn", sha] => cdn(state, sha, seen),
        [org, name, "resolve", rev, file @ ..] => {
            hf_file(state, org, name, rev, &file.join("/"), seen, base)
        }
        _ => Response::new(404).json(json!({"error": "no such route"})),
    }
}

fn hf_info(state: &State, org: &str, name: &str, rev: &str) -> Response {
    let id = format!("{org}/{name}");
    if let Some(new) = state.renamed.get(&id) {
        return Response::redirect(307, format!("/api/models/{new}/revision/{rev}"));
    }
    let Some(repo) = state.repos.get(&id) else {
        return Response::hf_error(401, "RepoNotFound", "Repository Not Found");
    };
    let Some(r) = repo.revision(rev) else {
        return Response::hf_error(404, "RevisionNotFound", "Invalid rev id");
    };
    let siblings: Vec<_> = r.files.keys().map(|f| json!({ "rfilename": f })).collect();
    Response::new(200).json(json!({ "id": id, "sha": r.commit, "siblings": siblings }))
}

fn hf_file(
    state: &mut State,
    org: &str,
    name: &str,
    rev: &str,
    file: &str,
    seen: &Seen,
    base: &str,
) -> Response {
    let id = format!("{org}/{name}");
    if let Some(new) = state.renamed.get(&id) {
        return Response::redirect(307, format!("/{new}/resolve/{rev}/{file}"));
    }
    let Some(repo) = state.repos.get(&id) else {
        return Response::hf_error(401, "RepoNotFound", "Repository Not Found");
    };
    if repo.gated && seen.auth.as_deref() != Some(&format!("Bearer {GOOD_TOKEN}")) {
        let status = if seen.auth.is_some() { 403 } else { 401 };
        return Response::hf_error(status, "GatedRepo", "Access to this model is restricted");
    }
    let Some(r) = repo.revision(rev) else {
        return Response::hf_error(404, "RevisionNotFound", "Invalid rev id");
    };
    let Some(bytes) = r.files.get(file) else {
        return Response::hf_error(404, "EntryNotFound", "Entry not found");
    };
    let commit = r.commit.clone();
    if is_lfs(file) {
        let sha = sha256(bytes);
        return Response::redirect(302, format!("{base}/cdn/{sha}"))
            .header("X-Repo-Commit", commit)
            .header("X-Linked-Etag", format!("\"{sha}\""))
            .header("X-Linked-Size", bytes.len().to_string())
            .header("ETag", "\"lfs-pointer\"");
    }
    let etag = git_sha1(bytes);
    let bytes = bytes.clone();
    content(state, file, bytes, seen)
        .header("ETag", format!("\"{etag}\""))
        .header("X-Repo-Commit", commit)
}

fn cdn(state: &mut State, sha: &str, seen: &Seen) -> Response {
    let found = state
        .repos
        .values()
        .flat_map(|r| &r.revisions)
        .flat_map(|r| &r.files)
        .find(|(_, bytes)| sha256(bytes) == sha)
        .map(|(name, bytes)| (name.clone(), bytes.clone()));
    match found {
        Some((name, bytes)) => content(state, &name, bytes, seen),
        None => Response::new(404),
    }
}

/// A file's bytes as asked for by the Range header, with the faults set for it.
fn content(state: &mut State, name: &str, mut bytes: Vec<u8>, seen: &Seen) -> Response {
    if state.damaged.contains(name) {
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
    }
    let len = bytes.len();
    let range = seen.range.as_deref().and_then(|r| {
        let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
        let a: usize = a.parse().ok()?;
        let b: usize = if b.is_empty() {
            len - 1
        } else {
            b.parse().ok()?
        };
        Some((a, b.min(len - 1)))
    });
    let probe = seen.range.as_deref() == Some("bytes=0-0");
    let mut r = match range {
        Some((a, _)) if a >= len => {
            return Response::new(416).header("Content-Range", format!("bytes */{len}"))
        }
        Some((a, b)) => {
            let mut r = Response::new(206).header("Content-Range", format!("bytes {a}-{b}/{len}"));
            r.body = bytes[a..=b].to_vec();
            r
        }
        None => {
            let mut r = Response::new(200);
            r.body = bytes;
            r
        }
    };
    if !probe && state.cut.remove(name) {
        r.cut = true;
    }
    if !probe && state.stalled.remove(name) {
        r.stall = true;
    }
    r.header("Accept-Ranges", "bytes")
}

fn ms_listing(state: &State, id: &str, query: &HashMap<String, String>) -> Response {
    let rev = query.get("Revision").map_or("master", String::as_str);
    let Some(repo) = state.repos.get(id) else {
        return Response::new(404)
            .json(json!({"Code": 10010205001u64, "Message": "model not found", "Success": false}));
    };
    let Some(r) = repo.ms_revision(rev) else {
        return Response::new(404).json(
            json!({"Code": 10010205001u64, "Message": format!("revision {rev} not found"), "Success": false}),
        );
    };
    let mut files: Vec<_> = r
        .files
        .iter()
        .map(|(name, bytes)| {
            json!({
                "Name": name, "Path": name, "Type": "blob", "Size": bytes.len(),
                "Sha256": sha256(bytes), "Revision": r.commit,
            })
        })
        .collect();
    files.push(json!({"Name": "onnx", "Path": "onnx", "Type": "tree", "Size": 0}));
    // A dataset's tree comes a page at a time.
    let paged = (query.get("PageNumber"), query.get("PageSize"));
    if let (Some(page), Some(size), false) = (paged.0, paged.1, state.unpaged) {
        let (page, size): (usize, usize) = (page.parse().unwrap(), size.parse().unwrap());
        files = files
            .into_iter()
            .skip((page - 1) * size)
            .take(size)
            .collect();
    }
    Response::new(200).json(json!({"Code": 200, "Data": {"Files": files}, "Success": true}))
}

fn ms_file(
    state: &mut State,
    id: &str,
    query: &HashMap<String, String>,
    seen: &Seen,
    base: &str,
) -> Response {
    let rev = query.get("Revision").map_or("master", String::as_str);
    let file = query.get("FilePath").cloned().unwrap_or_default();
    let found = state
        .repos
        .get(id)
        .and_then(|repo| repo.ms_revision(rev))
        .and_then(|r| r.files.get(&file))
        .cloned();
    match found {
        Some(bytes) if is_lfs(&file) => {
            Response::redirect(302, format!("{base}/cdn/{}", sha256(&bytes)))
        }
        Some(bytes) => content(state, &file, bytes, seen),
        None => Response::new(404)
            .json(json!({"Code": 404, "Message": "file not found", "Success": false})),
    }
}
