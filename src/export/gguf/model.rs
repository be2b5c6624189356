//! What llama.cpp's `convert_hf_to_gguf.py` writes for a Hugging Face checkpoint of the supported
//! families: the architecture's keys, and each tensor under its GGUF name in its GGUF layout.

use serde_json::Value as Json;

use super::file::Value;
use crate::config::{Arch, ModelConfig, RopeScaling};

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
    if raw.get("head_dim").is_some_and(|d| !d.is_null()) {
        let d = u32_of(config.head_dim, "head_dim")?;
        kv.push((key("attention.key_length"), Value::U32(d)));
        kv.push((key("attention.value_length"), Value::U32(d)));
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

/// Why llama.cpp would not compute what transformers computes, if it would not.
pub fn check(config: &ModelConfig) -> Result<(), String> {
    check_arch(config.arch)?;
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

/// Whether swift-rs writes this family's GGUF tensors at all.
pub fn check_arch(arch: Arch) -> Result<(), String> {
    match arch {
        Arch::Qwen3_5 => Err(
            "swift-rs does not write the qwen35 GGUF architecture (Gated DeltaNet layers) yet"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// One tensor of the file and where its values come from.
pub struct Planned {
    pub name: String,
    /// Torch order.
    pub shape: Vec<usize>,
    pub source: Source,
}

pub enum Source {
    /// A checkpoint tensor; `permute` holds the head count that llama's rotary layout undoes.
    Checkpoint { key: String, permute: Option<usize> },
    /// Values computed here (llama 3's rotary frequency factors).
    Values(Vec<f32>),
}

/// The GGUF name of checkpoint tensor `key`, and the head count whose rotary layout it undoes
/// (llama's q and k). None: a tensor llama.cpp does not use (`rotary_emb.inv_freq`, a tied
/// `lm_head`); an error: one it has no place for.
pub fn gguf_name(
    config: &ModelConfig,
    key: &str,
) -> Result<Option<(String, Option<usize>)>, String> {
    let fixed = match key {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" if config.tie_word_embeddings => return Ok(None),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Ok(Some((name.to_string(), None)));
    }
    let unknown = || {
        format!(
            "checkpoint tensor {key} has no place in llama.cpp's {} architecture",
            arch_name(config.arch)
        )
    };
    let rest = key.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let (layer, module) = rest.split_once('.').ok_or_else(unknown)?;
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    if module.ends_with("rotary_emb.inv_freq") {
        return Ok(None);
    }
    let (stem, suffix) = module.rsplit_once('.').ok_or_else(unknown)?;
    let name = match stem {
        "input_layernorm" => "attn_norm",
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
    if !matches!(suffix, "weight" | "bias") || layer >= config.num_hidden_layers {
        return Err(unknown());
    }
    // llama.cpp rotates llama's q and k by interleaved pairs, Hugging Face by halves: the
    // converter reorders their rows so both rotations meet the same values.
    let permute = match (arch_name(config.arch), name) {
        ("llama", "attn_q") => Some(config.num_attention_heads),
        ("llama", "attn_k") => Some(config.num_key_value_heads),
        _ => None,
    };
    Ok(Some((format!("blk.{layer}.{name}.{suffix}"), permute)))
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
    for (key, shape) in tensors {
        match gguf_name(config, key) {
            Ok(Some((name, permute))) => planned.push(Planned {
                name,
                shape: shape.clone(),
                source: Source::Checkpoint {
                    key: key.clone(),
                    permute,
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
