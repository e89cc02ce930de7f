//! One decode pass's worth of matmuls streamed from DRAM, at m = 1…9 activation rows.
//!
//!     [FUSED=1] [ONLY_K=1536] [MS=1,4,8] [LAYERS=3 [HEAD=1]] cargo run --release -p tandem-kernels --example stream [f16|q8_0|q4_0] [THREADS] [PASSES]
//!
//! With `FUSED` set, each layer's q/k/v and gate/up are one matrix each, as a loaded model
//! multiplies them (`Linear::fuse`); without it, seven matrices per layer.
//!
//! The criterion bench (`benches/gemm.rs`) keeps its weights in L3, which measures compute;
//! decode and verification read all of SmolLM2-135M's weights (269 MB at F16) from DRAM every
//! pass, so whether a kernel streams at the memory's speed, and whether the extra rows of a
//! verification pass hide behind that read, is only visible here. Prints ms per pass, GB/s of
//! weights, and the ratio to m = 1 (issue 6 bounds it at 1.5 for m = 5 at F16). Q8_0/Q4_0 run
//! as the model runs them on AVX2: repacked into `Int8Tiles`, activations rounded to 8 bits.

use half::f16;
use std::time::Instant;
use tandem_kernels::{matmul_f16, BlockFormat, Int8Tiles};

/// SmolLM2-135M: 30 layers of (q, k, v, o, gate, up, down) as (k, n), then the 49152-row head.
fn shapes() -> Vec<(usize, usize)> {
    let (h, kv, ff) = (576, 192, 1536);
    let mut s = Vec::new();
    // `LAYERS=3` (no head): weights that stay in L3, so the kernels' compute alone is timed.
    let layers = std::env::var("LAYERS").ok().and_then(|v| v.parse().ok());
    for _ in 0..layers.unwrap_or(30) {
        if std::env::var("FUSED").is_ok() {
            s.extend([(h, h + 2 * kv), (h, h), (h, 2 * ff), (ff, h)]);
        } else {
            s.extend([(h, h), (h, kv), (h, kv), (h, h), (h, ff), (h, ff), (ff, h)]);
        }
    }
    // `HEAD=1` keeps the head with `LAYERS` set (`LAYERS=0 HEAD=1`: the head alone).
    if layers.is_none() || std::env::var("HEAD").is_ok_and(|v| v == "1") {
        s.push((h, 49152));
    }
    // `ONLY_K=1536` keeps the matrices of that input width (the down projections).
    if let Some(k) = std::env::var("ONLY_K").ok().and_then(|v| v.parse().ok()) {
        s.retain(|&(sk, _)| sk == k);
    }
    s
}

enum Weight {
    F16(Vec<f16>),
    Tiles(Int8Tiles),
}

impl Weight {
    fn new(format: &str, k: usize, n: usize, seed: usize) -> Weight {
        let f = match format {
            "q8_0" => BlockFormat::Q8_0,
            "q4_0" => BlockFormat::Q4_0,
            _ => {
                return Weight::F16(
                    (0..k * n)
                        .map(|i| f16::from_f32(((i * 31 + seed * 17) % 97) as f32 / 97.0 - 0.5))
                        .collect(),
                )
            }
        };
        let bb = f.block_bytes();
        let mut raw: Vec<u8> = (0..n * k / 32 * bb)
            .map(|i| ((i * 31 + seed * 17) % 251) as u8)
            .collect();
        for b in raw.chunks_exact_mut(bb) {
            b[..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
        }
        match Int8Tiles::pack(f, &raw, n, k) {
            Some(t) => Weight::Tiles(t),
            None => {
                eprintln!("no int8 tiles on this CPU (AVX2 needed)");
                std::process::exit(1)
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Weight::F16(w) => w.len() * 2,
            Weight::Tiles(t) => t.bytes(),
        }
    }

    fn matmul(&self, x: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
        match self {
            Weight::F16(w) => matmul_f16(x, w, m, k, n, out),
            Weight::Tiles(t) => t.matmul(x, m, out),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let format = args.first().map(String::as_str).unwrap_or("f16");
    let threads = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let passes = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20);
    tandem_kernels::pool::set_threads(threads);
    let shapes = shapes();
    // One allocation per layer, as a loaded model has.
    let weights: Vec<Weight> = shapes
        .iter()
        .enumerate()
        .map(|(l, &(k, n))| Weight::new(format, k, n, l))
        .collect();
    let bytes: usize = weights.iter().map(Weight::bytes).sum();
    println!(
        "{format}: weights {:.1} MB, {threads} threads, best of {passes} passes per m",
        bytes as f64 / 1e6
    );
    // This machine's read bandwidth moves (30-54 GB/s within minutes on a shared VM), so each
    // run says what a plain read reaches beside it, before and after the passes.
    let probe = || tandem_kernels::membw::read_bandwidth(1 << 30, 3) / 1e9;
    println!("plain read: {:.1} GB/s", probe());
    let mut base = 0.0;
    // `MS=1,4,8` times just those row counts (the first is the ratios' base).
    let ms: Vec<usize> = std::env::var("MS")
        .ok()
        .map(|v| v.split(',').filter_map(|m| m.trim().parse().ok()).collect())
        .unwrap_or_else(|| (1..=9).collect());
    for (at, &m) in ms.iter().enumerate() {
        let xs: Vec<Vec<f32>> = shapes
            .iter()
            .map(|&(k, _)| (0..m * k).map(|i| (i % 13) as f32 / 13.0 - 0.4).collect())
            .collect();
        let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(_, n)| vec![0f32; m * n]).collect();
        let mut run = || {
            for (((w, x), o), &(k, n)) in weights.iter().zip(&xs).zip(&mut outs).zip(&shapes) {
                w.matmul(x, m, k, n, o);
            }
        };
        run();
        let mut best = f64::MAX;
        for _ in 0..passes {
            let t = Instant::now();
            run();
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        if at == 0 {
            base = best;
        }
        println!(
            "m={m}: {best:7.3} ms per pass, {:5.2} GB/s, {:.2}x m={}",
            bytes as f64 / best / 1e6,
            best / base,
            ms[0]
        );
    }
    println!("plain read: {:.1} GB/s", probe());
}
