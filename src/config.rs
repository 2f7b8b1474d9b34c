//! Picking a backend from a URL: [`connect`] and [`connect_from_env`].

use std::sync::Arc;

use url::Url;

use crate::backend::memory::MemoryStore;
use crate::error::{Error, Result};
use crate::Backend;

/// The environment variable [`connect_from_env`] reads.
pub const URL_ENV: &str = "COORDKIT_URL";

/// The URL schemes this build knows, with the feature each needs.
pub const SCHEMES: &[(&str, &str)] = &[
    ("memory", "always built"),
    ("etcd", "feature `etcd`"),
    ("zk", "feature `zookeeper`"),
    ("consul", "feature `consul`"),
    ("consul+https", "feature `consul`"),
    ("sharded+<strategy>", "always built"),
];

fn known_schemes() -> String {
    SCHEMES
        .iter()
        .map(|(s, _)| format!("{s}://"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Connects to the backend named by `url`'s scheme.
///
/// - `memory://` — a new, empty [`MemoryStore`] (each call gives a separate store);
/// - `etcd://host:port[,host:port…]` — etcd v3 (feature `etcd`);
/// - `zk://host:port[,host:port…][/chroot]` — ZooKeeper (feature `zookeeper`);
/// - `consul://host:port`, `consul+https://host:port` — Consul (feature `consul`);
/// - `sharded+<strategy>://?shard=<url>&shard=<url>…` — a
///   [`ShardedStore`](crate::shard::ShardedStore) over the given backends (see
///   [`ShardedConfig::from_url`](crate::shard::ShardedConfig::from_url)).
///
/// Each backend's module documents its query options.
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
    // etcd URLs may list several host:port pairs, which `Url` cannot parse.
    #[cfg(feature = "etcd")]
    if url.trim().starts_with("etcd://") {
        return Ok(Arc::new(
            crate::backend::etcd::EtcdStore::connect_str(url).await?,
        ));
    }
    // zk:// may list several hosts, which `Url` cannot parse.
    #[cfg(feature = "zookeeper")]
    if url.trim().starts_with("zk://") {
        let cfg = crate::backend::zookeeper::ZkConfig::from_url_str(url)?;
        return Ok(Arc::new(
            crate::backend::zookeeper::ZkStore::connect(cfg).await?,
        ));
    }
    let parsed = Url::parse(url.trim()).map_err(|e| {
        Error::config(format!(
            "malformed backend URL {:?}: {e}; expected one of {}",
            redact(url),
            known_schemes()
        ))
    })?;
    match parsed.scheme() {
        "memory" => Ok(Arc::new(MemoryStore::new())),
        #[cfg(feature = "consul")]
        "consul" | "consul+https" => Ok(Arc::new(
            crate::backend::consul::ConsulStore::connect_url(&parsed).await?,
        )),
        s if s == "sharded" || s.starts_with("sharded+") => {
            let cfg = crate::shard::ShardedConfig::from_url(&parsed)?;
            Ok(Arc::new(cfg.connect().await?))
        }
        // Each backend adds its arm here, behind its feature.
        other => {
            if let Some((_, feature)) = SCHEMES.iter().find(|(s, _)| *s == other) {
                return Err(Error::config(format!(
                    "the {other}:// backend is not in this build; enable the {feature}"
                )));
            }
            Err(Error::config(format!(
                "unknown backend scheme {other:?}; known schemes: {}",
                known_schemes()
            )))
        }
    }
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

/// `url` with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
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
}
