//! Reading checkpoint files without reading them whole: safetensors (single file or shards)
//! and GGUF are memory-mapped, checked up front (header, offsets, sizes), and handed out one
//! tensor at a time as borrowed bytes, always under the Hugging Face tensor name.

use crate::error::{format_err, io_err, tensor_err, Error, Result};
use crate::gguf_names::{gguf_to_hf, hf_to_gguf};
use candle_core::quantized::{gguf_file, GgmlDType};
use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

/// Bytes of a checkpoint file: a read-only memory map, or data compiled into the binary
/// (the bundled demo model).
pub enum Bytes {
    Mmap(memmap2::Mmap),
    Static(&'static [u8]),
    /// Made in memory (a self-draft quantized on the fly).
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mmap(m) => m,
            Bytes::Static(s) => s,
            Bytes::Owned(v) => v,
        }
    }
}

impl Bytes {
    pub fn map(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
        // SAFETY: the map is read-only; a checkpoint changed underneath a running process is
        // outside what any inference engine guards against (llama.cpp maps the same way).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
        Ok(Bytes::Mmap(map))
    }
}

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDType {
    F32,
    F16,
    BF16,
    /// A GGML block-quantized type (Q8_0, Q4_0, Q4_K, ...).
    Quant(GgmlDType),
}

impl WeightDType {
    pub fn name(&self) -> String {
        match self {
            WeightDType::F32 => "F32".into(),
            WeightDType::F16 => "F16".into(),
            WeightDType::BF16 => "BF16".into(),
            WeightDType::Quant(q) => format!("{q:?}").to_uppercase(),
        }
    }

    /// Bytes needed for `elems` elements (quantized: whole blocks only).
    pub fn bytes_for(&self, elems: usize) -> Option<usize> {
        match self {
            WeightDType::F32 => elems.checked_mul(4),
            WeightDType::F16 | WeightDType::BF16 => elems.checked_mul(2),
            WeightDType::Quant(q) => crate::gguf_reader::ggml_type(*q).bytes_for(elems),
        }
    }
}

/// One tensor's bytes, borrowed from the mapped file, in Hugging Face layout ([out, in]).
pub struct RawTensor<'a> {
    pub name: String,
    pub dtype: WeightDType,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl RawTensor<'_> {
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct StEntry {
    file: usize,
    dtype: WeightDType,
    /// The stored element type (integers only in packed quantized checkpoints).
    stored: crate::packed::StoredDType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

pub struct StFile {
    path: PathBuf,
    bytes: Bytes,
}

pub struct GgufEntry {
    gguf_name: String,
    dtype: WeightDType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint, however they are stored.
pub enum WeightStore {
    Safetensors {
        files: Vec<StFile>,
        entries: BTreeMap<String, StEntry>,
    },
    Gguf {
        path: PathBuf,
        bytes: Bytes,
        content: Box<gguf_file::Content>,
        /// HF name → entry; tensors with no HF name (e.g. `rope_freqs.weight`) keep their
        /// GGUF name.
        entries: BTreeMap<String, GgufEntry>,
    },
}

impl WeightStore {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_safetensors_dir(dir: &Path) -> Result<Self> {
        Ok(Self::open_safetensors_dir_quantized(dir, None)?.0)
    }

    /// [`WeightStore::open_safetensors_dir`] for a checkpoint whose config.json declares a
    /// `quantization_config`: its packed layers are read into GGML blocks (or F32 where no
    /// GGML type holds their grid, see [`crate::packed`]) and stand under their plain
    /// `.weight` names; the packed parts are consumed.
    pub fn open_safetensors_dir_quantized(
        dir: &Path,
        quant: Option<&crate::packed::QuantConfig>,
    ) -> Result<(Self, Option<crate::packed::ImportSummary>)> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            shard_files(dir, &index)?
        } else {
            return Err(format_err(
                dir,
                "no model.safetensors or model.safetensors.index.json in the model folder",
            ));
        };
        let mut st_files = Vec::new();
        for p in files {
            st_files.push(StFile {
                bytes: Bytes::map(&p)?,
                path: p,
            });
        }
        Self::from_safetensors_quantized(st_files, quant)
    }

    /// A safetensors checkpoint held in memory (the bundled model); `path` names it in errors.
    pub fn from_static_safetensors(path: &Path, data: &'static [u8]) -> Result<Self> {
        Self::from_safetensors(vec![StFile {
            path: path.to_path_buf(),
            bytes: Bytes::Static(data),
        }])
    }

    /// A single safetensors file already in memory; `path` names it in errors.
    pub fn from_safetensors_bytes(path: &Path, data: Vec<u8>) -> Result<Self> {
        Self::from_safetensors(vec![StFile {
            path: path.to_path_buf(),
            bytes: Bytes::Owned(data),
        }])
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        match self {
            WeightStore::Safetensors { entries, .. } => entries.len(),
            WeightStore::Gguf { entries, .. } => entries.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn from_safetensors(files: Vec<StFile>) -> Result<Self> {
        Ok(Self::from_safetensors_quantized(files, None)?.0)
    }

    fn from_safetensors_quantized(
        mut files: Vec<StFile>,
        quant: Option<&crate::packed::QuantConfig>,
    ) -> Result<(Self, Option<crate::packed::ImportSummary>)> {
        use crate::packed::{Stored, StoredDType};
        let mut entries: BTreeMap<String, StEntry> = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for (name, e) in parse_safetensors(&f.path, &f.bytes, i)? {
                if entries.contains_key(&name) {
                    return Err(tensor_err(&f.path, &name, "appears in more than one shard"));
                }
                entries.insert(name, e);
            }
        }
        let integer = |e: &StEntry| {
            matches!(
                e.stored,
                StoredDType::I8 | StoredDType::I32 | StoredDType::I64
            )
        };
        let Some(quant) = quant else {
            if let Some((name, e)) = entries.iter().find(|(_, e)| integer(e)) {
                return Err(Error::Unsupported {
                    path: files[e.file].path.clone(),
                    msg: format!(
                        "tensor '{}': unsupported dtype {:?} (supported: F32, F16, BF16; integer tensors need a quantization_config in config.json)",
                        crate::error::clean(name, crate::error::MAX_NAME_CHARS),
                        e.stored
                    ),
                });
            }
            return Ok((WeightStore::Safetensors { files, entries }, None));
        };
        let main = files
            .first()
            .map(|f| f.path.clone())
            .unwrap_or_else(|| PathBuf::from("?"));
        let names: Vec<String> = entries.keys().cloned().collect();
        let imported = {
            let lookup = |n: &str| {
                entries.get(n).map(|e| Stored {
                    dtype: e.stored,
                    shape: &e.shape,
                    data: &files[e.file].bytes[e.start..e.end],
                    path: &files[e.file].path,
                })
            };
            crate::packed::import(quant, &names, &lookup, &main)?
        };
        let mut summary = crate::packed::ImportSummary {
            config: quant.clone(),
            tensors: Vec::new(),
        };
        for t in imported {
            for p in &t.parts {
                entries.remove(p);
            }
            let len = t.bytes.len();
            files.push(StFile {
                path: t.file.clone(),
                bytes: Bytes::Owned(t.bytes),
            });
            entries.insert(
                t.name.clone(),
                StEntry {
                    file: files.len() - 1,
                    dtype: t.dtype,
                    stored: StoredDType::F32,
                    shape: t.shape,
                    start: 0,
                    end: len,
                },
            );
            summary
                .tensors
                .push((t.name, t.dtype, t.exactness, t.scheme));
        }
        if let Some((name, e)) = entries.iter().find(|(_, e)| integer(e)) {
            return Err(tensor_err(
                &files[e.file].path,
                name,
                format!(
                    "integer tensor ({:?}) that no quantized layer uses",
                    e.stored
                ),
            ));
        }
        Ok((WeightStore::Safetensors { files, entries }, Some(summary)))
    }

    /// Opens a GGUF file and checks that every tensor lies inside it without overlap.
    pub fn open_gguf(path: &Path) -> Result<Self> {
        Self::gguf_from_bytes(path, Bytes::map(path)?)
    }

    /// A GGUF image already in memory; `label` names it in errors.
    pub fn gguf_from_bytes(label: &Path, bytes: Bytes) -> Result<Self> {
        let path = label;
        let content = crate::gguf_reader::read_header(path, &bytes)?;
        let base = content.tensor_data_offset as usize;
        let mut entries = BTreeMap::new();
        let mut spans = Vec::new();
        for (gname, info) in &content.tensor_infos {
            let shape: Vec<usize> = info.shape.dims().to_vec();
            let elems = checked_elems(&shape)
                .ok_or_else(|| tensor_err(path, gname, format!("shape {shape:?} overflows")))?;
            let dtype = match info.ggml_dtype {
                GgmlDType::F32 => WeightDType::F32,
                GgmlDType::F16 => WeightDType::F16,
                GgmlDType::BF16 => WeightDType::BF16,
                q => WeightDType::Quant(q),
            };
            let size = dtype.bytes_for(elems).ok_or_else(|| {
                tensor_err(
                    path,
                    gname,
                    format!("{elems} elements do not fill whole {} blocks", dtype.name()),
                )
            })?;
            let start = (info.offset as usize)
                .checked_add(base)
                .filter(|s| *s <= bytes.len())
                .ok_or_else(|| {
                    tensor_err(path, gname, "data offset is past the end of the file")
                })?;
            let end = start.checked_add(size).filter(|e| *e <= bytes.len()).ok_or_else(|| {
                tensor_err(
                    path,
                    gname,
                    format!(
                        "data ({size} bytes at offset {start}) runs past the end of the file ({} bytes): truncated?",
                        bytes.len()
                    ),
                )
            })?;
            spans.push((start, end, gname.clone()));
            let key = gguf_to_hf(gname).unwrap_or_else(|| gname.clone());
            entries.insert(
                key,
                GgufEntry {
                    gguf_name: gname.clone(),
                    dtype,
                    shape,
                    start,
                    end,
                },
            );
        }
        spans.sort();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(tensor_err(
                    path,
                    &w[1].2,
                    format!("data overlaps tensor '{}'", w[0].2),
                ));
            }
        }
        Ok(WeightStore::Gguf {
            path: path.to_path_buf(),
            bytes,
            content: Box::new(content),
            entries,
        })
    }

    /// The file a tensor lives in (for error messages).
    pub fn path_of(&self, name: &str) -> &Path {
        match self {
            WeightStore::Safetensors { files, entries } => {
                let i = entries.get(name).map(|e| e.file).unwrap_or(0);
                files
                    .get(i)
                    .map(|f| f.path.as_path())
                    .unwrap_or(Path::new("?"))
            }
            WeightStore::Gguf { path, .. } => path,
        }
    }

    /// The main file: the GGUF, or the first safetensors shard.
    pub fn main_path(&self) -> &Path {
        match self {
            WeightStore::Safetensors { files, .. } => files
                .first()
                .map(|f| f.path.as_path())
                .unwrap_or(Path::new("?")),
            WeightStore::Gguf { path, .. } => path,
        }
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self, WeightStore::Gguf { .. })
    }

    /// The free-form `__metadata__` of a safetensors checkpoint's first file (where tandem's
    /// compressed-tensors export records how it was quantized); empty for GGUF.
    pub fn safetensors_metadata(&self) -> HashMap<String, String> {
        match self {
            WeightStore::Safetensors { files, .. } => files
                .first()
                .and_then(|f| safetensors::SafeTensors::read_metadata(&f.bytes).ok())
                .and_then(|(_, m)| m.metadata().clone())
                .unwrap_or_default(),
            WeightStore::Gguf { .. } => HashMap::new(),
        }
    }

    pub fn gguf_metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        match self {
            WeightStore::Gguf { content, .. } => Some(&content.metadata),
            _ => None,
        }
    }

    /// All tensor names (Hugging Face names where one exists), sorted.
    pub fn names(&self) -> Vec<String> {
        match self {
            WeightStore::Safetensors { entries, .. } => entries.keys().cloned().collect(),
            WeightStore::Gguf { entries, .. } => entries.keys().cloned().collect(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            WeightStore::Safetensors { entries, .. } => entries.contains_key(name),
            WeightStore::Gguf { entries, .. } => entries.contains_key(name),
        }
    }

    /// The stored name of a tensor (its GGUF name for GGUF files).
    pub fn stored_name(&self, name: &str) -> String {
        match self {
            WeightStore::Gguf { entries, .. } => entries
                .get(name)
                .map(|e| e.gguf_name.clone())
                .or_else(|| hf_to_gguf(name))
                .unwrap_or_else(|| name.to_string()),
            _ => name.to_string(),
        }
    }

    /// A tensor's bytes, or an error naming the file and tensor when it is absent.
    pub fn get(&self, name: &str) -> Result<RawTensor<'_>> {
        match self {
            WeightStore::Safetensors { files, entries } => {
                let e = entries.get(name).ok_or_else(|| {
                    tensor_err(self.main_path(), name, "missing from the checkpoint")
                })?;
                Ok(RawTensor {
                    name: name.to_string(),
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                    data: &files[e.file].bytes[e.start..e.end],
                })
            }
            WeightStore::Gguf {
                path,
                bytes,
                entries,
                ..
            } => {
                let e = entries.get(name).ok_or_else(|| {
                    tensor_err(path, &self.stored_name(name), "missing from the GGUF file")
                })?;
                Ok(RawTensor {
                    name: name.to_string(),
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                    data: &bytes[e.start..e.end],
                })
            }
        }
    }

    /// Tells the OS this process is done with a tensor's pages, so a pass that streams a
    /// large checkpoint once (quantization) does not keep all of it resident. Best effort:
    /// the pages are read back from the file if the tensor is touched again.
    pub fn release(&self, name: &str) {
        self.release_range(name, 0, usize::MAX);
    }

    /// [`WeightStore::release`] for bytes [from, to) of a tensor's data.
    pub fn release_range(&self, name: &str, from: usize, to: usize) {
        let (bytes, start, end) = match self {
            WeightStore::Safetensors { files, entries } => match entries.get(name) {
                Some(e) => (&files[e.file].bytes, e.start, e.end),
                None => return,
            },
            WeightStore::Gguf { bytes, entries, .. } => match entries.get(name) {
                Some(e) => (bytes, e.start, e.end),
                None => return,
            },
        };
        let (start, end) = (start + from.min(end - start), start + to.min(end - start));
        if let Bytes::Mmap(m) = bytes {
            // Whole pages inside the tensor only, so a neighbour's pages are left alone.
            const PAGE: usize = 4096;
            let (s, e) = (start.div_ceil(PAGE) * PAGE, end / PAGE * PAGE);
            if e > s {
                // SAFETY: the map is a read-only shared file mapping: DONTNEED only drops this
                // process's copy of the pages, which are re-read from the file on next access.
                #[cfg(unix)]
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s, e - s)
                };
            }
        }
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> usize {
        match self {
            WeightStore::Safetensors { entries, .. } => {
                entries.values().map(|e| e.end - e.start).sum()
            }
            WeightStore::Gguf { entries, .. } => entries.values().map(|e| e.end - e.start).sum(),
        }
    }
}

fn checked_elems(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d))
}

/// Reads the shard list of a sharded checkpoint, refusing any file name that is not a plain
/// name inside the model folder (an index must not point the loader elsewhere on disk).
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = crate::files::read_text_capped(index, crate::files::CONFIG_CAP)
        .map_err(|e| io_err(index, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format_err(index, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format_err(index, "no \"weight_map\" object"))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, f) in map {
        let f = f.as_str().ok_or_else(|| {
            format_err(
                index,
                format!("weight_map entry for '{tensor}' is not a string"),
            )
        })?;
        let mut comps = Path::new(f).components();
        let plain = matches!(comps.next(), Some(Component::Normal(_))) && comps.next().is_none();
        if !plain {
            return Err(format_err(
                index,
                format!(
                    "shard '{f}' (for tensor '{tensor}') is not a file inside the model folder; refusing"
                ),
            ));
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    if files.is_empty() {
        return Err(format_err(index, "weight_map is empty"));
    }
    files.sort();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Parses and checks a safetensors header against the file's real size.
fn parse_safetensors(path: &Path, bytes: &[u8], file: usize) -> Result<Vec<(String, StEntry)>> {
    use safetensors::{Dtype, SafeTensors};
    if bytes.len() < 8 {
        return Err(format_err(
            path,
            format!(
                "file is {} bytes, too short for a safetensors header: truncated?",
                bytes.len()
            ),
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
    if n.saturating_add(8) > bytes.len() as u64 {
        return Err(format_err(
            path,
            format!(
                "header length {n} runs past the end of the file ({} bytes): truncated or corrupt",
                bytes.len()
            ),
        ));
    }
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        let hint = match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                " (tensor data does not match the file size: truncated?)"
            }
            safetensors::SafeTensorError::InvalidOffset(_) => {
                " (tensor offsets out of range or overlapping)"
            }
            _ => "",
        };
        format_err(path, format!("invalid safetensors: {e}{hint}"))
    })?;
    let base = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        use crate::packed::StoredDType as S;
        let (dtype, stored) = match info.dtype {
            Dtype::F32 => (WeightDType::F32, S::F32),
            Dtype::F16 => (WeightDType::F16, S::F16),
            Dtype::BF16 => (WeightDType::BF16, S::BF16),
            // Integer parts of a packed quantized layer: never handed out as a tensor.
            Dtype::I8 => (WeightDType::F32, S::I8),
            Dtype::I32 => (WeightDType::F32, S::I32),
            Dtype::I64 => (WeightDType::F32, S::I64),
            other => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    msg: format!(
                        "tensor '{name}': unsupported dtype {other:?} (supported: F32, F16, BF16; I8/I32/I64 in quantized checkpoints)"
                    ),
                })
            }
        };
        let (s, e) = info.data_offsets;
        out.push((
            name,
            StEntry {
                file,
                dtype,
                stored,
                shape: info.shape.clone(),
                start: base + s,
                end: base + e,
            },
        ));
    }
    Ok(out)
}
