//! `swift-rs merge`: a PEFT adapter folded into its base model, written as a Hugging Face directory.

use std::path::PathBuf;

use clap::Args;

use super::device::{with_backend, DeviceArg};
use super::{Failure, HubArg};
use swift_rs::config::Dtype;
use swift_rs::export::merge::{merge, parse_size, MergeError, MergeOptions};
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
    /// dtype of the written weights (default: the base model's)
    #[arg(long, value_enum)]
    dtype: Option<OutDtype>,
    /// Largest shard, as transformers' max_shard_size: 5GB, 500MB, 2GiB
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    max_shard_size: u64,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    device: DeviceArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum OutDtype {
    Bf16,
    F16,
    F32,
}

pub fn run(args: MergeArgs) -> Result<(), Failure> {
    with_backend!(args.device, merge_on(&args))
}

fn merge_on<B: ModelBackend>(device: B::Device, args: &MergeArgs) -> Result<(), Failure> {
    let options = MergeOptions {
        dtype: args.dtype.map(|d| match d {
            OutDtype::Bf16 => Dtype::Bf16,
            OutDtype::F16 => Dtype::F16,
            OutDtype::F32 => Dtype::F32,
        }),
        max_shard_size: args.max_shard_size,
    };
    let model = args.hub.local_dir(&args.model)?;
    let adapter = args.hub.local_dir(&args.adapter)?;
    let report = merge::<B>(&model, &adapter, &args.output, &options, &device).map_err(|e| {
        let usage = matches!(e, MergeError::Usage(_));
        let e = anyhow::Error::new(e).context(format!(
            "cannot merge {} into {}",
            args.adapter.display(),
            args.model.display()
        ));
        if usage {
            Failure::Usage(e)
        } else {
            Failure::Runtime(e)
        }
    })?;
    println!(
        "merged {} modules into {} ({} shard(s), {:.1} MB) in {:.2} s",
        report.merged_modules,
        args.output.display(),
        report.shards,
        report.bytes as f64 / 1e6,
        report.seconds
    );
    Ok(())
}
