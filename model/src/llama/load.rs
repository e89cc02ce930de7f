//! Building a [`Llama`] from a weight store, and the options it is built with.

use super::{KvCacheType, Layer, Llama};
use crate::config::Config;
use crate::error::{tensor_err, Result};
use crate::gguf_names::{permute_qk_rows, Permute};
use crate::linear::{dense_tensor, ActivationPrecision, Linear};
use crate::weights::{RawTensor, WeightStore};
use candle_core::{DType, Device, Tensor};

/// How a model is loaded: everything that used to be a process-wide setting, explicit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Threads its kernels run on (the caller included). `None`: the process-wide pool
    /// (`RAYON_NUM_THREADS`, else every core). Models loaded with the same count share one
    /// pool, so a verifier and its draft do not compete with two sets of workers.
    pub threads: Option<usize>,
    /// How activations meet Q8_0/Q4_0 weights (8-bit, the fast default, or f32).
    pub activations: ActivationPrecision,
    /// Where the forward pass runs.
    pub device: ComputeDevice,
    /// What its KV caches hold keys and values as (on the CPU; a GPU cache is f32).
    pub kv_cache: KvCacheType,
}

/// Where a model's forward pass runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ComputeDevice {
    #[default]
    Cpu,
    /// GPU 0 (feature `cuda`): linear layers with a GPU kernel (Q8_0, Q4_0, F16) are copied
    /// there, and when all of them are, the whole pass and its KV caches run there.
    Gpu,
}

impl LoadOptions {
    /// The options with `threads` set.
    pub fn with_threads(self, threads: Option<usize>) -> Self {
        LoadOptions { threads, ..self }
    }
}

/// Reads the model's tensors from a store, checking each shape against the config.
struct Reader<'a> {
    c: &'a Config,
    store: &'a WeightStore,
    act: ActivationPrecision,
    /// q/k from a llama GGUF are stored in llama.cpp's RoPE order: rows are put back.
    permute: bool,
}

impl<'a> Reader<'a> {
    fn new(c: &'a Config, store: &'a WeightStore, options: &LoadOptions) -> Self {
        Reader {
            c,
            store,
            act: options.activations,
            permute: store.is_gguf() && c.architecture() == crate::config::Architecture::Llama,
        }
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<RawTensor<'a>> {
        let raw = self.store.get(name)?;
        if raw.shape != shape {
            return Err(tensor_err(
                self.store.path_of(name),
                &self.store.stored_name(name),
                format!(
                    "shape {:?} does not match the config (expected {shape:?})",
                    raw.shape
                ),
            ));
        }
        Ok(raw)
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        let raw = self.get(name, &[out, inp])?;
        Linear::from_raw(self.store.path_of(name), &raw, self.act)
    }

    fn qk_linear(&self, name: &str, heads: usize) -> Result<Linear> {
        let (h, hd) = (self.c.hidden_size, self.c.head_dim());
        let raw = self.get(name, &[heads * hd, h])?;
        if !self.permute {
            return Linear::from_raw(self.store.path_of(name), &raw, self.act);
        }
        let row_bytes = raw.data.len() / (heads * hd);
        let data = permute_qk_rows(raw.data, heads, heads * hd, row_bytes, Permute::GgufToHf);
        let raw = RawTensor { data: &data, ..raw };
        Linear::from_raw(self.store.path_of(name), &raw, self.act)
    }

    fn qk_bias(&self, name: &str, heads: usize) -> Result<Option<Tensor>> {
        if !self.c.qkv_bias() {
            return Ok(None);
        }
        let hd = self.c.head_dim();
        let raw = self.get(name, &[heads * hd])?;
        let t = dense_tensor(self.store.path_of(name), &raw, &Device::Cpu)?.to_dtype(DType::F32)?;
        if !self.permute {
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
        Ok(Some(Tensor::from_vec(v, heads * hd, &Device::Cpu)?))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        let raw = self.get(name, &[len])?;
        Ok(dense_tensor(self.store.path_of(name), &raw, &Device::Cpu)?.to_dtype(DType::F32)?)
    }

    fn norm_weights(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.vector(name, self.c.hidden_size)?.to_vec1()?)
    }

    /// Decoder layer `i`; with `weights` false its projections are left unloaded
    /// ([`Linear::released`]: shapes and norms only).
    fn layer(&self, i: usize, weights: bool) -> Result<Layer> {
        let c = self.c;
        let (h, hd, nh, nkv, ff) = (
            c.hidden_size,
            c.head_dim(),
            c.num_attention_heads,
            c.num_kv_heads(),
            c.intermediate_size,
        );
        let p = format!("model.layers.{i}");
        let norms = (
            self.norm_weights(&format!("{p}.input_layernorm.weight"))?,
            self.norm_weights(&format!("{p}.post_attention_layernorm.weight"))?,
        );
        if !weights {
            return Ok(Layer {
                attn_norm: norms.0,
                q: Linear::released(nh * hd, h),
                k: Linear::released(nkv * hd, h),
                v: Linear::released(nkv * hd, h),
                o: Linear::released(h, nh * hd),
                mlp_norm: norms.1,
                gate: Linear::released(ff, h),
                up: Linear::released(ff, h),
                down: Linear::released(h, ff),
            });
        }
        let mut layer = Layer {
            attn_norm: norms.0,
            q: self
                .qk_linear(&format!("{p}.self_attn.q_proj.weight"), nh)?
                .with_bias(self.qk_bias(&format!("{p}.self_attn.q_proj.bias"), nh)?),
            k: self
                .qk_linear(&format!("{p}.self_attn.k_proj.weight"), nkv)?
                .with_bias(self.qk_bias(&format!("{p}.self_attn.k_proj.bias"), nkv)?),
            v: self
                .linear(&format!("{p}.self_attn.v_proj.weight"), nkv * hd, h)?
                .with_bias(if c.qkv_bias() {
                    Some(self.vector(&format!("{p}.self_attn.v_proj.bias"), nkv * hd)?)
                } else {
                    None
                }),
            o: self.linear(&format!("{p}.self_attn.o_proj.weight"), h, nh * hd)?,
            mlp_norm: norms.1,
            gate: self.linear(&format!("{p}.mlp.gate_proj.weight"), ff, h)?,
            up: self.linear(&format!("{p}.mlp.up_proj.weight"), ff, h)?,
            down: self.linear(&format!("{p}.mlp.down_proj.weight"), h, ff)?,
        };
        layer.fuse_inputs()?;
        Ok(layer)
    }
}

impl Llama {
    /// Builds the model from a checked config and a weight store, verifying every tensor's
    /// shape against the config, as `options` say (threads, activation precision, device).
    pub fn load(config: Config, store: &WeightStore, options: &LoadOptions) -> Result<Self> {
        Self::load_parts(config, store, options, true)
    }

    /// The model without its decoder layers' projections and output head (embeddings and
    /// norms only): a layer-by-layer run (calibrated quantization) loads one layer at a time
    /// with [`Llama::load_layer`] and drops it with [`Llama::release_layer`], so a large
    /// checkpoint never sits in memory whole. Anything that reads a released layer fails
    /// with an error.
    pub fn load_deferred(
        config: Config,
        store: &WeightStore,
        options: &LoadOptions,
    ) -> Result<Self> {
        if options.device == ComputeDevice::Gpu {
            return Err(crate::Error::Invalid(
                "a model loaded layer by layer runs on the CPU".into(),
            ));
        }
        Self::load_parts(config, store, options, false)
    }

    /// Loads decoder layer `li`'s projections from `store` (the one the model came from).
    pub fn load_layer(
        &mut self,
        store: &WeightStore,
        li: usize,
        options: &LoadOptions,
    ) -> Result<()> {
        if li >= self.layers.len() {
            return Err(crate::Error::Invalid(format!("no decoder layer {li}")));
        }
        let layer = Reader::new(&self.config, store, options).layer(li, true)?;
        self.layers[li] = layer;
        Ok(())
    }

    /// Drops decoder layer `li`'s projections (its norms stay).
    pub fn release_layer(&mut self, li: usize) {
        if let Some(l) = self.layers.get_mut(li) {
            for lin in l.linears_mut() {
                *lin = Linear::released(lin.out_dim, lin.in_dim);
            }
        }
    }

    fn load_parts(
        config: Config,
        store: &WeightStore,
        options: &LoadOptions,
        weights: bool,
    ) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let r = Reader::new(c, store, options);
        let embed_name = "model.embed_tokens.weight";
        let embed_raw = r.get(embed_name, &[c.vocab_size, h])?;
        let embed = dense_tensor(store.path_of(embed_name), &embed_raw, &Device::Cpu)?;
        let embed = match embed.dtype() {
            DType::BF16 => embed.to_dtype(DType::F32)?,
            _ => embed,
        };
        let lm_head = if !weights {
            Linear::released(c.vocab_size, h)
        } else if store.contains("lm_head.weight") {
            r.linear("lm_head.weight", c.vocab_size, h)?
        } else if c.tie_word_embeddings || store.is_gguf() {
            Linear::from_raw(store.path_of(embed_name), &embed_raw, options.activations)?
        } else {
            return Err(tensor_err(
                store.main_path(),
                "lm_head.weight",
                "missing (and tie_word_embeddings is false)",
            ));
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| r.layer(i, weights))
            .collect::<Result<Vec<_>>>()?;
        let norm = r.norm_weights("model.norm.weight")?;

        let mut model = Llama {
            rope_inv: c.rope_inv_freq(),
            embed,
            layers,
            norm,
            lm_head,
            shortlist: Default::default(),
            greedy_head: Default::default(),
            config,
            workspace: Default::default(),
            pool: options.threads.map(tandem_kernels::pool::with_threads),
            resident: None,
            skip: Vec::new(),
            kv_cache_type: options.kv_cache,
        };
        if options.device == ComputeDevice::Gpu {
            model.upload_to_gpu()?;
        } else if weights {
            model.back_with_huge_pages();
        }
        Ok(model)
    }

    /// Puts the linear layers' weights on 2 MiB pages where the system allows
    /// ([`tandem_kernels::huge_pages`]): every decoding step streams them all. Returns the
    /// bytes moved onto huge pages.
    pub fn back_with_huge_pages(&self) -> usize {
        let ranges: Vec<(usize, usize)> = self
            .linears()
            .into_iter()
            .filter_map(|(_, l)| l.memory())
            .collect();
        tandem_kernels::huge_pages::back_with_huge_pages(&ranges)
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

    /// Copies every linear layer with a GPU kernel to the GPU; returns the bytes copied.
    /// When every one is there, the whole forward pass moves to the GPU (its norms and
    /// buffers too): caches made after this live there.
    pub fn upload_to_gpu(&mut self) -> Result<usize> {
        let mut bytes = 0;
        for lin in self.linears_mut() {
            bytes += lin.upload_to_gpu()?;
        }
        if self.linears().iter().all(|(_, l)| l.on_gpu()) {
            self.resident = Some(super::gpu::Resident::new(self)?);
        }
        Ok(bytes)
    }

    /// Sets how activations meet Q8_0/Q4_0 weights in every linear layer.
    pub fn set_activation_precision(&mut self, p: ActivationPrecision) -> Result<()> {
        for lin in self.linears_mut() {
            lin.set_activations(p)?;
        }
        if let Some(s) = self.shortlist.get_mut().unwrap_or_else(|e| e.into_inner()) {
            s.set_activations(p)?;
        }
        Ok(())
    }
}
