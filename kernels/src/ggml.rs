//! The GGML formats: one table of every tensor type tandem reads or writes (name, GGUF type
//! id, block geometry), and a typed `#[repr(C)]` block per quantized type, its size checked at
//! compile time, with a plain reference decoder.
//!
//! Every other place asks this module: `quantize::QuantType` (the types `tandem quantize`
//! writes) and [`BlockFormat`](crate::BlockFormat) (the types the fast kernels read) are
//! subsets that name their GGML type and take ids and sizes from here; the GGUF reader turns
//! ids into types here. The fast kernels (`quant_gemm`, `int8_gemm`) decode the same bytes;
//! their `dequantize_block` is tested against the typed decoders below, and both against
//! candle's.

use half::f16;

/// A GGML tensor type (ggml's `enum ggml_type`, the subset tandem knows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

/// Every type, in GGUF id order.
pub const ALL: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::Q8K,
    GgmlType::BF16,
];

/// Weights per block of the 32-wide formats.
pub const QK: usize = 32;
/// Weights per super-block of the K-quants.
pub const QK_K: usize = 256;

impl GgmlType {
    /// The GGUF tensor-info type id.
    pub const fn gguf_id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::BF16 => 30,
        }
    }

    /// The type a GGUF file's id names; `None` for ids tandem does not read.
    pub fn from_gguf_id(id: u32) -> Option<Self> {
        ALL.iter().copied().find(|t| t.gguf_id() == id)
    }

    /// The lower-case name users type and llama.cpp prints (`q4_k`).
    pub const fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q8_1 => "q8_1",
            GgmlType::Q2K => "q2_k",
            GgmlType::Q3K => "q3_k",
            GgmlType::Q4K => "q4_k",
            GgmlType::Q5K => "q5_k",
            GgmlType::Q6K => "q6_k",
            GgmlType::Q8K => "q8_k",
        }
    }

    /// Elements per block (1 for the dense types).
    pub const fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1 => QK,
            _ => QK_K,
        }
    }

    /// Bytes per block (per element for the dense types).
    pub const fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => std::mem::size_of::<BlockQ4_0>(),
            GgmlType::Q4_1 => std::mem::size_of::<BlockQ4_1>(),
            GgmlType::Q5_0 => std::mem::size_of::<BlockQ5_0>(),
            GgmlType::Q5_1 => std::mem::size_of::<BlockQ5_1>(),
            GgmlType::Q8_0 => std::mem::size_of::<BlockQ8_0>(),
            GgmlType::Q8_1 => std::mem::size_of::<BlockQ8_1>(),
            GgmlType::Q2K => std::mem::size_of::<BlockQ2K>(),
            GgmlType::Q3K => std::mem::size_of::<BlockQ3K>(),
            GgmlType::Q4K => std::mem::size_of::<BlockQ4K>(),
            GgmlType::Q5K => std::mem::size_of::<BlockQ5K>(),
            GgmlType::Q6K => std::mem::size_of::<BlockQ6K>(),
            GgmlType::Q8K => std::mem::size_of::<BlockQ8K>(),
        }
    }

    pub const fn is_dense(self) -> bool {
        matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    }

    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_elems() as f64
    }

    /// Bytes of `elems` elements, or `None` when they do not fill whole blocks or the size
    /// overflows (sizes read from a file pass through here before they size anything).
    pub fn bytes_for(self, elems: usize) -> Option<usize> {
        if !elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        (elems / self.block_elems()).checked_mul(self.block_bytes())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A quantized block: its GGML type and the reference decoding of its weights.
pub trait Block: Sized {
    const TYPE: GgmlType;
    /// Writes the block's `TYPE.block_elems()` weights into `out`.
    fn dequantize(&self, out: &mut [f32]);
    /// The block at the start of `bytes` (little-endian, as GGUF stores it), or `None` when
    /// `bytes` is too short.
    fn read(bytes: &[u8]) -> Option<Self>;
}

/// d·(q − 8), 4-bit q.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}
/// d·q + m, 4-bit q.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}
/// d·(q − 16), 5-bit q (the fifth bits in `qh`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
/// d·q + m, 5-bit q.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
/// d·q, signed 8-bit q.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}
/// Q8_0 plus s = d·Σq (an activation format; read, never written).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK],
}
/// 2-bit K-quant: 16 sub-blocks with 4-bit scales and mins.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: f16,
    pub dmin: f16,
}
/// 3-bit K-quant: high bits in `hmask`, 6-bit scales packed in 12 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: f16,
}
/// 4-bit K-quant: 8 sub-blocks of 32 with 6-bit scales and mins.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}
/// Q4_K plus one high bit per weight.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}
/// 6-bit K-quant: 4 low + 2 high bits per weight, 16 signed 8-bit scales.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}
/// 8-bit K-quant (an activation format): f32 scale and per-16 sums.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

// ggml's sizes (ggml-common.h's static_asserts), checked at compile time.
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

fn signed<const N: usize>(b: &[u8], at: usize) -> [i8; N] {
    array::<N>(b, at).map(|x| x as i8)
}

/// The 5-bit levels of a Q5 block: low nibbles from `qs`, fifth bits from `qh`.
fn q5_levels(qh: [u8; 4], qs: &[u8; QK / 2]) -> [u8; QK] {
    let h = u32::from_le_bytes(qh);
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = (qs[j] & 0x0F) | ((((h >> j) & 1) as u8) << 4);
        q[j + QK / 2] = (qs[j] >> 4) | ((((h >> (j + QK / 2)) & 1) as u8) << 4);
    }
    q
}

impl Block for BlockQ4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = ((q & 0x0F) as f32 - 8.0) * d;
            out[j + QK / 2] = ((q >> 4) as f32 - 8.0) * d;
        }
    }
    fn read(b: &[u8]) -> Option<Self> {
        (b.len() >= 18).then(|| BlockQ4_0 {
            d: f16_at(b, 0),
            qs: array(b, 2),
        })
    }
}

impl Block for BlockQ4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = (q & 0x0F) as f32 * d + m;
            out[j + QK / 2] = (q >> 4) as f32 * d + m;
        }
    }
    fn read(b: &[u8]) -> Option<Self> {
        (b.len() >= 20).then(|| BlockQ4_1 {
            d: f16_at(b, 0),
            m: f16_at(b, 2),
            qs: array(b, 4),
        })
    }
}

impl Block for BlockQ5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (o, q) in out.iter_mut().zip(q5_levels(self.qh, &self.qs)) {
            *o = (q as f32 - 16.0) * d;
        }
    }
    fn read(b: &[u8]) -> Option<Self> {
        (b.len() >= 22).then(|| BlockQ5_0 {
            d: f16_at(b, 0),
            qh: array(b, 2),
            qs: array(b, 6),
        })
    }
}

impl Block for BlockQ5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for (o, q) in out.iter_mut().zip(q5_levels(self.qh, &self.qs)) {
            *o = q as f32 * d + m;
        }
    }
    fn read(b: &[u8]) -> Option<Self> {
        (b.len() >= 24).then(|| BlockQ5_1 {
            d: f16_at(b, 0),
            m: f16_at(b, 2),
            qh: array(b, 4),
            qs: array(b, 8),
        })
    }
}

impl Block for BlockQ8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = q as f32 * d;
        }
    }
    fn read(b: &[u8]) -> Option<Self> {
        (b.len() >= 34).then(|| BlockQ8_0 {
            d: f16_at(b, 0),
            qs: signed(b, 2),
        })
    }
}

/// Q4_K and Q5_K weights: 4 chunks of 64, low nibbles sub-block 2c and high nibbles 2c + 1,
/// each with its 6-bit scale and min; Q5_K adds bit 2c / 2c + 1 of `qh[l]` as the fifth bit.
fn dequantize_k4(
    d: f16,
    dmin: f16,
    scales: &[u8; 12],
    qs: &[u8; QK_K / 2],
    qh: Option<&[u8; QK_K / 8]>,
    out: &mut [f32],
) {
    let (d, dmin) = (d.to_f32(), dmin.to_f32());
    for c in 0..4 {
        let (s0, m0) = crate::quant_gemm::scale_min_k4(2 * c, scales);
        let (s1, m1) = crate::quant_gemm::scale_min_k4(2 * c + 1, scales);
        for l in 0..32 {
            let q = qs[32 * c + l];
            let (h0, h1) = qh.map_or((0, 0), |h| {
                (
                    ((h[l] >> (2 * c)) & 1) << 4,
                    ((h[l] >> (2 * c + 1)) & 1) << 4,
                )
            });
            out[64 * c + l] = d * s0 * ((q & 0x0F) | h0) as f32 - dmin * m0;
            out[64 * c + 32 + l] = d * s1 * ((q >> 4) | h1) as f32 - dmin * m1;
        }
    }
}

impl Block for BlockQ4K {
    const TYPE: GgmlType = GgmlType::Q4K;
    fn dequantize(&self, out: &mut [f32]) {
        dequantize_k4(self.d, self.dmin, &self.scales, &self.qs, None, out);
    }
    fn read(b: &[u8]) -> Option<Self> {
        (b.len() >= 144).then(|| BlockQ4K {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            scales: array(b, 4),
            qs: array(b, 16),
        })
    }
}

impl Block for BlockQ5K {
    const TYPE: GgmlType = GgmlType::Q5K;
    fn dequantize(&self, out: &mut [f32]) {
        dequantize_k4(
            self.d,
            self.dmin,
            &self.scales,
            &self.qs,
            Some(&self.qh),
            out,
        );
    }
    fn read(b: &[u8]) -> Option<Self> {
        (b.len() >= 176).then(|| BlockQ5K {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            scales: array(b, 4),
            qh: array(b, 16),
            qs: array(b, 48),
        })
    }
}

impl Block for BlockQ6K {
    const TYPE: GgmlType = GgmlType::Q6K;
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        // Two halves of 128 weights; in each, 4 rows of 32 share ql/qh bytes.
        for half in 0..2 {
            let (ql, qh) = (&self.ql[64 * half..], &self.qh[32 * half..]);
            let sc = &self.scales[8 * half..];
            let o = &mut out[128 * half..];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                o[l] = d * sc[is] as f32 * q1 as f32;
                o[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
                o[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
                o[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
            }
        }
    }
    fn read(b: &[u8]) -> Option<Self> {
        (b.len() >= 210).then(|| BlockQ6K {
            ql: array(b, 0),
            qh: array(b, 128),
            scales: signed(b, 192),
            d: f16_at(b, 208),
        })
    }
}

/// Decodes `bytes` (whole blocks of `B`) into `out`, the reference path.
pub fn dequantize_row<B: Block>(bytes: &[u8], out: &mut [f32]) -> Option<()> {
    let (bb, be) = (B::TYPE.block_bytes(), B::TYPE.block_elems());
    if !bytes.len().is_multiple_of(bb) || out.len() != bytes.len() / bb * be {
        return None;
    }
    for (b, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        B::read(b)?.dequantize(o);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant_gemm::{dequantize_block, BlockFormat};

    #[test]
    fn ids_names_and_sizes_are_ggmls() {
        for &t in ALL {
            assert_eq!(GgmlType::from_gguf_id(t.gguf_id()), Some(t));
        }
        assert_eq!(
            GgmlType::from_gguf_id(4),
            None,
            "q4_2 was removed from ggml"
        );
        assert_eq!(GgmlType::Q4K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4K.bytes_for(100), None);
        assert_eq!(GgmlType::F16.bytes_for(usize::MAX), None);
        assert_eq!(GgmlType::Q8_0.bits_per_weight(), 8.5);
    }

    /// Pseudo-random bytes with valid (finite, modest) f16 scales where `scales` says.
    fn block_bytes(t: GgmlType, seed: u64, scales: &[usize]) -> Vec<u8> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut b: Vec<u8> = (0..t.block_bytes())
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) as u8
            })
            .collect();
        for (k, &at) in scales.iter().enumerate() {
            let v = f16::from_f32(0.01 + 0.003 * (seed % 7) as f32 + 0.001 * k as f32);
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn agree<B: Block>(format: BlockFormat, scales: &[usize]) {
        let t = B::TYPE;
        assert_eq!(format.block_bytes(), t.block_bytes());
        assert_eq!(format.block_elems(), t.block_elems());
        for seed in 0..20 {
            let b = block_bytes(t, seed, scales);
            let mut typed = vec![0f32; t.block_elems()];
            let mut fast = vec![0f32; t.block_elems()];
            dequantize_row::<B>(&b, &mut typed).unwrap();
            dequantize_block(format, &b, &mut fast);
            for (i, (a, c)) in typed.iter().zip(&fast).enumerate() {
                assert!(
                    (a - c).abs() <= 1e-6 * a.abs().max(1.0),
                    "{t} seed {seed} weight {i}: typed {a} vs kernel {c}"
                );
            }
            // And against candle's decoder, an implementation tandem did not write (a
            // dev-dependency on x86_64 only: see Cargo.toml).
            #[cfg(target_arch = "x86_64")]
            agree_with_candle(t, &b, &typed);
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn agree_with_candle(t: GgmlType, b: &[u8], typed: &[f32]) {
        use candle_core::quantized::GgmlDType as C;
        let candle_t = match t {
            GgmlType::Q4_0 => C::Q4_0,
            GgmlType::Q4_1 => C::Q4_1,
            GgmlType::Q5_0 => C::Q5_0,
            GgmlType::Q5_1 => C::Q5_1,
            GgmlType::Q8_0 => C::Q8_0,
            GgmlType::Q4K => C::Q4K,
            GgmlType::Q5K => C::Q5K,
            _ => C::Q6K,
        };
        let q = candle_core::quantized::QTensor::new(
            candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Borrowed(b),
                &candle_core::Device::Cpu,
                candle_t,
            )
            .unwrap(),
            (t.block_elems(),),
        )
        .unwrap();
        let c: Vec<f32> = q
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, (a, c)) in typed.iter().zip(&c).enumerate() {
            assert!(
                (a - c).abs() <= 1e-5 * a.abs().max(1.0),
                "{t} weight {i}: typed {a} vs candle {c}"
            );
        }
    }

    #[test]
    fn typed_blocks_decode_as_the_kernels_and_candle_do() {
        agree::<BlockQ4_0>(BlockFormat::Q4_0, &[0]);
        agree::<BlockQ4_1>(BlockFormat::Q4_1, &[0, 2]);
        agree::<BlockQ5_0>(BlockFormat::Q5_0, &[0]);
        agree::<BlockQ5_1>(BlockFormat::Q5_1, &[0, 2]);
        agree::<BlockQ8_0>(BlockFormat::Q8_0, &[0]);
        agree::<BlockQ4K>(BlockFormat::Q4K, &[0, 2]);
        agree::<BlockQ5K>(BlockFormat::Q5K, &[0, 2]);
        agree::<BlockQ6K>(BlockFormat::Q6K, &[208]);
    }
}
