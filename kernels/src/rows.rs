//! The parallel driver all GEMM kernels share.

/// Tasks per thread at least, for [`par_row_tasks`] (balance across cores).
pub(crate) const TASKS_PER_THREAD: usize = 4;

/// Tasks per thread for a pass: one run per thread where the pass streams its weights (reads
/// each once; see `f16_gemm::matmul_with`) and the cores are the pool's own, else
/// [`TASKS_PER_THREAD`] (a compute-bound pass balances on them, and on a busy machine they let
/// the caller take over a descheduled worker's share: `Pool::contended`).
pub(crate) fn tasks_per_thread(streaming: bool) -> usize {
    if streaming && !crate::pool::current().contended() {
        1
    } else {
        TASKS_PER_THREAD
    }
}

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
    let run = |dst: &mut [f32]| {
        let len = dst.len();
        let base = SendPtr(dst.as_mut_ptr());
        par_row_tasks(n, rows_per_task, TASKS_PER_THREAD, |j0, j1| {
            // SAFETY: this task alone writes rows j0..j1 of the [n × m] layout; `par_row_tasks`
            // returns after every task.
            let o = unsafe {
                std::slice::from_raw_parts_mut(base.get().add(j0 * m), (j1 * m).min(len) - j0 * m)
            };
            let mut i0 = 0;
            while i0 < m {
                let g = (m - i0).min(row_group.max(1));
                for (jj, oj) in o.chunks_mut(m).enumerate() {
                    row(j0 + jj, i0, g, &mut oj[i0..i0 + g]);
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

/// Runs `task(j0, j1)` over consecutive ranges of the `n` weight rows on the pool, returning
/// when all are done. Ranges hold at most `rows_per_task` rows, and small matrices (SmolLM2's
/// 192- and 576-row k/v/q/o projections) split into at least `per_thread` per thread: with
/// four, 576 rows in tasks of 64 gave one thread 5 tasks and the other 4 (what a compute-bound
/// pass balances on; a streaming pass takes one, see `f16_gemm`).
pub(crate) fn par_row_tasks(
    n: usize,
    rows_per_task: usize,
    per_thread: usize,
    task: impl Fn(usize, usize) + Sync,
) {
    let threads = crate::pool::current().threads_now().max(1);
    let rows_per_task = rows_per_task
        .min(n.div_ceil(per_thread.max(1) * threads))
        .max(8);
    crate::pool::current().run(n.div_ceil(rows_per_task), |c| {
        let j0 = c * rows_per_task;
        task(j0, (j0 + rows_per_task).min(n));
    });
}

/// `m` activation rows cut into the fewest groups of at most `max` rows, as even as possible
/// (9 rows as 5 + 4, not 6 + 3: a kernel's work per weight row is its largest group's).
pub(crate) fn row_groups(m: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let count = m.div_ceil(max.max(1)).max(1);
    let (small, extra) = (m / count, m % count);
    (0..count).scan(0, move |i0, c| {
        let g = small + usize::from(c < extra);
        let at = *i0;
        *i0 += g;
        (g > 0).then_some((at, g))
    })
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
// SAFETY: the pointer is only dereferenced by tasks writing disjoint ranges of one buffer
// that outlives the pool call (`par_weight_rows` hands each task its own rows).
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as for Send: shared access never touches the same element from two tasks.
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// A method (not field access) so closures capture the whole Sync wrapper.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::row_groups;

    #[test]
    fn row_groups_are_even_and_cover_every_row() {
        let cut = |m, max| row_groups(m, max).collect::<Vec<_>>();
        assert_eq!(cut(1, 6), vec![(0, 1)]);
        assert_eq!(cut(6, 6), vec![(0, 6)]);
        assert_eq!(cut(7, 6), vec![(0, 4), (4, 3)]);
        assert_eq!(cut(9, 6), vec![(0, 5), (5, 4)]);
        assert_eq!(cut(13, 6), vec![(0, 5), (5, 4), (9, 4)]);
        assert!(cut(0, 6).is_empty());
        for m in 1..100 {
            let g = cut(m, 6);
            assert_eq!(g.iter().map(|&(_, n)| n).sum::<usize>(), m);
            assert!(g.iter().all(|&(_, n)| (1..=6).contains(&n)));
            assert!(g.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        }
    }
}
