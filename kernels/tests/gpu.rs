//! GPU kernels against the CPU reference (feature `cuda`). Without a usable GPU every test
//! prints why it is skipped and passes: the workspace must test clean on CPU-only machines.
#![cfg(feature = "cuda")]

use half::f16;
use rand::{Rng, SeedableRng};
use tandem_kernels::cuda::{gpu, Gpu, GpuFormat};
use tandem_kernels::{matmul_f16_reference, matmul_quant_reference, BlockFormat};

fn gpu_or_skip(test: &str) -> Option<&'static Gpu> {
    match gpu() {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("{test}: skipped ({e})");
            None
        }
    }
}

fn random_blocks(f: BlockFormat, n_blocks: usize, rng: &mut impl Rng) -> Vec<u8> {
    let mut w: Vec<u8> = (0..n_blocks * f.block_bytes())
        .map(|_| rng.random())
        .collect();
    for b in w.chunks_exact_mut(f.block_bytes()) {
        let d = f16::from_f32(rng.random_range(0.001..0.05));
        b[..2].copy_from_slice(&d.to_le_bytes());
    }
    w
}

fn close(a: &[f32], b: &[f32], what: &str) {
    for (i, (p, q)) in a.iter().zip(b).enumerate() {
        assert!(
            (p - q).abs() <= 1e-3 * (1.0 + p.abs()),
            "{what} elem {i}: {p} vs {q}"
        );
    }
}

#[test]
fn quantized_matmul_matches_cpu_reference() {
    let Some(g) = gpu_or_skip("quantized_matmul_matches_cpu_reference") else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    for (f, gf) in [
        (BlockFormat::Q8_0, GpuFormat::Q8_0),
        (BlockFormat::Q4_0, GpuFormat::Q4_0),
    ] {
        for m in [1, 2, 5, 8, 9, 17] {
            for (k, n) in [(32, 1), (576, 70), (1536, 33), (2048, 300)] {
                let w = random_blocks(f, n * k / 32, &mut rng);
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                let (mut want, mut got) = (vec![0f32; m * n], vec![0f32; m * n]);
                matmul_quant_reference(f, &x, &w, m, k, n, &mut want);
                let gm = g.upload(gf, &w, n, k).unwrap();
                g.matmul(&gm, &x, m, &mut got).unwrap();
                close(&want, &got, &format!("{f:?} m={m} k={k} n={n}"));
            }
        }
    }
}

#[test]
fn f16_matmul_matches_cpu_reference() {
    let Some(g) = gpu_or_skip("f16_matmul_matches_cpu_reference") else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    for m in [1, 3, 8, 9] {
        for (k, n) in [(1, 1), (17, 5), (576, 64), (1536, 129)] {
            let w: Vec<f16> = (0..n * k)
                .map(|_| f16::from_f32(rng.random_range(-0.5..0.5)))
                .collect();
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (mut want, mut got) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul_f16_reference(&x, &w, m, k, n, &mut want);
            let bytes: Vec<u8> = w.iter().flat_map(|h| h.to_le_bytes()).collect();
            let gm = g.upload(GpuFormat::F16, &bytes, n, k).unwrap();
            g.matmul(&gm, &x, m, &mut got).unwrap();
            close(&want, &got, &format!("F16 m={m} k={k} n={n}"));
        }
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let Some(g) = gpu_or_skip("bad_shapes_are_errors_not_panics") else {
        return;
    };
    assert!(g.upload(GpuFormat::Q8_0, &[0u8; 33], 1, 32).is_err());
    assert!(g.upload(GpuFormat::Q4_0, &[0u8; 18], 1, 31).is_err());
    let gm = g.upload(GpuFormat::Q8_0, &[0u8; 34], 1, 32).unwrap();
    let mut out = [0f32; 1];
    assert!(g.matmul(&gm, &[0.0; 31], 1, &mut out).is_err());
}
