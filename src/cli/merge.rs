//! `swift-rs merge`: a PEFT adapter folded into its base model, written as a Hugging Face directory.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::device::{resolve, with_backend};
use super::{Failure, HubArg};
use swift_rs::config::{Device, Dtype};
use swift_rs::export::exit_removing_staged;
use swift_rs::export::merge::{merge, parse_size, MergeOptions};
use swift_rs::model::ModelBackend;

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Hugging Face model directory or hub id org/name[@revision] (the unquantized base, also
    /// for QLoRA adapters)
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory or hub id
    #[arg(long)]
    adapter: PathBuf,
    #[command(flatten)]
    hub: HubArg,
    /// New directory for the merged model
    #[arg(long)]
    output: PathBuf,
    /// dtype of the written weights: bf16, f16, f32 (default: the base model's)
    #[arg(long)]
    dtype: Option<Dtype>,
    /// Largest shard, as transformers' max_shard_size: 5GB, 500MB, 2GiB
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    max_shard_size: u64,
    /// auto, cpu, cuda[:N] or wgpu[:N]
    #[arg(long, default_value = "auto")]
    device: Device,
}

pub fn run(args: MergeArgs) -> Result<(), Failure> {
    let job = Job {
        model: args.hub.local_dir(&args.model)?,
        adapter: args.hub.local_dir(&args.adapter)?,
        output: args.output,
        options: MergeOptions {
            dtype: args.dtype,
            max_shard_size: args.max_shard_size,
        },
    };
    with_backend!(resolve(args.device)?, merge_on(&job))
}

/// A merge, its directories local.
pub(super) struct Job {
    pub model: PathBuf,
    pub adapter: PathBuf,
    pub output: PathBuf,
    pub options: MergeOptions,
}

pub(super) fn merge_on<B: ModelBackend>(device: B::Device, job: &Job) -> Result<(), Failure> {
    // A merge has nothing worth saving half-way: Ctrl-C or SIGTERM removes what it was writing
    // (SIGKILL's leftover is removed by the next merge into the same place).
    ctrlc::set_handler(|| {
        swift_rs::say!("\ninterrupted: nothing partial is left");
        exit_removing_staged(130);
    })
    .context("cannot install the SIGINT/SIGTERM handler")?;
    let report =
        merge::<B>(&job.model, &job.adapter, &job.output, &job.options, &device).map_err(|e| {
            let (adapter, model) = (job.adapter.display(), job.model.display());
            Failure::of(e, format!("cannot merge {adapter} into {model}"))
        })?;
    swift_rs::show!(
        "merged {} modules into {} ({} shard(s), {:.1} MB) in {:.2} s",
        report.merged_modules,
        job.output.display(),
        report.shards,
        report.bytes as f64 / 1e6,
        report.seconds
    );
    Ok(())
}
