//! tandem's own `Llama` as a verifier or a drafter.

use crate::drafter::{Draft, Drafter};
use crate::{Error, Result, Verifier};
use std::cell::RefCell;
use std::rc::Rc;
use tandem_model::{argmax, KvCache, Llama, Logits, Sampler};

/// A model and one sequence's cache, verifying k+1 tokens per forward call. The cache is
/// shared (single-threaded) so that a [`SharedCacheDrafter`] can draft over it.
pub struct ModelVerifier<'m> {
    pub model: &'m Llama,
    pub cache: Rc<RefCell<KvCache>>,
}

impl<'m> ModelVerifier<'m> {
    pub fn new(model: &'m Llama, limit: Option<usize>) -> Result<Self> {
        let cache = match limit {
            Some(n) => model.new_cache_with_limit(n)?,
            None => model.new_cache()?,
        };
        Ok(ModelVerifier {
            model,
            cache: Rc::new(RefCell::new(cache)),
        })
    }
}

impl Verifier for ModelVerifier<'_> {
    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut cache = self.cache.borrow_mut();
        let logits = self.model.forward(tokens, &mut cache, Logits::All)?;
        Ok(tandem_model::llama::all_rows(&logits)?)
    }
    fn rollback(&mut self, len: usize) {
        self.cache.borrow_mut().truncate(len);
    }
    fn len(&self) -> usize {
        self.cache.borrow().len()
    }
    fn limit(&self) -> usize {
        self.cache.borrow().limit()
    }
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }
    fn forward_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.cache.borrow_mut();
        let l = self.model.forward(tokens, &mut cache, Logits::Last)?;
        Ok(tandem_model::llama::last_row(&l)?)
    }
}

/// Picks the next draft token from `logits`: sampled (its distribution pushed to `probs`)
/// with a sampler, the argmax without; `None` when the draft's most likely token has less
/// than `min_confidence` probability (drafting stops there).
fn pick_draft_token(
    sampler: &mut Option<Sampler>,
    probs: &mut Option<Vec<Vec<f32>>>,
    logits: &[f32],
    min_confidence: f32,
) -> Option<u32> {
    match (sampler, probs) {
        (Some(s), Some(probs)) => {
            let p = s.distribution(logits);
            if p.iter().copied().fold(0.0f32, f32::max) < min_confidence {
                return None;
            }
            let t = s.sample_from(&p);
            probs.push(p);
            Some(t)
        }
        _ => {
            let t = argmax(logits);
            (min_confidence <= 0.0 || top_probability(logits, t) >= min_confidence).then_some(t)
        }
    }
}

/// Drafts with a model of the verifier's shape (a quantized copy of it: `self:<type>`) over
/// the verifier's own KV cache: the draft reads the verified context through the verifier's
/// keys and values and computes its own only for the tokens it proposes, which it removes
/// again before the verifier runs. So it never reads the prompt, never falls behind while
/// speculation is off (a probe costs k draft steps, not a catch-up over the missed tokens),
/// and each step feeds one token. The context it sees is the verifier's, not its own; that
/// changes what it proposes, never the output, which the verifier decides.
pub struct SharedCacheDrafter<'m> {
    model: &'m Llama,
    cache: Rc<RefCell<KvCache>>,
    sampler: Option<Sampler>,
    /// As [`ModelDrafter::min_confidence`].
    pub min_confidence: f32,
}

impl<'m> SharedCacheDrafter<'m> {
    /// Fails when `draft` cannot use `verifier`'s cache (layers, KV heads, head size, RoPE).
    pub fn new(
        draft: &'m Llama,
        verifier: &ModelVerifier<'_>,
        sampler: Option<Sampler>,
    ) -> Result<Self> {
        if !draft.shares_cache_shape_with(verifier.model) {
            return Err(Error::Mismatch(
                "the draft model's layers, KV heads, head size or RoPE differ from the verifier's: it cannot draft over the verifier's cache".into(),
            ));
        }
        Ok(SharedCacheDrafter {
            model: draft,
            cache: Rc::clone(&verifier.cache),
            sampler,
            min_confidence: 0.0,
        })
    }
}

impl Drafter for SharedCacheDrafter<'_> {
    fn propose(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        let mut draft = Draft {
            tokens: Vec::with_capacity(k),
            probs: self.sampler.as_ref().map(|_| Vec::with_capacity(k)),
        };
        let mut cache = self.cache.borrow_mut();
        let base = cache.len();
        // The verifier holds every context token but the last (the decoder's invariant);
        // anything else (a caller driving it differently) gets no draft rather than one
        // built on a context the cache does not hold.
        let (Some(&last), true) = (context.last(), base + 1 == context.len()) else {
            return Ok(draft);
        };
        let k = k.min(cache.limit().saturating_sub(base + 1));
        let mut token = last;
        let mut result = Ok(());
        for i in 0..k {
            let logits = match self
                .model
                .forward(&[token], &mut cache, Logits::Last)
                .and_then(|l| tandem_model::llama::last_row(&l))
            {
                Ok(l) => l,
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            };
            match pick_draft_token(
                &mut self.sampler,
                &mut draft.probs,
                &logits,
                self.min_confidence,
            ) {
                Some(t) => draft.tokens.push(t),
                None => break,
            }
            token = draft.tokens[i];
        }
        // Leave the cache as the verifier left it.
        cache.truncate(base);
        result.map(|()| draft)
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.model.config.vocab_size)
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
    /// Stop drafting when the draft's most likely next token has less than this probability
    /// (0 = always draft k): an unsure draft is usually a rejected one, and each drafted
    /// token costs a draft step and a verification row. The stopping rule reads only the
    /// draft's own distribution, so greedy output and the sampled distribution stay the
    /// verifier's (llama.cpp's `--draft-p-min`).
    pub min_confidence: f32,
}

/// softmax(logits)[top] where `top` is the largest logit: 1 / Σ exp(lᵢ − l_top).
fn top_probability(logits: &[f32], top: u32) -> f32 {
    let m = logits[top as usize];
    1.0 / logits.iter().map(|&l| (l - m).exp()).sum::<f32>()
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
            catch_up_window: 16,
            min_confidence: 0.0,
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
            let Some(t) = pick_draft_token(
                &mut self.sampler,
                &mut draft.probs,
                &logits,
                self.min_confidence,
            ) else {
                break;
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
