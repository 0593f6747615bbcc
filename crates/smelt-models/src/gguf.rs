//! GGUF files (versions 2 and 3): header, metadata, tensor table and data, validated before use.
//!
//! Every count, length and offset read from the file is checked against the bytes that remain,
//! so a truncated or hostile file gives a [`ModelError::BadGguf`] naming what is wrong, never a
//! panic or an allocation larger than the file.

use crate::error::{ModelError, Result};
use crate::fsutil::write_atomic;
use crate::quant::{GgmlType, QMatrix};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// GGML tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays nested deeper than this are refused (real files nest at most once).
const MAX_DEPTH: usize = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short rendering for listings: long strings and arrays are abbreviated.
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) => {
                let one_line = s.replace('\n', "\\n");
                if one_line.chars().count() > 60 {
                    let head: String = one_line.chars().take(57).collect();
                    format!("{head:?}... ({} bytes)", s.len())
                } else {
                    format!("{one_line:?}")
                }
            }
            Value::Array(a) => {
                let head: Vec<String> = a.iter().take(4).map(Value::summary).collect();
                let more = if a.len() > 4 { ", ..." } else { "" };
                format!("[{}{}] ({} items)", head.join(", "), more, a.len())
            }
            Value::F32(v) => format!("{v}"),
            Value::F64(v) => format!("{v}"),
            Value::Bool(v) => format!("{v}"),
            other => format!("{}", other.as_i64().unwrap_or_default()),
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF lists them: innermost (contiguous) first.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the file.
    pub offset: usize,
    pub bytes: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// `(rows, cols)` of a matrix: `cols` is the contiguous dimension.
    pub fn matrix_shape(&self) -> (usize, usize) {
        let cols = self.dims.first().copied().unwrap_or(1);
        (self.elements() / cols.max(1), cols)
    }
}

/// A GGUF file read into memory.
pub struct GgufFile {
    path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    bytes: Vec<u8>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "{what} at byte {} needs {n} bytes, but the file ends after {} more \
                 (truncated file?)",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(format!(
                "{what} at byte {at} claims {len} bytes, longer than the rest of the file ({})",
                self.remaining()
            ));
        }
        let b = self.take(len as usize, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} at byte {at} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.take(1, what)?[0]),
            1 => Value::I8(self.take(1, what)?[0] as i8),
            2 => {
                let b = self.take(2, what)?;
                Value::U16(u16::from_le_bytes([b[0], b[1]]))
            }
            3 => {
                let b = self.take(2, what)?;
                Value::I16(i16::from_le_bytes([b[0], b[1]]))
            }
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.take(1, what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what}: boolean byte {b}, expected 0 or 1")),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{what}: arrays nested more than {MAX_DEPTH} deep"));
                }
                let at = self.pos;
                let elem = self.u32(what)?;
                let count = self.u64(what)?;
                let min_size: u64 = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(format!(
                            "{what} at byte {at}: unknown array element type {other}"
                        ))
                    }
                };
                if count.saturating_mul(min_size) > self.remaining() as u64 {
                    return Err(format!(
                        "{what} at byte {at} claims {count} elements, more than the rest of the \
                         file can hold"
                    ));
                }
                // Capacity grows with what is actually read: a value takes more memory than
                // its encoding, so `count` alone could ask for many times the file's size.
                let mut items = Vec::with_capacity((count as usize).min(1 << 16));
                for _ in 0..count {
                    items.push(self.value(elem, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            other => return Err(format!("{what}: unknown value type {other}")),
        })
    }
}

impl GgufFile {
    /// Reads and validates a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_bytes(path, bytes)
    }

    /// Parses GGUF `bytes`; `path` is used in error messages.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let bad = |message: String| ModelError::BadGguf {
            path: path.to_path_buf(),
            message,
        };
        let mut r = Reader {
            bytes: &bytes,
            pos: 0,
        };
        let magic = r.take(4, "magic").map_err(bad)?;
        if magic != MAGIC {
            return Err(bad(format!(
                "does not start with the GGUF magic (found {:?})",
                String::from_utf8_lossy(magic)
            )));
        }
        let version = r.u32("version").map_err(bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "GGUF version {version}; smelt reads versions 2 and 3"
            )));
        }
        let tensor_count = r.u64("tensor count").map_err(bad)?;
        let kv_count = r.u64("metadata count").map_err(bad)?;
        // Each metadata entry takes at least 13 bytes, each tensor entry at least 24.
        if kv_count.saturating_mul(13) > r.remaining() as u64 {
            return Err(bad(format!(
                "claims {kv_count} metadata entries, more than the file can hold (truncated file?)"
            )));
        }
        if tensor_count.saturating_mul(24) > r.remaining() as u64 {
            return Err(bad(format!(
                "claims {tensor_count} tensors, more than the file can hold (truncated file?)"
            )));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&format!("metadata key {i}")).map_err(bad)?;
            let ty = r.u32(&format!("type of `{key}`")).map_err(bad)?;
            let value = r.value(ty, &format!("value of `{key}`"), 0).map_err(bad)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(bad(format!("metadata key `{key}` appears twice")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(bad(format!(
                        "general.alignment is {}, expected a power of two",
                        v.summary()
                    )))
                }
            },
        };
        let mut raw = Vec::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let name = r.string(&format!("name of tensor {i}")).map_err(bad)?;
            let n_dims = r
                .u32(&format!("dimension count of `{name}`"))
                .map_err(bad)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad(format!(
                    "tensor `{name}` has {n_dims} dimensions, expected 1 to {MAX_DIMS}"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = r.u64(&format!("dimensions of `{name}`")).map_err(bad)?;
                dims.push(d);
            }
            let type_id = r.u32(&format!("type of `{name}`")).map_err(bad)?;
            let offset = r.u64(&format!("offset of `{name}`")).map_err(bad)?;
            raw.push((name, dims, type_id, offset));
        }
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut names = std::collections::HashSet::new();
        for (name, dims, type_id, offset) in raw {
            if !names.insert(name.clone()) {
                return Err(bad(format!("tensor `{name}` appears twice")));
            }
            let ty = GgmlType::from_id(type_id).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has GGML type {type_id}, which smelt does not read \
                     (supported: {})",
                    GgmlType::ALL.map(|t| t.name()).join(", ")
                ))
            })?;
            let elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&e| e <= file_len.saturating_mul(8))
                .ok_or_else(|| {
                    bad(format!(
                        "tensor `{name}` has dimensions {dims:?}, too large for the file"
                    ))
                })?;
            if dims[0] % ty.block_size() as u64 != 0 {
                return Err(bad(format!(
                    "tensor `{name}` of type {} has a row of {} values, not a multiple of the \
                     block size {}",
                    ty.name(),
                    dims[0],
                    ty.block_size()
                )));
            }
            let size = elements / ty.block_size() as u64 * ty.type_size() as u64;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "tensor `{name}` starts at data offset {offset}, not a multiple of the \
                     alignment {alignment}"
                )));
            }
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(size));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_len => tensors.push(TensorInfo {
                    name,
                    dims: dims.iter().map(|&d| d as usize).collect(),
                    ty,
                    offset: start as usize,
                    bytes: size as usize,
                }),
                _ => {
                    return Err(bad(format!(
                        "tensor `{name}` ({size} bytes at data offset {offset}) lies outside \
                         the file ({file_len} bytes; truncated file?)"
                    )))
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.bytes[info.offset..info.offset + info.bytes]
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        }
    }

    /// Tensor `name` as a matrix in its stored encoding, checked to be `[rows, cols]`.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
        let info = self.tensor_info(name).ok_or_else(|| self.missing(name))?;
        if info.matrix_shape() != (rows, cols) || info.dims.len() > 2 {
            return Err(ModelError::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                expected: vec![rows, cols],
                found: info.dims.iter().rev().copied().collect(),
            });
        }
        QMatrix::new(info.ty, rows, cols, self.tensor_bytes(info).to_vec()).ok_or_else(|| {
            ModelError::BadGguf {
                path: self.path.clone(),
                message: format!("tensor `{name}` has the wrong number of bytes"),
            }
        })
    }

    /// Tensor `name` dequantized to f32, checked to have `len` elements.
    pub fn f32(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let info = self.tensor_info(name).ok_or_else(|| self.missing(name))?;
        if info.elements() != len {
            return Err(ModelError::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                expected: vec![len],
                found: info.dims.iter().rev().copied().collect(),
            });
        }
        Ok(crate::quant::dequantize(info.ty, self.tensor_bytes(info)))
    }

    /// A required metadata value, converted by `get`; the error names the key and what was
    /// expected.
    pub fn require<T>(
        &self,
        key: &str,
        expected: &str,
        get: impl Fn(&Value) -> Option<T>,
    ) -> Result<T> {
        let config = |message: String| ModelError::Config {
            path: self.path.clone(),
            field: key.to_string(),
            message,
        };
        let v = self
            .metadata
            .get(key)
            .ok_or_else(|| config(format!("missing; expected {expected}")))?;
        get(v).ok_or_else(|| config(format!("is {}, expected {expected}", v.summary())))
    }
}

/// A tensor to write into a GGUF file.
pub struct GgufTensor {
    pub name: String,
    /// Innermost dimension first, as GGUF stores them.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

/// Serialises a GGUF version 3 file.
pub fn gguf_bytes(metadata: &[(String, Value)], tensors: &[GgufTensor]) -> Vec<u8> {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(s) => put_str(out, s),
            Value::Array(items) => {
                let elem = items.first().map(Value::type_id).unwrap_or(4);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    put_value(out, item);
                }
            }
        }
    }
    let align = DEFAULT_ALIGNMENT as usize;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for &d in &t.dims {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&t.ty.id().to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.data.len().div_ceil(align) * align;
    }
    out.resize(out.len().div_ceil(align) * align, 0);
    for t in tensors {
        out.extend_from_slice(&t.data);
        out.resize(out.len().div_ceil(align) * align, 0);
    }
    out
}

/// Writes a GGUF file atomically.
pub fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[GgufTensor]) -> Result<()> {
    write_atomic(path, &gguf_bytes(metadata, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize;

    fn sample() -> Vec<u8> {
        let w: Vec<f32> = (0..64).map(|i| i as f32 / 10.0 - 3.0).collect();
        gguf_bytes(
            &[
                ("general.architecture".into(), Value::String("llama".into())),
                (
                    "tokenizer.ggml.tokens".into(),
                    Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
                ),
                ("x.count".into(), Value::U32(7)),
            ],
            &[GgufTensor {
                name: "w".into(),
                dims: vec![32, 2],
                ty: GgmlType::Q8_0,
                data: quantize(GgmlType::Q8_0, &w).unwrap(),
            }],
        )
    }

    #[test]
    fn round_trip() {
        let f = GgufFile::from_bytes(Path::new("t.gguf"), sample()).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.get("x.count").and_then(Value::as_u64), Some(7));
        assert_eq!(
            f.get("tokenizer.ggml.tokens")
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            2
        );
        let m = f.matrix("w", 2, 32).unwrap();
        let v = m.dequantize();
        assert!((v[63] - 3.3).abs() < 0.02, "{}", v[63]);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        for cut in 0..bytes.len() - 1 {
            let r = GgufFile::from_bytes(Path::new("t.gguf"), bytes[..cut].to_vec());
            // The last tensor's padding is not data: cuts inside it may still parse.
            if let Ok(f) = r {
                let t = &f.tensors[0];
                assert!(t.offset + t.bytes <= cut);
            }
        }
    }
}

#[cfg(test)]
mod malformed {
    use super::*;

    fn header(version: u32, tensors: u64, kvs: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&tensors.to_le_bytes());
        b.extend_from_slice(&kvs.to_le_bytes());
        b
    }

    fn put_str(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }

    fn tensor_entry(b: &mut Vec<u8>, name: &str, dims: &[u64], ty: u32, offset: u64) {
        put_str(b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
    }

    fn err(bytes: Vec<u8>) -> String {
        match GgufFile::from_bytes(Path::new("bad.gguf"), bytes) {
            Ok(_) => panic!("malformed file accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        assert!(err(b"GGML\x03\0\0\0".to_vec()).contains("magic"));
        assert!(err(header(1, 0, 0)).contains("version 1"));
        assert!(err(header(3, u64::MAX, 0)).contains("tensors, more than the file"));
        assert!(err(header(3, 0, u64::MAX)).contains("metadata entries"));

        // A metadata string claiming more bytes than the file holds.
        let mut b = header(3, 0, 1);
        put_str(&mut b, "general.name");
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(err(b).contains("longer than the rest of the file"));

        // An array claiming 2^60 elements.
        let mut b = header(3, 0, 1);
        put_str(&mut b, "tokens");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(err(b).contains("elements"));

        // Unknown value type.
        let mut b = header(3, 0, 1);
        put_str(&mut b, "x");
        b.extend_from_slice(&99u32.to_le_bytes());
        assert!(err(b).contains("unknown value type 99"));

        // Absurd dimension count, unknown tensor type, huge dims, data outside the file.
        let mut b = header(3, 1, 0);
        tensor_entry(&mut b, "w", &[1, 2, 3, 4, 5, 6, 7], 0, 0);
        assert!(err(b).contains("7 dimensions"));
        let mut b = header(3, 1, 0);
        tensor_entry(&mut b, "w", &[32], 77, 0);
        assert!(err(b).contains("GGML type 77"));
        let mut b = header(3, 1, 0);
        tensor_entry(&mut b, "w", &[1 << 40, 1 << 40], 0, 0);
        assert!(err(b).contains("too large"));
        let mut b = header(3, 1, 0);
        tensor_entry(&mut b, "w", &[32, 2], 0, 0);
        assert!(err(b).contains("outside the file"));
        let mut b = header(3, 1, 0);
        tensor_entry(&mut b, "w", &[33], 8, 0);
        assert!(err(b).contains("block size 32"));
        let mut b = header(3, 1, 0);
        tensor_entry(&mut b, "w", &[8], 0, 3);
        b.resize(256, 0);
        assert!(err(b).contains("alignment"));
    }

    #[test]
    fn random_damage_never_panics() {
        // A deterministic stand-in for the fuzz target (fuzz/fuzz_targets/gguf.rs): flip,
        // overwrite and cut bytes of a valid file; every outcome must be Ok or a clean error.
        let w: Vec<f32> = (0..128).map(|i| i as f32).collect();
        let good = gguf_bytes(
            &[
                ("general.architecture".into(), Value::String("llama".into())),
                ("a".into(), Value::Array(vec![Value::U32(1), Value::U32(2)])),
            ],
            &[GgufTensor {
                name: "t".into(),
                dims: vec![32, 4],
                ty: GgmlType::Q4_1,
                data: crate::quant::quantize(GgmlType::Q4_1, &w).unwrap(),
            }],
        );
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..4000 {
            let mut b = good.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % b.len();
                b[at] = next() as u8;
            }
            if next() % 3 == 0 {
                b.truncate((next() as usize) % b.len());
            }
            if let Ok(f) = GgufFile::from_bytes(Path::new("fuzz.gguf"), b) {
                for t in &f.tensors {
                    assert!(t.offset + t.bytes <= f.bytes.len());
                    let _ = crate::quant::dequantize(t.ty, f.tensor_bytes(t));
                }
            }
        }
    }
}
