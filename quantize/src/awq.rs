//! Activation-aware scaling (AWQ, Lin et al., 2023) folded into the model's own tensors.
//!
//! Channels that carry large activations matter more than their weights' size says. For a
//! group of projections sharing one input X (gate/up after the MLP's RMSNorm), a per-channel
//! scale `s` multiplies the weights' columns (W·diag(s)) and divides the input (the norm
//! weight γ/s), which leaves the product unchanged in full precision but moves rounding error
//! away from the channels that matter. `s = mean|x|^α`, normalised, with α searched on a grid
//! for the least output error ‖(Q(W·diag(s))·diag(s)⁻¹ − W)Xᵀ‖² of the group on calibration
//! inputs. α = 0 is plain rounding, so the search never does worse than rounding on the
//! sample it scores.

use crate::encode;
use crate::error::{Error, Result};
use crate::grid;
use crate::types::QuantType;
use faer::Mat;
use rayon::prelude::*;

/// Grid points for α in [0, 1].
const ALPHA_STEPS: usize = 20;
/// Calibration rows the search scores on (evenly spaced over all of them).
const SAMPLE_ROWS: usize = 256;

/// GGML bytes back to f32 through the block grids (the decoder of [`crate::grid`]).
pub fn decode(t: QuantType, bytes: &[u8], out: &mut [f32]) {
    // The two types drafts and MLPs are made of through the kernels' block decoders (the same
    // ggml operations, block at a time instead of level by level: the generic path below
    // was 15-18% of an `awq+gptq` run's time).
    use tandem_kernels::ggml::{dequantize_row, BlockQ4_0, BlockQ8_0};
    let fast = match t {
        QuantType::Q4_0 => dequantize_row::<BlockQ4_0>(bytes, out),
        QuantType::Q8_0 => dequantize_row::<BlockQ8_0>(bytes, out),
        _ => None,
    };
    if fast.is_some() {
        return;
    }
    let (bs, tb, sub) = (t.block_size(), t.type_size(), grid::sub_block(t));
    let mut gs = Vec::new();
    for (block, o) in bytes.chunks_exact(tb).zip(out.chunks_exact_mut(bs)) {
        grid::grids(t, block, &mut gs);
        for (e, v) in o.iter_mut().enumerate() {
            *v = gs[e / sub].value(grid::level(t, block, e));
        }
    }
}

/// The per-channel scales for a group of projections (type, [rows, cols] weights) that share
/// the inputs `xs` ([n, cols]).
pub fn search_scales(xs: &[f32], cols: usize, weights: &[(QuantType, &[f32])]) -> Result<Vec<f32>> {
    let n = xs.len() / cols.max(1);
    if n == 0 {
        return Err(Error::Plan(
            "activation-aware scaling: no calibration inputs".into(),
        ));
    }
    let step = n.div_ceil(SAMPLE_ROWS).max(1);
    let picked: Vec<usize> = (0..n).step_by(step).collect();
    // [samples, cols]: the error below is ‖X·Δᵀ‖ with Δᵀ [cols, rows] filled column by
    // column, so both read the row-major weights and activations in order.
    let xt = Mat::<f32>::from_fn(picked.len(), cols, |t, j| xs[picked[t] * cols + j]);
    let mut mean_abs = vec![0f64; cols];
    for row in xs.chunks_exact(cols) {
        for (m, v) in mean_abs.iter_mut().zip(row) {
            *m += v.abs() as f64;
        }
    }
    let mean_abs: Vec<f64> = mean_abs.iter().map(|m| (m / n as f64).max(1e-8)).collect();
    if mean_abs.iter().any(|m| !m.is_finite()) {
        return Err(Error::Plan(
            "the calibration activations hold a non-finite value".into(),
        ));
    }
    // Each α is scored on its own (rounding, decoding and one product per projection), so the
    // grid points run in parallel: SmolLM2's 30 gate/up and down searches on 2 cores took 31.7 s
    // one α after another, each α's elementwise work on one thread.
    let scored: Vec<(Vec<f32>, f64)> = (0..=ALPHA_STEPS)
        .into_par_iter()
        .map(|step| {
            let s = scales_for(&mean_abs, step as f64 / ALPHA_STEPS as f64);
            let err = weights.iter().try_fold(0f64, |err, &(t, w)| {
                output_error(t, w, cols, &s, &xt).map(|e| err + e)
            })?;
            Ok((s, err))
        })
        .collect::<Result<_>>()?;
    // The first least error in α order (α = 0, plain rounding, on a tie).
    let mut best: Option<(Vec<f32>, f64)> = None;
    for (s, err) in scored {
        if best.as_ref().is_none_or(|(_, e)| err < *e) {
            best = Some((s, err));
        }
    }
    Ok(best.map_or_else(|| vec![1f32; cols], |(s, _)| s))
}

/// `s = mean|x|^α`, normalised so that the scales sit around 1 (max·min = 1), as AWQ does.
fn scales_for(mean_abs: &[f64], alpha: f64) -> Vec<f32> {
    let mut s: Vec<f64> = mean_abs.iter().map(|m| m.powf(alpha)).collect();
    let (lo, hi) = s
        .iter()
        .fold((f64::MAX, 0f64), |(a, b), &v| (a.min(v), b.max(v)));
    let norm = (lo * hi).sqrt();
    for v in s.iter_mut() {
        *v = (*v / norm).clamp(1e-4, 1e4);
    }
    s.iter().map(|&v| v as f32).collect()
}

/// ‖(Q(W·diag(s))·diag(s)⁻¹ − W)·Xᵀ‖² for one projection `w` ([rows, cols]) of type `t`, with
/// `xt` the sampled inputs [samples, cols].
fn output_error(t: QuantType, w: &[f32], cols: usize, s: &[f32], xt: &Mat<f32>) -> Result<f64> {
    let rows = w.len() / cols;
    let mut scaled = Vec::with_capacity(w.len());
    for r in w.chunks_exact(cols) {
        scaled.extend(r.iter().zip(s).map(|(v, si)| v * si));
    }
    let bytes = encode::encode(t, &scaled, cols, None)?;
    let back = &mut scaled;
    decode(t, &bytes, back);
    let delta_t = Mat::<f32>::from_fn(cols, rows, |j, r| {
        back[r * cols + j] / s[j] - w[r * cols + j]
    });
    let mut e = Mat::<f32>::zeros(xt.nrows(), rows);
    faer::linalg::matmul::matmul(
        e.as_mut(),
        faer::Accum::Replace,
        xt.as_ref(),
        delta_t.as_ref(),
        1.0f32,
        faer::Par::Seq,
    );
    Ok(e.norm_l2().powi(2) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_helps_when_a_few_channels_carry_large_activations() {
        let (rows, cols, n) = (64, 128, 400);
        let mut seed = 9u64;
        let mut r = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let w: Vec<f32> = (0..rows * cols).map(|_| r() * 0.1).collect();
        let xs: Vec<f32> = (0..n * cols)
            .map(|i| r() * if i % cols < 4 { 30.0 } else { 1.0 })
            .collect();
        let s = search_scales(&xs, cols, &[(QuantType::Q4_0, &w)]).unwrap();
        assert!(
            s[0] > s[10],
            "salient channels are scaled up: {} vs {}",
            s[0],
            s[10]
        );
        let err = |s: &[f32]| {
            let scaled: Vec<f32> = w
                .chunks_exact(cols)
                .flat_map(|row| row.iter().zip(s).map(|(v, si)| v * si))
                .collect();
            let mut back = vec![0f32; scaled.len()];
            decode(
                QuantType::Q4_0,
                &encode::encode(QuantType::Q4_0, &scaled, cols, None).unwrap(),
                &mut back,
            );
            let mut e = 0f64;
            for x in xs.chunks_exact(cols) {
                for rr in 0..rows {
                    let d: f32 = (0..cols)
                        .map(|j| (back[rr * cols + j] / s[j] - w[rr * cols + j]) * x[j])
                        .sum();
                    e += (d * d) as f64;
                }
            }
            e
        };
        assert!(err(&s) < 0.9 * err(&vec![1.0; cols]));
    }
}
