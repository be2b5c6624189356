//! `LoraConfig`: PEFT's `LoraConfig` field names, as `adapter_config.json` carries them.
//! Reading is lenient (unknown fields are ignored, absent ones take PEFT's defaults); settings that
//! would change the computation and that swift-rs does not implement are refused by `check`.

use indexmap::IndexMap;
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
    /// Parameters adapted in place (PEFT's `ParamWrapper`), named as `target_modules` are but
    /// ending in the parameter: `mlp.experts.gate_up_proj`, transformers 5's fused experts.
    #[serde(default)]
    pub target_parameters: Option<Vec<String>>,
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
    /// `r` and `lora_alpha` for the modules (or parameters) a pattern matches, as PEFT's
    /// `get_pattern_key` finds them: the first key `k` with `(.*\.)?(k)$` matching the name.
    #[serde(default)]
    pub rank_pattern: IndexMap<String, Value>,
    #[serde(default)]
    pub alpha_pattern: IndexMap<String, Value>,
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
            target_parameters: None,
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
            rank_pattern: IndexMap::new(),
            alpha_pattern: IndexMap::new(),
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

    /// This config with `r` and `lora_alpha` as `rank_pattern` and `alpha_pattern` set them for
    /// the module or parameter `name` (`model.layers.0.mlp.experts.gate_up_proj`).
    pub fn for_target(&self, name: &str) -> Self {
        let mut out = self.clone();
        if let Some(r) = pattern_value(&self.rank_pattern, name) {
            out.r = r as usize;
        }
        if let Some(alpha) = pattern_value(&self.alpha_pattern, name) {
            out.lora_alpha = alpha;
        }
        out
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
        for (field, patterns) in [
            ("rank_pattern", &self.rank_pattern),
            ("alpha_pattern", &self.alpha_pattern),
        ] {
            for (key, value) in patterns {
                let valid = value.as_f64().is_some_and(|v| v > 0.0)
                    && (field == "alpha_pattern" || value.as_u64().is_some());
                if !valid {
                    return Err(format!(
                        "{field}: \"{key}\" has {value}, not a positive number"
                    ));
                }
                if pattern_regex(key).is_err() {
                    return Err(format!("{field}: \"{key}\" is not a valid regex"));
                }
            }
        }
        if self
            .target_parameters
            .as_ref()
            .is_some_and(|t| !t.is_empty())
        {
            // As PEFT's ParamWrapper refuses them.
            if self.use_dora {
                return Err("use_dora = true does not work with target_parameters".into());
            }
            if self.lora_dropout > 0.0 {
                return Err("lora_dropout > 0 does not work with target_parameters".into());
            }
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

/// The value of the first pattern in `patterns` that matches `name`.
fn pattern_value(patterns: &IndexMap<String, Value>, name: &str) -> Option<f64> {
    patterns
        .iter()
        .find(|(key, _)| pattern_regex(key).is_ok_and(|r| r.is_match(name)))
        .and_then(|(_, v)| v.as_f64())
}

fn pattern_regex(key: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
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
        let mut c = LoraConfig::new(8, 16.0, TargetModules::Names(vec![]));
        c.target_parameters = Some(vec!["mlp.experts.down_proj".into()]);
        c.check().unwrap();
        c.use_dora = true;
        assert!(c.check().unwrap_err().contains("target_parameters"));
    }

    /// As PEFT's own all-linear on Qwen3-MoE writes them: gate_up_proj fuses two projections,
    /// so it takes twice the rank.
    #[test]
    fn rank_and_alpha_patterns_set_matching_targets() {
        let json = r#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
            "rank_pattern": {".*\\.gate_up_proj": 4, "q_proj": 3},
            "alpha_pattern": {".*\\.gate_up_proj": 8}}"#;
        let c: LoraConfig = serde_json::from_str(json).unwrap();
        c.check().unwrap();
        let fused = c.for_target("model.layers.0.mlp.experts.gate_up_proj");
        assert_eq!((fused.r, fused.lora_alpha, fused.scaling()), (4, 8.0, 2.0));
        let down = c.for_target("model.layers.0.mlp.experts.down_proj");
        assert_eq!((down.r, down.lora_alpha), (2, 4.0));
        assert_eq!(c.for_target("model.layers.0.self_attn.q_proj").r, 3);
        assert_eq!(c.for_target("model.layers.0.self_attn.kq_proj").r, 2);
        let bad = r#"{"r": 2, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": 0}}"#;
        let c: LoraConfig = serde_json::from_str(bad).unwrap();
        assert!(c.check().unwrap_err().contains("rank_pattern: \"q_proj\""));
    }
}
