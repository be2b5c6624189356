//! swift-rs: LoRA/QLoRA fine-tuning of Llama, Mistral, Qwen2 and Qwen3 checkpoints on Burn.
//!
//! Data flows one way (DESIGN.md): `config` → `TrainPlan`; `ops` under `quant`, `lora` and
//! `model`; `hub` and `data` beside them; `train`, `export` and `infer` on top, `serve` over `infer`. A module imports
//! only the layers below it (`tests/layers.rs` checks it), and nothing imports the CLI.

/// `eprintln!` that never fails. A closed stderr (`swift-rs train ... 2>&1 | head`, a terminal
/// gone under nohup or SLURM) must not end a run, and `eprintln!` panics when its write fails.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `eprint!` that never fails (see `say!`).
#[macro_export]
macro_rules! say_partial {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` for results on stdout that a reader may stop reading (`| head`): the write's
/// failure is not an error of the command, and `println!` would panic on it.
#[macro_export]
macro_rules! show {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod config;
pub mod data;
pub mod export;
pub mod hub;
pub mod infer;
pub mod lora;
pub mod model;
pub mod ops;
pub mod quant;
pub mod serve;
pub mod train;
