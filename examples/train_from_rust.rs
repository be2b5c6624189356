//! Train a LoRA adapter from Rust: a config built in code, a callback after every optimizer step
//! (here: print the loss, and stop early once it is low enough), and the adapter in PEFT's format
//! in the last checkpoint.
//!
//!     cargo run --release --example train_from_rust -- /tmp/quickstart-from-rust
//!
//! Uses the quickstart's offline model and data (run from the repository root).

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use swift_rs::config::{Device, TrainConfig};
use swift_rs::train::{Control, Trainer};

fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("output/train_from_rust"), PathBuf::from);

    // Every key of SPEC's [model] [lora] [quant] [data] [train] [output] is a field; unset
    // ones keep ms-swift's defaults.
    let mut config = TrainConfig::default();
    config.model.path = "examples/quickstart-model".into();
    config.lora.r = 16;
    config.lora.alpha = 32.0;
    config.lora.dropout = 0.0;
    config.data.train = vec!["datasets/self_cognition.jsonl".into()];
    config.data.max_length = 256;
    config.train.epochs = 40.0;
    config.train.batch_size = 8;
    config.train.grad_accum = 1;
    config.train.lr = 5e-3;
    config.train.warmup_ratio = 0.05;
    config.train.weight_decay = 0.0;
    config.train.save_steps = 100;
    config.train.logging_steps = 20;
    config.output.dir = out;
    config.output.overwrite = true;

    // `resolve` checks the config and makes the choices it leaves open for the device the run
    // goes to (on the CPU, "auto" dtype is f32), exactly as `swift-rs train` does.
    let plan = config.resolve(Device::Cpu)?;
    let mut trainer = Trainer::<Autodiff<Flex>>::new(plan, Default::default())?;
    let outcome = trainer.run(|step| {
        // The loss is read from the device on logging steps (`train.logging_steps`) only.
        let Some(loss) = step.loss else {
            return Control::Continue;
        };
        println!(
            "step {:>3}/{}: loss {loss:.4}, lr {:.2e}",
            step.step, step.max_steps, step.learning_rate
        );
        // A research loop can end training on its own criterion; the step is saved first.
        if loss < 0.05 {
            Control::Stop
        } else {
            Control::Continue
        }
    })?;
    println!(
        "{} steps{}; adapter: {}",
        outcome.steps,
        if outcome.stopped {
            " (stopped early)"
        } else {
            ""
        },
        outcome.last_checkpoint.display()
    );
    Ok(())
}
