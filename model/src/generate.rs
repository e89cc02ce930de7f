//! Plain autoregressive generation: prefill the prompt, then decode one token per forward
//! call until EOS, the token budget, or the context limit.

use crate::error::{Error, Result};
use crate::llama::{HeadRows, KvCache, Llama, Logits};
use crate::sampling::Sampler;
use std::time::{Duration, Instant};

pub use tandem_kernels::sampling::StopReason;

#[derive(Debug, Clone)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt processing, ending with the first sampled token.
    pub prefill: Duration,
    /// Everything after the first token.
    pub decode: Duration,
    pub stop: StopReason,
}

impl GenerationStats {
    pub fn time_to_first_token(&self) -> Duration {
        self.prefill
    }
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill)
    }
    /// Tokens after the first, over the time spent making them.
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.generated_tokens.saturating_sub(1), self.decode)
    }
}

/// Tokens per second, 0 when nothing was timed (no pass ran: not "5e9 tok/s").
fn rate(tokens: usize, time: Duration) -> f64 {
    if tokens == 0 || time.is_zero() {
        0.0
    } else {
        tokens as f64 / time.as_secs_f64()
    }
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` with each new token as
/// soon as it is chosen. EOS tokens end generation and are not passed on.
pub fn generate(
    model: &Llama,
    cache: &mut KvCache,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    eos_ids: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    generate_scored(
        model,
        cache,
        prompt,
        max_tokens,
        sampler,
        eos_ids,
        false,
        |id, _| on_token(id),
    )
}

/// The model's log-probability of `token` under `logits` (a log-softmax of one row).
pub fn log_prob(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    let x = logits
        .get(token as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    (f64::from(x - max) - sum.ln()) as f32
}

/// [`generate`] that also hands `on_token` each token's log-probability under the model
/// (when `score`; else NaN): what an OpenAI-style `logprobs` reports, and how tandem's
/// numbers are compared with another engine's on the same checkpoint.
#[allow(clippy::too_many_arguments)]
pub fn generate_scored(
    model: &Llama,
    cache: &mut KvCache,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    eos_ids: &[u32],
    score: bool,
    mut on_token: impl FnMut(u32, f32) -> Result<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty (no tokens)".into()));
    }
    let start = Instant::now();
    let mut out = Vec::new();
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        generated_tokens: 0,
        prefill: Duration::ZERO,
        decode: Duration::ZERO,
        stop: StopReason::MaxTokens,
    };
    if max_tokens == 0 {
        return Ok((out, stats));
    }
    // Without scores, a row is read only by its draw (the argmax when greedy): the screened
    // head's rows. Scores need every logit.
    let reads = if score {
        HeadRows::All
    } else {
        HeadRows::for_draws(&sampler.params)
    };
    let step = |tokens: &[u32], cache: &mut KvCache| -> Result<Vec<f32>> {
        Ok(model
            .forward_with(tokens, cache, Logits::Last, reads)?
            .into_last())
    };
    let mut row = step(prompt, cache)?;
    // Each token is drawn as a function of its index in the sequence (the cache's length
    // before it): a speculative run with the same seed emits the same tokens
    // (`Sampler::sample_at`).
    let mut next = sampler.sample_at(&row, cache.len());
    stats.prefill = start.elapsed();
    let decode_start = Instant::now();
    loop {
        if eos_ids.contains(&next) {
            stats.stop = StopReason::Eos;
            break;
        }
        out.push(next);
        on_token(
            next,
            if score {
                log_prob(&row, next)
            } else {
                f32::NAN
            },
        )?;
        if out.len() >= max_tokens {
            break;
        }
        if cache.len() >= cache.limit() {
            stats.stop = StopReason::ContextFull;
            break;
        }
        row = step(&[next], cache)?;
        next = sampler.sample_at(&row, cache.len());
    }
    stats.generated_tokens = out.len();
    stats.decode = decode_start.elapsed();
    Ok((out, stats))
}
