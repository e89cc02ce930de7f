//! The Llama-family forward pass (Llama, SmolLM2, TinyLlama, Mistral, Qwen2) and its KV cache.
//!
//! One call serves prefill, one-token decode and k-token verification: it takes new tokens at
//! positions [n, n+k) against a cache holding n positions, applies the causal mask, appends to
//! the cache and returns logits for the new positions. Attention math and the cache are f32.

use crate::config::Config;
use crate::error::{tensor_err, Error, Result};
use crate::gguf_names::{permute_qk_rows, Permute};
use crate::linear::{dense_tensor, Linear};
use crate::weights::RawTensor;
use crate::weights::WeightStore;
use candle_core::{DType, Device, Tensor};

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Model weights and hyperparameters; immutable once loaded, shared by any number of caches.
pub struct Llama {
    pub config: Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// Sees the input of every linear layer during a forward pass (calibration for importance-
/// weighted quantization collects its statistics this way).
pub trait ActivationObserver {
    /// `x` is the [tokens, in] f32 input about to be multiplied by each of `weights` (Hugging
    /// Face names, e.g. `model.layers.0.mlp.down_proj.weight`; q/k/v, and gate/up, share one
    /// input and come in one call).
    fn observe(&self, weights: &[String], x: &Tensor) -> Result<()>;
}

/// Which positions' logits a forward call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every new position (verification, evaluation).
    All,
    /// Only the last new position (prefill before sampling).
    Last,
}

/// Per-sequence key/value cache: for each layer, keys and values as [n_kv_heads, capacity,
/// head_dim] f32 buffers that the attention kernel reads in place. It grows by doubling
/// (amortized, never per token) up to `limit`.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    limit: usize,
}

impl KvCache {
    /// Positions currently held.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Most positions this cache will ever hold (the context length).
    pub fn limit(&self) -> usize {
        self.limit
    }
    /// Rolls back to the first `n` positions without copying: later writes overwrite the rest.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

const INITIAL_CACHE: usize = 256;

impl Llama {
    /// Builds the model from a checked config and a weight store, verifying every tensor's
    /// shape against the config.
    pub fn load(config: Config, store: &WeightStore, device: &Device) -> Result<Self> {
        let c = &config;
        let (h, hd, nh, nkv) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.num_kv_heads(),
        );
        let permute = store.is_gguf() && c.architecture() == crate::config::Architecture::Llama;
        let get = |name: &str, shape: &[usize]| -> Result<RawTensor<'_>> {
            let raw = store.get(name)?;
            if raw.shape != shape {
                return Err(tensor_err(
                    store.path_of(name),
                    &store.stored_name(name),
                    format!(
                        "shape {:?} does not match the config (expected {shape:?})",
                        raw.shape
                    ),
                ));
            }
            Ok(raw)
        };
        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            let raw = get(name, &[out, inp])?;
            Linear::from_raw(store.path_of(name), &raw, device)
        };
        // q/k from a llama GGUF are stored in llama.cpp's RoPE order: put rows back.
        let qk_linear = |name: &str, heads: usize| -> Result<Linear> {
            let raw = get(name, &[heads * hd, h])?;
            if !permute {
                return Linear::from_raw(store.path_of(name), &raw, device);
            }
            let row_bytes = raw.data.len() / (heads * hd);
            let data = permute_qk_rows(raw.data, heads, heads * hd, row_bytes, Permute::GgufToHf);
            let raw = RawTensor { data: &data, ..raw };
            Linear::from_raw(store.path_of(name), &raw, device)
        };
        let qk_bias = |name: &str, heads: usize| -> Result<Option<Tensor>> {
            if !c.qkv_bias() {
                return Ok(None);
            }
            let raw = get(name, &[heads * hd])?;
            let t = dense_tensor(store.path_of(name), &raw, device)?.to_dtype(DType::F32)?;
            if !permute {
                return Ok(Some(t));
            }
            let bytes: Vec<u8> = t
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            let p = permute_qk_rows(&bytes, heads, heads * hd, 4, Permute::GgufToHf);
            let v: Vec<f32> = p
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok(Some(Tensor::from_vec(v, heads * hd, device)?))
        };
        let vector = |name: &str, len: usize| -> Result<Tensor> {
            let raw = get(name, &[len])?;
            Ok(dense_tensor(store.path_of(name), &raw, device)?.to_dtype(DType::F32)?)
        };

        let embed_name = "model.embed_tokens.weight";
        let embed_raw = get(embed_name, &[c.vocab_size, h])?;
        let embed = dense_tensor(store.path_of(embed_name), &embed_raw, device)?;
        let embed = match embed.dtype() {
            DType::BF16 => embed.to_dtype(DType::F32)?,
            _ => embed,
        };
        let lm_head = if store.contains("lm_head.weight") {
            linear("lm_head.weight", c.vocab_size, h)?
        } else if c.tie_word_embeddings || store.is_gguf() {
            Linear::from_raw(store.path_of(embed_name), &embed_raw, device)?
        } else {
            return Err(tensor_err(
                store.main_path(),
                "lm_head.weight",
                "missing (and tie_word_embeddings is false)",
            ));
        };

        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                attn_norm: vector(&format!("{p}.input_layernorm.weight"), h)?,
                q: qk_linear(&format!("{p}.self_attn.q_proj.weight"), nh)?
                    .with_bias(qk_bias(&format!("{p}.self_attn.q_proj.bias"), nh)?),
                k: qk_linear(&format!("{p}.self_attn.k_proj.weight"), nkv)?
                    .with_bias(qk_bias(&format!("{p}.self_attn.k_proj.bias"), nkv)?),
                v: linear(&format!("{p}.self_attn.v_proj.weight"), nkv * hd, h)?.with_bias(
                    if c.qkv_bias() {
                        Some(vector(&format!("{p}.self_attn.v_proj.bias"), nkv * hd)?)
                    } else {
                        None
                    },
                ),
                o: linear(&format!("{p}.self_attn.o_proj.weight"), h, nh * hd)?,
                mlp_norm: vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate: linear(&format!("{p}.mlp.gate_proj.weight"), c.intermediate_size, h)?,
                up: linear(&format!("{p}.mlp.up_proj.weight"), c.intermediate_size, h)?,
                down: linear(&format!("{p}.mlp.down_proj.weight"), h, c.intermediate_size)?,
            });
        }
        let norm = vector("model.norm.weight", h)?;

        let ctx = c.context_length();
        let inv = Tensor::new(c.rope_inv_freq(), device)?;
        let pos = Tensor::arange(0u32, ctx as u32, device)?.to_dtype(DType::F32)?;
        let freqs = pos.unsqueeze(1)?.broadcast_mul(&inv.unsqueeze(0)?)?;
        Ok(Llama {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
            config,
        })
    }

    /// Every tensor the forward pass reads, with its Hugging Face shape. Optional ones
    /// (`lm_head.weight` when tied) are marked `false`.
    pub fn expected_tensors(c: &Config) -> Vec<(String, Vec<usize>, bool)> {
        let (h, hd, nh, nkv, ff) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.num_kv_heads(),
            c.intermediate_size,
        );
        let mut v = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![c.vocab_size, h],
                true,
            ),
            ("model.norm.weight".to_string(), vec![h], true),
            (
                "lm_head.weight".to_string(),
                vec![c.vocab_size, h],
                !c.tie_word_embeddings,
            ),
        ];
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut add = |n: &str, shape: Vec<usize>| v.push((format!("{p}.{n}"), shape, true));
            add("input_layernorm.weight", vec![h]);
            add("self_attn.q_proj.weight", vec![nh * hd, h]);
            add("self_attn.k_proj.weight", vec![nkv * hd, h]);
            add("self_attn.v_proj.weight", vec![nkv * hd, h]);
            add("self_attn.o_proj.weight", vec![h, nh * hd]);
            add("post_attention_layernorm.weight", vec![h]);
            add("mlp.gate_proj.weight", vec![ff, h]);
            add("mlp.up_proj.weight", vec![ff, h]);
            add("mlp.down_proj.weight", vec![h, ff]);
            if c.qkv_bias() {
                add("self_attn.q_proj.bias", vec![nh * hd]);
                add("self_attn.k_proj.bias", vec![nkv * hd]);
                add("self_attn.v_proj.bias", vec![nkv * hd]);
            }
        }
        v
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> Result<KvCache> {
        self.new_cache_with_limit(self.config.context_length())
    }

    /// A cache limited to `limit` positions (at most the model's context length).
    pub fn new_cache_with_limit(&self, limit: usize) -> Result<KvCache> {
        let limit = limit.min(self.config.context_length()).max(1);
        let capacity = INITIAL_CACHE.min(limit);
        let size = self.config.num_kv_heads() * capacity * self.config.head_dim();
        let n = self.layers.len();
        Ok(KvCache {
            k: vec![vec![0f32; size]; n],
            v: vec![vec![0f32; size]; n],
            len: 0,
            capacity,
            limit,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs `tokens` at positions [cache.len(), cache.len() + tokens.len()), appends their keys
    /// and values to `cache`, and returns f32 logits: [tokens.len(), vocab] for `Logits::All`,
    /// [1, vocab] for `Logits::Last`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Result<Tensor> {
        self.forward_observed(tokens, cache, which, None)
    }

    /// [`Llama::forward`], showing each linear layer's input to `observer`.
    pub fn forward_observed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
        observer: Option<&dyn ActivationObserver>,
    ) -> Result<Tensor> {
        self.forward_batch_observed(&mut [(tokens, cache)], which, observer)?
            .pop()
            .ok_or_else(|| Error::Invalid("no output (internal error)".into()))
    }

    /// Several sequences in one pass, each with its own cache: every linear layer runs once
    /// over all their new rows (each weight is read once for the whole batch) and attention
    /// runs per sequence. Returns one logits tensor per sequence, as [`Llama::forward`] would;
    /// the values are the same as running the sequences one by one.
    pub fn forward_batch(
        &self,
        seqs: &mut [(&[u32], &mut KvCache)],
        which: Logits,
    ) -> Result<Vec<Tensor>> {
        self.forward_batch_observed(seqs, which, None)
    }

    fn forward_batch_observed(
        &self,
        seqs: &mut [(&[u32], &mut KvCache)],
        which: Logits,
        observer: Option<&dyn ActivationObserver>,
    ) -> Result<Vec<Tensor>> {
        let see = |li: Option<usize>, modules: &[&str], x: &Tensor| -> Result<()> {
            let Some(o) = observer else { return Ok(()) };
            let names: Vec<String> = modules
                .iter()
                .map(|m| match li {
                    Some(li) => format!("model.layers.{li}.{m}.weight"),
                    None => m.to_string(),
                })
                .collect();
            o.observe(&names, x)
        };
        let mut all = Vec::new();
        let mut positions = Vec::new();
        for (tokens, cache) in seqs.iter_mut() {
            let (t, n) = (tokens.len(), cache.len);
            if t == 0 {
                return Err(Error::Invalid("forward called with no tokens".into()));
            }
            if n + t > cache.limit {
                return Err(Error::ContextFull {
                    needed: n + t,
                    limit: cache.limit,
                });
            }
            if let Some(bad) = tokens
                .iter()
                .find(|&&id| id as usize >= self.config.vocab_size)
            {
                return Err(Error::Invalid(format!(
                    "token id {bad} is outside the vocabulary ({})",
                    self.config.vocab_size
                )));
            }
            self.reserve(cache, n + t)?;
            all.extend_from_slice(tokens);
            positions.extend((n..n + t).map(|p| p as u32));
        }
        let ids = Tensor::new(all.as_slice(), &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.to_dtype(DType::F32)?;
        let pos = Tensor::new(positions.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let eps = self.config.rms_norm_eps as f32;
        for (li, layer) in self.layers.iter().enumerate() {
            let hn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            see(
                Some(li),
                &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                &hn,
            )?;
            let a = self.attention(layer, &hn, li, seqs, &cos, &sin, &|x| {
                see(Some(li), &["self_attn.o_proj"], x)
            })?;
            x = (x + a)?;
            let hn = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, eps)?;
            see(Some(li), &["mlp.gate_proj", "mlp.up_proj"], &hn)?;
            let g = layer.gate.forward(&hn)?;
            let u = layer.up.forward(&hn)?;
            let act = (candle_nn::ops::silu(&g)? * u)?;
            see(Some(li), &["mlp.down_proj"], &act)?;
            let m = layer.down.forward(&act)?;
            x = (x + m)?;
        }
        // Which rows go through the output head, and how they split per sequence.
        let mut rows = Vec::new();
        let mut counts = Vec::new();
        let mut off = 0u32;
        for (tokens, cache) in seqs.iter_mut() {
            let t = tokens.len() as u32;
            cache.len += t as usize;
            match which {
                Logits::All => {
                    rows.extend(off..off + t);
                    counts.push(t as usize);
                }
                Logits::Last => {
                    rows.push(off + t - 1);
                    counts.push(1);
                }
            }
            off += t;
        }
        let x = if rows.len() == all.len() {
            x
        } else {
            x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?
        };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        see(None, &["lm_head.weight"], &x)?;
        let logits = self.lm_head.forward(&x)?;
        if counts.len() == 1 {
            return Ok(vec![logits]);
        }
        let mut out = Vec::with_capacity(counts.len());
        let mut start = 0;
        for c in counts {
            out.push(logits.narrow(0, start, c)?);
            start += c;
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: &Layer,
        x: &Tensor,
        li: usize,
        seqs: &mut [(&[u32], &mut KvCache)],
        cos: &Tensor,
        sin: &Tensor,
        see_o: &dyn Fn(&Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        let total = x.dim(0)?;
        let q = l.q.forward(x)?.reshape((1, total, nh, hd))?;
        let k = l.k.forward(x)?.reshape((1, total, nkv, hd))?;
        let q = candle_nn::rotary_emb::rope_thd(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_thd(&k, cos, sin)?;
        let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
        let k: Vec<f32> = k.flatten_all()?.to_vec1()?;
        let v: Vec<f32> = l.v.forward(x)?.flatten_all()?.to_vec1()?;
        let mut out = vec![0f32; total * nh * hd];
        let mut row = 0;
        for (tokens, cache) in seqs.iter_mut() {
            let (t, n, cap) = (tokens.len(), cache.len, cache.capacity);
            // Append this sequence's keys/values at positions [n, n+t) of each kv head.
            let (kc, vc) = (&mut cache.k[li], &mut cache.v[li]);
            for i in 0..t {
                for h in 0..nkv {
                    let src = ((row + i) * nkv + h) * hd;
                    let dst = (h * cap + n + i) * hd;
                    kc[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                    vc[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
                }
            }
            let shape = tandem_kernels::AttentionShape {
                t,
                n,
                n_head: nh,
                n_kv_head: nkv,
                head_dim: hd,
                capacity: cap,
            };
            let qs = &q[row * nh * hd..(row + t) * nh * hd];
            tandem_kernels::attention(
                shape,
                qs,
                kc,
                vc,
                &mut out[row * nh * hd..(row + t) * nh * hd],
            );
            row += t;
        }
        let out = Tensor::from_vec(out, (total, nh * hd), &self.device)?;
        see_o(&out)?;
        l.o.forward(&out)
    }

    /// Grows the cache (doubling, capped at its limit) so it can hold `needed` positions.
    fn reserve(&self, cache: &mut KvCache, needed: usize) -> Result<()> {
        if needed <= cache.capacity {
            return Ok(());
        }
        let mut cap = cache.capacity.max(1);
        while cap < needed {
            cap *= 2;
        }
        let cap = cap.min(cache.limit);
        let (nkv, hd, old) = (
            self.config.num_kv_heads(),
            self.config.head_dim(),
            cache.capacity,
        );
        for buf in cache.k.iter_mut().chain(cache.v.iter_mut()) {
            let mut grown = vec![0f32; nkv * cap * hd];
            for h in 0..nkv {
                let len = cache.len * hd;
                grown[h * cap * hd..][..len].copy_from_slice(&buf[h * old * hd..][..len]);
            }
            *buf = grown;
        }
        cache.capacity = cap;
        Ok(())
    }

    /// Bytes of weights read by one forward pass (linear layers plus norms).
    pub fn weight_bytes(&self) -> usize {
        let mut b = self.lm_head.weight_bytes();
        for l in &self.layers {
            for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                b += lin.weight_bytes();
            }
        }
        b
    }

    /// (name, storage type, weight bytes) for every linear layer, in order.
    pub fn linear_summary(&self) -> Vec<(String, String, usize)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (n, lin) in [
                ("self_attn.q_proj", &l.q),
                ("self_attn.k_proj", &l.k),
                ("self_attn.v_proj", &l.v),
                ("self_attn.o_proj", &l.o),
                ("mlp.gate_proj", &l.gate),
                ("mlp.up_proj", &l.up),
                ("mlp.down_proj", &l.down),
            ] {
                v.push((
                    format!("model.layers.{i}.{n}.weight"),
                    lin.dtype_name(),
                    lin.weight_bytes(),
                ));
            }
        }
        v.push((
            "lm_head.weight".into(),
            self.lm_head.dtype_name(),
            self.lm_head.weight_bytes(),
        ));
        v
    }
}

/// Index of the largest value (first on ties): greedy decoding.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Logits of the last row of a [t, vocab] tensor as a Vec.
pub fn last_row(logits: &Tensor) -> Result<Vec<f32>> {
    let t = logits.dim(0)?;
    Ok(logits.get(t - 1)?.to_vec1::<f32>()?)
}

/// Every row of a [t, vocab] logits tensor as Vecs.
pub fn all_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_vec2::<f32>()?)
}
