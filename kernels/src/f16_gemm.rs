//! `out[m×n] = x[m×k] · w[n×k]ᵀ` with f32 activations and f16 weights, accumulating in f32.
//!
//! This is the shape of every linear layer in decode (m = 1) and speculative verification
//! (m = 2…9). Decode is bound by reading the weights, so each weight row is read from memory
//! once and dotted with all m activation rows while it sits in L1: verifying k+1 tokens then
//! costs little more than decoding one. candle's f16 matmul would convert the activations to
//! f16 (losing precision) and is not tuned for small m, hence this kernel.

use half::f16;

/// Plain reference: the definition the fast path is tested against.
pub fn matmul_f16_reference(x: &[f32], w: &[f16], m: usize, k: usize, n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(out.len(), m * n);
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for p in 0..k {
                acc += x[i * k + p] as f64 * w[j * k + p].to_f64();
            }
            out[i * n + j] = acc as f32;
        }
    }
}

/// Weight rows handed to one pool task: enough work to amortize scheduling, few enough to
/// balance across cores.
const ROWS_PER_TASK: usize = 64;
/// Activation rows per pass over a weight row: the AVX2 kernel's register budget (see
/// `group_f16_avx2`).
const ROW_GROUP: usize = 6;

/// Fast path: SIMD where the CPU has it, parallel over weight rows.
///
/// Panics if the slice lengths do not match `m`, `k`, `n` (a caller bug, never input data).
pub fn matmul_f16(x: &[f32], w: &[f16], m: usize, k: usize, n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    let dot = select_kernel();
    crate::rows::par_weight_rows(out, m, n, ROWS_PER_TASK, ROW_GROUP, |j, i0, g, o| {
        dot(&w[j * k..(j + 1) * k], &x[i0 * k..(i0 + g) * k], g, k, o)
    });
}

/// Dots one weight row with `m` activation rows of length `k`, writing `m` results.
type RowDot = fn(&[f16], &[f32], usize, usize, &mut [f32]);

fn select_kernel() -> RowDot {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::has_avx2_fma() {
            return row_dot_avx2_entry;
        }
    }
    row_dot_scalar
}

fn row_dot_scalar(w: &[f16], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate().take(m) {
        let xr = &x[i * k..(i + 1) * k];
        *o = w.iter().zip(xr).map(|(a, b)| a.to_f32() * b).sum();
    }
}

#[cfg(target_arch = "x86_64")]
fn row_dot_avx2_entry(w: &[f16], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    // SAFETY: only selected after runtime detection of avx2, fma and f16c.
    unsafe { row_dot_avx2(w, x, m, k, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot_avx2(w: &[f16], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    // Up to 6 activation rows share each converted weight vector (a 5-token verification
    // pass converts every weight once, not twice as groups of 4 + 1 did).
    let mut i = 0;
    while i < m {
        let g = (m - i).min(ROW_GROUP);
        let (xs, o) = (&x[i * k..], &mut out[i..i + g]);
        match g {
            1 => group_f16_avx2::<1>(w, xs, k, o),
            2 => group_f16_avx2::<2>(w, xs, k, o),
            3 => group_f16_avx2::<3>(w, xs, k, o),
            4 => group_f16_avx2::<4>(w, xs, k, o),
            5 => group_f16_avx2::<5>(w, xs, k, o),
            _ => group_f16_avx2::<6>(w, xs, k, o),
        }
        i += g;
    }
}

/// One weight row against `G` activation rows. Each row has two accumulators (even and odd
/// 8-lane halves of every 16 weights) so FMA latency is hidden even at G = 1, and every G
/// sums in exactly the same order: a row's result never depends on how many rows came with
/// it (prefill, decode, verification and batching give identical logits). 6 rows × 2
/// accumulators + 2 weight vectors fill the 16 vector registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_f16_avx2<const G: usize>(w: &[f16], x: &[f32], k: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let k16 = k / 16 * 16;
    let wp = w.as_ptr() as *const u16;
    let xp = x.as_ptr();
    let mut a0 = [_mm256_setzero_ps(); G];
    let mut a1 = [_mm256_setzero_ps(); G];
    let mut p = 0;
    while p < k16 {
        // Decode streams weights from DRAM: asking for them ~1 KB ahead measured 15-20%
        // faster than leaving it to the hardware prefetcher (a row is only ~1-3 KB).
        _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(p + crate::PREFETCH_BYTES / 2) as *const i8);
        let w0 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(p) as *const __m128i));
        let w1 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(p + 8) as *const __m128i));
        for r in 0..G {
            let xr = xp.add(r * k + p);
            a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a0[r]);
            a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), a1[r]);
        }
        p += 16;
    }
    for r in 0..G {
        let s = _mm256_add_ps(a0[r], a1[r]);
        let mut acc = crate::hsum256(s);
        for t in k16..k {
            acc += w[t].to_f32() * x[r * k + t];
        }
        out[r] = acc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn check(m: usize, k: usize, n: usize, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w: Vec<f16> = (0..n * k)
            .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
            .collect();
        let mut a = vec![0f32; m * n];
        let mut b = vec![0f32; m * n];
        matmul_f16_reference(&x, &w, m, k, n, &mut a);
        matmul_f16(&x, &w, m, k, n, &mut b);
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            let tol = 1e-4 * (k as f32).sqrt().max(1.0);
            assert!(
                (p - q).abs() <= tol,
                "m={m} k={k} n={n} idx {i}: {p} vs {q}"
            );
        }
    }

    #[test]
    fn fast_matches_reference_on_odd_shapes() {
        let mut seed = 0;
        for m in [1, 2, 3, 4, 5, 7, 9] {
            for k in [1, 7, 16, 17, 64, 172, 576] {
                for n in [1, 3, 65, 130] {
                    seed += 1;
                    check(m, k, n, seed);
                }
            }
        }
    }

    /// A row's result is bit-identical whatever rows come with it (see `group_f16_avx2`).
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(99);
        let (m, k, n) = (9, 576, 33);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w: Vec<f16> = (0..n * k)
            .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
            .collect();
        let mut all = vec![0f32; m * n];
        matmul_f16(&x, &w, m, k, n, &mut all);
        for i in 0..m {
            let mut one = vec![0f32; n];
            matmul_f16(&x[i * k..(i + 1) * k], &w, 1, k, n, &mut one);
            assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
        }
    }

    #[test]
    fn empty_is_a_no_op() {
        let mut out = vec![];
        matmul_f16(&[], &[], 0, 4, 0, &mut out);
        assert!(out.is_empty());
    }
}
