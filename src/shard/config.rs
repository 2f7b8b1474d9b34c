//! [`ShardedConfig`]: a sharded store from TOML, from a `sharded+…://` URL, or from code.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use url::Url;

use super::store::{Shard, ShardedStore};
use super::strategy::{ShardSpec, StrategyKind};
use crate::config::{redact, BackendConfig, BackendUrl, Configurable};
use crate::error::{Error, Result};
use crate::Backend;

/// The configuration of a [`ShardedStore`].
///
/// In TOML:
///
/// ```toml
/// strategy = "ring"        # modulo | ring | rendezvous | jump (default ring)
/// vnodes = 1024            # ring only: virtual nodes per unit of weight (default 1024)
///
/// [[shards]]
/// url = "etcd://10.0.0.1:2379"
/// name = "east"            # optional; default: the URL (password hidden)
/// weight = 2               # optional; default 1 (ring and modulo only)
///
/// [[shards]]
/// url = "zk://10.0.1.1:2181"
/// name = "west"
/// ```
///
/// The shard name is what the ring and rendezvous strategies hash: keep it when a shard's URL
/// changes (new hosts, same data), or keys would move. Give every shard a name in production.
///
/// # Contract
/// [`validate`](Self::validate) (called by [`connect`](Self::connect)) rejects, with
/// `InvalidConfig` and before any connection is made: no shards, two shards with the same name
/// or URL, a zero weight, a weight other than 1 for rendezvous or jump, `vnodes = 0`, an empty
/// or malformed URL, and a shard that is itself sharded. An unknown strategy name is a
/// deserialisation error (`InvalidConfig` from [`from_toml`](Self::from_toml)).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardedConfig {
    /// The hash strategy.
    #[serde(default = "default_strategy")]
    pub strategy: StrategyKind,
    /// Ring only: virtual nodes per unit of weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnodes: Option<u32>,
    /// The shards, in order (order matters to modulo and jump only).
    pub shards: Vec<ShardConfig>,
}

fn default_strategy() -> StrategyKind {
    StrategyKind::Ring
}

fn default_weight() -> u32 {
    1
}

/// One shard of a [`ShardedConfig`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// The backend URL, as for [`crate::connect`].
    pub url: String,
    /// The shard's relative share of the keys (ring and modulo only).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The shard's stable name; default: the URL with any password hidden.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ShardConfig {
    /// A shard of weight 1 named after its URL.
    pub fn new(url: impl Into<String>) -> Self {
        ShardConfig {
            url: url.into(),
            weight: 1,
            name: None,
        }
    }

    /// Names the shard.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The name the strategy uses: `name`, or the URL [`redact`]ed (its password and secret
    /// query options replaced by `***`), so that changing a credential moves no key.
    pub fn effective_name(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => redact(self.url.trim()),
        }
    }
}

impl fmt::Debug for ShardConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardConfig")
            .field("url", &redact(&self.url))
            .field("weight", &self.weight)
            .field("name", &self.name)
            .finish()
    }
}

impl fmt::Debug for ShardedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedConfig")
            .field("strategy", &self.strategy)
            .field("vnodes", &self.vnodes)
            .field("shards", &self.shards)
            .finish()
    }
}

type ConnectFuture = Pin<Box<dyn Future<Output = Result<Arc<dyn Backend>>> + Send>>;

fn connect_boxed(url: String) -> ConnectFuture {
    Box::pin(async move { crate::config::connect(&url).await })
}

impl ShardedConfig {
    /// A configuration with `strategy` over `shards`.
    pub fn new(strategy: StrategyKind, shards: Vec<ShardConfig>) -> Self {
        ShardedConfig {
            strategy,
            vnodes: None,
            shards,
        }
    }

    /// Parses the TOML form (see the type's docs) and validates it.
    ///
    /// # Errors
    /// `InvalidConfig` for malformed TOML, unknown fields or strategy, or what
    /// [`validate`](Self::validate) rejects.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: ShardedConfig = toml::from_str(text)
            .map_err(|e| Error::config(format!("invalid sharded configuration: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses the URL form and validates it:
    ///
    /// `sharded+<strategy>://?shard=<url>&shard=<url>…[&vnodes=N][&weights=w1,w2…][&names=n1,n2…]`
    ///
    /// or `sharded://?strategy=<strategy>&shard=…`. Each `shard` is a backend URL; a shard URL
    /// with its own `&` or `#` must be percent-encoded. `weights` and `names`, when given, list
    /// one entry per shard in order. Example:
    /// `sharded+ring://?shard=etcd://10.0.0.1:2379&shard=zk://10.0.1.1:2181&names=east,west`.
    ///
    /// # Errors
    /// `InvalidConfig` for another scheme, a host in the URL, an unknown parameter, a
    /// weight or name list of the wrong length, an unparsable number, or what
    /// [`validate`](Self::validate) rejects.
    pub fn from_url(url: &Url) -> Result<Self> {
        Self::from_url_str(url.as_str())
    }

    /// [`from_url`](Self::from_url) from a string.
    ///
    /// # Errors
    /// As [`from_url`](Self::from_url).
    pub fn from_url_str(url: &str) -> Result<Self> {
        let cfg = Self::from_backend_url(&BackendUrl::parse(url)?)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn parse_url(url: &BackendUrl) -> Result<Self> {
        let scheme = url.scheme();
        let mut strategy = match scheme.strip_prefix("sharded") {
            Some("") => None,
            Some(rest) => match rest.strip_prefix('+') {
                Some(name) => Some(name.parse::<StrategyKind>()?),
                None => None,
            },
            None => None,
        };
        if !(scheme == "sharded" || scheme.starts_with("sharded+")) {
            return Err(Error::config(format!(
                "{scheme}:// is not a sharded URL; use sharded+<strategy>://?shard=<url>&…"
            )));
        }
        if !url.host_list().is_empty()
            || url.user().is_some()
            || url.password().is_some()
            || !matches!(url.path(), "" | "/")
        {
            return Err(Error::config(
                "a sharded URL has no host or path: sharded+<strategy>://?shard=<url>&shard=<url>",
            ));
        }
        let mut urls = Vec::new();
        let mut vnodes = None;
        let mut weights: Option<Vec<u32>> = None;
        let mut names: Option<Vec<String>> = None;
        for (k, v) in url.query() {
            match k.as_str() {
                "shard" => urls.push(v.clone()),
                "strategy" => {
                    let s = v.parse::<StrategyKind>()?;
                    if strategy.is_some_and(|old| old != s) {
                        return Err(Error::config(format!(
                            "the URL names two strategies: {} and {s}",
                            strategy.map(|x| x.as_str()).unwrap_or("")
                        )));
                    }
                    strategy = Some(s);
                }
                "vnodes" => {
                    vnodes =
                        Some(v.parse::<u32>().map_err(|e| {
                            Error::config(format!("vnodes={v:?} is not a number: {e}"))
                        })?)
                }
                "weights" => {
                    let list = v
                        .split(',')
                        .map(|w| {
                            w.trim().parse::<u32>().map_err(|e| {
                                Error::config(format!("weight {w:?} is not a number: {e}"))
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    weights = Some(list);
                }
                "names" => names = Some(v.split(',').map(|n| n.trim().to_string()).collect()),
                other => {
                    return Err(Error::config(format!(
                        "unknown sharded URL parameter {other:?}; known: shard, strategy, \
                         vnodes, weights, names"
                    )))
                }
            }
        }
        let n = urls.len();
        for (what, len) in [
            ("weights", weights.as_ref().map(Vec::len)),
            ("names", names.as_ref().map(Vec::len)),
        ] {
            if let Some(len) = len {
                if len != n {
                    return Err(Error::config(format!(
                        "{what} lists {len} entries for {n} shards"
                    )));
                }
            }
        }
        let shards = urls
            .into_iter()
            .enumerate()
            .map(|(i, url)| ShardConfig {
                url,
                weight: weights.as_ref().map_or(1, |w| w[i]),
                name: names.as_ref().map(|n| n[i].clone()),
            })
            .collect();
        Ok(ShardedConfig {
            strategy: strategy.unwrap_or_else(default_strategy),
            vnodes,
            shards,
        })
    }

    /// The strategy's view of the shards.
    pub fn specs(&self) -> Vec<ShardSpec> {
        self.shards
            .iter()
            .map(|s| ShardSpec::new(s.effective_name()).weight(s.weight))
            .collect()
    }

    /// Checks the configuration without connecting.
    ///
    /// # Errors
    /// `InvalidConfig`, naming the problem (see the type's contract).
    pub fn validate(&self) -> Result<()> {
        if self.shards.is_empty() {
            return Err(Error::config(
                "a sharded configuration needs at least one shard",
            ));
        }
        let mut urls = std::collections::HashSet::new();
        for s in &self.shards {
            let url = s.url.trim();
            if url.is_empty() {
                return Err(Error::config("a shard has an empty URL"));
            }
            // The backend checks the rest of its URL when it connects.
            let parsed = BackendUrl::parse(url).map_err(|e| {
                Error::config(format!("shard URL {:?}: {}", redact(url), e.message()))
            })?;
            if parsed.scheme().starts_with("sharded") {
                return Err(Error::config(format!(
                    "shard {:?} is itself sharded; list its shards directly",
                    s.effective_name()
                )));
            }
            if !urls.insert(url.to_string()) {
                return Err(Error::config(format!(
                    "duplicate shard URL {:?}",
                    redact(url)
                )));
            }
        }
        // Names, weights and vnodes: the strategy checks them.
        self.strategy.build(&self.specs(), self.vnodes).map(|_| ())
    }

    /// Validates, connects to every shard (concurrently) and builds the store.
    ///
    /// # Errors
    /// `InvalidConfig` as [`validate`](Self::validate); otherwise the first shard's connect error,
    /// with the shard's name in its message.
    pub async fn connect(&self) -> Result<ShardedStore> {
        self.validate()?;
        let specs = self.specs();
        let calls = self
            .shards
            .iter()
            .map(|s| connect_boxed(s.url.trim().to_string()));
        let backends = futures::future::join_all(calls).await;
        let mut shards = Vec::with_capacity(backends.len());
        for ((spec, backend), url) in specs
            .into_iter()
            .zip(backends)
            .zip(self.shards.iter().map(|s| &s.url))
        {
            let backend = backend.map_err(|e| e.context(format_args!("shard {:?}", spec.name)))?;
            let mut shard = Shard::new(spec.name, backend).with_weight(spec.weight);
            // The same URL is the same cluster, except memory://, where each connect is new.
            if !url.trim().starts_with("memory:") {
                shard = shard.with_identity(format!("url:{}", url.trim()));
            }
            shards.push(shard);
        }
        ShardedStore::new(self.strategy, self.vnodes, shards)
    }
}

#[async_trait::async_trait]
impl BackendConfig for ShardedConfig {
    async fn connect(&self) -> Result<Arc<dyn Backend>> {
        Ok(Arc::new(ShardedConfig::connect(self).await?))
    }
}

impl Configurable for ShardedConfig {
    fn from_backend_url(url: &BackendUrl) -> Result<Self> {
        Self::parse_url(url)
    }

    fn validate(&self) -> Result<()> {
        ShardedConfig::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn toml_round_trip_and_defaults() {
        let cfg = ShardedConfig::from_toml(
            r#"
            [[shards]]
            url = "memory://a"
            [[shards]]
            url = "memory://b"
            weight = 3
            name = "bee"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.strategy, StrategyKind::Ring);
        assert_eq!(cfg.vnodes, None);
        assert_eq!(cfg.shards[0].weight, 1);
        assert_eq!(cfg.shards[0].effective_name(), "memory://a");
        assert_eq!(cfg.shards[1].effective_name(), "bee");
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(ShardedConfig::from_toml(&text).unwrap(), cfg);
    }

    #[test]
    fn invalid_configs_are_invalid_config() {
        let cases = [
            "shards = []",
            "strategy = \"maglev\"\n[[shards]]\nurl = \"memory://a\"",
            "[[shards]]\nurl = \"memory://a\"\n[[shards]]\nurl = \"memory://a\"",
            "[[shards]]\nurl = \"memory://a\"\nname = \"x\"\n[[shards]]\nurl = \"memory://b\"\nname = \"x\"",
            "[[shards]]\nurl = \"memory://a\"\nweight = 0",
            "strategy = \"jump\"\n[[shards]]\nurl = \"memory://a\"\nweight = 2",
            "vnodes = 0\n[[shards]]\nurl = \"memory://a\"",
            "[[shards]]\nurl = \"\"",
            "[[shards]]\nurl = \"not a url\"",
            "[[shards]]\nurl = \"sharded+ring://?shard=memory://\"",
            "[[shards]]\nurl = \"memory://a\"\nbogus = 1",
            "not toml at all [",
        ];
        for text in cases {
            let e = ShardedConfig::from_toml(text).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{text}: {e}");
        }
    }

    #[test]
    fn url_form() {
        let url =
            Url::parse("sharded+jump://?shard=memory://a&shard=memory://b&names=x,y").unwrap();
        let cfg = ShardedConfig::from_url(&url).unwrap();
        assert_eq!(cfg.strategy, StrategyKind::Jump);
        assert_eq!(cfg.specs()[1].name, "y");
        let url =
            Url::parse("sharded://?strategy=ring&vnodes=8&shard=memory://a&weights=2").unwrap();
        let cfg = ShardedConfig::from_url(&url).unwrap();
        assert_eq!((cfg.vnodes, cfg.shards[0].weight), (Some(8), 2));
        for bad in [
            "sharded+ring://",
            "sharded+maglev://?shard=memory://a",
            "sharded+ring://host?shard=memory://a",
            "sharded+ring://?shard=memory://a&weights=1,2",
            "sharded+ring://?shard=memory://a&what=1",
            "sharded+ring://?shard=memory://a&shard=memory://a",
            "sharded+ring://?shard=memory://a&vnodes=x",
        ] {
            let e = ShardedConfig::from_url(&Url::parse(bad).unwrap()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}: {e}");
        }
    }

    #[test]
    fn debug_hides_passwords() {
        let cfg = ShardedConfig::new(
            StrategyKind::Ring,
            vec![ShardConfig::new("etcd://user:secret@h:2379")],
        );
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(!cfg.shards[0].effective_name().contains("secret"));
    }
}
