//! Dataset files: JSONL (one object a line), JSON (an array of objects) and Parquet (read record
//! batch by record batch; message lists are list<struct> columns), named by a file, a directory or
//! a glob, with ms-swift's `path#N` sampling and `data.columns` renaming. Rows are read lazily,
//! so a file never has to fit in memory unless it is a .json array; every row keeps where it came
//! from, for error messages.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use serde_json::{Map, Value};

use super::registry::{self, Prepare};
use super::{DataError, Location};
use crate::config::{DataSection, Hub};
use crate::hub::{data_files, dataset_snapshot, default_hub, is_data_file, HubEnv, HubId};

/// One entry of `data.train` / `data.val`: a file, directory or glob, or a dataset by hub id in
/// ms-swift's form `[hf::|ms::]org/name[:subset1/subset2]`, and ms-swift's `#N` (N rows sampled
/// from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSpec {
    pub pattern: String,
    pub sample: Option<usize>,
}

impl DatasetSpec {
    pub fn parse(spec: &str) -> Self {
        match spec.rsplit_once('#') {
            Some((pattern, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => Self {
                pattern: pattern.to_string(),
                sample: n.parse().ok(),
            },
            _ => Self {
                pattern: spec.to_string(),
                sample: None,
            },
        }
    }

    /// The dataset files it names, in sorted order within a directory or glob. A pattern that
    /// names nothing local and is spelled as a hub id is downloaded, from the hub its prefix
    /// names, else `hub`, else the default hub (`USE_HF`).
    pub fn files(&self, hub: Option<Hub>) -> Result<Vec<PathBuf>, DataError> {
        let path = Path::new(&self.pattern);
        let missing = |reason: &str| DataError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, reason.to_string()),
        };
        let mut files = if path.is_dir() {
            std::fs::read_dir(path)
                .map_err(|source| DataError::Io {
                    path: path.to_path_buf(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_data_file(p))
                .collect()
        } else if path.exists() {
            vec![path.to_path_buf()]
        } else if self.pattern.contains(['*', '?', '[']) {
            glob::glob(&self.pattern)
                .map_err(|e| missing(&format!("not a valid glob: {e}")))?
                .filter_map(Result::ok)
                .filter(|p| p.is_file() && is_data_file(p))
                .collect()
        } else if let Some(remote) = HubDataset::parse(&self.pattern) {
            remote.files(hub)?
        } else {
            return Err(missing("no such file or directory"));
        };
        files.sort();
        if files.is_empty() {
            return Err(missing("no .jsonl, .json, .csv or .parquet files here"));
        }
        Ok(files)
    }
}

/// ms-swift's `[hf::|ms::]org/name[:subset1/subset2]`.
struct HubDataset {
    hub: Option<Hub>,
    id: HubId,
    subsets: Vec<String>,
}

impl HubDataset {
    fn parse(pattern: &str) -> Option<Self> {
        // ms-swift's examples write the prefix in either case (`HF::linxy/LaTeX_OCR`).
        let (hub, rest) = match pattern.split_once("::") {
            Some((prefix, rest)) => match prefix.to_ascii_lowercase().as_str() {
                "hf" => (Some(Hub::HuggingFace), rest),
                "ms" => (Some(Hub::ModelScope), rest),
                _ => return None,
            },
            None => (None, pattern),
        };
        let (id, subsets) = match rest.split_once(':') {
            Some((id, subsets)) => (id, subsets.split('/').map(str::to_string).collect()),
            None => (rest, Vec::new()),
        };
        // `dir/train.jsonl` that is not there is a missing file, not a repo called train.jsonl.
        if hub.is_none() && is_data_file(Path::new(id)) {
            return None;
        }
        Some(Self {
            hub,
            id: HubId::parse(id)?,
            subsets,
        })
    }

    /// Its data files, downloaded: those of the train split in the repo, or in the subsets'
    /// folders (self-cognition's subsets are ways of making its rows, not folders).
    fn files(&self, hub: Option<Hub>) -> Result<Vec<PathBuf>, DataError> {
        let hub = self.hub.or(hub).unwrap_or_else(default_hub);
        let env = HubEnv::from_env(hub)?;
        let registered = registry::find(&self.id.repo);
        if let Some(r) = registered {
            // What cannot be made as ms-swift makes it is refused before any download.
            r.prepare(None, &[], &[])
                .map_err(|reason| DataError::Spec {
                    spec: self.to_string(),
                    reason,
                })?;
        }
        let id = match registered {
            Some(r) => HubId {
                repo: r.repo(hub).to_string(),
                revision: self.id.revision.clone(),
            },
            None => self.id.clone(),
        };
        let dir = dataset_snapshot(&env, &id)?;
        let mut roots = Vec::new();
        let folders = if registered.is_some_and(|r| r.makes_subsets()) {
            &[][..]
        } else {
            &self.subsets[..]
        };
        for subset in folders {
            let root = dir.join(subset);
            if subset.is_empty() || subset.contains("..") || !root.is_dir() {
                let folders: Vec<String> = std::fs::read_dir(&dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                return Err(DataError::Spec {
                    spec: self.to_string(),
                    reason: format!(
                        "{} has no subset {subset:?} (its folders: {})",
                        self.id,
                        folders.join(", ")
                    ),
                });
            }
            roots.push(root);
        }
        if roots.is_empty() {
            roots.push(dir);
        }
        let mut files = Vec::new();
        for root in roots {
            let found = data_files(&root);
            let relative: Vec<String> = found
                .iter()
                .map(|f| {
                    let rel = f.strip_prefix(&root).unwrap_or(f);
                    rel.to_string_lossy().replace('\\', "/")
                })
                .collect();
            let train = train_split(&relative).ok_or_else(|| DataError::Spec {
                spec: self.to_string(),
                reason: format!(
                    "{} has no train split (its files: {})",
                    self.id,
                    relative.join(", ")
                ),
            })?;
            files.extend(train.into_iter().map(|i| found[i].clone()));
        }
        Ok(files)
    }
}

impl std::fmt::Display for HubDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self.hub {
            Some(Hub::HuggingFace) => f.write_str("hf::")?,
            Some(Hub::ModelScope) => f.write_str("ms::")?,
            None => {}
        }
        write!(f, "{}", self.id)?;
        if !self.subsets.is_empty() {
            write!(f, ":{}", self.subsets.join("/"))?;
        }
        Ok(())
    }
}

/// The files (by index) of the train split, which ms-swift reads, as the `datasets` library
/// splits a repo without a loading script: by `data/{split}-00000-of-00001` shard names; else by a
/// folder named for the split (`train`, `training`, or these between `-._ 0-9`: `train-v2/`); else
/// by such a file name (`train.jsonl`, `alpaca_train.json`); else every file is the train split.
/// None when the files name splits but not the train split.
fn train_split(files: &[String]) -> Option<Vec<usize>> {
    const TRAIN: [&str; 2] = ["train", "training"];
    const OTHERS: [&str; 8] = [
        "validation",
        "valid",
        "dev",
        "val",
        "test",
        "testing",
        "eval",
        "evaluation",
    ];
    let sep = |c: char| "-._ ".contains(c) || c.is_ascii_digit();
    // `keyword[sep]*` or `*[sep]keyword[sep]*` within one path part; a folder may also be the
    // keyword alone, or end in `[sep]keyword`.
    let names = |part: &str, keyword: &str, whole: bool| {
        part.match_indices(keyword).any(|(at, _)| {
            let before = part[..at].chars().next_back();
            let after = part[at + keyword.len()..].chars().next();
            let starts = before.is_none_or(sep);
            match after {
                Some(c) => starts && sep(c),
                None => whole && starts,
            }
        })
    };
    let in_folder = |file: &str, keywords: &[&str]| {
        let parts: Vec<&str> = file.split('/').collect();
        parts[..parts.len() - 1]
            .iter()
            .any(|part| keywords.iter().any(|k| names(part, k, true)))
    };
    let in_name = |file: &str, keywords: &[&str]| {
        let name = file.rsplit('/').next().unwrap_or(file);
        keywords.iter().any(|k| names(name, k, false))
    };
    // The first way that finds splits at all decides.
    let by = |is_train: &dyn Fn(&str) -> bool, is_split: &dyn Fn(&str) -> bool| {
        if !files.iter().any(|f| is_split(f)) {
            return None;
        }
        let train: Vec<usize> = (0..files.len()).filter(|&i| is_train(&files[i])).collect();
        Some((!train.is_empty()).then_some(train))
    };
    fn shard_split(file: &str) -> Option<&str> {
        let name = file.strip_prefix("data/").filter(|n| !n.contains('/'))?;
        let (split, rest) = name.split_once('-')?;
        let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
        let shard =
            rest.len() > 14 && digits(&rest[..5]) && &rest[5..9] == "-of-" && digits(&rest[9..14]);
        shard.then_some(split)
    }
    by(&|f| shard_split(f) == Some("train"), &|f| {
        shard_split(f).is_some()
    })
    .or_else(|| {
        by(&|f| in_folder(f, &TRAIN), &|f| {
            in_folder(f, &TRAIN) || in_folder(f, &OTHERS)
        })
    })
    .or_else(|| {
        by(&|f| in_name(f, &TRAIN), &|f| {
            in_name(f, &TRAIN) || in_name(f, &OTHERS)
        })
    })
    .unwrap_or_else(|| Some((0..files.len()).collect()))
}

/// What a spec reads: its files, the column renames, and what is done to each row.
#[derive(Clone)]
pub struct SpecSource {
    pub files: Vec<PathBuf>,
    pub columns: BTreeMap<String, String>,
    pub prepare: Prepare,
}

impl DatasetSpec {
    /// Its files (downloaded, for a hub id) and how its rows are read: `data.columns` over a
    /// registered dataset's own renames, and a registered dataset's preprocessing.
    pub fn source(&self, data: &DataSection) -> Result<SpecSource, DataError> {
        let registered = HubDataset::parse(&self.pattern)
            .filter(|_| !Path::new(&self.pattern).exists())
            .and_then(|remote| Some((registry::find(&remote.id.repo)?, remote)));
        let mut columns = BTreeMap::new();
        let mut prepare = Prepare::AsRead;
        if let Some((registered, remote)) = registered {
            let subset = match remote.subsets.as_slice() {
                [] => None,
                [one] if registered.makes_subsets() => Some(one.as_str()),
                [_, _, ..] if registered.makes_subsets() => {
                    return Err(DataError::Spec {
                        spec: self.pattern.clone(),
                        reason: "name one subset of a registered dataset a spec (give several \
                                 specs)"
                            .into(),
                    })
                }
                _ => None,
            };
            prepare = registered
                .prepare(subset, &data.model_name, &data.model_author)
                .map_err(|reason| DataError::Spec {
                    spec: self.pattern.clone(),
                    reason,
                })?;
            columns.extend(registered.columns.clone());
        }
        columns.extend(data.columns.clone());
        Ok(SpecSource {
            files: self.files(data.hub)?,
            columns,
            prepare,
        })
    }
}

/// A row as read, before its format is detected.
#[derive(Debug, Clone)]
pub struct RawRow {
    pub path: Arc<Path>,
    pub at: Location,
    pub value: Value,
}

/// The rows of one file, lazily. A row that cannot be read (malformed JSON, invalid UTF-8) is an
/// `Err(DataError::BadRow)` and reading goes on; other errors end the file.
pub fn open_rows(
    path: &Path,
    columns: &BTreeMap<String, String>,
) -> Result<Box<dyn Iterator<Item = Result<RawRow, DataError>> + Send>, DataError> {
    let shared: Arc<Path> = Arc::from(path);
    let columns = columns.clone();
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let rows: Box<dyn Iterator<Item = Result<RawRow, DataError>> + Send> = match ext {
        "jsonl" => Box::new(JsonLines {
            reader: BufReader::new(File::open(path).map_err(io)?),
            path: shared,
            line: 0,
            columns,
            done: false,
        }),
        "json" => {
            let bytes = std::fs::read(path).map_err(io)?;
            let value: Value =
                serde_json::from_slice(without_bom(&bytes)).map_err(|e| DataError::BadRow {
                    path: path.to_path_buf(),
                    at: Location::Line(e.line()),
                    reason: format!("malformed JSON: {e}"),
                })?;
            let Value::Array(items) = value else {
                return Err(DataError::BadRow {
                    path: path.to_path_buf(),
                    at: Location::Line(1),
                    reason: "a .json dataset must be an array of rows".into(),
                });
            };
            Box::new(items.into_iter().enumerate().map(move |(i, v)| {
                Ok(RawRow {
                    path: shared.clone(),
                    at: Location::Row(i),
                    value: rename(v, &columns),
                })
            }))
        }
        "csv" => {
            let reader = csv::ReaderBuilder::new()
                .flexible(false)
                .from_reader(without_bom_reader(File::open(path).map_err(io)?).map_err(io)?);
            Box::new(CsvRows {
                reader,
                path: shared,
                columns,
                headers: None,
            })
        }
        "parquet" => {
            let parquet = |e: parquet::errors::ParquetError| DataError::Parquet {
                path: path.to_path_buf(),
                reason: e.to_string(),
            };
            let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).map_err(io)?)
                .map_err(parquet)?
                .with_batch_size(1024)
                .build()
                .map_err(parquet)?;
            Box::new(ParquetRows {
                reader,
                path: shared,
                columns,
                rows: Vec::new().into_iter(),
                next_row: 0,
                done: false,
            })
        }
        _ => {
            return Err(DataError::Unsupported {
                path: path.to_path_buf(),
            })
        }
    };
    Ok(rows)
}

/// Every row of a file; the first unreadable row stops the read. An empty file is an error.
pub fn read_rows(
    path: &Path,
    columns: &BTreeMap<String, String>,
) -> Result<Vec<(Location, Value)>, DataError> {
    let rows: Vec<_> = open_rows(path, columns)?
        .map(|r| r.map(|r| (r.at, r.value)))
        .collect::<Result<_, _>>()?;
    if rows.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(rows)
}

/// `bytes` without the UTF-8 byte-order mark that Windows editors (Notepad, Excel's "CSV UTF-8")
/// put at the start of a file; JSON itself has none.
fn without_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// `file` past a UTF-8 byte-order mark, if it opens with one.
fn without_bom_reader(mut file: File) -> std::io::Result<impl std::io::Read + Send> {
    use std::io::{Read, Seek, SeekFrom};
    let mut head = [0u8; 3];
    let n = file.read(&mut head)?;
    if head[..n] != *b"\xEF\xBB\xBF" {
        file.seek(SeekFrom::Start(0))?;
    }
    Ok(file)
}

/// The rows of a CSV file with a header line, as objects of text: an empty field is null, as the
/// Hugging Face datasets library reads it (so an empty alpaca `input` is no input).
struct CsvRows<R: std::io::Read> {
    reader: csv::Reader<R>,
    path: Arc<Path>,
    columns: BTreeMap<String, String>,
    headers: Option<Vec<String>>,
}

impl<R: std::io::Read> Iterator for CsvRows<R> {
    type Item = Result<RawRow, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let bad = |at: Location, reason: String| DataError::BadRow {
            path: self.path.to_path_buf(),
            at,
            reason,
        };
        if self.headers.is_none() {
            match self.reader.headers() {
                Ok(h) => self.headers = Some(h.iter().map(str::to_string).collect()),
                Err(e) => return Some(Err(bad(Location::Line(1), format!("bad CSV header: {e}")))),
            }
        }
        let mut record = csv::StringRecord::new();
        match self.reader.read_record(&mut record) {
            Ok(false) => None,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                Some(Err(bad(
                    Location::Line(line),
                    format!("malformed CSV: {e}"),
                )))
            }
            Ok(true) => {
                let line = record.position().map_or(0, |p| p.line() as usize);
                let headers = self.headers.as_deref().unwrap_or_default();
                let object: Map<String, Value> = headers
                    .iter()
                    .zip(record.iter())
                    .map(|(name, field)| {
                        let value = if field.is_empty() {
                            Value::Null
                        } else {
                            Value::String(field.to_string())
                        };
                        (name.clone(), value)
                    })
                    .collect();
                Some(Ok(RawRow {
                    path: self.path.clone(),
                    at: Location::Line(line),
                    value: rename(Value::Object(object), &self.columns),
                }))
            }
        }
    }
}

struct JsonLines {
    reader: BufReader<File>,
    path: Arc<Path>,
    line: usize,
    columns: BTreeMap<String, String>,
    done: bool,
}

impl Iterator for JsonLines {
    type Item = Result<RawRow, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut buf = Vec::new();
        while !self.done {
            buf.clear();
            self.line += 1;
            match self.reader.read_until(b'\n', &mut buf) {
                Ok(0) => self.done = true,
                Err(source) => {
                    self.done = true;
                    return Some(Err(DataError::Io {
                        path: self.path.to_path_buf(),
                        source,
                    }));
                }
                Ok(_) => {
                    let at = Location::Line(self.line);
                    let bad = |reason| DataError::BadRow {
                        path: self.path.to_path_buf(),
                        at,
                        reason,
                    };
                    let line = if self.line == 1 {
                        without_bom(&buf)
                    } else {
                        &buf
                    };
                    let text = match std::str::from_utf8(line) {
                        Ok(text) => text,
                        Err(e) => return Some(Err(bad(format!("invalid UTF-8: {e}")))),
                    };
                    if text.trim().is_empty() {
                        continue;
                    }
                    return Some(
                        serde_json::from_str(text.trim_end_matches(['\n', '\r']))
                            .map_err(|e| bad(json_error(&e)))
                            .map(|value| RawRow {
                                path: self.path.clone(),
                                at,
                                value: rename(value, &self.columns),
                            }),
                    );
                }
            }
        }
        None
    }
}

struct ParquetRows {
    reader: ParquetRecordBatchReader,
    path: Arc<Path>,
    columns: BTreeMap<String, String>,
    rows: std::vec::IntoIter<Result<Value, String>>,
    next_row: usize,
    done: bool,
}

impl Iterator for ParquetRows {
    type Item = Result<RawRow, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(row) = self.rows.next() {
                let at = Location::Row(self.next_row);
                self.next_row += 1;
                return Some(match row {
                    Ok(value) => Ok(RawRow {
                        path: self.path.clone(),
                        at,
                        value: rename(value, &self.columns),
                    }),
                    Err(reason) => Err(DataError::BadRow {
                        path: self.path.to_path_buf(),
                        at,
                        reason,
                    }),
                });
            }
            if self.done {
                return None;
            }
            match self.reader.next() {
                None => self.done = true,
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(DataError::Parquet {
                        path: self.path.to_path_buf(),
                        reason: e.to_string(),
                    }));
                }
                Some(Ok(batch)) => self.rows = batch_rows(&batch).into_iter(),
            }
        }
    }
}

/// The rows of a record batch as JSON objects, column name to value.
fn batch_rows(batch: &RecordBatch) -> Vec<Result<Value, String>> {
    let schema = batch.schema();
    (0..batch.num_rows())
        .map(|i| {
            let mut row = Map::new();
            for (field, column) in schema.fields().iter().zip(batch.columns()) {
                insert(&mut row, field.name(), json_of(column.as_ref(), i)?);
            }
            Ok(Value::Object(row))
        })
        .collect()
}

/// A Parquet null is an absent key: a file mixing row formats has every format's columns, null
/// where a row does not use them.
fn insert(object: &mut Map<String, Value>, key: &str, value: Value) {
    if !value.is_null() {
        object.insert(key.to_string(), value);
    }
}

/// Element `i` of an Arrow array as JSON: strings, numbers, booleans, lists and structs.
fn json_of(array: &dyn Array, i: usize) -> Result<Value, String> {
    if array.is_null(i) {
        return Ok(Value::Null);
    }
    macro_rules! number {
        ($t:ty) => {
            Value::from(array.as_primitive::<$t>().value(i))
        };
    }
    let list = |values: std::sync::Arc<dyn Array>| -> Result<Value, String> {
        (0..values.len())
            .map(|j| json_of(values.as_ref(), j))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array)
    };
    Ok(match array.data_type() {
        DataType::Utf8 => Value::from(array.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Value::from(array.as_string::<i64>().value(i)),
        DataType::Utf8View => Value::from(array.as_string_view().value(i)),
        DataType::Boolean => Value::from(array.as_boolean().value(i)),
        DataType::Int8 => number!(Int8Type),
        DataType::Int16 => number!(Int16Type),
        DataType::Int32 => number!(Int32Type),
        DataType::Int64 => number!(Int64Type),
        DataType::UInt8 => number!(UInt8Type),
        DataType::UInt16 => number!(UInt16Type),
        DataType::UInt32 => number!(UInt32Type),
        DataType::UInt64 => number!(UInt64Type),
        DataType::Float32 => number!(Float32Type),
        DataType::Float64 => number!(Float64Type),
        DataType::List(_) => list(array.as_list::<i32>().value(i))?,
        DataType::LargeList(_) => list(array.as_list::<i64>().value(i))?,
        DataType::FixedSizeList(..) => list(array.as_fixed_size_list().value(i))?,
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let mut object = Map::new();
            for (field, column) in fields.iter().zip(s.columns()) {
                insert(&mut object, field.name(), json_of(column.as_ref(), i)?);
            }
            Value::Object(object)
        }
        other => return Err(format!("unsupported Parquet column type {other}")),
    })
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

    /// The `datasets` library's answers (scripts/gen_train_split.py).
    #[test]
    fn the_train_split_is_the_one_datasets_picks() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train_split.json");
        let cases: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(cases.len() > 10);
        for case in cases {
            let files: Vec<String> = serde_json::from_value(case["files"].clone()).unwrap();
            let expected: Option<Vec<String>> =
                serde_json::from_value(case["train"].clone()).unwrap();
            let got = train_split(&files).map(|picked| {
                let mut names: Vec<String> = picked.into_iter().map(|i| files[i].clone()).collect();
                names.sort();
                names
            });
            assert_eq!(got, expected, "{files:?}");
        }
    }

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
    fn malformed_and_invalid_utf8_lines_are_named_and_reading_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("d.jsonl");
        std::fs::write(
            &jsonl,
            b"{\"text\": \n{\"text\": \"\xff\"}\n{\"text\": \"ok\"}\n",
        )
        .unwrap();
        let rows: Vec<_> = open_rows(&jsonl, &BTreeMap::new()).unwrap().collect();
        assert_eq!(rows.len(), 3);
        let err = |i: usize| match &rows[i] {
            Err(e) => e.to_string(),
            Ok(_) => panic!("row {i} read"),
        };
        assert!(err(0).contains("d.jsonl:1: malformed JSON"), "{}", err(0));
        assert!(err(1).contains("d.jsonl:2: invalid UTF-8"), "{}", err(1));
        assert_eq!(rows[2].as_ref().unwrap().value["text"], "ok");
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

    #[test]
    fn a_byte_order_mark_at_the_start_of_a_file_is_not_malformed_json() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("bom.jsonl");
        std::fs::write(
            &jsonl,
            b"\xEF\xBB\xBF{\"text\": \"a\"}\n{\"text\": \"b\"}\n",
        )
        .unwrap();
        let rows = read_rows(&jsonl, &BTreeMap::new()).unwrap();
        assert_eq!((rows[0].1["text"].as_str(), rows.len()), (Some("a"), 2));
        let json = dir.path().join("bom.json");
        std::fs::write(&json, b"\xEF\xBB\xBF[{\"text\": \"x\"}]").unwrap();
        assert_eq!(
            read_rows(&json, &BTreeMap::new()).unwrap()[0].1["text"],
            "x"
        );
        // Only at the start: elsewhere it is a character JSON does not allow between values.
        std::fs::write(
            &jsonl,
            b"{\"text\": \"a\"}\n\xEF\xBB\xBF{\"text\": \"b\"}\n",
        )
        .unwrap();
        let second = open_rows(&jsonl, &BTreeMap::new()).unwrap().nth(1).unwrap();
        assert!(second.is_err());
    }

    #[test]
    fn csv_rows_are_objects_of_their_header_with_lines_named() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("d.csv");
        std::fs::write(
            &csv,
            "\u{feff}instruction,input,output\nSay hi,,\"Hi, there\"\n\"Two\nlines\",x,y\nshort,row\n",
        )
        .unwrap();
        let rows: Vec<_> = open_rows(&csv, &BTreeMap::new()).unwrap().collect();
        let first = rows[0].as_ref().unwrap();
        assert_eq!(first.value["instruction"], "Say hi");
        assert!(first.value["input"].is_null());
        assert_eq!(first.value["output"], "Hi, there");
        assert_eq!(rows[1].as_ref().unwrap().value["instruction"], "Two\nlines");
        let err = rows[2].as_ref().unwrap_err().to_string();
        assert!(err.contains("d.csv:5: malformed CSV"), "{err}");
    }

    #[test]
    fn specs_name_files_directories_and_globs() {
        assert_eq!(
            DatasetSpec::parse("a/b.jsonl#500"),
            DatasetSpec {
                pattern: "a/b.jsonl".into(),
                sample: Some(500)
            }
        );
        assert_eq!(DatasetSpec::parse("a#b.jsonl").sample, None);
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.jsonl", "a.json", "c.parquet", "notes.txt"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let names = |spec: &str| -> Vec<String> {
            DatasetSpec::parse(spec)
                .files(None)
                .unwrap()
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        let root = dir.path().display().to_string();
        assert_eq!(names(&root), ["a.json", "b.jsonl", "c.parquet"]);
        assert_eq!(names(&format!("{root}/*.json*")), ["a.json", "b.jsonl"]);
        let err = DatasetSpec::parse(&format!("{root}/*.csv"))
            .files(None)
            .unwrap_err();
        assert!(err.to_string().contains("no .jsonl"), "{err}");
        let err = DatasetSpec::parse(&format!("{root}/nope.jsonl"))
            .files(None)
            .unwrap_err();
        assert!(err.to_string().contains("nope.jsonl"), "{err}");
    }
}
