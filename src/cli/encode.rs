//! `swift-rs encode`: the rows training sees, in the order it sees them in the first epoch, as
//! JSONL (`input_ids`, `labels`, and `position_ids` when packing).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use super::{open_output, Failure, HubArg};
use swift_rs::config::TrainConfig;
use swift_rs::data::dataset::{BadRows, Dataset, Stream, TrainRow};
use swift_rs::data::encode::Encoder;
use swift_rs::data::source::DatasetSpec;

#[derive(Args, Debug)]
pub struct EncodeArgs {
    /// Training config (TOML); its [model] and [data] sections are used
    #[arg(long)]
    config: PathBuf,
    /// Override a config key: section.key=value (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Write here (atomically) instead of to standard output
    #[arg(long)]
    output: Option<PathBuf>,
    /// Stop after N rows
    #[arg(long)]
    limit: Option<usize>,
}

pub fn run(args: EncodeArgs) -> Result<(), Failure> {
    let config = TrainConfig::load(&args.config, &args.set)?;
    let model_dir = HubArg {
        hub: config.model.hub,
    }
    .local_dir(Path::new(&config.model.path))?;
    let encoder = Encoder::from_config(&model_dir, &config)?;
    let (totals, bad_rows) = match &args.output {
        Some(path) => {
            let mut inputs = vec![args.config.clone()];
            for spec in config.data.train.iter().chain(&config.data.val) {
                inputs.extend(
                    DatasetSpec::parse(spec)
                        .files(config.data.hub)
                        .unwrap_or_default(),
                );
            }
            let mut file = open_output(path, &inputs)?;
            let mut out = BufWriter::new(&mut file);
            let done = emit(&config, &encoder, args.limit, &mut out)?;
            drop(out);
            file.commit()?;
            swift_rs::say!("wrote {}", path.display());
            done
        }
        None => emit(
            &config,
            &encoder,
            args.limit,
            &mut BufWriter::new(std::io::stdout().lock()),
        )?,
    };
    swift_rs::say!(
        "encoded {} rows: {} tokens, {} with loss",
        totals.rows,
        totals.tokens,
        totals.label_tokens
    );
    if let Some(text) = bad_rows.describe(config.data.max_length) {
        swift_rs::say!("{text}");
    }
    Ok(())
}

/// Writes the first `limit` rows of epoch 0 to `out`.
fn emit(
    config: &TrainConfig,
    encoder: &Encoder,
    limit: Option<usize>,
    out: &mut dyn Write,
) -> Result<(Totals, BadRows), Failure> {
    let limit = limit.unwrap_or(usize::MAX);
    let mut totals = Totals::default();
    let bad_rows = if config.data.streaming {
        let mut stream = Stream::new(&config.data, config.train.seed, 0, encoder)?;
        for row in stream.by_ref().take(limit) {
            totals.write(out, &row?)?;
        }
        stream.bad_rows
    } else {
        let dataset = Dataset::build(&config.data, config.train.seed, encoder)?;
        for i in dataset.epoch_order(0).into_iter().take(limit) {
            totals.write(out, &dataset.train[i])?;
        }
        if !dataset.val.is_empty() {
            swift_rs::say!("validation: {} rows (not written)", dataset.val.len());
        }
        dataset.bad_rows
    };
    out.flush().context("cannot write the encoded rows")?;
    Ok((totals, bad_rows))
}

#[derive(Default)]
struct Totals {
    rows: usize,
    tokens: usize,
    label_tokens: usize,
}

impl Totals {
    fn write(&mut self, out: &mut dyn Write, row: &TrainRow) -> anyhow::Result<()> {
        serde_json::to_writer(&mut *out, &row.to_json())?;
        out.write_all(b"\n")
            .context("cannot write the encoded rows")?;
        self.rows += 1;
        self.tokens += row.tokens();
        self.label_tokens += row.label_tokens();
        Ok(())
    }
}
