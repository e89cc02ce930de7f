//! A persistent pool of spinning worker threads for the per-layer kernels.
//!
//! Why not rayon: one decode step of a 30-layer model makes ~200 small parallel calls, each a
//! few tens of microseconds of work. rayon parks idle workers, and waking one costs ~10 µs
//! (measured: a 64×64 matmul split in two took 12–16 µs against 1.8 µs on one thread), which
//! alone was 15–20% of a decode step. These workers spin between calls (for up to
//! [`SPIN`]), so handing out a call costs an atomic store, and sleep when the process goes
//! quiet. llama.cpp's ggml threadpool makes the same trade.
//!
//! One call runs at a time. A call made while the pool is busy (from another thread, or from
//! inside a task) runs all its tasks on the calling thread: same results, no deadlock.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
pub const SPIN: Duration = Duration::from_millis(2);

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per call; workers wait for it to change.
    generation: AtomicUsize,
    /// The current call's task function (valid while `pending` > 0) and task count.
    job: UnsafeCell<Option<Task<'static>>>,
    n_tasks: AtomicUsize,
    next: AtomicUsize,
    /// Workers that have not finished the current call.
    pending: AtomicUsize,
    sleeping: AtomicUsize,
    panicked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread holding `busy` while no worker reads it (all
// have finished the previous call), and read by workers only between a generation bump and
// their `pending` decrement, during which the caller keeps the closure alive.
unsafe impl Sync for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    busy: Mutex<()>,
}

static THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets the number of threads (the caller included) before the pool first runs; later calls
/// have no effect. Default: `RAYON_NUM_THREADS`, else every core.
pub fn set_threads(n: usize) {
    THREADS.store(n.max(1), SeqCst);
}

/// The process-wide pool.
pub fn global() -> &'static Pool {
    POOL.get_or_init(|| {
        let n = match THREADS.load(SeqCst) {
            0 => std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n: &usize| n > 0)
                .unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(1)
                }),
            n => n,
        };
        Pool::new(n)
    })
}

impl Pool {
    /// A pool running calls on `threads` threads: the caller plus `threads − 1` workers.
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            n_tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = threads.max(1) - 1;
        for i in 0..workers {
            let s = shared.clone();
            // A worker that cannot be started shrinks the pool rather than failing.
            if std::thread::Builder::new()
                .name(format!("tandem-kernel-{i}"))
                .spawn(move || worker(&s))
                .is_err()
            {
                return Pool {
                    shared,
                    workers: i,
                    busy: Mutex::new(()),
                };
            }
        }
        Pool {
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }

    /// Threads that run a call (the caller included).
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `task(i)` for every i in 0..n_tasks across the pool, returning when all are done.
    /// Tasks are handed out one at a time from a shared counter, so uneven ones balance.
    pub fn run(&self, n_tasks: usize, task: impl Fn(usize) + Sync) {
        let guard = match self.busy.try_lock() {
            Ok(g) if self.workers > 0 && n_tasks > 1 => g,
            _ => {
                (0..n_tasks).for_each(task);
                return;
            }
        };
        let s = &*self.shared;
        let task_ref: Task<'_> = &task;
        // SAFETY: see `Shared`; the lifetime is erased only until every worker has reported
        // done below, before `task` is dropped.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<Task<'_>, Task<'static>>(task_ref));
        }
        s.n_tasks.store(n_tasks, SeqCst);
        s.next.store(0, SeqCst);
        s.pending.store(self.workers, SeqCst);
        s.generation.fetch_add(1, SeqCst);
        if s.sleeping.load(SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // A panic here must still wait for the workers: they hold a reference to `task`.
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| take_tasks(s, &task)));
        while s.pending.load(Acquire) > 0 {
            std::hint::spin_loop();
        }
        unsafe {
            *s.job.get() = None;
        }
        drop(guard);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, SeqCst) {
            panic!("a kernel task panicked on a pool thread");
        }
    }
}

fn take_tasks(s: &Shared, task: &(dyn Fn(usize) + Sync)) {
    let n = s.n_tasks.load(Acquire);
    loop {
        let i = s.next.fetch_add(1, AcqRel);
        if i >= n {
            break;
        }
        task(i);
    }
}

fn worker(s: &Shared) {
    // The value before any call: a call made before this thread first looks is still seen.
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        while s.generation.load(Acquire) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                let mut l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleeping.fetch_add(1, SeqCst);
                while s.generation.load(SeqCst) == seen {
                    l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
                }
                s.sleeping.fetch_sub(1, SeqCst);
            }
        }
        seen = s.generation.load(SeqCst);
        // SAFETY: see `Shared`.
        if let Some(task) = unsafe { *s.job.get() } {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| take_tasks(s, task)))
                .is_err()
            {
                s.panicked.store(true, SeqCst);
            }
        }
        s.pending.fetch_sub(1, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_once() {
        let pool = Pool::new(3);
        for n in [0, 1, 2, 7, 100] {
            let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
            pool.run(n, |i| {
                hits[i].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "n = {n}");
        }
    }

    #[test]
    fn nested_and_concurrent_calls_run_inline() {
        let pool = Arc::new(Pool::new(2));
        let total = AtomicU64::new(0);
        pool.run(4, |_| {
            pool.run(3, |_| {
                total.fetch_add(1, SeqCst);
            })
        });
        assert_eq!(total.load(SeqCst), 12);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = pool.clone();
                std::thread::spawn(move || {
                    let c = AtomicU64::new(0);
                    for _ in 0..200 {
                        p.run(5, |_| {
                            c.fetch_add(1, SeqCst);
                        });
                    }
                    c.load(SeqCst)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 1000);
        }
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let pool = Pool::new(2);
        std::thread::sleep(SPIN * 3);
        let c = AtomicU64::new(0);
        pool.run(10, |_| {
            c.fetch_add(1, SeqCst);
        });
        assert_eq!(c.load(SeqCst), 10);
    }
}
