//! `tokenizer.json` through Hugging Face's own `tokenizers` crate, so ids equal transformers'.

use std::path::Path;

use tokenizers::Tokenizer;

use super::DataError;

/// Loads `<dir>/tokenizer.json`.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer, DataError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(DataError::Tokenizer {
            path,
            reason: "file not found".into(),
        });
    }
    Tokenizer::from_file(&path).map_err(|e| DataError::Tokenizer {
        path: path.clone(),
        reason: e.to_string(),
    })
}
