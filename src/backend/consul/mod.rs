//! The Consul backend: key-value storage over `/v1/kv` and `/v1/txn`, locks over sessions,
//! fenced by the ModifyIndex of the acquiring write.
//!
#![doc = include_str!("docs.md")]

mod client;
mod kv;
mod lock;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::caps::{Capabilities, FencingScope};
use crate::error::{Error, ErrorKind, Result};
use crate::key::validate_prefix;

use client::Client;
pub use lock::LOCK_FLAG_VALUE;

pub(crate) const NAME: &str = "consul";

/// The largest value Consul accepts by default (`kv_max_value_size`, 512 KiB).
pub const MAX_VALUE_SIZE: usize = 524_288;
/// The shortest session TTL Consul accepts, and so the shortest lock TTL.
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(10);
/// The longest session TTL Consul accepts.
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(86_400);

/// How to reach a Consul agent or server.
///
/// Deserializable (for configuration files); `Debug` never shows the token.
///
/// From a URL: `consul://host[:port]?token=T&dc=D&timeout=10s&connect_timeout=5s&prefix=app/&lock_delay=1s`
/// (`consul+https://` for TLS; the port defaults to 8500).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsulConfig {
    /// `host:port` of the HTTP API. Default `127.0.0.1:8500`.
    pub address: String,
    /// Use HTTPS (rustls, the platform's web PKI roots). Default false.
    pub https: bool,
    /// ACL token, sent as the `X-Consul-Token` header. Never logged or shown by `Debug`.
    pub token: Option<String>,
    /// Datacenter (`?dc=`); `None` is the agent's own.
    pub datacenter: Option<String>,
    /// Bound on each request, in milliseconds (blocking queries get their wait on top).
    /// Default 10 000.
    pub timeout_ms: u64,
    /// Bound on opening a connection, in milliseconds. Default 5 000.
    pub connect_timeout_ms: u64,
    /// Key namespace: data key `K` is stored at `<prefix>kv/K`, lock `N` at `<prefix>locks/N`.
    /// Empty, or ending in `/` (one is added if missing). Default empty.
    pub prefix: String,
    /// Lock-delay of the sessions behind locks, in milliseconds (Consul's default is 15 s; 0
    /// disables it). Default 1 000.
    pub lock_delay_ms: u64,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        ConsulConfig {
            address: "127.0.0.1:8500".into(),
            https: false,
            token: None,
            datacenter: None,
            timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            prefix: String::new(),
            lock_delay_ms: 1_000,
        }
    }
}

impl std::fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.address)
            .field("https", &self.https)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("datacenter", &self.datacenter)
            .field("timeout_ms", &self.timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("prefix", &self.prefix)
            .field("lock_delay_ms", &self.lock_delay_ms)
            .finish()
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidConfig, NAME, msg)
}

fn parse_ms(name: &str, v: &str) -> Result<u64> {
    client::parse_duration(v)
        .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
        .ok_or_else(|| {
            bad(format!(
                "{name}={v:?} is not a duration (examples: 10s, 500ms, 1m, or seconds as a number)"
            ))
        })
}

impl ConsulConfig {
    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Parses `consul://host[:port]?…` or `consul+https://host[:port]?…`.
    ///
    /// Query options: `token`, `dc`, `timeout`, `connect_timeout`, `prefix`, `lock_delay`
    /// (durations as `10s`, `500ms`, or a number of seconds).
    ///
    /// # Errors
    /// `InvalidConfig` for another scheme, a missing host, a path, or an unknown or malformed
    /// option (the message never contains the token).
    pub fn from_url(url: &Url) -> Result<ConsulConfig> {
        let https = match url.scheme() {
            "consul" => false,
            "consul+https" => true,
            other => {
                return Err(bad(format!(
                    "scheme {other:?} is not consul:// or consul+https://"
                )))
            }
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("the URL names no host, expected consul://host:port"))?;
        if !(url.path().is_empty() || url.path() == "/") {
            return Err(bad(format!(
                "unexpected path {:?}: use ?prefix= for a key namespace",
                url.path()
            )));
        }
        let port = url.port().unwrap_or(8500);
        let mut cfg = ConsulConfig {
            address: format!("{host}:{port}"),
            https,
            ..ConsulConfig::default()
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "user info in a consul:// URL is not used; pass the ACL token as ?token=",
            ));
        }
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "token" => cfg.token = Some(v.into_owned()),
                "dc" => cfg.datacenter = Some(v.into_owned()),
                "timeout" => cfg.timeout_ms = parse_ms("timeout", &v)?,
                "connect_timeout" => cfg.connect_timeout_ms = parse_ms("connect_timeout", &v)?,
                "prefix" => cfg.prefix = v.into_owned(),
                "lock_delay" => cfg.lock_delay_ms = parse_ms("lock_delay", &v)?,
                other => {
                    return Err(bad(format!(
                        "unknown option {other:?}; known: token, dc, timeout, connect_timeout, prefix, lock_delay"
                    )))
                }
            }
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<String> {
        if self.address.trim().is_empty() || self.address.contains('/') {
            return Err(bad(format!("address {:?} is not host:port", self.address)));
        }
        if self.timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return Err(bad("timeouts must be positive"));
        }
        if self.lock_delay_ms > 60_000 {
            return Err(bad("lock_delay above Consul's maximum of 60 s"));
        }
        let mut prefix = self.prefix.clone();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        validate_prefix(&prefix).map_err(|e| bad(format!("prefix: {}", e.message())))?;
        if let Some(t) = &self.token {
            if t.chars().any(|c| c.is_control()) {
                return Err(bad("the token contains control characters"));
            }
        }
        Ok(prefix)
    }
}

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
        let prefix = config.validate()?;
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

    fn caps() -> Capabilities {
        let mut caps = Capabilities::new(NAME);
        caps.key_ttl = false;
        caps.min_ttl = MIN_SESSION_TTL;
        caps.min_lock_ttl = MIN_SESSION_TTL;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("consul://h:1234?token=s3cret&dc=eu&timeout=2s&prefix=app&lock_delay=0")
            .unwrap();
        let c = ConsulConfig::from_url(&u).unwrap();
        assert_eq!(c.address, "h:1234");
        assert!(!c.https);
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert_eq!(c.datacenter.as_deref(), Some("eu"));
        assert_eq!(c.timeout_ms, 2000);
        assert_eq!(c.lock_delay_ms, 0);
        assert_eq!(c.validate().unwrap(), "app/");
        assert!(!format!("{c:?}").contains("s3cret"));
        let c = ConsulConfig::from_url(&Url::parse("consul+https://h").unwrap()).unwrap();
        assert!(c.https);
        assert_eq!(c.address, "h:8500");
        for bad in [
            "consul://h?nope=1",
            "consul://h?timeout=abc",
            "consul://h?timeout=99999999999999999999999",
            "consul://h?timeout=99999999999999999999999h",
            "consul://h?connect_timeout=-1",
            "consul://h?lock_delay=NaN",
            "consul://h/path",
            "consul://u:p@h",
            "etcd://h",
        ] {
            let e = ConsulConfig::from_url(&Url::parse(bad).unwrap()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}");
        }
        let c = ConsulConfig {
            prefix: "a//b".into(),
            ..ConsulConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().kind(), ErrorKind::InvalidConfig);
    }
}
