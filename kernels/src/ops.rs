//! The small per-token operations of a Llama layer on plain f32 slices: RMSNorm, rotate-half
//! RoPE, SiLU·up, residual add.
//!
//! Why not candle's: each candle op allocates its output tensor and may hand its loop to
//! rayon, which wakes a parked thread (~10 µs) and then competes with the kernel pool's
//! spinning workers. On a decode step these ops touch a few KB each, so a plain loop on the
//! calling thread, writing into a reused buffer, is the fast way. Plain loops vectorize well
//! enough here; the f64 definitions in the tests are the references.

/// Runs `$body` compiled for AVX2/FMA when the CPU has them (the plain loops then vectorize
/// 8 wide), else as is. Rust never contracts a multiply and an add into an FMA on its own,
/// so both versions compute the same values.
macro_rules! avx2_or_plain {
    ($name:ident ( $($arg:ident : $ty:ty),* ) $body:block) => {
        avx2_or_plain!($name ( $($arg : $ty),* ) -> () $body)
    };
    ($name:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty $body:block) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $name($($arg: $ty),*) -> $ret $body
            if crate::has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                return unsafe { $name($($arg),*) };
            }
        }
        #[allow(unreachable_code)]
        $body
    }};
}

/// `$fast` (a call to an `avx2`-enabled function written in intrinsics) where the CPU has
/// AVX2, else `$plain`.
macro_rules! avx2_intrinsics_or {
    ($fast:expr, $plain:expr) => {{
        #[cfg(target_arch = "x86_64")]
        if crate::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 (checked just above), all `$fast` needs.
            return unsafe { $fast };
        }
        $plain
    }};
}

/// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) · w` for each row r of length `w.len()`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    avx2_or_plain!(rms_norm_avx2(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        rms_norm_body(x, w, eps, out)
    })
}

#[inline(always)]
fn rms_norm_body(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert_eq!(x.len(), out.len());
    assert!(d > 0 && x.len().is_multiple_of(d));
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        // Eight lanes, so the sum vectorizes (a single running sum cannot be reordered);
        // the order depends only on d, never on the rows beside this one.
        let mut lanes = [0f32; 8];
        let chunks = xr.chunks_exact(8);
        let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        for c in chunks {
            for l in 0..8 {
                lanes[l] += c[l] * c[l];
            }
        }
        let ss = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
            + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
            + tail;
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// Rotate-half RoPE in place on `x` = [rows, heads, head_dim], where row r uses
/// `cos[r]`/`sin[r]` (each `head_dim / 2` long, concatenated per row):
/// `(a, b) → (a·cos − b·sin, b·cos + a·sin)` for a = x[i], b = x[i + head_dim/2].
pub fn rope_rotate_half(x: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    assert!(head_dim.is_multiple_of(2));
    let rows = x.len() / (heads * head_dim);
    assert_eq!(x.len(), rows * heads * head_dim);
    assert!(cos.len() == rows * half && sin.len() == rows * half);
    for (r, xr) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (c, s) = (&cos[r * half..][..half], &sin[r * half..][..half]);
        for xh in xr.chunks_exact_mut(head_dim) {
            let (a, b) = xh.split_at_mut(half);
            for i in 0..half {
                let (av, bv) = (a[i], b[i]);
                a[i] = av * c[i] - bv * s[i];
                b[i] = bv * c[i] + av * s[i];
            }
        }
    }
}

/// `gate[i] = silu(gate[i]) · up[i]`, in place (the SwiGLU activation). A prefill's worth
/// (SmolLM2: 512 × 1536 per layer) is split over the pool's threads; every element is the same
/// arithmetic wherever it lands.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    // From about two rows of SmolLM2's MLP: a verification pass of 8 rows (12k elements)
    // took 0.29 ms of a 9.2 ms Q8_0 pass on one thread (`bench --profile 8`).
    const PARALLEL_FROM: usize = 1 << 12;
    const CHUNK: usize = 1 << 12;
    let n = gate.len();
    let pool = crate::pool::current();
    let threads = pool.threads_now();
    if n < PARALLEL_FROM || threads < 2 {
        return silu_mul_serial(gate, up);
    }
    // An even share per thread up to `threads` chunks' worth, tasks of CHUNK beyond.
    let chunk = if n > threads * CHUNK {
        CHUNK
    } else {
        n.div_ceil(threads).next_multiple_of(8)
    };
    let g = crate::rows::SendPtr(gate.as_mut_ptr());
    pool.run(n.div_ceil(chunk), |c| {
        let (a, b) = (c * chunk, ((c + 1) * chunk).min(n));
        // SAFETY: task c alone touches gate[a..b], inside `gate`; `run` returns only when
        // every task is done.
        let gs = unsafe { std::slice::from_raw_parts_mut(g.get().add(a), b - a) };
        silu_mul_serial(gs, &up[a..b]);
    });
}

fn silu_mul_serial(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx512() {
        // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C (checked just above).
        return unsafe { silu_mul_avx512(gate, up) };
    }
    avx2_intrinsics_or!(silu_mul_avx2(gate, up), silu_mul_body(gate, up))
}

/// Defines [`silu_mul_body`] for one register width through that width's [`exp_approx`] (same
/// bits at either width, tested); the values short of a whole register go to `$tail`.
macro_rules! silu_mul_kernel {
    ($(#[$doc:meta])* $name:ident, $feature:literal, $lanes:literal, $set1:ident, $load:ident,
     $store:ident, $add:ident, $mul:ident, $div:ident, $negate:ident, $exp:ident, $tail:ident) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name(gate: &mut [f32], up: &[f32]) {
            use std::arch::x86_64::*;
            assert_eq!(gate.len(), up.len());
            let one = $set1(1.0);
            let whole = gate.len() / $lanes * $lanes;
            let (gp, upp) = (gate.as_mut_ptr(), up.as_ptr());
            let mut i = 0;
            while i < whole {
                let g = $load(gp.add(i));
                let e = $exp($negate(g));
                let y = $mul($div(g, $add(one, e)), $load(upp.add(i)));
                $store(gp.add(i), y);
                i += $lanes;
            }
            $tail(&mut gate[whole..], &up[whole..]);
        }
    };
}

silu_mul_kernel!(
    /// [`silu_mul_body`] sixteen lanes at a time.
    silu_mul_avx512, "avx512f,avx2", 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps,
    _mm512_add_ps, _mm512_mul_ps, _mm512_div_ps, negate_avx512, exp_approx_avx512, silu_mul_avx2
);
silu_mul_kernel!(
    /// [`silu_mul_body`] eight lanes at a time.
    silu_mul_avx2, "avx2", 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps,
    _mm256_add_ps, _mm256_mul_ps, _mm256_div_ps, negate_avx2, exp_approx_avx2, silu_mul_body
);

/// `-x` on eight lanes (the sign bit flipped, as the scalar's negation).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn negate_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_xor_ps(x, _mm256_set1_ps(-0.0))
}

/// `-x` on sixteen lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[inline]
unsafe fn negate_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_castsi512_ps(_mm512_xor_si512(
        _mm512_castps_si512(x),
        _mm512_set1_epi32(i32::MIN),
    ))
}

#[inline(always)]
fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp_approx(-*g)) * u;
    }
}

/// [`exp_approx`]'s constants (shared with its AVX2 lanes): the clamp, log2(e), 1.5·2²³
/// (adding it rounds to an integer, ties to even, and leaves n in the low bits), ln 2 in two
/// parts, and the polynomial's coefficients from the highest degree down.
const EXP_MIN: f32 = -87.3;
const EXP_MAX: f32 = 88.3;
const EXP_LOG2E: f32 = std::f32::consts::LOG2_E;
const EXP_ROUND: f32 = 12_582_912.0;
const EXP_LN2_HI: f32 = 0.693_359_4;
const EXP_LN2_LO: f32 = -2.121_944_4e-4;
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` in plain f32 arithmetic that vectorizes (Cephes' `expf`: a degree-6 polynomial on
/// x − n·ln2, scaled by 2ⁿ built from bits; relative error < 3e-7 against f64). libm's `exp`
/// is a call per element and kept SiLU and the softmax scalar: 3.5 ns per element, 3% of a
/// 5-token F16 verification pass. Every caller uses this one function, in vector lanes and
/// tails alike, so a value never depends on where in a buffer it sits. Inputs are clamped to
/// [-87.3, 88.3] (e^x stays finite and normal); NaN stays NaN.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    // Written as comparisons (not f32::max/min) so that NaN passes through.
    #[allow(clippy::manual_clamp)]
    let x = if x < EXP_MIN {
        EXP_MIN
    } else if x > EXP_MAX {
        EXP_MAX
    } else {
        x
    };
    let t = x * EXP_LOG2E + EXP_ROUND;
    let n = t - EXP_ROUND;
    let r = x - n * EXP_LN2_HI - n * EXP_LN2_LO;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let y = p * (r * r) + r + 1.0;
    // t's low mantissa bits hold 2²² + n; adding 127 and shifting puts n + 127 in the
    // exponent field and drops the rest: 2ⁿ.
    y * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
}

/// `x[i] = e^(x[i] − shift)` for every i; returns the sum of the results (a softmax's
/// numerators and denominator). Eight-lane sums, so the order depends only on `x.len()`.
pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx512() {
        // SAFETY: the CPU has AVX-512F and AVX2 (checked just above).
        return unsafe { exp_shifted_sum_avx512(x, shift) };
    }
    avx2_intrinsics_or!(
        exp_shifted_sum_avx2(x, shift),
        exp_shifted_sum_body(x, shift)
    )
}

/// [`exp_shifted_sum_body`] in AVX2 intrinsics, bit for bit (tested). Why by hand: the
/// compiler left the plain loop scalar (the clamps' branches and the lane array), and it was
/// a third of a 512-token prefill's attention time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_shifted_sum_avx2(x: &mut [f32], shift: f32) -> f32 {
    exp_shifted_sum_on_avx2(x, shift, std::arch::x86_64::_mm256_setzero_ps())
}

/// [`exp_shifted_sum_avx2`] from eight lane sums `acc` already begun (by the 512-bit path).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn exp_shifted_sum_on_avx2(
    x: &mut [f32],
    shift: f32,
    mut acc: std::arch::x86_64::__m256,
) -> f32 {
    use std::arch::x86_64::*;
    let shift_v = _mm256_set1_ps(shift);
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), shift_v);
        let e = exp_approx_avx2(v);
        _mm256_storeu_ps(c.as_mut_ptr(), e);
        acc = _mm256_add_ps(acc, e);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    exp_sum_finish(lanes, chunks.into_remainder(), shift)
}

/// [`exp_shifted_sum_avx2`] with the exponentials sixteen at a time: each register's two
/// halves added to the eight lane sums in turn (the first eight values, then the next), so
/// the sums and every value keep their bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn exp_shifted_sum_avx512(x: &mut [f32], shift: f32) -> f32 {
    use std::arch::x86_64::*;
    let shift_v = _mm512_set1_ps(shift);
    let mut acc = _mm256_setzero_ps();
    let mut pairs = x.chunks_exact_mut(16);
    for c in &mut pairs {
        let v = _mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), shift_v);
        let e = exp_approx_avx512(v);
        _mm512_storeu_ps(c.as_mut_ptr(), e);
        acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
        acc = _mm256_add_ps(
            acc,
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e))),
        );
    }
    exp_shifted_sum_on_avx2(pairs.into_remainder(), shift, acc)
}

/// Defines [`exp_approx`] on one register width's lanes: the same operations in the same order
/// (multiplies and adds never fused), so the same bits at either width. `$clamp(x, lo, hi)`
/// does the scalar's comparisons (below the range → its floor, above → its ceiling, NaN
/// stays); `$pow2(t)` is 2ⁿ from the rounded t (its low mantissa bits hold 2²² + n).
macro_rules! exp_approx_kernel {
    ($(#[$doc:meta])* $name:ident, $feature:literal, $v:ty, $set1:ident, $add:ident, $sub:ident,
     $mul:ident, $clamp:ident, $pow2:ident) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn $name(x: $v) -> $v {
            use std::arch::x86_64::*;
            let c = |v: f32| $set1(v);
            let x = $clamp(x, c(EXP_MIN), c(EXP_MAX));
            let round = c(EXP_ROUND);
            let t = $add($mul(x, c(EXP_LOG2E)), round);
            let n = $sub(t, round);
            let r = $sub($sub(x, $mul(n, c(EXP_LN2_HI))), $mul(n, c(EXP_LN2_LO)));
            let mut p = c(EXP_POLY[0]);
            for &k in &EXP_POLY[1..] {
                p = $add($mul(p, r), c(k));
            }
            let y = $add($add($mul(p, $mul(r, r)), r), c(1.0));
            $mul(y, $pow2(t))
        }
    };
}

exp_approx_kernel!(
    /// [`exp_approx`] on eight lanes.
    exp_approx_avx2, "avx2", std::arch::x86_64::__m256, _mm256_set1_ps, _mm256_add_ps, _mm256_sub_ps,
    _mm256_mul_ps, clamp_avx2, pow2_avx2
);
exp_approx_kernel!(
    /// [`exp_approx`] on sixteen lanes.
    exp_approx_avx512, "avx512f,avx2", std::arch::x86_64::__m512, _mm512_set1_ps, _mm512_add_ps, _mm512_sub_ps,
    _mm512_mul_ps, clamp_avx512, pow2_avx512
);

/// [`exp_approx`]'s clamp on eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn clamp_avx2(
    x: std::arch::x86_64::__m256,
    lo: std::arch::x86_64::__m256,
    hi: std::arch::x86_64::__m256,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_blendv_ps(x, hi, _mm256_cmp_ps::<_CMP_GT_OQ>(x, hi));
    _mm256_blendv_ps(x, lo, _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo))
}

/// [`exp_approx`]'s clamp on sixteen lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[inline]
unsafe fn clamp_avx512(
    x: std::arch::x86_64::__m512,
    lo: std::arch::x86_64::__m512,
    hi: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, hi), x, hi);
    _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo), x, lo)
}

/// 2ⁿ on eight lanes from `t` = x·log2(e) + 1.5·2²³: adding 127 and shifting puts n + 127 in
/// the exponent field and drops the rest.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn pow2_avx2(t: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_castps_si256(t),
        _mm256_set1_epi32(127),
    )))
}

/// [`pow2_avx2`] on sixteen lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[inline]
unsafe fn pow2_avx512(t: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_castps_si512(t),
        _mm512_set1_epi32(127),
    )))
}

#[inline(always)]
fn exp_shifted_sum_body(x: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            c[l] = exp_approx(c[l] - shift);
            lanes[l] += c[l];
        }
    }
    exp_sum_finish(lanes, chunks.into_remainder(), shift)
}

/// The end of [`exp_shifted_sum`], shared by both paths: the tail's exponentials, then the
/// eight lane sums added in one fixed tree, the tail's sum last.
#[inline(always)]
fn exp_sum_finish(lanes: [f32; 8], tail: &mut [f32], shift: f32) -> f32 {
    let mut rest = 0f32;
    for v in tail {
        *v = exp_approx(*v - shift);
        rest += *v;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + rest
}

/// `acc[i] += x[i]` (the residual connection).
pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len());
    for (a, v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn close(a: &[f32], b: &[f64]) {
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!(
                (*p as f64 - q).abs() <= 1e-5 * (1.0 + q.abs()),
                "elem {i}: {p} vs {q}"
            );
        }
    }

    #[test]
    fn rms_norm_matches_definition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for d in [1, 7, 64, 576] {
            let rows = 3;
            let x: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-3.0..3.0)).collect();
            let w: Vec<f32> = (0..d).map(|_| rng.random_range(0.5..1.5)).collect();
            let mut out = vec![0f32; rows * d];
            rms_norm(&x, &w, 1e-5, &mut out);
            let want: Vec<f64> = x
                .chunks(d)
                .flat_map(|r| {
                    let ms = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
                    let inv = 1.0 / (ms + 1e-5).sqrt();
                    r.iter()
                        .zip(&w)
                        .map(move |(v, g)| *v as f64 * inv * *g as f64)
                        .collect::<Vec<_>>()
                })
                .collect();
            close(&out, &want);
        }
    }

    #[test]
    fn rope_rotates_each_pair_by_its_angle() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let (rows, heads, hd) = (3, 2, 8);
        let x: Vec<f32> = (0..rows * heads * hd)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let ang: Vec<f64> = (0..rows * hd / 2)
            .map(|_| rng.random_range(-3.0..3.0))
            .collect();
        let cos: Vec<f32> = ang.iter().map(|a| a.cos() as f32).collect();
        let sin: Vec<f32> = ang.iter().map(|a| a.sin() as f32).collect();
        let mut y = x.clone();
        rope_rotate_half(&mut y, heads, hd, &cos, &sin);
        let mut want = vec![0f64; x.len()];
        for r in 0..rows {
            for h in 0..heads {
                for i in 0..hd / 2 {
                    let base = (r * heads + h) * hd;
                    let (a, b) = (x[base + i] as f64, x[base + i + hd / 2] as f64);
                    let t = ang[r * hd / 2 + i];
                    want[base + i] = a * t.cos() - b * t.sin();
                    want[base + i + hd / 2] = b * t.cos() + a * t.sin();
                }
            }
        }
        close(&y, &want);
    }

    /// SiLU through the AVX2 lanes, the pool's chunks and the plain loop: the same bits.
    #[test]
    fn silu_mul_fast_and_parallel_equal_plain() {
        for n in [5usize, 64, 77, 70_003] {
            let mut g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 12.0).collect();
            if n > 10 {
                g[3] = f32::NAN;
                g[4] = -1e9;
                g[5] = 1e9;
            }
            let u: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let (mut a, mut b) = (g.clone(), g.clone());
            silu_mul(&mut a, &u);
            silu_mul_body(&mut b, &u);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "n={n}"
            );
            // The AVX2 lanes too where `silu_mul` took the 512-bit ones.
            #[cfg(target_arch = "x86_64")]
            if crate::has_avx2_fma() {
                let mut c = g.clone();
                // SAFETY: AVX2 checked just above.
                unsafe { silu_mul_avx2(&mut c, &u) };
                assert_eq!(
                    c.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "avx2 n={n}"
                );
            }
        }
    }

    /// The AVX2 softmax numerators and sum are the plain loop's bits, extremes and NaN too.
    #[test]
    fn exp_shifted_sum_fast_equals_plain() {
        let mut x: Vec<f32> = (0..203).map(|i| (i as f32 * 0.7311).sin() * 30.0).collect();
        x[3] = f32::NAN;
        x[9] = -1e9;
        x[10] = 1e9;
        x[17] = -87.3;
        x[18] = 88.3;
        x[40] = f32::NEG_INFINITY;
        for shift in [0.0f32, 12.5, -3.0] {
            let (mut a, mut b) = (x.clone(), x.clone());
            let sa = exp_shifted_sum(&mut a, shift);
            let sb = exp_shifted_sum_body(&mut b, shift);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(sa.to_bits(), sb.to_bits());
            // The AVX2 lanes too where `exp_shifted_sum` took the 512-bit ones.
            #[cfg(target_arch = "x86_64")]
            if crate::has_avx2_fma() {
                let mut c = x.clone();
                // SAFETY: AVX2 checked just above.
                let sc = unsafe { exp_shifted_sum_avx2(&mut c, shift) };
                assert_eq!(
                    c.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
                assert_eq!(sc.to_bits(), sb.to_bits());
            }
        }
    }

    /// The vectorizable exp against f64, over the range a softmax and SiLU meet, and the same
    /// bits whether it runs in vector lanes or alone.
    #[test]
    fn exp_approx_is_accurate_and_lane_independent() {
        let mut worst = 0f64;
        let xs: Vec<f32> = (-8700..=8800).map(|i| i as f32 * 0.01 + 0.003).collect();
        for &x in &xs {
            let (got, want) = (exp_approx(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp_approx(f32::NAN).is_nan());
        assert!(exp_approx(-1e9) > 0.0 && exp_approx(1e9).is_finite());
        // softmax-like inputs: x − max in [-20, 0]
        let ys: Vec<f32> = (0..1001).map(|i| 1.5 - i as f32 * 0.02).collect();
        let mut v = ys.clone();
        let sum = exp_shifted_sum(&mut v, 1.5);
        let mut want_sum = 0f64;
        for (a, &y) in v.iter().zip(&ys) {
            assert_eq!(a.to_bits(), exp_approx(y - 1.5).to_bits());
            want_sum += *a as f64;
        }
        assert!((sum as f64 / want_sum - 1.0).abs() < 1e-5);
        // a value does not depend on its neighbours (tails and lanes agree)
        for n in [1, 7, 8, 9, 17] {
            let mut a = xs[..n].to_vec();
            exp_shifted_sum(&mut a, 0.0);
            let mut b = vec![0f32; n];
            b[n - 1] = xs[n - 1];
            exp_shifted_sum(&mut b[n - 1..], 0.0);
            assert_eq!(a[n - 1].to_bits(), b[n - 1].to_bits(), "n={n}");
        }
    }

    #[test]
    fn silu_mul_and_add() {
        let mut g = vec![-2.0f32, 0.0, 1.5];
        silu_mul(&mut g, &[2.0, 3.0, -1.0]);
        let want: Vec<f64> = [(-2.0f64, 2.0), (0.0, 3.0), (1.5, -1.0)]
            .iter()
            .map(|(a, u)| a / (1.0 + (-a).exp()) * u)
            .collect();
        close(&g, &want);
        let mut acc = vec![1.0f32, 2.0];
        add_assign(&mut acc, &[0.5, -2.0]);
        assert_eq!(acc, vec![1.5, 0.0]);
    }
}
