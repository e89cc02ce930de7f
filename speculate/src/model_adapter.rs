//! tandem's own `Llama` as a verifier or a drafter (feature `model`, on by default).

use crate::batch::BatchVerifier;
use crate::drafter::{ungated, Draft, DraftChain, DraftGate, Drafter, ModelDrafter};
use crate::{Error, Result, Verifier};
use std::cell::RefCell;
use std::rc::Rc;
use tandem_model::{HeadRows, KvCache, Llama, Logits};

/// A model and one sequence's cache, verifying k+1 tokens per forward call. The cache is
/// shared (single-threaded) so that a [`SharedCacheDrafter`] can draft over it.
pub struct ModelVerifier<'m> {
    pub model: &'m Llama,
    pub cache: Rc<RefCell<KvCache>>,
    /// What the acceptance rule reads of each row: every logit (the default), or only its
    /// argmax, its position-keyed draw or its top-k distribution, which
    /// [`Llama::forward_with`] then computes for the candidates alone (−∞ for tokens that
    /// cannot matter); see [`ModelVerifier::reads`].
    pub reads: HeadRows,
}

impl<'m> ModelVerifier<'m> {
    pub fn new(model: &'m Llama, limit: Option<usize>) -> Result<Self> {
        let cache = model.new_cache_limited(limit)?;
        Ok(ModelVerifier {
            model,
            cache: Rc::new(RefCell::new(cache)),
            reads: HeadRows::All,
        })
    }

    /// A verifier over a cache the caller already filled (a chat's earlier turns): the next
    /// run continues after what it holds. [`ModelVerifier::into_cache`] gives it back.
    pub fn from_cache(model: &'m Llama, cache: KvCache) -> Self {
        ModelVerifier {
            model,
            cache: Rc::new(RefCell::new(cache)),
            reads: HeadRows::All,
        }
    }

    /// The cache, once no drafter shares it any more.
    pub fn into_cache(self) -> Result<KvCache> {
        Rc::try_unwrap(self.cache)
            .map(RefCell::into_inner)
            .map_err(|_| {
                Error::Mismatch("the verifier's KV cache is still shared with a drafter".into())
            })
    }

    /// Verifies with rows for `reads`: `HeadRows::Argmax` for a greedy rule,
    /// `HeadRows::Draw` for coupled sampling (it reads each row's position-keyed draw),
    /// `HeadRows::TopK` for either sampling rule with top-k; rejection sampling otherwise
    /// needs every logit ([`crate::session::verifier_reads`] chooses).
    pub fn reads(mut self, reads: HeadRows) -> Self {
        self.reads = reads;
        self
    }
}

impl Verifier for ModelVerifier<'_> {
    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut cache = self.cache.borrow_mut();
        let logits = self
            .model
            .forward_with(tokens, &mut cache, Logits::All, self.reads)?;
        Ok(logits.to_vecs())
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
        Ok(self
            .model
            .forward_with(tokens, &mut cache, Logits::Last, self.reads)?
            .into_last())
    }
    fn fill(&mut self, tokens: &[u32]) -> Result<()> {
        let mut cache = self.cache.borrow_mut();
        self.model
            .forward_with(tokens, &mut cache, Logits::None, self.reads)
            .map(drop)
            .map_err(Into::into)
    }
    fn scores_trees(&self) -> bool {
        !self.model.runs_on_gpu()
    }
    fn verify_tree(&mut self, tokens: &[u32], parents: &[Option<usize>]) -> Result<Vec<Vec<f32>>> {
        let mut cache = self.cache.borrow_mut();
        Ok(self
            .model
            .forward_tree_with(tokens, parents, &mut cache, self.reads)?
            .to_vecs())
    }
    fn keep(&mut self, base: usize, rows: &[usize]) -> Result<()> {
        let mut cache = self.cache.borrow_mut();
        Ok(self.model.keep_cache_rows(&mut cache, base, rows)?)
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
    /// As [`ModelDrafter::chain`].
    pub chain: DraftChain,
}

impl<'m> SharedCacheDrafter<'m> {
    /// Fails when `draft` cannot use `verifier`'s cache (layers, KV heads, head size, RoPE).
    pub fn new(
        draft: &'m Llama,
        verifier: &ModelVerifier<'_>,
        chain: impl Into<DraftChain>,
    ) -> Result<Self> {
        if !draft.shares_cache_shape_with(verifier.model) {
            return Err(Error::Mismatch(
                "the draft model's layers, KV heads, head size or RoPE differ from the verifier's: it cannot draft over the verifier's cache".into(),
            ));
        }
        Ok(SharedCacheDrafter {
            model: draft,
            cache: Rc::clone(&verifier.cache),
            chain: chain.into(),
        })
    }
}

impl Drafter for SharedCacheDrafter<'_> {
    fn propose(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        self.propose_gated(context, k, &mut ungated)
    }
    fn propose_gated(
        &mut self,
        context: &[u32],
        k: usize,
        gate: &mut DraftGate<'_>,
    ) -> Result<Draft> {
        let mut cache = self.cache.borrow_mut();
        let base = cache.len();
        // The verifier holds every context token but the last (the decoder's invariant);
        // anything else (a caller driving it differently) gets no draft rather than one
        // built on a context the cache does not hold.
        let (Some(last), true) = (context.last(), base + 1 == context.len()) else {
            return self
                .chain
                .propose(context, 0, gate, &[], |_| Ok(Vec::new()));
        };
        let k = k.min(cache.limit().saturating_sub(base + 1));
        let model = self.model;
        let draft = self
            .chain
            .propose(context, k, gate, std::slice::from_ref(last), |tokens| {
                Ok(model.forward(tokens, &mut cache, Logits::Last)?.into_last())
            });
        // Leave the cache as the verifier left it, whether or not drafting failed.
        cache.truncate(base);
        draft
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.model.config.vocab_size)
    }
    fn set_stop_tokens(&mut self, stop: &[u32]) {
        self.chain.stop = stop.to_vec();
    }
}

/// A shared model and a cache of its own: a verifier (or, under [`ModelDrafter`], a draft)
/// that can live as long as its owner wants, on any thread (what a drafter held by another
/// engine, such as the Python package's `Drafter`, needs).
pub struct OwnedModelVerifier {
    pub model: std::sync::Arc<Llama>,
    pub cache: KvCache,
}

impl OwnedModelVerifier {
    pub fn new(model: std::sync::Arc<Llama>, limit: Option<usize>) -> Result<Self> {
        let cache = model.new_cache_limited(limit)?;
        Ok(OwnedModelVerifier { model, cache })
    }
}

impl Verifier for OwnedModelVerifier {
    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let logits = self.model.forward(tokens, &mut self.cache, Logits::All)?;
        Ok(logits.to_vecs())
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
        Ok(self
            .model
            .forward(tokens, &mut self.cache, Logits::Last)?
            .into_last())
    }
    fn fill(&mut self, tokens: &[u32]) -> Result<()> {
        self.model
            .forward(tokens, &mut self.cache, Logits::None)
            .map(drop)
            .map_err(Into::into)
    }
}

impl<'m> ModelDrafter<ModelVerifier<'m>> {
    pub fn new(model: &'m Llama, chain: impl Into<DraftChain>) -> Result<Self> {
        Ok(Self::over(ModelVerifier::new(model, None)?, chain))
    }
}

/// tandem's model over `n` caches, batched with [`Llama::forward_batch`].
pub struct ModelBatchVerifier<'m> {
    pub model: &'m Llama,
    pub caches: Vec<KvCache>,
    /// As [`ModelVerifier::reads`], through [`Llama::forward_batch_with`].
    pub reads: HeadRows,
}

impl<'m> ModelBatchVerifier<'m> {
    pub fn new(model: &'m Llama, n: usize, limit: Option<usize>) -> Result<Self> {
        let caches = (0..n)
            .map(|_| model.new_cache_limited(limit))
            .collect::<tandem_model::Result<_>>()?;
        Ok(ModelBatchVerifier {
            model,
            caches,
            reads: HeadRows::All,
        })
    }

    /// Verifies with rows for `reads` (see [`ModelVerifier::reads`]).
    pub fn reads(mut self, reads: HeadRows) -> Self {
        self.reads = reads;
        self
    }
}

impl ModelBatchVerifier<'_> {
    /// One batched forward call over `inputs`, returning the rows `which` asks for.
    fn forward(
        &mut self,
        inputs: &[(usize, &[u32])],
        which: Logits,
    ) -> Result<Vec<tandem_model::LogitRows>> {
        // Pair each input with its cache (inputs name distinct sequences).
        let mut slots: Vec<Option<&mut KvCache>> = self.caches.iter_mut().map(Some).collect();
        let mut batch = Vec::with_capacity(inputs.len());
        for &(s, toks) in inputs {
            let cache = slots.get_mut(s).and_then(Option::take).ok_or_else(|| {
                Error::Mismatch(format!("sequence {s} is not in the batch or appears twice"))
            })?;
            batch.push((toks, cache));
        }
        Ok(self
            .model
            .forward_batch_with(&mut batch, which, self.reads)?)
    }
}

impl BatchVerifier for ModelBatchVerifier<'_> {
    fn verify_batch(&mut self, inputs: &[(usize, &[u32])]) -> Result<Vec<Vec<Vec<f32>>>> {
        let out = self.forward(inputs, Logits::All)?;
        Ok(out.iter().map(tandem_model::LogitRows::to_vecs).collect())
    }
    fn prefill_batch(&mut self, inputs: &[(usize, &[u32])]) -> Result<()> {
        self.forward(inputs, Logits::None).map(drop)
    }
    fn rollback(&mut self, seq: usize, len: usize) {
        if let Some(c) = self.caches.get_mut(seq) {
            c.truncate(len);
        }
    }
    fn len(&self, seq: usize) -> usize {
        self.caches.get(seq).map_or(0, KvCache::len)
    }
    fn limit(&self) -> usize {
        self.caches.first().map_or(0, KvCache::limit)
    }
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }
    fn scores_trees(&self) -> bool {
        !self.model.runs_on_gpu()
    }
    fn verify_tree(
        &mut self,
        seq: usize,
        tokens: &[u32],
        parents: &[Option<usize>],
    ) -> Result<Vec<Vec<f32>>> {
        let cache = self
            .caches
            .get_mut(seq)
            .ok_or_else(|| Error::Mismatch(format!("sequence {seq} is not in the batch")))?;
        Ok(self
            .model
            .forward_tree_with(tokens, parents, cache, self.reads)?
            .to_vecs())
    }
    fn keep(&mut self, seq: usize, base: usize, rows: &[usize]) -> Result<()> {
        let cache = self
            .caches
            .get_mut(seq)
            .ok_or_else(|| Error::Mismatch(format!("sequence {seq} is not in the batch")))?;
        Ok(self.model.keep_cache_rows(cache, base, rows)?)
    }
}
