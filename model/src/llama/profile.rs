//! Where the time of forward passes goes, per operation (`tandem bench --profile`).

use super::backend::Backend;
use super::Llama;

/// Where the time of forward passes went, per operation (see [`Llama::start_profile`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpTimes {
    /// (operation, seconds), in the order the forward pass first runs them.
    pub ops: Vec<(&'static str, f64)>,
    /// Forward calls measured.
    pub calls: usize,
}

impl OpTimes {
    fn add(&mut self, op: &'static str, secs: f64) {
        match self.ops.iter_mut().find(|(o, _)| *o == op) {
            Some((_, t)) => *t += secs,
            None => self.ops.push((op, secs)),
        }
    }
}

/// Times the operations of one forward pass when profiling is on (an `Instant` per op;
/// nothing when off).
pub(super) struct Timer<'a> {
    times: Option<&'a mut OpTimes>,
    last: std::time::Instant,
}

impl<'a> Timer<'a> {
    pub(super) fn new(times: Option<&'a mut OpTimes>) -> Self {
        Timer {
            times,
            last: std::time::Instant::now(),
        }
    }

    /// Books the time since the last lap to `op`. A backend that queues work (the GPU) is
    /// waited for first, so the time is the operation's, not its launch's.
    pub(super) fn lap(&mut self, backend: &impl Backend, op: &'static str) {
        if let Some(t) = self.times.as_deref_mut() {
            // A failed wait shows up in the pass itself; here it only blurs a time.
            let _ = backend.sync();
            let now = std::time::Instant::now();
            t.add(op, (now - self.last).as_secs_f64());
            self.last = now;
        }
    }
}

impl Llama {
    /// Starts timing every operation of later forward passes (see [`Llama::take_profile`]).
    pub fn start_profile(&self) {
        if let Ok(mut w) = self.workspace.lock() {
            w.profile = Some(OpTimes::default());
        }
    }

    /// The times gathered since [`Llama::start_profile`], and stops timing.
    pub fn take_profile(&self) -> Option<OpTimes> {
        self.workspace.lock().ok()?.profile.take()
    }
}
