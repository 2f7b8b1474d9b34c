//! Picking a backend from a URL ([`connect`], [`connect_from_env`]), and the toolkit every
//! backend's configuration is parsed with: one [`duration`] grammar, one [`url`] type with its
//! percent codec and [`redact`], and the [`registry`] of backends.

pub mod duration;
pub mod registry;
pub mod url;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::Backend;

pub use self::url::{redact, BackendUrl};
pub use registry::{BackendConfig, BackendEntry, Configurable};

/// The environment variable [`connect_from_env`] reads.
pub const URL_ENV: &str = "COORDKIT_URL";

/// Connects to the backend named by `url`'s scheme.
///
/// - `memory://` — a new, empty [`MemoryStore`](crate::MemoryStore) (each call gives a separate
///   store);
/// - `etcd://host:port[,host:port…]` — etcd v3 (feature `etcd`);
/// - `zk://host:port[,host:port…][/chroot]` — ZooKeeper (feature `zookeeper`);
/// - `consul://host:port`, `consul+https://host:port` — Consul (feature `consul`);
/// - `sqlite:///abs/path/to.db` — SQLite (feature `sqlite`);
/// - `postgres://user:password@host:port/db?schema=…`, `postgresql://…` — PostgreSQL (feature
///   `postgres`);
/// - `sharded+<strategy>://?shard=<url>&shard=<url>…` — a
///   [`ShardedStore`](crate::shard::ShardedStore) over the given backends (see
///   [`ShardedConfig::from_url`](crate::shard::ShardedConfig::from_url)).
///
/// The schemes are those of [`crate::backend::REGISTRY`]; each backend's module documents its
/// query options.
///
/// The backend is wrapped in [`Traced`](crate::trace::Traced): every call runs in a `tracing`
/// span, silent unless the application installs a subscriber.
///
/// # Errors
/// `InvalidConfig` for a malformed URL, an unknown scheme (the message lists the known ones),
/// or a scheme whose feature this build lacks; otherwise what the backend's connect returns.
pub async fn connect(url: &str) -> Result<Arc<dyn Backend>> {
    connect_untraced(url).await.map(crate::trace::traced)
}

/// [`connect`] without the [`Traced`](crate::trace::Traced) wrapper.
///
/// # Errors
/// As [`connect`].
pub async fn connect_untraced(url: &str) -> Result<Arc<dyn Backend>> {
    config_from_url(url)?.connect().await
}

/// The configuration `url` names, validated, without connecting.
///
/// # Errors
/// As [`connect`], without the backend's connect errors.
pub fn config_from_url(url: &str) -> Result<Arc<dyn BackendConfig>> {
    let parsed = BackendUrl::parse(url).map_err(|e| {
        Error::config(format!(
            "{}; expected one of {}",
            e.message(),
            registry::known_schemes()
        ))
    })?;
    let entry = registry::by_scheme(parsed.scheme()).ok_or_else(|| {
        Error::config(format!(
            "unknown backend scheme {:?}; known schemes: {}",
            parsed.scheme(),
            registry::known_schemes()
        ))
    })?;
    entry.config_from_url(&parsed)
}

/// Connects to the backend named by the `COORDKIT_URL` environment variable, or `default`
/// when it is unset.
///
/// # Errors
/// As [`connect`].
pub async fn connect_from_env(default: &str) -> Result<Arc<dyn Backend>> {
    match std::env::var(URL_ENV) {
        Ok(url) if !url.trim().is_empty() => connect(&url).await,
        _ => connect(default).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[tokio::test]
    async fn unknown_and_malformed_urls_are_invalid_config() {
        for url in ["nosuch://x", "not a url", "", "http://localhost:2379"] {
            let e = connect(url).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{url}");
            assert!(e.message().contains("memory://"), "{e}");
        }
    }

    #[tokio::test]
    async fn memory_connects() {
        let s = connect("memory://").await.unwrap();
        assert_eq!(s.capabilities().backend, "memory");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("etcd://u:secret@h:1"), "etcd://u:***@h:1");
        assert_eq!(redact("memory://"), "memory://");
    }

    #[tokio::test]
    async fn schemes_of_absent_features_name_the_feature() {
        for e in crate::backend::REGISTRY.iter().filter(|e| !e.is_built()) {
            let url = format!("{}://h:1", e.schemes[0]);
            let err = connect(&url).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig);
            assert!(err.message().contains(e.feature.unwrap()), "{err}");
        }
    }
}
