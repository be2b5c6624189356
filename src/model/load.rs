//! Strict safetensors loading: one file or shards listed by `model.safetensors.index.json`,
//! memory-mapped, converted straight from the mapped bytes into the compute dtype, so a tensor
//! exists once in memory. Every missing, unexpected and mis-shaped tensor is collected and
//! reported in one error (nanoGPT asserts key counts; this lists them).

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    #[error("the checkpoint in {dir} does not fit the model config ({} problems):\n    {}", .problems.len(), .problems.join("\n    "))]
    Mismatch { dir: PathBuf, problems: Vec<String> },
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
    problems: Vec<String>,
    dtype: Dtype,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or every shard named in `model.safetensors.index.json`.
    /// Tensors are converted to `dtype` as they are taken.
    pub fn open(dir: &Path, dtype: Dtype) -> Result<Self, LoadError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            shard_files(&index)?
                .into_iter()
                .map(|f| dir.join(f))
                .collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(LoadError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };
        let shards = files
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

    /// Whether the checkpoint holds `key` (for optional tensors such as a tied lm_head).
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// Marks `key` as expected without loading it (a tied `lm_head.weight` some exporters write).
    pub fn skip(&mut self, key: &str) {
        self.taken.insert(key.to_string());
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
        self.taken.insert(key.to_string());
        let Some(&shard_idx) = self.keys.get(key) else {
            self.problems
                .push(format!("missing tensor {key} (expected shape {shape:?})"));
            return placeholder(device);
        };
        let shard = &self.shards[shard_idx];
        let info = shard
            .metadata
            .info(key)
            .expect("key map built from this shard's metadata");
        if info.shape != shape {
            self.problems.push(format!(
                "tensor {key} has shape {:?}, expected {shape:?}",
                info.shape
            ));
            return placeholder(device);
        }
        if !self.problems.is_empty() {
            return placeholder(device);
        }
        let data = convert(shard.bytes(info), info.dtype, self.dtype, shape.to_vec());
        Tensor::from_data(data, (device, burn_dtype(self.dtype)))
    }

    /// Ends loading: an error listing every problem, and every tensor in the files the model
    /// has no place for.
    pub fn finish(self) -> Result<(), LoadError> {
        let mut problems = self.problems;
        let unexpected: BTreeSet<&String> = self
            .keys
            .keys()
            .filter(|k| !self.taken.contains(*k) && !is_ignorable(k))
            .collect();
        problems.extend(
            unexpected
                .into_iter()
                .map(|k| format!("unexpected tensor {k}")),
        );
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
    let mut files = BTreeMap::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[\"{key}\"] is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!(
                "weight_map[\"{key}\"] = \"{file}\" is not a file name in the model directory"
            )));
        }
        files.insert(file.to_string(), ());
    }
    Ok(files.into_keys().collect())
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
