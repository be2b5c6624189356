//! Models by hub id, against a hub on 127.0.0.1 that serves fixture files under each hub's URL
//! layout (tests/common/fake_hub.rs): the files land in the cache layout of the hub's Python
//! client, only those loading needs are fetched, a cut transfer resumes, a damaged one is
//! deleted, a cache filled by the Python client is reused, offline mode and an unreachable hub
//! use the cache, and each error says what went wrong.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::fake_hub::{closed_port_url, git_sha1, sha256, FakeHub, Repo, GOOD_TOKEN};
use common::{model_dir, B};
use swift_rs::config::Hub;
use swift_rs::hub::{snapshot, HubEnv, HubError, HubId};
use swift_rs::model::{self, LoadOptions};

const SHARDED: &str = "llama_v4_sharded";
/// Files a hub repo holds beside the model that loading does not need.
const UNWANTED: [&str; 4] = [
    "README.md",
    "pytorch_model.bin",
    "consolidated.safetensors",
    ".gitattributes",
];

fn sharded_repo() -> Repo {
    let extra: Vec<(&str, &[u8])> = UNWANTED.iter().map(|f| (*f, &b"not needed"[..])).collect();
    Repo::from_dir(&model_dir(SHARDED), &extra)
}

fn env(hub: Hub, endpoint: &str, cache: &Path) -> HubEnv {
    HubEnv {
        hub,
        endpoint: endpoint.to_string(),
        cache: cache.to_path_buf(),
        token: None,
        offline: false,
        progress: false,
        metadata_timeout: Duration::from_secs(10),
        download_timeout: Duration::from_secs(10),
    }
}

fn id(spec: &str) -> HubId {
    HubId::parse(spec).unwrap()
}

fn commit(hub: &FakeHub, repo: &str, revision: usize) -> String {
    hub.state.lock().unwrap().repos[repo].revisions[revision]
        .commit
        .clone()
}

/// Every file of the fixture model `name` is in `dir` with the same bytes; nothing else is.
fn assert_holds_model(dir: &Path, name: &str) {
    let src = model_dir(name);
    let mut expected = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let file = path.file_name().unwrap().to_str().unwrap().to_string();
            assert_eq!(
                std::fs::read(dir.join(&file)).unwrap(),
                std::fs::read(&path).unwrap(),
                "{file}"
            );
            expected.push(file);
        }
    }
    let mut got: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
        .collect();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "files of {}", dir.display());
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn hugging_face_files_land_in_huggingface_hubs_cache_layout() {
    let hub = FakeHub::start(vec![("org/tiny", sharded_repo())]);
    let cache = tempfile::tempdir().unwrap();
    let env = env(Hub::HuggingFace, &hub.url, cache.path());
    let dir = snapshot(&env, &id("org/tiny")).unwrap();

    let root = cache.path().join("models--org--tiny");
    let sha = commit(&hub, "org/tiny", 0);
    assert_eq!(dir, root.join("snapshots").join(&sha));
    assert_holds_model(&dir, SHARDED);
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        sha
    );
    for entry in std::fs::read_dir(&dir).unwrap() {
        let link = std::fs::read_link(entry.unwrap().path()).unwrap();
        assert!(link.starts_with("../../blobs"), "{}", link.display());
    }
    // Large files are stored under their SHA-256, as huggingface_hub does.
    let shard = std::fs::read(dir.join("model-00001-of-00003.safetensors")).unwrap();
    assert!(root.join("blobs").join(sha256(&shard)).is_file());
    let downloads = hub.downloads();
    for unwanted in UNWANTED {
        assert!(
            !downloads.iter().any(|d| d.ends_with(unwanted)),
            "{unwanted} was downloaded: {downloads:?}"
        );
    }
    let device = Default::default();
    model::load::<B>(&dir, LoadOptions::default(), None, &device).unwrap();

    // Everything is cached now: the second time only the listing is asked for.
    let before = downloads.len();
    assert_eq!(snapshot(&env, &id("org/tiny")).unwrap(), dir);
    assert_eq!(hub.downloads().len(), before);
}

#[test]
fn a_cache_filled_by_huggingface_hub_is_reused_and_offline_mode_reads_it() {
    let hub = FakeHub::start(vec![("org/tiny", sharded_repo())]);
    let cache = tempfile::tempdir().unwrap();
    // The layout `huggingface_hub.snapshot_download` leaves: blobs named by ETag (SHA-256 for
    // LFS files, the git blob SHA-1 for others), relative symlinks, the branch's ref.
    let sha = commit(&hub, "org/tiny", 0);
    let root = cache.path().join("models--org--tiny");
    let snapshot_dir = root.join("snapshots").join(&sha);
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot_dir).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), &sha).unwrap();
    for entry in std::fs::read_dir(model_dir(SHARDED)).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap();
        let etag = if name.to_str().unwrap().ends_with(".safetensors") {
            sha256(&bytes)
        } else {
            git_sha1(&bytes)
        };
        std::fs::write(root.join("blobs").join(&etag), &bytes).unwrap();
        std::os::unix::fs::symlink(
            Path::new("../../blobs").join(&etag),
            snapshot_dir.join(name),
        )
        .unwrap();
    }

    let online = env(Hub::HuggingFace, &hub.url, cache.path());
    assert_eq!(snapshot(&online, &id("org/tiny")).unwrap(), snapshot_dir);
    assert!(hub.downloads().is_empty(), "{:?}", hub.downloads());

    let offline = HubEnv {
        offline: true,
        ..env(Hub::HuggingFace, &closed_port_url(), cache.path())
    };
    assert_eq!(snapshot(&offline, &id("org/tiny")).unwrap(), snapshot_dir);
    // A commit names its snapshot without a ref.
    let by_commit = id(&format!("org/tiny@{sha}"));
    assert_eq!(snapshot(&offline, &by_commit).unwrap(), snapshot_dir);
    let e = snapshot(&offline, &id("org/other")).unwrap_err();
    assert!(matches!(e, HubError::Offline { .. }), "{e}");
    assert!(e.to_string().contains("HF_HUB_OFFLINE"), "{e}");
    // An incomplete snapshot is not used offline: a shard is missing.
    std::fs::remove_file(snapshot_dir.join("model-00003-of-00003.safetensors")).unwrap();
    let e = snapshot(&offline, &id("org/tiny")).unwrap_err();
    assert!(matches!(e, HubError::Offline { .. }), "{e}");
}

#[test]
fn an_unreachable_hub_falls_back_on_a_complete_cache_or_says_it_cannot_reach_it() {
    let hub = FakeHub::start(vec![("org/tiny", sharded_repo())]);
    let cache = tempfile::tempdir().unwrap();
    let down = closed_port_url();
    for kind in [Hub::HuggingFace, Hub::ModelScope] {
        let e = snapshot(&env(kind, &down, cache.path()), &id("org/tiny")).unwrap_err();
        assert!(matches!(e, HubError::Network { .. }), "{e}");
        assert!(
            e.to_string().contains(&format!("cannot reach {down}")),
            "{e}"
        );

        let dir = snapshot(&env(kind, &hub.url, cache.path()), &id("org/tiny")).unwrap();
        let fallback = snapshot(&env(kind, &down, cache.path()), &id("org/tiny")).unwrap();
        assert_eq!(fallback, dir);
    }
}

/// A hub that accepts connections and then, per `answer`, says nothing or answers this raw HTTP.
fn misbehaving_hub(answer: Option<&'static str>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            if let Some(answer) = answer {
                let mut stream = stream;
                let mut request = [0u8; 4096];
                let _ = std::io::Read::read(&mut stream, &mut request);
                let _ = std::io::Write::write_all(&mut stream, answer.as_bytes());
            } else {
                held.push(stream);
            }
        }
    });
    url
}

#[test]
fn a_silent_failing_or_foreign_hub_times_out_and_falls_back_on_a_complete_cache() {
    let hub = FakeHub::start(vec![("org/tiny", sharded_repo())]);
    let silent = misbehaving_hub(None);
    let failing = misbehaving_hub(Some(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy",
    ));
    let html = "<html><body>Sign in to the captive portal</body></html>";
    let foreign = misbehaving_hub(Some(Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}",
            html.len()
        )
        .into_boxed_str(),
    )));
    for kind in [Hub::HuggingFace, Hub::ModelScope] {
        let cache = tempfile::tempdir().unwrap();
        let impatient = |url: &str| HubEnv {
            metadata_timeout: Duration::from_millis(500),
            ..env(kind, url, cache.path())
        };
        // Nothing cached: each says what went wrong, and the silent one does not hang.
        let started = std::time::Instant::now();
        let e = snapshot(&impatient(&silent), &id("org/tiny")).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{kind:?} waited"
        );
        assert!(matches!(e, HubError::Network { .. }), "{kind:?}: {e}");
        assert!(e.to_string().to_lowercase().contains("timed out"), "{e}");
        let e = snapshot(&impatient(&failing), &id("org/tiny")).unwrap_err();
        assert!(
            matches!(e, HubError::Http { status: 503, .. }),
            "{kind:?}: {e}"
        );
        let e = snapshot(&impatient(&foreign), &id("org/tiny")).unwrap_err();
        assert!(matches!(e, HubError::BadAnswer { .. }), "{kind:?}: {e}");
        assert!(!e.to_string().contains("cannot write"), "{e}");

        // Cached whole: each falls back on it.
        let dir = snapshot(&env(kind, &hub.url, cache.path()), &id("org/tiny")).unwrap();
        for url in [&silent, &failing, &foreign] {
            assert_eq!(
                snapshot(&impatient(url), &id("org/tiny")).unwrap(),
                dir,
                "{kind:?} {url}"
            );
        }
    }
}

#[test]
fn a_download_that_stalls_breaks_off_after_the_timeout_and_resumes() {
    let shard = "model-00002-of-00003.safetensors";
    for kind in [Hub::HuggingFace, Hub::ModelScope] {
        let hub = FakeHub::start(vec![("org/tiny", sharded_repo())]);
        let cache = tempfile::tempdir().unwrap();
        let impatient = HubEnv {
            download_timeout: Duration::from_millis(500),
            ..env(kind, &hub.url, cache.path())
        };
        hub.state.lock().unwrap().stalled.insert(shard.to_string());
        let started = std::time::Instant::now();
        let e = snapshot(&impatient, &id("org/tiny")).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{kind:?} waited"
        );
        assert!(matches!(e, HubError::Interrupted { .. }), "{kind:?}: {e}");
        assert!(e.to_string().contains("run again to resume"), "{e}");
        let dir = snapshot(&impatient, &id("org/tiny")).unwrap();
        let bytes = std::fs::read(model_dir(SHARDED).join(shard)).unwrap();
        assert_eq!(std::fs::read(dir.join(shard)).unwrap(), bytes, "{kind:?}");
    }
}

#[test]
fn a_dataset_by_hub_id_lands_in_the_hub_cache_and_is_read_offline() {
    let rows = b"{\"query\": \"Hi\", \"response\": \"Hello.\"}\n";
    let repo = || {
        Repo::from_files(&[
            ("README.md", b"# a dataset"),
            ("data/train.jsonl", rows),
            (
                "extra/more.jsonl",
                b"{\"query\": \"Yo\", \"response\": \"Hey.\"}\n",
            ),
            ("script.py", b"print()"),
        ])
    };
    let hub = FakeHub::start(vec![("datasets/org/ds", repo())]);
    // Each hub's own layout for a dataset repo, and where its files come from.
    for (which, snapshots, transfers) in [
        (
            Hub::HuggingFace,
            "datasets--org--ds/snapshots",
            "/datasets/org/ds/resolve/",
        ),
        (
            Hub::ModelScope,
            "datasets/org--ds/snapshots/master",
            "/api/v1/datasets/org/ds/repo",
        ),
    ] {
        let cache = tempfile::tempdir().unwrap();
        let env = env(which, &hub.url, cache.path());
        let before = hub.downloads().len();
        let dir = swift_rs::hub::dataset_snapshot(&env, &id("org/ds")).unwrap();
        assert!(
            dir.starts_with(cache.path().join(snapshots)),
            "{}",
            dir.display()
        );
        assert_eq!(std::fs::read(dir.join("data/train.jsonl")).unwrap(), rows);
        assert!(dir.join("extra/more.jsonl").exists());
        assert!(!dir.join("README.md").exists() && !dir.join("script.py").exists());
        let downloads = hub.downloads()[before..].to_vec();
        assert_eq!(downloads.len(), 2, "{which:?}: {downloads:?}");
        assert!(
            downloads.iter().all(|d| d.starts_with(transfers)),
            "{downloads:?}"
        );
        // Offline, the cache serves it; a model repo of that name is not it.
        let offline = HubEnv {
            offline: true,
            ..env.clone()
        };
        assert_eq!(
            swift_rs::hub::dataset_snapshot(&offline, &id("org/ds")).unwrap(),
            dir
        );
        let e = snapshot(&env, &id("org/ds")).unwrap_err();
        assert!(
            matches!(
                e,
                HubError::RepoNotFound { .. } | HubError::Http { status: 404, .. }
            ),
            "{which:?}: {e}"
        );
    }
    // A repo without data files is named.
    let empty = FakeHub::start(vec![(
        "datasets/org/empty",
        Repo::from_files(&[("README.md", b"#")]),
    )]);
    for which in [Hub::HuggingFace, Hub::ModelScope] {
        let cache = tempfile::tempdir().unwrap();
        let e = swift_rs::hub::dataset_snapshot(
            &env(which, &empty.url, cache.path()),
            &id("org/empty"),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("holds no .jsonl, .json, .csv or .parquet"),
            "{which:?}: {e}"
        );
    }
}

/// A dataset repo of a loading script holds no data: the Hub's Parquet conversion
/// (`refs/convert/parquet`, `{subset}/{split}/0000.parquet`) is read instead, as `datasets` does.
#[test]
fn a_script_dataset_is_read_from_the_hubs_parquet_conversion() {
    let repo = Repo::from_files(&[("README.md", b"#"), ("scripted.py", b"print()")]).with_files(
        "refs/convert/parquet",
        &[
            ("default/train/0000.parquet", b"PAR1 train"),
            ("default/test/0000.parquet", b"PAR1 test"),
        ],
    );
    let hub = FakeHub::start(vec![("datasets/org/scripted", repo)]);
    let cache = tempfile::tempdir().unwrap();
    let env = env(Hub::HuggingFace, &hub.url, cache.path());
    let dir = swift_rs::hub::dataset_snapshot(&env, &id("org/scripted")).unwrap();
    assert!(dir.join("default/train/0000.parquet").exists());
    assert!(dir.join("default/test/0000.parquet").exists());
    let root = cache.path().join("datasets--org--scripted");
    assert!(root.join("refs/refs/convert/parquet").is_file());
    // Offline, the conversion in the cache serves.
    let offline = HubEnv {
        offline: true,
        ..env.clone()
    };
    assert_eq!(
        swift_rs::hub::dataset_snapshot(&offline, &id("org/scripted")).unwrap(),
        dir
    );
    // A repo with neither data nor a conversion is named as before.
    let bare = FakeHub::start(vec![(
        "datasets/org/bare",
        Repo::from_files(&[("scripted.py", b"print()")]),
    )]);
    let e = swift_rs::hub::dataset_snapshot(
        &HubEnv {
            endpoint: bare.url.clone(),
            ..env
        },
        &id("org/bare"),
    )
    .unwrap_err();
    assert!(matches!(e, HubError::NotADataset { .. }), "{e}");
}

/// ModelScope lists a dataset's files 200 a page: a repo of more is fetched whole. What an older
/// modelscope left in `hub/datasets/org/name` (dots as `___`) is reused.
#[test]
fn modelscope_datasets_come_page_by_page_and_older_caches_are_reused() {
    let files: Vec<(String, Vec<u8>)> = (0..205)
        .map(|i| {
            (
                format!("part/{i:03}.jsonl"),
                format!("{{\"text\": \"{i}\"}}\n").into_bytes(),
            )
        })
        .collect();
    let borrowed: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), &b[..])).collect();
    let hub = FakeHub::start(vec![("datasets/org/many", Repo::from_files(&borrowed))]);
    let cache = tempfile::tempdir().unwrap();
    let env = env(Hub::ModelScope, &hub.url, cache.path());
    let dir = swift_rs::hub::dataset_snapshot(&env, &id("org/many")).unwrap();
    let got = std::fs::read_dir(dir.join("part")).unwrap().count();
    assert_eq!(got, 205);
    let pages = |hub: &FakeHub| {
        let seen = hub.seen();
        seen.iter()
            .filter(|s| s.path.ends_with("/repo/tree"))
            .count()
    };
    assert_eq!(pages(&hub), 2);
    // A server that sends every file on every page is asked twice, not for ever.
    hub.state.lock().unwrap().unpaged = true;
    let again = tempfile::tempdir().unwrap();
    let dir = swift_rs::hub::dataset_snapshot(
        &HubEnv {
            cache: again.path().to_path_buf(),
            ..env.clone()
        },
        &id("org/many"),
    )
    .unwrap();
    assert_eq!(std::fs::read_dir(dir.join("part")).unwrap().count(), 205);
    assert_eq!(pages(&hub), 4);

    let legacy = cache.path().join("hub/datasets/org/old___name");
    std::fs::create_dir_all(&legacy).unwrap();
    std::fs::write(legacy.join("train.jsonl"), "{\"text\": \"x\"}\n").unwrap();
    let offline = HubEnv {
        offline: true,
        ..env.clone()
    };
    assert_eq!(
        swift_rs::hub::dataset_snapshot(&offline, &id("org/old.name")).unwrap(),
        legacy
    );
}

#[test]
fn hub_timeouts_come_from_the_environment() {
    // Each variable is read once per call: a bad value names itself.
    let e = std::process::Command::new(env!("CARGO_BIN_EXE_swift-rs"))
        .args(["infer", "--model", "org/not-cached", "--prompt", "hi"])
        .env("HF_HUB_ETAG_TIMEOUT", "soon")
        .env("HF_HOME", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&e.stderr);
    assert!(stderr.contains("HF_HUB_ETAG_TIMEOUT=\"soon\""), "{stderr}");
}

#[test]
fn a_cut_transfer_resumes_where_it_stopped() {
    let shard = "model-00002-of-00003.safetensors";
    let bytes = std::fs::read(model_dir(SHARDED).join(shard)).unwrap();
    for kind in [Hub::HuggingFace, Hub::ModelScope] {
        let hub = FakeHub::start(vec![("org/tiny", sharded_repo())]);
        let cache = tempfile::tempdir().unwrap();
        let env = env(kind, &hub.url, cache.path());
        hub.state.lock().unwrap().cut.insert(shard.to_string());
        let e = snapshot(&env, &id("org/tiny")).unwrap_err();
        assert!(matches!(e, HubError::Interrupted { .. }), "{kind:?}: {e}");
        assert!(e.to_string().contains("run again to resume"), "{e}");
        // The half that arrived waits under the name both Python clients give it and resume;
        // nothing is under the real name.
        let partial: Vec<PathBuf> = files_under(cache.path())
            .into_iter()
            .filter(|p| p.to_str().unwrap().ends_with(".incomplete"))
            .collect();
        assert_eq!(partial.len(), 1, "{kind:?}: {partial:?}");
        let have = std::fs::metadata(&partial[0]).unwrap().len();
        assert_eq!(have as usize, bytes.len() / 2, "{kind:?}");
        assert!(files_under(cache.path())
            .iter()
            .all(|p| !p.ends_with(shard) || !p.exists()));

        let dir = snapshot(&env, &id("org/tiny")).unwrap();
        assert_holds_model(&dir, SHARDED);
        let resumed = hub
            .seen()
            .iter()
            .any(|s| s.range.as_deref() == Some(&format!("bytes={have}-")));
        assert!(resumed, "{kind:?}: no request resumed at byte {have}");
        assert!(files_under(cache.path())
            .iter()
            .all(|p| !p.to_str().unwrap().ends_with(".incomplete")));
    }
}

#[test]
fn a_damaged_file_is_deleted_and_named() {
    // A large file (checked by SHA-256) and, on the Hugging Face Hub, a small one (git SHA-1).
    let cases = [
        (
            Hub::HuggingFace,
            "model-00001-of-00003.safetensors",
            "SHA-256",
        ),
        (Hub::HuggingFace, "tokenizer.json", "git SHA-1"),
        (
            Hub::ModelScope,
            "model-00001-of-00003.safetensors",
            "SHA-256",
        ),
        (Hub::ModelScope, "tokenizer.json", "SHA-256"),
    ];
    for (kind, file, hash) in cases {
        let hub = FakeHub::start(vec![("org/tiny", sharded_repo())]);
        let cache = tempfile::tempdir().unwrap();
        let env = env(kind, &hub.url, cache.path());
        hub.state.lock().unwrap().damaged.insert(file.to_string());
        let e = snapshot(&env, &id("org/tiny")).unwrap_err();
        assert!(
            matches!(e, HubError::Checksum { .. }),
            "{kind:?} {file}: {e}"
        );
        let text = e.to_string();
        assert!(text.contains(file) && text.contains(hash), "{text}");
        let good = std::fs::read(model_dir(SHARDED).join(file)).unwrap();
        for path in files_under(cache.path()) {
            let held = std::fs::read(&path).unwrap_or_default();
            assert!(
                held.len() != good.len() || held == good,
                "{kind:?}: damaged {} kept",
                path.display()
            );
        }
        hub.state.lock().unwrap().damaged.clear();
        assert_holds_model(&snapshot(&env, &id("org/tiny")).unwrap(), SHARDED);
    }
}

#[test]
fn gated_unknown_renamed_and_tagged_repos() {
    let mut gated = sharded_repo();
    gated.gated = true;
    let mut tagged = sharded_repo();
    tagged.add_revision("v1", &model_dir("llama"), &[]);
    let readme_only = Repo::from_files(&[("README.md", b"# notes")]);
    let hub = FakeHub::start(vec![
        ("org/gated", gated),
        ("org/tiny", tagged),
        ("org/docs", readme_only),
    ]);
    hub.state
        .lock()
        .unwrap()
        .renamed
        .insert("old/tiny".into(), "org/tiny".into());
    let cache = tempfile::tempdir().unwrap();
    let anonymous = env(Hub::HuggingFace, &hub.url, cache.path());

    let e = snapshot(&anonymous, &id("org/gated")).unwrap_err();
    assert!(matches!(e, HubError::Gated { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!("{}/org/gated", hub.url))
            && e.to_string().contains("set HF_TOKEN"),
        "{e}"
    );
    let wrong = HubEnv {
        token: Some("hf_other".into()),
        ..env(Hub::HuggingFace, &hub.url, cache.path())
    };
    let e = snapshot(&wrong, &id("org/gated")).unwrap_err();
    assert!(e.to_string().contains("granted access"), "{e}");
    let allowed = HubEnv {
        token: Some(GOOD_TOKEN.into()),
        ..env(Hub::HuggingFace, &hub.url, cache.path())
    };
    assert_holds_model(&snapshot(&allowed, &id("org/gated")).unwrap(), SHARDED);

    let e = snapshot(&anonymous, &id("org/nothing")).unwrap_err();
    assert!(
        matches!(e, HubError::RepoNotFound { .. }) && e.is_usage(),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("org/nothing is neither a local directory nor a repo on"),
        "{e}"
    );
    let e = snapshot(&anonymous, &id("org/tiny@v9")).unwrap_err();
    assert!(matches!(e, HubError::RevisionNotFound { .. }), "{e}");
    assert!(e.to_string().contains("no revision \"v9\""), "{e}");
    let e = snapshot(&anonymous, &id("org/docs")).unwrap_err();
    assert!(matches!(e, HubError::NotAModel { .. }), "{e}");

    let v1 = snapshot(&anonymous, &id("org/tiny@v1")).unwrap();
    assert_holds_model(&v1, "llama");
    let root = cache.path().join("models--org--tiny");
    assert_eq!(
        std::fs::read_to_string(root.join("refs/v1")).unwrap(),
        commit(&hub, "org/tiny", 1)
    );
    // The hub answers a renamed repo's requests with a relative redirect to the new name.
    assert_holds_model(&snapshot(&anonymous, &id("old/tiny")).unwrap(), SHARDED);

    let e = snapshot(
        &env(Hub::ModelScope, &hub.url, cache.path()),
        &id("org/nothing"),
    )
    .unwrap_err();
    assert!(matches!(e, HubError::RepoNotFound { .. }), "{e}");
    let e = snapshot(
        &env(Hub::ModelScope, &hub.url, cache.path()),
        &id("org/tiny@v9"),
    )
    .unwrap_err();
    assert!(
        matches!(e, HubError::RevisionNotFound { .. }) && e.is_usage(),
        "{e}"
    );
    assert!(e.to_string().contains("no revision \"v9\""), "{e}");
}

#[test]
fn modelscope_files_land_in_modelscopes_cache_layout_and_its_older_one_is_reused() {
    let hub = FakeHub::start(vec![
        ("org/tiny", sharded_repo()),
        ("org/tiny.v2", sharded_repo()),
    ]);
    let cache = tempfile::tempdir().unwrap();
    let env = env(Hub::ModelScope, &hub.url, cache.path());
    let dir = snapshot(&env, &id("org/tiny")).unwrap();
    assert_eq!(dir, cache.path().join("models/org--tiny/snapshots/master"));
    assert_holds_model(&dir, SHARDED);
    let before = hub.downloads().len();
    assert_eq!(snapshot(&env, &id("org/tiny")).unwrap(), dir);
    assert_eq!(hub.downloads().len(), before);

    // modelscope 1.37 and before: `hub/models/{owner}/{name, dots as ___}`.
    let legacy = cache.path().join("hub/models/org/tiny___v2");
    std::fs::create_dir_all(&legacy).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, legacy.join(path.file_name().unwrap())).unwrap();
    }
    assert_eq!(snapshot(&env, &id("org/tiny.v2")).unwrap(), legacy);
    assert_eq!(hub.downloads().len(), before);

    let offline = HubEnv {
        offline: true,
        ..env.clone()
    };
    assert_eq!(snapshot(&offline, &id("org/tiny")).unwrap(), dir);
    let e = snapshot(&offline, &id("org/other")).unwrap_err();
    assert!(matches!(e, HubError::Offline { .. }), "{e}");
}
