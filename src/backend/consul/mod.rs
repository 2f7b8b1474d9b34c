//! The Consul backend: key-value storage over `/v1/kv` and `/v1/txn`, locks over sessions,
//! fenced by the ModifyIndex of the acquiring write.
//!
#![doc = include_str!("docs.md")]

mod client;
mod config;
mod kv;
mod lock;

use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::caps::{Capabilities, FencingScope};
use crate::error::{Error, ErrorKind, Result};

use client::Client;
pub use config::ConsulConfig;
pub use lock::LOCK_FLAG_VALUE;

pub(crate) const NAME: &str = "consul";

/// The largest value Consul accepts by default (`kv_max_value_size`, 512 KiB).
pub const MAX_VALUE_SIZE: usize = 524_288;
/// The shortest session TTL Consul accepts, and so the shortest lock TTL.
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(10);
/// The longest session TTL Consul accepts.
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(86_400);

/// A Consul client: [`KvStore`](crate::KvStore) and [`DistLock`](crate::DistLock).
/// Cloning gives another handle on the same connection pool.
#[derive(Clone)]
pub struct ConsulStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    cfg: ConsulConfig,
    kv_prefix: String,
    lock_prefix: String,
    /// The lock sessions, one per TTL.
    sessions: lock::Sessions,
    /// This client's queue for each lock key it holds or waits for.
    local: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The last handle is gone, and so is every lock (a guard keeps its store): the sessions kept
/// for the next locks are destroyed.
impl Drop for Inner {
    fn drop(&mut self) {
        self.sessions.shutdown();
    }
}

impl std::fmt::Debug for ConsulStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulStore")
            .field("config", &self.inner.cfg)
            .finish()
    }
}

impl ConsulStore {
    /// Connects, checking that the server answers (`/v1/status/leader`) and has a leader.
    ///
    /// # Errors
    /// `InvalidConfig` for a bad config; `Unavailable` or `Timeout` (within the configured
    /// timeouts) when the server cannot be reached or has no leader; `PermissionDenied` for a
    /// refused token.
    pub async fn connect(config: ConsulConfig) -> Result<ConsulStore> {
        let prefix = config.normalized_prefix()?;
        let client = Client::new(&config)?;
        let a = client
            .send(
                reqwest::Method::GET,
                "/v1/status/leader",
                &[],
                None,
                Duration::ZERO,
                "",
            )
            .await?;
        let leader = String::from_utf8_lossy(&a.body).trim().to_string();
        if !a.status.is_success() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                NAME,
                format!("{} answered {} to a status check", config.address, a.status),
            ));
        }
        if leader == "\"\"" || leader.is_empty() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                NAME,
                format!("{} reports no cluster leader", config.address),
            ));
        }
        Ok(ConsulStore {
            inner: Arc::new(Inner {
                client,
                kv_prefix: format!("{prefix}kv/"),
                lock_prefix: format!("{prefix}locks/"),
                sessions: lock::Sessions::default(),
                local: std::sync::Mutex::default(),
                cfg: config,
            }),
        })
    }

    /// Connects to the server named by a `consul://` or `consul+https://` URL (see
    /// [`ConsulConfig::from_url`]).
    ///
    /// # Errors
    /// As [`ConsulConfig::from_url`] and [`ConsulStore::connect`].
    pub async fn connect_url(url: &Url) -> Result<ConsulStore> {
        Self::connect(ConsulConfig::from_url(url)?).await
    }

    /// The configuration (its `Debug` hides the token).
    pub fn config(&self) -> &ConsulConfig {
        &self.inner.cfg
    }

    pub(crate) fn caps() -> Capabilities {
        let mut caps = Capabilities::new(NAME);
        // Consul has no key TTL; coordkit does not emulate one (see the backend docs).
        caps.key_ttl = false;
        caps.min_ttl = MIN_SESSION_TTL;
        caps.max_ttl = MAX_SESSION_TTL;
        caps.min_lock_ttl = MIN_SESSION_TTL;
        caps.max_lock_ttl = MAX_SESSION_TTL;
        // Liveness only (others' wait): today's servers invalidate within 2 × TTL of the last
        // renew, which Consul does not promise; the lost signal fires at the lease deadline.
        caps.lease_expiry_factor = 2;
        caps.max_value_size = MAX_VALUE_SIZE;
        caps.watch = true;
        // Blocking queries see states, not changes: writes between two answers merge.
        caps.watch_coalesces = true;
        caps.linearizable_reads = true;
        caps.fencing_scope = FencingScope::Cluster;
        caps
    }
}
