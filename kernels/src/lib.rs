//! Matmul and attention kernels for tandem's hot paths.
//!
//! Every fast kernel here has a plain reference function beside it, and the tests compare the
//! two on random inputs with odd sizes and tails (the llama.cpp `ggml-quants.c` discipline).
//! This crate imports nothing else of tandem's.

pub mod attention;
pub mod f16_gemm;
pub mod quant_gemm;
mod rows;

pub use attention::{attention, attention_reference, AttentionShape};
pub use f16_gemm::{matmul_f16, matmul_f16_reference};
pub use quant_gemm::{matmul_quant, matmul_quant_reference, BlockFormat};
