//! The per-sequence key/value cache.

use super::{gpu, Llama};
use crate::error::{Error, Result};

/// Per-sequence key/value cache: for each layer, keys and values as [n_kv_heads, capacity,
/// head_dim] buffers (f32 or f16, [`KvCacheType`]) that the attention kernel reads in place. It grows by doubling
/// (amortized, never per token) up to `limit`.
pub struct KvCache {
    pub(super) len: usize,
    pub(super) limit: usize,
    pub(super) store: KvStore,
}

/// Where a cache's keys and values are.
pub(super) enum KvStore {
    /// In host memory, for a model whose forward pass runs on the CPU.
    Host(HostKv),
    /// On the GPU, for a model whose forward pass runs there.
    Device(gpu::GpuKv),
}

/// What a CPU model's KV cache holds its keys and values as (a GPU cache is f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KvCacheType {
    /// Exact: the keys and values the projections computed.
    F32,
    /// Rounded to f16, as llama.cpp's default cache: half the memory, and half the bytes a
    /// decoding step reads from a long context (its attention is bound by them).
    #[default]
    F16,
}

/// Keys and values in host memory, of one element type.
pub(super) enum HostKv {
    F32(HostLayers<f32>),
    F16(HostLayers<half::f16>),
}

/// Per layer, [n_kv_heads, capacity, head_dim] keys and values.
pub(super) struct HostLayers<E> {
    pub(super) k: Vec<Vec<E>>,
    pub(super) v: Vec<Vec<E>>,
    pub(super) capacity: usize,
}

impl HostKv {
    /// `n` layers of `size` zeroed elements each for keys and values, or layer `only` alone.
    fn new(kind: KvCacheType, n: usize, size: usize, capacity: usize, only: Option<usize>) -> Self {
        match kind {
            KvCacheType::F32 => HostKv::F32(HostLayers::new(n, size, capacity, only)),
            KvCacheType::F16 => HostKv::F16(HostLayers::new(n, size, capacity, only)),
        }
    }

    /// Positions each layer's buffers are laid out for.
    pub(super) fn capacity(&self) -> usize {
        match self {
            HostKv::F32(l) => l.capacity,
            HostKv::F16(l) => l.capacity,
        }
    }

    pub(super) fn reserve(
        &mut self,
        kv_heads: usize,
        head_dim: usize,
        len: usize,
        needed: usize,
        limit: usize,
    ) {
        match self {
            HostKv::F32(l) => l.reserve(kv_heads, head_dim, len, needed, limit),
            HostKv::F16(l) => l.reserve(kv_heads, head_dim, len, needed, limit),
        }
    }

    fn keep_rows(&mut self, kv_heads: usize, head_dim: usize, base: usize, rows: &[usize]) {
        match self {
            HostKv::F32(l) => l.keep_rows(kv_heads, head_dim, base, rows),
            HostKv::F16(l) => l.keep_rows(kv_heads, head_dim, base, rows),
        }
    }
}

impl<E: Copy + Default> HostLayers<E> {
    fn new(n: usize, size: usize, capacity: usize, only: Option<usize>) -> Self {
        let layers = || -> Vec<Vec<E>> {
            (0..n)
                .map(|li| match only {
                    Some(o) if o != li => Vec::new(),
                    _ => vec![E::default(); size],
                })
                .collect()
        };
        HostLayers {
            k: layers(),
            v: layers(),
            capacity,
        }
    }

    /// Grows (doubling, capped at `limit`) to hold `needed` positions, keeping the first `len`.
    pub(super) fn reserve(
        &mut self,
        kv_heads: usize,
        head_dim: usize,
        len: usize,
        needed: usize,
        limit: usize,
    ) {
        if needed <= self.capacity {
            return;
        }
        let mut cap = self.capacity.max(1);
        while cap < needed {
            cap *= 2;
        }
        let (cap, old, hd) = (cap.min(limit), self.capacity, head_dim);
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            if buf.is_empty() {
                continue; // a layer this cache does not hold (layer-by-layer runs)
            }
            let mut grown = vec![E::default(); kv_heads * cap * hd];
            for h in 0..kv_heads {
                let n = len * hd;
                grown[h * cap * hd..][..n].copy_from_slice(&buf[h * old * hd..][..n]);
            }
            *buf = grown;
        }
        self.capacity = cap;
    }

    /// [`Llama::keep_cache_rows`] on these buffers.
    fn keep_rows(&mut self, nkv: usize, hd: usize, base: usize, rows: &[usize]) {
        let cap = self.capacity;
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            if buf.is_empty() {
                continue;
            }
            for h in 0..nkv {
                // Ascending rows move down or stay: a later source is never overwritten first.
                for (j, &r) in rows.iter().enumerate().filter(|&(j, &r)| j != r) {
                    let (src, dst) = ((h * cap + base + r) * hd, (h * cap + base + j) * hd);
                    buf.copy_within(src..src + hd, dst);
                }
            }
        }
    }
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
    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> Result<KvCache> {
        self.new_cache_with_limit(self.config.context_length())
    }

    /// A cache limited to `limit` positions, or to the model's context length without one (a
    /// `--ctx` option's value).
    pub fn new_cache_limited(&self, limit: Option<usize>) -> Result<KvCache> {
        match limit {
            Some(n) => self.new_cache_with_limit(n),
            None => self.new_cache(),
        }
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
        let store = match &self.resident {
            Some(r) => KvStore::Device(r.new_kv(&self.config, n, capacity)?),
            None => {
                let size = self.config.num_kv_heads() * capacity * self.config.head_dim();
                KvStore::Host(HostKv::new(self.kv_cache_type, n, size, capacity, None))
            }
        };
        Ok(KvCache {
            len: 0,
            limit,
            store,
        })
    }

    /// A host cache of `rows` positions holding layer `li` only (a layer-by-layer run).
    pub(super) fn one_layer_cache(&self, li: usize, rows: usize) -> KvCache {
        let (nl, nkv, hd) = (
            self.layers.len(),
            self.config.num_kv_heads(),
            self.config.head_dim(),
        );
        KvCache {
            len: 0,
            limit: rows,
            // Exact keys and values: layer-by-layer runs feed calibration, and their cache
            // lives for one layer only.
            store: KvStore::Host(HostKv::new(
                KvCacheType::F32,
                nl,
                nkv * rows * hd,
                rows,
                Some(li),
            )),
        }
    }

    /// Keeps, of the positions from `base` on, those at `base + rows[j]` (ascending), moved
    /// to `base + j`, and drops the rest: after [`Llama::forward_tree`], the accepted path's
    /// keys and values become the context, each row copied once (a row already in place is
    /// not copied at all).
    pub fn keep_cache_rows(&self, cache: &mut KvCache, base: usize, rows: &[usize]) -> Result<()> {
        let in_order = rows.windows(2).all(|w| w[0] < w[1]);
        if !in_order || rows.last().is_some_and(|&r| base + r >= cache.len) {
            return Err(Error::Invalid(format!(
                "cannot keep rows {rows:?} after position {base} of a {}-position cache",
                cache.len
            )));
        }
        let KvStore::Host(kv) = &mut cache.store else {
            return Err(Error::Invalid(
                "token trees are verified on the CPU only (this cache is on the GPU)".into(),
            ));
        };
        kv.keep_rows(
            self.config.num_kv_heads(),
            self.config.head_dim(),
            base,
            rows,
        );
        cache.len = base + rows.len();
        Ok(())
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
}
