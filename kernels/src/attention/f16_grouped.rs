//! The grouped kernels over an f16 cache: a KV head's query heads (up to [`GROUP_MOST`]) score
//! and accumulate against the same f16 key and value rows, widened once in registers for all
//! of them, each sum in the order of the f32 kernels (the same bits).

use super::*;

/// Most queries the grouped f16 kernels take at once: a KV head's group on SmolLM2 (larger
/// groups go three at a time). Their accumulators, query chunks and a key chunk fit AVX2's
/// sixteen registers (three queries by two keys for the scores, by two value chunks for the
/// weighted sums).
#[cfg(target_arch = "x86_64")]
pub(super) const GROUP_MOST: usize = 3;

/// Most queries in a unit for which the grouped f16 kernels run with AVX2. The `attn_hot` example,
/// SmolLM2's shape at 512 cached keys, 2 threads, µs per call, widened into memory once per
/// unit against in registers once per group: one row (3 queries a unit) 24-27 against 15-19,
/// two rows (3) 42.7 against 35.9, four rows (6) 64.9 against 65.2 (and in whole passes,
/// `bench --verify 4 --context 768`, 9-13% more passes/s), eight rows (9) 117 against 124,
/// 32 rows (24) 478 against 569.
pub(super) const GROUPED_UNIT_MOST: usize = 6;

/// Most queries in a unit for which the grouped f16 kernels run: [`GROUPED_UNIT_MOST`] with
/// AVX2, every unit with AVX-512, whose 512-bit conversions widen a block for each group at
/// less cost than the widened block's reads for all of them. The `attn_hot` example on a
/// 2-core Xeon (Emerald Rapids), 2 threads, µs per call, alternated, grouped against
/// widened: eight rows at 256 keys 95-109 against 114-146, at 512 172-198 against 195-265;
/// sixteen rows at 256 keys 194-209 against 235-257; a 128-row prefill after 128 keys
/// 1007-1059 against 1139-1286.
pub(super) fn grouped_unit_most() -> usize {
    if avx512_available() {
        QUERIES_PER_UNIT
    } else {
        GROUPED_UNIT_MOST
    }
}

/// Runs of consecutive queries that see the same number (> 0) of a block's rows, at most
/// [`GROUP_MOST`] long: (first, end, rows). A causal pass's queries of one row (a KV head's
/// group) see the same keys; only the last block of a multi-row pass differs between rows.
#[cfg(target_arch = "x86_64")]
pub(super) fn same_row_runs<'a>(
    queries: &'a [Query],
    rows: impl Fn(&Query) -> usize + 'a,
) -> impl Iterator<Item = (usize, usize, usize)> + 'a {
    let mut x0 = 0;
    std::iter::from_fn(move || loop {
        if x0 >= queries.len() {
            return None;
        }
        let n = rows(&queries[x0]);
        let mut x1 = x0 + 1;
        while x1 < queries.len() && x1 - x0 < GROUP_MOST && rows(&queries[x1]) == n {
            x1 += 1;
        }
        let run = (x0, x1, n);
        x0 = x1;
        if n > 0 {
            return Some(run);
        }
    })
}

/// Scores of up to [`GROUP_MOST`] queries (`qs`, vectors in `q`) against the first `n` key rows
/// of an f16 block, into `scores` (query x's at `at + x · stride`); returns each query's
/// maximum. Each f16 key is widened once, in registers, for all the queries (instead of
/// widened into memory and read back once per query: a third of a one-token step's
/// attention), two keys at a time; every score is bit for bit [`score_rows_avx2`]'s on the
/// widened key (the same lanes, products and reduction tree: `dot`'s). An odd last key is
/// widened into `wide` and takes [`score_rows_avx2`].
///
/// With `avx512`, the first multiple of eight keys take [`score_f16_avx512`] (the same bits).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (and AVX-512F with `avx512`), and d is a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn score_rows_f16_grouped(
    avx512: bool,
    qs: &[Query],
    q: &[f32],
    d: usize,
    keys: &[half::f16],
    n: usize,
    scale: f32,
    scores: &mut [f32],
    at: usize,
    stride: usize,
    wide: &mut Vec<f32>,
) -> [f32; GROUP_MOST] {
    let g = qs.len();
    assert!(
        (1..=GROUP_MOST).contains(&g)
            && d.is_multiple_of(8)
            && keys.len() >= n * d
            && scores.len() >= at + (g - 1) * stride + n
            && qs.iter().all(|x| q.len() >= (x.row + 1) * d)
    );
    let even = n / 2 * 2;
    // Slots past the group repeat its last query (valid pointers, never used).
    let qp: [*const f32; GROUP_MOST] =
        std::array::from_fn(|x| q.as_ptr().add(qs[x.min(g - 1)].row * d));
    let op: [*mut f32; GROUP_MOST] =
        std::array::from_fn(|x| scores.as_mut_ptr().add(at + x.min(g - 1) * stride));
    let kp = keys.as_ptr() as *const u16;
    let ahead = keys.len();
    // Eight keys at a time in 512-bit registers where the CPU has them, then two at a time.
    let wide_rows = if avx512 {
        n / KEYS_PER_ZMM_STEP * KEYS_PER_ZMM_STEP
    } else {
        0
    };
    let mut max = [f32::NEG_INFINITY; GROUP_MOST];
    for (zmm, from, to) in [(true, 0, wide_rows), (false, wide_rows, even)] {
        if from == to {
            continue;
        }
        let (kp, rows) = (kp.add(from * d), to - from);
        let op: [*mut f32; GROUP_MOST] = std::array::from_fn(|x| op[x].add(from));
        macro_rules! run {
            ($kernel:ident) => {
                match g {
                    1 => spread($kernel::<1>([qp[0]], kp, d, rows, scale, ahead, [op[0]])),
                    2 => spread($kernel::<2>(
                        [qp[0], qp[1]],
                        kp,
                        d,
                        rows,
                        scale,
                        ahead,
                        [op[0], op[1]],
                    )),
                    _ => $kernel::<3>(qp, kp, d, rows, scale, ahead, op),
                }
            };
        }
        let m = if zmm {
            run!(score_f16_avx512)
        } else {
            run!(score_f16_avx2)
        };
        for (mx, m) in max.iter_mut().zip(m) {
            *mx = mx.max(m);
        }
    }
    if even < n {
        let tail = half::f16::widen(true, &keys[even * d..n * d], wide);
        for (x, qy) in qs.iter().enumerate() {
            let out = &mut scores[at + x * stride + even..][..n - even];
            let m = score_rows_avx2(&q[qy.row * d..][..d], tail, scale, out);
            max[x] = max[x].max(m);
        }
    }
    max
}

/// A shorter group's maxima in a [`GROUP_MOST`]-long array (the rest unused).
#[cfg(target_arch = "x86_64")]
pub(super) fn spread<const Q: usize>(m: [f32; Q]) -> [f32; GROUP_MOST] {
    std::array::from_fn(|x| m.get(x).copied().unwrap_or(f32::NEG_INFINITY))
}

/// [`score_rows_f16_grouped`]'s core: `rows` (even) keys from `kp`, d wide, against Q query
/// vectors, two keys at a time (Q · 2 accumulators, the Q query chunks and a key in
/// registers: four keys at a time spilled accumulators to the stack), scores to `out[x]`;
/// prefetches the block `ahead` values on.
///
/// # Safety
/// As [`score_rows_f16_grouped`]; every pointer covers what it is read or written at.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn score_f16_avx2<const Q: usize>(
    qp: [*const f32; Q],
    kp: *const u16,
    d: usize,
    rows: usize,
    scale: f32,
    ahead: usize,
    out: [*mut f32; Q],
) -> [f32; Q] {
    use std::arch::x86_64::*;
    let scale8 = _mm256_set1_ps(scale);
    let scale_v = _mm256_castps256_ps128(scale8);
    // After the reduction key 0 sits in lanes 0-3 and key 1 in lanes 4-7.
    let order = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    let mut max_v = [_mm256_set1_ps(f32::NEG_INFINITY); Q];
    // Two keys' eight-lane accumulators per query, from widened key chunks.
    let pair = |j: usize| {
        let mut a = [[_mm256_setzero_ps(); 2]; Q];
        let (k0, k1) = (kp.add(j * d), kp.add((j + 1) * d));
        let mut c = 0;
        while c < d {
            if c % 32 == 0 {
                // The next block of this KV head sits `ahead` values on (a prefetch never
                // faults past the end).
                _mm_prefetch::<_MM_HINT_T0>(k0.wrapping_add(c + ahead) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(k1.wrapping_add(c + ahead) as *const i8);
            }
            let kv0 = _mm256_cvtph_ps(_mm_loadu_si128(k0.add(c) as *const __m128i));
            let kv1 = _mm256_cvtph_ps(_mm_loadu_si128(k1.add(c) as *const __m128i));
            for (x, ax) in a.iter_mut().enumerate() {
                let qv = _mm256_loadu_ps(qp[x].add(c));
                // One fused multiply-add each, as `dot` and `score_rows_avx2`.
                ax[0] = _mm256_fmadd_ps(qv, kv0, ax[0]);
                ax[1] = _mm256_fmadd_ps(qv, kv1, ax[1]);
            }
            c += 8;
        }
        a
    };
    let mut j = 0;
    // Eight keys at a time: four pairs' accumulators kept (in memory: with the pair's own
    // accumulators they would not fit the sixteen registers) and reduced together by
    // [`sum_lanes_of_eight_keys`], the same tree as one pair's reduction below with half its
    // shuffles per key.
    while j + 8 <= rows {
        let mut held = [[_mm256_setzero_ps(); 8]; Q];
        for p in 0..4 {
            let a = pair(j + 2 * p);
            for (h, ax) in held.iter_mut().zip(&a) {
                h[2 * p] = ax[0];
                h[2 * p + 1] = ax[1];
            }
        }
        for (x, h) in held.iter().enumerate() {
            let s = _mm256_mul_ps(sum_lanes_of_eight_keys(*h), scale8);
            _mm256_storeu_ps(out[x].add(j), s);
            max_v[x] = _mm256_max_ps(max_v[x], s);
        }
        j += 8;
    }
    while j + 2 <= rows {
        let a = pair(j);
        for (x, ax) in a.iter().enumerate() {
            // Per key: lanes l and l + 4 added, then (b0 + b1) and (b2 + b3), then their
            // sum: `dot`'s tree.
            let p = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(ax[0], ax[1]),
                _mm256_permute2f128_ps::<0x31>(ax[0], ax[1]),
            );
            let h = _mm256_hadd_ps(p, p);
            let h = _mm256_permutevar8x32_ps(_mm256_hadd_ps(h, h), order);
            // [s0, s1, s0, s1]: the maximum is the same with each score twice.
            let s = _mm_mul_ps(_mm256_castps256_ps128(h), scale_v);
            _mm_storel_pd(out[x].add(j) as *mut f64, _mm_castps_pd(s));
            max_v[x] = _mm256_max_ps(max_v[x], _mm256_set_m128(s, s));
        }
        j += 2;
    }
    std::array::from_fn(|x| lane_max(max_v[x]))
}

/// Adds up to [`GROUP_MOST`] queries' weighted sums of the first `n` value rows of an f16
/// block to their outputs: query x's weights at `weights[x · w_stride..][..n]`, its d sums at
/// `out[x · o_stride..][..d]`. Each value is widened once, in registers, for all the queries;
/// each output element adds its rows in order, one fused multiply-add each, so every sum is
/// bit for bit [`accumulate_rows_avx2`]'s on the widened rows.
///
/// With `avx512`, 16 outputs per register ([`accumulate_f16_avx512`], the same bits).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (and AVX-512F with `avx512`), and d is a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn accumulate_rows_f16_grouped(
    avx512: bool,
    vals: &[half::f16],
    d: usize,
    n: usize,
    g: usize,
    weights: &[f32],
    w_stride: usize,
    out: &mut [f32],
    o_stride: usize,
) {
    assert!(
        (1..=GROUP_MOST).contains(&g)
            && d.is_multiple_of(8)
            && vals.len() >= n * d
            && weights.len() >= (g - 1) * w_stride + n
            && out.len() >= (g - 1) * o_stride + d
    );
    // Slots past the group repeat its last query (valid pointers, never used).
    let wp: [*const f32; GROUP_MOST] =
        std::array::from_fn(|x| weights.as_ptr().add(x.min(g - 1) * w_stride));
    let op: [*mut f32; GROUP_MOST] =
        std::array::from_fn(|x| out.as_mut_ptr().add(x.min(g - 1) * o_stride));
    let vp = vals.as_ptr() as *const u16;
    let ahead = vals.len();
    let mut c0 = 0;
    while c0 < d {
        // Q · N accumulators, Q weights and a value chunk stay in the registers: AVX-512's 32
        // hold up to four chunks of 16 for three queries, AVX2's sixteen two chunks of 8.
        let wide = avx512 && d - c0 >= 16;
        let lanes = if wide { 16 } else { 8 };
        let most = if !wide && g == GROUP_MOST { 2 } else { 4 };
        let chunks = ((d - c0) / lanes).min(most);
        macro_rules! run {
            ($kernel:ident, $q:literal, $n:literal) => {
                $kernel::<$q, $n>(
                    std::array::from_fn(|x| wp[x]),
                    vp,
                    d,
                    n,
                    c0,
                    ahead,
                    std::array::from_fn(|x| op[x]),
                )
            };
        }
        macro_rules! by_shape {
            ($kernel:ident) => {
                match (g, chunks) {
                    (1, 4) => run!($kernel, 1, 4),
                    (1, 3) => run!($kernel, 1, 3),
                    (1, 2) => run!($kernel, 1, 2),
                    (1, _) => run!($kernel, 1, 1),
                    (2, 4) => run!($kernel, 2, 4),
                    (2, 3) => run!($kernel, 2, 3),
                    (2, 2) => run!($kernel, 2, 2),
                    (2, _) => run!($kernel, 2, 1),
                    (_, 4) => run!($kernel, 3, 4),
                    (_, 3) => run!($kernel, 3, 3),
                    (_, 2) => run!($kernel, 3, 2),
                    (_, _) => run!($kernel, 3, 1),
                }
            };
        }
        if wide {
            by_shape!(accumulate_f16_avx512)
        } else {
            by_shape!(accumulate_f16_avx2)
        }
        c0 += lanes * chunks;
    }
}

/// Defines a grouped f16 weighted-sum kernel for one register width: outputs `c0 .. c0 +
/// lanes·N` of Q queries in [`accumulate_rows_f16_grouped`], held in registers over the `rows`
/// value rows, each value widened once for all the queries, each element its rows added in
/// order, one fused multiply-add each (the same bits at either width).
///
/// # Safety (of the kernels it defines)
/// As [`accumulate_rows_f16_grouped`] (and the CPU has the kernel's features); every pointer
/// covers what it is read or written at.
macro_rules! accumulate_f16_kernel {
    ($(#[$doc:meta])* $name:ident, $feature:literal, $v:ty, $lanes:literal, $widen:ident,
     $zero:ident, $load:ident, $store:ident, $set1:ident, $fma:ident) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn $name<const Q: usize, const N: usize>(
            wp: [*const f32; Q],
            vp: *const u16,
            d: usize,
            rows: usize,
            c0: usize,
            ahead: usize,
            op: [*mut f32; Q],
        ) {
            use std::arch::x86_64::*;
            let mut acc: [[$v; N]; Q] = [[$zero(); N]; Q];
            for (x, ax) in acc.iter_mut().enumerate() {
                for (v, a) in ax.iter_mut().enumerate() {
                    *a = $load(op[x].add(c0 + $lanes * v));
                }
            }
            for j in 0..rows {
                let row = vp.add(j * d + c0);
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(ahead) as *const i8);
                let w: [$v; Q] = std::array::from_fn(|x| $set1(*wp[x].add(j)));
                for v in 0..N {
                    let vv = $widen(row.add($lanes * v));
                    for (ax, wx) in acc.iter_mut().zip(&w) {
                        // One fused multiply-add, as the plain loop.
                        ax[v] = $fma(*wx, vv, ax[v]);
                    }
                }
            }
            for (x, ax) in acc.iter().enumerate() {
                for (v, a) in ax.iter().enumerate() {
                    $store(op[x].add(c0 + $lanes * v), *a);
                }
            }
        }
    };
}

/// Eight f16 values from `p`, widened.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
pub(super) unsafe fn widen_f16x8(p: *const u16) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// Sixteen f16 values from `p`, widened.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[inline]
pub(super) unsafe fn widen_f16x16(p: *const u16) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
}

accumulate_f16_kernel!(
    /// Outputs `c0..c0 + 8·N` of Q queries in [`accumulate_rows_f16_grouped`].
    accumulate_f16_avx2, "avx2,fma,f16c", std::arch::x86_64::__m256, 8, widen_f16x8,
    _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps
);
accumulate_f16_kernel!(
    /// Outputs `c0..c0 + 16·N` of Q queries in [`accumulate_rows_f16_grouped`] in 512-bit
    /// registers: half the instructions and one conversion per 16 values.
    accumulate_f16_avx512, "avx512f,avx2,fma,f16c", std::arch::x86_64::__m512, 16, widen_f16x16,
    _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps
);

/// Key rows [`score_f16_avx512`] takes at a time: four pairs, a pair per 512-bit register.
#[cfg(target_arch = "x86_64")]
pub(super) const KEYS_PER_ZMM_STEP: usize = 8;

/// [`score_f16_avx2`] in 512-bit registers, eight keys at a time: each register holds two
/// keys' eight `dot` lanes (key 2p in lanes 0–7, key 2p + 1 in lanes 8–15), fed the same
/// products in the same order, and the pairs are reduced by [`sum_lanes_of_four_pairs`]
/// (`dot`'s tree), so every score is bit for bit the AVX2 kernel's. Half the fused
/// multiply-adds of the 256-bit kernel per key, and each f16 key pair widened by one
/// conversion. `rows` is a multiple of [`KEYS_PER_ZMM_STEP`].
///
/// # Safety
/// The CPU has AVX-512F, AVX2, FMA and F16C; every pointer covers what it is read or written
/// at (`rows` keys of d values from `kp`, d values per query, `rows` scores per output).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn score_f16_avx512<const Q: usize>(
    qp: [*const f32; Q],
    kp: *const u16,
    d: usize,
    rows: usize,
    scale: f32,
    ahead: usize,
    out: [*mut f32; Q],
) -> [f32; Q] {
    use std::arch::x86_64::*;
    const PAIRS: usize = KEYS_PER_ZMM_STEP / 2;
    let scale_v = _mm256_set1_ps(scale);
    let mut max_v = [_mm256_set1_ps(f32::NEG_INFINITY); Q];
    let mut j = 0;
    while j + KEYS_PER_ZMM_STEP <= rows {
        let mut a = [[_mm512_setzero_ps(); PAIRS]; Q];
        let k: [*const u16; KEYS_PER_ZMM_STEP] = std::array::from_fn(|r| kp.add((j + r) * d));
        let mut c = 0;
        while c < d {
            if c % 32 == 0 {
                // The next block of this KV head sits `ahead` values on (a prefetch never
                // faults past the end).
                for kr in k {
                    _mm_prefetch::<_MM_HINT_T0>(kr.wrapping_add(c + ahead) as *const i8);
                }
            }
            let kv: [__m512; PAIRS] = std::array::from_fn(|p| {
                let lo = _mm_loadu_si128(k[2 * p].add(c) as *const __m128i);
                let hi = _mm_loadu_si128(k[2 * p + 1].add(c) as *const __m128i);
                _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi))
            });
            for (x, ax) in a.iter_mut().enumerate() {
                // The query's chunk in both halves.
                let qv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(
                    _mm256_loadu_ps(qp[x].add(c)),
                )));
                for (ap, kvp) in ax.iter_mut().zip(&kv) {
                    // One fused multiply-add, as `dot` and `score_rows_avx2`.
                    *ap = _mm512_fmadd_ps(qv, *kvp, *ap);
                }
            }
            c += 8;
        }
        for (x, ax) in a.iter().enumerate() {
            let s = _mm256_mul_ps(sum_lanes_of_four_pairs(ax), scale_v);
            _mm256_storeu_ps(out[x].add(j), s);
            max_v[x] = _mm256_max_ps(max_v[x], s);
        }
        j += KEYS_PER_ZMM_STEP;
    }
    std::array::from_fn(|x| lane_max(max_v[x]))
}

/// Eight keys' dot products from four key-pair registers (lanes 0–7 key 2p's eight `dot`
/// lanes, 8–15 key 2p + 1's), in key order: per key `dot`'s tree, ((a0 + a4) + (a1 + a5)) +
/// ((a2 + a6) + (a3 + a7)), the same additions as [`sum_lanes_of_eight_keys`] on the halves,
/// so the same bits (tested against the 256-bit kernels). In 512-bit shuffles: 128-bit blocks
/// regrouped so one add gives four keys' (a_l + a_l+4), then two in-block shuffles and an add
/// per level of the tree, and one permutation into key order: 9 shuffles where taking the
/// halves apart and reducing them in 256-bit registers took 19, on the port the shuffles
/// share with the multiply-adds (the reduction was half a 512-bit scoring kernel's
/// instructions). `attn_hot`: see BENCHMARKS.md (session 52).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn sum_lanes_of_four_pairs(
    pairs: &[std::arch::x86_64::__m512; KEYS_PER_ZMM_STEP / 2],
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // Keys 2p, 2p + 1 (from `x`) and 2p + 2, 2p + 3 (from `y`), one per 128-bit block:
    // [a0 + a4, a1 + a5, a2 + a6, a3 + a7] =: [b0, b1, b2, b3].
    let level1 = |x: __m512, y: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
        )
    };
    // Block j: keys j (from keys 0–3) and 4 + j (from keys 4–7).
    let (lo, hi) = (level1(pairs[0], pairs[1]), level1(pairs[2], pairs[3]));
    // [b0 + b1, b2 + b3] of key j, then of key 4 + j.
    let level2 = _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(lo, hi),
        _mm512_shuffle_ps::<0b11_01_11_01>(lo, hi),
    );
    // [(b0 + b1) + (b2 + b3)] of key j, of key 4 + j, then the same again.
    let sums = _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(level2, level2),
        _mm512_shuffle_ps::<0b11_01_11_01>(level2, level2),
    );
    // Key j sits at 4j, key 4 + j at 4j + 1.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_castps512_ps256(_mm512_permutexvar_ps(order, sums))
}
