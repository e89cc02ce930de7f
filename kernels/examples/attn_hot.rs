//! The attention kernel alone at SmolLM2's head shape (9 query heads, 3 KV heads, head_dim 64,
//! f16 cache), for one-token steps and verification passes at chat-sized contexts.
//!
//!     cargo run --release -p tandem-kernels --example attn_hot [THREADS] [T,N]
//!
//! Prints microseconds per call (best of ten batches) and what 30 layers of it would take,
//! for `T` new rows after `N` cached positions (default: several shapes). The cache here stays
//! in L2 between calls; inside a model pass it is colder, so `bench --profile` shows more.

use half::f16;
use std::time::Instant;
use tandem_kernels::attention::{attention, AttentionShape};

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let shapes: Vec<(usize, usize)> = match args.next() {
        Some(a) => match a.split_once(',') {
            Some((t, n)) => match (t.parse(), n.parse()) {
                (Ok(t), Ok(n)) => vec![(t, n)],
                _ => return eprintln!("usage: attn_hot [THREADS] [T,N]"),
            },
            None => return eprintln!("usage: attn_hot [THREADS] [T,N]"),
        },
        None => vec![(1, 64), (4, 128), (8, 64), (1, 512), (8, 512)],
    };
    tandem_kernels::pool::set_threads(threads);
    let capacity = 2048;
    for (t, n) in shapes {
        let s = AttentionShape {
            t,
            n,
            n_head: 9,
            n_kv_head: 3,
            head_dim: 64,
            capacity,
        };
        let q: Vec<f32> = (0..t * 9 * 64)
            .map(|i| ((i * 7) % 13) as f32 / 13.0 - 0.5)
            .collect();
        let k: Vec<f16> = (0..3 * capacity * 64)
            .map(|i| f16::from_f32(((i * 5) % 11) as f32 / 11.0 - 0.5))
            .collect();
        let v = k.clone();
        let mut out = vec![0f32; t * 9 * 64];
        let reps = 3000;
        for _ in 0..100 {
            attention(s, &q, &k, &v, &mut out);
        }
        let mut best = f64::MAX;
        for _ in 0..10 {
            let t0 = Instant::now();
            for _ in 0..reps {
                attention(s, &q, &k, &v, &mut out);
            }
            best = best.min(t0.elapsed().as_secs_f64() * 1e6 / reps as f64);
        }
        println!(
            "t={t} n={n}: {best:.2} us per call, x30 layers = {:.3} ms",
            best * 30.0 / 1000.0
        );
    }
}
