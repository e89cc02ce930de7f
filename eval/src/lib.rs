//! tandem's evaluator: what quantization cost, measured the way llama.cpp's `llama-perplexity`
//! measures it, so numbers compare with published tables.
//!
//! Text → chunks ([`chunks::Chunks`], llama-perplexity's cutting) → per-position
//! log-probabilities of the scored half of each chunk ([`scoring::chunk_logprobs`]) →
//! perplexity, and, against the reference's log-probabilities on the same positions (computed
//! once, [`cache::ReferenceCache`]), KL divergence, top-1 agreement and Δp ([`metrics`]);
//! weight error per tensor ([`weights`]); size and speed; all into a [`report::Report`]
//! written as JSON, Markdown and HTML. Evaluation streams one chunk at a time: the logits of a
//! whole text are never held at once.

pub mod cache;
pub mod chunks;
pub mod job;
pub mod metrics;
pub mod report;
pub mod scoring;
pub mod weights;

pub use chunks::Chunks;
pub use metrics::{Divergence, Summary};
pub use report::Report;

use report::{Size, Speed};
use std::path::Path;
use tandem_model::weights::WeightDType;
use tandem_model::{Checkpoint, Error, Llama};

pub type Result<T> = std::result::Result<T, tandem_model::Error>;

/// Bytes, parameters, bits per weight and the share kept at 16+ bits.
pub fn model_size(ck: &Checkpoint) -> Size {
    let (mut params, mut wide) = (0u64, 0u64);
    for n in ck.store.names() {
        if let Ok(t) = ck.store.get(&n) {
            let e = t.elem_count() as u64;
            params += e;
            if !matches!(t.dtype, WeightDType::Quant(_)) {
                wide += e;
            }
        }
    }
    let bytes = ck.store.data_bytes() as u64;
    Size {
        bytes,
        params,
        bits_per_weight: bytes as f64 * 8.0 / params.max(1) as f64,
        share_16bit: wide as f64 / params.max(1) as f64,
    }
}

/// Prefill `pp` tokens and decode `tg` tokens once, on this machine.
pub fn measure_speed(model: &Llama, pp: usize, tg: usize) -> Result<Speed> {
    use tandem_model::bench::{bench_cache, time_decode, time_prefill};
    let mut cache = bench_cache(model, pp.max(tg))?;
    Ok(Speed {
        prefill_tokens: pp,
        prefill_tok_s: pp as f64 / time_prefill(model, &mut cache, pp)?,
        decode_tokens: tg,
        decode_tok_s: tg as f64 / time_decode(model, &mut cache, tg)?,
        threads: rayon::current_num_threads(),
    })
}

/// Refuses a candidate whose tokenizer does not tokenize the text as the reference's does:
/// their distributions would be over different things.
pub fn check_same_tokenizer(
    reference: &Checkpoint,
    candidate: &Checkpoint,
    text: &str,
) -> Result<()> {
    let sample: String = text.chars().take(4000).collect();
    let (a, b) = (
        reference.tokenizer.encode(&sample, false)?,
        candidate.tokenizer.encode(&sample, false)?,
    );
    if reference.config.vocab_size != candidate.config.vocab_size || a != b {
        return Err(Error::Format {
            path: candidate.path.clone(),
            msg: format!(
                "tokenizer differs from the reference's ({}): vocabularies of {} and {} tokens, {} vs {} tokens on the text",
                reference.path.display(),
                candidate.config.vocab_size,
                reference.config.vocab_size,
                b.len(),
                a.len()
            ),
        });
    }
    Ok(())
}

/// Runs a candidate over every chunk against the cached reference: (perplexity, divergence).
pub fn evaluate(
    candidate: &Llama,
    reference: &mut cache::ReferenceCache,
    chunks: &Chunks,
    progress: &dyn Fn(usize, usize),
) -> Result<(f64, Divergence)> {
    let mut d = Divergence::default();
    for c in 0..chunks.chunks.len() {
        let (r, exact) = reference.chunk(c)?;
        let q = scoring::chunk_logprobs(candidate, chunks, c)?;
        d.add(&r, &q, chunks.scored_targets(c), Some(&exact));
        progress(c + 1, chunks.chunks.len());
    }
    Ok((d.ppl_candidate(), d))
}

/// The reference's own perplexity, from the cache (exact target log-probs).
pub fn reference_perplexity(reference: &mut cache::ReferenceCache) -> Result<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for c in 0..reference.chunks {
        let (_, t) = reference.chunk(c)?;
        sum -= t.iter().map(|&x| x as f64).sum::<f64>();
        n += t.len();
    }
    Ok((sum / n.max(1) as f64).exp())
}

/// Writes report.json, report.md and report.html into `dir`, each atomically.
pub fn write_report(dir: &Path, report: &Report) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.to_path_buf(),
        msg: e.to_string(),
    })?;
    let json = serde_json::to_string_pretty(report).map_err(|e| Error::Invalid(e.to_string()))?;
    for (name, text) in [
        ("report.json", json),
        ("report.md", report.markdown()),
        ("report.html", report.html()),
    ] {
        let path = dir.join(name);
        tandem_model::export::write_file_atomically(&path, true, |w| {
            std::io::Write::write_all(w, text.as_bytes()).map_err(|e| Error::Io {
                path: path.clone(),
                msg: e.to_string(),
            })
        })?;
    }
    Ok(())
}
