//! A small GGUF v3 reader: metadata of every value type, tensor infos, and tensors as `f32`
//! (the types and their dequantization live with the kernels: [`crosslm_sdk::quant::ggml`]).
//!
//! [`Gguf::open`] reads the header and leaves the tensor data on disk: a tensor's bytes are read
//! when asked for, so a model loading its weights into another form never holds the whole file
//! beside them (`memmap2` would need `unsafe`, which the workspace denies). Every offset and
//! length read from the file is checked, so a truncated or corrupt file yields an
//! [`Error::Gguf`] naming what is wrong instead of a panic.
//!
//! Over 600 lines with its tests beside the code (corrupt and truncated files among them).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use crosslm_sdk::quant::ggml::{GgmlType, QK, dequantize};

use crate::{Error, Result};

/// The four magic bytes every GGUF file starts with.
const MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment when `general.alignment` is absent (GGUF spec default).
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value, as typed in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// UTF-8 `string`.
    String(String),
    /// Homogeneous array (element type is not kept: each element carries its own).
    Array(Vec<MetaValue>),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is any integer type and not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is any numeric type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and what it is.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous (fastest) axis, so a weight of
    /// a linear layer `in -> out` has `dims == [in, out]` and is stored row-major as `[out][in]`.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the tensor's data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in row-major (burn/numpy) order: ggml dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Size of the tensor's data in bytes, or an error for a type this reader cannot size.
    fn byte_len(&self) -> Result<usize> {
        let (block, bytes) = self.ggml_type.block_layout().ok_or_else(|| {
            Error::Gguf(format!(
                "tensor {}: unsupported tensor type {:?}",
                self.name, self.ggml_type
            ))
        })?;
        let n = usize::try_from(self.n_elements())
            .map_err(|_| Error::Gguf(format!("tensor {}: too many elements", self.name)))?;
        if !n.is_multiple_of(block) {
            return Err(Error::Gguf(format!(
                "tensor {}: {} elements is not a multiple of the {:?} block size {}",
                self.name, n, self.ggml_type, block
            )));
        }
        Ok(n / block * bytes)
    }
}

/// A parsed GGUF file: header in memory, tensor data in memory or on disk.
#[derive(Debug)]
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// All metadata key/values, sorted by key.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    data: Data,
    data_start: usize,
}

/// Where the tensor data is read from.
#[derive(Debug)]
enum Data {
    /// The whole file, in memory.
    Memory(Vec<u8>),
    /// The file on disk, `len` bytes long when it was opened.
    File {
        path: PathBuf,
        file: Mutex<File>,
        len: usize,
    },
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::Memory(bytes) => bytes.len(),
            Data::File { len, .. } => *len,
        }
    }
}

/// A bounds-checked little-endian cursor over the file's header, `total` bytes long.
struct Cursor<R> {
    reader: R,
    pos: usize,
    total: usize,
}

impl<R: Read> Cursor<R> {
    fn take(&mut self, n: usize, what: &str) -> Result<Vec<u8>> {
        let mut s = vec![0u8; self.check(n, what)?];
        self.fill(&mut s, what)?;
        Ok(s)
    }

    /// `n` if `n` more bytes lie inside the file, else a truncation error.
    fn check(&self, n: usize, what: &str) -> Result<usize> {
        match self.pos.checked_add(n).filter(|&e| e <= self.total) {
            Some(_) => Ok(n),
            None => Err(Error::Gguf(format!(
                "file truncated while reading {what} at byte {} (file is {} bytes)",
                self.pos, self.total
            ))),
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.reader
            .read_exact(buf)
            .map_err(|e| Error::Gguf(format!("reading {what} at byte {}: {e}", self.pos)))?;
        self.pos += buf.len();
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        self.check(N, what)?;
        let mut a = [0u8; N];
        self.fill(&mut a, what)?;
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length read from the file, checked against what is left so that a corrupt length
    /// cannot make us allocate gigabytes before failing.
    fn len(&mut self, what: &str, min_item_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.total - self.pos) as u64;
        if n.saturating_mul(min_item_bytes as u64) > left {
            return Err(Error::Gguf(format!(
                "{what} = {n} at byte {} runs past the end of the file",
                self.pos - 8
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what, 1)?;
        let s = self.take(n, what)?;
        String::from_utf8(s).map_err(|_| Error::Gguf(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(key)?[0]),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(key)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    return Err(Error::Gguf(format!(
                        "metadata {key}: invalid bool byte {b}"
                    )));
                }
            },
            8 => MetaValue::String(self.string(key)?),
            9 => {
                let elem_ty = self.u32(key)?;
                if elem_ty == 9 {
                    // Nested arrays are legal in the spec but unused; keep recursion bounded.
                    return Err(Error::Gguf(format!(
                        "metadata {key}: nested arrays are not supported"
                    )));
                }
                let n = self.len(key, 1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, key)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(Error::Gguf(format!(
                    "metadata {key}: unknown value type {other}"
                )));
            }
        })
    }
}

/// What a GGUF file says before its tensor data.
struct Header {
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    data_start: usize,
}

impl Header {
    /// Parses the header from the start of a file `total` bytes long.
    fn read(reader: impl Read, total: usize) -> Result<Header> {
        let mut c = Cursor {
            reader,
            pos: 0,
            total,
        };
        let magic = c.array::<4>("magic")?;
        if &magic != MAGIC {
            return Err(Error::Gguf(format!(
                "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
            )));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::Gguf(format!(
                "unsupported GGUF version {version} (expected 2 or 3)"
            )));
        }
        // A tensor info is at least 8 (name len) + 4 + 8 + 4 + 8 bytes; a KV at least 8 + 4.
        let n_tensors = c.len("tensor count", 32)?;
        let n_kv = c.len("metadata count", 12)?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key)?;
            metadata.insert(key, value);
        }

        let mut tensors = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name #{i}"))?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(Error::Gguf(format!(
                    "tensor {name}: {n_dims} dimensions (expected 1 to 4)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let ggml_type = GgmlType::from_number(c.u32(&name)?);
            let offset = c.u64(&name)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }

        let alignment = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|&a| a > 0 && a.is_power_of_two())
                .ok_or_else(|| Error::Gguf(format!("invalid general.alignment {v:?}")))?,
            None => DEFAULT_ALIGNMENT,
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_start = usize::try_from(data_start)
            .map_err(|_| Error::Gguf("data section offset overflows".into()))?;
        Ok(Header {
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    /// The file, once every tensor of a known type is found to lie inside `data`. Unknown
    /// types are only an error when someone reads that tensor.
    fn with_data(self, data: Data) -> Result<Gguf> {
        let gguf = Gguf {
            version: self.version,
            metadata: self.metadata,
            tensors: self.tensors,
            data_start: self.data_start,
            data,
        };
        for t in &gguf.tensors {
            if t.ggml_type.block_layout().is_some() {
                gguf.tensor_range(t)?;
            }
        }
        Ok(gguf)
    }
}

impl Gguf {
    /// Parses a GGUF file's header; tensor data is read from the file when asked for
    /// ([`Gguf::tensor_bytes`]). Checks that every tensor's data lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf> {
        let path = path.as_ref();
        let io = |source| Error::File {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let len = usize::try_from(len)
            .map_err(|_| Error::Gguf(format!("{}: file too large", path.display())))?;
        let mut reader = BufReader::new(file);
        let header = Header::read(&mut reader, len);
        let data = Data::File {
            path: path.to_path_buf(),
            file: Mutex::new(reader.into_inner()),
            len,
        };
        header.and_then(|h| h.with_data(data)).map_err(|e| match e {
            Error::Gguf(msg) => Error::Gguf(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses a GGUF file already in memory. Checks that every tensor's data lies inside the
    /// file, so later tensor reads cannot fail on bounds.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Gguf> {
        let header = Header::read(bytes.as_slice(), bytes.len())?;
        header.with_data(Data::Memory(bytes))
    }

    /// A metadata value by key.
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A required unsigned integer metadata value.
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        self.meta(key)
            .ok_or_else(|| Error::Gguf(format!("missing metadata key {key}")))?
            .as_u64()
            .ok_or_else(|| Error::Gguf(format!("metadata {key} is not an unsigned integer")))
    }

    /// A required numeric metadata value as `f64`.
    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        self.meta(key)
            .ok_or_else(|| Error::Gguf(format!("missing metadata key {key}")))?
            .as_f64()
            .ok_or_else(|| Error::Gguf(format!("metadata {key} is not a number")))
    }

    /// A required string metadata value.
    pub fn meta_str(&self, key: &str) -> Result<&str> {
        self.meta(key)
            .ok_or_else(|| Error::Gguf(format!("missing metadata key {key}")))?
            .as_str()
            .ok_or_else(|| Error::Gguf(format!("metadata {key} is not a string")))
    }

    /// A required array-of-strings metadata value.
    pub fn meta_str_array(&self, key: &str) -> Result<Vec<&str>> {
        match self.meta(key) {
            Some(MetaValue::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().ok_or_else(|| {
                        Error::Gguf(format!("metadata {key}: array element is not a string"))
                    })
                })
                .collect(),
            Some(_) => Err(Error::Gguf(format!("metadata {key} is not an array"))),
            None => Err(Error::Gguf(format!("missing metadata key {key}"))),
        }
    }

    /// The info of a named tensor, or an error naming the missing tensor.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::Gguf(format!("missing tensor {name}")))
    }

    /// Where a tensor's data lies in the file, checked against the file's length.
    fn tensor_range(&self, info: &TensorInfo) -> Result<std::ops::Range<usize>> {
        let len = info.byte_len()?;
        let start = usize::try_from(info.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_start));
        let range = start.and_then(|s| s.checked_add(len).map(|e| s..e));
        match range {
            Some(r) if r.end <= self.data.len() => Ok(r),
            _ => Err(Error::Gguf(format!(
                "tensor {}: data (offset {}, {len} bytes) lies past the end of the file \
                 ({} bytes): truncated file?",
                info.name,
                info.offset,
                self.data.len()
            ))),
        }
    }

    /// The raw (possibly quantized) bytes of a tensor: borrowed from memory, or read from the
    /// file (an error if the file changed under us).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<Cow<'_, [u8]>> {
        let r = self.tensor_range(info)?;
        match &self.data {
            Data::Memory(bytes) => Ok(Cow::Borrowed(&bytes[r])),
            Data::File { path, file, .. } => {
                let io = |source| Error::File {
                    path: path.clone(),
                    source,
                };
                let mut out = vec![0u8; r.len()];
                // A poisoned lock only means another reader panicked; the file is still fine.
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                f.seek(SeekFrom::Start(r.start as u64)).map_err(io)?;
                f.read_exact(&mut out).map_err(io)?;
                Ok(Cow::Owned(out))
            }
        }
    }

    /// Dequantizes a named tensor to `f32`, returning its row-major shape and values.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensor_info(name)?;
        let bytes = self.tensor_bytes(info)?;
        let values = dequantize(info.ggml_type, &bytes, info.n_elements() as usize)
            .map_err(|e| Error::Gguf(format!("tensor {name}: {e}")))?;
        Ok((info.shape(), values))
    }
}

/// Writes small GGUF files, for tests (of this reader and of models built on it).
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Adds a metadata key/value.
    pub fn meta(mut self, key: &str, value: MetaValue) -> GgufWriter {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor with raw data; `dims` in ggml order (contiguous axis first).
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> GgufWriter {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    /// Adds an F32 tensor from a row-major shape.
    pub fn tensor_f32(self, name: &str, shape: &[usize], values: &[f32]) -> GgufWriter {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, &dims, GgmlType::F32, data)
    }

    /// Serializes to GGUF v3 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        fn put_str(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        fn type_id(v: &MetaValue) -> u32 {
            match v {
                MetaValue::U8(_) => 0,
                MetaValue::I8(_) => 1,
                MetaValue::U16(_) => 2,
                MetaValue::I16(_) => 3,
                MetaValue::U32(_) => 4,
                MetaValue::I32(_) => 5,
                MetaValue::F32(_) => 6,
                MetaValue::Bool(_) => 7,
                MetaValue::String(_) => 8,
                MetaValue::Array(_) => 9,
                MetaValue::U64(_) => 10,
                MetaValue::I64(_) => 11,
                MetaValue::F64(_) => 12,
            }
        }
        fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
            match v {
                MetaValue::U8(x) => out.push(*x),
                MetaValue::I8(x) => out.extend(x.to_le_bytes()),
                MetaValue::U16(x) => out.extend(x.to_le_bytes()),
                MetaValue::I16(x) => out.extend(x.to_le_bytes()),
                MetaValue::U32(x) => out.extend(x.to_le_bytes()),
                MetaValue::I32(x) => out.extend(x.to_le_bytes()),
                MetaValue::F32(x) => out.extend(x.to_le_bytes()),
                MetaValue::Bool(x) => out.push(u8::from(*x)),
                MetaValue::String(s) => put_str(out, s),
                MetaValue::Array(items) => {
                    let elem = items.first().map_or(4, type_id);
                    out.extend(elem.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for item in items {
                        put_value(out, item);
                    }
                }
                MetaValue::U64(x) => out.extend(x.to_le_bytes()),
                MetaValue::I64(x) => out.extend(x.to_le_bytes()),
                MetaValue::F64(x) => out.extend(x.to_le_bytes()),
            }
        }
        let align = DEFAULT_ALIGNMENT as usize;
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend(type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.number().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset = (offset + data.len()).div_ceil(align) * align;
        }
        out.resize(out.len().div_ceil(align) * align, 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(out.len().div_ceil(align) * align, 0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use half::f16;

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// One block of each quantized type with hand-computed expected values.
    fn sample_file() -> (Vec<u8>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let qs: Vec<u8> = (0..16u8).map(|i| i | ((15 - i) << 4)).collect();
        // Q4_0, d = 0.5: low nibble i -> (i-8)*0.5, high nibble 15-i -> (7-i)*0.5.
        let mut q40 = f16b(0.5).to_vec();
        q40.extend(&qs);
        let e40: Vec<f32> = (0..16)
            .map(|i| (i as f32 - 8.0) * 0.5)
            .chain((0..16).map(|i| (7.0 - i as f32) * 0.5))
            .collect();
        // Q4_1, d = 0.25, m = -1.
        let mut q41 = f16b(0.25).to_vec();
        q41.extend(f16b(-1.0));
        q41.extend(&qs);
        let e41: Vec<f32> = (0..16)
            .map(|i| i as f32 * 0.25 - 1.0)
            .chain((0..16).map(|i| (15.0 - i as f32) * 0.25 - 1.0))
            .collect();
        // Q8_0, d = 2.
        let mut q80 = f16b(2.0).to_vec();
        q80.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let e80: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 2.0).collect();
        let bytes = GgufWriter::new()
            .meta("general.architecture", MetaValue::String("llama".into()))
            .meta("a.u8", MetaValue::U8(7))
            .meta("a.i8", MetaValue::I8(-7))
            .meta("a.u16", MetaValue::U16(700))
            .meta("a.i16", MetaValue::I16(-700))
            .meta("a.u32", MetaValue::U32(70000))
            .meta("a.i32", MetaValue::I32(-70000))
            .meta("a.f32", MetaValue::F32(1.5))
            .meta("a.bool", MetaValue::Bool(true))
            .meta("a.u64", MetaValue::U64(1 << 40))
            .meta("a.i64", MetaValue::I64(-(1 << 40)))
            .meta("a.f64", MetaValue::F64(-2.25))
            .meta(
                "a.strs",
                MetaValue::Array(vec![
                    MetaValue::String("x".into()),
                    MetaValue::String("yz".into()),
                ]),
            )
            .meta(
                "a.ints",
                MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-2)]),
            )
            .tensor_f32("f32", &[2, 3], &[1., 2., 3., 4., 5., 6.])
            .tensor("f16", &[2], GgmlType::F16, [f16b(0.5), f16b(-3.0)].concat())
            .tensor("q40", &[32], GgmlType::Q4_0, q40)
            .tensor("q41", &[32], GgmlType::Q4_1, q41)
            .tensor("q80", &[32], GgmlType::Q8_0, q80)
            .to_bytes();
        (bytes, e40, e41, e80)
    }

    #[test]
    fn reads_metadata_of_every_type() -> Result<()> {
        let (bytes, ..) = sample_file();
        let g = Gguf::from_bytes(bytes)?;
        assert_eq!(g.version, 3);
        assert_eq!(g.meta_str("general.architecture")?, "llama");
        assert_eq!(g.meta("a.u8"), Some(&MetaValue::U8(7)));
        assert_eq!(g.meta("a.i8"), Some(&MetaValue::I8(-7)));
        assert_eq!(g.meta("a.u16"), Some(&MetaValue::U16(700)));
        assert_eq!(g.meta("a.i16"), Some(&MetaValue::I16(-700)));
        assert_eq!(g.meta_u64("a.u32")?, 70000);
        assert_eq!(g.meta("a.i32"), Some(&MetaValue::I32(-70000)));
        assert_eq!(g.meta_f64("a.f32")?, 1.5);
        assert_eq!(g.meta("a.bool").and_then(MetaValue::as_bool), Some(true));
        assert_eq!(g.meta_u64("a.u64")?, 1 << 40);
        assert_eq!(g.meta("a.i64"), Some(&MetaValue::I64(-(1 << 40))));
        assert_eq!(g.meta_f64("a.f64")?, -2.25);
        assert_eq!(g.meta_str_array("a.strs")?, vec!["x", "yz"]);
        assert_eq!(
            g.meta("a.ints"),
            Some(&MetaValue::Array(vec![
                MetaValue::I32(1),
                MetaValue::I32(-2)
            ]))
        );
        assert!(g.meta_u64("a.i32").is_err());
        Ok(())
    }

    #[test]
    fn dequantizes_every_supported_type() -> Result<()> {
        let (bytes, e40, e41, e80) = sample_file();
        let g = Gguf::from_bytes(bytes)?;
        assert_eq!(
            g.dequantize("f32")?,
            (vec![2, 3], vec![1., 2., 3., 4., 5., 6.])
        );
        assert_eq!(g.dequantize("f16")?, (vec![2], vec![0.5, -3.0]));
        assert_eq!(g.dequantize("q40")?.1, e40);
        assert_eq!(g.dequantize("q41")?.1, e41);
        assert_eq!(g.dequantize("q80")?.1, e80);
        Ok(())
    }

    fn gguf_err(r: Result<Gguf>) -> String {
        match r {
            Err(Error::Gguf(msg)) => msg,
            Err(other) => panic!("expected a GGUF error, got {other}"),
            Ok(_) => panic!("expected a GGUF error, parsed fine"),
        }
    }

    #[test]
    fn truncated_file_is_a_clear_error() {
        let (bytes, ..) = sample_file();
        // Cut inside the header.
        let msg = gguf_err(Gguf::from_bytes(bytes[..100].to_vec()));
        assert!(
            msg.contains("truncated") || msg.contains("past the end"),
            "{msg}"
        );
        let msg = gguf_err(Gguf::from_bytes(bytes[..10].to_vec()));
        assert!(
            msg.contains("truncated while reading tensor count"),
            "{msg}"
        );
        // Cut inside the tensor data.
        let msg = gguf_err(Gguf::from_bytes(bytes[..bytes.len() - 40].to_vec()));
        assert!(msg.contains("past the end"), "{msg}");
        assert!(msg.contains("q80"), "{msg}");
    }

    #[test]
    fn corrupt_header_is_a_clear_error() {
        let (mut bytes, ..) = sample_file();
        bytes[0] = b'X';
        assert!(gguf_err(Gguf::from_bytes(bytes.clone())).contains("not a GGUF file"));
        bytes[0] = b'G';
        bytes[4] = 9;
        assert!(gguf_err(Gguf::from_bytes(bytes.clone())).contains("version 9"));
        bytes[4] = 3;
        // A huge metadata count.
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(gguf_err(Gguf::from_bytes(bytes)).contains("metadata count"));
    }

    #[test]
    fn unknown_type_and_missing_tensor_are_clear_errors() -> Result<()> {
        let bytes = GgufWriter::new()
            // Q2_K (type 10): a k-quant this reader does not dequantize.
            .tensor("k_quant", &[256], GgmlType::Other(10), vec![0; 84])
            .to_bytes();
        let g = Gguf::from_bytes(bytes)?;
        let msg = g.dequantize("k_quant").err().map(|e| e.to_string());
        let msg = msg.unwrap_or_default();
        assert!(
            msg.contains("unsupported tensor type") && msg.contains("k_quant"),
            "{msg}"
        );
        let msg = g.dequantize("nope").err().map(|e| e.to_string());
        assert!(msg.unwrap_or_default().contains("missing tensor nope"));
        Ok(())
    }

    /// `bytes` written to a file in a fresh temporary directory.
    fn on_disk(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, bytes).expect("write the file");
        (dir, path)
    }

    #[test]
    fn a_file_on_disk_reads_as_in_memory() -> Result<()> {
        let (bytes, ..) = sample_file();
        let (_dir, path) = on_disk(&bytes);
        let (disk, mem) = (Gguf::open(&path)?, Gguf::from_bytes(bytes)?);
        assert!(matches!(disk.data, Data::File { .. }));
        assert_eq!(disk.metadata, mem.metadata);
        assert_eq!(disk.tensors.len(), 5);
        for t in &mem.tensors {
            assert_eq!(disk.tensor_bytes(t)?, mem.tensor_bytes(t)?, "{}", t.name);
            assert_eq!(disk.dequantize(&t.name)?, mem.dequantize(&t.name)?);
        }
        Ok(())
    }

    #[test]
    fn truncated_file_on_disk_is_a_clear_error() {
        let (bytes, ..) = sample_file();
        let cuts = [
            (&bytes[..10], "truncated while reading tensor count"),
            (&bytes[..100], "runs past the end"),
            (&bytes[..bytes.len() - 40], "past the end"),
        ];
        for (cut, expect) in cuts {
            let (_dir, path) = on_disk(cut);
            let msg = gguf_err(Gguf::open(&path));
            assert!(msg.contains(expect), "{msg}");
            assert!(msg.contains("model.gguf"), "names the file: {msg}");
        }
    }

    #[test]
    fn a_file_cut_after_opening_is_an_error_not_a_panic() -> Result<()> {
        let (bytes, ..) = sample_file();
        let (_dir, path) = on_disk(&bytes);
        let g = Gguf::open(&path)?;
        std::fs::write(&path, &bytes[..bytes.len() - 40]).expect("cut the file");
        match g.dequantize("q80") {
            Err(Error::File { path: p, .. }) => assert_eq!(p, path),
            other => panic!("expected a file error, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn reads_the_real_smollm2_file() -> Result<()> {
        let path = crate::llm::test_assets::smollm2_path();
        let g = Gguf::open(&path)?;
        assert_eq!(g.version, 3);
        assert_eq!(g.meta_str("general.architecture")?, "llama");
        assert_eq!(g.meta_u64("llama.block_count")?, 30);
        assert_eq!(g.meta_u64("llama.embedding_length")?, 576);
        assert_eq!(g.meta_str_array("tokenizer.ggml.tokens")?.len(), 49152);
        let count = |ty| g.tensors.iter().filter(|t| t.ggml_type == ty).count();
        assert_eq!(count(GgmlType::Q4_1), 210);
        assert_eq!(count(GgmlType::Q8_0), 1);
        let (shape, w) = g.dequantize("blk.0.attn_q.weight")?;
        assert_eq!(shape, vec![576, 576]);
        assert!(w.iter().all(|v| v.is_finite()));
        let (shape, _) = g.dequantize("token_embd.weight")?;
        assert_eq!(shape, vec![49152, 576]);
        assert!(g.tensor_info("output.weight").is_err());
        // Read tensor by tensor from disk, the data equals the whole file's.
        let whole = Gguf::from_bytes(std::fs::read(&path).map_err(|source| Error::File {
            path: path.clone(),
            source,
        })?)?;
        for t in &whole.tensors {
            assert!(g.tensor_bytes(t)? == whole.tensor_bytes(t)?, "{}", t.name);
        }
        Ok(())
    }
}
