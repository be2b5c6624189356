//! The training config (`swift-rs train --config FILE`, `swift-rs encode --config FILE`): TOML
//! sections [model] [lora] [quant] [data] [train] [output] with SPEC's keys and ms-swift's
//! defaults, ms-swift's flat argument names as aliases (at the top level or in their section),
//! and `--set section.key=value` overrides. Unknown keys are errors naming the key and its line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use toml::{Table, Value};

use crate::data::encode::LossScale;
use crate::data::pack::Truncation;
use crate::data::template::TemplateName;
use crate::data::OnBadRow;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub lora: LoraSection,
    pub quant: QuantSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub output: OutputSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelSection {
    /// A model directory, or a hub id `org/name[@revision]`.
    pub path: String,
    /// Where a hub id is downloaded from; None: the USE_HF environment variable decides, as in
    /// ms-swift, else the Hugging Face Hub.
    pub hub: Option<Hub>,
    /// auto (config.json), bf16, f16, f32.
    pub dtype: String,
    pub template: TemplateName,
    /// The system prompt of conversations that have none.
    pub system: Option<String>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: String::new(),
            hub: None,
            dtype: "auto".into(),
            template: TemplateName::Auto,
            system: None,
        }
    }
}

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

impl std::str::FromStr for Hub {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name.to_ascii_lowercase().as_str() {
            "huggingface" | "hf" => Ok(Self::HuggingFace),
            "modelscope" | "ms" => Ok(Self::ModelScope),
            _ => Err(format!("unknown hub {name:?} (huggingface, modelscope)")),
        }
    }
}

impl std::fmt::Display for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Self::HuggingFace => "Hugging Face Hub",
            Self::ModelScope => "ModelScope",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraSection {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
    pub target_regex: Option<String>,
    pub use_rslora: bool,
    pub use_dora: bool,
    /// default (Kaiming-uniform A, zero B) or gaussian.
    pub init: String,
    /// A PEFT adapter directory to start from.
    pub init_adapter: Option<PathBuf>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: vec!["all-linear".into()],
            target_regex: None,
            use_rslora: false,
            use_dora: false,
            init: "default".into(),
            init_adapter: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QuantSection {
    /// 4 = QLoRA; none = full-precision frozen weights.
    pub bits: Option<u32>,
    #[serde(rename = "type")]
    pub kind: String,
    pub double_quant: bool,
    pub block_size: usize,
}

impl Default for QuantSection {
    fn default() -> Self {
        Self {
            bits: None,
            kind: "nf4".into(),
            double_quant: true,
            block_size: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataSection {
    /// Dataset specs `path[#N]`: a file, directory or glob of .jsonl/.json/.parquet.
    pub train: Vec<String>,
    pub val: Vec<String>,
    pub val_ratio: f64,
    /// Column rename map, `from = "to"`.
    pub columns: BTreeMap<String, String>,
    pub max_length: usize,
    pub truncation: Truncation,
    pub shuffle: bool,
    pub packing: bool,
    pub streaming: bool,
    pub loss_scale: LossScale,
    pub on_bad_row: OnBadRow,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: Vec::new(),
            val: Vec::new(),
            val_ratio: 0.0,
            columns: BTreeMap::new(),
            max_length: 2048,
            truncation: Truncation::Delete,
            shuffle: true,
            packing: false,
            streaming: false,
            loss_scale: LossScale::Default,
            on_bad_row: OnBadRow::Error,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainSection {
    pub epochs: f64,
    /// > 0 wins over epochs.
    pub max_steps: i64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    /// cosine, linear, constant.
    pub lr_scheduler: String,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    /// adamw, sgd.
    pub optimizer: String,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    pub gradient_checkpointing: bool,
    pub seed: u64,
    pub logging_steps: usize,
    pub save_steps: usize,
    /// None: save_steps.
    pub eval_steps: Option<usize>,
    pub save_total_limit: Option<usize>,
    /// A checkpoint directory, or "latest".
    pub resume_from: Option<String>,
    pub device: String,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 3.0,
            max_steps: -1,
            batch_size: 1,
            grad_accum: 16,
            lr: 1e-4,
            lr_scheduler: "cosine".into(),
            warmup_ratio: 0.0,
            warmup_steps: 0,
            optimizer: "adamw".into(),
            weight_decay: 0.1,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            gradient_checkpointing: true,
            seed: 42,
            logging_steps: 5,
            save_steps: 500,
            eval_steps: None,
            save_total_limit: None,
            resume_from: None,
            device: "auto".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OutputSection {
    pub dir: PathBuf,
    pub overwrite: bool,
    pub tensorboard: bool,
    pub plots: bool,
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            dir: "output".into(),
            overwrite: false,
            tensorboard: true,
            plots: true,
        }
    }
}

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

/// A config that cannot be used; `Display` names the file, line and key.
#[derive(Debug, thiserror::Error)]
pub enum TrainConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{at}: {message}")]
    Key { at: String, message: String },
}

impl TrainConfig {
    /// Reads a TOML config file and applies `--set` overrides (`section.key=value`, or an ms-swift
    /// name `key=value`), then checks it.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self, TrainConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path, sets)
    }

    /// As `load`, from the text of a file called `path`.
    pub fn parse(text: &str, path: &Path, sets: &[String]) -> Result<Self, TrainConfigError> {
        let raw: Table = text
            .parse()
            .map_err(|e: toml::de::Error| TrainConfigError::Syntax {
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
         -> Result<(), TrainConfigError> {
            let entry = table
                .entry(section.to_string())
                .or_insert_with(|| Value::Table(Table::new()));
            let Value::Table(entries) = entry else {
                unreachable!("sections are tables")
            };
            if entries.insert(key.to_string(), value).is_some() {
                return Err(TrainConfigError::Key {
                    at: at(),
                    message: format!(
                        "{section}.{key} is given twice (once under an ms-swift name)"
                    ),
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
            let (name, value) = set.split_once('=').ok_or_else(|| TrainConfigError::Key {
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
        let config = Self::from_table(table, text, path)?;
        config.check(path)?;
        Ok(config)
    }

    /// Deserializes the config; a type error names its key and line.
    fn from_table(table: Table, text: &str, path: &Path) -> Result<Self, TrainConfigError> {
        serde_json::from_value(with_defaults(&table, usize::MAX)).map_err(|whole| {
            Self::culprit(&table, text, path).unwrap_or_else(|| TrainConfigError::Key {
                at: path.display().to_string(),
                message: whole.to_string(),
            })
        })
    }

    /// The first key whose value does not deserialize (keys added one by one onto the defaults).
    fn culprit(table: &Table, text: &str, path: &Path) -> Option<TrainConfigError> {
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
            let e = serde_json::from_value::<Self>(with_defaults(table, n)).err()?;
            let (section, key) = keys[n - 1];
            Some(TrainConfigError::Key {
                at: location(path, text, Some(section), key),
                message: format!("{section}.{key}: {e}"),
            })
        })
    }

    /// Values every field accepts but that cannot work; errors are placed at `path` (the file,
    /// or what stands for it when the config was built in code).
    pub fn check(&self, path: &Path) -> Result<(), TrainConfigError> {
        let fail = |key: &str, message: String| {
            Err(TrainConfigError::Key {
                at: path.display().to_string(),
                message: format!("{key}: {message}"),
            })
        };
        if self.model.path.is_empty() {
            return fail("model.path", "required: a model directory or hub id".into());
        }
        if self.data.train.is_empty() {
            return fail("data.train", "required: a list of dataset files".into());
        }
        if !(0.0..1.0).contains(&self.data.val_ratio) {
            return fail(
                "data.val_ratio",
                format!("{} is not in [0, 1)", self.data.val_ratio),
            );
        }
        if self.data.max_length == 0 {
            return fail("data.max_length", "must be at least 1".into());
        }
        if self.data.streaming && self.train.max_steps <= 0 {
            return fail(
                "data.streaming",
                "a streamed dataset has no known length: set train.max_steps".into(),
            );
        }
        if self.data.streaming && self.data.val_ratio > 0.0 {
            return fail(
                "data.val_ratio",
                "a stream cannot be split without reading it whole: give data.val instead".into(),
            );
        }
        if self.model.dtype != "auto" && crate::config::Dtype::parse(&self.model.dtype).is_none() {
            return fail(
                "model.dtype",
                format!("{:?} is not auto, bf16, f16 or f32", self.model.dtype),
            );
        }
        Ok(())
    }

    /// The config as TOML, every default filled in (keys without a value are left out).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serializes")
    }
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

fn unknown_key(at: String, known: &BTreeMap<String, Vec<String>>, key: &str) -> TrainConfigError {
    let section = key.split_once('.').map(|(s, _)| s);
    let message = match section.and_then(|s| known.get(s).map(|keys| (s, keys))) {
        Some((s, keys)) => format!("unknown key {key} (keys of [{s}]: {})", keys.join(", ")),
        None => format!(
            "unknown key {key} (sections: {})",
            known.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    };
    TrainConfigError::Key { at, message }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, sets: &[&str]) -> Result<TrainConfig, String> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        TrainConfig::parse(text, Path::new("run.toml"), &sets).map_err(|e| e.to_string())
    }

    const MINIMAL: &str = "[model]\npath = \"m\"\n[data]\ntrain = [\"d.jsonl\"]\n";

    #[test]
    fn defaults_follow_the_spec() {
        let c = parse(MINIMAL, &[]).unwrap();
        assert_eq!((c.lora.r, c.lora.alpha, c.lora.dropout), (8, 32.0, 0.05));
        assert_eq!(c.lora.target_modules, ["all-linear"]);
        assert_eq!(
            (c.train.batch_size, c.train.grad_accum, c.train.lr),
            (1, 16, 1e-4)
        );
        assert_eq!((c.train.adam_beta2, c.train.weight_decay), (0.95, 0.1));
        assert_eq!(
            (c.data.max_length, c.data.truncation),
            (2048, Truncation::Delete)
        );
        assert!(c.data.shuffle && !c.data.packing && c.train.gradient_checkpointing);
        assert_eq!(c.data.on_bad_row, OnBadRow::Error);
        // Written out and read back, nothing changes.
        let again = parse(&c.to_toml(), &[]).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn ms_swift_names_and_overrides() {
        let text = "model = \"m\"\ndataset = [\"d.jsonl\"]\nlearning_rate = 2e-4\n\
                    [lora]\nlora_rank = 16\n[data]\ntruncation_strategy = \"left\"\n";
        let c = parse(
            text,
            &[
                "train.seed=7",
                "lora.target_modules=[\"q_proj\"]",
                "max_length=512",
            ],
        )
        .unwrap();
        assert_eq!(
            (c.model.path.as_str(), c.train.lr, c.lora.r),
            ("m", 2e-4, 16)
        );
        assert_eq!(c.data.truncation, Truncation::Left);
        assert_eq!((c.train.seed, c.data.max_length), (7, 512));
        assert_eq!(c.lora.target_modules, ["q_proj"]);
        let c = parse(MINIMAL, &["model.system=Be brief.", "model.template=qwen3"]).unwrap();
        assert_eq!(c.model.system.as_deref(), Some("Be brief."));
        assert_eq!(c.model.template, TemplateName::Qwen3);
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let err = parse(&format!("{MINIMAL}[lora]\nrank = 4\n"), &[]).unwrap_err();
        assert!(
            err.starts_with("run.toml:6: unknown key lora.rank"),
            "{err}"
        );
        let err = parse(&format!("{MINIMAL}lr = 1\n"), &[]).unwrap_err();
        assert!(err.contains("unknown key data.lr"), "{err}");
        let err = parse(&format!("colour = 1\n{MINIMAL}"), &[]).unwrap_err();
        assert!(err.starts_with("run.toml:1: unknown key colour"), "{err}");
        let err = parse(&format!("{MINIMAL}truncation = \"middle\"\n"), &[]).unwrap_err();
        assert!(err.starts_with("run.toml:5: data.truncation"), "{err}");
        assert!(err.contains("middle"), "{err}");
        let err = parse(MINIMAL, &["train.lr"]).unwrap_err();
        assert!(err.contains("--set train.lr"), "{err}");
        let err = parse(MINIMAL, &["train.rate=1"]).unwrap_err();
        assert!(err.contains("unknown key train.rate"), "{err}");
        let err = parse("[model]\npath = \"m\"\n", &[]).unwrap_err();
        assert!(err.contains("data.train: required"), "{err}");
        let err = parse(&format!("{MINIMAL}[model\n"), &[]).unwrap_err();
        assert!(err.contains("run.toml") && err.contains("line 5"), "{err}");
        let err = parse(&format!("max_length = 9\n{MINIMAL}max_length = 8\n"), &[]).unwrap_err();
        assert!(err.contains("given twice"), "{err}");
        let err = parse(MINIMAL, &["data.streaming=true"]).unwrap_err();
        assert!(err.contains("train.max_steps"), "{err}");
        let sets = [
            "data.streaming=true",
            "train.max_steps=9",
            "data.val_ratio=0.1",
        ];
        let err = parse(MINIMAL, &sets).unwrap_err();
        assert!(err.contains("data.val_ratio"), "{err}");
    }
}
