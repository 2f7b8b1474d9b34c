//! The backend registry: one [`BackendEntry`] per backend (its URL schemes, its TOML table, its
//! cargo feature and its configuration type). [`connect`](crate::connect), configuration files
//! and the CLI find backends here and nowhere else; the table itself is
//! [`crate::backend::REGISTRY`].

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use super::url::BackendUrl;
use crate::error::{Error, Result};
use crate::Backend;

/// `&dyn Any` for any `'static` type, so that a [`BackendConfig`] can be downcast.
pub trait AsAny: Any {
    /// `self` as `&dyn Any`.
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A backend's configuration, as the registry holds it: it knows how to connect. `Debug` hides
/// secrets.
#[async_trait]
pub trait BackendConfig: fmt::Debug + Send + Sync + AsAny {
    /// Connects to the configured backend (without the [`Traced`](crate::trace::Traced)
    /// wrapper).
    ///
    /// # Errors
    /// What the backend's connect returns.
    async fn connect(&self) -> Result<Arc<dyn Backend>>;
}

impl dyn BackendConfig {
    /// The configuration as its concrete type (`EtcdConfig`, `ZkConfig`, …).
    pub fn downcast_ref<T: Any>(&self) -> Option<&T> {
        self.as_any().downcast_ref()
    }
}

/// What a backend's configuration type provides to the registry: its URL form, its TOML table
/// form (through `Deserialize`), and one validation both go through.
pub trait Configurable: BackendConfig + DeserializeOwned + Sized {
    /// Builds the configuration from a URL of one of the backend's schemes.
    ///
    /// # Errors
    /// `InvalidConfig` naming what is wrong, never a secret.
    fn from_backend_url(url: &BackendUrl) -> Result<Self>;

    /// Checks the configuration without connecting.
    ///
    /// # Errors
    /// `InvalidConfig` naming the bad setting.
    fn validate(&self) -> Result<()>;

    /// Builds the configuration from the backend's TOML table (`[etcd]`, …), after `X_env`
    /// references and environment overrides were applied. The default deserializes the table.
    ///
    /// # Errors
    /// `InvalidConfig` naming the table and the unknown or malformed setting.
    fn from_table(table_name: &str, table: toml::Table) -> Result<Self> {
        Self::deserialize(toml::Value::Table(table)).map_err(|e| {
            Error::config(format!(
                "[{table_name}]: {}",
                e.to_string().trim().replace('\n', " ")
            ))
        })
    }
}

/// How the registry builds a backend's configuration; `None` in an entry whose feature this
/// build lacks.
#[derive(Clone, Copy)]
pub struct Constructors {
    from_url: fn(&BackendUrl) -> Result<Arc<dyn BackendConfig>>,
    from_table: fn(&str, toml::Table) -> Result<Arc<dyn BackendConfig>>,
}

fn url_ctor<T: Configurable>(url: &BackendUrl) -> Result<Arc<dyn BackendConfig>> {
    let c = T::from_backend_url(url)?;
    c.validate()?;
    Ok(Arc::new(c))
}

fn table_ctor<T: Configurable>(name: &str, table: toml::Table) -> Result<Arc<dyn BackendConfig>> {
    let c = T::from_table(name, table)?;
    c.validate()?;
    Ok(Arc::new(c))
}

impl Constructors {
    /// The constructors of configuration type `T`.
    pub const fn of<T: Configurable>() -> Self {
        Constructors {
            from_url: url_ctor::<T>,
            from_table: table_ctor::<T>,
        }
    }
}

/// One backend in the registry.
#[derive(Clone, Copy)]
pub struct BackendEntry {
    /// The backend's name (`"etcd"`).
    pub name: &'static str,
    /// Its URL schemes. A scheme ending in `+<…>` matches any suffix (`sharded+<strategy>`).
    pub schemes: &'static [&'static str],
    /// Its table in a configuration file (`[zookeeper]`).
    pub table: &'static str,
    /// The cargo feature it needs; `None` when always built.
    pub feature: Option<&'static str>,
    /// Its constructors, `None` when this build lacks the feature.
    pub constructors: Option<Constructors>,
}

impl fmt::Debug for BackendEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendEntry")
            .field("name", &self.name)
            .field("schemes", &self.schemes)
            .field("table", &self.table)
            .field("feature", &self.feature)
            .field("built", &self.constructors.is_some())
            .finish()
    }
}

impl BackendEntry {
    /// Whether `scheme` (lower-case) is one of this backend's.
    pub fn matches(&self, scheme: &str) -> bool {
        self.schemes.iter().any(|s| match s.split_once("+<") {
            Some((base, _)) => scheme
                .strip_prefix(base)
                .is_some_and(|rest| rest.starts_with('+') && rest.len() > 1),
            None => *s == scheme,
        })
    }

    /// Whether this build has the backend.
    pub fn is_built(&self) -> bool {
        self.constructors.is_some()
    }

    fn constructors(&self, what: &str) -> Result<Constructors> {
        self.constructors.ok_or_else(|| {
            Error::config(format!(
                "{what} needs the {} backend, which is not in this build; enable the cargo \
                 feature `{}`",
                self.name,
                self.feature.unwrap_or(self.name)
            ))
        })
    }

    /// Builds and validates the configuration from a URL of this backend.
    ///
    /// # Errors
    /// `InvalidConfig` for a bad URL or a backend this build lacks.
    pub fn config_from_url(&self, url: &BackendUrl) -> Result<Arc<dyn BackendConfig>> {
        let c = self.constructors(&format!("the {}:// URL", url.scheme()))?;
        (c.from_url)(url)
    }

    /// Builds and validates the configuration from this backend's TOML table.
    ///
    /// # Errors
    /// `InvalidConfig` for a bad table or a backend this build lacks.
    pub fn config_from_table(&self, table: toml::Table) -> Result<Arc<dyn BackendConfig>> {
        let c = self.constructors(&format!("the [{}] table", self.table))?;
        (c.from_table)(self.table, table)
    }
}

/// The entry whose schemes include `scheme`.
pub fn by_scheme(scheme: &str) -> Option<&'static BackendEntry> {
    crate::backend::REGISTRY.iter().find(|e| e.matches(scheme))
}

/// The entry whose configuration-file table is `table`.
pub fn by_table(table: &str) -> Option<&'static BackendEntry> {
    crate::backend::REGISTRY.iter().find(|e| e.table == table)
}

/// Every known scheme as `scheme://`, for messages.
pub fn known_schemes() -> String {
    crate::backend::REGISTRY
        .iter()
        .flat_map(|e| e.schemes.iter().map(|s| format!("{s}://")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every known table as `[table]`, for messages.
pub fn known_tables() -> String {
    crate::backend::REGISTRY
        .iter()
        .map(|e| format!("[{}]", e.table))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Declares [`crate::backend::REGISTRY`]: one line per backend.
macro_rules! registry {
    ($( $id:ident: $name:literal, schemes [$($scheme:literal),+], table $table:literal,
        feature $feature:tt, $config:path; )*) => {
        #[allow(non_upper_case_globals)]
        mod constructors {
            #[allow(unused_imports)]
            use super::*;
            $( $crate::config::registry::registry!(@ctor $id, $feature, $config); )*
        }

        /// Every backend this crate knows, built or not (see
        /// [`registry`](crate::config::registry)). Adding a backend adds one line here.
        pub const REGISTRY: &[$crate::config::registry::BackendEntry] = &[$(
            $crate::config::registry::BackendEntry {
                name: $name,
                schemes: &[$($scheme),+],
                table: $table,
                feature: $crate::config::registry::registry!(@feature $feature),
                constructors: constructors::$id,
            },
        )*];
    };
    (@ctor $id:ident, always, $config:path) => {
        pub(super) const $id: Option<$crate::config::registry::Constructors> =
            Some($crate::config::registry::Constructors::of::<$config>());
    };
    (@ctor $id:ident, $feature:tt, $config:path) => {
        #[cfg(feature = $feature)]
        pub(super) const $id: Option<$crate::config::registry::Constructors> =
            Some($crate::config::registry::Constructors::of::<$config>());
        #[cfg(not(feature = $feature))]
        pub(super) const $id: Option<$crate::config::registry::Constructors> = None;
    };
    (@feature always) => { None };
    (@feature $feature:tt) => { Some($feature) };
}
pub(crate) use registry;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_consistent() {
        let reg = crate::backend::REGISTRY;
        for (i, e) in reg.iter().enumerate() {
            for other in &reg[i + 1..] {
                assert_ne!(e.table, other.table);
                for s in e.schemes {
                    assert!(!other.schemes.contains(s), "{s} twice");
                }
            }
            assert_eq!(by_table(e.table).map(|x| x.name), Some(e.name));
        }
        assert_eq!(by_scheme("memory").map(|e| e.name), Some("memory"));
        assert_eq!(by_scheme("sharded+ring").map(|e| e.name), Some("sharded"));
        assert!(by_scheme("sharded+").is_none());
        assert!(by_scheme("shardedx").is_none());
        assert!(by_scheme("http").is_none());
    }
}
