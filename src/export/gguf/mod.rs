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

use burn::tensor::TensorData;

use super::merge::{check_output, MergeError, MergedWeights};
use super::peft::read_adapter;
use super::ExportError;
use crate::config::ModelConfig;
use crate::lora::{peft_key, Targets, LORA_A, LORA_B};
use crate::model::{AdapterSource, ModelBackend, ModelError};
use model::Source;

/// What `--gguf_type` names: llama.cpp's file types (`llama-quantize`'s names). Vectors stay
/// f32 in every one, as llama.cpp keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    /// q4_K, with q6_K for half the attention values and feed-forward outputs and the output.
    Q4KM,
    /// q5_K, with q6_K where q4_k_m has it.
    Q5KM,
    Q6K,
}

impl std::str::FromStr for GgufType {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == name.to_ascii_lowercase())
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
                format!("{name:?} is not one of {}", names.join(", "))
            })
    }
}

/// What llama-quantize's choice of a tensor's type depends on besides its name and shape.
struct Mix {
    n_layers: usize,
    /// An `output.weight` of its own; otherwise the token embedding serves as the output.
    has_output: bool,
    /// llama.cpp's 70B class (80 layers: llama with grouped heads, qwen2), whose attention values
    /// get more bits.
    large: bool,
}

impl GgufType {
    const ALL: [Self; 8] = [
        Self::F32,
        Self::F16,
        Self::Bf16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4KM,
        Self::Q5KM,
        Self::Q6K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4KM => "q4_k_m",
            Self::Q5KM => "q5_k_m",
            Self::Q6K => "q6_k",
        }
    }

    /// `general.file_type`: llama.cpp's `llama_ftype`.
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
            Self::Q5KM => 17,
            Self::Q6K => 18,
            Self::Bf16 => 32,
        }
    }

    /// The type of the matrices that no rule below changes.
    fn default_type(self) -> GgmlType {
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::Bf16 => GgmlType::Bf16,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4KM => GgmlType::Q4K,
            Self::Q5KM => GgmlType::Q5K,
            Self::Q6K => GgmlType::Q6K,
        }
    }

    /// The type of tensor `name` of `shape`, as llama-quantize chooses it for this file type
    /// (`llama_tensor_get_type` without an importance matrix or overrides), from an f32 file.
    fn tensor_type(self, name: &str, shape: &[usize], mix: &Mix) -> GgmlType {
        // The converter keeps Gated DeltaNet's small conv kernels in f32, and the quantizer
        // leaves them.
        if name.ends_with("ssm_conv1d.weight") {
            return GgmlType::F32;
        }
        let default = self.default_type();
        if shape.len() < 2 || default.block_size() == 1 {
            return if shape.len() < 2 {
                GgmlType::F32
            } else {
                default
            };
        }
        let cols = shape[shape.len() - 1];
        let layer = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let n = mix.n_layers;
        let more_bits = layer.is_some_and(|i| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2);
        let k_mix = matches!(self, Self::Q4KM | Self::Q5KM);
        let chosen = if name == "output.weight" || (!mix.has_output && name == "token_embd.weight")
        {
            match (cols % default.block_size() == 0, default) {
                (false, _) => GgmlType::Q8_0,
                (true, GgmlType::Q8_0) => GgmlType::Q8_0,
                (true, _) => GgmlType::Q6K,
            }
        } else if name.ends_with("attn_v.weight") || name.ends_with("attn_qkv.weight") {
            // The quantizer ranks a fused qkv (Qwen3.5's Gated DeltaNet input) with attn_v.
            match (k_mix && more_bits, default) {
                (true, _) => GgmlType::Q6K,
                (false, GgmlType::Q4K) if mix.large => GgmlType::Q5K,
                _ => default,
            }
        } else if name.ends_with("ffn_down.weight") && k_mix && more_bits {
            GgmlType::Q6K
        } else {
            default
        };
        // Rows that are not whole blocks of the choice take a type of smaller blocks.
        if cols % chosen.block_size() == 0 {
            return chosen;
        }
        let fallback = match chosen {
            GgmlType::Q4K => GgmlType::Q5_0,
            GgmlType::Q5K => GgmlType::Q5_1,
            GgmlType::Q6K => GgmlType::Q8_0,
            other => other,
        };
        match cols % fallback.block_size() == 0 {
            true => fallback,
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
    check_output(output, "export writes a new file")?;
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
    metadata.extend(
        vocab::metadata(
            model_dir,
            &raw,
            model::arch_name(config.arch),
            config.vocab_size,
        )
        .map_err(unfit)?,
    );

    let arch = model::arch_name(config.arch);
    let mix = Mix {
        n_layers: config.num_hidden_layers,
        has_output: planned.iter().any(|p| p.name == "output.weight"),
        large: config.num_hidden_layers == 80
            && (arch == "qwen2"
                || (arch == "llama" && config.num_attention_heads != config.num_key_value_heads)),
    };
    let infos: Vec<TensorInfo> = planned
        .iter()
        .map(|p| TensorInfo {
            name: p.name.clone(),
            shape: p.shape.clone(),
            ty: options.gguf_type.tensor_type(&p.name, &p.shape, &mix),
        })
        .collect();
    // `write` asks for the tensors in the order of `infos`, which is the plan's.
    let mut plan = planned.iter();
    let bytes = file::write(output, &metadata, &infos, |info| {
        let p = plan.next().expect("one planned tensor per info");
        let values = match &p.source {
            Source::Values(values) => values.clone(),
            Source::Checkpoint { key, stored, edits } => {
                let values = f32s(weights.take(key, stored)?);
                let cols = p.shape.get(1).copied().unwrap_or(1);
                edits.iter().fold(values, |v, edit| edit.apply(v, cols))
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

/// Writes the PEFT adapter in `adapter_dir` as llama.cpp's LoRA GGUF (`llama-cli --lora`), for
/// the model in `model_dir`: each update's A and B under its module's GGUF name, as llama.cpp's
/// `convert_lora_to_gguf.py` writes them.
pub fn export_gguf_lora(
    model_dir: &Path,
    adapter_dir: &Path,
    output: &Path,
    options: &GgufOptions,
) -> Result<GgufReport, MergeError> {
    let start = Instant::now();
    check_output(output, "export writes a new file")?;
    let ty = match options.gguf_type {
        GgufType::F32 => GgmlType::F32,
        GgufType::F16 => GgmlType::F16,
        GgufType::Bf16 => GgmlType::Bf16,
        other => {
            return Err(MergeError::Usage(format!(
                "--gguf_type {}: a LoRA GGUF holds f32, f16 or bf16 (its matrices are small)",
                other.name()
            )))
        }
    };
    let config = ModelConfig::from_dir(model_dir).map_err(ModelError::from)?;
    let plan = read_adapter(adapter_dir)?;
    let lora = &plan.config;
    let unfit = |reason: String| {
        MergeError::Usage(format!(
            "{} cannot be a llama.cpp LoRA: {reason}",
            adapter_dir.display()
        ))
    };
    model::check_lora_arch(&config).map_err(unfit)?;
    if lora.use_dora {
        return Err(unfit(
            "it is DoRA, whose magnitudes llama.cpp's LoRA has no place for; export the model \
             with the adapter merged (--to gguf)"
                .into(),
        ));
    }
    if !lora.rank_pattern.is_empty() || !lora.alpha_pattern.is_empty() {
        // llama.cpp scales every tensor by one alpha over that tensor's rank.
        return Err(unfit(
            "it sets rank_pattern / alpha_pattern, and llama.cpp's LoRA has one alpha for all \
             layers; export the model with the adapter merged (--to gguf)"
                .into(),
        ));
    }
    let AdapterSource::Weights(mut weights) = plan.source else {
        unreachable!("read_adapter returns weights")
    };
    let targets = Targets::of(lora).map_err(unfit)?;
    let mut tensors = Vec::new();
    for (module, n_in, n_out) in config.adaptable_linears() {
        if !targets.matches(&module) {
            continue;
        }
        let (name, _, edits) =
            model::gguf_name(&config, &format!("{module}.weight"), &[n_out, n_in])
                .map_err(unfit)?
                .expect("adaptable linears have GGUF names");
        let a = weights.take_data(&peft_key(&module, LORA_A), &[lora.r, n_in]);
        let b = weights.take_data(&peft_key(&module, LORA_B), &[n_out, lora.r]);
        if let (Some(a), Some(b)) = (a, b) {
            let (a, b) = (f32s(a), f32s(b));
            // B's rows are the projection's outputs, which llama's rotary layout reorders (the
            // only edit of these families' linear weights).
            let b = edits.iter().fold(b, |b, edit| edit.apply(b, lora.r));
            tensors.push((format!("{name}.lora_a"), vec![lora.r, n_in], a));
            tensors.push((format!("{name}.lora_b"), vec![n_out, lora.r], b));
        }
    }
    let mut problems: Vec<String> = weights.problems().iter().map(ToString::to_string).collect();
    if tensors.is_empty() {
        problems.push(lora.matches_nothing());
    }
    if !problems.is_empty() {
        return Err(MergeError::Model(ModelError::Adapter {
            what: format!("the adapter in {}", adapter_dir.display()),
            problems,
        }));
    }
    // llama.cpp scales by alpha / r; rsLoRA's alpha / sqrt(r) is that with alpha * sqrt(r).
    let alpha = match lora.use_rslora {
        true => lora.lora_alpha * (lora.r as f64).sqrt(),
        false => lora.lora_alpha,
    };
    let name = adapter_dir
        .file_name()
        .map_or_else(|| "adapter".into(), |n| n.to_string_lossy().into_owned());
    let metadata = vec![
        (
            "general.architecture".to_string(),
            Value::Str(model::arch_name(config.arch).into()),
        ),
        ("general.type".to_string(), Value::Str("adapter".into())),
        ("adapter.type".to_string(), Value::Str("lora".into())),
        ("general.name".to_string(), Value::Str(name)),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha as f32)),
        ("general.quantization_version".to_string(), Value::U32(2)),
    ];
    let infos: Vec<TensorInfo> = tensors
        .iter()
        .map(|(name, shape, _)| TensorInfo {
            name: name.clone(),
            shape: shape.clone(),
            ty,
        })
        .collect();
    let mut values = tensors.into_iter().map(|(_, _, v)| v);
    let bytes = file::write(output, &metadata, &infos, |info| {
        let values = values.next().expect("one tensor of values per info");
        Ok::<_, MergeError>(info.ty.encode(&values))
    })?;
    Ok(GgufReport {
        merged_modules: 0,
        tensors: infos.len(),
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn f32s(data: TensorData) -> Vec<f32> {
    data.to_vec::<f32>()
        .expect("adapter tensors are read as f32")
}
