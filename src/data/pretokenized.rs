//! Pre-tokenized rows: `{"input_ids": [...], "labels": [...]}` per JSONL line; `labels` is
//! optional (the input ids are the labels then), -100 marks tokens that take no loss.

use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::Deserialize;

use super::DataError;
use crate::model::loss::IGNORE_INDEX;

#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedRow {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

#[derive(Deserialize)]
struct RawRow {
    input_ids: Vec<i64>,
    labels: Option<Vec<i64>>,
}

/// Reads every row of a JSONL file, checking each id against `vocab_size`; the first bad row
/// stops the read with its line number.
pub fn read_pretokenized(path: &Path, vocab_size: usize) -> Result<Vec<TokenizedRow>, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let bad = |reason: String| DataError::BadRow {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let line = line.map_err(|e| bad(format!("unreadable line: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let raw: RawRow = serde_json::from_str(&line)
            .map_err(|e| bad(format!("not a pre-tokenized row: {e}")))?;
        rows.push(check_row(raw, vocab_size).map_err(bad)?);
    }
    if rows.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(rows)
}

fn check_row(raw: RawRow, vocab_size: usize) -> Result<TokenizedRow, String> {
    if raw.input_ids.is_empty() {
        return Err("input_ids is empty".into());
    }
    let in_vocab = |id: i64| id >= 0 && (id as u64) < vocab_size as u64;
    if let Some(id) = raw.input_ids.iter().find(|&&id| !in_vocab(id)) {
        return Err(format!(
            "input_ids holds token id {id}, outside the vocabulary [0, {vocab_size})"
        ));
    }
    let labels = match raw.labels {
        None => raw.input_ids.clone(),
        Some(labels) => {
            if labels.len() != raw.input_ids.len() {
                return Err(format!(
                    "labels has {} entries, input_ids {}",
                    labels.len(),
                    raw.input_ids.len()
                ));
            }
            if let Some(l) = labels.iter().find(|&&l| l != IGNORE_INDEX && !in_vocab(l)) {
                return Err(format!(
                    "labels holds {l}, neither -100 nor a token id in [0, {vocab_size})"
                ));
            }
            labels
        }
    };
    Ok(TokenizedRow {
        input_ids: raw.input_ids.into_iter().map(|id| id as u32).collect(),
        labels,
    })
}
