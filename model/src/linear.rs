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

/// The GPU copy of a layer: real with feature `cuda`, an uninhabited stand-in without it.
#[cfg_attr(feature = "cuda", path = "linear/gpu.rs")]
#[cfg_attr(not(feature = "cuda"), path = "linear/no_gpu.rs")]
mod gpu;
pub use gpu::device_name as gpu_name;
pub(crate) use gpu::GpuWeight;

#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// [out, in] f16, multiplied by tandem's kernel with f32 accumulation.
    F16(Tensor),
    /// [out, in] f32 (also where BF16 checkpoints land: no BF16 kernel yet).
    F32(Tensor),
    /// GGML block-quantized, multiplied by candle's quantized matmul.
    Quantized(Arc<QTensor>, QMatMul),
    /// Q4_0/Q5_0/Q8_0 repacked into 8-row tiles for the 8-bit-activation kernel (about 2x GGML's
    /// row layout on AVX2). The only copy: the GGML rows are rebuilt where something needs
    /// them (f32 activations, the GPU, export), so memory stays one copy of the weights.
    Tiled(Arc<tandem_kernels::Int8Tiles>),
    /// No weights: dropped by a layer-by-layer run (calibrated quantization holds one decoder
    /// layer at a time) or not loaded yet. Using it is an error, never a panic.
    Released,
}

fn released(n: usize, k: usize) -> crate::Error {
    crate::Error::Invalid(format!(
        "linear layer [{n}, {k}]: its weights were released (internal error)"
    ))
}

/// How activations meet block-quantized weights in a matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationPrecision {
    /// Activations rounded to 8 bits per 32-block for Q8_0/Q4_0 weights (integer dot products,
    /// as llama.cpp does): the fast default. Other formats keep f32.
    #[default]
    Int8,
    /// Activations stay f32 for every format: a quantized file then computes exactly what its
    /// dequantized (16-bit) copy computes, at ~half the speed on Q4_0.
    F32,
}

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    /// f32 copy of `bias`, for the slice path.
    bias_f32: Option<Vec<f32>>,
    pub in_dim: usize,
    pub out_dim: usize,
    pub activations: ActivationPrecision,
    /// A copy of the weight (and bias) on the GPU, used instead of the CPU kernels when
    /// present.
    gpu: Option<Arc<GpuWeight>>,
}

impl Linear {
    /// Builds a layer from stored bytes (already in Hugging Face [out, in] layout), on the CPU,
    /// meeting activations as `activations` says.
    pub fn from_raw(
        path: &Path,
        raw: &RawTensor<'_>,
        activations: ActivationPrecision,
    ) -> Result<Self> {
        let device = &Device::Cpu;
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
                let tiles = match (block_format(q), activations) {
                    (Some(f), ActivationPrecision::Int8) => {
                        tandem_kernels::Int8Tiles::pack(f, raw.data, out_dim, in_dim)
                    }
                    _ => None,
                };
                match tiles {
                    Some(t) => LinearWeight::Tiled(Arc::new(t)),
                    None => {
                        let (q, mm) = quantized(q, raw.data, out_dim, in_dim, device)
                            .map_err(|e| tensor_err(path, &raw.name, e.to_string()))?;
                        LinearWeight::Quantized(q, mm)
                    }
                }
            }
        };
        Ok(Linear::bare(weight, in_dim, out_dim, activations))
    }

    /// A layer of shape [out_dim, in_dim] whose weights are not in memory
    /// ([`LinearWeight::Released`]).
    pub fn released(out_dim: usize, in_dim: usize) -> Linear {
        Linear::bare(
            LinearWeight::Released,
            in_dim,
            out_dim,
            ActivationPrecision::default(),
        )
    }

    /// A 16-bit layer from an [out, in] F16 CPU tensor (tests build heads this way).
    #[cfg(test)]
    pub(crate) fn from_f16_tensor(w: Tensor) -> Linear {
        let (out_dim, in_dim) = w.dims2().expect("a 2-D weight");
        Linear::bare(
            LinearWeight::F16(w),
            in_dim,
            out_dim,
            ActivationPrecision::default(),
        )
    }

    /// A layer with no bias (add one with [`Linear::with_bias`]) and no GPU copy.
    fn bare(
        weight: LinearWeight,
        in_dim: usize,
        out_dim: usize,
        activations: ActivationPrecision,
    ) -> Linear {
        Linear {
            weight,
            bias: None,
            bias_f32: None,
            in_dim,
            out_dim,
            activations,
            gpu: None,
        }
    }

    /// Copies the weight to the GPU when there is a kernel for its type (Q8_0, Q4_0, F16);
    /// returns the bytes copied (0 when it stays on the CPU).
    pub fn upload_to_gpu(&mut self) -> Result<usize> {
        let g = GpuWeight::upload(
            &self.weight,
            self.out_dim,
            self.in_dim,
            self.bias_f32.as_deref(),
        )?;
        let bytes = g.as_ref().map_or(0, GpuWeight::bytes);
        self.gpu = g.map(Arc::new);
        Ok(bytes)
    }

    /// Whether the weight is on the GPU.
    pub(crate) fn on_gpu(&self) -> bool {
        self.gpu.is_some()
    }

    /// The GPU copy, if any (the device-resident forward pass multiplies with it).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn gpu_weight(&self) -> Option<&GpuWeight> {
        self.gpu.as_deref()
    }

    pub fn with_bias(mut self, bias: Option<Tensor>) -> Self {
        self.bias_f32 = bias
            .as_ref()
            .and_then(|b| b.flatten_all().ok()?.to_vec1::<f32>().ok());
        self.bias = bias;
        self
    }

    /// `out` [m, out_dim] = `x` [m, in_dim] · Wᵀ (+ bias), on plain CPU slices: tandem's
    /// kernels write straight into `out`, nothing is allocated. Weights without a tandem
    /// kernel (F32, Q2_K, Q3_K, or not on the CPU) go through candle.
    pub fn forward_into(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        let (k, n) = (self.in_dim, self.out_dim);
        if x.len() != m * k || out.len() != m * n {
            return Err(crate::error::Error::Invalid(format!(
                "linear layer [{n}, {k}] given {} inputs and {} outputs for {m} rows",
                x.len(),
                out.len()
            )));
        }
        if let Some(g) = &self.gpu {
            return g.matmul(x, m, out);
        }
        let f16 = self.with_cpu_f16(|w| {
            tandem_kernels::matmul_f16(x, w, m, k, n, out);
            Ok(())
        })?;
        if f16.is_some() {
            return self.add_bias(out);
        }
        match &self.weight {
            LinearWeight::Quantized(q, _)
                if q.device().is_cpu() && block_format(q.dtype()).is_some() =>
            {
                let fmt = block_format(q.dtype()).expect("checked");
                let data = q.data()?; // borrowed on the CPU
                if self.activations == ActivationPrecision::Int8
                    && tandem_kernels::int8_supported(fmt)
                {
                    tandem_kernels::matmul_int8(fmt, x, &data, m, k, n, out)
                } else {
                    tandem_kernels::matmul_quant(fmt, x, &data, m, k, n, out)
                }
            }
            LinearWeight::Tiled(t) if self.activations == ActivationPrecision::Int8 => {
                t.matmul(x, m, out)
            }
            // `activations` set to F32 by hand (`set_activations` would have unpacked the tiles).
            LinearWeight::Tiled(t) => {
                tandem_kernels::matmul_quant(t.format, x, &t.unpack(), m, k, n, out)
            }
            LinearWeight::Released => return Err(released(n, k)),
            _ => {
                let t = Tensor::from_slice(x, (m, k), &Device::Cpu)?;
                let y = self.forward_candle(&t)?.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&y);
                return Ok(());
            }
        }
        self.add_bias(out)
    }

    /// Adds the bias (if any) to every row of `out`.
    fn add_bias(&self, out: &mut [f32]) -> Result<()> {
        if let Some(b) = &self.bias_f32 {
            for row in out.chunks_exact_mut(self.out_dim) {
                tandem_kernels::ops::add_assign(row, b);
            }
        }
        Ok(())
    }

    /// Runs `f` on the weight's f16 values, row after row, when it is a contiguous F16 weight
    /// in CPU memory (`None` otherwise: another format, or only a GPU copy is used); the slice
    /// borrows candle's storage for the call.
    pub(crate) fn with_cpu_f16<R>(&self, f: impl FnOnce(&[f16]) -> Result<R>) -> Result<Option<R>> {
        self.with_cpu_f16_from(self.out_dim * self.in_dim, f)
    }

    /// [`Linear::with_cpu_f16`] on `len` values from the weight's first: past its own rows
    /// when the storage goes on (the views [`Linear::fuse`] makes share one).
    fn with_cpu_f16_from<R>(
        &self,
        len: usize,
        f: impl FnOnce(&[f16]) -> Result<R>,
    ) -> Result<Option<R>> {
        let LinearWeight::F16(w) = &self.weight else {
            return Ok(None);
        };
        if self.gpu.is_some() || !w.device().is_cpu() || !w.is_contiguous() {
            return Ok(None);
        }
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        let start = layout.start_offset();
        match cpu.as_slice::<f16>()?.get(start..start + len) {
            Some(rows) => f(rows).map(Some),
            None => Err(crate::Error::Invalid(format!(
                "linear layer [{}, {}]: its storage is shorter than its shape",
                self.out_dim, self.in_dim
            ))),
        }
    }

    /// Lays out `parts`, matrices that one input feeds (q/k/v, gate/up), one after another in
    /// one allocation, each layer a view of its rows (the same memory as before, and every
    /// result the same: each output is its own dot product), so [`Linear::forward_joined`]
    /// multiplies them as one matrix. F16 weights and 8-row tiles of one format on the int8
    /// path; anything else (K-quants, a GPU copy, mixed types) stays as it is.
    pub fn fuse(parts: &mut [&mut Linear]) -> Result<()> {
        let Some(first) = parts.first() else {
            return Ok(());
        };
        let (k, act) = (first.in_dim, first.activations);
        if parts.len() < 2
            || parts
                .iter()
                .any(|p| p.gpu.is_some() || p.in_dim != k || p.activations != act)
        {
            return Ok(());
        }
        let dense: Option<Vec<&Tensor>> = parts
            .iter()
            .map(|p| match &p.weight {
                LinearWeight::F16(w) if w.device().is_cpu() => Some(w),
                _ => None,
            })
            .collect();
        if let Some(ws) = dense {
            let all = Tensor::cat(&ws, 0)?;
            let mut row = 0;
            for p in parts.iter_mut() {
                p.weight = LinearWeight::F16(all.narrow(0, row, p.out_dim)?);
                row += p.out_dim;
            }
            return Ok(());
        }
        let tiled: Option<Vec<&tandem_kernels::Int8Tiles>> =
            parts.iter().map(|p| p.int8_tiles()).collect();
        if let Some(views) = tiled.and_then(|ts| tandem_kernels::Int8Tiles::fuse(&ts)) {
            for (p, t) in parts.iter_mut().zip(views) {
                p.weight = LinearWeight::Tiled(Arc::new(t));
            }
        }
        Ok(())
    }

    /// [`Linear::forward_into`], where the first `bulk` rows return no logits (a prompt's,
    /// see `Logits`): for F16 weights on the CPU those rows may take
    /// [`tandem_kernels::matmul_f16_bulk`] (AMX; to rounding of `forward_into`, not bit for
    /// bit). Whether they do depends on `bulk` and the shape alone, never on the other rows,
    /// and the other rows' results are `forward_into`'s bit for bit.
    pub fn forward_rows_into(
        &self,
        x: &[f32],
        m: usize,
        bulk: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let (k, n) = (self.in_dim, self.out_dim);
        let bulk = bulk.min(m);
        let sized = x.len() == m * k && out.len() == m * n;
        if sized && self.gpu.is_none() && tandem_kernels::f16_bulk_applies(bulk, k, n) {
            let (x_bulk, x_rest) = x.split_at(bulk * k);
            let (out_bulk, out_rest) = out.split_at_mut(bulk * n);
            let ran = self.with_cpu_f16(|w| {
                tandem_kernels::matmul_f16_bulk(x_bulk, w, bulk, k, n, out_bulk);
                Ok(())
            })?;
            if ran.is_some() {
                self.add_bias(out_bulk)?;
                return if bulk < m {
                    self.forward_into(x_rest, m - bulk, out_rest)
                } else {
                    Ok(())
                };
            }
        }
        self.forward_into(x, m, out)
    }

    /// [`Linear::forward_joined`] with [`Linear::forward_rows_into`]'s `bulk` rows: where
    /// those take the bulk kernel and the parts lie joined ([`Linear::fuse`]), the bulk rows
    /// run as one matmul over all their weights, in runs of up to 1,024 rows (the
    /// activations are split into bf16 parts once for q/k/v or gate/up, not once per part;
    /// each output is its own sum, so the results are the parts' own passes' bit for bit),
    /// and the rows after them as [`Linear::forward_joined`]. Parts that do not lie joined
    /// run their own `forward_rows_into`.
    pub fn forward_joined_rows(
        parts: &[&Linear],
        x: &[f32],
        m: usize,
        bulk: usize,
        outs: &mut [&mut [f32]],
    ) -> Result<()> {
        let k = parts.first().map_or(0, |p| p.in_dim);
        let bulk = bulk.min(m);
        let bulky = parts.len() == outs.len()
            && x.len() == m * k
            && parts.iter().zip(outs.iter()).all(|(p, o)| {
                p.in_dim == k
                    && o.len() == m * p.out_dim
                    && tandem_kernels::f16_bulk_applies(bulk, k, p.out_dim)
            });
        if !bulky {
            return Linear::forward_joined(parts, x, m, outs);
        }
        let widths: Vec<usize> = parts.iter().map(|p| p.out_dim).collect();
        let joined = Linear::with_joined_f16(parts, |all| {
            let runs = bulk.div_ceil(BULK_JOINED_ROWS).max(1);
            let per_run = bulk.div_ceil(runs).max(1);
            for r0 in (0..bulk).step_by(per_run) {
                let rows = (bulk - r0).min(per_run);
                let mut run: Vec<&mut [f32]> = parts
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|(p, o)| &mut o[r0 * p.out_dim..(r0 + rows) * p.out_dim])
                    .collect();
                let xs = &x[r0 * k..(r0 + rows) * k];
                tandem_kernels::matmul_f16_bulk_parts(xs, all, rows, k, &widths, &mut run);
            }
        })?
        .is_some();
        for (p, o) in parts.iter().zip(outs.iter_mut()) {
            if joined {
                p.add_bias(&mut o[..bulk * p.out_dim])?;
            } else {
                p.forward_rows_into(x, m, bulk, o)?;
            }
        }
        if joined && bulk < m {
            let mut rest: Vec<&mut [f32]> = parts
                .iter()
                .zip(outs.iter_mut())
                .map(|(p, o)| &mut o[bulk * p.out_dim..])
                .collect();
            return Linear::forward_joined(parts, &x[bulk * k..], m - bulk, &mut rest);
        }
        Ok(())
    }

    /// `outs[i]` [m, parts[i].out_dim] = `x` [m, in_dim] · `parts[i]`ᵀ (+ bias): one pass
    /// over all their weights when [`Linear::fuse`] laid them out together (one pool call
    /// streaming one run of memory per thread, and for tiles one rounding of `x`), else each
    /// in turn (and always for more than [`JOINED_ROWS_MOST`] rows). The results are
    /// [`Linear::forward_into`]'s, bit for bit.
    pub fn forward_joined(
        parts: &[&Linear],
        x: &[f32],
        m: usize,
        outs: &mut [&mut [f32]],
    ) -> Result<()> {
        let n: usize = parts.iter().map(|p| p.out_dim).sum();
        let shapes_agree = parts.len() == outs.len()
            && parts.iter().zip(outs.iter()).all(|(p, o)| {
                p.in_dim == parts[0].in_dim && x.len() == m * p.in_dim && o.len() == m * p.out_dim
            });
        if !shapes_agree {
            return Err(crate::Error::Invalid(format!(
                "{} joined linear layers given {} outputs of the wrong sizes for {m} rows \
                 (internal error)",
                parts.len(),
                outs.len()
            )));
        }
        JOINED_OUT.with_borrow_mut(|all| {
            all.clear();
            if m <= JOINED_ROWS_MOST {
                all.resize(m * n, 0.0);
            }
            if m > JOINED_ROWS_MOST || !Linear::joined_pass(parts, x, m, n, all)? {
                for (p, o) in parts.iter().zip(outs.iter_mut()) {
                    p.forward_into(x, m, o)?;
                }
                return Ok(());
            }
            let mut col = 0;
            for (p, o) in parts.iter().zip(outs.iter_mut()) {
                for (dst, src) in o.chunks_exact_mut(p.out_dim).zip(all.chunks_exact(n)) {
                    dst.copy_from_slice(&src[col..col + p.out_dim]);
                }
                col += p.out_dim;
                p.add_bias(o)?;
            }
            Ok(())
        })
    }

    /// Runs `f` on the F16 weights of `parts` as one matrix, their rows one part after
    /// another, when they lie so in CPU memory ([`Linear::fuse`]); `None` otherwise (more
    /// than one part required).
    fn with_joined_f16<R>(parts: &[&Linear], f: impl FnOnce(&[f16]) -> R) -> Result<Option<R>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let k = first.in_dim;
        if parts.len() < 2 || parts.iter().any(|p| p.gpu.is_some() || p.in_dim != k) {
            return Ok(None);
        }
        // Joined when each part's rows start where the one before it ends (each storage
        // borrowed in turn, none inside another's borrow).
        let address = |p: &Linear| p.with_cpu_f16(|w| Ok(w.as_ptr() as usize));
        let Some(base) = address(first)? else {
            return Ok(None);
        };
        let mut at = base;
        for p in parts {
            if address(p)? != Some(at) {
                return Ok(None);
            }
            at += p.out_dim * k * std::mem::size_of::<f16>();
        }
        let n: usize = parts.iter().map(|p| p.out_dim).sum();
        // The joined rows run on from the first part's rows in its own storage, over the
        // others'. A storage that ends before `n` rows is not one the parts share.
        Ok(first.with_cpu_f16_from(n * k, |w| Ok(f(w))).ok().flatten())
    }

    /// The one pass of [`Linear::forward_joined`] into `out` [m, n], when `parts` lie one
    /// after another in memory (`false`, nothing written, otherwise).
    fn joined_pass(
        parts: &[&Linear],
        x: &[f32],
        m: usize,
        n: usize,
        out: &mut [f32],
    ) -> Result<bool> {
        let Some(first) = parts.first() else {
            return Ok(false);
        };
        let k = first.in_dim;
        if parts.len() < 2 || parts.iter().any(|p| p.gpu.is_some()) {
            return Ok(false);
        }
        if let LinearWeight::F16(_) = &first.weight {
            let ran = Linear::with_joined_f16(parts, |all| {
                tandem_kernels::matmul_f16(x, all, m, k, n, out)
            })?;
            return Ok(ran.is_some());
        }
        if parts.iter().any(|p| p.int8_tiles().is_none()) {
            return Ok(false);
        }
        match tandem_kernels::Int8Tiles::joined(parts.iter().filter_map(|p| p.int8_tiles())) {
            Some(all) => {
                all.matmul(x, m, out);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The 8-row tiles the int8 kernel multiplies, when this layer is one.
    fn int8_tiles(&self) -> Option<&tandem_kernels::Int8Tiles> {
        match &self.weight {
            LinearWeight::Tiled(t) if self.activations == ActivationPrecision::Int8 => Some(t),
            _ => None,
        }
    }

    /// `x` is [m, in] f32; returns [m, out] f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && self.has_cpu_kernel() {
            let (m, _) = x.dims2()?;
            let mut out = vec![0f32; m * self.out_dim];
            with_cpu_f32(x, |xs| self.forward_into(xs, m, &mut out))??;
            return Ok(Tensor::from_vec(out, (m, self.out_dim), x.device())?);
        }
        self.forward_candle(x)
    }

    /// Whether `forward_into` runs one of tandem's kernels (not candle) for this weight.
    fn has_cpu_kernel(&self) -> bool {
        if self.gpu.is_some() {
            return true;
        }
        match &self.weight {
            LinearWeight::F16(w) => w.device().is_cpu(),
            LinearWeight::Quantized(q, _) => {
                q.device().is_cpu() && block_format(q.dtype()).is_some()
            }
            LinearWeight::Tiled(_) => true,
            LinearWeight::F32(_) | LinearWeight::Released => false,
        }
    }

    fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        // Every m (prefill, decode, verification) goes through the same kernels, so each
        // output is summed in the same order whatever the chunking: a blocked GEMM for large
        // m was tried and moved SmolLM2's logits by 1.8e-3 between prefill and decode.
        let y = match &self.weight {
            LinearWeight::F16(w) => x
                .to_dtype(DType::F16)?
                .matmul(&w.t()?)?
                .to_dtype(DType::F32)?,
            LinearWeight::F32(w) => x.matmul(&w.t()?)?,
            LinearWeight::Quantized(_, mm) => mm.forward(x)?,
            LinearWeight::Tiled(t) => untile(t, x.device())?.1.forward(x)?,
            LinearWeight::Released => return Err(released(self.out_dim, self.in_dim)),
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// Storage type name for reports ("F16", "Q4_0", ...).
    pub fn dtype_name(&self) -> String {
        match &self.weight {
            LinearWeight::F16(_) => "F16".into(),
            LinearWeight::F32(_) => "F32".into(),
            LinearWeight::Quantized(q, _) => WeightDType::Quant(q.dtype()).name(),
            LinearWeight::Tiled(t) => WeightDType::Quant(tile_dtype(t)).name(),
            LinearWeight::Released => "released".into(),
        }
    }

    /// Where the weight data the CPU kernels stream sits in memory, (address, length), for
    /// [`tandem_kernels::huge_pages`]; `None` where a GPU copy is what runs.
    pub(crate) fn memory(&self) -> Option<(usize, usize)> {
        match &self.weight {
            LinearWeight::F16(_) => self
                .with_cpu_f16(|w| Ok((w.as_ptr() as usize, std::mem::size_of_val(w))))
                .ok()
                .flatten(),
            // Weights are contiguous, so this borrows candle's storage (no copy).
            LinearWeight::F32(w) if self.gpu.is_none() => {
                with_cpu_f32(w, |v| (v.as_ptr() as usize, std::mem::size_of_val(v))).ok()
            }
            LinearWeight::Tiled(t) => Some(t.memory()),
            LinearWeight::Quantized(q, _) if self.gpu.is_none() => match q.data() {
                // CPU storage lends its bytes; a copy (GPU storage) is not where they live.
                Ok(std::borrow::Cow::Borrowed(b)) => Some((b.as_ptr() as usize, b.len())),
                _ => None,
            },
            _ => None,
        }
    }

    /// Bytes of weight data (what one forward pass streams from memory).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::F16(_) => self.in_dim * self.out_dim * 2,
            LinearWeight::F32(_) => self.in_dim * self.out_dim * 4,
            LinearWeight::Quantized(q, _) => q.storage_size_in_bytes(),
            LinearWeight::Tiled(t) => t.bytes(),
            LinearWeight::Released => 0,
        }
    }

    /// The weight as a dense f32 [out, in] tensor (conversion, error measurement).
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            LinearWeight::F16(w) | LinearWeight::F32(w) => w.to_dtype(DType::F32)?,
            LinearWeight::Quantized(q, _) => q.dequantize(&q.device())?,
            LinearWeight::Tiled(t) => untile(t, &Device::Cpu)?.0.dequantize(&Device::Cpu)?,
            LinearWeight::Released => return Err(released(self.out_dim, self.in_dim)),
        })
    }

    /// A layer of rows `ids` of this one, in that order, in the same format (a CPU copy: used
    /// to cut a draft model's output head down to a shortlist of tokens). Tiles are unpacked
    /// only for the rows taken, and the new layer is tiled again where its shape allows.
    pub fn select_rows(&self, ids: &[u32]) -> Result<Linear> {
        let (n, k) = (self.out_dim, self.in_dim);
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= n) {
            return Err(crate::Error::Invalid(format!(
                "row {bad} of a layer with {n} rows"
            )));
        }
        let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        let index = Tensor::new(ids, &Device::Cpu)?;
        let weight = match &self.weight {
            LinearWeight::F16(w) => {
                LinearWeight::F16(w.to_device(&Device::Cpu)?.index_select(&index, 0)?)
            }
            LinearWeight::F32(w) => {
                LinearWeight::F32(w.to_device(&Device::Cpu)?.index_select(&index, 0)?)
            }
            LinearWeight::Quantized(q, _) => {
                let data = q.data()?;
                let rb = data.len() / n.max(1);
                let picked: Vec<u8> = rows
                    .iter()
                    .flat_map(|&r| data[r * rb..(r + 1) * rb].iter().copied())
                    .collect();
                let (q, mm) = quantized(q.dtype(), &picked, rows.len(), k, &Device::Cpu)?;
                LinearWeight::Quantized(q, mm)
            }
            LinearWeight::Tiled(t) => {
                let (q, mm) = quantized(
                    tile_dtype(t),
                    &t.unpack_rows(&rows),
                    rows.len(),
                    k,
                    &Device::Cpu,
                )?;
                LinearWeight::Quantized(q, mm)
            }
            LinearWeight::Released => return Err(released(n, k)),
        };
        let bias = match &self.bias {
            Some(b) => Some(b.to_device(&Device::Cpu)?.index_select(&index, 0)?),
            None => None,
        };
        let mut layer = Linear::bare(weight, k, rows.len(), self.activations).with_bias(bias);
        layer.set_activations(self.activations)?;
        Ok(layer)
    }

    /// Sets how activations meet Q8_0/Q4_0 weights: f32 activations need the GGML rows (the
    /// tiles are unpacked), 8-bit ones take the tiles where the CPU and shape allow.
    pub fn set_activations(&mut self, p: ActivationPrecision) -> Result<()> {
        self.activations = p;
        match (&self.weight, p) {
            (LinearWeight::Tiled(t), ActivationPrecision::F32) => {
                let (q, mm) = untile(t, &Device::Cpu)?;
                self.weight = LinearWeight::Quantized(q, mm);
            }
            (LinearWeight::Quantized(q, _), ActivationPrecision::Int8) if q.device().is_cpu() => {
                let packed = block_format(q.dtype()).and_then(|f| {
                    let data = q.data().ok()?;
                    tandem_kernels::Int8Tiles::pack(f, &data, self.out_dim, self.in_dim)
                });
                if let Some(t) = packed {
                    self.weight = LinearWeight::Tiled(Arc::new(t));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A GGML block-quantized weight from its bytes, and candle's matmul over it.
fn quantized(
    q: candle_core::quantized::GgmlDType,
    data: &[u8],
    out_dim: usize,
    in_dim: usize,
    device: &Device,
) -> Result<(Arc<QTensor>, QMatMul)> {
    let qt = qtensor_from_ggml(q, data, vec![out_dim, in_dim], device)
        .map_err(|e| crate::Error::Invalid(crate::error::candle_msg(&e)))?;
    let qt = Arc::new(qt);
    let mm = QMatMul::from_arc(qt.clone())?;
    Ok((qt, mm))
}

fn tile_dtype(t: &tandem_kernels::Int8Tiles) -> candle_core::quantized::GgmlDType {
    crate::gguf_reader::candle_dtype(t.format.ggml())
}

/// The GGML-layout weight of a tiled one (tiles are made from Q4_0 and Q8_0 only).
fn untile(t: &tandem_kernels::Int8Tiles, device: &Device) -> Result<(Arc<QTensor>, QMatMul)> {
    quantized(tile_dtype(t), &t.unpack(), t.n, t.k, device)
}

/// Most activation rows [`Linear::forward_joined`] runs as one matrix: decode and verification
/// stream their weights, where a pass that restarts per matrix loses time; a prefill's
/// matmuls are compute-bound, and joined they would need an [m × n] staging buffer (6 MB for
/// SmolLM2's gate/up at 512 rows) for nothing.
pub const JOINED_ROWS_MOST: usize = 16;

/// Bulk rows per joined matmul of [`Linear::forward_joined_rows`]: its output buffer stays
/// within 4 bytes × 1024 × the parts' widths (12 MB for SmolLM2's gate/up), and the AMX
/// kernel splits its weights once per 1024 rows anyway. The runs are of equal length, so each
/// has the kernel's 64 rows or more.
const BULK_JOINED_ROWS: usize = 1024;

thread_local! {
    /// [`Linear::forward_joined`]'s output rows before they are split among its parts.
    static JOINED_OUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The block types tandem's own f32-activation kernel reads.
fn block_format(t: candle_core::quantized::GgmlDType) -> Option<tandem_kernels::BlockFormat> {
    tandem_kernels::BlockFormat::of(crate::gguf_reader::ggml_type(t))
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
    // Inf and NaN are the values whose exponent bits are all ones.
    let bad = match raw.dtype {
        WeightDType::F32 => first_all_ones::<4>(raw.data, 0x7f80_0000),
        WeightDType::F16 => first_all_ones::<2>(raw.data, 0x7c00),
        WeightDType::BF16 => first_all_ones::<2>(raw.data, 0x7f80),
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

/// The index of the first little-endian `W`-byte element of `data` with every bit of `mask`
/// set. Why not `position` over the decoded floats: it stops at every element and stays
/// scalar, which made this check ~5% of loading and prefilling SmolLM2 F16 (`perf`); a
/// branch-free OR over blocks of 4096 elements vectorizes, and only a block that holds one
/// is searched element by element.
fn first_all_ones<const W: usize>(data: &[u8], mask: u32) -> Option<usize> {
    let value = |b: &[u8]| {
        let mut v = [0u8; 4];
        v[..W].copy_from_slice(b);
        u32::from_le_bytes(v)
    };
    const BLOCK: usize = 4096;
    data.chunks(BLOCK * W).enumerate().find_map(|(c, block)| {
        let any = block
            .chunks_exact(W)
            .fold(false, |any, b| any | (value(b) & mask == mask));
        any.then(|| {
            let i = block.chunks_exact(W).position(|b| value(b) & mask == mask);
            c * BLOCK + i.unwrap_or(0)
        })
    })
}

#[cfg(test)]
mod finite_tests {
    use super::first_all_ones;
    use half::{bf16, f16};

    #[test]
    fn the_first_non_finite_element_is_found_in_every_width() {
        for n in [0usize, 1, 7, 4095, 4096, 4097, 10_000] {
            for at in [
                None,
                Some(0),
                Some(n / 2),
                Some(n.saturating_sub(1)),
                Some(4096),
            ] {
                let at = at.filter(|&a| a < n);
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    // Finite values up to each type's largest and smallest.
                    let value = |i: usize| match i % 4 {
                        0 => 65504.0,
                        1 => -6.0e-8,
                        2 => 0.0,
                        _ => i as f32 * 0.25,
                    };
                    let vals: Vec<f32> = (0..n)
                        .map(|i| if Some(i) == at { bad } else { value(i) })
                        .collect();
                    let h: Vec<u8> = vals
                        .iter()
                        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                        .collect();
                    let b: Vec<u8> = vals
                        .iter()
                        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                        .collect();
                    let f: Vec<u8> = vals.iter().flat_map(|&v| v.to_le_bytes()).collect();
                    assert_eq!(first_all_ones::<2>(&h, 0x7c00), at, "f16 n={n}");
                    assert_eq!(first_all_ones::<2>(&b, 0x7f80), at, "bf16 n={n}");
                    assert_eq!(first_all_ones::<4>(&f, 0x7f80_0000), at, "f32 n={n}");
                }
            }
        }
    }
}

#[cfg(test)]
mod joined_tests {
    use super::*;

    fn f16_layer(n: usize, k: usize, seed: usize) -> Linear {
        let w: Vec<f16> = (0..n * k)
            .map(|i| f16::from_f32(((i * 31 + seed * 7) % 97) as f32 / 97.0 - 0.5))
            .collect();
        Linear::from_f16_tensor(Tensor::from_vec(w, (n, k), &Device::Cpu).expect("shape"))
    }

    fn tiled_layer(n: usize, k: usize, seed: usize) -> Option<Linear> {
        let f = tandem_kernels::BlockFormat::Q4_0;
        let mut raw: Vec<u8> = (0..n * k / 32 * f.block_bytes())
            .map(|i| ((i * 13 + seed * 5) % 251) as u8)
            .collect();
        for b in raw.chunks_exact_mut(f.block_bytes()) {
            b[..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
        }
        let t = tandem_kernels::Int8Tiles::pack(f, &raw, n, k)?;
        Some(Linear::bare(
            LinearWeight::Tiled(Arc::new(t)),
            k,
            n,
            ActivationPrecision::Int8,
        ))
    }

    /// Each part's rows through `forward_joined`, and each part alone through `forward_into`.
    fn both(parts: &[&Linear], x: &[f32], m: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let mut joined: Vec<Vec<f32>> = parts.iter().map(|p| vec![0f32; m * p.out_dim]).collect();
        let mut outs: Vec<&mut [f32]> = joined.iter_mut().map(|v| v.as_mut_slice()).collect();
        Linear::forward_joined(parts, x, m, &mut outs).expect("joined pass");
        let alone = parts
            .iter()
            .map(|p| {
                let mut o = vec![0f32; m * p.out_dim];
                p.forward_into(x, m, &mut o).expect("pass");
                o
            })
            .collect();
        (joined, alone)
    }

    /// Fused q/k/v-shaped layers (F16 with a bias, and Q4_0 tiles) give the results they gave
    /// apart, bit for bit, through one joined pass and each alone; unfused ones take the
    /// fallback with the same results.
    #[test]
    fn fused_layers_give_their_own_results_in_one_pass() {
        let k = 64;
        let x: Vec<f32> = (0..20 * k).map(|i| (i % 11) as f32 / 11.0 - 0.4).collect();
        let bias = Tensor::from_vec(
            (0..16).map(|i| i as f32 * 0.5).collect::<Vec<f32>>(),
            16,
            &Device::Cpu,
        )
        .expect("bias");
        let make = || {
            [
                f16_layer(32, k, 1),
                f16_layer(16, k, 2).with_bias(Some(bias.clone())),
                f16_layer(16, k, 3),
            ]
        };
        let [q0, k0, v0] = make();
        let [mut q, mut kk, mut v] = make();
        Linear::fuse(&mut [&mut q, &mut kk, &mut v]).expect("fuse");
        // 20 rows: more than a joined pass takes, each matrix alone.
        for m in [1, 2, 5, 20] {
            let xs = &x[..m * k];
            let (apart, _) = both(&[&q0, &k0, &v0], xs, m);
            let (joined, alone) = both(&[&q, &kk, &v], xs, m);
            assert_eq!(joined, apart, "F16 m={m}");
            assert_eq!(alone, apart, "F16 views alone m={m}");
        }
        let mut out = [0f32; 64];
        assert!(
            Linear::joined_pass(&[&q, &kk, &v], &x[..k], 1, 64, &mut out).expect("pass"),
            "fused F16 layers run as one matrix"
        );
        assert!(!Linear::joined_pass(&[&q0, &k0, &v0], &x[..k], 1, 64, &mut out).expect("pass"));

        let tiled = || Some([tiled_layer(32, k, 1)?, tiled_layer(16, k, 2)?]);
        let (Some([g0, u0]), Some([mut g, mut u])) = (tiled(), tiled()) else {
            eprintln!("skipped the tiles: no AVX2 here");
            return;
        };
        Linear::fuse(&mut [&mut g, &mut u]).expect("fuse");
        let mut out = [0f32; 48];
        assert!(Linear::joined_pass(&[&g, &u], &x[..k], 1, 48, &mut out).expect("pass"));
        for m in [1, 3] {
            let xs = &x[..m * k];
            let (apart, _) = both(&[&g0, &u0], xs, m);
            let (joined, alone) = both(&[&g, &u], xs, m);
            assert_eq!(joined, apart, "tiles m={m}");
            assert_eq!(alone, apart, "tile views alone m={m}");
        }
        // A mix of types stays apart.
        let mut h = f16_layer(16, k, 4);
        let before = g0.weight_bytes();
        let mut g1 = g0.clone();
        Linear::fuse(&mut [&mut g1, &mut h]).expect("fuse");
        assert_eq!(g1.weight_bytes(), before);
        assert!(!Linear::joined_pass(&[&g1, &h], &x[..k], 1, 48, &mut out).expect("pass"));
    }
}
