//! A linear layer whose weight is dense (F16/F32) or GGML block-quantized, so one model can
//! mix both (attention 16-bit, MLP 4-bit).
//!
//! `Linear::forward` is the single place where a matmul is chosen: dense F16 weights go to
//! tandem's own kernel (`tandem_kernels::matmul_f16`), everything else to candle. Swapping a
//! kernel never touches the model code.

use crate::error::{tensor_err, Result};
use crate::weights::{RawTensor, WeightDType};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use half::f16;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// [out, in] f16, multiplied by tandem's kernel with f32 accumulation.
    F16(Tensor),
    /// [out, in] f32 (also where BF16 checkpoints land: no BF16 kernel yet).
    F32(Tensor),
    /// GGML block-quantized, multiplied by candle's quantized matmul.
    Quantized(Arc<QTensor>, QMatMul),
}

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl Linear {
    /// Builds a layer from stored bytes (already in Hugging Face [out, in] layout).
    pub fn from_raw(path: &Path, raw: &RawTensor<'_>, device: &Device) -> Result<Self> {
        let (out_dim, in_dim) = match raw.shape.as_slice() {
            [o, i] => (*o, *i),
            s => {
                return Err(tensor_err(
                    path,
                    &raw.name,
                    format!("expected a 2-D weight, found shape {s:?}"),
                ))
            }
        };
        let weight = match raw.dtype {
            WeightDType::F16 => LinearWeight::F16(dense_tensor(path, raw, device)?),
            WeightDType::F32 | WeightDType::BF16 => {
                LinearWeight::F32(dense_tensor(path, raw, device)?.to_dtype(DType::F32)?)
            }
            WeightDType::Quant(q) => {
                let qt = qtensor_from_ggml(q, raw.data, vec![out_dim, in_dim], device)
                    .map_err(|e| tensor_err(path, &raw.name, crate::error::candle_msg(&e)))?;
                let qt = Arc::new(qt);
                let mm = QMatMul::from_arc(qt.clone())?;
                LinearWeight::Quantized(qt, mm)
            }
        };
        Ok(Linear {
            weight,
            bias: None,
            in_dim,
            out_dim,
        })
    }

    pub fn with_bias(mut self, bias: Option<Tensor>) -> Self {
        self.bias = bias;
        self
    }

    /// `x` is [m, in] f32; returns [m, out] f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Every m (prefill, decode, verification) goes through the same kernels, so each
        // output is summed in the same order whatever the chunking: a blocked GEMM for large
        // m was tried and moved SmolLM2's logits by 1.8e-3 between prefill and decode.
        let y = match &self.weight {
            LinearWeight::F16(w) if w.device().is_cpu() => self.forward_f16_cpu(x, w)?,
            LinearWeight::F16(w) => x
                .to_dtype(DType::F16)?
                .matmul(&w.t()?)?
                .to_dtype(DType::F32)?,
            LinearWeight::F32(w) => x.matmul(&w.t()?)?,
            LinearWeight::Quantized(q, _)
                if q.device().is_cpu() && block_format(q.dtype()).is_some() =>
            {
                self.forward_quant_cpu(x, q)?
            }
            LinearWeight::Quantized(_, mm) => mm.forward(x)?,
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    fn forward_f16_cpu(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        let mut out = vec![0f32; m * self.out_dim];
        let (ws, wl) = w.storage_and_layout();
        let ws = match &*ws {
            candle_core::Storage::Cpu(s) => s.as_slice::<f16>()?,
            _ => return Err(candle_core::Error::Msg("weight is not on the CPU".into()).into()),
        };
        let ws = &ws[wl.start_offset()..][..self.out_dim * k];
        with_cpu_f32(x, |xs| {
            tandem_kernels::matmul_f16(xs, ws, m, k, self.out_dim, &mut out)
        })?;
        Ok(Tensor::from_vec(out, (m, self.out_dim), x.device())?)
    }

    fn forward_quant_cpu(&self, x: &Tensor, q: &QTensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        let fmt = block_format(q.dtype())
            .ok_or_else(|| candle_core::Error::Msg("unsupported block type".into()))?;
        let data = q.data()?; // borrowed on the CPU
        let mut out = vec![0f32; m * self.out_dim];
        with_cpu_f32(x, |xs| {
            tandem_kernels::matmul_quant(fmt, xs, &data, m, k, self.out_dim, &mut out)
        })?;
        Ok(Tensor::from_vec(out, (m, self.out_dim), x.device())?)
    }

    /// Storage type name for reports ("F16", "Q4_0", ...).
    pub fn dtype_name(&self) -> String {
        match &self.weight {
            LinearWeight::F16(_) => "F16".into(),
            LinearWeight::F32(_) => "F32".into(),
            LinearWeight::Quantized(q, _) => WeightDType::Quant(q.dtype()).name(),
        }
    }

    /// Bytes of weight data (what one forward pass streams from memory).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::F16(_) => self.in_dim * self.out_dim * 2,
            LinearWeight::F32(_) => self.in_dim * self.out_dim * 4,
            LinearWeight::Quantized(q, _) => q.storage_size_in_bytes(),
        }
    }

    /// The weight as a dense f32 [out, in] tensor (conversion, error measurement).
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            LinearWeight::F16(w) | LinearWeight::F32(w) => w.to_dtype(DType::F32)?,
            LinearWeight::Quantized(q, _) => q.dequantize(&q.device())?,
        })
    }
}

/// The block types tandem's own f32-activation kernel reads.
fn block_format(t: candle_core::quantized::GgmlDType) -> Option<tandem_kernels::BlockFormat> {
    use candle_core::quantized::GgmlDType as G;
    match t {
        G::Q4_0 => Some(tandem_kernels::BlockFormat::Q4_0),
        G::Q4_1 => Some(tandem_kernels::BlockFormat::Q4_1),
        G::Q8_0 => Some(tandem_kernels::BlockFormat::Q8_0),
        G::Q5_0 => Some(tandem_kernels::BlockFormat::Q5_0),
        G::Q5_1 => Some(tandem_kernels::BlockFormat::Q5_1),
        G::Q4K => Some(tandem_kernels::BlockFormat::Q4K),
        G::Q5K => Some(tandem_kernels::BlockFormat::Q5K),
        G::Q6K => Some(tandem_kernels::BlockFormat::Q6K),
        _ => None,
    }
}

/// Calls `f` with a CPU f32 tensor's elements, borrowed from candle's storage (copied only
/// when the tensor is not contiguous).
fn with_cpu_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => {
            let all = s.as_slice::<f32>()?;
            Ok(f(
                &all[layout.start_offset()..][..layout.shape().elem_count()]
            ))
        }
        _ => Err(candle_core::Error::Msg("activations are not on the CPU".into()).into()),
    }
}

/// A dense tensor (F32/F16/BF16) from stored bytes, keeping its dtype.
pub fn dense_tensor(path: &Path, raw: &RawTensor<'_>, device: &Device) -> Result<Tensor> {
    let dtype = match raw.dtype {
        WeightDType::F32 => DType::F32,
        WeightDType::F16 => DType::F16,
        WeightDType::BF16 => DType::BF16,
        WeightDType::Quant(q) => {
            let qt = qtensor_from_ggml(q, raw.data, raw.shape.clone(), device)
                .map_err(|e| tensor_err(path, &raw.name, crate::error::candle_msg(&e)))?;
            return Ok(qt.dequantize(device)?);
        }
    };
    check_finite(path, raw)?;
    Tensor::from_raw_buffer(raw.data, dtype, &raw.shape, device)
        .map_err(|e| tensor_err(path, &raw.name, crate::error::candle_msg(&e)))
}

/// Refuses NaN/Inf in dense weights: they would silently poison every output.
pub fn check_finite(path: &Path, raw: &RawTensor<'_>) -> Result<()> {
    let bad = match raw.dtype {
        WeightDType::F32 => raw
            .data
            .chunks_exact(4)
            .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
        WeightDType::F16 => raw
            .data
            .chunks_exact(2)
            .position(|b| !f16::from_le_bytes([b[0], b[1]]).is_finite()),
        WeightDType::BF16 => raw
            .data
            .chunks_exact(2)
            .position(|b| !half::bf16::from_le_bytes([b[0], b[1]]).is_finite()),
        WeightDType::Quant(_) => None,
    };
    match bad {
        Some(i) => Err(tensor_err(
            path,
            &raw.name,
            format!("non-finite value (NaN or Inf) at element {i}"),
        )),
        None => Ok(()),
    }
}
