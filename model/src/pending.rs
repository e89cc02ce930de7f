//! Paths a command is still writing, so nothing half-made survives an error or a signal.
//!
//! Every temporary file or folder (and an output folder a command created and has not yet
//! filled) is registered here while it exists. Dropping the guard removes the path (the error
//! path); [`Pending::commit`] runs the final rename and forgets it (the success path). A signal
//! handler (the CLI's) calls [`remove_all`] and exits: the registry is a plain mutex-guarded
//! list because the handler runs on an ordinary thread (signal-hook's), not in signal context.
//! A rename and the handler's removal take the same lock, so a signal lands either before the
//! rename (the temporary is removed, no output) or after it (the output is whole).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn list() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered path, removed when the guard drops unless committed.
#[must_use = "the path is removed when the guard drops"]
pub struct Pending {
    path: PathBuf,
    armed: bool,
}

impl Pending {
    /// Registers `path` (a file or a folder, existing or about to be made: register first,
    /// then create, then call [`Pending::made`]).
    pub fn new(path: &Path) -> Pending {
        list().push(path.to_path_buf());
        Pending {
            path: path.to_path_buf(),
            armed: true,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Says the path now exists on disk. Only the signal tests' hook acts on it (see
    /// `test_pause`).
    pub fn made(self) -> Self {
        test_pause();
        self
    }

    /// Runs `finish` (typically the rename into place) with signals' cleanup held off, then
    /// forgets the path: it is the user's now, or gone.
    pub fn commit<R>(mut self, finish: impl FnOnce() -> R) -> R {
        let mut l = list();
        let r = finish();
        if let Some(i) = l.iter().position(|p| *p == self.path) {
            l.swap_remove(i);
        }
        self.armed = false;
        r
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut l = list();
        if let Some(i) = l.iter().position(|p| *p == self.path) {
            l.swap_remove(i);
        }
        remove(&self.path);
    }
}

/// Removes every registered path (called by a signal handler just before it exits). Holds the
/// lock until the process exits, so no rename starts after the cleanup.
pub fn remove_all() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    let mut l = list();
    for p in l.drain(..) {
        remove(&p);
    }
    l
}

fn remove(p: &Path) {
    // A folder may still be gaining files from a writer thread: try a few times.
    for _ in 0..3 {
        let gone = match std::fs::symlink_metadata(p) {
            Err(_) => true,
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).is_ok(),
            Ok(_) => std::fs::remove_file(p).is_ok(),
        };
        if gone {
            return;
        }
    }
}

/// Test hook: `TANDEM_TEST_PAUSE_AFTER_TEMP_MS` makes a command wait that long after it
/// registers a temporary, so the signal tests can hit every command while its temporary exists
/// (the bundled model finishes in milliseconds otherwise). Unset, it costs one env lookup.
fn test_pause() {
    if let Some(ms) = std::env::var("TANDEM_TEST_PAUSE_AFTER_TEMP_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_guards_remove_committed_ones_keep_and_remove_all_clears() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        {
            let _g = Pending::new(&a);
            std::fs::create_dir(&a).unwrap();
            std::fs::write(a.join("half.bin"), b"x").unwrap();
        }
        assert!(
            !a.exists(),
            "an error path (drop) removes the folder and its contents"
        );
        let g = Pending::new(&b);
        std::fs::write(&b, b"done").unwrap();
        g.commit(|| ());
        assert!(b.exists(), "committed output stays");
        let g = Pending::new(&c);
        std::fs::write(&c, b"half").unwrap();
        drop(remove_all());
        assert!(!c.exists(), "the signal path removes what is registered");
        std::mem::forget(g); // a signal's exit runs no destructors
        assert!(!list().iter().any(|p| p.starts_with(dir.path())));
    }
}
