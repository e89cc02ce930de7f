//! tandem's evaluator: what quantization cost, measured the way llama.cpp's `llama-perplexity`
//! measures it, so numbers compare with published tables.
//!
//! Text → chunks ([`chunks::Chunks`], llama-perplexity's cutting) → per-position
//! log-probabilities of the scored half of each chunk ([`scoring::chunk_logprobs`]) →
//! perplexity, and, against a reference model's log-probabilities on the same positions,
//! KL divergence, top-1 agreement and Δp ([`metrics`]). Evaluation streams one chunk at a
//! time: all logits of a text are never held at once.

pub mod chunks;
pub mod metrics;
pub mod scoring;

pub use chunks::Chunks;
pub use metrics::{Divergence, Summary};

pub type Result<T> = std::result::Result<T, tandem_model::Error>;
