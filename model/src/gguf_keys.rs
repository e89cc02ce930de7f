//! The one table of GGUF metadata keys tandem reads (`checkpoint`, `tokenizer`, `gguf_reader`)
//! and writes (`quantize`'s metadata and imatrix files): llama.cpp's names, as its
//! `llama-arch.cpp` and `gguf.cpp` spell them. Every other module names a key through here.

pub const ARCHITECTURE: &str = "general.architecture";
pub const NAME: &str = "general.name";
pub const FILE_TYPE: &str = "general.file_type";
pub const QUANTIZATION_VERSION: &str = "general.quantization_version";
pub const ALIGNMENT: &str = "general.alignment";
/// `"imatrix"` in an importance-matrix file.
pub const TYPE: &str = "general.type";

// What tandem's calibrated quantization did (read by `tandem info` and eval reports).
pub const TANDEM_QUANTIZE_METHOD: &str = "tandem.quantize.method";
pub const TANDEM_CALIBRATION_TEXT: &str = "tandem.quantize.calibration.text";
pub const TANDEM_CALIBRATION_SHA256: &str = "tandem.quantize.calibration.sha256";
pub const TANDEM_CALIBRATION_CHUNKS: &str = "tandem.quantize.calibration.chunks";
pub const TANDEM_CALIBRATION_CTX: &str = "tandem.quantize.calibration.ctx";
/// Tokens of the model's own answers calibrated on after the text (`--calib-self`), and the
/// SHA-256 of their ids (u32 little-endian).
pub const TANDEM_CALIBRATION_SELF_TOKENS: &str = "tandem.quantize.calibration.self_tokens";
pub const TANDEM_CALIBRATION_SELF_SHA256: &str = "tandem.quantize.calibration.self_sha256";
pub const TANDEM_GPTQ_DAMP: &str = "tandem.quantize.gptq.damp";
pub const TANDEM_GPTQ_BLOCK: &str = "tandem.quantize.gptq.block";
/// Whether GPTQ took input channels in order of decreasing activation.
pub const TANDEM_GPTQ_ACT_ORDER: &str = "tandem.quantize.gptq.act_order";
/// Every `tandem.quantize.*` key, in the order `tandem info` shows them.
pub const TANDEM_QUANTIZE_KEYS: &[&str] = &[
    TANDEM_QUANTIZE_METHOD,
    TANDEM_CALIBRATION_TEXT,
    TANDEM_CALIBRATION_SHA256,
    TANDEM_CALIBRATION_CHUNKS,
    TANDEM_CALIBRATION_CTX,
    TANDEM_CALIBRATION_SELF_TOKENS,
    TANDEM_CALIBRATION_SELF_SHA256,
    TANDEM_GPTQ_DAMP,
    TANDEM_GPTQ_BLOCK,
    TANDEM_GPTQ_ACT_ORDER,
];

/// A per-architecture hyperparameter key: `{arch}.{suffix}` with a suffix from [`arch`].
pub fn arch_key(arch: &str, suffix: &str) -> String {
    format!("{arch}.{suffix}")
}

/// Suffixes of the per-architecture keys (see [`arch_key`]).
pub mod arch {
    pub const BLOCK_COUNT: &str = "block_count";
    pub const CONTEXT_LENGTH: &str = "context_length";
    pub const EMBEDDING_LENGTH: &str = "embedding_length";
    pub const FEED_FORWARD_LENGTH: &str = "feed_forward_length";
    pub const HEAD_COUNT: &str = "attention.head_count";
    pub const HEAD_COUNT_KV: &str = "attention.head_count_kv";
    pub const KEY_LENGTH: &str = "attention.key_length";
    pub const VALUE_LENGTH: &str = "attention.value_length";
    pub const RMS_EPS: &str = "attention.layer_norm_rms_epsilon";
    pub const ROPE_FREQ_BASE: &str = "rope.freq_base";
    pub const ROPE_DIMENSION_COUNT: &str = "rope.dimension_count";
    pub const ROPE_SCALING_TYPE: &str = "rope.scaling.type";
    pub const ROPE_SCALING_FACTOR: &str = "rope.scaling.factor";
    pub const VOCAB_SIZE: &str = "vocab_size";
}

/// The vocabulary (`tokenizer.ggml.*`).
pub mod tokenizer {
    /// The prefix every tokenizer key shares (copied whole from a GGUF source).
    pub const PREFIX: &str = "tokenizer.";
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const UNKNOWN_ID: &str = "tokenizer.ggml.unknown_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    /// The Jinja chat template (Hugging Face's `chat_template`).
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// An importance matrix file (llama-imatrix's GGUF format).
pub mod imatrix {
    pub const DATASETS: &str = "imatrix.datasets";
    pub const CHUNK_COUNT: &str = "imatrix.chunk_count";
    pub const CHUNK_SIZE: &str = "imatrix.chunk_size";
}
