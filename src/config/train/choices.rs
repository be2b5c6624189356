//! The closed sets of values the training config's keys take, as typed enums: a value outside
//! them fails when the config is read, at its key and line, instead of deep inside training.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::Dtype;

/// `model.hub`: "huggingface" or "modelscope"; ms-swift's `use_hf = true / false` means the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "HubValue", rename_all = "lowercase")]
pub enum Hub {
    HuggingFace,
    ModelScope,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum HubValue {
    Name(String),
    UseHf(bool),
}

impl TryFrom<HubValue> for Hub {
    type Error = String;

    fn try_from(value: HubValue) -> Result<Self, String> {
        match value {
            HubValue::Name(name) => name.parse(),
            HubValue::UseHf(true) => Ok(Self::HuggingFace),
            HubValue::UseHf(false) => Ok(Self::ModelScope),
        }
    }
}

impl FromStr for Hub {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name.to_ascii_lowercase().as_str() {
            "huggingface" | "hf" => Ok(Self::HuggingFace),
            "modelscope" | "ms" => Ok(Self::ModelScope),
            _ => Err(format!("unknown hub {name:?} (huggingface, modelscope)")),
        }
    }
}

impl fmt::Display for Hub {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Self::HuggingFace => "Hugging Face Hub",
            Self::ModelScope => "ModelScope",
        })
    }
}

/// `model.dtype` (and `--dtype`): a compute dtype, or "auto" (None), which `resolve` turns into
/// f32 on a CPU and the checkpoint's own dtype elsewhere.
pub mod auto_dtype {
    use super::*;

    /// "auto" is None; otherwise any name `Dtype` parses (torch's `bfloat16` or `bf16`).
    pub fn parse(name: &str) -> Result<Option<Dtype>, String> {
        match name {
            "auto" => Ok(None),
            name => Dtype::parse(name)
                .map(Some)
                .ok_or_else(|| format!("{name:?} is not auto, bf16, f16 or f32")),
        }
    }

    pub fn serialize<S: serde::Serializer>(dtype: &Option<Dtype>, s: S) -> Result<S::Ok, S::Error> {
        match dtype {
            None => s.serialize_str("auto"),
            Some(d) => s.serialize_str(&d.to_string()),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Dtype>, D::Error> {
        parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// `model.template`: the model's own template, or a built-in one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateName {
    /// The model's own template; a built-in one for its model_type when it has none.
    #[default]
    Auto,
    /// The model's own template, required.
    Jinja,
    Chatml,
    Qwen,
    #[serde(rename = "qwen2_5")]
    Qwen2_5,
    Qwen3,
    #[serde(rename = "qwen3_5")]
    Qwen3_5,
    Llama3,
}

impl TemplateName {
    pub const CHOICES: &'static str = "auto, chatml, qwen, qwen2_5, qwen3, qwen3_5, llama3, jinja";
}

impl FromStr for TemplateName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Self::Auto,
            "jinja" => Self::Jinja,
            "chatml" => Self::Chatml,
            "qwen" => Self::Qwen,
            "qwen2_5" => Self::Qwen2_5,
            "qwen3" => Self::Qwen3,
            "qwen3_5" => Self::Qwen3_5,
            "llama3" => Self::Llama3,
            _ => return Err(format!("unknown template {s:?} (use {})", Self::CHOICES)),
        })
    }
}

/// `data.loss_scale`: which assistant turns take loss (ms-swift's `loss_scale`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossScale {
    /// Every assistant turn.
    Default,
    /// Only the last assistant turn.
    LastRound,
    /// Every token.
    All,
    /// As default, but an empty reasoning block opening an answer (`<think>\n\n</think>\n\n`,
    /// Qwen3's and DeepSeek-R1's when not thinking) takes no loss, so that training on answers
    /// without reasoning does not teach the model to stop reasoning.
    IgnoreEmptyThink,
}

/// `data.truncation`: what happens to a sample longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// The sample is dropped (reported as a bad row).
    Delete,
    /// The first tokens are dropped.
    Left,
    /// The last tokens are dropped.
    Right,
}

/// `data.on_bad_row`: what a row that cannot be used does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRow {
    /// Stop, naming the file and line or row.
    Error,
    /// Count it, go on, and report the count and the first reasons.
    Skip,
}

/// `lora.init`: how a fresh adapter starts (B is zero either way, so training starts at the base
/// model's output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraInit {
    /// A Kaiming-uniform, as PEFT's `init_lora_weights = true`.
    Default,
    /// A normal with std 1/r, as PEFT's `init_lora_weights = "gaussian"`.
    Gaussian,
}

/// `quant.type`: the 4-bit format of QLoRA's frozen weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// bitsandbytes' 4-bit NormalFloat.
    Nf4,
}

/// `train.optimizer` (ms-swift's `optim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// PyTorch's AdamW (transformers' `adamw_torch`).
    #[serde(alias = "adamw_torch")]
    AdamW,
    Sgd,
}

impl OptimizerKind {
    /// The config's name for it, as trainer_state.json records it.
    pub fn name(self) -> &'static str {
        match self {
            Self::AdamW => "adamw",
            Self::Sgd => "sgd",
        }
    }
}

/// `train.lr_scheduler`: the decay after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Cosine,
    Linear,
    Constant,
}

/// `train.device` (and `--device`): auto, cpu, cuda[:N] or wgpu[:N].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    /// CUDA, then a wgpu GPU, among those the binary has and the machine holds; else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
    /// The N-th adapter wgpu lists (Vulkan, Metal): Apple, AMD and Intel GPUs, and software
    /// Vulkan (Mesa's lavapipe).
    Wgpu(usize),
}

impl Device {
    /// The dtype `requested` computes in here (None, "auto": the checkpoint's own). wgpu has no
    /// bf16 (Burn 0.21): there "auto" is f32 and bf16 an error.
    pub fn load_dtype(self, requested: Option<Dtype>) -> Result<Option<Dtype>, String> {
        match (self, requested) {
            (Self::Wgpu(_), Some(Dtype::Bf16)) => Err(
                "bf16 does not run on wgpu (Burn 0.21's wgpu has no bf16): use f32, or f16 to \
                 halve the memory (Qwen's activations can overflow f16)"
                    .into(),
            ),
            (Self::Wgpu(_), None) => Ok(Some(Dtype::F32)),
            (_, requested) => Ok(requested),
        }
    }

    /// Training's choice of the frozen weights' dtype: as `load_dtype`, and "auto" on the CPU
    /// is f32 too (the CPU kernels are f32's; a bf16 checkpoint would take the generic path).
    pub fn compute_dtype(self, requested: Option<Dtype>) -> Result<Option<Dtype>, String> {
        match (self, requested) {
            (Self::Cpu, None) => Ok(Some(Dtype::F32)),
            _ => self.load_dtype(requested),
        }
    }
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "wgpu" => Ok(Self::Wgpu(0)),
            _ => {
                let index = |prefix| s.strip_prefix(prefix).and_then(|n| n.parse().ok());
                (index("cuda:").map(Self::Cuda))
                    .or_else(|| index("wgpu:").map(Self::Wgpu))
                    .ok_or_else(|| format!("\"{s}\" is not auto, cpu, cuda[:N] or wgpu[:N]"))
            }
        }
    }
}

impl TryFrom<String> for Device {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Device> for String {
    fn from(device: Device) -> String {
        device.to_string()
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Wgpu(n) => write!(f, "wgpu:{n}"),
        }
    }
}
