//! A memory limit (and a deadline) for work on untrusted input that sets none of its own: a
//! chat template's rendering.
//!
//! A chat template comes with the model file (GGUF `tokenizer.chat_template`,
//! tokenizer_config.json), and a few Jinja statements can build a value of any size: a string
//! or list joined to itself 40 times holds 2⁴⁰ elements. minijinja bounds the instructions it
//! runs (fuel, see `chat`), repeated strings and ranges, but not the size of what it builds,
//! and in Rust an allocation that fails aborts the process (one that succeeds, slowly, takes
//! the machine's memory first). So a binary that installs [`BudgetAllocator`] as its global
//! allocator lets [`run_within`] charge every allocation of the work's own thread against a
//! limit. Past it, or past the caller's deadline, that thread stops for good: it sleeps inside
//! the allocator, holding nothing the rest of the process uses (what it allocated, at most the
//! limit, is not returned), and the caller gets a [`BudgetError`], a clean error, instead of an
//! abort. Where the allocator is not installed (a library user's own binary), `run_within`
//! still gives the work its own stack and the caller its deadline, but no heap limit.
//!
//! Why by hand: no crate limits one thread's heap on stable Rust (an allocation error hook
//! and `-Z oom=panic` are unstable), and an allocator may not unwind.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

/// The system allocator, plus the accounting of [`run_within`]'s threads.
pub struct BudgetAllocator;

/// The smallest stack [`run_within`] falls back to when a larger one cannot be had.
const MIN_STACK: usize = 16 << 20;

/// Whether [`BudgetAllocator`] serves this process (set by its first allocation).
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    // Const-initialized and without destructors, so reading them never allocates (they are
    // read inside the allocator) and never fails, even while the thread exits.
    /// This thread's limit in bytes; negative: none (every thread but a budgeted one).
    static LIMIT: Cell<isize> = const { Cell::new(-1) };
    /// Bytes this thread has allocated and not freed since its budget began.
    static USED: Cell<isize> = const { Cell::new(0) };
    /// Tells the waiting caller that the limit was passed (set while a budget runs).
    static NOTIFY: Cell<Option<*const (dyn Fn() + 'static)>> = const { Cell::new(None) };
    /// Set by the caller when it stopped waiting (the deadline passed): the work's next
    /// allocation stops it.
    static CANCELLED: Cell<*const AtomicBool> = const { Cell::new(std::ptr::null()) };
}

/// Why [`run_within`] returned no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetError {
    /// The work needed more than `limit` bytes of heap and was stopped.
    Exceeded { limit: usize },
    /// It ran past `after`: the caller stopped waiting, and the work stops at its next
    /// allocation.
    TimedOut { after: Duration },
    /// No thread could be started for it (the message says why).
    NoThread(String),
}

impl std::fmt::Display for BudgetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BudgetError::Exceeded { limit } => {
                write!(f, "needed more than {} MiB of memory", limit >> 20)
            }
            BudgetError::TimedOut { after } => {
                write!(f, "took more than {} s", after.as_secs_f64())
            }
            BudgetError::NoThread(e) => write!(f, "could not start a thread for it: {e}"),
        }
    }
}

/// Charges `bytes` to this thread's budget, if it has one; past the limit the thread stops.
#[inline]
fn charge(bytes: usize) {
    let limit = LIMIT.with(Cell::get);
    if limit < 0 {
        return;
    }
    let used = USED.with(|u| {
        // A layout's size is at most isize::MAX.
        let v = u.get().saturating_add(bytes as isize);
        u.set(v);
        v
    });
    let cancelled = CANCELLED.with(Cell::get);
    // SAFETY: a non-null pointer is the caller's flag, kept alive by the budgeted thread's
    // own reference to it for as long as the thread runs its work.
    let over = used > limit || (!cancelled.is_null() && unsafe { (*cancelled).load(Relaxed) });
    // Never inside a panic: the panic hook holds process-wide locks while it allocates (with
    // RUST_BACKTRACE set, resolving the backtrace's symbols from a binary's debug info took
    // more than 64 MiB), and a thread put to sleep there would hang every later panic in
    // the process. The panic unwinds to `run_within` and frees what it took.
    if over && !std::thread::panicking() {
        stop();
    }
}

#[inline]
fn credit(bytes: usize) {
    if LIMIT.with(Cell::get) >= 0 {
        USED.with(|u| u.set(u.get().saturating_sub(bytes as isize)));
    }
}

/// Ends the budgeted thread's work: the caller is told, and this thread sleeps for good.
#[cold]
fn stop() -> ! {
    // Whatever telling the caller allocates is not charged (no recursion into `stop`).
    LIMIT.with(|l| l.set(-1));
    if let Some(notify) = NOTIFY.with(Cell::get) {
        // SAFETY: `run_within` sets the pointer to a closure on its thread's stack, in the
        // frame that runs the work: alive until the work returns, and this call is inside it.
        unsafe { (*notify)() };
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged. The additions are
// bookkeeping in thread-locals that never allocate, and `charge`, which may put the calling
// thread to sleep for good instead of returning (it neither unwinds nor returns a bad pointer).
unsafe impl GlobalAlloc for BudgetAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Relaxed) {
            INSTALLED.store(true, Relaxed);
        }
        charge(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        credit(layout.size());
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            charge(new_size - layout.size());
        } else {
            credit(layout.size() - new_size);
        }
        System.realloc(ptr, layout, new_size)
    }
}

/// Runs `work` on a thread of its own with a `stack_bytes` stack, waiting at most `deadline`
/// for it, and (when [`BudgetAllocator`] is the global allocator) with at most `limit` bytes
/// of heap outstanding at once. A panic in `work` is passed on to the caller. Work past its
/// deadline stops at its next allocation where the allocator is installed; elsewhere, and for
/// a loop that never allocates, it runs on in the background until it ends.
pub fn run_within<T, F>(
    limit: usize,
    stack_bytes: usize,
    deadline: Duration,
    work: F,
) -> Result<T, BudgetError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let over = BudgetError::Exceeded { limit };
    let limit_bytes = isize::try_from(limit).unwrap_or(isize::MAX);
    let (tx, rx) = sync_channel::<Result<std::thread::Result<T>, BudgetError>>(1);
    let cancel = Arc::new(AtomicBool::new(false));
    // The work goes to the thread once one has started: when the address space (strict
    // overcommit, a ulimit) refuses the stack asked for, the work is still here for a try
    // with a smaller one.
    let mut stack = stack_bytes;
    let work_tx = loop {
        let (work_tx, work_rx) = sync_channel::<F>(1);
        let (tx, notify_tx, cancel_seen) = (tx.clone(), tx.clone(), Arc::clone(&cancel));
        let started = std::thread::Builder::new()
            .name("tandem-budgeted".into())
            .stack_size(stack)
            .spawn(move || {
                let Ok(work) = work_rx.recv() else { return };
                let notify = move || {
                    let _ = notify_tx.try_send(Err(BudgetError::Exceeded { limit }));
                };
                let notify_ref: &(dyn Fn() + 'static) = &notify;
                NOTIFY.with(|n| n.set(Some(notify_ref as *const _)));
                CANCELLED.with(|c| c.set(Arc::as_ptr(&cancel_seen)));
                USED.with(|u| u.set(0));
                LIMIT.with(|l| l.set(limit_bytes));
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
                LIMIT.with(|l| l.set(-1));
                NOTIFY.with(|n| n.set(None));
                CANCELLED.with(|c| c.set(std::ptr::null()));
                let _ = tx.send(Ok(out));
            });
        match started {
            Ok(_) => break work_tx,
            Err(e) if stack <= MIN_STACK => return Err(BudgetError::NoThread(e.to_string())),
            Err(_) => stack = (stack / 4).max(MIN_STACK),
        }
    };
    drop(tx);
    if work_tx.send(work).is_err() {
        return Err(BudgetError::NoThread(
            "it ended before its work came".into(),
        ));
    }
    match rx.recv_timeout(deadline) {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(panic))) => std::panic::resume_unwind(panic),
        Ok(Err(stopped)) => Err(stopped),
        Err(RecvTimeoutError::Timeout) => {
            cancel.store(true, Relaxed);
            Err(BudgetError::TimedOut { after: deadline })
        }
        // The thread ends without a word only by stopping, and then it keeps its senders
        // alive, asleep: a closed channel does not happen. Treat it as the stop it would be.
        Err(RecvTimeoutError::Disconnected) => Err(over),
    }
}

/// Whether [`BudgetAllocator`] serves this process, so that [`run_within`] limits work.
pub fn is_enforced() -> bool {
    INSTALLED.load(Relaxed)
}
