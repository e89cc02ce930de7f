//! A linear layer's copy on the GPU (feature `cuda`; `no_gpu.rs` stands in without it).

use super::LinearWeight;
use crate::error::{Error, Result};
use half::f16;
use tandem_kernels::cuda::GpuMatrix;
use tandem_kernels::cuda::{gpu, CudaSlice, CudaView, CudaViewMut, Gpu, GpuError, GpuFormat};

fn gpu_err(e: GpuError) -> Error {
    Error::Invalid(format!("GPU: {e}"))
}

/// GPU 0's name, or why no GPU can be used.
pub fn device_name() -> Result<String> {
    Ok(gpu().map_err(gpu_err)?.name.clone())
}

/// The weight (and bias) of one linear layer on the GPU.
pub(crate) struct GpuWeight {
    matrix: GpuMatrix,
    bias: Option<CudaSlice<f32>>,
    bias_host: Option<Vec<f32>>,
}

impl std::fmt::Debug for GpuWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuWeight({} bytes)", self.matrix.bytes())
    }
}

impl GpuWeight {
    /// Copies `weight` [n, k] to the GPU when there is a kernel for its type (Q8_0, Q4_0,
    /// F16); `None` when it stays on the CPU.
    pub(crate) fn upload(
        weight: &LinearWeight,
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Result<Option<Self>> {
        let g = gpu().map_err(gpu_err)?;
        let m = match weight {
            LinearWeight::F16(w) => {
                let v: Vec<f16> = w.flatten_all()?.to_vec1()?;
                let bytes: Vec<u8> = v.iter().flat_map(|h| h.to_le_bytes()).collect();
                g.upload(GpuFormat::F16, &bytes, n, k)
            }
            LinearWeight::Quantized(q, _) => {
                match super::block_format(q.dtype()).and_then(GpuFormat::from_block) {
                    Some(f) => g.upload(f, &q.data()?, n, k),
                    None => return Ok(None),
                }
            }
            LinearWeight::Tiled(t) => match GpuFormat::from_block(t.format) {
                Some(f) => g.upload(f, &t.unpack(), n, k),
                None => return Ok(None),
            },
            LinearWeight::F32(_) | LinearWeight::Released => return Ok(None),
        }
        .map_err(gpu_err)?;
        let bias_dev = bias.map(|b| g.to_device(b)).transpose().map_err(gpu_err)?;
        Ok(Some(GpuWeight {
            matrix: m,
            bias: bias_dev,
            bias_host: bias.map(<[f32]>::to_vec),
        }))
    }

    /// Bytes of the weight on the GPU.
    pub(crate) fn bytes(&self) -> usize {
        self.matrix.bytes()
    }

    /// `out` [m, n] = `x` [m, k] · Wᵀ (+ bias), host slices in and out.
    pub(crate) fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        let g = gpu().map_err(gpu_err)?;
        g.matmul(&self.matrix, x, m, out).map_err(gpu_err)?;
        if let Some(b) = &self.bias_host {
            for row in out.chunks_exact_mut(b.len()) {
                tandem_kernels::ops::add_assign(row, b);
            }
        }
        Ok(())
    }

    /// `out` [m, n] = `x` [m, k] · Wᵀ (+ bias), both on the GPU (the device-resident pass).
    pub(crate) fn forward_on_device(
        &self,
        g: &Gpu,
        x: &CudaView<'_, f32>,
        m: usize,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        g.matmul_on_device(&self.matrix, x, m, out)
            .map_err(gpu_err)?;
        if let Some(b) = &self.bias {
            g.add_assign(out, &b.slice(..), m * self.matrix.n, self.matrix.n)
                .map_err(gpu_err)?;
        }
        Ok(())
    }
}
