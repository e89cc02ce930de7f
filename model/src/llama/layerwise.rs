//! Layer-by-layer passes over whole sequences: what calibrated quantization (GPTQ, activation-
//! aware scaling) needs to quantize layer `i` with the inputs that the already-quantized layers
//! before it produce, without re-running the whole model for every layer.

use super::backend::{Backend, Buf, CpuBuffers, CpuPass};
use super::profile::Timer;
use super::Llama;
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::ActivationObserver;

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
        self.run_part(li, hidden, observer, true, true)
    }

    /// Only the attention half of layer `li`: `x += o(attention(q, k, v))`.
    pub fn run_attention(
        &self,
        li: usize,
        hidden: &mut [f32],
        observer: Option<&dyn ActivationObserver>,
    ) -> Result<()> {
        self.run_part(li, hidden, observer, true, false)
    }

    /// The MLP's input rows of layer `li`: RMSNorm of `hidden` with the layer's MLP norm.
    pub fn mlp_input(&self, li: usize, hidden: &[f32]) -> Result<Vec<f32>> {
        let (_, norm) = self.layer_norms(li).ok_or_else(|| bad_layer(li))?;
        let mut out = vec![0f32; hidden.len()];
        let eps = self.config.rms_norm_eps as f32;
        tandem_kernels::ops::rms_norm(hidden, norm, eps, &mut out);
        Ok(out)
    }

    /// The input of layer `li`'s down projection: silu(gate·n) ⊙ up·n for MLP input rows `n`.
    pub fn mlp_activation(&self, li: usize, n: &[f32]) -> Result<Vec<f32>> {
        let layer = self.layers.get(li).ok_or_else(|| bad_layer(li))?;
        let (h, inter) = (self.config.hidden_size, self.config.intermediate_size);
        let rows = n.len() / h;
        let mut gate = vec![0f32; rows * inter];
        let mut up = vec![0f32; rows * inter];
        layer.gate.forward_into(n, rows, &mut gate)?;
        layer.up.forward_into(n, rows, &mut up)?;
        tandem_kernels::ops::silu_mul(&mut gate, &up);
        Ok(gate)
    }

    /// `hidden += down(activation)` for layer `li`: the end of its MLP half.
    pub fn mlp_down_add(&self, li: usize, activation: &[f32], hidden: &mut [f32]) -> Result<()> {
        let layer = self.layers.get(li).ok_or_else(|| bad_layer(li))?;
        let h = self.config.hidden_size;
        let rows = hidden.len() / h;
        let mut proj = vec![0f32; rows * h];
        layer.down.forward_into(activation, rows, &mut proj)?;
        tandem_kernels::ops::add_assign(hidden, &proj);
        Ok(())
    }

    fn run_part(
        &self,
        li: usize,
        hidden: &mut [f32],
        observer: Option<&dyn ActivationObserver>,
        attention: bool,
        mlp: bool,
    ) -> Result<()> {
        let h = self.config.hidden_size;
        if li >= self.layers.len() || hidden.is_empty() || !hidden.len().is_multiple_of(h) {
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
        let mut buffers = CpuBuffers::default();
        let mut b = CpuPass::new(self, &mut buffers, rows);
        // Attention reads only the count of a sequence's tokens, not the ids, and `begin`'s
        // embedding of them is replaced by the given rows.
        let ids = vec![0u32; rows];
        if attention {
            let positions: Vec<usize> = (0..rows).collect();
            b.begin(&ids, &positions)?;
        }
        b.load(Buf::X, hidden)?;
        let mut timer = Timer::new(None);
        if attention {
            // Keys and values for this one layer only (the others stay empty).
            let mut cache = self.one_layer_cache(li, rows);
            self.attention_half(
                &mut b,
                li,
                &mut [(&ids, &mut cache)],
                None,
                observer,
                &mut timer,
            )?;
        }
        if mlp {
            self.mlp_half(&mut b, li, observer, &mut timer)?;
        }
        hidden.copy_from_slice(b.host(Buf::X)?);
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

    /// A decoder layer's RMSNorm weight before attention.
    pub fn attention_input(&self, li: usize, hidden: &[f32]) -> Result<Vec<f32>> {
        let (norm, _) = self.layer_norms(li).ok_or_else(|| bad_layer(li))?;
        let mut out = vec![0f32; hidden.len()];
        let eps = self.config.rms_norm_eps as f32;
        tandem_kernels::ops::rms_norm(hidden, norm, eps, &mut out);
        Ok(out)
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

fn bad_layer(li: usize) -> Error {
    Error::Invalid(format!("no decoder layer {li}"))
}
