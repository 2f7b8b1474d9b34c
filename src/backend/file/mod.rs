//! The shared-directory backend (feature `file`, in the default build): key-value storage and
//! fenced lease locks in a directory that the processes of one host share, with no server.
//!
#![doc = include_str!("docs.md")]

mod codec;
mod config;
mod kv;
mod lock;
mod log;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::caps::{Capabilities, FencingScope};
use crate::error::{Error, ErrorKind, Result};

use super::fs_events::{watch_dir, DirGuard};
pub(crate) use super::host_clock::HostClock;
pub use config::FileConfig;

pub(crate) const NAME: &str = "file";

/// The largest value stored, in bytes.
pub const MAX_VALUE_SIZE: usize = 16 * 1024 * 1024;

/// The layout version this build creates and reads, written in the directory's `coordkit.format`.
pub const FORMAT_VERSION: u32 = 1;

const FORMAT_FILE: &str = "coordkit.format";

fn format_line() -> String {
    format!("coordkit file store, format {FORMAT_VERSION}\n")
}

/// How long a watch or a waiting `lock()` goes at most without looking at the files when no
/// notification came (a safety net for a dropped inotify event; not a poll).
pub(crate) const RECHECK: Duration = Duration::from_secs(2);

/// File systems on which a lock or a rename is not what it is on a local disk, refused by
/// their `statfs` magic number: NFS, SMB/CIFS, 9P, Ceph, AFS, GFS2, OCFS2, Lustre, FUSE.
const REMOTE_FS: &[(u32, &str)] = &[
    (0x6969, "NFS"),
    (0x517b, "SMB"),
    (0xff53_4d42, "CIFS"),
    (0xfe53_4d42, "SMB2"),
    (0x0102_1997, "9P"),
    (0x00c3_6400, "Ceph"),
    (0x5346_414f, "AFS"),
    (0x0116_1970, "GFS2"),
    (0x7461_636f, "OCFS2"),
    (0x0bd0_0bd0, "Lustre"),
    (0x6573_5546, "FUSE"),
];

/// A directory-backed [`KvStore`](crate::KvStore) and [`DistLock`](crate::DistLock).
///
/// Cloning gives another handle on the same store. Every process of the host that opens the
/// same directory sees the same keys and locks.
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("config", &self.inner.cfg)
            .finish()
    }
}

pub(crate) struct Inner {
    cfg: FileConfig,
    clock: HostClock,
    /// This process's position at the end of the change log: writers append through it.
    head: Mutex<log::Cursor>,
    /// The earliest expiry of a key with a TTL that this process knows of (host clock ms).
    next_due: Mutex<Option<i64>>,
    /// The revision up to which this process knows the key files are up to date.
    applied: Mutex<u64>,
    /// The store's directory, canonical (the spelling of the paths that inotify reports).
    root: PathBuf,
    _watched: [DirGuard; 2],
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Maps an I/O error to coordkit's kinds.
pub(crate) fn io_err(e: io::Error, what: impl std::fmt::Display) -> Error {
    let kind = match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            ErrorKind::PermissionDenied
        }
        io::ErrorKind::NotFound => ErrorKind::Unavailable,
        io::ErrorKind::NotADirectory => ErrorKind::InvalidConfig,
        _ => ErrorKind::Backend,
    };
    Error::new(kind, NAME, format!("{what}: {e}"))
}

/// A damaged file of the store.
pub(crate) fn corrupt(path: &Path) -> Error {
    Error::new(
        ErrorKind::Backend,
        NAME,
        format!(
            "{} is damaged (its checksum does not match); it was not written by this backend or was changed by hand",
            path.display()
        ),
    )
}

/// An `flock` on a file of the store, held until dropped.
pub(crate) struct Flock(#[allow(dead_code)] File);

/// Takes an `flock` on `path` (created if missing; never deleted), exclusive or shared, trying
/// again until `timeout`: a holder of the flock stopped inside its (short) critical section
/// gives `Timeout`, not a hang.
pub(crate) fn flock(path: &Path, exclusive: bool, timeout: Duration) -> Result<Flock> {
    let what = || format!("locking {}", path.display());
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| io_err(e, what()))?;
            File::open(path).map_err(|e| io_err(e, what()))?
        }
        Err(e) => return Err(io_err(e, what())),
    };
    let started = std::time::Instant::now();
    let mut pause = Duration::from_micros(50);
    loop {
        let r = if exclusive {
            f.try_lock()
        } else {
            f.try_lock_shared()
        };
        match r {
            Ok(()) => return Ok(Flock(f)),
            Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < timeout => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    NAME,
                    format!(
                        "{}: another process held it for {timeout:?} (lock_timeout)",
                        what()
                    ),
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e, what())),
        }
    }
}

/// Writes `bytes` to `path` atomically and durably: a temporary file in `tmp/`, synced, renamed
/// over `path`, and the directory synced.
pub(crate) fn write_atomic(root: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let what = || format!("writing {}", path.display());
    let tmp = root
        .join("tmp")
        .join(uuid::Uuid::new_v4().simple().to_string());
    let r = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path.parent().unwrap_or(root))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(|e| io_err(e, what()))
}

/// Removes `path` (if present) durably.
pub(crate) fn remove_durably(root: &Path, path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path.parent().unwrap_or(root)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .map_err(|e| io_err(e, format!("removing {}", path.display())))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads a whole file; `None` if it does not exist.
pub(crate) fn read_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(e, format!("reading {}", path.display()))),
    }
}

impl FileStore {
    /// Opens the store in the configured directory, and on first use lays it out: the
    /// directory itself is created if its parent exists.
    ///
    /// # Errors
    /// `InvalidConfig` for a bad configuration, a path that is not a directory, a non-empty
    /// directory that is not a coordkit store, a store of another format version, or a
    /// network file system (the backend is for the processes of one host);
    /// `Unavailable` when the parent directory is missing; `PermissionDenied` when the
    /// directory cannot be written; `Timeout` when another process holds the store's lock past
    /// `lock_timeout`.
    pub async fn open(cfg: FileConfig) -> Result<FileStore> {
        crate::config::Configurable::validate(&cfg)?;
        let c = cfg.clone();
        let (head, next_due) = tokio::task::spawn_blocking(move || setup(&c))
            .await
            .map_err(|e| Error::new(ErrorKind::Backend, NAME, format!("open: {e}")))??;
        let watched = [
            watch_dir(&cfg.dir.join("log"), NAME)?,
            watch_dir(&cfg.dir.join("locks"), NAME)?,
        ];
        let root = watched[0]
            .dir()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| cfg.dir.clone());
        Ok(FileStore {
            inner: Arc::new(Inner {
                cfg,
                clock: HostClock::new(),
                head: Mutex::new(head),
                next_due: Mutex::new(next_due),
                applied: Mutex::new(0),
                root,
                _watched: watched,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FileConfig {
        &self.inner.cfg
    }

    pub(crate) fn caps() -> Capabilities {
        let mut caps = Capabilities::new(NAME);
        caps.key_ttl = true;
        caps.min_ttl = Duration::from_millis(1);
        caps.max_ttl = crate::config::duration::MAX;
        // A grant and every renewal are durable writes in a critical section.
        caps.min_lock_ttl = Duration::from_millis(500);
        caps.max_lock_ttl = crate::config::duration::MAX;
        caps.lease_expiry_factor = 1;
        caps.max_value_size = MAX_VALUE_SIZE;
        caps.watch = true;
        // The change log holds every change in revision order.
        caps.watch_coalesces = false;
        // One directory, one writer at a time, files replaced by rename: a read sees every
        // committed write.
        caps.linearizable_reads = true;
        // Tokens count per lock (the lock's record keeps its last token).
        caps.fencing_scope = FencingScope::PerLock;
        caps
    }
}

/// Lays out (or checks) the directory; returns the writer's log cursor and the earliest TTL
/// expiry.
fn setup(cfg: &FileConfig) -> Result<(log::Cursor, Option<i64>)> {
    let dir = &cfg.dir;
    let what = format!("opening {}", dir.display());
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                NAME,
                format!("{what}: it is not a directory"),
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Err(e) = std::fs::create_dir(dir) {
                if e.kind() != io::ErrorKind::AlreadyExists {
                    return Err(io_err(e, format!("{what}: creating the directory")));
                }
            }
        }
        Err(e) => return Err(io_err(e, what)),
    }
    refuse_remote(dir)?;
    let format = dir.join(FORMAT_FILE);
    match read_opt(&format)? {
        Some(b) if b == format_line().as_bytes() => {}
        Some(b) => {
            let first = String::from_utf8_lossy(&b[..b.len().min(80)])
                .trim()
                .to_string();
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                NAME,
                format!("{what}: {FORMAT_FILE} says {first:?}; this build reads format {FORMAT_VERSION}"),
            ));
        }
        None => {
            let mut entries = std::fs::read_dir(dir).map_err(|e| io_err(e, &what))?;
            if entries.next().is_some() && !dir.join("store.lock").exists() {
                return Err(Error::new(
                    ErrorKind::InvalidConfig,
                    NAME,
                    format!("{what}: the directory is not empty and is not a coordkit store"),
                ));
            }
        }
    }
    // Laid out under the store's lock, so that processes opening a new store at once agree.
    let _l = flock(&dir.join("store.lock"), true, cfg.lock_timeout)?;
    for sub in ["kv", "locks", "log", "tmp", "ttl"] {
        match std::fs::create_dir(dir.join(sub)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(e, format!("{what}: creating {sub}/"))),
        }
    }
    if !format.exists() {
        write_atomic(dir, &format, format_line().as_bytes())?;
    }
    clean_tmp(&dir.join("tmp"));
    let head = log::Cursor::at_end(&dir.join("log"), true).map_err(|e| io_err(e, &what))?;
    let due = kv::ttl_markers(dir)?.iter().map(|m| m.at).min();
    Ok((head, due))
}

/// Removes temporary files left by writers that died more than an hour ago.
fn clean_tmp(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn refuse_remote(dir: &Path) -> Result<()> {
    let st = rustix::fs::statfs(dir).map_err(|e| {
        io_err(
            io::Error::from_raw_os_error(e.raw_os_error()),
            format!("statfs {}", dir.display()),
        )
    })?;
    let magic = (st.f_type as u64 & 0xffff_ffff) as u32;
    if let Some((_, fs)) = REMOTE_FS.iter().find(|(m, _)| *m == magic) {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            NAME,
            format!(
                "{} is on {fs}: the file backend is for the processes of one host on a local file system (its locks and renames are not safe there)",
                dir.display()
            ),
        ));
    }
    Ok(())
}

impl Inner {
    fn path(&self, sub: &str) -> PathBuf {
        self.cfg.dir.join(sub)
    }

    /// Wakes on a change of the file or directory `sub` of the store.
    pub(crate) fn waker(&self, sub: &str) -> Arc<tokio::sync::Notify> {
        super::fs_events::waker(&self.root.join(sub))
    }

    /// Runs `f` on the blocking pool.
    pub(crate) async fn blocking<T, F>(self: &Arc<Self>, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::new(ErrorKind::Backend, NAME, format!("{what}: {e}")))?
    }
}
