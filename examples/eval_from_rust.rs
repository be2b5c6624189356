//! Load a Hugging Face checkpoint and compute its loss on pre-tokenized rows from Rust.
//!
//!     cargo run --release --example eval_from_rust -- tests/fixtures/models/qwen3_f16 \
//!         tests/fixtures/models/qwen3_f16/expected/inputs.jsonl

use std::path::PathBuf;

use burn::backend::Flex;
use swift_rs::config::Dtype;
use swift_rs::data::read_pretokenized;
use swift_rs::model::{self, Batch, LoadOptions};
use swift_rs::train::evaluate;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(PathBuf::from);
    let (Some(model_dir), Some(data)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: eval_from_rust MODEL_DIR DATA.jsonl");
    };
    let device = Default::default();
    let (config, model) =
        model::load::<Flex>(&model_dir, LoadOptions::dtype(Dtype::F32), None, &device)?;
    println!(
        "{:?}: {} layers, hidden {}",
        config.arch, config.num_hidden_layers, config.hidden_size
    );

    let rows = read_pretokenized(&data, config.vocab_size)?;
    let report = evaluate(&model, &rows, 4, |_| {});
    for r in &report.rows {
        println!(
            "row {}: loss {:.4} over {} tokens",
            r.index, r.loss, r.tokens
        );
    }
    println!(
        "mean loss {:.4}, perplexity {:.2}",
        report.loss,
        report.perplexity()
    );

    // The logits themselves, for one row: [batch, seq, vocab].
    let logits = model.forward(&Batch::right_padded(&[rows[0].input_ids.as_slice()]));
    println!("logits of row 0: {:?}", logits.dims());
    Ok(())
}
