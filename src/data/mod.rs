//! Datasets and tokenizers: file readers, row formats, pre-tokenized rows (for `eval`) and
//! `tokenizer.json`.

pub mod dataset;
pub mod encode;
pub mod format;
mod long_text;
pub mod pack;
mod pretokenized;
pub mod registry;
pub mod source;
pub mod template;
mod tokenizer;

use std::path::PathBuf;

pub use pretokenized::{read_pretokenized, TokenizedRow};
pub use tokenizer::load_tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A dataset by hub id that could not be had.
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
    /// A `data.train` / `data.val` entry that cannot be used as written.
    #[error("{spec}: {reason}")]
    Spec { spec: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{at}: {reason}")]
    BadRow {
        path: PathBuf,
        at: Location,
        reason: String,
    },
    #[error("{path}: unsupported dataset file (use .jsonl, .json, .csv or .parquet)")]
    Unsupported { path: PathBuf },
    #[error("{path} is not a readable Parquet file: {reason}")]
    Parquet { path: PathBuf, reason: String },
    #[error("{what} holds no usable rows ({skipped} skipped as bad or too long)")]
    NoRows { what: String, skipped: usize },
    #[error("{path} holds no rows")]
    Empty { path: PathBuf },
    #[error("{path}: {reason}")]
    Template { path: PathBuf, reason: String },
    #[error("{path} is not a usable tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
}

impl DataError {
    /// The input's fault (a spec, file or row that cannot be used, a dataset that does not
    /// exist), as opposed to a failure reading what is there or fetching it.
    pub fn is_usage(&self) -> bool {
        match self {
            Self::Hub(e) => e.is_usage(),
            Self::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            _ => true,
        }
    }
}

/// Where a row is: a line of a JSONL file, or a row (from 0) of a JSON array or Parquet file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    Line(usize),
    Row(usize),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Line(n) => write!(f, "{n}"),
            Self::Row(n) => write!(f, "row {n}"),
        }
    }
}
