//! The CUDA path (feature `cuda`): weight matrices uploaded once, and matmul kernels
//! (Q8_0, Q4_0, F16; m = 1…8 activation rows per launch, the decode and verification shapes)
//! compiled from `cuda/kernels.cu` with NVRTC at run time.
//!
//! cudarc loads the CUDA driver and NVRTC with `dlopen` when first used, so this builds and
//! its tests run on machines without CUDA: [`gpu`] then answers `Err` with the reason, and
//! callers (tests, the CLI's `--gpu`) say they skip. Activations stay f32 on the GPU, so a
//! layer computes what the CPU's f32 path computes, up to summation order.

use crate::BlockFormat;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use std::sync::{Arc, OnceLock};

/// The kernels' CUDA C source.
pub const SOURCE: &str = include_str!("cuda/kernels.cu");
/// Most activation rows one launch handles (`MAX_ROWS` in the source).
pub const MAX_ROWS: usize = 8;
/// Warps (output rows) per thread block.
const WARPS: u32 = 8;

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
    q8_0: CudaFunction,
    q4_0: CudaFunction,
    f16: CudaFunction,
    probe: CudaFunction,
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
        let stream = ctx.default_stream();
        Ok(Gpu {
            name,
            stream,
            q8_0: module.load_function("matmul_q8_0")?,
            q4_0: module.load_function("matmul_q4_0")?,
            f16: module.load_function("matmul_f16")?,
            probe: module.load_function("read_probe")?,
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
        let data = self.stream.clone_htod(bytes)?;
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
        for r0 in (0..m).step_by(MAX_ROWS) {
            let rows = (m - r0).min(MAX_ROWS);
            let xs = xd.slice(r0 * k..(r0 + rows) * k);
            let mut os = od.slice_mut(r0 * n..(r0 + rows) * n);
            self.launch(w, &xs, &mut os, rows)?;
        }
        self.stream.memcpy_dtoh(&od, out)?;
        self.stream.synchronize()?;
        Ok(())
    }

    fn launch(
        &self,
        w: &GpuMatrix,
        x: &cudarc::driver::CudaView<'_, f32>,
        out: &mut cudarc::driver::CudaViewMut<'_, f32>,
        rows: usize,
    ) -> Result<(), GpuError> {
        let f = match w.format {
            GpuFormat::Q8_0 => &self.q8_0,
            GpuFormat::Q4_0 => &self.q4_0,
            GpuFormat::F16 => &self.f16,
        };
        let cfg = LaunchConfig {
            grid_dim: ((w.n as u32).div_ceil(WARPS), 1, 1),
            block_dim: (32, WARPS, 1),
            shared_mem_bytes: 0,
        };
        let (m, k, n) = (rows as i32, w.k as i32, w.n as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(&w.data).arg(x).arg(out).arg(&m).arg(&k).arg(&n);
        // SAFETY: the argument list matches the kernel's signature; sizes were checked.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CUDA source compiles (needs libnvrtc only; says so and passes when it is absent).
    #[test]
    fn kernels_compile_with_nvrtc() {
        match compile_ptx() {
            Ok(ptx) => assert!(ptx.to_src().contains("matmul_q4_0")),
            Err(GpuError::Unavailable(why)) => eprintln!("skipped: {why}"),
            Err(e) => panic!("{e}"),
        }
    }
}
