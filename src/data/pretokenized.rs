//! Pre-tokenized rows for `eval`: `{"input_ids": [...], "labels": [...]}`; `labels` is optional
//! (the input ids are the labels then), -100 marks tokens that take no loss.

use std::collections::BTreeMap;
use std::path::Path;

use super::format::{parse_row, Row};
use super::source::read_rows;
use super::DataError;
use crate::model::IGNORE_INDEX;

#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedRow {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// Reads every row of a JSONL or JSON file, checking each id against `vocab_size`; the first bad
/// row stops the read with its location.
pub fn read_pretokenized(path: &Path, vocab_size: usize) -> Result<Vec<TokenizedRow>, DataError> {
    read_rows(path, &BTreeMap::new())?
        .into_iter()
        .map(|(at, value)| {
            let row = match parse_row(&value) {
                Ok(Row::Tokenized { input_ids, labels }) => {
                    check_ids(input_ids, labels, vocab_size)
                }
                Ok(_) => Err("eval reads pre-tokenized rows (input_ids, optional labels)".into()),
                Err(e) => Err(e),
            };
            row.map_err(|reason| DataError::BadRow {
                path: path.to_path_buf(),
                at,
                reason,
            })
        })
        .collect()
}

fn check_ids(
    input_ids: Vec<i64>,
    labels: Option<Vec<i64>>,
    vocab_size: usize,
) -> Result<TokenizedRow, String> {
    check_tokenized(&input_ids, labels.as_deref(), vocab_size)?;
    Ok(TokenizedRow {
        labels: labels.unwrap_or_else(|| input_ids.clone()),
        input_ids: input_ids.into_iter().map(|id| id as u32).collect(),
    })
}

/// Every id of a pre-tokenized row in `[0, vocab_size)` and every label -100 or such an id:
/// checked before any tensor is built, where an id past the embedding would panic in a gather.
pub(super) fn check_tokenized(
    input_ids: &[i64],
    labels: Option<&[i64]>,
    vocab_size: usize,
) -> Result<(), String> {
    let in_vocab = |id: i64| id >= 0 && (id as u64) < vocab_size as u64;
    in_vocabulary("input_ids", input_ids.iter().copied(), vocab_size)?;
    let labels = labels.unwrap_or(input_ids);
    if let Some(l) = labels.iter().find(|&&l| l != IGNORE_INDEX && !in_vocab(l)) {
        return Err(format!(
            "labels holds {l}, neither -100 nor a token id in [0, {vocab_size})"
        ));
    }
    Ok(())
}

/// Every id of the row's field `field` in `[0, vocab_size)`.
pub(super) fn in_vocabulary(
    field: &str,
    mut ids: impl Iterator<Item = i64>,
    vocab_size: usize,
) -> Result<(), String> {
    match ids.find(|&id| id < 0 || id as u64 >= vocab_size as u64) {
        Some(id) => Err(format!(
            "{field} holds token id {id}, outside the vocabulary [0, {vocab_size})"
        )),
        None => Ok(()),
    }
}
