//! File-system change notifications for the embedded backends (`sqlite://`, `file://`): one
//! `notify` watcher (inotify on Linux) per process, shared by every store, watching the
//! directories the stores asked for, and a [`Notify`] per path that wakes the tasks waiting for
//! a change of that path or of a file inside it.
//!
//! A notification is a hint, never the only way a change is seen: a waiter also looks again
//! after a timeout of its own (inotify drops events when its queue overflows; then every
//! waiter is woken).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::Watcher;
use tokio::sync::Notify;

use crate::error::{Error, ErrorKind, Result};

struct Shared {
    watcher: Option<notify::RecommendedWatcher>,
    /// How many guards hold each watched directory.
    dirs: HashMap<PathBuf, usize>,
}

#[derive(Default)]
struct Wakers(Mutex<HashMap<PathBuf, Arc<Notify>>>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn wakers() -> &'static Wakers {
    static W: OnceLock<Wakers> = OnceLock::new();
    W.get_or_init(Wakers::default)
}

fn shared() -> &'static Mutex<Shared> {
    static S: OnceLock<Mutex<Shared>> = OnceLock::new();
    S.get_or_init(|| {
        Mutex::new(Shared {
            watcher: None,
            dirs: HashMap::new(),
        })
    })
}

impl Wakers {
    fn wake(&self, path: &Path) {
        if let Some(n) = lock(&self.0).get(path) {
            n.notify_waiters();
        }
    }

    fn wake_all(&self) {
        for n in lock(&self.0).values() {
            n.notify_waiters();
        }
    }
}

fn on_event(ev: notify::Result<notify::Event>) {
    let w = wakers();
    let Ok(ev) = ev else {
        return w.wake_all();
    };
    if ev.need_rescan() {
        return w.wake_all();
    }
    // Opening or reading a file changes nothing; waking on it would have every waiter wake
    // itself with its own next look.
    match ev.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return,
        _ => {}
    }
    for p in &ev.paths {
        w.wake(p);
        if let Some(parent) = p.parent() {
            w.wake(parent);
        }
    }
}

/// The task-side handle for changes of `path` (a file, or a watched directory for a change of
/// any file in it). `path` must be spelled as the watched directory was (canonical).
pub(crate) fn waker(path: &Path) -> Arc<Notify> {
    lock(&wakers().0)
        .entry(path.to_path_buf())
        .or_default()
        .clone()
}

/// Keeps a directory watched; the last guard of a directory stops its watch.
#[derive(Debug)]
pub(crate) struct DirGuard {
    dir: PathBuf,
}

impl DirGuard {
    /// The watched directory, canonical: the spelling of the paths to pass to [`waker`].
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Watches `dir` (not its subdirectories) for changes until the guard is dropped.
///
/// # Errors
/// `Backend` (for `backend`) when the directory cannot be watched, for example when the
/// process has used up its inotify watches.
pub(crate) fn watch_dir(dir: &Path, backend: &'static str) -> Result<DirGuard> {
    let dir = std::fs::canonicalize(dir).map_err(|e| {
        Error::new(
            ErrorKind::Backend,
            backend,
            format!("watching {} for changes: {e}", dir.display()),
        )
    })?;
    let failed = |e: notify::Error| {
        Error::new(
            ErrorKind::Backend,
            backend,
            format!("watching {} for changes: {e}", dir.display()),
        )
    };
    let mut s = lock(shared());
    if let Some(n) = s.dirs.get_mut(&dir) {
        *n += 1;
        return Ok(DirGuard { dir });
    }
    if s.watcher.is_none() {
        s.watcher = Some(notify::recommended_watcher(on_event).map_err(failed)?);
    }
    if let Some(w) = s.watcher.as_mut() {
        w.watch(&dir, notify::RecursiveMode::NonRecursive)
            .map_err(failed)?;
    }
    s.dirs.insert(dir.clone(), 1);
    Ok(DirGuard { dir })
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        let mut s = lock(shared());
        let last = match s.dirs.get_mut(&self.dir) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => true,
            None => false,
        };
        if last {
            s.dirs.remove(&self.dir);
            if let Some(w) = s.watcher.as_mut() {
                let _ = w.unwatch(&self.dir);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_change_wakes_the_file_and_its_directory_but_a_read_does_not() {
        let d = tempfile::tempdir().unwrap();
        let g = watch_dir(d.path(), "test").unwrap();
        let g2 = watch_dir(d.path(), "test").unwrap();
        drop(g2);
        let file = g.dir().join("f");
        std::fs::write(&file, b"1").unwrap();
        let (on_file, on_dir) = (waker(&file), waker(g.dir()));
        let wait = |n: Arc<Notify>| async move {
            tokio::time::timeout(Duration::from_secs(2), n.notified())
                .await
                .is_ok()
        };
        let (a, b) = (wait(on_file.clone()), wait(on_dir.clone()));
        let writer = tokio::spawn({
            let file = file.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                std::fs::write(&file, b"2").unwrap();
            }
        });
        let (a, b) = tokio::join!(a, b);
        writer.await.unwrap();
        assert!(a && b, "woken: file {a}, directory {b}");
        // Reads only: no wake (after the write's last events have come).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let quiet = wait(on_file.clone());
        let reader = tokio::spawn({
            let file = file.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                for _ in 0..5 {
                    std::fs::read(&file).unwrap();
                }
            }
        });
        assert!(!quiet.await, "a read woke the waiter");
        reader.await.unwrap();
    }
}
