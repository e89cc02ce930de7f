//! tandem's own `Llama` as a verifier or a drafter.

use crate::drafter::{Draft, Drafter};
use crate::{Result, Verifier};
use tandem_model::{argmax, KvCache, Llama, Logits, Sampler};

/// A model and one sequence's cache, verifying k+1 tokens per forward call.
pub struct ModelVerifier<'m> {
    pub model: &'m Llama,
    pub cache: KvCache,
}

impl<'m> ModelVerifier<'m> {
    pub fn new(model: &'m Llama, limit: Option<usize>) -> Result<Self> {
        let cache = match limit {
            Some(n) => model.new_cache_with_limit(n)?,
            None => model.new_cache()?,
        };
        Ok(ModelVerifier { model, cache })
    }
}

impl Verifier for ModelVerifier<'_> {
    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let logits = self.model.forward(tokens, &mut self.cache, Logits::All)?;
        Ok(tandem_model::llama::all_rows(&logits)?)
    }
    fn rollback(&mut self, len: usize) {
        self.cache.truncate(len);
    }
    fn len(&self) -> usize {
        self.cache.len()
    }
    fn limit(&self) -> usize {
        self.cache.limit()
    }
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }
    fn forward_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let l = self.model.forward(tokens, &mut self.cache, Logits::Last)?;
        Ok(tandem_model::llama::last_row(&l)?)
    }
}

/// A (smaller or quantized) model proposing tokens autoregressively. With a sampler it samples
/// (and reports the distributions it sampled from); without, it proposes its greedy tokens.
/// Any [`Verifier`]-shaped model drafts: tandem's own ([`ModelDrafter::new`]) or an engine's
/// (the C ABI wraps the engine's callbacks as one).
pub struct ModelDrafter<V: Verifier> {
    pub model: V,
    /// The tokens the model's context holds, to find what to keep when the context moves on;
    /// `fed[0]` is `context[offset]`.
    fed: Vec<u32>,
    offset: usize,
    sampler: Option<Sampler>,
    /// Most tokens read when the draft first sees a prompt (the last ones).
    pub first_window: usize,
    /// When the draft has fallen behind by more than this (speculation was off for a while),
    /// it restarts from the last `catch_up_window` tokens instead of reading every one it
    /// missed: reading them all cost ~25% of plain decoding with a self-draft, speculation
    /// on or off (every token went through the draft at prefill speed).
    pub catch_up_window: usize,
}

impl<'m> ModelDrafter<ModelVerifier<'m>> {
    pub fn new(model: &'m Llama, sampler: Option<Sampler>) -> Result<Self> {
        Ok(Self::over(ModelVerifier::new(model, None)?, sampler))
    }
}

impl<V: Verifier> ModelDrafter<V> {
    pub fn over(model: V, sampler: Option<Sampler>) -> Self {
        ModelDrafter {
            model,
            fed: Vec::new(),
            offset: 0,
            sampler,
            first_window: 64,
            catch_up_window: 4,
        }
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let l = self.model.forward_last(tokens)?;
        self.fed.extend_from_slice(tokens);
        Ok(l)
    }
}

impl<V: Verifier> Drafter for ModelDrafter<V> {
    fn propose(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        // Keep the cached part the context still shares; feed the rest, or restart from a
        // window of the latest tokens when the rest is long.
        let mut keep = match context.get(self.offset..) {
            Some(c) if !c.is_empty() => self
                .fed
                .iter()
                .zip(c)
                .take_while(|(a, b)| a == b)
                .count()
                .min(c.len() - 1),
            _ => 0,
        };
        let window = if keep == 0 {
            // Nothing shared (a new prompt, or the first call): start from the beginning.
            self.offset = 0;
            self.first_window
        } else {
            self.catch_up_window
        };
        let missing = context.len() - self.offset - keep;
        if missing > window.max(1) {
            self.offset = context.len() - window.max(1);
            keep = 0;
        }
        self.fed.truncate(keep);
        self.model.rollback(keep);
        let room = self
            .model
            .limit()
            .saturating_sub(context.len() - self.offset);
        let k = k.min(room);
        let mut draft = Draft {
            tokens: Vec::with_capacity(k),
            probs: self.sampler.as_ref().map(|_| Vec::with_capacity(k)),
        };
        if k == 0 {
            return Ok(draft);
        }
        let mut logits = self.feed(&context[self.offset + keep..])?;
        for i in 0..k {
            let t = match (&mut self.sampler, &mut draft.probs) {
                (Some(s), Some(probs)) => {
                    let p = s.distribution(&logits);
                    let t = s.sample_from(&p);
                    probs.push(p);
                    t
                }
                _ => argmax(&logits),
            };
            draft.tokens.push(t);
            if i + 1 < k {
                logits = self.feed(&[t])?;
            }
        }
        Ok(draft)
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.model.vocab_size())
    }
}
