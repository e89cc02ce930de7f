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
    /// Registers `path` (a file or a folder that exists, or one this process names uniquely
    /// and makes next, then calls [`Pending::made`]). A path made by someone's `make` is
    /// better registered by [`Pending::create`].
    pub fn new(path: &Path) -> Pending {
        list().push(path.to_path_buf());
        Pending {
            path: path.to_path_buf(),
            armed: true,
        }
    }

    /// Runs `make` (which creates `path`) and registers the path, both under the registry's
    /// lock, and returns what `make` returned with the guard. A signal's cleanup then runs
    /// either before both (nothing made; this thread waits on the lock until the process
    /// exits) or after both (the path is removed): a temporary made first and registered
    /// after, or registered first and made after, could be made in between and outlive the
    /// cleanup. On an error nothing is registered (the path may not be ours: a name taken).
    pub fn create<T>(
        path: &Path,
        make: impl FnOnce(&Path) -> std::io::Result<T>,
    ) -> std::io::Result<(T, Pending)> {
        let mut l = list();
        let made = make(path)?;
        l.push(path.to_path_buf());
        drop(l);
        let guard = Pending {
            path: path.to_path_buf(),
            armed: true,
        };
        Ok((made, guard.made()))
    }

    /// A new temporary file in `dir`, named as `builder` says (prefix, random part, suffix),
    /// made and registered by [`Pending::create`]. Unix gives it mode 0o666 less the umask,
    /// the mode of the finished file it becomes (a temporary file's own is 0o600).
    pub fn temp_file_in(
        builder: &tempfile::Builder,
        dir: &Path,
    ) -> std::io::Result<(tempfile::NamedTempFile, Pending)> {
        let mut guard = None;
        let file = builder.make_in(dir, |path| {
            let (file, g) = Pending::create(path, |path| {
                let mut options = std::fs::OpenOptions::new();
                options.read(true).write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    options.mode(0o666);
                }
                options.open(path)
            })?;
            guard = Some(g);
            Ok(file)
        })?;
        let guard = guard.ok_or_else(|| std::io::Error::other("temporary file not made"))?;
        Ok((file, guard))
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

    /// A temporary made through `create` is registered by the time anything can see it, and a
    /// failed `make` (a name already taken) registers nothing and removes nothing.
    #[test]
    fn created_paths_are_registered_and_a_failed_make_leaves_the_path_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, guard) = Pending::temp_file_in(
            tempfile::Builder::new().prefix(".out.").suffix(".tmp"),
            dir.path(),
        )
        .unwrap();
        assert!(tmp.path().exists());
        assert!(list().iter().any(|p| p == tmp.path()), "registered");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let plain = dir.path().join("plain");
            std::fs::write(&plain, b"").unwrap();
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(
                mode(tmp.path()),
                mode(&plain),
                "a plain file's mode (umask applied)"
            );
        }
        drop(guard);
        assert!(!tmp.path().exists(), "the guard removes it");

        let taken = dir.path().join("taken");
        std::fs::write(&taken, b"someone's").unwrap();
        let made = Pending::create(&taken, |p| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p)
        });
        assert!(made.is_err());
        assert!(!list().contains(&taken), "nothing registered");
        assert_eq!(std::fs::read(&taken).unwrap(), b"someone's");
    }
}
