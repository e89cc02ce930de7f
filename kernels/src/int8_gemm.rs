//! `out[m×n] = x[m×k] · Wᵀ` for Q8_0, Q4_0, Q5_0, Q4_K and Q6_K weights with the activations
//! rounded to 8 bits,
//! the way llama.cpp runs these formats: each 32-wide block of x becomes an f32 scale
//! `d = max|x|/127` and 32 signed bytes `round(x/d)`, and each block dot product is an
//! integer sum scaled by `d_w·d_x`. Q4_K's 256-weight blocks are eight 32-weight sub-blocks,
//! each `d·scale_j·q − dmin·min_j`, so they meet the same 32-wide activation blocks: the
//! integer dot of the levels, and the min term through the block's sum of activation levels
//! (llama.cpp rounds activations for Q4_K to 256-wide Q8_K blocks instead; the 32-wide ones
//! keep one activation format for every weight format). Q5_0's 5-bit levels − 16 and Q6_K's
//! 6-bit levels − 32 (with an 8-bit scale per 16 weights) fit a signed byte like the others (llama.cpp's Q4_K_M files hold Q5_0 where a row is not a multiple of
//! 256, e.g. SmolLM2's 576).
//!
//! Why a second path beside `quant_gemm` (which keeps x in f32): widening every weight to f32
//! costs more instructions per weight byte than this CPU can stream (Q4_0 at ~5 GB/s of weights
//! on two cores); integer dot products (`vpmaddubsw`) take 32 weights per instruction. The price
//! is llama.cpp's: a small extra rounding of the activations (measured in BENCHMARKS.md). The
//! model crate picks the path per layer (`ActivationPrecision`).

use crate::quant_gemm::{scale_min_k4, BlockFormat, BLOCK, QK_K};
use half::f16;
use std::cell::RefCell;

/// Activations rounded to 8 bits: `scales[i·k/32 + b]` and `quants[i·k + p]` for row i.
#[derive(Debug, Default, Clone)]
pub struct Int8Rows {
    pub scales: Vec<f32>,
    pub quants: Vec<i8>,
    /// Σ quants per block (Q4_K's min term, and Q4_0 tiles' −8 offset).
    pub sums: Vec<i32>,
}

impl Int8Rows {
    /// Rounds `x` (rows of length k, k a multiple of 32), reusing this buffer's memory.
    pub fn quantize(&mut self, x: &[f32], k: usize) {
        assert!(
            k.is_multiple_of(BLOCK),
            "row length {k} is not a multiple of 32"
        );
        let blocks = x.len() / BLOCK;
        // Sized without zeroing what is kept (`resize` fills only a grown tail): both paths
        // below write every element, so a clear first was a memset per call for nothing (the
        // same waste attention's scratch had, see `attention::grown`).
        self.quants.resize(x.len(), 0);
        self.scales.resize(blocks, 0.0);
        self.sums.resize(blocks, 0);
        #[cfg(target_arch = "x86_64")]
        if crate::has_avx2_fma() {
            // SAFETY: AVX2 (and FMA/F16C) detected; the three buffers were sized above.
            return unsafe { self.quantize_avx2(x) };
        }
        self.quantize_blocks(x);
    }

    /// The plain rounding of `x`'s blocks (the reference the AVX2 path matches bit for bit):
    /// `d = max|x|/127`, levels `round(x/d)` (halves away from zero), NaN to 0.
    fn quantize_blocks(&mut self, x: &[f32]) {
        for (b, blk) in x.chunks_exact(BLOCK).enumerate() {
            let q = &mut self.quants[b * BLOCK..][..BLOCK];
            let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (qv, v) in q.iter_mut().zip(blk) {
                *qv = (v * id).round() as i8;
            }
            self.scales[b] = d;
            self.sums[b] = q.iter().map(|&v| v as i32).sum();
        }
    }

    /// [`Int8Rows::quantize_blocks`] eight lanes at a time. Why by hand: `f32::round` is a libm
    /// call per element on baseline x86-64, and rounding a verification pass's activations
    /// took ~22 µs per 8 × 576 call, a third of a Q8_0 verification pass of SmolLM2 (seven
    /// calls per layer).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_avx2(&mut self, x: &[f32]) {
        use std::arch::x86_64::*;
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        // packs interleave 128-bit lanes; this puts the 32 bytes back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (b, blk) in x.chunks_exact(BLOCK).enumerate() {
            let p = blk.as_ptr();
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
            // max(|v|, acc) keeps acc where v is NaN, as f32::max does.
            let mut amax = _mm256_setzero_ps();
            for vi in v {
                amax = _mm256_max_ps(_mm256_and_ps(vi, abs_mask), amax);
            }
            let m4 = _mm_max_ps(
                _mm256_castps256_ps128(amax),
                _mm256_extractf128_ps::<1>(amax),
            );
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2));
            let d = _mm_cvtss_f32(m1) / 127.0;
            let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let levels: [__m256i; 4] = std::array::from_fn(|i| {
                let s = _mm256_mul_ps(v[i], id);
                // Rounding halves away from zero (f32::round): truncate, then step one away
                // from zero where the dropped part is at least a half (exact in f32).
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(s);
                let frac = _mm256_and_ps(_mm256_sub_ps(s, t), abs_mask);
                let away = _mm256_or_ps(_mm256_and_ps(s, sign_mask), one);
                let r = _mm256_add_ps(
                    t,
                    _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), away),
                );
                // NaN becomes 0 (`as i8` does so); the levels lie in -127..=127.
                let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(s, s));
                _mm256_cvttps_epi32(r)
            });
            let sum = _mm256_add_epi32(
                _mm256_add_epi32(levels[0], levels[1]),
                _mm256_add_epi32(levels[2], levels[3]),
            );
            let s4 = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256::<1>(sum),
            );
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2));
            let words_lo = _mm256_packs_epi32(levels[0], levels[1]);
            let words_hi = _mm256_packs_epi32(levels[2], levels[3]);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words_lo, words_hi), order);
            // SAFETY: `quantize` sized quants to x.len(), scales and sums to the block count.
            _mm256_storeu_si256(
                self.quants.as_mut_ptr().add(b * BLOCK) as *mut __m256i,
                bytes,
            );
            *self.scales.get_unchecked_mut(b) = d;
            *self.sums.get_unchecked_mut(b) = _mm_cvtsi128_si32(s1);
        }
    }
}

/// Whether [`matmul_int8`] handles this block format.
pub fn int8_supported(f: BlockFormat) -> bool {
    matches!(
        f,
        BlockFormat::Q8_0
            | BlockFormat::Q4_0
            | BlockFormat::Q4_1
            | BlockFormat::Q5_0
            | BlockFormat::Q5_1
            | BlockFormat::Q4K
            | BlockFormat::Q5K
            | BlockFormat::Q6K
    )
}

/// One Q6_K block's signed levels (−32..31, in weight order) and its scale `d`; 32-wide
/// activation block t of it meets levels `32t..32t+32`, whose two halves have the 8-bit scales
/// `scales[2t]` and `scales[2t + 1]` (read with [`q6k_scales`]).
fn q6k_block(b: &[u8], levels: &mut [i8; QK_K]) -> f32 {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    for n in 0..2 {
        let (ql, qh, o) = (&ql[64 * n..], &qh[32 * n..], &mut levels[128 * n..]);
        for l in 0..32 {
            o[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            o[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            o[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            o[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    f16::from_le_bytes([b[208], b[209]]).to_f32()
}

/// A Q6_K block's sixteen 8-bit scales (one per 16 weights).
fn q6k_scales(b: &[u8]) -> [i32; 16] {
    std::array::from_fn(|i| b[192 + i] as i8 as i32)
}

/// Q6_K sub-block `t` (32 levels) against 32 activation levels: each 16-weight half's integer
/// dot times its scale.
fn q6k_dot(levels: &[i8], sc: &[i32; 16], t: usize, xs: &[i8]) -> i32 {
    let half = |h: usize| -> i32 {
        levels[h * 16..][..16]
            .iter()
            .zip(&xs[h * 16..][..16])
            .map(|(a, c)| *a as i32 * *c as i32)
            .sum()
    };
    sc[2 * t] * half(0) + sc[2 * t + 1] * half(1)
}

/// Sub-block j's scale `d·scale_j` and min `dmin·min_j`, and the levels of one Q4_K block
/// (4 bits, 0..15) or Q5_K block (5 bits, 0..31: the nibble and, for sub-block j, bit j of
/// `qh[l]` as the fifth), in weight order. `f` is one of the two.
fn qk_block(f: BlockFormat, b: &[u8], levels: &mut [u8; QK_K]) -> [(f32, f32); 8] {
    let (d, dmin) = (
        f16::from_le_bytes([b[0], b[1]]).to_f32(),
        f16::from_le_bytes([b[2], b[3]]).to_f32(),
    );
    let five = f == BlockFormat::Q5K;
    let (qh, qs) = if five {
        (&b[16..48], &b[48..176])
    } else {
        (&b[16..16], &b[16..144])
    };
    let high = |l: usize, j: usize| if five { ((qh[l] >> j) & 1) << 4 } else { 0 };
    for c in 0..4 {
        for l in 0..32 {
            levels[64 * c + l] = (qs[32 * c + l] & 15) | high(l, 2 * c);
            levels[64 * c + 32 + l] = (qs[32 * c + l] >> 4) | high(l, 2 * c + 1);
        }
    }
    std::array::from_fn(|j| {
        let (sc, mn) = scale_min_k4(j, &b[4..16]);
        (d * sc, dmin * mn)
    })
}

/// The 8-bit levels, the scale and the min (0 but for Q4_1 and Q5_1, whose weights are
/// `d·q + m` with q unsigned) of one weight block.
fn weight_block(f: BlockFormat, b: &[u8], q: &mut [i8; BLOCK]) -> (f32, f32) {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let min = || f16::from_le_bytes([b[2], b[3]]).to_f32();
    match f {
        BlockFormat::Q8_0 => {
            for (qv, &byte) in q.iter_mut().zip(&b[2..34]) {
                *qv = byte as i8;
            }
        }
        BlockFormat::Q5_0 => {
            // Weight i: its nibble (low nibbles first, then high) and high bit i of `qh`.
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                let hi = |i: usize| (((qh >> i) & 1) << 4) as u8;
                q[j] = ((b[6 + j] & 15) | hi(j)) as i8 - 16;
                q[j + 16] = ((b[6 + j] >> 4) | hi(j + 16)) as i8 - 16;
            }
        }
        BlockFormat::Q4_1 => {
            for j in 0..16 {
                q[j] = (b[4 + j] & 15) as i8;
                q[j + 16] = (b[4 + j] >> 4) as i8;
            }
            return (d, min());
        }
        BlockFormat::Q5_1 => {
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            for j in 0..16 {
                let hi = |i: usize| (((qh >> i) & 1) << 4) as u8;
                q[j] = ((b[8 + j] & 15) | hi(j)) as i8;
                q[j + 16] = ((b[8 + j] >> 4) | hi(j + 16)) as i8;
            }
            return (d, min());
        }
        _ => {
            for j in 0..16 {
                q[j] = (b[2 + j] & 15) as i8 - 8;
                q[j + 16] = (b[2 + j] >> 4) as i8 - 8;
            }
        }
    }
    (d, 0.0)
}

fn check(f: BlockFormat, x: &[f32], w: &[u8], m: usize, k: usize, n: usize, out: &[f32]) {
    assert!(int8_supported(f), "{f:?} has no 8-bit-activation kernel");
    let be = f.block_elems();
    assert!(
        k.is_multiple_of(be),
        "row length {k} is not a multiple of {f:?}'s {be}-weight blocks"
    );
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * (k / be) * f.block_bytes());
    assert_eq!(out.len(), m * n);
}

/// Plain reference: the same rounding of x, integer block sums, f64 accumulation.
pub fn matmul_int8_reference(
    f: BlockFormat,
    x: &[f32],
    w: &[u8],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    check(f, x, w, m, k, n, out);
    let mut xq = Int8Rows::default();
    xq.quantize(x, k);
    let (nb, bb) = (k / BLOCK, f.block_bytes());
    if f == BlockFormat::Q4K || f == BlockFormat::Q5K {
        let mut levels = [0u8; QK_K];
        let row_bytes = k / QK_K * bb;
        for j in 0..n {
            for i in 0..m {
                let mut acc = 0f64;
                for (s, blk) in w[j * row_bytes..][..row_bytes].chunks_exact(bb).enumerate() {
                    let subs = qk_block(f, blk, &mut levels);
                    for (t, &(dj, mj)) in subs.iter().enumerate() {
                        let b = s * 8 + t;
                        let xs = &xq.quants[i * k + b * BLOCK..][..BLOCK];
                        let ls = &levels[t * BLOCK..][..BLOCK];
                        let dot: i32 = ls.iter().zip(xs).map(|(a, c)| *a as i32 * *c as i32).sum();
                        let dx = xq.scales[i * nb + b] as f64;
                        acc += dj as f64 * dx * dot as f64
                            - mj as f64 * dx * xq.sums[i * nb + b] as f64;
                    }
                }
                out[i * n + j] = acc as f32;
            }
        }
        return;
    }
    if f == BlockFormat::Q6K {
        let mut levels = [0i8; QK_K];
        let row_bytes = k / QK_K * bb;
        for j in 0..n {
            for i in 0..m {
                let mut acc = 0f64;
                for (s, blk) in w[j * row_bytes..][..row_bytes].chunks_exact(bb).enumerate() {
                    let d = q6k_block(blk, &mut levels);
                    let sc = q6k_scales(blk);
                    for t in 0..8 {
                        let b = s * 8 + t;
                        let xs = &xq.quants[i * k + b * BLOCK..][..BLOCK];
                        let dot = q6k_dot(&levels[t * BLOCK..][..BLOCK], &sc, t, xs);
                        acc += d as f64 * xq.scales[i * nb + b] as f64 * dot as f64;
                    }
                }
                out[i * n + j] = acc as f32;
            }
        }
        return;
    }
    let mut q = [0i8; BLOCK];
    for j in 0..n {
        for i in 0..m {
            let mut acc = 0f64;
            for b in 0..nb {
                let (dw, mw) = weight_block(f, &w[(j * nb + b) * bb..][..bb], &mut q);
                let xs = &xq.quants[i * k + b * BLOCK..][..BLOCK];
                let dot: i32 = q.iter().zip(xs).map(|(a, c)| *a as i32 * *c as i32).sum();
                let dx = xq.scales[i * nb + b] as f64;
                acc += dw as f64 * dx * dot as f64 + mw as f64 * dx * xq.sums[i * nb + b] as f64;
            }
            out[i * n + j] = acc as f32;
        }
    }
}

const ROWS_PER_TASK: usize = 128;
/// Activation rows per pass over a task's weight rows (16 rows of 1536 bytes stay in L1).
const ROW_GROUP: usize = 16;
/// Most activation rows handled per pass over a weight row.
#[cfg(target_arch = "x86_64")]
const GROUP: usize = 4;

thread_local! {
    /// The caller's rounded activations, reused across calls (no allocation per token).
    static ROUNDED: RefCell<Int8Rows> = RefCell::new(Int8Rows::default());
}

/// Fast path: AVX2 where the CPU has it, parallel over weight rows.
///
/// Panics on a format without this path ([`int8_supported`]) or mismatched lengths (caller
/// bugs).
pub fn matmul_int8(
    f: BlockFormat,
    x: &[f32],
    w: &[u8],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    check(f, x, w, m, k, n, out);
    if m == 0 || n == 0 {
        return;
    }
    let mut run = |xq: &Int8Rows| {
        let row_bytes = k / f.block_elems() * f.block_bytes();
        let kern = select();
        crate::rows::par_weight_rows(out, m, n, ROWS_PER_TASK, ROW_GROUP, |j, i0, g, o| {
            kern(f, &w[j * row_bytes..(j + 1) * row_bytes], xq, i0, g, k, o)
        });
    };
    with_rounded(x, k, |xq| run(xq))
}

/// Rounds `x` (rows of length k) into this thread's reused [`Int8Rows`] and runs `f` on them.
pub(crate) fn with_rounded<R>(x: &[f32], k: usize, f: impl FnOnce(&Int8Rows) -> R) -> R {
    crate::rows::with_scratch(&ROUNDED, |xq| {
        xq.quantize(x, k);
        f(xq)
    })
}

/// One weight row against activation rows `i0..i0 + m` of the rounded activations, writing
/// m results.
type RowKernel = fn(BlockFormat, &[u8], &Int8Rows, usize, usize, usize, &mut [f32]);

fn select() -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::has_vnni() {
            // SAFETY: chosen only when the CPU reports AVX2, FMA, F16C and AVX-512 VNNI/VL,
            // which `row_vnni` needs.
            return |f, w, xq, i0, m, k, o| unsafe { row_vnni(f, w, xq, i0, m, k, o) };
        }
        if crate::has_avx2_fma() {
            // SAFETY: chosen only when the CPU reports AVX2 and FMA, which `row_avx2` needs.
            return |f, w, xq, i0, m, k, o| unsafe { row_avx2(f, w, xq, i0, m, k, o) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        return row_neon;
    }
    #[allow(unreachable_code)]
    row_portable
}

/// Portable row kernel (x86-64 without AVX2, and architectures other than aarch64): integer
/// block sums.
fn row_portable(
    f: BlockFormat,
    w: &[u8],
    xq: &Int8Rows,
    i0: usize,
    m: usize,
    k: usize,
    out: &mut [f32],
) {
    if f == BlockFormat::Q4K || f == BlockFormat::Q5K {
        return row_qk_portable(f, w, xq, i0, m, k, out);
    }
    if f == BlockFormat::Q6K {
        return row_q6k_portable(w, xq, i0, m, k, out);
    }
    let (nb, bb) = (k / BLOCK, f.block_bytes());
    let mut q = [0i8; BLOCK];
    out[..m].fill(0.0);
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let (dw, mw) = weight_block(f, blk, &mut q);
        for (r, a) in out[..m].iter_mut().enumerate() {
            let i = i0 + r;
            let xs = &xq.quants[i * k + b * BLOCK..][..BLOCK];
            let dot: i32 = q.iter().zip(xs).map(|(p, c)| *p as i32 * *c as i32).sum();
            let dx = xq.scales[i * nb + b];
            *a += dw * dx * dot as f32;
            if mw != 0.0 {
                *a += mw * dx * xq.sums[i * nb + b] as f32;
            }
        }
    }
}

/// NEON row kernel (aarch64, where NEON is baseline): the weight block unpacked once to two
/// 16-lane i8 vectors, each activation row's dot product by widening multiplies
/// (`vmull_s8`) summed pairwise into i32 lanes; then the same scalar scaling as
/// [`row_portable`], so both give bitwise the same result.
#[cfg(target_arch = "aarch64")]
fn row_neon(
    f: BlockFormat,
    w: &[u8],
    xq: &Int8Rows,
    i0: usize,
    m: usize,
    k: usize,
    out: &mut [f32],
) {
    use std::arch::aarch64::*;
    if f == BlockFormat::Q4K || f == BlockFormat::Q5K {
        return row_qk_portable(f, w, xq, i0, m, k, out);
    }
    if matches!(
        f,
        BlockFormat::Q5_0 | BlockFormat::Q6K | BlockFormat::Q4_1 | BlockFormat::Q5_1
    ) {
        // No NEON unpacking of the high bits or mins yet: the portable integer sums.
        return row_portable(f, w, xq, i0, m, k, out);
    }
    let (nb, bb) = (k / BLOCK, f.block_bytes());
    assert!(xq.quants.len() >= (i0 + m) * k && out.len() >= m);
    out[..m].fill(0.0);
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let dw = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        // SAFETY: NEON is always present on aarch64; every load reads 16 bytes inside `blk`
        // (a whole block: 34 bytes for Q8_0, 18 for Q4_0) or inside row `i` of `xq.quants`
        // (k bytes per row, k a multiple of 32, checked by `check`).
        unsafe {
            let q = blk.as_ptr().add(2);
            let (w0, w1) = if f == BlockFormat::Q8_0 {
                (vld1q_s8(q as *const i8), vld1q_s8(q.add(16) as *const i8))
            } else {
                let raw = vld1q_u8(q);
                let eight = vdupq_n_s8(8);
                (
                    vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(15))), eight),
                    vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw)), eight),
                )
            };
            for (r, o) in out[..m].iter_mut().enumerate() {
                let i = i0 + r;
                let xp = xq.quants.as_ptr().add(i * k + b * BLOCK);
                let (x0, x1) = (vld1q_s8(xp), vld1q_s8(xp.add(16)));
                // Each i16 lane holds one product (|p| <= 128 * 128), widened before adding.
                let mut acc = vpaddlq_s16(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)));
                acc = vpadalq_s16(acc, vmull_high_s8(w0, x0));
                acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w1), vget_low_s8(x1)));
                acc = vpadalq_s16(acc, vmull_high_s8(w1, x1));
                let dot = vaddvq_s32(acc);
                *o += dw * xq.scales[i * nb + b] * dot as f32;
            }
        }
    }
}

/// Q4_K and Q5_K (`f`): per sub-block, the scale times the integer dot, minus the min times
/// the block's activation sum.
fn row_qk_portable(
    f: BlockFormat,
    w: &[u8],
    xq: &Int8Rows,
    i0: usize,
    m: usize,
    k: usize,
    out: &mut [f32],
) {
    let nb = k / BLOCK;
    let mut levels = [0u8; QK_K];
    out[..m].fill(0.0);
    for (s, blk) in w.chunks_exact(f.block_bytes()).enumerate() {
        let subs = qk_block(f, blk, &mut levels);
        for (r, o) in out[..m].iter_mut().enumerate() {
            let i = i0 + r;
            for (t, &(dj, mj)) in subs.iter().enumerate() {
                let b = s * 8 + t;
                let xs = &xq.quants[i * k + b * BLOCK..][..BLOCK];
                let dot: i32 = levels[t * BLOCK..][..BLOCK]
                    .iter()
                    .zip(xs)
                    .map(|(a, c)| *a as i32 * *c as i32)
                    .sum();
                let dx = xq.scales[i * nb + b];
                *o += dj * dx * dot as f32 - mj * dx * xq.sums[i * nb + b] as f32;
            }
        }
    }
}

/// Q6_K: per 32-wide sub-block, the two 16-weight halves' integer dots times their scales.
fn row_q6k_portable(w: &[u8], xq: &Int8Rows, i0: usize, m: usize, k: usize, out: &mut [f32]) {
    let nb = k / BLOCK;
    let mut levels = [0i8; QK_K];
    out[..m].fill(0.0);
    for (s, blk) in w.chunks_exact(BlockFormat::Q6K.block_bytes()).enumerate() {
        let d = q6k_block(blk, &mut levels);
        let sc = q6k_scales(blk);
        for (r, o) in out[..m].iter_mut().enumerate() {
            let i = i0 + r;
            for t in 0..8 {
                let b = s * 8 + t;
                let xs = &xq.quants[i * k + b * BLOCK..][..BLOCK];
                let dot = q6k_dot(&levels[t * BLOCK..][..BLOCK], &sc, t, xs);
                *o += d * xq.scales[i * nb + b] * dot as f32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_avx2(
    f: BlockFormat,
    w: &[u8],
    xq: &Int8Rows,
    i0: usize,
    m: usize,
    k: usize,
    out: &mut [f32],
) {
    row_body::<false>(f, w, xq, i0, m, k, out)
}

/// [`row_avx2`] with AVX-512 VNNI: `vpdpbusd` sums the u8 × i8 products (the same integers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn row_vnni(
    f: BlockFormat,
    w: &[u8],
    xq: &Int8Rows,
    i0: usize,
    m: usize,
    k: usize,
    out: &mut [f32],
) {
    row_body::<true>(f, w, xq, i0, m, k, out)
}

/// The row kernels' dispatch, inlined into [`row_avx2`] and [`row_vnni`] (the group kernels
/// below are inlined into it in turn, so they compile with the wrapper's target features).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_body<const VNNI: bool>(
    f: BlockFormat,
    w: &[u8],
    xq: &Int8Rows,
    i0: usize,
    m: usize,
    k: usize,
    out: &mut [f32],
) {
    let mut r = 0;
    while r < m {
        let g = (m - r).min(GROUP);
        let (i, o) = (i0 + r, &mut out[r..r + g]);
        match f {
            BlockFormat::Q4K => {
                by_group!(g, G => group_qk_avx2::<G, VNNI, false>(w, xq, i, k, o))
            }
            BlockFormat::Q5K => {
                by_group!(g, G => group_qk_avx2::<G, VNNI, true>(w, xq, i, k, o))
            }
            BlockFormat::Q6K => by_group!(g, G => group_q6k_avx2::<G>(w, xq, i, k, o)),
            BlockFormat::Q4_0 => by_group!(g, G => group_avx2::<Q4_0, G, VNNI>(w, xq, i, k, o)),
            BlockFormat::Q5_0 => by_group!(g, G => group_avx2::<Q5_0, G, VNNI>(w, xq, i, k, o)),
            BlockFormat::Q4_1 => by_group!(g, G => group_avx2::<Q4_1, G, VNNI>(w, xq, i, k, o)),
            BlockFormat::Q5_1 => by_group!(g, G => group_avx2::<Q5_1, G, VNNI>(w, xq, i, k, o)),
            _ => by_group!(g, G => group_avx2::<Q8_0, G, VNNI>(w, xq, i, k, o)),
        }
        r += g;
    }
}

/// Σ of four u8 × i8 products per i32 lane: `vpdpbusd` with VNNI, else `vpmaddubsw` +
/// `vpmaddwd` (the same integers wherever no pair of products exceeds i16, true of every
/// format here: at most 2 · 128 · 127).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_u8_i8<const VNNI: bool>(
    a: std::arch::x86_64::__m256i,
    b: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    if VNNI {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
    } else {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }
}

/// The 32-wide formats [`group_avx2`] unpacks, as its const parameter.
#[cfg(target_arch = "x86_64")]
const Q8_0: u8 = 0;
#[cfg(target_arch = "x86_64")]
const Q4_0: u8 = 1;
#[cfg(target_arch = "x86_64")]
const Q5_0: u8 = 2;
#[cfg(target_arch = "x86_64")]
const Q4_1: u8 = 3;
#[cfg(target_arch = "x86_64")]
const Q5_1: u8 = 4;

/// One weight row against activation rows `i0..i0+G`. Per block the weights are unpacked
/// once to 32 signed bytes (`FMT` = Q4_0: nibbles − 8; Q5_0: nibbles with their high bits,
/// − 16; Q8_0: the bytes); per row, `|w|·sign(x, w)` goes through `vpmaddubsw`/`vpmaddwd`
/// to eight i32 sums, scaled by `d_w·d_x` into an f32 accumulator. Q4_1 and Q5_1 unpack to
/// unsigned levels (0..15, 0..31) that go into `vpmaddubsw` as they are, and add their min as
/// `m_w·d_x·Σx` (the block's activation sum) per row: before they had this path they took
/// the f32-activation kernel, and SmolLM2's Q5_K_M-style files (whose 576-wide rows fall
/// back from Q5_K to Q5_1, as llama.cpp's do) decoded at 24 tok/s on 2 threads.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn group_avx2<const FMT: u8, const G: usize, const VNNI: bool>(
    w: &[u8],
    xq: &Int8Rows,
    i0: usize,
    k: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let nb = k / BLOCK;
    let wp = w.as_ptr();
    let xp = xq.quants.as_ptr().add(i0 * k);
    let dxp = xq.scales.as_ptr().add(i0 * nb);
    let sxp = xq.sums.as_ptr().add(i0 * nb);
    // Two accumulators per row (even and odd blocks): with one, every block waited on the
    // previous block's FMA, and a 576-wide row is only 18 blocks.
    let mut acc = [[_mm256_setzero_ps(); G]; 2];
    // Q4_1 / Q5_1: Σ m_w·d_x·Σx per row.
    let mut mins = [0f32; G];
    let x = BlockRows {
        xp,
        dxp,
        sxp,
        k,
        nb,
    };
    let mut b = 0;
    while b + 1 < nb {
        let (even, odd) = acc.split_at_mut(1);
        block_avx2::<FMT, G, VNNI>(wp, &x, b, &mut even[0], &mut mins);
        block_avx2::<FMT, G, VNNI>(wp, &x, b + 1, &mut odd[0], &mut mins);
        b += 2;
    }
    if b < nb {
        block_avx2::<FMT, G, VNNI>(wp, &x, b, &mut acc[0], &mut mins);
    }
    let acc: [__m256; G] = std::array::from_fn(|r| _mm256_add_ps(acc[0][r], acc[1][r]));
    for ((o, a), mn) in out.iter_mut().zip(acc.iter()).zip(mins) {
        *o = crate::hsum256(*a);
        if FMT == Q4_1 || FMT == Q5_1 {
            *o += mn;
        }
    }
}

/// [`group_avx2`]'s activation rows: quants, scales and block sums from row `i0` on.
#[cfg(target_arch = "x86_64")]
struct BlockRows {
    xp: *const i8,
    dxp: *const f32,
    sxp: *const i32,
    k: usize,
    nb: usize,
}

/// Block `b` of [`group_avx2`]'s weight row against its `G` activation rows, added into `acc`.
/// A function and not a closure: a closure does not inherit its parent's `target_feature`s,
/// so the intrinsics inside one stayed out-of-line calls (vectors passed through memory, about
/// 40 calls per block). `inline(always)` puts this body into the AVX2 caller, where they
/// inline.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_avx2<const FMT: u8, const G: usize, const VNNI: bool>(
    wp: *const u8,
    x: &BlockRows,
    b: usize,
    acc: &mut [std::arch::x86_64::__m256; G],
    mins: &mut [f32; G],
) {
    use std::arch::x86_64::*;
    let BlockRows {
        xp,
        dxp,
        sxp,
        k,
        nb,
    } = *x;
    let bb = match FMT {
        Q4_0 => 18,
        Q5_0 => 22,
        Q4_1 => 20,
        Q5_1 => 24,
        _ => 34,
    };
    let nib = _mm256_set1_epi8(0x0F);
    let eight = _mm256_set1_epi8(8);
    let blk = wp.add(b * bb);
    _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(crate::PREFETCH_BYTES) as *const i8);
    // The scale converted in registers: staging eight of them through memory stalled
    // on store forwarding.
    let dw = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(
        (blk as *const u16).read_unaligned() as i32,
    )));
    let q = blk.add(2);
    let wq = match FMT {
        Q4_0 => {
            let raw = _mm_loadu_si128(q as *const __m128i);
            let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
            _mm256_sub_epi8(_mm256_and_si256(both, nib), eight)
        }
        Q5_0 => {
            // Nibbles as Q4_0's; level − 16 is the nibble itself where high bit i of `qh`
            // is set, the nibble with 0xF0 OR-ed in where it is not.
            let set = bytes_from_bits((q as *const u32).read_unaligned());
            let raw = _mm_loadu_si128(q.add(4) as *const __m128i);
            let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
            let nibbles = _mm256_and_si256(both, nib);
            _mm256_or_si256(
                nibbles,
                _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8)),
            )
        }
        Q4_1 | Q5_1 => {
            // Unsigned levels: straight into `vpmaddubsw` below, the min added per row.
            let min = f16::from_le_bytes([*q, *q.add(1)]).to_f32();
            let at = if FMT == Q5_1 { 6 } else { 2 };
            let raw = _mm_loadu_si128(q.add(at) as *const __m128i);
            let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
            let mut levels = _mm256_and_si256(both, nib);
            if FMT == Q5_1 {
                // + 16 where the weight's bit of `qh` is set.
                let set = bytes_from_bits((q.add(2) as *const u32).read_unaligned());
                levels = _mm256_or_si256(levels, _mm256_and_si256(set, _mm256_set1_epi8(16)));
            }
            for (r, (a, mn)) in acc.iter_mut().zip(mins.iter_mut()).enumerate() {
                let xv = _mm256_loadu_si256(xp.add(r * k + b * BLOCK) as *const __m256i);
                let dot = dot_u8_i8::<VNNI>(levels, xv);
                let dx = *dxp.add(r * nb + b);
                let d = _mm256_mul_ps(dw, _mm256_set1_ps(dx));
                *a = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), *a);
                *mn += min * dx * *sxp.add(r * nb + b) as f32;
            }
            return;
        }
        _ => _mm256_loadu_si256(q as *const __m256i),
    };
    let aw = _mm256_sign_epi8(wq, wq);
    for (r, a) in acc.iter_mut().enumerate() {
        let xv = _mm256_loadu_si256(xp.add(r * k + b * BLOCK) as *const __m256i);
        let sx = _mm256_sign_epi8(xv, wq);
        let dot = dot_u8_i8::<VNNI>(aw, sx);
        let d = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*dxp.add(r * nb + b)));
        *a = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), *a);
    }
}

/// Byte i is 0xFF where bit i of `bits` is set, else 0 (each byte picks its bit by OR-ing
/// every other bit to 1 and comparing with all-ones, as llama.cpp's bytes_from_bits_32 does):
/// Q5_0's and Q5_1's fifth bits, one per weight.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bytes_from_bits(bits: u32) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    _mm256_cmpeq_epi8(
        _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe)),
        _mm256_set1_epi64x(-1),
    )
}

/// Q6_K against activation rows `i0..i0+G`. Per 128-weight half of a block, the 64 low-nibble
/// bytes and 32 high-bit bytes unpack to four 32-weight sub-blocks of signed levels (as in
/// [`q6k_block`], 32 lanes at a time); per row, `vpmaddubsw` gives sixteen i16 pair sums whose
/// first eight belong to the sub-block's first 16 weights and last eight to its second 16,
/// so one `vpmaddwd` against the two scales (eight lanes each) applies both. The block's eight
/// scaled integer sums are folded into one vector ([`fold8_epi32`]) for one float multiply-add
/// per block and row (one per sub-block ran at ~7 GB/s, see [`group_qk_avx2`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn group_q6k_avx2<const G: usize>(
    w: &[u8],
    xq: &Int8Rows,
    i0: usize,
    k: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let bb = BlockFormat::Q6K.block_bytes();
    let nb = k / BLOCK;
    let xp = xq.quants.as_ptr().add(i0 * k);
    let dxp = xq.scales.as_ptr().add(i0 * nb);
    let (m4, m2, bias) = (
        _mm256_set1_epi8(0x0F),
        _mm256_set1_epi8(3),
        _mm256_set1_epi8(32),
    );
    let mut acc = [_mm256_setzero_ps(); G];
    for (s, blk) in w.chunks_exact(bb).enumerate() {
        let p = blk.as_ptr();
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(crate::PREFETCH_BYTES) as *const i8);
        let d = _mm256_set1_ps(f16::from_le_bytes([blk[208], blk[209]]).to_f32());
        // Each sub-block's |levels| and signed levels, and its two 16-weight scales.
        let mut levels = [(_mm256_setzero_si256(), _mm256_setzero_si256()); 8];
        let mut scales = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            let ql0 = _mm256_loadu_si256(p.add(64 * h) as *const __m256i);
            let ql1 = _mm256_loadu_si256(p.add(64 * h + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
            // Two bits of qh per level, shifted into bits 4..5 (16-bit shifts: the masks keep
            // every byte's bits inside the byte).
            let hi = |shift: i32| -> __m256i {
                let v = match shift {
                    0 => qh,
                    2 => _mm256_srli_epi16(qh, 2),
                    4 => _mm256_srli_epi16(qh, 4),
                    _ => _mm256_srli_epi16(qh, 6),
                };
                _mm256_slli_epi16(_mm256_and_si256(v, m2), 4)
            };
            let subs = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), hi(0)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), hi(2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), hi(4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), hi(6)),
            ];
            for (t4, lv) in subs.into_iter().enumerate() {
                let t = 4 * h + t4;
                let wq = _mm256_sub_epi8(lv, bias);
                levels[t] = (_mm256_sign_epi8(wq, wq), wq);
                scales[t] = _mm256_set_m128i(
                    _mm_set1_epi16(blk[192 + 2 * t + 1] as i8 as i16),
                    _mm_set1_epi16(blk[192 + 2 * t] as i8 as i16),
                );
            }
        }
        let b0 = s * 8;
        for (r, a) in acc.iter_mut().enumerate() {
            let mut dots = [_mm256_setzero_si256(); 8];
            for (t, dt) in dots.iter_mut().enumerate() {
                let (aw, wq) = levels[t];
                let xv = _mm256_loadu_si256(xp.add(r * k + (b0 + t) * BLOCK) as *const __m256i);
                let pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wq));
                *dt = _mm256_madd_epi16(pairs, scales[t]);
            }
            let sums = fold8_epi32(&dots);
            let dx = _mm256_loadu_ps(dxp.add(r * nb + b0));
            *a = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(sums), *a);
        }
    }
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = crate::hsum256(*a);
    }
}

/// Q4_K against activation rows `i0..i0+G`: per 64-weight chunk the 32 packed bytes give two
/// sub-blocks of levels 0..15 (low and high nibbles), which are unsigned, so they go straight
/// into `vpmaddubsw` against the signed activation bytes. A block's eight integer dot products
/// are folded by `vphaddd` into one vector (lane j = sub-block j's sum), so the float work
/// is one multiply-add per block and row: by the eight `d·scale_j·d_x` at once, and the mins
/// by `dmin·min_j·d_x·Σx` likewise. Per-sub-block scalar scales and one float multiply-add
/// per sub-block ran the down projections of llama.cpp's Q4_K_M SmolLM2 file at ~7 GB/s on
/// two Zen 4 cores, a third of the memory's speed (session 30). `FIVE`: Q5_K, whose levels
/// (0..31) take a fifth bit from the block's `qh` bytes, set by a compare per sub-block; the
/// same kernel otherwise (31 · 127 · 2 still fits `vpmaddubsw`'s i16 pairs). Before it, Q5_K
/// took the f32-activation kernel: SmolLM2 all-Q5_K decoded at 24 tok/s on 2 threads.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn group_qk_avx2<const G: usize, const VNNI: bool, const FIVE: bool>(
    w: &[u8],
    xq: &Int8Rows,
    i0: usize,
    k: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let bb = if FIVE {
        BlockFormat::Q5K.block_bytes()
    } else {
        BlockFormat::Q4K.block_bytes()
    };
    // Q5_K's 32 bytes of fifth bits sit between the scales and the nibbles.
    let qs_at = if FIVE { 48 } else { 16 };
    let nb = k / BLOCK;
    let nib = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut mins = [_mm256_setzero_ps(); G];
    for (s, blk) in w.chunks_exact(bb).enumerate() {
        _mm_prefetch::<_MM_HINT_T0>(blk.as_ptr().wrapping_add(crate::PREFETCH_BYTES) as *const i8);
        let d = _mm256_set1_ps(f16::from_le_bytes([blk[0], blk[1]]).to_f32());
        let dmin = _mm256_set1_ps(f16::from_le_bytes([blk[2], blk[3]]).to_f32());
        let (sc, mn) = scales_mins_k4(&blk[4..16]);
        let sc = _mm256_mul_ps(
            d,
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(sc))),
        );
        let mn = _mm256_mul_ps(
            dmin,
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mn))),
        );
        let mut lv = [_mm256_setzero_si256(); 8];
        for c in 0..4 {
            let raw = _mm256_loadu_si256(blk.as_ptr().add(qs_at + 32 * c) as *const __m256i);
            lv[2 * c] = _mm256_and_si256(raw, nib);
            lv[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib);
        }
        if FIVE {
            // Sub-block j's fifth bit of weight l is bit j of qh[l]: 16 where it is set.
            let qh = _mm256_loadu_si256(blk.as_ptr().add(16) as *const __m256i);
            let sixteen = _mm256_set1_epi8(16);
            for (j, l) in lv.iter_mut().enumerate() {
                let bit = _mm256_set1_epi8((1u8 << j) as i8);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                *l = _mm256_or_si256(*l, _mm256_and_si256(set, sixteen));
            }
        }
        let b0 = s * 8;
        for r in 0..G {
            let row = i0 + r;
            let xp = xq.quants.as_ptr().add(row * k + b0 * BLOCK);
            let mut dots = [_mm256_setzero_si256(); 8];
            for (j, dj) in dots.iter_mut().enumerate() {
                let xv = _mm256_loadu_si256(xp.add(j * BLOCK) as *const __m256i);
                *dj = dot_u8_i8::<VNNI>(lv[j], xv);
            }
            let sums = fold8_epi32(&dots);
            let dx = _mm256_loadu_ps(xq.scales.as_ptr().add(row * nb + b0));
            let xs = _mm256_cvtepi32_ps(_mm256_loadu_si256(
                xq.sums.as_ptr().add(row * nb + b0) as *const __m256i
            ));
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(sc, dx), _mm256_cvtepi32_ps(sums), acc[r]);
            mins[r] = _mm256_fmadd_ps(_mm256_mul_ps(mn, dx), xs, mins[r]);
        }
    }
    for r in 0..G {
        out[r] = crate::hsum256(acc[r]) - crate::hsum256(mins[r]);
    }
}

/// Lane j of the result is the sum of `v[j]`'s eight lanes (three rounds of `vphaddd` and a
/// swap of halves; integers, so the order does not matter).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn fold8_epi32(v: &[std::arch::x86_64::__m256i; 8]) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let s01 = _mm256_hadd_epi32(v[0], v[1]);
    let s23 = _mm256_hadd_epi32(v[2], v[3]);
    let s45 = _mm256_hadd_epi32(v[4], v[5]);
    let s67 = _mm256_hadd_epi32(v[6], v[7]);
    // Per 128-bit half: sub-blocks 0..3 (resp. 4..7) summed over lanes 0..3 (resp. 4..7).
    let s0123 = _mm256_hadd_epi32(s01, s23);
    let s4567 = _mm256_hadd_epi32(s45, s67);
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(s0123, s4567),
        _mm256_permute2x128_si256::<0x31>(s0123, s4567),
    )
}

/// A Q4_K/Q5_K block's eight 6-bit scales and eight 6-bit mins from its 12 packed bytes, one
/// per byte (little-endian u64s): [`scale_min_k4`] for all j at once, on 32-bit words.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn scales_mins_k4(q: &[u8]) -> (i64, i64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let sc_lo = u0 & LOW6;
    let mn_lo = u1 & LOW6;
    let sc_hi = (u2 & LOW4) | (((u0 >> 6) & LOW2) << 4);
    let mn_hi = ((u2 >> 4) & LOW4) | (((u1 >> 6) & LOW2) << 4);
    (
        (sc_lo as u64 | (sc_hi as u64) << 32) as i64,
        (mn_lo as u64 | (mn_hi as u64) << 32) as i64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn packed_scales_and_mins_match_the_one_at_a_time_decoding() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            let q: Vec<u8> = (0..12).map(|_| rng.random()).collect();
            let (sc, mn) = scales_mins_k4(&q);
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, &q);
                assert_eq!(((sc >> (8 * j)) & 0xff) as f32, s, "scale {j} of {q:?}");
                assert_eq!(((mn >> (8 * j)) & 0xff) as f32, m, "min {j} of {q:?}");
            }
        }
    }

    fn random_weights(f: BlockFormat, n_blocks: usize, rng: &mut impl Rng) -> Vec<u8> {
        let mut w: Vec<u8> = (0..n_blocks * f.block_bytes())
            .map(|_| rng.random())
            .collect();
        for b in w.chunks_exact_mut(f.block_bytes()) {
            let d = f16::from_f32(rng.random_range(0.001..0.05));
            b[..2].copy_from_slice(&d.to_le_bytes());
            if matches!(
                f,
                BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q4_1 | BlockFormat::Q5_1
            ) {
                // A K-quant's dmin, or Q4_1/Q5_1's min (either sign).
                let dmin = f16::from_f32(rng.random_range(-0.05..0.05));
                b[2..4].copy_from_slice(&dmin.to_le_bytes());
            }
            if f == BlockFormat::Q6K {
                // Q6_K keeps d last; its first bytes are levels.
                b[208..210].copy_from_slice(&d.to_le_bytes());
            }
        }
        w
    }

    #[test]
    fn rounding_follows_llama_cpp_q8_0() {
        let mut x = [0f32; 32];
        x[0] = 1.27;
        x[1] = -0.5;
        x[2] = 0.004; // below half a step: rounds to 0
        let mut r = Int8Rows::default();
        r.quantize(&x, 32);
        assert!((r.scales[0] - 0.01).abs() < 1e-7);
        assert_eq!(&r.quants[..3], &[127, -50, 0]);
        r.quantize(&[0.0; 32], 32); // an all-zero block: scale 0, no NaN
        assert_eq!((r.scales[0], r.quants[0]), (0.0, 0));
    }

    /// The SIMD rounding gives the plain loop's bytes, scales and sums: halves (ties), NaN,
    /// infinities, zero blocks and random rows.
    #[test]
    fn fast_rounding_equals_the_plain_loop() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let mut x: Vec<f32> = (0..64 * 32).map(|_| rng.random_range(-3.0..3.0)).collect();
        // Block 1: exact halves after scaling (amax 127 gives d = 1).
        for (i, v) in x[32..64].iter_mut().enumerate() {
            *v = i as f32 - 15.5;
        }
        x[63] = 127.0;
        x[64..96].fill(0.0);
        x[100] = f32::NAN;
        x[130] = f32::INFINITY;
        x[161] = f32::NEG_INFINITY;
        x[200] = 1e-40; // subnormal block maximum
        x[193..224].fill(0.0);
        let mut fast = Int8Rows::default();
        fast.quantize(&x, 64);
        let mut plain = fast.clone();
        plain.quantize_blocks(&x);
        assert_eq!(fast.quants, plain.quants);
        assert_eq!(fast.sums, plain.sums);
        assert_eq!(
            fast.scales.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            plain.scales.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(&plain.quants[32..36], &[-16, -15, -14, -13]); // -15.5 rounds away from zero
    }

    #[test]
    fn fast_matches_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for f in [
            BlockFormat::Q8_0,
            BlockFormat::Q4_0,
            BlockFormat::Q5_0,
            BlockFormat::Q4_1,
            BlockFormat::Q5_1,
            BlockFormat::Q4K,
            BlockFormat::Q5K,
            BlockFormat::Q6K,
        ] {
            for m in [1, 2, 3, 4, 5, 9] {
                for (k, n) in [
                    (32usize, 1usize),
                    (64, 33),
                    (288, 7),
                    (576, 70),
                    (1536, 5),
                    (256, 3),
                    (768, 9),
                ] {
                    if !k.is_multiple_of(f.block_elems()) {
                        continue;
                    }
                    let w = random_weights(f, n * k / f.block_elems(), &mut rng);
                    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
                    matmul_int8_reference(f, &x, &w, m, k, n, &mut a);
                    matmul_int8(f, &x, &w, m, k, n, &mut b);
                    for (p, q) in a.iter().zip(&b) {
                        assert!(
                            (p - q).abs() <= 1e-4 * (1.0 + p.abs()),
                            "{f:?} m={m} k={k} n={n}: {p} vs {q}"
                        );
                    }
                    let mut c = vec![0f32; m * n];
                    row_portable_all(f, &x, &w, m, k, n, &mut c);
                    for (p, q) in a.iter().zip(&c) {
                        assert!((p - q).abs() <= 1e-4 * (1.0 + p.abs()), "portable {f:?}");
                    }
                }
            }
        }
    }

    /// A row's result is bit-identical whatever rows come with it (prefill, decode,
    /// verification and batching must give the same logits).
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let (m, n) = (7, 40);
        for (f, k) in [
            (BlockFormat::Q8_0, 576),
            (BlockFormat::Q4_0, 576),
            (BlockFormat::Q5_0, 576),
            (BlockFormat::Q4_1, 576),
            (BlockFormat::Q5_1, 576),
            (BlockFormat::Q4K, 768),
            (BlockFormat::Q5K, 768),
            (BlockFormat::Q6K, 1536),
        ] {
            let w = random_weights(f, n * k / f.block_elems(), &mut rng);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut all = vec![0f32; m * n];
            matmul_int8(f, &x, &w, m, k, n, &mut all);
            for i in 0..m {
                let mut one = vec![0f32; n];
                matmul_int8(f, &x[i * k..(i + 1) * k], &w, 1, k, n, &mut one);
                assert_eq!(one, all[i * n..(i + 1) * n], "{f:?} row {i}");
            }
        }
    }

    /// Where the CPU has AVX-512 VNNI, its row kernels and the AVX2 ones give the same bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_and_avx2_rows_agree_bit_for_bit() {
        if !crate::has_vnni() {
            eprintln!("skipped: no AVX-512 VNNI here");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        for (f, k) in [
            (BlockFormat::Q8_0, 576),
            (BlockFormat::Q4_0, 576),
            (BlockFormat::Q5_0, 576),
            (BlockFormat::Q4_1, 576),
            (BlockFormat::Q5_1, 576),
            (BlockFormat::Q4K, 768),
            (BlockFormat::Q5K, 768),
            (BlockFormat::Q6K, 768),
        ] {
            let w = random_weights(f, k / f.block_elems(), &mut rng);
            let x: Vec<f32> = (0..5 * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut xq = Int8Rows::default();
            xq.quantize(&x, k);
            let (mut a, mut b) = ([0f32; 5], [0f32; 5]);
            // SAFETY: AVX2/FMA/F16C and AVX-512 VNNI/VL (`has_vnni` checks all of them).
            unsafe {
                row_vnni(f, &w, &xq, 0, 5, k, &mut a);
                row_avx2(f, &w, &xq, 0, 5, k, &mut b);
            }
            assert_eq!(a, b, "{f:?}");
        }
    }

    /// The portable kernel over every row (what non-x86 CPUs run).
    fn row_portable_all(
        f: BlockFormat,
        x: &[f32],
        w: &[u8],
        m: usize,
        k: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let mut xq = Int8Rows::default();
        xq.quantize(x, k);
        let rb = k / f.block_elems() * f.block_bytes();
        let mut o = vec![0f32; m];
        for j in 0..n {
            row_portable(f, &w[j * rb..(j + 1) * rb], &xq, 0, m, k, &mut o);
            for i in 0..m {
                out[i * n + j] = o[i];
            }
        }
    }

    /// Close to the f32-activation result: the rounding of x costs ~0.4% relative per block.
    #[test]
    fn close_to_f32_activations() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let (m, n) = (2, 16);
        // Q4_K and Q5_K against the f32 dequantization (the block layout's reference), too.
        for (f, k) in [
            (BlockFormat::Q8_0, 576),
            (BlockFormat::Q4_0, 576),
            (BlockFormat::Q5_0, 576),
            (BlockFormat::Q4_1, 576),
            (BlockFormat::Q5_1, 576),
            (BlockFormat::Q4K, 768),
            (BlockFormat::Q5K, 768),
            (BlockFormat::Q6K, 1536),
        ] {
            let w = random_weights(f, n * k / f.block_elems(), &mut rng);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            crate::matmul_quant_reference(f, &x, &w, m, k, n, &mut a);
            matmul_int8(f, &x, &w, m, k, n, &mut b);
            let scale = a.iter().map(|v| v.abs()).fold(0f32, f32::max);
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 0.02 * scale, "{f:?}: {p} vs {q}");
            }
        }
    }
}
