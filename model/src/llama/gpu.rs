//! The device-resident forward pass (feature `cuda`, `--gpu`). When every linear layer of a
//! model has a GPU kernel (Q8_0, Q4_0, F16), its norms, RoPE tables and KV caches live on the
//! GPU too: a forward call copies in only the new tokens' embeddings and positions, and copies
//! out only the logits of the rows that reach the head. Decode, verification and speculative
//! decoding (which only call `Llama::forward` and `KvCache::truncate`) then run on the GPU
//! end to end.
//!
//! Same steps and f32 math as the CPU path (`forward_rows`), kernel for kernel
//! (`kernels/src/cuda/kernels.cu`, each tested against its CPU reference). A row's result does
//! not depend on how many rows share the pass, so verification reproduces decoding exactly.

use super::{head_rows, sized, split_logits, KvCache, Llama, Logits, Workspace};
use crate::config::Config;
use crate::error::{Error, Result};
use candle_core::Tensor;
use std::sync::Mutex;
use tandem_kernels::cuda::{gpu, CudaSlice, Gpu, GpuError};
use tandem_kernels::AttentionShape;

fn gpu_err(e: GpuError) -> Error {
    Error::Invalid(format!("GPU: {e}"))
}

fn the_gpu() -> Result<&'static Gpu> {
    gpu().map_err(gpu_err)
}

/// What a model keeps on the GPU besides its linear layers (which hold their own copies).
pub(crate) struct Resident {
    attn_norm: Vec<CudaSlice<f32>>,
    mlp_norm: Vec<CudaSlice<f32>>,
    norm: CudaSlice<f32>,
    /// Activation buffers, grown to the largest pass seen (never per token).
    work: Mutex<Option<Buffers>>,
}

impl Resident {
    pub(crate) fn new(model: &Llama) -> Result<Self> {
        let g = the_gpu()?;
        let up = |v: &[f32]| g.to_device(v).map_err(gpu_err);
        Ok(Resident {
            attn_norm: model
                .layers
                .iter()
                .map(|l| up(&l.attn_norm))
                .collect::<Result<_>>()?,
            mlp_norm: model
                .layers
                .iter()
                .map(|l| up(&l.mlp_norm))
                .collect::<Result<_>>()?,
            norm: up(&model.norm)?,
            work: Mutex::new(None),
        })
    }
}

/// One pass's activations on the GPU, sized for `rows` rows.
struct Buffers {
    rows: usize,
    x: CudaSlice<f32>,
    hn: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    att: CudaSlice<f32>,
    proj: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    /// RoPE angles of this pass's rows, [rows, head_dim / 2] each (computed on the host per
    /// pass: a table for the whole declared context could be gigabytes), and the row index
    /// the RoPE kernel looks them up by.
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    pos: CudaSlice<i32>,
    /// The host side of the above before they are copied (reused: no allocation per token).
    pos_host: Vec<i32>,
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
}

impl Buffers {
    fn new(g: &Gpu, c: &Config, rows: usize) -> Result<Self> {
        let (h, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let (nh, nkv) = (c.num_attention_heads, c.num_kv_heads());
        let z = |n: usize| g.zeros(rows * n).map_err(gpu_err);
        Ok(Buffers {
            rows,
            x: z(h)?,
            hn: z(h)?,
            q: z(nh * hd)?,
            k: z(nkv * hd)?,
            v: z(nkv * hd)?,
            att: z(nh * hd)?,
            proj: z(h)?,
            gate: z(inter)?,
            up: z(inter)?,
            logits: z(c.vocab_size)?,
            cos: z(hd / 2)?,
            sin: z(hd / 2)?,
            pos: g.to_device(&vec![0i32; rows]).map_err(gpu_err)?,
            pos_host: Vec::with_capacity(rows),
            cos_host: Vec::with_capacity(rows * hd / 2),
            sin_host: Vec::with_capacity(rows * hd / 2),
        })
    }
}

/// A sequence's keys and values on the GPU: per layer, [n_kv_heads, capacity, head_dim],
/// grown by doubling (copying the held positions) up to the cache's limit.
pub struct GpuKv {
    k: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    capacity: usize,
}

impl GpuKv {
    pub(crate) fn new(c: &Config, layers: usize, capacity: usize) -> Result<Self> {
        let g = the_gpu()?;
        let size = c.num_kv_heads() * capacity * c.head_dim();
        let alloc = || -> Result<Vec<CudaSlice<f32>>> {
            (0..layers)
                .map(|_| g.zeros(size).map_err(gpu_err))
                .collect()
        };
        Ok(GpuKv {
            k: alloc()?,
            v: alloc()?,
            capacity,
        })
    }

    /// Room for `needed` positions, keeping the first `len`.
    fn reserve(&mut self, c: &Config, len: usize, needed: usize, limit: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let g = the_gpu()?;
        let mut cap = self.capacity.max(1);
        while cap < needed {
            cap *= 2;
        }
        let cap = cap.min(limit);
        let (nkv, hd, old) = (c.num_kv_heads(), c.head_dim(), self.capacity);
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            let mut grown = g.zeros(nkv * cap * hd).map_err(gpu_err)?;
            for h in 0..nkv {
                let src = buf.slice(h * old * hd..(h * old + len) * hd);
                g.copy(&src, &mut grown.slice_mut(h * cap * hd..))
                    .map_err(gpu_err)?;
            }
            *buf = grown;
        }
        self.capacity = cap;
        Ok(())
    }
}

/// A sequence's GPU keys and values (every cache of a GPU-resident model has them).
fn gpu_kv(cache: &mut KvCache) -> Result<&mut GpuKv> {
    cache
        .gpu
        .as_mut()
        .ok_or_else(|| Error::Invalid("KV cache is not on the GPU".into()))
}

impl Llama {
    /// The forward pass on the GPU: the CPU only looks up the embeddings (a copy of `h`
    /// values per token) and receives the logits.
    pub(super) fn forward_resident(
        &self,
        r: &Resident,
        ws: &mut Workspace,
        seqs: &mut [(&[u32], &mut KvCache)],
        all: &[u32],
        positions: &[usize],
        which: Logits,
    ) -> Result<Vec<Tensor>> {
        let g = the_gpu()?;
        let c = &self.config;
        let (h, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let (nh, nkv, vocab) = (c.num_attention_heads, c.num_kv_heads(), c.vocab_size);
        let eps = c.rms_norm_eps as f32;
        let rows = all.len();
        for (tokens, cache) in seqs.iter_mut() {
            let (len, limit) = (cache.len, cache.limit);
            let kv = gpu_kv(cache)?;
            kv.reserve(c, len, len + tokens.len(), limit)?;
        }

        let mut held = r
            .work
            .lock()
            .map_err(|_| Error::Invalid("GPU buffers poisoned by an earlier failure".into()))?;
        if held.as_ref().is_none_or(|b| b.rows < rows) {
            let grown = held.as_ref().map_or(rows, |b| rows.max(2 * b.rows));
            *held = None; // free the old buffers first
            *held = Some(Buffers::new(g, c, grown)?);
        }
        let b = held
            .as_mut()
            .ok_or_else(|| Error::Invalid("no GPU buffers (internal error)".into()))?;

        self.embed_rows(all, sized(&mut ws.x, rows * h))?;
        g.write(&ws.x[..rows * h], &mut b.x.slice_mut(..))
            .map_err(gpu_err)?;
        b.pos_host.clear();
        b.pos_host.extend(0..rows as i32);
        g.write(&b.pos_host, &mut b.pos.slice_mut(..))
            .map_err(gpu_err)?;
        let half = hd / 2;
        b.cos_host.resize(rows * half, 0.0);
        b.sin_host.resize(rows * half, 0.0);
        self.rope_rows(positions, &mut b.cos_host, &mut b.sin_host);
        g.write(&b.cos_host, &mut b.cos.slice_mut(..))
            .map_err(gpu_err)?;
        g.write(&b.sin_host, &mut b.sin.slice_mut(..))
            .map_err(gpu_err)?;

        let (xh, qh, kvh) = (rows * h, rows * nh * hd, rows * nkv * hd);
        for (li, layer) in self.layers.iter().enumerate() {
            g.rms_norm(
                &b.x.slice(..xh),
                &r.attn_norm[li],
                eps,
                &mut b.hn.slice_mut(..xh),
                rows,
            )
            .map_err(gpu_err)?;
            let hn = b.hn.slice(..xh);
            layer
                .q
                .forward_on_device(g, &hn, rows, &mut b.q.slice_mut(..qh))?;
            layer
                .k
                .forward_on_device(g, &hn, rows, &mut b.k.slice_mut(..kvh))?;
            layer
                .v
                .forward_on_device(g, &hn, rows, &mut b.v.slice_mut(..kvh))?;
            let pos = b.pos.slice(..rows);
            g.rope_rotate_half(&mut b.q.slice_mut(..qh), &pos, &b.cos, &b.sin, rows, nh, hd)
                .map_err(gpu_err)?;
            g.rope_rotate_half(
                &mut b.k.slice_mut(..kvh),
                &pos,
                &b.cos,
                &b.sin,
                rows,
                nkv,
                hd,
            )
            .map_err(gpu_err)?;
            let mut row = 0;
            for (tokens, cache) in seqs.iter_mut() {
                let (t, n) = (tokens.len(), cache.len);
                let kv = gpu_kv(cache)?;
                let s = AttentionShape {
                    t,
                    n,
                    n_head: nh,
                    n_kv_head: nkv,
                    head_dim: hd,
                    capacity: kv.capacity,
                };
                let (kr, qr) = (
                    row * nkv * hd..(row + t) * nkv * hd,
                    row * nh * hd..(row + t) * nh * hd,
                );
                g.kv_append(s, &b.k.slice(kr.clone()), &mut kv.k[li])
                    .map_err(gpu_err)?;
                g.kv_append(s, &b.v.slice(kr), &mut kv.v[li])
                    .map_err(gpu_err)?;
                g.attention(
                    s,
                    &b.q.slice(qr.clone()),
                    &kv.k[li],
                    &kv.v[li],
                    &mut b.att.slice_mut(qr),
                )
                .map_err(gpu_err)?;
                row += t;
            }
            layer
                .o
                .forward_on_device(g, &b.att.slice(..qh), rows, &mut b.proj.slice_mut(..xh))?;
            g.add_assign(&mut b.x.slice_mut(..xh), &b.proj.slice(..xh), xh, xh)
                .map_err(gpu_err)?;
            g.rms_norm(
                &b.x.slice(..xh),
                &r.mlp_norm[li],
                eps,
                &mut b.hn.slice_mut(..xh),
                rows,
            )
            .map_err(gpu_err)?;
            let (hn, ih) = (b.hn.slice(..xh), rows * inter);
            layer
                .gate
                .forward_on_device(g, &hn, rows, &mut b.gate.slice_mut(..ih))?;
            layer
                .up
                .forward_on_device(g, &hn, rows, &mut b.up.slice_mut(..ih))?;
            g.silu_mul(&mut b.gate.slice_mut(..ih), &b.up.slice(..ih), ih)
                .map_err(gpu_err)?;
            layer.down.forward_on_device(
                g,
                &b.gate.slice(..ih),
                rows,
                &mut b.proj.slice_mut(..xh),
            )?;
            g.add_assign(&mut b.x.slice_mut(..xh), &b.proj.slice(..xh), xh, xh)
                .map_err(gpu_err)?;
        }

        let (mut picked, mut counts) = (
            std::mem::take(&mut ws.picked),
            std::mem::take(&mut ws.counts),
        );
        head_rows(seqs, which, &mut picked, &mut counts);
        let p = picked.len();
        // Gather the head's rows (into `proj`, free now), normalize, project.
        for (i, &src) in picked.iter().enumerate() {
            g.copy(
                &b.x.slice(src * h..(src + 1) * h),
                &mut b.proj.slice_mut(i * h..),
            )
            .map_err(gpu_err)?;
        }
        g.rms_norm(
            &b.proj.slice(..p * h),
            &r.norm,
            eps,
            &mut b.hn.slice_mut(..p * h),
            p,
        )
        .map_err(gpu_err)?;
        self.lm_head.forward_on_device(
            g,
            &b.hn.slice(..p * h),
            p,
            &mut b.logits.slice_mut(..p * vocab),
        )?;
        let mut logits = vec![0f32; p * vocab];
        g.read(&b.logits.slice(..p * vocab), &mut logits)
            .map_err(gpu_err)?;
        let out = split_logits(logits, &counts, vocab, &self.device);
        (ws.picked, ws.counts) = (picked, counts);
        out
    }
}
