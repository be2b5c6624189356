//! `swift-rs eval`: loss and perplexity over pre-tokenized JSONL.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::device::{resolve, with_backend};
use super::{open_output, Failure, ModelArgs};
use swift_rs::config::Device;
use swift_rs::data::{read_pretokenized, TokenizedRow};
use swift_rs::model::ModelBackend;
use swift_rs::train::evaluate;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL files of {"input_ids": [...], "labels": [...]} rows (labels optional)
    #[arg(long, num_args = 1.., required = true)]
    dataset: Vec<PathBuf>,
    /// Keep only the first N tokens of each row
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    max_length: Option<u64>,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Write one {"index", "loss", "tokens"} JSON object per row, in input order
    #[arg(long)]
    output: Option<PathBuf>,
    /// auto, cpu, cuda[:N] or wgpu[:N]
    #[arg(long, default_value = "auto")]
    device: Device,
}

pub fn run(args: EvalArgs) -> Result<(), Failure> {
    let backend = resolve(args.device)?;
    let on = backend.device();
    with_backend!(backend, eval_on(&args, on))
}

fn eval_on<B: ModelBackend>(device: B::Device, args: &EvalArgs, on: Device) -> Result<(), Failure> {
    let mut output = match &args.output {
        Some(path) => Some((open_output(path, &args.dataset)?, path)),
        None => None,
    };
    let local = args.model.local()?;
    let (config, model) = args.model.load::<B>(&local, on, &device)?;
    let mut rows: Vec<TokenizedRow> = Vec::new();
    for path in &args.dataset {
        rows.extend(read_pretokenized(path, config.vocab_size).context("cannot read the dataset")?);
    }
    if let Some(max) = args.max_length {
        for row in &mut rows {
            row.input_ids.truncate(max as usize);
            row.labels.truncate(max as usize);
        }
    }
    let total = rows.len();
    let terminal = std::io::stderr().is_terminal();
    let report = evaluate(&model, &rows, args.batch_size as usize, |done| {
        if terminal {
            swift_rs::say_partial!("\reval: {done}/{total} rows");
        }
    });
    if terminal {
        swift_rs::say!();
    }
    if let Some((mut file, path)) = output.take() {
        let mut text = String::new();
        for r in &report.rows {
            let loss = if r.tokens > 0 {
                serde_json::json!(r.loss)
            } else {
                serde_json::Value::Null
            };
            text.push_str(
                &serde_json::json!({"index": r.index, "loss": loss, "tokens": r.tokens})
                    .to_string(),
            );
            text.push('\n');
        }
        file.write_all(text.as_bytes())
            .and_then(|()| file.flush())
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.commit()?;
    }
    if report.tokens == 0 {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "no row has a label token: nothing to evaluate"
        )));
    }
    swift_rs::show!("loss: {:.6}", report.loss);
    swift_rs::show!("perplexity: {:.6}", report.perplexity());
    swift_rs::show!("tokens: {}", report.tokens);
    Ok(())
}
