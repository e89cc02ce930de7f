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
//!
//! A busy machine: spinning workers assume each has a core. When another process takes one,
//! a worker is descheduled in the middle of its task and the caller waits a whole scheduler
//! slice (milliseconds) for it, on each of the ~200 calls of a decode step (SmolLM2 Q8_0 on 2
//! cores with one busy neighbour: 104 → 22 tok/s, against 57 on one thread). The caller
//! therefore times each call: finishing its own tasks and then waiting far longer than a task
//! takes is a *stall*. A [`Governor`] sheds one worker (excluded workers sleep, so they stop
//! competing for the cores too) when stalls pile up in a window of calls, and restores them
//! after a back-off that doubles while the stalls persist. Results do not depend on how many
//! threads ran a call.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

const ACTIVE_BITS: u32 = 16;

/// How long an idle worker spins before it sleeps.
pub const SPIN: Duration = Duration::from_millis(2);

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// The current call: its generation (bumped once per call; workers wait for it to change)
    /// above [`ACTIVE_BITS`] bits holding how many workers take part in it, in one word so a
    /// worker decides from the very call it saw (see [`worker`]).
    call: AtomicU64,
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
    /// Workers 0..active take part in calls; the others sleep on `unpark` (shed, see
    /// [`Governor`]).
    active: AtomicUsize,
    unpark: Condvar,
    /// When a call last stalled, in milliseconds since the pool's `epoch` plus one (0: never).
    last_stall_ms: AtomicU64,
}

// SAFETY: `job` is written only by the thread holding `busy` while no worker reads it (all
// have finished the previous call), and read by workers only between a generation bump and
// their `pending` decrement, during which the caller keeps the closure alive.
unsafe impl Sync for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// Held by the call in progress; holds the governor's state.
    busy: Mutex<Governor>,
    epoch: Instant,
}

/// Decides how many workers take part in calls from the stalls the calls measure.
#[derive(Debug)]
pub struct Governor {
    /// Workers the pool has, and how many take part now.
    workers: usize,
    active: usize,
    calls: u32,
    stalls: u32,
    /// While shed: when to try every worker again.
    shed_until: Option<Instant>,
    backoff: Duration,
    /// Since when no window has stalled (the back-off resets after [`CALM`]).
    calm_since: Instant,
    /// Just restored after a shed: the neighbour that caused it is likely still there, so
    /// the first stall sheds again (a probe then costs one stall, not [`STALLS_TO_SHED`]).
    probing: bool,
}

/// Calls per window, and stalls in one window that shed a worker.
const WINDOW: u32 = 64;
const STALLS_TO_SHED: u32 = 4;
/// First and longest time a shed worker stays out.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(3200);
/// Stall-free time after which the back-off starts over.
const CALM: Duration = Duration::from_secs(5);

impl Governor {
    fn new(workers: usize) -> Governor {
        Governor {
            workers,
            active: workers,
            calls: 0,
            stalls: 0,
            shed_until: None,
            backoff: BACKOFF_MIN,
            calm_since: Instant::now(),
            probing: false,
        }
    }

    /// Workers to use for the next call (restoring them when a shed has run its time).
    fn active(&mut self, now: Instant) -> usize {
        if self.shed_until.is_some_and(|t| now >= t) {
            self.shed_until = None;
            self.active = self.workers;
            self.calls = 0;
            self.stalls = 0;
            self.probing = true;
        }
        self.active
    }

    /// Whether a call stalled: after the caller ran out of tasks it waited `wait` for the
    /// workers, far longer than its own tasks took on average (a descheduled worker), or
    /// over a millisecond when the workers took every task.
    pub fn is_stall(wait: Duration, own: Duration, own_tasks: usize) -> bool {
        match own_tasks {
            0 => wait > Duration::from_millis(1),
            n => wait > own / n as u32 * 3 + Duration::from_micros(100),
        }
    }

    /// Records one parallel call; returns true when it sheds a worker.
    fn record(&mut self, stalled: bool, now: Instant) -> bool {
        self.calls += 1;
        self.stalls += stalled as u32;
        let limit = if self.probing { 1 } else { STALLS_TO_SHED };
        if self.stalls >= limit {
            self.active = self.active.saturating_sub(1);
            self.shed_until = Some(now + self.backoff);
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            self.calls = 0;
            self.stalls = 0;
            self.calm_since = now;
            return true;
        }
        if self.calls >= WINDOW {
            self.probing = false;
            if now.duration_since(self.calm_since) > CALM {
                self.backoff = BACKOFF_MIN;
            }
            if self.stalls > 0 {
                self.calm_since = now;
            }
            self.calls = 0;
            self.stalls = 0;
        }
        false
    }
}

/// The widest pool (llama.cpp's `GGML_MAX_N_THREADS` too): wider requests are cut to it, so
/// a caller's typo cannot start a hundred thousand spinning threads.
pub const MAX_THREADS: usize = 512;

static THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets the number of threads (the caller included) before the pool first runs; later calls
/// have no effect. Default: `RAYON_NUM_THREADS`, else every core.
pub fn set_threads(n: usize) {
    THREADS.store(n.clamp(1, MAX_THREADS), SeqCst);
}

/// Pools of a given width asked for by [`with_threads`] (leaked: a process asks for a few at
/// most, and their workers live as long as it does).
static SIZED: Mutex<Vec<&'static Pool>> = Mutex::new(Vec::new());

thread_local! {
    /// The pool kernels called from this thread use (see [`scoped`]); `None`: [`global`].
    static CURRENT: std::cell::Cell<Option<&'static Pool>> = const { std::cell::Cell::new(None) };
}

/// A pool `threads` wide, shared by everything that asks for that width (the process-wide
/// pool when it already has it): two models loaded with the same thread count (a verifier and
/// its draft) share one set of spinning workers instead of competing with two.
pub fn with_threads(threads: usize) -> &'static Pool {
    let threads = threads.clamp(1, MAX_THREADS);
    if let Some(g) = POOL.get().filter(|g| g.threads() == threads) {
        return g;
    }
    let mut sized = SIZED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = sized.iter().find(|p| p.threads() == threads) {
        return p;
    }
    let p: &'static Pool = Box::leak(Box::new(Pool::new(threads)));
    sized.push(p);
    p
}

/// Runs `f` with `pool` as the pool of every kernel it calls on this thread (a model loaded
/// with an explicit thread count runs its forward pass this way).
pub fn scoped<R>(pool: &'static Pool, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<&'static Pool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(Some(pool))));
    f()
}

/// The pool for a kernel called now: the one [`scoped`] set on this thread, else [`global`].
pub fn current() -> &'static Pool {
    CURRENT.with(|c| c.get()).unwrap_or_else(global)
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
        Pool::new(n.min(MAX_THREADS))
    })
}

impl Pool {
    /// A pool running calls on `threads` threads: the caller plus `threads − 1` workers.
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            call: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            n_tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            // Set before any worker starts: a worker that saw 0 here would park, and nothing
            // would wake it (the first parallel call then waited for it forever).
            active: AtomicUsize::new(threads.max(1) - 1),
            unpark: Condvar::new(),
            last_stall_ms: AtomicU64::new(0),
        });
        let mut workers = threads.max(1) - 1;
        for i in 0..workers {
            let s = shared.clone();
            // A worker that cannot be started shrinks the pool rather than failing.
            if std::thread::Builder::new()
                .name(format!("tandem-kernel-{i}"))
                .spawn(move || worker(&s, i))
                .is_err()
            {
                workers = i;
                break;
            }
        }
        // Fewer started (spawning failed): only the ones that run take part. They all have
        // indices below the new count, so none is parked by this.
        shared.active.store(workers, SeqCst);
        Pool {
            shared,
            workers,
            busy: Mutex::new(Governor::new(workers)),
            epoch: Instant::now(),
        }
    }

    /// Whether a call stalled in the last 5 s (`CALM`; another process is taking the cores):
    /// kernels that hand each thread one long run of work while the cores are theirs split it
    /// finer then, so the caller can take over a descheduled worker's share.
    pub fn contended(&self) -> bool {
        let last = self.shared.last_stall_ms.load(Relaxed);
        last != 0 && (self.epoch.elapsed().as_millis() as u64 + 1) < last + CALM.as_millis() as u64
    }

    /// Threads taking part in calls now (the caller included): what kernels size their tasks
    /// by, so a shed pool runs one thread's worth of tasks, not many small ones.
    pub fn threads_now(&self) -> usize {
        self.active_workers() + 1
    }

    /// Workers taking part in calls now (fewer than [`Pool::threads`] − 1 while shed).
    pub fn active_workers(&self) -> usize {
        self.shared.active.load(SeqCst)
    }

    /// Threads that run a call (the caller included).
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `task(i)` for every i in 0..n_tasks across the pool, returning when all are done.
    /// Tasks are handed out one at a time from a shared counter, so uneven ones balance.
    pub fn run(&self, n_tasks: usize, task: impl Fn(usize) + Sync) {
        let mut guard = match self.busy.try_lock() {
            Ok(g) if self.workers > 0 && n_tasks > 1 => g,
            _ => {
                (0..n_tasks).for_each(task);
                return;
            }
        };
        let s = &*self.shared;
        let start = Instant::now();
        let active = guard.active(start);
        if active != s.active.load(SeqCst) {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.active.store(active, SeqCst);
            s.unpark.notify_all();
        }
        if active == 0 {
            drop(guard);
            (0..n_tasks).for_each(task);
            return;
        }
        let task_ref: Task<'_> = &task;
        // SAFETY: see `Shared`; the lifetime is erased only until every worker has reported
        // done below, before `task` is dropped.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<Task<'_>, Task<'static>>(task_ref));
        }
        s.n_tasks.store(n_tasks, SeqCst);
        s.next.store(0, SeqCst);
        s.pending.store(active, SeqCst);
        let generation = (s.call.load(SeqCst) >> ACTIVE_BITS) + 1;
        s.call
            .store((generation << ACTIVE_BITS) | active as u64, SeqCst);
        if s.sleeping.load(SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // A panic here must still wait for the workers: they hold a reference to `task`.
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| take_tasks(s, &task)));
        let own_done = Instant::now();
        while s.pending.load(Acquire) > 0 {
            std::hint::spin_loop();
        }
        // SAFETY: every worker has reported done; none reads `job` until the next call.
        unsafe {
            *s.job.get() = None;
        }
        let end = Instant::now();
        let own_tasks = mine.as_ref().map_or(0, |&n| n);
        let stalled = Governor::is_stall(end - own_done, own_done - start, own_tasks);
        if stalled {
            let ms = end.duration_since(self.epoch).as_millis() as u64 + 1;
            s.last_stall_ms.store(ms, Relaxed);
        }
        guard.record(stalled, end);
        drop(guard);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, SeqCst) {
            panic!("a kernel task panicked on a pool thread");
        }
    }
}

/// Runs tasks from the shared counter until none is left; returns how many it ran.
fn take_tasks(s: &Shared, task: &(dyn Fn(usize) + Sync)) -> usize {
    let n = s.n_tasks.load(Acquire);
    let mut ran = 0;
    loop {
        let i = s.next.fetch_add(1, AcqRel);
        if i >= n {
            return ran;
        }
        task(i);
        ran += 1;
    }
}

fn worker(s: &Shared, index: usize) {
    let generation = |word: u64| word >> ACTIVE_BITS;
    let taking_part = |word: u64| (word & ((1 << ACTIVE_BITS) - 1)) as usize;
    // The generation last handled (the value before any call: a call made before this thread
    // first looks is still seen).
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let mut word = s.call.load(Acquire);
        while generation(word) == seen {
            if index >= s.active.load(SeqCst) {
                // Shed: sleep until the governor takes this worker back. No call counts it
                // in `pending` meanwhile, so none waits for it.
                let mut l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                while index >= s.active.load(SeqCst) {
                    l = s.unpark.wait(l).unwrap_or_else(|e| e.into_inner());
                }
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                let mut l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleeping.fetch_add(1, SeqCst);
                while generation(s.call.load(SeqCst)) == seen {
                    l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
                }
                s.sleeping.fetch_sub(1, SeqCst);
            }
            word = s.call.load(Acquire);
        }
        seen = generation(word);
        // A call this worker is not part of is skipped: `pending` did not count it. A call it
        // is part of cannot end (nor its job change) before it reports done below, however
        // late it arrives.
        if index >= taking_part(word) {
            continue;
        }
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
    fn governor_sheds_on_stalls_and_restores_after_its_backoff() {
        let mut g = Governor::new(2);
        let t0 = Instant::now();
        assert_eq!(g.active(t0), 2);
        for _ in 0..STALLS_TO_SHED - 1 {
            assert!(!g.record(true, t0));
        }
        assert!(g.record(true, t0));
        assert_eq!(g.active(t0), 1);
        assert_eq!(g.active(t0 + BACKOFF_MIN / 2), 1);
        assert_eq!(g.active(t0 + BACKOFF_MIN), 2, "restored after the back-off");
        // Right after a restore one stall sheds again, for twice as long.
        assert!(g.record(true, t0 + BACKOFF_MIN));
        assert_eq!(g.active(t0 + BACKOFF_MIN * 2), 1);
        assert_eq!(g.active(t0 + BACKOFF_MIN * 3), 2);
        // A probe that sees a whole window without a stall ends probing: one stall no longer
        // sheds.
        for _ in 0..WINDOW {
            g.record(false, t0 + BACKOFF_MIN * 3);
        }
        assert!(!g.record(true, t0 + BACKOFF_MIN * 3));
        assert_eq!(g.active(t0 + BACKOFF_MIN * 3), 2);
        // Calls without stalls never shed.
        let mut calm = Governor::new(3);
        for _ in 0..10 * WINDOW {
            assert!(!calm.record(false, t0));
        }
        assert_eq!(calm.active(t0), 3);
    }

    #[test]
    fn a_pool_is_contended_for_a_while_after_a_stall() {
        let pool = Pool::new(2);
        assert!(!pool.contended(), "a fresh pool has seen no stall");
        let now = pool.epoch.elapsed().as_millis() as u64 + 1;
        pool.shared.last_stall_ms.store(now, Relaxed);
        assert!(pool.contended());
        // A stall longer ago than CALM no longer counts.
        let pool = Pool {
            epoch: Instant::now() - CALM - Duration::from_secs(1),
            ..Pool::new(2)
        };
        pool.shared.last_stall_ms.store(1, Relaxed);
        assert!(!pool.contended());
    }

    #[test]
    fn a_stall_is_a_wait_far_longer_than_a_task() {
        let us = Duration::from_micros;
        assert!(!Governor::is_stall(us(30), us(400), 10));
        assert!(!Governor::is_stall(us(120), us(400), 10));
        assert!(Governor::is_stall(us(3000), us(400), 10));
        assert!(!Governor::is_stall(us(500), us(0), 0));
        assert!(Governor::is_stall(us(4000), us(0), 0));
    }

    #[test]
    fn every_task_runs_once_while_workers_are_shed_and_restored() {
        let pool = Pool::new(4);
        for active in [3, 1, 0, 2, 3, 0, 3] {
            {
                let mut g = pool.busy.lock().unwrap();
                g.active = active;
                g.shed_until = (active < 3).then(|| Instant::now() + Duration::from_secs(60));
            }
            for n in [2, 7, 100] {
                let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
                pool.run(n, |i| {
                    hits[i].fetch_add(1, SeqCst);
                });
                assert!(
                    hits.iter().all(|h| h.load(SeqCst) == 1),
                    "active {active}, n {n}"
                );
                // The governor may shed more (4 threads on a small machine do stall).
                assert!(pool.active_workers() <= active);
            }
        }
    }

    #[test]
    fn a_worker_starting_before_the_pool_is_built_still_takes_part() {
        // Regression: `active` used to be 0 until after the workers were spawned; a worker
        // that ran first parked for good and the first call hung. Many fresh pools, each
        // used at once, catch any start-order dependence.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..200 {
                let pool = Pool::new(2);
                let c = AtomicU64::new(0);
                pool.run(8, |_| {
                    c.fetch_add(1, SeqCst);
                });
                assert_eq!(c.load(SeqCst), 8);
            }
            let _ = done.send(());
        });
        // A hang fails the test instead of holding CI (the pools leak then; it is failing).
        assert!(
            finished.recv_timeout(Duration::from_secs(60)).is_ok(),
            "a pool call never finished: a worker missed its start"
        );
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
