//! [`PostgresConfig`] and the `postgres://` URL form.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::{PostgresStore, NAME};
use crate::config::duration;
use crate::config::{BackendConfig, BackendUrl, Configurable};
use crate::error::{Error, ErrorKind, Result};

/// Whether and how the connection uses TLS (rustls), as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain text.
    Disable,
    /// TLS if the server offers it, else plain text; the certificate is not checked.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not checked (encryption against eavesdropping,
    /// not against an impostor).
    Require,
    /// TLS, with the server's certificate checked against `sslrootcert` (or the Web PKI roots
    /// when it is unset) and its name against the host.
    VerifyFull,
}

/// How to reach a PostgreSQL server and where in it to keep coordkit's tables.
///
/// `postgres://[user[:password]@]host[:port][/database][?option=value&…]` (also
/// `postgresql://`), or the `[postgres]` TOML table with the same field names. Options:
/// `schema`, `sslmode` (`disable`, `prefer`, `require`, `verify-full`), `sslrootcert` (a PEM
/// file), `connect_timeout`, `request_timeout`, `recheck`
/// (durations with a unit), `changes_kept` (a number), `listen` (`true`/`false`), `password`.
///
/// `Debug` shows `password: "***"` when a password is set; it is never logged or put in an
/// error message.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Server host name or address. Default `127.0.0.1`.
    pub host: String,
    /// Server port. Default 5432.
    pub port: u16,
    /// Role to log in as. Default `postgres`.
    pub user: String,
    /// Password, if the server asks for one.
    pub password: Option<String>,
    /// Database name. Default `postgres`.
    pub database: String,
    /// Schema holding coordkit's tables, created on first use: lower-case letters, digits and
    /// `_`, starting with a letter or `_`, at most 40 characters. Default `coordkit`.
    pub schema: String,
    /// TLS mode (see [`SslMode`]). Default `prefer`.
    pub sslmode: SslMode,
    /// The certificates (PEM) that `verify-full` trusts; unset: the Web PKI roots.
    pub sslrootcert: Option<std::path::PathBuf>,
    /// Bound on establishing a connection. Default 5 s.
    #[serde(deserialize_with = "duration::de_unit_required")]
    pub connect_timeout: Duration,
    /// Bound on every request; a request that runs past it fails with `Timeout` and its
    /// connection is closed (the server rolls its transaction back). Default 5 s.
    #[serde(deserialize_with = "duration::de_unit_required")]
    pub request_timeout: Duration,
    /// How long a watch or a waiting `lock()` goes at most without looking at the tables when
    /// no notification came. Default 2 s.
    #[serde(deserialize_with = "duration::de_unit_required")]
    pub recheck: Duration,
    /// How many changes the change log keeps for watches (at least); a watch that falls further
    /// behind gets `WatchGap`. Default 100 000.
    pub changes_kept: u64,
    /// Whether watches and waiters are woken by `LISTEN`/`NOTIFY` on a connection of their
    /// own. `false` (for a pooler in transaction mode, which does not carry `LISTEN`): they
    /// look every `recheck` instead. Default `true`.
    pub listen: bool,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            password: None,
            database: "postgres".into(),
            schema: "coordkit".into(),
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            recheck: Duration::from_secs(2),
            changes_kept: 100_000,
            listen: true,
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("database", &self.database)
            .field("schema", &self.schema)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("recheck", &self.recheck)
            .field("changes_kept", &self.changes_kept)
            .field("listen", &self.listen)
            .finish()
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidConfig, NAME, msg)
}

const OPTIONS: &[&str] = &[
    "schema",
    "sslmode",
    "sslrootcert",
    "connect_timeout",
    "request_timeout",
    "recheck",
    "changes_kept",
    "listen",
    "password",
    "user",
];

impl PostgresConfig {
    /// The defaults, for the server at `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        PostgresConfig {
            host: host.into(),
            port,
            ..PostgresConfig::default()
        }
    }

    /// Parses a `postgres://` or `postgresql://` URL.
    ///
    /// # Errors
    /// `InvalidConfig` naming what is wrong (the password is never echoed).
    pub fn from_url_str(url: &str) -> Result<Self> {
        let url = BackendUrl::parse(url).map_err(|e| bad(e.message()))?;
        let cfg = Self::from_backend_url(&url)?;
        Configurable::validate(&cfg)?;
        Ok(cfg)
    }

    /// The schema name quoted as an SQL identifier (it was validated to need no escaping).
    pub(crate) fn schema_ident(&self) -> String {
        format!("\"{}\"", self.schema)
    }

    /// The `LISTEN`/`NOTIFY` channel of the schema.
    pub(crate) fn channel(&self) -> String {
        format!("coordkit_{}", self.schema)
    }
}

#[async_trait]
impl BackendConfig for PostgresConfig {
    async fn connect(&self) -> Result<Arc<dyn crate::Backend>> {
        Ok(Arc::new(PostgresStore::open(self.clone()).await?))
    }
}

impl Configurable for PostgresConfig {
    fn from_backend_url(url: &BackendUrl) -> Result<Self> {
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(bad(
                "a PostgreSQL URL starts with postgres:// or postgresql://",
            ));
        }
        let hosts = url.hosts();
        if hosts.len() != 1 || hosts[0].is_empty() {
            return Err(bad(
                "a postgres:// URL names exactly one host: postgres://user@host:5432/db",
            ));
        }
        let mut cfg = PostgresConfig::default();
        let hp = hosts[0];
        // `host`, `host:port`, `[v6]`, `[v6]:port`.
        let (host, port) = match hp.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((h, "")) => (h, None),
                Some((h, p)) => match p.strip_prefix(':') {
                    Some(p) => (h, Some(p)),
                    None => return Err(bad("malformed [address]:port")),
                },
                None => return Err(bad("malformed [address]")),
            },
            None => match hp.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hp, None),
            },
        };
        if host.is_empty() {
            return Err(bad("the URL has no host"));
        }
        cfg.host = host.to_string();
        if let Some(p) = port {
            cfg.port =
                p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    bad(format!("the port {p:?} is not a number from 1 to 65535"))
                })?;
        }
        if let Some(u) = url.user() {
            cfg.user = u.to_string();
        }
        cfg.password = url.password().map(str::to_string);
        let db = url.path().trim_start_matches('/');
        if db.contains('/') {
            return Err(bad("the URL path is one database name: postgres://host/db"));
        }
        if !db.is_empty() {
            cfg.database = db.to_string();
        }
        url.only_options(NAME, OPTIONS)
            .map_err(|e| bad(e.message()))?;
        for (k, v) in url.query() {
            let dur =
                || duration::parse(v).map_err(|e| bad(format!("option {k}: {}", e.message())));
            match k.as_str() {
                "schema" => cfg.schema = v.clone(),
                "sslmode" => {
                    cfg.sslmode = match v.as_str() {
                        "disable" => SslMode::Disable,
                        "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(bad(format!(
                                "sslmode {other:?}: one of disable, prefer, require, verify-full"
                            )))
                        }
                    }
                }
                "sslrootcert" => cfg.sslrootcert = Some(v.into()),
                "connect_timeout" => cfg.connect_timeout = dur()?,
                "request_timeout" => cfg.request_timeout = dur()?,
                "recheck" => cfg.recheck = dur()?,
                "changes_kept" => {
                    cfg.changes_kept = v
                        .parse()
                        .map_err(|_| bad(format!("option changes_kept: {v:?} is not a number")))?
                }
                "listen" => {
                    cfg.listen = match v.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(bad("option listen: true or false")),
                    }
                }
                "password" => cfg.password = Some(v.clone()),
                _ => cfg.user = v.clone(),
            }
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.host.is_empty() || self.port == 0 {
            return Err(bad("a host and a port from 1 to 65535 are needed"));
        }
        if self.user.is_empty() || self.database.is_empty() {
            return Err(bad("the user and the database name must not be empty"));
        }
        if self.user.contains('\0') || self.database.contains('\0') {
            return Err(bad("the user and the database name must not contain NUL"));
        }
        let s = self.schema.as_bytes();
        let ok = !s.is_empty()
            && s.len() <= 40
            && (s[0].is_ascii_lowercase() || s[0] == b'_')
            && s.iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
            && !self.schema.starts_with("pg_");
        if !ok {
            return Err(bad(format!(
                "schema {:?}: lower-case letters, digits and _, not starting with a digit or pg_, at most 40",
                self.schema.chars().take(60).collect::<String>()
            )));
        }
        if self.sslrootcert.is_some() && self.sslmode != SslMode::VerifyFull {
            return Err(bad("sslrootcert is used by sslmode=verify-full only"));
        }
        for (what, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("recheck", self.recheck),
        ] {
            if d.is_zero() {
                return Err(bad(format!("{what} must be above zero")));
            }
            if d > Duration::from_secs(3600) {
                return Err(bad(format!("{what} above 1 h")));
            }
        }
        if self.changes_kept == 0 || self.changes_kept > i64::MAX as u64 / 2 {
            return Err(bad("changes_kept must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = PostgresConfig::from_url_str(
            "postgres://app:s%40cret@db.example:6432/main?schema=locks&request_timeout=2s&listen=false",
        )
        .unwrap();
        assert_eq!(c.host, "db.example");
        assert_eq!(c.port, 6432);
        assert_eq!(c.user, "app");
        assert_eq!(c.password.as_deref(), Some("s@cret"));
        assert_eq!(c.database, "main");
        assert_eq!(c.schema, "locks");
        assert_eq!(c.request_timeout, Duration::from_secs(2));
        assert!(!c.listen);
        assert!(!format!("{c:?}").contains("s@cret"));
        let t =
            PostgresConfig::from_url_str("postgres://h?sslmode=verify-full&sslrootcert=/ca.pem")
                .unwrap();
        assert_eq!(t.sslmode, SslMode::VerifyFull);
        assert_eq!(
            t.sslrootcert.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        let d = PostgresConfig::from_url_str("postgresql://h").unwrap();
        assert_eq!((d.port, d.database.as_str()), (5432, "postgres"));
        let v6 = PostgresConfig::from_url_str("postgres://[::1]:7/db").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 7));
        let v6 = PostgresConfig::from_url_str("postgres://[::1]/db").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 5432));
        for bad in [
            "postgres://",
            "postgres://h:0",
            "postgres://h:99999",
            "postgres://[::1/db",
            "postgres://[::1]x/db",
            "postgres://h1,h2/db",
            "postgres://h/a/b",
            "postgres://h?nosuch=1",
            "postgres://h?schema=Bad-Name",
            "postgres://h?schema=pg_catalog",
            "postgres://h?sslmode=verify-ca",
            "postgres://h?sslrootcert=/x.pem",
            "postgres://h?request_timeout=5",
            "postgres://h?changes_kept=0",
            "postgres://h?listen=maybe",
            "sqlite:///x.db",
        ] {
            let e = PostgresConfig::from_url_str(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}");
        }
        let e = PostgresConfig::from_url_str("postgres://u:topsecret@h?schema=X").unwrap_err();
        assert!(!e.to_string().contains("topsecret"), "{e}");
    }

    #[test]
    fn toml_table() {
        let t: toml::Table = toml::from_str(
            "host = \"db\"\nport = 6432\npassword = \"pw\"\nschema = \"app\"\nsslmode = \"disable\"\nrequest_timeout = \"3s\"\nlisten = false\n",
        )
        .unwrap();
        let c = PostgresConfig::from_table("postgres", t).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.schema.as_str()),
            ("db", 6432, "app")
        );
        assert_eq!(c.sslmode, SslMode::Disable);
        assert_eq!(c.request_timeout, Duration::from_secs(3));
        assert!(!c.listen);
        let t: toml::Table = toml::from_str("request_timeout = 3\n").unwrap();
        let e = PostgresConfig::from_table("postgres", t).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        let t: toml::Table = toml::from_str("nosuch = 1\n").unwrap();
        assert!(PostgresConfig::from_table("postgres", t).is_err());
    }
}
