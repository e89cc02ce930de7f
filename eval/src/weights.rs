//! Weight error per tensor: relative RMS error ‖W − Ŵ‖ / ‖W‖ of a candidate's weights against
//! the reference's, in the Hugging Face layout (llama.cpp's q/k row order undone on both sides).

use crate::Result;
use serde::Serialize;
use tandem_model::gguf_names::{permute_qk_rows, Permute};
use tandem_model::linear::{ActivationPrecision, Linear};
use tandem_model::weights::RawTensor;
use tandem_model::{Architecture, Checkpoint, Error};

#[derive(Debug, Clone, Serialize)]
pub struct TensorError {
    /// Hugging Face name.
    pub name: String,
    /// attention / mlp / embeddings / output.
    pub kind: String,
    /// Layer index, for per-layer tensors.
    pub layer: Option<usize>,
    /// Storage type in the candidate (e.g. "Q4_K").
    pub dtype: String,
    pub params: usize,
    pub rel_rms_error: f64,
}

pub fn kind_of(name: &str) -> &'static str {
    if name == "model.embed_tokens.weight" {
        "embeddings"
    } else if name == "lm_head.weight" {
        "output"
    } else if name.contains(".self_attn.") {
        "attention"
    } else if name.contains(".mlp.") {
        "mlp"
    } else {
        "other"
    }
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// A 2-D weight as f32 in Hugging Face layout.
fn dense(ck: &Checkpoint, name: &str) -> Result<Vec<f32>> {
    let raw = ck.store.get(name)?;
    let path = ck.store.path_of(name);
    let permute = ck.store.is_gguf() && ck.config.architecture() == Architecture::Llama;
    let heads = if name.ends_with("self_attn.q_proj.weight") {
        Some(ck.config.num_attention_heads)
    } else if name.ends_with("self_attn.k_proj.weight") {
        Some(ck.config.num_kv_heads())
    } else {
        None
    };
    let fixed;
    let raw = match heads.filter(|_| permute) {
        Some(h) => {
            let rows = raw.shape[0];
            fixed = permute_qk_rows(raw.data, h, rows, raw.data.len() / rows, Permute::GgufToHf);
            RawTensor {
                data: &fixed,
                ..raw
            }
        }
        None => raw,
    };
    // Read back only: f32 activations keep Q4_0/Q8_0 in GGML rows (no tiles to build).
    let lin = Linear::from_raw(path, &raw, ActivationPrecision::F32)?;
    Ok(lin.dequantize()?.flatten_all()?.to_vec1()?)
}

/// Relative RMS error of every 2-D weight the two checkpoints share, in file order.
pub fn weight_errors(reference: &Checkpoint, candidate: &Checkpoint) -> Result<Vec<TensorError>> {
    let mut out = Vec::new();
    for name in candidate.store.names() {
        let c = candidate.store.get(&name)?;
        if c.shape.len() != 2 || !reference.store.contains(&name) {
            continue;
        }
        let r = reference.store.get(&name)?;
        if r.shape != c.shape {
            return Err(Error::Invalid(format!(
                "tensor '{name}': shape {:?} in the candidate, {:?} in the reference: not the same model",
                c.shape, r.shape
            )));
        }
        let (a, b) = (dense(reference, &name)?, dense(candidate, &name)?);
        let (mut num, mut den) = (0f64, 0f64);
        for (x, y) in a.iter().zip(&b) {
            num += ((x - y) as f64).powi(2);
            den += (*x as f64).powi(2);
        }
        out.push(TensorError {
            kind: kind_of(&name).to_string(),
            layer: layer_of(&name),
            dtype: c.dtype.name(),
            params: c.elem_count(),
            rel_rms_error: (num / den.max(1e-30)).sqrt(),
            name,
        });
    }
    out.sort_by_key(|t| (t.layer.unwrap_or(usize::MAX), t.name.clone()));
    Ok(out)
}
