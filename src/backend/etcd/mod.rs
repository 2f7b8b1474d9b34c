//! The etcd v3 backend (feature `etcd`), on the `etcd-client` crate.
//!
#![doc = include_str!("docs.md")]

mod config;
mod election;
mod error;
mod kv;
mod lock;
mod lockwatch;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, KvClient, LeaseClient, WatchClient};
use tokio_util::sync::CancellationToken;

pub use config::EtcdConfig;

use crate::caps::{Capabilities, FencingScope};
use crate::error::{Error, ErrorKind, Result};

pub(crate) const NAME: &str = "etcd";

/// Pause before trying a request again whose endpoint could not be connected to.
const RETRY_PAUSE: Duration = Duration::from_millis(25);

/// etcd's default `--max-request-bytes`: 1.5 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024 + 512 * 1024;

/// Room kept in every request for the key (twice in a compare-and-swap), the namespace and
/// the protobuf framing, so that any value up to [`EtcdStore::max_value_size`] fits.
pub const REQUEST_OVERHEAD: usize = 4096;

/// The smallest key and lock TTL coordkit accepts on etcd: 2 s, the lease minimum of an etcd
/// with default settings (`ceil(1.5 × election timeout)`, election timeout 1000 ms).
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// A client of an etcd v3 cluster: key-value storage and locks.
///
/// Cloning gives another handle on the same connection, leases and local lock queues.
/// See the [module docs](self) for the semantics.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) kv: KvClient,
    pub(crate) watch: WatchClient,
    pub(crate) lease: LeaseClient,
    pub(crate) config: EtcdConfig,
    /// `<namespace>kv/`
    pub(crate) kv_prefix: String,
    /// `<namespace>locks/`
    pub(crate) lock_prefix: String,
    /// `<namespace>elections/`
    pub(crate) election_prefix: String,
    /// One lease per distinct lock TTL (whole seconds), granted lazily.
    pub(crate) sessions: tokio::sync::Mutex<HashMap<i64, Arc<lock::Session>>>,
    /// Per lock name, a FIFO queue of this client's contenders (they share the lease, so
    /// they would share the own key).
    pub(crate) local: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per lock (or election) directory, the long-lived watch its attempts and held locks
    /// share.
    pub(crate) lock_watches: lockwatch::LockWatches,
    /// Cancelled when the last handle is dropped: keep-alive tasks revoke their leases and end.
    pub(crate) shutdown: CancellationToken,
    /// The runtime the store was connected on: background cleanups run there, also when they
    /// are started from a thread without a runtime.
    pub(crate) rt: tokio::runtime::Handle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl EtcdStore {
    /// Connects to the cluster described by `config` and checks that it answers.
    ///
    /// # Errors
    /// `InvalidConfig` for a bad configuration (no endpoints, unreadable TLS files, a malformed
    /// namespace); `Unavailable` or `Timeout` (within the connect timeout plus the request
    /// timeout) when no endpoint answers; `PermissionDenied` for rejected credentials.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        config.validate()?;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            opts = opts.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = config.tls_options()? {
            opts = opts.with_tls(tls);
        }
        let endpoints = config.endpoints.clone();
        let bound = config.connect_timeout + config.request_timeout;
        let client = match tokio::time::timeout(bound, Client::connect(endpoints, Some(opts))).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(error::map(e, "connecting")),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    NAME,
                    format!(
                        "no answer from {} within {bound:?} while connecting",
                        config.endpoints.join(",")
                    ),
                ))
            }
        };
        let kv = client.kv_client().max_decoding_message_size(usize::MAX);
        let watch = client.watch_client().max_decoding_message_size(usize::MAX);
        let lease = client.lease_client();
        let inner = Inner {
            kv,
            watch,
            lease,
            kv_prefix: format!("{}kv/", config.namespace),
            lock_prefix: format!("{}locks/", config.namespace),
            election_prefix: format!("{}elections/", config.namespace),
            config,
            sessions: tokio::sync::Mutex::new(HashMap::new()),
            local: Mutex::new(HashMap::new()),
            lock_watches: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            rt: tokio::runtime::Handle::current(),
        };
        let store = EtcdStore {
            inner: Arc::new(inner),
        };
        // Fail fast on an unreachable cluster or bad credentials.
        let inner = &store.inner;
        inner
            .call("connecting", None, || {
                let (mut kv, key) = (inner.kv.clone(), inner.kv_prefix.clone());
                async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
            })
            .await?;
        Ok(store)
    }

    /// Connects from an `etcd://` URL (see [`EtcdConfig::from_url`]).
    ///
    /// # Errors
    /// As [`EtcdConfig::from_url`] and [`EtcdStore::connect`].
    pub async fn connect_url(url: &url::Url) -> Result<Self> {
        Self::connect(EtcdConfig::from_url(url)?).await
    }

    /// Connects from an `etcd://` URL string; unlike [`connect_url`](Self::connect_url) it
    /// accepts several `host:port` pairs separated by commas.
    ///
    /// # Errors
    /// As [`EtcdConfig::from_url_str`] and [`EtcdStore::connect`].
    pub async fn connect_str(url: &str) -> Result<Self> {
        Self::connect(EtcdConfig::from_url_str(url)?).await
    }

    /// The configuration this store was connected with.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// The largest value accepted: the configured request limit less
    /// [`REQUEST_OVERHEAD`].
    pub fn max_value_size(&self) -> usize {
        self.inner.max_value_size()
    }

    pub(crate) fn caps(&self) -> Capabilities {
        let mut c = Capabilities::new(NAME);
        c.key_ttl = true;
        c.min_ttl = MIN_TTL;
        c.max_ttl = crate::config::duration::MAX;
        c.min_lock_ttl = MIN_TTL;
        c.max_lock_ttl = crate::config::duration::MAX;
        c.lease_expiry_factor = 1;
        c.max_value_size = self.inner.max_value_size();
        c.watch = true;
        // Revision-ordered events, each change once; a compacted resume point is a WatchGap.
        c.watch_coalesces = false;
        c.linearizable_reads = true;
        c.fencing_scope = FencingScope::Cluster;
        c
    }
}

impl Inner {
    pub(crate) fn max_value_size(&self) -> usize {
        self.config
            .max_request_bytes
            .saturating_sub(REQUEST_OVERHEAD)
    }

    /// Runs one etcd call bounded by the request timeout, mapping its error. `make` builds the
    /// request; it is made again (within the same bound) when the first attempt provably never
    /// reached a server (no connection to the endpoint the client picked, for example a member
    /// that is down), so that the client's other endpoints get their turn.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        what: &str,
        key: Option<&str>,
        mut make: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let timeout = self.config.request_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let r = loop {
            match tokio::time::timeout_at(deadline, make()).await {
                Ok(Ok(v)) => break Ok(v),
                Ok(Err(e))
                    if error::never_sent(&e)
                        && tokio::time::Instant::now() + RETRY_PAUSE * 2 < deadline =>
                {
                    tracing::debug!(what, error = %e, "endpoint unreachable; trying again");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Ok(Err(e)) => break Err(error::map(e, what)),
                Err(_) => {
                    break Err(Error::new(
                        ErrorKind::Timeout,
                        NAME,
                        format!("{what}: no answer within the request timeout of {timeout:?}"),
                    ))
                }
            }
        };
        match (r, key) {
            (Err(e), Some(k)) => Err(e.with_key(k)),
            (r, _) => r,
        }
    }
}

/// Rounds a TTL up to whole seconds (etcd leases count in seconds); the caller checked it
/// against the capabilities' bounds (below `MIN_TTL` etcd would silently raise it).
pub(crate) fn ttl_secs(ttl: Duration, what: &str, key: &str) -> Result<i64> {
    let secs = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0));
    i64::try_from(secs).map_err(|_| {
        Error::new(
            ErrorKind::InvalidArgument,
            NAME,
            format!("{what} TTL {ttl:?} is too large"),
        )
        .with_key(key)
    })
}

/// Grants a lease of `secs` seconds and checks that the server granted exactly that (a server
/// with a larger minimum raises short TTLs silently; coordkit reports it instead).
pub(crate) async fn grant_lease(inner: &Inner, secs: i64, key: &str) -> Result<i64> {
    let resp = inner
        .call("granting a lease", Some(key), || {
            let mut lease = inner.lease.clone();
            async move { lease.grant(secs, None).await }
        })
        .await?;
    if !resp.error().is_empty() {
        return Err(Error::new(
            ErrorKind::Backend,
            NAME,
            format!("granting a lease: {}", resp.error()),
        )
        .with_key(key));
    }
    if resp.ttl() != secs {
        let id = resp.id();
        let _ = inner
            .call("revoking a lease", None, || {
                let mut lease = inner.lease.clone();
                async move { lease.revoke(id).await }
            })
            .await;
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            NAME,
            format!(
                "asked for a {secs} s lease, the server granted {} s: its lease minimum is \
                 higher than the requested TTL",
                resp.ttl()
            ),
        )
        .with_key(key));
    }
    Ok(resp.id())
}
