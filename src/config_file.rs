//! The TOML configuration file: [`ConfigFile`], [`connect_config`], and duration parsing.
//!
//! A configuration file names one backend: by URL, by a table that holds the backend's own
//! configuration struct (`[etcd]` is an `EtcdConfig`, `[zookeeper]` a `ZkConfig`, `[consul]` a
//! `ConsulConfig`, `[sharded]` a [`ShardedConfig`](crate::shard::ShardedConfig)), or `[memory]`.
//!
//! Secrets can stay out of the file: any setting `X` may instead be written `X_env = "VAR"`,
//! which reads the value from the environment variable `VAR` (an unset variable is an error).
//! Environment variables override the file: `COORDKIT_URL` replaces the whole backend choice,
//! and `COORDKIT_<TABLE>_<SETTING>` (for example `COORDKIT_ETCD_PASSWORD`,
//! `COORDKIT_ZOOKEEPER_SESSION_TIMEOUT`) replaces one setting of the backend table.
//!
//! ```toml
//! [etcd]
//! endpoints = ["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"]
//! namespace = "myapp/"
//! request_timeout = "3s"
//! user = "app"
//! password_env = "ETCD_PASSWORD"   # the password comes from this variable
//! ```
//!
//! The complete format is `docs/configuration.md`, with the commented example
//! `docs/coordkit.example.toml`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::registry::{self, BackendConfig};
use crate::config::{redact, BackendUrl};
use crate::error::{Error, Result};
use crate::Backend;

pub use crate::config::duration::{format as format_duration, parse as parse_duration};

/// The top-level settings a configuration file may hold besides the backend tables.
const TOP_LEVEL: &[&str] = &["url", "url_env", "password_env"];

/// A parsed configuration file. Build it with [`ConfigFile::parse`] or [`ConfigFile::load`],
/// then [`resolve`](ConfigFile::resolve) it and [`connect`](Resolved::connect), or call
/// [`connect_config`].
///
/// # Contract
/// Exactly one of `url` (or `url_env`) and the backend tables of
/// [`REGISTRY`](crate::backend::REGISTRY) (`[memory]`, `[etcd]`, `[zookeeper]`, `[consul]`,
/// `[sharded]`) is given, or `COORDKIT_URL` is set. Unknown settings and tables are errors, so
/// a misspelt setting is never silently ignored.
#[derive(Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct ConfigFile {
    /// The backend URL, as for [`connect`](crate::connect).
    pub url: Option<String>,
    /// With `url`: the environment variable holding the whole URL instead.
    pub url_env: Option<String>,
    /// With `url`: the environment variable holding the password to put into the URL's user
    /// information (`etcd://user@host` becomes `etcd://user:<password>@host`).
    pub password_env: Option<String>,
    /// The backend tables, by name (`etcd` holds the fields of `EtcdConfig`, and so on: each
    /// registry entry names its table).
    pub tables: BTreeMap<String, toml::Table>,
}

impl<'de> Deserialize<'de> for ConfigFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let table = toml::Table::deserialize(d)?;
        ConfigFile::from_toml(table).map_err(|e| serde::de::Error::custom(e.message()))
    }
}

impl fmt::Debug for ConfigFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tables: BTreeMap<&str, Vec<&String>> = self
            .tables
            .iter()
            .map(|(k, t)| (k.as_str(), t.keys().collect()))
            .collect();
        f.debug_struct("ConfigFile")
            .field("url", &self.url.as_deref().map(redact))
            .field("url_env", &self.url_env)
            .field("password_env", &self.password_env)
            .field("tables", &tables)
            .finish()
    }
}

/// What a configuration resolved to: the backend to connect to. `Debug` hides secrets (it
/// uses the backends' own redacting `Debug`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Resolved {
    /// A backend URL (from `url`, `url_env` or `COORDKIT_URL`).
    Url(RedactedUrl),
    /// A backend table, as the backend's configuration type (see [`Resolved::config`]).
    Config(Arc<dyn BackendConfig>),
}

/// A URL that may carry secrets: `Debug` and `Display` hide them; [`expose`](Self::expose)
/// gives the real one.
#[derive(Clone, PartialEq, Eq)]
pub struct RedactedUrl(String);

impl RedactedUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        RedactedUrl(url.into())
    }

    /// The URL with its secrets, to pass to [`connect`](crate::connect). Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact(&self.0))
    }
}

impl fmt::Display for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl Resolved {
    /// Connects to the configured backend, wrapped in [`Traced`](crate::trace::Traced) as
    /// [`connect`](crate::connect) does.
    ///
    /// # Errors
    /// What the backend's connect returns.
    pub async fn connect(&self) -> Result<Arc<dyn Backend>> {
        match self {
            Resolved::Url(u) => crate::config::connect(u.expose()).await,
            Resolved::Config(c) => Ok(crate::trace::traced(c.connect().await?)),
        }
    }

    /// The backend table's configuration as its type (`EtcdConfig`, `ZkConfig`,
    /// `MemoryConfig`, …); `None` for a URL or another type.
    pub fn config<T: std::any::Any>(&self) -> Option<&T> {
        match self {
            Resolved::Config(c) => c.downcast_ref(),
            Resolved::Url(_) => None,
        }
    }
}

/// The environment as seen by [`ConfigFile::resolve`]: the process environment in normal use
/// ([`process_env`]), a map in tests. Empty variables count as unset.
pub type Env = BTreeMap<String, String>;

/// A snapshot of the process environment (non-UTF-8 and empty variables left out).
pub fn process_env() -> Env {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

fn lookup<'a>(env: &'a Env, name: &str) -> Option<&'a str> {
    env.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// Replaces every `X_env = "VAR"` in `table` (and nested tables and arrays of tables) by
/// `X = <value of VAR>`.
fn expand_env_refs(table: &mut toml::Table, env: &Env, path: &str) -> Result<()> {
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        if let Some(setting) = key.strip_suffix("_env") {
            let Some(toml::Value::String(var)) = table.get(&key).cloned() else {
                return Err(Error::config(format!(
                    "{here} must be the name of an environment variable (a string)"
                )));
            };
            if table.contains_key(setting) {
                return Err(Error::config(format!(
                    "both {setting} and {key} are set{}; keep one",
                    if path.is_empty() {
                        String::new()
                    } else {
                        format!(" in [{path}]")
                    }
                )));
            }
            let value = lookup(env, &var).ok_or_else(|| {
                Error::config(format!(
                    "{here} names the environment variable {var}, which is not set"
                ))
            })?;
            table.remove(&key);
            table.insert(setting.to_string(), toml::Value::String(value.to_string()));
            continue;
        }
        match table.get_mut(&key) {
            Some(toml::Value::Table(t)) => expand_env_refs(t, env, &here)?,
            Some(toml::Value::Array(items)) => {
                for (i, item) in items.iter_mut().enumerate() {
                    if let toml::Value::Table(t) = item {
                        expand_env_refs(t, env, &format!("{here}[{i}]"))?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Applies `COORDKIT_<TABLE>_<SETTING>` variables to a backend table. The value takes the type
/// of the setting it replaces (a list is split at commas); a setting not in the file is a list
/// for `endpoints`/`servers`, a boolean for `true`/`false`, an integer for digits, else a
/// string.
fn apply_overrides(table_name: &str, table: &mut toml::Table, env: &Env) -> Result<()> {
    let prefix = format!("COORDKIT_{}_", table_name.to_ascii_uppercase());
    for (var, value) in env.range(prefix.clone()..) {
        let Some(setting) = var.strip_prefix(&prefix) else {
            break;
        };
        if setting.is_empty() || value.is_empty() {
            continue;
        }
        let key = setting.to_ascii_lowercase();
        let bad = |what: &str| Error::config(format!("{var}: expected {what}, got {value:?}"));
        let list = || {
            toml::Value::Array(
                value
                    .split(',')
                    .map(|s| toml::Value::String(s.trim().to_string()))
                    .filter(|v| v.as_str() != Some(""))
                    .collect(),
            )
        };
        let new = match table.get(&key) {
            Some(toml::Value::Array(_)) => list(),
            Some(toml::Value::Integer(_)) => {
                toml::Value::Integer(value.trim().parse().map_err(|_| bad("an integer"))?)
            }
            Some(toml::Value::Boolean(_)) => {
                toml::Value::Boolean(value.trim().parse().map_err(|_| bad("true or false"))?)
            }
            Some(toml::Value::Float(_)) => {
                toml::Value::Float(value.trim().parse().map_err(|_| bad("a number"))?)
            }
            Some(_) => toml::Value::String(value.clone()),
            None if matches!(key.as_str(), "endpoints" | "servers") => list(),
            None if value == "true" || value == "false" => toml::Value::Boolean(value == "true"),
            None if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                toml::Value::Integer(value.parse().map_err(|_| bad("an integer"))?)
            }
            None => toml::Value::String(value.clone()),
        };
        // An override replaces the `_env` form of the same setting too.
        table.remove(&format!("{key}_env"));
        table.insert(key, new);
    }
    Ok(())
}

impl ConfigFile {
    fn from_toml(table: toml::Table) -> Result<Self> {
        let mut cfg = ConfigFile::default();
        for (key, value) in table {
            let string = |v: toml::Value| match v {
                toml::Value::String(s) => Ok(Some(s)),
                _ => Err(Error::config(format!("{key} must be a string"))),
            };
            match key.as_str() {
                "url" => cfg.url = string(value)?,
                "url_env" => cfg.url_env = string(value)?,
                "password_env" => cfg.password_env = string(value)?,
                name if registry::by_table(name).is_some() => match value {
                    toml::Value::Table(t) => {
                        cfg.tables.insert(key, t);
                    }
                    _ => return Err(Error::config(format!("{name} must be a table, [{name}]"))),
                },
                _ => {
                    return Err(Error::config(format!(
                        "unknown field `{key}`, expected one of {}, or a table {}",
                        TOP_LEVEL.join(", "),
                        registry::known_tables()
                    )))
                }
            }
        }
        Ok(cfg)
    }

    /// Parses a configuration from TOML text.
    ///
    /// # Errors
    /// `InvalidConfig` with the TOML error (line and column, the unknown or malformed setting).
    pub fn parse(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            Error::config(format!(
                "invalid configuration: {}",
                e.to_string().trim().replace('\n', " ")
            ))
        })
    }

    /// Reads and parses the configuration file at `path`.
    ///
    /// # Errors
    /// `InvalidConfig` if the file cannot be read or is not a valid configuration; the message
    /// names the file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!(
                "cannot read configuration file {}: {e}",
                path.display()
            ))
        })?;
        Self::parse(&text)
            .map_err(|e| Error::config(format!("{}: {}", path.display(), e.message())))
    }

    /// Resolves the configuration with environment overrides from `env` (see the
    /// [module docs](self)).
    ///
    /// # Errors
    /// `InvalidConfig` when no backend or more than one is given, a table's settings do not fit
    /// the backend's configuration struct (unknown or malformed setting), a table needs a
    /// feature this build lacks, an `X_env` variable is unset, or a setting is given both
    /// directly and as `X_env`.
    pub fn resolve(&self, env: &Env) -> Result<Resolved> {
        let tables: Vec<(&str, &toml::Table)> =
            self.tables.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let url_given = self.url.is_some() || self.url_env.is_some();
        let mut names: Vec<&str> = tables.iter().map(|(n, _)| *n).collect();
        if url_given {
            names.insert(0, "url");
        }
        if names.len() > 1 {
            return Err(Error::config(format!(
                "the configuration names more than one backend ({}); give exactly one",
                names.join(", ")
            )));
        }
        if self.url.is_some() && self.url_env.is_some() {
            return Err(Error::config("both url and url_env are set; keep one"));
        }
        if self.password_env.is_some() && !url_given {
            return Err(Error::config(
                "password_env at the top level goes with url; in a backend table, write the \
                 table's own setting with _env (for example password_env in [etcd])",
            ));
        }
        if let Some(url) = lookup(env, "COORDKIT_URL") {
            return Ok(Resolved::Url(RedactedUrl(url.to_string())));
        }
        if url_given {
            let url = match (&self.url, &self.url_env) {
                (Some(u), _) => u.clone(),
                (None, Some(var)) => lookup(env, var)
                    .ok_or_else(|| {
                        Error::config(format!(
                            "url_env names the environment variable {var}, which is not set"
                        ))
                    })?
                    .to_string(),
                (None, None) => String::new(),
            };
            let url = match &self.password_env {
                None => url,
                Some(var) => {
                    let pw = lookup(env, var).ok_or_else(|| {
                        Error::config(format!(
                            "password_env names the environment variable {var}, which is not set"
                        ))
                    })?;
                    with_password(&url, pw)?
                }
            };
            return Ok(Resolved::Url(RedactedUrl(url)));
        }
        let Some((name, table)) = tables.first() else {
            return Err(Error::config(format!(
                "the configuration names no backend: set `url`, or add one of the tables {}, or \
                 set COORDKIT_URL",
                registry::known_tables()
            )));
        };
        let entry = registry::by_table(name)
            .ok_or_else(|| Error::config(format!("unknown table [{name}]")))?;
        let mut table = (*table).clone();
        expand_env_refs(&mut table, env, name)?;
        apply_overrides(name, &mut table, env)?;
        Ok(Resolved::Config(entry.config_from_table(table)?))
    }

    /// [`resolve`](Self::resolve) with the process environment.
    ///
    /// # Errors
    /// As [`resolve`](Self::resolve).
    pub fn resolve_from_env(&self) -> Result<Resolved> {
        self.resolve(&process_env())
    }
}

/// `url` with `password` set in its user information.
fn with_password(url: &str, password: &str) -> Result<String> {
    let mut u = BackendUrl::parse(url)?;
    if u.user().is_none() {
        return Err(Error::config(
            "password_env needs a user name in the url (scheme://user@host…)",
        ));
    }
    if u.password().is_some() {
        return Err(Error::config(
            "the url already holds a password; remove it or password_env",
        ));
    }
    u.set_password(password);
    Ok(u.to_url_string())
}

/// Loads the configuration file at `path`, applies the environment overrides, and connects.
///
/// ```no_run
/// # async fn f() -> coordkit::Result<()> {
/// let store = coordkit::connect_config("/etc/coordkit.toml").await?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// `InvalidConfig` for an unreadable or invalid file (see [`ConfigFile::resolve`]); otherwise
/// what the backend's connect returns.
pub async fn connect_config(path: impl AsRef<Path>) -> Result<Arc<dyn Backend>> {
    let path = path.as_ref();
    ConfigFile::load(path)?
        .resolve_from_env()
        .map_err(|e| e.context(path.display()))?
        .connect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::time::Duration;

    fn env_of(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn resolve(text: &str, env: &[(&str, &str)]) -> Result<Resolved> {
        ConfigFile::parse(text)?.resolve(&env_of(env))
    }

    #[test]
    fn durations_are_the_one_grammar() {
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        for bad in ["10", "", "1e300", "99999999999999999999h"] {
            let e = parse_duration(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}");
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn url_form_with_password_from_env() {
        let r = resolve(
            "url = \"etcd://app@10.0.0.1:2379,10.0.0.2:2379?namespace=myapp/\"\npassword_env = \"PW\"\n",
            &[("PW", "p@ss:w/rd")],
        )
        .unwrap();
        let Resolved::Url(u) = &r else {
            panic!("{r:?}")
        };
        let raw = BackendUrl::parse(u.expose()).unwrap();
        assert_eq!(raw.user(), Some("app"));
        assert_eq!(raw.password(), Some("p@ss:w/rd"));
        assert_eq!(raw.host_list(), "10.0.0.1:2379,10.0.0.2:2379");
        assert_eq!(raw.query(), [("namespace".into(), "myapp/".into())]);
        assert!(!format!("{r:?}").contains("p@ss"), "{r:?}");
        assert!(u
            .to_string()
            .starts_with("etcd://app:***@10.0.0.1:2379,10.0.0.2:2379?"));
        let r = resolve("url_env = \"U\"\n", &[("U", "memory://")]).unwrap();
        assert!(matches!(r, Resolved::Url(u) if u.expose() == "memory://"));
    }

    #[test]
    fn coordkit_url_overrides_everything() {
        let r = resolve(
            "[memory]\n",
            &[("COORDKIT_URL", "consul://h:8500?token=t0k")],
        )
        .unwrap();
        assert!(matches!(&r, Resolved::Url(u) if u.expose() == "consul://h:8500?token=t0k"));
        assert!(!format!("{r:?}").contains("t0k"));
        assert!(matches!(
            resolve("", &[("COORDKIT_URL", "memory://")]),
            Ok(Resolved::Url(_))
        ));
    }

    #[test]
    fn env_refs_and_overrides_in_tables() {
        let mut t: toml::Table = toml::from_str(
            "endpoints = [\"a:1\"]\nmax = 3\ntls = false\npassword_env = \"PW\"\n[[shards]]\nurl_env = \"S1\"\n",
        )
        .unwrap();
        let env = env_of(&[
            ("PW", "secret"),
            ("S1", "memory://"),
            ("COORDKIT_ETCD_ENDPOINTS", "b:2, c:3"),
            ("COORDKIT_ETCD_MAX", "9"),
            ("COORDKIT_ETCD_TLS", "true"),
            ("COORDKIT_ETCD_NAMESPACE", "ns/"),
            ("COORDKIT_ETCDX", "ignored"),
        ]);
        expand_env_refs(&mut t, &env, "etcd").unwrap();
        apply_overrides("etcd", &mut t, &env).unwrap();
        let want: toml::Table = toml::from_str(
            "endpoints = [\"b:2\", \"c:3\"]\nmax = 9\ntls = true\npassword = \"secret\"\nnamespace = \"ns/\"\n[[shards]]\nurl = \"memory://\"\n",
        )
        .unwrap();
        assert_eq!(t, want);
        let e =
            apply_overrides("etcd", &mut t, &env_of(&[("COORDKIT_ETCD_MAX", "many")])).unwrap_err();
        assert!(e.message().contains("COORDKIT_ETCD_MAX"), "{e}");
    }

    #[test]
    fn memory_and_sharded_tables() {
        let r = resolve("[memory]\n", &[]).unwrap();
        assert!(r.config::<crate::backend::memory::MemoryConfig>().is_some());
        let r = resolve(
            "[sharded]\nstrategy = \"ring\"\n[[sharded.shards]]\nurl = \"memory://\"\nname = \"a\"\n[[sharded.shards]]\nurl_env = \"B\"\nname = \"b\"\n",
            &[("B", "memory://?b")],
        )
        .unwrap();
        let c: &crate::shard::ShardedConfig = r.config().unwrap();
        assert_eq!(c.shards.len(), 2);
        assert_eq!(c.shards[1].url, "memory://?b");
    }

    /// (configuration text, environment, what the error message must contain)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

    #[test]
    fn invalid_configurations_are_named() {
        let cases: &[Case] = &[
            ("", &[], "names no backend"),
            ("url = \"memory://\"\n[memory]\n", &[], "more than one"),
            ("urll = 1\n", &[], "unknown field"),
            ("[memory]\nx = 1\n", &[], "takes no settings"),
            ("url_env = \"NOPE\"\n", &[], "NOPE"),
            (
                "url = \"etcd://h:1\"\npassword_env = \"PW\"\n",
                &[("PW", "x")],
                "user name",
            ),
            (
                "password_env = \"PW\"\n[memory]\n",
                &[("PW", "x")],
                "goes with url",
            ),
            (
                "[memory]\npassword_env = \"PW\"\n",
                &[("PW", "x")],
                "takes no settings",
            ),
            ("[sharded]\nshards = []\n", &[], "shard"),
            (
                "[sharded]\nstrategy = \"bogus\"\nshards = []\n",
                &[],
                "[sharded]",
            ),
            (
                "[sharded]\n[[sharded.shards]]\nurl = \"memory://\"\nurl_env = \"X\"\n",
                &[("X", "memory://")],
                "keep one",
            ),
            ("[sharded]\nshards_env = 3\n", &[], "environment variable"),
        ];
        for (text, env, needle) in cases {
            let e = resolve(text, env).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{text}");
            assert!(e.message().contains(needle), "{text}: {e}");
        }
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_table_is_an_etcd_config() {
        let r = resolve(
            "[etcd]\nendpoints = [\"10.0.0.1:2379\"]\nnamespace = \"app/\"\nrequest_timeout = \"3s\"\nuser = \"u\"\npassword_env = \"PW\"\n",
            &[("PW", "hunter2")],
        )
        .unwrap();
        let c: &crate::backend::etcd::EtcdConfig = r.config().unwrap();
        assert_eq!(c.endpoints, vec!["10.0.0.1:2379".to_string()]);
        assert_eq!(c.request_timeout, Duration::from_secs(3));
        assert_eq!(c.password.as_deref(), Some("hunter2"));
        assert!(!format!("{r:?}").contains("hunter2"));
        let e = resolve("[etcd]\nendpoints = [\"a:1\"]\ntimeout = \"3s\"\n", &[]).unwrap_err();
        assert!(
            e.message().contains("[etcd]") && e.message().contains("timeout"),
            "{e}"
        );
    }

    #[cfg(feature = "zookeeper")]
    #[test]
    fn zookeeper_table_is_a_zk_config() {
        let r = resolve(
            "[zookeeper]\nservers = [\"a:2181\", \"b:2181\"]\nchroot = \"/app\"\nsession_timeout = \"10s\"\n",
            &[("COORDKIT_ZOOKEEPER_SESSION_TIMEOUT", "20s")],
        )
        .unwrap();
        let c: &crate::backend::zookeeper::ZkConfig = r.config().unwrap();
        assert_eq!(c.servers.len(), 2);
        assert_eq!(c.session_timeout, Duration::from_secs(20));
    }

    #[cfg(feature = "consul")]
    #[test]
    fn consul_table_is_a_consul_config() {
        let r = resolve(
            "[consul]\naddress = \"127.0.0.1:8500\"\ntoken_env = \"CONSUL_HTTP_TOKEN\"\n",
            &[("CONSUL_HTTP_TOKEN", "tok-123")],
        )
        .unwrap();
        assert!(!format!("{r:?}").contains("tok-123"), "{r:?}");
        let c: &crate::backend::consul::ConsulConfig = r.config().unwrap();
        assert_eq!(c.token.as_deref(), Some("tok-123"));
    }

    #[tokio::test]
    async fn connect_config_reads_a_file() {
        let dir = std::env::temp_dir().join(format!("coordkit-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[memory]\n").unwrap();
        let r = ConfigFile::load(&path)
            .unwrap()
            .resolve(&Env::new())
            .unwrap();
        let store = r.connect().await.unwrap();
        assert_eq!(store.capabilities().backend, "memory");
        let e = connect_config(dir.join("missing.toml")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.message().contains("missing.toml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
