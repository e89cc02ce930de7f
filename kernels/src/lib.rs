//! Matmul and attention kernels for tandem's hot paths.
//!
//! Every fast kernel here has a plain reference function beside it, and the tests compare the
//! two on random inputs with odd sizes and tails (the llama.cpp `ggml-quants.c` discipline).
//! This crate imports nothing else of tandem's.
//!
//! Every `unsafe` block says why it is sound (enforced: `clippy::undocumented_unsafe_blocks`).
#![deny(clippy::undocumented_unsafe_blocks)]

/// Evaluates `$body` with `$G` a `const usize` equal to the run-time group size `$g` (1, 2 or
/// 3; anything larger is 4): the x86 kernels take the number of activation rows they run per
/// pass over the weights as a const parameter, and every dispatch picks it the same way.
#[cfg(target_arch = "x86_64")]
macro_rules! by_group {
    ($g:expr, $G:ident => $body:expr) => {
        by_group!(@arms $g, $G => $body; 1 2 3; 4)
    };
    (@arms $g:expr, $G:ident => $body:expr; $($n:literal)*; $last:literal) => {
        match $g {
            $($n => {
                const $G: usize = $n;
                $body
            })*
            _ => {
                const $G: usize = $last;
                $body
            }
        }
    };
}

/// [`by_group!`] up to 8 (kernels with AVX-512's 32 vector registers).
#[cfg(target_arch = "x86_64")]
macro_rules! by_group8 {
    ($g:expr, $G:ident => $body:expr) => {
        by_group!(@arms $g, $G => $body; 1 2 3 4 5 6 7; 8)
    };
}

pub mod aligned;
#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod f16_gemm;
pub mod ggml;
pub mod huge_pages;
pub mod int8_gemm;
pub mod int8_tiles;
pub mod membw;
pub mod ops;
pub mod pool;
pub mod quant_gemm;
mod rows;
pub mod sampling;

pub use attention::{
    attention, attention_bulk, attention_reference, attention_tree, attention_tree_reference,
    AttentionShape, KvElement,
};
pub use f16_gemm::{
    bulk_rows_suffice, f16_bulk_applies, matmul_f16, matmul_f16_bulk, matmul_f16_bulk_parts,
    matmul_f16_reference,
};
pub use ggml::GgmlType;
pub use int8_gemm::{int8_supported, matmul_int8, matmul_int8_reference};
pub use int8_tiles::Int8Tiles;
pub use quant_gemm::{matmul_quant, matmul_quant_reference, BlockFormat};

/// How far ahead of the current weight block the matmul kernels prefetch, in bytes.
/// Prefetching never faults, so running past the end of a weight buffer is harmless.
#[cfg(target_arch = "x86_64")]
pub(crate) const PREFETCH_BYTES: usize = 1024;

/// The instruction sets this process's CPU kernels take, for reports beside their numbers
/// (`tandem bench`'s backend column): "AVX-512, VNNI, AMX" on a Sapphire Rapids, "AVX2" on an
/// older x86, "NEON" on aarch64, "scalar" elsewhere; after the `TANDEM_NO_AVX512`,
/// `TANDEM_NO_VNNI` and `TANDEM_NO_AMX` switches. AMX runs a prompt's rows only
/// ([`matmul_f16_bulk`], [`attention_bulk`]).
pub fn cpu_kernels() -> String {
    let mut sets: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            sets.push("AVX-512");
        } else if has_avx2_fma() {
            sets.push("AVX2");
        }
        if has_vnni() {
            sets.push("VNNI");
        }
        if amx::available() {
            sets.push("AMX");
        }
    }
    #[cfg(target_arch = "aarch64")]
    sets.push("NEON");
    if sets.is_empty() {
        sets.push("scalar");
    }
    sets.join(", ")
}

/// Whether this CPU runs the AVX2/FMA/F16C paths (checked once; std caches the answer).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// Whether the CPU has AVX-512F (512-bit vectors, 32 registers) besides the AVX2 set, for the
/// F16 matmul's wider blocks and the int8 tiles taken in pairs ([`has_vnni_bw`]);
/// `TANDEM_NO_AVX512=1` keeps the AVX2 paths. Checked once.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| {
        has_avx2_fma()
            && std::is_x86_feature_detected!("avx512f")
            && std::env::var_os("TANDEM_NO_AVX512").is_none()
    })
}

/// Whether the CPU has AVX-512 VNNI on 256-bit vectors (`vpdpbusd`: u8 × i8 products summed in
/// fours into i32 lanes, one instruction for AVX2's `vpmaddubsw` + `vpmaddwd` + add). Checked
/// at run time; the kernels keep their AVX2 path for CPUs without it.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        has_avx2_fma()
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vl")
            && std::env::var_os("TANDEM_NO_VNNI").is_none()
    })
}

/// Whether the int8 tiles run two tiles per pass in 512-bit registers
/// (`int8_tiles::tile_pair_rows_vnni`): [`has_vnni`], AVX-512BW (byte shifts and shuffles on
/// 512 bits), and 512-bit kernels not turned off (`TANDEM_NO_AVX512`, see [`has_avx512`]).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_vnni_bw() -> bool {
    static BW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *BW.get_or_init(|| has_vnni() && has_avx512() && std::is_x86_feature_detected!("avx512bw"))
}

/// The sum of an AVX vector's 8 lanes, in one fixed order (shared by every x86 kernel).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn hsum256(a: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    _mm_cvtss_f32(q)
}
