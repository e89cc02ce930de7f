//! The grid of every GGML block type tandem writes: which value each stored level of a block
//! decodes to, and where each element's level sits in the block's bytes.
//!
//! Calibrated methods (GPTQ) need this to quantize a block one column at a time: the block's
//! scales are fixed first (by the type's own encoder), then each element's level is chosen on
//! that grid after the error of earlier columns has been fed forward, and the levels are put
//! back into the block. The decoders here follow ggml's `dequantize_row_*` operation for
//! operation, so a value computed from [`Grid`] is the value llama.cpp and candle decode; the
//! tests check that against candle's dequantizer for every type.

use crate::types::QuantType;
use half::f16;

/// How the levels of one sub-block map to values: `scale * (level - zero) + offset`, the same
/// float operations ggml's decoder does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    pub scale: f32,
    pub zero: i32,
    pub offset: f32,
}

impl Grid {
    /// The value a level decodes to.
    #[inline]
    pub fn value(&self, level: u8) -> f32 {
        self.scale * (level as i32 - self.zero) as f32 + self.offset
    }

    /// The level nearest to `x` on this grid (ties away from zero), within `0..levels`. A zero
    /// scale (an all-zero block) has one value; `fallback` is kept then.
    #[inline]
    pub fn nearest(&self, x: f32, levels: u32, fallback: u8) -> u8 {
        if self.scale == 0.0 {
            return fallback;
        }
        let l = ((x - self.offset) / self.scale).round() as i64 + self.zero as i64;
        l.clamp(0, levels as i64 - 1) as u8
    }
}

/// Elements sharing one [`Grid`] inside a block.
pub fn sub_block(t: QuantType) -> usize {
    match t {
        QuantType::Q6K | QuantType::Q3K | QuantType::Q2K => 16,
        _ => 32,
    }
}

/// Distinct levels of an element (the grid has `levels(t)` points per sub-block).
pub fn levels(t: QuantType) -> u32 {
    match t {
        QuantType::Q8_0 => 256,
        QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4K => 16,
        QuantType::Q5_0 | QuantType::Q5_1 | QuantType::Q5K => 32,
        QuantType::Q6K => 64,
        QuantType::Q3K => 8,
        QuantType::Q2K => 4,
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => 0,
    }
}

/// Whether a type is a block type with a grid (not F32/F16/BF16).
pub fn has_grid(t: QuantType) -> bool {
    levels(t) > 0
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

use crate::blocks::scale_min_k4;

/// The 16 signed 6-bit scales of a Q3_K block (ggml's unpacking of its 12 scale bytes).
fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 0xF } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (low | (high << 4)) as i8;
    }
    out
}

/// The grid of every sub-block of one block of type `t`, in element order.
pub fn grids(t: QuantType, b: &[u8], out: &mut Vec<Grid>) {
    out.clear();
    let g = |scale: f32, zero: i32, offset: f32| Grid {
        scale,
        zero,
        offset,
    };
    match t {
        QuantType::Q8_0 => out.push(g(f16_at(b, 0), 128, 0.0)),
        QuantType::Q4_0 => out.push(g(f16_at(b, 0), 8, 0.0)),
        QuantType::Q5_0 => out.push(g(f16_at(b, 0), 16, 0.0)),
        QuantType::Q4_1 | QuantType::Q5_1 => out.push(g(f16_at(b, 0), 0, f16_at(b, 2))),
        QuantType::Q4K | QuantType::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &b[4..16]);
                out.push(g(d * sc as f32, 0, -(dmin * m as f32)));
            }
        }
        QuantType::Q6K => {
            let d = f16_at(b, 208);
            for &sc in &b[192..208] {
                out.push(g(d * (sc as i8) as f32, 32, 0.0));
            }
        }
        QuantType::Q3K => {
            let d = f16_at(b, 108);
            for sc in q3k_scales(&b[96..108]) {
                out.push(g(d * (sc as i32 - 32) as f32, 4, 0.0));
            }
        }
        QuantType::Q2K => {
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for &sc in &b[..16] {
                out.push(g(d * (sc & 0xF) as f32, 0, -(dmin * (sc >> 4) as f32)));
            }
        }
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => {}
    }
}

/// Where element `e`'s level sits: its low bits (byte, shift, width) and, for 5/6-bit and
/// Q3_K levels, its high bits (byte, shift, width), placed above the low ones.
type Slot = ((usize, u32, u32), Option<(usize, u32, u32)>);

fn slot(t: QuantType, e: usize) -> Slot {
    let nib = |base: usize| {
        // Element j and j + 16 of a 32-value block share byte j: low, then high nibble.
        let (j, hi) = (e % 16, e / 16);
        (base + j, 4 * hi as u32, 4)
    };
    match t {
        QuantType::Q8_0 => ((2 + e, 0, 8), None),
        QuantType::Q4_0 => (nib(2), None),
        QuantType::Q4_1 => (nib(4), None),
        QuantType::Q5_0 => (nib(6), Some((2 + e / 8, (e % 8) as u32, 1))),
        QuantType::Q5_1 => (nib(8), Some((4 + e / 8, (e % 8) as u32, 1))),
        QuantType::Q4K | QuantType::Q5K => {
            // 64 elements per 32 bytes: l-th of the first 32 low nibble, of the next high.
            let (c, r) = (e / 64, e % 64);
            let (l, hi) = (r % 32, r / 32);
            if t == QuantType::Q4K {
                ((16 + 32 * c + l, 4 * hi as u32, 4), None)
            } else {
                (
                    (48 + 32 * c + l, 4 * hi as u32, 4),
                    Some((16 + l, (2 * c + hi) as u32, 1)),
                )
            }
        }
        QuantType::Q6K => {
            // Halves of 128; in each, quarter k of 32: ql byte l (+32 for odd k), low nibble
            // for k < 2; qh byte l, bits 2k..2k+2.
            let (n, r) = (e / 128, e % 128);
            let (k, l) = (r / 32, r % 32);
            (
                (64 * n + l + 32 * (k % 2), 4 * (k / 2) as u32, 4),
                Some((128 + 32 * n + l, 2 * k as u32, 2)),
            )
        }
        QuantType::Q3K => {
            let (n, r) = (e / 128, e % 128);
            let (j, l) = (r / 32, r % 32);
            (
                (32 + 32 * n + l, 2 * j as u32, 2),
                Some((l, (4 * n + j) as u32, 1)),
            )
        }
        QuantType::Q2K => {
            let (n, r) = (e / 128, e % 128);
            let (j, l) = (r / 32, r % 32);
            ((16 + 32 * n + l, 2 * j as u32, 2), None)
        }
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => ((0, 0, 0), None),
    }
}

fn bits(b: &[u8], (at, shift, width): (usize, u32, u32)) -> u8 {
    (b[at] >> shift) & ((1u16 << width) - 1) as u8
}

fn put(b: &mut [u8], (at, shift, width): (usize, u32, u32), v: u8) {
    let mask = (((1u16 << width) - 1) as u8) << shift;
    b[at] = (b[at] & !mask) | ((v << shift) & mask);
}

/// The level of element `e` of a block.
pub fn level(t: QuantType, b: &[u8], e: usize) -> u8 {
    let (lo, hi) = slot(t, e);
    let mut v = bits(b, lo);
    if let Some(h) = hi {
        v |= bits(b, h) << lo.2;
    }
    match t {
        // Q8_0 stores q = level - 128 as an i8.
        QuantType::Q8_0 => v ^ 0x80,
        // Q3_K's high bit set means "no -4": level = low + 4 * bit, decoded as level - 4.
        _ => v,
    }
}

/// Sets the level of element `e` of a block.
pub fn set_level(t: QuantType, b: &mut [u8], e: usize, level: u8) {
    let v = if t == QuantType::Q8_0 {
        level ^ 0x80
    } else {
        level
    };
    let (lo, hi) = slot(t, e);
    put(b, lo, v);
    if let Some(h) = hi {
        put(b, h, v >> lo.2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{dequantized, encode};

    fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    const BLOCK_TYPES: [QuantType; 10] = [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q4K,
        QuantType::Q5K,
        QuantType::Q6K,
        QuantType::Q3K,
        QuantType::Q2K,
    ];

    #[test]
    fn grids_and_levels_decode_as_candle_does() {
        let cols = 512;
        let xs = sample(4 * cols, 7);
        for t in BLOCK_TYPES {
            let bytes = encode(t, &xs, cols, None).unwrap();
            let want = dequantized(t.ggml(), &bytes, 4, cols);
            let (bs, tb, sub) = (t.block_size(), t.type_size(), sub_block(t));
            let mut gs = Vec::new();
            for (bi, block) in bytes.chunks_exact(tb).enumerate() {
                grids(t, block, &mut gs);
                assert_eq!(gs.len(), bs / sub, "{t}");
                for e in 0..bs {
                    let l = level(t, block, e);
                    assert!((l as u32) < levels(t), "{t}");
                    let got = gs[e / sub].value(l);
                    let w = want[bi * bs + e];
                    assert!(
                        (got - w).abs() <= 1e-6 * w.abs().max(1e-3),
                        "{t} block {bi} element {e}: {got} vs candle {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn setting_the_levels_read_gives_the_same_bytes() {
        let xs = sample(2 * 256, 11);
        for t in BLOCK_TYPES {
            let bytes = encode(t, &xs, 256, None).unwrap();
            let tb = t.type_size();
            for block in bytes.chunks_exact(tb) {
                let mut copy = block.to_vec();
                // Scramble every level, then put the read ones back.
                for e in 0..t.block_size() {
                    set_level(t, &mut copy, e, (e as u32 % levels(t)) as u8);
                }
                for e in 0..t.block_size() {
                    assert_eq!(level(t, &copy, e), (e as u32 % levels(t)) as u8, "{t} {e}");
                }
                for e in 0..t.block_size() {
                    set_level(t, &mut copy, e, level(t, block, e));
                }
                assert_eq!(copy, block, "{t}");
            }
        }
    }
}
