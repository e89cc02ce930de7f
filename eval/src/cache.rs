//! The reference pass, run once and kept on disk: for every scored position, the reference
//! model's log-probabilities over the whole vocabulary, so any number of candidates (and
//! re-runs) compare against it without running the reference again.
//!
//! Stored as llama-perplexity's `--kl-divergence-base` file does it, 16 bits per log-prob: per
//! position an f32 minimum and step and u16 levels (absolute error ≤ step/2, about 2e-4 nats),
//! plus the exact f32 log-prob of the actual next token. A key made from the reference's files,
//! the text and the chunking is checked on open; a mismatch means "recompute". Each chunk's
//! rows end in a checksum, all checked on open: a damaged file (one byte flipped every KB
//! gave a mean KLD of 5.6·10¹⁰ for a model against itself, silently) is recomputed too.

use crate::chunks::Chunks;
use crate::Result;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tandem_model::{Checkpoint, Error, Llama};

/// Version 2 added the per-chunk checksums.
const MAGIC: &[u8; 8] = b"TNDMREF2";
/// Bytes of a chunk's checksum, after its rows.
const CHECKSUM_BYTES: usize = 8;

/// What identifies a reference pass: model files, text, chunking.
pub fn cache_key(reference: &Checkpoint, text: &str, chunks: &Chunks) -> String {
    let mut files = vec![reference.store.main_path().to_path_buf()];
    if reference.path.is_dir() {
        files = std::fs::read_dir(&reference.path)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
    }
    let mut h = Fnv::default();
    for f in &files {
        h.write(f.to_string_lossy().as_bytes());
        if let Ok(m) = std::fs::metadata(f) {
            h.write(&m.len().to_le_bytes());
            if let Ok(t) = m.modified() {
                if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
                    h.write(&d.as_nanos().to_le_bytes());
                }
            }
        }
    }
    let model = h.0;
    let mut t = Fnv::default();
    t.write(text.as_bytes());
    format!(
        "model={model:016x} text={:016x} ctx={} chunks={} vocab={}",
        t.0,
        chunks.ctx,
        chunks.chunks.len(),
        reference.config.vocab_size
    )
}

/// FNV-1a, 64-bit: a stable hash for cache keys (std's hasher may change between releases).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    /// One step: `value` (a byte, or a chunk checksum's word) folded in.
    fn step(&mut self, value: u64) {
        self.0 ^= value;
        self.0 = self.0.wrapping_mul(Self::PRIME);
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.step(b as u64);
        }
    }
}

/// A chunk's checksum: FNV-1a's step taken over little-endian 64-bit words (eight times
/// FNV's byte rate; a chunk of SmolLM2's rows is 25 MB), the tail bytewise. It guards against
/// damage, not tampering: the file is tandem's own, in the user's report folder.
fn chunk_checksum(bytes: &[u8]) -> u64 {
    let mut h = Fnv::default();
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    for w in words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h.step(u64::from_le_bytes(b));
    }
    h.write(tail);
    h.0
}

/// An open cache file: positions of one chunk are read on demand.
pub struct ReferenceCache {
    path: PathBuf,
    file: BufReader<std::fs::File>,
    data_start: u64,
    vocab: usize,
    per_chunk: usize,
    pub chunks: usize,
}

fn row_bytes(vocab: usize) -> usize {
    12 + 2 * vocab
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

impl ReferenceCache {
    /// Opens `path` if it holds a complete, undamaged pass for `key`; None if absent, stale,
    /// partial or damaged (every chunk's checksum is checked here, reading the file once).
    pub fn open(path: &Path, key: &str, chunks: &Chunks, vocab: usize) -> Option<Self> {
        // Only a regular file is a cache (opening a named pipe would wait for a writer).
        if !std::fs::metadata(path).ok()?.is_file() {
            return None;
        }
        let f = std::fs::File::open(path).ok()?;
        let len = f.metadata().ok()?.len();
        let mut r = BufReader::new(f);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).ok()?;
        let mut n = [0u8; 4];
        r.read_exact(&mut n).ok()?;
        // The stored key's length is compared before it sizes a buffer.
        if &magic != MAGIC || u32::from_le_bytes(n) as usize != key.len() {
            return None;
        }
        let mut k = vec![0u8; key.len()];
        r.read_exact(&mut k).ok()?;
        if k != key.as_bytes() {
            return None;
        }
        let data_start = 12 + k.len() as u64;
        let per_chunk = chunks.scored_per_chunk();
        let chunk_bytes = per_chunk * row_bytes(vocab);
        let want = data_start + (chunks.chunks.len() * (chunk_bytes + CHECKSUM_BYTES)) as u64;
        if len != want {
            return None;
        }
        let mut buf = vec![0u8; chunk_bytes + CHECKSUM_BYTES];
        for _ in 0..chunks.chunks.len() {
            r.read_exact(&mut buf).ok()?;
            let (rows, sum) = buf.split_at(chunk_bytes);
            if chunk_checksum(rows).to_le_bytes() != sum {
                return None;
            }
        }
        Some(ReferenceCache {
            path: path.to_path_buf(),
            file: r,
            data_start,
            vocab,
            per_chunk,
            chunks: chunks.chunks.len(),
        })
    }

    /// Runs the reference over every chunk and writes the cache (atomically), calling
    /// `progress(done, total)` after each chunk.
    pub fn build(
        path: &Path,
        key: &str,
        model: &Llama,
        chunks: &Chunks,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Self> {
        tandem_model::export::check_replaceable(path)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let (tmp, guard) = tandem_model::pending::Pending::temp_file_in(
            tempfile::Builder::new().prefix(".reference-cache."),
            dir,
        )
        .map_err(|e| io(dir, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, tmp);
        w.write_all(MAGIC).map_err(|e| io(path, e))?;
        w.write_all(&(key.len() as u32).to_le_bytes())
            .map_err(|e| io(path, e))?;
        w.write_all(key.as_bytes()).map_err(|e| io(path, e))?;
        let mut rows = Vec::new();
        for c in 0..chunks.chunks.len() {
            let lp = crate::scoring::chunk_logprobs(model, chunks, c)?;
            rows.clear();
            for (row, &t) in lp.iter().zip(chunks.scored_targets(c)) {
                rows.extend_from_slice(&encode_row(row, t));
            }
            w.write_all(&rows).map_err(|e| io(path, e))?;
            w.write_all(&chunk_checksum(&rows).to_le_bytes())
                .map_err(|e| io(path, e))?;
            progress(c + 1, chunks.chunks.len());
        }
        let tmp = w.into_inner().map_err(|e| io(path, e.error()))?;
        guard
            .commit(|| tmp.persist(path))
            .map_err(|e| io(path, e.error))?;
        ReferenceCache::open(path, key, chunks, model.config.vocab_size)
            .ok_or_else(|| io(path, "cache written but unreadable (internal error)"))
    }

    /// The reference's log-probabilities ([positions][vocab]) and its exact log-prob of each
    /// actual next token, for chunk `c`.
    pub fn chunk(&mut self, c: usize) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
        let rb = row_bytes(self.vocab);
        let at = self.data_start + (c * (self.per_chunk * rb + CHECKSUM_BYTES)) as u64;
        self.file
            .seek(SeekFrom::Start(at))
            .map_err(|e| io(&self.path, e))?;
        let mut buf = vec![0u8; self.per_chunk * rb];
        self.file
            .read_exact(&mut buf)
            .map_err(|e| io(&self.path, e))?;
        Ok(buf
            .chunks_exact(rb)
            .map(|r| decode_row(r, self.vocab))
            .unzip())
    }
}

fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn encode_row(row: &[f32], target: u32) -> Vec<u8> {
    let min = row.iter().copied().fold(f32::INFINITY, f32::min).max(-1e4);
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let step = ((max - min) / 65535.0).max(1e-12);
    let mut out = Vec::with_capacity(row_bytes(row.len()));
    out.extend_from_slice(&min.to_le_bytes());
    out.extend_from_slice(&step.to_le_bytes());
    let t = row
        .get(target as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    out.extend_from_slice(&t.to_le_bytes());
    for &x in row {
        let q = ((x.max(min) - min) / step).round().clamp(0.0, 65535.0) as u16;
        out.extend_from_slice(&q.to_le_bytes());
    }
    out
}

fn decode_row(b: &[u8], vocab: usize) -> (Vec<f32>, f32) {
    let (min, step, t) = (f32_at(b, 0), f32_at(b, 4), f32_at(b, 8));
    let row = b[12..12 + 2 * vocab]
        .chunks_exact(2)
        .map(|q| min + step * u16::from_le_bytes([q[0], q[1]]) as f32)
        .collect();
    (row, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_within_half_a_step() {
        let row: Vec<f32> = (0..1000).map(|i| -(i as f32) * 0.025).collect();
        let (back, t) = decode_row(&encode_row(&row, 7), row.len());
        assert_eq!(t, row[7]);
        let step = 25.0 / 65535.0;
        for (a, b) in row.iter().zip(&back) {
            assert!((a - b).abs() <= step * 0.51 + 1e-6, "{a} vs {b}");
        }
    }
}
