//! The SQLite backend (feature `sqlite`, in the default build): key-value storage and fenced
//! lease locks in one database file that the processes of one host share, with no server.
//!
#![doc = include_str!("docs.md")]

mod config;
mod kv;
mod lock;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};

use crate::caps::{Capabilities, FencingScope};
use crate::error::{Error, ErrorKind, Result};

pub(crate) use super::host_clock::HostClock;

pub use config::SqliteConfig;

pub(crate) const NAME: &str = "sqlite";

/// The largest value stored, in bytes.
pub const MAX_VALUE_SIZE: usize = 16 * 1024 * 1024;

/// The schema version this build creates and reads.
pub const SCHEMA_VERSION: i64 = 1;

/// How many changes the change log keeps for watches; a watch further behind gets `WatchGap`.
const CHANGES_KEPT: i64 = 100_000;

/// A SQLite-backed [`KvStore`](crate::KvStore) and [`DistLock`](crate::DistLock).
///
/// Cloning gives another handle on the same connection. Every process that opens the same
/// file sees the same keys and locks.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    conn: Mutex<Connection>,
    cfg: SqliteConfig,
    clock: HostClock,
    /// The database's directory, watched for changes of the `-notify` file.
    watched: super::fs_events::DirGuard,
    /// The `-notify` file, open for [`Inner::signal`] (`None` if it cannot be written).
    notify_file: Option<std::fs::File>,
}

/// The name of the file next to the database that every write touches after its commit.
fn notify_name(db: &std::path::Path) -> std::ffi::OsString {
    let mut n = db.file_name().unwrap_or_default().to_os_string();
    n.push("-notify");
    n
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("config", &self.inner.cfg)
            .finish()
    }
}

/// Maps a SQLite error to coordkit's kinds.
pub(crate) fn map_err(e: rusqlite::Error, what: &str) -> Error {
    let kind = match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => ErrorKind::Timeout,
        Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied) => ErrorKind::PermissionDenied,
        Some(ErrorCode::NotADatabase) => ErrorKind::InvalidConfig,
        Some(ErrorCode::CannotOpen) => ErrorKind::Unavailable,
        Some(ErrorCode::TooBig) => ErrorKind::ValueTooLarge,
        _ => ErrorKind::Backend,
    };
    Error::new(kind, NAME, format!("{what}: {e}"))
}

fn lock_conn(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS coordkit_meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO coordkit_meta VALUES ('schema', 1), ('revision', 0), ('pruned', 0);
CREATE TABLE IF NOT EXISTS coordkit_kv (
    key     TEXT PRIMARY KEY,
    value   BLOB NOT NULL,
    version INTEGER NOT NULL,
    boot    TEXT,
    expires INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS coordkit_kv_expires ON coordkit_kv (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS coordkit_changes (
    rev   INTEGER PRIMARY KEY,
    key   TEXT NOT NULL,
    value BLOB,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS coordkit_locks (
    name    TEXT PRIMARY KEY,
    holder  TEXT,
    token   INTEGER NOT NULL,
    boot    TEXT,
    expires INTEGER
) WITHOUT ROWID;
";

impl SqliteStore {
    /// Opens (and on first use creates) the database: WAL mode, `synchronous = FULL` (a grant
    /// or write is on disk before it is reported), the busy timeout, the schema.
    ///
    /// # Errors
    /// `InvalidConfig` for a bad configuration, a file that is not a SQLite database, or a
    /// schema from a newer version; `Unavailable` when the file cannot be opened or created
    /// (missing directory, a directory at the path); `PermissionDenied` when it is read-only;
    /// `Timeout` when another process holds a write transaction past the busy timeout.
    pub async fn open(cfg: SqliteConfig) -> Result<SqliteStore> {
        crate::config::Configurable::validate(&cfg)?;
        let c = cfg.clone();
        let conn = tokio::task::spawn_blocking(move || open_conn(&c))
            .await
            .map_err(|e| Error::new(ErrorKind::Backend, NAME, format!("open: {e}")))??;
        let parent = cfg.path.parent().unwrap_or(std::path::Path::new("/"));
        let watched = super::fs_events::watch_dir(parent, NAME)?;
        let notify_file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(parent.join(notify_name(&cfg.path)))
            .ok();
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                cfg,
                clock: HostClock::new(),
                watched,
                notify_file,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SqliteConfig {
        &self.inner.cfg
    }

    pub(crate) fn caps() -> Capabilities {
        let mut caps = Capabilities::new(NAME);
        caps.key_ttl = true;
        caps.min_ttl = Duration::from_millis(1);
        caps.max_ttl = crate::config::duration::MAX;
        // Every renewal is a durable write transaction; shorter leases would mostly renew.
        caps.min_lock_ttl = Duration::from_millis(500);
        caps.max_lock_ttl = crate::config::duration::MAX;
        caps.lease_expiry_factor = 1;
        caps.max_value_size = MAX_VALUE_SIZE;
        caps.watch = true;
        // The change log holds every change in revision order.
        caps.watch_coalesces = false;
        // One database, one writer at a time: a read sees every committed write.
        caps.linearizable_reads = true;
        caps.fencing_scope = FencingScope::Cluster;
        caps
    }
}

/// Opens and sets up the connection, again while another process holds the locks that the
/// setup needs (switching to WAL, creating the schema), up to the busy timeout.
fn open_conn(cfg: &SqliteConfig) -> Result<Connection> {
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match try_open(cfg) {
            Err(e) if e.kind() == ErrorKind::Timeout && started.elapsed() < cfg.busy_timeout => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn try_open(cfg: &SqliteConfig) -> Result<Connection> {
    let what = format!("opening {}", cfg.path.display());
    if cfg.path.is_dir() {
        return Err(Error::new(
            ErrorKind::Unavailable,
            NAME,
            format!("{what}: it is a directory"),
        ));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(&cfg.path, flags).map_err(|e| map_err(e, &what))?;
    conn.busy_timeout(cfg.busy_timeout)
        .map_err(|e| map_err(e, &what))?;
    let mut mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(|e| map_err(e, &what))?;
    if !mode.eq_ignore_ascii_case("wal") {
        mode = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| map_err(e, &what))?;
    }
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::new(
            ErrorKind::Unavailable,
            NAME,
            format!("{what}: the database would not switch to WAL mode (got {mode})"),
        ));
    }
    conn.execute_batch("PRAGMA synchronous = FULL;")
        .map_err(|e| map_err(e, &what))?;
    conn.execute_batch(&format!("BEGIN IMMEDIATE;{SCHEMA}COMMIT;"))
        .map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK;");
            map_err(e, &what)
        })?;
    let schema: i64 = conn
        .query_row(
            "SELECT value FROM coordkit_meta WHERE name = 'schema'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| map_err(e, &what))?;
    if schema != SCHEMA_VERSION {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            NAME,
            format!("{what}: schema version {schema}, this build reads {SCHEMA_VERSION}"),
        ));
    }
    Ok(conn)
}

impl Inner {
    /// What wakes the tasks waiting for another write: a change of the database's `-notify`
    /// file, which every write touches after its commit. Take a `notified()` of it and
    /// `enable()` it before looking at the database, then [`Inner::wait_for_change`].
    pub(crate) fn changes(&self) -> Arc<tokio::sync::Notify> {
        super::fs_events::waker(&self.watched.dir().join(notify_name(&self.cfg.path)))
    }

    /// Waits until `changed` fires (a write committed since it was enabled), `poll_interval`
    /// passes (a safety net for a missed notification: the caller looks again), or `until` (an
    /// expiry in host clock milliseconds) comes.
    pub(crate) async fn wait_for_change(
        &self,
        changed: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
        until: Option<i64>,
    ) {
        let mut left = self.cfg.poll_interval;
        if let Some(at) = until {
            left = left.min(Duration::from_millis(
                (at - self.clock.now_ms()).max(0) as u64
            ));
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(left) => {}
        }
    }

    /// Tells the other processes' waiters that a write committed: sets the modification time
    /// of the `-notify` file (inotify reports it). Size and modification time of the database
    /// files cannot serve: a commit becomes visible after its last write to the write-ahead
    /// log (when the shared-memory index is updated, which inotify does not see).
    fn signal(&self) {
        if let Some(f) = &self.notify_file {
            let now = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_NOW,
                },
            };
            let _ = rustix::fs::futimens(f, &now);
        }
    }

    /// Runs `f` on the connection on the blocking pool.
    pub(crate) async fn run<T, F>(self: &Arc<Self>, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &HostClock) -> Result<T> + Send + 'static,
    {
        let inner = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = lock_conn(&inner.conn);
            f(&mut conn, &inner.clock)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Backend, NAME, format!("{what}: {e}")))?
    }

    /// Runs `f` in a write transaction (`BEGIN IMMEDIATE`), after reaping expired keys.
    pub(crate) async fn write<T, F>(self: &Arc<Self>, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>, &HostClock) -> Result<T> + Send + 'static,
    {
        let (out, changed) = self
            .run(what, move |conn, clock| {
                let before = conn.total_changes();
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(|e| map_err(e, what))?;
                reap(&tx, clock).map_err(|e| map_err(e, what))?;
                let out = f(&tx, clock)?;
                tx.commit().map_err(|e| map_err(e, what))?;
                Ok((out, conn.total_changes() != before))
            })
            .await?;
        // A transaction that changed nothing (a lock attempt that found the lock held) wakes
        // nobody: the waiters would look and find nothing new, again and again.
        if changed {
            self.signal();
        }
        Ok(out)
    }
}

/// The next store-wide revision.
pub(crate) fn bump(tx: &Transaction<'_>) -> rusqlite::Result<i64> {
    let rev: i64 = tx.query_row(
        "UPDATE coordkit_meta SET value = value + 1 WHERE name = 'revision' RETURNING value",
        [],
        |r| r.get(0),
    )?;
    if rev % 1024 == 0 && rev > CHANGES_KEPT {
        let upto = rev - CHANGES_KEPT;
        tx.execute("DELETE FROM coordkit_changes WHERE rev <= ?1", [upto])?;
        tx.execute(
            "UPDATE coordkit_meta SET value = ?1 WHERE name = 'pruned'",
            [upto],
        )?;
    }
    Ok(rev)
}

/// Records a change for watches (`value` `None`: a delete).
pub(crate) fn log_change(
    tx: &Transaction<'_>,
    rev: i64,
    key: &str,
    value: Option<&[u8]>,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO coordkit_changes (rev, key, value, version) VALUES (?1, ?2, ?3, ?1)",
        rusqlite::params![rev, key, value],
    )?;
    Ok(())
}

/// Deletes the keys whose TTL ran out, each with a delete in the change log.
pub(crate) fn reap(tx: &Transaction<'_>, clock: &HostClock) -> rusqlite::Result<()> {
    let now = clock.now_ms();
    let expired: Vec<String> = {
        let mut st = tx.prepare_cached(
            "SELECT key FROM coordkit_kv WHERE expires IS NOT NULL AND (expires <= ?1 OR boot IS NOT ?2)",
        )?;
        let rows = st.query_map(rusqlite::params![now, clock.boot], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for key in expired {
        tx.execute("DELETE FROM coordkit_kv WHERE key = ?1", [&key])?;
        let rev = bump(tx)?;
        log_change(tx, rev, &key, None)?;
    }
    Ok(())
}

/// The current store-wide revision.
pub(crate) fn revision(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT value FROM coordkit_meta WHERE name = 'revision'",
        [],
        |r| r.get(0),
    )
}
