//! Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights repacked eight rows at a time, for the
//! 8-bit-activation path on AVX2.
//!
//! Why: in GGML's layout each weight row is dotted on its own, and every 32-weight block costs
//! ~16 instructions (unpack, two sign fixes, `vpmaddubsw`, `vpmaddwd`, scales, FMA, and a
//! horizontal sum per row at the end). llama.cpp repacks Q4_0 at load time into interleaved
//! 8-row tiles, and its Q4_0 decode measured 1.15-1.2x tandem's here (BENCHMARKS.md). This is
//! tandem's own interleaving: within a tile and block, 32 bytes hold four consecutive weights
//! of each of the 8 rows, so one `vpmaddubsw` against four activation bytes broadcast to every
//! lane advances all 8 rows; the 8 rows' scales convert in one instruction, and the 8 results
//! land in one register (no horizontal sums). Q4_0 levels stay unsigned (0..15) and the −8
//! offset becomes `−8·Σx` per block; Q8_0 weights are signed, so `vpmaddubsw` takes |w| and
//! x with w's sign, as in the row kernel. 2.2x the row kernel's speed at m = 1 (Q4_0).
//! Where the CPU has AVX-512 VNNI, Q8_0 tiles store their levels + 128 (*biased*, see
//! [`Int8Tiles::biased`]), so they take the unsigned-weight path too, with a `−128·Σx` offset.
//!
//! Layout, per tile of rows 8t..8t+8 and block b: the 8 rows' f16 scales (16 bytes), then
//! 32-byte groups where byte `4·r + i` of group g is row r's weight `4g + i`. Q8_0 has eight
//! groups (272 bytes); Q4_0 four (144 bytes), each byte holding level `4g + i` in its low
//! nibble and level `16 + 4g + i` in its high nibble. Q5_0 puts the 8 rows' 32-bit high-bit
//! words (row r at bytes 4r..4r+4, 32 bytes) before Q4_0's four groups (176 bytes): its levels
//! are unsigned 0..31 with a −16 offset, which becomes `−16·Σx` per block. Q4_1 and Q5_1
//! (`d·q + m`) put the 8 rows' f16 mins after the scales (16 bytes), then Q4_0's (160 bytes)
//! or Q5_0's (192 bytes) layout; their unsigned levels take no offset, and `m·d_x·Σx` is
//! added per block with one multiply-add for the 8 rows. (Through the row kernels they
//! decoded SmolLM2's Q4_1 file at 119–160 tok/s against 228–269 in tiles, 2 threads.)
//!
//! With AVX-512 VNNI and BW, a pass takes two consecutive tiles at a time in 512-bit
//! registers (`tile_pair_rows_vnni`), the same operations lane for lane.
//!
//! Every activation row goes through the same per-row arithmetic whatever rows come with it,
//! so prefill, decode and verification give identical results. The reference is
//! [`crate::matmul_int8_reference`] on the unpacked weights.

use crate::int8_gemm::Int8Rows;
use crate::quant_gemm::{BlockFormat, BLOCK};

/// Rows per tile.
pub const TILE: usize = 8;

/// A Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 matrix [n, k] in 8-row tiles.
#[derive(Debug, Clone)]
pub struct Int8Tiles {
    pub format: BlockFormat,
    /// Q8_0 levels stored + 128, as unsigned bytes (on CPUs with AVX-512 VNNI). `vpdpbusd`
    /// multiplies unsigned bytes by signed ones, and only its signed operand can be a
    /// broadcast from memory: with the weights on the unsigned side, each activation group
    /// of four bytes is broadcast inside the `vpdpbusd` instead of by a `vpbroadcastd` of
    /// its own (measured 1.25 against 1.67 `vpdpbusd` per cycle on Zen 4), and the offset
    /// comes off through the activations' block sums, which the rounding already has, instead
    /// of a `vpdpbusd` of ones per group for Σw. Exact: |Σ (w + 128)·x| ≤ 32 · 255 · 128 fits
    /// i32, so the results are bit for bit those of the signed form.
    biased: bool,
    /// The tile bytes, shared by the matrices [`Int8Tiles::fuse`] laid out one after another
    /// (q/k/v, gate/up), so [`Int8Tiles::joined`] can run them as one matrix.
    store: std::sync::Arc<[u8]>,
    /// Where this matrix's tiles start in `store`.
    start: usize,
    pub n: usize,
    pub k: usize,
}

impl Int8Tiles {
    /// Repacks GGML Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 rows; `None` for other formats, when the shape does not
    /// tile (n not a multiple of 8), or where this CPU has no kernel for it (no AVX2).
    pub fn pack(format: BlockFormat, w: &[u8], n: usize, k: usize) -> Option<Self> {
        if !matches!(
            format,
            BlockFormat::Q4_0
                | BlockFormat::Q4_1
                | BlockFormat::Q5_0
                | BlockFormat::Q5_1
                | BlockFormat::Q8_0
        ) || !available()
            || !n.is_multiple_of(TILE)
            || !k.is_multiple_of(BLOCK)
            || k == 0
        {
            return None;
        }
        let (nb, bb) = (k / BLOCK, format.block_bytes());
        if w.len() != n * nb * bb {
            return None;
        }
        let biased = format == BlockFormat::Q8_0 && vnni();
        let mut data = vec![0u8; n * nb * bb];
        for_each_byte(format, n, k, |g, t| data[t] = w[g] ^ bias(biased, bb, t));
        Some(Int8Tiles {
            format,
            biased,
            store: data.into(),
            start: 0,
            n,
            k,
        })
    }

    /// This matrix's tile bytes.
    fn data(&self) -> &[u8] {
        &self.store[self.start..][..self.n * self.k / BLOCK * self.format.block_bytes()]
    }

    pub fn bytes(&self) -> usize {
        self.data().len()
    }

    /// Where this matrix's tile bytes sit in memory: (address, length).
    pub fn memory(&self) -> (usize, usize) {
        let d = self.data();
        (d.as_ptr() as usize, d.len())
    }

    /// The matrices `parts` (one format and width) copied into one allocation, one after
    /// another, each returned as a view of its rows: the same results, and [`Int8Tiles::joined`]
    /// of the views is the matrix of all their rows without a copy. Matrices that one input
    /// feeds (q/k/v, gate/up) then stream as one: one pass, one rounding of the activations,
    /// one pool call. `None` when the parts do not share a format and width.
    pub fn fuse(parts: &[&Int8Tiles]) -> Option<Vec<Int8Tiles>> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|t| (t.format, t.biased, t.k) != (first.format, first.biased, first.k))
        {
            return None;
        }
        let mut data = Vec::with_capacity(parts.iter().map(|t| t.bytes()).sum());
        let mut starts = Vec::with_capacity(parts.len());
        for t in parts {
            starts.push(data.len());
            data.extend_from_slice(t.data());
        }
        let store: std::sync::Arc<[u8]> = data.into();
        Some(
            parts
                .iter()
                .zip(starts)
                .map(|(t, start)| Int8Tiles {
                    store: store.clone(),
                    start,
                    ..(*t).clone()
                })
                .collect(),
        )
    }

    /// The matrix of all of `parts`' rows, in order, when they lie one after another in one
    /// allocation ([`Int8Tiles::fuse`]); `None` otherwise.
    pub fn joined<'a>(parts: impl IntoIterator<Item = &'a Int8Tiles>) -> Option<Int8Tiles> {
        let mut parts = parts.into_iter();
        let first = parts.next()?;
        let (mut next, mut n) = (first.start + first.bytes(), first.n);
        for t in parts {
            if !std::sync::Arc::ptr_eq(&t.store, &first.store)
                || t.start != next
                || (t.format, t.biased, t.k) != (first.format, first.biased, first.k)
            {
                return None;
            }
            next += t.bytes();
            n += t.n;
        }
        Some(Int8Tiles { n, ..first.clone() })
    }

    /// The GGML rows again (for export, the GPU, candle's kernels and f32 activations).
    pub fn unpack(&self) -> Vec<u8> {
        let data = self.data();
        let mut w = vec![0u8; data.len()];
        let bb = self.format.block_bytes();
        for_each_byte(self.format, self.n, self.k, |g, t| {
            w[g] = data[t] ^ bias(self.biased, bb, t)
        });
        w
    }

    /// The GGML bytes of rows `rows` (in that order): a subset of the matrix, e.g. a draft
    /// model's output head cut down to a shortlist of tokens, without unpacking every row.
    ///
    /// Panics if a row is out of range (a caller bug).
    pub fn unpack_rows(&self, rows: &[usize]) -> Vec<u8> {
        let row_bytes = self.k / BLOCK * self.format.block_bytes();
        let mut w = vec![0u8; rows.len() * row_bytes];
        let bb = self.format.block_bytes();
        let data = self.data();
        for (dst, &row) in w.chunks_exact_mut(row_bytes).zip(rows) {
            assert!(row < self.n, "row {row} of a {}-row matrix", self.n);
            for_each_row_byte(self.format, self.k, row, |g, t| {
                dst[g] = data[t] ^ bias(self.biased, bb, t)
            });
        }
        w
    }

    /// `out[m×n] = x[m×k] · Wᵀ` with x rounded to 8 bits per 32-block (as
    /// [`crate::matmul_int8`]), parallel over tiles.
    ///
    /// Panics on mismatched lengths (a caller bug).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k);
        assert_eq!(out.len(), m * n);
        if m == 0 || n == 0 {
            return;
        }
        crate::int8_gemm::with_rounded(x, k, |xq| self.matmul_rounded(xq, m, out))
    }

    /// [`Int8Tiles::matmul`] on activations already rounded by [`Int8Rows::quantize`] (a
    /// caller that also reads the rounded values, such as the greedy output head's error
    /// bound, rounds once).
    ///
    /// Panics on mismatched lengths (a caller bug).
    pub fn matmul_rounded(&self, xq: &Int8Rows, m: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert_eq!(xq.quants.len(), m * k);
        assert_eq!(out.len(), m * n);
        if m == 0 || n == 0 {
            return;
        }
        let fmt = Stored::of(self.format, self.biased);
        crate::rows::with_scratch(&OFFSETS, |offs| {
            block_offsets(fmt, xq, offs);
            self.run(fmt, xq, offs, m, out)
        })
    }

    /// `fmt`: `Stored::of` the tiles; `offs`: [`block_offsets`] of `xq`.
    fn run(&self, fmt: Stored, xq: &Int8Rows, offs: &[i32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        let nb = k / BLOCK;
        let tiles = n / TILE;
        let tile_bytes = nb * TILE * self.format.block_bytes();
        let group = group_size();
        // Tasks of whole tiles; each writes its tiles' 8 columns in every output row.
        let threads = crate::pool::current().threads_now().max(1);
        // A pass of at most one group of activation rows (decode, a verification of up to 7
        // drafted tokens with VNNI) streams each tile once: up to 128 tiles (1024 rows) per
        // task, which gives the 49k-row output head long sequential runs (SmolLM2 tg128, four
        // alternations: Q4_0 230 against 205 tok/s, Q8_0 148 against 144), and one task per
        // thread for every matrix while the cores are idle (Q8_0, three alternations: tg128
        // 185.3 against 173.4 tok/s, verify4 154.5 against 132.3 passes/s, verify8 98.6
        // against 87.8; while the pool saw stalls lately, four per thread, see
        // `f16_gemm::matmul_with`). More rows reread a task's tiles per group of
        // activation rows, so 16 tiles (128 rows, ~40-80 KB) keep them in L2.
        let streaming = m <= group;
        let most = if streaming { 128 } else { 16 };
        let per_thread = crate::rows::tasks_per_thread(streaming);
        let per_task = tiles.div_ceil(per_thread * threads).clamp(1, most);
        let tasks = tiles.div_ceil(per_task);
        let base = crate::rows::SendPtr(out.as_mut_ptr());
        let data = self.data();
        let pairs = pairs_for(fmt);
        crate::pool::current().run(tasks, |c| {
            let mut res = [0f32; 2 * TILE * GROUP_MAX];
            let (mut t, end) = (c * per_task, ((c + 1) * per_task).min(tiles));
            while t < end {
                // Two tiles at a time where the kernel has it (the results do not depend on
                // the pairing, see `tile_pair_rows_vnni`), else one.
                let width = if pairs && t + 1 < end { 2 } else { 1 };
                let span = &data[t * tile_bytes..][..width * tile_bytes];
                let mut i0 = 0;
                while i0 < m {
                    let g = (m - i0).min(group);
                    let res = &mut res[..g * width * TILE];
                    if width == 2 {
                        tile_pair_rows(fmt, span, tile_bytes, xq, offs, i0, g, k, res);
                    } else {
                        tile_rows(fmt, span, xq, offs, i0, g, k, res);
                    }
                    for r in 0..g {
                        // SAFETY: this task alone writes columns 8t..8(t + width); `run`
                        // waits for every task before `out` is used again.
                        unsafe {
                            let dst = base.get().add((i0 + r) * n + t * TILE);
                            let src = res[r * width * TILE..].as_ptr();
                            std::ptr::copy_nonoverlapping(src, dst, width * TILE);
                        }
                    }
                    i0 += g;
                }
                t += width;
            }
        });
    }
}

/// What a biased Q8_0 tile's byte at `t` holds beyond the GGML byte (XOR): 0x80 on the levels
/// (i8 v ^ 0x80 read as u8 is v + 128), nothing on the scales (the first 16 bytes of each
/// tile block).
fn bias(biased: bool, block_bytes: usize, t: usize) -> u8 {
    if biased && t % (TILE * block_bytes) >= 2 * TILE {
        0x80
    } else {
        0
    }
}

/// Calls `f(ggml_offset, tile_offset)` for every byte of an [n, k] matrix: the layout of the
/// module comment (a Q4_0 byte already holds levels p and 16 + p, so bytes move whole).
fn for_each_byte(format: BlockFormat, n: usize, k: usize, mut f: impl FnMut(usize, usize)) {
    let row_bytes = k / BLOCK * format.block_bytes();
    for row in 0..n / TILE * TILE {
        for_each_row_byte(format, k, row, |g, t| f(row * row_bytes + g, t));
    }
}

/// Calls `f(offset_in_row, tile_offset)` for every byte of GGML row `row`.
fn for_each_row_byte(format: BlockFormat, k: usize, row: usize, mut f: impl FnMut(usize, usize)) {
    let (nb, bb) = (k / BLOCK, format.block_bytes());
    let (t, r) = (row / TILE, row % TILE);
    for b in 0..nb {
        let tile = (t * nb + b) * TILE * bb;
        let at = b * bb;
        f(at, tile + 2 * r);
        f(at + 1, tile + 2 * r + 1);
        // Q4_1 / Q5_1: the 8 rows' f16 mins after the scales, row r's at 16 + 2r.
        let with_min = matches!(format, BlockFormat::Q4_1 | BlockFormat::Q5_1);
        if with_min {
            f(at + 2, tile + 16 + 2 * r);
            f(at + 3, tile + 16 + 2 * r + 1);
        }
        let (at_qh, tile_qh) = if with_min {
            (at + 4, tile + 32)
        } else {
            (at + 2, tile + 16)
        };
        // Q5_0 / Q5_1's high bits: row r's word at 4r after the scales (and mins); the
        // nibbles follow Q4_0's layout after.
        let (qs, groups) = if matches!(format, BlockFormat::Q5_0 | BlockFormat::Q5_1) {
            for p in 0..4 {
                f(at_qh + p, tile_qh + 4 * r + p);
            }
            (at_qh + 4, tile_qh + 32)
        } else {
            (at_qh, tile_qh)
        };
        for p in 0..at + bb - qs {
            f(qs + p, groups + 32 * (p / 4) + 4 * r + p % 4);
        }
    }
}

/// How far ahead of the block in hand a pass asks for its weights, into L2: decode streams
/// them from DRAM, and 4 KB into L2 measured faster than the row kernels' 1 KB into L1 (the
/// `stream` example, SmolLM2's matmuls, 2 threads, best of 20 passes averaged over five or six
/// alternations: Q8_0 5.2-5.6 against 6.7 ms per pass, Q4_0 3.1-3.4 against 3.7; tg128 over
/// five alternations of the two binaries, Q4_0 229 against 206 tok/s). Passes of several rows
/// kept 1 KB into L1 until the biased Q8_0 tiles made them faster: then 4 KB into L2 measured
/// better for them too (Q8_0, m = 8, best of 40, three alternations: 6.8-8.9 against
/// 7.3-9.9 ms; 2-8 KB tried, 4-8 KB best).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 4096;

/// Activation rows per pass over a tile: AVX2's 16 vector registers hold 4 rows' dot and
/// accumulator vectors beside the unpacked weights; with VNNI (AVX-512VL: 32 registers) 8,
/// which keeps eight `vpdpbusd` chains in flight instead of four (each block adds 8 dependent
/// `vpdpbusd` to a row's sum, so 4 rows left the multi-row passes latency-bound).
const GROUP_AVX2: usize = 4;
const GROUP_MAX: usize = 8;

fn group_size() -> usize {
    if vnni() {
        GROUP_MAX
    } else {
        GROUP_AVX2
    }
}

/// Whether the tiles run the VNNI kernel (8 rows per pass; Q8_0 tiles biased).
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::has_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The formats [`tile_body`] reads, as its const parameter.
#[cfg(target_arch = "x86_64")]
const Q8_0: u8 = 0;
#[cfg(target_arch = "x86_64")]
const Q4_0: u8 = 1;
#[cfg(target_arch = "x86_64")]
const Q5_0: u8 = 2;
/// Q8_0 tiles stored biased ([`Int8Tiles::biased`]).
#[cfg(target_arch = "x86_64")]
const Q8_0_BIASED: u8 = 3;
#[cfg(target_arch = "x86_64")]
const Q4_1: u8 = 4;
#[cfg(target_arch = "x86_64")]
const Q5_1: u8 = 5;

thread_local! {
    /// [`block_offsets`] of the caller's activations, reused across calls.
    static OFFSETS: std::cell::RefCell<Vec<i32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What each (activation row, block) dot product of unsigned levels starts from: −offset·Σx
/// (Q4_0's levels are w + 8, Q5_0's w + 16, biased Q8_0's w + 128), one i32 per block, empty
/// for signed levels. Computed once per call, a block's sum then starts from a broadcast load
/// instead of a zero, a shift, a broadcast from a general register and a subtraction per row
/// and block (a fifth of the VNNI kernel's instructions at 8 rows); integer sums, so the
/// same results.
fn block_offsets(f: Stored, xq: &Int8Rows, offs: &mut Vec<i32>) {
    offs.clear();
    let offset = match f {
        Stored::Q4_0 => 8,
        Stored::Q5_0 => 16,
        Stored::Q8_0Biased => 128,
        Stored::Q8_0 | Stored::Q4_1 | Stored::Q5_1 => return,
    };
    offs.extend(xq.sums.iter().map(|&s| -offset * s));
}

/// A matrix's tile format as the kernels dispatch on it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stored {
    Q4_0,
    Q5_0,
    /// Unsigned levels and a min per row and block (`d·q + m`).
    Q4_1,
    Q5_1,
    Q8_0,
    Q8_0Biased,
}

impl Stored {
    fn of(format: BlockFormat, biased: bool) -> Stored {
        match format {
            BlockFormat::Q4_0 => Stored::Q4_0,
            BlockFormat::Q5_0 => Stored::Q5_0,
            BlockFormat::Q4_1 => Stored::Q4_1,
            BlockFormat::Q5_1 => Stored::Q5_1,
            _ if biased => Stored::Q8_0Biased,
            _ => Stored::Q8_0,
        }
    }
}

/// Whether [`Int8Tiles::run`] takes tiles of format `f` two at a time
/// ([`tile_pair_rows_vnni`]).
fn pairs_for(f: Stored) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        f != Stored::Q8_0 && crate::has_vnni_bw()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = f;
        false
    }
}

/// Two consecutive tiles against activation rows `i0..i0 + g` ([`tile_pair_rows_vnni`]);
/// only where [`pairs_for`] said so.
#[allow(clippy::too_many_arguments)]
fn tile_pair_rows(
    f: Stored,
    tiles: &[u8],
    tile_bytes: usize,
    xq: &Int8Rows,
    offs: &[i32],
    i0: usize,
    g: usize,
    k: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(
            pairs_for(f),
            "tile pairs need AVX-512 VNNI/BW and unsigned levels"
        );
        assert!(tiles.len() >= 2 * tile_bytes && out.len() >= g * 2 * TILE && g <= GROUP_MAX);
        // SAFETY: `has_vnni_bw` (through `pairs_for`) checked AVX2/FMA/F16C and AVX-512
        // F/BW/VL/VNNI; the kernel reads `2·tile_bytes` of `tiles` and writes `g·16` of `out`,
        // which the caller sized.
        unsafe { tile_pair_rows_vnni(f, tiles, tile_bytes, xq, offs, i0, g, k, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (f, tiles, tile_bytes, xq, offs, i0, g, k, out);
        unreachable!("tile pairs are only run where `pairs_for` said so");
    }
}

/// One tile against activation rows `i0..i0 + g` (g ≤ [`group_size`]): `out[r·8 + c]` for
/// tile row c. `offs`: [`block_offsets`].
#[allow(clippy::too_many_arguments)]
fn tile_rows(
    f: Stored,
    tile: &[u8],
    xq: &Int8Rows,
    offs: &[i32],
    i0: usize,
    g: usize,
    k: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::has_vnni() {
            // SAFETY: tiles exist only where AVX2/FMA/F16C were detected (`pack`), and
            // `has_vnni` checked AVX-512 VNNI/VL.
            return unsafe { tile_rows_vnni(f, tile, xq, offs, i0, g, k, out) };
        }
        // SAFETY: tiles exist only where AVX2/FMA/F16C were detected (`pack`).
        unsafe { tile_rows_avx2(f, tile, xq, offs, i0, g, k, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (f, tile, xq, offs, i0, g, k, out);
        unreachable!("int8 tiles are only made where the AVX2 kernel runs");
    }
}

/// [`tile_rows`] on AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows_avx2(
    f: Stored,
    tile: &[u8],
    xq: &Int8Rows,
    offs: &[i32],
    i0: usize,
    g: usize,
    k: usize,
    out: &mut [f32],
) {
    match f {
        Stored::Q4_0 => by_group!(g, G => tile_body::<Q4_0, G, false>(tile, xq, offs, i0, k, out)),
        Stored::Q5_0 => by_group!(g, G => tile_body::<Q5_0, G, false>(tile, xq, offs, i0, k, out)),
        Stored::Q4_1 => by_group!(g, G => tile_body::<Q4_1, G, false>(tile, xq, offs, i0, k, out)),
        Stored::Q5_1 => by_group!(g, G => tile_body::<Q5_1, G, false>(tile, xq, offs, i0, k, out)),
        Stored::Q8_0 => by_group!(g, G => tile_body::<Q8_0, G, false>(tile, xq, offs, i0, k, out)),
        Stored::Q8_0Biased => {
            by_group!(g, G => tile_body::<Q8_0_BIASED, G, false>(tile, xq, offs, i0, k, out))
        }
    }
}

/// [`tile_rows`] with AVX-512 VNNI (up to 8 rows per pass).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows_vnni(
    f: Stored,
    tile: &[u8],
    xq: &Int8Rows,
    offs: &[i32],
    i0: usize,
    g: usize,
    k: usize,
    out: &mut [f32],
) {
    match f {
        Stored::Q4_0 => by_group8!(g, G => tile_body::<Q4_0, G, true>(tile, xq, offs, i0, k, out)),
        Stored::Q5_0 => by_group8!(g, G => tile_body::<Q5_0, G, true>(tile, xq, offs, i0, k, out)),
        Stored::Q4_1 => by_group8!(g, G => tile_body::<Q4_1, G, true>(tile, xq, offs, i0, k, out)),
        Stored::Q5_1 => by_group8!(g, G => tile_body::<Q5_1, G, true>(tile, xq, offs, i0, k, out)),
        Stored::Q8_0 => by_group8!(g, G => tile_body::<Q8_0, G, true>(tile, xq, offs, i0, k, out)),
        Stored::Q8_0Biased => {
            by_group8!(g, G => tile_body::<Q8_0_BIASED, G, true>(tile, xq, offs, i0, k, out))
        }
    }
}

/// Where a tile block of stored format `FMT` keeps what, and how its levels are read: shared
/// by [`tile_body`] and [`tile_pair_body`] (the same layout in 256- and 512-bit registers).
#[cfg(target_arch = "x86_64")]
struct BlockLayout {
    /// Bytes per tile block (8 rows × the format's block bytes).
    bytes: usize,
    /// Unsigned levels with an offset taken off through Σx: Q4_0 (8), Q5_0 (16), biased Q8_0
    /// (128, where the kernel runs it unsigned: with VNNI).
    offset: bool,
    /// Q4_1 / Q5_1: unsigned levels and a min per row, added as m·d_x·Σx.
    with_min: bool,
    /// Levels in nibbles (low: groups 0..4, high: groups 4..8 of the same bytes).
    nibbles: bool,
    /// Q5_*: a fifth bit per level in the 8 rows' high-bit words.
    five: bool,
    /// Where the high-bit words and the level groups start.
    qh_at: usize,
    groups_at: usize,
}

#[cfg(target_arch = "x86_64")]
impl BlockLayout {
    const fn of(fmt: u8, vnni: bool) -> BlockLayout {
        let with_min = fmt == Q4_1 || fmt == Q5_1;
        let five = fmt == Q5_0 || fmt == Q5_1;
        let qh_at = if with_min { 32 } else { 16 };
        BlockLayout {
            bytes: TILE
                * match fmt {
                    Q4_0 => 18,
                    Q5_0 => 22,
                    Q4_1 => 20,
                    Q5_1 => 24,
                    _ => 34,
                },
            offset: fmt == Q4_0 || fmt == Q5_0 || (vnni && fmt == Q8_0_BIASED),
            with_min,
            nibbles: matches!(fmt, Q4_0 | Q5_0 | Q4_1 | Q5_1),
            five,
            qh_at,
            groups_at: qh_at + if five { 32 } else { 0 },
        }
    }
}

/// Q5_*: lane 4r+i of level group `s` needs bit 4s+i of row r's high-bit word, which is bit
/// 4(s%2)+i of its byte s/2. The byte picked for each lane (a `pshufb` index, repeating per
/// 16-byte lane), and the four bits to test, one per byte of a 32-bit lane.
#[cfg(target_arch = "x86_64")]
fn high_bit_pick<const N: usize>(s: usize) -> ([i8; N], i32) {
    let pick = (s / 2) as i8;
    let bits = if s.is_multiple_of(2) {
        0x0804_0201
    } else {
        0x8040_2010u32 as i32
    };
    (std::array::from_fn(|l| (l % 16 / 4 * 4) as i8 + pick), bits)
}

/// The tile kernel, inlined into [`tile_rows_avx2`] and [`tile_rows_vnni`] (whose target
/// features it then compiles with). `VNNI`: each group's products summed by `vpdpbusd` instead of
/// `vpmaddubsw` + `vpmaddwd` + add; the same integers (no pair of products here can saturate
/// `vpmaddubsw`'s i16: at most 2 · 128 · 127), so the same results bit for bit.
///
/// Biased Q8_0 tiles ([`Int8Tiles::biased`]) go through the unsigned path with VNNI, their
/// offset 128 taken off through Σx like Q4_0's 8. Without VNNI (only the tests run them
/// there) the bias comes off each group first (`vpmaddubsw` of w + 128 could saturate i16),
/// and they take the signed path.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_body<const FMT: u8, const G: usize, const VNNI: bool>(
    tile: &[u8],
    xq: &Int8Rows,
    offs: &[i32],
    i0: usize,
    k: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let nb = k / BLOCK;
    let BlockLayout {
        bytes: tile_block,
        offset,
        with_min,
        nibbles,
        five,
        qh_at,
        groups_at,
    } = const { BlockLayout::of(FMT, VNNI) };
    // Unsigned levels multiply x as they are; signed ones (Q8_0 without VNNI) take |w|
    // against x with w's sign.
    let unsigned = offset || with_min;
    debug_assert!(!offset || offs.len() >= (i0 + G) * nb);
    let nib = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let top_bits = _mm256_set1_epi8(0x80u8 as i8);
    let tp = tile.as_ptr();
    let xp = xq.quants.as_ptr().add(i0 * k) as *const u8;
    let mut acc = [_mm256_setzero_ps(); G];
    for b in 0..nb {
        let blk = tp.add(b * tile_block);
        let mut ahead = 0;
        while ahead < tile_block {
            // Never faults, so addresses past the matrix are harmless.
            _mm_prefetch::<_MM_HINT_T1>(blk.wrapping_add(PREFETCH_AHEAD + ahead) as *const i8);
            ahead += 64;
        }
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        // Q5_0 / Q5_1: the 8 rows' high-bit words, row r's at lanes 4r..4r+4.
        let qh = if five {
            _mm256_loadu_si256(blk.add(qh_at) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        let mut dot = [_mm256_setzero_si256(); G];
        if offset {
            for (r, d) in dot.iter_mut().enumerate() {
                *d = _mm256_set1_epi32(*offs.get_unchecked((i0 + r) * nb + b));
            }
        }
        // Eight groups of four weights per row: group s is weights 4s..4s+4 of all 8 rows.
        for s in 0..8 {
            let (ws, absw) = if nibbles {
                // Groups 0..4 are the low nibbles, 4..8 the high nibbles of the same bytes.
                let raw = _mm256_loadu_si256(blk.add(groups_at + 32 * (s % 4)) as *const __m256i);
                let lv = if s < 4 {
                    raw
                } else {
                    _mm256_srli_epi16(raw, 4)
                };
                let mut lv = _mm256_and_si256(lv, nib);
                if five {
                    // Each lane's high bit (`high_bit_pick`), spread over the row's four
                    // lanes, tested, and added as 16.
                    let (idx, bits) = high_bit_pick::<32>(s);
                    let spread =
                        _mm256_shuffle_epi8(qh, _mm256_loadu_si256(idx.as_ptr() as *const __m256i));
                    let bits = _mm256_set1_epi32(bits);
                    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bits), bits);
                    lv = _mm256_or_si256(lv, _mm256_and_si256(set, _mm256_set1_epi8(16)));
                }
                (lv, lv)
            } else {
                let w = _mm256_loadu_si256(blk.add(16 + 32 * s) as *const __m256i);
                if unsigned {
                    (w, w)
                } else {
                    let w = if FMT == Q8_0_BIASED {
                        _mm256_xor_si256(w, top_bits)
                    } else {
                        w
                    };
                    (w, _mm256_sign_epi8(w, w))
                }
            };
            for (r, d) in dot.iter_mut().enumerate() {
                let xs = _mm256_set1_epi32(
                    (xp.add(r * k + b * BLOCK + 4 * s) as *const i32).read_unaligned(),
                );
                let xs = if unsigned {
                    xs
                } else {
                    _mm256_sign_epi8(xs, ws)
                };
                *d = if VNNI {
                    _mm256_dpbusd_epi32(*d, absw, xs)
                } else {
                    _mm256_add_epi32(*d, _mm256_madd_epi16(_mm256_maddubs_epi16(absw, xs), ones))
                };
            }
        }
        // Q4_1 / Q5_1: the 8 rows' mins.
        let mw = if with_min {
            _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i))
        } else {
            _mm256_setzero_ps()
        };
        for (r, a) in acc.iter_mut().enumerate() {
            let idx = (i0 + r) * nb + b;
            let dot = dot[r];
            let dx = *xq.scales.get_unchecked(idx);
            let d = _mm256_mul_ps(dw, _mm256_set1_ps(dx));
            *a = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), *a);
            if with_min {
                let dsx = dx * *xq.sums.get_unchecked(idx) as f32;
                *a = _mm256_fmadd_ps(mw, _mm256_set1_ps(dsx), *a);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(r * TILE), *a);
    }
}

/// Two consecutive tiles (`tiles` holds both, the second at `tile_bytes`) against activation
/// rows `i0..i0 + g`, in 512-bit registers: the first tile's 8 rows in the low lanes, the
/// second's in the high ones. `out[r·16 + c]`: tile row c of the first tile (c < 8) or the
/// second (c ≥ 8). Only unsigned levels (every stored format but signed Q8_0, which VNNI
/// machines store biased; AVX-512 has no `vpsignb`).
///
/// Why: [`tile_body`] spends as many instructions on each activation group's broadcast and
/// on each row's scale arithmetic as on its `vpdpbusd`; here each of those serves 16 weight
/// rows instead of 8, and a group's two 32-byte halves load into one register. Lane for
/// lane the same integer sums and the same float operations in the same order as
/// [`tile_body`] (`vpdpbusd`, one multiply, one conversion, one fused multiply-add per block),
/// so the results are bit for bit the single-tile kernel's, whichever tiles a task pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_pair_rows_vnni(
    f: Stored,
    tiles: &[u8],
    tile_bytes: usize,
    xq: &Int8Rows,
    offs: &[i32],
    i0: usize,
    g: usize,
    k: usize,
    out: &mut [f32],
) {
    debug_assert!(tiles.len() >= 2 * tile_bytes && out.len() >= g * 2 * TILE);
    match f {
        Stored::Q4_0 => {
            by_group8!(g, G => tile_pair_body::<Q4_0, G>(tiles, tile_bytes, xq, offs, i0, k, out))
        }
        Stored::Q5_0 => {
            by_group8!(g, G => tile_pair_body::<Q5_0, G>(tiles, tile_bytes, xq, offs, i0, k, out))
        }
        Stored::Q4_1 => {
            by_group8!(g, G => tile_pair_body::<Q4_1, G>(tiles, tile_bytes, xq, offs, i0, k, out))
        }
        Stored::Q5_1 => {
            by_group8!(g, G => tile_pair_body::<Q5_1, G>(tiles, tile_bytes, xq, offs, i0, k, out))
        }
        Stored::Q8_0Biased => {
            by_group8!(g, G => tile_pair_body::<Q8_0_BIASED, G>(tiles, tile_bytes, xq, offs, i0, k, out))
        }
        Stored::Q8_0 => unreachable!("signed Q8_0 tiles take the single-tile kernel"),
    }
}

/// [`tile_body`] over two tiles at once (see [`tile_pair_rows_vnni`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_pair_body<const FMT: u8, const G: usize>(
    tiles: &[u8],
    tile_bytes: usize,
    xq: &Int8Rows,
    offs: &[i32],
    i0: usize,
    k: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let nb = k / BLOCK;
    let BlockLayout {
        bytes: tile_block,
        offset,
        with_min,
        nibbles,
        five,
        qh_at,
        groups_at,
    } = const { BlockLayout::of(FMT, true) };
    debug_assert!(!offset || offs.len() >= (i0 + G) * nb);
    let nib = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    // Both tiles' 16 or 32 bytes at `at` of block `b`, the first tile's in the low half.
    let both128 = |a: *const u8, at: usize| {
        _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(a.add(at) as *const __m128i)),
            _mm_loadu_si128(a.add(tile_bytes + at) as *const __m128i),
        )
    };
    let both256 = |a: *const u8, at: usize| {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_loadu_si256(a.add(at) as *const __m256i)),
            _mm256_loadu_si256(a.add(tile_bytes + at) as *const __m256i),
        )
    };
    let tp = tiles.as_ptr();
    let xp = xq.quants.as_ptr().add(i0 * k) as *const u8;
    let mut acc = [_mm512_setzero_ps(); G];
    for b in 0..nb {
        let blk = tp.add(b * tile_block);
        // Each tile is its own stream, `PREFETCH_AHEAD` ahead of where it reads: past its
        // end, each continues in the same tile of the next pair (2 tiles on), not in the
        // other tile of this one (which reads it already).
        let mut ahead = b * tile_block + PREFETCH_AHEAD;
        if ahead >= tile_bytes {
            ahead += tile_bytes;
        }
        let mut line = 0;
        while line < tile_block {
            // Never faults, so addresses past the matrix are harmless.
            let at = tp.wrapping_add(ahead + line);
            _mm_prefetch::<_MM_HINT_T1>(at as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(tile_bytes) as *const i8);
            line += 64;
        }
        let dw = _mm512_cvtph_ps(both128(blk, 0));
        let qh = if five {
            both256(blk, qh_at)
        } else {
            _mm512_setzero_si512()
        };
        let mut dot = [_mm512_setzero_si512(); G];
        if offset {
            for (r, d) in dot.iter_mut().enumerate() {
                *d = _mm512_set1_epi32(*offs.get_unchecked((i0 + r) * nb + b));
            }
        }
        for s in 0..8 {
            let w = if nibbles {
                let raw = both256(blk, groups_at + 32 * (s % 4));
                let lv = if s < 4 {
                    raw
                } else {
                    _mm512_srli_epi16(raw, 4)
                };
                let mut lv = _mm512_and_si512(lv, nib);
                if five {
                    // As in `tile_body` (`high_bit_pick`), per 16-byte lane.
                    let (idx, bits) = high_bit_pick::<64>(s);
                    let spread =
                        _mm512_shuffle_epi8(qh, _mm512_loadu_si512(idx.as_ptr() as *const _));
                    let bits = _mm512_set1_epi32(bits);
                    let set = _mm512_cmpeq_epi8_mask(_mm512_and_si512(spread, bits), bits);
                    lv = _mm512_mask_add_epi8(lv, set, lv, sixteen);
                }
                lv
            } else {
                both256(blk, 16 + 32 * s)
            };
            for (r, d) in dot.iter_mut().enumerate() {
                let xs = _mm512_set1_epi32(
                    (xp.add(r * k + b * BLOCK + 4 * s) as *const i32).read_unaligned(),
                );
                *d = _mm512_dpbusd_epi32(*d, w, xs);
            }
        }
        let mw = if with_min {
            _mm512_cvtph_ps(both128(blk, 16))
        } else {
            _mm512_setzero_ps()
        };
        for (r, a) in acc.iter_mut().enumerate() {
            let idx = (i0 + r) * nb + b;
            let dx = *xq.scales.get_unchecked(idx);
            let d = _mm512_mul_ps(dw, _mm512_set1_ps(dx));
            *a = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(dot[r]), *a);
            if with_min {
                let dsx = dx * *xq.sums.get_unchecked(idx) as f32;
                *a = _mm512_fmadd_ps(mw, _mm512_set1_ps(dsx), *a);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.as_mut_ptr().add(r * 2 * TILE), *a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_blocks(f: BlockFormat, n_blocks: usize, rng: &mut impl Rng) -> Vec<u8> {
        let bb = f.block_bytes();
        let mut w: Vec<u8> = (0..n_blocks * bb).map(|_| rng.random()).collect();
        for b in w.chunks_exact_mut(bb) {
            let d = half::f16::from_f32(rng.random_range(0.001..0.05));
            b[..2].copy_from_slice(&d.to_le_bytes());
            if matches!(f, BlockFormat::Q4_1 | BlockFormat::Q5_1) {
                let m = half::f16::from_f32(rng.random_range(-0.05..0.05));
                b[2..4].copy_from_slice(&m.to_le_bytes());
            }
        }
        w
    }

    #[test]
    fn packed_matches_reference_and_rows_do_not_depend_on_the_batch() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        for (f, n, k) in [
            BlockFormat::Q4_0,
            BlockFormat::Q5_0,
            BlockFormat::Q8_0,
            BlockFormat::Q4_1,
            BlockFormat::Q5_1,
        ]
        .into_iter()
        .flat_map(|f| {
            [(8, 32), (16, 64), (64, 576), (1536, 576), (576, 1536)].map(|(n, k)| (f, n, k))
        }) {
            // (Q8_0 levels cover -128 too: |−128| still fits vpmaddubsw's unsigned side)
            let w = random_blocks(f, n * k / BLOCK, &mut rng);
            let Some(p) = Int8Tiles::pack(f, &w, n, k) else {
                eprintln!("skipped: no AVX2 here");
                return;
            };
            for m in [1, 2, 4, 5, 9] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let (mut want, mut got) = (vec![0f32; m * n], vec![0f32; m * n]);
                crate::matmul_int8_reference(f, &x, &w, m, k, n, &mut want);
                p.matmul(&x, m, &mut got);
                for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                        "{f:?} n={n} k={k} m={m} [{i}]: {a} vs {b}"
                    );
                }
                if m == 1 {
                    assert_eq!(p.unpack(), w, "{f:?} unpack");
                    let rb = k / BLOCK * f.block_bytes();
                    let rows = [n - 1, 0, 3, 3];
                    let picked: Vec<u8> = rows
                        .iter()
                        .flat_map(|&r| w[r * rb..(r + 1) * rb].iter().copied())
                        .collect();
                    assert_eq!(p.unpack_rows(&rows), picked, "{f:?} unpack_rows");
                }
                for i in 0..m {
                    let mut one = vec![0f32; n];
                    p.matmul(&x[i * k..(i + 1) * k], 1, &mut one);
                    assert_eq!(
                        one,
                        got[i * n..(i + 1) * n],
                        "row {i} alone vs in a batch of {m}"
                    );
                }
            }
        }
    }

    /// Where tiles run two at a time (AVX-512 VNNI/BW), each output is bit for bit what its
    /// tile gives run alone: a matrix of 35 tiles (tasks of several, so pairs and an odd one
    /// out on up to 16 threads) against each 8-row slice packed on its own, for every format
    /// and row counts across group sizes.
    #[test]
    fn tile_pairs_give_each_tile_its_own_results() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(47);
        let (n, k) = (35 * TILE, 576);
        for f in [
            BlockFormat::Q4_0,
            BlockFormat::Q5_0,
            BlockFormat::Q8_0,
            BlockFormat::Q4_1,
            BlockFormat::Q5_1,
        ] {
            let w = random_blocks(f, n * k / BLOCK, &mut rng);
            let Some(all) = Int8Tiles::pack(f, &w, n, k) else {
                eprintln!("skipped: no AVX2 here");
                return;
            };
            let rb = k / BLOCK * f.block_bytes();
            let singles: Vec<Int8Tiles> = w
                .chunks_exact(TILE * rb)
                .map(|part| Int8Tiles::pack(f, part, TILE, k).expect("packs like the whole"))
                .collect();
            for m in [1, 3, 8, 9, 17] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let mut got = vec![0f32; m * n];
                all.matmul(&x, m, &mut got);
                for (t, one) in singles.iter().enumerate() {
                    let mut want = vec![0f32; m * TILE];
                    one.matmul(&x, m, &mut want);
                    for i in 0..m {
                        assert_eq!(
                            want[i * TILE..(i + 1) * TILE],
                            got[i * n + t * TILE..][..TILE],
                            "{f:?} m={m} row {i} tile {t}"
                        );
                    }
                }
            }
        }
    }

    /// Matrices fused into one allocation give their own results as views, and as one
    /// joined matrix the results of each, bit for bit; parts that do not follow one another
    /// in one allocation do not join.
    #[test]
    fn fused_views_join_into_one_matrix_with_the_same_results() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(35);
        let k = 576;
        for f in [BlockFormat::Q4_0, BlockFormat::Q8_0, BlockFormat::Q5_1] {
            let rows = [64, 16, 16];
            let ws: Vec<Vec<u8>> = rows
                .iter()
                .map(|&n| random_blocks(f, n * k / BLOCK, &mut rng))
                .collect();
            let Some(parts) = rows
                .iter()
                .zip(&ws)
                .map(|(&n, w)| Int8Tiles::pack(f, w, n, k))
                .collect::<Option<Vec<_>>>()
            else {
                eprintln!("skipped: no AVX2 here");
                return;
            };
            let refs: Vec<&Int8Tiles> = parts.iter().collect();
            assert!(
                Int8Tiles::joined(refs.iter().copied()).is_none(),
                "separate allocations"
            );
            let views = Int8Tiles::fuse(&refs).expect("one format and width");
            let vrefs: Vec<&Int8Tiles> = views.iter().collect();
            let all = Int8Tiles::joined(vrefs.iter().copied()).expect("fused views join");
            assert_eq!(all.n, 96);
            assert!(
                Int8Tiles::joined([vrefs[1], vrefs[0]]).is_none(),
                "out of order"
            );
            assert!(Int8Tiles::joined([vrefs[0], vrefs[2]]).is_none(), "a gap");
            for m in [1, 3, 8] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let mut joined = vec![0f32; m * 96];
                all.matmul(&x, m, &mut joined);
                let mut col = 0;
                for ((p, v), &n) in parts.iter().zip(&views).zip(&rows) {
                    assert_eq!(v.unpack(), p.unpack(), "{f:?} view bytes");
                    let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
                    p.matmul(&x, m, &mut a);
                    v.matmul(&x, m, &mut b);
                    assert_eq!(a, b, "{f:?} view m={m}");
                    for i in 0..m {
                        assert_eq!(a[i * n..][..n], joined[i * 96 + col..][..n], "{f:?} joined");
                    }
                    col += n;
                }
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(36);
        let a = Int8Tiles::pack(
            BlockFormat::Q4_0,
            &random_blocks(BlockFormat::Q4_0, 8 * 18, &mut rng),
            8,
            576,
        );
        let b = Int8Tiles::pack(
            BlockFormat::Q8_0,
            &random_blocks(BlockFormat::Q8_0, 8 * 18, &mut rng),
            8,
            576,
        );
        if let (Some(a), Some(b)) = (a, b) {
            assert!(Int8Tiles::fuse(&[&a, &b]).is_none(), "two formats");
        }
    }

    /// Where the CPU has AVX-512 VNNI, its kernel (8 rows per pass, Q8_0 biased) and the AVX2
    /// one (4 rows per pass, |w| against signed x, the bias taken off first) give the same
    /// bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_and_avx2_agree_bit_for_bit() {
        if !crate::has_vnni() {
            eprintln!("skipped: no AVX-512 VNNI here");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(33);
        let (n, k) = (16, 576);
        for f in [
            BlockFormat::Q4_0,
            BlockFormat::Q5_0,
            BlockFormat::Q8_0,
            BlockFormat::Q4_1,
            BlockFormat::Q5_1,
        ] {
            let w = random_blocks(f, n * k / BLOCK, &mut rng);
            let p = Int8Tiles::pack(f, &w, n, k).expect("AVX2 is there");
            let x: Vec<f32> = (0..8 * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let mut xq = Int8Rows::default();
            xq.quantize(&x, k);
            let tile = &p.data()[..k / BLOCK * TILE * f.block_bytes()];
            let (mut a, mut b) = ([0f32; 8 * TILE], [0f32; 8 * TILE]);
            // SAFETY: AVX2/FMA/F16C (the tiles were made) and AVX-512 VNNI/VL (checked above).
            unsafe {
                let f = Stored::of(f, p.biased);
                let mut offs = Vec::new();
                block_offsets(f, &xq, &mut offs);
                tile_rows_vnni(f, tile, &xq, &offs, 0, 8, k, &mut a);
                tile_rows_avx2(f, tile, &xq, &offs, 0, 4, k, &mut b[..4 * TILE]);
                tile_rows_avx2(f, tile, &xq, &offs, 4, 4, k, &mut b[4 * TILE..]);
            }
            assert_eq!(a, b, "{f:?}");
        }
    }

    #[test]
    fn shapes_that_do_not_tile_are_not_packed() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(32);
        let w = random_blocks(BlockFormat::Q4_0, 12 * 2, &mut rng);
        assert!(Int8Tiles::pack(BlockFormat::Q4_0, &w, 12, 64).is_none());
        assert!(Int8Tiles::pack(BlockFormat::Q4_0, &w[..10], 8, 64).is_none());
        assert!(Int8Tiles::pack(BlockFormat::Q4K, &w, 8, 64).is_none());
    }
}
