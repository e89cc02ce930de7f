//! A streaming GGUF (version 3) writer.
//!
//! Written by hand because candle's `gguf_file::write` takes every tensor in memory at once;
//! quantizing a model larger than RAM needs the header written from the plan (names, types,
//! shapes and offsets are all known before any data is) and the tensor data appended one
//! tensor at a time. Metadata values reuse candle's `gguf_file::Value`.

use candle_core::quantized::gguf_file::Value;
use std::io::{self, Write};

/// GGUF's default (and llama.cpp's) data alignment.
pub const ALIGNMENT: u64 = 32;

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    /// GGUF order: innermost dimension first (an [out, in] matrix is [in, out]).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub size: u64,
    /// Offset from the start of the data section, a multiple of [`ALIGNMENT`].
    pub offset: u64,
}

/// The header of a GGUF file: metadata and tensor entries with their offsets laid out.
pub struct GgufLayout {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorEntry>,
}

impl GgufLayout {
    /// Lays tensors out in the given order, each at the next aligned offset.
    /// `tensors` holds (name, dims innermost-first, ggml type id, size in bytes).
    pub fn new(metadata: Vec<(String, Value)>, tensors: Vec<(String, Vec<u64>, u32, u64)>) -> Self {
        let mut offset = 0u64;
        let tensors = tensors
            .into_iter()
            .map(|(name, dims, ggml_type, size)| {
                let e = TensorEntry {
                    name,
                    dims,
                    ggml_type,
                    size,
                    offset,
                };
                offset = align(offset + size);
                e
            })
            .collect();
        GgufLayout { metadata, tensors }
    }

    /// Bytes of the whole file.
    pub fn file_size(&self) -> u64 {
        let data = self
            .tensors
            .last()
            .map(|t| align(t.offset + t.size))
            .unwrap_or(0);
        align(self.header().len() as u64) + data
    }

    /// The header, padded to the alignment so tensor data starts right after it.
    pub fn header(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut b, k);
            b.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut b, v);
        }
        for t in &self.tensors {
            put_str(&mut b, &t.name);
            b.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&t.ggml_type.to_le_bytes());
            b.extend_from_slice(&t.offset.to_le_bytes());
        }
        b.resize(align(b.len() as u64) as usize, 0);
        b
    }
}

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// Writes a [`GgufLayout`]'s header, then each tensor's data in layout order.
pub struct GgufWriter<W: Write> {
    out: W,
    layout_sizes: Vec<(String, u64)>,
    next: usize,
    /// Bytes of the current tensor written so far.
    partial: u64,
}

impl<W: Write> GgufWriter<W> {
    pub fn new(mut out: W, layout: &GgufLayout) -> io::Result<Self> {
        out.write_all(&layout.header())?;
        Ok(GgufWriter {
            out,
            layout_sizes: layout
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.size))
                .collect(),
            next: 0,
            partial: 0,
        })
    }

    fn current(&self) -> io::Result<(&str, u64)> {
        self.layout_sizes
            .get(self.next)
            .map(|(n, s)| (n.as_str(), *s))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "more tensors than planned"))
    }

    /// Appends part of the current tensor's bytes (tensors may be streamed in pieces).
    pub fn write_part(&mut self, data: &[u8]) -> io::Result<()> {
        let (name, size) = self.current()?;
        if self.partial + data.len() as u64 > size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("tensor '{name}': more than the planned {size} bytes (internal error)"),
            ));
        }
        self.out.write_all(data)?;
        self.partial += data.len() as u64;
        Ok(())
    }

    /// Ends the current tensor (which must be complete) and pads to the alignment.
    pub fn end_tensor(&mut self) -> io::Result<()> {
        let (name, size) = self.current()?;
        if self.partial != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "tensor '{name}': {} bytes, planned {size} (internal error)",
                    self.partial
                ),
            ));
        }
        let pad = (align(size) - size) as usize;
        self.out.write_all(&[0u8; ALIGNMENT as usize][..pad])?;
        self.next += 1;
        self.partial = 0;
        Ok(())
    }

    /// Writes one whole tensor.
    pub fn write_tensor(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_part(data)?;
        self.end_tensor()
    }

    /// Checks every planned tensor was written and hands back the sink.
    pub fn finish(mut self) -> io::Result<W> {
        if self.next != self.layout_sizes.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} of {} tensors written",
                    self.next,
                    self.layout_sizes.len()
                ),
            ));
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

fn type_id(v: &Value) -> u32 {
    match v {
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

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => b.push(u8::from(*x)),
        Value::String(s) => put_str(b, s),
        Value::Array(items) => {
            // An empty array is written as an array of u32 (its element type is moot).
            let elem = items.first().map(type_id).unwrap_or(4);
            b.extend_from_slice(&elem.to_le_bytes());
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(b, it);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;

    #[test]
    fn candle_reads_what_we_write() {
        let md = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("x.u32".into(), Value::U32(7)),
            ("x.f32".into(), Value::F32(1.5)),
            ("x.flag".into(), Value::Bool(true)),
            (
                "x.list".into(),
                Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]),
            ),
        ];
        let layout = GgufLayout::new(
            md,
            vec![("a".into(), vec![3], 0, 12), ("b".into(), vec![2, 2], 1, 8)],
        );
        let mut w = GgufWriter::new(Vec::new(), &layout).unwrap();
        w.write_tensor(&[1u8; 12]).unwrap();
        w.write_tensor(&[2u8; 8]).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() as u64, layout.file_size());
        let c = Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        assert_eq!(c.metadata["x.u32"].to_u32().unwrap(), 7);
        assert!(c.metadata["x.flag"].to_bool().unwrap());
        assert_eq!(c.tensor_infos["b"].offset, 32);
        assert_eq!(c.tensor_infos["b"].shape.dims(), &[2, 2]);
        let start = c.tensor_data_offset as usize + 32;
        assert_eq!(&bytes[start..start + 8], &[2u8; 8]);
    }

    #[test]
    fn wrong_size_is_refused() {
        let layout = GgufLayout::new(vec![], vec![("a".into(), vec![4], 0, 16)]);
        let mut w = GgufWriter::new(Vec::new(), &layout).unwrap();
        assert!(w.write_tensor(&[0u8; 15]).is_err());
        let mut w = GgufWriter::new(Vec::new(), &layout).unwrap();
        w.write_part(&[0u8; 10]).unwrap();
        assert!(w.write_part(&[0u8; 7]).is_err());
        w.write_part(&[0u8; 6]).unwrap();
        w.end_tensor().unwrap();
        assert!(w.finish().is_ok());
    }
}
