//! The CUDA path (feature `cuda`): weight matrices uploaded once, and matmul kernels
//! (Q8_0, Q4_0, F16; m = 1…8 activation rows per launch, the decode and verification shapes)
//! compiled from `cuda/kernels.cu` with NVRTC at run time.
//!
//! cudarc loads the CUDA driver and NVRTC with `dlopen` when first used, so this builds and
//! its tests run on machines without CUDA: [`gpu`] then answers `Err` with the reason, and
//! callers (tests, the CLI's `--gpu`) say they skip. Activations stay f32 on the GPU, so a
//! layer computes what the CPU's f32 path computes, up to summation order.

use crate::{AttentionShape, BlockFormat};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
pub use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use std::sync::{Arc, OnceLock};

/// The kernels' CUDA C source.
pub const SOURCE: &str = include_str!("cuda/kernels.cu");
/// Most activation rows one launch handles (`MAX_ROWS` in the source).
pub const MAX_ROWS: usize = 8;
/// Warps per thread block.
const WARPS: u32 = 8;
/// Threads of an attention block (`ATT_WARPS` warps in the source).
const ATTENTION_THREADS: u32 = 8 * 32;
/// Output rows one warp computes (`OUT_ROWS` and `F16_OUT_ROWS` in the source).
const OUT_ROWS: u32 = 2;
const F16_OUT_ROWS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU: {0}")]
    Unavailable(String),
    #[error("CUDA: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("{0}")]
    Invalid(String),
}

/// Storage of a matrix on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuFormat {
    Q8_0,
    Q4_0,
    F16,
}

impl GpuFormat {
    /// The GPU format for a CPU block format, where there is a kernel for it.
    pub fn from_block(f: BlockFormat) -> Option<Self> {
        match f {
            BlockFormat::Q8_0 => Some(GpuFormat::Q8_0),
            BlockFormat::Q4_0 => Some(GpuFormat::Q4_0),
            _ => None,
        }
    }

    fn row_bytes(self, k: usize) -> usize {
        match self {
            GpuFormat::Q8_0 => k / 32 * 34,
            GpuFormat::Q4_0 => k / 32 * 18,
            GpuFormat::F16 => k * 2,
        }
    }
}

/// A weight matrix [n, k] resident on the GPU.
#[derive(Debug)]
pub struct GpuMatrix {
    pub format: GpuFormat,
    pub n: usize,
    pub k: usize,
    data: CudaSlice<u8>,
}

impl GpuMatrix {
    pub fn bytes(&self) -> usize {
        self.n * self.format.row_bytes(self.k)
    }
}

/// One GPU: its context, stream and compiled kernels.
pub struct Gpu {
    pub name: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// The matmul kernels for m = 1..=MAX_ROWS rows, index m - 1.
    q8_0: Vec<CudaFunction>,
    q4_0: Vec<CudaFunction>,
    f16: Vec<CudaFunction>,
    probe: CudaFunction,
    rms_norm: CudaFunction,
    add_rms_norm: CudaFunction,
    rope: CudaFunction,
    kv_append: CudaFunction,
    attention: CudaFunction,
    silu_mul: CudaFunction,
    add_assign: CudaFunction,
}

static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();

/// GPU 0, set up on first use; `Err` says why there is none (no driver, no device, no NVRTC,
/// or the kernels did not compile).
pub fn gpu() -> Result<&'static Gpu, GpuError> {
    GPU.get_or_init(|| {
        Gpu::open(0).map_err(|e| match e {
            GpuError::Unavailable(why) => why,
            other => other.to_string(),
        })
    })
    .as_ref()
    .map_err(|e| GpuError::Unavailable(e.clone()))
}

/// Compiles [`SOURCE`] to PTX with NVRTC (needs only libnvrtc, no GPU).
pub fn compile_ptx() -> Result<cudarc::nvrtc::Ptx, GpuError> {
    // SAFETY: only probes whether the shared library can be loaded.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(GpuError::Unavailable(
            "NVRTC (libnvrtc.so) not found; install the CUDA toolkit or the \
             nvidia-cuda-nvrtc-cu12 wheel and put its lib/ on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some("compute_80"),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
        .map_err(|e| GpuError::Invalid(format!("kernels did not compile: {e:?}")))
}

impl Gpu {
    fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        // SAFETY: only probes whether the shared library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::Unavailable(
                "CUDA driver (libcuda.so) not found".into(),
            ));
        }
        let count = CudaContext::device_count()?;
        if count <= ordinal as i32 {
            return Err(GpuError::Unavailable(format!("{count} CUDA devices")));
        }
        let ctx = CudaContext::new(ordinal)?;
        let name = ctx.name()?;
        let module = ctx.load_module(compile_ptx()?)?;
        // One stream of our own: the legacy default stream cannot be captured into a CUDA
        // graph.
        // SAFETY: turning cudarc's event tracking off is sound because every allocation, copy
        // and launch goes to this one stream, so its order alone orders them; the events only
        // order work across streams (and would be recorded into a graph being captured).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let per_rows = |kernel: &str| {
            (1..=MAX_ROWS)
                .map(|m| module.load_function(&format!("{kernel}_{m}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Gpu {
            name,
            stream,
            q8_0: per_rows("matmul_q8_0")?,
            q4_0: per_rows("matmul_q4_0")?,
            f16: per_rows("matmul_f16")?,
            probe: module.load_function("read_probe")?,
            rms_norm: module.load_function("rms_norm")?,
            add_rms_norm: module.load_function("add_rms_norm")?,
            rope: module.load_function("rope_rotate_half")?,
            kv_append: module.load_function("kv_append")?,
            attention: module.load_function("attention")?,
            silu_mul: module.load_function("silu_mul")?,
            add_assign: module.load_function("add_assign")?,
            ctx,
        })
    }

    /// Copies a weight matrix (GGML block bytes, or f16 little-endian bytes) to the GPU.
    pub fn upload(
        &self,
        format: GpuFormat,
        bytes: &[u8],
        n: usize,
        k: usize,
    ) -> Result<GpuMatrix, GpuError> {
        if format != GpuFormat::F16 && !k.is_multiple_of(32) {
            return Err(GpuError::Invalid(format!(
                "row length {k} is not a multiple of 32"
            )));
        }
        if bytes.len() != n * format.row_bytes(k) {
            return Err(GpuError::Invalid(format!(
                "{format:?} [{n}, {k}] needs {} bytes, got {}",
                n * format.row_bytes(k),
                bytes.len()
            )));
        }
        let data = self
            .stream
            .clone_htod(&gpu_layout(format, bytes, n, k)[..])?;
        Ok(GpuMatrix { format, n, k, data })
    }

    /// `out[m×n] = x[m×k] · Wᵀ` on the GPU (x copied in, out copied back; m ≤ 8 per launch,
    /// larger m in several launches).
    pub fn matmul(
        &self,
        w: &GpuMatrix,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), GpuError> {
        let (n, k) = (w.n, w.k);
        if x.len() != m * k || out.len() != m * n {
            return Err(GpuError::Invalid(format!(
                "matmul [{n}, {k}] given {} inputs and {} outputs for {m} rows",
                x.len(),
                out.len()
            )));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let xd = self.stream.clone_htod(x)?;
        let mut od = self.stream.alloc_zeros::<f32>(m * n)?;
        self.matmul_on_device(w, &xd.slice(..), m, &mut od.slice_mut(..))?;
        self.stream.memcpy_dtoh(&od, out)?;
        self.stream.synchronize()?;
        Ok(())
    }

    // ---- Device-resident operations: inputs and results stay on the GPU. Each checks the
    // sizes of its buffers first (a kernel reading past one is undefined behaviour) and runs
    // asynchronously on the one stream, so their order is the order of the calls. ----

    /// Waits until every operation queued on the stream has finished (profiling times whole
    /// operations, not their launches).
    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }

    /// `len` f32 zeros on the GPU.
    pub fn zeros(&self, len: usize) -> Result<CudaSlice<f32>, GpuError> {
        Ok(self.stream.alloc_zeros::<f32>(len.max(1))?)
    }

    /// A copy of `host` on the GPU.
    pub fn to_device<T: cudarc::driver::DeviceRepr>(
        &self,
        host: &[T],
    ) -> Result<CudaSlice<T>, GpuError> {
        Ok(self.stream.clone_htod(host)?)
    }

    /// Copies `host` into the start of `dst`.
    pub fn write<T: cudarc::driver::DeviceRepr>(
        &self,
        host: &[T],
        dst: &mut CudaViewMut<'_, T>,
    ) -> Result<(), GpuError> {
        fits("write", host.len(), dst.len())?;
        let mut d = dst.slice_mut(..host.len());
        Ok(self.stream.memcpy_htod(host, &mut d)?)
    }

    /// Copies the start of `src` into `host`, waiting for the work queued before it.
    pub fn read(&self, src: &CudaView<'_, f32>, host: &mut [f32]) -> Result<(), GpuError> {
        fits("read", host.len(), src.len())?;
        self.stream.memcpy_dtoh(&src.slice(..host.len()), host)?;
        self.stream.synchronize()?;
        Ok(())
    }

    /// Copies `src` into the start of `dst`, on the GPU.
    pub fn copy(
        &self,
        src: &CudaView<'_, f32>,
        dst: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), GpuError> {
        fits("copy", src.len(), dst.len())?;
        let mut d = dst.slice_mut(..src.len());
        Ok(self.stream.memcpy_dtod(src, &mut d)?)
    }

    /// `out[m×n] = x[m×k] · Wᵀ`, both on the GPU (launches of ≤ 8 rows each; a row's result
    /// does not depend on how many rows share its launch).
    pub fn matmul_on_device(
        &self,
        w: &GpuMatrix,
        x: &CudaView<'_, f32>,
        m: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), GpuError> {
        let (n, k) = (w.n, w.k);
        fits("matmul input", m * k, x.len())?;
        fits("matmul output", m * n, out.len())?;
        for r0 in (0..m).step_by(MAX_ROWS) {
            let rows = (m - r0).min(MAX_ROWS);
            let xs = x.slice(r0 * k..(r0 + rows) * k);
            let mut os = out.slice_mut(r0 * n..(r0 + rows) * n);
            self.launch(w, &xs, &mut os, rows)?;
        }
        Ok(())
    }

    /// RMSNorm of `rows` rows of `d` (see [`crate::ops::rms_norm`]).
    pub fn rms_norm(
        &self,
        x: &CudaView<'_, f32>,
        w: &CudaSlice<f32>,
        eps: f32,
        out: &mut CudaViewMut<'_, f32>,
        rows: usize,
    ) -> Result<(), GpuError> {
        let d = w.len();
        fits("rms_norm input", rows * d, x.len())?;
        fits("rms_norm output", rows * d, out.len())?;
        if rows == 0 {
            return Ok(());
        }
        let mut b = self.stream.launch_builder(&self.rms_norm);
        let di = d as i32;
        b.arg(x).arg(w).arg(out).arg(&di).arg(&eps);
        // SAFETY: matches rms_norm(const float*, const float*, float*, int, float); sizes checked.
        unsafe { b.launch(grid(rows as u32, 256)) }?;
        Ok(())
    }

    /// Rotate-half RoPE in place on `x` = [rows, heads, head_dim]; row r at position
    /// `pos[r]`, angles from the tables `cos`/`sin` = [positions, head_dim / 2] (see
    /// [`crate::ops::rope_rotate_half`]).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_rotate_half(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        pos: &CudaView<'_, i32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        rows: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), GpuError> {
        fits("rope input", rows * heads * head_dim, x.len())?;
        fits("rope positions", rows, pos.len())?;
        if cos.len() != sin.len() || !head_dim.is_multiple_of(2) {
            return Err(GpuError::Invalid(
                "rope tables or head size do not agree".into(),
            ));
        }
        // Positions are checked against the tables by the caller (the KV cache's limit).
        if rows == 0 {
            return Ok(());
        }
        let mut b = self.stream.launch_builder(&self.rope);
        let (h, none, hd) = (heads as i32, 0i32, head_dim as i32);
        // The kernel's second buffer (k) is not touched with hk = 0: `cos` stands in for it.
        b.arg(x)
            .arg(cos)
            .arg(pos)
            .arg(cos)
            .arg(sin)
            .arg(&h)
            .arg(&none)
            .arg(&hd);
        // SAFETY: matches rope_rotate_half(float*, float*, const int*, const float*,
        // const float*, int, int, int); sizes checked, and with hk = 0 the second buffer is
        // neither read nor written.
        unsafe { b.launch(grid(rows as u32, 128)) }?;
        Ok(())
    }

    /// [`Gpu::rope_rotate_half`] of a pass's queries `q` = [rows, q_heads, head_dim] and keys
    /// `k` = [rows, k_heads, head_dim] in one launch (the same results).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_rotate_half_pair(
        &self,
        q: &mut CudaViewMut<'_, f32>,
        k: &mut CudaViewMut<'_, f32>,
        pos: &CudaView<'_, i32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        rows: usize,
        heads: (usize, usize),
        head_dim: usize,
    ) -> Result<(), GpuError> {
        fits("rope queries", rows * heads.0 * head_dim, q.len())?;
        fits("rope keys", rows * heads.1 * head_dim, k.len())?;
        fits("rope positions", rows, pos.len())?;
        if cos.len() != sin.len() || !head_dim.is_multiple_of(2) {
            return Err(GpuError::Invalid(
                "rope tables or head size do not agree".into(),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let mut b = self.stream.launch_builder(&self.rope);
        let (hq, hk, hd) = (heads.0 as i32, heads.1 as i32, head_dim as i32);
        b.arg(q)
            .arg(k)
            .arg(pos)
            .arg(cos)
            .arg(sin)
            .arg(&hq)
            .arg(&hk)
            .arg(&hd);
        // SAFETY: matches rope_rotate_half(float*, float*, const int*, const float*,
        // const float*, int, int, int); sizes checked.
        unsafe { b.launch(grid(rows as u32, 128)) }?;
        Ok(())
    }

    /// `x += res` then `out = rms_norm(x) * w`, row by row: a residual add and the norm
    /// after it in one launch (the same bits as [`Gpu::add_assign`] then [`Gpu::rms_norm`]).
    pub fn add_rms_norm(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        res: &CudaView<'_, f32>,
        w: &CudaSlice<f32>,
        eps: f32,
        out: &mut CudaViewMut<'_, f32>,
        rows: usize,
    ) -> Result<(), GpuError> {
        let d = w.len();
        fits("add_rms_norm input", rows * d, x.len())?;
        fits("add_rms_norm residual", rows * d, res.len())?;
        fits("add_rms_norm output", rows * d, out.len())?;
        if rows == 0 {
            return Ok(());
        }
        let mut b = self.stream.launch_builder(&self.add_rms_norm);
        let di = d as i32;
        b.arg(x).arg(res).arg(w).arg(out).arg(&di).arg(&eps);
        // SAFETY: matches add_rms_norm(float*, const float*, const float*, float*, int,
        // float); sizes checked.
        unsafe { b.launch(grid(rows as u32, 256)) }?;
        Ok(())
    }

    /// Writes `s.t` rows of new keys and of new values, `src` = [t, n_kv_head, head_dim]
    /// each, into caches laid out [n_kv_head, capacity, head_dim] at positions
    /// `s.n..s.n + s.t`, in one launch. The kernel finds the caches, `s.n` and `s.capacity`
    /// in the table `at` (slots `slots.0` and `slots.1`).
    ///
    /// # Safety
    /// The kernel writes where the table says: `at` must hold `k_cache`'s and `v_cache`'s
    /// addresses in those slots and `s.n`, `s.capacity` for `at.seq` (see [`KvTable`]), written
    /// before this launch on the stream. The sizes given here are checked; the table's copy
    /// of them cannot be, from the host.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kv_append(
        &self,
        s: AttentionShape,
        at: &KvTable<'_>,
        slots: (usize, usize),
        k_src: &CudaView<'_, f32>,
        v_src: &CudaView<'_, f32>,
        k_cache: &mut CudaSlice<f32>,
        v_cache: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let (nkv, hd) = (s.n_kv_head, s.head_dim);
        fits("kv_append keys", s.t * nkv * hd, k_src.len())?;
        fits("kv_append values", s.t * nkv * hd, v_src.len())?;
        fits(
            "kv cache",
            nkv * s.capacity * hd,
            k_cache.len().min(v_cache.len()),
        )?;
        if s.n + s.t > s.capacity {
            return Err(GpuError::Invalid(
                "kv_append past the cache's capacity".into(),
            ));
        }
        at.check(slots.0)?;
        at.check(slots.1)?;
        if s.t == 0 {
            return Ok(());
        }
        let mut b = self.stream.launch_builder(&self.kv_append);
        let (ks, vs, sq) = (slots.0 as i32, slots.1 as i32, at.seq as i32);
        let (a, d) = (nkv as i32, hd as i32);
        b.arg(k_src)
            .arg(v_src)
            .arg(&at.ptrs)
            .arg(&ks)
            .arg(&vs)
            .arg(&at.info)
            .arg(&sq);
        b.arg(&a).arg(&d);
        // SAFETY: matches kv_append(const float*, const float*, const u64*, int, int,
        // const int*, int, int, int); sizes checked. The table holds the caches' addresses,
        // `s.n` and `s.capacity` (this function's safety contract), which were checked
        // against each other above.
        unsafe { b.launch(grid((2 * s.t * nkv) as u32, 128)) }?;
        Ok(())
    }

    /// Causal attention of `s.t` new queries over caches holding `s.n + s.t` positions (see
    /// [`crate::attention`]); the kernel finds `k` and `v` in the table `at` (slots `k_slot`,
    /// `v_slot`), as [`Gpu::kv_append`] does.
    ///
    /// # Safety
    /// As for [`Gpu::kv_append`]: `at` must hold `k`'s and `v`'s addresses in those slots and
    /// `s.n`, `s.capacity` for `at.seq`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention(
        &self,
        s: AttentionShape,
        at: &KvTable<'_>,
        k_slot: usize,
        v_slot: usize,
        q: &CudaView<'_, f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), GpuError> {
        let (nh, nkv, hd) = (s.n_head, s.n_kv_head, s.head_dim);
        fits("attention queries", s.t * nh * hd, q.len())?;
        fits("attention output", s.t * nh * hd, out.len())?;
        fits("kv cache", nkv * s.capacity * hd, k.len().min(v.len()))?;
        if nkv == 0 || !nh.is_multiple_of(nkv) || hd > 256 || s.n + s.t > s.capacity {
            return Err(GpuError::Invalid(format!(
                "attention shape not supported: {s:?}"
            )));
        }
        at.check(k_slot)?;
        at.check(v_slot)?;
        if s.t == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (nh as u32, s.t as u32, 1),
            block_dim: (ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let (ks, vs, sq) = (k_slot as i32, v_slot as i32, at.seq as i32);
        let (h, a, d) = (nh as i32, nkv as i32, hd as i32);
        let mut b = self.stream.launch_builder(&self.attention);
        b.arg(q)
            .arg(&at.ptrs)
            .arg(&ks)
            .arg(&vs)
            .arg(&at.info)
            .arg(&sq);
        b.arg(out).arg(&h).arg(&a).arg(&d).arg(&scale);
        // SAFETY: matches attention(const float*, const u64*, int, int, const int*, int,
        // float*, int, int, int, float); sizes checked. The table holds `k`'s and `v`'s
        // addresses, `s.n` and `s.capacity` (this function's safety contract), which were
        // checked against each other above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `gate = silu(gate) * up` (see [`crate::ops::silu_mul`]).
    pub fn silu_mul(
        &self,
        gate: &mut CudaViewMut<'_, f32>,
        up: &CudaView<'_, f32>,
        len: usize,
    ) -> Result<(), GpuError> {
        fits("silu_mul gate", len, gate.len())?;
        fits("silu_mul up", len, up.len())?;
        if len == 0 {
            return Ok(());
        }
        let mut b = self.stream.launch_builder(&self.silu_mul);
        let l = len as i32;
        b.arg(gate).arg(up).arg(&l);
        // SAFETY: matches silu_mul(float*, const float*, int); sizes checked.
        unsafe { b.launch(grid((len as u32).div_ceil(256), 256)) }?;
        Ok(())
    }

    /// `acc[i] += b[i % period]` for i < len: a residual add (period = len) or a bias added
    /// to every row (period = the row length).
    pub fn add_assign(
        &self,
        acc: &mut CudaViewMut<'_, f32>,
        b: &CudaView<'_, f32>,
        len: usize,
        period: usize,
    ) -> Result<(), GpuError> {
        fits("add_assign target", len, acc.len())?;
        fits("add_assign operand", period, b.len())?;
        if len == 0 {
            return Ok(());
        }
        if period == 0 || !len.is_multiple_of(period) {
            return Err(GpuError::Invalid(format!(
                "add_assign: {len} is not rows of {period}"
            )));
        }
        let mut l = self.stream.launch_builder(&self.add_assign);
        let (li, pi) = (len as i32, period as i32);
        l.arg(acc).arg(b).arg(&li).arg(&pi);
        // SAFETY: matches add_assign(float*, const float*, int, int); sizes checked.
        unsafe { l.launch(grid((len as u32).div_ceil(256), 256)) }?;
        Ok(())
    }

    fn launch(
        &self,
        w: &GpuMatrix,
        x: &cudarc::driver::CudaView<'_, f32>,
        out: &mut cudarc::driver::CudaViewMut<'_, f32>,
        rows: usize,
    ) -> Result<(), GpuError> {
        let kernels = match w.format {
            GpuFormat::Q8_0 => &self.q8_0,
            GpuFormat::Q4_0 => &self.q4_0,
            GpuFormat::F16 => &self.f16,
        };
        let f = kernels
            .get(rows.wrapping_sub(1))
            .ok_or_else(|| GpuError::Invalid(format!("a launch of {rows} rows")))?;
        let per_warp = if w.format == GpuFormat::F16 {
            F16_OUT_ROWS
        } else {
            OUT_ROWS
        };
        let cfg = LaunchConfig {
            grid_dim: ((w.n as u32).div_ceil(per_warp).div_ceil(WARPS), 1, 1),
            block_dim: (32, WARPS, 1),
            shared_mem_bytes: 0,
        };
        // 16-byte loads of the activations need them 16-byte aligned (a view into a larger
        // buffer may start anywhere).
        let aligned = {
            let (ptr, _sync) = x.device_ptr(&self.stream);
            ptr % 16 == 0
        };
        let wide = i32::from(aligned);
        let (m, k, n) = (rows as i32, w.k as i32, w.n as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(&w.data)
            .arg(x)
            .arg(out)
            .arg(&m)
            .arg(&k)
            .arg(&n)
            .arg(&wide);
        // SAFETY: the argument list matches the kernel's signature (w, x, out, m, k, n, wide);
        // sizes were checked, and `wide` is set only where the vector loads are aligned.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Seconds per launch of `w` against `m` rows already on the GPU (mean over `reps`,
    /// after one warm-up): the kernel's own time, for GB/s figures.
    pub fn time_matmul(&self, w: &GpuMatrix, m: usize, reps: usize) -> Result<f64, GpuError> {
        let m = m.clamp(1, MAX_ROWS);
        let xd = self.stream.alloc_zeros::<f32>(m * w.k)?;
        let mut od = self.stream.alloc_zeros::<f32>(m * w.n)?;
        let (xs, mut os) = (xd.slice(..), od.slice_mut(..));
        self.launch(w, &xs, &mut os, m)?;
        self.stream.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            self.launch(w, &xs, &mut os, m)?;
        }
        self.stream.synchronize()?;
        Ok(t.elapsed().as_secs_f64() / reps.max(1) as f64)
    }

    /// Device memory read bandwidth in bytes/s (a streaming read of `bytes`), the ceiling the
    /// matmul kernels are measured against.
    pub fn read_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64, GpuError> {
        let words = (bytes / 16).max(1024) as u64;
        let src = self.stream.alloc_zeros::<u8>(words as usize * 16)?;
        let sink = self.stream.alloc_zeros::<u32>(1)?;
        let cfg = LaunchConfig {
            grid_dim: (1024, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let run = || -> Result<(), GpuError> {
            let mut b = self.stream.launch_builder(&self.probe);
            b.arg(&src).arg(&words).arg(&sink);
            // SAFETY: arguments match `read_probe(const uint4*, u64, u32*)`; src holds
            // `words` 16-byte words.
            unsafe { b.launch(cfg) }?;
            Ok(())
        };
        run()?;
        self.stream.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            run()?;
        }
        self.stream.synchronize()?;
        Ok((words * 16) as f64 * reps.max(1) as f64 / t.elapsed().as_secs_f64())
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device address of `buf` (what a [`KvTable`] holds).
    pub fn address<T>(&self, buf: &CudaSlice<T>) -> u64 {
        let (ptr, _sync) = buf.device_ptr(&self.stream);
        ptr
    }

    /// Starts recording this thread's work on the stream into a graph instead of running it
    /// ([`Gpu::end_capture`] ends it). Nothing may wait on the stream meanwhile
    /// ([`Gpu::read`] and [`Gpu::synchronize`] fail).
    pub fn begin_capture(&self) -> Result<(), GpuError> {
        Ok(self
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?)
    }

    /// Ends a capture: the recorded work as a graph to launch again and again.
    pub fn end_capture(&self) -> Result<GpuGraph, GpuError> {
        self.stream
            .end_capture(CUgraphInstantiate_flags(0))?
            .map(GpuGraph)
            .ok_or_else(|| GpuError::Invalid("an empty CUDA graph was captured".into()))
    }
}

/// Where the attention kernels find a sequence's KV caches on the GPU (read there, so that a
/// pass captured into a graph replays with any cache of the same shape, at any length):
/// `ptrs[slot]` holds a cache buffer's address ([`Gpu::address`]), and `info[2 * seq]`,
/// `info[2 * seq + 1]` the sequence's length before the pass and its caches' capacity.
///
/// The caller writes the table before the work that reads it, and it must agree with what
/// the caller passes beside it: the methods that take a table check the buffers and the
/// shape they are given, and the kernels use the table's copy of the same (so those methods
/// are `unsafe`).
pub struct KvTable<'a> {
    pub ptrs: CudaView<'a, u64>,
    pub info: CudaView<'a, i32>,
    pub seq: usize,
}

impl KvTable<'_> {
    fn check(&self, slot: usize) -> Result<(), GpuError> {
        fits("KV table", slot + 1, self.ptrs.len())?;
        fits("KV lengths", 2 * self.seq + 2, self.info.len())
    }
}

/// Work captured from the stream (a whole forward pass), launched in one call: a decode step
/// of a small model is hundreds of short kernels, whose launches cost more than their work.
pub struct GpuGraph(CudaGraph);

// SAFETY: a CUDA graph may be used from any thread as long as no two threads use it at once
// (the CUDA documentation's thread-safety rule for graphs). Moving it to another thread keeps
// that: it stays `!Sync` (its raw handles are), so no two threads can hold it at once.
unsafe impl Send for GpuGraph {}

impl GpuGraph {
    /// Queues the whole graph on the stream it was captured on.
    pub fn launch(&self) -> Result<(), GpuError> {
        Ok(self.0.launch()?)
    }
}

/// GGML blocks rearranged for the GPU's 16-byte loads (the layout `cuda/kernels.cu`
/// describes): a quantized matrix's quants row after row, then its f16 scales row after row.
/// F16 rows stay as they are (borrowed, not copied). Same size; `bytes` is checked against `n`
/// and `k` by the caller.
fn gpu_layout(format: GpuFormat, bytes: &[u8], n: usize, k: usize) -> std::borrow::Cow<'_, [u8]> {
    let (block, quants) = match format {
        GpuFormat::F16 => return std::borrow::Cow::Borrowed(bytes),
        GpuFormat::Q8_0 => (34, 32),
        GpuFormat::Q4_0 => (18, 16),
    };
    let blocks = n * k / 32;
    let mut out = vec![0u8; bytes.len()];
    let (qs, scales) = out.split_at_mut(blocks * quants);
    for (i, b) in bytes.chunks_exact(block).enumerate() {
        scales[2 * i..2 * i + 2].copy_from_slice(&b[..2]);
        qs[quants * i..quants * (i + 1)].copy_from_slice(&b[2..]);
    }
    std::borrow::Cow::Owned(out)
}

/// `needed` elements must fit in a buffer of `have`.
fn fits(what: &str, needed: usize, have: usize) -> Result<(), GpuError> {
    if needed > have {
        return Err(GpuError::Invalid(format!(
            "{what}: needs {needed} elements, the buffer holds {have}"
        )));
    }
    Ok(())
}

/// A one-dimensional launch of `blocks` blocks of `threads` threads.
fn grid(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_layout_puts_quants_then_scales() {
        // Two rows of two Q8_0 blocks: block i has scale bytes [i, 100 + i] and quants 10 * i..
        let (n, k) = (2, 64);
        let mut bytes = Vec::new();
        for i in 0..4u8 {
            bytes.extend([i, 100 + i]);
            bytes.extend((0..32).map(|q| 10 * i + q));
        }
        let out = gpu_layout(GpuFormat::Q8_0, &bytes, n, k);
        assert_eq!(out.len(), bytes.len());
        for i in 0..4usize {
            let q: Vec<u8> = (0..32).map(|q| 10 * i as u8 + q).collect();
            assert_eq!(&out[32 * i..32 * (i + 1)], &q[..], "quants of block {i}");
            assert_eq!(&out[128 + 2 * i..130 + 2 * i], &[i as u8, 100 + i as u8]);
        }
        // Q4_0: 16 quant bytes per block.
        let mut bytes = Vec::new();
        for i in 0..2u8 {
            bytes.extend([i, 50 + i]);
            bytes.extend((0..16).map(|q| 20 * i + q));
        }
        let out = gpu_layout(GpuFormat::Q4_0, &bytes, 1, 64);
        assert_eq!(&out[16..20], &[20, 21, 22, 23]);
        assert_eq!(&out[32..36], &[0, 50, 1, 51]);
        assert_eq!(
            &gpu_layout(GpuFormat::F16, &[1, 2, 3, 4], 1, 2)[..],
            &[1, 2, 3, 4]
        );
    }
}
