//! swift-rs: LoRA/QLoRA fine-tuning of Llama, Mistral, Qwen2 and Qwen3 checkpoints on Burn.
//!
//! Data flows one way (DESIGN.md): `config` → `TrainPlan`; `ops` under `quant`, `lora` and
//! `model`; `hub` and `data` beside them; `train`, `export` and `infer` on top, `serve` over `infer`. A module imports
//! only the layers below it (`tests/layers.rs` checks it), and nothing imports the CLI.

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
