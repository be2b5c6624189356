//! The `tokenizer.*` keys, as llama.cpp's converter writes them from `tokenizer.json`,
//! `tokenizer_config.json` and `config.json`: a byte-level BPE (Qwen's, Llama 3's) as `gpt2`, a
//! SentencePiece BPE (Llama 2's, Mistral's, with its `tokenizer.model`) as `llama`.

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

/// The tokenizer keys for the model in `dir` (its config.json as `hf_config`) of llama.cpp
/// architecture `arch`, whose embedding has `vocab_size` rows.
pub fn metadata(
    dir: &Path,
    hf_config: &Json,
    arch: &str,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>, String> {
    let path = dir.join("tokenizer.json");
    let tokenizer =
        read_json(&path)?.ok_or_else(|| format!("{}: file not found", path.display()))?;
    let bad = |what: String| format!("{}: {what}", path.display());
    let model = &tokenizer["model"];
    if model["type"] != "BPE" {
        return Err(bad(format!(
            "model.type {}: only BPE tokenizers (byte-level or SentencePiece's) are written to GGUF",
            model["type"]
        )));
    }
    let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    let added = tokenizer["added_tokens"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut kv = Vec::new();
    // The converter's llama class writes this before any vocabulary.
    if let (Some(add), "llama") = (config["add_prefix_space"].as_bool(), arch) {
        kv.push((
            "tokenizer.ggml.add_space_prefix".to_string(),
            Value::Bool(add),
        ));
    }
    match model["byte_fallback"] == true {
        true => kv.extend(sentencepiece(dir, &config, vocab_size)?),
        false => kv.extend(byte_level(&tokenizer, &added, vocab_size).map_err(&bad)?),
    }
    for (kind, id) in special_ids(&config, hf_config, &added, vocab_size) {
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

/// A byte-level BPE: `gpt2`, with its pre-tokenizer's name, tokens, types and merges.
fn byte_level(
    tokenizer: &Json,
    added: &[Json],
    vocab_size: usize,
) -> Result<Vec<(String, Value)>, String> {
    let model = &tokenizer["model"];
    let pre = pre_tokenizer(&tokenizer["pre_tokenizer"])?;
    let mut by_id: HashMap<usize, (String, i32)> = HashMap::new();
    for (token, id) in model["vocab"]
        .as_object()
        .ok_or("model.vocab is not an object")?
    {
        let id = id
            .as_u64()
            .ok_or_else(|| format!("model.vocab[{token:?}] is not an id"))?;
        by_id.insert(id as usize, (token.clone(), NORMAL));
    }
    for t in added {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else {
            return Err(format!("added_tokens entry {t} has no id or content"));
        };
        let kind = match t["special"] == true || looks_special(content) {
            true => CONTROL,
            false => USER_DEFINED,
        };
        by_id.insert(id as usize, (content.to_string(), kind));
    }
    if let Some(id) = by_id.keys().find(|&&id| id >= vocab_size) {
        return Err(format!(
            "token id {id} is past the model's vocabulary ({vocab_size} embeddings)"
        ));
    }
    let (tokens, types): (Vec<String>, Vec<i32>) = (0..vocab_size)
        .map(|i| {
            by_id
                .remove(&i)
                .unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED))
        })
        .unzip();
    Ok(vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::Str("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::Str(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::strings(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::i32s(types)),
        (
            "tokenizer.ggml.merges".to_string(),
            Value::strings(merges(&model["merges"])?),
        ),
    ])
}

/// A SentencePiece BPE: `llama`, with each piece of `tokenizer.model`, its score and its type,
/// then `added_tokens.json`'s and tokenizer_config.json's added tokens over them, as the
/// converter's `_create_vocab_sentencepiece` does.
fn sentencepiece(
    dir: &Path,
    config: &Json,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>, String> {
    let path = dir.join("tokenizer.model");
    let bytes = std::fs::read(&path).map_err(|e| {
        format!(
            "{}: {e} (a SentencePiece tokenizer's GGUF vocabulary, scores included, comes from it)",
            path.display()
        )
    })?;
    let pieces = sentencepiece_pieces(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000f32; vocab_size];
    let mut types = vec![UNUSED; vocab_size];
    for (id, (piece, score, kind)) in pieces.into_iter().enumerate().take(vocab_size) {
        tokens[id] = piece;
        scores[id] = score;
        // SentencePiece's UNKNOWN, CONTROL, UNUSED and BYTE are llama.cpp's; the converter counts
        // USER_DEFINED pieces as normal.
        types[id] = match kind {
            2 | 3 | 5 | 6 => kind,
            _ => NORMAL,
        };
    }
    let mut set = |id: usize, token: String, kind: i32| {
        if id < vocab_size {
            tokens[id] = token;
            scores[id] = -1000.0;
            types[id] = kind;
        }
    };
    if let Some(added) = read_json(&dir.join("added_tokens.json"))? {
        for (token, id) in added.as_object().into_iter().flatten() {
            if let Some(id) = id.as_u64() {
                set(id as usize, token.clone(), USER_DEFINED);
            }
        }
    }
    for (id, entry) in config["added_tokens_decoder"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let (Ok(id), Some(content)) = (id.parse::<usize>(), entry["content"].as_str()) else {
            continue;
        };
        match entry["special"] == true || looks_special(content) {
            true => set(id, content.to_string(), CONTROL),
            false => set(id, content.replace('\u{2581}', " "), USER_DEFINED),
        }
    }
    let scores = Value::Array(6, scores.into_iter().map(Value::F32).collect());
    Ok(vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::Str("llama".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::Str("default".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), Value::strings(tokens)),
        ("tokenizer.ggml.scores".to_string(), scores),
        ("tokenizer.ggml.token_type".to_string(), Value::i32s(types)),
    ])
}

/// The converter's guess that an added token is special: `<|...|>` and the like.
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<\u{ff5c}") && token.ends_with("\u{ff5c}>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// Each piece of a SentencePiece `ModelProto` (its field 1): the piece, its score and its type
/// (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6), read off protobuf's wire
/// format; other fields are skipped.
fn sentencepiece_pieces(bytes: &[u8]) -> Result<Vec<(String, f32, i32)>, String> {
    let mut pieces = Vec::new();
    let mut model = Wire { bytes, at: 0 };
    while let Some((field, value)) = model.field()? {
        let (1, Field::Bytes(message)) = (field, value) else {
            continue;
        };
        let (mut piece, mut score, mut kind) = (String::new(), 0f32, 1i32);
        let mut wire = Wire {
            bytes: message,
            at: 0,
        };
        while let Some((field, value)) = wire.field()? {
            match (field, value) {
                (1, Field::Bytes(b)) => {
                    piece = String::from_utf8(b.to_vec()).map_err(|e| e.to_string())?
                }
                (2, Field::Fixed32(bits)) => score = f32::from_bits(bits),
                (3, Field::Varint(v)) => kind = v as i32,
                _ => {}
            }
        }
        pieces.push((piece, score, kind));
    }
    match pieces.is_empty() {
        true => Err("no pieces: not a SentencePiece model".into()),
        false => Ok(pieces),
    }
}

/// A protobuf field's value by wire type (fixed64 values are skipped).
enum Field<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

struct Wire<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or("a varint runs past the end")?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let slice = self
            .bytes
            .get(self.at..self.at.saturating_add(n))
            .ok_or("a field runs past the end")?;
        self.at += n;
        Ok(slice)
    }

    /// The next field's number and value; None at the end.
    fn field(&mut self) -> Result<Option<(u64, Field<'a>)>, String> {
        if self.at == self.bytes.len() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let value = match tag & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let n = self.varint()? as usize;
                Field::Bytes(self.take(n)?)
            }
            5 => Field::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().expect("4 bytes"),
            )),
            other => return Err(format!("wire type {other} is not protobuf's")),
        };
        Ok(Some((tag >> 3, value)))
    }
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

/// Whether llama.cpp adds bos, eos and a separator: what tokenizer.json's post-processor does (a
/// template that starts or ends with them, or puts the separator or eos between a pair), else
/// tokenizer_config.json's `add_*_token`; SpecialVocab's reading of them.
fn adds_special(post: &Json, config: &Json) -> Vec<(&'static str, bool)> {
    let mut adds: Vec<(&'static str, bool)> = Vec::new();
    let set = |adds: &mut Vec<(&'static str, bool)>, kind: &'static str, add: bool| {
        adds.retain(|(k, _)| *k != kind);
        adds.push((kind, add));
    };
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
            let special = |item: &Json| item["SpecialToken"]["id"].as_str().map(str::to_string);
            let single = p["single"].as_array().cloned().unwrap_or_default();
            let (mut first, mut last) = (None, None);
            if single.len() > 1 {
                first = single.first().and_then(special);
                last = single.last().and_then(special);
                if let Some(first) = &first {
                    set(&mut adds, "bos", Some(first) == token("bos").as_ref());
                }
                if let Some(last) = &last {
                    set(&mut adds, "eos", Some(last) == token("eos").as_ref());
                }
            }
            // The pair template, its outer tokens (those of the single one) left out: a
            // separator between A and B is one the tokenizer adds.
            let pair = p["pair"].as_array().cloned().unwrap_or_default();
            let start = usize::from(first.is_some() && pair.first().and_then(special) == first);
            let stop = match last.is_some() && pair.last().and_then(special) == last {
                true => pair.len().saturating_sub(1),
                false => pair.len(),
            };
            let inner = pair.get(start..stop.max(start)).unwrap_or_default();
            fn sequence(item: Option<&Json>) -> Option<&str> {
                item.and_then(|i| i["Sequence"]["id"].as_str())
            }
            if inner.len() > 2
                && sequence(inner.first()) == Some("A")
                && sequence(inner.last()) == Some("B")
            {
                let middle = &inner[1..inner.len() - 1];
                let separates = |item: &Json| {
                    special(item).is_some_and(|t| {
                        Some(&t) == token("sep").as_ref() || Some(&t) == token("eos").as_ref()
                    })
                };
                let add_sep = (separates(&middle[0]) && last.is_none())
                    || (middle.len() == 2 && separates(&middle[1]));
                set(&mut adds, "sep", add_sep);
            }
        }
    }
    for kind in ["bos", "eos", "sep"] {
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
