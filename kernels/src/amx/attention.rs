//! Causal attention of a prompt's rows on the tile unit: the scores S = Q·Kᵀ and the outputs
//! O = P·V as tile products, their operands split into bf16 parts as the parent module's
//! matmul splits them (queries and probabilities into three, keys and values into two), so
//! both are f32 rounding of the FMA kernels' arithmetic, not its bits. The softmax between
//! them is the FMA kernels' own ([`crate::ops::exp_shifted_sum`]).
//!
//! Why by hand: see the parent module. Where this runs: [`crate::attention::attention_bulk`].

use super::{split_activations, split_weights, tile_rows, Bf16Buf, Tiles, COLS, ROWS, STEP};
use crate::aligned::AlignedBuf;
use crate::attention::AttentionShape;
use crate::rows::{with_scratch, SendPtr};
use half::f16;
use std::arch::x86_64::*;
use std::cell::RefCell;

thread_local! {
    /// The calling thread's split keys and values of every KV head, reused across calls.
    static KV_PAIRS: RefCell<Bf16Buf> = RefCell::new(Bf16Buf::default());
    /// A task's query rows gathered, then its output rows.
    static ROWS_F32: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
    /// A task's scores, then its probabilities (16 rows of the block's keys).
    static SCORES: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::default());
    /// A task's query parts, then its probabilities' parts.
    static TASK_PARTS: RefCell<Bf16Buf> = RefCell::new(Bf16Buf::default());
}

/// Whether [`attention_f16`] takes this shape's first `rows` rows here: head sizes of whole
/// tile steps, AMX, and split keys and values within [`SPLIT_KV_BYTES`].
pub(crate) fn fits(s: &AttentionShape, rows: usize) -> bool {
    let seen = s.n + rows;
    // Keys and values, each two bf16 parts of every element, keys padded to 32.
    let split_bytes = s.n_kv_head * seen.div_ceil(STEP) * STEP * s.head_dim * 8;
    s.head_dim.is_multiple_of(STEP)
        && s.head_dim > 0
        && split_bytes <= SPLIT_KV_BYTES
        && super::available()
}

/// The most bytes a call's split keys and values may take (a long context of a large model,
/// 8 KV heads of 128 at 64k tokens, would need 512 MiB): beyond, attention stays on the FMA
/// kernels, which read the cache as it is. SmolLM2 reaches it at ~43k tokens.
const SPLIT_KV_BYTES: usize = 64 << 20;

/// Causal attention of the pass's first `rows` query positions (of `s.t`) over an f16 cache
/// (`k`, `v`: [n_kv_head, capacity, head_dim], the pass's keys and values already in it), into
/// their rows of `out`. Each query row's result depends on its own keys alone (the tile sums
/// are per row and column; keys past a row's last are multiplied by a probability of exactly
/// zero), so a row gives the same bits whatever the pass's other rows.
///
/// Panics unless [`fits`]`(s, rows)` and `rows <= s.t`, or on lengths `s` does not describe (caller
/// bugs).
pub(crate) fn attention_f16(
    s: AttentionShape,
    rows: usize,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    out: &mut [f32],
) {
    assert!(
        fits(&s, rows) && rows <= s.t,
        "AMX attention of {rows} rows, {s:?}"
    );
    let (d, nkv, nh) = (s.head_dim, s.n_kv_head, s.n_head);
    let group = nh / nkv;
    assert!(q.len() >= s.t * nh * d && out.len() >= s.t * nh * d);
    assert!(k.len() >= nkv * s.capacity * d && v.len() >= nkv * s.capacity * d);
    assert!(s.n + s.t <= s.capacity);
    if rows == 0 {
        return;
    }
    // Keys the last row sees, in tiles of 16 (the scores' columns) and steps of 32 (the
    // probabilities' length).
    let seen = s.n + rows;
    let key_tiles = seen.div_ceil(COLS);
    let kpad = seen.div_ceil(STEP) * STEP;
    // Per KV head: its key tiles (16 keys × d each, as weight rows), then its value tiles
    // (16 dimensions × kpad keys each, the values transposed).
    let key_len = 2 * COLS * d;
    let value_len = 2 * COLS * kpad;
    let per_head = key_tiles * key_len + d / COLS * value_len;
    let pool = crate::pool::current();
    with_scratch(&KV_PAIRS, |buf| {
        let pairs = SendPtr(buf.reserve(nkv * per_head));
        pool.run(2 * nkv, |t| {
            let (h, values) = (t / 2, t % 2 == 1);
            let cache = h * s.capacity * d;
            // SAFETY: `pairs` holds nkv · per_head values; this task writes its head's keys
            // (or values) alone, inside that head's per_head; AVX-512F/BW and F16C are
            // present (`fits` checked `available`); the cache rows read are inside k / v.
            unsafe {
                let base = pairs.get().add(h * per_head);
                if values {
                    let rows_v = &v[cache..cache + seen * d];
                    split_values(rows_v, d, seen, kpad, base.add(key_tiles * key_len));
                } else {
                    for c in 0..key_tiles {
                        let j0 = c * COLS;
                        let dst = base.add(c * key_len);
                        if j0 + COLS <= seen {
                            split_weights(&k[cache + j0 * d..cache + (j0 + COLS) * d], d, dst);
                        } else {
                            // The last tile's rows past `seen`, as zeros (they may lie past
                            // the cache's capacity).
                            let mut tail = vec![f16::ZERO; COLS * d];
                            tail[..(seen - j0) * d]
                                .copy_from_slice(&k[cache + j0 * d..cache + seen * d]);
                            split_weights(&tail, d, dst);
                        }
                    }
                }
            }
        });
        let blocks = (rows * group).div_ceil(ROWS);
        let scale = 1.0 / (d as f32).sqrt();
        let out_at = SendPtr(out.as_mut_ptr());
        // Blocks of 16 query rows of one KV head (position-major: row r is position r / group,
        // head r % group of the group), the latest (most keys) first so the pool evens out.
        pool.run(nkv * blocks, |t| {
            let (h, b) = (t % nkv, blocks - 1 - t / nkv);
            let r0 = b * ROWS;
            let g = (rows * group - r0).min(ROWS);
            let position = |x: usize| (r0 + x) / group;
            let out_row = |x: usize| (position(x) * nh + h * group + (r0 + x) % group) * d;
            let seen_b = s.n + position(g - 1) + 1;
            let (tiles_b, kpad_b) = (seen_b.div_ceil(COLS), seen_b.div_ceil(STEP) * STEP);
            with_scratch(&ROWS_F32, |rows_f32| {
                with_scratch(&SCORES, |scores| {
                    with_scratch(&TASK_PARTS, |parts| {
                        rows_f32.resize(ROWS * d, 0.0);
                        // Each query scaled by 1/√d before its products (exact where d is a
                        // power of four, as SmolLM2's 64).
                        for x in 0..g {
                            let src = &q[out_row(x)..][..d];
                            for (dst, &v) in rows_f32[x * d..(x + 1) * d].iter_mut().zip(src) {
                                *dst = v * scale;
                            }
                        }
                        if scores.len() < ROWS * kpad_b {
                            scores.resize(ROWS * kpad_b, 0.0);
                        }
                        let parts_at = parts.reserve(3 * ROWS * kpad_b.max(d));
                        let mut tiles = Tiles { rows: 0 };
                        let sc = scores.as_mut_ptr();
                        // SAFETY: AMX and AVX-512F/BW present (`fits`); `parts_at` holds three
                        // parts of 16 rows of up to kpad_b.max(d) values; the key tiles read
                        // are this head's first tiles_b ≤ key_tiles; the scores written are g
                        // rows of kpad_b ≥ 16·tiles_b values inside `scores`.
                        unsafe {
                            tiles.configure(g);
                            split_activations(&rows_f32[..g * d], g, d, 0..g, parts_at);
                            let keys = pairs.get().add(h * per_head);
                            for c in (0..tiles_b).step_by(2) {
                                let cols = (tiles_b - c).min(2);
                                let o = |c: usize| (sc.add(c * COLS), kpad_b);
                                let outs = [o(c), o(c + cols - 1)];
                                let at = keys.add(c * key_len);
                                tile_rows(parts_at, 1, 0, d, g, at, key_len, cols, outs);
                            }
                        }
                        let mut z = [0f32; ROWS];
                        for (x, z) in z.iter_mut().enumerate().take(g) {
                            let row = &mut scores[x * kpad_b..(x + 1) * kpad_b];
                            let limit = s.n + position(x) + 1;
                            let max = lanes_max(&row[..limit]);
                            *z = crate::ops::exp_shifted_sum(&mut row[..limit], max);
                            row[limit..].fill(0.0);
                        }
                        let o = rows_f32.as_mut_ptr();
                        // SAFETY: as above; the probabilities are g rows of kpad_b values (a
                        // multiple of 32); each value tile holds kpad ≥ kpad_b keys' steps;
                        // the outputs are g rows of d values inside `rows_f32`.
                        unsafe {
                            split_activations(&scores[..g * kpad_b], g, kpad_b, 0..g, parts_at);
                            let values = pairs.get().add(h * per_head + key_tiles * key_len);
                            let dim_tiles = d / COLS;
                            for c in (0..dim_tiles).step_by(2) {
                                let cols = (dim_tiles - c).min(2);
                                let outs =
                                    [(o.add(c * COLS), d), (o.add((c + cols - 1) * COLS), d)];
                                let at = values.add(c * value_len);
                                tile_rows(parts_at, 1, 0, kpad_b, g, at, value_len, cols, outs);
                            }
                        }
                        for (x, &z) in z.iter().enumerate().take(g) {
                            // SAFETY: the row (position, head) is this block's query row x:
                            // blocks split the rows × heads without overlap and the first
                            // `rows` positions' rows are inside `out`; `run` waits for tasks.
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(out_at.get().add(out_row(x)), d)
                            };
                            for (dst, &o) in dst.iter_mut().zip(&rows_f32[x * d..(x + 1) * d]) {
                                *dst = o / z;
                            }
                        }
                    })
                })
            })
        });
    });
}

/// The largest of `x` (−∞ when empty), in 16 lanes that vectorize (a fold over `f32::max`
/// stays scalar: its NaN rule orders the comparisons).
fn lanes_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// Splits value rows 0..seen (`v`: [seen, d]; rows from `seen` to `kpad` taken as zeros) into
/// weight tiles of the values transposed, as [`split_weights`] lays them out: tile c holds
/// dimensions 16c..16c + 16, tiles 2·16·kpad values apart; its step s (keys 32s..32s + 32)
/// holds wh, row p the values of keys 32s + 2p and 32s + 2p + 1 for each of its dimensions
/// (low word, high word), then wl.
///
/// # Safety
/// AVX-512F and F16C present; d a multiple of 16; `pairs` holds d / 16 · 2 · 16 · kpad values.
#[target_feature(enable = "avx512f,f16c")]
unsafe fn split_values(v: &[f16], d: usize, seen: usize, kpad: usize, pairs: *mut u16) {
    debug_assert!(v.len() == seen * d && kpad >= seen && kpad.is_multiple_of(STEP));
    let top = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let row = |j: usize, c: usize| {
        if j < seen {
            _mm512_cvtph_ps(_mm256_loadu_si256(
                v.as_ptr().add(j * d + c * COLS) as *const _
            ))
        } else {
            _mm512_setzero_ps()
        }
    };
    // Each value's top 8 significant bits (as f32 bits, low half zero) and the rest (at most
    // 3 more bits of an f16: exactly a bf16, so its low half is zero too).
    let split = |a: __m512| {
        let hi = _mm512_and_si512(_mm512_castps_si512(a), top);
        let lo = _mm512_castps_si512(_mm512_sub_ps(a, _mm512_castsi512_ps(hi)));
        (hi, lo)
    };
    for c in 0..d / COLS {
        let tile = pairs.add(c * 2 * COLS * kpad);
        for s in 0..kpad / STEP {
            let dst = tile.add(s * 2 * COLS * STEP);
            for p in 0..STEP / 2 {
                let j = s * STEP + 2 * p;
                let ((ah, al), (bh, bl)) = (split(row(j, c)), split(row(j + 1, c)));
                // Key j's bf16 in each dword's low word, key j + 1's in its high word.
                let hi = _mm512_or_si512(bh, _mm512_srli_epi32::<16>(ah));
                let lo = _mm512_or_si512(bl, _mm512_srli_epi32::<16>(al));
                _mm512_storeu_si512(dst.add(p * 32) as *mut _, hi);
                _mm512_storeu_si512(dst.add(COLS * STEP + p * 32) as *mut _, lo);
            }
        }
    }
}
