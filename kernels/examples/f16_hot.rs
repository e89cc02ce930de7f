//! The F16 kernel on weights resident in cache (compute, not DRAM), with the activation rows
//! and the weights placed on or off a 64-byte boundary.
//!
//!     [BULK=1] cargo run --release -p tandem-kernels --example f16_hot [THREADS]
//!
//! Prints GMAC/s for a prefill-sized (m = 512) and a verification-sized (m = 8) matmul of
//! SmolLM2's gate/up shape (k = 576) and down shape (k = 1536: eight activation rows are 48 KB,
//! more than a Zen 4's L1, and still ran at the gate/up rate in session 30). This is how the
//! activation buffers' alignment was measured (`kernels::aligned`): a 512-bit load that starts
//! off a cache line touches two.

use half::f16;
use std::time::Instant;

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    tandem_kernels::pool::set_threads(threads);
    // `BULK=1`: time `matmul_f16_bulk` (AMX for a prompt's rows where the CPU has it).
    let bulk = std::env::var("BULK").is_ok_and(|v| v == "1");
    for (x_off, w_off) in [(0usize, 0usize), (0, 8), (4, 0), (4, 8)] {
        for (m, k, n) in [
            (512usize, 576usize, 1536usize),
            (8, 576, 1536),
            (512, 1536, 576),
            (8, 1536, 576),
        ] {
            let mut xb = vec![0f32; m * k + 32];
            let xs = ((64 - xb.as_ptr() as usize % 64) % 64) / 4 + x_off;
            for (i, v) in xb[xs..xs + m * k].iter_mut().enumerate() {
                *v = ((i * 7) % 13) as f32 / 13.0 - 0.5;
            }
            let mut wb = vec![f16::ZERO; n * k + 64];
            let ws = ((64 - wb.as_ptr() as usize % 64) % 64) / 2 + w_off;
            for (i, v) in wb[ws..ws + n * k].iter_mut().enumerate() {
                *v = f16::from_f32(((i * 5) % 11) as f32 / 11.0 - 0.5);
            }
            let (x, w) = (&xb[xs..xs + m * k], &wb[ws..ws + n * k]);
            let mut out = vec![0f32; m * n];
            let reps = (2e9 / (m * k * n) as f64).ceil() as usize;
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..reps {
                    if bulk {
                        tandem_kernels::matmul_f16_bulk(x, w, m, k, n, &mut out);
                    } else {
                        tandem_kernels::matmul_f16(x, w, m, k, n, &mut out);
                    }
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            println!(
                "activations {:>2} B and weights {:>2} B past a line, m={m} k={k} n={n}: {:.1} GMAC/s ({threads} threads)",
                x_off * 4,
                w_off * 2,
                (m * k * n) as f64 / best / 1e9
            );
        }
    }
}
