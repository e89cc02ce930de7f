//! Opening a model from disk: a Hugging Face folder (config.json, safetensors, tokenizer.json)
//! or a GGUF file (hyperparameters and tokenizer from its metadata), or the bundled model.

use crate::config::{Config, TokenIds, SUPPORTED_MODEL_TYPES};
use crate::error::{format_err, io_err, Error, Result};
use crate::gguf_keys as keys;
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightStore;
use candle_core::quantized::gguf_file::Value;
use candle_core::Device;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A checkpoint opened and checked, ready to be turned into a [`Llama`].
pub struct Checkpoint {
    pub path: PathBuf,
    pub config: Config,
    pub store: WeightStore,
    pub tokenizer: Tokenizer,
    /// Set for an integer-quantized Hugging Face folder (compressed-tensors, GPTQ, AWQ): the
    /// source format and how each packed layer is held (see [`crate::packed`]).
    pub imported: Option<crate::packed::ImportSummary>,
}

/// The model compiled into the binary: stories260K (see models/stories260K/PROVENANCE.md).
pub mod bundled {
    pub const NAME: &str = "stories260K (bundled)";
    pub const CONFIG: &str = include_str!("../../models/stories260K/config.json");
    pub const TOKENIZER: &str = include_str!("../../models/stories260K/tokenizer.json");
    pub const TOKENIZER_CONFIG: &str =
        include_str!("../../models/stories260K/tokenizer_config.json");
    pub const WEIGHTS: &[u8] = include_bytes!("../../models/stories260K/model.safetensors");
}

impl Checkpoint {
    /// Opens a Hugging Face folder or a `.gguf` file. `tokenizer` overrides the tokenizer.
    pub fn open(path: &Path, tokenizer: Option<&Path>) -> Result<Self> {
        if !path.exists() {
            return Err(io_err(path, "no such file or directory"));
        }
        if path.is_dir() {
            Self::open_hf_dir(path, tokenizer)
        } else {
            let mut magic = [0u8; 4];
            use std::io::Read;
            let n = std::fs::File::open(path)
                .and_then(|mut f| f.read(&mut magic))
                .map_err(|e| io_err(path, e))?;
            let is_gguf = n == 4 && &magic == b"GGUF";
            let named_gguf = path.extension().is_some_and(|e| e == "gguf");
            if is_gguf || named_gguf {
                Self::open_gguf(path, tokenizer)
            } else {
                Err(format_err(
                    path,
                    "not a model: expected a Hugging Face folder (config.json, *.safetensors, tokenizer.json) or a GGUF file",
                ))
            }
        }
    }

    fn open_hf_dir(dir: &Path, tokenizer: Option<&Path>) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            return Err(format_err(dir, "missing config.json in the model folder"));
        }
        let cfg_text = crate::files::read_text_capped(&cfg_path, crate::files::CONFIG_CAP)
            .map_err(|e| io_err(&cfg_path, e))?;
        let config = Config::from_json(&cfg_path, &cfg_text)?;
        let cfg_json: serde_json::Value = serde_json::from_str(&cfg_text)
            .map_err(|e| format_err(&cfg_path, format!("invalid config.json: {e}")))?;
        let quant = crate::packed::QuantConfig::from_config_json(&cfg_path, &cfg_json)?;
        let tok_path = tokenizer
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.join("tokenizer.json"));
        if !tok_path.exists() {
            return Err(format_err(
                &tok_path,
                "missing tokenizer.json (put it in the model folder or pass --tokenizer)",
            ));
        }
        let tcfg = dir.join("tokenizer_config.json");
        let tok = Tokenizer::from_hf_files(&tok_path, Some(&tcfg))?;
        let (store, imported) = WeightStore::open_safetensors_dir_quantized(dir, quant.as_ref())?;
        let mut ck = Self::finish(dir.to_path_buf(), config, store, tok, &tok_path)?;
        ck.imported = imported;
        Ok(ck)
    }

    fn open_gguf(path: &Path, tokenizer: Option<&Path>) -> Result<Self> {
        Self::from_gguf_store(path, WeightStore::open_gguf(path)?, tokenizer)
    }

    /// A GGUF image in memory (e.g. a quantized copy made on the fly); `label` names it.
    pub fn from_gguf_bytes(label: &Path, bytes: Vec<u8>) -> Result<Self> {
        let store = WeightStore::gguf_from_bytes(label, crate::weights::Bytes::Owned(bytes))?;
        Self::from_gguf_store(label, store, None)
    }

    fn from_gguf_store(path: &Path, store: WeightStore, tokenizer: Option<&Path>) -> Result<Self> {
        let md = store
            .gguf_metadata()
            .ok_or_else(|| format_err(path, "not a GGUF file"))?;
        let config = config_from_gguf(path, md, &store)?;
        let (tok, tok_path) = match tokenizer {
            Some(t) => (Tokenizer::from_hf_files(t, None)?, t.to_path_buf()),
            None => (Tokenizer::from_gguf(path, md)?, path.to_path_buf()),
        };
        Self::finish(path.to_path_buf(), config, store, tok, &tok_path)
    }

    /// The bundled stories260K model, read from the binary itself.
    pub fn bundled() -> Result<Self> {
        let path = PathBuf::from(bundled::NAME);
        let config: Config = serde_json::from_str(bundled::CONFIG)
            .map_err(|e| format_err(&path, format!("invalid config.json: {e}")))?;
        config.validate(&path)?;
        let tcfg: serde_json::Value = serde_json::from_str(bundled::TOKENIZER_CONFIG)
            .map_err(|e| format_err(&path, e.to_string()))?;
        let tok = Tokenizer::from_json(&path, bundled::TOKENIZER.to_string(), Some(&tcfg))?;
        let store = WeightStore::from_static_safetensors(&path, bundled::WEIGHTS)?;
        Self::finish(path.clone(), config, store, tok, &path)
    }

    /// A checkpoint from parts already read (a config, weights, a tokenizer), checked as
    /// [`Checkpoint::open`] checks a folder: the tokenizer against the vocabulary, every
    /// tensor's shape against the config.
    pub fn from_parts(
        path: &Path,
        config: Config,
        store: WeightStore,
        tokenizer: Tokenizer,
    ) -> Result<Self> {
        Self::finish(path.to_path_buf(), config, store, tokenizer, path)
    }

    fn finish(
        path: PathBuf,
        config: Config,
        store: WeightStore,
        mut tok: Tokenizer,
        tok_path: &Path,
    ) -> Result<Self> {
        if tok.vocab_size() > config.vocab_size {
            return Err(format_err(
                tok_path,
                format!(
                    "tokenizer has {} tokens but the model's vocabulary is {}: mismatched tokenizer",
                    tok.vocab_size(),
                    config.vocab_size
                ),
            ));
        }
        // A layer is 9 tensors: a declared layer count the file cannot hold is refused before
        // anything is sized by it (2^31 layers aborted on allocation).
        let tensors = store.len();
        if config.num_hidden_layers > tensors / 9 {
            return Err(format_err(
                &path,
                format!(
                    "the config declares {} layers but the checkpoint holds only {tensors} tensors (9 per layer)",
                    config.num_hidden_layers
                ),
            ));
        }
        // Shapes against the config, from metadata alone (no tensor data is read).
        for (name, shape, required) in Llama::expected_tensors(&config) {
            match store.get(&name) {
                Ok(raw) if raw.shape != shape => {
                    return Err(crate::error::tensor_err(
                        store.path_of(&name),
                        &store.stored_name(&name),
                        format!(
                            "shape {:?} does not match the config (expected {shape:?})",
                            raw.shape
                        ),
                    ))
                }
                Err(e) if required => return Err(e),
                _ => {}
            }
        }
        if tok.bos_id.is_none() {
            tok.bos_id = config.bos_token_id;
        }
        for id in config.eos_ids() {
            if !tok.eos_ids.contains(&id) {
                tok.eos_ids.push(id);
            }
        }
        Ok(Checkpoint {
            path,
            config,
            store,
            tokenizer: tok,
            imported: None,
        })
    }

    /// How the file was quantized, when tandem's calibrated quantization recorded it
    /// (`tandem.quantize.*` GGUF keys, or the same keys in a compressed-tensors export's
    /// safetensors metadata): (key without the prefix, value), in table order.
    pub fn quantization_record(&self) -> Vec<(String, String)> {
        use candle_core::quantized::gguf_file::Value;
        let short = |k: &str| k.trim_start_matches("tandem.quantize.").to_string();
        let Some(md) = self.store.gguf_metadata() else {
            // A compressed-tensors export keeps the same keys in its safetensors metadata.
            let md = self.store.safetensors_metadata();
            return crate::gguf_keys::TANDEM_QUANTIZE_KEYS
                .iter()
                .filter_map(|k| Some((short(k), crate::error::clean(md.get(*k)?, 200))))
                .collect();
        };
        crate::gguf_keys::TANDEM_QUANTIZE_KEYS
            .iter()
            .filter_map(|k| {
                let v = match md.get(*k)? {
                    Value::String(s) => crate::error::clean(s, 200),
                    Value::U32(x) => x.to_string(),
                    Value::F32(x) => x.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                Some((short(k), v))
            })
            .collect()
    }

    /// Builds the model as `options` say (threads, activation precision, device).
    pub fn load_model(&self, options: &crate::LoadOptions) -> Result<Llama> {
        Llama::load(self.config.clone(), &self.store, options)
    }

    /// Number of parameters (elements of all tensors).
    pub fn parameter_count(&self) -> usize {
        self.store
            .names()
            .iter()
            .filter_map(|n| self.store.get(n).ok())
            .map(|t| t.elem_count())
            .sum()
    }
}

/// Reads llama.cpp's hyperparameter keys into a [`Config`].
pub fn config_from_gguf(
    path: &Path,
    md: &HashMap<String, Value>,
    store: &WeightStore,
) -> Result<Config> {
    let arch = md
        .get(keys::ARCHITECTURE)
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| format_err(path, "no general.architecture in metadata"))?;
    if !SUPPORTED_MODEL_TYPES.contains(&arch.as_str()) || arch == "mistral" {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            msg: format!("unsupported architecture '{arch}' (supported: llama, qwen2)"),
        });
    }
    let key = |k: &str| keys::arch_key(&arch, k);
    let num = |k: &str| -> Option<usize> {
        md.get(&key(k))
            .and_then(|v| {
                v.to_u64()
                    .ok()
                    .or_else(|| v.to_u32().ok().map(u64::from))
                    .or_else(|| v.to_i32().ok().map(|x| x.max(0) as u64))
            })
            .map(|x| x as usize)
    };
    let need =
        |k: &str| num(k).ok_or_else(|| format_err(path, format!("no {} in metadata", key(k))));
    let float = |k: &str| {
        md.get(&key(k))
            .and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
    };
    let heads = need(keys::arch::HEAD_COUNT)?;
    let hidden = need(keys::arch::EMBEDDING_LENGTH)?;
    let vocab = num(keys::arch::VOCAB_SIZE)
        .or_else(|| match md.get(keys::tokenizer::TOKENS) {
            Some(Value::Array(a)) => Some(a.len()),
            _ => None,
        })
        .or_else(|| {
            store
                .get("model.embed_tokens.weight")
                .ok()
                .and_then(|t| t.shape.first().copied())
        })
        .ok_or_else(|| format_err(path, "cannot tell the vocabulary size"))?;
    let head_dim = num(keys::arch::KEY_LENGTH).or_else(|| num(keys::arch::ROPE_DIMENSION_COUNT));
    let rope_freq_factors = match store.get("rope_freqs.weight") {
        Ok(raw) => Some(
            crate::linear::dense_tensor(path, &raw, &Device::Cpu)?
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        ),
        Err(_) => None,
    };
    let rope_scaling = match md
        .get(&key(keys::arch::ROPE_SCALING_TYPE))
        .and_then(|v| v.to_string().ok())
    {
        Some(t) if t == "linear" => Some(crate::config::RopeScaling {
            rope_type: "linear".into(),
            factor: float(keys::arch::ROPE_SCALING_FACTOR),
            low_freq_factor: None,
            high_freq_factor: None,
            original_max_position_embeddings: None,
        }),
        Some(t) if t == "none" => None,
        Some(t) => {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                msg: format!(
                    "unsupported rope scaling '{t}' (supported: linear, llama3 rope_freqs)"
                ),
            })
        }
        None => None,
    };
    let config = Config {
        model_type: arch.clone(),
        hidden_size: hidden,
        intermediate_size: need(keys::arch::FEED_FORWARD_LENGTH)?,
        num_hidden_layers: need(keys::arch::BLOCK_COUNT)?,
        num_attention_heads: heads,
        num_key_value_heads: num(keys::arch::HEAD_COUNT_KV),
        head_dim: head_dim.filter(|&d| d != hidden / heads.max(1)),
        vocab_size: vocab,
        max_position_embeddings: need(keys::arch::CONTEXT_LENGTH)?,
        rms_norm_eps: float(keys::arch::RMS_EPS).unwrap_or(1e-5),
        rope_theta: float(keys::arch::ROPE_FREQ_BASE).unwrap_or(10_000.0),
        rope_scaling,
        tie_word_embeddings: !store.contains("lm_head.weight"),
        bos_token_id: md
            .get(keys::tokenizer::BOS_ID)
            .and_then(|v| v.to_u32().ok()),
        eos_token_id: md
            .get(keys::tokenizer::EOS_ID)
            .and_then(|v| v.to_u32().ok())
            .map(TokenIds::One),
        attention_bias: Some(store.contains("model.layers.0.self_attn.q_proj.bias")),
        sliding_window: None,
        use_sliding_window: None,
        hidden_act: Some("silu".into()),
        rope_freq_factors,
    };
    config.validate(path)?;
    Ok(config)
}
