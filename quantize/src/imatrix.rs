//! Importance matrices in llama.cpp's formats: the current GGUF (`<tensor>.in_sum2` and
//! `<tensor>.counts` per weight, `general.type = "imatrix"`) and the legacy `.dat`.
//! Keys are GGUF tensor names (`blk.0.ffn_down.weight`).
//!
//! Written by hand: candle's `load_imatrix` reads only the legacy format and panics on a
//! truncated file; this reader names the file and entry instead.

use crate::error::{io_err, Error, Result};
use crate::gguf_writer::{GgufLayout, GgufWriter};
use candle_core::quantized::gguf_file::Value;
use std::collections::BTreeMap;
use std::path::Path;
use tandem_model::error::{clean, MAX_NAME_CHARS};
use tandem_model::gguf_keys as keys;
use tandem_model::weights::{Bytes, WeightDType, WeightStore};

/// Per weight: the sum over tokens of each input column's squared activation, and the number
/// of tokens summed.
#[derive(Debug, Clone, Default)]
pub struct ImportanceMatrix {
    pub entries: BTreeMap<String, ImportanceEntry>,
    pub datasets: Vec<String>,
    pub chunk_count: u32,
    pub chunk_size: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImportanceEntry {
    pub sum2: Vec<f32>,
    pub count: f32,
}

impl ImportanceMatrix {
    /// Mean squared activation per input column of `gguf_name`, if present.
    pub fn importance(&self, gguf_name: &str) -> Option<Vec<f32>> {
        let e = self.entries.get(gguf_name)?;
        let c = if e.count > 0.0 { e.count } else { 1.0 };
        Some(e.sum2.iter().map(|s| s / c).collect())
    }

    /// The weights for `gguf_name`, a tensor of `cols` columns stored in `file`: `Ok(None)`
    /// when the matrix has no entry for it, an error naming the tensor when its entry has
    /// another width (a matrix made for another model).
    pub fn weights_for(
        &self,
        gguf_name: &str,
        cols: usize,
        file: &Path,
    ) -> Result<Option<Vec<f32>>> {
        match self.importance(gguf_name) {
            Some(w) if w.len() != cols => Err(crate::error::tensor_err(
                file,
                gguf_name,
                format!(
                    "imatrix has {} columns, the tensor {cols}: imatrix made for another model?",
                    w.len()
                ),
            )),
            found => Ok(found),
        }
    }

    /// Reads either format (GGUF is recognised by its magic).
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = tandem_model::files::read_capped(path, tandem_model::files::IMATRIX_CAP)
            .map_err(|e| io_err(path, &e))?;
        Self::from_bytes(path, bytes)
    }

    /// Either format from bytes in memory; `path` names them in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        if bytes.starts_with(b"GGUF") {
            Self::from_gguf(path, bytes)
        } else {
            Self::from_legacy(path, &bytes)
        }
    }

    fn from_gguf(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let bad = |m: String| Error::Plan(format!("{}: invalid imatrix: {m}", path.display()));
        // The model crate's checked reader: header, spans inside the file, no overlaps.
        let store = WeightStore::gguf_from_bytes(path, Bytes::Owned(bytes))?;
        let md = store
            .gguf_metadata()
            .ok_or_else(|| bad("not a GGUF file".into()))?;
        let mut out = ImportanceMatrix {
            chunk_count: md
                .get(keys::imatrix::CHUNK_COUNT)
                .and_then(|v| v.to_u32().ok())
                .unwrap_or(0),
            chunk_size: md
                .get(keys::imatrix::CHUNK_SIZE)
                .and_then(|v| v.to_u32().ok())
                .unwrap_or(0),
            ..Default::default()
        };
        if let Some(Value::Array(a)) = md.get(keys::imatrix::DATASETS) {
            out.datasets = a
                .iter()
                .filter_map(|v| v.to_string().ok().cloned())
                .collect();
        }
        let read_f32 = |name: &str| -> Result<Vec<f32>> {
            let raw = store.get(name)?;
            if raw.dtype != WeightDType::F32 {
                return Err(bad(format!(
                    "tensor '{}' is {}, not F32",
                    clean(name, MAX_NAME_CHARS),
                    raw.dtype.name()
                )));
            }
            Ok(raw
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let names = store.names();
        for name in &names {
            let Some(weight) = name.strip_suffix(".in_sum2") else {
                continue;
            };
            let counts_name = format!("{weight}.counts");
            if !store.contains(&counts_name) {
                return Err(bad(format!(
                    "'{}' has no matching '.counts' tensor",
                    clean(name, MAX_NAME_CHARS)
                )));
            }
            let sum2 = read_f32(name)?;
            let counts = read_f32(&counts_name)?;
            if counts.len() != 1 {
                return Err(bad(format!(
                    "'{counts_name}' has {} entries: expert (MoE) matrices are not supported",
                    counts.len()
                )));
            }
            out.entries.insert(
                weight.to_string(),
                ImportanceEntry {
                    sum2,
                    count: counts[0],
                },
            );
        }
        if out.entries.is_empty() {
            return Err(bad("no <tensor>.in_sum2 entries".into()));
        }
        Ok(out)
    }

    fn from_legacy(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad =
            |m: String| Error::Plan(format!("{}: invalid imatrix (.dat): {m}", path.display()));
        let mut pos = 0usize;
        let mut take = |n: usize, what: &str| -> Result<&[u8]> {
            let s = bytes
                .get(pos..pos + n)
                .ok_or_else(|| bad(format!("file ends inside {what}: truncated?")))?;
            pos += n;
            Ok(s)
        };
        let i32_at = |b: &[u8]| i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let n = i32_at(take(4, "the entry count")?);
        if !(1..=1_000_000).contains(&n) {
            return Err(bad(format!(
                "entry count {n} is not plausible (is this an imatrix file?)"
            )));
        }
        let mut out = ImportanceMatrix::default();
        for i in 0..n {
            let len = i32_at(take(4, "a name length")?);
            if !(1..=4096).contains(&len) {
                return Err(bad(format!("entry {i}: name length {len}")));
            }
            let name = String::from_utf8(take(len as usize, "a name")?.to_vec())
                .map_err(|_| bad(format!("entry {i}: name is not UTF-8")))?;
            let ncall = i32_at(take(4, "a call count")?);
            let nval = i32_at(take(4, "a value count")?);
            if !(1..=1 << 24).contains(&nval) {
                return Err(bad(format!("entry '{name}': {nval} values")));
            }
            let vals = take(4 * nval as usize, "values")?;
            // Stored values are mean * ncall; importance is value / ncall.
            let sum2 = vals
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            out.entries.insert(
                name,
                ImportanceEntry {
                    sum2,
                    count: ncall.max(0) as f32,
                },
            );
        }
        if let Ok(b) = take(4, "the chunk count") {
            out.chunk_count = i32_at(b).max(0) as u32;
            if let Ok(b) = take(4, "the dataset name length") {
                let len = i32_at(b).max(0) as usize;
                if let Ok(name) = take(len, "the dataset name") {
                    out.datasets
                        .push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
        Ok(out)
    }

    /// Writes the current llama.cpp GGUF format, atomically.
    pub fn write_gguf(&self, path: &Path, force: bool) -> Result<()> {
        let metadata = vec![
            (keys::TYPE.to_string(), Value::String("imatrix".into())),
            (
                keys::imatrix::DATASETS.into(),
                Value::Array(
                    self.datasets
                        .iter()
                        .map(|d| Value::String(d.clone()))
                        .collect(),
                ),
            ),
            (
                keys::imatrix::CHUNK_COUNT.into(),
                Value::U32(self.chunk_count),
            ),
            (
                keys::imatrix::CHUNK_SIZE.into(),
                Value::U32(self.chunk_size),
            ),
        ];
        let mut tensors = Vec::new();
        let mut data: Vec<Vec<u8>> = Vec::new();
        for (name, e) in &self.entries {
            tensors.push((
                format!("{name}.in_sum2"),
                vec![e.sum2.len() as u64, 1],
                0,
                4 * e.sum2.len() as u64,
            ));
            data.push(e.sum2.iter().flat_map(|x| x.to_le_bytes()).collect());
            tensors.push((format!("{name}.counts"), vec![1, 1], 0, 4));
            data.push(e.count.to_le_bytes().to_vec());
        }
        let layout = GgufLayout::new(metadata, tensors);
        crate::output::write_atomically(path, force, |w| -> Result<()> {
            let ioe = |e: std::io::Error| io_err(path, &e);
            let mut g = GgufWriter::new(w, &layout).map_err(ioe)?;
            for d in &data {
                g.write_tensor(d).map_err(ioe)?;
            }
            g.finish().map(|_| ()).map_err(ioe)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ImportanceMatrix {
        let mut m = ImportanceMatrix {
            datasets: vec!["austen.txt".into()],
            chunk_count: 3,
            chunk_size: 512,
            ..Default::default()
        };
        m.entries.insert(
            "blk.0.ffn_down.weight".into(),
            ImportanceEntry {
                sum2: vec![3.0, 6.0, 9.0],
                count: 3.0,
            },
        );
        m
    }

    #[test]
    fn gguf_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("imatrix.gguf");
        sample().write_gguf(&p, false).unwrap();
        let back = ImportanceMatrix::read(&p).unwrap();
        assert_eq!(back.entries, sample().entries);
        assert_eq!(back.chunk_count, 3);
        assert_eq!(back.datasets, vec!["austen.txt".to_string()]);
        assert_eq!(
            back.importance("blk.0.ffn_down.weight").unwrap(),
            vec![1.0, 2.0, 3.0]
        );
        // Refuses to overwrite without force.
        assert!(sample().write_gguf(&p, false).is_err());
    }

    #[test]
    fn legacy_dat_reads_and_truncation_is_an_error() {
        // One entry, ncall 2, values stored as mean * ncall.
        let mut b = Vec::new();
        b.extend_from_slice(&1i32.to_le_bytes());
        let name = b"blk.0.ffn_up.weight";
        b.extend_from_slice(&(name.len() as i32).to_le_bytes());
        b.extend_from_slice(name);
        b.extend_from_slice(&2i32.to_le_bytes());
        b.extend_from_slice(&2i32.to_le_bytes());
        for v in [4.0f32, 8.0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&10i32.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("imatrix.dat");
        std::fs::write(&p, &b).unwrap();
        let m = ImportanceMatrix::read(&p).unwrap();
        assert_eq!(m.importance("blk.0.ffn_up.weight").unwrap(), vec![2.0, 4.0]);
        assert_eq!(m.chunk_count, 10);
        std::fs::write(&p, &b[..20]).unwrap();
        let e = ImportanceMatrix::read(&p).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
