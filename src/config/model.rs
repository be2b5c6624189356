//! `config.json` of a Hugging Face decoder checkpoint, read as written by transformers 4.x
//! (`torch_dtype`, `rope_theta`, `rope_scaling`) or 5.x (`dtype`, `rope_parameters`), and resolved
//! into the one `ModelConfig` the model is built from.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::ConfigError;

/// The decoder families swift-rs builds. They share one decoder (see `model::decoder`): a stack
/// of layers whose token mixer `layer_mixers` chooses, and the switches `ModelConfig` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Qwen3.5 and Qwen3.6: Gated DeltaNet layers among gated full-attention ones.
    Qwen3_5,
}

/// A family and whether it is its mixture-of-experts form (`qwen3_moe`, `qwen3_5_moe`), which
/// shares everything but the MLP with the dense one.
type Family = (Arch, bool);

impl Arch {
    fn from_model_type(model_type: &str) -> Option<Family> {
        match model_type {
            "llama" => Some((Self::Llama, false)),
            "mistral" => Some((Self::Mistral, false)),
            "qwen2" => Some((Self::Qwen2, false)),
            "qwen3" => Some((Self::Qwen3, false)),
            "qwen3_moe" => Some((Self::Qwen3, true)),
            // The vision-language checkpoint's config and its language model's own.
            "qwen3_5" | "qwen3_5_text" => Some((Self::Qwen3_5, false)),
            "qwen3_5_moe" | "qwen3_5_moe_text" => Some((Self::Qwen3_5, true)),
            _ => None,
        }
    }

    fn from_architecture(architecture: &str) -> Option<Family> {
        match architecture {
            "LlamaForCausalLM" => Some((Self::Llama, false)),
            "MistralForCausalLM" => Some((Self::Mistral, false)),
            "Qwen2ForCausalLM" => Some((Self::Qwen2, false)),
            "Qwen3ForCausalLM" => Some((Self::Qwen3, false)),
            "Qwen3MoeForCausalLM" => Some((Self::Qwen3, true)),
            "Qwen3_5ForCausalLM" | "Qwen3_5ForConditionalGeneration" => {
                Some((Self::Qwen3_5, false))
            }
            "Qwen3_5MoeForCausalLM" | "Qwen3_5MoeForConditionalGeneration" => {
                Some((Self::Qwen3_5, true))
            }
            _ => None,
        }
    }
}

/// Floating-point storage types of checkpoints and compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    /// Accepts both torch's names (`bfloat16`, as config.json writes them) and the short ones the
    /// CLI takes (`bf16`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "float32" | "f32" | "fp32" => Some(Self::F32),
            "float16" | "f16" | "fp16" | "half" => Some(Self::F16),
            "bfloat16" | "bf16" => Some(Self::Bf16),
            _ => None,
        }
    }

    /// The name torch and config.json use.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::parse(name).ok_or_else(|| format!("{name:?} is not bf16, f16 or f32"))
    }
}

/// The short name (`bf16`), as the CLI and the training config write it.
impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// How rotary frequencies are rescaled, as transformers' `ROPE_INIT_FUNCTIONS`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling (`_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// `config.json` as written, every key the supported families use and nothing resolved yet.
/// Unknown keys are ignored: checkpoints carry many that do not change the computation.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The dense MLP's width; Qwen3.5-MoE, whose every layer is sparse, has none.
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub hidden_act: Option<String>,
    pub rms_norm_eps: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    /// transformers 4.x
    pub torch_dtype: Option<String>,
    /// transformers 5.x
    pub dtype: Option<String>,
    /// transformers 4.x
    pub rope_theta: Option<f64>,
    /// transformers 4.x
    pub rope_scaling: Option<Value>,
    /// transformers 5.x: `rope_theta` and the scaling in one object
    pub rope_parameters: Option<Value>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<usize>,
    /// transformers 5.x writes the attention kind of every layer.
    pub layer_types: Option<Vec<String>>,
    /// Qwen3.5's Gated DeltaNet layers (`linear_attention`).
    pub linear_num_key_heads: Option<usize>,
    pub linear_num_value_heads: Option<usize>,
    pub linear_key_head_dim: Option<usize>,
    pub linear_value_head_dim: Option<usize>,
    pub linear_conv_kernel_dim: Option<usize>,
    /// Qwen3.5 without `layer_types`: every n-th layer is full attention.
    pub full_attention_interval: Option<usize>,
    /// Mixture of experts (`qwen3_moe`, `qwen3_5_moe`). transformers 5 writes Qwen3-MoE's
    /// count as `num_local_experts`, the hub's checkpoints as `num_experts`.
    #[serde(alias = "num_local_experts")]
    pub num_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    pub norm_topk_prob: Option<bool>,
    /// Qwen3-MoE: layers `i` with `(i + 1) % decoder_sparse_step == 0` are sparse, but those
    /// in `mlp_only_layers`.
    pub decoder_sparse_step: Option<usize>,
    pub mlp_only_layers: Option<Vec<usize>>,
    /// Qwen3.5-MoE: the expert every token takes, scaled by `sigmoid(shared_expert_gate(x))`.
    pub shared_expert_intermediate_size: Option<usize>,
    /// Set when the text settings were read from a vision-language checkpoint's `text_config`:
    /// its language model's tensors sit under `model.language_model`.
    #[serde(skip)]
    pub vision_language: bool,
}

/// The keys of a vision-language config.json that hold for its language model too, where
/// `text_config` does not say otherwise: transformers ties the head by the top-level
/// `tie_word_embeddings`, and the hub writes dtype and the family at the top.
const TOP_LEVEL_KEYS: [&str; 5] = [
    "model_type",
    "architectures",
    "tie_word_embeddings",
    "dtype",
    "torch_dtype",
];

impl HfConfig {
    /// config.json as parsed JSON, its language model's settings read from `text_config` when
    /// it has one (a vision-language checkpoint, `Qwen3_5ForConditionalGeneration`).
    pub fn from_value(mut value: Value) -> Result<Self, serde_json::Error> {
        let vision_language = match value.get_mut("text_config").map(Value::take) {
            Some(Value::Object(mut text)) => {
                for key in TOP_LEVEL_KEYS {
                    if let Some(v) = value.get(key).filter(|v| !v.is_null()) {
                        text.insert(key.to_string(), v.clone());
                    }
                }
                value = Value::Object(text);
                true
            }
            _ => false,
        };
        let mut config: Self = match serde_json::from_value(value) {
            Ok(config) => config,
            // The field is text_config's: say where it was looked for.
            Err(e) if vision_language => {
                return Err(serde::de::Error::custom(format!("text_config: {e}")))
            }
            Err(e) => return Err(e),
        };
        config.vision_language = vision_language;
        Ok(config)
    }
}

/// What the errors about an unknown family list: the model types `Arch::from_model_type` takes.
const SUPPORTED_MODEL_TYPES: &str =
    "llama, mistral, qwen2, qwen3, qwen3_moe, qwen3_5 and qwen3_5_moe (Qwen3.5, Qwen3.6)";

/// A config.json that does not describe a model swift-rs can build.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelConfigError {
    #[error(
        "unsupported model_type \"{model_type}\": swift-rs supports {}",
        SUPPORTED_MODEL_TYPES
    )]
    UnsupportedArch { model_type: String },
    #[error(
        "no model_type, and architectures {architectures:?} names no supported family ({})",
        SUPPORTED_MODEL_TYPES
    )]
    UnknownArchitectures { architectures: Vec<String> },
    /// A value of a supported family that cannot work; the sentence names the key.
    #[error("{0}")]
    Invalid(String),
}

/// Everything the decoder needs, resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The dense MLP's width; 0 when no layer is dense (`layer_mlps`).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    /// Bias on q_proj, k_proj and v_proj (Qwen2 always; Llama/Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama/Qwen3 with `attention_bias`; never Qwen2).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3's RMSNorm over each head of q and k before RoPE.
    pub qk_norm: bool,
    /// Per layer: attend only to the last `w` positions (Mistral, Qwen2 with use_sliding_window).
    pub sliding_window: Vec<Option<usize>>,
    /// The dtype the checkpoint says it was saved in, if it says.
    pub dtype: Option<Dtype>,
    /// The longest sequence the model was made for, if config.json says.
    pub max_position_embeddings: Option<usize>,
    /// Per layer: what mixes its tokens.
    pub layer_mixers: Vec<TokenMixer>,
    /// The Gated DeltaNet layers' sizes, when the model has any.
    pub linear_attention: Option<LinearAttention>,
    /// Qwen3.5: q_proj is twice as wide, each head's query followed by a gate whose sigmoid
    /// scales the attention output.
    pub attn_output_gate: bool,
    /// The leading dims of each head that RoPE rotates (`partial_rotary_factor`); the rest
    /// pass through. `head_dim` in every family but Qwen3.5.
    pub rotary_dim: usize,
    /// Qwen3.5's RMSNorm: `normalize(x) * (1 + w)`, the product in f32 before the cast back,
    /// where Llama's is `w * normalize(x)` cast first.
    pub zero_centered_norm: bool,
    /// Per layer: a dense MLP or a mixture of experts.
    pub layer_mlps: Vec<MlpKind>,
    /// The experts' settings, when some layer is sparse.
    pub moe: Option<Moe>,
    /// Where the language model's tensors sit in the checkpoint: `model`, or
    /// `model.language_model` in a vision-language checkpoint, whose vision tower (and
    /// multi-token-prediction head) stays on disk.
    pub text_prefix: &'static str,
}

/// How a decoder layer mixes tokens: transformers' `layer_types`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMixer {
    /// `self_attn`: softmax attention (`full_attention`, `sliding_attention`).
    Attention,
    /// `linear_attn`: Qwen3.5's Gated DeltaNet (`linear_attention`).
    LinearAttention,
}

/// A decoder layer's MLP: `mlp` is `Qwen3MoeMLP`-like, or a `SparseMoeBlock` of experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    Dense,
    Sparse,
}

/// A mixture of experts' settings (Qwen3-MoE's and Qwen3.5-MoE's config keys).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Moe {
    pub num_experts: usize,
    /// The experts each token is routed to (top-k of the router's softmax).
    pub num_experts_per_tok: usize,
    /// Each expert's MLP width.
    pub moe_intermediate_size: usize,
    /// Whether the top-k probabilities are renormalised to sum to 1 (always in Qwen3.5-MoE).
    pub norm_topk_prob: bool,
    /// Qwen3.5-MoE's shared expert's width (with its sigmoid gate); None in Qwen3-MoE.
    pub shared_expert_intermediate_size: Option<usize>,
    /// The family existed in transformers 4.x, where each expert was three linears
    /// (`experts.N.gate_proj`, `up_proj`, `down_proj`): adapters may name those (Qwen3-MoE).
    pub v4_expert_linears: bool,
}

/// Sizes of Qwen3.5's Gated DeltaNet (`linear_*` in config.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearAttention {
    pub num_key_heads: usize,
    pub num_value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
    /// Width of the depthwise causal convolution over q, k and v.
    pub conv_kernel_dim: usize,
}

impl LinearAttention {
    pub fn key_dim(&self) -> usize {
        self.num_key_heads * self.key_head_dim
    }

    pub fn value_dim(&self) -> usize {
        self.num_value_heads * self.value_head_dim
    }

    /// Channels of the convolution: q, k and v side by side, as `in_proj_qkv` writes them.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
}

impl ModelConfig {
    /// Reads and resolves `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        let value = serde_json::from_str::<Value>(&text);
        let parsed = match &value {
            Ok(v) => HfConfig::from_value(v.clone()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let raw = match parsed {
            Ok(raw) => raw,
            Err(reason) => {
                // A family swift-rs does not know is named as such, not as a broken file for
                // the fields it lacks (Gemma 3's sit under text_config).
                let model_type = value
                    .as_ref()
                    .ok()
                    .and_then(|v| v.get("model_type")?.as_str());
                if let Some(mt) = model_type.filter(|mt| Arch::from_model_type(mt).is_none()) {
                    let model_type = mt.to_string();
                    let source = ModelConfigError::UnsupportedArch { model_type };
                    return Err(ConfigError::Model { path, source });
                }
                return Err(ConfigError::Json { path, reason });
            }
        };
        raw.resolve()
            .map_err(|source| ConfigError::Model { path, source })
    }
}

impl HfConfig {
    /// Resolves family defaults and the two config generations into a `ModelConfig`.
    pub fn resolve(&self) -> Result<ModelConfig, ModelConfigError> {
        let family = match &self.model_type {
            Some(mt) => {
                Arch::from_model_type(mt).ok_or_else(|| ModelConfigError::UnsupportedArch {
                    model_type: mt.clone(),
                })?
            }
            None => self
                .architectures
                .iter()
                .find_map(|a| Arch::from_architecture(a))
                .ok_or_else(|| ModelConfigError::UnknownArchitectures {
                    architectures: self.architectures.clone(),
                })?,
        };
        self.resolve_family(family)
            .map_err(ModelConfigError::Invalid)
    }

    /// `resolve` once the family is known; the error is a sentence naming the key at fault.
    fn resolve_family(&self, (arch, sparse): Family) -> Result<ModelConfig, String> {
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!(
                    "hidden_act \"{act}\" is not supported: these families use \"silu\""
                ));
            }
        }
        if self.num_hidden_layers == 0 {
            // Training checkpoints layer by layer from the last one.
            return Err("num_hidden_layers must be at least 1".into());
        }
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if self.hidden_size % heads == 0 => self.hidden_size / heads,
            None => {
                return Err(format!(
                    "hidden_size ({}) is not divisible by num_attention_heads ({heads}) and head_dim is not set",
                    self.hidden_size
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(format!(
                "head_dim ({head_dim}) must be even for rotary embeddings"
            ));
        }
        let attention_bias = self.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::Mistral => (false, false),
            Arch::Llama | Arch::Qwen3 | Arch::Qwen3_5 => (attention_bias, attention_bias),
        };
        let dtype = match self.dtype.as_deref().or(self.torch_dtype.as_deref()) {
            None => None,
            Some(name) => Some(Dtype::parse(name).ok_or_else(|| {
                format!("dtype \"{name}\" is not one of float32, float16, bfloat16")
            })?),
        };
        let qwen3_5 = arch == Arch::Qwen3_5;
        let layer_mixers = self.layer_mixers(arch)?;
        let linear_attention = match layer_mixers.contains(&TokenMixer::LinearAttention) {
            true => Some(self.linear_attention()?),
            false => None,
        };
        let (layer_mlps, moe) = match sparse {
            true => self.moe(arch)?,
            false => (vec![MlpKind::Dense; self.num_hidden_layers], None),
        };
        let intermediate_size = match (self.intermediate_size, layer_mlps.contains(&MlpKind::Dense))
        {
            (Some(size), _) => size,
            (None, false) => 0,
            (None, true) => return Err("intermediate_size is required: some layer is dense".into()),
        };
        Ok(ModelConfig {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope: self.rope()?,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: arch == Arch::Llama && self.mlp_bias.unwrap_or(false),
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3_5),
            sliding_window: self.sliding_windows(arch)?,
            max_position_embeddings: self.max_position_embeddings,
            dtype,
            layer_mixers,
            linear_attention,
            attn_output_gate: qwen3_5,
            rotary_dim: self.rotary_dim(arch, head_dim)?,
            zero_centered_norm: qwen3_5,
            layer_mlps,
            moe,
            text_prefix: match self.vision_language {
                true => "model.language_model",
                false => "model",
            },
        })
    }

    /// The token mixer of every layer: attention in every family but Qwen3.5, whose
    /// `layer_types` (or, without it, `full_attention_interval`, 4 by default, as
    /// `Qwen3_5TextConfig` fills it in) puts full attention among Gated DeltaNet layers.
    fn layer_mixers(&self, arch: Arch) -> Result<Vec<TokenMixer>, String> {
        let n = self.num_hidden_layers;
        if arch != Arch::Qwen3_5 {
            return Ok(vec![TokenMixer::Attention; n]);
        }
        let Some(types) = &self.layer_types else {
            let interval = self.full_attention_interval.unwrap_or(4);
            if interval == 0 {
                return Err("full_attention_interval must be at least 1".into());
            }
            return Ok((0..n)
                .map(|i| match (i + 1) % interval {
                    0 => TokenMixer::Attention,
                    _ => TokenMixer::LinearAttention,
                })
                .collect());
        };
        if types.len() != n {
            return Err(format!(
                "layer_types has {} entries for {n} layers",
                types.len()
            ));
        }
        types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(TokenMixer::Attention),
                "linear_attention" => Ok(TokenMixer::LinearAttention),
                other => Err(format!(
                    "layer_types: \"{other}\" is not a layer kind of this family (full_attention, linear_attention)"
                )),
            })
            .collect()
    }

    /// Which layers are sparse and the experts' settings, with the defaults of
    /// `Qwen3MoeConfig` and `Qwen3_5MoeTextConfig` (whose every layer is sparse and whose top-k
    /// is always renormalised).
    fn moe(&self, arch: Arch) -> Result<(Vec<MlpKind>, Option<Moe>), String> {
        let qwen3_5 = arch == Arch::Qwen3_5;
        let n = self.num_hidden_layers;
        if !qwen3_5 && self.num_experts == Some(0) {
            // transformers builds every layer dense then.
            return Ok((vec![MlpKind::Dense; n], None));
        }
        let moe = Moe {
            num_experts: self.num_experts.unwrap_or(if qwen3_5 { 256 } else { 128 }),
            num_experts_per_tok: self.num_experts_per_tok.unwrap_or(8),
            moe_intermediate_size: self.moe_intermediate_size.unwrap_or(if qwen3_5 {
                512
            } else {
                768
            }),
            norm_topk_prob: qwen3_5 || self.norm_topk_prob.unwrap_or(false),
            shared_expert_intermediate_size: qwen3_5
                .then(|| self.shared_expert_intermediate_size.unwrap_or(512)),
            v4_expert_linears: !qwen3_5,
        };
        let (e, k) = (moe.num_experts, moe.num_experts_per_tok);
        if k == 0 || k > e {
            return Err(format!(
                "num_experts_per_tok ({k}) must be between 1 and num_experts ({e})"
            ));
        }
        if moe.moe_intermediate_size == 0 || moe.shared_expert_intermediate_size == Some(0) {
            return Err(
                "moe_intermediate_size and shared_expert_intermediate_size must be at least 1"
                    .into(),
            );
        }
        if qwen3_5 {
            return Ok((vec![MlpKind::Sparse; n], Some(moe)));
        }
        let step = self.decoder_sparse_step.unwrap_or(1);
        if step == 0 {
            return Err("decoder_sparse_step must be at least 1".into());
        }
        let dense = self.mlp_only_layers.clone().unwrap_or_default();
        if let Some(i) = dense.iter().find(|&&i| i >= n) {
            return Err(format!(
                "mlp_only_layers names layer {i}, but the model has {n} layers"
            ));
        }
        let kinds: Vec<MlpKind> = (0..n)
            .map(|i| match !dense.contains(&i) && (i + 1) % step == 0 {
                true => MlpKind::Sparse,
                false => MlpKind::Dense,
            })
            .collect();
        let moe = kinds.contains(&MlpKind::Sparse).then_some(moe);
        Ok((kinds, moe))
    }

    /// The Gated DeltaNet's sizes, with `Qwen3_5TextConfig`'s defaults.
    fn linear_attention(&self) -> Result<LinearAttention, String> {
        let la = LinearAttention {
            num_key_heads: self.linear_num_key_heads.unwrap_or(16),
            num_value_heads: self.linear_num_value_heads.unwrap_or(32),
            key_head_dim: self.linear_key_head_dim.unwrap_or(128),
            value_head_dim: self.linear_value_head_dim.unwrap_or(128),
            conv_kernel_dim: self.linear_conv_kernel_dim.unwrap_or(4),
        };
        let (k, v) = (la.num_key_heads, la.num_value_heads);
        if k == 0 || v == 0 || v % k != 0 {
            return Err(format!(
                "linear_num_value_heads ({v}) must be a positive multiple of linear_num_key_heads ({k})"
            ));
        }
        if la.key_head_dim == 0 || la.value_head_dim == 0 {
            return Err("linear_key_head_dim and linear_value_head_dim must be at least 1".into());
        }
        if la.conv_kernel_dim < 2 {
            return Err(format!(
                "linear_conv_kernel_dim ({}) must be at least 2: the convolution reaches back \
                 kernel - 1 tokens",
                la.conv_kernel_dim
            ));
        }
        Ok(la)
    }

    /// The dims of each head RoPE rotates: `head_dim * partial_rotary_factor`, truncated as
    /// transformers' `int()` does; Qwen3.5 defaults the factor to 0.25.
    fn rotary_dim(&self, arch: Arch, head_dim: usize) -> Result<usize, String> {
        let default = if arch == Arch::Qwen3_5 { 0.25 } else { 1.0 };
        let factor = match self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("partial_rotary_factor"))
        {
            None | Some(Value::Null) => default,
            Some(v) => v.as_f64().ok_or_else(|| {
                format!("rope_parameters.partial_rotary_factor must be a number, got {v}")
            })?,
        };
        let dim = (head_dim as f64 * factor) as usize;
        if !(factor > 0.0 && factor <= 1.0) || dim == 0 || !dim.is_multiple_of(2) {
            return Err(format!(
                "rope_parameters.partial_rotary_factor ({factor}) must leave an even number of rotary dims of head_dim ({head_dim}), at least 2"
            ));
        }
        Ok(dim)
    }

    /// transformers 5.x keeps theta and scaling in `rope_parameters`; 4.x has `rope_theta` at the
    /// top and `rope_scaling` (with `type` or `rope_type`) beside it.
    fn rope(&self) -> Result<RopeConfig, String> {
        let (params, key) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(p), _) => (Some(p), "rope_parameters"),
            (None, Some(s)) if !s.is_null() => (Some(s), "rope_scaling"),
            _ => (None, "rope_scaling"),
        };
        let number = |name: &str| -> Result<Option<f64>, String> {
            match params.and_then(|p| p.get(name)) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| format!("{key}.{name} must be a number, got {v}")),
            }
        };
        let theta = number("rope_theta")?.or(self.rope_theta).unwrap_or(10000.0);
        let rope_type = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let required = |name: &str| -> Result<f64, String> {
            number(name)?
                .ok_or_else(|| format!("{key}.{name} is required for rope_type \"{rope_type}\""))
        };
        let scaling = match rope_type {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: required("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: required("original_max_position_embeddings")?,
            },
            other => {
                return Err(format!(
                    "{key}: rope_type \"{other}\" is not supported (default, linear, llama3)"
                ))
            }
        };
        Ok(RopeConfig { theta, scaling })
    }

    /// Which layers use sliding-window attention, as transformers decides it: every layer of
    /// Mistral when `sliding_window` is set; for Qwen2/Qwen3 only with `use_sliding_window`, from
    /// layer `max_window_layers` on. An explicit `layer_types` (5.x) wins.
    fn sliding_windows(&self, arch: Arch) -> Result<Vec<Option<usize>>, String> {
        let n = self.num_hidden_layers;
        let window = match arch {
            Arch::Mistral => self.sliding_window,
            Arch::Qwen2 | Arch::Qwen3 if self.use_sliding_window.unwrap_or(false) => {
                self.sliding_window
            }
            _ => None,
        };
        let Some(window) = window else {
            return Ok(vec![None; n]);
        };
        if let Some(types) = &self.layer_types {
            if types.len() != n {
                return Err(format!(
                    "layer_types has {} entries for {n} layers",
                    types.len()
                ));
            }
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(None),
                    "sliding_attention" => Ok(Some(window)),
                    other => Err(format!("layer_types: unknown attention kind \"{other}\"")),
                })
                .collect();
        }
        let first_sliding = match arch {
            Arch::Mistral => 0,
            _ => self.max_window_layers.unwrap_or(n),
        };
        Ok((0..n)
            .map(|i| (i >= first_sliding).then_some(window))
            .collect())
    }
}

/// The adaptable linear layers of each part of a decoder layer, by module path in the layer, in
/// the order the layer holds them (the trainable tensors' order).
pub const SELF_ATTN_LINEARS: [&str; 4] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
];
pub const LINEAR_ATTN_LINEARS: [&str; 5] = [
    "linear_attn.in_proj_qkv",
    "linear_attn.in_proj_z",
    "linear_attn.in_proj_b",
    "linear_attn.in_proj_a",
    "linear_attn.out_proj",
];
pub const MLP_LINEARS: [&str; 3] = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
/// A sparse layer's linears: Qwen3.5-MoE's shared expert and its gate (the router and the
/// routed experts are not `nn.Linear` in transformers 5, so PEFT's all-linear leaves them).
pub const SHARED_EXPERT_LINEARS: [&str; 4] = [
    "mlp.shared_expert.gate_proj",
    "mlp.shared_expert.up_proj",
    "mlp.shared_expert.down_proj",
    "mlp.shared_expert_gate",
];

impl ModelConfig {
    /// `(module path in the layer, in features, out features)` of every linear layer of decoder
    /// layer `i`, in the order the layer holds them (the trainable tensors' order).
    pub fn layer_linears(&self, i: usize) -> Vec<(&'static str, usize, usize)> {
        let (h, d, inter) = (self.hidden_size, self.head_dim, self.intermediate_size);
        let (q, kv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        let q_out = if self.attn_output_gate { 2 * q } else { q };
        let (names, mixer): (&[&'static str], Vec<(usize, usize)>) =
            match (self.layer_mixers[i], &self.linear_attention) {
                (TokenMixer::LinearAttention, Some(la)) => (
                    &LINEAR_ATTN_LINEARS,
                    vec![
                        (h, la.conv_dim()),
                        (h, la.value_dim()),
                        (h, la.num_value_heads),
                        (h, la.num_value_heads),
                        (la.value_dim(), h),
                    ],
                ),
                _ => (
                    &SELF_ATTN_LINEARS,
                    vec![(h, q_out), (h, kv), (h, kv), (q, h)],
                ),
            };
        let mlp: Vec<(&&'static str, (usize, usize))> = match (self.layer_mlps[i], &self.moe) {
            (MlpKind::Sparse, Some(moe)) => match moe.shared_expert_intermediate_size {
                Some(shared) => {
                    let sizes = [(h, shared), (h, shared), (shared, h), (h, 1)];
                    SHARED_EXPERT_LINEARS.iter().zip(sizes).collect()
                }
                None => Vec::new(),
            },
            _ => {
                let sizes = [(h, inter), (h, inter), (inter, h)];
                MLP_LINEARS.iter().zip(sizes).collect()
            }
        };
        let linears = names.iter().zip(mixer).chain(mlp);
        linears
            .map(|(name, (n_in, n_out))| (*name, n_in, n_out))
            .collect()
    }

    /// `(module name, in features, out features)` of every sparse layer's router and, in a
    /// family that had them, transformers 4.x's per-expert linears (`mlp.experts.N.gate_proj`,
    /// `up_proj`, `down_proj`): modules an adapter takes only where `target_modules` names them
    /// itself, and that the hub's per-expert checkpoints hold as linears.
    pub fn routed_linears(&self) -> Vec<(String, usize, usize)> {
        let Some(moe) = &self.moe else {
            return Vec::new();
        };
        let (h, inter, n) = (self.hidden_size, moe.moe_intermediate_size, moe.num_experts);
        let per_expert = if moe.v4_expert_linears { n } else { 0 };
        let sparse = (0..self.num_hidden_layers).filter(|&i| self.layer_mlps[i] == MlpKind::Sparse);
        sparse
            .flat_map(|i| {
                let mlp = format!("{}.mlp", self.layer_path(i));
                let router = (format!("{mlp}.gate"), h, n);
                let experts = (0..per_expert).flat_map(move |e| {
                    let p = format!("{mlp}.experts.{e}");
                    [
                        (format!("{p}.gate_proj"), h, inter),
                        (format!("{p}.up_proj"), h, inter),
                        (format!("{p}.down_proj"), inter, h),
                    ]
                });
                std::iter::once(router).chain(experts)
            })
            .collect()
    }

    /// The module path of decoder layer `i` in the checkpoint (`model.layers.3`, or
    /// `model.language_model.layers.3` in a vision-language checkpoint).
    pub fn layer_path(&self, i: usize) -> String {
        format!("{}.layers.{i}", self.text_prefix)
    }

    /// `(module name, in features, out features)` of every linear layer an adapter may target.
    pub fn adaptable_linears(&self) -> Vec<(String, usize, usize)> {
        (0..self.num_hidden_layers)
            .flat_map(|i| {
                let path = self.layer_path(i);
                self.layer_linears(i)
                    .into_iter()
                    .map(move |(s, n_in, n_out)| (format!("{path}.{s}"), n_in, n_out))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(json: serde_json::Value) -> Result<ModelConfig, String> {
        let config = serde_json::from_value::<HfConfig>(json).unwrap();
        config.resolve().map_err(|e| e.to_string())
    }

    fn base(model_type: &str) -> serde_json::Value {
        serde_json::json!({
            "model_type": model_type, "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2,
        })
    }

    #[test]
    fn both_generations_give_the_same_rope() {
        let mut v4 = base("llama");
        v4["torch_dtype"] = "bfloat16".into();
        v4["rope_theta"] = 500000.0.into();
        v4["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v5 = base("llama");
        v5["dtype"] = "bfloat16".into();
        v5["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0,
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let (a, b) = (resolve(v4).unwrap(), resolve(v5).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.dtype, Some(Dtype::Bf16));
        assert_eq!(a.rope.theta, 500000.0);
        assert!(matches!(a.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn family_switches() {
        let q2 = resolve(base("qwen2")).unwrap();
        assert!(q2.qkv_bias && !q2.o_bias && !q2.qk_norm);
        let mut q3 = base("qwen3");
        q3["head_dim"] = 24.into();
        let q3 = resolve(q3).unwrap();
        assert!(q3.qk_norm && !q3.qkv_bias && q3.head_dim == 24);
        let mut m = base("mistral");
        m["sliding_window"] = 4096.into();
        assert_eq!(resolve(m).unwrap().sliding_window, vec![Some(4096); 2]);
        let mut q2w = base("qwen2");
        q2w["sliding_window"] = 16.into();
        q2w["use_sliding_window"] = true.into();
        q2w["max_window_layers"] = 1.into();
        assert_eq!(resolve(q2w).unwrap().sliding_window, vec![None, Some(16)]);
        let mut cfg = base("llama");
        cfg.as_object_mut().unwrap().remove("model_type");
        cfg["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        assert_eq!(resolve(cfg).unwrap().arch, Arch::Mistral);
    }

    /// A Qwen3.5 checkpoint's config.json (its text settings under text_config) was reported as
    /// "not valid JSON for a model config"; a family swift-rs does not know is named instead.
    #[test]
    fn an_unknown_family_is_named_before_its_fields_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({
            "model_type": "gemma3",
            "architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": {"hidden_size": 64, "num_hidden_layers": 2},
        });
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let err = ModelConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("unsupported model_type \"gemma3\""), "{err}");
    }

    fn qwen3_5_text() -> serde_json::Value {
        serde_json::json!({
            "model_type": "qwen3_5_text", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "linear_num_key_heads": 2,
            "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e7,
                                "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10]},
        })
    }

    fn top_level_of(text: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"model_type": "qwen3_5", "text_config": text})
    }

    /// The vision-language config.json: text settings from text_config, the head's tying and
    /// the dtype from the top (as transformers ties `lm_head` by the top-level flag).
    #[test]
    fn qwen3_5_reads_text_config_under_the_top_levels_tying() {
        let mut text = qwen3_5_text();
        text["model_type"] = "qwen3_5_text".into();
        text["tie_word_embeddings"] = false.into();
        let top = serde_json::json!({
            "model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
            "tie_word_embeddings": true, "dtype": "bfloat16", "text_config": text,
            "vision_config": {"depth": 1},
        });
        let c = HfConfig::from_value(top).unwrap().resolve().unwrap();
        assert_eq!(c.arch, Arch::Qwen3_5);
        assert!(c.tie_word_embeddings && c.dtype == Some(Dtype::Bf16));
        assert_eq!(c.text_prefix, "model.language_model");
        // Without layer_types, every fourth layer is full attention.
        use TokenMixer::{Attention as F, LinearAttention as L};
        assert_eq!(c.layer_mixers, [L, L, L, F]);
        assert!(c.attn_output_gate && c.zero_centered_norm && c.qk_norm);
        assert_eq!(c.rotary_dim, 8);
        let la = c.linear_attention.unwrap();
        assert_eq!(
            (
                la.key_dim(),
                la.value_dim(),
                la.conv_dim(),
                la.conv_kernel_dim
            ),
            (16, 64, 96, 4)
        );
        assert_eq!(
            c.layer_linears(0).iter().map(|l| l.0).collect::<Vec<_>>()[..5],
            [
                "linear_attn.in_proj_qkv",
                "linear_attn.in_proj_z",
                "linear_attn.in_proj_b",
                "linear_attn.in_proj_a",
                "linear_attn.out_proj"
            ]
        );
        // The query and its gate: q_proj is twice as wide.
        assert_eq!(c.layer_linears(3)[0], ("self_attn.q_proj", 64, 256));
        let mut broken = top_level_of(qwen3_5_text());
        broken["text_config"]
            .as_object_mut()
            .unwrap()
            .remove("hidden_size");
        let err = HfConfig::from_value(broken).unwrap_err().to_string();
        assert!(
            err.contains("text_config: missing field `hidden_size`"),
            "{err}"
        );
        let flat = resolve(qwen3_5_text()).unwrap();
        assert_eq!(flat.text_prefix, "model");
        assert!(!flat.tie_word_embeddings);
    }

    /// Qwen3-MoE as transformers 5 writes it (`num_local_experts`): sparse layers by
    /// `decoder_sparse_step` but those in `mlp_only_layers`; their MLPs carry no adapter sites
    /// (router and experts are not linears), the dense ones carry theirs.
    #[test]
    fn qwen3_moe_picks_its_sparse_layers_as_transformers_does() {
        let mut cfg = base("qwen3_moe");
        cfg["num_hidden_layers"] = 6.into();
        cfg["num_local_experts"] = 8.into();
        cfg["num_experts_per_tok"] = 2.into();
        cfg["moe_intermediate_size"] = 16.into();
        cfg["decoder_sparse_step"] = 2.into();
        cfg["mlp_only_layers"] = serde_json::json!([3]);
        let c = resolve(cfg.clone()).unwrap();
        use MlpKind::{Dense as D, Sparse as S};
        assert_eq!(c.layer_mlps, [D, S, D, D, D, S]);
        let moe = c.moe.unwrap();
        assert_eq!((moe.num_experts, moe.num_experts_per_tok), (8, 2));
        assert!(!moe.norm_topk_prob && moe.shared_expert_intermediate_size.is_none());
        assert!(moe.v4_expert_linears);
        let names = |i| c.layer_linears(i).iter().map(|l| l.0).collect::<Vec<_>>();
        assert_eq!(names(1), SELF_ATTN_LINEARS);
        assert_eq!(names(0)[4..], MLP_LINEARS);
        // The hub's spelling, and a model without experts.
        cfg.as_object_mut().unwrap().remove("num_local_experts");
        cfg["num_experts"] = 8.into();
        assert_eq!(resolve(cfg.clone()).unwrap().layer_mlps, c.layer_mlps);
        cfg["num_experts"] = 0.into();
        let dense = resolve(cfg.clone()).unwrap();
        assert!(dense.moe.is_none() && dense.layer_mlps == [D; 6]);
        let bad = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut c = cfg.clone();
            c["num_experts"] = 8.into();
            edit(&mut c);
            resolve(c).unwrap_err()
        };
        let err = bad(&|c| c["num_experts_per_tok"] = 9.into());
        assert!(err.contains("num_experts_per_tok (9)"), "{err}");
        let err = bad(&|c| c["mlp_only_layers"] = serde_json::json!([6]));
        assert!(err.contains("mlp_only_layers names layer 6"), "{err}");
        let err = bad(&|c| c["decoder_sparse_step"] = 0.into());
        assert!(err.contains("decoder_sparse_step"), "{err}");
        let err = bad(&|c| {
            c.as_object_mut().unwrap().remove("intermediate_size");
        });
        assert!(err.contains("intermediate_size is required"), "{err}");
    }

    /// Qwen3.5-MoE: every layer sparse, with a shared expert and its gate as adapter sites, and
    /// no dense MLP width at all.
    #[test]
    fn qwen3_5_moe_layers_are_all_sparse_with_a_shared_expert() {
        let mut text = qwen3_5_text();
        text["model_type"] = "qwen3_5_moe_text".into();
        text.as_object_mut().unwrap().remove("intermediate_size");
        text["num_experts"] = 4.into();
        text["num_experts_per_tok"] = 2.into();
        text["shared_expert_intermediate_size"] = 24.into();
        let mut top = top_level_of(text);
        top["model_type"] = "qwen3_5_moe".into();
        let c = HfConfig::from_value(top).unwrap().resolve().unwrap();
        assert_eq!(c.arch, Arch::Qwen3_5);
        assert_eq!(c.layer_mlps, [MlpKind::Sparse; 4]);
        let moe = c.moe.unwrap();
        assert!(moe.norm_topk_prob);
        assert_eq!(moe.shared_expert_intermediate_size, Some(24));
        assert_eq!(moe.moe_intermediate_size, 512);
        let linears = c.layer_linears(3);
        assert_eq!(
            linears[4..].iter().map(|l| l.0).collect::<Vec<_>>(),
            SHARED_EXPERT_LINEARS
        );
        assert_eq!(linears[7], ("mlp.shared_expert_gate", 64, 1));
        let top = serde_json::json!({"architectures": ["Qwen3_5MoeForConditionalGeneration"]});
        let mut flat = qwen3_5_text();
        flat.as_object_mut().unwrap().remove("model_type");
        flat["architectures"] = top["architectures"].clone();
        assert!(resolve(flat).unwrap().moe.is_some());
    }

    #[test]
    fn qwen3_5_values_that_cannot_work_name_the_key() {
        let bad = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut c = qwen3_5_text();
            edit(&mut c);
            resolve(c).unwrap_err()
        };
        let err = bad(&|c| c["layer_types"] = serde_json::json!(["linear_attention"]));
        assert!(
            err.contains("layer_types has 1 entries for 4 layers"),
            "{err}"
        );
        let err = bad(&|c| {
            c["layer_types"] = serde_json::json!([
                "linear_attention",
                "sliding_attention",
                "full_attention",
                "full_attention"
            ])
        });
        assert!(err.contains("\"sliding_attention\""), "{err}");
        let err = bad(&|c| c["linear_num_value_heads"] = 3.into());
        assert!(err.contains("linear_num_value_heads (3)"), "{err}");
        let err = bad(&|c| c["linear_conv_kernel_dim"] = 1.into());
        assert!(err.contains("linear_conv_kernel_dim"), "{err}");
        let err = bad(&|c| c["rope_parameters"]["partial_rotary_factor"] = 0.01.into());
        assert!(err.contains("partial_rotary_factor"), "{err}");
        let err = bad(&|c| c["full_attention_interval"] = 0.into());
        assert!(err.contains("full_attention_interval"), "{err}");
    }

    #[test]
    fn unsupported_values_name_the_key() {
        let err = resolve(base("gpt2")).unwrap_err();
        assert!(err.contains("model_type \"gpt2\""), "{err}");
        // A caller can tell an unsupported family apart from a broken config.
        let gpt2 = serde_json::from_value::<HfConfig>(base("gpt2")).unwrap();
        assert_eq!(
            gpt2.resolve(),
            Err(ModelConfigError::UnsupportedArch {
                model_type: "gpt2".into()
            })
        );
        let mut c = base("llama");
        c["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
        assert!(resolve(c)
            .unwrap_err()
            .contains("rope_scaling: rope_type \"yarn\""));
        let mut c = base("llama");
        c["rope_scaling"] = serde_json::json!({"type": "linear"});
        assert!(resolve(c)
            .unwrap_err()
            .contains("rope_scaling.factor is required"));
        let mut c = base("llama");
        c["num_key_value_heads"] = 3.into();
        assert!(resolve(c).unwrap_err().contains("num_key_value_heads (3)"));
        let mut c = base("llama");
        c["hidden_act"] = "gelu".into();
        assert!(resolve(c).unwrap_err().contains("hidden_act \"gelu\""));
        let mut c = base("qwen2");
        c["num_hidden_layers"] = 0.into();
        assert!(resolve(c).unwrap_err().contains("num_hidden_layers"));
    }
}
