//! The decoder: layers, RoPE, strict checkpoint loading and the chunked loss.

mod decoder;
pub mod load;
pub mod loss;
pub mod rope;

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::DType;

pub use decoder::{Attention, Batch, CausalLm, DecoderLayer, DecoderModel, Mlp, RmsNorm};
pub use load::{Checkpoint, LoadError};

use crate::config::{ConfigError, Dtype, ModelConfig};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
}

pub(crate) fn burn_dtype(dtype: Dtype) -> DType {
    match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    }
}

/// Loads a Hugging Face model directory. `dtype` None means the dtype config.json names
/// (float32 when it names none, as transformers' `from_pretrained` does).
pub fn load<B: Backend>(
    dir: &Path,
    dtype: Option<Dtype>,
    device: &B::Device,
) -> Result<(ModelConfig, CausalLm<B>), ModelError> {
    let config = ModelConfig::from_dir(dir)?;
    let dtype = dtype.or(config.dtype).unwrap_or(Dtype::F32);
    let mut ckpt = Checkpoint::open(dir, dtype)?;
    let model = CausalLm::load(&config, &mut ckpt, device);
    ckpt.finish()?;
    Ok((config, model))
}
