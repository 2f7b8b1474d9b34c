//! The PostgreSQL backend (feature `postgres`, in the default build: `tokio-postgres` is pure
//! Rust): key-value storage with an exact change feed and fenced lease locks in tables of one
//! schema of a PostgreSQL database.
//!
#![doc = include_str!("docs.md")]

mod config;
mod kv;
mod lock;
mod tls;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, NoTls, Transaction};
use tokio_util::sync::CancellationToken;

use crate::caps::{Capabilities, FencingScope};
use crate::error::{Error, ErrorKind, Result};

pub use config::{PostgresConfig, SslMode};

pub(crate) const NAME: &str = "postgres";

/// The largest value stored, in bytes.
pub const MAX_VALUE_SIZE: usize = 16 * 1024 * 1024;

/// The schema version this build creates and reads.
pub const SCHEMA_VERSION: i64 = 1;

/// Maps a driver error to coordkit's kinds.
pub(crate) fn map_err(e: tokio_postgres::Error, what: &str) -> Error {
    let kind = match e.code() {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                || *c == SqlState::INSUFFICIENT_PRIVILEGE =>
        {
            ErrorKind::PermissionDenied
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => ErrorKind::InvalidConfig,
        Some(c)
            if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::TOO_MANY_CONNECTIONS
                || *c == SqlState::READ_ONLY_SQL_TRANSACTION
                || c.code().starts_with("08") =>
        {
            ErrorKind::Unavailable
        }
        Some(c)
            if *c == SqlState::QUERY_CANCELED
                || *c == SqlState::LOCK_NOT_AVAILABLE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE =>
        {
            ErrorKind::Timeout
        }
        Some(c) if *c == SqlState::PROGRAM_LIMIT_EXCEEDED => ErrorKind::ValueTooLarge,
        Some(_) => ErrorKind::Backend,
        None => {
            let shown = e.to_string();
            let cause = std::error::Error::source(&e)
                .map(|c| c.to_string())
                .unwrap_or_default();
            if e.is_closed()
                || [
                    "error communicating",
                    "error connecting",
                    "timeout waiting",
                    "error performing TLS",
                ]
                .iter()
                .any(|p| shown.starts_with(p))
            {
                ErrorKind::Unavailable
            } else if shown.starts_with("authentication error") || cause == "password missing" {
                // The server asked for a password the configuration lacks, or for a method the
                // client refuses.
                ErrorKind::PermissionDenied
            } else if shown.starts_with("invalid configuration") {
                ErrorKind::InvalidConfig
            } else {
                ErrorKind::Backend
            }
        }
    };
    let detail = match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => match std::error::Error::source(&e) {
            Some(c) => format!("{e}: {c}"),
            None => e.to_string(),
        },
    };
    Error::new(kind, NAME, format!("{what}: {detail}"))
}

/// Wakes watches (`kv`) and lock waiters (`lock`): each notification bumps a counter.
pub(crate) struct Wake {
    pub(crate) kv: watch::Sender<u64>,
    pub(crate) lock: watch::Sender<u64>,
    /// Whether the listening connection currently listens (or gave up: see `broken`).
    listening: watch::Sender<bool>,
    /// Bumped by the listener's own probe notification.
    probe: watch::Sender<u64>,
    /// Set when the probe sent after the last `LISTEN` did not come back (a pooler in
    /// transaction mode?).
    broken: AtomicBool,
}

impl Wake {
    fn new() -> Self {
        Wake {
            kv: watch::channel(0).0,
            lock: watch::channel(0).0,
            listening: watch::channel(false).0,
            probe: watch::channel(0).0,
            broken: AtomicBool::new(false),
        }
    }

    fn bump_all(&self) {
        self.kv.send_modify(|n| *n += 1);
        self.lock.send_modify(|n| *n += 1);
    }
}

/// The store's connection while it is up.
struct Live {
    client: Client,
    /// Cancelled when the connection ends.
    closed: CancellationToken,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.driver.abort();
        self.closed.cancel();
    }
}

/// A PostgreSQL-backed [`KvStore`](crate::KvStore) and [`DistLock`](crate::DistLock).
///
/// Each store has one connection for its KV requests (they take turns on it), one for its
/// lock grants, renewals and releases (opened on first use), and, once a watch or a waiting
/// `lock()` needs it and `listen` is on, one that listens for notifications. A connection that ends is opened again by the next request. Cloning gives
/// another handle on the same store.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    cfg: PostgresConfig,
    conn: tokio::sync::Mutex<Option<Live>>,
    /// The connection of lock grants, renewals and releases, opened on first use: a renewal
    /// never waits behind a slow KV request or a watch's read.
    lock_conn: tokio::sync::Mutex<Option<Live>>,
    wake: Arc<Wake>,
    listener_started: AtomicBool,
    /// Cancelled when the store is dropped: ends the listener.
    stop: CancellationToken,
    /// `"schema".`, prefixed to every table name.
    prefix: String,
    /// The TLS connector (`None`: `sslmode=disable`).
    tls: Option<tls::Tls>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("config", &self.inner.cfg)
            .finish()
    }
}

/// Drives a connection to its end, passing notifications to `wake`; cancels `closed` then.
fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    closed: CancellationToken,
    wake: Option<Arc<Wake>>,
) -> tokio::task::JoinHandle<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match futures::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let Some(w) = &wake {
                        if n.payload() == "lock" {
                            w.lock.send_modify(|c| *c += 1);
                        } else if n.payload() == "probe" {
                            w.probe.send_modify(|c| *c += 1);
                        } else {
                            w.kv.send_modify(|c| *c += 1);
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "postgres connection ended");
                    break;
                }
                None => break,
            }
        }
        closed.cancel();
    })
}

/// The TLS connector the configuration asks for (`None`: plain text).
fn tls_for(cfg: &PostgresConfig) -> Result<Option<tls::Tls>> {
    match cfg.sslmode {
        SslMode::Disable => Ok(None),
        SslMode::Prefer | SslMode::Require => tls::Tls::unverified().map(Some),
        SslMode::VerifyFull => tls::Tls::verified(cfg.sslrootcert.as_deref()).map(Some),
    }
}

/// Opens one connection, bounded by the connect timeout.
async fn connect_raw(
    cfg: &PostgresConfig,
    tls: Option<&tls::Tls>,
    wake: Option<Arc<Wake>>,
) -> Result<(Client, CancellationToken, tokio::task::JoinHandle<()>)> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .user(&cfg.user)
        .dbname(&cfg.database)
        .application_name("coordkit")
        .connect_timeout(cfg.connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .ssl_mode(match cfg.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
    if let Some(p) = &cfg.password {
        pg.password(p.as_bytes());
    }
    let what = format!(
        "connecting to {}:{} as {} (database {})",
        cfg.host, cfg.port, cfg.user, cfg.database
    );
    let late = || {
        Error::new(
            ErrorKind::Unavailable,
            NAME,
            format!("{what}: no answer within {:?}", cfg.connect_timeout),
        )
    };
    let closed = CancellationToken::new();
    let (client, driver) = match tls {
        None => {
            let (client, conn) = tokio::time::timeout(cfg.connect_timeout, pg.connect(NoTls))
                .await
                .map_err(|_| late())?
                .map_err(|e| map_err(e, &what))?;
            (client, drive(conn, closed.clone(), wake))
        }
        Some(t) => {
            let (client, conn) = tokio::time::timeout(cfg.connect_timeout, pg.connect(t.clone()))
                .await
                .map_err(|_| late())?
                .map_err(|e| map_err(e, &what))?;
            (client, drive(conn, closed.clone(), wake))
        }
    };
    Ok((client, closed, driver))
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS @.meta (
    name  text PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO @.meta VALUES ('schema', 1), ('revision', 0), ('pruned', 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS @.kv (
    key     text COLLATE \"C\" PRIMARY KEY,
    value   bytea NOT NULL,
    version bigint NOT NULL,
    expires timestamptz
);
CREATE INDEX IF NOT EXISTS kv_expires ON @.kv (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS @.changes (
    rev   bigint PRIMARY KEY,
    key   text COLLATE \"C\" NOT NULL,
    value bytea
);
CREATE TABLE IF NOT EXISTS @.locks (
    name    text COLLATE \"C\" PRIMARY KEY,
    holder  text,
    token   bigint NOT NULL,
    expires timestamptz
);
";

/// A boxed future borrowing the connection.
pub(crate) type ConnFuture<'c, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'c>>;

impl PostgresStore {
    /// Connects, and on first use creates the schema and its tables (under a transaction-level
    /// advisory lock, so that concurrent first opens do not race).
    ///
    /// # Errors
    /// `InvalidConfig` for a bad configuration (including an unreadable `sslrootcert`), a
    /// database that does not exist, or a schema from another version; `PermissionDenied` for
    /// a wrong or missing password or an unknown user, or a role without the rights to create
    /// or use the schema's tables; `Unavailable` when the server cannot be reached within the
    /// connect timeout, or the TLS handshake fails (no TLS on the server under `require`, a
    /// certificate `verify-full` does not trust).
    pub async fn open(cfg: PostgresConfig) -> Result<PostgresStore> {
        crate::config::Configurable::validate(&cfg)?;
        let prefix = format!("{}.", cfg.schema_ident());
        let tls = tls_for(&cfg)?;
        let store = PostgresStore {
            inner: Arc::new(Inner {
                cfg,
                conn: tokio::sync::Mutex::new(None),
                lock_conn: tokio::sync::Mutex::new(None),
                wake: Arc::new(Wake::new()),
                listener_started: AtomicBool::new(false),
                stop: CancellationToken::new(),
                prefix,
                tls,
            }),
        };
        let i = store.inner.clone();
        let version = store
            .inner
            .with_conn("opening the schema", move |c| {
                Box::pin(async move { inner_schema(c, &i).await })
            })
            .await?
            .0;
        if version != SCHEMA_VERSION {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                NAME,
                format!(
                    "schema {}: version {version}, this build reads {SCHEMA_VERSION}",
                    store.inner.cfg.schema
                ),
            ));
        }
        Ok(store)
    }

    /// The configuration.
    pub fn config(&self) -> &PostgresConfig {
        &self.inner.cfg
    }

    /// Whether notifications reach this store: `None` before a watch or a waiting `lock()`
    /// started the listening connection (or with `listen=false`), `Some(false)` when the probe
    /// notification the listener sent itself after its last `LISTEN` did not come back within
    /// 2 s (watches and waiters then depend on their `recheck`), `Some(true)` otherwise.
    ///
    /// # Contract
    /// `Some(true)` says the probe came back once, not that every notification will: behind a
    /// pooler in transaction mode an idle pool may pass the probe and lose later
    /// notifications (set `listen=false` there); the recheck bounds the delay either way.
    pub fn notifications_work(&self) -> Option<bool> {
        if !self.inner.cfg.listen || !self.inner.listener_started.load(Ordering::SeqCst) {
            return None;
        }
        if self.inner.wake.broken.load(Ordering::SeqCst) {
            return Some(false);
        }
        self.inner.wake.listening.borrow().then_some(true)
    }

    pub(crate) fn caps() -> Capabilities {
        let mut caps = Capabilities::new(NAME);
        caps.key_ttl = true;
        caps.min_ttl = Duration::from_millis(1);
        caps.max_ttl = crate::config::duration::MAX;
        // A renewal is one UPDATE; below a second, a commit's latency on a busy server is a
        // real part of the TTL.
        caps.min_lock_ttl = Duration::from_secs(1);
        caps.max_lock_ttl = crate::config::duration::MAX;
        caps.lease_expiry_factor = 1;
        caps.max_value_size = MAX_VALUE_SIZE;
        caps.watch = true;
        // The change log holds every change in commit order.
        caps.watch_coalesces = false;
        // One primary: a read sees every committed write.
        caps.linearizable_reads = true;
        caps.fencing_scope = FencingScope::Cluster;
        caps
    }
}

/// Reads the schema version, creating the schema first when it is missing.
async fn inner_schema(c: &mut Client, inner: &Inner) -> Result<i64> {
    let read = inner.q("SELECT value FROM @.meta WHERE name = 'schema'");
    match c.query_typed_opt(&read, &[]).await {
        Ok(Some(row)) => return Ok(row.get(0)),
        Ok(None) => {}
        Err(e)
            if e.code() == Some(&SqlState::UNDEFINED_TABLE)
                || e.code() == Some(&SqlState::INVALID_SCHEMA_NAME) => {}
        Err(e) => return Err(map_err(e, "reading the schema version")),
    }
    let what = "creating the schema";
    let map = |e| map_err(e, what);
    let schema = inner.cfg.schema.clone();
    let tx = c.transaction().await.map_err(map)?;
    let key = format!("coordkit schema {schema}");
    tx.query_typed(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[(&key, Type::TEXT)],
    )
    .await
    .map_err(map)?;
    let exists = tx
        .query_typed_opt(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1",
            &[(&schema, Type::TEXT)],
        )
        .await
        .map_err(map)?
        .is_some();
    if !exists {
        tx.batch_execute(&format!("CREATE SCHEMA {}", inner.cfg.schema_ident()))
            .await
            .map_err(map)?;
    }
    tx.batch_execute(&inner.q(SCHEMA)).await.map_err(map)?;
    tx.commit().await.map_err(map)?;
    let row = c
        .query_typed_one(&read, &[])
        .await
        .map_err(|e| map_err(e, "reading the schema version"))?;
    Ok(row.get(0))
}

impl Inner {
    /// `sql` with `@.` replaced by the schema prefix.
    pub(crate) fn q(&self, sql: &str) -> String {
        sql.replace("@.", &self.prefix)
    }

    /// Runs `f` on the store's connection (opening it first if it is down), within the request
    /// timeout. Gives what `f` returned and the token cancelled when that connection ends.
    ///
    /// A request that runs past the timeout, or fails because the connection broke, closes the
    /// connection: the server rolls back whatever was in flight, and the next request opens a
    /// new one.
    pub(crate) async fn with_conn<T, F>(&self, what: &str, f: F) -> Result<(T, CancellationToken)>
    where
        F: for<'c> FnOnce(&'c mut Client) -> ConnFuture<'c, T>,
    {
        self.on(&self.conn, what, f).await
    }

    /// [`with_conn`](Self::with_conn) on the locks' connection.
    pub(crate) async fn with_lock_conn<T, F>(
        &self,
        what: &str,
        f: F,
    ) -> Result<(T, CancellationToken)>
    where
        F: for<'c> FnOnce(&'c mut Client) -> ConnFuture<'c, T>,
    {
        self.on(&self.lock_conn, what, f).await
    }

    async fn on<T, F>(
        &self,
        slot: &tokio::sync::Mutex<Option<Live>>,
        what: &str,
        f: F,
    ) -> Result<(T, CancellationToken)>
    where
        F: for<'c> FnOnce(&'c mut Client) -> ConnFuture<'c, T>,
    {
        let timeout = self.cfg.request_timeout;
        let deadline = Instant::now() + timeout;
        let late = || {
            Error::new(
                ErrorKind::Timeout,
                NAME,
                format!("{what}: no answer within {timeout:?}"),
            )
        };
        let mut guard = tokio::time::timeout_at(deadline, slot.lock())
            .await
            .map_err(|_| late())?;
        if !matches!(guard.as_ref(), Some(l) if !l.client.is_closed()) {
            *guard = None;
            let (client, closed, driver) = match tokio::time::timeout_at(
                deadline,
                connect_raw(&self.cfg, self.tls.as_ref(), None),
            )
            .await
            {
                Ok(r) => r?,
                Err(_) => return Err(late()),
            };
            *guard = Some(Live {
                client,
                closed,
                driver,
            });
        }
        let Some(live) = guard.as_mut() else {
            return Err(Error::new(
                ErrorKind::Backend,
                NAME,
                format!("{what}: no connection after connecting"),
            ));
        };
        let closed = live.closed.clone();
        match tokio::time::timeout_at(deadline, f(&mut live.client)).await {
            Ok(Ok(t)) => Ok((t, closed)),
            Ok(Err(e)) => {
                if e.kind() == ErrorKind::Unavailable {
                    *guard = None;
                }
                Err(e)
            }
            Err(_) => {
                *guard = None;
                Err(late())
            }
        }
    }

    /// Runs `f` on the connection, without the connection's end token.
    pub(crate) async fn run<T, F>(&self, what: &str, f: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut Client) -> ConnFuture<'c, T>,
    {
        self.with_conn(what, f).await.map(|(t, _)| t)
    }

    /// The wake counters, starting the listening connection on first use (and waiting, within
    /// the connect timeout, until it listens, so that no notification after this call is
    /// missed).
    pub(crate) async fn wake(&self) -> Arc<Wake> {
        if self.cfg.listen && !self.listener_started.swap(true, Ordering::SeqCst) {
            tokio::spawn(listen_loop(
                self.cfg.clone(),
                self.tls.clone(),
                self.wake.clone(),
                self.stop.clone(),
            ));
        }
        if self.cfg.listen {
            let mut rx = self.wake.listening.subscribe();
            let _ = tokio::time::timeout(self.cfg.connect_timeout, rx.wait_for(|l| *l)).await;
        }
        self.wake.clone()
    }

    /// How long a waiter goes at most without looking.
    pub(crate) fn recheck(&self) -> Duration {
        self.cfg.recheck
    }
}

/// How long the listener waits for its probe notification.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// The listening connection: `LISTEN` on the schema's channel, again after every reconnect
/// (each reconnect wakes everyone, as notifications may have been missed meanwhile).
async fn listen_loop(
    cfg: PostgresConfig,
    tls: Option<tls::Tls>,
    wake: Arc<Wake>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let listen = format!("LISTEN \"{}\"", cfg.channel());
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = connect_raw(&cfg, tls.as_ref(), Some(wake.clone())) => r,
        };
        if let Ok((client, closed, driver)) = r {
            if let Ok(Ok(())) =
                tokio::time::timeout(cfg.request_timeout, client.batch_execute(&listen)).await
            {
                // A notification to itself must come back: behind a pooler in transaction mode
                // the session that listens is handed back to the pool and it never does.
                let mut probe = wake.probe.subscribe();
                probe.borrow_and_update();
                let channel = cfg.channel();
                let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] =
                    [(&channel, Type::TEXT)];
                let sent = client.query_typed("SELECT pg_notify($1, 'probe')", &params);
                let echoed = tokio::time::timeout(cfg.request_timeout.min(PROBE_WAIT), async {
                    sent.await.is_ok() && probe.changed().await.is_ok()
                })
                .await
                .unwrap_or(false);
                if !echoed && !closed.is_cancelled() {
                    tracing::warn!(
                        "postgres: a notification did not come back on the listening connection \
                         (a pooler in transaction mode?); watches and waiters look every {:?} \
                         when none comes",
                        cfg.recheck
                    );
                }
                // Listening goes on either way: a notification that does arrive still wakes.
                wake.broken.store(!echoed, Ordering::SeqCst);
                wake.listening.send_replace(true);
                wake.bump_all();
                backoff = Duration::from_millis(50);
                tokio::select! {
                    _ = stop.cancelled() => {
                        driver.abort();
                        return;
                    }
                    _ = closed.cancelled() => {}
                }
                wake.listening.send_replace(false);
                wake.bump_all();
            }
            driver.abort();
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Takes the store-wide revision counter's row lock: every write transaction does this first,
/// so writes commit one at a time in revision order, and every later statement of the
/// transaction sees every write committed before.
pub(crate) async fn lock_counter(tx: &Transaction<'_>, inner: &Inner) -> Result<()> {
    tx.query_typed(
        &inner.q("SELECT value FROM @.meta WHERE name = 'revision' FOR UPDATE"),
        &[],
    )
    .await
    .map_err(|e| map_err(e, "locking the revision counter"))?;
    Ok(())
}

/// The next store-wide revision (the counter's row is locked by this transaction), pruning the
/// change log now and then.
pub(crate) async fn bump(tx: &Transaction<'_>, inner: &Inner) -> Result<i64> {
    let map = |e| map_err(e, "taking a revision");
    let rev: i64 = tx
        .query_typed_one(
            &inner.q("UPDATE @.meta SET value = value + 1 WHERE name = 'revision' RETURNING value"),
            &[],
        )
        .await
        .map_err(map)?
        .get(0);
    let kept = inner.cfg.changes_kept as i64;
    let step = (kept / 4).clamp(1, 1024);
    if rev % step == 0 && rev > kept {
        let upto = rev - kept;
        tx.query_typed(
            &inner.q("DELETE FROM @.changes WHERE rev <= $1"),
            &[(&upto, Type::INT8)],
        )
        .await
        .map_err(map)?;
        tx.query_typed(
            &inner.q("UPDATE @.meta SET value = GREATEST(value, $1) WHERE name = 'pruned'"),
            &[(&upto, Type::INT8)],
        )
        .await
        .map_err(map)?;
    }
    Ok(rev)
}

/// Records a change for watches (`value` `None`: a delete) and notifies the listeners (at
/// commit).
pub(crate) async fn log_change(
    tx: &Transaction<'_>,
    inner: &Inner,
    rev: i64,
    key: &str,
    value: Option<&[u8]>,
) -> Result<()> {
    let map = |e| map_err(e, "logging a change");
    tx.query_typed(
        &inner.q("INSERT INTO @.changes (rev, key, value) VALUES ($1, $2, $3)"),
        &[
            (&rev, Type::INT8),
            (&key, Type::TEXT),
            (&value, Type::BYTEA),
        ],
    )
    .await
    .map_err(map)?;
    notify(tx, inner, "kv").await
}

/// `NOTIFY` on the schema's channel (delivered when the transaction commits).
pub(crate) async fn notify(tx: &Transaction<'_>, inner: &Inner, what: &str) -> Result<()> {
    let channel = inner.cfg.channel();
    tx.query_typed(
        "SELECT pg_notify($1, $2)",
        &[(&channel, Type::TEXT), (&what, Type::TEXT)],
    )
    .await
    .map_err(|e| map_err(e, "notifying"))?;
    Ok(())
}

/// Deletes the keys whose TTL ran out (in database time), each with a delete in the change log.
pub(crate) async fn reap(tx: &Transaction<'_>, inner: &Inner) -> Result<()> {
    let rows = tx
        .query_typed(
            &inner.q("DELETE FROM @.kv WHERE expires <= clock_timestamp() RETURNING key"),
            &[],
        )
        .await
        .map_err(|e| map_err(e, "deleting expired keys"))?;
    let mut keys: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    keys.sort();
    for key in keys {
        let rev = bump(tx, inner).await?;
        log_change(tx, inner, rev, &key, None).await?;
    }
    Ok(())
}
