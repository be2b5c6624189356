//! The model: `batch` (the host-side input), `layers`, `gated_delta_net`, `moe` and `decoder` (a
//! stack of layers whose token mixer `layer_types` chooses and whose MLP may be experts),
//! `rope`, `mask`, `cache` (generation), `builder` and `load` (strict checkpoint loading with
//! adapters built in) and the chunked `loss`.

mod batch;
mod builder;
mod cache;
mod decoder;
mod gated_delta_net;
mod layers;
pub mod load;
pub mod loss;
mod mask;
mod moe;
pub mod rope;

use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

pub use batch::{Batch, IGNORE_INDEX};
use builder::Builder;
pub use builder::{adapts_routed_module, read_lora, AdapterSource, LoraPlan};
pub use cache::KvCache;
pub use decoder::{CausalLm, DecoderModel, LayerInputs};
pub use gated_delta_net::{GatedDeltaNet, LinearMask};
pub use layers::{
    Attention, DecoderLayer, Decoding, FeedForward, LayerCache, LayerMask, Mixer, Mlp, RmsNorm,
};
pub use load::{Checkpoint, LoadError, LoadProblem};
pub use moe::{Balance, ExpertWeights, Experts, RouterStats, Routing, SparseMoeBlock, TokenMask};
// The backend bound of everything that runs the model, for the layers above it.
pub use crate::ops::{sum, ModelBackend, TrainBackend};

use crate::config::{ConfigError, Dtype, ModelConfig, Nf4Config};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `what` is "the adapter in DIR" or "the LoRA config".
    #[error("{what} does not fit the model ({} problems):\n    {}", .problems.len(), problem_lines(.problems))]
    Adapter { what: String, problems: Vec<String> },
}

/// The problems a message lists before "and N more": a model with 100000 layers listed each.
const PROBLEMS_SHOWN: usize = 50;

/// One problem a line, indented under the error's first line; the first `PROBLEMS_SHOWN` only.
pub(crate) fn problem_lines<T: std::fmt::Display>(problems: &[T]) -> String {
    let shown: Vec<String> = problems
        .iter()
        .take(PROBLEMS_SHOWN)
        .map(T::to_string)
        .collect();
    let mut text = shown.join("\n    ");
    if problems.len() > PROBLEMS_SHOWN {
        text.push_str(&format!(
            "\n    ... and {} more",
            problems.len() - PROBLEMS_SHOWN
        ));
    }
    text
}

impl ModelError {
    /// A config.json that cannot be used, or an adapter or LoRA config that does not fit the
    /// model, is the user's to fix; bad weights files are failures while loading.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Adapter { .. })
    }
}

/// Frozen: base weights get no gradient and no optimizer state.
pub(crate) fn frozen<B: Backend, const D: usize>(t: Tensor<B, D>) -> Param<Tensor<B, D>> {
    Param::from_tensor(t).set_require_grad(false)
}

pub(crate) fn burn_dtype(dtype: Dtype) -> DType {
    match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    }
}

/// How to load a model: compute dtype (None: the dtype config.json names, float32 when it names
/// none, as transformers' `from_pretrained` does) and, for QLoRA, NF4 base weights.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    pub dtype: Option<Dtype>,
    pub quant: Option<Nf4Config>,
}

impl LoadOptions {
    pub fn dtype(dtype: Dtype) -> Self {
        Self {
            dtype: Some(dtype),
            quant: None,
        }
    }
}

/// Loads a Hugging Face model directory, with an adapter built in when `lora` is given.
pub fn load<B: ModelBackend>(
    dir: &Path,
    options: LoadOptions,
    mut lora: Option<&mut LoraPlan>,
    device: &B::Device,
) -> Result<(ModelConfig, CausalLm<B>), ModelError> {
    let dtype = options.dtype;
    let config = ModelConfig::from_dir(dir)?;
    let dtype = dtype.or(config.dtype).unwrap_or(Dtype::F32);
    let mut ckpt = Checkpoint::open(dir, dtype)?;
    let what = match lora.as_deref().map(|p| &p.source) {
        Some(AdapterSource::Weights(w)) => format!("the adapter in {}", w.dir().display()),
        _ => "the LoRA config".to_string(),
    };
    let adapter_error = |problems| ModelError::Adapter {
        what: what.clone(),
        problems,
    };
    let mut builder = Builder::new(&mut ckpt, lora.as_deref_mut(), options.quant, device)
        .map_err(|p| adapter_error(vec![p]))?;
    let model = CausalLm::build(&config, &mut builder);
    let adapted = builder.finish();
    ckpt.finish()?;
    adapted.map_err(adapter_error)?;
    Ok((config, model))
}
