//! Row quantizers for the types most users ask for: Q8_0, Q4_0 and Q4_K.
//!
//! Written by hand, not taken from candle, for two reasons. Speed: candle's `from_float` goes
//! through a tensor and a boxed storage per call and rounds with a libm call; these loops run
//! straight over the mapped rows. Fidelity: llama.cpp quantizes Q4_K (without an imatrix) with a
//! weighted 20-step search for each sub-block's scale and min (`make_qkx2_quants`), while candle
//! uses the older unweighted search, so files from candle's path decode worse than
//! llama-quantize's. The Q8_0 and Q4_0 functions produce the same bytes as llama.cpp's
//! reference quantizers (tested against candle's and against fixtures made by llama-quantize);
//! Q4_K follows the same algorithm step for step.

use half::f16;

use tandem_kernels::GgmlType;

// Block geometry from the one table of GGML formats.
pub const QK8_0: usize = GgmlType::Q8_0.block_elems();
pub const QK4_0: usize = GgmlType::Q4_0.block_elems();
pub const QK_K: usize = tandem_kernels::ggml::QK_K;
pub const Q8_0_BYTES: usize = GgmlType::Q8_0.block_bytes();
pub const Q4_0_BYTES: usize = GgmlType::Q4_0.block_bytes();
pub const Q4_K_BYTES: usize = GgmlType::Q4K.block_bytes();

/// Runs `$body` compiled for AVX2 when the CPU has it (wider vectors for the same operations;
/// no FMA contraction, so results are identical), else for the baseline target.
macro_rules! with_avx2 {
    ($body:ident, $x:expr, $out:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            unsafe fn wide(x: &[f32], out: &mut [u8]) {
                $body(x, out)
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                return unsafe { wide($x, $out) };
            }
        }
        $body($x, $out)
    }};
}

/// Rounds half away from zero, exactly like C's `roundf`, without a libm call.
#[inline]
fn round_away(x: f32) -> i32 {
    let t = x as i32;
    let f = x - t as f32;
    if f >= 0.5 {
        t + 1
    } else if f <= -0.5 {
        t - 1
    } else {
        t
    }
}

/// Round to nearest, ties to even: llama.cpp's `nearest_int` (valid for |x| < 2^22).
#[inline]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Q8_0: per 32 values, d = max|x| / 127 (as f16) and round(x / d) as i8.
pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    with_avx2!(q8_0_body, x, out)
}

#[inline(always)]
fn q8_0_body(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK8_0).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        ob[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (o, v) in ob[2..].iter_mut().zip(xb) {
            *o = round_away(v * id) as i8 as u8;
        }
    }
}

/// Q4_0: per 32 values, d = (the value of largest magnitude) / -8 (as f16) and
/// min(15, trunc(x / d + 8.5)) packed two per byte (element j low, j + 16 high).
pub fn quantize_q4_0(x: &[f32], out: &mut [u8]) {
    with_avx2!(q4_0_body, x, out)
}

#[inline(always)]
fn q4_0_body(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK4_0).zip(out.chunks_exact_mut(Q4_0_BYTES)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        ob[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for j in 0..QK4_0 / 2 {
            let q0 = ((xb[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((xb[j + QK4_0 / 2] * id + 8.5) as i8).min(15) as u8;
            ob[2 + j] = q0 | (q1 << 4);
        }
    }
}

/// Scale and min for 32 values on a 0..=15 grid, minimising the weighted squared error over
/// 21 candidate scales, each refined by weighted least squares (llama.cpp's `make_qkx2_quants`
/// with rmin = -1, rdelta = 0.1, nstep = 20). Returns (scale, -min); `l` gets the levels.
///
/// The 21 candidates are independent, so they are computed side by side, eight to a vector
/// (each candidate's sums still run in the reference order, so the result is the same as
/// trying them one after another), and the best is picked in the reference order afterwards.
#[inline(always)]
fn scale_min_search(x: &[f32; 32], w: &[f32; 32], l: &mut [u8; 32]) -> (f32, f32) {
    const NMAX: f32 = 15.0;
    const STEPS: usize = 21;
    const LANES: usize = 8;
    let (mut min, mut max) = (x[0], x[0]);
    let (mut sum_w, mut sum_x) = (w[0], w[0] * x[0]);
    for i in 1..32 {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let iscale0 = NMAX / (max - min);
    let mut scale = 1.0 / iscale0;
    let mut best = 0f32;
    for i in 0..32 {
        let q = nearest_int(iscale0 * (x[i] - min)).clamp(0, 15);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best += w[i] * (diff * diff);
    }
    let mut levels = [[0u8; 32]; 24];
    let mut cand = [(0f32, 0f32, f32::INFINITY); 24];
    for g in 0..24 / LANES {
        let mut iscale = [0f32; LANES];
        for (lane, s) in iscale.iter_mut().enumerate() {
            *s = (-1.0 + 0.1 * (g * LANES + lane) as f32 + NMAX) / (max - min);
        }
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
        let mut qs = [[0f32; LANES]; 32];
        for i in 0..32 {
            for lane in 0..LANES {
                let q = nearest_int(iscale[lane] * (x[i] - min)).clamp(0, 15) as f32;
                qs[i][lane] = q;
                sum_l[lane] += w[i] * q;
                sum_l2[lane] += w[i] * q * q;
                sum_xl[lane] += w[i] * q * x[i];
            }
        }
        let mut this_scale = [0f32; LANES];
        let mut this_min = [0f32; LANES];
        let mut ok = [false; LANES];
        for lane in 0..LANES {
            let det = sum_w * sum_l2[lane] - sum_l[lane] * sum_l[lane];
            ok[lane] = det > 0.0 && g * LANES + lane < STEPS;
            this_scale[lane] = (sum_w * sum_xl[lane] - sum_x * sum_l[lane]) / det;
            this_min[lane] = (sum_l2[lane] * sum_x - sum_l[lane] * sum_xl[lane]) / det;
            if this_min[lane] > 0.0 {
                this_min[lane] = 0.0;
                this_scale[lane] = sum_xl[lane] / sum_l2[lane];
            }
        }
        let mut err = [0f32; LANES];
        for i in 0..32 {
            for lane in 0..LANES {
                let diff = this_scale[lane] * qs[i][lane] + this_min[lane] - x[i];
                err[lane] += w[i] * (diff * diff);
            }
        }
        for lane in 0..LANES {
            let c = g * LANES + lane;
            if ok[lane] {
                cand[c] = (this_scale[lane], this_min[lane], err[lane]);
                for i in 0..32 {
                    levels[c][i] = qs[i][lane] as u8;
                }
            }
        }
    }
    for (c, &(s, m, err)) in cand.iter().enumerate().take(STEPS) {
        if err < best {
            *l = levels[c];
            best = err;
            scale = s;
            min = m;
        }
    }
    (scale, -min)
}

/// The 6-bit scale and min of sub-block `j` from a Q4_K block's 12 packed scale bytes.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K: 256 values as 8 sub-blocks of 32, each with a 6-bit scale and min relative to the
/// block's f16 `d` and `dmin`, and 4-bit levels. Weights favour large values (|x| + rms).
pub fn quantize_q4_k(x: &[f32], out: &mut [u8]) {
    with_avx2!(q4_k_body, x, out)
}

#[inline(always)]
fn q4_k_body(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q4_K_BYTES)) {
        let mut levels = [0u8; QK_K];
        let mut scales = [0f32; 8];
        let mut mins = [0f32; 8];
        let (mut max_scale, mut max_min) = (0f32, 0f32);
        for j in 0..8 {
            let sub: &[f32; 32] = xb[32 * j..32 * j + 32].try_into().unwrap_or(&[0.0; 32]);
            let sum_x2: f32 = sub.iter().fold(0.0, |a, v| a + v * v);
            let av_x = (sum_x2 / 32.0).sqrt();
            let mut w = [0f32; 32];
            for (wi, v) in w.iter_mut().zip(sub) {
                *wi = av_x + v.abs();
            }
            let mut l = [0u8; 32];
            let (s, m) = scale_min_search(sub, &w, &mut l);
            scales[j] = s;
            mins[j] = m;
            max_scale = max_scale.max(s);
            max_min = max_min.max(m);
        }
        let inv_scale = if max_scale > 0.0 {
            63.0 / max_scale
        } else {
            0.0
        };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut sc = [0u8; 12];
        for j in 0..8 {
            let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
            let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
            if j < 4 {
                sc[j] = ls;
                sc[j + 4] = lm;
            } else {
                sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                sc[j - 4] |= (ls >> 4) << 6;
                sc[j] |= (lm >> 4) << 6;
            }
        }
        let d = f16::from_f32(max_scale / 63.0);
        let dmin = f16::from_f32(max_min / 63.0);
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, &sc);
            let dj = d.to_f32() * s as f32;
            if dj == 0.0 {
                continue;
            }
            let dm = dmin.to_f32() * m as f32;
            for i in 0..32 {
                levels[32 * j + i] = nearest_int((xb[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
            }
        }
        ob[0..2].copy_from_slice(&d.to_le_bytes());
        ob[2..4].copy_from_slice(&dmin.to_le_bytes());
        ob[4..16].copy_from_slice(&sc);
        for (k, chunk) in levels.chunks_exact(64).enumerate() {
            for i in 0..32 {
                ob[16 + 32 * k + i] = chunk[i] | (chunk[i + 32] << 4);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Values with exact ties, zeros, tiny and huge magnitudes, and a long random tail.
    fn inputs(n: usize) -> Vec<f32> {
        let mut s = 0x2545F4914F6CDD1Du64;
        let mut v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect();
        v[..32].fill(0.0);
        for (i, x) in v[32..64].iter_mut().enumerate() {
            *x = (i as f32 - 16.0) * 0.5; // lands on .5 after scaling
        }
        for x in v[64..96].iter_mut() {
            *x *= 1e-30;
        }
        v
    }

    fn candle_bytes(x: &[f32], t: GgmlDType) -> Vec<u8> {
        let src = Tensor::from_slice(x, (x.len() / 256, 256), &Device::Cpu).unwrap();
        QTensor::quantize(&src, t).unwrap().data().unwrap().to_vec()
    }

    #[test]
    fn q8_0_and_q4_0_match_the_reference_quantizer() {
        // candle's from_float is a line-by-line port of llama.cpp's quantize_row_*_ref.
        let x = inputs(256 * 40);
        let mut q8 = vec![0u8; x.len() / 32 * Q8_0_BYTES];
        quantize_q8_0(&x, &mut q8);
        assert_eq!(q8, candle_bytes(&x, GgmlDType::Q8_0));
        let mut q4 = vec![0u8; x.len() / 32 * Q4_0_BYTES];
        quantize_q4_0(&x, &mut q4);
        assert_eq!(q4, candle_bytes(&x, GgmlDType::Q4_0));
    }

    #[test]
    fn q4_k_is_at_least_as_accurate_as_candles() {
        let x = inputs(256 * 64);
        let mut ours = vec![0u8; x.len() / 256 * Q4_K_BYTES];
        quantize_q4_k(&x, &mut ours);
        let theirs = candle_bytes(&x, GgmlDType::Q4K);
        let err = |b: &[u8]| -> f64 {
            let y = crate::encode::dequantized(GgmlDType::Q4K, b, x.len() / 256, 256);
            x.iter()
                .zip(&y)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum()
        };
        let (e_ours, e_candle) = (err(&ours), err(&theirs));
        assert!(e_ours < e_candle, "ours {e_ours} vs candle {e_candle}");
    }

    #[test]
    fn rounding_helpers_match_c() {
        for x in [
            -2.5f32, -1.5, -0.5, 0.49999997, 0.5, 1.5, 2.5, 126.5, -127.5, 3.2, -3.7,
        ] {
            assert_eq!(round_away(x), x.round() as i32, "{x}");
            assert_eq!(nearest_int(x), x.round_ties_even() as i32, "{x}");
        }
    }
}
