//! A model (its adapter merged on the fly) written as one GGUF file that llama.cpp, Ollama and
//! LM Studio load: the metadata and tensor layout of llama.cpp's `convert_hf_to_gguf.py`, and the
//! blocks of its `llama-quantize`. Streams as `merge` does: one tensor in memory at a time.

mod file;
mod model;
mod quants;
mod vocab;

pub use file::{Gguf, TensorInfo, Value};
pub use quants::GgmlType;

use std::path::Path;
use std::time::Instant;

use super::merge::{MergeError, MergedWeights};
use super::ExportError;
use crate::config::ModelConfig;
use crate::model::{ModelBackend, ModelError};
use model::Source;

/// What `--gguf_type` names: the type of the weight matrices (vectors stay f32, as llama.cpp
/// keeps them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl std::str::FromStr for GgufType {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        let all = [Self::F32, Self::F16, Self::Bf16, Self::Q8_0];
        all.into_iter()
            .find(|t| t.name() == name.to_ascii_lowercase())
            .ok_or_else(|| {
                let names: Vec<&str> = all.iter().map(|t| t.name()).collect();
                format!("{name:?} is not one of {}", names.join(", "))
            })
    }
}

impl GgufType {
    /// `general.file_type`: llama.cpp's `llama_ftype`.
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Bf16 => 32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
        }
    }

    /// The type of a tensor of `shape`: vectors f32; a matrix whose rows are not whole blocks
    /// f16, as `llama-quantize` falls back.
    fn tensor_type(self, shape: &[usize]) -> GgmlType {
        let ty = match self {
            _ if shape.len() < 2 => return GgmlType::F32,
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::Bf16 => GgmlType::Bf16,
            Self::Q8_0 => GgmlType::Q8_0,
        };
        match shape.last().is_some_and(|n| n % ty.block_size() == 0) {
            true => ty,
            false => GgmlType::F16,
        }
    }
}

pub struct GgufOptions {
    pub gguf_type: GgufType,
}

/// What was written, for the report.
pub struct GgufReport {
    pub merged_modules: usize,
    pub tensors: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// Writes the model in `model_dir`, with the PEFT adapter in `adapter_dir` merged, to `output`.
pub fn export_gguf<B: ModelBackend>(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    output: &Path,
    options: &GgufOptions,
    device: &B::Device,
) -> Result<GgufReport, MergeError> {
    let start = Instant::now();
    if output.exists() {
        return Err(MergeError::Usage(format!(
            "{} already exists; export writes a new file",
            output.display()
        )));
    }
    let config = ModelConfig::from_dir(model_dir).map_err(ModelError::from)?;
    let unfit = |reason: String| {
        MergeError::Usage(format!(
            "{} cannot be written to GGUF: {reason}",
            model_dir.display()
        ))
    };
    model::check(&config).map_err(unfit)?;
    let raw = read_config(model_dir)?;
    let mut weights = MergedWeights::<B>::open(model_dir, &config, adapter_dir, device)?;
    let planned = model::plan(&config, &weights.tensors()).map_err(unfit)?;

    let name = model_dir
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::Str(model::arch_name(config.arch).into()),
        ),
        ("general.type".to_string(), Value::Str("model".into())),
        ("general.name".to_string(), Value::Str(name)),
    ];
    metadata.extend(model::hparams(&config, &raw).map_err(unfit)?);
    metadata.push((
        "general.file_type".into(),
        Value::U32(options.gguf_type.file_type()),
    ));
    // ggml's GGML_QNT_VERSION, which every writer of llama.cpp's sets.
    metadata.push(("general.quantization_version".into(), Value::U32(2)));
    metadata.extend(vocab::metadata(model_dir, config.vocab_size).map_err(unfit)?);

    let infos: Vec<TensorInfo> = planned
        .iter()
        .map(|p| TensorInfo {
            name: p.name.clone(),
            shape: p.shape.clone(),
            ty: options.gguf_type.tensor_type(&p.shape),
        })
        .collect();
    let bytes = file::write(output, &metadata, &infos, |info| {
        let p = planned
            .iter()
            .find(|p| p.name == info.name)
            .expect("infos come from the plan");
        let values = match &p.source {
            Source::Values(values) => values.clone(),
            Source::Checkpoint { key, permute } => {
                let data = weights.take(key, &p.shape)?;
                let values = data.to_vec::<f32>().expect("merged tensors are f32");
                match permute {
                    Some(heads) => {
                        let cols = p.shape.get(1).copied().unwrap_or(1);
                        model::permute_rows(&values, *heads, cols)
                    }
                    None => values,
                }
            }
        };
        Ok::<_, MergeError>(info.ty.encode(&values))
    })?;
    Ok(GgufReport {
        merged_modules: weights.merged,
        tensors: infos.len(),
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn read_config(model_dir: &Path) -> Result<serde_json::Value, ExportError> {
    let path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ExportError::Read {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ExportError::Invalid {
        path,
        reason: e.to_string(),
    })
}
