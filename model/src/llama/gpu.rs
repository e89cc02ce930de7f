//! The device-resident forward pass (feature `cuda`, `--gpu`). When every linear layer of a
//! model has a GPU kernel (Q8_0, Q4_0, F16), its norms, RoPE tables and KV caches live on the
//! GPU too: a forward call copies in only the new tokens' embeddings and positions, and copies
//! out only the logits of the rows that reach the head. Decode, verification and speculative
//! decoding (which only call `Llama::forward` and `KvCache::truncate`) then run on the GPU
//! end to end.
//!
//! A pass of up to 8 rows (a decode step, a verification pass) is captured into a CUDA graph
//! the first time its shape is seen, and replayed after that: the layer loop then queues
//! nothing, and one launch runs its hundreds of kernels (a small model's step is mostly launch
//! overhead otherwise). The attention kernels find each cache, its length and capacity in a
//! table on the GPU, so one graph serves every step and every cache of its shape: a replay
//! needs only this step's inputs and that table copied in. `TANDEM_CUDA_GRAPHS=0` launches
//! every kernel directly (A/B timing); a graph that cannot be made turns graphs off for the
//! model, and the pass runs directly.
//!
//! The layer loop is the CPU's (`forward.rs`); this is its backend. Same f32 math as the CPU
//! backend, kernel for kernel
//! (`kernels/src/cuda/kernels.cu`, each tested against its CPU reference). A row's result does
//! not depend on how many rows share the pass, so verification reproduces decoding exactly.

use super::backend::{
    attention_buffers, attention_shape, internal, Backend, Buf, Norm, BUFS, BUF_ORDER,
};
use super::cache::{KvCache, KvStore};
use super::forward::{LogitRows, Pass};
use super::Llama;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::linear::Linear;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use tandem_kernels::cuda::{gpu, CudaSlice, Gpu, GpuError, GpuGraph, KvTable, MAX_ROWS};

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
    /// Whether passes of up to [`MAX_ROWS`] rows are captured into CUDA graphs and replayed.
    graphs: AtomicBool,
    /// Passes run from a graph (captured or replayed).
    graph_passes: AtomicU64,
}

/// Held through each GPU pass (see [`Resident::forward`]).
static ONE_PASS_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Most graphs a model keeps (a decode step's, and a verification pass's per row count); past
/// it they are all dropped and captured again as they are met.
const MOST_GRAPHS: usize = 16;

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
            graphs: AtomicBool::new(std::env::var("TANDEM_CUDA_GRAPHS").as_deref() != Ok("0")),
            graph_passes: AtomicU64::new(0),
        })
    }

    /// Drops the captured passes (the forward pass changed: they are captured again).
    pub(crate) fn forget_graphs(&self) {
        let mut held = self.work.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = held.as_mut() {
            b.graphs.clear();
        }
    }

    /// How many passes have run from a CUDA graph.
    pub(crate) fn graph_passes(&self) -> u64 {
        self.graph_passes.load(Ordering::Relaxed)
    }

    /// Turns CUDA graphs on or off for this model's later passes.
    pub(crate) fn use_graphs(&self, on: bool) {
        self.graphs.store(on, Ordering::Relaxed);
    }
}

/// One pass's activations on the GPU, sized for `rows` rows.
struct Buffers {
    rows: usize,
    /// Indexed by `Buf as usize`.
    bufs: [CudaSlice<f32>; BUFS],
    logits: CudaSlice<f32>,
    /// RoPE angles of this pass's rows, [rows, head_dim / 2] each (computed on the host per
    /// pass: a table for the whole declared context could be gigabytes), and the row index
    /// the RoPE kernel looks them up by (0, 1, 2, …: written once).
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    pos: CudaSlice<i32>,
    /// Where the attention kernels find each sequence's caches ([`KvTable`]): per sequence,
    /// its K buffers' addresses layer by layer, then its V buffers'; and its length before
    /// the pass and capacity.
    kv_ptrs: CudaSlice<u64>,
    kv_info: CudaSlice<i32>,
    /// Passes captured as graphs, each with the shape it was captured for ([`Buffers::key`]).
    graphs: Vec<(Vec<u64>, GpuGraph)>,
    /// The host side of the above before they are copied (`ptrs_sent`: what `kv_ptrs` holds
    /// now), and of what is read back (reused: no allocation per token).
    ptrs_host: Vec<u64>,
    ptrs_sent: Vec<u64>,
    info_host: Vec<i32>,
    /// This pass's shape: each sequence's new rows, the pass's rows, and which rows reach
    /// the head.
    key: Vec<u64>,
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
    host: Vec<f32>,
}

impl Buffers {
    fn new(g: &Gpu, c: &Config, layers: usize, rows: usize) -> Result<Self> {
        let hd = c.head_dim();
        let z = |n: usize| g.zeros(rows * n).map_err(gpu_err);
        let mut bufs = Vec::with_capacity(BUFS);
        for b in BUF_ORDER {
            bufs.push(z(b.width(c))?);
        }
        let bufs: [CudaSlice<f32>; BUFS] =
            bufs.try_into().map_err(|_| internal("GPU buffer count"))?;
        Ok(Buffers {
            rows,
            bufs,
            logits: z(c.vocab_size)?,
            cos: z(hd / 2)?,
            sin: z(hd / 2)?,
            pos: g
                .to_device(&(0..rows as i32).collect::<Vec<_>>())
                .map_err(gpu_err)?,
            kv_ptrs: g
                .to_device(&vec![0u64; rows * 2 * layers])
                .map_err(gpu_err)?,
            kv_info: g.to_device(&vec![0i32; 2 * rows]).map_err(gpu_err)?,
            graphs: Vec::new(),
            ptrs_host: Vec::with_capacity(rows * 2 * layers),
            ptrs_sent: Vec::new(),
            info_host: Vec::with_capacity(2 * rows),
            key: Vec::new(),
            cos_host: Vec::with_capacity(rows * hd / 2),
            sin_host: Vec::with_capacity(rows * hd / 2),
            host: Vec::new(),
        })
    }
}

/// A sequence's keys and values on the GPU: per layer, [n_kv_heads, capacity, head_dim],
/// grown by doubling (copying the held positions) up to the cache's limit.
pub(crate) struct GpuKv {
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

impl Resident {
    /// A cache's keys and values on the GPU.
    pub(super) fn new_kv(&self, c: &Config, layers: usize, capacity: usize) -> Result<GpuKv> {
        GpuKv::new(c, layers, capacity)
    }

    /// Runs `pass` through the layer loop on the GPU: the CPU only looks up the embeddings
    /// (a copy of `h` values per token) and receives the logits.
    pub(super) fn forward(
        &self,
        model: &Llama,
        pass: &mut Pass<'_, '_, '_>,
    ) -> Result<Vec<LogitRows>> {
        let g = the_gpu()?;
        let rows = pass.tokens.len();
        // Every model's passes share the GPU's one stream: one pass at a time, so that a
        // pass being captured into a graph records only its own work.
        let _stream = ONE_PASS_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut held = self
            .work
            .lock()
            .map_err(|_| Error::Invalid("GPU buffers poisoned by an earlier failure".into()))?;
        if held.as_ref().is_none_or(|b| b.rows < rows) {
            let grown = held.as_ref().map_or(rows, |b| rows.max(2 * b.rows));
            *held = None; // free the old buffers first
            *held = Some(Buffers::new(g, &model.config, model.layers.len(), grown)?);
        }
        if let Some(b) = held.as_mut() {
            b.ptrs_host.clear();
            b.info_host.clear();
            b.key.clear();
        }
        // A graph holds the whole pass, head included, so only passes that run every step
        // on the GPU and read nothing in between are captured.
        let graphs = self.graphs.load(Ordering::Relaxed)
            && rows <= MAX_ROWS
            && pass.observer.is_none()
            && pass.profile.is_none()
            && pass.tree.is_none()
            && model.lm_head.gpu_weight().is_some()
            && model.shortlist.read().is_ok_and(|s| s.is_none());
        let mut b = GpuPass {
            g,
            model,
            resident: self,
            held,
            rows,
            which: pass.which,
            graphs,
            mode: Mode::Direct,
            graph_failed: false,
            pending: Pending::Nothing,
        };
        let out = model.run_pass(&mut b, pass);
        if b.mode == Mode::Capture {
            // The pass failed while it was being captured: the stream must leave capture
            // mode (what was recorded is dropped).
            b.mode = Mode::Direct;
            let _ = g.end_capture();
        }
        if out.is_ok() || !b.graph_failed {
            return out;
        }
        // The graph could not be made or run. Nothing it held ran, so the pass runs again
        // without graphs, from the cache lengths it started with (what `reserve` put in the
        // KV table, before anything could fail in a graph); this model stops trying.
        self.graphs.store(false, Ordering::Relaxed);
        let mut b = GpuPass {
            graphs: false,
            mode: Mode::Direct,
            graph_failed: false,
            pending: Pending::Nothing,
            ..b
        };
        let buffers = b.bufs()?;
        for (i, (_, cache)) in pass.seqs.iter_mut().enumerate() {
            let len = buffers
                .info_host
                .get(2 * i)
                .and_then(|&n| usize::try_from(n).ok())
                .ok_or_else(|| internal("a failed GPU graph's starting lengths"))?;
            cache.len = len;
        }
        buffers.graphs.clear();
        buffers.ptrs_host.clear();
        buffers.info_host.clear();
        buffers.key.clear();
        model.run_pass(&mut b, pass)
    }
}

/// How a pass's operations reach the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Each is launched.
    Direct,
    /// Each is recorded into a graph, launched at the head.
    Capture,
    /// The graph at this index of [`Buffers::graphs`] holds them all: they are skipped, and
    /// the graph is launched at the head.
    Replay(usize),
}

/// An operation a GPU pass holds back to launch together with the next one: a residual add
/// with the norm of its sum, the queries' rotation with the keys'. (A small model's step is
/// hundreds of launches; these save four per layer.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Nothing,
    Add { dst: Buf, src: Buf },
    Rope { buf: Buf, heads: usize },
}

/// A forward pass on the GPU.
struct GpuPass<'a> {
    g: &'static Gpu,
    model: &'a Llama,
    resident: &'a Resident,
    /// Always `Some` (grown to the pass's rows before this is made).
    held: MutexGuard<'a, Option<Buffers>>,
    rows: usize,
    which: crate::Logits,
    /// Whether this pass may be captured or replayed.
    graphs: bool,
    mode: Mode,
    /// A graph could not be made or launched (the pass is then run again directly).
    graph_failed: bool,
    pending: Pending,
}

impl GpuPass<'_> {
    fn bufs(&mut self) -> Result<&mut Buffers> {
        self.held.as_mut().ok_or_else(|| internal("no GPU buffers"))
    }

    /// Whether the pass's operations are held by a graph already (and so skipped).
    fn replaying(&self) -> bool {
        matches!(self.mode, Mode::Replay(_))
    }

    /// A graph-related failure: the pass will be run again without graphs.
    fn graph_error(&mut self, e: impl std::fmt::Display) -> Error {
        self.graph_failed = true;
        Error::Invalid(format!("GPU graph: {e}"))
    }

    /// An operation that needs the stream to run now (a read, a wait): not in a graph.
    fn not_in_graph(&mut self, what: &str) -> Result<()> {
        if self.mode == Mode::Direct {
            return Ok(());
        }
        Err(self.graph_error(format!("{what} in a captured pass")))
    }

    /// After the inputs are written: replays the graph captured for this pass's shape
    /// ([`Buffers::key`], begun by `reserve`), or starts capturing one.
    fn start_graph(&mut self) -> Result<()> {
        let (g, rows, which) = (self.g, self.rows, self.which);
        let b = self.bufs()?;
        b.key.push(rows as u64);
        b.key.push(matches!(which, crate::Logits::All) as u64);
        let found = b.graphs.iter().position(|(k, _)| *k == b.key);
        if let Some(i) = found {
            self.mode = Mode::Replay(i);
            return Ok(());
        }
        if b.graphs.len() >= MOST_GRAPHS {
            b.graphs.clear();
        }
        match g.begin_capture() {
            Ok(()) => {
                self.mode = Mode::Capture;
                Ok(())
            }
            Err(e) => Err(self.graph_error(e)),
        }
    }

    /// At the end of a captured or replayed pass: launches its graph (ending the capture
    /// first, and keeping the graph).
    fn launch_graph(&mut self) -> Result<()> {
        let g = self.g;
        let i = match self.mode {
            Mode::Direct => return Ok(()),
            Mode::Replay(i) => i,
            Mode::Capture => {
                self.mode = Mode::Direct;
                let graph = match g.end_capture() {
                    Ok(graph) => graph,
                    Err(e) => return Err(self.graph_error(e)),
                };
                let b = self.bufs()?;
                let key = b.key.clone();
                b.graphs.push((key, graph));
                b.graphs.len() - 1
            }
        };
        self.mode = Mode::Direct;
        let launched = match self.bufs()?.graphs.get(i) {
            Some((_, graph)) => graph.launch(),
            None => return Err(internal("a GPU graph index")),
        };
        launched.map_err(|e| self.graph_error(e))?;
        self.resident.graph_passes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn len(&self, buf: Buf) -> usize {
        self.rows * buf.width(&self.model.config)
    }

    /// Launches the operation held back for fusing, if any (before anything that reads its
    /// result).
    fn flush(&mut self) -> Result<()> {
        let g = self.g;
        match std::mem::replace(&mut self.pending, Pending::Nothing) {
            Pending::Nothing => Ok(()),
            Pending::Add { dst, src } => {
                let n = self.len(dst);
                let (s, d) = self.pair(src, dst)?;
                g.add_assign(&mut d.slice_mut(..n), &s.slice(..n), n, n)
                    .map_err(gpu_err)
            }
            Pending::Rope { buf, heads } => {
                let (rows, n) = (self.rows, self.len(buf));
                let hd = self.model.config.head_dim();
                let b = self.bufs()?;
                let pos = b.pos.slice(..rows);
                g.rope_rotate_half(
                    &mut b.bufs[buf as usize].slice_mut(..n),
                    &pos,
                    &b.cos,
                    &b.sin,
                    rows,
                    heads,
                    hd,
                )
                .map_err(gpu_err)
            }
        }
    }

    /// `src` to read and `dst` to write, two different buffers.
    fn pair(&mut self, src: Buf, dst: Buf) -> Result<(&CudaSlice<f32>, &mut CudaSlice<f32>)> {
        let [s, d] = self
            .bufs()?
            .bufs
            .get_disjoint_mut([src as usize, dst as usize])
            .map_err(|_| internal("an operation reads and writes one buffer"))?;
        Ok((&*s, d))
    }

    /// Gathers rows `picked` of `X` into `Proj` and normalizes them into `Hn`.
    fn final_norm(&mut self, picked: &[usize]) -> Result<()> {
        if self.replaying() {
            return Ok(());
        }
        self.flush()?;
        let (g, c) = (self.g, &self.model.config);
        let (h, eps, p) = (c.hidden_size, c.rms_norm_eps as f32, picked.len());
        let norm = &self.resident.norm;
        let b = self.bufs()?;
        let [x, proj, hn] = b
            .bufs
            .get_disjoint_mut([Buf::X as usize, Buf::Proj as usize, Buf::Hn as usize])
            .map_err(|_| internal("head buffers overlap"))?;
        for (i, &src) in picked.iter().enumerate() {
            g.copy(
                &x.slice(src * h..(src + 1) * h),
                &mut proj.slice_mut(i * h..),
            )
            .map_err(gpu_err)?;
        }
        g.rms_norm(
            &proj.slice(..p * h),
            norm,
            eps,
            &mut hn.slice_mut(..p * h),
            p,
        )
        .map_err(gpu_err)
    }
}

impl Backend for GpuPass<'_> {
    fn reserve(&mut self, cache: &mut KvCache, needed: usize) -> Result<()> {
        let (len, limit) = (cache.len, cache.limit);
        let KvStore::Device(kv) = &mut cache.store else {
            return Err(Error::Invalid(
                "a KV cache made for the CPU was given to a model on the GPU".into(),
            ));
        };
        kv.reserve(&self.model.config, len, needed, limit)?;
        // Called once per sequence, in order, before `begin`: where the attention kernels
        // find its caches, and its rows for the pass's shape.
        let g = self.g;
        let b = self.bufs()?;
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| Error::Invalid(format!("a KV cache of {v} positions")))
        };
        b.info_host.push(int(len)?);
        b.info_host.push(int(kv.capacity)?);
        b.ptrs_host
            .extend(kv.k.iter().chain(kv.v.iter()).map(|buf| g.address(buf)));
        b.key.push((needed - len) as u64);
        b.key.push(kv.k.len() as u64);
        Ok(())
    }

    fn begin(&mut self, tokens: &[u32], positions: &[usize]) -> Result<()> {
        let (g, model, rows) = (self.g, self.model, self.rows);
        let n = self.len(Buf::X);
        let half = model.config.head_dim() / 2;
        let b = self.bufs()?;
        b.host.resize(n, 0.0);
        model.embed_rows(tokens, &mut b.host)?;
        g.write(&b.host, &mut b.bufs[Buf::X as usize].slice_mut(..))
            .map_err(gpu_err)?;
        g.write(&b.info_host, &mut b.kv_info.slice_mut(..))
            .map_err(gpu_err)?;
        if b.ptrs_host != b.ptrs_sent {
            g.write(&b.ptrs_host, &mut b.kv_ptrs.slice_mut(..))
                .map_err(gpu_err)?;
            b.ptrs_sent.clone_from(&b.ptrs_host);
        }
        b.cos_host.resize(rows * half, 0.0);
        b.sin_host.resize(rows * half, 0.0);
        model.rope_rows(positions, &mut b.cos_host, &mut b.sin_host);
        g.write(&b.cos_host, &mut b.cos.slice_mut(..))
            .map_err(gpu_err)?;
        g.write(&b.sin_host, &mut b.sin.slice_mut(..))
            .map_err(gpu_err)?;
        if self.graphs {
            self.start_graph()?;
        }
        Ok(())
    }

    fn rms_norm(&mut self, norm: Norm, src: Buf, dst: Buf) -> Result<()> {
        if self.replaying() {
            return Ok(());
        }
        let (g, rows, n) = (self.g, self.rows, self.len(src));
        let eps = self.model.config.rms_norm_eps as f32;
        let w = match norm {
            Norm::Attention(li) => &self.resident.attn_norm[li],
            Norm::Mlp(li) => &self.resident.mlp_norm[li],
        };
        if let Pending::Add { dst: x, src: res } = self.pending {
            if x == src && dst != x && dst != res {
                // The residual add just held back, and this norm of its sum: one launch.
                self.pending = Pending::Nothing;
                let b = self.bufs()?;
                let [xb, rb, ob] = b
                    .bufs
                    .get_disjoint_mut([x as usize, res as usize, dst as usize])
                    .map_err(|_| internal("add and norm buffers overlap"))?;
                return g
                    .add_rms_norm(
                        &mut xb.slice_mut(..n),
                        &rb.slice(..n),
                        w,
                        eps,
                        &mut ob.slice_mut(..n),
                        rows,
                    )
                    .map_err(gpu_err);
            }
        }
        self.flush()?;
        let (s, d) = self.pair(src, dst)?;
        g.rms_norm(&s.slice(..n), w, eps, &mut d.slice_mut(..n), rows)
            .map_err(gpu_err)
    }

    fn matmul(&mut self, w: &Linear, src: Buf, dst: Buf) -> Result<()> {
        if self.replaying() {
            return Ok(());
        }
        self.flush()?;
        let (g, rows) = (self.g, self.rows);
        let (ns, nd) = (self.len(src), self.len(dst));
        let gw = w
            .gpu_weight()
            .ok_or_else(|| internal("a linear layer of a GPU pass is not on the GPU"))?;
        let (s, d) = self.pair(src, dst)?;
        gw.forward_on_device(g, &s.slice(..ns), rows, &mut d.slice_mut(..nd))
    }

    fn rope(&mut self, buf: Buf, heads: usize) -> Result<()> {
        if self.replaying() {
            return Ok(());
        }
        if let Pending::Rope { buf: q, heads: hq } = self.pending {
            if q != buf {
                // The queries' rotation held back, and these keys': one launch.
                self.pending = Pending::Nothing;
                let (g, rows) = (self.g, self.rows);
                let (nq, nk) = (self.len(q), self.len(buf));
                let hd = self.model.config.head_dim();
                let b = self.bufs()?;
                let pos = b.pos.slice(..rows);
                let [qb, kb] = b
                    .bufs
                    .get_disjoint_mut([q as usize, buf as usize])
                    .map_err(|_| internal("rope buffers overlap"))?;
                return g
                    .rope_rotate_half_pair(
                        &mut qb.slice_mut(..nq),
                        &mut kb.slice_mut(..nk),
                        &pos,
                        &b.cos,
                        &b.sin,
                        rows,
                        (hq, heads),
                        hd,
                    )
                    .map_err(gpu_err);
            }
        }
        self.flush()?;
        self.pending = Pending::Rope { buf, heads };
        Ok(())
    }

    fn attention(
        &mut self,
        li: usize,
        seqs: &mut [(&[u32], &mut KvCache)],
        tree: Option<&[Vec<u32>]>,
    ) -> Result<()> {
        if tree.is_some() {
            return Err(Error::Invalid(
                "token trees are verified on the CPU only (the GPU's attention kernel is causal)"
                    .into(),
            ));
        }
        if self.replaying() {
            return Ok(());
        }
        self.flush()?;
        let g = self.g;
        let c = &self.model.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        let b = self.bufs()?;
        let [q, k, v, att] = attention_buffers(&mut b.bufs)?;
        let (ptrs, info) = (b.kv_ptrs.slice(..), b.kv_info.slice(..));
        // Where this sequence's K and V addresses start in `kv_ptrs` (`reserve` put them there
        // in this order).
        let mut base = 0;
        let mut row = 0;
        for (seq, (tokens, cache)) in seqs.iter_mut().enumerate() {
            let (t, n) = (tokens.len(), cache.len);
            let KvStore::Device(kv) = &mut cache.store else {
                return Err(internal("a CPU cache in a GPU pass"));
            };
            let s = attention_shape(c, t, n, kv.capacity);
            let (kr, qr) = (
                row * nkv * hd..(row + t) * nkv * hd,
                row * nh * hd..(row + t) * nh * hd,
            );
            let at = KvTable {
                ptrs: ptrs.slice(..),
                info: info.slice(..),
                seq,
            };
            let layers = kv.k.len();
            let (ks, vs) = (base + li, base + layers + li);
            base += 2 * layers;
            let (kc, vc) = (&mut kv.k[li], &mut kv.v[li]);
            // SAFETY: `begin` wrote the table from what `reserve` found for this pass: for
            // sequence `seq`, its length before the pass (`n`) and capacity, and its caches'
            // addresses, K layer by layer then V, from `base` (this loop walks the sequences
            // in the same order), none of which has changed since.
            unsafe { g.kv_append(s, &at, (ks, vs), &k.slice(kr.clone()), &v.slice(kr), kc, vc) }
                .map_err(gpu_err)?;
            // SAFETY: as for `kv_append` above.
            unsafe {
                g.attention(
                    s,
                    &at,
                    ks,
                    vs,
                    &q.slice(qr.clone()),
                    &kv.k[li],
                    &kv.v[li],
                    &mut att.slice_mut(qr),
                )
            }
            .map_err(gpu_err)?;
            row += t;
        }
        Ok(())
    }

    fn silu_mul(&mut self, gate: Buf, up: Buf) -> Result<()> {
        if self.replaying() {
            return Ok(());
        }
        self.flush()?;
        let (g, n) = (self.g, self.len(gate));
        let (u, gt) = self.pair(up, gate)?;
        g.silu_mul(&mut gt.slice_mut(..n), &u.slice(..n), n)
            .map_err(gpu_err)
    }

    fn add(&mut self, dst: Buf, src: Buf) -> Result<()> {
        if self.replaying() {
            return Ok(());
        }
        // Held back: the norm that usually follows reads the sum (see `rms_norm`).
        self.flush()?;
        self.pending = Pending::Add { dst, src };
        Ok(())
    }

    fn host(&mut self, buf: Buf) -> Result<&[f32]> {
        self.not_in_graph("reading activations")?;
        self.flush()?;
        let (g, n) = (self.g, self.len(buf));
        let b = self.bufs()?;
        b.host.resize(n, 0.0);
        g.read(&b.bufs[buf as usize].slice(..n), &mut b.host)
            .map_err(gpu_err)?;
        Ok(&b.host)
    }

    fn head_input(&mut self, picked: &[usize]) -> Result<&[f32]> {
        self.not_in_graph("the head on the CPU")?;
        self.final_norm(picked)?;
        let (g, n) = (self.g, picked.len() * self.model.config.hidden_size);
        let b = self.bufs()?;
        b.host.resize(n, 0.0);
        g.read(&b.bufs[Buf::Hn as usize].slice(..n), &mut b.host)
            .map_err(gpu_err)?;
        Ok(&b.host)
    }

    fn head(&mut self, picked: &[usize], lm_head: &Linear, logits: &mut [f32]) -> Result<()> {
        let Some(gw) = lm_head.gpu_weight() else {
            let hn = self.head_input(picked)?;
            return lm_head.forward_into(hn, picked.len(), logits);
        };
        self.final_norm(picked)?;
        let g = self.g;
        if !self.replaying() {
            let (p, h) = (picked.len(), self.model.config.hidden_size);
            let b = self.bufs()?;
            gw.forward_on_device(
                g,
                &b.bufs[Buf::Hn as usize].slice(..p * h),
                p,
                &mut b.logits.slice_mut(..logits.len()),
            )?;
        }
        self.launch_graph()?;
        let b = self.bufs()?;
        g.read(&b.logits.slice(..logits.len()), logits)
            .map_err(gpu_err)
    }

    fn sync(&self) -> Result<()> {
        self.g.synchronize().map_err(gpu_err)
    }
}
