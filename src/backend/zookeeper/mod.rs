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

mod error;
mod kv;
mod lock;
pub mod path;
mod watch;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use zookeeper_client as zk;

use crate::caps::{Capabilities, FencingScope};
use crate::error::{Error, ErrorKind, Result};

pub use self::error::NAME;

/// ZooKeeper's default `jute.maxbuffer` (1 MiB − 1): the largest packet a server accepts.
pub const JUTE_MAXBUFFER: usize = 0xfffff;

/// The largest value this backend writes: `jute.maxbuffer` minus room for the request header,
/// the path (at most 512 bytes of key plus 512 of chroot, escaped) and the ACL.
pub const MAX_VALUE_SIZE: usize = JUTE_MAXBUFFER - 4 * 1024;

/// How to reach a ZooKeeper ensemble. Deserializable (durations as `"10s"`, `"500ms"`, `"2m"` or
/// a number of milliseconds); `Debug` hides the digest credentials.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZkConfig {
    /// `host:port` of each server (port defaults to 2181).
    pub servers: Vec<String>,
    /// The chroot every path lives under (`""` or `/app`); created if missing. Keys live under
    /// `<chroot>/kv/`, locks under `<chroot>/locks/`.
    pub chroot: String,
    /// The session timeout requested for the store's main session (watches, KV). Default 10 s.
    #[serde(deserialize_with = "de_duration")]
    pub session_timeout: Duration,
    /// How long [`ZkStore::connect`] (and each new lock session) may take before it gives up with
    /// `Unavailable`. Default 5 s.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// The bound on every other call; past it the call fails with `Timeout`. Default 10 s.
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    /// The server's `minSessionTimeout` (2 × `tickTime`, 4 s with ZooKeeper's defaults): the
    /// smallest lock TTL accepted, since a lock's TTL is its session timeout.
    #[serde(deserialize_with = "de_duration")]
    pub min_session_timeout: Duration,
    /// How often the server reaps expired TTL nodes (`znode.container.checkIntervalMs`, 60 s by
    /// default): a key with a TTL disappears between TTL and TTL + this interval after its last
    /// write. Also the smallest key TTL accepted (at least 1 s).
    #[serde(deserialize_with = "de_duration")]
    pub ttl_reap_interval: Duration,
    /// Digest authentication as `user:password` (ZooKeeper's `digest` scheme). When set, znodes
    /// are created with the `creator all` ACL. Never logged.
    pub digest: Option<String>,
}

impl Default for ZkConfig {
    fn default() -> Self {
        ZkConfig {
            servers: vec!["127.0.0.1:2181".to_string()],
            chroot: String::new(),
            session_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            min_session_timeout: Duration::from_secs(4),
            ttl_reap_interval: Duration::from_secs(60),
            digest: None,
        }
    }
}

impl fmt::Debug for ZkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkConfig")
            .field("servers", &self.servers)
            .field("chroot", &self.chroot)
            .field("session_timeout", &self.session_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("min_session_timeout", &self.min_session_timeout)
            .field("ttl_reap_interval", &self.ttl_reap_interval)
            .field("digest", &self.digest.as_ref().map(|_| "***"))
            .finish()
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Millis(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Millis(ms) => Ok(Duration::from_millis(ms)),
        Raw::Text(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

/// Parses `"10s"`, `"500ms"`, `"2m"`, `"1.5s"` or a plain number of milliseconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "ms"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}; use e.g. 10s, 500ms, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?}; use ms, s or m")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn config_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidConfig, NAME, msg)
}

impl ZkConfig {
    /// Parses `zk://[user:password@]host:port[,host:port…][/chroot][?options]`.
    ///
    /// Options: `session_timeout`, `connect_timeout`, `request_timeout`,
    /// `min_session_timeout`, `ttl_reap_interval` (durations such as `10s`, `500ms`). The
    /// `user:password` part becomes [`digest`](Self::digest) authentication.
    ///
    /// # Errors
    /// `InvalidConfig` for another scheme, no host, a bad port, chroot or option.
    pub fn from_url_str(url: &str) -> Result<ZkConfig> {
        let url = url.trim();
        let rest = url
            .strip_prefix("zk://")
            .ok_or_else(|| config_err("a ZooKeeper URL starts with zk://"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, chroot) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let mut cfg = ZkConfig::default();
        let hosts = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let decoded = percent_decode(userinfo)?;
                if !decoded.contains(':') {
                    return Err(config_err("credentials in a zk:// URL are user:password"));
                }
                cfg.digest = Some(decoded);
                hosts
            }
            None => authority,
        };
        cfg.servers = hosts
            .split(',')
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect();
        cfg.chroot = chroot.trim_end_matches('/').to_string();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| config_err(format!("option {pair:?} has no value")))?;
            let d = || parse_duration(v).map_err(config_err);
            match k {
                "session_timeout" => cfg.session_timeout = d()?,
                "connect_timeout" => cfg.connect_timeout = d()?,
                "request_timeout" => cfg.request_timeout = d()?,
                "min_session_timeout" => cfg.min_session_timeout = d()?,
                "ttl_reap_interval" => cfg.ttl_reap_interval = d()?,
                other => {
                    return Err(config_err(format!(
                        "unknown zk:// option {other:?}; known: session_timeout, connect_timeout, \
                         request_timeout, min_session_timeout, ttl_reap_interval"
                    )))
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// `InvalidConfig` naming the bad field.
    pub fn validate(&self) -> Result<()> {
        if self.servers.is_empty() {
            return Err(config_err("no ZooKeeper server given"));
        }
        for s in &self.servers {
            let (host, port) = match s.rsplit_once(':') {
                Some((h, p)) if !h.contains(']') || h.starts_with('[') => (h, Some(p)),
                _ => (s.as_str(), None),
            };
            if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
                return Err(config_err(format!("bad ZooKeeper server {s:?}")));
            }
            if let Some(p) = port {
                if p.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err(config_err(format!("bad port in ZooKeeper server {s:?}")));
                }
            }
        }
        let c = &self.chroot;
        if !c.is_empty() {
            let ok = c.starts_with('/')
                && c.len() <= 512
                && c[1..].split('/').all(|seg| {
                    !seg.is_empty()
                        && seg != "."
                        && seg != ".."
                        && seg.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
                });
            if !ok {
                return Err(config_err(format!(
                    "bad chroot {c:?}: an absolute path of printable ASCII segments"
                )));
            }
            if c == "/zookeeper" || c.starts_with("/zookeeper/") {
                return Err(config_err(
                    "the chroot may not be in ZooKeeper's reserved /zookeeper tree",
                ));
            }
        }
        for (name, d) in [
            ("session_timeout", self.session_timeout),
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("min_session_timeout", self.min_session_timeout),
        ] {
            if d.is_zero() {
                return Err(config_err(format!("{name} must be positive")));
            }
        }
        if let Some(d) = &self.digest {
            if !d.contains(':') {
                return Err(config_err("digest must be user:password"));
            }
        }
        Ok(())
    }

    fn hosts(&self) -> String {
        self.servers.join(",")
    }
}

fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| config_err("bad %-escape in zk:// credentials"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| config_err("zk:// credentials are not UTF-8"))
}

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
            Ok(Ok(client)) => return Ok(client),
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
        caps.min_lock_ttl = self.cfg.min_session_timeout;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let c = ZkConfig::from_url_str(
            "zk://u:p%40ss@h1:2181,h2:2182/app/x?session_timeout=3s&connect_timeout=500ms",
        )
        .unwrap();
        assert_eq!(c.servers, vec!["h1:2181", "h2:2182"]);
        assert_eq!(c.chroot, "/app/x");
        assert_eq!(c.session_timeout, Duration::from_secs(3));
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.digest.as_deref(), Some("u:p@ss"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("p@ss") && shown.contains("***"), "{shown}");
        let c = ZkConfig::from_url_str("zk://h").unwrap();
        assert_eq!((c.servers.len(), c.chroot.as_str()), (1, ""));
    }

    #[test]
    fn bad_urls_are_invalid_config() {
        for u in [
            "zk://",
            "zk:///app",
            "zk://h:0",
            "zk://h:99999",
            "zk://h:1/zookeeper",
            "zk://h:1/zookeeper/x",
            "zk://h:1/a//b",
            "zk://h:1/a/../b",
            "zk://h:1?session_timeout=abc",
            "zk://h:1?nosuch=1",
            "zk://h:1?session_timeout=0s",
            "zk://user@h:1",
            "etcd://h:1",
        ] {
            let e = ZkConfig::from_url_str(u).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{u}");
        }
    }

    #[test]
    fn config_deserializes_from_toml() {
        let c: ZkConfig = toml::from_str(
            "servers = [\"a:1\", \"b:2\"]\nchroot = \"/app\"\nsession_timeout = \"3s\"\n\
             connect_timeout = 1500\ndigest = \"u:secret\"\n",
        )
        .unwrap();
        assert_eq!(c.servers, ["a:1", "b:2"]);
        assert_eq!(c.session_timeout, Duration::from_secs(3));
        assert_eq!(c.connect_timeout, Duration::from_millis(1500));
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        assert!(c.validate().is_ok());
        assert!(!format!("{c:?}").contains("secret"));
        assert!(toml::from_str::<ZkConfig>("nosuch = 1").is_err());
        assert!(toml::from_str::<ZkConfig>("session_timeout = \"1y\"").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("1500").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
