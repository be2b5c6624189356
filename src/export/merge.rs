//! `W' = W + s * B @ A` (DoRA: each output row then rescaled to its learned magnitude) written as a
//! Hugging Face model directory that transformers' `from_pretrained` loads. Streams: the base is
//! memory-mapped and one tensor is merged at a time, so a 7B merge needs about one shard of memory,
//! not the model in f32. A QLoRA adapter merges the same way, into the unquantized base weights.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{DType, Tensor, TensorData};
use safetensors::tensor::TensorView;

use super::peft::read_adapter;
use super::{ExportError, StagedDir};
use crate::config::{Dtype, ModelConfig, COMPANION_FILES};
use crate::lora::{Lora, Targets};
use crate::model::ModelBackend;
use crate::model::{
    adapts_routed_module, burn_dtype, read_lora, AdapterSource, Checkpoint, ModelError,
};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Usage(String),
}

impl MergeError {
    /// An output that exists already.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Usage(_))
    }
}

pub struct MergeOptions {
    /// None: the dtype config.json names (float32 when it names none).
    pub dtype: Option<Dtype>,
    /// Bytes of tensor data per shard at most (a larger single tensor gets a shard of its own).
    pub max_shard_size: u64,
}

/// What was written, for the report.
pub struct MergeReport {
    pub merged_modules: usize,
    pub shards: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// Parses transformers' `max_shard_size` strings: "5GB" (10^9), "2GiB" (2^30), "500MB", or bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let units: [(&str, u64); 8] = [
        ("GIB", 1 << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
        ("", 1),
    ];
    let upper = t.to_ascii_uppercase();
    for (unit, scale) in units {
        if let Some(num) = upper.strip_suffix(unit) {
            if let Ok(n) = num.trim().parse::<f64>() {
                if n > 0.0 {
                    return Ok((n * scale as f64) as u64);
                }
            }
        }
    }
    Err(format!("\"{s}\" is not a size such as 5GB, 500MB or 2GiB"))
}

/// Merges the PEFT adapter in `adapter_dir` into the model in `model_dir` and writes `output`.
pub fn merge<B: ModelBackend>(
    model_dir: &Path,
    adapter_dir: &Path,
    output: &Path,
    options: &MergeOptions,
    device: &B::Device,
) -> Result<MergeReport, MergeError> {
    let start = Instant::now();
    check_output(output, "merge writes a new directory")?;
    let config = ModelConfig::from_dir(model_dir).map_err(ModelError::from)?;
    let out_dtype = options.dtype.or(config.dtype).unwrap_or(Dtype::F32);
    let mut weights = MergedWeights::<B>::open(model_dir, &config, Some(adapter_dir), device)?;
    let staged = StagedDir::new(output)?;
    let mut shards = ShardWriter::new(staged.path(), options.max_shard_size, out_dtype);
    for (key, shape) in weights.tensors() {
        let tensor = weights.take(&key, &shape)?;
        shards.push(key, shape, tensor)?;
    }
    let (n_shards, bytes) = shards.finish()?;
    write_config(model_dir, &staged, out_dtype)?;
    for name in COMPANION_FILES {
        let src = model_dir.join(name);
        if src.exists() {
            let dst = staged.path().join(name);
            std::fs::copy(&src, &dst).map_err(|source| ExportError::Write { path: dst, source })?;
        }
    }
    staged.commit()?;
    Ok(MergeReport {
        merged_modules: weights.merged,
        shards: n_shards,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// A base model's tensors with an adapter's updates folded in, handed out one at a time in f32 so
/// that a writer holds one tensor, not the model. Without an adapter, the base tensors as they are.
pub struct MergedWeights<B: ModelBackend> {
    base: Checkpoint,
    model_dir: PathBuf,
    adapter_dir: Option<PathBuf>,
    /// Checkpoint key -> (update, the `[out, in]` shape it fits).
    deltas: HashMap<String, (Lora<B>, [usize; 2])>,
    device: B::Device,
    /// Modules merged so far.
    pub merged: usize,
}

impl<B: ModelBackend> MergedWeights<B> {
    /// Reads every adapter tensor first, so that a misfit is refused before anything is written.
    pub fn open(
        model_dir: &Path,
        config: &ModelConfig,
        adapter_dir: Option<&Path>,
        device: &B::Device,
    ) -> Result<Self, MergeError> {
        let mut deltas = HashMap::new();
        let base = Checkpoint::open(model_dir, Dtype::F32).map_err(ModelError::from)?;
        if let Some(adapter_dir) = adapter_dir {
            let plan = read_adapter(adapter_dir)?;
            let AdapterSource::Weights(mut adapter) = plan.source else {
                unreachable!("read_adapter returns weights")
            };
            let lora = &plan.config;
            if let Some(params) = lora.target_parameters.as_ref().filter(|p| !p.is_empty()) {
                let params = params.join(", ");
                let why = format!(
                    "target_parameters ({params}): merging adapters on a mixture of experts' \
                     stacks is not supported yet"
                );
                return Err(adapter_error(adapter_dir, vec![why]));
            }
            let targets = Targets::of(lora).map_err(|e| adapter_error(adapter_dir, vec![e]))?;
            let linears = config.adaptable_linears().into_iter().map(|l| (l, false));
            let routed = config.routed_linears().into_iter().map(|l| (l, true));
            for ((name, n_in, n_out), routed) in linears.chain(routed) {
                let targeted = match routed {
                    true => adapts_routed_module(&targets, Some(&adapter), &name),
                    false => targets.matches(&name),
                };
                if targeted {
                    let update = read_lora(&mut adapter, lora, &name, [n_in, n_out], device);
                    deltas.insert(format!("{name}.weight"), (update, [n_out, n_in]));
                }
            }
            let mut problems: Vec<String> =
                adapter.problems().iter().map(ToString::to_string).collect();
            if deltas.is_empty() {
                problems.push(lora.matches_nothing());
            }
            let mut unheld: Vec<&String> = deltas.keys().filter(|k| !base.contains(k)).collect();
            unheld.sort();
            if let Some(key) = unheld.first() {
                // The experts of transformers 5's fused layout are one tensor a stack.
                problems.push(format!(
                    "{key}: the base checkpoint has no such tensor ({} of the adapter's updates \
                     are to per-expert linears it holds fused): merging them into fused experts \
                     is not supported yet",
                    unheld.len()
                ));
            }
            if !problems.is_empty() {
                return Err(adapter_error(adapter_dir, problems));
            }
        }
        Ok(Self {
            base,
            model_dir: model_dir.to_path_buf(),
            adapter_dir: adapter_dir.map(Path::to_path_buf),
            deltas,
            device: device.clone(),
            merged: 0,
        })
    }

    /// Every base tensor's key and shape, in file order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.base.tensors()
    }

    /// Whether the base has tensor `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.base.contains(key)
    }

    /// Tensor `key` of `shape`, in f32, its update (if any) merged in.
    pub fn take(&mut self, key: &str, shape: &[usize]) -> Result<TensorData, MergeError> {
        let data = self.base.take_data(key, shape).ok_or_else(|| {
            ModelError::from(crate::model::LoadError::Mismatch {
                dir: self.model_dir.clone(),
                problems: self.base.problems(),
            })
        })?;
        match self.deltas.get(key) {
            Some((update, expected)) if shape[..] == expected[..] => {
                self.merged += 1;
                // The checkpoint's [out, in] in the adapter's [in, out] orientation and back.
                let w = Tensor::<B, 2>::from_data(data, (&self.device, DType::F32)).transpose();
                Ok(update.merged_weight(w).transpose().into_data())
            }
            Some((_, expected)) => Err(adapter_error(
                self.adapter_dir
                    .as_deref()
                    .expect("deltas come from an adapter"),
                vec![format!(
                    "base tensor {key} has shape {shape:?}, the adapter expects {expected:?}"
                )],
            )),
            None => Ok(data),
        }
    }
}

/// A usage error when `output` exists (exports write new files and directories, never over
/// something there), or when the directory it goes in does not (a mistyped path is not made).
pub(super) fn check_output(output: &Path, why: &str) -> Result<(), MergeError> {
    if output.exists() {
        return Err(MergeError::Usage(format!(
            "{} already exists; {why}: give another output path, or remove it first",
            output.display()
        )));
    }
    match output.parent() {
        Some(parent) if !parent.as_os_str().is_empty() && !parent.is_dir() => {
            Err(MergeError::Usage(format!(
                "{} cannot be written: the directory {} does not exist (make it first)",
                output.display(),
                parent.display()
            )))
        }
        _ => Ok(()),
    }
}

fn adapter_error(dir: &Path, problems: Vec<String>) -> MergeError {
    MergeError::Model(ModelError::Adapter {
        what: format!("the adapter in {}", dir.display()),
        problems,
    })
}

/// Collects tensors into shards of at most `max` bytes, in the output dtype.
struct ShardWriter<'a> {
    dir: &'a Path,
    max: u64,
    dtype: Dtype,
    pending: Vec<(String, Vec<usize>, Vec<u8>)>,
    pending_bytes: u64,
    /// (temporary file name, keys, bytes)
    written: Vec<(String, Vec<String>)>,
    total: u64,
}

impl<'a> ShardWriter<'a> {
    fn new(dir: &'a Path, max: u64, dtype: Dtype) -> Self {
        Self {
            dir,
            max,
            dtype,
            pending: Vec::new(),
            pending_bytes: 0,
            written: Vec::new(),
            total: 0,
        }
    }

    fn push(
        &mut self,
        key: String,
        shape: Vec<usize>,
        data: TensorData,
    ) -> Result<(), ExportError> {
        let bytes = to_bytes(data, self.dtype);
        let n = bytes.len() as u64;
        if self.pending_bytes > 0 && self.pending_bytes + n > self.max {
            self.flush()?;
        }
        self.pending_bytes += n;
        self.total += n;
        self.pending.push((key, shape, bytes));
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ExportError> {
        let name = format!("shard-{}.tmp", self.written.len());
        let st_dtype = match self.dtype {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::F16 => safetensors::Dtype::F16,
            Dtype::Bf16 => safetensors::Dtype::BF16,
        };
        let views: Vec<(String, TensorView)> = self
            .pending
            .iter()
            .map(|(k, shape, bytes)| {
                let view = TensorView::new(st_dtype, shape.clone(), bytes)
                    .expect("bytes sized for shape and dtype");
                (k.clone(), view)
            })
            .collect();
        let path = self.dir.join(&name);
        let metadata = Some([("format".to_string(), "pt".to_string())].into());
        safetensors::serialize_to_file(views, metadata, &path).map_err(|e| ExportError::Write {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let keys = self.pending.drain(..).map(|(k, _, _)| k).collect();
        self.written.push((name, keys));
        self.pending_bytes = 0;
        Ok(())
    }

    /// Names the shards as transformers does (`model.safetensors`, or
    /// `model-0000i-of-0000n.safetensors` with an index). Returns (shards, bytes).
    fn finish(mut self) -> Result<(usize, u64), ExportError> {
        if !self.pending.is_empty() || self.written.is_empty() {
            self.flush()?;
        }
        let n = self.written.len();
        let rename = |from: &str, to: &str| {
            let to = self.dir.join(to);
            std::fs::rename(self.dir.join(from), &to)
                .map_err(|source| ExportError::Write { path: to, source })
        };
        if n == 1 {
            rename(&self.written[0].0, "model.safetensors")?;
            return Ok((1, self.total));
        }
        let mut weight_map = BTreeMap::new();
        for (i, (tmp, keys)) in self.written.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            rename(tmp, &file)?;
            for k in keys {
                weight_map.insert(k.clone(), file.clone());
            }
        }
        let index = serde_json::json!({
            "metadata": {"total_size": self.total},
            "weight_map": weight_map,
        });
        let path = self.dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&index).expect("json"))
            .map_err(|source| ExportError::Write { path, source })?;
        Ok((n, self.total))
    }
}

fn to_bytes(data: TensorData, dtype: Dtype) -> Vec<u8> {
    // TensorData rounds to nearest even, as torch's `.to(bfloat16)` does.
    data.convert_dtype(burn_dtype(dtype)).into_bytes().to_vec()
}

/// config.json with the dtype of the written weights, under the key(s) its generation uses.
fn write_config(model_dir: &Path, out: &StagedDir, dtype: Dtype) -> Result<(), ExportError> {
    let src = model_dir.join("config.json");
    let text = std::fs::read_to_string(&src).map_err(|source| ExportError::Read {
        path: src.clone(),
        source,
    })?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ExportError::Invalid {
            path: src.clone(),
            reason: e.to_string(),
        })?;
    let obj = json.as_object_mut().ok_or_else(|| ExportError::Invalid {
        path: src.clone(),
        reason: "not a JSON object".into(),
    })?;
    obj.insert("torch_dtype".into(), dtype.torch_name().into());
    if obj.contains_key("dtype") {
        obj.insert("dtype".into(), dtype.torch_name().into());
    }
    out.write(
        "config.json",
        &serde_json::to_vec_pretty(&json).expect("json"),
    )
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_as_transformers_reads_them() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("150kb"), Ok(150_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0GB").is_err());
    }
}
