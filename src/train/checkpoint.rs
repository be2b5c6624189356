//! Checkpoints: `<output.dir>/checkpoint-<step>/` holds the adapter in PEFT's format
//! (`adapter_config.json`, `adapter_model.safetensors`), the optimizer state
//! (`optimizer.safetensors`) and `trainer_state.json` (step, data position, seed, log history,
//! best eval loss). Each is built under a temporary name and renamed into place, so a checkpoint
//! directory is either whole or absent. The learning rate is a function of the step and the
//! random streams (dropout) are drawn from the seed and the step, so these files are all that
//! resuming needs to continue bit for bit.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::log::LogEntry;
use super::optim::{Moments, Optimizer};
use super::TrainError;
use crate::config::{LoraConfig, OptimizerKind, ARGS_FILE};
use crate::export::peft::{adapter_files, f32_entry, f32_safetensors};
use crate::export::StagedDir;
use crate::lora::peft_key;
use crate::model::CausalLm;
use crate::model::ModelBackend;

pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const PREFIX: &str = "checkpoint-";

/// Where the next optimizer step reads from: the epoch (from 0) and how many of its rows (in the
/// epoch's order) earlier steps consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub rows: usize,
}

/// `trainer_state.json`: transformers' field names where they have one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: u64,
    pub max_steps: u64,
    /// Epochs done, with the fraction of the current one.
    pub epoch: f64,
    pub data_position: DataPosition,
    /// `train.seed`: with the step it determines every random draw still to come.
    pub seed: u64,
    /// `train.optimizer` of the run whose state `optimizer.safetensors` holds.
    pub optimizer: String,
    /// Training time so far (all runs of a resumed training).
    pub elapsed_s: f64,
    /// The summed loss and count of the steps since the last log line, so that a resumed run
    /// logs the mean an unbroken one would.
    #[serde(default)]
    pub unlogged_loss: (f64, u64),
    /// The same for a preference run's metrics: their sums over the micro-batches (`MetricSums`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unlogged_metrics: Vec<f64>,
    pub best_metric: Option<f64>,
    pub best_model_checkpoint: Option<PathBuf>,
    pub log_history: Vec<LogEntry>,
}

impl TrainerState {
    /// The state of a run that has not started.
    pub fn new(max_steps: u64, seed: u64, optimizer: OptimizerKind) -> Self {
        Self {
            global_step: 0,
            max_steps,
            epoch: 0.0,
            data_position: DataPosition::default(),
            seed,
            optimizer: optimizer.name().into(),
            elapsed_s: 0.0,
            unlogged_loss: (0.0, 0),
            unlogged_metrics: Vec::new(),
            best_metric: None,
            best_model_checkpoint: None,
            log_history: Vec::new(),
        }
    }
}

/// The name of the checkpoint of `step`.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(format!("{PREFIX}{step}"))
}

/// Writes `checkpoint-<step>` whole or not at all, with `args` (the run's settings under
/// ms-swift's names) as `args.json` beside the adapter, where ms-swift's tools look for them.
pub fn save<B: ModelBackend>(
    run_dir: &Path,
    model: &CausalLm<B>,
    lora: &LoraConfig,
    optimizer: &Optimizer<B>,
    state: &TrainerState,
    args: &serde_json::Value,
) -> Result<PathBuf, TrainError> {
    let dir = checkpoint_dir(run_dir, state.global_step);
    let staged = StagedDir::new(&dir)?;
    for (name, bytes) in adapter_files(model, lora)? {
        staged.write(name, &bytes)?;
    }
    staged.write(OPTIMIZER_FILE, &optimizer_bytes(model, optimizer))?;
    let json = serde_json::to_vec_pretty(state).expect("the state serializes");
    staged.write(TRAINER_STATE_FILE, &json)?;
    let args = serde_json::to_vec_pretty(args).expect("JSON serializes");
    staged.write(ARGS_FILE, &args)?;
    staged.commit()?;
    Ok(dir)
}

/// The key of every trainable tensor, in the order the optimizer holds them.
pub fn trainable_keys<B: ModelBackend>(model: &CausalLm<B>) -> Vec<String> {
    model
        .named_adapters()
        .flat_map(|(name, l)| {
            l.trainable()
                .into_iter()
                .map(move |(part, _)| peft_key(&name, part))
        })
        .collect()
}

/// AdamW's moments under `<adapter key>.exp_avg` / `.exp_avg_sq` (flattened in swift-rs's
/// layout). The optimizer's name and step count are in trainer_state.json, which keeps this file's
/// bytes a function of its tensors (safetensors writes metadata in hash order).
fn optimizer_bytes<B: ModelBackend>(model: &CausalLm<B>, optimizer: &Optimizer<B>) -> Vec<u8> {
    let mut tensors = Vec::new();
    for (key, m) in trainable_keys(model).iter().zip(&optimizer.moments) {
        tensors.push(f32_entry(format!("{key}.exp_avg"), m.exp_avg.clone()));
        tensors.push(f32_entry(format!("{key}.exp_avg_sq"), m.exp_avg_sq.clone()));
    }
    f32_safetensors(&tensors).expect("shapes come from the tensors")
}

/// Puts the optimizer state of checkpoint `dir` into `optimizer` (made for the same adapter).
pub fn load_optimizer<B: ModelBackend>(
    dir: &Path,
    state: &TrainerState,
    keys: &[String],
    optimizer: &mut Optimizer<B>,
    device: &B::Device,
) -> Result<(), TrainError> {
    let path = dir.join(OPTIMIZER_FILE);
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.clone(),
        reason,
    };
    if state.optimizer != optimizer.config.kind.name() {
        return Err(bad(format!(
            "holds the state of optimizer {:?}, but train.optimizer is {:?}",
            state.optimizer,
            optimizer.config.kind.name()
        )));
    }
    // One optimizer step per training step.
    optimizer.steps = state.global_step;
    let bytes = std::fs::read(&path).map_err(TrainError::io(&path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let read = |key: String, like: &Tensor<B, 1>| -> Result<Tensor<B, 1>, TrainError> {
        let view = st
            .tensor(&key)
            .map_err(|_| bad(format!("{key} is missing")))?;
        let n = like.dims()[0];
        if view.dtype() != safetensors::Dtype::F32 || view.shape() != [n] {
            return Err(bad(format!(
                "{key} is {:?} {:?}, expected F32 [{n}]",
                view.dtype(),
                view.shape()
            )));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Tensor::from_data(TensorData::new(values, [n]), device))
    };
    let mut moments = Vec::with_capacity(optimizer.moments.len());
    for (key, m) in keys.iter().zip(&optimizer.moments) {
        moments.push(Moments {
            exp_avg: read(format!("{key}.exp_avg"), &m.exp_avg)?,
            exp_avg_sq: read(format!("{key}.exp_avg_sq"), &m.exp_avg_sq)?,
        });
    }
    optimizer.moments = moments;
    Ok(())
}

pub fn load_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let path = dir.join(TRAINER_STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(TrainError::io(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path,
        reason: e.to_string(),
    })
}

/// The checkpoints in `run_dir` by step, oldest first. Temporary directories of a write that
/// never finished do not count.
pub fn list(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let step = e.file_name().to_str()?.strip_prefix(PREFIX)?.parse().ok()?;
            let path = e.path();
            path.join(TRAINER_STATE_FILE)
                .is_file()
                .then_some((step, path))
        })
        .collect();
    out.sort();
    out
}

/// Deletes the oldest checkpoints until at most `limit` remain, never the newest nor `best`.
pub fn rotate(run_dir: &Path, limit: usize, best: Option<&Path>) -> Result<(), TrainError> {
    let all = list(run_dir);
    let newest = all.last().map(|(_, p)| p.clone());
    let mut count = all.len();
    for (_, path) in &all {
        if count <= limit {
            break;
        }
        if Some(path) == newest.as_ref() || Some(path.as_path()) == best {
            continue;
        }
        std::fs::remove_dir_all(path).map_err(TrainError::io(path))?;
        count -= 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_run(steps: &[u64]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for &s in steps {
            let ckpt = checkpoint_dir(dir.path(), s);
            std::fs::create_dir(&ckpt).unwrap();
            std::fs::write(ckpt.join(TRAINER_STATE_FILE), "{}").unwrap();
        }
        // A write that never finished is not a checkpoint.
        std::fs::create_dir(dir.path().join(".tmp-x")).unwrap();
        std::fs::create_dir(dir.path().join("checkpoint-99")).unwrap();
        dir
    }

    fn steps(dir: &Path) -> Vec<u64> {
        list(dir).into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn rotation_keeps_the_best_and_the_newest() {
        let run = fake_run(&[10, 20, 30, 40, 50]);
        assert_eq!(steps(run.path()), vec![10, 20, 30, 40, 50]);
        rotate(run.path(), 2, Some(&checkpoint_dir(run.path(), 20))).unwrap();
        assert_eq!(steps(run.path()), vec![20, 50]);
        // A limit of 1 still keeps both when the best is not the newest.
        rotate(run.path(), 1, Some(&checkpoint_dir(run.path(), 20))).unwrap();
        assert_eq!(steps(run.path()), vec![20, 50]);
        let run = fake_run(&[10, 20, 30]);
        rotate(run.path(), 2, None).unwrap();
        assert_eq!(steps(run.path()), vec![20, 30]);
    }
}
