//! The GGUF container (version 3), as ggml's `gguf.cpp` reads and writes it: a header of typed
//! key/value pairs and tensor descriptions, then each tensor's bytes at an aligned offset.

use std::io::{BufWriter, Write};
use std::path::Path;

use super::quants::GgmlType;
use crate::export::{ExportError, StagedDir};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
/// `general.alignment`'s default; this writer never sets another.
pub const ALIGNMENT: usize = 32;

/// A metadata value, with GGUF's own type codes.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// The elements' type code (so that an empty array has one), and the elements.
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_code(&self) -> u32 {
        match self {
            Self::U8(_) => 0,
            Self::I8(_) => 1,
            Self::U16(_) => 2,
            Self::I16(_) => 3,
            Self::U32(_) => 4,
            Self::I32(_) => 5,
            Self::F32(_) => 6,
            Self::Bool(_) => 7,
            Self::Str(_) => 8,
            Self::Array(..) => 9,
            Self::U64(_) => 10,
            Self::I64(_) => 11,
            Self::F64(_) => 12,
        }
    }

    /// An array of strings.
    pub fn strings(items: impl IntoIterator<Item = String>) -> Self {
        Self::Array(8, items.into_iter().map(Self::Str).collect())
    }

    /// An array of i32.
    pub fn i32s(items: impl IntoIterator<Item = i32>) -> Self {
        Self::Array(5, items.into_iter().map(Self::I32).collect())
    }

    fn write_payload(&self, out: &mut Vec<u8>) {
        match self {
            Self::U8(v) => out.push(*v),
            Self::I8(v) => out.extend(v.to_le_bytes()),
            Self::U16(v) => out.extend(v.to_le_bytes()),
            Self::I16(v) => out.extend(v.to_le_bytes()),
            Self::U32(v) => out.extend(v.to_le_bytes()),
            Self::I32(v) => out.extend(v.to_le_bytes()),
            Self::F32(v) => out.extend(v.to_le_bytes()),
            Self::Bool(v) => out.push(u8::from(*v)),
            Self::Str(s) => write_str(out, s),
            Self::Array(code, items) => {
                out.extend(code.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    item.write_payload(out);
                }
            }
            Self::U64(v) => out.extend(v.to_le_bytes()),
            Self::I64(v) => out.extend(v.to_le_bytes()),
            Self::F64(v) => out.extend(v.to_le_bytes()),
        }
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// One tensor of the file: its name, its shape in torch's order (outermost first; GGUF stores the
/// reverse, innermost first), and its storage type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorInfo {
    /// Bytes of the tensor's data (rows of `shape`'s last dimension, each whole blocks).
    pub fn bytes(&self) -> usize {
        let row = *self.shape.last().expect("tensors have a dimension");
        let rows: usize = self.shape[..self.shape.len() - 1].iter().product();
        rows * self.ty.row_bytes(row)
    }
}

fn padding(n: usize) -> usize {
    (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT
}

/// Writes `path` whole or not at all: the header, then each tensor's bytes as `data` gives them,
/// in `tensors`' order, one tensor in memory at a time. The file is written in a staged
/// directory beside `path` (removed on a signal, or by the next export there after a kill) and
/// renamed into place at the end.
pub fn write<E: From<ExportError>>(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorInfo],
    mut data: impl FnMut(&TensorInfo) -> Result<Vec<u8>, E>,
) -> Result<u64, E> {
    let mut header = Vec::new();
    header.extend(MAGIC);
    header.extend(VERSION.to_le_bytes());
    header.extend((tensors.len() as u64).to_le_bytes());
    header.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_str(&mut header, key);
        header.extend(value.type_code().to_le_bytes());
        value.write_payload(&mut header);
    }
    let mut offset = 0;
    for t in tensors {
        write_str(&mut header, &t.name);
        header.extend((t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            header.extend((d as u64).to_le_bytes());
        }
        header.extend(t.ty.id().to_le_bytes());
        header.extend((offset as u64).to_le_bytes());
        offset += t.bytes() + padding(t.bytes());
    }
    header.resize(header.len() + padding(header.len()), 0);

    let io = |e: std::io::Error| ExportError::Write {
        path: path.to_path_buf(),
        source: e,
    };
    const NAME: &str = "model.gguf";
    let staged = StagedDir::new(path)?;
    let mut file = BufWriter::new(std::fs::File::create(staged.path().join(NAME)).map_err(io)?);
    file.write_all(&header).map_err(io)?;
    for t in tensors {
        let bytes = data(t)?;
        assert_eq!(
            bytes.len(),
            t.bytes(),
            "{}: bytes for its shape and type",
            t.name
        );
        file.write_all(&bytes).map_err(io)?;
        file.write_all(&[0; ALIGNMENT][..padding(bytes.len())])
            .map_err(io)?;
    }
    file.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
    staged.commit_file(NAME)?;
    Ok((header.len() + offset) as u64)
}

/// A GGUF file read whole: what `write` wrote, and the bytes of each tensor.
#[derive(Debug)]
pub struct Gguf {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<(TensorInfo, Vec<u8>)>,
}

impl Gguf {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&(TensorInfo, Vec<u8>)> {
        self.tensors.iter().find(|(t, _)| t.name == name)
    }

    /// Reads a GGUF version 3 file with the default alignment.
    pub fn read(path: &Path) -> Result<Self, ExportError> {
        let bytes = std::fs::read(path).map_err(|source| ExportError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| ExportError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let mut r = Reader {
            bytes: &bytes,
            at: 0,
        };
        if r.take(4).map_err(&invalid)? != MAGIC {
            return Err(invalid("not a GGUF file (no GGUF magic)".into()));
        }
        let version = r.u32().map_err(&invalid)?;
        if version != VERSION {
            return Err(invalid(format!("GGUF version {version}, not {VERSION}")));
        }
        let n_tensors = r.u64().map_err(&invalid)?;
        let n_kv = r.u64().map_err(&invalid)?;
        let mut metadata = Vec::new();
        for _ in 0..n_kv {
            let key = r.string().map_err(&invalid)?;
            let code = r.u32().map_err(&invalid)?;
            let value = r.value(code).map_err(&invalid)?;
            if key == "general.alignment" && value != Value::U32(ALIGNMENT as u32) {
                return Err(invalid(format!(
                    "general.alignment {value:?} is not read here"
                )));
            }
            metadata.push((key, value));
        }
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string().map_err(&invalid)?;
            let n_dims = r.u32().map_err(&invalid)?;
            let mut shape = (0..n_dims)
                .map(|_| r.u64().map(|d| d as usize))
                .collect::<Result<Vec<_>, _>>()
                .map_err(&invalid)?;
            shape.reverse();
            let id = r.u32().map_err(&invalid)?;
            let ty = GgmlType::from_id(id).ok_or_else(|| {
                invalid(format!("tensor {name}: ggml type {id} is not read here"))
            })?;
            let offset = r.u64().map_err(&invalid)? as usize;
            infos.push((TensorInfo { name, shape, ty }, offset));
        }
        let start = r.at + padding(r.at);
        let mut tensors = Vec::new();
        for (info, offset) in infos {
            let (from, to) = (start + offset, start + offset + info.bytes());
            let data = bytes
                .get(from..to)
                .ok_or_else(|| invalid(format!("tensor {} runs past the end", info.name)))?
                .to_vec();
            tensors.push((info, data));
        }
        Ok(Self { metadata, tensors })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let slice = self
            .bytes
            .get(self.at..self.at + n)
            .ok_or_else(|| format!("the header ends early, at byte {}", self.at))?;
        self.at += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| e.to_string())
    }

    fn value(&mut self, code: u32) -> Result<Value, String> {
        Ok(match code {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let code = self.u32()?;
                let n = self.u64()?;
                let items = (0..n)
                    .map(|_| self.value(code))
                    .collect::<Result<Vec<_>, _>>()?;
                Value::Array(code, items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            _ => return Err(format!("unknown value type {code}")),
        })
    }
}
