//! Layer-by-layer passes over whole sequences: what calibrated quantization (GPTQ, activation-
//! aware scaling) needs to quantize layer `i` with the inputs that the already-quantized layers
//! before it produce, without re-running the whole model for every layer.

use super::{sized, Llama, Timer, Workspace};
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::ActivationObserver;
use candle_core::Tensor;

impl Llama {
    /// The embedding rows of one sequence, [tokens, hidden] f32: where a layer-by-layer run
    /// starts.
    pub fn embed_sequence(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let vocab = self.config.vocab_size;
        if let Some(bad) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let mut out = vec![0f32; tokens.len() * self.config.hidden_size];
        self.embed_rows(tokens, &mut out)?;
        Ok(out)
    }

    /// Runs decoder layer `li` in place over the hidden rows of one whole sequence (positions
    /// 0.., a cache of its own), showing each linear layer's input to `observer`. The rows come
    /// from [`Llama::embed_sequence`] or the previous layer's run.
    pub fn run_layer(
        &self,
        li: usize,
        hidden: &mut [f32],
        observer: Option<&dyn ActivationObserver>,
    ) -> Result<()> {
        let h = self.config.hidden_size;
        if li >= self.layers.len() || hidden.is_empty() || hidden.len() % h != 0 {
            return Err(Error::Invalid(format!(
                "run_layer: layer {li} of {}, {} values for rows of {h} (internal error)",
                self.layers.len(),
                hidden.len()
            )));
        }
        if self.runs_on_gpu() {
            return Err(Error::Invalid(
                "layer-by-layer runs read activations on the CPU; run without --gpu".into(),
            ));
        }
        let rows = hidden.len() / h;
        let see = |l: Option<usize>, modules: &[&str], x: &[f32], n: usize| -> Result<()> {
            let Some(o) = observer else { return Ok(()) };
            let names: Vec<String> = modules
                .iter()
                .map(|m| match l {
                    Some(l) => format!("model.layers.{l}.{m}.weight"),
                    None => m.to_string(),
                })
                .collect();
            o.observe(
                &names,
                &Tensor::from_slice(x, (n, x.len() / n), &self.device)?,
            )
        };
        let mut ws = Workspace::default();
        sized(&mut ws.x, rows * h).copy_from_slice(hidden);
        let half = self.config.head_dim() / 2;
        let positions: Vec<usize> = (0..rows).collect();
        let (cos, sin) = (
            sized(&mut ws.cos, rows * half),
            sized(&mut ws.sin, rows * half),
        );
        self.rope_rows(&positions, cos, sin);
        let mut cache = self.new_cache_with_limit(rows)?;
        self.reserve(&mut cache, rows)?;
        // Attention reads only the count of a sequence's tokens, not the ids.
        let ids = vec![0u32; rows];
        let mut timer = Timer {
            times: None,
            last: std::time::Instant::now(),
        };
        self.layer_rows(
            li,
            &mut ws,
            &mut [(&ids, &mut cache)],
            rows,
            &see,
            &mut timer,
        )?;
        hidden.copy_from_slice(&ws.x[..rows * h]);
        Ok(())
    }

    /// Replaces the weights of one linear layer of the decoder, by its Hugging Face name
    /// (`model.layers.3.mlp.up_proj.weight`): a layer-by-layer quantizer puts each layer's
    /// quantized weights in place before the next layer's inputs are computed. The shape must
    /// stay the same.
    pub fn replace_linear(&mut self, hf_name: &str, linear: Linear) -> Result<()> {
        let slot = self.linear_slot(hf_name).ok_or_else(|| {
            Error::Invalid(format!("{hf_name}: not a linear layer of this model"))
        })?;
        if (slot.out_dim, slot.in_dim) != (linear.out_dim, linear.in_dim) {
            return Err(Error::Invalid(format!(
                "{hf_name}: replacement of shape [{}, {}] for [{}, {}]",
                linear.out_dim, linear.in_dim, slot.out_dim, slot.in_dim
            )));
        }
        // The bias (Qwen's q/k/v) is not part of what a quantizer replaces.
        let bias = slot.bias.take();
        *slot = linear.with_bias(bias);
        Ok(())
    }

    /// A decoder layer's RMSNorm weights: (before attention, before the MLP).
    pub fn layer_norms(&self, li: usize) -> Option<(&[f32], &[f32])> {
        self.layers
            .get(li)
            .map(|l| (l.attn_norm.as_slice(), l.mlp_norm.as_slice()))
    }

    /// Replaces a decoder layer's RMSNorm weight before the MLP (activation-aware scaling
    /// folds its per-channel scales into it).
    pub fn set_mlp_norm(&mut self, li: usize, weights: Vec<f32>) -> Result<()> {
        let l = self
            .layers
            .get_mut(li)
            .ok_or_else(|| Error::Invalid(format!("no layer {li}")))?;
        if weights.len() != l.mlp_norm.len() {
            return Err(Error::Invalid(format!(
                "layer {li}: {} norm weights for {}",
                weights.len(),
                l.mlp_norm.len()
            )));
        }
        l.mlp_norm = weights;
        Ok(())
    }

    fn linear_slot(&mut self, hf_name: &str) -> Option<&mut Linear> {
        let rest = hf_name.strip_prefix("model.layers.")?;
        let (li, module) = rest.split_once('.')?;
        let layer = self.layers.get_mut(li.parse::<usize>().ok()?)?;
        Some(match module {
            "self_attn.q_proj.weight" => &mut layer.q,
            "self_attn.k_proj.weight" => &mut layer.k,
            "self_attn.v_proj.weight" => &mut layer.v,
            "self_attn.o_proj.weight" => &mut layer.o,
            "mlp.gate_proj.weight" => &mut layer.gate,
            "mlp.up_proj.weight" => &mut layer.up,
            "mlp.down_proj.weight" => &mut layer.down,
            _ => return None,
        })
    }
}
