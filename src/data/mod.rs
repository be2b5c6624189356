//! Datasets and tokenizers. So far: pre-tokenized JSONL rows (for `eval`) and `tokenizer.json`.

mod pretokenized;
mod tokenizer;

use std::path::PathBuf;

pub use pretokenized::{read_pretokenized, TokenizedRow};
pub use tokenizer::load_tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    BadRow {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path} holds no rows")]
    Empty { path: PathBuf },
    #[error("{path} is not a usable tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
}
