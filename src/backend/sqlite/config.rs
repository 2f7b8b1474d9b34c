//! [`SqliteConfig`] and the `sqlite://` URL form.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::{SqliteStore, NAME};
use crate::config::duration;
use crate::config::{BackendConfig, BackendUrl, Configurable};
use crate::error::{Error, ErrorKind, Result};

/// How to open a SQLite database file shared by the processes of one host.
///
/// `sqlite:///abs/path/to.db[?busy_timeout=5s&poll_interval=1s]`; deserializable as the
/// `[sqlite]` table (`path`, `busy_timeout`, `poll_interval`; durations with a unit).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqliteConfig {
    /// The database file; created (with its schema) if missing. Its directory must exist.
    pub path: PathBuf,
    /// How long a statement waits for another process's write transaction before it fails
    /// with `Timeout` (SQLite's busy timeout). Default 5 s.
    #[serde(deserialize_with = "duration::de_unit_required")]
    pub busy_timeout: Duration,
    /// How long a watch and a waiting `lock()` go at most without looking at the database when
    /// no file-system notification came (they are woken by inotify when the database or its
    /// write-ahead log changes). Default 1 s.
    #[serde(deserialize_with = "duration::de_unit_required")]
    pub poll_interval: Duration,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            path: PathBuf::new(),
            busy_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
        }
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidConfig, NAME, msg)
}

impl SqliteConfig {
    /// A configuration for the database file at `path`, other fields at their defaults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteConfig {
            path: path.into(),
            ..SqliteConfig::default()
        }
    }

    /// Parses a `sqlite:///abs/path` URL.
    ///
    /// # Errors
    /// `InvalidConfig` for another scheme, a host, a relative or missing path, or a bad option.
    pub fn from_url_str(url: &str) -> Result<Self> {
        let url = BackendUrl::parse(url).map_err(|e| bad(e.message()))?;
        let cfg = Self::from_backend_url(&url)?;
        Configurable::validate(&cfg)?;
        Ok(cfg)
    }
}

#[async_trait]
impl BackendConfig for SqliteConfig {
    async fn connect(&self) -> Result<Arc<dyn crate::Backend>> {
        Ok(Arc::new(SqliteStore::open(self.clone()).await?))
    }
}

impl Configurable for SqliteConfig {
    fn from_backend_url(url: &BackendUrl) -> Result<Self> {
        if url.scheme() != "sqlite" {
            return Err(bad("a SQLite URL starts with sqlite://"));
        }
        if !url.host_list().is_empty() || url.user().is_some() || url.password().is_some() {
            return Err(bad(
                "a sqlite:// URL names a local file, not a host: sqlite:///abs/path/to.db",
            ));
        }
        let mut cfg = SqliteConfig::new(url.path());
        url.only_options(NAME, &["busy_timeout", "poll_interval"])
            .map_err(|e| bad(e.message()))?;
        for (k, v) in url.query() {
            let d = duration::parse(v).map_err(|e| bad(format!("option {k}: {}", e.message())))?;
            match k.as_str() {
                "busy_timeout" => cfg.busy_timeout = d,
                _ => cfg.poll_interval = d,
            }
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.path.as_os_str().is_empty() || !self.path.is_absolute() {
            return Err(bad(format!(
                "the database path {:?} is not absolute (sqlite:///abs/path/to.db)",
                self.path
            )));
        }
        if self.busy_timeout.is_zero() || self.poll_interval.is_zero() {
            return Err(bad("busy_timeout and poll_interval must be above zero"));
        }
        if self.poll_interval > Duration::from_secs(10) {
            return Err(bad("poll_interval above 10 s"));
        }
        if self.busy_timeout > Duration::from_secs(3600) {
            return Err(bad("busy_timeout above 1 h"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = SqliteConfig::from_url_str("sqlite:///tmp/a%20b.db?busy_timeout=2s").unwrap();
        assert_eq!(c.path, PathBuf::from("/tmp/a b.db"));
        assert_eq!(c.busy_timeout, Duration::from_secs(2));
        for bad in [
            "sqlite://",
            "sqlite://host/x.db",
            "sqlite://rel.db",
            "sqlite:///x.db?nosuch=1",
            "sqlite:///x.db?busy_timeout=5",
            "sqlite:///x.db?poll_interval=0s",
            "sqlite:///x.db?busy_timeout=1e300",
            "etcd:///x.db",
        ] {
            let e = SqliteConfig::from_url_str(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}");
        }
    }
}
