//! Strict safetensors loading: one file or shards listed by `model.safetensors.index.json`,
//! memory-mapped, converted straight from the mapped bytes into the compute dtype, so a tensor
//! exists once in memory. Every missing, unexpected and mis-shaped tensor is collected and
//! reported in one error (nanoGPT asserts key counts; this lists them).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype as StDtype, SafeTensors};

use super::burn_dtype;
use crate::config::Dtype;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir} has neither model.safetensors nor model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("{path} is not a valid safetensors file (truncated or corrupt?): {reason}")]
    BadSafetensors { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    #[error("tensor {key} in {path} has dtype {dtype:?}; only F32, F16 and BF16 load")]
    UnsupportedDtype {
        key: String,
        path: PathBuf,
        dtype: StDtype,
    },
    #[error("the checkpoint in {dir} does not fit the model config ({} problems):\n    {}", .problems.len(), super::problem_lines(.problems))]
    Mismatch {
        dir: PathBuf,
        problems: Vec<LoadProblem>,
    },
}

/// One way a checkpoint does not fit the model: loading collects them all before failing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadProblem {
    #[error("missing tensor {key} (expected shape {expected:?})")]
    Missing { key: String, expected: Vec<usize> },
    #[error("tensor {key} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("unexpected tensor {key}")]
    Unexpected { key: String },
}

/// One memory-mapped safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self, LoadError> {
        let file = File::open(&path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the file is only read; a checkpoint modified while we load it is outside
        // what any loader (transformers included) can guard against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        // read_metadata checks the header and that every tensor lies inside the file.
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| LoadError::BadSafetensors {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            path,
            mmap,
            header_len,
            metadata,
        })
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = 8 + self.header_len;
        &self.mmap[start + info.data_offsets.0..start + info.data_offsets.1]
    }
}

/// The tensors of a checkpoint directory. `take` hands them out one by one; `finish` reports
/// every problem met on the way plus the tensors nobody took.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// key -> shard index
    keys: HashMap<String, usize>,
    taken: BTreeSet<String>,
    problems: Vec<LoadProblem>,
    dtype: Dtype,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or every shard named in `model.safetensors.index.json`.
    /// Tensors are converted to `dtype` as they are taken.
    pub fn open(dir: &Path, dtype: Dtype) -> Result<Self, LoadError> {
        Self::open_files(dir, &Self::model_files(dir)?, dtype)
    }

    /// The safetensors files of a model directory.
    pub fn model_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            Ok(shard_files(&index)?
                .into_iter()
                .map(|f| dir.join(f))
                .collect())
        } else if single.exists() {
            Ok(vec![single])
        } else {
            Err(LoadError::NoWeights {
                dir: dir.to_path_buf(),
            })
        }
    }

    /// Opens the given safetensors files of `dir` as one set of tensors.
    pub fn open_files(dir: &Path, files: &[PathBuf], dtype: Dtype) -> Result<Self, LoadError> {
        let shards = files
            .iter()
            .cloned()
            .into_iter()
            .map(Shard::open)
            .collect::<Result<Vec<_>, _>>()?;
        let mut keys = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for (key, info) in shard.metadata.tensors() {
                if !matches!(info.dtype, StDtype::F32 | StDtype::F16 | StDtype::BF16) {
                    return Err(LoadError::UnsupportedDtype {
                        key,
                        path: shard.path.clone(),
                        dtype: info.dtype,
                    });
                }
                keys.insert(key, i);
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            keys,
            taken: BTreeSet::new(),
            problems: Vec::new(),
            dtype,
        })
    }

    /// Every tensor name with its shape, in file order (shard by shard, by offset).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.shards
            .iter()
            .flat_map(|shard| {
                shard.metadata.offset_keys().into_iter().map(move |k| {
                    let shape = shard
                        .metadata
                        .info(&k)
                        .expect("key from this shard")
                        .shape
                        .clone();
                    (k, shape)
                })
            })
            .collect()
    }

    /// Whether the checkpoint holds `key` (for optional tensors such as a tied lm_head).
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// Marks `key` as expected without loading it (a tied `lm_head.weight` some exporters write).
    pub fn skip(&mut self, key: &str) {
        self.taken.insert(key.to_string());
    }

    /// Marks every tensor under the module path `prefix` as expected without loading it (the
    /// vision tower of a vision-language checkpoint, when only its language model is used);
    /// returns how many there were.
    pub fn skip_module(&mut self, prefix: &str) -> usize {
        let under = format!("{prefix}.");
        let keys: Vec<String> = self
            .keys
            .keys()
            .filter(|k| k.starts_with(&under))
            .cloned()
            .collect();
        let n = keys.len();
        self.taken.extend(keys);
        n
    }

    /// The tensor `key` with `shape`, in the checkpoint's compute dtype. A missing or mis-shaped
    /// tensor is recorded and a 1-element placeholder returned, so that model building can go on
    /// and every problem is reported by `finish`; once a problem is known, nothing more is
    /// loaded, since the model will be thrown away.
    pub fn take<B: Backend, const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Tensor<B, D> {
        self.take_data(key, &shape)
            .map_or_else(|| placeholder(device), |data| self.tensor(data, device))
    }

    /// A linear weight stored `[out, in]` by Hugging Face, returned contiguous in Burn's `[in, out]`
    /// layout. Transposed here, once, rather than as a view: Burn's `linear` reshapes its weight,
    /// which would copy a strided view on every forward.
    pub fn take_linear<B: Backend>(
        &mut self,
        key: &str,
        [n_out, n_in]: [usize; 2],
        device: &B::Device,
    ) -> Tensor<B, 2> {
        match self.take_data(key, &[n_out, n_in]) {
            None => placeholder(device),
            Some(data) => {
                let elem = data.dtype.size();
                let t = transpose_bytes(data.as_bytes(), n_out, n_in, elem);
                let data = TensorData::from_bytes_vec(t, [n_in, n_out], data.dtype);
                self.tensor(data, device)
            }
        }
    }

    /// A mixture of experts' linear weights, `[experts, out, in]` row-major in the compute dtype
    /// (Hugging Face's layout per expert), from whichever form the checkpoint holds: the fused
    /// tensor transformers 5 keeps in memory (`{prefix}.{fused}`, the parts' rows one after
    /// another: `gate_up_proj` is gate's rows then up's), or the hub's per-expert linears
    /// (`{prefix}.{e}.{part}.weight`, `[part_out, in]` each). None when a problem was recorded.
    pub(crate) fn take_experts_data(
        &mut self,
        prefix: &str,
        fused: &str,
        parts: &[&str],
        [experts, part_out, n_in]: [usize; 3],
    ) -> Option<TensorData> {
        let n_out = parts.len() * part_out;
        let fused_key = format!("{prefix}.{fused}");
        if self.contains(&fused_key) {
            return self.take_data(&fused_key, &[experts, n_out, n_in]);
        }
        let mut bytes = Vec::new();
        let mut dtype = None;
        for e in 0..experts {
            for part in parts {
                let key = format!("{prefix}.{e}.{part}.weight");
                if let Some(d) = self.take_data(&key, &[part_out, n_in]) {
                    bytes.extend_from_slice(d.as_bytes());
                    dtype = Some(d.dtype);
                }
            }
        }
        let dtype = dtype.filter(|_| self.problems.is_empty())?;
        Some(TensorData::from_bytes_vec(
            bytes,
            [experts, n_out, n_in],
            dtype,
        ))
    }

    /// `take_experts_data` in Burn's layout per expert, `[experts, in, out]`, transposed here
    /// once as `take_linear` transposes.
    pub fn take_experts<B: Backend>(
        &mut self,
        prefix: &str,
        fused: &str,
        parts: &[&str],
        dims: [usize; 3],
        device: &B::Device,
    ) -> Tensor<B, 3> {
        let Some(data) = self.take_experts_data(prefix, fused, parts, dims) else {
            return placeholder(device);
        };
        let [experts, n_out, n_in] = [dims[0], parts.len() * dims[1], dims[2]];
        let elem = data.dtype.size();
        let transposed: Vec<u8> = data
            .as_bytes()
            .chunks_exact(n_out * n_in * elem)
            .flat_map(|w| transpose_bytes(w, n_out, n_in, elem))
            .collect();
        let data = TensorData::from_bytes_vec(transposed, [experts, n_in, n_out], data.dtype);
        self.tensor(data, device)
    }

    fn tensor<B: Backend, const D: usize>(
        &self,
        data: TensorData,
        device: &B::Device,
    ) -> Tensor<B, D> {
        Tensor::from_data(data, (device, burn_dtype(self.dtype)))
    }

    /// Checks and converts one tensor; None (with the problem recorded) when it cannot be used.
    pub(crate) fn take_data(&mut self, key: &str, shape: &[usize]) -> Option<TensorData> {
        self.taken.insert(key.to_string());
        let Some(&shard_idx) = self.keys.get(key) else {
            self.problems.push(LoadProblem::Missing {
                key: key.to_string(),
                expected: shape.to_vec(),
            });
            return None;
        };
        let shard = &self.shards[shard_idx];
        let info = shard
            .metadata
            .info(key)
            .expect("key map built from this shard's metadata");
        if info.shape != shape {
            self.problems.push(LoadProblem::ShapeMismatch {
                key: key.to_string(),
                expected: shape.to_vec(),
                got: info.shape.clone(),
            });
            return None;
        }
        if !self.problems.is_empty() {
            return None;
        }
        Some(convert(
            shard.bytes(info),
            info.dtype,
            self.dtype,
            shape.to_vec(),
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every problem met so far, and every tensor in the files that nothing took.
    pub fn problems(&self) -> Vec<LoadProblem> {
        let unexpected: BTreeSet<&String> = self
            .keys
            .keys()
            .filter(|k| !self.taken.contains(*k) && !is_ignorable(k))
            .collect();
        let mut problems = self.problems.clone();
        problems.extend(
            unexpected
                .into_iter()
                .map(|k| LoadProblem::Unexpected { key: k.clone() }),
        );
        problems
    }

    /// Ends loading: an error listing every problem (see `problems`).
    pub fn finish(self) -> Result<(), LoadError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LoadError::Mismatch {
                dir: self.dir,
                problems,
            })
        }
    }
}

/// Buffers some exporters save that carry no weights.
fn is_ignorable(key: &str) -> bool {
    key.ends_with("rotary_emb.inv_freq")
}

fn placeholder<B: Backend, const D: usize>(device: &B::Device) -> Tensor<B, D> {
    Tensor::zeros([1; D], device)
}

/// Row-major `[rows, cols]` of `elem`-byte elements to row-major `[cols, rows]`.
fn transpose_bytes(bytes: &[u8], rows: usize, cols: usize, elem: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let src = (r * cols + c) * elem;
            let dst = (c * rows + r) * elem;
            out[dst..dst + elem].copy_from_slice(&bytes[src..src + elem]);
        }
    }
    out
}

fn shard_files(index: &Path) -> Result<Vec<String>, LoadError> {
    let text = std::fs::read_to_string(index).map_err(|source| LoadError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| LoadError::BadIndex {
        path: index.to_path_buf(),
        reason,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let mut files = BTreeSet::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[\"{key}\"] is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!(
                "weight_map[\"{key}\"] = \"{file}\" is not a file name in the model directory"
            )));
        }
        files.insert(file.to_string());
    }
    Ok(files.into_iter().collect())
}

/// Converts little-endian safetensors bytes to `to`, in one pass from the mapped file.
fn convert(bytes: &[u8], from: StDtype, to: Dtype, shape: Vec<usize>) -> TensorData {
    fn read<T: bytemuck::Pod>(bytes: &[u8]) -> impl Iterator<Item = T> + '_ {
        // mmap offsets need not be aligned for T, so read element by element.
        bytes
            .chunks_exact(std::mem::size_of::<T>())
            .map(bytemuck::pod_read_unaligned)
    }
    let as_f32: Box<dyn Iterator<Item = f32>> = match from {
        StDtype::F32 if to == Dtype::F32 => {
            return TensorData::from_bytes_vec(bytes.to_vec(), shape, DType::F32)
        }
        StDtype::F16 if to == Dtype::F16 => {
            return TensorData::from_bytes_vec(bytes.to_vec(), shape, DType::F16)
        }
        StDtype::BF16 if to == Dtype::Bf16 => {
            return TensorData::from_bytes_vec(bytes.to_vec(), shape, DType::BF16)
        }
        StDtype::F32 => Box::new(read::<f32>(bytes)),
        StDtype::F16 => Box::new(read::<f16>(bytes).map(f16::to_f32)),
        StDtype::BF16 => Box::new(read::<bf16>(bytes).map(bf16::to_f32)),
        other => unreachable!("dtype {other:?} rejected in Checkpoint::open"),
    };
    match to {
        Dtype::F32 => TensorData::new(as_f32.collect::<Vec<f32>>(), shape),
        Dtype::F16 => TensorData::new(as_f32.map(f16::from_f32).collect::<Vec<f16>>(), shape),
        Dtype::Bf16 => TensorData::new(as_f32.map(bf16::from_f32).collect::<Vec<bf16>>(), shape),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_bytes_swaps_rows_and_columns() {
        // [[1, 2, 3], [4, 5, 6]] as u16 -> [[1, 4], [2, 5], [3, 6]]
        let src: Vec<u8> = [1u16, 2, 3, 4, 5, 6]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let want: Vec<u8> = [1u16, 4, 2, 5, 3, 6]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(transpose_bytes(&src, 2, 3, 2), want);
        assert_eq!(transpose_bytes(&want, 3, 2, 2), src);
    }

    #[test]
    fn conversion_between_dtypes_rounds_like_torch() {
        let bf: Vec<u8> = [bf16::from_f32(1.5), bf16::from_f32(-0.09375)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let data = convert(&bf, StDtype::BF16, Dtype::F32, vec![2]);
        assert_eq!(data.to_vec::<f32>().unwrap(), vec![1.5, -0.09375]);
        let f: Vec<u8> = [1.0f32 + 1.0 / 512.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        // round-to-nearest-even: 1 + 2^-9 is halfway between two bf16 values and rounds to 1.0
        let data = convert(&f, StDtype::F32, Dtype::Bf16, vec![1]);
        assert_eq!(data.to_vec::<bf16>().unwrap(), vec![bf16::from_f32(1.0)]);
    }
}
