//! Faults a run must survive, as a user meets them: `swift-rs train` killed with SIGKILL or
//! SIGTERM at seeded random steps and while a checkpoint is being written, then resumed, ends
//! with the adapter and optimizer state of an unbroken run, bit for bit, and no temporaries; a
//! second run on a live run directory is refused naming the first; `merge` killed leaves nothing
//! under its output name, and its rerun writes the same files; a full disk (a small tmpfs, where
//! the machine lets the test mount one) fails a checkpoint or a merge whole.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

const STEPS: u64 = 8;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The quickstart cut to `STEPS` steps, a checkpoint every 2 and a log line every step.
fn train(run: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_swift-rs"));
    command
        .current_dir(root())
        .args(["train", "--config", "configs/quickstart.toml"])
        .args(["--set", &format!("output.dir={}", run.display())])
        .args(["--set", &format!("train.max_steps={STEPS}")])
        .args([
            "--set",
            "train.save_steps=2",
            "--set",
            "train.logging_steps=1",
        ])
        .args(["--set", "output.plots=false"])
        .args(extra.iter().flat_map(|s| ["--set", s]));
    command
}

fn signal(child: &Child, name: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Runs until the log shows step `step`, then sends `sig`; returns the exit status and stderr.
fn interrupt_at_step(run: &Path, extra: &[&str], step: u64, sig: &str) -> (ExitStatus, String) {
    let mut child = train(run, extra).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut text = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        text.push_str(&line);
        if line.starts_with(&format!("step {step}/")) {
            signal(&child, sig);
            break;
        }
        line.clear();
    }
    std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
    (child.wait().unwrap(), text)
}

/// Resumes from the latest checkpoint until the run is done.
fn resume(run: &Path) {
    let out = train(run, &["train.resume_from=latest"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("done: {STEPS} steps")), "{stderr}");
}

/// The trained state at the end: the adapter and the optimizer's moments.
fn final_state(run: &Path) -> Vec<Vec<u8>> {
    let last = run.join(format!("checkpoint-{STEPS}"));
    ["adapter_model.safetensors", "optimizer.safetensors"]
        .iter()
        .map(|f| std::fs::read(last.join(f)).unwrap())
        .collect()
}

/// Every path under `dir` whose name starts with ".tmp".
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with(".tmp") {
            found.push(path.clone());
        }
        if path.is_dir() {
            found.extend(temporaries(&path));
        }
    }
    found
}

fn reference() -> (tempfile::TempDir, Vec<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = train(&run, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = final_state(&run);
    (dir, state)
}

#[test]
fn a_run_killed_or_terminated_at_random_steps_resumes_to_the_unbroken_result() {
    let (_keep, unbroken) = reference();
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    for attempt in 0..4 {
        let step = rng.random_range(1..STEPS);
        let sig = if attempt % 2 == 0 { "KILL" } else { "TERM" };
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let (status, stderr) = interrupt_at_step(&run, &[], step, sig);
        if sig == "TERM" {
            // As Ctrl-C: the step under way finishes and is saved, and the exit is clean.
            assert_eq!(status.code(), Some(0), "{stderr}");
            assert!(stderr.contains("stopped at step"), "{stderr}");
            let saved = swift_rs::train::checkpoint::list(&run);
            assert!(saved.last().is_some_and(|(s, _)| *s >= step), "{saved:?}");
        } else {
            assert_eq!(status.code(), None, "{stderr}");
        }
        resume(&run);
        assert!(
            final_state(&run) == unbroken,
            "SIGKILL/SIGTERM {sig} at step {step}: the resumed run differs from the unbroken one"
        );
        assert_eq!(temporaries(&run), Vec::<PathBuf>::new());
    }
}

/// Polls `dir` for a staged directory (a checkpoint or merge being written) and kills `child`
/// the moment one appears; true when it appeared before the process ended.
fn kill_while_staging(child: &mut Child, dir: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let staging = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".tmp-swift-rs-")
            });
        if staging {
            signal(child, "KILL");
            child.wait().unwrap();
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    panic!("no staged directory appeared in {}", dir.display());
}

#[test]
fn a_run_killed_while_writing_a_checkpoint_resumes_to_the_unbroken_result() {
    let (_keep, unbroken) = reference();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut child = train(&run, &[]).stderr(Stdio::null()).spawn().unwrap();
    assert!(kill_while_staging(&mut child, &run), "the run ended first");
    // It died mid-write: the checkpoint it was writing is still under its temporary name.
    assert!(!temporaries(&run).is_empty());
    // No checkpoint is seen half-written: each one listed is whole.
    for (_, checkpoint) in swift_rs::train::checkpoint::list(&run) {
        assert!(checkpoint.join("trainer_state.json").exists());
    }
    resume(&run);
    assert!(final_state(&run) == unbroken, "the resumed run differs");
    assert_eq!(temporaries(&run), Vec::<PathBuf>::new());
}

#[test]
fn a_second_run_on_a_live_run_directory_exits_2_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut first = train(&run, &["train.max_steps=100000"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 && !line.starts_with("step 1/") {
        line.clear();
    }
    // Even with overwrite, which would delete the live run's checkpoints.
    for extra in [&[][..], &["output.overwrite=true"][..]] {
        let second = train(&run, extra).output().unwrap();
        let text = String::from_utf8_lossy(&second.stderr);
        assert_eq!(second.status.code(), Some(2), "{text}");
        assert!(text.contains(&format!("pid {}", first.id())), "{text}");
    }
    signal(&first, "TERM");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert_eq!(first.wait().unwrap().code(), Some(0), "{rest}");
    // The lock went with the process: a resume takes the directory over.
    let next = train(&run, &["train.resume_from=latest", "train.max_steps=4"])
        .output()
        .unwrap();
    assert!(
        next.status.success(),
        "{}",
        String::from_utf8_lossy(&next.stderr)
    );
}

fn merge(adapter: &Path, out: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_swift-rs"));
    command.current_dir(root()).args([
        "merge",
        "--model",
        "examples/quickstart-model",
        "--adapter",
        adapter.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    command
}

/// Every file of a directory by name, with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_killed_merge_leaves_nothing_and_its_rerun_writes_the_same_files() {
    let (trained, _) = reference();
    let adapter = trained
        .path()
        .join("run")
        .join(format!("checkpoint-{STEPS}"));
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let done = merge(&adapter, &whole).output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let expected = files(&whole);

    // SIGKILL mid-write: nothing under the output name; the rerun removes the leftover.
    let out = dir.path().join("merged");
    let mut child = merge(&adapter, &out).stderr(Stdio::null()).spawn().unwrap();
    assert!(
        kill_while_staging(&mut child, dir.path()),
        "the merge ended first"
    );
    assert!(!out.exists(), "a killed merge left {}", out.display());
    assert!(
        !temporaries(dir.path()).is_empty(),
        "killed mid-write, it leaves its staging"
    );
    let rerun = merge(&adapter, &out).output().unwrap();
    assert!(
        rerun.status.success(),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    assert!(files(&out) == expected, "the rerun wrote other files");
    assert_eq!(temporaries(dir.path()), Vec::<PathBuf>::new());

    // SIGTERM (and Ctrl-C) mid-write: nothing at all, leftovers included.
    let out = dir.path().join("terminated");
    for sig in ["TERM", "INT"] {
        let mut child = merge(&adapter, &out)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while temporaries(dir.path()).is_empty() {
            assert!(child.try_wait().unwrap().is_none(), "the merge ended first");
            assert!(Instant::now() < deadline, "no staged directory appeared");
            std::thread::sleep(Duration::from_micros(100));
        }
        signal(&child, sig);
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(130), "SIG{sig}: {stderr}");
        assert!(!out.exists(), "SIG{sig} left {}", out.display());
        assert_eq!(temporaries(dir.path()), Vec::<PathBuf>::new(), "SIG{sig}");
        let _ = std::fs::remove_dir_all(&out);
    }
}

/// A small tmpfs mounted for the test's life (root only): a disk that fills up.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// None, said on stderr, where mounting is not allowed (not root, or a container without
    /// CAP_SYS_ADMIN): the machine cannot stage the fault, which says nothing of the code.
    fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .is_ok_and(|o| o.status.success());
        if !mounted {
            eprintln!("skipped: mounting a tmpfs to fill needs root and CAP_SYS_ADMIN");
            return None;
        }
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_fails_the_write_whole_and_names_it() {
    // Room for one checkpoint of the quickstart adapter (3.6 MB) and not two.
    let Some(disk) = SmallDisk::mount(6 << 20) else {
        return;
    };
    let run = disk.path().join("run");
    let out = train(&run, &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(stderr.contains(run.to_str().unwrap()), "{stderr}");
    let saved: Vec<u64> = swift_rs::train::checkpoint::list(&run)
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(saved, vec![2], "{stderr}");
    assert!(run.join("checkpoint-2/trainer_state.json").exists());
    assert_eq!(temporaries(&run), Vec::<PathBuf>::new());

    // A merge that does not fit leaves nothing.
    let (trained, _) = reference();
    let adapter = trained
        .path()
        .join("run")
        .join(format!("checkpoint-{STEPS}"));
    let Some(disk) = SmallDisk::mount(512 << 10) else {
        return;
    };
    let merged = disk.path().join("merged");
    let out = merge(&adapter, &merged).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(!merged.exists());
    assert_eq!(temporaries(disk.path()), Vec::<PathBuf>::new());
}
