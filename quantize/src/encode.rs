//! One tensor's bytes: source bytes → f32 rows → target type, rows quantized in parallel.
//!
//! Every block type quantizes each row on its own, so splitting the rows among threads gives
//! the same bytes whatever the thread count: output files are reproducible.

use crate::error::{tensor_err, Error, Result};
use crate::types::QuantType;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, QTensor};
use candle_core::{Device, Tensor};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use rayon::prelude::*;
use std::path::Path;
use tandem_model::weights::{RawTensor, WeightDType};

/// Elements per parallel work item (whole rows): big enough to amortise the hand-off, small
/// enough to spread a 576-row tensor over every core.
const CHUNK_ELEMS: usize = 1 << 16;

/// Decodes `rows` whole rows of a tensor's stored bytes to f32 (any stored type), refusing
/// NaN/Inf unless allowed. `first_row` places the rows in the tensor, for error messages.
pub fn to_f32(
    path: &Path,
    raw: &RawTensor<'_>,
    data: &[u8],
    (first_row, rows): (usize, usize),
    allow_nonfinite: bool,
) -> Result<Vec<f32>> {
    let cols = raw.shape.last().copied().unwrap_or(1).max(1);
    let n = rows * cols;
    let mut out = vec![0f32; n];
    match raw.dtype {
        WeightDType::F32 => out
            .par_chunks_mut(CHUNK_ELEMS)
            .zip(data.par_chunks(CHUNK_ELEMS * 4))
            .for_each(|(o, b)| {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                    *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }),
        WeightDType::F16 | WeightDType::BF16 => {
            let bf = raw.dtype == WeightDType::BF16;
            out.par_chunks_mut(CHUNK_ELEMS)
                .zip(data.par_chunks(CHUNK_ELEMS * 2))
                .for_each(|(o, b)| {
                    // SAFETY: u16 has no invalid bit patterns; align_to only hands out the
                    // aligned middle, and an unaligned slice takes the byte-wise path below.
                    let (pre, words, _) = unsafe { b.align_to::<u16>() };
                    if pre.is_empty() && words.len() == o.len() && cfg!(target_endian = "little") {
                        if bf {
                            words.reinterpret_cast::<bf16>().convert_to_f32_slice(o);
                        } else {
                            words.reinterpret_cast::<f16>().convert_to_f32_slice(o);
                        }
                    } else {
                        for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                            let w = u16::from_le_bytes([c[0], c[1]]);
                            *x = if bf {
                                bf16::from_bits(w).to_f32()
                            } else {
                                f16::from_bits(w).to_f32()
                            };
                        }
                    }
                })
        }
        WeightDType::Quant(q) => {
            let qt = qtensor_from_ggml(q, data, vec![rows, cols], &Device::Cpu)
                .map_err(|e| tensor_err(path, &raw.name, tandem_model::error::candle_msg(&e)))?;
            out = qt.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        }
    }
    if !allow_nonfinite {
        let bad = out
            .par_chunks(CHUNK_ELEMS)
            .enumerate()
            .find_map_first(|(c, xs)| {
                // A plain reduction first (it vectorizes); locate only when something is off.
                let all_finite = xs.iter().fold(true, |ok, x| ok & x.is_finite());
                (!all_finite)
                    .then(|| {
                        xs.iter()
                            .position(|x| !x.is_finite())
                            .map(|i| c * CHUNK_ELEMS + i)
                    })
                    .flatten()
            });
        if let Some(i) = bad {
            return Err(tensor_err(
                path,
                &raw.name,
                format!(
                    "non-finite value {} at row {}, column {} (pass --allow-nonfinite to quantize anyway)",
                    out[i],
                    first_row + i / cols,
                    i % cols
                ),
            ));
        }
    }
    Ok(out)
}

/// Encodes rows of `cols` f32 values as `t`. `importance` (one weight per column) steers the
/// block types (every one but Q8_0, as llama-quantize).
pub fn encode(
    t: QuantType,
    xs: &[f32],
    cols: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>> {
    let rows = xs.len() / cols.max(1);
    let size = t.bytes_for(rows, cols).ok_or_else(|| {
        Error::Plan(format!(
            "{t}: a row of {cols} does not fill whole blocks (internal error)"
        ))
    })?;
    let mut out = vec![0u8; size];
    let row_bytes = size / rows.max(1);
    let rows_per_chunk = (CHUNK_ELEMS / cols.max(1)).max(1);
    out.par_chunks_mut(rows_per_chunk * row_bytes)
        .zip(xs.par_chunks(rows_per_chunk * cols))
        .try_for_each(|(o, x)| encode_rows_into(t, x, cols, importance, o))?;
    Ok(out)
}

pub(crate) fn encode_rows_into(
    t: QuantType,
    x: &[f32],
    cols: usize,
    importance: Option<&[f32]>,
    out: &mut [u8],
) -> Result<()> {
    match t {
        QuantType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        QuantType::F16 => {
            let mut h = vec![f16::ZERO; x.len()];
            h.convert_from_f32_slice(x);
            for (o, v) in out.chunks_exact_mut(2).zip(h) {
                o.copy_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        QuantType::BF16 => {
            let mut h = vec![bf16::ZERO; x.len()];
            h.convert_from_f32_slice(x);
            for (o, v) in out.chunks_exact_mut(2).zip(h) {
                o.copy_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        QuantType::Q8_0 => crate::blocks::quantize_q8_0(x, out),
        QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1
            if importance.is_some() =>
        {
            let w = importance.unwrap_or_default();
            let row_bytes = out.len() / (x.len() / cols).max(1);
            for (xr, o) in x.chunks_exact(cols).zip(out.chunks_exact_mut(row_bytes)) {
                crate::weighted::quantize_row_weighted(t, xr, w, o);
            }
        }
        QuantType::Q4_0 => crate::blocks::quantize_q4_0(x, out),
        QuantType::Q4K if importance.is_none() => crate::blocks::quantize_q4_k(x, out),
        _ => {
            let rows = x.len() / cols;
            let src = Tensor::from_slice(x, (rows, cols), &Device::Cpu)?;
            let q = match importance.filter(|_| t.uses_importance()) {
                Some(w) => QTensor::quantize_imatrix(&src, w, t.ggml())?,
                None => QTensor::quantize(&src, t.ggml())?,
            };
            out.copy_from_slice(&q.data()?);
        }
    }
    Ok(())
}

/// Test helper: GGML block bytes back to f32 through candle (an independent decoder).
#[cfg(test)]
pub(crate) fn dequantized(
    t: candle_core::quantized::GgmlDType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    let q = qtensor_from_ggml(t, bytes, vec![rows, cols], &Device::Cpu).unwrap();
    q.dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1)
            .collect()
    }

    #[test]
    fn chunking_does_not_change_bytes() {
        // 300 rows of 256: several chunks; the result must equal quantizing all at once.
        let xs = sample(300 * 256);
        for t in [
            QuantType::Q8_0,
            QuantType::Q4_0,
            QuantType::Q4K,
            QuantType::Q6K,
            QuantType::F16,
        ] {
            let ours = encode(t, &xs, 256, None).unwrap();
            let mut whole = vec![0u8; ours.len()];
            encode_rows_into(t, &xs, 256, None, &mut whole).unwrap();
            assert_eq!(ours, whole, "{t}");
        }
    }

    #[test]
    fn q8_0_round_trip_error_is_small() {
        let xs = sample(64 * 64);
        let bytes = encode(QuantType::Q8_0, &xs, 64, None).unwrap();
        let back = dequantized(QuantType::Q8_0.ggml(), &bytes, 64, 64);
        let err = xs
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 0.1 / 127.0 + 1e-6, "{err}");
    }
}
