//! What llama.cpp's `convert_hf_to_gguf.py` writes for a Hugging Face checkpoint of the supported
//! families: the architecture's keys, and each tensor under its GGUF name in its GGUF layout.

use serde_json::Value as Json;

use super::file::Value;
use crate::config::{Arch, LinearAttention, ModelConfig, RopeScaling, TokenMixer};

/// llama.cpp's architecture name: Mistral's checkpoints run as `llama`, as the converter writes.
pub fn arch_name(arch: Arch) -> &'static str {
    match arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
        Arch::Qwen3_5 => "qwen35",
    }
}

/// The `{arch}.*` keys. `raw` is config.json as written: the converter writes the key and value
/// lengths only where it names `head_dim`.
pub fn hparams(config: &ModelConfig, raw: &Json) -> Result<Vec<(String, Value)>, String> {
    let arch = arch_name(config.arch);
    let key = |k: &str| format!("{arch}.{k}");
    let u32_of = |n: usize, what: &str| {
        u32::try_from(n).map_err(|_| format!("{what} ({n}) does not fit GGUF's u32"))
    };
    let mut kv = vec![(
        key("block_count"),
        Value::U32(u32_of(config.num_hidden_layers, "num_hidden_layers")?),
    )];
    if let Some(n) = config.max_position_embeddings {
        kv.push((
            key("context_length"),
            Value::U32(u32_of(n, "max_position_embeddings")?),
        ));
    }
    kv.extend([
        (
            key("embedding_length"),
            Value::U32(u32_of(config.hidden_size, "hidden_size")?),
        ),
        (
            key("feed_forward_length"),
            Value::U32(u32_of(config.intermediate_size, "intermediate_size")?),
        ),
        (
            key("attention.head_count"),
            Value::U32(u32_of(config.num_attention_heads, "num_attention_heads")?),
        ),
        (
            key("attention.head_count_kv"),
            Value::U32(u32_of(config.num_key_value_heads, "num_key_value_heads")?),
        ),
    ]);
    if let RopeScaling::Linear { factor } = config.rope.scaling {
        kv.push((key("rope.scaling.type"), Value::Str("linear".into())));
        kv.push((key("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    kv.push((key("rope.freq_base"), Value::F32(config.rope.theta as f32)));
    kv.push((
        key("attention.layer_norm_rms_epsilon"),
        Value::F32(config.rms_norm_eps as f32),
    ));
    // A vision-language checkpoint's language settings are its text_config's.
    let text = raw.get("text_config").unwrap_or(raw);
    if text.get("head_dim").is_some_and(|d| !d.is_null()) {
        let d = u32_of(config.head_dim, "head_dim")?;
        kv.push((key("attention.key_length"), Value::U32(d)));
        kv.push((key("attention.value_length"), Value::U32(d)));
    }
    if let Some(linear) = &config.linear_attention {
        kv.extend(gated_delta_net_hparams(
            config, linear, text, &key, &u32_of,
        )?);
    }
    if arch == "llama" {
        kv.push((
            key("vocab_size"),
            Value::U32(u32_of(config.vocab_size, "vocab_size")?),
        ));
        kv.push((
            key("rope.dimension_count"),
            Value::U32(u32_of(config.head_dim, "head_dim")?),
        ));
    }
    Ok(kv)
}

/// Qwen3.5's keys: the Gated DeltaNet sizes, which layers are recurrent, and the rotary part of
/// each head with its multimodal sections (text positions fill all three).
fn gated_delta_net_hparams(
    config: &ModelConfig,
    linear: &LinearAttention,
    text: &Json,
    key: &dyn Fn(&str) -> String,
    u32_of: &dyn Fn(usize, &str) -> Result<u32, String>,
) -> Result<Vec<(String, Value)>, String> {
    // The upstream default, which llama.cpp's qwen35 loader requires written.
    let mut sections = vec![11, 11, 10];
    let rope = text
        .get("rope_parameters")
        .or_else(|| text.get("rope_scaling"));
    if let Some(given) = rope.and_then(|r| r.get("mrope_section")) {
        sections = serde_json::from_value(given.clone()).map_err(|_| {
            format!("rope_parameters.mrope_section is not a list of integers: {given}")
        })?;
    }
    sections.resize(4, 0);
    let interval = text
        .get("full_attention_interval")
        .and_then(Json::as_u64)
        .unwrap_or(4);
    let recurrent = config
        .layer_mixers
        .iter()
        .map(|m| Value::Bool(*m == TokenMixer::LinearAttention));
    Ok(vec![
        (
            key("ssm.conv_kernel"),
            Value::U32(u32_of(linear.conv_kernel_dim, "linear_conv_kernel_dim")?),
        ),
        (
            key("ssm.state_size"),
            Value::U32(u32_of(linear.key_head_dim, "linear_key_head_dim")?),
        ),
        (
            key("ssm.group_count"),
            Value::U32(u32_of(linear.num_key_heads, "linear_num_key_heads")?),
        ),
        (
            key("ssm.time_step_rank"),
            Value::U32(u32_of(linear.num_value_heads, "linear_num_value_heads")?),
        ),
        (
            key("ssm.inner_size"),
            Value::U32(u32_of(linear.value_dim(), "the value dimension")?),
        ),
        (
            key("attention.recurrent_layers"),
            Value::Array(7, recurrent.collect()),
        ),
        (
            key("full_attention_interval"),
            Value::U32(
                u32::try_from(interval).map_err(|_| "full_attention_interval is too large")?,
            ),
        ),
        (
            key("rope.dimension_count"),
            Value::U32(u32_of(config.rotary_dim, "the rotary dimension")?),
        ),
        (key("rope.dimension_sections"), Value::i32s(sections)),
    ])
}

/// Why llama.cpp would not compute what transformers computes, if it would not.
pub fn check(config: &ModelConfig) -> Result<(), String> {
    check_dense(config)?;
    if let Some(linear) = &config.linear_attention {
        if linear.key_head_dim != linear.value_head_dim {
            return Err(format!(
                "linear_value_head_dim = {} differs from linear_key_head_dim = {}, and llama.cpp's \
                 qwen35 architecture sizes both by one key (ssm.state_size), as every Qwen3.5 \
                 has them",
                linear.value_head_dim, linear.key_head_dim
            ));
        }
    }
    let context = config.max_position_embeddings.unwrap_or(usize::MAX);
    match config.sliding_window.iter().flatten().min() {
        // Mistral 7B v0.1's case: llama.cpp's converter writes it anyway, and past the window
        // its logits part from transformers'.
        Some(&window) if window < context => Err(format!(
            "sliding_window = {window} is below max_position_embeddings = {context}, and \
             llama.cpp's {} architecture attends to every earlier position: past {window} \
             tokens its logits would not be the model's",
            arch_name(config.arch)
        )),
        _ => Ok(()),
    }
}

/// llama.cpp's mixture-of-experts architectures (`qwen3moe`, `qwen35moe`) are not written yet.
fn check_dense(config: &ModelConfig) -> Result<(), String> {
    match config.moe {
        Some(_) => Err(format!(
            "swift-rs does not write GGUF files of mixture-of-experts models ({}moe) yet",
            arch_name(config.arch)
        )),
        None => Ok(()),
    }
}

/// Whether swift-rs writes this family's adapters as llama.cpp LoRA GGUF files.
pub fn check_lora_arch(config: &ModelConfig) -> Result<(), String> {
    check_dense(config)?;
    match config.arch {
        Arch::Qwen3_5 => Err(
            "swift-rs does not write LoRA GGUF files for the qwen35 architecture (Gated DeltaNet \
             layers) yet; export the model with the adapter merged (--to gguf)"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// One tensor of the file and where its values come from.
pub struct Planned {
    pub name: String,
    /// Torch order, as the file holds it.
    pub shape: Vec<usize>,
    pub source: Source,
}

pub enum Source {
    /// A checkpoint tensor of shape `stored`, edited in order.
    Checkpoint {
        key: String,
        stored: Vec<usize>,
        edits: Vec<Edit>,
    },
    /// Values computed here (llama 3's rotary frequency factors).
    Values(Vec<f32>),
}

/// How the converter changes a checkpoint tensor's values (row-major, `cols` a row) for
/// llama.cpp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// llama's q and k: llama.cpp rotates by interleaved pairs, Hugging Face by halves, so the
    /// rows of this many heads are reordered (`permute_rows`).
    Rotary(usize),
    /// A zero-centred RMSNorm weight (Qwen3.5's `x * (1 + w)`): llama.cpp multiplies by the
    /// weight, so the file holds `1 + w`.
    PlusOne,
    /// `A_log`: llama.cpp's `ssm_a` is `-exp(A_log)`.
    NegExp,
    /// Gated DeltaNet value heads, which the checkpoint groups by the key head they share, in
    /// the tiled order ggml broadcasts key heads by: past the first `skip` rows (or columns),
    /// `[key_heads, per_key, head_dim]` becomes `[per_key, key_heads, head_dim]`.
    TileValueHeads {
        skip: usize,
        key_heads: usize,
        per_key: usize,
        head_dim: usize,
        columns: bool,
    },
}

impl Edit {
    pub fn apply(self, values: Vec<f32>, cols: usize) -> Vec<f32> {
        match self {
            Self::Rotary(heads) => permute_rows(&values, heads, cols),
            Self::PlusOne => values.into_iter().map(|w| 1.0 + w).collect(),
            Self::NegExp => values.into_iter().map(|a| -a.exp()).collect(),
            Self::TileValueHeads {
                skip,
                key_heads,
                per_key,
                head_dim,
                columns,
            } => {
                // Where position `to` of the value part takes its entry from.
                let from = |to: usize| {
                    let (d, head) = (to % head_dim, to / head_dim);
                    let (k, p) = (head % key_heads, head / key_heads);
                    (k * per_key + p) * head_dim + d
                };
                let mut out = values.clone();
                let rows = values.len() / cols;
                for r in 0..rows {
                    for c in 0..cols {
                        let (row, col) = match columns {
                            true if c >= skip => (r, skip + from(c - skip)),
                            false if r >= skip => (skip + from(r - skip), c),
                            _ => continue,
                        };
                        out[r * cols + c] = values[row * cols + col];
                    }
                }
                out
            }
        }
    }
}

/// A tensor's GGUF name, its shape in the file (torch order) and the edits its values take.
pub type GgufTensor = (String, Vec<usize>, Vec<Edit>);

/// The GGUF name of checkpoint tensor `key`, its shape in the file (`stored`, the checkpoint's,
/// squeezed where the converter squeezes), and the edits its values take. None: a tensor
/// llama.cpp does not use (`rotary_emb.inv_freq`, a tied `lm_head`, a vision tower, Qwen3.5's
/// multi-token-prediction layer, which the converter writes only without `--no-mtp` and
/// llama.cpp does not run); an error: one it has no place for.
pub fn gguf_name(
    config: &ModelConfig,
    key: &str,
    stored: &[usize],
) -> Result<Option<GgufTensor>, String> {
    let unknown = || {
        format!(
            "checkpoint tensor {key} has no place in llama.cpp's {} architecture",
            arch_name(config.arch)
        )
    };
    let shape = stored.to_vec();
    if config.arch == Arch::Qwen3_5 && (key.starts_with("model.visual.") || key.starts_with("mtp."))
    {
        return Ok(None);
    }
    let zero_centered = || match config.zero_centered_norm {
        true => vec![Edit::PlusOne],
        false => vec![],
    };
    let text = match key {
        "lm_head.weight" if config.tie_word_embeddings => return Ok(None),
        "lm_head.weight" => return Ok(Some(("output.weight".into(), shape, vec![]))),
        _ => key
            .strip_prefix(config.text_prefix)
            .and_then(|k| k.strip_prefix('.'))
            .ok_or_else(unknown)?,
    };
    match text {
        "embed_tokens.weight" => return Ok(Some(("token_embd.weight".into(), shape, vec![]))),
        "norm.weight" => return Ok(Some(("output_norm.weight".into(), shape, zero_centered()))),
        _ => {}
    }
    let rest = text.strip_prefix("layers.").ok_or_else(unknown)?;
    let (layer, module) = rest.split_once('.').ok_or_else(unknown)?;
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    if layer >= config.num_hidden_layers {
        return Err(unknown());
    }
    if module.ends_with("rotary_emb.inv_freq") {
        return Ok(None);
    }
    if let (Some(linear), Some(part)) = (
        &config.linear_attention,
        module.strip_prefix("linear_attn."),
    ) {
        let (name, shape, edits) =
            gated_delta_net_tensor(linear, part, shape).ok_or_else(unknown)?;
        return Ok(Some((format!("blk.{layer}.{name}"), shape, edits)));
    }
    let (stem, suffix) = module.rsplit_once('.').ok_or_else(unknown)?;
    let name = match stem {
        "input_layernorm" => "attn_norm",
        // Qwen3.5's norm before the MLP is written as Qwen3-Next's converter writes it.
        "post_attention_layernorm" if config.arch == Arch::Qwen3_5 => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return Err(unknown()),
    };
    if !matches!(suffix, "weight" | "bias") {
        return Err(unknown());
    }
    let edits = match (arch_name(config.arch), name) {
        ("llama", "attn_q") => vec![Edit::Rotary(config.num_attention_heads)],
        ("llama", "attn_k") => vec![Edit::Rotary(config.num_key_value_heads)],
        (_, "attn_norm" | "post_attention_norm" | "attn_q_norm" | "attn_k_norm") => zero_centered(),
        _ => vec![],
    };
    Ok(Some((format!("blk.{layer}.{name}.{suffix}"), shape, edits)))
}

/// A Gated DeltaNet tensor (`linear_attn.<part>`) as the converter writes it: its name within
/// the block, its shape and its edits; None for a part it does not know.
fn gated_delta_net_tensor(
    linear: &LinearAttention,
    part: &str,
    mut shape: Vec<usize>,
) -> Option<(&'static str, Vec<usize>, Vec<Edit>)> {
    let tile = |skip, head_dim, columns| {
        let per_key = linear.num_value_heads / linear.num_key_heads;
        (per_key > 1).then_some(Edit::TileValueHeads {
            skip,
            key_heads: linear.num_key_heads,
            per_key,
            head_dim,
            columns,
        })
    };
    let (v_dim, qk) = (linear.value_head_dim, 2 * linear.key_dim());
    let (name, edits): (_, Vec<_>) = match part {
        "in_proj_qkv.weight" => (
            "attn_qkv.weight",
            tile(qk, v_dim, false).into_iter().collect(),
        ),
        "in_proj_z.weight" => (
            "attn_gate.weight",
            tile(0, v_dim, false).into_iter().collect(),
        ),
        "in_proj_a.weight" => ("ssm_alpha.weight", tile(0, 1, false).into_iter().collect()),
        "in_proj_b.weight" => ("ssm_beta.weight", tile(0, 1, false).into_iter().collect()),
        "out_proj.weight" => ("ssm_out.weight", tile(0, v_dim, true).into_iter().collect()),
        "norm.weight" => ("ssm_norm.weight", vec![]),
        "dt_bias" => ("ssm_dt.bias", tile(0, 1, false).into_iter().collect()),
        "A_log" => (
            "ssm_a",
            tile(0, 1, false)
                .into_iter()
                .chain([Edit::NegExp])
                .collect(),
        ),
        "conv1d.weight" => {
            // [channels, 1, kernel]: the depthwise kernel's middle axis is squeezed out.
            shape.retain(|&n| n != 1);
            (
                "ssm_conv1d.weight",
                tile(qk, v_dim, false).into_iter().collect(),
            )
        }
        _ => return None,
    };
    Some((name, shape, edits))
}

/// Every tensor of the file, in the checkpoint's order, llama 3's `rope_freqs` first.
pub fn plan(
    config: &ModelConfig,
    tensors: &[(String, Vec<usize>)],
) -> Result<Vec<Planned>, String> {
    let mut planned = Vec::new();
    if let Some(factors) = llama3_rope_factors(config) {
        planned.push(Planned {
            name: "rope_freqs.weight".into(),
            shape: vec![factors.len()],
            source: Source::Values(factors),
        });
    }
    let mut problems = Vec::new();
    for (key, stored) in tensors {
        match gguf_name(config, key, stored) {
            Ok(Some((name, shape, edits))) => planned.push(Planned {
                name,
                shape,
                source: Source::Checkpoint {
                    key: key.clone(),
                    stored: stored.clone(),
                    edits,
                },
            }),
            Ok(None) => {}
            Err(e) => problems.push(e),
        }
    }
    match problems.is_empty() {
        true => Ok(planned),
        false => Err(problems.join("; ")),
    }
}

/// Undoes Hugging Face's rotary layout of a q or k projection (`[heads * head_dim, cols]`, row
/// major): within each head, row `2j + t` of the result is row `t * head_dim / 2 + j`.
pub fn permute_rows(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let half = rows / heads / 2;
    let mut out = Vec::with_capacity(values.len());
    for h in 0..heads {
        for j in 0..half {
            for t in 0..2 {
                let from = (h * 2 * half + t * half + j) * cols;
                out.extend_from_slice(&values[from..from + cols]);
            }
        }
    }
    out
}

/// llama 3's per-frequency factors, which llama.cpp reads from a `rope_freqs` tensor. Computed in
/// f32 step by step as the converter computes them in torch.
fn llama3_rope_factors(config: &ModelConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old_context,
    } = config.rope.scaling
    else {
        return None;
    };
    let dim = config.head_dim;
    let base = config.rope.theta as f32;
    let (low_wavelen, high_wavelen) = (
        old_context / low_freq_factor,
        old_context / high_freq_factor,
    );
    let factors = (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / base.powf(i as f32 / dim as f32);
            let wavelen = (2.0 * std::f64::consts::PI) as f32 / freq;
            if wavelen < high_wavelen as f32 {
                1.0
            } else if wavelen > low_wavelen as f32 {
                factor as f32
            } else {
                let smooth = (old_context as f32 / wavelen - low_freq_factor as f32)
                    / (high_freq_factor - low_freq_factor) as f32;
                1.0 / ((1.0 - smooth) / factor as f32 + smooth)
            }
        })
        .collect();
    Some(factors)
}

#[cfg(test)]
mod tests {
    use super::permute_rows;

    #[test]
    fn permuting_rows_interleaves_the_two_halves_of_each_head() {
        // Two heads of head_dim 4, one column: rows [a0 a1 b0 b1 | c0 c1 d0 d1].
        let rows = [0., 1., 2., 3., 10., 11., 12., 13.];
        assert_eq!(
            permute_rows(&rows, 2, 1),
            vec![0., 2., 1., 3., 10., 12., 11., 13.]
        );
    }
}
