//! Training and evaluation. So far: evaluation of a model's loss on pre-tokenized rows.

mod eval;

pub use eval::{evaluate, EvalReport, RowLoss};
