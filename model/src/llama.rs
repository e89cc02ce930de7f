//! The Llama-family model (Llama, SmolLM2, TinyLlama, Mistral, Qwen2): its weights and the
//! forward pass over them.
//!
//! One call serves prefill, one-token decode and k-token verification: it takes new tokens at
//! positions [n, n+k) against a cache holding n positions, applies the causal mask, appends to
//! the cache and returns logits for the new positions. Attention math and the cache are f32.
//!
//! Where each part lives:
//! - `load`: [`LoadOptions`] and building a [`Llama`] from a weight store (shapes checked);
//! - `cache`: the per-sequence [`KvCache`];
//! - `forward`: the entry points and the layer loop, written once over a [`backend`] (the
//!   operations a pass needs: norm, matmul, RoPE, KV append + attention, SiLU·mul, add);
//! - `backend`: that interface and its CPU implementation; `gpu` the CUDA one (feature
//!   `cuda`; `no_gpu.rs` stands in without it, so no field or call is behind a `cfg`);
//! - `shortlist`: a cut-down output head for draft models; `greedy_head`: the exact argmax of
//!   a 16-bit head from a Q8_0 screen (greedy decoding); `profile`: per-operation times;
//! - `layerwise`: layer-by-layer runs for calibrated quantization;
//! - `skip`: leaving sublayers out (layer-skipping self-drafts) and measuring their influence.

use crate::config::Config;
use crate::linear::Linear;
use candle_core::Tensor;

mod backend;
mod cache;
mod forward;
#[cfg_attr(feature = "cuda", path = "llama/gpu.rs")]
#[cfg_attr(not(feature = "cuda"), path = "llama/no_gpu.rs")]
mod gpu;
mod greedy_head;
mod layerwise;
mod load;
mod profile;
mod shortlist;
mod skip;

pub use cache::{KvCache, KvCacheType};
pub use forward::{ActivationObserver, HeadRows, LogitRows, Logits};
pub use greedy_head::GreedyHeadStats;
pub use load::{ComputeDevice, LoadOptions};
pub use profile::OpTimes;
pub use skip::Sublayer;
pub use tandem_kernels::sampling::argmax;

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
    shortlist: std::sync::RwLock<Option<shortlist::Shortlist>>,
    /// The screen greedy forward calls use (built on the first: `None` inside when the head
    /// is not a 16-bit CPU head); see [`Llama::forward_with`].
    greedy_head: std::sync::OnceLock<Option<greedy_head::GreedyHead>>,
    /// RoPE inverse frequencies, [head_dim / 2]: angles are computed per row of a pass, so
    /// memory does not grow with the context a file declares (2^31 positions would be a
    /// 32 GB table) and costs the same for the positions actually run.
    rope_inv: Vec<f32>,
    /// Buffers the forward pass reuses from call to call (no allocation per token but the
    /// returned logits); a concurrent call finds it locked and uses fresh ones.
    workspace: std::sync::Mutex<forward::Workspace>,
    /// The kernels' worker pool when the model was loaded with a thread count (else the
    /// process-wide one).
    pool: Option<&'static tandem_kernels::pool::Pool>,
    /// Per sublayer (2i: layer i's attention half, 2i + 1: its MLP), whether the forward pass
    /// leaves it out (a layer-skipping draft; see `llama/skip.rs`). All false as loaded.
    skip: Vec<bool>,
    /// Norms, RoPE tables and buffers on the GPU when every linear layer is there too: the
    /// forward pass then runs on the GPU end to end (see `llama/gpu.rs`).
    resident: Option<gpu::Resident>,
    /// What the CPU KV caches it makes hold (see [`KvCacheType`]).
    kv_cache_type: KvCacheType,
}

impl Llama {
    /// Whether the whole forward pass (and so its KV caches) runs on the GPU: loaded for the
    /// GPU with every linear layer in a format the GPU kernels read (Q8_0, Q4_0, F16).
    pub fn runs_on_gpu(&self) -> bool {
        self.resident.is_some()
    }

    /// On the GPU: whether later passes of up to 8 rows are captured into CUDA graphs and
    /// replayed (the default, unless `TANDEM_CUDA_GRAPHS=0`), or launch each kernel. The
    /// results are the same bits either way. Does nothing for a model on the CPU.
    pub fn use_gpu_graphs(&self, on: bool) {
        if let Some(r) = &self.resident {
            r.use_graphs(on);
        }
    }

    /// How many of this model's passes have run from a CUDA graph (0 on the CPU).
    pub fn gpu_graph_passes(&self) -> u64 {
        self.resident.as_ref().map_or(0, |r| r.graph_passes())
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
        // A skipped sublayer's weights are never read.
        let all: f64 = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                let (a, m) = (
                    self.skips(Sublayer::Attention(i)),
                    self.skips(Sublayer::Mlp(i)),
                );
                l.linears()
                    .into_iter()
                    .enumerate()
                    .filter(move |&(j, _)| if j < 4 { !a } else { !m })
                    .map(|(_, lin)| lin)
            })
            .chain(std::iter::once(&self.lm_head))
            .map(cost)
            .sum();
        match &*self.shortlist.read().unwrap_or_else(|e| e.into_inner()) {
            Some(s) => all - cost(&self.lm_head) + s.cost(cost),
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
            .flat_map(Layer::linears_mut)
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
    /// Lays out q/k/v, and gate/up, each in one allocation (where their types allow), so a
    /// pass multiplies each group as one matrix ([`Linear::fuse`]): SmolLM2 F16, the `stream`
    /// example's 30 layers, 2 threads, five alternations: one-row passes 8.1-9.5 against
    /// 8.6-11.3 ms, four-row 9.8-12.1 against 10.2-12.3; tg128 over six alternations F16 +1%,
    /// Q8_0 +5%, Q4_0 (the self-draft's format) +7%.
    fn fuse_inputs(&mut self) -> crate::error::Result<()> {
        Linear::fuse(&mut [&mut self.q, &mut self.k, &mut self.v])?;
        Linear::fuse(&mut [&mut self.gate, &mut self.up])
    }

    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }
}
