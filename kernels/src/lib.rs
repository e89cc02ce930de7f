//! Matmul kernels for tandem's hot paths.
//!
//! Every fast kernel here has a plain reference function beside it, and the tests compare the
//! two on random inputs with odd sizes and tails (the llama.cpp `ggml-quants.c` discipline).
//! This crate imports nothing else of tandem's.

pub mod f16_gemm;

pub use f16_gemm::{matmul_f16, matmul_f16_reference};
