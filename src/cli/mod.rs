//! Command-line types and their calls into the library. The only place for anyhow and exit codes.

mod device;
mod eval;
mod merge;

use std::path::Path;

use clap::{Parser, Subcommand, ValueEnum};
use swift_rs::config::Dtype;

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
    /// Mean loss and perplexity of a model over pre-tokenized JSONL rows
    Eval(eval::EvalArgs),
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
        Command::Eval(args) => eval::run(args),
        Command::Merge(args) => merge::run(args),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// crash never leaves a half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
