//! The TOML configuration file: [`ConfigFile`], [`connect_config`], and duration parsing.
//!
//! A configuration file names one backend, either by URL or by a table per backend, with its
//! timeouts, TLS and authentication settings. Secrets can stay out of the file: every secret
//! has a `*_env` form naming an environment variable to read it from. Environment variables
//! override the file (see [`ENV_OVERRIDES`]). The file is turned into a backend URL with query
//! options ([`Resolved`]), which [`connect`](crate::connect) opens.
//!
//! ```toml
//! # One backend by URL …
//! url = "etcd://10.0.0.1:2379,10.0.0.2:2379"
//!
//! [timeouts]
//! connect = "5s"
//! request = "3s"
//!
//! [auth]
//! username = "app"
//! password_env = "ETCD_PASSWORD"   # read the password from this variable
//! ```
//!
//! ```toml
//! # … or by a table for the backend.
//! [zookeeper]
//! endpoints = ["zk1:2181", "zk2:2181", "zk3:2181"]
//! chroot = "/myapp"
//! timeouts = { connect = "5s", session = "10s" }
//! ```
//!
//! The complete format, with every setting, is `docs/configuration.md` and the commented
//! example `docs/coordkit.example.toml`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::Backend;

/// The environment variables that override settings of a configuration file, with what each
/// overrides. They apply whatever shape the file has (`url` or a backend table).
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    (
        "COORDKIT_URL",
        "the backend URL (replaces `url` or the backend table's endpoints)",
    ),
    ("COORDKIT_CONNECT_TIMEOUT", "`timeouts.connect`"),
    ("COORDKIT_REQUEST_TIMEOUT", "`timeouts.request`"),
    ("COORDKIT_USERNAME", "`auth.username`"),
    ("COORDKIT_PASSWORD", "`auth.password` / `auth.password_env`"),
    ("COORDKIT_TOKEN", "`auth.token` / `auth.token_env`"),
    ("COORDKIT_TLS_CA_FILE", "`tls.ca_file`"),
    ("COORDKIT_TLS_CERT_FILE", "`tls.cert_file`"),
    ("COORDKIT_TLS_KEY_FILE", "`tls.key_file`"),
];

/// Query options whose values are secret: hidden by [`redact_url`] and in `Debug` output.
const SECRET_OPTIONS: &[&str] = &["password", "token", "acl_token", "auth"];

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

/// A duration written as a string in the file (`"5s"`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl fmt::Debug for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(ConfigDuration)
            .map_err(|e| serde::de::Error::custom(e.message()))
    }
}

/// `[timeouts]`: how long to wait. Each maps onto the backend's query option of the same
/// meaning (see `docs/configuration.md`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Timeouts {
    /// Establishing a connection (`connect_timeout`).
    pub connect: Option<ConfigDuration>,
    /// Any single request (`request_timeout`).
    pub request: Option<ConfigDuration>,
    /// ZooKeeper only: the session timeout (`session_timeout`).
    pub session: Option<ConfigDuration>,
}

/// `[auth]`: credentials. Prefer the `*_env` forms, which name an environment variable holding
/// the secret, over writing the secret into the file.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Auth {
    /// User name (etcd user, ZooKeeper digest user).
    pub username: Option<String>,
    /// Password, written in the file.
    pub password: Option<String>,
    /// The environment variable holding the password.
    pub password_env: Option<String>,
    /// Token (Consul ACL token), written in the file.
    pub token: Option<String>,
    /// The environment variable holding the token.
    pub token_env: Option<String>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hide = |o: &Option<String>| o.as_ref().map(|_| "***");
        f.debug_struct("Auth")
            .field("username", &self.username)
            .field("password", &hide(&self.password))
            .field("password_env", &self.password_env)
            .field("token", &hide(&self.token))
            .field("token_env", &self.token_env)
            .finish()
    }
}

/// `[tls]`: TLS files, as paths (PEM).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Tls {
    /// The CA certificate(s) to verify servers with (`ca_file`).
    pub ca_file: Option<String>,
    /// The client certificate (`cert_file`).
    pub cert_file: Option<String>,
    /// The client certificate's private key (`key_file`).
    pub key_file: Option<String>,
}

/// A value in an `[options]` table: passed to the backend as a URL query option.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OptionValue {
    /// A string.
    String(String),
    /// An integer.
    Integer(i64),
    /// A boolean.
    Bool(bool),
}

impl fmt::Display for OptionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionValue::String(s) => f.write_str(s),
            OptionValue::Integer(i) => write!(f, "{i}"),
            OptionValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A per-backend table: `[etcd]`, `[zookeeper]`, `[consul]` or `[memory]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BackendTable {
    /// `host:port` of each server (etcd members, ZooKeeper servers, one Consul agent).
    /// Not used by `[memory]`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// ZooKeeper only: the chroot path every node lives under (`/myapp`).
    pub chroot: Option<String>,
    /// Consul only: talk HTTPS (`consul+https://`).
    #[serde(default)]
    pub https: bool,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Credentials.
    #[serde(default)]
    pub auth: Auth,
    /// TLS files.
    #[serde(default)]
    pub tls: Tls,
    /// Further backend options, passed as URL query options verbatim (for example
    /// `namespace = "myapp/"`; each backend's documentation lists its options).
    #[serde(default)]
    pub options: BTreeMap<String, OptionValue>,
}

/// A parsed configuration file. Build it with [`ConfigFile::parse`] or [`ConfigFile::load`],
/// then [`resolve`](ConfigFile::resolve) it to a URL, or call [`connect_config`].
///
/// # Contract
/// Exactly one of `url`, `[memory]`, `[etcd]`, `[zookeeper]`, `[consul]` is given (or
/// `COORDKIT_URL` is set). Unknown settings are errors, so a misspelt setting is never ignored.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConfigFile {
    /// The backend URL (see [`connect`](crate::connect)).
    pub url: Option<String>,
    /// Timeouts (with `url`).
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Credentials (with `url`).
    #[serde(default)]
    pub auth: Auth,
    /// TLS files (with `url`).
    #[serde(default)]
    pub tls: Tls,
    /// Further URL query options (with `url`).
    #[serde(default)]
    pub options: BTreeMap<String, OptionValue>,
    /// The in-memory backend.
    pub memory: Option<BackendTable>,
    /// An etcd cluster.
    pub etcd: Option<BackendTable>,
    /// A ZooKeeper ensemble.
    pub zookeeper: Option<BackendTable>,
    /// A Consul agent.
    pub consul: Option<BackendTable>,
}

/// A configuration resolved to a backend URL with its options. `Debug` and
/// [`redacted`](Self::redacted) hide passwords and tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct Resolved {
    url: String,
}

impl Resolved {
    /// The URL to pass to [`connect`](crate::connect). It contains secrets: do not log it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL with passwords and tokens replaced by `***`, for messages and logs.
    pub fn redacted(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Resolved").field(&self.redacted()).finish()
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

/// Where environment variables come from during [`ConfigFile::resolve`]: the process
/// environment in normal use, a map in tests.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Reads the process environment; unset and empty variables are both "not set".
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
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

    /// Resolves the configuration, with environment overrides from `env`, to a backend URL.
    ///
    /// # Errors
    /// `InvalidConfig` when no backend or more than one is given, a backend table lacks
    /// endpoints, an environment variable named by a `*_env` setting is unset, a secret is
    /// given twice (in the file and through `*_env`), or an option is set twice.
    pub fn resolve(&self, env: EnvLookup<'_>) -> Result<Resolved> {
        let tables: Vec<(&str, &BackendTable)> = [
            ("memory", &self.memory),
            ("etcd", &self.etcd),
            ("zookeeper", &self.zookeeper),
            ("consul", &self.consul),
        ]
        .into_iter()
        .filter_map(|(n, t)| t.as_ref().map(|t| (n, t)))
        .collect();
        let given = tables.len() + usize::from(self.url.is_some());
        if given > 1 {
            let mut names: Vec<&str> = tables.iter().map(|(n, _)| *n).collect();
            if self.url.is_some() {
                names.insert(0, "url");
            }
            return Err(Error::config(format!(
                "the configuration names more than one backend ({}); give exactly one",
                names.join(", ")
            )));
        }
        let table_settings_at_top = self.timeouts != Timeouts::default()
            || self.auth != Auth::default()
            || self.tls != Tls::default()
            || !self.options.is_empty();
        if !tables.is_empty() && table_settings_at_top {
            return Err(Error::config(
                "with a backend table, put timeouts, auth, tls and options inside it \
                 (for example [etcd.timeouts]), not at the top level",
            ));
        }
        let env_url = env("COORDKIT_URL");
        let (base, timeouts, auth, tls, options) = match (&self.url, tables.first()) {
            (Some(url), _) => (
                env_url.unwrap_or_else(|| url.clone()),
                &self.timeouts,
                &self.auth,
                &self.tls,
                &self.options,
            ),
            (None, Some((name, table))) => (
                match env_url {
                    Some(u) => u,
                    None => table_url(name, table)?,
                },
                &table.timeouts,
                &table.auth,
                &table.tls,
                &table.options,
            ),
            (None, None) => match env_url {
                Some(u) => (u, &self.timeouts, &self.auth, &self.tls, &self.options),
                None => {
                    return Err(Error::config(
                        "the configuration names no backend: set `url`, or add one of the \
                         tables [memory], [etcd], [zookeeper], [consul], or set COORDKIT_URL",
                    ))
                }
            },
        };
        build_url(&base, timeouts, auth, tls, options, env)
    }

    /// [`resolve`](Self::resolve) with the process environment.
    ///
    /// # Errors
    /// As [`resolve`](Self::resolve).
    pub fn resolve_from_env(&self) -> Result<Resolved> {
        self.resolve(&process_env)
    }
}

fn table_url(name: &str, t: &BackendTable) -> Result<String> {
    let wrong = |what: &str| {
        Error::config(format!(
            "[{name}] has `{what}`, which only applies to another backend"
        ))
    };
    if t.chroot.is_some() && name != "zookeeper" {
        return Err(wrong("chroot"));
    }
    if t.https && name != "consul" {
        return Err(wrong("https"));
    }
    if name == "memory" {
        if !t.endpoints.is_empty() {
            return Err(wrong("endpoints"));
        }
        return Ok("memory://".to_string());
    }
    if t.endpoints.is_empty() {
        return Err(Error::config(format!(
            "[{name}] needs `endpoints`, a list of \"host:port\" strings"
        )));
    }
    if let Some(bad) = t
        .endpoints
        .iter()
        .find(|e| e.trim().is_empty() || e.contains(['/', ',', '@', '?', '#', ' ']))
    {
        return Err(Error::config(format!(
            "[{name}] endpoint {bad:?} is not of the form \"host:port\""
        )));
    }
    if name == "consul" && t.endpoints.len() > 1 {
        return Err(Error::config(
            "[consul] takes one endpoint: the agent to talk to (the agent forwards to the servers)",
        ));
    }
    let hosts = t.endpoints.join(",");
    Ok(match name {
        "etcd" => format!("etcd://{hosts}"),
        "zookeeper" => {
            let chroot = match t.chroot.as_deref() {
                None | Some("") | Some("/") => String::new(),
                Some(c) if c.starts_with('/') => c.trim_end_matches('/').to_string(),
                Some(c) => {
                    return Err(Error::config(format!(
                        "[zookeeper] chroot {c:?} must start with '/'"
                    )))
                }
            };
            format!("zk://{hosts}{chroot}")
        }
        _ if t.https => format!("consul+https://{hosts}"),
        _ => format!("consul://{hosts}"),
    })
}

fn secret(
    what: &str,
    in_file: &Option<String>,
    var: &Option<String>,
    override_var: &str,
    env: EnvLookup<'_>,
) -> Result<Option<String>> {
    if let Some(v) = env(override_var) {
        return Ok(Some(v));
    }
    match (in_file, var) {
        (Some(_), Some(_)) => Err(Error::config(format!(
            "auth.{what} and auth.{what}_env are both set; keep one"
        ))),
        (Some(v), None) => Ok(Some(v.clone())),
        (None, Some(var)) => env(var).map(Some).ok_or_else(|| {
            Error::config(format!(
                "auth.{what}_env names the environment variable {var}, which is not set"
            ))
        }),
        (None, None) => Ok(None),
    }
}

fn build_url(
    base: &str,
    timeouts: &Timeouts,
    auth: &Auth,
    tls: &Tls,
    options: &BTreeMap<String, OptionValue>,
    env: EnvLookup<'_>,
) -> Result<Resolved> {
    let mut url = RawUrl::parse(base)?;
    let mut pairs: Vec<(String, String)> = std::mem::take(&mut url.query);
    let mut add = |k: &str, v: String| -> Result<()> {
        if pairs.iter().any(|(have, _)| have == k) {
            return Err(Error::config(format!(
                "the option {k:?} is set twice (in the URL and in the configuration)"
            )));
        }
        pairs.push((k.to_string(), v));
        Ok(())
    };
    let dur = |name: &str, file: Option<ConfigDuration>| -> Result<Option<Duration>> {
        match env(name) {
            Some(v) => parse_duration(&v)
                .map(Some)
                .map_err(|e| Error::config(format!("{name}: {}", e.message()))),
            None => Ok(file.map(|d| d.0)),
        }
    };
    if let Some(d) = dur("COORDKIT_CONNECT_TIMEOUT", timeouts.connect)? {
        add("connect_timeout", format_duration(d))?;
    }
    if let Some(d) = dur("COORDKIT_REQUEST_TIMEOUT", timeouts.request)? {
        add("request_timeout", format_duration(d))?;
    }
    if let Some(d) = timeouts.session {
        add("session_timeout", format_duration(d.0))?;
    }
    let file_or_env = |var: &str, file: &Option<String>| env(var).or_else(|| file.clone());
    for (opt, var, file) in [
        ("ca_file", "COORDKIT_TLS_CA_FILE", &tls.ca_file),
        ("cert_file", "COORDKIT_TLS_CERT_FILE", &tls.cert_file),
        ("key_file", "COORDKIT_TLS_KEY_FILE", &tls.key_file),
    ] {
        if let Some(v) = file_or_env(var, file) {
            add(opt, v)?;
        }
    }
    if let Some(token) = secret("token", &auth.token, &auth.token_env, "COORDKIT_TOKEN", env)? {
        add("token", token)?;
    }
    for (k, v) in options {
        add(k, v.to_string())?;
    }
    let username = file_or_env("COORDKIT_USERNAME", &auth.username);
    let password = secret(
        "password",
        &auth.password,
        &auth.password_env,
        "COORDKIT_PASSWORD",
        env,
    )?;
    let have_user = url.userinfo.as_ref().is_some_and(|(u, _)| !u.is_empty());
    if password.is_some() && username.is_none() && !have_user {
        return Err(Error::config(
            "a password is set without a username; set auth.username",
        ));
    }
    if username.is_some() || password.is_some() {
        let (old_user, old_pass) = url.userinfo.take().unwrap_or_default();
        url.userinfo = Some((username.unwrap_or(old_user), password.or(old_pass)));
    }
    url.query = pairs;
    Ok(Resolved {
        url: url.to_url_string(),
    })
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
/// what [`connect`](crate::connect) returns.
pub async fn connect_config(path: impl AsRef<Path>) -> Result<Arc<dyn Backend>> {
    let resolved = ConfigFile::load(path)?.resolve_from_env()?;
    crate::config::connect(resolved.url()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
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
    fn url_form_with_timeouts_tls_and_env_password() {
        let r = resolve(
            r#"
url = "etcd://10.0.0.1:2379,10.0.0.2:2379"
[timeouts]
connect = "5s"
request = "1500ms"
[auth]
username = "app"
password_env = "ETCD_PW"
[tls]
ca_file = "/etc/ca.pem"
[options]
namespace = "myapp/"
"#,
            &[("ETCD_PW", "s3cret")],
        )
        .unwrap();
        let u = RawUrl::parse(r.url()).unwrap();
        assert_eq!(u.scheme, "etcd");
        assert_eq!(u.hosts, "10.0.0.1:2379,10.0.0.2:2379");
        assert_eq!(u.userinfo, Some(("app".into(), Some("s3cret".into()))));
        let q: HashMap<_, _> = u.query.into_iter().collect();
        assert_eq!(q["connect_timeout"], "5s");
        assert_eq!(q["request_timeout"], "1500ms");
        assert_eq!(q["ca_file"], "/etc/ca.pem");
        assert_eq!(q["namespace"], "myapp/");
        assert!(!format!("{r:?}").contains("s3cret"));
        assert!(!r.redacted().contains("s3cret"));
        assert!(r
            .redacted()
            .starts_with("etcd://app:***@10.0.0.1:2379,10.0.0.2:2379?"));
        // Special characters in secrets survive the round trip through the URL.
        let r = resolve(
            "url = \"etcd://h:1\"\n[auth]\nusername = \"a b\"\npassword = \"p@ss:w/rd%\"\n",
            &[],
        )
        .unwrap();
        let u = RawUrl::parse(r.url()).unwrap();
        assert_eq!(u.userinfo, Some(("a b".into(), Some("p@ss:w/rd%".into()))));
        assert_eq!(u.hosts, "h:1");
    }

    #[test]
    fn backend_tables() {
        let r = resolve(
            "[zookeeper]\nendpoints = [\"a:2181\", \"b:2181\"]\nchroot = \"/app/\"\n\
             timeouts = { session = \"10s\" }\n",
            &[],
        )
        .unwrap();
        assert_eq!(r.url(), "zk://a:2181,b:2181/app?session_timeout=10s");
        let r = resolve(
            "[consul]\nendpoints = [\"c:8501\"]\nhttps = true\n[consul.auth]\ntoken_env = \"T\"\n",
            &[("T", "tok-123")],
        )
        .unwrap();
        assert_eq!(r.url(), "consul+https://c:8501?token=tok-123");
        assert_eq!(r.redacted(), "consul+https://c:8501?token=***");
        assert_eq!(resolve("[memory]\n", &[]).unwrap().url(), "memory://");
    }

    #[test]
    fn environment_overrides_the_file() {
        let text = "url = \"etcd://a:1\"\n[timeouts]\nrequest = \"3s\"\n[auth]\nusername = \"u\"\npassword = \"in-file\"\n";
        let r = resolve(
            text,
            &[
                ("COORDKIT_URL", "etcd://b:2"),
                ("COORDKIT_REQUEST_TIMEOUT", "250ms"),
                ("COORDKIT_PASSWORD", "from-env"),
            ],
        )
        .unwrap();
        assert_eq!(r.url(), "etcd://u:from-env@b:2?request_timeout=250ms");
        // COORDKIT_URL alone is a complete configuration.
        let r = resolve("", &[("COORDKIT_URL", "memory://")]).unwrap();
        assert_eq!(r.url(), "memory://");
    }

    #[test]
    fn invalid_configurations_are_named() {
        let cases: &[(&str, &[(&str, &str)], &str)] = &[
            ("", &[], "names no backend"),
            (
                "url = \"memory://\"\n[etcd]\nendpoints=[\"a:1\"]\n",
                &[],
                "more than one",
            ),
            ("[etcd]\n", &[], "needs `endpoints`"),
            ("[etcd]\nendpoints = [\"a/b\"]\n", &[], "host:port"),
            (
                "[etcd]\nendpoints=[\"a:1\"]\nchroot=\"/x\"\n",
                &[],
                "chroot",
            ),
            ("url = \"etcd://a:1\"\nurll = 1\n", &[], "unknown field"),
            (
                "url = \"etcd://a:1\"\n[timeouts]\nconnect = \"5\"\n",
                &[],
                "unit is missing",
            ),
            (
                "url = \"etcd://a:1\"\n[auth]\nusername=\"u\"\npassword_env = \"NOPE\"\n",
                &[],
                "NOPE",
            ),
            (
                "url = \"etcd://a:1\"\n[auth]\npassword = \"x\"\n",
                &[],
                "without a username",
            ),
            (
                "url = \"etcd://a:1?request_timeout=1s\"\n[timeouts]\nrequest = \"2s\"\n",
                &[],
                "set twice",
            ),
            ("url = \"not a url\"\n", &[], "malformed"),
            (
                "[etcd]\nendpoints=[\"a:1\"]\n[timeouts]\nrequest=\"1s\"\n",
                &[],
                "inside it",
            ),
            (
                "url = \"etcd://a:1\"\n",
                &[("COORDKIT_REQUEST_TIMEOUT", "fast")],
                "COORDKIT_REQUEST_TIMEOUT",
            ),
        ];
        for (text, env, needle) in cases {
            let e = resolve(text, env).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{text}");
            assert!(e.message().contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn auth_debug_hides_secrets() {
        let a = Auth {
            password: Some("pw".into()),
            token: Some("tk".into()),
            ..Auth::default()
        };
        let s = format!("{a:?}");
        assert!(!s.contains("pw\"") && !s.contains("tk"), "{s}");
    }

    #[tokio::test]
    async fn connect_config_reads_a_file() {
        let dir = std::env::temp_dir().join(format!("coordkit-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[memory]\n").unwrap();
        let store = connect_config(&path).await.unwrap();
        assert_eq!(store.capabilities().backend, "memory");
        let e = connect_config(dir.join("missing.toml")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.message().contains("missing.toml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
