//! [`EtcdConfig`] and the `etcd://` URL form.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use super::{EtcdStore, DEFAULT_MAX_REQUEST_BYTES, NAME, REQUEST_OVERHEAD};
use crate::config::duration::{self, Grammar};
use crate::config::{BackendConfig, BackendUrl, Configurable};
use crate::error::{Error, ErrorKind, Result};

/// The longest namespace accepted, in bytes (it is part of every key).
pub const MAX_NAMESPACE_LEN: usize = 1024;

/// How to reach an etcd cluster.
///
/// Deserializable (for configuration files): durations are strings such as `"5s"`, `"500ms"`,
/// `"2m"` ([`crate::config::duration`]; a bare number of seconds still works but is
/// deprecated). Every field has a default except `endpoints`.
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
    #[serde(deserialize_with = "duration::de_seconds_alias")]
    pub connect_timeout: Duration,
    /// Bound on every single request (each call returns within it, or `Timeout`).
    #[serde(deserialize_with = "duration::de_seconds_alias")]
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
        let url = BackendUrl::parse(url).map_err(|e| bad(e.message()))?;
        let cfg = Self::from_backend_url(&url)?;
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
        if self.request_timeout > duration::MAX || self.connect_timeout > duration::MAX {
            return Err(bad(
                "the etcd request and connect timeouts must be at most 10 years",
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

#[async_trait]
impl BackendConfig for EtcdConfig {
    async fn connect(&self) -> Result<Arc<dyn crate::Backend>> {
        Ok(Arc::new(EtcdStore::connect(self.clone()).await?))
    }
}

impl Configurable for EtcdConfig {
    fn from_backend_url(url: &BackendUrl) -> Result<Self> {
        if url.scheme() != "etcd" {
            return Err(bad("an etcd URL starts with etcd://"));
        }
        let mut cfg = EtcdConfig {
            user: url.user().map(str::to_string),
            password: url.password().map(str::to_string),
            ..EtcdConfig::default()
        };
        for h in url.hosts() {
            let port = h.rsplit_once(':').map(|(_, p)| p);
            let valid_port = port.is_some_and(|p| p.parse::<u16>().is_ok());
            if h.is_empty() || !valid_port || h.starts_with(':') {
                return Err(bad(format!(
                    "endpoint {h:?} in the etcd URL is not host:port (expected \
                     etcd://host:port[,host:port…])"
                )));
            }
            cfg.endpoints.push(h.to_string());
        }
        if !(url.path().is_empty() || url.path() == "/") {
            return Err(bad(format!(
                "unexpected path {:?} in the etcd URL; give the key prefix as ?namespace=…",
                url.path()
            )));
        }
        url.only_options(
            NAME,
            &[
                "namespace",
                "timeout",
                "request_timeout",
                "connect_timeout",
                "user",
                "password",
                "tls",
                "ca",
                "ca_file",
                "cert",
                "cert_file",
                "key",
                "key_file",
                "max_request_bytes",
            ],
        )
        .map_err(|e| bad(e.message()))?;
        for (k, v) in url.query() {
            let dur = |v: &str| {
                duration::parse_with(v, Grammar::SecondsAlias)
                    .map_err(|e| bad(format!("option {k}: {}", e.message())))
            };
            match k.as_str() {
                "namespace" => cfg.namespace = v.clone(),
                "timeout" | "request_timeout" => cfg.request_timeout = dur(v)?,
                "connect_timeout" => cfg.connect_timeout = dur(v)?,
                "user" => cfg.user = Some(v.clone()),
                "password" => cfg.password = Some(v.clone()),
                "tls" => {
                    cfg.tls = match v.as_str() {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => return Err(bad(format!("option tls={v:?}: expected true or false"))),
                    }
                }
                "ca" | "ca_file" => cfg.ca_file = Some(PathBuf::from(v)),
                "cert" | "cert_file" => cfg.cert_file = Some(PathBuf::from(v)),
                "key" | "key_file" => cfg.key_file = Some(PathBuf::from(v)),
                _ => {
                    cfg.max_request_bytes = v.parse().map_err(|_| {
                        bad(format!("option max_request_bytes={v:?}: expected a number"))
                    })?
                }
            }
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        EtcdConfig::validate(self)
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
    fn absurd_durations_set_in_code_are_refused() {
        let c = EtcdConfig::new(["h:1"]).request_timeout(Duration::MAX);
        assert_eq!(c.validate().unwrap_err().kind(), ErrorKind::InvalidConfig);
        let c = EtcdConfig::new(["h:1"]).connect_timeout(Duration::MAX);
        assert_eq!(c.validate().unwrap_err().kind(), ErrorKind::InvalidConfig);
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
