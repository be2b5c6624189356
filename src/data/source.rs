//! Dataset files: JSONL (one object a line) and JSON (an array of objects), with `data.columns`
//! renaming. Every row keeps where it came from, for error messages.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::Value;

use super::{DataError, Location};

/// Reads every row of a .jsonl or .json file, renaming columns (`from` -> `to`).
pub fn read_rows(
    path: &Path,
    columns: &BTreeMap<String, String>,
) -> Result<Vec<(Location, Value)>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |at: Location, reason: String| DataError::BadRow {
        path: path.to_path_buf(),
        at,
        reason,
    };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let mut rows = Vec::new();
    match ext {
        "jsonl" => {
            let mut reader = BufReader::new(std::fs::File::open(path).map_err(io)?);
            let mut buf = Vec::new();
            for line in 1.. {
                buf.clear();
                if reader.read_until(b'\n', &mut buf).map_err(io)? == 0 {
                    break;
                }
                let text = std::str::from_utf8(&buf)
                    .map_err(|e| bad(Location::Line(line), format!("invalid UTF-8: {e}")))?;
                if text.trim().is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(text.trim_end_matches(['\n', '\r']))
                    .map_err(|e| bad(Location::Line(line), json_error(&e)))?;
                rows.push((Location::Line(line), rename(value, columns)));
            }
        }
        "json" => {
            let bytes = std::fs::read(path).map_err(io)?;
            let value: Value = serde_json::from_slice(&bytes)
                .map_err(|e| bad(Location::Line(e.line()), format!("malformed JSON: {e}")))?;
            let Value::Array(items) = value else {
                return Err(bad(
                    Location::Line(1),
                    "a .json dataset must be an array of rows".into(),
                ));
            };
            rows.extend(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| (Location::Row(i), rename(v, columns))),
            );
        }
        _ => {
            return Err(DataError::Unsupported {
                path: path.to_path_buf(),
            })
        }
    }
    if rows.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(rows)
}

/// serde_json's message with the column of the file's line, not its own line count.
fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let message = text
        .rsplit_once(" at line ")
        .map_or(text.as_str(), |(m, _)| m);
    format!("malformed JSON at column {}: {message}", e.column())
}

fn rename(mut value: Value, columns: &BTreeMap<String, String>) -> Value {
    if let Value::Object(obj) = &mut value {
        for (from, to) in columns {
            if let Some(v) = obj.remove(from) {
                obj.insert(to.clone(), v);
            }
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_and_json_rows_with_locations_and_renamed_columns() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("d.jsonl");
        std::fs::write(&jsonl, "{\"q\": \"a\"}\n\n{\"q\": \"b\"}\n").unwrap();
        let columns = BTreeMap::from([("q".to_string(), "query".to_string())]);
        let rows = read_rows(&jsonl, &columns).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].0, Location::Line(3));
        assert_eq!(rows[1].1["query"], "b");
        let json = dir.path().join("d.json");
        std::fs::write(&json, "[{\"text\": \"x\"}, {\"text\": \"y\"}]").unwrap();
        let rows = read_rows(&json, &BTreeMap::new()).unwrap();
        assert_eq!(rows[1].0, Location::Row(1));
    }

    #[test]
    fn malformed_and_invalid_utf8_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("d.jsonl");
        std::fs::write(&jsonl, "{\"text\": \"ok\"}\n{\"text\": \n").unwrap();
        let err = read_rows(&jsonl, &BTreeMap::new()).unwrap_err().to_string();
        assert!(err.contains("d.jsonl:2: malformed JSON"), "{err}");
        std::fs::write(&jsonl, b"{\"text\": \"ok\"}\n{\"text\": \"\xff\"}\n").unwrap();
        let err = read_rows(&jsonl, &BTreeMap::new()).unwrap_err().to_string();
        assert!(err.contains("d.jsonl:2: invalid UTF-8"), "{err}");
        std::fs::write(&jsonl, "\n").unwrap();
        assert!(read_rows(&jsonl, &BTreeMap::new())
            .unwrap_err()
            .to_string()
            .contains("holds no rows"));
        let csv = dir.path().join("d.csv");
        std::fs::write(&csv, "a,b").unwrap();
        assert!(read_rows(&csv, &BTreeMap::new())
            .unwrap_err()
            .to_string()
            .contains("d.csv"));
    }
}
