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

#[cfg(feature = "cuda")]
mod gpu;
mod layerwise;

struct Layer {
    attn_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Model weights and hyperparameters; immutable once loaded, shared by any number of caches.
pub struct Llama {
    pub config: Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
    /// When set, the output head computes only these tokens' logits (see
    /// [`Llama::set_output_shortlist`]); the forward pass adds the tokens it reads.
    shortlist: std::sync::RwLock<Option<Shortlist>>,
    /// RoPE inverse frequencies, [head_dim / 2]: angles are computed per row of a pass, so
    /// memory does not grow with the context a file declares (2^31 positions would be a
    /// 32 GB table) and costs the same for the positions actually run.
    rope_inv: Vec<f32>,
    device: Device,
    /// Buffers the forward pass reuses from call to call (no allocation per token but the
    /// returned logits); a concurrent call finds it locked and uses fresh ones.
    workspace: std::sync::Mutex<Workspace>,
    /// Norms, RoPE tables and buffers on the GPU when every linear layer is there too: the
    /// forward pass then runs on the GPU end to end (see `llama/gpu.rs`).
    #[cfg(feature = "cuda")]
    resident: Option<gpu::Resident>,
}

/// A cut-down output head: the rows of `ids`, and of `extra_ids` (tokens the model has read
/// since: few, so their rows are cut out again whenever one is added).
struct Shortlist {
    ids: Vec<u32>,
    head: Linear,
    extra_ids: Vec<u32>,
    extra: Option<Linear>,
    /// Whether each token of the vocabulary is in `ids` or `extra_ids`.
    member: Vec<bool>,
}

impl Shortlist {
    /// Spreads the heads' logits for `rows` positions over full vocabulary rows of `logits`
    /// (−∞ elsewhere); `short` is scratch space.
    fn logits(
        &self,
        hn: &[f32],
        rows: usize,
        short: &mut Vec<f32>,
        logits: &mut [f32],
    ) -> Result<()> {
        let vocab = self.member.len();
        logits.fill(f32::NEG_INFINITY);
        for (ids, head) in [
            (&self.ids, Some(&self.head)),
            (&self.extra_ids, self.extra.as_ref()),
        ] {
            let Some(head) = head else { continue };
            let vals = sized(short, rows * ids.len());
            head.forward_into(hn, rows, vals)?;
            for (row, v) in logits
                .chunks_exact_mut(vocab)
                .zip(vals.chunks_exact(ids.len()))
            {
                for (&id, &x) in ids.iter().zip(v) {
                    row[id as usize] = x;
                }
            }
        }
        Ok(())
    }
}

/// Activation buffers of one forward pass, sized for its rows.
#[derive(Default)]
struct Workspace {
    x: Vec<f32>,
    hn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// The shortlisted head's logits before they are spread over the vocabulary.
    short: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Every sequence's new tokens and their positions, and which rows reach the head.
    tokens: Vec<u32>,
    positions: Vec<usize>,
    picked: Vec<usize>,
    counts: Vec<usize>,
    profile: Option<OpTimes>,
}

/// Where the time of forward passes went, per operation (see [`Llama::start_profile`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpTimes {
    /// (operation, seconds), in the order the forward pass first runs them.
    pub ops: Vec<(&'static str, f64)>,
    /// Forward calls measured.
    pub calls: usize,
}

impl OpTimes {
    fn add(&mut self, op: &'static str, secs: f64) {
        match self.ops.iter_mut().find(|(o, _)| *o == op) {
            Some((_, t)) => *t += secs,
            None => self.ops.push((op, secs)),
        }
    }
}

/// Times the operations of one forward pass when profiling is on (an `Instant` per op;
/// nothing when off).
struct Timer<'a> {
    times: Option<&'a mut OpTimes>,
    last: std::time::Instant,
}

impl Timer<'_> {
    fn lap(&mut self, op: &'static str) {
        if let Some(t) = self.times.as_deref_mut() {
            let now = std::time::Instant::now();
            t.add(op, (now - self.last).as_secs_f64());
            self.last = now;
        }
    }
}

/// Shows one linear input to the observer: (layer, modules, rows of input, row count).
type Seer<'a> = dyn Fn(Option<usize>, &[&str], &[f32], usize) -> Result<()> + 'a;

fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..len]
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
    /// The keys and values on the GPU instead, for a model whose forward pass runs there.
    #[cfg(feature = "cuda")]
    gpu: Option<gpu::GpuKv>,
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

impl KvCache {
    fn on_gpu(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.gpu.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }
}

/// After a forward pass over `seqs`: counts their new tokens into their caches and lists the
/// rows that reach the output head (`picked`, indices into the pass's rows) and how many of
/// them each sequence gets (`counts`).
fn head_rows(
    seqs: &mut [(&[u32], &mut KvCache)],
    which: Logits,
    picked: &mut Vec<usize>,
    counts: &mut Vec<usize>,
) {
    picked.clear();
    counts.clear();
    let mut off = 0;
    for (tokens, cache) in seqs.iter_mut() {
        let t = tokens.len();
        cache.len += t;
        match which {
            Logits::All => {
                picked.extend(off..off + t);
                counts.push(t);
            }
            Logits::Last => {
                picked.push(off + t - 1);
                counts.push(1);
            }
        }
        off += t;
    }
}

/// Splits the head's output rows into one [count, vocab] tensor per sequence.
fn split_logits(
    mut logits: Vec<f32>,
    counts: &[usize],
    vocab: usize,
    device: &Device,
) -> Result<Vec<Tensor>> {
    let total: usize = counts.iter().sum();
    let mut out = Vec::with_capacity(counts.len());
    let mut start = 0;
    for &n in counts {
        let part = if counts.len() == 1 && n == total {
            std::mem::take(&mut logits)
        } else {
            logits[start * vocab..(start + n) * vocab].to_vec()
        };
        out.push(Tensor::from_vec(part, (n, vocab), device)?);
        start += n;
    }
    Ok(out)
}

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
        let norm_weights = |name: &str| -> Result<Vec<f32>> { Ok(vector(name, h)?.to_vec1()?) };

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
                attn_norm: norm_weights(&format!("{p}.input_layernorm.weight"))?,
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
                mlp_norm: norm_weights(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: linear(&format!("{p}.mlp.gate_proj.weight"), c.intermediate_size, h)?,
                up: linear(&format!("{p}.mlp.up_proj.weight"), c.intermediate_size, h)?,
                down: linear(&format!("{p}.mlp.down_proj.weight"), h, c.intermediate_size)?,
            });
        }
        let norm = norm_weights("model.norm.weight")?;

        let mut model = Llama {
            rope_inv: c.rope_inv_freq(),
            embed,
            layers,
            norm,
            lm_head,
            shortlist: Default::default(),
            device: device.clone(),
            config,
            workspace: Default::default(),
            #[cfg(feature = "cuda")]
            resident: None,
        };
        if crate::linear::offload_requested() {
            model.upload_to_gpu()?;
        }
        Ok(model)
    }

    /// RoPE cosines and sines of `positions`, [positions, head_dim / 2] each. Angles are
    /// f32 products position · inverse frequency, as candle computed them.
    fn rope_rows(&self, positions: &[usize], cos: &mut [f32], sin: &mut [f32]) {
        let half = self.rope_inv.len();
        for (r, &p) in positions.iter().enumerate() {
            let (c, s) = (&mut cos[r * half..][..half], &mut sin[r * half..][..half]);
            for ((c, s), f) in c.iter_mut().zip(s.iter_mut()).zip(&self.rope_inv) {
                let a = p as f32 * f;
                *c = a.cos();
                *s = a.sin();
            }
        }
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
        if limit == 0 {
            return Err(Error::Invalid(
                "a context limit of 0 positions holds no token".into(),
            ));
        }
        let limit = limit.min(self.config.context_length());
        let capacity = INITIAL_CACHE.min(limit);
        let n = self.layers.len();
        #[cfg(feature = "cuda")]
        if self.resident.is_some() {
            return Ok(KvCache {
                k: vec![Vec::new(); n],
                v: vec![Vec::new(); n],
                len: 0,
                capacity: 0,
                limit,
                gpu: Some(gpu::GpuKv::new(&self.config, n, capacity)?),
            });
        }
        let size = self.config.num_kv_heads() * capacity * self.config.head_dim();
        Ok(KvCache {
            k: vec![vec![0f32; size]; n],
            v: vec![vec![0f32; size]; n],
            len: 0,
            capacity,
            limit,
            #[cfg(feature = "cuda")]
            gpu: None,
        })
    }

    /// Whether `other` can read and write this model's [`KvCache`]: same layer count, KV
    /// heads, head size and RoPE. A quantized copy of a model can (a self-draft attending over
    /// its verifier's cache); a different model cannot.
    pub fn shares_cache_shape_with(&self, other: &Llama) -> bool {
        let (a, b) = (&self.config, &other.config);
        self.runs_on_gpu() == other.runs_on_gpu()
            && self.layers.len() == other.layers.len()
            && a.num_kv_heads() == b.num_kv_heads()
            && a.head_dim() == b.head_dim()
            && a.rope_theta == b.rope_theta
            && a.context_length() == b.context_length()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Restricts the output head to the tokens `ids` and, from then on, every token this model
    /// reads (`None` restores the full head): every other token's logit is −∞, so neither
    /// argmax nor sampling can pick it. For a draft model: a speculative draft spends ~20% of
    /// its step on SmolLM2's 49k-row head, a token of its context is likely to come again
    /// (names, code identifiers), and a draft that cannot propose a token only loses that
    /// proposal, never the verifier's output. Cuts a CPU copy of the head's rows in the head's
    /// format (Q8_0/Q4_0 tiles stay tiles). Not for a model that runs on the GPU.
    pub fn set_output_shortlist(&mut self, ids: Option<&[u32]>) -> Result<()> {
        let Some(ids) = ids else {
            *self.shortlist.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
            return Ok(());
        };
        if self.runs_on_gpu() {
            return Err(Error::Invalid(
                "an output shortlist runs on the CPU; this model runs on the GPU".into(),
            ));
        }
        let vocab = self.config.vocab_size;
        let mut member = vec![false; vocab];
        let mut list = Vec::with_capacity(ids.len().next_multiple_of(8));
        for &id in ids {
            let Some(m) = member.get_mut(id as usize) else {
                return Err(Error::Invalid(format!(
                    "token id {id} is outside the vocabulary ({vocab})"
                )));
            };
            if !std::mem::replace(m, true) {
                list.push(id);
            }
        }
        let Some(&last) = list.last() else {
            return Err(Error::Invalid("an empty output shortlist".into()));
        };
        // Whole 8-row tiles for Q8_0/Q4_0 heads: the last id repeats (its logit is written
        // twice, with the same value).
        list.resize(list.len().next_multiple_of(8), last);
        let head = self.lm_head.select_rows(&list)?;
        *self.shortlist.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(Shortlist {
            ids: list,
            head,
            extra_ids: Vec::new(),
            extra: None,
            member,
        });
        Ok(())
    }

    /// Adds `tokens` to the output shortlist, if there is one (the forward pass's input).
    fn extend_shortlist(&self, tokens: &[u32]) -> Result<()> {
        let missing = |s: &Shortlist| tokens.iter().any(|&t| !s.member[t as usize]);
        match self.shortlist.read() {
            Ok(g) if g.as_ref().is_none_or(|s| !missing(s)) => return Ok(()),
            _ => {}
        }
        let mut g = self.shortlist.write().unwrap_or_else(|e| e.into_inner());
        let Some(s) = g.as_mut() else { return Ok(()) };
        for &t in tokens {
            if !std::mem::replace(&mut s.member[t as usize], true) {
                s.extra_ids.push(t);
            }
        }
        s.extra = Some(self.lm_head.select_rows(&s.extra_ids)?);
        Ok(())
    }

    /// Whether the whole forward pass (and so its KV caches) runs on the GPU: `--gpu` with
    /// every linear layer in a format the GPU kernels read (Q8_0, Q4_0, F16).
    pub fn runs_on_gpu(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.resident.is_some();
        #[cfg(not(feature = "cuda"))]
        false
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
        let mut fresh = Workspace::default();
        let mut held = self.workspace.try_lock();
        let ws = match held.as_mut() {
            Ok(w) => &mut **w,
            Err(_) => &mut fresh,
        };
        // Taken out of the workspace while it is lent to `forward_rows`, put back after.
        let (mut all, mut positions) = (
            std::mem::take(&mut ws.tokens),
            std::mem::take(&mut ws.positions),
        );
        all.clear();
        positions.clear();
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
            if cache.on_gpu() != self.runs_on_gpu() {
                return Err(Error::Invalid(format!(
                    "a KV cache made for the {} was given to a model on the {}",
                    if cache.on_gpu() { "GPU" } else { "CPU" },
                    if self.runs_on_gpu() { "GPU" } else { "CPU" },
                )));
            }
            if !self.runs_on_gpu() {
                self.reserve(cache, n + t)?;
            }
            all.extend_from_slice(tokens);
            positions.extend(n..n + t);
        }
        #[cfg(feature = "cuda")]
        if let Some(r) = &self.resident {
            let out = match observer {
                Some(_) => Err(Error::Invalid(
                    "calibration reads activations on the CPU; run it without --gpu".into(),
                )),
                None => self.forward_resident(r, ws, seqs, &all, &positions, which),
            };
            (ws.tokens, ws.positions) = (all, positions);
            return out;
        }
        let mut profile = ws.profile.take();
        let out = self.forward_rows(ws, seqs, &all, &positions, which, observer, &mut profile);
        if let Some(p) = profile.as_mut() {
            p.calls += 1;
        }
        ws.profile = profile;
        (ws.tokens, ws.positions) = (all, positions);
        out
    }

    /// The forward pass proper, on the workspace's buffers.
    #[allow(clippy::too_many_arguments)]
    fn forward_rows(
        &self,
        ws: &mut Workspace,
        seqs: &mut [(&[u32], &mut KvCache)],
        all: &[u32],
        positions: &[usize],
        which: Logits,
        observer: Option<&dyn ActivationObserver>,
        profile: &mut Option<OpTimes>,
    ) -> Result<Vec<Tensor>> {
        let see = |li: Option<usize>, modules: &[&str], x: &[f32], rows: usize| {
            self.show_input(observer, li, modules, x, rows)
        };
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim());
        let rows = all.len();
        let eps = c.rms_norm_eps as f32;
        let mut timer = Timer {
            times: profile.as_mut(),
            last: std::time::Instant::now(),
        };

        self.embed_rows(all, sized(&mut ws.x, rows * h))?;
        let half = hd / 2;
        let (cos, sin) = (
            sized(&mut ws.cos, rows * half),
            sized(&mut ws.sin, rows * half),
        );
        self.rope_rows(positions, cos, sin);
        timer.lap("embed");
        for li in 0..self.layers.len() {
            self.layer_rows(li, ws, seqs, rows, &see, &mut timer)?;
        }
        // Which rows go through the output head, and how they split per sequence.
        let (mut picked, mut counts) = (
            std::mem::take(&mut ws.picked),
            std::mem::take(&mut ws.counts),
        );
        head_rows(seqs, which, &mut picked, &mut counts);
        let hn = sized(&mut ws.hn, picked.len() * h);
        for (dst, &r) in hn.chunks_exact_mut(h).zip(&picked) {
            tandem_kernels::ops::rms_norm(&ws.x[r * h..][..h], &self.norm, eps, dst);
        }
        timer.lap("norm");
        see(None, &["lm_head.weight"], hn, picked.len())?;
        let vocab = c.vocab_size;
        let mut logits = vec![0f32; picked.len() * vocab];
        self.extend_shortlist(all)?;
        match &*self.shortlist.read().unwrap_or_else(|e| e.into_inner()) {
            None => self.lm_head.forward_into(hn, picked.len(), &mut logits)?,
            Some(s) => s.logits(hn, picked.len(), &mut ws.short, &mut logits)?,
        }
        timer.lap("lm_head matmul");
        let out = split_logits(logits, &counts, vocab, &self.device);
        (ws.picked, ws.counts) = (picked, counts);
        out
    }

    /// One decoder layer over the rows of `ws.x` (RoPE tables already in `ws.cos`/`ws.sin`):
    /// attention appends to each sequence's cache at layer `li`.
    fn layer_rows(
        &self,
        li: usize,
        ws: &mut Workspace,
        seqs: &mut [(&[u32], &mut KvCache)],
        rows: usize,
        see: &Seer<'_>,
        timer: &mut Timer<'_>,
    ) -> Result<()> {
        self.attention_rows(li, ws, seqs, rows, see, timer)?;
        self.mlp_rows(li, ws, rows, see, timer)
    }

    /// A decoder layer's attention half over the rows of `ws.x`: x += o(attention(q, k, v)).
    fn attention_rows(
        &self,
        li: usize,
        ws: &mut Workspace,
        seqs: &mut [(&[u32], &mut KvCache)],
        rows: usize,
        see: &Seer<'_>,
        timer: &mut Timer<'_>,
    ) -> Result<()> {
        let layer = &self.layers[li];
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim());
        let (nh, nkv) = (c.num_attention_heads, c.num_kv_heads());
        let half = hd / 2;
        let eps = c.rms_norm_eps as f32;
        let x = &mut ws.x[..rows * h];
        let hn = sized(&mut ws.hn, rows * h);
        tandem_kernels::ops::rms_norm(x, &layer.attn_norm, eps, hn);
        timer.lap("norm");
        see(
            Some(li),
            &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            hn,
            rows,
        )?;
        let q = sized(&mut ws.q, rows * nh * hd);
        let k = sized(&mut ws.k, rows * nkv * hd);
        let v = sized(&mut ws.v, rows * nkv * hd);
        layer.q.forward_into(hn, rows, q)?;
        layer.k.forward_into(hn, rows, k)?;
        layer.v.forward_into(hn, rows, v)?;
        timer.lap("q/k/v matmul");
        tandem_kernels::ops::rope_rotate_half(
            q,
            nh,
            hd,
            &ws.cos[..rows * half],
            &ws.sin[..rows * half],
        );
        tandem_kernels::ops::rope_rotate_half(
            k,
            nkv,
            hd,
            &ws.cos[..rows * half],
            &ws.sin[..rows * half],
        );
        timer.lap("rope");
        let att = sized(&mut ws.att, rows * nh * hd);
        self.attention(li, seqs, q, k, v, att);
        timer.lap("attention");
        see(Some(li), &["self_attn.o_proj"], att, rows)?;
        let proj = sized(&mut ws.proj, rows * h);
        layer.o.forward_into(att, rows, proj)?;
        timer.lap("o matmul");
        let x = &mut ws.x[..rows * h];
        tandem_kernels::ops::add_assign(x, proj);
        Ok(())
    }

    /// A decoder layer's MLP half over the rows of `ws.x`: x += down(silu(gate·n) ⊙ up·n),
    /// n = RMSNorm(x).
    fn mlp_rows(
        &self,
        li: usize,
        ws: &mut Workspace,
        rows: usize,
        see: &Seer<'_>,
        timer: &mut Timer<'_>,
    ) -> Result<()> {
        let layer = &self.layers[li];
        let c = &self.config;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let eps = c.rms_norm_eps as f32;
        let x = &mut ws.x[..rows * h];
        let hn = sized(&mut ws.hn, rows * h);
        tandem_kernels::ops::rms_norm(x, &layer.mlp_norm, eps, hn);
        timer.lap("norm");
        see(Some(li), &["mlp.gate_proj", "mlp.up_proj"], hn, rows)?;
        let gate = sized(&mut ws.gate, rows * inter);
        let up = sized(&mut ws.up, rows * inter);
        layer.gate.forward_into(hn, rows, gate)?;
        layer.up.forward_into(hn, rows, up)?;
        timer.lap("gate/up matmul");
        tandem_kernels::ops::silu_mul(gate, up);
        timer.lap("silu");
        see(Some(li), &["mlp.down_proj"], gate, rows)?;
        let proj = sized(&mut ws.proj, rows * h);
        layer.down.forward_into(gate, rows, proj)?;
        timer.lap("down matmul");
        tandem_kernels::ops::add_assign(&mut ws.x[..rows * h], proj);
        Ok(())
    }

    /// Shows one linear input (`rows` rows of `x`) to the observer, if any, under the Hugging
    /// Face names of the weights that read it (layer `li`'s `modules`, or top-level names).
    fn show_input(
        &self,
        observer: Option<&dyn ActivationObserver>,
        li: Option<usize>,
        modules: &[&str],
        x: &[f32],
        rows: usize,
    ) -> Result<()> {
        let Some(o) = observer else { return Ok(()) };
        let names: Vec<String> = modules
            .iter()
            .map(|m| match li {
                Some(li) => format!("model.layers.{li}.{m}.weight"),
                None => m.to_string(),
            })
            .collect();
        let t = Tensor::from_slice(x, (rows, x.len() / rows), &self.device)?;
        o.observe(&names, &t)
    }

    /// Embedding rows of `ids` into `out` as f32.
    fn embed_rows(&self, ids: &[u32], out: &mut [f32]) -> Result<()> {
        let h = self.config.hidden_size;
        let (storage, layout) = self.embed.storage_and_layout();
        let off = layout.start_offset();
        match &*storage {
            candle_core::Storage::Cpu(s) if self.embed.dtype() == DType::F16 => {
                let all = s.as_slice::<half::f16>()?;
                for (dst, &id) in out.chunks_exact_mut(h).zip(ids) {
                    let row = &all[off + id as usize * h..][..h];
                    for (d, v) in dst.iter_mut().zip(row) {
                        *d = v.to_f32();
                    }
                }
            }
            candle_core::Storage::Cpu(s) if self.embed.dtype() == DType::F32 => {
                let all = s.as_slice::<f32>()?;
                for (dst, &id) in out.chunks_exact_mut(h).zip(ids) {
                    dst.copy_from_slice(&all[off + id as usize * h..][..h]);
                }
            }
            _ => {
                let idx = Tensor::new(ids, &self.device)?;
                let v: Vec<f32> = self
                    .embed
                    .index_select(&idx, 0)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                out.copy_from_slice(&v);
            }
        }
        Ok(())
    }

    /// Appends each sequence's new keys/values to its cache and attends over it.
    fn attention(
        &self,
        li: usize,
        seqs: &mut [(&[u32], &mut KvCache)],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
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
    }

    /// Starts timing every operation of later forward passes (see [`Llama::take_profile`]).
    pub fn start_profile(&self) {
        if let Ok(mut w) = self.workspace.lock() {
            w.profile = Some(OpTimes::default());
        }
    }

    /// The times gathered since [`Llama::start_profile`], and stops timing.
    pub fn take_profile(&self) -> Option<OpTimes> {
        self.workspace.lock().ok()?.profile.take()
    }

    /// Copies every linear layer with a GPU kernel to the GPU; returns the bytes copied.
    pub fn upload_to_gpu(&mut self) -> Result<usize> {
        #[cfg(feature = "cuda")]
        {
            let mut bytes = 0;
            for lin in self.linears_mut() {
                bytes += lin.upload_to_gpu()?;
            }
            if self.linears().iter().all(|(_, l)| l.on_gpu()) {
                self.resident = Some(gpu::Resident::new(self)?);
            }
            Ok(bytes)
        }
        #[cfg(not(feature = "cuda"))]
        Err(Error::Invalid(
            "this tandem was built without GPU support (cargo build --features cuda)".into(),
        ))
    }

    /// Sets how activations meet Q8_0/Q4_0 weights in every linear layer.
    pub fn set_activation_precision(
        &mut self,
        p: crate::linear::ActivationPrecision,
    ) -> Result<()> {
        for lin in self.linears_mut() {
            lin.set_activations(p)?;
        }
        if let Some(s) = self.shortlist.get_mut().unwrap_or_else(|e| e.into_inner()) {
            s.head.set_activations(p)?;
            if let Some(e) = &mut s.extra {
                e.set_activations(p)?;
            }
        }
        Ok(())
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
        self.linears().iter().map(|(_, l)| l.weight_bytes()).sum()
    }

    /// The time of one decode step on the CPU, in "F16 bytes": each layer's weight bytes
    /// times how long its format takes per byte relative to F16 (tg128 on SmolLM2, 2 threads,
    /// BENCHMARKS.md: F16 269 MB at 48 tok/s, Q8_0 143 MB at 98, Q4_0 90 MB at 95, so a Q8_0
    /// byte costs ~0.9 of an F16 byte and a Q4_0 byte ~1.5: 4-bit unpacking is compute-bound).
    /// The ratio of two models' costs is what a draft step costs relative to a verifier step,
    /// where it must be known without reading the clock (seeded sampling).
    /// With an output shortlist, the head counts at its shortlisted size.
    pub fn decode_cost(&self) -> f64 {
        let cost = |l: &Linear| {
            let per_byte = match l.dtype_name().as_str() {
                "F16" | "F32" | "Q8_0" => 1.0,
                _ => 1.5,
            };
            l.weight_bytes() as f64 * per_byte
        };
        let all: f64 = self.linears().iter().map(|(_, l)| cost(l)).sum();
        match &*self.shortlist.read().unwrap_or_else(|e| e.into_inner()) {
            Some(s) => {
                all - cost(&self.lm_head) + cost(&s.head) + s.extra.as_ref().map_or(0.0, cost)
            }
            None => all,
        }
    }

    /// Every linear layer with its Hugging Face weight name, in forward order, head last.
    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (n, lin) in LINEAR_NAMES.iter().zip(l.linears()) {
                v.push((format!("model.layers.{i}.{n}.weight"), lin));
            }
        }
        v.push(("lm_head.weight".into(), &self.lm_head));
        v
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.q,
                    &mut l.k,
                    &mut l.v,
                    &mut l.o,
                    &mut l.gate,
                    &mut l.up,
                    &mut l.down,
                ]
            })
            .chain(std::iter::once(&mut self.lm_head))
    }

    /// (name, storage type, weight bytes) for every linear layer, in order.
    pub fn linear_summary(&self) -> Vec<(String, String, usize)> {
        self.linears()
            .into_iter()
            .map(|(n, l)| (n, l.dtype_name(), l.weight_bytes()))
            .collect()
    }
}

/// Module names of a layer's linear weights, in the order of `Layer::linears`.
const LINEAR_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl Layer {
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }
}

pub use tandem_kernels::sampling::argmax;

/// Logits of the last row of a [t, vocab] tensor as a Vec.
pub fn last_row(logits: &Tensor) -> Result<Vec<f32>> {
    let t = logits.dim(0)?;
    Ok(logits.get(t - 1)?.to_vec1::<f32>()?)
}

/// Every row of a [t, vocab] logits tensor as Vecs.
pub fn all_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_vec2::<f32>()?)
}
