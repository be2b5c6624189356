//! `LoraConfig`: PEFT's `LoraConfig` field names, as `adapter_config.json` carries them.
//! Reading is lenient (unknown fields are ignored, absent ones take PEFT's defaults); settings that
//! would change the computation and that swift-rs does not implement are refused by `check`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `target_modules`: module-name suffixes, or (a string in PEFT) one regex over full names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
}

/// As the config file writes it: `["q_proj", "v_proj"]`, or a regex as a quoted string.
impl std::fmt::Display for TargetModules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let json = match self {
            Self::Names(names) => serde_json::to_string(names),
            Self::Regex(regex) => serde_json::to_string(regex),
        };
        f.write_str(&json.map_err(|_| std::fmt::Error)?)
    }
}

/// PEFT's `init_lora_weights`: true (Kaiming-uniform A, zero B), false (random B too), or a
/// method name such as "gaussian".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    Flag(bool),
    Method(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    #[serde(default = "default_task_type")]
    pub task_type: Option<String>,
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: Option<TargetModules>,
    /// Modules excluded even when `target_modules` matches them (same forms).
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// A trained bias on lora_B (PEFT's LoRA-bias); not supported.
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "default_init")]
    pub init_lora_weights: InitLoraWeights,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "default_true")]
    pub inference_mode: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, Value>,
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    #[serde(default)]
    pub revision: Option<String>,
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_task_type() -> Option<String> {
    Some("CAUSAL_LM".into())
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}
fn default_init() -> InitLoraWeights {
    InitLoraWeights::Flag(true)
}
fn default_true() -> bool {
    true
}

impl LoraConfig {
    /// The problem of an adapter whose targets select no linear layer of the model.
    pub fn matches_nothing(&self) -> String {
        match &self.target_modules {
            Some(t) => format!("target_modules {t} matches no linear layer of this model"),
            None => "the adapter config names no target_modules".into(),
        }
    }

    /// A config as swift-rs writes it for training: `target_modules` as given (suffixes or
    /// "all-linear", resolved to names when the model is built).
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> Self {
        Self {
            peft_type: default_peft_type(),
            task_type: default_task_type(),
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: Some(target_modules),
            exclude_modules: None,
            use_rslora: false,
            use_dora: false,
            bias: default_bias(),
            fan_in_fan_out: false,
            lora_bias: false,
            modules_to_save: None,
            init_lora_weights: default_init(),
            base_model_name_or_path: None,
            inference_mode: true,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            revision: None,
        }
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Refuses what would make the adapter compute something else here than in PEFT.
    /// The error names the field.
    pub fn check(&self) -> Result<(), String> {
        if self.peft_type != "LORA" {
            return Err(format!(
                "peft_type \"{}\": only LORA adapters are supported",
                self.peft_type
            ));
        }
        if self.r == 0 {
            return Err("r must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(format!(
                "lora_dropout {} is not in [0, 1)",
                self.lora_dropout
            ));
        }
        if self.bias != "none" {
            return Err(format!(
                "bias \"{}\": only \"none\" is supported",
                self.bias
            ));
        }
        if self.lora_bias {
            return Err("lora_bias = true is not supported".into());
        }
        if self.fan_in_fan_out {
            return Err("fan_in_fan_out = true is for GPT-2-style Conv1D layers, which these models do not have".into());
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err("modules_to_save is not supported (only LoRA weights are trained)".into());
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return Err("rank_pattern / alpha_pattern are not supported".into());
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return Err("layers_to_transform is not supported".into());
        }
        if self.target_modules.is_none() {
            return Err("target_modules is missing".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_peft_written_configs_leniently() {
        let json = r#"{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
            "use_rslora": true, "some_future_field": {"x": 1}, "init_lora_weights": "gaussian"}"#;
        let c: LoraConfig = serde_json::from_str(json).unwrap();
        c.check().unwrap();
        assert_eq!(c.r, 16);
        assert_eq!(c.scaling(), 32.0 / 4.0);
        assert_eq!(
            c.init_lora_weights,
            InitLoraWeights::Method("gaussian".into())
        );
        let c: LoraConfig =
            serde_json::from_str(r#"{"r": 4, "lora_alpha": 8, "target_modules": ".*proj"}"#)
                .unwrap();
        assert_eq!(
            c.target_modules,
            Some(TargetModules::Regex(".*proj".into()))
        );
        assert_eq!(c.scaling(), 2.0);
    }

    #[test]
    fn refuses_what_it_cannot_compute() {
        let mut c = LoraConfig::new(8, 16.0, TargetModules::Names(vec!["q_proj".into()]));
        c.check().unwrap();
        c.bias = "all".into();
        assert!(c.check().unwrap_err().contains("bias"));
        let mut c = LoraConfig::new(8, 16.0, TargetModules::Names(vec![]));
        c.modules_to_save = Some(vec!["lm_head".into()]);
        assert!(c.check().unwrap_err().contains("modules_to_save"));
    }
}
