//! The parallel driver both GEMM kernels share.

use rayon::prelude::*;

/// Runs `row(j, results)` for every weight row j in parallel, `rows_per_task` rows per rayon
/// task, where `results` receives row j's m outputs (one per activation row); lays them out as
/// `out[i * n + j]`. For m > 1 rows are computed into an [n × m] buffer (contiguous per weight
/// row, so tasks write disjoint slices) and transposed once at the end.
pub(crate) fn par_weight_rows(
    out: &mut [f32],
    m: usize,
    n: usize,
    rows_per_task: usize,
    row: impl Fn(usize, &mut [f32]) + Sync,
) {
    let run = |dst: &mut [f32]| {
        dst.par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|(c, o)| {
                for (jj, oj) in o.chunks_mut(m).enumerate() {
                    row(c * rows_per_task + jj, oj);
                }
            })
    };
    if m == 1 {
        run(out);
        return;
    }
    let mut tmp = vec![0f32; n * m];
    run(&mut tmp);
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = tmp[j * m + i];
        }
    }
}
