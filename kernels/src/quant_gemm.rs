//! `out[m×n] = x[m×k] · Wᵀ` where W is GGML block-quantized (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//! Q4_K, Q5_K, Q6_K) and x stays f32.
//!
//! llama.cpp and candle round the activations to 8 bits before a quantized matmul. tandem keeps
//! them in f32 and dequantizes each weight block on the fly instead: the result equals the
//! dequantized (16-bit) model's up to f32 rounding, so a quantized checkpoint and its F16
//! conversion decode the same text, and a quantized self-draft disagrees with its verifier
//! only where the weights differ. Each weight row is read once for all m activation rows
//! (m = 1 decode, m = 2…9 verification).

use crate::ggml::GgmlType;
use half::f16;

/// The GGML block formats this kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// f16 scale d, 16 bytes of nibbles: w = d·(q − 8).
    Q4_0,
    /// f16 scale d, f16 min m, 16 bytes of nibbles: w = d·q + m.
    Q4_1,
    /// f16 d, 32 high bits, 16 bytes of nibbles: w = d·(q − 16), q 5-bit.
    Q5_0,
    /// f16 d, f16 m, 32 high bits, 16 bytes of nibbles: w = d·q + m.
    Q5_1,
    /// f16 scale d, 32 signed bytes: w = d·q.
    Q8_0,
    /// 256 weights: f16 d and dmin, 8 packed 6-bit scales and mins, 4-bit levels.
    Q4K,
    /// Q4_K plus one high bit per weight.
    Q5K,
    /// 256 weights: 4 low + 2 high bits per weight, 16 signed 8-bit scales, f16 d.
    Q6K,
}

/// Weights per block of the 32-wide formats.
pub const BLOCK: usize = crate::ggml::QK;
/// Weights per super-block of the K-quants.
pub const QK_K: usize = crate::ggml::QK_K;

impl BlockFormat {
    /// The GGML type these blocks are (ids and sizes come from [`crate::ggml`]).
    pub const fn ggml(self) -> GgmlType {
        match self {
            BlockFormat::Q4_0 => GgmlType::Q4_0,
            BlockFormat::Q4_1 => GgmlType::Q4_1,
            BlockFormat::Q5_0 => GgmlType::Q5_0,
            BlockFormat::Q5_1 => GgmlType::Q5_1,
            BlockFormat::Q8_0 => GgmlType::Q8_0,
            BlockFormat::Q4K => GgmlType::Q4K,
            BlockFormat::Q5K => GgmlType::Q5K,
            BlockFormat::Q6K => GgmlType::Q6K,
        }
    }

    /// Every format the kernels read.
    pub const ALL: [BlockFormat; 8] = [
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q5_0,
        BlockFormat::Q5_1,
        BlockFormat::Q8_0,
        BlockFormat::Q4K,
        BlockFormat::Q5K,
        BlockFormat::Q6K,
    ];

    /// The kernels' format for a GGML type, when they read it.
    pub fn of(t: GgmlType) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.ggml() == t)
    }

    pub const fn block_bytes(self) -> usize {
        self.ggml().block_bytes()
    }

    /// Weights per block.
    pub const fn block_elems(self) -> usize {
        self.ggml().block_elems()
    }
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block's 12 scale bytes.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        (
            ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as f32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as f32,
        )
    }
}

/// Dequantizes one block into `out` (`block_elems` floats): the reference semantics, shared by
/// every path.
#[inline(always)]
pub fn dequantize_block(f: BlockFormat, b: &[u8], out: &mut [f32]) {
    match f {
        BlockFormat::Q4_0 => {
            let d = half_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                out[j] = ((qs[j] & 15) as i32 - 8) as f32 * d;
                out[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        BlockFormat::Q4_1 => {
            let (d, m) = (half_at(b, 0), half_at(b, 2));
            let qs = &b[4..20];
            for j in 0..16 {
                out[j] = (qs[j] & 15) as f32 * d + m;
                out[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        BlockFormat::Q5_0 | BlockFormat::Q5_1 => {
            let d = half_at(b, 0);
            let (m, o) = if f == BlockFormat::Q5_1 {
                (half_at(b, 2), 4)
            } else {
                (0.0, 2)
            };
            let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            let qs = &b[o + 4..o + 20];
            let off = if f == BlockFormat::Q5_0 { 16 } else { 0 };
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                let q0 = ((qs[j] & 0x0F) as u32 | h0) as i32 - off;
                let q1 = ((qs[j] >> 4) as u32 | h1) as i32 - off;
                out[j] = q0 as f32 * d + m;
                out[j + 16] = q1 as f32 * d + m;
            }
        }
        BlockFormat::Q8_0 => {
            let d = half_at(b, 0);
            let qs = &b[2..34];
            for j in 0..BLOCK {
                out[j] = qs[j] as i8 as f32 * d;
            }
        }
        BlockFormat::Q4K | BlockFormat::Q5K => {
            let (d, dmin) = (half_at(b, 0), half_at(b, 2));
            let sc = &b[4..16];
            let (qh, qs) = if f == BlockFormat::Q5K {
                (&b[16..48], &b[48..176])
            } else {
                (&b[0..0], &b[16..144])
            };
            for c in 0..4 {
                let (s1, m1) = scale_min_k4(2 * c, sc);
                let (s2, m2) = scale_min_k4(2 * c + 1, sc);
                let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
                let q = &qs[32 * c..32 * c + 32];
                for l in 0..32 {
                    let (mut lo, mut hi) = ((q[l] & 0xF) as f32, (q[l] >> 4) as f32);
                    if f == BlockFormat::Q5K {
                        lo += if qh[l] & (1 << (2 * c)) != 0 {
                            16.0
                        } else {
                            0.0
                        };
                        hi += if qh[l] & (2 << (2 * c)) != 0 {
                            16.0
                        } else {
                            0.0
                        };
                    }
                    out[64 * c + l] = d1 * lo - m1;
                    out[64 * c + 32 + l] = d2 * hi - m2;
                }
            }
        }
        BlockFormat::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = half_at(b, 208);
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                let o = &mut out[128 * n..];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    o[l] = d * (sc[is] as i8 as f32) * q1 as f32;
                    o[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
                    o[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
                    o[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
                }
            }
        }
    }
}

/// Plain reference: dequantize every row, dot in f64.
pub fn matmul_quant_reference(
    f: BlockFormat,
    x: &[f32],
    w: &[u8],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    check(f, x, w, m, k, n, out);
    let be = f.block_elems();
    let row_bytes = k / be * f.block_bytes();
    let mut buf = vec![0f32; be];
    for j in 0..n {
        let row: Vec<f32> = w[j * row_bytes..(j + 1) * row_bytes]
            .chunks_exact(f.block_bytes())
            .flat_map(|b| {
                dequantize_block(f, b, &mut buf);
                buf.clone()
            })
            .collect();
        for i in 0..m {
            out[i * n + j] = row
                .iter()
                .zip(&x[i * k..(i + 1) * k])
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>() as f32;
        }
    }
}

fn check(f: BlockFormat, x: &[f32], w: &[u8], m: usize, k: usize, n: usize, out: &[f32]) {
    let be = f.block_elems();
    assert!(
        k.is_multiple_of(be),
        "row length {k} is not a multiple of {be}"
    );
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * (k / be) * f.block_bytes());
    assert_eq!(out.len(), m * n);
}

const ROWS_PER_TASK: usize = 32;
/// Activation rows per pass over a weight row (kept in L1 while a task's weight rows pass).
const ROW_GROUP: usize = 8;

/// Fast path: parallel over weight rows, vectorized with AVX2/FMA where the CPU has them.
pub fn matmul_quant(
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
    let row_bytes = k / f.block_elems() * f.block_bytes();
    #[cfg(target_arch = "x86_64")]
    if matches!(f, BlockFormat::Q4_0 | BlockFormat::Q8_0) && crate::has_avx2_fma() {
        // Lane order of the shuffle-free unpacking (see `group_lanes_avx2`): the activations
        // are permuted once per call instead of the weights once per block.
        return PERMUTED.with(|buf| {
            let mut xp = buf.borrow_mut();
            xp.clear();
            xp.extend(x.chunks_exact(8).flat_map(|c| LANE_ORDER.map(|i| c[i])));
            let xp = &xp[..];
            crate::rows::par_weight_rows(
                out,
                m,
                n,
                ROWS_PER_TASK,
                ROW_GROUP,
                // SAFETY: this branch is taken only when `has_avx2_fma()` holds (just above), and the
                // slices passed are in bounds by construction (row j of w, rows i0..i0+g of x).
                |j, i0, g, o| unsafe {
                    let xs = &xp[i0 * k..(i0 + g) * k];
                    row_lanes_avx2(f, &w[j * row_bytes..(j + 1) * row_bytes], xs, g, k, o)
                },
            )
        });
    }
    let kern = select();
    crate::rows::par_weight_rows(out, m, n, ROWS_PER_TASK, ROW_GROUP, |j, i0, g, o| {
        let xs = &x[i0 * k..(i0 + g) * k];
        kern(f, &w[j * row_bytes..(j + 1) * row_bytes], xs, g, k, o)
    });
}

/// Which weight of a group of 8 each f32 lane holds after `group_lanes_avx2`'s unpacking.
#[cfg(target_arch = "x86_64")]
const LANE_ORDER: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

thread_local! {
    /// The caller's permuted activations, reused across calls (no allocation per token).
    static PERMUTED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_lanes_avx2(f: BlockFormat, w: &[u8], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    let mut i = 0;
    while i < m {
        let g = (m - i).min(GROUP);
        let xs = &x[i * k..];
        let o = &mut out[i..i + g];
        match (f, g) {
            (BlockFormat::Q4_0, 1) => group_lanes_avx2::<0, 1>(w, xs, k, o),
            (BlockFormat::Q4_0, 2) => group_lanes_avx2::<0, 2>(w, xs, k, o),
            (BlockFormat::Q4_0, 3) => group_lanes_avx2::<0, 3>(w, xs, k, o),
            (BlockFormat::Q4_0, _) => group_lanes_avx2::<0, 4>(w, xs, k, o),
            (_, 1) => group_lanes_avx2::<2, 1>(w, xs, k, o),
            (_, 2) => group_lanes_avx2::<2, 2>(w, xs, k, o),
            (_, 3) => group_lanes_avx2::<2, 3>(w, xs, k, o),
            (_, _) => group_lanes_avx2::<2, 4>(w, xs, k, o),
        }
        i += g;
    }
}

/// Q4_0 (`F` = 0) and Q8_0 (`F` = 2) without byte shuffles: 8 weight bytes are broadcast to
/// every 64-bit lane (a plain load) and each 32-bit lane shifts its own byte down with a
/// variable shift, so lane i holds weight `LANE_ORDER[i]` of the group; the activations come
/// permuted to match (byte-widening shuffles, as `group_q4_1_avx2` uses, were the bottleneck). Block scales
/// are converted 8 at a time and broadcast from memory.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_lanes_avx2<const F: u8, const G: usize>(
    w: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let bb = if F == 0 { 18 } else { 34 };
    let nb = k / BLOCK;
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    let bcast = |p: *const u8| _mm256_set1_epi64x((p as *const i64).read_unaligned());
    // Q4_0: low nibbles of bytes t and 4+t land in lanes 2t and 2t+1; high nibbles with +4.
    let sh_lo = _mm256_setr_epi32(0, 0, 8, 8, 16, 16, 24, 24);
    let sh_hi = _mm256_setr_epi32(4, 4, 12, 12, 20, 20, 28, 28);
    let nib = _mm256_set1_epi32(0xF);
    let eight = _mm256_set1_epi32(8);
    // Q8_0: move the byte to the top, then shift arithmetically to sign-extend it.
    let sh_up = _mm256_setr_epi32(24, 24, 16, 16, 8, 8, 0, 0);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut scales = [0f32; 8];
    for b0 in (0..nb).step_by(8) {
        let nc = (nb - b0).min(8);
        let mut h = [0u16; 8];
        for (t, hv) in h.iter_mut().enumerate().take(nc) {
            let p = wp.add((b0 + t) * bb);
            *hv = u16::from_le_bytes([*p, *p.add(1)]);
        }
        _mm256_storeu_ps(
            scales.as_mut_ptr(),
            _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr() as *const __m128i)),
        );
        for (t, &d) in scales.iter().enumerate().take(nc) {
            let b = b0 + t;
            let q = wp.add(b * bb + 2);
            _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(crate::PREFETCH_BYTES) as *const i8);
            let ws = if F == 0 {
                let (v0, v1) = (bcast(q), bcast(q.add(8)));
                let u = |v, s| {
                    _mm256_cvtepi32_ps(_mm256_sub_epi32(
                        _mm256_and_si256(_mm256_srlv_epi32(v, s), nib),
                        eight,
                    ))
                };
                [u(v0, sh_lo), u(v1, sh_lo), u(v0, sh_hi), u(v1, sh_hi)]
            } else {
                let u = |o: usize| {
                    _mm256_cvtepi32_ps(_mm256_srai_epi32(
                        _mm256_sllv_epi32(bcast(q.add(o)), sh_up),
                        24,
                    ))
                };
                [u(0), u(8), u(16), u(24)]
            };
            let d = _mm256_set1_ps(d);
            for (r, a) in acc.iter_mut().enumerate() {
                let p = xp.add(r * k + b * BLOCK);
                let mut s = _mm256_mul_ps(ws[0], _mm256_loadu_ps(p));
                s = _mm256_fmadd_ps(ws[1], _mm256_loadu_ps(p.add(8)), s);
                s = _mm256_fmadd_ps(ws[2], _mm256_loadu_ps(p.add(16)), s);
                s = _mm256_fmadd_ps(ws[3], _mm256_loadu_ps(p.add(24)), s);
                *a = _mm256_fmadd_ps(d, s, *a);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = crate::hsum256(*a);
    }
}

type RowKernel = fn(BlockFormat, &[u8], &[f32], usize, usize, &mut [f32]);

fn select() -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::has_avx2_fma() {
            // SAFETY: chosen only when the CPU reports AVX2 and FMA, which `row_avx2` needs.
            return |f, w, x, m, k, o| unsafe { row_avx2(f, w, x, m, k, o) };
        }
    }
    row_portable
}

/// Most activation rows handled per pass over a weight row.
const GROUP: usize = 4;

/// The row kernel, written so the compiler vectorizes it: fixed 8-lane accumulators.
#[inline(always)]
fn row_generic(
    f: BlockFormat,
    w: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    out: &mut [f32],
    fma: fn(f32, f32, f32) -> f32,
) {
    let (bb, be) = (f.block_bytes(), f.block_elems());
    let mut buf = [0f32; QK_K];
    let mut i = 0;
    while i < m {
        let g = (m - i).min(GROUP);
        let mut acc = [[0f32; 8]; GROUP];
        for (bi, b) in w.chunks_exact(bb).enumerate() {
            dequantize_block(f, b, &mut buf[..be]);
            for (r, a) in acc.iter_mut().enumerate().take(g) {
                let xb = &x[(i + r) * k + bi * be..][..be];
                for c in 0..be / 8 {
                    for l in 0..8 {
                        a[l] = fma(buf[c * 8 + l], xb[c * 8 + l], a[l]);
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate().take(g) {
            out[i + r] = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
        }
        i += g;
    }
}

fn row_portable(f: BlockFormat, w: &[u8], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    row_generic(f, w, x, m, k, out, |a, b, c| a * b + c)
}

/// AVX2 row kernel: each block's 32 weights are widened to four f32 vectors once and reused
/// for every activation row of the group; the block scale is applied once per block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_avx2(f: BlockFormat, w: &[u8], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    let mut i = 0;
    while i < m {
        let g = (m - i).min(GROUP);
        let xs = &x[i * k..];
        let o = &mut out[i..i + g];
        match (f, g) {
            // Q4_0 and Q8_0 never come here: `matmul_quant` sends them to `row_lanes_avx2`.
            (BlockFormat::Q4_1, 1) => group_q4_1_avx2::<1>(w, xs, k, o),
            (BlockFormat::Q4_1, 2) => group_q4_1_avx2::<2>(w, xs, k, o),
            (BlockFormat::Q4_1, 3) => group_q4_1_avx2::<3>(w, xs, k, o),
            (BlockFormat::Q4_1, _) => group_q4_1_avx2::<4>(w, xs, k, o),
            (_, 1) => group_dequant_avx2::<1>(f, w, xs, k, o),
            (_, 2) => group_dequant_avx2::<2>(f, w, xs, k, o),
            (_, 3) => group_dequant_avx2::<3>(f, w, xs, k, o),
            (_, _) => group_dequant_avx2::<4>(f, w, xs, k, o),
        }
        i += g;
    }
}

/// One Q4_1 weight row against `G` activation rows (`G` a constant so the accumulators stay
/// in registers): nibbles widened to f32 once per block and reused for every row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_q4_1_avx2<const G: usize>(w: &[u8], x: &[f32], k: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let bb = 20;
    let nb = k / BLOCK;
    let mask = _mm_set1_epi8(0x0F);
    let scale = |p: *const u8| {
        _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            u16::from_le_bytes([*p, *p.add(1)]) as i32,
        ))))
    };
    let widen = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    let mut acc = [_mm256_setzero_ps(); G];
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    for b in 0..nb {
        let blk = wp.add(b * bb);
        let d = scale(blk);
        let raw = _mm_loadu_si128(blk.add(4) as *const __m128i);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        let (w0, w1, w2, w3) = (
            widen(lo),
            widen(_mm_srli_si128(lo, 8)),
            widen(hi),
            widen(_mm_srli_si128(hi, 8)),
        );
        let mn = scale(blk.add(2));
        for (r, a) in acc.iter_mut().enumerate() {
            let p = xp.add(r * k + b * BLOCK);
            let (x0, x1, x2, x3) = (
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            );
            let mut s = _mm256_mul_ps(w0, x0);
            s = _mm256_fmadd_ps(w1, x1, s);
            s = _mm256_fmadd_ps(w2, x2, s);
            s = _mm256_fmadd_ps(w3, x3, s);
            *a = _mm256_fmadd_ps(d, s, *a);
            // w = d*q + m, so the block also adds m * sum(x).
            let sx = _mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3));
            *a = _mm256_fmadd_ps(mn, sx, *a);
        }
    }
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = crate::hsum256(*a);
    }
}

/// One weight row against `G` activation rows for the formats without a hand-unpacked
/// path: each block is dequantized once (plain code) and reused for every activation row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_dequant_avx2<const G: usize>(
    f: BlockFormat,
    w: &[u8],
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (bb, be) = (f.block_bytes(), f.block_elems());
    let mut buf = [0f32; QK_K];
    let mut acc = [_mm256_setzero_ps(); G];
    for (bi, blk) in w.chunks_exact(bb).enumerate() {
        _mm_prefetch::<_MM_HINT_T0>(blk.as_ptr().wrapping_add(crate::PREFETCH_BYTES) as *const i8);
        dequantize_block(f, blk, &mut buf[..be]);
        for (r, a) in acc.iter_mut().enumerate() {
            let p = x.as_ptr().add(r * k + bi * be);
            for c in (0..be).step_by(8) {
                *a = _mm256_fmadd_ps(
                    _mm256_loadu_ps(buf.as_ptr().add(c)),
                    _mm256_loadu_ps(p.add(c)),
                    *a,
                );
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = crate::hsum256(*a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Random blocks with sane f16 scales (random bytes elsewhere).
    fn random_blocks(f: BlockFormat, n_blocks: usize, rng: &mut impl Rng) -> Vec<u8> {
        let mut w = Vec::new();
        for _ in 0..n_blocks {
            let mut b: Vec<u8> = (0..f.block_bytes()).map(|_| rng.random::<u8>()).collect();
            let mut put =
                |i: usize, v: f32| b[i..i + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            match f {
                BlockFormat::Q6K => put(208, rng.random_range(0.0001..0.002)),
                BlockFormat::Q4K | BlockFormat::Q5K => {
                    put(0, rng.random_range(0.0001..0.002));
                    put(2, rng.random_range(0.0001..0.002));
                }
                BlockFormat::Q4_1 | BlockFormat::Q5_1 => {
                    put(0, rng.random_range(0.001..0.05));
                    put(2, rng.random_range(-0.2..0.0));
                }
                _ => put(0, rng.random_range(0.001..0.05)),
            }
            w.extend(b);
        }
        w
    }

    const ALL: [BlockFormat; 8] = BlockFormat::ALL;

    /// The block decoder against candle's (an independent implementation of GGML's formats;
    /// a dev-dependency on x86_64 only, see Cargo.toml).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn dequantize_matches_candle() {
        use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for (f, g) in ALL.iter().zip([
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ]) {
            let n = 3;
            let w = random_blocks(*f, n, &mut rng);
            let be = f.block_elems();
            let q = qtensor_from_ggml(g, &w, vec![n, be], &candle_core::Device::Cpu).unwrap();
            let want: Vec<f32> = q
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut got = vec![0f32; n * be];
            for (b, o) in w
                .chunks_exact(f.block_bytes())
                .zip(got.chunks_exact_mut(be))
            {
                dequantize_block(*f, b, o);
            }
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "{f:?} elem {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn fast_matches_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for f in ALL {
            for m in [1, 2, 3, 5, 9] {
                let sizes: &[(usize, usize)] = if f.block_elems() == BLOCK {
                    &[(32, 1), (64, 33), (576, 70), (1536, 5)]
                } else {
                    &[(256, 1), (512, 33), (768, 70), (1536, 5)]
                };
                for &(k, n) in sizes {
                    let w = random_blocks(f, n * k / f.block_elems(), &mut rng);
                    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let mut a = vec![0f32; m * n];
                    let mut b = vec![0f32; m * n];
                    matmul_quant_reference(f, &x, &w, m, k, n, &mut a);
                    matmul_quant(f, &x, &w, m, k, n, &mut b);
                    for (p, q) in a.iter().zip(&b) {
                        assert!(
                            (p - q).abs() <= 1e-4 * (1.0 + p.abs()),
                            "{f:?} m={m} k={k} n={n}: {p} vs {q}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn q4_0_block_layout_follows_ggml() {
        // d = 1, first byte 0x9F: low nibble 15 -> weight 0 is 7, high nibble 9 -> weight 16 is 1.
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        b[2] = 0x9F;
        let mut out = [0f32; BLOCK];
        dequantize_block(BlockFormat::Q4_0, &b, &mut out);
        assert_eq!((out[0], out[16], out[1]), (7.0, 1.0, -8.0));
    }
}
