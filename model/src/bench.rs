//! Speed measurement in llama-bench's terms: `pp N` (prefill N tokens into an empty cache) and
//! `tg N` (decode N tokens one at a time), in tokens per second.

use crate::error::{Error, Result};
use crate::llama::{KvCache, Llama, Logits};
use std::time::Instant;

/// Deterministic, vocabulary-spread token ids (llama-bench also feeds arbitrary tokens).
fn tokens(model: &Llama, n: usize) -> Vec<u32> {
    let v = model.config.vocab_size as u64;
    (0..n as u64)
        .map(|i| ((i * 7919 + 13) % v) as u32)
        .collect()
}

/// A cache for [`time_prefill`] / [`time_decode`] of `n` tokens, kept across repetitions: as
/// llama-bench keeps its context and clears it between runs, the cache's pages are touched
/// by the warm-up run and not faulted in again inside every timed one.
pub fn bench_cache(model: &Llama, n: usize) -> Result<KvCache> {
    model.new_cache_with_limit(n.saturating_add(1))
}

/// `needed` positions fit `cache` (checked before the token ids are made: `--pp 10⁹` asked
/// for 4 GB of them before the forward pass said the context was full).
fn check_fits(cache: &KvCache, needed: usize) -> Result<()> {
    if needed > cache.limit() {
        return Err(Error::ContextFull {
            needed,
            limit: cache.limit(),
        });
    }
    Ok(())
}

/// Seconds to prefill `n` tokens into `cache`, emptied first (logits for the last position
/// only).
pub fn time_prefill(model: &Llama, cache: &mut KvCache, n: usize) -> Result<f64> {
    check_fits(cache, n)?;
    let toks = tokens(model, n);
    cache.truncate(0);
    let t = Instant::now();
    model.forward(&toks, cache, Logits::Last)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds to decode `n` tokens one by one into `cache` (emptied first) after a single
/// starting token.
pub fn time_decode(model: &Llama, cache: &mut KvCache, n: usize) -> Result<f64> {
    check_fits(cache, n.saturating_add(1))?;
    let toks = tokens(model, n + 1);
    cache.truncate(0);
    model.forward(&toks[..1], cache, Logits::Last)?;
    let t = Instant::now();
    for &tok in &toks[1..] {
        model.forward(&[tok], cache, Logits::Last)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds for `passes` forward calls of `k` tokens each, every one against the same
/// `context`-token cache and rolled back afterwards: the cost of a speculative verification
/// pass (k = drafted tokens + 1). k = 1 is plain decode at that context.
pub fn time_verify(model: &Llama, k: usize, context: usize, passes: usize) -> Result<f64> {
    let needed = context.saturating_add(k);
    let mut cache = model.new_cache_with_limit(needed)?;
    check_fits(&cache, needed)?;
    let toks = tokens(model, needed);
    model.forward(&toks[..context], &mut cache, Logits::Last)?;
    let t = Instant::now();
    for _ in 0..passes {
        model.forward(&toks[context..], &mut cache, Logits::All)?;
        cache.truncate(context);
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Mean and standard deviation of tokens/s over repetitions.
pub fn rate_stats(n: usize, secs: &[f64]) -> (f64, f64) {
    let rates: Vec<f64> = secs.iter().map(|s| n as f64 / s.max(1e-12)).collect();
    let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    let var = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len().max(1) as f64;
    (mean, var.sqrt())
}
