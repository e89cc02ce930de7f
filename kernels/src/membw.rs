//! How fast this machine streams memory: the ceiling for decode, which reads every weight once
//! per token. Measured the way the kernels read weights (the kernel pool's threads, each
//! summing its own contiguous chunks), so "weight bytes per token ÷ this" is the best time a
//! decode step can reach.

use std::time::Instant;

/// Best-of-`reps` read bandwidth in bytes per second over a `bytes`-sized buffer (use one
/// much larger than the last-level cache).
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let words = (bytes / 8).max(1 << 12);
    let buf: Vec<u64> = (0..words as u64).collect(); // touched, so every page is mapped
    let chunk = 1 << 16; // 512 KiB per task
    let tasks = words.div_ceil(chunk);
    let mut best = 0f64;
    let sink = std::sync::atomic::AtomicU64::new(0);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        crate::pool::current().run(tasks, |c| {
            let part = &buf[c * chunk..((c + 1) * chunk).min(words)];
            // Four independent sums so the adds are not the limit; the compiler vectorizes.
            let mut acc = [0u64; 4];
            for w in part.chunks_exact(4) {
                for (a, v) in acc.iter_mut().zip(w) {
                    *a = a.wrapping_add(*v);
                }
            }
            let s = acc.iter().fold(0u64, |a, b| a.wrapping_add(*b));
            sink.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
        });
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink.into_inner());
    best
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_something_positive() {
        let bw = super::read_bandwidth(1 << 20, 2);
        assert!(bw.is_finite() && bw > 0.0);
    }
}
