//! The parallel driver both GEMM kernels share.

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
        let chunk = rows_per_task * m;
        let tasks = dst.len().div_ceil(chunk);
        let base = SendPtr(dst.as_mut_ptr());
        let len = dst.len();
        crate::pool::global().run(tasks, |c| {
            let start = c * chunk;
            let end = (start + chunk).min(len);
            // SAFETY: task c alone writes dst[start..end]; `run` returns after every task.
            let o = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
            for (jj, oj) in o.chunks_mut(m).enumerate() {
                row(c * rows_per_task + jj, oj);
            }
        });
    };
    if m == 1 {
        run(out);
        return;
    }
    TRANSPOSED.with(|cell| {
        let mut fresh = Vec::new();
        let mut held = cell.try_borrow_mut();
        let tmp = match held.as_mut() {
            Ok(t) => &mut **t,
            Err(_) => &mut fresh,
        };
        tmp.clear();
        tmp.resize(n * m, 0.0);
        run(tmp);
        for j in 0..n {
            for i in 0..m {
                out[i * n + j] = tmp[j * m + i];
            }
        }
    });
}

thread_local! {
    /// The [n × m] staging buffer, reused across calls (no allocation per token).
    static TRANSPOSED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A raw pointer that tasks on other threads may use for disjoint writes.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// A method (not field access) so closures capture the whole Sync wrapper.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}
