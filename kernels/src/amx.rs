//! F16 matmuls of many activation rows on AMX (Intel's tile matrix unit, Sapphire Rapids on):
//! a prompt's rows, whose results only fill the KV cache.
//!
//! Why by hand: `std::arch` has no stable AMX intrinsics, and no crate tandem uses runs AMX,
//! so the few tile instructions are inline assembly (which is stable).
//!
//! AMX multiplies bf16 pairs (8 significant bits) into f32 sums. To stay at f32's accuracy the
//! operands are split exactly:
//! - an f16 weight (11 significant bits) is `wh + wl`, wh its top 8 bits and wl the other 3;
//! - an f32 activation (24 significant bits) is `xh + xm + xl`, 8 bits each.
//!
//! Each product of the two is then the sum of five bf16 products (xl·wl, below f32's last bit
//! of the product, is left out), added into one f32 sum per output in the order xh·wh, xh·wl,
//! xm·wh, xm·wl, xl·wh, 32 weights (one tile step) at a time. Every bf16 product is exact in
//! f32; the sum rounds as an f32 sum does, five times per weight where the FMA kernels round
//! once. Against an f64 reference (relative to Σ|x·w|, k = 576 and 1536) the error's RMS is
//! 1.0e-8 against the FMA kernel's 7.0e-9 and its worst 9.7e-8 against 3.2e-8: f32 rounding,
//! not bit for bit [`crate::matmul_f16`]'s. So callers use this only for rows whose values
//! never meet a bit-for-bit comparison with the one-row kernel (see
//! [`crate::matmul_f16_bulk`]). (Three sums, one per activation part, rounded as the FMA
//! kernels do, but their registers left room for one weight tile only: each step loaded five
//! tiles for five products, and this matmul ran 25-30% slower.)
//!
//! This matmul runs at ~190 f32-equivalent GMAC/s on one core against the AVX-512 FMA kernel's
//! ~73 (the `f16_hot` example, m = 512, Emerald Rapids): each step loads seven tiles for ten
//! products, the activation parts once for two weight tiles.
//!
//! Tile registers, configured by [`Tiles::configure`] for `g` (≤ 16) activation rows:
//! - `tmm0`, `tmm1` and `tmm3`, `tmm4`: wh, wl of two tiles of 16 weight rows' next 32
//!   weights, 16 × 64 bytes: row p holds, for each weight row c, weights 2p and 2p + 1 (the
//!   pair layout `tdpbf16ps` reads);
//! - `tmm2`, `tmm5`: the activation parts of the rows' next 32 values, g × 64 bytes (each a
//!   block of [`split_activations`]' layout, rows 64 bytes apart): xh and xm, then xl;
//! - `tmm6`, `tmm7`: the two weight tiles' sums, g × 16 f32.

pub(crate) mod attention;

use crate::rows::SendPtr;
use half::f16;
use std::arch::asm;
use std::arch::x86_64::*;

/// Activation rows per tile.
const ROWS: usize = 16;
/// Weight rows (output columns) per tile.
const COLS: usize = 16;
/// Weights per row and tile step (32 bf16, 64 bytes).
const STEP: usize = 32;

/// Whether this process can run AMX bf16 tile products:
/// - CPUID reports AMX-TILE and AMX-BF16, and the AVX-512 set the splits use (F, BW);
/// - Linux grants the process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, which
///   a process must call before its first tile instruction);
/// - `TANDEM_NO_AMX` is unset.
///
/// Checked once.
pub(crate) fn available() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(|| {
        let cpu = __cpuid_count(7, 0);
        let tile_and_bf16 = cpu.edx & (1 << 24) != 0 && cpu.edx & (1 << 22) != 0;
        std::env::var_os("TANDEM_NO_AMX").is_none()
            && crate::has_avx512()
            && std::is_x86_feature_detected!("avx512bw")
            && tile_and_bf16
            && permitted()
    })
}

#[cfg(target_os = "linux")]
fn permitted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this arch_prctl request takes two integers and only widens the set of register
    // states the kernel saves for this process; it touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn permitted() -> bool {
    false
}

/// Whether [`matmul_f16`] takes a matrix of this shape: whole tile steps along k and whole
/// tiles of 16 weight rows.
pub(crate) fn fits(k: usize, n: usize) -> bool {
    k.is_multiple_of(STEP) && n.is_multiple_of(COLS) && k > 0 && n > 0
}

/// The 64-byte tile configuration `ldtilecfg` reads (palette 1): bytes 16..48 hold each tile
/// register's bytes per row, bytes 48..64 its rows.
#[repr(C, align(64))]
struct Config([u8; 64]);

/// This thread's tile registers while a task runs: shaped for a number of activation rows,
/// released on drop (a thread whose tiles are released saves no tile state on a context
/// switch).
struct Tiles {
    rows: usize,
}

impl Tiles {
    /// Shapes the registers of the module comment for `g` (1..=16) activation rows, unless
    /// they already are.
    ///
    /// # Safety
    /// [`available`] returned true.
    unsafe fn configure(&mut self, g: usize) {
        assert!((1..=ROWS).contains(&g), "{g} rows for a tile");
        if self.rows == g {
            return;
        }
        let mut c = Config([0; 64]);
        c.0[0] = 1;
        for t in 0..8 {
            let rows = if matches!(t, 0 | 1 | 3 | 4) {
                STEP / 2
            } else {
                g
            };
            c.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c.0[48 + t] = rows as u8;
        }
        // SAFETY: AMX is usable (the caller's contract); `c` is a valid palette-1
        // configuration (every shape within 16 rows of 64 bytes) that lives across the
        // instruction.
        unsafe { asm!("ldtilecfg [{}]", in(reg) c.0.as_ptr(), options(nostack)) };
        self.rows = g;
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        if self.rows != 0 {
            // SAFETY: tiles were configured on this thread, so AMX is usable here.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }
}

thread_local! {
    /// The activations' three bf16 parts in tile blocks, reused across calls.
    static PARTS: std::cell::RefCell<Bf16Buf> = std::cell::RefCell::new(Bf16Buf::default());
    /// A task's weight tiles in pair layout (wh then wl per step), reused across calls.
    static PAIRS: std::cell::RefCell<Bf16Buf> = std::cell::RefCell::new(Bf16Buf::default());
}

/// bf16 values on 64-byte boundaries: a tile row that straddles two cache lines loads at
/// half the speed (measured: a 16 × 576 × 16 block's five products took 1095 against 549 ns
/// with the operands 16 bytes off a line). Kept in an [`AlignedBuf`] of f32, two per value.
#[derive(Default)]
struct Bf16Buf(crate::aligned::AlignedBuf);

impl Bf16Buf {
    /// At least `len` values (contents unspecified).
    fn reserve(&mut self, len: usize) -> *mut u16 {
        if self.0.len() * 2 < len {
            self.0.resize(len.div_ceil(2), 0.0);
        }
        self.0.as_mut_ptr() as *mut u16
    }
}

/// u16 values per tile block of activation parts: 16 rows of one step's 32 values.
const BLOCK: usize = ROWS * STEP;

/// `out[m×n] = x[m×k] · w[n×k]ᵀ` on AMX (see the module comment), parallel over tiles of 16
/// weight rows.
///
/// Panics unless [`available`] and [`fits`]`(k, n)`, or on mismatched lengths (caller bugs).
pub(crate) fn matmul_f16(x: &[f32], w: &[f16], m: usize, k: usize, n: usize, out: &mut [f32]) {
    matmul_f16_parts(x, w, m, k, &[n], &mut [out]);
}

/// [`matmul_f16`] with the output's columns in parts: `outs[i]` [m × widths[i]] gets the
/// columns of the weight rows after those of the parts before it (q/k/v or gate/up, whose
/// weights lie one after another: one matmul, written where each part's rows go).
///
/// Panics unless [`available`] and [`fits`]`(k, width)` for every width, or on mismatched
/// lengths (caller bugs).
pub(crate) fn matmul_f16_parts(
    x: &[f32],
    w: &[f16],
    m: usize,
    k: usize,
    widths: &[usize],
    outs: &mut [&mut [f32]],
) {
    let n: usize = widths.iter().sum();
    assert!(
        available() && widths.iter().all(|&d| fits(k, d)) && widths.len() == outs.len(),
        "AMX F16 matmul of [{n}, {k}] in parts {widths:?}"
    );
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    for (o, &d) in outs.iter().zip(widths) {
        assert_eq!(o.len(), m * d);
    }
    // Passes of many rows go in runs of at most `RUN_ROWS`: the parts buffer then stays
    // within 6 bytes × 1024 × k (each run splits the weights again, once per 1024 rows).
    for (r, x) in x.chunks(RUN_ROWS * k).enumerate() {
        let rows = x.len() / k;
        let at = r * RUN_ROWS;
        // Each part's output column tiles, from this run's first row: where tile c's rows go
        // and their stride.
        let mut tiles = Vec::with_capacity(n / COLS);
        for (o, &d) in outs.iter_mut().zip(widths) {
            let run = &mut o[at * d..(at + rows) * d];
            for c in 0..d / COLS {
                tiles.push((SendPtr(run[c * COLS..].as_mut_ptr()), d));
            }
        }
        matmul_run(x, w, rows, k, &tiles);
    }
}

/// Activation rows per run of [`matmul_f16`].
const RUN_ROWS: usize = 1024;

/// [`matmul_f16_parts`] over one run of at most [`RUN_ROWS`] rows: `out_tiles[c]` is where
/// row 0 of output columns 16c..16c + 16 goes, and the row stride there (each tile's rows
/// `m` rows of 16 values inside one part's output, no two tiles' overlapping).
fn matmul_run(x: &[f32], w: &[f16], m: usize, k: usize, out_tiles: &[(SendPtr<f32>, usize)]) {
    if m == 0 {
        return;
    }
    let groups = m.div_ceil(ROWS);
    crate::rows::with_scratch(&PARTS, |parts| {
        let parts = SendPtr(parts.reserve(3 * groups * ROWS * k));
        // Each task splits its own row groups (their blocks are disjoint).
        let per_task = groups.div_ceil(crate::pool::current().threads_now().max(1));
        crate::pool::current().run(groups.div_ceil(per_task), |t| {
            let (g0, g1) = (t * per_task, ((t + 1) * per_task).min(groups));
            let rows = g0 * ROWS..(g1 * ROWS).min(m);
            // SAFETY: AVX-512F/BW are present (`available`); `parts` holds 3·groups·16·k
            // values, and these rows' blocks are this task's alone.
            unsafe { split_activations(x, m, k, rows, parts.get()) };
        });
        let col_tiles = out_tiles.len();
        let threads = crate::pool::current().threads_now().max(1);
        // A task splits its weight tiles first, then takes each group of activation rows
        // across all of them: the group's parts stay in L1/L2 while the tiles' pairs (36-96 KB
        // each at SmolLM2's widths) stream from L2.
        let per_task = col_tiles.div_ceil(2 * threads).clamp(1, TILES_PER_TASK);
        let tasks = col_tiles.div_ceil(per_task);
        crate::pool::current().run(tasks, |t| {
            let mut tiles = Tiles { rows: 0 };
            let (c0, c1) = (t * per_task, ((t + 1) * per_task).min(col_tiles));
            let tile_len = 2 * COLS * k;
            crate::rows::with_scratch(&PAIRS, |pairs| {
                let pairs = pairs.reserve((c1 - c0) * tile_len);
                for c in c0..c1 {
                    let j0 = c * COLS;
                    // SAFETY: AVX-512F/BW present; the 16 rows j0.. are inside `w`, and
                    // `pairs` holds 2·16·k values from (c − c0)·tile_len.
                    unsafe {
                        split_weights(
                            &w[j0 * k..(j0 + COLS) * k],
                            k,
                            pairs.add((c - c0) * tile_len),
                        )
                    };
                }
                let mut i0 = 0;
                while i0 < m {
                    let g = (m - i0).min(ROWS);
                    for c in (c0..c1).step_by(2) {
                        let cols = (c1 - c).min(2);
                        // SAFETY: AMX available; tiles shaped for g rows; `parts` holds the
                        // three parts of every row group, `pairs` these tiles' weights; rows
                        // i0..i0 + g of output tiles c..c + cols are inside their parts'
                        // outputs (`out_tiles`' contract) and this task's alone, and `run`
                        // returns only after every task.
                        unsafe {
                            tiles.configure(g);
                            let out = |c: usize| {
                                let (at, stride) = out_tiles[c.min(c1 - 1)];
                                (at.get().add(i0 * stride), stride)
                            };
                            let pairs = pairs.add((c - c0) * tile_len);
                            let outs = [out(c), out(c + 1)];
                            let group = i0 / ROWS;
                            tile_rows(
                                parts.get(),
                                groups,
                                group,
                                k,
                                g,
                                pairs,
                                tile_len,
                                cols,
                                outs,
                            )
                        };
                    }
                    i0 += g;
                }
            });
        });
    });
}

/// The most weight tiles (16 rows each) a task splits and holds at once: 8 are 288 KB of
/// pairs at k = 576, 768 KB at k = 1536, within L2.
const TILES_PER_TASK: usize = 8;

/// Splits each activation into three bf16 parts (the top 8 significant bits, the next 8, the
/// last 8; each a truncation, so the three sum exactly to the value), laid out as the tiles
/// load them: part p of row i's values 32s..32s + 32 in block (p·groups + i / 16)·steps + s,
/// row i % 16 of it (rows past m are left as they were: no tile loads them). Splits `rows`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_activations(
    x: &[f32],
    m: usize,
    k: usize,
    rows: std::ops::Range<usize>,
    parts: *mut u16,
) {
    debug_assert!(x.len() == m * k && k.is_multiple_of(STEP) && rows.end <= m);
    let (groups, steps) = (m.div_ceil(ROWS), k / STEP);
    let top = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let odd = odd_words();
    // Each of the three parts of 16 values: the value's top bits, the rest.
    let split = |v: __m512| {
        let hi = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), top));
        let r = _mm512_sub_ps(v, hi);
        let mid = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r), top));
        [hi, mid, _mm512_sub_ps(r, mid)]
    };
    for i in rows {
        for s in 0..steps {
            let row = ((i / ROWS) * steps + s) * BLOCK + (i % ROWS) * STEP;
            let at = x.as_ptr().add(i * k + s * STEP);
            let (a, b) = (
                split(_mm512_loadu_ps(at)),
                split(_mm512_loadu_ps(at.add(16))),
            );
            for p in 0..3 {
                let packed = _mm512_permutex2var_epi16(
                    _mm512_castps_si512(a[p]),
                    odd,
                    _mm512_castps_si512(b[p]),
                );
                let to = parts.add(p * groups * steps * BLOCK + row);
                _mm512_storeu_si512(to as *mut _, packed);
            }
        }
    }
}

/// Splits 16 weight rows of length k into wh and wl (see the module comment) in the pair
/// layout, step by step: step s holds wh (16 rows of 16 pairs) then wl.
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn split_weights(w: &[f16], k: usize, pairs: *mut u16) {
    debug_assert!(w.len() == COLS * k);
    let top = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let odd = odd_words();
    // The top 16 bits of each f32 of `a` then `b`, packed in order: 32 values, 16 pairs.
    let halves = |a: __m512, b: __m512| {
        _mm512_permutex2var_epi16(_mm512_castps_si512(a), odd, _mm512_castps_si512(b))
    };
    let steps = k / STEP;
    for s in 0..steps {
        // The weights come from memory, sixteen rows at a time, and their loads stalled this
        // function most of its time: each row's line PREFETCH_STEPS steps on is requested
        // now (the next tile's first ones near the end: tiles lie one after another). Only
        // an address, never dereferenced here, so wrapping past the slice is harmless.
        let ahead = s + PREFETCH_STEPS;
        let (first_row, at) = if ahead < steps {
            (0, ahead * STEP)
        } else {
            (COLS, (ahead - steps) * STEP)
        };
        for c in 0..COLS {
            let line = w.as_ptr().wrapping_add((first_row + c) * k + at);
            _mm_prefetch::<_MM_HINT_T0>(line as *const i8);
        }
        // Row c's 32 weights of this step are its 16 pairs; the tile wants pair p of every
        // row in its row p: a 16 × 16 transposition of 32-bit pairs, done once on the raw
        // f16 pairs (before the split, which then writes both parts' rows in place: one
        // transposition instead of one per part, and 16 registers live instead of 32).
        let mut rows = [_mm512_setzero_si512(); COLS];
        for (c, row) in rows.iter_mut().enumerate() {
            *row = _mm512_loadu_si512(w.as_ptr().add(c * k + s * STEP) as *const _);
        }
        transpose16(&mut rows);
        let dst = pairs.add(s * 2 * COLS * STEP);
        for (p, row) in rows.iter().enumerate() {
            // Weight rows 0..8's pair p, then rows 8..16's, as f32.
            let (a, b) = (
                _mm512_cvtph_ps(_mm512_castsi512_si256(*row)),
                _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(*row)),
            );
            let (ah, bh) = (
                _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), top)),
                _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(b), top)),
            );
            let lo = halves(_mm512_sub_ps(a, ah), _mm512_sub_ps(b, bh));
            _mm512_storeu_si512(dst.add(p * 32) as *mut _, halves(a, b));
            _mm512_storeu_si512(dst.add(COLS * STEP + p * 32) as *mut _, lo);
        }
    }
}

/// How many tile steps (64 bytes of each weight row) ahead [`split_weights`] prefetches.
const PREFETCH_STEPS: usize = 4;

/// The `vpermt2w` indices of the odd 16-bit words of two registers, in order: the top halves
/// of 32 f32 values (their bf16 truncations), one instruction for 32 values where a shift and
/// a narrowing per 16 took four.
#[target_feature(enable = "avx512f")]
unsafe fn odd_words() -> __m512i {
    let idx: [u16; 32] = std::array::from_fn(|i| 2 * i as u16 + 1);
    _mm512_loadu_si512(idx.as_ptr() as *const _)
}

/// Transposes a 16 × 16 matrix of 32-bit lanes held one row per register.
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [__m512i; 16]) {
    // Within 128-bit lanes: 4 × 4 blocks of 32-bit, then across lanes.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // r[4i + j] now holds, in 128-bit lane l, rows 4i..4i+4 at column 4l + j.
    for i in 0..2 {
        for j in 0..4 {
            let (a, b) = (r[8 * i + j], r[8 * i + 4 + j]);
            t[8 * i + j] = _mm512_shuffle_i32x4::<0x88>(a, b);
            t[8 * i + 4 + j] = _mm512_shuffle_i32x4::<0xDD>(a, b);
        }
    }
    // t[8i + j]: lanes (rows 8i..8i+4 col j, rows 8i+4..8i+8 col j, same for col 8 + j);
    // t[8i + 4 + j]: the same for columns 4 + j and 12 + j.
    for j in 0..4 {
        for h in 0..2 {
            let (a, b) = (t[4 * h + j], t[8 + 4 * h + j]);
            r[4 * h + j] = _mm512_shuffle_i32x4::<0x88>(a, b);
            r[8 + 4 * h + j] = _mm512_shuffle_i32x4::<0xDD>(a, b);
        }
    }
}

/// Activation row group `group` (g rows, as the tiles are shaped) against `cols` (1 or 2)
/// tiles of 16 weight rows in pair layout (`pairs`, the second tile's steps `tile_stride`
/// values after the first's), tile i's results written to `outs[i]` (where its first row goes, and the row
/// stride).
///
/// # Safety
/// AMX available and the tiles configured for g rows on this thread; `parts` holds the three
/// parts of `groups` row groups of length k ([`split_activations`]); `pairs` `cols` weight
/// tiles' steps (each at least k / 32 of them); each of the first `cols` of `outs` g rows of 16 values `stride` apart.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows(
    parts: *const u16,
    groups: usize,
    group: usize,
    k: usize,
    g: usize,
    pairs: *const u16,
    tile_stride: usize,
    cols: usize,
    outs: [(*mut f32, usize); 2],
) {
    debug_assert!((cols == 1 || cols == 2) && (1..=ROWS).contains(&g));
    let steps = k / STEP;
    let part = groups * steps * BLOCK;
    let xh = parts.add(group * steps * BLOCK);
    asm!("tilezero tmm6", "tilezero tmm7", options(nostack, nomem));
    for s in 0..steps {
        let x = xh.add(s * BLOCK);
        let wh = pairs.add(s * 2 * COLS * STEP);
        if cols == 2 {
            // The second tile's loads sit between the first's products, so the tile unit
            // has a product to run while each load arrives from L2.
            asm!(
                "tileloadd tmm0, [{wh0} + {row}*1]",
                "tileloadd tmm2, [{xh} + {row}*1]",
                "tileloadd tmm3, [{wh1} + {row}*1]",
                "tdpbf16ps tmm6, tmm2, tmm0",
                "tileloadd tmm1, [{wl0} + {row}*1]",
                "tdpbf16ps tmm7, tmm2, tmm3",
                "tileloadd tmm4, [{wl1} + {row}*1]",
                "tdpbf16ps tmm6, tmm2, tmm1",
                "tdpbf16ps tmm7, tmm2, tmm4",
                "tileloadd tmm5, [{xm} + {row}*1]",
                "tdpbf16ps tmm6, tmm5, tmm0",
                "tdpbf16ps tmm7, tmm5, tmm3",
                "tdpbf16ps tmm6, tmm5, tmm1",
                "tdpbf16ps tmm7, tmm5, tmm4",
                "tileloadd tmm2, [{xl} + {row}*1]",
                "tdpbf16ps tmm6, tmm2, tmm0",
                "tdpbf16ps tmm7, tmm2, tmm3",
                xh = in(reg) x,
                xm = in(reg) x.add(part),
                xl = in(reg) x.add(2 * part),
                wh0 = in(reg) wh,
                wl0 = in(reg) wh.add(COLS * STEP),
                wh1 = in(reg) wh.add(tile_stride),
                wl1 = in(reg) wh.add(tile_stride + COLS * STEP),
                row = in(reg) 64usize,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tileloadd tmm0, [{wh0} + {row}*1]",
                "tileloadd tmm2, [{xh} + {row}*1]",
                "tileloadd tmm1, [{wl0} + {row}*1]",
                "tdpbf16ps tmm6, tmm2, tmm0",
                "tileloadd tmm5, [{xm} + {row}*1]",
                "tdpbf16ps tmm6, tmm2, tmm1",
                "tdpbf16ps tmm6, tmm5, tmm0",
                "tileloadd tmm2, [{xl} + {row}*1]",
                "tdpbf16ps tmm6, tmm5, tmm1",
                "tdpbf16ps tmm6, tmm2, tmm0",
                xh = in(reg) x,
                xm = in(reg) x.add(part),
                xl = in(reg) x.add(2 * part),
                wh0 = in(reg) wh,
                wl0 = in(reg) wh.add(COLS * STEP),
                row = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
    }
    // Each sum tile's g rows straight to their place (the tiles are configured for g rows:
    // `tilestored` writes those, 64 bytes each, `stride` floats apart).
    let (out0, stride0) = outs[0];
    asm!(
        "tilestored [{o} + {s}*1], tmm6",
        o = in(reg) out0,
        s = in(reg) stride0 * 4,
        options(nostack),
    );
    if cols == 2 {
        let (out1, stride1) = outs[1];
        asm!(
            "tilestored [{o} + {s}*1], tmm7",
            o = in(reg) out1,
            s = in(reg) stride1 * 4,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The AMX product agrees with the f64 reference to f32 rounding (relative to the sum of
    /// the terms' magnitudes), at row counts with and without a partial tile.
    #[test]
    fn amx_f16_matches_the_reference_to_rounding() {
        if !available() {
            eprintln!("skipped: no AMX here");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(61);
        // Tasks of one and of several weight tiles, a partial row group, two runs of rows.
        for (m, k, n) in [
            (1, 32, 16),
            (16, 64, 32),
            (37, 576, 48),
            (20, 1536, 16),
            (33, 576, 320),
            (1100, 64, 16),
        ] {
            let (x, w) = crate::f16_gemm::random_operands(&mut rng, (m, k, n), 3.0, 0.2);
            let mut want = vec![0f32; m * n];
            crate::matmul_f16_reference(&x, &w, m, k, n, &mut want);
            let mut got = vec![0f32; m * n];
            matmul_f16(&x, &w, m, k, n, &mut got);
            for i in 0..m {
                for j in 0..n {
                    let scale: f32 = (0..k)
                        .map(|p| (x[i * k + p] * w[j * k + p].to_f32()).abs())
                        .sum();
                    let (a, b) = (want[i * n + j], got[i * n + j]);
                    assert!(
                        (a - b).abs() <= 4e-7 * scale + 1e-30,
                        "m={m} k={k} n={n} [{i},{j}]: {a} vs {b} (scale {scale})"
                    );
                }
            }
        }
    }

    /// Weights in parts (q/k/v) give each part's columns of the one matmul, bit for bit,
    /// with an odd number of tiles in a part and a pair of tiles across two parts.
    #[test]
    fn parts_are_the_whole_matmuls_columns() {
        if !available() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(67);
        let (m, k, widths) = (70, 96, [48usize, 16, 32]);
        let n: usize = widths.iter().sum();
        let (x, w) = crate::f16_gemm::random_operands(&mut rng, (m, k, n), 3.0, 0.2);
        let mut whole = vec![0f32; m * n];
        matmul_f16(&x, &w, m, k, n, &mut whole);
        let mut bufs: Vec<Vec<f32>> = widths.iter().map(|&d| vec![f32::NAN; m * d]).collect();
        let mut outs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        matmul_f16_parts(&x, &w, m, k, &widths, &mut outs);
        let mut col = 0;
        for (b, &d) in bufs.iter().zip(&widths) {
            for i in 0..m {
                for j in 0..d {
                    let (a, p) = (whole[i * n + col + j], b[i * d + j]);
                    assert_eq!(a.to_bits(), p.to_bits(), "row {i}, column {}", col + j);
                }
            }
            col += d;
        }
    }

    #[test]
    fn transposes_sixteen_by_sixteen() {
        if !available() {
            return;
        }
        let mut m = [0i32; 256];
        m.iter_mut().enumerate().for_each(|(i, v)| *v = i as i32);
        // SAFETY: AVX-512F present (`available`); every load and store is of 16 i32.
        unsafe {
            let mut r = [_mm512_setzero_si512(); 16];
            for (i, row) in r.iter_mut().enumerate() {
                *row = _mm512_loadu_si512(m.as_ptr().add(16 * i) as *const _);
            }
            transpose16(&mut r);
            let mut got = [0i32; 256];
            for (i, row) in r.iter().enumerate() {
                _mm512_storeu_si512(got.as_mut_ptr().add(16 * i) as *mut _, *row);
            }
            for i in 0..16 {
                for j in 0..16 {
                    assert_eq!(got[16 * i + j], m[16 * j + i], "[{i},{j}]");
                }
            }
        }
    }
}
