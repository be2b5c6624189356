//! The `tokenizer.*` keys of a byte-level BPE tokenizer (Qwen's, Llama 3's), as llama.cpp's
//! converter writes them from `tokenizer.json`, `tokenizer_config.json` and `config.json`.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value as Json;

use super::file::Value;

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The pre-tokenizer splits llama.cpp knows, by the regex of tokenizer.json's `Split`
/// (`llama-vocab.cpp` holds the same regexes under these names).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn read_json(path: &Path) -> Result<Option<Json>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The tokenizer keys for the model in `dir`, whose embedding has `vocab_size` rows.
pub fn metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>, String> {
    let path = dir.join("tokenizer.json");
    let tokenizer =
        read_json(&path)?.ok_or_else(|| format!("{}: file not found", path.display()))?;
    let bad = |what: String| format!("{}: {what}", path.display());
    let model = &tokenizer["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        return Err(bad(
            "only byte-level BPE tokenizers (Qwen's, Llama 3's) are written to GGUF".into(),
        ));
    }
    let pre = pre_tokenizer(&tokenizer["pre_tokenizer"]).map_err(&bad)?;
    let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    let hf_config = read_json(&dir.join("config.json"))?.unwrap_or(Json::Null);

    let mut by_id: HashMap<usize, (String, i32)> = HashMap::new();
    for (token, id) in model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object".into()))?
    {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("model.vocab[{token:?}] is not an id")))?;
        by_id.insert(id as usize, (token.clone(), NORMAL));
    }
    let added = tokenizer["added_tokens"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for t in &added {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else {
            return Err(bad(format!("added_tokens entry {t} has no id or content")));
        };
        let looks_special = content.starts_with("<|") && content.ends_with("|>");
        let kind = match t["special"] == true || looks_special {
            true => CONTROL,
            false => USER_DEFINED,
        };
        by_id.insert(id as usize, (content.to_string(), kind));
    }
    if let Some(id) = by_id.keys().find(|&&id| id >= vocab_size) {
        return Err(bad(format!(
            "token id {id} is past the model's vocabulary ({vocab_size} embeddings)"
        )));
    }
    let (tokens, types): (Vec<String>, Vec<i32>) = (0..vocab_size)
        .map(|i| {
            by_id
                .remove(&i)
                .unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED))
        })
        .unzip();

    let mut kv = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::Str("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::Str(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::strings(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::i32s(types)),
        (
            "tokenizer.ggml.merges".to_string(),
            Value::strings(merges(&model["merges"]).map_err(&bad)?),
        ),
    ];
    for (kind, id) in special_ids(&config, &hf_config, &added, vocab_size) {
        kv.push((format!("tokenizer.ggml.{kind}_token_id"), Value::U32(id)));
    }
    for (kind, add) in adds_special(&tokenizer["post_processor"], &config) {
        kv.push((format!("tokenizer.ggml.add_{kind}_token"), Value::Bool(add)));
    }
    if let Some(template) = chat_template(dir, &config)? {
        kv.push(("tokenizer.chat_template".to_string(), Value::Str(template)));
    }
    Ok(kv)
}

/// llama.cpp's name for the pre-tokenizer: GPT-2's own regex (a bare `ByteLevel` with
/// `use_regex`), or a `Split` by Qwen 2's or Llama 3's regex before a `ByteLevel` without one.
fn pre_tokenizer(pre: &Json) -> Result<&'static str, String> {
    if pre["type"] == "ByteLevel" && pre["use_regex"] != false {
        return Ok("gpt-2");
    }
    let steps = pre["pretokenizers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if let [split, byte_level] = steps {
        let regex = split["pattern"]["Regex"].as_str();
        if split["type"] == "Split"
            && byte_level["type"] == "ByteLevel"
            && byte_level["use_regex"] == false
        {
            match regex {
                Some(QWEN2_SPLIT) => return Ok("qwen2"),
                Some(LLAMA3_SPLIT) => return Ok("llama-bpe"),
                _ => {}
            }
        }
    }
    Err(format!(
        "pre_tokenizer {pre} is not one llama.cpp's tokenizer knows (GPT-2's, Qwen 2's or \
         Llama 3's split)"
    ))
}

/// Merges as "left right", a space inside a part written as U+0120 as the converter writes it.
fn merges(merges: &Json) -> Result<Vec<String>, String> {
    let items = merges.as_array().ok_or("model.merges is not a list")?;
    items
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => {
                    let escape = |s: &str| s.replace(' ', "\u{0120}");
                    Ok(format!("{} {}", escape(a), escape(b)))
                }
                _ => Err(format!("merge {m} is not a pair of strings")),
            },
            _ => Err(format!("merge {m} is neither a string nor a pair")),
        })
        .collect()
}

/// The special token ids under GGUF's names for them (`seperator` as GGUF spells it):
/// tokenizer_config.json's `{kind}_token` found among the added tokens, else config.json's
/// `{kind}_token_id`; ids past the vocabulary are left out. The converter has no key for `cls`.
fn special_ids(
    config: &Json,
    hf_config: &Json,
    added: &[Json],
    vocab_size: usize,
) -> Vec<(&'static str, u32)> {
    let mut ids = Vec::new();
    let kinds = [
        ("bos", "bos"),
        ("eos", "eos"),
        ("unk", "unknown"),
        ("sep", "seperator"),
        ("pad", "padding"),
        ("mask", "mask"),
    ];
    for (kind, name) in kinds {
        let entry = &config[format!("{kind}_token")];
        let content = entry.as_str().or_else(|| entry["content"].as_str());
        let from_tokenizer = content.and_then(|c| {
            added
                .iter()
                .find(|t| t["content"] == c)
                .and_then(|t| t["id"].as_u64())
        });
        let id = from_tokenizer.or_else(|| hf_config[format!("{kind}_token_id")].as_u64());
        if let Some(id) = id.filter(|&id| (id as usize) < vocab_size) {
            ids.push((name, id as u32));
        }
    }
    ids
}

/// Whether llama.cpp adds bos and eos around a prompt: what tokenizer.json's post-processor does
/// (a template that starts or ends with them), else tokenizer_config.json's `add_*_token`.
fn adds_special(post: &Json, config: &Json) -> Vec<(&'static str, bool)> {
    let mut adds: Vec<(&'static str, bool)> = Vec::new();
    let processors = match post["processors"].as_array() {
        Some(list) => list.clone(),
        None if post.is_null() => Vec::new(),
        None => vec![post.clone()],
    };
    let token = |kind: &str| {
        let entry = &config[format!("{kind}_token")];
        entry
            .as_str()
            .or_else(|| entry["content"].as_str())
            .map(str::to_string)
    };
    for p in &processors {
        if p["type"] == "ByteLevel" {
            for kind in ["bos", "eos"] {
                if !adds.iter().any(|(k, _)| *k == kind) {
                    adds.push((kind, false));
                }
            }
        } else if p["type"] == "TemplateProcessing" {
            let single = p["single"].as_array().cloned().unwrap_or_default();
            if single.len() > 1 {
                let special = |item: &Json| item["SpecialToken"]["id"].as_str().map(str::to_string);
                if let Some(first) = single.first().and_then(special) {
                    adds.retain(|(k, _)| *k != "bos");
                    adds.push(("bos", Some(first) == token("bos")));
                }
                if let Some(last) = single.last().and_then(special) {
                    adds.retain(|(k, _)| *k != "eos");
                    adds.push(("eos", Some(last) == token("eos")));
                }
            }
        }
    }
    for kind in ["bos", "eos"] {
        if let Some(add) = config[format!("add_{kind}_token")].as_bool() {
            if !adds.iter().any(|(k, _)| *k == kind) {
                adds.push((kind, add));
            }
        }
    }
    adds
}

/// tokenizer_config.json's `chat_template`, else `chat_template.jinja`, else
/// `chat_template.json`'s.
fn chat_template(dir: &Path, config: &Json) -> Result<Option<String>, String> {
    if let Some(t) = config["chat_template"].as_str() {
        return Ok(Some(t.to_string()));
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| format!("{}: {e}", jinja.display()));
    }
    Ok(read_json(&dir.join("chat_template.json"))?
        .and_then(|j| j["chat_template"].as_str().map(str::to_string)))
}

#[cfg(test)]
mod tests {
    use super::{pre_tokenizer, LLAMA3_SPLIT, QWEN2_SPLIT};
    use serde_json::json;

    /// The shape Qwen 2.5's and Llama 3's tokenizer.json give their pre-tokenizer.
    fn split_then_bytes(regex: &str) -> serde_json::Value {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]})
    }

    #[test]
    fn pre_tokenizers_get_llama_cpps_names_or_an_error() {
        assert_eq!(pre_tokenizer(&split_then_bytes(QWEN2_SPLIT)), Ok("qwen2"));
        assert_eq!(
            pre_tokenizer(&split_then_bytes(LLAMA3_SPLIT)),
            Ok("llama-bpe")
        );
        let gpt2 = json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true});
        assert_eq!(pre_tokenizer(&gpt2), Ok("gpt-2"));
        // One digit more per number than Llama 3 splits: a tokenizer llama.cpp does not know.
        let other = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}{1,4}");
        assert!(pre_tokenizer(&split_then_bytes(&other)).is_err());
        assert!(pre_tokenizer(&json!({"type": "Whitespace"})).is_err());
    }
}
