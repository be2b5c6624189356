//! Training and evaluation. So far: evaluation of a model's loss on pre-tokenized rows, and the
//! learning-rate schedules.

mod eval;
pub mod schedule;

pub use eval::{evaluate, EvalReport, RowLoss};
