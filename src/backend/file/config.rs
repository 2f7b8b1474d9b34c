//! [`FileConfig`] and the `file://` URL form.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::{FileStore, NAME};
use crate::config::duration;
use crate::config::{BackendConfig, BackendUrl, Configurable};
use crate::error::{Error, ErrorKind, Result};

/// How to open a store in a directory shared by the processes of one host.
///
/// `file:///abs/dir[?lock_timeout=5s&changes_kept=100000]`; deserializable as the `[file]`
/// table (`dir`, `lock_timeout`, `changes_kept`; durations with a unit).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// The store's directory; created (with its layout) if missing. Its parent must exist.
    pub dir: PathBuf,
    /// How long an operation waits for another process's critical section (an `flock` held
    /// for one write) before it fails with `Timeout`. Default 5 s.
    #[serde(deserialize_with = "duration::de_unit_required")]
    pub lock_timeout: Duration,
    /// How many changes the change log keeps for watches; a watch further behind gets
    /// `WatchGap`. Default 100,000.
    pub changes_kept: u64,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            dir: PathBuf::new(),
            lock_timeout: Duration::from_secs(5),
            changes_kept: 100_000,
        }
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidConfig, NAME, msg)
}

impl FileConfig {
    /// A configuration for the store in `dir`, other fields at their defaults.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileConfig {
            dir: dir.into(),
            ..FileConfig::default()
        }
    }

    /// Parses a `file:///abs/dir` URL.
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
impl BackendConfig for FileConfig {
    async fn connect(&self) -> Result<Arc<dyn crate::Backend>> {
        Ok(Arc::new(FileStore::open(self.clone()).await?))
    }
}

impl Configurable for FileConfig {
    fn from_backend_url(url: &BackendUrl) -> Result<Self> {
        if url.scheme() != "file" {
            return Err(bad("a file store URL starts with file://"));
        }
        if !url.host_list().is_empty() || url.user().is_some() || url.password().is_some() {
            return Err(bad(
                "a file:// URL names a local directory, not a host: file:///abs/dir",
            ));
        }
        let mut cfg = FileConfig::new(url.path());
        url.only_options(NAME, &["lock_timeout", "changes_kept"])
            .map_err(|e| bad(e.message()))?;
        for (k, v) in url.query() {
            match k.as_str() {
                "lock_timeout" => {
                    cfg.lock_timeout = duration::parse(v)
                        .map_err(|e| bad(format!("option {k}: {}", e.message())))?
                }
                _ => {
                    cfg.changes_kept = v.parse().map_err(|_| {
                        bad(format!(
                            "option {k}: {v:?} is not a whole number of changes"
                        ))
                    })?
                }
            }
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.dir.as_os_str().is_empty() || !self.dir.is_absolute() {
            return Err(bad(format!(
                "the directory {:?} is not absolute (file:///abs/dir)",
                self.dir
            )));
        }
        if self.lock_timeout.is_zero() || self.lock_timeout > Duration::from_secs(3600) {
            return Err(bad("lock_timeout must be above zero and at most 1 h"));
        }
        if self.changes_kept < 1000 {
            return Err(bad("changes_kept below 1000"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = FileConfig::from_url_str("file:///tmp/a%20b?lock_timeout=2s&changes_kept=5000")
            .unwrap();
        assert_eq!(c.dir, PathBuf::from("/tmp/a b"));
        assert_eq!(c.lock_timeout, Duration::from_secs(2));
        assert_eq!(c.changes_kept, 5000);
        for bad in [
            "file://",
            "file://host/x",
            "file://rel",
            "file:///x?nosuch=1",
            "file:///x?lock_timeout=5",
            "file:///x?lock_timeout=0s",
            "file:///x?lock_timeout=1e300",
            "file:///x?changes_kept=-1",
            "file:///x?changes_kept=10",
            "sqlite:///x",
        ] {
            let e = FileConfig::from_url_str(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}");
        }
    }
}
