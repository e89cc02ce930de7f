//! `tandem calibrate`: run the model over calibration text and record, for every linear layer,
//! the mean squared activation entering each input column — the importance matrix that
//! importance-weighted quantization uses (llama.cpp's `llama-imatrix`, same chunking).

use crate::error::{Error, Result};
use crate::imatrix::{ImportanceEntry, ImportanceMatrix};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tandem_model::gguf_names::hf_to_gguf;
use tandem_model::{ActivationObserver, Checkpoint, Llama, Logits};

/// How much text to run, and in what pieces.
#[derive(Debug, Clone)]
pub struct CalibrationOptions {
    /// Tokens per chunk (llama-imatrix's default is 512).
    pub ctx: usize,
    /// Stop after this many chunks (None: the whole text).
    pub chunks: Option<usize>,
    /// Recorded in the file's `imatrix.datasets`.
    pub dataset: String,
}

/// Sums of squared inputs per weight, in f64 so long runs do not lose precision.
#[derive(Default)]
struct Collector {
    sums: Mutex<BTreeMap<String, (Vec<f64>, u64)>>,
}

impl ActivationObserver for Collector {
    fn observe(&self, weights: &[String], x: &Tensor) -> tandem_model::Result<()> {
        // One pass over the input for every weight that shares it (q/k/v, gate/up).
        let rows: Vec<Vec<f32>> = x.to_vec2()?;
        let cols = rows.first().map(Vec::len).unwrap_or(0);
        let mut sum2 = vec![0f64; cols];
        for r in &rows {
            for (s, v) in sum2.iter_mut().zip(r) {
                *s += (*v as f64) * (*v as f64);
            }
        }
        let mut sums = self.sums.lock().unwrap_or_else(|p| p.into_inner());
        for w in weights {
            let e = sums
                .entry(w.clone())
                .or_insert_with(|| (vec![0.0; cols], 0));
            for (s, v) in e.0.iter_mut().zip(&sum2) {
                *s += v;
            }
            e.1 += rows.len() as u64;
        }
        Ok(())
    }
}

/// Runs `text` through the model in chunks of `opts.ctx` tokens (each chunk starts with BOS
/// where the tokenizer adds one, as llama-imatrix does) and returns the importance matrix,
/// keyed by GGUF tensor names. `progress(done, total)` is called after each chunk.
pub fn calibrate(
    ck: &Checkpoint,
    model: &Llama,
    text: &str,
    opts: &CalibrationOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<ImportanceMatrix> {
    // As llama-imatrix does: the whole text tokenized once (with BOS where the vocabulary
    // adds one), cut into chunks, and each chunk's first token replaced by BOS.
    let tokens = ck.tokenizer.encode(text, ck.tokenizer.add_bos)?;
    let ctx = opts.ctx.min(ck.config.context_length());
    if ctx < 2 {
        return Err(Error::Plan(format!("--ctx {ctx} is too small")));
    }
    let available = tokens.len() / ctx;
    if available == 0 {
        return Err(Error::Plan(format!(
            "calibration text has {} tokens, fewer than one chunk of {ctx}",
            tokens.len()
        )));
    }
    let n_chunks = opts.chunks.map_or(available, |c| c.min(available));
    let collector = Collector::default();
    let chunks = crate::calibrated::cut_chunks(
        &tokens,
        ctx,
        Some(n_chunks),
        crate::calibrated::chunk_bos(ck),
    );
    for (c, chunk) in chunks.iter().enumerate() {
        let mut cache = model.new_cache_with_limit(ctx)?;
        model.forward_observed(chunk, &mut cache, Logits::Last, Some(&collector))?;
        progress(c + 1, n_chunks);
    }
    let sums = collector
        .sums
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let mut m = ImportanceMatrix {
        datasets: vec![opts.dataset.clone()],
        chunk_count: n_chunks as u32,
        chunk_size: ctx as u32,
        ..Default::default()
    };
    for (hf, (sum2, count)) in sums {
        // Only weights the file has (a tied model has no separate output head).
        if !ck.store.contains(&hf) {
            continue;
        }
        let Some(g) = hf_to_gguf(&hf) else { continue };
        m.entries.insert(
            g,
            ImportanceEntry {
                sum2: sum2.into_iter().map(|s| s as f32).collect(),
                count: count as f32,
            },
        );
    }
    Ok(m)
}
