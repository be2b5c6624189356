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
pub(super) const ALIASES: &[(&str, &str, &str)] = &[
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
    ("target_parameters", "lora", "target_parameters"),
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
    ("shuffle_buffer_size", "data", "shuffle_buffer_size"),
    ("packing", "data", "packing"),
    ("streaming", "data", "streaming"),
    ("loss_scale", "data", "loss_scale"),
    ("dataset_num_proc", "data", "num_proc"),
    ("model_name", "data", "model_name"),
    ("model_author", "data", "model_author"),
    ("num_train_epochs", "train", "epochs"),
    ("max_steps", "train", "max_steps"),
    ("max_epochs", "train", "max_epochs"),
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
    ("router_aux_loss_coef", "train", "router_aux_loss_coef"),
    ("gradient_checkpointing", "train", "gradient_checkpointing"),
    ("seed", "train", "seed"),
    ("logging_steps", "train", "logging_steps"),
    ("save_steps", "train", "save_steps"),
    ("eval_steps", "train", "eval_steps"),
    ("save_total_limit", "train", "save_total_limit"),
    ("resume_from_checkpoint", "train", "resume_from"),
    ("adapters", "lora", "init_adapter"),
    ("rlhf_type", "rlhf", "type"),
    ("beta", "rlhf", "beta"),
    ("loss_type", "rlhf", "loss_type"),
    ("rpo_alpha", "rlhf", "rpo_alpha"),
    ("label_smoothing", "rlhf", "label_smoothing"),
    ("simpo_gamma", "rlhf", "simpo_gamma"),
    ("cpo_alpha", "rlhf", "cpo_alpha"),
    ("desirable_weight", "rlhf", "desirable_weight"),
    ("undesirable_weight", "rlhf", "undesirable_weight"),
    ("ref_adapters", "rlhf", "ref_adapter"),
    ("output_dir", "output", "dir"),
    ("overwrite_output_dir", "output", "overwrite"),
];

/// A value given for a key outside the config file: `name` is `section.key` or an ms-swift
/// name; `at` says where it was given, for errors (`--lora_rank 8`).
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub name: String,
    pub value: Value,
    pub at: String,
}

/// The config in `text` (the file `path`) with `sets`, then `overrides`, applied (a later value
/// wins), deserialized onto the defaults, and where each key was given.
pub(super) fn read(
    text: &str,
    path: &Path,
    sets: &[String],
    overrides: &[Override],
) -> Result<(TrainConfig, Origins), ConfigError> {
    let raw: Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
    let known = known_keys();
    let at = |section: Option<&str>, key: &str| location(path, text, section, key);
    let mut table = Table::new();
    // Where each key was given: "file:line" (under its own or its ms-swift name) or "--set ...",
    // for errors found once every key is in.
    let mut origins = Origins::new();
    let mut place = |section: &str, key: &str, value: Value, at: String| {
        let entry = table
            .entry(section.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(entries) = entry else {
            unreachable!("sections are tables")
        };
        let again = entries.insert(key.to_string(), value).is_some();
        origins.insert((section.to_string(), key.to_string()), at);
        again
    };
    // The file's keys as (section, name as written, value): each section's own keys, and the
    // ms-swift names at the top level.
    let mut given = Vec::new();
    for (name, value) in raw {
        match (value, known.contains_key(&name)) {
            (Value::Table(entries), true) => {
                given.extend(entries.into_iter().map(|(k, v)| (Some(name.clone()), k, v)))
            }
            (value, _) => given.push((None, name, value)),
        }
    }
    for (section, name, value) in given {
        let here = at(section.as_deref(), &name);
        let (section, key) = match &section {
            Some(s) => (
                s.as_str(),
                canonical(&known, s, &name)
                    .ok_or_else(|| unknown_key(here.clone(), &known, &format!("{s}.{name}")))?,
            ),
            None => alias(&name).ok_or_else(|| unknown_key(here.clone(), &known, &name))?,
        };
        if place(section, key, value, here.clone()) {
            return Err(given_twice(here, section, key));
        }
    }
    for set in sets {
        let at = format!("--set {set}");
        let (name, value) = set.split_once('=').ok_or_else(|| ConfigError::Key {
            at: at.clone(),
            message: "expected section.key=value".into(),
        })?;
        let (section, key) = resolve_name(&known, name.trim(), &at)?;
        // A later --set wins over the file and earlier ones.
        place(section, key, set_value(value.trim()), at);
    }
    for o in overrides {
        let (section, key) = resolve_name(&known, &o.name, &o.at)?;
        place(section, key, o.value.clone(), o.at.clone());
    }
    let config = from_table(table, &origins, path)?;
    Ok((config, origins))
}

/// Where `key` ("section.key") was given, when it was.
pub(super) fn origin(origins: &Origins, key: &str) -> Option<String> {
    let (section, key) = key.split_once('.')?;
    origins
        .get(&(section.to_string(), key.to_string()))
        .cloned()
}

/// The `(section, key)` that `name` (`section.key`, or an ms-swift name) stands for.
fn resolve_name<'a>(
    known: &BTreeMap<String, Vec<String>>,
    name: &'a str,
    at: &str,
) -> Result<(&'a str, &'a str), ConfigError>
where
    'static: 'a,
{
    match name.split_once('.') {
        Some((s, k)) if known.contains_key(s) => {
            let key = canonical(known, s, k).ok_or_else(|| unknown_key(at.into(), known, name))?;
            Ok((s, key))
        }
        _ => alias(name).ok_or_else(|| unknown_key(at.into(), known, name)),
    }
}

/// The `(section, key)` an ms-swift argument name stands for.
pub(super) fn alias(name: &str) -> Option<(&'static str, &'static str)> {
    ALIASES
        .iter()
        .find(|(alias, ..)| *alias == name)
        .map(|&(_, s, k)| (s, k))
}

/// Where each `(section, key)` of the table was given.
pub(super) type Origins = BTreeMap<(String, String), String>;

fn given_twice(at: String, section: &str, key: &str) -> ConfigError {
    ConfigError::Key {
        at,
        message: format!("{section}.{key} is given twice (once under an ms-swift name)"),
    }
}

/// Deserializes the config; a type error names its key and where it was given.
fn from_table(table: Table, origins: &Origins, path: &Path) -> Result<TrainConfig, ConfigError> {
    serde_json::from_value(with_defaults(&table, usize::MAX)).map_err(|whole| {
        culprit(&table, origins).unwrap_or_else(|| ConfigError::Key {
            at: path.display().to_string(),
            message: whole.to_string(),
        })
    })
}

/// The first key whose value does not deserialize (keys added one by one onto the defaults).
fn culprit(table: &Table, origins: &Origins) -> Option<ConfigError> {
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
            at: origins[&(section.clone(), key.clone())].clone(),
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
    let defaults = TrainConfig {
        rlhf: Some(Default::default()),
        ..TrainConfig::default()
    };
    let Json::Object(sections) = serde_json::to_value(defaults).expect("serializes") else {
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
