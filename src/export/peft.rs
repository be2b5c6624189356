//! PEFT's adapter format: `adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r] and, for DoRA,
//! `.lora_magnitude_vector` [out]. Written so PEFT's `PeftModel.from_pretrained` loads it.

use std::collections::BTreeSet;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use safetensors::tensor::TensorView;

use super::{ExportError, StagedDir};
use crate::config::{Dtype, LoraConfig, TargetModules};
use crate::lora::{peft_key, Targets, LORA_A, LORA_B, MAGNITUDE};
use crate::model::{AdapterSource, CausalLm, Checkpoint, LoraPlan};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Reads a PEFT adapter directory into a plan the model builder loads it from.
pub fn read_adapter(dir: &Path) -> Result<LoraPlan, ExportError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| ExportError::Read {
        path: path.clone(),
        source,
    })?;
    let bad = |reason: String| ExportError::Invalid {
        path: path.clone(),
        reason,
    };
    let config: LoraConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    config.check().map_err(bad)?;
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.exists() {
        let reason = if dir.join("adapter_model.bin").exists() {
            "only adapter_model.bin (a pickle) is present; save the adapter with safe_serialization=True"
        } else {
            "file not found"
        };
        return Err(ExportError::Invalid {
            path: weights,
            reason: reason.into(),
        });
    }
    let ckpt = Checkpoint::open_files(dir, &[weights], Dtype::F32)?;
    Ok(LoraPlan {
        config,
        source: AdapterSource::Weights(ckpt),
    })
}

/// Writes the model's adapters as a PEFT adapter directory (replacing `dir` atomically).
pub fn save_adapter<B: Backend>(
    model: &CausalLm<B>,
    config: &LoraConfig,
    dir: &Path,
) -> Result<(), ExportError> {
    let staged = StagedDir::new(dir)?;
    for (name, bytes) in adapter_files(model, config)? {
        staged.write(name, &bytes)?;
    }
    staged.commit()
}

/// The files of a PEFT adapter directory, by name: `adapter_config.json` and
/// `adapter_model.safetensors`. `target_modules` is written as PEFT writes it after resolving
/// "all-linear": the set of suffixes of the linear modules that carry adapters (a regex is kept
/// as given); adapters on parameters (`target_parameters`) are not modules PEFT could wrap.
pub fn adapter_files<B: Backend>(
    model: &CausalLm<B>,
    config: &LoraConfig,
) -> Result<Vec<(&'static str, Vec<u8>)>, ExportError> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let targets = Targets::of(config).map_err(|e| ExportError::Invalid {
        path: CONFIG_FILE.into(),
        reason: e,
    })?;
    let mut modules: Vec<String> = model
        .lora_linears()
        .into_iter()
        .filter(|(_, l)| l.adapter.is_some())
        .map(|(name, _)| name)
        .collect();
    // The router and transformers 4.x's per-expert linears, when adapted as modules.
    modules.extend(model.named_adapters().map(|(name, _)| name).filter(|name| {
        targets.names(name) && !targets.matches_parameter(&format!("{name}.weight"))
    }));
    let suffixes: BTreeSet<String> = modules
        .iter()
        .map(|name| name.rsplit('.').next().unwrap_or(name).to_string())
        .collect();
    for (name, l) in model.named_adapters() {
        let key = |part: &str| peft_key(&name, part);
        // Burn keeps [in, r] / [r, out]; PEFT's files hold the transposes.
        tensors.push(f32_entry(key(LORA_A), l.lora_a.val().transpose()));
        tensors.push(f32_entry(key(LORA_B), l.lora_b.val().transpose()));
        if let Some(m) = &l.lora_magnitude_vector {
            tensors.push(f32_entry(key(MAGNITUDE), m.val()));
        }
    }
    let mut config = config.clone();
    config.inference_mode = true;
    if !matches!(config.target_modules, Some(TargetModules::Regex(_))) {
        config.target_modules = Some(TargetModules::Names(suffixes.into_iter().collect()));
    }
    let weights = f32_safetensors(&tensors).map_err(|e| ExportError::Write {
        path: WEIGHTS_FILE.into(),
        source: std::io::Error::other(e),
    })?;
    let config_json = serde_json::to_vec_pretty(&config).expect("LoraConfig serialises");
    Ok(vec![(CONFIG_FILE, config_json), (WEIGHTS_FILE, weights)])
}

/// A safetensors file of f32 tensors `(key, shape, little-endian bytes)`, marked as PyTorch's
/// ("format": "pt") as transformers and PEFT write theirs.
pub fn f32_safetensors(tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Result<Vec<u8>, String> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, shape, bytes)| {
            let view = TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .expect("shape and byte count come from one tensor");
            (k.clone(), view)
        })
        .collect();
    let metadata = Some([("format".to_string(), "pt".to_string())].into());
    safetensors::serialize(views, metadata).map_err(|e| e.to_string())
}

/// A tensor as `(key, shape, little-endian f32 bytes)` for `f32_safetensors`.
pub fn f32_entry<B: Backend, const D: usize>(
    key: String,
    t: Tensor<B, D>,
) -> (String, Vec<usize>, Vec<u8>) {
    let data = t.cast(DType::F32).into_data();
    let shape = data.shape.to_vec();
    let bytes = data
        .to_vec::<f32>()
        .expect("cast to f32")
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    (key, shape, bytes)
}
