//! The ZooKeeper backend (feature `zookeeper`): key-value storage on znodes, Apache Curator
//! compatible locks with czxid fencing tokens.
//!
//! Built on the `zookeeper-client` crate, which reports session expiry (so a lock holder learns
//! that its ephemeral node is gone), supports `multi`, persistent recursive watches, TTL nodes and
//! `sync`.
//!
//! ```no_run
//! # async fn demo() -> coordkit::Result<()> {
//! use coordkit::backend::zookeeper::{ZkConfig, ZkStore};
//! let store = ZkStore::connect(ZkConfig::from_url_str("zk://127.0.0.1:2181/app?session_timeout=10s")?).await?;
//! # Ok(()) }
//! ```
//!
#![doc = include_str!("docs.md")]

mod config;
mod election;
mod error;
mod kv;
mod lock;
mod nodelay;
pub mod path;
mod watch;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use zookeeper_client as zk;

use crate::caps::{Capabilities, FencingScope};
use crate::error::{Error, ErrorKind, Result};

pub use self::config::ZkConfig;
pub use self::error::NAME;

/// ZooKeeper's default `jute.maxbuffer` (1 MiB − 1): the largest packet a server accepts.
pub const JUTE_MAXBUFFER: usize = 0xfffff;

/// The largest value this backend writes: `jute.maxbuffer` minus room for the request header,
/// the path (at most 512 bytes of key plus 512 of chroot, escaped) and the ACL.
pub const MAX_VALUE_SIZE: usize = JUTE_MAXBUFFER - 4 * 1024;

/// A ZooKeeper-backed [`KvStore`](crate::KvStore) and [`DistLock`](crate::DistLock).
///
/// Cloning gives another handle on the same sessions. One main session serves KV calls and
/// watches (re-opened if it expires); each held lock has a session of its own whose timeout is
/// the lock's TTL (sessions are pooled and reused between acquisitions).
#[derive(Clone)]
pub struct ZkStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    cfg: ZkConfig,
    root: String,
    client: Mutex<zk::Client>,
    reconnecting: tokio::sync::Mutex<()>,
    /// Idle lock sessions by requested timeout (ms).
    pool: Mutex<HashMap<u64, Vec<zk::Client>>>,
    /// The latest server-time sample: a write's `mtime` (the leader's wall clock, ms) and when
    /// its answer arrived here. Used to tell expired TTL keys (see `kv.rs`).
    server_clock: Mutex<Option<(i64, std::time::Instant)>>,
}

impl fmt::Debug for ZkStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkStore")
            .field("servers", &self.inner.cfg.servers)
            .field("chroot", &self.inner.cfg.chroot)
            .finish()
    }
}

fn lock_std<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens a session. `detached`: dropping every handle closes the connection without closing the
/// session, which then expires on the server after its timeout (how a lock lapses when its
/// keep-alive is suspended).
pub(crate) async fn open_session(
    cfg: &ZkConfig,
    session_timeout: Duration,
    detached: bool,
) -> Result<zk::Client> {
    let hosts = cfg.hosts();
    // connect_timeout is validated to at most 10 years: the sum cannot overflow.
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
    let mut last: Option<zk::Error> = None;
    loop {
        let mut connector = zk::Client::connector()
            .with_session_timeout(session_timeout)
            .with_fail_eagerly();
        if detached {
            connector = connector.with_detached();
        }
        if let Some(d) = &cfg.digest {
            connector = connector.with_auth("digest", d.as_bytes());
        }
        match tokio::time::timeout_at(deadline, connector.connect(&hosts)).await {
            Ok(Ok(client)) => {
                nodelay::keep(&client, &cfg.servers);
                return Ok(client);
            }
            Ok(Err(e @ (zk::Error::AuthFailed | zk::Error::BadArguments(_)))) => {
                return Err(Error::new(
                    error::kind_of(&e),
                    NAME,
                    format!("cannot open a session with {}: {e}", cfg.servers.join(",")),
                )
                .with_source(e))
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => break,
        }
        // Every server refused or timed out: back off before the next round (no busy loop).
        let pause = tokio::time::Instant::now() + Duration::from_millis(200);
        if pause >= deadline {
            tokio::time::sleep_until(deadline).await;
            break;
        }
        tokio::time::sleep_until(pause).await;
    }
    let why = last.map(|e| format!(": {e}")).unwrap_or_default();
    Err(Error::new(
        ErrorKind::Unavailable,
        NAME,
        format!(
            "no ZooKeeper server of {} answered within {:?}{why}",
            cfg.servers.join(","),
            cfg.connect_timeout
        ),
    ))
}

impl ZkStore {
    /// Connects (opens the main session) and makes sure the chroot exists.
    ///
    /// # Errors
    /// `InvalidConfig` for a bad config; `Unavailable` if no server answers within
    /// `connect_timeout` (it never waits longer, and backs off between attempts);
    /// `PermissionDenied` if the credentials are refused.
    pub async fn connect(cfg: ZkConfig) -> Result<ZkStore> {
        cfg.validate()?;
        let client = open_session(&cfg, cfg.session_timeout, false).await?;
        let root = cfg.chroot.clone();
        let inner = Arc::new(Inner {
            cfg,
            root,
            client: Mutex::new(client),
            reconnecting: tokio::sync::Mutex::new(()),
            pool: Mutex::new(HashMap::new()),
            server_clock: Mutex::new(None),
        });
        let store = ZkStore { inner };
        if !store.inner.root.is_empty() {
            let client = store.inner.client().await?;
            let root = store.inner.root.clone();
            let opts = zk::CreateMode::Persistent.with_acls(store.inner.acls());
            store
                .inner
                .bounded("create chroot", &root, client.mkdir(&root, &opts))
                .await?;
        }
        Ok(store)
    }

    /// Connects to the ensemble named by a `zk://` URL (see [`ZkConfig::from_url_str`]).
    ///
    /// # Errors
    /// As [`ZkConfig::from_url_str`] and [`ZkStore::connect`].
    pub async fn connect_url(url: &url::Url) -> Result<ZkStore> {
        Self::connect(ZkConfig::from_url_str(url.as_str())?).await
    }

    /// The configuration in use.
    pub fn config(&self) -> &ZkConfig {
        &self.inner.cfg
    }
}

impl Inner {
    /// The main session, re-opened if it expired or was closed.
    pub(crate) async fn client(&self) -> Result<zk::Client> {
        let c = lock_std(&self.client).clone();
        if !c.state().is_terminated() {
            return Ok(c);
        }
        let _g = self.reconnecting.lock().await;
        let c = lock_std(&self.client).clone();
        if !c.state().is_terminated() {
            return Ok(c);
        }
        tracing::info!(
            backend = NAME,
            "main session ended ({}); opening a new one",
            c.state()
        );
        let fresh = open_session(&self.cfg, self.cfg.session_timeout, false).await?;
        *lock_std(&self.client) = fresh.clone();
        Ok(fresh)
    }

    pub(crate) fn acls(&self) -> zk::Acls<'static> {
        if self.cfg.digest.is_some() {
            zk::Acls::creator_all()
        } else {
            zk::Acls::anyone_all()
        }
    }

    /// Runs a ZooKeeper call within the request timeout.
    pub(crate) async fn bounded<T>(
        &self,
        what: &str,
        key: &str,
        fut: impl std::future::Future<Output = std::result::Result<T, zk::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.cfg.request_timeout, fut).await {
            Ok(r) => r.map_err(|e| error::map(e, what, key)),
            Err(_) => Err(error::err(
                ErrorKind::Timeout,
                key,
                format!("{what}: no answer within {:?}", self.cfg.request_timeout),
            )),
        }
    }

    /// Creates every missing ancestor of `path` below the root as a container znode (the server
    /// removes empty containers by itself). Safe against concurrent creation and removal.
    pub(crate) async fn ensure_parents(
        &self,
        client: &zk::Client,
        path: &str,
        key: &str,
    ) -> Result<()> {
        let Some(i) = path.rfind('/') else {
            return Ok(());
        };
        let parent = &path[..i];
        if parent.len() <= self.root.len() {
            return Ok(());
        }
        let opts = zk::CreateMode::Container.with_acls(self.acls());
        // Walk down from the first missing ancestor.
        let mut missing = vec![parent];
        while let Some(&dir) = missing.last() {
            match self
                .bounded("create parent", key, client.create(dir, b"", &opts))
                .await
            {
                Ok(_) => {
                    missing.pop();
                }
                Err(e) if matches!(e_zk(&e), Some(zk::Error::NodeExists)) => {
                    missing.pop();
                }
                Err(e) if matches!(e_zk(&e), Some(zk::Error::NoNode)) => {
                    let Some(j) = dir.rfind('/') else {
                        return Err(e);
                    };
                    if j <= self.root.len() || missing.len() > 600 {
                        return Err(e);
                    }
                    missing.push(&dir[..j]);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(NAME);
        caps.key_ttl = true;
        caps.min_ttl = self.cfg.ttl_reap_interval.max(Duration::from_secs(1));
        caps.max_ttl = Duration::from_millis(kv::TTL_MAX_MS).min(crate::config::duration::MAX);
        caps.min_lock_ttl = self.cfg.min_session_timeout;
        // The session timeout is an int of milliseconds.
        caps.max_lock_ttl = Duration::from_millis(i32::MAX as u64);
        // A session expires at most one tick (≤ half the smallest session timeout) after its
        // timeout: at most 1.5 × TTL after the last heartbeat, rounded up.
        caps.lease_expiry_factor = 2;
        caps.max_value_size = MAX_VALUE_SIZE;
        caps.watch = true;
        // Notifications are re-read: writes landing before the re-read merge (see watch.rs).
        caps.watch_coalesces = true;
        caps.linearizable_reads = false;
        caps.fencing_scope = FencingScope::Cluster;
        caps
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the idle lock sessions now rather than letting them expire.
        let pool = std::mem::take(&mut *lock_std(&self.pool));
        for client in pool.into_values().flatten() {
            lock::close_session(&self.cfg, client);
        }
    }
}

/// The ZooKeeper error inside a coordkit error made by [`error::map`], if any.
pub(crate) fn e_zk(e: &Error) -> Option<&zk::Error> {
    std::error::Error::source(e).and_then(|s| s.downcast_ref::<zk::Error>())
}
