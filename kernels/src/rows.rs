//! The parallel driver all GEMM kernels share.

/// Runs `row(j, i0, g, results)` for every weight row j and every group of at most
/// `row_group` activation rows `i0..i0 + g`, in parallel over tasks of `rows_per_task` weight
/// rows; `results` receives those g outputs. Lays them out as `out[i * n + j]`. For m > 1 rows
/// are computed into an [n × m] buffer (contiguous per weight row, so tasks write disjoint
/// slices) and transposed once at the end.
///
/// Within a task the activation groups are the outer loop: one group's rows stay in L1 while
/// the task's weight rows (tens of KB) pass through L2, instead of every weight row streaming
/// all m activation rows (a prefill's 512 rows are ~1 MB, read from L3 once per weight row).
/// Each output is still one call's arithmetic, so results do not depend on the grouping.
pub(crate) fn par_weight_rows(
    out: &mut [f32],
    m: usize,
    n: usize,
    rows_per_task: usize,
    row_group: usize,
    row: impl Fn(usize, usize, usize, &mut [f32]) + Sync,
) {
    // Small matrices (SmolLM2's 192- and 576-row k/v/q/o projections) split into at least
    // four tasks per thread: 576 rows in tasks of 64 gave one thread 5 tasks and the other 4.
    let threads = crate::pool::global().threads().max(1);
    let rows_per_task = rows_per_task.min(n.div_ceil(4 * threads)).max(8);
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
            let mut i0 = 0;
            while i0 < m {
                let g = (m - i0).min(row_group.max(1));
                for (jj, oj) in o.chunks_mut(m).enumerate() {
                    row(c * rows_per_task + jj, i0, g, &mut oj[i0..i0 + g]);
                }
                i0 += g;
            }
        });
    };
    if m == 1 {
        run(out);
        return;
    }
    with_scratch(&TRANSPOSED, |tmp| {
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

/// Runs `f` on this thread's scratch value in `key` (reused from call to call: no allocation
/// per token), or on a fresh one when a call further up this thread holds it (a pool thread
/// waiting inside `run` may run another kernel on the same thread).
pub(crate) fn with_scratch<T: Default, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut held) => f(&mut held),
        Err(_) => f(&mut T::default()),
    })
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
