//! Importance-weighted quantizers for the 32-value types Q4_0, Q4_1, Q5_0 and Q5_1: what
//! llama-quantize does with `--imatrix` for them (ggml's `quantize_row_q4_0_impl` and
//! siblings), step for step so the bytes are the same. Each element's weight is its importance
//! times `sqrt(σ² + x²)` (σ² the row's mean square); symmetric types search 19 scales around
//! `max / -nmax` (`make_qx_quants`), asymmetric ones 37 scale/min pairs refined by weighted
//! least squares (`make_qkx3_quants`). Q8_0 ignores importance in llama.cpp too.
//!
//! Written by hand because candle implements importance weighting only for the K-quants.

use crate::types::QuantType;
use half::f16;

/// llama.cpp's `GROUP_MAX_EPS`: a block whose largest magnitude is below it is all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Round to nearest, ties to even (llama.cpp's `nearest_int`, valid for |x| < 2^22).
#[inline(always)]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

#[inline(always)]
/// `make_qx_quants` with rmse_type 1 and weights: levels in `l` (0..2·nmax), returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32; 32], l: &mut [u8; 32], w: &[f32; 32]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let iscale = -nmaxf / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..32 {
        let q = quant(iscale, x[i]);
        l[i] = (q + nmax) as u8;
        let qf = q as f32;
        sumlx += w[i] * x[i] * qf;
        suml2 += w[i] * qf * qf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    // The other candidates, `is` = -9..=9 without 0, are independent of each other: their
    // sums run side by side (each still adds its 32 terms in order, so the bits are ggml's),
    // eight lanes at a time in the AVX2 build. One candidate after another, each sum waited
    // on its previous add: this function was 26% of a GPTQ run's time.
    // 18 candidates padded to three 8-lane vectors; the padding repeats the last candidate
    // and is never chosen (only the first N are compared).
    const N: usize = CANDIDATE_STEPS.len();
    const LANES: usize = N.next_multiple_of(8);
    let mut iscales = [0f32; LANES];
    for (c, v) in iscales.iter_mut().enumerate() {
        let is = CANDIDATE_STEPS[c.min(N - 1)];
        *v = -(nmaxf + 0.1 * is as f32) / max;
    }
    let (mut sx, mut s2) = ([0f32; LANES], [0f32; LANES]);
    for i in 0..32 {
        let (xi, wi) = (x[i], w[i]);
        let wx = wi * xi;
        for c in 0..LANES {
            let qf = quant(iscales[c], xi) as f32;
            sx[c] += wx * qf;
            s2[c] += wi * qf * qf;
        }
    }
    // Taken in ggml's order: the last candidate that beats the best so far wins.
    let mut chosen = None;
    for c in 0..N {
        if s2[c] > 0.0 && sx[c] * sx[c] > best * s2[c] {
            scale = sx[c] / s2[c];
            best = scale * sx[c];
            chosen = Some(c);
        }
    }
    if let Some(c) = chosen {
        for i in 0..32 {
            l[i] = (quant(iscales[c], x[i]) + nmax) as u8;
        }
    }
    scale
}

/// `make_qx_quants`' candidate steps after its first scale, in ggml's order.
const CANDIDATE_STEPS: [i32; 18] = [
    -9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9,
];

#[inline(always)]
/// `make_qkx3_quants` (rmin -0.9, rdelta 0.05, 37 steps, squared error): levels 0..=nmax in
/// `l`; returns (scale, -min).
fn make_qkx3_quants(nmax: i32, x: &[f32; 32], w: &[f32; 32], l: &mut [u8; 32]) -> (f32, f32) {
    const RMIN: f32 = -0.9;
    const RDELTA: f32 = 0.05;
    const NSTEP: i32 = 36;
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..32 {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max <= min {
        l.fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_mad = 0f32;
    for i in 0..32 {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_mad += w[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=NSTEP {
        iscale = (RMIN + RDELTA * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..32 {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = q as u8;
            let qf = q as f32;
            sum_l += w[i] * qf;
            sum_l2 += w[i] * qf * qf;
            sum_xl += w[i] * qf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0f32;
            for i in 0..32 {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                mad += w[i] * (diff * diff);
            }
            if mad < best_mad {
                *l = aux;
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Quantizes one row `x` with per-column `importance` as `t` (Q4_0, Q4_1, Q5_0 or Q5_1) into
/// `out` (the row's blocks). Returns false for any other type.
pub fn quantize_row_weighted(t: QuantType, x: &[f32], importance: &[f32], out: &mut [u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // The same operations compiled 8 wide (no fused multiply-add: identical bytes).
        #[target_feature(enable = "avx2")]
        unsafe fn wide(t: QuantType, x: &[f32], importance: &[f32], out: &mut [u8]) -> bool {
            row_body(t, x, importance, out)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { wide(t, x, importance, out) };
        }
    }
    row_body(t, x, importance, out)
}

#[inline(always)]
fn row_body(t: QuantType, x: &[f32], importance: &[f32], out: &mut [u8]) -> bool {
    let (nmax, asymmetric, five) = match t {
        QuantType::Q4_0 => (8, false, false),
        QuantType::Q5_0 => (16, false, true),
        QuantType::Q4_1 => (15, true, false),
        QuantType::Q5_1 => (31, true, true),
        _ => return false,
    };
    let mut sum_x2 = 0f32;
    for v in x {
        sum_x2 += v * v;
    }
    let sigma2 = sum_x2 / x.len() as f32;
    let tb = t.type_size();
    for ((xb, qw), ob) in x
        .chunks_exact(32)
        .zip(importance.chunks_exact(32))
        .zip(out.chunks_exact_mut(tb))
    {
        let xb: &[f32; 32] = xb.try_into().expect("chunks of 32");
        let mut w = [0f32; 32];
        for j in 0..32 {
            w[j] = qw[j] * (sigma2 + xb[j] * xb[j]).sqrt();
        }
        let mut l = [0u8; 32];
        let mut at = 2;
        if asymmetric {
            // ggml stores m = -the_min: the block's (non-positive) minimum.
            let (d, the_min) = make_qkx3_quants(nmax, xb, &w, &mut l);
            ob[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            ob[2..4].copy_from_slice(&f16::from_f32(-the_min).to_le_bytes());
            at = 4;
        } else {
            let d = make_qx_quants(nmax, xb, &mut l, &w);
            ob[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        }
        if five {
            let mut qh = 0u32;
            for j in 0..16 {
                qh |= (((l[j] & 0x10) >> 4) as u32) << j;
                qh |= (((l[j + 16] & 0x10) >> 4) as u32) << (j + 16);
            }
            ob[at..at + 4].copy_from_slice(&qh.to_le_bytes());
            at += 4;
        }
        for j in 0..16 {
            ob[at + j] = (l[j] & 0x0F) | ((l[j + 16] & 0x0F) << 4);
        }
    }
    true
}
