//! Helpers shared by the golden-fixture tests.
#![allow(dead_code)] // each test binary uses its own subset

pub mod fake_hub;
pub mod training;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::backend::Flex;
use burn::tensor::{DType, Tensor};
use safetensors::SafeTensors;
use serde_json::Value;
use swift_rs::data::{read_pretokenized, TokenizedRow};
use swift_rs::export::peft::read_adapter;
use swift_rs::model::{self, Batch, CausalLm, LoadOptions, ModelBackend};
use swift_rs::train::evaluate;

pub type B = Flex;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("adapters").join(name)
}

/// A fixture model (+ a fixture PEFT adapter) on `device`.
pub fn load_model<M: ModelBackend>(
    base: &str,
    adapter: Option<&str>,
    options: LoadOptions,
    device: &M::Device,
) -> CausalLm<M> {
    let mut plan = adapter.map(|a| read_adapter(&adapter_dir(a)).unwrap());
    model::load::<M>(&model_dir(base), options, plan.as_mut(), device)
        .unwrap()
        .1
}

/// What transformers (+ PEFT) computed for a fixture: its inputs, logits per row, losses.
pub struct Golden {
    pub rows: Vec<TokenizedRow>,
    /// flattened [len * vocab] per row
    pub logits: Vec<Vec<f32>>,
    pub losses: Value,
}

/// `dir/expected/` of a fixture; `inputs` is the folder whose inputs.jsonl was used.
pub fn golden(dir: &Path, inputs: &Path, tag: &str, vocab: usize) -> Golden {
    let rows = read_pretokenized(&inputs.join("expected/inputs.jsonl"), vocab).unwrap();
    let bytes = std::fs::read(dir.join("expected/logits.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let logits = (0..rows.len())
        .map(|i| {
            let view = st.tensor(&format!("{tag}.{i}")).unwrap();
            view.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
        .collect();
    let text = std::fs::read_to_string(dir.join("expected/losses.json")).unwrap();
    let losses: Value = serde_json::from_str(&text).unwrap();
    Golden {
        rows,
        logits,
        losses: losses[tag].clone(),
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits of each row (unpadded part), from one right-padded batch of them.
pub fn logits_of<M: ModelBackend>(model: &CausalLm<M>, rows: &[&[u32]]) -> Vec<Vec<f32>> {
    let batch = Batch::right_padded(rows);
    let logits: Tensor<M, 3> = model.forward(&batch);
    let [_, seq, vocab] = logits.dims();
    let flat = logits.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
    rows.iter()
        .enumerate()
        .map(|(i, r)| flat[i * seq * vocab..(i * seq + r.len()) * vocab].to_vec())
        .collect()
}

/// Each row alone, then all rows in one right-padded batch: logits within `tol` of `g`.
pub fn check_logits<M: ModelBackend>(what: &str, model: &CausalLm<M>, g: &Golden, tol: f32) {
    let ids: Vec<&[u32]> = g.rows.iter().map(|r| r.input_ids.as_slice()).collect();
    for (i, row) in ids.iter().enumerate() {
        let d = max_abs_diff(&logits_of(model, &[row])[0], &g.logits[i]);
        assert!(
            d < tol,
            "{what} row {i} alone: max |logit diff| {d} >= {tol}"
        );
    }
    for (i, got) in logits_of(model, &ids).iter().enumerate() {
        let d = max_abs_diff(got, &g.logits[i]);
        assert!(
            d < tol,
            "{what} row {i} in a padded batch: max |logit diff| {d} >= {tol}"
        );
    }
}

/// Per-row and mean losses within `tol` of `g`, evaluated one row at a time and 3 at a time.
pub fn check_losses<M: ModelBackend>(what: &str, model: &CausalLm<M>, g: &Golden, tol: f64) {
    for batch_size in [1, 3] {
        let report = evaluate(model, &g.rows, batch_size, |_| {});
        for (got, want) in report.rows.iter().zip(g.losses["rows"].as_array().unwrap()) {
            let want_loss = want["loss"].as_f64().unwrap();
            assert_eq!(got.tokens as u64, want["tokens"].as_u64().unwrap());
            assert!(
                (got.loss - want_loss).abs() < tol,
                "{what} row {} (batch {batch_size}): loss {} vs reference {want_loss}",
                got.index,
                got.loss
            );
        }
        let want = g.losses["loss"].as_f64().unwrap();
        assert!(
            (report.loss - want).abs() < tol,
            "{what}: mean loss {} vs {want}",
            report.loss
        );
        assert_eq!(report.tokens as u64, g.losses["tokens"].as_u64().unwrap());
    }
}

/// Runs the `swift-rs` binary.
pub fn swift_rs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_swift-rs"))
        .args(args)
        .output()
        .expect("run swift-rs")
}

/// Runs the `swift-rs` binary expecting success; returns its stdout.
pub fn swift_rs_ok<S: AsRef<str>>(args: &[S]) -> String {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = swift_rs(&args);
    assert!(
        out.status.success(),
        "{args:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs the `swift-rs` binary expecting exit `code`; returns its stderr after checking the
/// error contract (an `error: ` line first, never a panic).
pub fn swift_rs_fails<S: AsRef<str>>(args: &[S], code: i32) -> String {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = swift_rs(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}: exit code; stderr:\n{stderr}"
    );
    assert!(stderr.starts_with("error: "), "{args:?}: stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: stderr:\n{stderr}");
    stderr
}

/// A copy of a fixture model (without its expected/ folder) that a test may break.
pub fn model_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

/// Rewrites `<dir>/config.json` through `edit`.
pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(path, cfg.to_string()).unwrap();
}

/// Runs `swift-rs eval`, expecting success, and returns (loss, whole stdout).
pub fn eval_loss(args: &[&str]) -> (f64, String) {
    let out = swift_rs(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let loss = printed(&stdout, "loss");
    (loss, stdout)
}

/// The number on the `name: value` line of eval's output.
pub fn printed(stdout: &str, name: &str) -> f64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} line in {stdout}"))
        .parse()
        .unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("a list of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}
