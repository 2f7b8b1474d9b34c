//! [`EtcdConfig`] and the `etcd://` URL form.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{DEFAULT_MAX_REQUEST_BYTES, NAME, REQUEST_OVERHEAD};
use crate::error::{Error, ErrorKind, Result};

/// The longest namespace accepted, in bytes (it is part of every key).
pub const MAX_NAMESPACE_LEN: usize = 1024;

/// How to reach an etcd cluster.
///
/// Deserializable (for configuration files): durations are strings such as `"5s"`, `"500ms"`,
/// `"2m"` or a number of seconds. Every field has a default except `endpoints`.
///
/// `Debug` shows `password: "***"` when a password is set; it is never logged.
///
/// # The `etcd://` URL
/// `etcd://[user[:password]@]host:port[,host:port…][/][?option=value&…]` with the options
/// - `namespace` — the key prefix, default empty (see [`namespace`](Self::namespace));
/// - `timeout` — the request timeout (default `5s`), `connect_timeout` (default `3s`);
/// - `user`, `password` — credentials (or in the userinfo part; percent-encode `@ : / %`);
/// - `ca=PATH` — talk TLS and trust this CA (PEM; `tls=true` alone is not enough, there is
///   no built-in root store);
///   `cert=PATH&key=PATH` — client certificate and key (PEM);
/// - `max_request_bytes` — the server's `--max-request-bytes` (default 1572864).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// `host:port` of each member (or `http://…` / `https://…` URLs).
    pub endpoints: Vec<String>,
    /// Prefix of every key this client stores: data key `K` is `<namespace>kv/K`, lock `N`
    /// lives under `<namespace>locks/N/`. Empty, or ending in `/`, in the key grammar.
    pub namespace: String,
    /// Bound on establishing a connection to an endpoint.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Bound on every single request (each call returns within it, or `Timeout`).
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    /// User name for etcd authentication.
    pub user: Option<String>,
    /// Password for etcd authentication. Never shown by `Debug`.
    pub password: Option<String>,
    /// Use TLS (implied by `ca_file` or `cert_file`).
    pub tls: bool,
    /// PEM file of the CA to trust (instead of the system roots).
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (needs `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client key (needs `cert_file`).
    pub key_file: Option<PathBuf>,
    /// The server's `--max-request-bytes`; values larger than this less 4 KiB give
    /// `ValueTooLarge` before anything is sent.
    pub max_request_bytes: usize,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            namespace: String::new(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            user: None,
            password: None,
            tls: false,
            ca_file: None,
            cert_file: None,
            key_file: None,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("max_request_bytes", &self.max_request_bytes)
            .finish()
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidConfig, NAME, msg)
}

/// Parses `5s`, `500ms`, `2m`, `1h`, or a plain number of seconds (fractions allowed).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.trim().parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(f64),
        Str(String),
    }
    let raw = Raw::deserialize(d)?;
    let parsed = match &raw {
        Raw::Num(n) if n.is_finite() && *n >= 0.0 => Duration::try_from_secs_f64(*n).ok(),
        Raw::Num(_) => None,
        Raw::Str(s) => parse_duration(s),
    };
    parsed.ok_or_else(|| {
        serde::de::Error::custom(
            "expected a duration such as \"5s\", \"500ms\" or a number of seconds",
        )
    })
}

fn percent_decode(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad("malformed percent-encoding in the URL's user information"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad("the URL's user information is not UTF-8"))
}

impl EtcdConfig {
    /// A configuration with these endpoints and every other field at its default.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Sets the namespace (key prefix).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets the request timeout.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets user and password.
    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self.password = Some(password.into());
        self
    }

    /// Parses an `etcd://` URL (see the type docs for the form and its options). A
    /// [`url::Url`] holds a single host; use [`from_url_str`](Self::from_url_str) for several.
    ///
    /// # Errors
    /// `InvalidConfig` naming what is wrong (the password is never echoed).
    pub fn from_url(url: &url::Url) -> Result<Self> {
        Self::from_url_str(url.as_str())
    }

    /// Parses an `etcd://` URL string, which may list several `host:port` pairs separated by
    /// commas.
    ///
    /// # Errors
    /// `InvalidConfig` naming what is wrong (the password is never echoed).
    pub fn from_url_str(url: &str) -> Result<Self> {
        let url = url.trim();
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("an etcd URL starts with etcd://"))?;
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let mut cfg = EtcdConfig::default();
        let hosts = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let (user, password) = match userinfo.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (userinfo, None),
                };
                if !user.is_empty() {
                    cfg.user = Some(percent_decode(user)?);
                }
                if let Some(p) = password {
                    cfg.password = Some(percent_decode(p)?);
                }
                hosts
            }
            None => authority,
        };
        for h in hosts.split(',') {
            let h = h.trim();
            let port = h.rsplit_once(':').map(|(_, p)| p);
            let valid_port = port.map(|p| p.parse::<u16>().is_ok()).unwrap_or(false);
            if h.is_empty() || !valid_port || h.starts_with(':') {
                return Err(bad(format!(
                    "endpoint {h:?} in the etcd URL is not host:port (expected \
                     etcd://host:port[,host:port…])"
                )));
            }
            cfg.endpoints.push(h.to_string());
        }
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p, q),
            None => (tail, ""),
        };
        let query = query.split('#').next().unwrap_or("");
        if !(path.is_empty() || path == "/") {
            return Err(bad(format!(
                "unexpected path {path:?} in the etcd URL; give the key prefix as ?namespace=…"
            )));
        }
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            let dur = |v: &str| {
                parse_duration(v).ok_or_else(|| {
                    bad(format!(
                        "option {k}={v:?}: expected a duration such as 5s or 500ms"
                    ))
                })
            };
            match k.as_ref() {
                "namespace" => cfg.namespace = v.to_string(),
                "timeout" | "request_timeout" => cfg.request_timeout = dur(&v)?,
                "connect_timeout" => cfg.connect_timeout = dur(&v)?,
                "user" => cfg.user = Some(v.to_string()),
                "password" => cfg.password = Some(v.to_string()),
                "tls" => {
                    cfg.tls = match v.as_ref() {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => return Err(bad(format!("option tls={v:?}: expected true or false"))),
                    }
                }
                "ca" | "ca_file" => cfg.ca_file = Some(PathBuf::from(v.as_ref())),
                "cert" | "cert_file" => cfg.cert_file = Some(PathBuf::from(v.as_ref())),
                "key" | "key_file" => cfg.key_file = Some(PathBuf::from(v.as_ref())),
                "max_request_bytes" => {
                    cfg.max_request_bytes = v.parse().map_err(|_| {
                        bad(format!("option max_request_bytes={v:?}: expected a number"))
                    })?
                }
                other => {
                    return Err(bad(format!(
                        "unknown etcd URL option {other:?}; known: namespace, timeout, \
                         connect_timeout, user, password, tls, ca, cert, key, max_request_bytes"
                    )))
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the configuration without connecting.
    ///
    /// # Errors
    /// `InvalidConfig` for no endpoints, a zero timeout, a namespace outside the key grammar,
    /// half a client certificate, or a request limit too small for any value.
    pub fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() || self.endpoints.iter().any(|e| e.trim().is_empty()) {
            return Err(bad("no etcd endpoints given (or an empty one)"));
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(bad(
                "the etcd request and connect timeouts must be above zero",
            ));
        }
        if !self.namespace.is_empty() {
            if self.namespace.len() > MAX_NAMESPACE_LEN {
                return Err(bad(format!(
                    "the etcd namespace is longer than {MAX_NAMESPACE_LEN} bytes"
                )));
            }
            if !self.namespace.ends_with('/') {
                return Err(bad(format!(
                    "the etcd namespace {:?} must end with '/'",
                    self.namespace
                )));
            }
            crate::key::validate_prefix(&self.namespace).map_err(|e| {
                bad(format!(
                    "the etcd namespace {:?} is not a valid prefix: {}",
                    self.namespace,
                    e.message()
                ))
            })?;
        }
        if self.uses_tls() && self.ca_file.is_none() {
            return Err(bad("TLS needs the CA to trust: give ca=PATH (a PEM file)"));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(bad("etcd authentication needs both a user and a password"));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(bad("a client certificate needs both cert and key"));
        }
        if self.max_request_bytes <= REQUEST_OVERHEAD {
            return Err(bad(format!(
                "max_request_bytes must be above {REQUEST_OVERHEAD}"
            )));
        }
        Ok(())
    }

    /// Whether TLS is used.
    pub fn uses_tls(&self) -> bool {
        self.tls || self.ca_file.is_some() || self.cert_file.is_some()
    }

    pub(crate) fn tls_options(&self) -> Result<Option<etcd_client::TlsOptions>> {
        if !self.uses_tls() {
            return Ok(None);
        }
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p)
                .map_err(|e| bad(format!("cannot read the {what} {}: {e}", p.display())))
        };
        let mut tls = etcd_client::TlsOptions::new();
        let Some(ca) = &self.ca_file else {
            return Err(bad("TLS needs the CA to trust: give ca=PATH (a PEM file)"));
        };
        tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca, "CA file")?));
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            tls = tls.identity(etcd_client::Identity::from_pem(
                read(cert, "client certificate")?,
                read(key, "client key")?,
            ));
        }
        Ok(Some(tls))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multi_host_urls_with_options() {
        let c = EtcdConfig::from_url_str(
            "etcd://alice:s%40cret@10.0.0.1:2379,10.0.0.2:2379/?namespace=app/&timeout=750ms&connect_timeout=2",
        )
        .unwrap();
        assert_eq!(c.endpoints, ["10.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(c.namespace, "app/");
        assert_eq!(c.request_timeout, Duration::from_millis(750));
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.user.as_deref(), Some("alice"));
        assert_eq!(c.password.as_deref(), Some("s@cret"));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s@cret") && dbg.contains("***"), "{dbg}");
    }

    #[test]
    fn rejects_bad_urls() {
        for u in [
            "etcd://",
            "etcd://host",
            "etcd://h:1,",
            "etcd://h:99999",
            "etcd://h:1/path",
            "etcd://h:1?nosuch=1",
            "etcd://h:1?timeout=fast",
            "etcd://h:1?namespace=no-slash",
            "etcd://h:1?namespace=/abs/",
            "etcd://h:1?cert=/a.pem",
            "etcd://h:1?tls=true",
            "etcd://alice@h:1",
            "etcd://h:1?password=x",
            "http://h:1",
        ] {
            let e = EtcdConfig::from_url_str(u).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{u}");
        }
        let e = EtcdConfig::from_url_str("etcd://u:hunter2@h:1/x").unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn deserializes_with_durations() {
        let c: EtcdConfig = toml::from_str(
            "endpoints = [\"127.0.0.1:2379\"]\nrequest_timeout = \"2s\"\nconnect_timeout = 1.5\npassword = \"pw\"",
        )
        .unwrap();
        assert_eq!(c.request_timeout, Duration::from_secs(2));
        assert_eq!(c.connect_timeout, Duration::from_millis(1500));
        assert!(!format!("{c:?}").contains("pw\""));
    }
}
