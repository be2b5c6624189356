//! ms-swift's command lines, as its documentation and examples write them:
//! `swift sft --model Qwen/Qwen2.5-7B-Instruct --dataset a.jsonl b.jsonl --lora_rank 8 ...`.
//! Every flag is honoured (it sets a key of the training config, through the same ms-swift names
//! the TOML file takes), accepted with no effect here (said in one line), or refused naming what
//! swift-rs does instead. A flag ms-swift does not have is refused as ms-swift refuses it, unless
//! `--ignore_args_error true`. Three generations of spelling are in the wild: v2 (`--sft_type`,
//! `--model_id_or_path`, `--custom_train_dataset_path`), v3 (`--train_type`) and v4
//! (`--tuner_type`); all of them work.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use toml::Value;

use super::overlay::{alias, Override, ALIASES};
use super::{Hub, LossScale, RlhfType, TemplateName, TrainConfig};
use crate::config::{ConfigError, Dtype};

/// The file beside each checkpoint's adapter that holds the run's settings under ms-swift's
/// names, as ms-swift writes it: `infer` and `export` read the model, template, system prompt and
/// quantization from it.
pub const ARGS_FILE: &str = "args.json";

/// The ms-swift command a command line is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SwiftCommand {
    /// Supervised fine-tuning.
    #[default]
    Sft,
    /// Pre-training: every token takes loss (ms-swift's `swift pt`).
    Pt,
    /// Preference training (ms-swift's `swift rlhf`): the loss on the last answer unless the
    /// command line says otherwise.
    Rlhf,
}

/// A command line, read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SwiftArgs {
    pub command: SwiftCommand,
    /// swift-rs's own TOML config (`--config FILE`), read before the flags.
    pub config: Option<PathBuf>,
    /// `--set KEY=VALUE` (swift-rs's), applied to the TOML config as `train --set` is.
    pub sets: Vec<String>,
    /// The flags, as config keys, in command-line order.
    pub overrides: Vec<Override>,
    /// The `ENV` table of a YAML or JSON config: variables to set where the environment does not
    /// set them already, as ms-swift does.
    pub env: Env,
    /// A line for each flag that changes nothing here, and for each one ignored under
    /// `--ignore_args_error`.
    pub notices: Vec<String>,
    /// ms-swift's `--add_version` (true unless given false): each run in a folder of its own,
    /// `output_dir/vN-YYYYMMDD-HHMMSS` (`versioned_dir`).
    pub add_version: bool,
    /// The flags, the --config file or a --set give `data.loss_scale`.
    pub loss_scale_given: bool,
}

impl SwiftArgs {
    /// The config of this command line: the --config file (or nothing) with the
    /// --set values, then the flags; `rlhf`'s is preference training whatever its flags. Where
    /// nothing gives a loss_scale, the command's own, as ms-swift's: every token for `pt`, the
    /// last answer for `rlhf` (every answer for ORPO).
    pub fn load(&self) -> Result<TrainConfig, ConfigError> {
        let command = self.command;
        let line = Path::new("the command line");
        let mut config = match &self.config {
            Some(path) => TrainConfig::load_with(path, &self.sets, &self.overrides)?,
            None => TrainConfig::parse_with("", line, &self.sets, &self.overrides)?,
        };
        if command == SwiftCommand::Rlhf {
            config.rlhf.get_or_insert_with(Default::default);
        }
        if !self.loss_scale_given {
            config.data.loss_scale = match (command, &config.rlhf) {
                (SwiftCommand::Pt, _) => LossScale::All,
                (SwiftCommand::Rlhf, Some(r)) if r.kind == RlhfType::Orpo => LossScale::Default,
                (SwiftCommand::Rlhf, _) => LossScale::LastRound,
                (SwiftCommand::Sft, _) => config.data.loss_scale,
            };
        }
        if command == SwiftCommand::Rlhf {
            config.check(line)?;
        }
        Ok(config)
    }
}

impl TrainConfig {
    /// The run's settings under ms-swift's names (`args.json`): every key the config file takes
    /// by an ms-swift name, under the first of its names, and what ms-swift adds (`tuner_type`,
    /// the bitsandbytes settings). "auto" is null, as ms-swift writes an unset value.
    pub fn swift_args(&self) -> Json {
        let values = serde_json::to_value(self).expect("the config serializes");
        let mut args = serde_json::Map::new();
        let mut named = std::collections::BTreeSet::new();
        for (name, section, key) in ALIASES {
            // A section the run has not (SFT's [rlhf]) names nothing: ms-swift's sft writes no
            // rlhf_type.
            if values.get(section).is_some() && named.insert((section, key)) {
                args.insert(name.to_string(), values[section][key].clone());
            }
        }
        let dtype = self.model.dtype.map(Dtype::torch_name);
        args.insert("torch_dtype".into(), dtype.into());
        let template = (self.model.template != TemplateName::Auto)
            .then(|| values["model"]["template"].clone());
        args.insert("template".into(), template.unwrap_or(Json::Null));
        let use_hf = self.model.hub.map(|hub| hub == Hub::HuggingFace);
        args.insert("use_hf".into(), use_hf.into());
        args.insert("tuner_type".into(), "lora".into());
        if self.quant.bits.is_some() {
            args.insert("quant_method".into(), "bnb".into());
            args.insert("bnb_4bit_compute_dtype".into(), dtype.into());
        }
        Json::Object(args)
    }
}

/// What `infer` and `export` take from a checkpoint's `args.json` (ms-swift's, or ours): the
/// base model and how to run it. Absent keys are None.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunArgs {
    pub model: Option<String>,
    pub template: Option<TemplateName>,
    pub system: Option<String>,
    pub dtype: Option<Dtype>,
    /// 4: QLoRA's NF4 base.
    pub quant_bits: Option<u32>,
    pub hub: Option<Hub>,
}

impl RunArgs {
    /// `dir/args.json`, when there is one.
    pub fn read(dir: &Path) -> Result<Option<Self>, ConfigError> {
        let path = dir.join(ARGS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ConfigError::Io { path, source }),
        };
        let bad = |key: &str, message: String| ConfigError::Key {
            at: path.display().to_string(),
            message: format!("{key}: {message}"),
        };
        let json: Json = serde_json::from_str(&text).map_err(|e| bad("(file)", e.to_string()))?;
        let text_of = |key: &str| json.get(key).and_then(Json::as_str).map(str::to_string);
        let template = match text_of("template") {
            Some(name) => Some(
                serde_json::from_value(Json::String(name))
                    .map_err(|e: serde_json::Error| bad("template", e.to_string()))?,
            ),
            None => None,
        };
        let dtype = text_of("torch_dtype")
            .map(|name| Dtype::parse(&name).ok_or_else(|| bad("torch_dtype", format!("{name:?}"))))
            .transpose()?;
        let quantized = text_of("quant_method").is_none_or(|m| m == "bnb");
        let quant_bits = json
            .get("quant_bits")
            .and_then(Json::as_u64)
            .filter(|_| quantized)
            .map(|bits| bits as u32);
        let hub = json.get("use_hf").and_then(Json::as_bool).map(|hf| {
            if hf {
                Hub::HuggingFace
            } else {
                Hub::ModelScope
            }
        });
        Ok(Some(Self {
            model: text_of("model"),
            template,
            system: text_of("system"),
            dtype,
            quant_bits,
            hub,
        }))
    }
}

/// What a flag does here.
enum Flag {
    /// Sets this config key (`section.key`) instead of the key its name is an alias of.
    Key(&'static str),
    /// Accepted; changes nothing here, for this reason.
    NoEffect(&'static str),
    /// Refused: what swift-rs does instead.
    Refused(&'static str),
}

/// Flags beyond the ms-swift names the config file takes (`overlay::ALIASES`): older spellings,
/// and those that change nothing or are refused.
const FLAGS: &[(&str, Flag)] = &[
    // ms-swift 2.x.
    ("custom_train_dataset_path", Flag::Key("data.train")),
    ("custom_val_dataset_path", Flag::Key("data.val")),
    ("dataset_test_ratio", Flag::Key("data.val_ratio")),
    ("quantization_bit", Flag::Key("quant.bits")),
    ("template_type", Flag::Key("model.template")),
    ("batch_size", Flag::Key("train.batch_size")),
    ("device", Flag::Key("train.device")),
    (
        "model_type",
        Flag::NoEffect("the architecture comes from the model's config.json"),
    ),
    (
        "dataloader_num_workers",
        Flag::NoEffect("rows are encoded before training and batched from memory"),
    ),
    (
        "load_from_cache_file",
        Flag::NoEffect("rows are encoded afresh each run; there is no dataset cache"),
    ),
    (
        "use_liger_kernel",
        Flag::NoEffect("swift-rs's own fused kernels always run"),
    ),
    (
        "attn_impl",
        Flag::NoEffect("attention is swift-rs's own kernel"),
    ),
    (
        "per_device_eval_batch_size",
        Flag::NoEffect("evaluation batches are per_device_train_batch_size rows"),
    ),
    (
        "eval_batch_size",
        Flag::NoEffect("evaluation batches are the training batch size"),
    ),
    (
        "report_to",
        Flag::NoEffect("logs go to logging.jsonl, TensorBoard event files and plots"),
    ),
    (
        "logging_dir",
        Flag::NoEffect("TensorBoard files go to <output_dir>/runs"),
    ),
    (
        "bf16",
        Flag::NoEffect("the compute dtype is --torch_dtype; adapters and optimizer state are f32"),
    ),
    (
        "fp16",
        Flag::NoEffect("the compute dtype is --torch_dtype; adapters and optimizer state are f32"),
    ),
    (
        "save_only_model",
        Flag::NoEffect("checkpoints always hold the adapter and the optimizer state"),
    ),
    (
        "save_safetensors",
        Flag::NoEffect("checkpoints are always safetensors"),
    ),
    (
        "data_seed",
        Flag::NoEffect("the data order follows --seed (both 42 by default)"),
    ),
    (
        "create_checkpoint_symlink",
        Flag::NoEffect("the last checkpoint is named in the run's last line"),
    ),
    (
        "lazy_tokenize",
        Flag::NoEffect("rows are encoded as a whole before training"),
    ),
    ("ddp_timeout", Flag::NoEffect("there is one process")),
    (
        "ddp_find_unused_parameters",
        Flag::NoEffect("there is one process"),
    ),
    (
        "torch_compile",
        Flag::NoEffect("the kernels are compiled ahead of time"),
    ),
    (
        "gradient_checkpointing_kwargs",
        Flag::NoEffect("checkpointing recomputes each decoder layer"),
    ),
    (
        "max_new_tokens",
        Flag::NoEffect("training evaluates the loss, not generations"),
    ),
    (
        "temperature",
        Flag::NoEffect("training evaluates the loss, not generations"),
    ),
    (
        "tuner_backend",
        Flag::NoEffect("adapters are PEFT's format either way"),
    ),
    (
        "eval_strategy",
        Flag::NoEffect("evaluation runs every eval_steps"),
    ),
    (
        "save_strategy",
        Flag::NoEffect("checkpoints are saved every save_steps"),
    ),
    (
        "deepspeed",
        Flag::Refused("swift-rs trains on one device: leave --deepspeed out"),
    ),
    (
        "fsdp",
        Flag::Refused("swift-rs trains on one device: leave --fsdp out"),
    ),
    (
        "hqq_axis",
        Flag::Refused("QLoRA here is bitsandbytes' NF4: --quant_method bnb --quant_bits 4"),
    ),
];

/// What `swift-rs sft|pt|rlhf --help` prints: how the command line goes, then every flag it
/// takes with the config key it sets (the README's "Coming from ms-swift" has the same table),
/// the flags that change nothing here and those refused.
pub fn swift_help(command: SwiftCommand) -> String {
    let name = match command {
        SwiftCommand::Sft => "sft",
        SwiftCommand::Pt => "pt",
        SwiftCommand::Rlhf => "rlhf",
    };
    let what = match command {
        SwiftCommand::Sft => "ms-swift's `swift sft`: LoRA / QLoRA supervised fine-tuning",
        SwiftCommand::Pt => "ms-swift's `swift pt`: as sft, with loss on every token",
        SwiftCommand::Rlhf => {
            "ms-swift's `swift rlhf`: preference training with --rlhf_type dpo (default), orpo, \
             simpo, cpo or kto"
        }
    };
    let mut text = format!(
        "{what}\n\nUsage: swift-rs {name} [CONFIG.yaml|CONFIG.json] [--flag value...]...\n       \
         swift-rs {name} --config FILE.toml [--set section.key=value]... [--flag value...]...\n\n\
         Flags are ms-swift's (`--flag value` or `--flag=value`; lists as `--dataset a.jsonl \
         b.jsonl`), each setting the training config's key (README: \"Coming from ms-swift\"):\n"
    );
    let row = |text: &mut String, flag: &str, what: &str| {
        text.push_str(&format!("  --{flag:<30} {what}\n"));
    };
    for (flag, section, key) in ALIASES {
        if *section != "rlhf" || command == SwiftCommand::Rlhf {
            row(&mut text, flag, &format!("{section}.{key}"));
        }
    }
    for (flag, what) in [
        (
            "tuner_type",
            "lora (also --train_type, --sft_type; DoRA and rsLoRA are lora's flags)",
        ),
        ("quant_method", "bnb (with --quant_bits 4: QLoRA on NF4)"),
        ("bnb_4bit_compute_dtype", "the same as --torch_dtype"),
        (
            "add_version",
            "true: each run in output_dir/vN-YYYYMMDD-HHMMSS (the flag form only)",
        ),
        (
            "ignore_args_error",
            "true: a flag ms-swift does not have is a note, not an error",
        ),
        (
            "freeze_vit",
            "true (also --freeze_aligner true, --freeze_llm false): the language model trains",
        ),
        ("config", "swift-rs's TOML config, under the flags"),
        ("set", "section.key=value over the TOML config"),
    ] {
        row(&mut text, flag, what);
    }
    let mut no_effect = String::new();
    let mut refused = String::new();
    for (flag, kind) in FLAGS {
        match kind {
            Flag::Key(key) => row(&mut text, flag, key),
            Flag::NoEffect(why) => row(&mut no_effect, flag, why),
            Flag::Refused(why) => row(&mut refused, flag, why),
        }
    }
    text.push_str("\nAccepted, with no effect here:\n");
    text.push_str(&no_effect);
    text.push_str("\nRefused:\n");
    text.push_str(&refused);
    text
}

/// Reads a command line of `swift sft` (or `pt`) after the subcommand.
pub fn parse_swift_args(command: SwiftCommand, argv: &[String]) -> Result<SwiftArgs, ConfigError> {
    let mut args = SwiftArgs {
        command,
        add_version: true,
        ..SwiftArgs::default()
    };
    let mut flags = Vec::new();
    let rest = match argv.first() {
        Some(first) if is_config_file(first) => {
            let (from_file, env) = read_config_file(Path::new(first))?;
            flags.extend(from_file);
            args.env = env;
            &argv[1..]
        }
        _ => argv,
    };
    flags.extend(split_flags(rest)?);
    let ignore_errors = flags
        .iter()
        .rev()
        .find(|f| f.name == "ignore_args_error")
        .map(|f| f.values.first().is_none_or(|v| swift_bool(v) == Ok(true)))
        .unwrap_or(false);
    let mut compute_dtype = None;
    for flag in flags {
        let at = flag.at();
        let refuse = |message: String| ConfigError::Key {
            at: at.clone(),
            message,
        };
        match flag.name.as_str() {
            "ignore_args_error" => continue,
            "add_version" => {
                args.add_version = swift_bool(flag.one()?).map_err(refuse)?;
                continue;
            }
            "config" => {
                args.config = Some(PathBuf::from(flag.one()?));
                continue;
            }
            // swift-rs's own `--set section.key=value`, over --config as `train` takes it.
            "set" => {
                args.sets.extend(flag.values.iter().cloned());
                continue;
            }
            "tuner_type" | "train_type" | "sft_type" => {
                let tuner = flag.one()?;
                if tuner != "lora" {
                    return Err(refuse(format!(
                        "{tuner} is not supported: swift-rs trains LoRA adapters (lora, with \
                         --use_dora true or --use_rslora true)"
                    )));
                }
                continue;
            }
            "quant_method" => {
                let method = flag.one()?;
                if method != "bnb" {
                    return Err(refuse(format!(
                        "{method} is not supported: QLoRA here is bitsandbytes' NF4 \
                         (--quant_method bnb --quant_bits 4)"
                    )));
                }
                continue;
            }
            "bnb_4bit_compute_dtype" => {
                compute_dtype = Some((flag.one()?.to_string(), at));
                continue;
            }
            "system" => {
                args.overrides.push(Override {
                    name: "model.system".into(),
                    value: Value::String(system_prompt(flag.one()?, &at)?),
                    at,
                });
                continue;
            }
            "use_hf" => {
                // ms-swift's --use_hf picks the hub of the model and of the datasets.
                let value = typed("model.hub", &flag)?;
                for key in ["model.hub", "data.hub"] {
                    args.overrides.push(Override {
                        name: key.into(),
                        value: value.clone(),
                        at: at.clone(),
                    });
                }
                continue;
            }
            // A vision-language model's parts: swift-rs trains the language model only, as
            // ms-swift's defaults (freeze_vit and freeze_aligner true, freeze_llm false) do.
            "freeze_vit" | "freeze_aligner" | "freeze_llm" => {
                let frozen = swift_bool(flag.one()?).map_err(refuse)?;
                if frozen != (flag.name != "freeze_llm") {
                    return Err(refuse(format!(
                        "--{} {frozen} is not supported: swift-rs trains a vision-language \
                         model's language model only, leaving its vision tower and aligner on disk",
                        flag.name
                    )));
                }
                continue;
            }
            "lora_target_modules" | "target_modules" => {
                // ms-swift 2.x wrote "ALL" for every linear layer.
                let names = flag
                    .values
                    .iter()
                    .map(|v| if v == "ALL" { "all-linear" } else { v })
                    .map(|v| Value::String(v.to_string()))
                    .collect();
                args.overrides.push(Override {
                    name: "lora.target_modules".into(),
                    value: Value::Array(names),
                    at,
                });
                continue;
            }
            _ => {}
        }
        let key =
            match FLAGS.iter().find(|(name, _)| *name == flag.name) {
                Some((_, Flag::Key(key))) => key.to_string(),
                Some((_, Flag::NoEffect(why))) => {
                    args.notices
                        .push(format!("--{} has no effect here: {why}", flag.name));
                    continue;
                }
                Some((_, Flag::Refused(instead))) => {
                    return Err(refuse(format!("not supported: {instead}")));
                }
                None => match alias(&flag.name) {
                    Some((section, key)) => format!("{section}.{key}"),
                    None if ignore_errors => {
                        args.notices.push(format!(
                            "--{} is ignored (--ignore_args_error true): swift-rs does not know it",
                            flag.name
                        ));
                        continue;
                    }
                    None => return Err(refuse(
                        "swift-rs knows no such flag (a flag of ms-swift that swift-rs does not \
                         support, or a typo); --ignore_args_error true goes on without it"
                            .into(),
                    )),
                },
            };
        let value = typed(&key, &flag)?;
        args.overrides.push(Override {
            name: key,
            value,
            at,
        });
    }
    if let Some((dtype, at)) = compute_dtype {
        // bitsandbytes' compute dtype is the dtype the model computes in: --torch_dtype's key.
        let given = args.overrides.iter().find(|o| o.name == "model.dtype");
        match given.map(|o| &o.value) {
            Some(Value::String(torch)) if *torch != dtype => args.notices.push(format!(
                "{at} has no effect here: the model computes in --torch_dtype {torch}"
            )),
            Some(_) => {}
            None => args.overrides.push(Override {
                name: "model.dtype".into(),
                value: Value::String(dtype),
                at,
            }),
        }
    }
    // Whether anything says a loss_scale; if not, the command's own applies (`SwiftArgs::load`).
    let file_says = args.config.as_ref().is_some_and(|path| {
        let table = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.parse::<toml::Table>().ok());
        table.is_some_and(|t| {
            let data = t.get("data").and_then(Value::as_table);
            t.contains_key("loss_scale") || data.is_some_and(|d| d.contains_key("loss_scale"))
        })
    });
    let set_says = args.sets.iter().any(|set| set.contains("loss_scale"));
    let flag_says = args.overrides.iter().any(|o| o.name == "data.loss_scale");
    args.loss_scale_given = file_says || set_says || flag_says;
    Ok(args)
}

/// ms-swift's folder for a new run in `output_dir`: `vN-YYYYMMDD-HHMMSS`, N one above the highest
/// `vN-` already there (0 in a new directory), the time `now` in UTC (ms-swift writes local time;
/// the standard library has no time zones).
pub fn versioned_dir(output_dir: &Path, now: std::time::SystemTime) -> PathBuf {
    let next = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let (version, _) = name.strip_prefix('v')?.split_once('-')?;
            version.parse::<u64>().ok()
        })
        .max()
        .map_or(0, |highest| highest + 1);
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, time) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_date(days as i64);
    output_dir.join(format!(
        "v{next}-{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        time / 3600,
        time % 3600 / 60,
        time % 60
    ))
}

/// The (year, month, day) of `days` since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_date(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// One `--name value...` of a command line, or `name: value` of a config file.
struct Given {
    name: String,
    values: Vec<String>,
    /// Where: the file, when it came from a config file.
    file: Option<String>,
}

impl Given {
    /// The flag as the user wrote it, for errors.
    fn at(&self) -> String {
        let flag = std::iter::once(format!("--{}", self.name))
            .chain(self.values.iter().map(|v| shell_word(v)))
            .collect::<Vec<_>>()
            .join(" ");
        match &self.file {
            Some(file) => format!("{file}: {flag}"),
            None => flag,
        }
    }

    /// Its single value.
    fn one(&self) -> Result<&str, ConfigError> {
        match self.values.as_slice() {
            [value] => Ok(value),
            _ => Err(ConfigError::Key {
                at: self.at(),
                message: format!("--{} takes one value", self.name),
            }),
        }
    }
}

/// `word`, quoted when a shell would need it.
fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_alphanumeric() || "-_./:#@=,+".contains(c))
    {
        word.to_string()
    } else {
        format!("'{word}'")
    }
}

/// `--name v1 v2 --other v` (or `--name=v`) as flags with their values; dashes in names are
/// underscores, as argparse takes both.
fn split_flags(argv: &[String]) -> Result<Vec<Given>, ConfigError> {
    let mut flags: Vec<Given> = Vec::new();
    for word in argv {
        match word.strip_prefix("--") {
            Some(flag) => {
                let (name, value) = match flag.split_once('=') {
                    Some((name, value)) => (name, Some(value)),
                    None => (flag, None),
                };
                flags.push(Given {
                    name: name.replace('-', "_"),
                    values: value.map(str::to_string).into_iter().collect(),
                    file: None,
                });
            }
            None => match flags.last_mut() {
                Some(flag) => flag.values.push(word.clone()),
                None => {
                    return Err(ConfigError::Key {
                        at: shell_word(word),
                        message: "expected a flag (--name value) or, first, a .yaml or .json \
                                  config"
                            .into(),
                    })
                }
            },
        }
    }
    Ok(flags)
}

fn is_config_file(word: &str) -> bool {
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| word.ends_with(ext))
        && !word.starts_with("--")
}

/// Environment variables, by name.
type Env = Vec<(String, String)>;

/// A YAML or JSON config of ms-swift's flags (`swift sft config.yaml --lora_rank 16`): its keys
/// as flags, before those of the command line, and its `ENV` table.
fn read_config_file(path: &Path) -> Result<(Vec<Given>, Env), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let syntax = |message: String| ConfigError::Syntax {
        path: path.to_path_buf(),
        message,
    };
    let json: Json = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| syntax(e.to_string()))?
    } else {
        serde_yaml_ng::from_str(&text).map_err(|e| syntax(e.to_string()))?
    };
    let Json::Object(mut entries) = json else {
        return Err(syntax(
            "expected a mapping of ms-swift's flags to values".into(),
        ));
    };
    let env = match entries.remove("ENV") {
        Some(Json::Object(vars)) => vars.into_iter().map(|(k, v)| (k, python_str(&v))).collect(),
        Some(_) => return Err(syntax("ENV must map variable names to values".into())),
        None => Vec::new(),
    };
    let file = path.display().to_string();
    let flags = entries
        .into_iter()
        .map(|(name, value)| Given {
            name: name.replace('-', "_"),
            values: match value {
                Json::Array(items) => items.iter().map(python_str).collect(),
                other => vec![python_str(&other)],
            },
            file: Some(file.clone()),
        })
        .collect();
    Ok((flags, env))
}

/// A value as ms-swift turns it into a command-line word (Python's `str`, JSON for a mapping).
fn python_str(value: &Json) -> String {
    match value {
        Json::String(s) => s.clone(),
        Json::Bool(true) => "True".into(),
        Json::Bool(false) => "False".into(),
        Json::Null => "None".into(),
        other => other.to_string(),
    }
}

/// A boolean as ms-swift's argument parser reads one (transformers' `string_to_bool`).
pub fn swift_bool(word: &str) -> Result<bool, String> {
    match word.to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "1" => Ok(true),
        "false" | "f" | "no" | "n" | "0" => Ok(false),
        _ => Err(format!("{word:?} is not true or false")),
    }
}

/// `--system`: the text, or the contents of the .txt file it names.
fn system_prompt(value: &str, at: &str) -> Result<String, ConfigError> {
    if !value.ends_with(".txt") || !Path::new(value).is_file() {
        return Ok(value.to_string());
    }
    std::fs::read_to_string(value)
        .map(|text| text.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|e| ConfigError::Key {
            at: at.to_string(),
            message: format!("cannot read {value}: {e}"),
        })
}

/// The flag's words as a value of `key`: a list where the key holds one, JSON where it holds a
/// mapping (`--columns '{"a": "b"}'`), else one word read as a boolean (true/True), a number or
/// text.
fn typed(key: &str, flag: &Given) -> Result<Value, ConfigError> {
    let defaults = serde_json::to_value(TrainConfig::default()).expect("defaults serialize");
    let (section, name) = key.split_once('.').expect("section.key");
    let bad = |message: String| ConfigError::Key {
        at: flag.at(),
        message,
    };
    match &defaults[section][name] {
        Json::Array(_) => Ok(Value::Array(flag.values.iter().map(|w| word(w)).collect())),
        Json::Object(_) => {
            let json: Json = serde_json::from_str(flag.one()?)
                .map_err(|e| bad(format!("expected a JSON mapping: {e}")))?;
            Value::try_from(json).map_err(|e| bad(e.to_string()))
        }
        // A boolean flag given alone is true, as argparse's `--flag` is (`--use_hf` is one in
        // ms-swift; here it sets `model.hub`, which also takes a boolean).
        default if flag.values.is_empty() && (default.is_boolean() || key == "model.hub") => {
            Ok(Value::Boolean(true))
        }
        _ => Ok(word(flag.one()?)),
    }
}

/// One command-line word as a TOML value.
fn word(word: &str) -> Value {
    match word {
        "true" | "True" => return Value::Boolean(true),
        "false" | "False" => return Value::Boolean(false),
        _ => {}
    }
    if let Ok(i) = word.parse::<i64>() {
        return Value::Integer(i);
    }
    match word.parse::<f64>() {
        Ok(f) if f.is_finite() => Value::Float(f),
        _ => Value::String(word.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ms-swift's rlhf: the loss on the last answer (every answer for ORPO) unless the command
    /// line says otherwise, and its flags into [rlhf].
    #[test]
    fn rlhf_lines_read_as_ms_swift_reads_them() {
        let config = |line: &str| {
            parse_swift_args(SwiftCommand::Rlhf, &words(line))
                .unwrap()
                .load()
                .unwrap()
        };
        let dpo = config("--model m --dataset d.jsonl --rlhf_type dpo --beta 0.2 --rpo_alpha 0.5");
        assert_eq!(dpo.data.loss_scale, crate::config::LossScale::LastRound);
        assert_eq!(dpo.swift_args()["rlhf_type"], "dpo");
        let rlhf = dpo.rlhf.unwrap();
        assert_eq!((rlhf.beta, rlhf.rpo_alpha), (Some(0.2), Some(0.5)));
        let orpo = config("--model m --dataset d.jsonl --rlhf_type orpo");
        assert_eq!(orpo.data.loss_scale, crate::config::LossScale::Default);
        let all = config("--model m --dataset d.jsonl --rlhf_type dpo --loss_scale all");
        assert_eq!(all.data.loss_scale, crate::config::LossScale::All);
        // ORPO's default follows the type wherever it is given: here in a --config file.
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("orpo.toml");
        std::fs::write(&toml, "[rlhf]\ntype = \"orpo\"\n").unwrap();
        let line = format!("--config {} --model m --dataset d.jsonl", toml.display());
        assert_eq!(
            config(&line).data.loss_scale,
            crate::config::LossScale::Default
        );
        std::fs::write(&toml, "loss_scale = \"all\"\n[rlhf]\ntype = \"orpo\"\n").unwrap();
        assert_eq!(config(&line).data.loss_scale, crate::config::LossScale::All);
    }

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    fn parse(line: &str) -> Result<SwiftArgs, String> {
        parse_swift_args(SwiftCommand::Sft, &words(line)).map_err(|e| e.to_string())
    }

    fn config(line: &str) -> Result<TrainConfig, String> {
        let args = parse(line)?;
        TrainConfig::parse_with("", Path::new("command line"), &[], &args.overrides)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_lora_sft_example_sets_what_ms_swift_sets() {
        let c = config(
            "--model Qwen/Qwen2.5-7B-Instruct --tuner_type lora \
             --dataset a.jsonl#500 b.jsonl#500 --torch_dtype bfloat16 --num_train_epochs 1 \
             --per_device_train_batch_size 1 --per_device_eval_batch_size 1 \
             --learning_rate 1e-4 --lora_rank 8 --lora_alpha 32 --target_modules all-linear \
             --gradient_accumulation_steps 16 --eval_steps 50 --save_steps 50 \
             --save_total_limit 2 --logging_steps 5 --max_length 2048 --output_dir output \
             --warmup_ratio 0.05 --dataloader_num_workers 4",
        )
        .unwrap();
        assert_eq!(c.model.path, "Qwen/Qwen2.5-7B-Instruct");
        assert_eq!(c.data.train, ["a.jsonl#500", "b.jsonl#500"]);
        assert_eq!(c.model.dtype, Some(crate::config::Dtype::Bf16));
        assert_eq!(
            (c.train.epochs, c.train.lr, c.train.grad_accum),
            (1.0, 1e-4, 16)
        );
        assert_eq!((c.lora.r, c.lora.alpha), (8, 32.0));
        assert_eq!(c.lora.target_modules, ["all-linear"]);
        assert_eq!(
            (c.train.eval_steps, c.train.save_total_limit),
            (Some(50), Some(2))
        );
        assert_eq!(c.output.dir, Path::new("output"));
        assert_eq!(c.train.warmup_ratio, 0.05);
        assert_eq!(
            config("--model m --dataset d --dataset_num_proc 4")
                .unwrap()
                .data
                .num_proc,
            Some(4)
        );
        let notices = parse("--dataloader_num_workers 4 --per_device_eval_batch_size 1")
            .unwrap()
            .notices;
        assert_eq!(notices.len(), 2, "{notices:?}");
        assert!(notices[0].starts_with("--dataloader_num_workers has no effect"));
    }

    #[test]
    fn three_generations_of_spelling_say_the_same() {
        let v4 = config("--model m --tuner_type lora --dataset d.jsonl --quant_bits 4").unwrap();
        let v3 = config("--model m --train_type lora --dataset d.jsonl --quant_bits 4").unwrap();
        let v2 = config(
            "--model_id_or_path m --sft_type lora --custom_train_dataset_path d.jsonl \
             --quantization_bit 4 --model_type qwen2_5-7b-instruct --lora_target_modules ALL",
        )
        .unwrap();
        assert_eq!(v4, v3);
        assert_eq!(v4, v2);
    }

    #[test]
    fn qlora_flags_and_values_as_ms_swift_parses_them() {
        let c = config(
            "--model m --dataset d.jsonl --bnb_4bit_compute_dtype bfloat16 \
             --bnb_4bit_quant_type nf4 --bnb_4bit_use_double_quant True --quant_method bnb \
             --quant_bits 4 --streaming true --packing --max_steps 10",
        )
        .unwrap();
        assert_eq!(c.quant.bits, Some(4));
        assert!(c.quant.double_quant && c.data.streaming && c.data.packing);
        assert_eq!(c.model.dtype, Some(crate::config::Dtype::Bf16));
        let c =
            config("--model m --dataset d.jsonl --columns={\"instruction\":\"query\"}").unwrap();
        assert_eq!(c.data.columns["instruction"], "query");
        let c = config("--model m --dataset d --loss_scale ignore_empty_think").unwrap();
        assert_eq!(
            c.data.loss_scale,
            crate::config::LossScale::IgnoreEmptyThink
        );
        let c = config("--model m --dataset d.jsonl --use_hf").unwrap();
        assert_eq!(
            (c.model.hub, c.data.hub),
            (Some(Hub::HuggingFace), Some(Hub::HuggingFace))
        );
    }

    #[test]
    fn refused_and_unknown_flags_are_named() {
        let err = parse("--model m --tuner_type full").unwrap_err();
        assert!(
            err.starts_with("--tuner_type full: full is not supported"),
            "{err}"
        );
        let err = parse("--deepspeed zero2").unwrap_err();
        assert!(err.starts_with("--deepspeed zero2: not supported"), "{err}");
        let err = parse("--quant_method hqq").unwrap_err();
        assert!(err.contains("bitsandbytes"), "{err}");
        let err = parse("--lora_rnak 8").unwrap_err();
        assert!(
            err.starts_with("--lora_rnak 8: swift-rs knows no such flag"),
            "{err}"
        );
        let ok = parse("--lora_rnak 8 --ignore_args_error true").unwrap();
        assert!(
            ok.notices[0].contains("--lora_rnak is ignored"),
            "{:?}",
            ok.notices
        );
        let err = config("--model m --dataset d.jsonl --lora_rank eight").unwrap_err();
        assert!(err.starts_with("--lora_rank eight: lora.r"), "{err}");
        let err = parse("stray --model m").unwrap_err();
        assert!(err.starts_with("stray: expected a flag"), "{err}");
    }

    #[test]
    fn a_system_prompt_may_be_a_txt_file_and_pt_trains_on_every_token() {
        let dir = tempfile::tempdir().unwrap();
        let txt = dir.path().join("system.txt");
        std::fs::write(&txt, "You are swift-rs.\n").unwrap();
        let c = config(&format!(
            "--model m --dataset d.jsonl --system {}",
            txt.display()
        ))
        .unwrap();
        assert_eq!(c.model.system.as_deref(), Some("You are swift-rs."));
        let args =
            parse_swift_args(SwiftCommand::Pt, &words("--model m --dataset d.jsonl")).unwrap();
        assert_eq!(
            args.load().unwrap().data.loss_scale,
            crate::config::LossScale::All
        );
    }

    #[test]
    fn args_json_holds_what_infer_needs_under_ms_swifts_names_and_reads_back() {
        let mut c = config(
            "--model org/m --dataset d.jsonl --torch_dtype bfloat16 --quant_bits 4 \
             --template qwen2_5 --system hi --use_hf true --lora_rank 16",
        )
        .unwrap();
        let args = c.swift_args();
        assert_eq!(args["model"], "org/m");
        assert_eq!(args["torch_dtype"], "bfloat16");
        assert_eq!(
            (args["quant_method"].as_str(), args["quant_bits"].as_u64()),
            (Some("bnb"), Some(4))
        );
        assert_eq!(
            (args["lora_rank"].as_u64(), args["tuner_type"].as_str()),
            (Some(16), Some("lora"))
        );
        assert_eq!(args["dataset"], serde_json::json!(["d.jsonl"]));
        assert!(args.get("rlhf_type").is_none() && args.get("beta").is_none());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ARGS_FILE), args.to_string()).unwrap();
        let read = RunArgs::read(dir.path()).unwrap().unwrap();
        assert_eq!(read.model.as_deref(), Some("org/m"));
        assert_eq!((read.dtype, read.quant_bits), (Some(Dtype::Bf16), Some(4)));
        assert_eq!(read.template, Some(TemplateName::Qwen2_5));
        assert_eq!(
            (read.system.as_deref(), read.hub),
            (Some("hi"), Some(Hub::HuggingFace))
        );
        // "auto" and no quantization are written as ms-swift writes unset values.
        c.model.dtype = None;
        c.model.template = TemplateName::Auto;
        c.quant.bits = None;
        let args = c.swift_args();
        assert!(args["torch_dtype"].is_null() && args["template"].is_null());
        assert!(args.get("quant_method").is_none());
        assert_eq!(RunArgs::read(&dir.path().join("none")).unwrap(), None);
    }

    #[test]
    fn flags_override_our_toml_config_given_with_config() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("run.toml");
        std::fs::write(
            &toml,
            "[model]\npath = \"m\"\n[data]\ntrain = [\"d.jsonl\"]\n[lora]\nr = 4\nalpha = 8\n",
        )
        .unwrap();
        let args = parse(&format!("--config {} --lora_rank 16", toml.display())).unwrap();
        assert_eq!(args.config.as_deref(), Some(toml.as_path()));
        let c = TrainConfig::load_with(&toml, &[], &args.overrides).unwrap();
        assert_eq!(
            (c.lora.r, c.lora.alpha, c.model.path.as_str()),
            (16, 8.0, "m")
        );
    }

    #[test]
    fn each_run_gets_the_next_version_folder() {
        let dir = tempfile::tempdir().unwrap();
        // 2026-11-30 10:29:30 UTC.
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_034_570);
        let first = versioned_dir(dir.path(), now);
        assert_eq!(first, dir.path().join("v0-20261130-102930"));
        std::fs::create_dir(&first).unwrap();
        std::fs::create_dir(dir.path().join("v7-20200101-000000")).unwrap();
        std::fs::create_dir(dir.path().join("vx-not-a-run")).unwrap();
        assert_eq!(
            versioned_dir(dir.path(), now),
            dir.path().join("v8-20261130-102930")
        );
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert!(!parse("--add_version false").unwrap().add_version);
        assert!(!parse("--add_version N").unwrap().add_version);
        let err = parse("--add_version maybe").unwrap_err();
        assert!(
            err.starts_with("--add_version maybe: \"maybe\" is not true or false"),
            "{err}"
        );
        assert!(parse("--model m").unwrap().add_version);
    }

    #[test]
    fn the_readme_table_names_every_flag() {
        let readme = include_str!("../../../README.md");
        let names = FLAGS.iter().map(|(name, _)| *name);
        let aliases = super::super::overlay::ALIASES
            .iter()
            .map(|(name, ..)| *name);
        for name in names.chain(aliases) {
            assert!(
                readme.contains(&format!("`--{name}`")),
                "README lacks --{name}"
            );
        }
    }

    #[test]
    fn a_yaml_or_json_config_comes_first_and_later_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("sft.yaml");
        std::fs::write(
            &yaml,
            "model: m\ndataset:\n  - a.jsonl\n  - b.jsonl\nlora_rank: 4\nuse_dora: true\n\
             ENV:\n  SWIFT_RS_TEST_VAR: 1\n",
        )
        .unwrap();
        let line = format!("{} --lora_rank 16", yaml.display());
        let args = parse(&line).unwrap();
        assert_eq!(
            args.env,
            [("SWIFT_RS_TEST_VAR".to_string(), "1".to_string())]
        );
        let c = config(&line).unwrap();
        assert_eq!(c.data.train, ["a.jsonl", "b.jsonl"]);
        assert_eq!((c.lora.r, c.lora.use_dora), (16, true));
        let json = dir.path().join("sft.json");
        std::fs::write(
            &json,
            r#"{"model": "m", "dataset": ["a.jsonl"], "lora_rank": "x"}"#,
        )
        .unwrap();
        let err = config(&json.display().to_string()).unwrap_err();
        assert!(
            err.starts_with(&format!("{}: --lora_rank x: lora.r", json.display())),
            "{err}"
        );
    }

    /// ms-swift's vision-language flags: the defaults (the language model trains) are accepted,
    /// anything that would train the vision tower or freeze the language model is refused.
    #[test]
    fn freeze_flags_of_a_vision_language_model() {
        let ok = "--model m --dataset d.jsonl --freeze_vit true --freeze_aligner true --freeze_llm false";
        assert!(parse(ok).is_ok());
        for bad in [
            "--freeze_vit false",
            "--freeze_aligner false",
            "--freeze_llm true",
        ] {
            let err = parse(&format!("--model m --dataset d.jsonl {bad}")).unwrap_err();
            let flag = bad.split_whitespace().next().unwrap();
            assert!(
                err.contains(flag) && err.contains("language model only"),
                "{err}"
            );
        }
    }
}
