//! Command-line types and their calls into the library. The only place for anyhow and exit codes.

mod device;
mod encode;
mod eval;
mod infer;
mod merge;
mod train;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use swift_rs::config::{Dtype, Hub, ModelConfig};
use swift_rs::export::peft::read_adapter;
use swift_rs::hub;
use swift_rs::model::ModelBackend;
use swift_rs::model::{self, CausalLm, LoadOptions, ModelError};
use swift_rs::quant::Nf4Config;

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
    /// Mean loss and perplexity of a model over pre-tokenized JSONL rows
    Eval(eval::EvalArgs),
    /// Write the rows training would see (input_ids, labels) as JSONL
    Encode(encode::EncodeArgs),
    /// Chat with a model (and adapter), answer one prompt, or answer a dataset's prompts
    Infer(infer::InferArgs),
    /// Merge a LoRA adapter into its base model and write a Hugging Face model directory
    Merge(merge::MergeArgs),
}

/// `--dtype`: the compute dtype of the frozen weights.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum DtypeArg {
    /// the dtype config.json names
    Auto,
    Bf16,
    F16,
    F32,
}

impl DtypeArg {
    pub fn resolve(self) -> Option<Dtype> {
        match self {
            Self::Auto => None,
            Self::Bf16 => Some(Dtype::Bf16),
            Self::F16 => Some(Dtype::F16),
            Self::F32 => Some(Dtype::F32),
        }
    }
}

/// `--quant`: how the frozen base weights are held.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum QuantArg {
    /// 4-bit NormalFloat, as bitsandbytes (QLoRA)
    Nf4,
}

/// `--model`, `--adapter`, `--hub`, `--quant` and `--dtype`, as `eval` and `infer` take them.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// Hugging Face model directory, or a hub id org/name[@revision] (downloaded into the hub's
    /// cache); a merged model directory works as any other
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory or hub id, applied unmerged (a training checkpoint works)
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub hub: HubArg,
    /// Hold the decoder's linear weights in 4-bit NF4 (QLoRA; bitsandbytes' format, double
    /// quantization, blocks of 64)
    #[arg(long, value_enum)]
    pub quant: Option<QuantArg>,
    /// Compute dtype of the weights: auto (config.json), bf16, f16, f32
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
}

/// Local directories for `--model` and `--adapter`, hub ids downloaded.
pub struct LocalModel {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
}

impl ModelArgs {
    pub fn local(&self) -> Result<LocalModel, Failure> {
        Ok(LocalModel {
            model: self.hub.local_dir(&self.model)?,
            adapter: match &self.adapter {
                Some(spec) => Some(self.hub.local_dir(spec)?),
                None => None,
            },
        })
    }

    /// The model with the adapter built in. A bad config.json is a usage error, other load
    /// failures runtime errors.
    pub fn load<B: ModelBackend>(
        &self,
        local: &LocalModel,
        device: &B::Device,
    ) -> Result<(ModelConfig, CausalLm<B>), Failure> {
        let mut adapter = match &local.adapter {
            None => None,
            Some(dir) => Some(
                read_adapter(dir)
                    .with_context(|| format!("cannot read the adapter in {}", dir.display()))?,
            ),
        };
        let options = LoadOptions {
            dtype: self.dtype.resolve(),
            quant: self.quant.map(|QuantArg::Nf4| Nf4Config::default()),
        };
        let dir = &local.model;
        model::load::<B>(dir, options, adapter.as_mut(), device).map_err(|e| {
            let usage = matches!(e, ModelError::Config(_));
            let e = anyhow::Error::new(e)
                .context(format!("cannot load the model in {}", dir.display()));
            if usage {
                Failure::Usage(e)
            } else {
                Failure::Runtime(e)
            }
        })
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
        hub::local_dir(spec, self.hub).map_err(|e| {
            let usage = e.is_usage();
            let e = anyhow::Error::new(e);
            if usage {
                Failure::Usage(e)
            } else {
                Failure::Runtime(e)
            }
        })
    }
}

/// A failed command: usage and config errors exit 2, runtime errors 1 (SPEC).
pub enum Failure {
    Usage(anyhow::Error),
    Runtime(anyhow::Error),
}

impl Failure {
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
        Command::Eval(args) => eval::run(args),
        Command::Infer(args) => infer::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Encode(args) => encode::run(args),
    }
}

/// A file written under a temporary name in its final directory and renamed on `commit`, so a
/// crash never leaves a half-written file under the final name.
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    path: std::path::PathBuf,
}

impl AtomicFile {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let tmp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("cannot create a file in {}", dir.display()))?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
        })
    }

    pub fn commit(self) -> anyhow::Result<()> {
        self.tmp
            .persist(&self.path)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        Ok(())
    }
}

impl std::io::Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tmp.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tmp.flush()
    }
}

/// Writes `bytes` to `path` atomically (see `AtomicFile`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = AtomicFile::create(path)?;
    std::io::Write::write_all(&mut file, bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.commit()
}
