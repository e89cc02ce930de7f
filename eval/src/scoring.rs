//! Running a model over one chunk and keeping the log-probabilities of the scored positions.

use crate::chunks::Chunks;
use crate::Result;
use rayon::prelude::*;
use tandem_model::{Llama, Logits};

/// Natural-log softmax of one logit row, computed in f64 for the normaliser.
pub fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    row.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// Log-probabilities ([scored positions][vocab]) of chunk `c`.
pub fn chunk_logprobs(model: &Llama, chunks: &Chunks, c: usize) -> Result<Vec<Vec<f32>>> {
    let input = &chunks.chunks[c];
    let mut cache = model.new_cache_with_limit(input.len())?;
    let logits = model.forward(input, &mut cache, Logits::All)?;
    let first = chunks.first;
    let n = chunks.scored_per_chunk();
    let rows: Vec<&[f32]> = logits.rows().skip(first).take(n).collect();
    Ok(rows.par_iter().map(|r| log_softmax(r)).collect())
}

/// Negative log-likelihood of each scored target given the chunk's log-probabilities.
pub fn nll(logprobs: &[Vec<f32>], targets: &[u32]) -> Vec<f64> {
    logprobs
        .iter()
        .zip(targets)
        .map(|(lp, &t)| -(lp.get(t as usize).copied().unwrap_or(f32::NEG_INFINITY) as f64))
        .collect()
}

/// Perplexity over all chunks, streaming one chunk at a time. `progress(done, total)`.
pub fn perplexity(model: &Llama, chunks: &Chunks, progress: &dyn Fn(usize, usize)) -> Result<f64> {
    let mut sum = 0f64;
    let mut count = 0usize;
    for c in 0..chunks.chunks.len() {
        let lp = chunk_logprobs(model, chunks, c)?;
        let l = nll(&lp, chunks.scored_targets(c));
        sum += l.iter().sum::<f64>();
        count += l.len();
        progress(c + 1, chunks.chunks.len());
    }
    Ok((sum / count.max(1) as f64).exp())
}
