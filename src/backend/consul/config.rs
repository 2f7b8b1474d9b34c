//! [`ConsulConfig`] and the `consul://` URL form.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::{ConsulStore, NAME};
use crate::config::duration::{self, Grammar};
use crate::config::{BackendConfig, BackendUrl, Configurable};
use crate::error::{Error, ErrorKind, Result};
use crate::key::validate_prefix;

/// How to reach a Consul agent or server.
///
/// Deserializable (for configuration files; durations as `"10s"`, `"500ms"`:
/// [`crate::config::duration`]); `Debug` never shows the token. The settings `timeout_ms`,
/// `connect_timeout_ms` and `lock_delay_ms` (integers of milliseconds) are deprecated aliases of
/// `timeout`, `connect_timeout` and `lock_delay`.
///
/// From a URL: `consul://host[:port]?token=T&dc=D&timeout=10s&connect_timeout=5s&prefix=app/&lock_delay=1s`
/// (`consul+https://` for TLS; the port defaults to 8500; a bare number in a duration option is
/// a deprecated spelling of seconds).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(try_from = "ConsulSettings")]
pub struct ConsulConfig {
    /// `host:port` of the HTTP API. Default `127.0.0.1:8500`.
    pub address: String,
    /// Use HTTPS (rustls, the platform's web PKI roots). Default false.
    pub https: bool,
    /// ACL token, sent as the `X-Consul-Token` header. Never logged or shown by `Debug`.
    pub token: Option<String>,
    /// Datacenter (`?dc=`); `None` is the agent's own.
    pub datacenter: Option<String>,
    /// Bound on each request (blocking queries get their wait on top). Default 10 s.
    pub timeout: Duration,
    /// Bound on opening a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Key namespace: data key `K` is stored at `<prefix>kv/K`, lock `N` at `<prefix>locks/N`.
    /// Empty, or ending in `/` (one is added if missing). Default empty.
    pub prefix: String,
    /// Lock-delay of the sessions behind locks (Consul's default is 15 s; zero disables it).
    /// Default 1 s.
    pub lock_delay: Duration,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        ConsulConfig {
            address: "127.0.0.1:8500".into(),
            https: false,
            token: None,
            datacenter: None,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            prefix: String::new(),
            lock_delay: Duration::from_secs(1),
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
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("prefix", &self.prefix)
            .field("lock_delay", &self.lock_delay)
            .finish()
    }
}

/// The settings as a configuration file spells them, deprecated aliases included.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ConsulSettings {
    address: String,
    https: bool,
    token: Option<String>,
    datacenter: Option<String>,
    prefix: String,
    #[serde(deserialize_with = "some_duration")]
    timeout: Option<Duration>,
    #[serde(deserialize_with = "some_duration")]
    connect_timeout: Option<Duration>,
    #[serde(deserialize_with = "some_duration")]
    lock_delay: Option<Duration>,
    timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    lock_delay_ms: Option<u64>,
}

impl Default for ConsulSettings {
    fn default() -> Self {
        let d = ConsulConfig::default();
        ConsulSettings {
            address: d.address,
            https: d.https,
            token: None,
            datacenter: None,
            prefix: d.prefix,
            timeout: None,
            connect_timeout: None,
            lock_delay: None,
            timeout_ms: None,
            connect_timeout_ms: None,
            lock_delay_ms: None,
        }
    }
}

fn some_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Duration>, D::Error> {
    duration::de_unit_required(d).map(Some)
}

/// One duration setting from its name and its deprecated `_ms` alias.
fn pick(
    name: &str,
    value: Option<Duration>,
    ms: Option<u64>,
    default: Duration,
) -> Result<Duration> {
    match (value, ms) {
        (Some(_), Some(_)) => Err(bad(format!(
            "both {name} and {name}_ms are set; keep {name}"
        ))),
        (Some(d), None) => Ok(d),
        (None, Some(ms)) => {
            tracing::warn!("the setting {name}_ms is deprecated; write {name} = \"{ms}ms\"");
            duration::from_secs(&format!("{name}_ms"), ms as f64 / 1000.0)
        }
        (None, None) => Ok(default),
    }
}

impl TryFrom<ConsulSettings> for ConsulConfig {
    type Error = Error;

    fn try_from(s: ConsulSettings) -> Result<Self> {
        let d = ConsulConfig::default();
        Ok(ConsulConfig {
            timeout: pick("timeout", s.timeout, s.timeout_ms, d.timeout)?,
            connect_timeout: pick(
                "connect_timeout",
                s.connect_timeout,
                s.connect_timeout_ms,
                d.connect_timeout,
            )?,
            lock_delay: pick("lock_delay", s.lock_delay, s.lock_delay_ms, d.lock_delay)?,
            address: s.address,
            https: s.https,
            token: s.token,
            datacenter: s.datacenter,
            prefix: s.prefix,
        })
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidConfig, NAME, msg)
}

impl ConsulConfig {
    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Parses `consul://host[:port]?…` or `consul+https://host[:port]?…`.
    ///
    /// Query options: `token`, `dc`, `timeout`, `connect_timeout`, `prefix`, `lock_delay`
    /// (durations as `10s`, `500ms`; a bare number of seconds is deprecated).
    ///
    /// # Errors
    /// `InvalidConfig` for another scheme, a missing host, a path, or an unknown or malformed
    /// option (the message never contains the token).
    pub fn from_url(url: &url::Url) -> Result<ConsulConfig> {
        Self::from_url_str(url.as_str())
    }

    /// [`from_url`](Self::from_url) from a string.
    ///
    /// # Errors
    /// As [`from_url`](Self::from_url).
    pub fn from_url_str(url: &str) -> Result<ConsulConfig> {
        let url = BackendUrl::parse(url).map_err(|e| bad(e.message()))?;
        let cfg = Self::from_backend_url(&url)?;
        Configurable::validate(&cfg)?;
        Ok(cfg)
    }

    /// Checks the configuration and gives the key prefix with its trailing `/`.
    pub(crate) fn normalized_prefix(&self) -> Result<String> {
        if self.address.trim().is_empty() || self.address.contains('/') {
            return Err(bad(format!("address {:?} is not host:port", self.address)));
        }
        if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(bad("timeouts must be positive"));
        }
        for (name, d) in [
            ("timeout", self.timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if d > duration::MAX {
                return Err(bad(format!(
                    "{name} {d:?} is above the maximum of 10 years"
                )));
            }
        }
        if self.lock_delay > Duration::from_secs(60) {
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

#[async_trait]
impl BackendConfig for ConsulConfig {
    async fn connect(&self) -> Result<Arc<dyn crate::Backend>> {
        Ok(Arc::new(ConsulStore::connect(self.clone()).await?))
    }
}

impl Configurable for ConsulConfig {
    fn from_backend_url(url: &BackendUrl) -> Result<Self> {
        let https = match url.scheme() {
            "consul" => false,
            "consul+https" => true,
            other => {
                return Err(bad(format!(
                    "scheme {other:?} is not consul:// or consul+https://"
                )))
            }
        };
        let hosts = url.hosts();
        let host = match hosts.as_slice() {
            [h] if !h.is_empty() && !h.starts_with(':') => *h,
            [] | [_] => return Err(bad("the URL names no host, expected consul://host:port")),
            _ => return Err(bad("a consul:// URL names one agent, not several")),
        };
        if !(url.path().is_empty() || url.path() == "/") {
            return Err(bad(format!(
                "unexpected path {:?}: use ?prefix= for a key namespace",
                url.path()
            )));
        }
        if url.user().is_some() || url.password().is_some() {
            return Err(bad(
                "user info in a consul:// URL is not used; pass the ACL token as ?token=",
            ));
        }
        // A port is whatever follows the last ':' outside an IPv6 literal's brackets.
        let has_port = host
            .rsplit_once(':')
            .is_some_and(|(h, _)| !h.contains('[') || h.ends_with(']'));
        let address = if has_port {
            let port = host.rsplit_once(':').map(|(_, p)| p).unwrap_or("");
            if port.parse::<u16>().is_err() {
                return Err(bad(format!("bad port in {host:?}")));
            }
            host.to_string()
        } else {
            format!("{host}:8500")
        };
        let mut cfg = ConsulConfig {
            address,
            https,
            ..ConsulConfig::default()
        };
        url.only_options(
            NAME,
            &[
                "token",
                "dc",
                "timeout",
                "connect_timeout",
                "prefix",
                "lock_delay",
            ],
        )
        .map_err(|e| bad(e.message()))?;
        for (k, v) in url.query() {
            let d = || {
                duration::parse_with(v, Grammar::SecondsAlias)
                    .map_err(|e| bad(format!("option {k}: {}", e.message())))
            };
            match k.as_str() {
                "token" => cfg.token = Some(v.clone()),
                "dc" => cfg.datacenter = Some(v.clone()),
                "timeout" => cfg.timeout = d()?,
                "connect_timeout" => cfg.connect_timeout = d()?,
                "prefix" => cfg.prefix = v.clone(),
                _ => cfg.lock_delay = d()?,
            }
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        self.normalized_prefix().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = ConsulConfig::from_url_str(
            "consul://h:1234?token=s3cret&dc=eu&timeout=2s&prefix=app&lock_delay=0",
        )
        .unwrap();
        assert_eq!(c.address, "h:1234");
        assert!(!c.https);
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert_eq!(c.datacenter.as_deref(), Some("eu"));
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.lock_delay, Duration::ZERO);
        assert_eq!(c.normalized_prefix().unwrap(), "app/");
        assert!(!format!("{c:?}").contains("s3cret"));
        let c = ConsulConfig::from_url_str("consul+https://h").unwrap();
        assert!(c.https);
        assert_eq!(c.address, "h:8500");
        let c = ConsulConfig::from_url_str("consul://[::1]").unwrap();
        assert_eq!(c.address, "[::1]:8500");
        for bad in [
            "consul://h?nope=1",
            "consul://h?timeout=abc",
            "consul://h?timeout=1e300",
            "consul://h?timeout=99999999999999999999999",
            "consul://h?timeout=99999999999999999999999h",
            "consul://h?connect_timeout=-1",
            "consul://h?lock_delay=NaN",
            "consul://h?timeout=0s",
            "consul://h/path",
            "consul://u:p@h",
            "consul://a:1,b:2",
            "consul://h:x",
            "consul://",
            "etcd://h",
        ] {
            let e = ConsulConfig::from_url_str(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}");
        }
        let c = ConsulConfig {
            prefix: "a//b".into(),
            ..ConsulConfig::default()
        };
        assert_eq!(
            c.normalized_prefix().unwrap_err().kind(),
            ErrorKind::InvalidConfig
        );
    }

    #[test]
    fn toml_settings_and_deprecated_aliases() {
        let c: ConsulConfig =
            toml::from_str("timeout = \"3s\"\nlock_delay_ms = 250\ntoken = \"t\"\n").unwrap();
        assert_eq!(c.timeout, Duration::from_secs(3));
        assert_eq!(c.lock_delay, Duration::from_millis(250));
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        for bad in [
            "timeout = \"3s\"\ntimeout_ms = 3000\n",
            "timeout = 3\n",
            "timeout = \"20y\"\n",
            "nosuch = 1\n",
        ] {
            assert!(toml::from_str::<ConsulConfig>(bad).is_err(), "{bad}");
        }
    }
}
