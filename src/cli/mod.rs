//! Command-line types and their calls into the library. The only place for anyhow and exit codes.

mod deploy;
mod device;
mod encode;
mod eval;
mod export;
mod infer;
mod merge;
mod train;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use swift_rs::config::{
    auto_dtype, ConfigError, Device, Dtype, Hub, ModelConfig, Nf4Config, RunArgs, SwiftCommand,
};
use swift_rs::data::DataError;
use swift_rs::export::merge::MergeError;
use swift_rs::export::peft::read_adapter;
use swift_rs::export::{AtomicFile, ExportError};
use swift_rs::hub::{self, HubError};
use swift_rs::model::{self, CausalLm, LoadOptions, ModelBackend, ModelError};
use swift_rs::train::TrainError;

#[derive(Parser, Debug)]
#[command(
    name = "swift-rs",
    version,
    about = "LoRA/QLoRA fine-tuning of decoder LLMs on Burn"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// LoRA / QLoRA fine-tune from a training config (TOML)
    Train(train::TrainArgs),
    /// ms-swift's `swift sft`: its flags (--model, --dataset, --lora_rank, ...), after an
    /// optional .yaml/.json config of them, or --config FILE (swift-rs's TOML); `sft --help`
    /// lists the flags
    // `--help` anywhere on the line (after other flags, as users add it) is the command's own,
    // with the list of flags: clap's would take it as the first word only.
    #[command(disable_help_flag = true)]
    Sft(train::SwiftLine),
    /// ms-swift's `swift pt`: as sft, with loss on every token; `pt --help` lists the flags
    #[command(disable_help_flag = true)]
    Pt(train::SwiftLine),
    /// Preference training: DPO, ORPO, SimPO, CPO or KTO (--rlhf_type) from ms-swift's `swift
    /// rlhf` flags (--rlhf_type dpo --beta 0.1 ...), or --config FILE (swift-rs's TOML with an
    /// [rlhf] section) [--set KEY=VALUE]...; `rlhf --help` lists the flags
    #[command(disable_help_flag = true)]
    Rlhf(train::SwiftLine),
    /// Mean loss and perplexity of a model over pre-tokenized JSONL rows
    Eval(eval::EvalArgs),
    /// Write the rows training would see (input_ids, labels) as JSONL
    Encode(encode::EncodeArgs),
    /// Chat with a model (and adapter), answer one prompt, or answer a dataset's prompts
    Infer(infer::InferArgs),
    /// Merge a LoRA adapter into its base model and write a Hugging Face model directory
    Merge(merge::MergeArgs),
    /// Export a model and its adapter: merged into a Hugging Face directory (ms-swift's
    /// `--merge_lora true`), or into one GGUF file for llama.cpp and Ollama (`--to gguf`)
    Export(export::ExportArgs),
    /// ms-swift's `swift deploy`: an OpenAI-compatible server for a model and its adapters
    /// (--adapters name=DIR ...), with continuous batching
    Deploy(deploy::DeployArgs),
}

/// Says, once a run, what "auto" (`requested` None) became where that is not the checkpoint's
/// dtype on the user's say: wgpu, which has no bf16, computes it in f32.
pub fn say_dtype_choice(on: Device, requested: Option<Dtype>) {
    if requested.is_none() && matches!(on, Device::Wgpu(_)) {
        swift_rs::say!(
            "wgpu has no bf16: the weights compute in f32 (dtype f16 halves their memory, but \
             Qwen's activations can overflow f16)"
        );
    }
}

/// `--quant`: how the frozen base weights are held.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum QuantArg {
    /// 4-bit NormalFloat, as bitsandbytes (QLoRA)
    Nf4,
}

/// `--model`, `--adapter`, `--hub`, `--quant` and `--dtype`, as `eval` and `infer` take them,
/// under ms-swift's names too (`--adapters`, `--torch_dtype`).
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// Hugging Face model directory, or a hub id org/name[@revision] (downloaded into the hub's
    /// cache); a merged model directory works as any other [default: the adapter's base model,
    /// from its args.json or adapter_config.json]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// PEFT LoRA adapter directory or hub id, applied unmerged (a training checkpoint works:
    /// its args.json gives the model, template, system prompt, dtype and quantization that
    /// other flags do not)
    #[arg(long, visible_alias = "adapters")]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub hub: HubArg,
    /// Hold the decoder's linear weights in 4-bit NF4 (QLoRA; bitsandbytes' format, double
    /// quantization, blocks of 64)
    #[arg(long, value_enum)]
    pub quant: Option<QuantArg>,
    /// Compute dtype of the weights: auto (config.json), bf16, f16, f32
    // The full path keeps clap from taking the Option as "flag may be absent": "auto" is None.
    #[arg(long, visible_alias = "torch_dtype", default_value = "auto", value_parser = auto_dtype::parse)]
    pub dtype: std::option::Option<Dtype>,
}

/// `--output`, opened before the work that fills it: a path that cannot be written is found
/// before hours of generation, not after, and a path naming one of the command's `inputs` is
/// refused instead of overwritten. The returned file is renamed into place by `commit`.
pub fn open_output(output: &Path, inputs: &[PathBuf]) -> Result<AtomicFile, Failure> {
    if let Ok(out) = std::fs::canonicalize(output) {
        let same = |input: &&PathBuf| std::fs::canonicalize(input).is_ok_and(|i| i == out);
        if let Some(input) = inputs.iter().find(same) {
            return Err(Failure::Usage(anyhow::anyhow!(
                "--output {} is the input {}: writing it would destroy it; write elsewhere",
                output.display(),
                input.display()
            )));
        }
    }
    AtomicFile::create(output)
        .with_context(|| format!("--output {}: cannot write there", output.display()))
        .map_err(Failure::Usage)
}

/// Local directories for `--model` and `--adapter`, hub ids downloaded, and the adapter's
/// `args.json` when it has one.
pub struct LocalModel {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub run_args: RunArgs,
}

impl ModelArgs {
    pub fn local(&self) -> Result<LocalModel, Failure> {
        let adapter = match &self.adapter {
            Some(spec) => Some(self.hub.local_dir(spec)?),
            None => None,
        };
        let run_args = match &adapter {
            Some(dir) => RunArgs::read(dir)?.unwrap_or_default(),
            None => RunArgs::default(),
        };
        let model = match (&self.model, &run_args.model, &adapter) {
            (Some(model), ..) => model.clone(),
            (None, Some(model), _) => PathBuf::from(model),
            (None, None, Some(dir)) => read_adapter(dir)
                .ok()
                .and_then(|a| a.config.base_model_name_or_path)
                .map(PathBuf::from)
                .ok_or_else(|| {
                    Failure::Usage(anyhow::anyhow!(
                        "--model is required: the adapter in {} names no base model (no \
                         args.json, no base_model_name_or_path)",
                        dir.display()
                    ))
                })?,
            (None, None, None) => {
                return Err(Failure::Usage(anyhow::anyhow!(
                    "--model is required (or --adapters of a checkpoint, which names its model)"
                )))
            }
        };
        let hub = HubArg {
            hub: self.hub.hub.or(run_args.hub),
        };
        let model = hub.local_dir(&model)?;
        let config = model.join("config.json");
        if !config.is_file() {
            let message = match (model.is_dir(), &adapter) {
                (true, _) => format!(
                    "no {}: {} is not a model directory (one holds config.json, \
                     model.safetensors and tokenizer.json)",
                    config.display(),
                    model.display()
                ),
                // A local path the checkpoint recorded (a hub id would have been fetched).
                (false, Some(dir)) if self.model.is_none() => format!(
                    "the adapter in {} was trained on the model in {}, which is not there any \
                     more (moved or deleted?): give its new place with --model",
                    dir.display(),
                    model.display()
                ),
                (false, _) => format!(
                    "no {}: {} does not exist, and is not a hub id org/name",
                    config.display(),
                    model.display()
                ),
            };
            return Err(Failure::Usage(anyhow::anyhow!(message)));
        }
        Ok(LocalModel {
            model,
            adapter,
            run_args,
        })
    }

    /// The model with the adapter built in, on `on` (wgpu computes "auto" in f32). A bad
    /// config.json is a usage error, other load failures runtime errors. The dtype and the
    /// quantization are the flags', else the adapter's args.json's.
    pub fn load<B: ModelBackend>(
        &self,
        local: &LocalModel,
        on: Device,
        device: &B::Device,
    ) -> Result<(ModelConfig, CausalLm<B>), Failure> {
        let requested = self.dtype.or(local.run_args.dtype);
        let dtype = on
            .load_dtype(requested)
            .map_err(|e| Failure::Usage(anyhow::anyhow!("--dtype: {e}")))?;
        say_dtype_choice(on, requested);
        let mut adapter = match &local.adapter {
            None => None,
            Some(dir) => Some(
                read_adapter(dir)
                    .with_context(|| format!("cannot read the adapter in {}", dir.display()))?,
            ),
        };
        let nf4 = self.quant.is_some() || local.run_args.quant_bits == Some(4);
        let options = LoadOptions {
            dtype,
            quant: nf4.then(Nf4Config::default),
        };
        let dir = &local.model;
        model::load::<B>(dir, options, adapter.as_mut(), device)
            .map_err(|e| Failure::of(e, format!("cannot load the model in {}", dir.display())))
    }
}

/// `--hub`: where hub ids in `--model` and `--adapter` come from.
#[derive(clap::Args, Debug)]
pub struct HubArg {
    /// Where a hub id is downloaded from: huggingface or modelscope [default: USE_HF decides
    /// as in ms-swift, else huggingface]
    #[arg(long)]
    pub hub: Option<Hub>,
}

impl HubArg {
    /// The directory `spec` names, downloading a hub id. An id the hub does not know is a usage
    /// error; other download failures are runtime errors.
    pub fn local_dir(&self, spec: &Path) -> Result<PathBuf, Failure> {
        Ok(hub::local_dir(spec, self.hub)?)
    }
}

/// A failed command: usage and config errors exit 2, runtime errors 1 (SPEC).
pub enum Failure {
    Usage(anyhow::Error),
    Runtime(anyhow::Error),
}

/// A library error, which says whether the user's input caused it.
pub trait LibError: std::error::Error + Send + Sync + 'static {
    fn is_usage(&self) -> bool;
}

macro_rules! lib_errors {
    ($($t:ty),*) => {$(
        impl LibError for $t {
            fn is_usage(&self) -> bool {
                <$t>::is_usage(self)
            }
        }
    )*};
}
lib_errors!(
    ConfigError,
    ModelError,
    HubError,
    TrainError,
    MergeError,
    DataError
);

/// Writing a file failed: the disk's or the permissions' fault, not the input's.
impl LibError for ExportError {
    fn is_usage(&self) -> bool {
        false
    }
}

/// `?` on a library call classifies its error.
impl<E: LibError> From<E> for Failure {
    fn from(e: E) -> Self {
        let usage = e.is_usage();
        Self::classified(usage, anyhow::Error::new(e))
    }
}

impl Failure {
    /// A library error with `context` before its own message: usage (exit 2) or runtime (exit 1)
    /// as the error says.
    pub fn of<C>(e: impl LibError, context: C) -> Self
    where
        C: std::fmt::Display + Send + Sync + 'static,
    {
        let usage = e.is_usage();
        Self::classified(usage, anyhow::Error::new(e).context(context))
    }

    fn classified(usage: bool, e: anyhow::Error) -> Self {
        if usage {
            Self::Usage(e)
        } else {
            Self::Runtime(e)
        }
    }

    pub fn error(&self) -> &anyhow::Error {
        match self {
            Self::Usage(e) | Self::Runtime(e) => e,
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Runtime(_) => 1,
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Runtime(e)
    }
}

pub fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Train(args) => train::run(args),
        Command::Sft(line) => train::run_swift(SwiftCommand::Sft, line),
        Command::Pt(line) => train::run_swift(SwiftCommand::Pt, line),
        Command::Rlhf(line) => train::run_swift(SwiftCommand::Rlhf, line),
        Command::Eval(args) => eval::run(args),
        Command::Infer(args) => infer::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Export(args) => export::export(args),
        Command::Encode(args) => encode::run(args),
        Command::Deploy(args) => deploy::run(args),
    }
}
