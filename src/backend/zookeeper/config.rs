//! [`ZkConfig`] and the `zk://` URL form.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::{ZkStore, NAME};
use crate::config::duration;
use crate::config::{BackendConfig, BackendUrl, Configurable};
use crate::error::{Error, ErrorKind, Result};

/// How to reach a ZooKeeper ensemble. Deserializable (durations as `"10s"`, `"500ms"`, `"2m"`:
/// [`crate::config::duration`]); `Debug` hides the digest credentials.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZkConfig {
    /// `host:port` of each server (port defaults to 2181).
    pub servers: Vec<String>,
    /// The chroot every path lives under (`""` or `/app`); created if missing. Keys live under
    /// `<chroot>/kv/`, locks under `<chroot>/locks/`.
    pub chroot: String,
    /// The session timeout requested for the store's main session (watches, KV). Default 10 s.
    #[serde(deserialize_with = "duration::de_unit_required")]
    pub session_timeout: Duration,
    /// How long [`ZkStore::connect`] (and each new lock session) may take before it gives up with
    /// `Unavailable`. Default 5 s.
    #[serde(deserialize_with = "duration::de_unit_required")]
    pub connect_timeout: Duration,
    /// The bound on every other call; past it the call fails with `Timeout`. Default 10 s.
    #[serde(deserialize_with = "duration::de_unit_required")]
    pub request_timeout: Duration,
    /// The server's `minSessionTimeout` (2 × `tickTime`, 4 s with ZooKeeper's defaults): the
    /// smallest lock TTL accepted, since a lock's TTL is its session timeout.
    #[serde(deserialize_with = "duration::de_unit_required")]
    pub min_session_timeout: Duration,
    /// How often the server reaps expired TTL nodes (`znode.container.checkIntervalMs`, 60 s by
    /// default): a key with a TTL disappears between TTL and TTL + this interval after its last
    /// write. Also the smallest key TTL accepted (at least 1 s).
    #[serde(deserialize_with = "duration::de_unit_required")]
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
        let url = BackendUrl::parse(url).map_err(|e| config_err(e.message()))?;
        let cfg = Self::from_backend_url(&url)?;
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
            ("ttl_reap_interval", self.ttl_reap_interval),
        ] {
            if d.is_zero() && name != "ttl_reap_interval" {
                return Err(config_err(format!("{name} must be positive")));
            }
            if d > duration::MAX {
                return Err(config_err(format!(
                    "{name} {d:?} is above the maximum of 10 years"
                )));
            }
        }
        if let Some(d) = &self.digest {
            if !d.contains(':') {
                return Err(config_err("digest must be user:password"));
            }
        }
        Ok(())
    }

    pub(crate) fn hosts(&self) -> String {
        self.servers.join(",")
    }
}

#[async_trait]
impl BackendConfig for ZkConfig {
    async fn connect(&self) -> Result<Arc<dyn crate::Backend>> {
        Ok(Arc::new(ZkStore::connect(self.clone()).await?))
    }
}

impl Configurable for ZkConfig {
    fn from_backend_url(url: &BackendUrl) -> Result<Self> {
        if url.scheme() != "zk" {
            return Err(config_err("a ZooKeeper URL starts with zk://"));
        }
        let mut cfg = ZkConfig::default();
        match (url.user(), url.password()) {
            (None, None) => {}
            (Some(u), Some(p)) => cfg.digest = Some(format!("{u}:{p}")),
            _ => return Err(config_err("credentials in a zk:// URL are user:password")),
        }
        cfg.servers = url
            .hosts()
            .into_iter()
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect();
        cfg.chroot = url.path().trim_end_matches('/').to_string();
        const OPTIONS: &[&str] = &[
            "session_timeout",
            "connect_timeout",
            "request_timeout",
            "min_session_timeout",
            "ttl_reap_interval",
        ];
        url.only_options("zk://", OPTIONS)
            .map_err(|e| config_err(e.message()))?;
        for (k, v) in url.query() {
            let d = duration::parse(v)
                .map_err(|e| config_err(format!("option {k}: {}", e.message())))?;
            match k.as_str() {
                "session_timeout" => cfg.session_timeout = d,
                "connect_timeout" => cfg.connect_timeout = d,
                "request_timeout" => cfg.request_timeout = d,
                "min_session_timeout" => cfg.min_session_timeout = d,
                _ => cfg.ttl_reap_interval = d,
            }
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        ZkConfig::validate(self)
    }
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
             connect_timeout = \"1500ms\"\ndigest = \"u:secret\"\n",
        )
        .unwrap();
        assert_eq!(c.servers, ["a:1", "b:2"]);
        assert_eq!(c.session_timeout, Duration::from_secs(3));
        assert_eq!(c.connect_timeout, Duration::from_millis(1500));
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        assert!(c.validate().is_ok());
        assert!(!format!("{c:?}").contains("secret"));
        assert!(toml::from_str::<ZkConfig>("nosuch = 1").is_err());
        assert!(toml::from_str::<ZkConfig>("session_timeout = \"20y\"").is_err());
    }

    #[test]
    fn absurd_durations_set_in_code_are_refused() {
        for set in [
            |c: &mut ZkConfig| c.request_timeout = Duration::MAX,
            |c: &mut ZkConfig| c.session_timeout = Duration::MAX,
            |c: &mut ZkConfig| c.ttl_reap_interval = Duration::MAX,
        ] {
            let mut c = ZkConfig::default();
            set(&mut c);
            assert_eq!(c.validate().unwrap_err().kind(), ErrorKind::InvalidConfig);
        }
    }

    #[test]
    fn bare_numbers_are_refused_not_read_as_milliseconds() {
        // Older versions read a bare number as milliseconds, unlike every other setting.
        let e = toml::from_str::<ZkConfig>("session_timeout = 10").unwrap_err();
        assert!(e.to_string().contains("ambiguous"), "{e}");
        assert!(toml::from_str::<ZkConfig>("session_timeout = \"10\"").is_err());
        assert!(ZkConfig::from_url_str("zk://h:1?session_timeout=10000").is_err());
        let c =
            ZkConfig::from_url_str("zk://h:1?session_timeout=1.5s&ttl_reap_interval=1h").unwrap();
        assert_eq!(c.session_timeout, Duration::from_millis(1500));
        assert_eq!(c.ttl_reap_interval, Duration::from_secs(3600));
    }
}
