//! Model hyperparameters: read from a Hugging Face `config.json` or from GGUF metadata, and
//! checked once so the forward pass can trust them.

use crate::error::{format_err, io_err, Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The architectures this build runs, as Hugging Face `model_type` names.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM/SmolLM2, TinyLlama, Mistral (without a sliding window).
    Llama,
    /// Qwen2: Llama plus biases on the q/k/v projections.
    Qwen2,
}

impl Architecture {
    /// The name GGUF uses in `general.architecture` and as its key prefix.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// `eos_token_id` is an integer or a list of integers in Hugging Face configs.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(x) => vec![*x],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// `rope_scaling` as Hugging Face writes it. Only the variants tandem implements are accepted.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// The fields of a Hugging Face `config.json` that a Llama-family forward pass needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Per-dimension RoPE frequency divisors (GGUF `rope_freqs.weight`, llama3-style scaling
    /// already applied). Not part of config.json.
    #[serde(skip)]
    pub rope_freq_factors: Option<Vec<f32>>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::files::read_text_capped(path, crate::files::CONFIG_CAP)
            .map_err(|e| io_err(path, e))?;
        Self::from_json(path, &text)
    }

    /// Parses and validates the text of a `config.json`; `path` names it in errors.
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format_err(path, format!("invalid config.json: {e}")))?;
        let mut cfg: Config = Config::deserialize(&v)
            .map_err(|e| format_err(path, format!("invalid config.json: {e}")))?;
        // transformers ≥ 5 saves RoPE settings as `rope_parameters` (theta, type, factors)
        // instead of top-level `rope_theta` / `rope_scaling`; where present it is what the
        // model was trained with (SmolLM2's 100 000, not the 10 000 default).
        if let Some(rp) = v.get("rope_parameters").filter(|r| r.is_object()) {
            if let Some(t) = rp.get("rope_theta").and_then(serde_json::Value::as_f64) {
                cfg.rope_theta = t;
            }
            let ty = rp
                .get("rope_type")
                .or_else(|| rp.get("type"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or("default");
            if ty != "default" && cfg.rope_scaling.is_none() {
                cfg.rope_scaling = Some(serde_json::from_value(rp.clone()).map_err(|e| {
                    format_err(path, format!("invalid config.json: rope_parameters: {e}"))
                })?);
            }
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn architecture(&self) -> Architecture {
        match self.model_type.as_str() {
            "qwen2" => Architecture::Qwen2,
            _ => Architecture::Llama,
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v projections carry a bias (Qwen2 always; Llama when the config says so).
    pub fn qkv_bias(&self) -> bool {
        match self.architecture() {
            Architecture::Qwen2 => self.attention_bias.unwrap_or(true),
            Architecture::Llama => self.attention_bias.unwrap_or(false),
        }
    }

    /// The longest sequence the model may run. Mistral-style sliding windows are not
    /// implemented, so a window shorter than the trained context caps the context instead:
    /// below the window, full attention *is* windowed attention.
    pub fn context_length(&self) -> usize {
        let window = match (self.sliding_window, self.use_sliding_window) {
            (Some(w), None | Some(true)) if self.model_type == "mistral" => Some(w),
            (Some(w), Some(true)) => Some(w),
            _ => None,
        };
        match window {
            Some(w) if w > 0 => w.min(self.max_position_embeddings),
            _ => self.max_position_embeddings,
        }
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Checks everything the forward pass relies on, so later code can index without fear.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if !SUPPORTED_MODEL_TYPES.contains(&self.model_type.as_str()) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                msg: format!(
                    "unsupported model_type '{}' (supported: {})",
                    self.model_type,
                    SUPPORTED_MODEL_TYPES.join(", ")
                ),
            });
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" && act != "swish" {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    msg: format!("unsupported hidden_act '{act}' (supported: silu)"),
                });
            }
        }
        let bad = |msg: String| Err(format_err(path, msg));
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return bad(format!("head_dim {hd} must be a positive even number"));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if let Some(s) = &self.rope_scaling {
            match s.rope_type.as_str() {
                "default" => {}
                "linear" | "llama3" if s.factor.is_some_and(|f| f > 0.0) => {}
                "linear" | "llama3" => return bad("rope_scaling needs a positive factor".into()),
                other => {
                    return Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        msg: format!(
                            "unsupported rope_scaling type '{other}' (supported: linear, llama3)"
                        ),
                    })
                }
            }
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != hd / 2 || f.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                return bad(format!(
                    "rope frequency factors must be {} positive numbers",
                    hd / 2
                ));
            }
        }
        for id in self.eos_ids().into_iter().chain(self.bos_token_id) {
            if id as usize >= self.vocab_size {
                return bad(format!(
                    "special token id {id} is outside the vocabulary ({})",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// Per-dimension inverse frequencies for RoPE, with linear or llama3 scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let hd = self.head_dim();
        let mut inv: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / hd as f64))
            .collect();
        if let Some(s) = &self.rope_scaling {
            let factor = s.factor.unwrap_or(1.0);
            match s.rope_type.as_str() {
                "linear" => inv.iter_mut().for_each(|f| *f /= factor),
                "llama3" => {
                    // Llama 3.1: long wavelengths are divided by `factor`, short ones kept,
                    // and the band between is interpolated smoothly.
                    let low = s.low_freq_factor.unwrap_or(1.0);
                    let high = s.high_freq_factor.unwrap_or(4.0);
                    let orig = s.original_max_position_embeddings.unwrap_or(8192) as f64;
                    let low_wavelen = orig / low;
                    let high_wavelen = orig / high;
                    for f in inv.iter_mut() {
                        let wavelen = 2.0 * std::f64::consts::PI / *f;
                        if wavelen > low_wavelen {
                            *f /= factor;
                        } else if wavelen >= high_wavelen {
                            let smooth = (orig / wavelen - low) / (high - low);
                            *f = (1.0 - smooth) * *f / factor + smooth * *f;
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(factors) = &self.rope_freq_factors {
            for (f, d) in inv.iter_mut().zip(factors) {
                *f /= *d as f64;
            }
        }
        inv.into_iter().map(|f| f as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        let base = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 32"#;
        let p = Path::new("config.json");
        let c = Config::from_json(p, &format!("{{{base}}}")).unwrap();
        assert_eq!(c.rope_theta, 10_000.0);
        let c = Config::from_json(
            p,
            &format!(r#"{{{base}, "rope_parameters": {{"rope_theta": 100000.0, "rope_type": "default"}}}}"#),
        )
        .unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.is_none()), (100_000.0, true));
        let c = Config::from_json(
            p,
            &format!(r#"{{{base}, "rope_parameters": {{"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}}}}"#),
        )
        .unwrap();
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!(c.rope_scaling.as_ref().and_then(|s| s.factor), Some(2.0));
    }
}
