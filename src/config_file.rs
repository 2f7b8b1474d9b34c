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
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::Backend;

/// Query options whose values are secret: hidden by [`redact_url`].
const SECRET_OPTIONS: &[&str] = &["password", "token", "acl_token", "auth", "digest"];

/// The backend tables a configuration file may hold, with the feature each needs.
pub const TABLES: &[(&str, &str)] = &[
    ("memory", "always built"),
    ("etcd", "feature `etcd`"),
    ("zookeeper", "feature `zookeeper`"),
    ("consul", "feature `consul`"),
    ("sharded", "always built"),
];

/// Parses a duration such as `500ms`, `10s`, `2m`, `1h`, `1m30s` or `1.5s`.
///
/// Units: `ms`, `s`, `m`, `h`. A number without a unit is rejected, because it is ambiguous.
///
/// # Errors
/// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) naming the input and the
/// accepted forms.
pub fn parse_duration(input: &str) -> Result<Duration> {
    let bad = |why: &str| {
        Error::config(format!(
            "invalid duration {input:?}: {why}; use a number with a unit, e.g. 500ms, 10s, 2m, 1h"
        ))
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(bad("it is empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(bad("expected a number"));
        }
        let number: f64 = rest[..num_len]
            .parse()
            .map_err(|_| bad("the number is malformed"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let seconds = match unit {
            "ms" => number / 1000.0,
            "s" => number,
            "m" => number * 60.0,
            "h" => number * 3600.0,
            "" => return Err(bad("a unit is missing")),
            _ => return Err(bad(&format!("unknown unit {unit:?}"))),
        };
        let part = Duration::try_from_secs_f64(seconds).map_err(|_| bad("out of range"))?;
        total = total.checked_add(part).ok_or_else(|| bad("out of range"))?;
    }
    Ok(total)
}

/// Formats a duration the way [`parse_duration`] reads it (`1500ms`, `10s`, `2m`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `url` with its password and secret query options (`token`, …) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match RawUrl::parse(url) {
        Ok(mut u) => {
            if let Some((_, pass)) = &mut u.userinfo {
                if pass.is_some() {
                    *pass = Some("***".to_string());
                }
            }
            for (k, v) in &mut u.query {
                if SECRET_OPTIONS.contains(&k.as_str()) {
                    *v = "***".to_string();
                }
            }
            u.to_url_string()
        }
        Err(_) => crate::config::redact(url),
    }
}

/// A backend URL taken apart without the `url` crate's host rules, which reject the
/// comma-separated host lists of `etcd://` and `zk://`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawUrl {
    scheme: String,
    /// Decoded user name and password.
    userinfo: Option<(String, Option<String>)>,
    hosts: String,
    path: String,
    /// Decoded query pairs.
    query: Vec<(String, String)>,
}

fn pct_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn pct_encode_userinfo(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl RawUrl {
    fn parse(input: &str) -> Result<Self> {
        let input = input.trim();
        let bad = |why: &str| {
            Error::config(format!(
                "malformed backend URL {:?}: {why}",
                crate::config::redact(input)
            ))
        };
        let (scheme, rest) = input
            .split_once("://")
            .ok_or_else(|| bad("expected SCHEME://…"))?;
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return Err(bad("the scheme is malformed"));
        }
        if rest.contains('#') || rest.chars().any(|c| c.is_whitespace()) {
            return Err(bad("it contains '#' or whitespace"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i..]),
            None => (before_query, ""),
        };
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => {
                let (user, pass) = match u.split_once(':') {
                    Some((user, pass)) => (pct_decode(user), Some(pct_decode(pass))),
                    None => (pct_decode(u), None),
                };
                (Some((user, pass)), h)
            }
            None => (None, authority),
        };
        let query = query
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(RawUrl {
            scheme: scheme.to_ascii_lowercase(),
            userinfo,
            hosts: hosts.to_string(),
            path: path.to_string(),
            query,
        })
    }

    fn to_url_string(&self) -> String {
        let mut s = format!("{}://", self.scheme);
        if let Some((user, pass)) = &self.userinfo {
            s.push_str(&pct_encode_userinfo(user));
            if let Some(p) = pass {
                s.push(':');
                if p == "***" {
                    s.push_str(p);
                } else {
                    s.push_str(&pct_encode_userinfo(p));
                }
            }
            s.push('@');
        }
        s.push_str(&self.hosts);
        s.push_str(&self.path);
        if !self.query.is_empty() {
            let enc =
                |x: &str| url::form_urlencoded::byte_serialize(x.as_bytes()).collect::<String>();
            let q: Vec<String> = self
                .query
                .iter()
                .map(|(k, v)| {
                    let v = if v == "***" { v.clone() } else { enc(v) };
                    format!("{}={v}", enc(k))
                })
                .collect();
            s.push('?');
            s.push_str(&q.join("&"));
        }
        s
    }
}

/// A parsed configuration file. Build it with [`ConfigFile::parse`] or [`ConfigFile::load`],
/// then [`resolve`](ConfigFile::resolve) it and [`connect`](Resolved::connect), or call
/// [`connect_config`].
///
/// # Contract
/// Exactly one of `url`, `[memory]`, `[etcd]`, `[zookeeper]`, `[consul]`, `[sharded]` is given
/// (or `COORDKIT_URL` is set). Unknown settings are errors, so a misspelt setting is never
/// silently ignored.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConfigFile {
    /// The backend URL, as for [`connect`](crate::connect).
    pub url: Option<String>,
    /// With `url`: the environment variable holding the whole URL instead.
    pub url_env: Option<String>,
    /// With `url`: the environment variable holding the password to put into the URL's user
    /// information (`etcd://user@host` becomes `etcd://user:<password>@host`).
    pub password_env: Option<String>,
    /// The in-memory backend (an empty table).
    pub memory: Option<toml::Table>,
    /// An etcd cluster: the fields of `EtcdConfig`.
    pub etcd: Option<toml::Table>,
    /// A ZooKeeper ensemble: the fields of `ZkConfig`.
    pub zookeeper: Option<toml::Table>,
    /// A Consul agent: the fields of `ConsulConfig`.
    pub consul: Option<toml::Table>,
    /// Several backends with client-side sharding: the fields of
    /// [`ShardedConfig`](crate::shard::ShardedConfig).
    pub sharded: Option<toml::Table>,
}

impl fmt::Debug for ConfigFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table =
            |t: &Option<toml::Table>| t.as_ref().map(|t| t.keys().cloned().collect::<Vec<_>>());
        f.debug_struct("ConfigFile")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("url_env", &self.url_env)
            .field("password_env", &self.password_env)
            .field("memory", &table(&self.memory))
            .field("etcd", &table(&self.etcd))
            .field("zookeeper", &table(&self.zookeeper))
            .field("consul", &table(&self.consul))
            .field("sharded", &table(&self.sharded))
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
    /// `[memory]`.
    Memory,
    /// `[etcd]`.
    #[cfg(feature = "etcd")]
    Etcd(crate::backend::etcd::EtcdConfig),
    /// `[zookeeper]`.
    #[cfg(feature = "zookeeper")]
    Zookeeper(crate::backend::zookeeper::ZkConfig),
    /// `[consul]`.
    #[cfg(feature = "consul")]
    Consul(crate::backend::consul::ConsulConfig),
    /// `[sharded]`.
    Sharded(crate::shard::ShardedConfig),
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
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl fmt::Display for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl Resolved {
    /// Connects to the configured backend, wrapped in [`Traced`](crate::trace::Traced) as
    /// [`connect`](crate::connect) does.
    ///
    /// # Errors
    /// What the backend's connect returns.
    pub async fn connect(&self) -> Result<Arc<dyn Backend>> {
        let backend: Arc<dyn Backend> = match self {
            Resolved::Url(u) => return crate::config::connect(u.expose()).await,
            Resolved::Memory => Arc::new(crate::MemoryStore::new()),
            #[cfg(feature = "etcd")]
            Resolved::Etcd(c) => {
                Arc::new(crate::backend::etcd::EtcdStore::connect(c.clone()).await?)
            }
            #[cfg(feature = "zookeeper")]
            Resolved::Zookeeper(c) => {
                Arc::new(crate::backend::zookeeper::ZkStore::connect(c.clone()).await?)
            }
            #[cfg(feature = "consul")]
            Resolved::Consul(c) => {
                Arc::new(crate::backend::consul::ConsulStore::connect(c.clone()).await?)
            }
            Resolved::Sharded(c) => Arc::new(c.connect().await?),
        };
        Ok(crate::trace::traced(backend))
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

fn typed<T: serde::de::DeserializeOwned>(name: &str, table: toml::Table) -> Result<T> {
    T::deserialize(toml::Value::Table(table)).map_err(|e| {
        Error::config(format!(
            "[{name}]: {}",
            e.to_string().trim().replace('\n', " ")
        ))
    })
}

impl ConfigFile {
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
        let tables: Vec<(&str, &toml::Table)> = [
            ("memory", &self.memory),
            ("etcd", &self.etcd),
            ("zookeeper", &self.zookeeper),
            ("consul", &self.consul),
            ("sharded", &self.sharded),
        ]
        .into_iter()
        .filter_map(|(n, t)| t.as_ref().map(|t| (n, t)))
        .collect();
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
            return Err(Error::config(
                "the configuration names no backend: set `url`, or add one of the tables \
                 [memory], [etcd], [zookeeper], [consul], [sharded], or set COORDKIT_URL",
            ));
        };
        let mut table = (*table).clone();
        expand_env_refs(&mut table, env, name)?;
        apply_overrides(name, &mut table, env)?;
        #[allow(unused_variables)] // used only when a backend feature is off
        let feature_missing = |feature: &str| {
            Error::config(format!(
                "the [{name}] table needs the {feature}, which this build lacks"
            ))
        };
        match *name {
            "memory" => {
                if let Some(k) = table.keys().next() {
                    return Err(Error::config(format!(
                        "[memory] takes no settings (found {k:?})"
                    )));
                }
                Ok(Resolved::Memory)
            }
            "etcd" => {
                #[cfg(feature = "etcd")]
                {
                    let c: crate::backend::etcd::EtcdConfig = typed(name, table)?;
                    c.validate()?;
                    Ok(Resolved::Etcd(c))
                }
                #[cfg(not(feature = "etcd"))]
                Err(feature_missing("feature `etcd`"))
            }
            "zookeeper" => {
                #[cfg(feature = "zookeeper")]
                {
                    let c: crate::backend::zookeeper::ZkConfig = typed(name, table)?;
                    c.validate()?;
                    Ok(Resolved::Zookeeper(c))
                }
                #[cfg(not(feature = "zookeeper"))]
                Err(feature_missing("feature `zookeeper`"))
            }
            "consul" => {
                #[cfg(feature = "consul")]
                {
                    let c: crate::backend::consul::ConsulConfig = typed(name, table)?;
                    Ok(Resolved::Consul(c))
                }
                #[cfg(not(feature = "consul"))]
                Err(feature_missing("feature `consul`"))
            }
            _ => {
                let c: crate::shard::ShardedConfig = typed(name, table)?;
                c.validate()?;
                Ok(Resolved::Sharded(c))
            }
        }
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
    let mut u = RawUrl::parse(url)?;
    match &mut u.userinfo {
        Some((user, pass)) if !user.is_empty() => {
            if pass.is_some() {
                return Err(Error::config(
                    "the url already holds a password; remove it or password_env",
                ));
            }
            *pass = Some(password.to_string());
        }
        _ => {
            return Err(Error::config(
                "password_env needs a user name in the url (scheme://user@host…)",
            ))
        }
    }
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
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration(" 0s ").unwrap(), Duration::ZERO);
        for bad in [
            "",
            "10",
            "s",
            "10x",
            "-1s",
            "1..2s",
            "10 s",
            "99999999999999999999h",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}");
            assert!(e.message().contains("500ms"), "{e}");
        }
        for d in [1500, 10_000, 120_000, 0, 1] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
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
        let raw = RawUrl::parse(u.expose()).unwrap();
        assert_eq!(raw.userinfo, Some(("app".into(), Some("p@ss:w/rd".into()))));
        assert_eq!(raw.hosts, "10.0.0.1:2379,10.0.0.2:2379");
        assert_eq!(raw.query, vec![("namespace".into(), "myapp/".into())]);
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
        assert!(matches!(resolve("[memory]\n", &[]), Ok(Resolved::Memory)));
        let r = resolve(
            "[sharded]\nstrategy = \"ring\"\n[[sharded.shards]]\nurl = \"memory://\"\nname = \"a\"\n[[sharded.shards]]\nurl_env = \"B\"\nname = \"b\"\n",
            &[("B", "memory://?b")],
        )
        .unwrap();
        let Resolved::Sharded(c) = r else { panic!() };
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
        let Resolved::Etcd(c) = &r else {
            panic!("{r:?}")
        };
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
        let Resolved::Zookeeper(c) = r else { panic!() };
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
        let Resolved::Consul(c) = r else { panic!() };
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
