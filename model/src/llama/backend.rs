//! The operations a forward pass is made of, as an interface the layer loop
//! (`forward.rs`) is written against once, and its CPU implementation. The CUDA one is
//! `gpu.rs`. A backend owns the pass's activation buffers, named by [`Buf`]; the loop says
//! which buffer each operation reads and writes.

use super::cache::{HostKv, HostLayers, KvCache, KvStore};
use super::Llama;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::linear::Linear;

/// The activation buffers of a pass, each `rows` × [`Buf::width`] f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Buf {
    /// The hidden state (the residual stream).
    X,
    /// A normalized copy of `X` (the input of q/k/v and gate/up).
    Hn,
    Q,
    K,
    V,
    /// Attention's output (the input of o).
    Att,
    /// A projection's output, added back into `X`.
    Proj,
    Gate,
    Up,
}

pub(super) const BUFS: usize = 9;

impl Buf {
    /// Values per row.
    pub(super) fn width(self, c: &Config) -> usize {
        let (hd, nh, nkv) = (c.head_dim(), c.num_attention_heads, c.num_kv_heads());
        match self {
            Buf::X | Buf::Hn | Buf::Proj => c.hidden_size,
            Buf::Q | Buf::Att => nh * hd,
            Buf::K | Buf::V => nkv * hd,
            Buf::Gate | Buf::Up => c.intermediate_size,
        }
    }
}

/// Which RMSNorm weights an operation applies.
#[derive(Debug, Clone, Copy)]
pub(super) enum Norm {
    /// Layer `li`'s, before attention.
    Attention(usize),
    /// Layer `li`'s, before the MLP.
    Mlp(usize),
}

/// What a forward pass runs on. Every operation works on the pass's `rows` rows.
pub(super) trait Backend {
    /// Grows `cache` to hold `needed` positions (refusing a cache made for another backend).
    fn reserve(&mut self, cache: &mut KvCache, needed: usize) -> Result<()>;
    /// Embeds `tokens` into `X` and prepares the RoPE angles of `positions`.
    fn begin(&mut self, tokens: &[u32], positions: &[usize]) -> Result<()>;
    /// `dst = RMSNorm(src) · weights`.
    fn rms_norm(&mut self, norm: Norm, src: Buf, dst: Buf) -> Result<()>;
    /// `dst = src · Wᵀ (+ bias)`.
    fn matmul(&mut self, w: &Linear, src: Buf, dst: Buf) -> Result<()>;
    /// `dsts[i] = src · ws[i]ᵀ (+ bias)` for matrices one input feeds (q/k/v, gate/up): one
    /// pass where the backend can run them as one.
    fn matmul_joined(&mut self, ws: &[&Linear], src: Buf, dsts: &[Buf]) -> Result<()> {
        for (w, &dst) in ws.iter().zip(dsts) {
            self.matmul(w, src, dst)?;
        }
        Ok(())
    }
    /// Rotates `heads` heads of each row of `buf` by its position (rotate-half RoPE).
    fn rope(&mut self, buf: Buf, heads: usize) -> Result<()>;
    /// Appends each sequence's rows of `K`, `V` to its cache at layer `li` and attends:
    /// `Att` = causal attention of `Q` over the cache, or, with `tree` (one sequence whose
    /// new rows form a token tree), each row over the cache and its path in the tree
    /// ([`tandem_kernels::attention_tree`]).
    fn attention(
        &mut self,
        li: usize,
        seqs: &mut [(&[u32], &mut KvCache)],
        tree: Option<&[Vec<u32>]>,
    ) -> Result<()>;
    /// `gate = silu(gate) ⊙ up`.
    fn silu_mul(&mut self, gate: Buf, up: Buf) -> Result<()>;
    /// `dst += src`.
    fn add(&mut self, dst: Buf, src: Buf) -> Result<()>;
    /// The rows of `buf` in host memory (what an activation observer reads).
    fn host(&mut self, buf: Buf) -> Result<&[f32]>;
    /// Rows `picked` of `X` after the final norm, in host memory.
    fn head_input(&mut self, picked: &[usize]) -> Result<&[f32]>;
    /// `logits` = the output head over rows `picked` of `X` after the final norm.
    fn head(&mut self, picked: &[usize], lm_head: &Linear, logits: &mut [f32]) -> Result<()> {
        let hn = self.head_input(picked)?;
        lm_head.forward_into(hn, picked.len(), logits)
    }
    /// Waits for queued work (a backend that runs asynchronously).
    fn sync(&self) -> Result<()> {
        Ok(())
    }
}

/// The CPU pass's buffers, kept by the model from call to call.
#[derive(Default)]
pub(super) struct CpuBuffers {
    /// Aligned: the F16 kernels read them 64 bytes at a time (see `AlignedBuf`).
    bufs: [tandem_kernels::aligned::AlignedBuf; BUFS],
    /// RoPE angles of the pass's rows, [rows, head_dim / 2].
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// A forward pass on the CPU: tandem's SIMD kernels over host buffers.
pub(super) struct CpuPass<'a> {
    model: &'a Llama,
    b: &'a mut CpuBuffers,
    rows: usize,
    /// The pass's first rows that return no logits (see `Logits`): F16 matmuls may run them
    /// on AMX.
    bulk_rows: usize,
}

impl<'a> CpuPass<'a> {
    pub(super) fn new(model: &'a Llama, b: &'a mut CpuBuffers, rows: usize) -> Self {
        let c = &model.config;
        for (i, buf) in b.bufs.iter_mut().enumerate() {
            buf.resize(rows * BUF_ORDER[i].width(c), 0.0);
        }
        CpuPass {
            model,
            b,
            rows,
            bulk_rows: 0,
        }
    }

    /// Lets the F16 matmuls run the first `bulk` rows (those that return no logits) on AMX.
    pub(super) fn with_bulk_rows(mut self, bulk: usize) -> Self {
        self.bulk_rows = bulk.min(self.rows);
        self
    }

    fn len(&self, buf: Buf) -> usize {
        self.rows * buf.width(&self.model.config)
    }

    /// Fills `buf` with `rows` (a layer-by-layer run starts from given hidden rows).
    pub(super) fn load(&mut self, buf: Buf, rows: &[f32]) -> Result<()> {
        let n = self.len(buf);
        if rows.len() != n {
            return Err(internal("rows of the wrong size"));
        }
        self.b.bufs[buf as usize][..n].copy_from_slice(rows);
        Ok(())
    }

    /// `src` to read and `dst` to write, two different buffers.
    fn pair(&mut self, src: Buf, dst: Buf) -> Result<(&[f32], &mut [f32])> {
        let (ls, ld) = (self.len(src), self.len(dst));
        let [s, d] = self
            .b
            .bufs
            .get_disjoint_mut([src as usize, dst as usize])
            .map_err(|_| internal("an operation reads and writes one buffer"))?;
        Ok((&s[..ls], &mut d[..ld]))
    }

    fn norm_weights(&self, norm: Norm) -> &'a [f32] {
        let model: &'a Llama = self.model;
        match norm {
            Norm::Attention(li) => &model.layers[li].attn_norm,
            Norm::Mlp(li) => &model.layers[li].mlp_norm,
        }
    }
}

/// `Buf` by index (`Buf as usize` is its position here).
pub(super) const BUF_ORDER: [Buf; BUFS] = [
    Buf::X,
    Buf::Hn,
    Buf::Q,
    Buf::K,
    Buf::V,
    Buf::Att,
    Buf::Proj,
    Buf::Gate,
    Buf::Up,
];

pub(super) fn internal(what: &str) -> Error {
    Error::Invalid(format!("{what} (internal error)"))
}

/// The buffers attention reads (Q, K, V) and writes (Att), whatever a backend holds them in.
pub(super) fn attention_buffers<T>(bufs: &mut [T; BUFS]) -> Result<[&mut T; 4]> {
    bufs.get_disjoint_mut([
        Buf::Q as usize,
        Buf::K as usize,
        Buf::V as usize,
        Buf::Att as usize,
    ])
    .map_err(|_| internal("attention buffers overlap"))
}

/// The attention kernels' shape for `t` new positions after `n`, in a cache laid out for
/// `capacity` positions.
pub(super) fn attention_shape(
    c: &Config,
    t: usize,
    n: usize,
    capacity: usize,
) -> tandem_kernels::AttentionShape {
    tandem_kernels::AttentionShape {
        t,
        n,
        n_head: c.num_attention_heads,
        n_kv_head: c.num_kv_heads(),
        head_dim: c.head_dim(),
        capacity,
    }
}

impl Backend for CpuPass<'_> {
    fn reserve(&mut self, cache: &mut KvCache, needed: usize) -> Result<()> {
        let c = &self.model.config;
        match &mut cache.store {
            KvStore::Host(kv) => {
                kv.reserve(
                    c.num_kv_heads(),
                    c.head_dim(),
                    cache.len,
                    needed,
                    cache.limit,
                );
                Ok(())
            }
            KvStore::Device(_) => Err(Error::Invalid(
                "a KV cache made for the GPU was given to a model on the CPU".into(),
            )),
        }
    }

    fn begin(&mut self, tokens: &[u32], positions: &[usize]) -> Result<()> {
        let n = self.len(Buf::X);
        self.model
            .embed_rows(tokens, &mut self.b.bufs[Buf::X as usize][..n])?;
        let half = self.model.config.head_dim() / 2;
        self.b.cos.resize(self.rows * half, 0.0);
        self.b.sin.resize(self.rows * half, 0.0);
        self.model
            .rope_rows(positions, &mut self.b.cos, &mut self.b.sin);
        Ok(())
    }

    fn rms_norm(&mut self, norm: Norm, src: Buf, dst: Buf) -> Result<()> {
        let w = self.norm_weights(norm);
        let eps = self.model.config.rms_norm_eps as f32;
        let (s, d) = self.pair(src, dst)?;
        tandem_kernels::ops::rms_norm(s, w, eps, d);
        Ok(())
    }

    fn matmul(&mut self, w: &Linear, src: Buf, dst: Buf) -> Result<()> {
        let (rows, bulk) = (self.rows, self.bulk_rows);
        let (s, d) = self.pair(src, dst)?;
        w.forward_rows_into(s, rows, bulk, d)
    }

    fn matmul_joined(&mut self, ws: &[&Linear], src: Buf, dsts: &[Buf]) -> Result<()> {
        const MOST: usize = 3;
        if ws.len() != dsts.len() || dsts.len() > MOST {
            return Err(internal("joined matmuls given the wrong buffers"));
        }
        let rows = self.rows;
        let c = &self.model.config;
        let src_len = self.len(src);
        let mut src_buf = None;
        let mut outs: [&mut [f32]; MOST] = Default::default();
        for (i, buf) in self.b.bufs.iter_mut().enumerate() {
            if i == src as usize {
                src_buf = Some(&buf[..src_len]);
            } else if let Some(j) = dsts.iter().position(|&d| d as usize == i) {
                outs[j] = &mut buf[..rows * dsts[j].width(c)];
            }
        }
        let s = src_buf.ok_or_else(|| internal("joined matmuls write their input"))?;
        Linear::forward_joined_rows(ws, s, rows, self.bulk_rows, &mut outs[..dsts.len()])
    }

    fn rope(&mut self, buf: Buf, heads: usize) -> Result<()> {
        let (n, hd) = (self.len(buf), self.model.config.head_dim());
        let half = hd / 2;
        tandem_kernels::ops::rope_rotate_half(
            &mut self.b.bufs[buf as usize][..n],
            heads,
            hd,
            &self.b.cos[..self.rows * half],
            &self.b.sin[..self.rows * half],
        );
        Ok(())
    }

    fn attention(
        &mut self,
        li: usize,
        seqs: &mut [(&[u32], &mut KvCache)],
        tree: Option<&[Vec<u32>]>,
    ) -> Result<()> {
        let c = &self.model.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        let [q, k, v, out] = attention_buffers(&mut self.b.bufs)?;
        // Bulk rows: a pass of one sequence's first rows, or every row of a pass (one
        // sequence or several: each sequence's rows all bulk); never a tree's.
        let all_bulk = self.rows > 0 && self.bulk_rows == self.rows;
        let seqs_len = seqs.len();
        let mut row = 0;
        for (tokens, cache) in seqs.iter_mut() {
            let (t, n) = (tokens.len(), cache.len);
            let KvStore::Host(kv) = &mut cache.store else {
                return Err(internal("a GPU cache in a CPU pass"));
            };
            let shape = attention_shape(c, t, n, kv.capacity());
            let span = row * nh * hd..(row + t) * nh * hd;
            let (q, out) = (&q[span.clone()], &mut out[span]);
            let (k, v) = (&k[row * nkv * hd..], &v[row * nkv * hd..]);
            let bulk = match (tree, all_bulk, seqs_len) {
                (Some(_), _, _) => 0,
                (None, true, _) => t,
                (None, false, 1) => self.bulk_rows,
                (None, false, _) => 0,
            };
            match kv {
                HostKv::F32(l) => append_and_attend(l, li, shape, bulk, q, k, v, out, tree),
                HostKv::F16(l) => append_and_attend(l, li, shape, bulk, q, k, v, out, tree),
            }
            row += t;
        }
        Ok(())
    }

    fn silu_mul(&mut self, gate: Buf, up: Buf) -> Result<()> {
        let (u, g) = self.pair(up, gate)?;
        tandem_kernels::ops::silu_mul(g, u);
        Ok(())
    }

    fn add(&mut self, dst: Buf, src: Buf) -> Result<()> {
        let (s, d) = self.pair(src, dst)?;
        tandem_kernels::ops::add_assign(d, s);
        Ok(())
    }

    fn host(&mut self, buf: Buf) -> Result<&[f32]> {
        let n = self.len(buf);
        Ok(&self.b.bufs[buf as usize][..n])
    }

    fn head_input(&mut self, picked: &[usize]) -> Result<&[f32]> {
        let c = &self.model.config;
        let (h, eps) = (c.hidden_size, c.rms_norm_eps as f32);
        let norm: &[f32] = &self.model.norm;
        let [x, hn] = self
            .b
            .bufs
            .get_disjoint_mut([Buf::X as usize, Buf::Hn as usize])
            .map_err(|_| internal("head buffers overlap"))?;
        for (dst, &r) in hn.chunks_exact_mut(h).zip(picked) {
            tandem_kernels::ops::rms_norm(&x[r * h..][..h], norm, eps, dst);
        }
        Ok(&hn[..picked.len() * h])
    }
}

/// Appends a sequence's `shape.t` new keys and values (`k`, `v`: [t, n_kv_head, head_dim]
/// from the pass's first row of it) at positions n.. of layer `li`'s cache, then attends its
/// queries over the cache: causal (the first `bulk` rows a prompt's, see
/// [`tandem_kernels::attention_bulk`]), or over a token tree's `paths`.
#[allow(clippy::too_many_arguments)]
fn append_and_attend<E: tandem_kernels::KvElement>(
    layers: &mut HostLayers<E>,
    li: usize,
    shape: tandem_kernels::AttentionShape,
    bulk: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    tree: Option<&[Vec<u32>]>,
) {
    let (t, n, nkv, hd, cap) = (
        shape.t,
        shape.n,
        shape.n_kv_head,
        shape.head_dim,
        shape.capacity,
    );
    let (kc, vc) = (&mut layers.k[li], &mut layers.v[li]);
    for i in 0..t {
        for h in 0..nkv {
            let src = (i * nkv + h) * hd;
            let dst = (h * cap + n + i) * hd;
            E::store(&k[src..src + hd], &mut kc[dst..dst + hd]);
            E::store(&v[src..src + hd], &mut vc[dst..dst + hd]);
        }
    }
    match tree {
        None => tandem_kernels::attention_bulk(shape, bulk, q, kc, vc, out),
        Some(paths) => tandem_kernels::attention_tree(shape, q, kc, vc, out, paths),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_indexed_by_their_discriminant() {
        for (i, b) in BUF_ORDER.iter().enumerate() {
            assert_eq!(*b as usize, i, "{b:?}");
        }
    }
}
