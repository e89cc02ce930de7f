//! Kernel throughput on SmolLM2-135M's layer shapes, in weight bytes per second (decode reads
//! every weight once per pass, so this is the number to hold against memory bandwidth).
//!
//!     cargo bench -p tandem-kernels --features bench --bench gemm            # all
//!     cargo bench -p tandem-kernels --features bench --bench gemm -- q4_0     # one format
//!
//! m = 1 is decode, m = 5 a 4-token draft's verification pass.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use rand::{Rng, SeedableRng};
use std::time::Duration;
use tandem_kernels::{matmul_f16, matmul_int8, matmul_quant, BlockFormat};

/// (name, in k, out n): SmolLM2's MLP up/gate and down projections.
const SHAPES: [(&str, usize, usize); 3] = [
    ("576x1536", 576, 1536),
    ("1536x576", 1536, 576),
    // Small enough to show the fixed cost of one call (dispatch to the thread pool).
    ("64x64", 64, 64),
];

fn random_blocks(f: BlockFormat, n: usize, k: usize, rng: &mut impl Rng) -> Vec<u8> {
    let nb = n * k / f.block_elems();
    let mut w: Vec<u8> = (0..nb * f.block_bytes()).map(|_| rng.random()).collect();
    // Plausible f16 scales (random bits could be NaN): 0.01 at each block's d (and dmin).
    let d = f16::from_f32(0.01).to_le_bytes();
    for b in w.chunks_exact_mut(f.block_bytes()) {
        let at = if f == BlockFormat::Q6K { 208 } else { 0 };
        b[at..at + 2].copy_from_slice(&d);
        if matches!(f, BlockFormat::Q4K | BlockFormat::Q5K) {
            b[2..4].copy_from_slice(&d);
        }
    }
    w
}

fn gemm(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // (group name, block format or None for F16, activations rounded to 8 bits)
    let formats = [
        ("q8_0-int8", Some(BlockFormat::Q8_0), true),
        ("q4_0-int8", Some(BlockFormat::Q4_0), true),
        ("q8_0-f32", Some(BlockFormat::Q8_0), false),
        ("q4_0-f32", Some(BlockFormat::Q4_0), false),
        ("q4_k-f32", Some(BlockFormat::Q4K), false),
        ("f16", None, false),
    ];
    for (fname, f, int8) in formats {
        let mut g = c.benchmark_group(fname);
        g.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20);
        for (sname, k, n) in SHAPES {
            if f.is_some_and(|f| k % f.block_elems() != 0) {
                continue; // Q4_K rows of 576 do not fill a 256-weight block
            }
            for m in [1usize, 5] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut out = vec![0f32; m * n];
                let id = BenchmarkId::new(sname, format!("m{m}"));
                match f {
                    Some(f) => {
                        let w = random_blocks(f, n, k, &mut rng);
                        g.throughput(Throughput::Bytes(w.len() as u64));
                        g.bench_function(id, |b| {
                            b.iter(|| match int8 {
                                true => matmul_int8(f, &x, &w, m, k, n, &mut out),
                                false => matmul_quant(f, &x, &w, m, k, n, &mut out),
                            })
                        });
                    }
                    None => {
                        let w: Vec<f16> = (0..n * k)
                            .map(|_| f16::from_f32(rng.random_range(-0.1..0.1)))
                            .collect();
                        g.throughput(Throughput::Bytes(2 * w.len() as u64));
                        g.bench_function(id, |b| b.iter(|| matmul_f16(&x, &w, m, k, n, &mut out)));
                    }
                }
            }
        }
        g.finish();
    }
}

criterion_group!(benches, gemm);
criterion_main!(benches);
