//! tandem's model runtime: config parsing, memory-mapped weight loading (safetensors and GGUF),
//! the Llama-family forward pass with a rollback KV cache, tokenizers and sampling.
//!
//! Everything else in tandem (quantize, eval, speculate) stands on this crate; it depends only
//! on `tandem-kernels`.

pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod export;
pub mod files;
pub mod generate;
pub mod gguf_keys;
pub mod gguf_names;
pub mod gguf_reader;
pub mod linear;
pub mod llama;
pub mod memory_budget;
pub mod packed;
pub mod pending;
/// The sampler lives in `kernels` (plain logits math, so `speculate`'s model-free core can use
/// it without this crate); re-exported here where model users look for it.
pub use tandem_kernels::sampling;
pub mod tokenizer;
pub mod weights;

pub use checkpoint::Checkpoint;
pub use config::{Architecture, Config};
pub use error::{Error, Result};
pub use llama::{
    argmax, ActivationObserver, ComputeDevice, HeadRows, KvCache, KvCacheType, Llama, LoadOptions,
    LogitRows, Logits, Sublayer,
};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{TextStream, Tokenizer};
