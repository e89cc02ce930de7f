//! GPU kernel throughput beside the device's measured read bandwidth (scripts/gpu-check.sh).
//!
//!     cargo run --release -p tandem-kernels --features cuda --example gpu_bench
//!
//! Prints one Markdown row per (format, shape, m): kernel time, weight GB/s and the share of
//! the read bandwidth, or why it is skipped when there is no GPU.

use tandem_kernels::cuda::{gpu, GpuFormat};

fn main() {
    let g = match gpu() {
        Ok(g) => g,
        Err(e) => {
            println!("skipped: {e}");
            return;
        }
    };
    let bw = g.read_bandwidth(1 << 30, 20).expect("bandwidth probe");
    println!(
        "device: {}; measured read bandwidth {:.0} GB/s",
        g.name,
        bw / 1e9
    );
    println!("| format | shape (n x k) | m | µs per launch | GB/s | share of read bandwidth |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    // SmolLM2-135M's MLP shapes, its output head, and a 7B-class MLP matrix.
    let shapes = [(1536, 576), (576, 1536), (49152, 576), (11008, 4096)];
    for f in [GpuFormat::Q8_0, GpuFormat::Q4_0, GpuFormat::F16] {
        for (n, k) in shapes {
            let row_bytes = match f {
                GpuFormat::Q8_0 => k / 32 * 34,
                GpuFormat::Q4_0 => k / 32 * 18,
                GpuFormat::F16 => k * 2,
            };
            let bytes = vec![0u8; n * row_bytes]; // zero scales: timing only
            let w = g.upload(f, &bytes, n, k).expect("upload");
            for m in [1, 5, 8] {
                let s = g.time_matmul(&w, m, 50).expect("launch");
                let gbs = w.bytes() as f64 / s / 1e9;
                println!(
                    "| {f:?} | {n} x {k} | {m} | {:.1} | {gbs:.0} | {:.0}% |",
                    s * 1e6,
                    100.0 * gbs * 1e9 / bw
                );
            }
        }
    }
}
