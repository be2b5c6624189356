//! swift-rs: LoRA/QLoRA fine-tuning of Llama, Mistral, Qwen2 and Qwen3 checkpoints on Burn.
//!
//! Data flows one way: `config` → `model` (+ `data`) → `train` (see DESIGN.md).

pub mod config;
pub mod data;
pub mod export;
pub mod hub;
pub mod infer;
pub mod lora;
pub mod model;
pub mod ops;
pub mod quant;
pub mod train;
