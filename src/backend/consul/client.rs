//! A small typed client for the parts of Consul's HTTP API coordkit uses: `/v1/kv`,
//! `/v1/session/*` and `/v1/txn`.
//!
//! No published crate fits (one has no KV API, another no public session API and no binary
//! values), so this is a thin layer over `reqwest` with rustls.

use std::time::Duration;

use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::{ConsulConfig, NAME};
use crate::config::url::{percent_encode as encode_query, percent_encode_path as encode_path};
use crate::error::{Error, ErrorKind, Result};

/// The Consul KV entry (`/v1/kv` and `/v1/txn` results).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct DirEntry {
    #[serde(default)]
    pub lock_index: u64,
    pub key: String,
    #[serde(default)]
    pub flags: u64,
    /// Base64, or null for an empty value.
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
}

impl DirEntry {
    /// The decoded value (empty for null).
    pub fn bytes(&self) -> Result<Vec<u8>> {
        match &self.value {
            None => Ok(Vec::new()),
            Some(s) => base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Backend,
                        NAME,
                        format!("server sent a value that is not base64: {e}"),
                    )
                    .with_key(self.key.clone())
                }),
        }
    }

    /// The holding session, if any (an empty string counts as none).
    pub fn holder(&self) -> Option<&str> {
        self.session.as_deref().filter(|s| !s.is_empty())
    }
}

/// One operation of a `/v1/txn` request.
#[derive(Debug, Clone, Default)]
pub(crate) struct TxnKv<'a> {
    pub verb: &'a str,
    pub key: &'a str,
    pub value: Option<&'a [u8]>,
    pub flags: u64,
    pub index: u64,
    pub session: Option<&'a str>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TxnResponse {
    #[serde(default)]
    results: Option<Vec<TxnResultItem>>,
    #[serde(default)]
    errors: Option<Vec<TxnError>>,
}

#[derive(Debug, Deserialize)]
struct TxnResultItem {
    #[serde(rename = "KV")]
    kv: Option<DirEntry>,
}

/// One failed operation of a rolled-back transaction.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TxnError {
    #[serde(default)]
    pub op_index: usize,
    #[serde(default)]
    pub what: String,
}

/// What a transaction gave back.
#[derive(Debug)]
pub(crate) enum TxnOutcome {
    /// Committed: the KV results in order.
    Ok(Vec<DirEntry>),
    /// Rolled back (409) with every failed operation.
    RolledBack(Vec<TxnError>),
}

/// A session as `/v1/session/renew` returns it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SessionInfo {
    #[serde(rename = "TTL", default)]
    ttl: String,
}

/// An HTTP answer: status, `X-Consul-Index`, body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub index: Option<u64>,
    pub body: Vec<u8>,
}

impl Answer {
    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body)
            .chars()
            .take(300)
            .collect::<String>()
            .trim()
            .to_string()
    }
}

/// Read consistency, as query flags (`?consistent`, `?stale`:
/// <https://developer.hashicorp.com/consul/api-docs/features/consistency>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Default,
    Consistent,
    Stale,
}

/// The HTTP client: one connection pool, the token as a header, the datacenter as `?dc=`.
#[derive(Clone)]
pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    dc: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("dc", &self.dc)
            .finish()
    }
}

impl Client {
    pub fn new(cfg: &ConsulConfig) -> Result<Client> {
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout())
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| {
                Error::new(
                    ErrorKind::InvalidConfig,
                    NAME,
                    format!("cannot build the HTTP client: {e}"),
                )
            })?;
        let scheme = if cfg.https { "https" } else { "http" };
        Ok(Client {
            http,
            base: format!("{scheme}://{}", cfg.address),
            token: cfg.token.clone().filter(|t| !t.is_empty()),
            dc: cfg.datacenter.clone().filter(|d| !d.is_empty()),
            timeout: cfg.timeout(),
        })
    }

    /// Sends one request. `extra` extends the timeout (blocking queries wait server-side).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        extra: Duration,
        key: &str,
    ) -> Result<Answer> {
        let mut url = format!("{}{}", self.base, path);
        let mut sep = '?';
        let mut push = |k: &str, v: &str| {
            url.push(sep);
            sep = '&';
            url.push_str(k);
            if !v.is_empty() {
                url.push('=');
                url.push_str(&encode_query(v));
            }
        };
        for (k, v) in query {
            push(k, v);
        }
        if let Some(dc) = &self.dc {
            push("dc", dc);
        }
        let mut req = self
            .http
            .request(method, &url)
            .timeout(self.timeout + extra);
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.map_err(|e| self.net_error(e, key))?;
        let status = resp.status();
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.net_error(e, key))?
            .to_vec();
        let answer = Answer {
            status,
            index,
            body,
        };
        match status {
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => Err(Error::new(
                ErrorKind::PermissionDenied,
                NAME,
                format!("the server refused the request: {}", answer.body_text()),
            )
            .with_key(key)),
            StatusCode::PAYLOAD_TOO_LARGE => Err(Error::new(
                ErrorKind::ValueTooLarge,
                NAME,
                format!(
                    "the server refused the request as too large: {}",
                    answer.body_text()
                ),
            )
            .with_key(key)),
            s if s.is_server_error() => {
                let text = answer.body_text();
                let kind = if text.contains("No cluster leader")
                    || text.contains("No path to datacenter")
                    || s == StatusCode::SERVICE_UNAVAILABLE
                    || s == StatusCode::BAD_GATEWAY
                    || s == StatusCode::GATEWAY_TIMEOUT
                {
                    ErrorKind::Unavailable
                } else {
                    ErrorKind::Backend
                };
                Err(Error::new(kind, NAME, format!("server error {s}: {text}")).with_key(key))
            }
            _ => Ok(answer),
        }
    }

    fn net_error(&self, e: reqwest::Error, key: &str) -> Error {
        let kind = if e.is_timeout() {
            ErrorKind::Timeout
        } else {
            ErrorKind::Unavailable
        };
        // Never show the URL's query (it may carry a datacenter, never the token, but keep
        // messages short): reqwest's Display includes the URL without credentials.
        Error::new(kind, NAME, format!("{} request failed: {e}", self.base))
            .with_key(key)
            .with_source(e)
    }

    fn unexpected(&self, what: &str, a: &Answer, key: &str) -> Error {
        let kind = if a.status == StatusCode::BAD_REQUEST {
            ErrorKind::InvalidArgument
        } else {
            ErrorKind::Backend
        };
        Error::new(
            kind,
            NAME,
            format!("{what}: unexpected answer {}: {}", a.status, a.body_text()),
        )
        .with_key(key)
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        a: &Answer,
        key: &str,
    ) -> Result<T> {
        serde_json::from_slice(&a.body).map_err(|e| {
            Error::new(
                ErrorKind::Backend,
                NAME,
                format!("{what}: cannot parse the answer: {e}: {}", a.body_text()),
            )
            .with_key(key)
        })
    }

    // ---- KV ----

    /// `GET /v1/kv/<key>` (or `?recurse` for a prefix), optionally blocking on `index`.
    /// Returns the entries (empty on 404) and the `X-Consul-Index`.
    pub async fn kv_get(
        &self,
        key: &str,
        recurse: bool,
        mode: Mode,
        block: Option<(u64, Duration)>,
    ) -> Result<(Vec<DirEntry>, u64)> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if recurse {
            q.push(("recurse", String::new()));
        }
        match mode {
            Mode::Default => {}
            Mode::Consistent => q.push(("consistent", String::new())),
            Mode::Stale => q.push(("stale", String::new())),
        }
        let mut extra = Duration::ZERO;
        if let Some((index, wait)) = block {
            // Never send index 0 as a blocking index
            // (https://developer.hashicorp.com/consul/api-docs/features/blocking).
            q.push(("index", index.max(1).to_string()));
            q.push(("wait", format!("{}ms", wait.as_millis().max(1))));
            // The server may add up to wait/16 of jitter (same page).
            extra = wait + wait / 16 + Duration::from_secs(1);
        }
        let path = format!("/v1/kv/{}", encode_path(key));
        let a = self.send(Method::GET, &path, &q, None, extra, key).await?;
        let index = a.index.unwrap_or(1).max(1);
        match a.status {
            StatusCode::NOT_FOUND => Ok((Vec::new(), index)),
            StatusCode::OK => Ok((self.parse("kv get", &a, key)?, index)),
            _ => Err(self.unexpected("kv get", &a, key)),
        }
    }

    /// `PUT /v1/kv/<key>` with query flags; the `true`/`false` answer.
    pub async fn kv_put(
        &self,
        key: &str,
        value: Vec<u8>,
        query: &[(&str, String)],
    ) -> Result<bool> {
        let path = format!("/v1/kv/{}", encode_path(key));
        let a = self
            .send(Method::PUT, &path, query, Some(value), Duration::ZERO, key)
            .await?;
        if a.status != StatusCode::OK {
            return Err(self.unexpected("kv put", &a, key));
        }
        // The Go client only checks for "true" in the body (Consul's api/kv.go).
        Ok(String::from_utf8_lossy(&a.body).contains("true"))
    }

    /// `DELETE /v1/kv/<key>`.
    pub async fn kv_delete(&self, key: &str) -> Result<bool> {
        self.kv_delete_with(key, &[]).await
    }

    /// `DELETE /v1/kv/<key>` with query flags (`cas`); the `true`/`false` answer.
    pub async fn kv_delete_with(&self, key: &str, query: &[(&str, String)]) -> Result<bool> {
        let path = format!("/v1/kv/{}", encode_path(key));
        let a = self
            .send(Method::DELETE, &path, query, None, Duration::ZERO, key)
            .await?;
        if a.status != StatusCode::OK {
            return Err(self.unexpected("kv delete", &a, key));
        }
        Ok(String::from_utf8_lossy(&a.body).contains("true"))
    }

    /// `PUT /v1/txn` (<https://developer.hashicorp.com/consul/api-docs/txn>).
    pub async fn txn(&self, ops: &[TxnKv<'_>], key: &str) -> Result<TxnOutcome> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let ops: Vec<serde_json::Value> = ops
            .iter()
            .map(|op| {
                let mut kv = serde_json::Map::new();
                kv.insert("Verb".into(), op.verb.into());
                kv.insert("Key".into(), op.key.into());
                if let Some(v) = op.value {
                    kv.insert("Value".into(), b64.encode(v).into());
                }
                if op.flags != 0 {
                    kv.insert("Flags".into(), op.flags.into());
                }
                if op.index != 0 {
                    kv.insert("Index".into(), op.index.into());
                }
                if let Some(s) = op.session {
                    kv.insert("Session".into(), s.into());
                }
                serde_json::json!({ "KV": kv })
            })
            .collect();
        let body = serde_json::to_vec(&ops).map_err(|e| {
            Error::new(
                ErrorKind::Backend,
                NAME,
                format!("cannot encode a transaction: {e}"),
            )
        })?;
        let a = self
            .send(Method::PUT, "/v1/txn", &[], Some(body), Duration::ZERO, key)
            .await?;
        match a.status {
            StatusCode::OK => {
                let r: TxnResponse = self.parse("txn", &a, key)?;
                Ok(TxnOutcome::Ok(
                    r.results
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|i| i.kv)
                        .collect(),
                ))
            }
            StatusCode::CONFLICT => {
                let r: TxnResponse = self.parse("txn", &a, key)?;
                Ok(TxnOutcome::RolledBack(r.errors.unwrap_or_default()))
            }
            _ => Err(self.unexpected("txn", &a, key)),
        }
    }

    // ---- sessions (https://developer.hashicorp.com/consul/api-docs/session) ----

    /// `PUT /v1/session/create`; the new session's ID.
    pub async fn session_create(
        &self,
        name: &str,
        ttl: Duration,
        lock_delay: Duration,
        behavior: &str,
        key: &str,
    ) -> Result<String> {
        let body = serde_json::json!({
            "Name": name,
            "TTL": go_duration(ttl),
            // A number in nanoseconds; values under 1000 would mean seconds (Consul's
            // agent/session_endpoint.go, `FixupLockDelay`), so send a duration string instead.
            "LockDelay": format!("{}ms", lock_delay.as_millis()),
            "Behavior": behavior,
            // No health checks: only the TTL (or a destroy) may invalidate the session. The
            // default `serfHealth` check would invalidate it whenever the agent's node fails
            // a gossip health check, at any moment and without regard to renewals. Servers
            // before 1.7 know only `Checks`; newer ones take `NodeChecks`, and read an empty
            // `Checks` as "no node checks" too.
            "NodeChecks": [],
            "Checks": [],
        });
        let body = serde_json::to_vec(&body).map_err(|e| {
            Error::new(
                ErrorKind::Backend,
                NAME,
                format!("cannot encode a session: {e}"),
            )
        })?;
        let a = self
            .send(
                Method::PUT,
                "/v1/session/create",
                &[],
                Some(body),
                Duration::ZERO,
                key,
            )
            .await?;
        if a.status != StatusCode::OK {
            return Err(self.unexpected("session create", &a, key));
        }
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let c: Created = self.parse("session create", &a, key)?;
        Ok(c.id)
    }

    /// `PUT /v1/session/renew/<id>`: `Ok(Some(ttl))` with the TTL the server reports (adopt
    /// it; `None` inside if the answer names none that parses), `Ok(None)` if the session is
    /// gone (404, or an answer without the session).
    pub async fn session_renew(&self, id: &str, key: &str) -> Result<Option<Option<Duration>>> {
        let path = format!("/v1/session/renew/{}", encode_path(id));
        let a = self
            .send(Method::PUT, &path, &[], None, Duration::ZERO, key)
            .await?;
        match a.status {
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::OK => {
                let list: Vec<SessionInfo> = self.parse("session renew", &a, key)?;
                Ok(list.first().map(|s| {
                    crate::config::duration::parse(&s.ttl)
                        .ok()
                        .filter(|t| !t.is_zero())
                }))
            }
            _ => Err(self.unexpected("session renew", &a, key)),
        }
    }

    /// `PUT /v1/session/destroy/<id>` (idempotent).
    pub async fn session_destroy(&self, id: &str, key: &str) -> Result<()> {
        let path = format!("/v1/session/destroy/{}", encode_path(id));
        let a = self
            .send(Method::PUT, &path, &[], None, Duration::ZERO, key)
            .await?;
        if a.status != StatusCode::OK {
            return Err(self.unexpected("session destroy", &a, key));
        }
        Ok(())
    }
}

/// A duration in Go syntax, as Consul stores it: whole seconds as `"15s"`, else milliseconds.
pub(crate) fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(go_duration(Duration::from_millis(10_500)), "10500ms");
        for d in [Duration::from_secs(10), Duration::from_millis(10_500)] {
            assert_eq!(crate::config::duration::parse(&go_duration(d)).unwrap(), d);
        }
    }

    #[test]
    fn paths_are_encoded() {
        assert_eq!(encode_path("a/b-c_d.e"), "a/b-c_d.e");
        assert_eq!(encode_path("a b?c#d%"), "a%20b%3Fc%23d%25");
        assert_eq!(encode_query("a b&c=d"), "a%20b%26c%3Dd");
    }
}
