//! `generation_config.json`: the generation defaults a checkpoint ships (transformers'
//! `GenerationConfig`). Read leniently: unknown keys are ignored, a missing file means defaults.

use std::path::Path;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
    /// One id or a list of them.
    pub eos_token_id: Option<TokenIds>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl GenerationConfig {
    /// `<dir>/generation_config.json`, or the defaults when there is none.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("generation_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(ConfigError::Io { path, source }),
        };
        serde_json::from_str(&text).map_err(|e| ConfigError::Invalid {
            path,
            reason: format!("not a valid generation config: {e}"),
        })
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            None => Vec::new(),
            Some(TokenIds::One(id)) => vec![*id],
            Some(TokenIds::Many(ids)) => ids.clone(),
        }
    }
}
