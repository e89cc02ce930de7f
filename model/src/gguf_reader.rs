//! Reading a GGUF header (metadata and tensor table) from untrusted bytes.
//!
//! Why not candle's `gguf_file::Content::read`: it divides by `general.alignment` unchecked
//! (a file declaring 0 panicked every command), accepts tensor offsets that are not a multiple
//! of the alignment (llama.cpp refuses them; tandem then computed garbage) and lets a duplicate
//! key or tensor name silently replace the first. This reader checks what llama.cpp's
//! `gguf_init_from_file` checks, bounds every count and length by the bytes left in the file
//! before it sizes an allocation, and returns candle's own [`Content`], so everything after
//! the header is read as before.

use crate::error::{clean, format_err, Result};
use crate::gguf_keys as keys;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;
use std::collections::HashMap;
use std::path::Path;
use tandem_kernels::GgmlType;

/// Deepest nesting of arrays accepted (GGUF writers never nest more than one level).
const MAX_DEPTH: usize = 4;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: usize = 4;
/// `general.alignment` when the file does not say (ggml's `GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// candle's name for a GGML type (the one place the two enums meet).
pub fn candle_dtype(t: GgmlType) -> GgmlDType {
    match t {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q8_1 => GgmlDType::Q8_1,
        GgmlType::Q2K => GgmlDType::Q2K,
        GgmlType::Q3K => GgmlDType::Q3K,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q5K => GgmlDType::Q5K,
        GgmlType::Q6K => GgmlDType::Q6K,
        GgmlType::Q8K => GgmlDType::Q8K,
    }
}

/// The GGML type candle's `t` is.
pub fn ggml_type(t: GgmlDType) -> GgmlType {
    tandem_kernels::ggml::ALL
        .iter()
        .copied()
        .find(|&g| candle_dtype(g) == t)
        .unwrap_or(GgmlType::F32)
}

/// ggml's type id of a tensor element type (`enum ggml_type`), the number a GGUF tensor info
/// stores; `None` for ids tandem does not read.
pub fn ggml_dtype_from_id(id: u32) -> Option<GgmlDType> {
    GgmlType::from_gguf_id(id).map(candle_dtype)
}

/// The inverse of [`ggml_dtype_from_id`].
pub fn ggml_type_id(t: GgmlDType) -> u32 {
    ggml_type(t).gguf_id()
}

/// A little-endian cursor that never reads past the end and never trusts a length.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(format_err(
                self.path,
                format!(
                    "invalid GGUF: {what} at byte {} needs {n} bytes, the file has {} left: truncated?",
                    self.pos,
                    self.left()
                ),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit in what is left of the file at `min_size` bytes per element.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .filter(|n| n.saturating_mul(min_size.max(1)) <= self.left());
        fits.ok_or_else(|| {
            format_err(
                self.path,
                format!(
                    "invalid GGUF: {what} is {n}, more than the {} bytes left in the file can hold",
                    self.left()
                ),
            )
        })
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let raw = self.take(n, what)?;
        // Writers are known to add trailing NULs; the text is UTF-8 (lossily, as llama.cpp).
        let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
        Ok(String::from_utf8_lossy(raw).into_owned())
    }

    fn value(&mut self, type_id: u32, depth: usize, key: &str) -> Result<Value> {
        let what = |t: &str| format!("value of '{}' ({t})", clean(key, 64));
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(&what("u8"))?[0]),
            1 => Value::I8(self.array::<1>(&what("i8"))?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what("u16"))?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what("i16"))?)),
            4 => Value::U32(self.u32(&what("u32"))?),
            5 => Value::I32(i32::from_le_bytes(self.array(&what("i32"))?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what("f32"))?)),
            7 => match self.array::<1>(&what("bool"))?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.bad(format!("{} is {b}, not 0 or 1", what("bool")))),
            },
            8 => Value::String(self.string(&what("string"))?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.bad(format!(
                        "{} nests arrays deeper than {MAX_DEPTH}",
                        what("array")
                    )));
                }
                let elem = self.u32(&what("array type"))?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 => 8,
                    9 => 12,
                    10..=12 => 8,
                    t => {
                        return Err(self.bad(format!("{}: unknown element type {t}", what("array"))))
                    }
                };
                let n = self.count(min, &what("array length"))?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1, key)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(&what("u64"))?),
            11 => Value::I64(i64::from_le_bytes(self.array(&what("i64"))?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what("f64"))?)),
            t => return Err(self.bad(format!("{}: unknown value type {t}", what("value")))),
        })
    }

    fn bad(&self, msg: String) -> crate::error::Error {
        format_err(self.path, format!("invalid GGUF: {msg}"))
    }
}

/// Reads and checks the header of the GGUF image `bytes`; `path` names it in errors.
pub fn read_header(path: &Path, bytes: &[u8]) -> Result<Content> {
    let mut r = Reader {
        bytes,
        pos: 0,
        path,
    };
    if r.take(4, "magic").ok() != Some(b"GGUF".as_slice()) {
        return Err(r.bad("the file does not start with the GGUF magic".into()));
    }
    let magic = match r.u32("version")? {
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => {
            return Err(r.bad(format!(
                "version {v} is not supported (tandem reads GGUF versions 2 and 3)"
            )))
        }
    };
    // Smallest tensor info: name length, n_dims, type, offset; smallest key/value: key
    // length, type, one byte of value.
    let n_tensors = r.count(8 + 4 + 4 + 8, "tensor count")?;
    let n_kv = r.count(8 + 4 + 1, "metadata count")?;
    let mut metadata = HashMap::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let t = r.u32("metadata value type")?;
        let value = r.value(t, 0, &key)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.bad(format!("metadata key '{}' appears twice", clean(&key, 96))));
        }
    }
    let alignment = match metadata.get(keys::ALIGNMENT) {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => *a as u64,
        Some(v) => {
            return Err(r.bad(format!(
                "general.alignment must be a u32 power of two, not {}",
                clean(&format!("{v:?}"), 64)
            )))
        }
    };
    let mut tensor_infos = HashMap::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let shown = clean(&name, 96);
        let n_dims = r.u32("tensor dimension count")? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.bad(format!(
                "tensor '{shown}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = r.u64("tensor dimension")?;
            dims.push(
                usize::try_from(d)
                    .ok()
                    .filter(|&d| d > 0)
                    .ok_or_else(|| r.bad(format!("tensor '{shown}' has dimension {d}")))?,
            );
        }
        if dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .is_none()
        {
            return Err(r.bad(format!(
                "tensor '{shown}' has shape {dims:?}: too many elements"
            )));
        }
        let type_id = r.u32("tensor type")?;
        let ggml_dtype = ggml_dtype_from_id(type_id)
            .ok_or_else(|| r.bad(format!("tensor '{shown}' has unknown type id {type_id}")))?;
        let offset = r.u64("tensor offset")?;
        if offset % alignment != 0 {
            return Err(r.bad(format!(
                "tensor '{shown}' has data offset {offset}, not a multiple of the alignment {alignment}"
            )));
        }
        // GGUF lists dimensions innermost first; candle's shapes are outermost first.
        dims.reverse();
        let info = TensorInfo {
            ggml_dtype,
            shape: candle_core::Shape::from(dims),
            offset,
        };
        if tensor_infos.insert(name, info).is_some() {
            return Err(r.bad(format!("tensor '{shown}' appears twice")));
        }
    }
    let tensor_data_offset = (r.pos as u64).next_multiple_of(alignment);
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 header: `kv` as (key, type id, value bytes), then `tensors` as (name, dims,
    /// type id, offset), padded to 32 bytes, then `data` zero bytes.
    fn gguf(
        kv: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, &[u64], u32, u64)],
        data: usize,
    ) -> Vec<u8> {
        let s = |b: &mut Vec<u8>, t: &str| {
            b.extend((t.len() as u64).to_le_bytes());
            b.extend(t.as_bytes());
        };
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kv.len() as u64).to_le_bytes());
        for (k, t, v) in kv {
            s(&mut b, k);
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        for (name, dims, ty, off) in tensors {
            s(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
            b.extend(ty.to_le_bytes());
            b.extend(off.to_le_bytes());
        }
        b.resize(b.len().next_multiple_of(32) + data, 0);
        b
    }

    fn read(b: &[u8]) -> std::result::Result<Content, String> {
        read_header(Path::new("t.gguf"), b).map_err(|e| e.to_string())
    }

    const F32: u32 = 0;

    #[test]
    fn reads_a_valid_header_into_candles_content() {
        let b = gguf(
            &[(
                "general.architecture",
                8,
                [5u64.to_le_bytes().as_slice(), b"llama"].concat(),
            )],
            &[("a", &[4, 2], F32, 0), ("b", &[8], F32, 32)],
            64,
        );
        let c = read(&b).unwrap();
        assert_eq!(c.tensor_infos["a"].shape.dims(), &[2, 4], "outermost first");
        assert_eq!(c.tensor_infos["b"].offset, 32);
        assert_eq!(c.tensor_data_offset as usize, b.len() - 64);
        assert!(matches!(&c.metadata["general.architecture"], Value::String(s) if s == "llama"));
    }

    #[test]
    fn refuses_what_llama_cpp_refuses() {
        let u32v = |v: u32| v.to_le_bytes().to_vec();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                gguf(&[("general.alignment", 4, u32v(0))], &[], 0),
                "power of two",
            ),
            (
                gguf(&[("general.alignment", 4, u32v(48))], &[], 0),
                "power of two",
            ),
            (
                gguf(&[], &[("a", &[8], F32, 8)], 64),
                "not a multiple of the alignment 32",
            ),
            (
                gguf(&[("k", 4, u32v(1)), ("k", 4, u32v(2))], &[], 0),
                "'k' appears twice",
            ),
            (
                gguf(&[], &[("a", &[8], F32, 0), ("a", &[8], F32, 32)], 64),
                "'a' appears twice",
            ),
            (gguf(&[], &[("a", &[0], F32, 0)], 0), "dimension 0"),
            (
                gguf(&[], &[("a", &[1, 1, 1, 1, 1], F32, 0)], 0),
                "5 dimensions",
            ),
            (gguf(&[], &[("a", &[8], 99, 0)], 0), "unknown type id 99"),
            (gguf(&[("k", 13, vec![])], &[], 0), "unknown value type 13"),
            (gguf(&[("k", 7, vec![2])], &[], 0), "not 0 or 1"),
        ];
        for (b, needle) in cases {
            let e = read(&b).unwrap_err();
            assert!(
                e.contains(needle) && e.starts_with("t.gguf: invalid GGUF"),
                "{needle}: {e}"
            );
        }
        let mut v1 = gguf(&[], &[], 0);
        v1[4] = 1;
        assert!(read(&v1).unwrap_err().contains("version 1"));
    }

    #[test]
    fn counts_and_lengths_are_bounded_by_the_file_before_anything_is_sized() {
        let b = gguf(&[], &[], 0);
        for (at, what) in [(8, "tensor count"), (16, "metadata count")] {
            let mut x = b.clone();
            x[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            let e = read(&x).unwrap_err();
            assert!(e.contains(what) && e.contains("bytes left"), "{e}");
        }
        // A string length of 2^62 and an array of 2^40 u64s.
        let mut x = gguf(&[("k", 8, 4u64.to_le_bytes().to_vec())], &[], 0);
        x[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(read(&x).unwrap_err().contains("metadata key"));
        let arr = [10u32.to_le_bytes().as_slice(), &(1u64 << 40).to_le_bytes()].concat();
        let e = read(&gguf(&[("k", 9, arr)], &[], 0)).unwrap_err();
        assert!(e.contains("array length"), "{e}");
        assert!(read(&b[..10]).unwrap_err().contains("truncated"));
    }

    #[test]
    fn type_ids_round_trip() {
        for id in 0..=30 {
            if let Some(t) = ggml_dtype_from_id(id) {
                assert_eq!(ggml_type_id(t), id);
            }
        }
        assert_eq!(ggml_dtype_from_id(30), Some(GgmlDType::BF16));
    }
}
