//! Speculative decoding: a cheap drafter proposes up to k tokens, the verifier scores all of
//! them in one forward pass, an acceptance rule keeps the longest prefix the verifier agrees
//! with (greedy: identical tokens; sampling: identical distribution, by rejection sampling),
//! and a controller picks the next k.
//!
//! The core (`Drafter`, `Verifier`, `AcceptanceRule`, `Controller`, `SpeculativeDecoder`)
//! knows no concrete model, so an engine can implement the traits; `model_adapter` makes
//! tandem's own `Llama` a drafter or verifier, and `capi` exposes the loop to other languages
//! (an engine's model as forward/rollback callbacks; see include/tandem.h).

pub mod acceptance;
pub mod batch;
pub mod capi;
pub mod config;
pub mod controller;
pub mod decoder;
pub mod drafter;
#[cfg(feature = "model")]
pub mod layer_skip;
#[cfg(feature = "model")]
pub mod model_adapter;
#[cfg(feature = "model")]
pub mod session;
pub mod suffix;

pub use acceptance::{
    AcceptanceRule, CoupledSampling, Greedy, RejectionSampling, TreeVerdict, Verdict,
};
pub use batch::{BatchDecoder, BatchVerifier};
pub use config::{check_draft_max, DraftSampling, SpecConfig, MAX_DRAFT_TOKENS};
pub use controller::{AdaptiveK, Controller, ControllerMemory, FixedK};
pub use decoder::{SpecStats, SpeculativeDecoder};
pub use drafter::{
    draft_shortlist, Branching, Draft, DraftChain, DraftEvidence, DraftGate, Drafter, Gate,
    HybridDrafter, ModelDrafter, NgramDrafter, DEFAULT_DRAFT_VOCAB,
};
#[cfg(feature = "model")]
pub use model_adapter::{
    ModelBatchVerifier, ModelVerifier, OwnedModelVerifier, SharedCacheDrafter,
};
#[cfg(feature = "model")]
pub use session::DraftSource;
pub use suffix::{SuffixCache, SuffixDrafter};

/// Errors of the speculative loop: the model's own, or a draft/verifier mismatch.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[cfg(feature = "model")]
    #[error(transparent)]
    Model(#[from] tandem_model::Error),
    /// Sampling parameters out of range.
    #[error(transparent)]
    Sampling(#[from] tandem_kernels::sampling::InvalidParams),
    /// tandem's own text (a mismatch, an engine's failure code): one line.
    #[error("{0}")]
    Mismatch(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Scores proposed tokens in one forward pass and rolls back what was not accepted.
pub trait Verifier {
    /// Runs `tokens` after the current context and returns one logit row per token: row i
    /// predicts the token that follows `tokens[i]`.
    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>>;
    /// Keeps only the first `len` positions of the context.
    fn rollback(&mut self, len: usize);
    /// Positions currently in the context.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Most positions the context can hold.
    fn limit(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Runs `tokens` and returns only the last row's logits (what a drafter needs; a model
    /// can skip the output head for the other rows).
    fn forward_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.verify(tokens)?
            .pop()
            .ok_or_else(|| Error::Mismatch("forward returned no logits".into()))
    }
    /// Runs `tokens` for the context alone (a prompt's start), reading no logits. A model
    /// computes such rows as a plain prompt pass computes all but its last (see
    /// `tandem_model::Logits::None`).
    fn fill(&mut self, tokens: &[u32]) -> Result<()> {
        self.forward_last(tokens).map(drop)
    }
    /// Whether [`Verifier::verify_tree`] takes trees that branch (else only chains).
    fn scores_trees(&self) -> bool {
        false
    }
    /// Runs a token tree after the current context in one pass: `tokens[i]` follows
    /// `tokens[parents[i]]`, or the context when that is `None` (parents come first). Returns
    /// one logit row per token, each as if its path alone had followed the context.
    fn verify_tree(&mut self, tokens: &[u32], parents: &[Option<usize>]) -> Result<Vec<Vec<f32>>> {
        if is_chain(parents) {
            self.verify(tokens)
        } else {
            Err(Error::Mismatch(
                "this verifier scores no token trees".into(),
            ))
        }
    }
    /// Keeps, of the positions from `base` on, those at `base + rows[j]` (ascending) as
    /// `base + j`: after a tree, its accepted path becomes the context.
    fn keep(&mut self, base: usize, rows: &[usize]) -> Result<()> {
        keep_prefix_only(rows, |n| self.rollback(base + n))
    }
}

/// Whether `parents` describes a chain (each token follows the one before it).
pub fn is_chain(parents: &[Option<usize>]) -> bool {
    parents
        .iter()
        .enumerate()
        .all(|(i, &p)| p == i.checked_sub(1))
}

/// [`Verifier::keep`] for a verifier that can only roll back: `rows` must be 0, 1, 2, ….
pub(crate) fn keep_prefix_only(rows: &[usize], rollback: impl FnOnce(usize)) -> Result<()> {
    if rows.iter().enumerate().all(|(j, &r)| j == r) {
        rollback(rows.len());
        Ok(())
    } else {
        Err(Error::Mismatch(format!(
            "this verifier cannot keep the rows {rows:?} of a token tree (it only rolls back)"
        )))
    }
}
