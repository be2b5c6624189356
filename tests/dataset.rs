//! The data pipeline end to end: the same rows in JSONL, JSON and Parquet (every row format,
//! Chinese, multi-turn, system prompts, a tool result) encode to transformers' ids and labels
//! (tests/fixtures/datasets, made by scripts/gen_fixtures.py); packing, shuffling, splitting,
//! sampling, streaming, bad rows and `swift-rs encode`.

mod common;

use std::path::{Path, PathBuf};

use swift_rs::config::TrainConfig;
use swift_rs::data::dataset::{Dataset, Stream, TrainRow};
use swift_rs::data::encode::{Encoded, Encoder};

fn datasets() -> PathBuf {
    common::fixtures().join("datasets")
}

/// A config over the qwen2_5 template fixture (tokenizer + template) and `train`.
fn config(train: &[&Path], extra: &str) -> TrainConfig {
    let model = common::fixtures().join("templates/qwen2_5");
    let train: Vec<String> = train
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    let text = format!(
        "[model]\npath = {:?}\n[data]\ntrain = [{}]\nshuffle = false\n{extra}",
        model.display().to_string(),
        train.join(", ")
    );
    TrainConfig::parse(&text, Path::new("test.toml"), &[]).unwrap()
}

fn build(config: &TrainConfig) -> Result<Dataset, String> {
    let encoder = Encoder::from_config(Path::new(&config.model.path), config).unwrap();
    Dataset::build(&config.data, config.train.seed, &encoder).map_err(|e| e.to_string())
}

fn expected() -> Vec<Encoded> {
    std::fs::read_to_string(datasets().join("expected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Encoded {
                input_ids: common::ids(&v["input_ids"]),
                labels: serde_json::from_value(v["labels"].clone()).unwrap(),
            }
        })
        .collect()
}

fn samples(rows: &[TrainRow]) -> Vec<Encoded> {
    rows.iter()
        .map(|r| match r {
            TrainRow::Sample(s) => s.clone(),
            other => panic!("{other:?} from SFT rows without packing"),
        })
        .collect()
}

#[test]
fn every_format_and_file_type_encodes_as_transformers() {
    let expected = expected();
    for file in ["rows.jsonl", "rows.json", "rows.parquet"] {
        let dataset = build(&config(&[&datasets().join(file)], "")).unwrap();
        assert_eq!(dataset.train.len(), expected.len(), "{file}");
        for (i, (got, want)) in samples(&dataset.train).iter().zip(&expected).enumerate() {
            assert_eq!(got, want, "{file} row {i}");
        }
        assert_eq!(
            dataset.epoch_order(0),
            (0..expected.len()).collect::<Vec<_>>()
        );
    }
}

#[test]
fn packing_keeps_every_sample_and_its_labels() {
    let expected = expected();
    let dataset = build(&config(
        &[&datasets().join("rows.parquet")],
        "packing = true\nmax_length = 200\n",
    ))
    .unwrap();
    let mut seen = vec![false; expected.len()];
    for row in &dataset.train {
        let TrainRow::Packed(p) = row else {
            panic!("not packed")
        };
        assert!(p.input_ids.len() <= 200);
        for (k, &s) in p.samples.iter().enumerate() {
            let (a, b) = (p.boundaries[k], p.boundaries[k + 1]);
            assert_eq!(p.input_ids[a..b], expected[s].input_ids[..]);
            assert_eq!(p.labels[a + 1..b], expected[s].labels[1..]);
            assert_eq!(p.labels[a], -100);
            assert_eq!(p.position_ids[a..b], (0..b - a).collect::<Vec<_>>()[..]);
            seen[s] = true;
        }
    }
    assert!(seen.iter().all(|&s| s));
    assert!(
        dataset.train.len() < expected.len(),
        "nothing was packed together"
    );
}

#[test]
fn shuffle_split_and_sampling_are_seeded() {
    let file = datasets().join("rows.jsonl");
    let shuffled = |seed: u64| {
        let mut c = config(&[&file], "");
        c.data.shuffle = true;
        c.train.seed = seed;
        let d = build(&c).unwrap();
        (d.epoch_order(0), d.epoch_order(1))
    };
    let (e0, e1) = shuffled(42);
    assert_eq!(shuffled(42), (e0.clone(), e1.clone()));
    assert_ne!(e0, e1, "every epoch is shuffled anew");
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..8).collect::<Vec<_>>());

    let split = build(&config(&[&file], "val_ratio = 0.25\n")).unwrap();
    assert_eq!((split.train.len(), split.val.len()), (6, 2));
    let again = build(&config(&[&file], "val_ratio = 0.25\n")).unwrap();
    assert_eq!(split.val, again.val);

    let spec = format!("{}#20", file.display());
    let sampled = build(&config(&[Path::new(&spec)], "")).unwrap();
    assert_eq!(sampled.train.len(), 20);
    let spec = format!("{}#3", file.display());
    let few = build(&config(
        &[Path::new(&spec), &datasets().join("rows.parquet")],
        "",
    ))
    .unwrap();
    assert_eq!(few.train.len(), 3 + 8);
}

#[test]
fn truncation_left_and_right() {
    let file = datasets().join("rows.jsonl");
    let expected = expected();
    let max = 60;
    let opts = |mode: &str| {
        format!("max_length = {max}\ntruncation = \"{mode}\"\non_bad_row = \"skip\"\n")
    };
    // Left keeps the answers, which come last.
    let left = build(&config(&[&file], &opts("left"))).unwrap();
    assert_eq!(left.bad_rows.count, 0);
    for (l, e) in samples(&left.train).iter().zip(&expected) {
        let n = e.input_ids.len();
        assert_eq!(l.input_ids[..], e.input_ids[n.saturating_sub(max)..]);
        assert_eq!(l.labels[..], e.labels[n.saturating_sub(max)..]);
    }
    // Right cuts some answers away entirely: those rows have nothing to learn and are bad rows.
    let right = build(&config(&[&file], &opts("right"))).unwrap();
    let learnable: Vec<&Encoded> = expected
        .iter()
        .filter(|e| {
            e.labels[..e.labels.len().min(max)]
                .iter()
                .any(|&l| l != -100)
        })
        .collect();
    assert!(learnable.len() < expected.len());
    assert_eq!(right.bad_rows.count, expected.len() - learnable.len());
    for (r, e) in samples(&right.train).iter().zip(learnable) {
        assert_eq!(r.input_ids[..], e.input_ids[..e.input_ids.len().min(max)]);
    }
}

/// ms-swift drops rows longer than max_length under "delete"; the run used to stop at the first.
#[test]
fn delete_truncation_drops_long_rows_and_counts_them_even_when_bad_rows_are_errors() {
    let file = datasets().join("rows.jsonl");
    let expected = expected();
    let max = 40;
    let long = expected.iter().filter(|e| e.input_ids.len() > max).count();
    assert!(long > 0 && long < expected.len());
    for on_bad_row in ["error", "skip"] {
        let extra = format!("max_length = {max}\non_bad_row = \"{on_bad_row}\"\n");
        let built = build(&config(&[&file], &extra)).unwrap();
        assert_eq!(built.bad_rows.too_long, long, "{on_bad_row}");
        assert_eq!(built.bad_rows.count, 0, "{on_bad_row}");
        let kept: Vec<&Encoded> = expected
            .iter()
            .filter(|e| e.input_ids.len() <= max)
            .collect();
        let got = samples(&built.train);
        assert_eq!(got.len(), kept.len());
        for (g, e) in got.iter().zip(kept) {
            assert_eq!(g, e);
        }
        let said = built.bad_rows.describe(max).unwrap();
        assert!(
            said.contains(&format!(
                "dropped {long} rows longer than data.max_length = {max}"
            )),
            "{said}"
        );
    }
}

#[test]
fn bad_rows_stop_or_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.jsonl");
    let good = r#"{"query": "Hi", "response": "Hello."}"#;
    let lines = [
        good,
        r#"{"query": "Hi", "response": "#,
        r#"{"prompt": "Hi", "completion": "Hello."}"#,
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}"#,
        r#"{"messages": [{"role": "boss", "content": "Hi"}, {"role": "assistant", "content": "x"}]}"#,
        r#"{"messages": [{"role": "user", "content": "Hi"}]}"#,
        good,
    ];
    let mut bytes = lines.join("\n").into_bytes();
    bytes.extend_from_slice(b"\n{\"text\": \"\xff\"}\n");
    std::fs::write(&file, bytes).unwrap();
    let err = build(&config(&[&file], "")).unwrap_err();
    assert!(err.contains("bad.jsonl:2: malformed JSON"), "{err}");
    let skipped = build(&config(&[&file], "on_bad_row = \"skip\"\n")).unwrap();
    assert_eq!(skipped.train.len(), 2);
    assert_eq!(skipped.bad_rows.count, 6);
    let reasons = skipped.bad_rows.first.join("\n");
    for want in [
        ":2: malformed JSON",
        ":3: unknown row format",
        ":4:",
        ":5:",
        ":8: invalid UTF-8",
    ] {
        assert!(reasons.contains(want), "{want} not in {reasons}");
    }
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let err = build(&config(&[&empty], "")).unwrap_err();
    assert!(err.contains("data.train holds no usable rows"), "{err}");
}

#[test]
fn streaming_reads_the_same_rows_lazily() {
    let file = datasets().join("rows.parquet");
    let mut c = config(&[&file], "streaming = true\n[train]\nmax_steps = 10\n");
    let encoder = Encoder::from_config(Path::new(&c.model.path), &c).unwrap();
    let rows: Vec<TrainRow> = Stream::new(&c.data, 42, 0, &encoder)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(samples(&rows), expected());
    // Shuffled through the buffer: the same rows, another order, reproducible.
    c.data.shuffle = true;
    let pass = |data: &swift_rs::config::DataSection, epoch| -> Vec<TrainRow> {
        Stream::new(data, 42, epoch, &encoder)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let (a, b) = (pass(&c.data, 0), pass(&c.data, 0));
    assert_eq!(a, b);
    assert_ne!(a, rows);
    assert_eq!(a.len(), rows.len());
    assert_ne!(pass(&c.data, 1), a, "each epoch is shuffled anew");
    // `#N` over a stream repeats the file.
    c.data.train = vec![format!("{}#19", file.display())];
    assert_eq!(pass(&c.data, 0).len(), 19);
}

#[test]
fn encode_writes_the_rows_training_sees() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("run.toml");
    let model = common::fixtures().join("templates/qwen2_5");
    std::fs::write(
        &config_path,
        format!(
            "[model]\npath = {:?}\n[data]\ntrain = [{:?}]\nshuffle = false\n",
            model.display().to_string(),
            datasets().join("rows.parquet").display().to_string()
        ),
    )
    .unwrap();
    let out = dir.path().join("rows.jsonl");
    let run = common::swift_rs(&[
        "encode",
        "--config",
        config_path.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let written: Vec<Encoded> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v.get("position_ids").is_none());
            Encoded {
                input_ids: common::ids(&v["input_ids"]),
                labels: serde_json::from_value(v["labels"].clone()).unwrap(),
            }
        })
        .collect();
    assert_eq!(written, expected());
    let packed = common::swift_rs(&[
        "encode",
        "--config",
        config_path.to_str().unwrap(),
        "--set",
        "data.packing=true",
        "--limit",
        "1",
    ]);
    assert!(
        packed.status.success(),
        "{}",
        String::from_utf8_lossy(&packed.stderr)
    );
    let line: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&packed.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(line["position_ids"].is_array());
    assert_eq!(String::from_utf8_lossy(&packed.stdout).lines().count(), 1);
    let bad = common::swift_rs(&[
        "encode",
        "--config",
        config_path.to_str().unwrap(),
        "--set",
        "data.colour=1",
    ]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown key data.colour"));
}

/// `encode --output` naming its own dataset (or config) overwrote it.
#[test]
fn encode_refuses_to_overwrite_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("rows.jsonl");
    std::fs::copy(datasets().join("rows.jsonl"), &rows).unwrap();
    let before = std::fs::read(&rows).unwrap();
    let config_path = dir.path().join("run.toml");
    let model = common::fixtures().join("templates/qwen2_5");
    std::fs::write(
        &config_path,
        format!(
            "[model]\npath = {:?}\n[data]\ntrain = [{:?}]\n",
            model.display().to_string(),
            dir.path().join("*.jsonl").display().to_string()
        ),
    )
    .unwrap();
    for input in [&rows, &config_path] {
        let config = config_path.to_str().unwrap();
        let args = [
            "encode",
            "--config",
            config,
            "--output",
            input.to_str().unwrap(),
        ];
        let stderr = common::swift_rs_fails(&args, 2);
        assert!(stderr.contains("is the input"), "{stderr}");
    }
    assert_eq!(std::fs::read(&rows).unwrap(), before);
}

/// Words of several scripts (1- to 4-byte characters), drawn in a fixed order, to `bytes` bytes.
fn long_text(bytes: usize) -> String {
    let words = [
        "model",
        "训练",
        "données",
        "🙂",
        "LoRA",
        "rank",
        "注意力",
        "x=1;",
        "\n",
        "  ",
    ];
    let mut text = String::new();
    let mut i = 0usize;
    while text.len() < bytes {
        i = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(words[(i >> 33) % words.len()]);
        text.push(' ');
    }
    text
}

/// A row far longer than max_length is tokenized only in a window of what truncation keeps
/// (a 10 MB row cost ~2 GB), and gives exactly what tokenizing it whole and truncating gives:
/// a long answer cut on the right and on the left, a long prompt cut on the left (on the right
/// it keeps no answer: a bad row).
#[test]
fn a_long_row_gives_what_whole_tokenization_and_truncation_give() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("long.jsonl");
    let long = long_text(600_000);
    let rows = [
        serde_json::json!({"messages": [{"role": "user", "content": "Tell me."},
                                        {"role": "assistant", "content": long}]}),
        serde_json::json!({"messages": [{"role": "user", "content": long},
                                        {"role": "assistant", "content": "Done."}]}),
    ];
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    for (mode, kept) in [("right", vec![0]), ("left", vec![0, 1])] {
        // Past the template's system prompt and headers, so the answer shows on the right.
        let max = 256;
        let c = config(
            &[&file],
            &format!("max_length = {max}\ntruncation = \"{mode}\"\non_bad_row = \"skip\"\n"),
        );
        let windowed = samples(&build(&c).unwrap().train);
        let whole = Encoder::for_model_dir(
            Path::new(&c.model.path),
            c.model.template,
            None,
            c.data.loss_scale,
        )
        .unwrap();
        let expected: Vec<Encoded> = kept
            .iter()
            .map(|&i| {
                let row = swift_rs::data::format::parse_row(&rows[i]).unwrap();
                let e = whole.encode(&row).unwrap();
                assert!(e.input_ids.len() > 100 * max, "the row is long");
                swift_rs::data::pack::truncate(e, max, c.data.truncation).unwrap()
            })
            .collect();
        assert_eq!(windowed, expected, "{mode}");
    }
}

/// `swift-rs encode` over a 10 MB row: the peak memory follows max_length, not the row, under
/// "delete" (the row is dropped on its length), "right" and "left" (an end of it is kept): ~2 GB
/// before, ~115 MB now.
#[cfg(unix)]
#[test]
fn a_10_mb_row_costs_memory_by_max_length_not_by_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rows.jsonl");
    let rows = [
        serde_json::json!({"messages": [{"role": "user", "content": "Who are you?"},
                                        {"role": "assistant", "content": "swift-rs."}]}),
        serde_json::json!({"messages": [{"role": "user", "content": "Tell me."},
                                        {"role": "assistant", "content": long_text(10_000_000)}]}),
    ];
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart-model");
    for (mode, rows_out) in [("delete", 1), ("right", 2), ("left", 2)] {
        let config = dir.path().join(format!("{mode}.toml"));
        std::fs::write(
            &config,
            format!(
                "[model]\npath = {:?}\n[data]\ntrain = [{:?}]\nmax_length = 256\n\
                 truncation = \"{mode}\"\n",
                model.display().to_string(),
                file.display().to_string()
            ),
        )
        .unwrap();
        let out = dir.path().join(format!("{mode}.jsonl"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_swift-rs"))
            .args(["encode", "--config", config.to_str().unwrap(), "--output"])
            .arg(&out)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (status, peak_kib) = wait_with_peak_memory(child);
        assert_eq!(status, 0, "{mode}");
        let written = std::fs::read_to_string(&out).unwrap();
        assert_eq!(written.lines().count(), rows_out, "{mode}");
        // ~2 GB before; the 10 MB row itself (read, parsed, rendered) is ~50 MB of it now.
        assert!(peak_kib < 400 * 1024, "{mode}: peak RSS {peak_kib} KiB");
    }
}

/// The exit code and peak resident memory (KiB) of `child`, from the kernel's rusage.
#[cfg(unix)]
fn wait_with_peak_memory(child: std::process::Child) -> (i32, i64) {
    let mut status = 0;
    // SAFETY: rusage is plain data, filled by wait4 for this child's pid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid);
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}
