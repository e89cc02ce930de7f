//! One query's scores against a block of f32 key rows, and the weighted sums of its value
//! rows: the plain loops and their AVX2 / AVX-512 kernels, each bit for bit the plain loop's
//! sums (so every path gives the same result; see the parent module).

use super::*;

/// Whether [`score_rows_avx2`] and [`accumulate_rows_avx2`] can run here (with a head size
/// that is a multiple of 8).
#[inline(always)]
pub(super) fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::has_avx2_fma();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the 512-bit kernels can run here (see [`crate::has_avx512`]).
#[inline(always)]
pub(super) fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::has_avx512();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One query's scores against the key rows of `keys` into `out`; returns their maximum.
/// `simd`: [`simd_available`] and the head size a multiple of 8; `avx512`: `simd` and
/// [`avx512_available`].
#[inline(always)]
pub(super) fn score_block(
    simd: bool,
    avx512: bool,
    q: &[f32],
    keys: &[f32],
    scale: f32,
    out: &mut [f32],
) -> f32 {
    let d = q.len();
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA and d is a multiple of 8 (what `avx512`
        // says); `out` holds a score per key row.
        return unsafe { score_rows_avx512(q, keys, scale, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the CPU has AVX2 and FMA and d is a multiple of 8 (what `simd` says);
        // `out` holds a score per key row.
        return unsafe { score_rows_avx2(q, keys, scale, out) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (simd, avx512);
    let mut max = f32::NEG_INFINITY;
    for (s, kr) in out.iter_mut().zip(keys.chunks_exact(d)) {
        let x = dot(q, kr) * scale;
        max = max.max(x);
        *s = x;
    }
    max
}

/// One query row's scores against the rows of `keys`, eight keys at a time, into `out`;
/// returns their maximum. Each key's score is bit for bit [`dot`]`(q, k) * scale`: the same
/// eight lanes accumulate the same products in the same order, and the transposing reduction
/// below adds them in `dot`'s tree, ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)), for
/// eight keys at once instead of one horizontal sum per key (which was most of a prefill's
/// attention time). Needs `q.len()` a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn score_rows_avx2(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    let d = q.len();
    let rows = out.len();
    debug_assert!(d.is_multiple_of(8) && keys.len() >= rows * d);
    let (qp, kp) = (q.as_ptr(), keys.as_ptr());
    let scale_v = _mm256_set1_ps(scale);
    let mut max_v = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut j = 0;
    while j + 8 <= rows {
        let mut a = [_mm256_setzero_ps(); 8];
        let mut c = 0;
        while c < d {
            let qv = _mm256_loadu_ps(qp.add(c));
            for (r, ar) in a.iter_mut().enumerate() {
                let kv = _mm256_loadu_ps(kp.add((j + r) * d + c));
                // One fused multiply-add, as `dot`.
                *ar = _mm256_fmadd_ps(qv, kv, *ar);
            }
            c += 8;
        }
        let s = _mm256_mul_ps(sum_lanes_of_eight_keys(a), scale_v);
        _mm256_storeu_ps(out.as_mut_ptr().add(j), s);
        max_v = _mm256_max_ps(max_v, s);
        j += 8;
    }
    let mut max = lane_max(max_v);
    while j < rows {
        let x = dot(q, &keys[j * d..][..d]) * scale;
        max = max.max(x);
        out[j] = x;
        j += 1;
    }
    max
}

/// The largest of a register's eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn lane_max(v: std::arch::x86_64::__m256) -> f32 {
    let mut lanes = [0f32; 8];
    std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), v);
    lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Eight keys' dot products from their eight-lane accumulators (`a[r]`: key r's lanes), in
/// key order: per key `dot`'s tree, ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)), for
/// all eight at once by transposing adds instead of a horizontal sum per key.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn sum_lanes_of_eight_keys(
    a: [std::arch::x86_64::__m256; 8],
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // Per key: lanes l and l + 4 added (two keys per register).
    let pair = |x: __m256, y: __m256| {
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(x, y),
            _mm256_permute2f128_ps::<0x31>(x, y),
        )
    };
    let (p01, p23, p45, p67) = (
        pair(a[0], a[1]),
        pair(a[2], a[3]),
        pair(a[4], a[5]),
        pair(a[6], a[7]),
    );
    // (b0 + b1), (b2 + b3), then their sum, per key: the keys land in lanes 0 2 4 6 1 3 5 7.
    let h = _mm256_hadd_ps(_mm256_hadd_ps(p01, p23), _mm256_hadd_ps(p45, p67));
    _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// Adds the weighted value rows of `vals` to `o` (one query's output), each element summed
/// over the rows in order. `simd` and `avx512` as for [`score_block`].
#[inline(always)]
pub(super) fn accumulate_block(
    simd: bool,
    avx512: bool,
    vals: &[f32],
    weights: &[f32],
    o: &mut [f32],
) {
    let d = o.len();
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA and d is a multiple of 8 (what `avx512`
        // says); `vals` holds a row per weight.
        unsafe { accumulate_rows_avx512(vals, weights, o) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the CPU has AVX2 and FMA and d is a multiple of 8 (what `simd` says);
        // `vals` holds a row per weight.
        unsafe { accumulate_rows_avx2(vals, weights, o) };
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (simd, avx512);
    for (vr, &w) in vals.chunks_exact(d).zip(weights) {
        for (oc, vc) in o.iter_mut().zip(vr) {
            *oc = w.mul_add(*vc, *oc);
        }
    }
}

/// Defines the weighted sums of one query's value rows for one register width: `o += Σ_j
/// weights[j] · vals[j]`, each output element summed over j in order (so bit for bit the
/// plain loop), with up to 8 registers of outputs held across all the rows instead of loaded
/// and stored per row; outputs short of a whole register take one AVX2 chunk. Needs `o.len()`
/// a multiple of 8.
macro_rules! accumulate_rows_kernel {
    ($(#[$doc:meta])* $name:ident, $feature:literal, $lanes:literal, $chunk:ident) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn $name(vals: &[f32], weights: &[f32], o: &mut [f32]) {
            let d = o.len();
            assert!(d.is_multiple_of(8) && vals.len() >= weights.len() * d);
            let mut c0 = 0;
            while d - c0 >= $lanes {
                // The register count as a constant: with it a run-time value, the loop over
                // the rows tested it for every register of every row.
                let n = ((d - c0) / $lanes).min(8);
                match n {
                    8 => $chunk::<8>(vals, weights, o, c0),
                    7 => $chunk::<7>(vals, weights, o, c0),
                    6 => $chunk::<6>(vals, weights, o, c0),
                    5 => $chunk::<5>(vals, weights, o, c0),
                    4 => $chunk::<4>(vals, weights, o, c0),
                    3 => $chunk::<3>(vals, weights, o, c0),
                    2 => $chunk::<2>(vals, weights, o, c0),
                    _ => $chunk::<1>(vals, weights, o, c0),
                }
                c0 += $lanes * n;
            }
            if c0 < d {
                accumulate_chunk_avx2::<1>(vals, weights, o, c0);
            }
        }
    };
}

accumulate_rows_kernel!(
    /// Weighted sums in 256-bit registers (up to 64 outputs held).
    accumulate_rows_avx2, "avx2,fma", 8, accumulate_chunk_avx2
);
accumulate_rows_kernel!(
    /// Weighted sums in 512-bit registers (up to 128 outputs held), the same bits as
    /// [`accumulate_rows_avx2`]; the CPU must have AVX-512F.
    accumulate_rows_avx512, "avx512f,avx2,fma", 16, accumulate_chunk_avx512
);

/// Defines a weighted-sum kernel over f32 rows for one register width: outputs `c0..c0 +
/// lanes·N` of one query held in N registers over all the rows, each element its rows added
/// in order, one fused multiply-add each (the plain loop's bits at either width).
macro_rules! accumulate_chunk_kernel {
    ($(#[$doc:meta])* $name:ident, $feature:literal, $v:ty, $lanes:literal,
     $zero:ident, $load:ident, $store:ident, $set1:ident, $fma:ident) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        #[inline]
        pub(super) unsafe fn $name<const N: usize>(
            vals: &[f32],
            weights: &[f32],
            o: &mut [f32],
            c0: usize,
        ) {
            use std::arch::x86_64::*;
            let d = o.len();
            let (vp, op) = (vals.as_ptr(), o.as_mut_ptr());
            let mut acc: [$v; N] = [$zero(); N];
            for (v, a) in acc.iter_mut().enumerate() {
                *a = $load(op.add(c0 + $lanes * v));
            }
            for (j, &w) in weights.iter().enumerate() {
                let wv = $set1(w);
                let row = vp.add(j * d + c0);
                for (v, a) in acc.iter_mut().enumerate() {
                    // One fused multiply-add, as the plain loop.
                    *a = $fma(wv, $load(row.add($lanes * v)), *a);
                }
            }
            for (v, a) in acc.iter().enumerate() {
                $store(op.add(c0 + $lanes * v), *a);
            }
        }
    };
}

accumulate_chunk_kernel!(
    /// Outputs `c0..c0 + 8·N` of [`accumulate_rows_avx2`], held in N registers over all the rows.
    accumulate_chunk_avx2, "avx2,fma", std::arch::x86_64::__m256, 8,
    _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps
);
accumulate_chunk_kernel!(
    /// Outputs `c0..c0 + 16·N` of [`accumulate_rows_avx512`], held in N registers over the rows.
    accumulate_chunk_avx512, "avx512f,avx2,fma", std::arch::x86_64::__m512, 16,
    _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps
);

/// [`score_rows_avx2`] in 512-bit registers: each register holds two keys' eight `dot` lanes
/// (built from the two rows' chunks), fed the same products in the same order and reduced by
/// the same tree, so every score is bit for bit the AVX2 kernel's with half the multiplies and
/// adds. Needs `q.len()` a multiple of 8.
///
/// # Safety
/// The CPU has AVX-512F, AVX2 and FMA; `keys` holds `out.len()` rows of `q.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn score_rows_avx512(
    q: &[f32],
    keys: &[f32],
    scale: f32,
    out: &mut [f32],
) -> f32 {
    use std::arch::x86_64::*;
    const PAIRS: usize = KEYS_PER_ZMM_STEP / 2;
    let d = q.len();
    let rows = out.len();
    assert!(d.is_multiple_of(8) && keys.len() >= rows * d);
    let (qp, kp) = (q.as_ptr(), keys.as_ptr());
    let scale_v = _mm256_set1_ps(scale);
    let mut max_v = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut j = 0;
    while j + KEYS_PER_ZMM_STEP <= rows {
        let mut a = [_mm512_setzero_ps(); PAIRS];
        let mut c = 0;
        while c < d {
            // The query's chunk in both halves.
            let qv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(
                qp.add(c),
            ))));
            for (p, ap) in a.iter_mut().enumerate() {
                let lo = _mm256_loadu_ps(kp.add((j + 2 * p) * d + c));
                let hi = _mm256_loadu_ps(kp.add((j + 2 * p + 1) * d + c));
                let kv = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                    _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                    _mm256_castps_pd(hi),
                ));
                // One fused multiply-add, as `dot`.
                *ap = _mm512_fmadd_ps(qv, kv, *ap);
            }
            c += 8;
        }
        let s = _mm256_mul_ps(sum_lanes_of_four_pairs(&a), scale_v);
        _mm256_storeu_ps(out.as_mut_ptr().add(j), s);
        max_v = _mm256_max_ps(max_v, s);
        j += KEYS_PER_ZMM_STEP;
    }
    let max = lane_max(max_v);
    if j < rows {
        let m = score_rows_avx2(q, &keys[j * d..], scale, &mut out[j..]);
        return max.max(m);
    }
    max
}
