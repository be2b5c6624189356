//! The TOML file onto the defaults: SPEC's `[section] key`, ms-swift's flat argument names as
//! aliases (at the top level or in their section), `--set section.key=value` overrides, and
//! errors placed at the file and line of the key they name.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value as Json;
use toml::{Table, Value};

use super::TrainConfig;
use crate::config::ConfigError;

/// ms-swift's argument names and the keys they stand for.
const ALIASES: &[(&str, &str, &str)] = &[
    ("model", "model", "path"),
    ("model_id_or_path", "model", "path"),
    ("torch_dtype", "model", "dtype"),
    ("template", "model", "template"),
    ("system", "model", "system"),
    ("use_hf", "model", "hub"),
    ("lora_rank", "lora", "r"),
    ("lora_alpha", "lora", "alpha"),
    ("lora_dropout", "lora", "dropout"),
    ("target_modules", "lora", "target_modules"),
    ("target_regex", "lora", "target_regex"),
    ("use_rslora", "lora", "use_rslora"),
    ("use_dora", "lora", "use_dora"),
    ("init_weights", "lora", "init"),
    ("quant_bits", "quant", "bits"),
    ("bnb_4bit_quant_type", "quant", "type"),
    ("bnb_4bit_use_double_quant", "quant", "double_quant"),
    ("dataset", "data", "train"),
    ("val_dataset", "data", "val"),
    ("split_dataset_ratio", "data", "val_ratio"),
    ("columns", "data", "columns"),
    ("max_length", "data", "max_length"),
    ("truncation_strategy", "data", "truncation"),
    ("dataset_shuffle", "data", "shuffle"),
    ("packing", "data", "packing"),
    ("streaming", "data", "streaming"),
    ("loss_scale", "data", "loss_scale"),
    ("num_train_epochs", "train", "epochs"),
    ("max_steps", "train", "max_steps"),
    ("per_device_train_batch_size", "train", "batch_size"),
    ("gradient_accumulation_steps", "train", "grad_accum"),
    ("learning_rate", "train", "lr"),
    ("lr_scheduler_type", "train", "lr_scheduler"),
    ("warmup_ratio", "train", "warmup_ratio"),
    ("warmup_steps", "train", "warmup_steps"),
    ("optim", "train", "optimizer"),
    ("weight_decay", "train", "weight_decay"),
    ("adam_beta1", "train", "adam_beta1"),
    ("adam_beta2", "train", "adam_beta2"),
    ("adam_epsilon", "train", "adam_eps"),
    ("max_grad_norm", "train", "max_grad_norm"),
    ("gradient_checkpointing", "train", "gradient_checkpointing"),
    ("seed", "train", "seed"),
    ("logging_steps", "train", "logging_steps"),
    ("save_steps", "train", "save_steps"),
    ("eval_steps", "train", "eval_steps"),
    ("save_total_limit", "train", "save_total_limit"),
    ("resume_from_checkpoint", "train", "resume_from"),
    ("output_dir", "output", "dir"),
    ("overwrite_output_dir", "output", "overwrite"),
];

/// The config in `text` (the file `path`) with `sets` applied, deserialized onto the defaults.
pub(super) fn read(text: &str, path: &Path, sets: &[String]) -> Result<TrainConfig, ConfigError> {
    let raw: Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
    let known = known_keys();
    let at = |section: Option<&str>, key: &str| location(path, text, section, key);
    let mut table = Table::new();
    // `at` is only worked out (a scan of the text) when there is an error to report.
    let mut place = |section: &str,
                     key: &str,
                     value: Value,
                     at: &dyn Fn() -> String|
     -> Result<(), ConfigError> {
        let entry = table
            .entry(section.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(entries) = entry else {
            unreachable!("sections are tables")
        };
        if entries.insert(key.to_string(), value).is_some() {
            return Err(ConfigError::Key {
                at: at(),
                message: format!("{section}.{key} is given twice (once under an ms-swift name)"),
            });
        }
        Ok(())
    };
    for (name, value) in raw {
        match (value, known.get(name.as_str())) {
            (Value::Table(entries), Some(_)) => {
                for (key, value) in entries {
                    let here = || at(Some(&name), &key);
                    let canonical_key = canonical(&known, &name, &key)
                        .ok_or_else(|| unknown_key(here(), &known, &format!("{name}.{key}")))?;
                    place(&name, canonical_key, value, &here)?;
                }
            }
            (value, _) => {
                let here = || at(None, &name);
                let (section, key) = ALIASES
                    .iter()
                    .find(|(alias, ..)| *alias == name)
                    .map(|&(_, s, k)| (s, k))
                    .ok_or_else(|| unknown_key(here(), &known, &name))?;
                place(section, key, value, &here)?;
            }
        }
    }
    for set in sets {
        let at = format!("--set {set}");
        let (name, value) = set.split_once('=').ok_or_else(|| ConfigError::Key {
            at: at.clone(),
            message: "expected section.key=value".into(),
        })?;
        let (section, key) = match name.trim().split_once('.') {
            Some((s, k)) if known.contains_key(s) => (
                s,
                canonical(&known, s, k).ok_or_else(|| unknown_key(at.clone(), &known, name))?,
            ),
            _ => ALIASES
                .iter()
                .find(|(alias, ..)| *alias == name.trim())
                .map(|&(_, s, k)| (s, k))
                .ok_or_else(|| unknown_key(at.clone(), &known, name))?,
        };
        let entries = table
            .entry(section.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        if let Value::Table(entries) = entries {
            entries.insert(key.to_string(), set_value(value.trim()));
        }
    }
    from_table(table, text, path)
}

/// Deserializes the config; a type error names its key and line.
fn from_table(table: Table, text: &str, path: &Path) -> Result<TrainConfig, ConfigError> {
    serde_json::from_value(with_defaults(&table, usize::MAX)).map_err(|whole| {
        culprit(&table, text, path).unwrap_or_else(|| ConfigError::Key {
            at: path.display().to_string(),
            message: whole.to_string(),
        })
    })
}

/// The first key whose value does not deserialize (keys added one by one onto the defaults).
fn culprit(table: &Table, text: &str, path: &Path) -> Option<ConfigError> {
    let keys = table
        .iter()
        .flat_map(|(section, entries)| {
            let keys = entries.as_table().map(|t| t.keys().collect::<Vec<_>>());
            keys.unwrap_or_default()
                .into_iter()
                .map(move |k| (section, k))
        })
        .collect::<Vec<_>>();
    (1..=keys.len()).find_map(|n| {
        let e = serde_json::from_value::<TrainConfig>(with_defaults(table, n)).err()?;
        let (section, key) = keys[n - 1];
        Some(ConfigError::Key {
            at: location(path, text, Some(section), key),
            message: format!("{section}.{key}: {e}"),
        })
    })
}

/// The defaults as JSON with the first `n` keys of `table` (section by section) put in.
fn with_defaults(table: &Table, n: usize) -> Json {
    let mut json = serde_json::to_value(TrainConfig::default()).expect("defaults serialize");
    let entries = table
        .iter()
        .filter_map(|(section, entries)| Some((section, entries.as_table()?)))
        .flat_map(|(section, entries)| entries.iter().map(move |(k, v)| (section, k, v)));
    for (section, key, value) in entries.take(n) {
        json[section][key] = serde_json::to_value(value).expect("TOML is JSON");
    }
    json
}

/// "file:line" of `key` in `[section]`, or the file alone when the line is not found.
fn location(path: &Path, text: &str, section: Option<&str>, key: &str) -> String {
    match line_of(text, section, key) {
        Some(line) => format!("{}:{line}", path.display()),
        None => path.display().to_string(),
    }
}

/// Each section's keys, from the defaults (so the list cannot drift from the structs).
fn known_keys() -> BTreeMap<String, Vec<String>> {
    let Json::Object(sections) = serde_json::to_value(TrainConfig::default()).expect("serializes")
    else {
        unreachable!("a struct")
    };
    sections
        .into_iter()
        .map(|(name, keys)| {
            let keys = keys
                .as_object()
                .map_or(Vec::new(), |k| k.keys().cloned().collect());
            (name, keys)
        })
        .collect()
}

/// The key `key` stands for in `section`: itself, or the key of its ms-swift alias.
fn canonical<'a>(
    known: &BTreeMap<String, Vec<String>>,
    section: &str,
    key: &'a str,
) -> Option<&'a str> {
    if known[section].iter().any(|k| k == key) {
        return Some(key);
    }
    ALIASES
        .iter()
        .find(|(alias, s, _)| *alias == key && *s == section)
        .map(|&(_, _, k)| k)
}

fn unknown_key(at: String, known: &BTreeMap<String, Vec<String>>, key: &str) -> ConfigError {
    let section = key.split_once('.').map(|(s, _)| s);
    let message = match section.and_then(|s| known.get(s).map(|keys| (s, keys))) {
        Some((s, keys)) => format!("unknown key {key} (keys of [{s}]: {})", keys.join(", ")),
        None => format!(
            "unknown key {key} (sections: {})",
            known.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    };
    ConfigError::Key { at, message }
}

/// A `--set` value: TOML when it parses as a value (numbers, booleans, arrays, quoted strings),
/// else the bare text as a string.
fn set_value(text: &str) -> Value {
    format!("v = {text}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(text.to_string()))
}

/// The 1-based line of `key` in `[section]` (or before any section when None).
fn line_of(text: &str, section: Option<&str>, key: &str) -> Option<usize> {
    let mut current: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = Some(header.trim().to_string());
            continue;
        }
        let Some((name, _)) = line.split_once('=') else {
            continue;
        };
        if current.as_deref() == section && name.trim().trim_matches('"') == key {
            return Some(i + 1);
        }
    }
    None
}
