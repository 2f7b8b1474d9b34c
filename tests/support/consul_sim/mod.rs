//! An in-process simulator of Consul's HTTP API: `/v1/kv`, `/v1/session/*`, `/v1/txn` and
//! `/v1/status/leader`, written from section A of the protocol fact sheet (cited as A1…A6).
//!
//! It runs on its own thread with its own tokio runtime, so one simulator can serve every test
//! of a binary whatever runtime each test uses. Start it with [`ConsulSim::start`] (a free
//! loopback port) or [`ConsulSim::start_with`]; dropping it stops the server.
//!
//! Real durations throughout (session TTL timers at 2 × TTL, lock-delays, blocking waits):
//! there is no time scaling.
//!
//! What it does not do (see the backend's `docs.md`): health checks, nodes and services, ACL
//! policies (only one optional token that every request must carry), Raft (one "leader"
//! applies everything at once, so every read mode is linearizable), tombstone GC (only on
//! demand via [`ConsulSim::reap_tombstones`]), the "no-op write keeps the index" rule of newer
//! servers, server-side key validation, and transaction ops other than `KV`.
#![allow(dead_code)]
// Handlers answer errors as ready-made HTTP responses, and the state's write functions take
// each request parameter separately, as the endpoints do.
#![allow(clippy::result_large_err, clippy::too_many_arguments)]

pub mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use serde::Serialize;
use serde_json::Value as Json;
use tokio::sync::watch;
use tokio::time::Instant;

use state::{
    Behavior, DirEntry, State, TxnOp, DEFAULT_LOCK_DELAY, MAX_TXN_OPS, MAX_VALUE_SIZE,
    SESSION_TTL_MAX, SESSION_TTL_MIN,
};

/// Blocking-query defaults (A2).
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
const DATACENTER: &str = "dc1";

/// Options of a simulator.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Where to listen; port 0 picks a free one.
    pub addr: SocketAddr,
    /// If set, every request must carry this ACL token (`X-Consul-Token` header, `?token=`, or
    /// `Authorization: Bearer`), else 403.
    pub acl_token: Option<String>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            acl_token: None,
        }
    }
}

struct App {
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    acl_token: Mutex<Option<String>>,
    /// Fault hook: requests whose path starts with a prefix wait this long before they are
    /// handled (a slow or stalled server).
    delays: Mutex<Vec<(String, Duration)>>,
    /// A write another client makes right after the next successful `PUT /v1/kv/<key>` of
    /// this key, before that PUT is answered (see [`ConsulSim::overwrite_after_next_put`]).
    overwrite: Mutex<Option<(String, Vec<u8>)>>,
    /// Requests received, by kind (see [`request_kind`]).
    requests: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl App {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn delay_for(&self, path: &str) -> Option<Duration> {
        let d = self.delays.lock().unwrap_or_else(|p| p.into_inner());
        d.iter()
            .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map(|(_, d)| *d)
            .max()
    }
}

/// A running simulator. Dropping it stops the server and its thread.
pub struct ConsulSim {
    addr: SocketAddr,
    app: Arc<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ConsulSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulSim")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ConsulSim {
    /// Starts a simulator on a free loopback port.
    pub fn start() -> ConsulSim {
        match Self::start_with(SimOptions::default()) {
            Ok(s) => s,
            Err(e) => panic!("cannot start the Consul simulator: {e}"),
        }
    }

    /// Starts a simulator with `opts`.
    pub fn start_with(opts: SimOptions) -> std::io::Result<ConsulSim> {
        let (changes, _) = watch::channel(0u64);
        let app = Arc::new(App {
            state: Mutex::new(State::new()),
            overwrite: Mutex::new(None),
            requests: Mutex::new(std::collections::BTreeMap::new()),
            changes,
            acl_token: Mutex::new(opts.acl_token.clone()),
            delays: Mutex::new(Vec::new()),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app2 = app.clone();
        let thread = std::thread::Builder::new()
            .name("consul-sim".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::bind(opts.addr).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(listener.local_addr());
                    // The leader's session TTL timers (A3).
                    let ticker_app = app2.clone();
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(Duration::from_millis(20));
                        loop {
                            tick.tick().await;
                            let changed = ticker_app.lock().expire_sessions(Instant::now());
                            if changed {
                                ticker_app.notify();
                            }
                        }
                    });
                    let router = axum::Router::new().fallback(handle).with_state(app2);
                    let _ = axum::serve(listener, router)
                        .with_graceful_shutdown(async move {
                            let _ = stop_rx.await;
                        })
                        .await;
                });
                // Dropping the runtime aborts blocked queries still in flight.
                rt.shutdown_timeout(Duration::from_millis(100));
            })?;
        let addr = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("simulator thread died"))??;
        Ok(ConsulSim {
            addr,
            app,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for raw HTTP clients.
    pub fn http_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `consul://127.0.0.1:PORT`, for `coordkit::connect`.
    pub fn url(&self) -> String {
        format!("consul://{}", self.addr)
    }

    /// Right after the next successful plain `PUT /v1/kv/<key>` of `key` (`key` as stored,
    /// with any prefix), another client's write of `value` (flags 0) is applied before the PUT is
    /// answered: a concurrent writer that wins the race to the key's next write.
    pub fn overwrite_after_next_put(&self, key: &str, value: &[u8]) {
        *self.app.overwrite.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((key.to_string(), value.to_vec()));
    }

    /// Reaps every KV tombstone now (Consul does it later, by itself).
    pub fn reap_tombstones(&self) {
        self.app.lock().reap_tombstones();
    }

    /// The current Raft index.
    pub fn raft_index(&self) -> u64 {
        self.app.lock().index
    }

    /// How many sessions exist.
    pub fn session_count(&self) -> usize {
        self.app.lock().sessions.len()
    }

    /// How many requests of each kind were received so far (`"session create"`, `"txn"`,
    /// `"kv GET"`, `"kv blocking GET"`, …; see [`request_kind`]). Also served as JSON at
    /// `GET /_sim/requests` (not counted), for a simulator in another process.
    pub fn request_counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.app
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many requests of kind `kind` were received so far.
    pub fn requests(&self, kind: &str) -> u64 {
        self.request_counts().get(kind).copied().unwrap_or(0)
    }

    /// Fault hook: every request whose path starts with `path_prefix` (such as
    /// `/v1/session/create` or `/v1/txn`) is held this long before it is handled;
    /// `Duration::MAX` stalls it (until the client gives up). `None` removes the delay.
    pub fn set_delay(&self, path_prefix: &str, delay: Option<Duration>) {
        self.set_delay_inner(path_prefix, delay);
    }

    /// Fault hook: from now on only `token` is accepted (a revoked or rotated ACL token:
    /// requests with the old one get 403 "ACL not found"); `None` turns ACLs off.
    pub fn set_acl_token(&self, token: Option<&str>) {
        *self.app.acl_token.lock().unwrap_or_else(|p| p.into_inner()) = token.map(str::to_string);
    }

    fn set_delay_inner(&self, path_prefix: &str, delay: Option<Duration>) {
        let mut d = self.app.delays.lock().unwrap_or_else(|p| p.into_inner());
        d.retain(|(p, _)| p != path_prefix);
        if let Some(delay) = delay {
            d.push((path_prefix.to_string(), delay));
        }
    }

    /// Fault hook: the node check `check` (such as `serfHealth`) goes critical, which
    /// invalidates every session that lists it in its `NodeChecks` (A3), with the usual
    /// release and lock-delay. Returns how many sessions were invalidated.
    pub fn fail_node_check(&self, check: &str) -> usize {
        let n = self.app.lock().fail_node_check(check, Instant::now());
        if n > 0 {
            self.app.notify();
        }
        n
    }

    /// Fault hook: from now on, a renew raises the session's TTL to `ttl` (if larger) and
    /// reports it, as a loaded Consul server may (A3: clients should adopt it). The session is
    /// then invalidated no earlier than that TTL after each renew.
    pub fn raise_ttl_on_renew(&self, ttl: Option<Duration>) {
        self.app.lock().renew_ttl = ttl;
    }

    /// Every KV key, for checks.
    pub fn keys(&self) -> Vec<String> {
        self.app.lock().kv.keys().cloned().collect()
    }

    /// Stops the server and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ConsulSim {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing

type Query = Vec<(String, String)>;

fn q_has(q: &Query, name: &str) -> bool {
    q.iter().any(|(k, _)| k == name)
}

fn q_get<'a>(q: &'a Query, name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Decodes `%XX` escapes (a malformed one is kept as it is, as Consul's Go server does for
/// paths), `+` as a space in query strings.
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let s = if plus_is_space {
        s.replace('+', " ")
    } else {
        s.to_string()
    };
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

fn parse_query(raw: Option<&str>) -> Query {
    raw.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k, true), percent_decode(v, true)),
            None => (percent_decode(p, true), String::new()),
        })
        .collect()
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut r = Response::new(Body::from(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"null".to_vec());
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The read headers (A2): index (never 0), known leader, last contact, effective consistency.
fn read_headers(r: &mut Response, index: Option<u64>, consistency: &str) {
    let h = r.headers_mut();
    if let Some(i) = index {
        h.insert("X-Consul-Index", HeaderValue::from(i.max(1)));
    }
    h.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    h.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    if let Ok(v) = HeaderValue::from_str(consistency) {
        h.insert("X-Consul-Effective-Consistency", v);
    }
}

/// `?stale` / `?consistent` (A1): both at once is a 400.
fn consistency(q: &Query) -> Result<&'static str, Response> {
    match (q_has(q, "stale"), q_has(q, "consistent")) {
        (true, true) => Err(text(
            StatusCode::BAD_REQUEST,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        )),
        (true, false) => Ok("stale"),
        (false, true) => Ok("consistent"),
        (false, false) => Ok("leader"),
    }
}

/// `?index` and `?wait` of a blocking query (A2).
fn blocking(q: &Query) -> Result<(u64, Duration), Response> {
    let index = match q_get(q, "index") {
        None | Some("") => 0,
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| text(StatusCode::BAD_REQUEST, "Invalid index"))?,
    };
    let wait = match q_get(q, "wait") {
        None | Some("") => DEFAULT_WAIT,
        Some(s) => state::parse_go_duration(s)
            .ok_or_else(|| text(StatusCode::BAD_REQUEST, "Invalid wait time"))?,
    };
    let wait = wait.min(MAX_WAIT);
    // Random jitter of up to wait/16 (A2).
    let jitter_max = wait / 16;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let jitter = if jitter_max.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_nanos(nanos % (jitter_max.as_nanos() as u64).max(1))
    };
    Ok((index, wait + jitter))
}

/// Runs `query` (which returns the result's index and the response) until its index exceeds
/// `min_index` or the wait runs out (A2). `min_index` 0 answers at once.
async fn block_on<F>(app: &App, min_index: u64, wait: Duration, mut query: F) -> Response
where
    F: FnMut(&State) -> (u64, Response),
{
    let deadline = Instant::now() + wait;
    let mut rx = app.changes.subscribe();
    loop {
        rx.borrow_and_update();
        let (idx, resp) = query(&app.lock());
        if min_index == 0 || idx > min_index || Instant::now() >= deadline {
            return resp;
        }
        tokio::select! {
            r = rx.changed() => { if r.is_err() { return resp; } }
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

fn token_of(headers: &HeaderMap, q: &Query) -> Option<String> {
    if let Some(t) = headers.get("X-Consul-Token").and_then(|v| v.to_str().ok()) {
        return Some(t.to_string());
    }
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.to_string());
    }
    q_get(q, "token").map(str::to_string)
}

/// The kind a request is counted under: `"kv GET"` (`"kv blocking GET"` with a non-zero
/// `?index`), `"kv PUT"`, `"kv DELETE"`, `"txn"`, `"session <op>"` (`create`, `renew`,
/// `destroy`, `info`, …), else the method and path.
pub fn request_kind(method: &Method, path: &str, q: &Query) -> String {
    if path == "/v1/kv" || path.starts_with("/v1/kv/") {
        let blocking = q_get(q, "index").is_some_and(|i| i != "0" && !i.is_empty());
        return if *method == Method::GET && blocking {
            "kv blocking GET".into()
        } else {
            format!("kv {method}")
        };
    }
    if path == "/v1/txn" {
        return "txn".into();
    }
    if let Some(rest) = path.strip_prefix("/v1/session/") {
        let op = rest.split('/').next().unwrap_or(rest);
        return format!("session {op}");
    }
    format!("{method} {path}")
}

async fn handle(
    axum::extract::State(app): axum::extract::State<Arc<App>>,
    req: Request,
) -> Response {
    let method = req.method().clone();
    let path = percent_decode(req.uri().path(), false);
    let q = parse_query(req.uri().query());
    if path == "/_sim/requests" {
        let counts = app
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        return json_response(StatusCode::OK, &counts);
    }
    {
        let kind = request_kind(&method, &path, &q);
        let mut counts = app.requests.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry(kind).or_insert(0) += 1;
    }
    let headers = req.headers().clone();
    let acl = app
        .acl_token
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(want) = &acl {
        match token_of(&headers, &q) {
            None => return text(StatusCode::FORBIDDEN, "Permission denied"),
            Some(t) if &t != want => return text(StatusCode::FORBIDDEN, "ACL not found"),
            Some(_) => {}
        }
    }
    if let Some(d) = app.delay_for(&path) {
        tokio::time::sleep(d).await;
    }
    if let Some(dc) = q_get(&q, "dc") {
        if !dc.is_empty() && dc != DATACENTER {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
        }
    }
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let read_body = |limit: usize| async move {
        axum::body::to_bytes(req.into_body(), limit)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| text(StatusCode::BAD_REQUEST, format!("failed to read body: {e}")))
    };
    if let Some(key) =
        path.strip_prefix("/v1/kv/")
            .or(if path == "/v1/kv" { Some("") } else { None })
    {
        let key = key.to_string();
        return match method {
            Method::GET => kv_get(&app, &key, &q).await,
            Method::PUT | Method::POST => {
                let body = read_body(usize::MAX).await;
                // The limit is checked on Content-Length only (A1). The body is read anyway
                // so the client sees the answer rather than a reset connection.
                if let Some(n) = content_length {
                    if n > MAX_VALUE_SIZE as u64 {
                        return too_large(n);
                    }
                }
                match body {
                    Ok(body) => kv_put(&app, &key, &q, body),
                    Err(r) => r,
                }
            }
            Method::DELETE => kv_delete(&app, &key, &q),
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        };
    }
    if path == "/v1/txn" {
        if method != Method::PUT {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        let body = read_body(usize::MAX).await;
        if let Some(n) = content_length {
            if n > MAX_VALUE_SIZE as u64 {
                return too_large(n);
            }
        }
        return match body {
            Ok(body) => txn(&app, &q, &body),
            Err(r) => r,
        };
    }
    if let Some(rest) = path.strip_prefix("/v1/session/") {
        let (op, id) = rest.split_once('/').unwrap_or((rest, ""));
        return match (method, op) {
            (Method::PUT, "create") => match read_body(1 << 20).await {
                Ok(body) => session_create(&app, &body),
                Err(r) => r,
            },
            (Method::PUT, "destroy") => {
                let changed = app.lock().invalidate_session(id, Instant::now());
                if changed {
                    app.notify();
                }
                // Idempotent (A3).
                json_response(StatusCode::OK, &true)
            }
            (Method::PUT, "renew") => {
                let s = app.lock().renew_session(id, Instant::now());
                match s {
                    Some(s) => json_response(StatusCode::OK, &vec![session_json(&s)]),
                    None => text(
                        StatusCode::NOT_FOUND,
                        format!("Session id '{id}' not found"),
                    ),
                }
            }
            (Method::GET, "info") | (Method::GET, "list") | (Method::GET, "node") => {
                let (min_index, wait) = match blocking(&q) {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                let mode = match consistency(&q) {
                    Ok(m) => m,
                    Err(r) => return r,
                };
                let op = op.to_string();
                let id = id.to_string();
                block_on(&app, min_index, wait, |st| {
                    let mut list: Vec<_> = st
                        .sessions
                        .values()
                        .filter(|s| match op.as_str() {
                            "info" => s.id == id,
                            "node" => s.node == id,
                            _ => true,
                        })
                        .map(session_json)
                        .collect();
                    list.sort_by_key(|s| s.create_index);
                    let mut r = json_response(StatusCode::OK, &list);
                    read_headers(&mut r, Some(st.sessions_index), mode);
                    (st.sessions_index, r)
                })
                .await
            }
            _ => text(StatusCode::NOT_FOUND, "404 page not found"),
        };
    }
    if path == "/v1/status/leader" && method == Method::GET {
        return json_response(StatusCode::OK, &"127.0.0.1:8300");
    }
    text(StatusCode::NOT_FOUND, "404 page not found")
}

fn too_large(n: u64) -> Response {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "Request body({n} bytes) too large, max size: {MAX_VALUE_SIZE} bytes. See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// KV (A1, A2)

/// The KV entry JSON, fields in Consul's order (A1).
#[derive(Serialize)]
struct EntryJson {
    #[serde(rename = "LockIndex")]
    lock_index: u64,
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Flags")]
    flags: u64,
    #[serde(rename = "Value")]
    value: Option<String>,
    #[serde(rename = "Session", skip_serializing_if = "Option::is_none")]
    session: Option<String>,
    #[serde(rename = "CreateIndex")]
    create_index: u64,
    #[serde(rename = "ModifyIndex")]
    modify_index: u64,
}

fn entry_json(e: &DirEntry, with_value: bool) -> EntryJson {
    EntryJson {
        lock_index: e.lock_index,
        key: e.key.clone(),
        flags: e.flags,
        // An empty value reads back as null (A1).
        value: if with_value && !e.value.is_empty() {
            Some(b64_encode(&e.value))
        } else {
            None
        },
        session: e.session.clone(),
        create_index: e.create_index,
        modify_index: e.modify_index,
    }
}

async fn kv_get(app: &App, key: &str, q: &Query) -> Response {
    let mode = match consistency(q) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let (min_index, wait) = match blocking(q) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let recurse = q_has(q, "recurse");
    let keys = q_has(q, "keys");
    if key.is_empty() && !recurse && !keys {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let separator = q_get(q, "separator")
        .or_else(|| q_get(q, "seperator"))
        .unwrap_or("")
        .to_string();
    let raw = q_has(q, "raw");
    block_on(app, min_index, wait, |st| {
        if keys {
            let idx = st.prefix_index(key);
            let names = st.keys(key, &separator);
            // A non-root prefix with no keys is a 404; the root gives [] (A1).
            let mut r = if names.is_empty() && !key.is_empty() {
                empty(StatusCode::NOT_FOUND)
            } else {
                json_response(StatusCode::OK, &names)
            };
            read_headers(&mut r, Some(idx), mode);
            (idx, r)
        } else if recurse {
            let idx = st.prefix_index(key);
            let list = st.list(key);
            let mut r = if list.is_empty() {
                empty(StatusCode::NOT_FOUND)
            } else {
                let out: Vec<EntryJson> = list.iter().map(|e| entry_json(e, true)).collect();
                json_response(StatusCode::OK, &out)
            };
            read_headers(&mut r, Some(idx), mode);
            (idx, r)
        } else {
            let idx = st.key_index(key);
            let mut r = match st.kv.get(key) {
                None => empty(StatusCode::NOT_FOUND),
                Some(e) if raw => {
                    let mut r = Response::new(Body::from(e.value.clone()));
                    r.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                    r.headers_mut().insert(
                        "X-Content-Type-Options",
                        HeaderValue::from_static("nosniff"),
                    );
                    r
                }
                Some(e) => json_response(StatusCode::OK, &vec![entry_json(e, true)]),
            };
            read_headers(&mut r, Some(idx), mode);
            (idx, r)
        }
    })
    .await
}

fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

fn parse_u64_param(q: &Query, name: &str) -> Result<Option<u64>, Response> {
    match q_get(q, name) {
        None => Ok(None),
        Some(s) => s.parse::<u64>().map(Some).map_err(|_| {
            text(
                StatusCode::BAD_REQUEST,
                format!("Invalid {name} value: {s:?}"),
            )
        }),
    }
}

fn kv_put(app: &App, key: &str, q: &Query, body: Vec<u8>) -> Response {
    if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let set: Vec<&str> = ["cas", "acquire", "release"]
        .into_iter()
        .filter(|p| q_has(q, p))
        .collect();
    if set.len() > 1 {
        return text(
            StatusCode::BAD_REQUEST,
            format!("Conflicting flags: {}", set.join("&")),
        );
    }
    let flags = match parse_u64_param(q, "flags") {
        Ok(f) => f.unwrap_or(0),
        Err(r) => return r,
    };
    let cas = match parse_u64_param(q, "cas") {
        Ok(c) => c,
        Err(r) => return r,
    };
    let result = {
        let mut st = app.lock();
        let r = st.kv_put(
            key,
            body,
            flags,
            cas,
            q_get(q, "acquire"),
            q_get(q, "release"),
            Instant::now(),
        );
        let mut pending = app.overwrite.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(r, Ok(true)) && pending.as_ref().is_some_and(|(k, _)| k == key) {
            if let Some((k, v)) = pending.take() {
                let _ = st.kv_put(&k, v, 0, None, None, None, Instant::now());
            }
        }
        r
    };
    match result {
        Ok(done) => {
            if done {
                app.notify();
            }
            // PUT answers carry no X-Consul-Index (A1).
            json_response(StatusCode::OK, &done)
        }
        Err(msg) => text(StatusCode::INTERNAL_SERVER_ERROR, msg),
    }
}

fn kv_delete(app: &App, key: &str, q: &Query) -> Response {
    let recurse = q_has(q, "recurse");
    if recurse && q_has(q, "cas") {
        return text(StatusCode::BAD_REQUEST, "Conflicting flags: cas&recurse");
    }
    if key.is_empty() && !recurse {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let cas = match parse_u64_param(q, "cas") {
        Ok(c) => c,
        Err(r) => return r,
    };
    let before = app.lock().index;
    let ok = app.lock().kv_delete(key, recurse, cas);
    if app.lock().index != before {
        app.notify();
    }
    json_response(StatusCode::OK, &ok)
}

// ---------------------------------------------------------------------------------------------
// Transactions (A4)

/// Looks a field up case-insensitively, as Go's JSON decoder does.
fn field<'a>(obj: &'a serde_json::Map<String, Json>, name: &str) -> Option<&'a Json> {
    obj.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

#[derive(Serialize)]
struct TxnResultJson {
    #[serde(rename = "KV")]
    kv: EntryJson,
}

#[derive(Serialize)]
struct TxnErrorJson {
    #[serde(rename = "OpIndex")]
    op_index: usize,
    #[serde(rename = "What")]
    what: String,
}

#[derive(Serialize)]
struct TxnResponse {
    #[serde(rename = "Results")]
    results: Option<Vec<TxnResultJson>>,
    #[serde(rename = "Errors")]
    errors: Option<Vec<TxnErrorJson>>,
}

fn parse_txn(body: &[u8]) -> Result<Vec<TxnOp>, Response> {
    let bad = |m: String| {
        text(
            StatusCode::BAD_REQUEST,
            format!("Failed to parse body: {m}"),
        )
    };
    let v: Json = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    let arr = v
        .as_array()
        .ok_or_else(|| bad("expected a JSON array of operations".into()))?;
    if arr.len() > MAX_TXN_OPS {
        return Err(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Transaction contains too many operations ({} > {MAX_TXN_OPS})",
                arr.len()
            ),
        ));
    }
    let mut ops = Vec::new();
    for (i, op) in arr.iter().enumerate() {
        let obj = op
            .as_object()
            .ok_or_else(|| bad(format!("operation {i} is not an object")))?;
        let kv = field(obj, "KV")
            .and_then(|v| v.as_object())
            .ok_or_else(|| bad(format!("operation {i}: only KV operations are simulated")))?;
        let s = |name: &str| -> Result<String, Response> {
            match field(kv, name) {
                None | Some(Json::Null) => Ok(String::new()),
                Some(Json::String(s)) => Ok(s.clone()),
                Some(other) => Err(bad(format!(
                    "operation {i}: {name} is not a string: {other}"
                ))),
            }
        };
        let n = |name: &str| -> Result<u64, Response> {
            match field(kv, name) {
                None | Some(Json::Null) => Ok(0),
                Some(v) => v
                    .as_u64()
                    .ok_or_else(|| bad(format!("operation {i}: {name} is not a u64: {v}"))),
            }
        };
        let value = b64_decode(&s("Value")?)
            .ok_or_else(|| bad(format!("operation {i}: Value is not base64")))?;
        let key = s("Key")?;
        if value.len() > MAX_VALUE_SIZE {
            return Err(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "Value for key {key:?} is too large ({} > {MAX_VALUE_SIZE} bytes)",
                    value.len()
                ),
            ));
        }
        ops.push(TxnOp {
            verb: s("Verb")?,
            key,
            value,
            flags: n("Flags")?,
            index: n("Index")?,
            session: s("Session")?,
        });
    }
    Ok(ops)
}

fn txn(app: &App, q: &Query, body: &[u8]) -> Response {
    let ops = match parse_txn(body) {
        Ok(ops) => ops,
        Err(r) => return r,
    };
    let read_only = ops.iter().all(|o| {
        matches!(
            o.verb.as_str(),
            "get"
                | "get-or-empty"
                | "get-tree"
                | "check-index"
                | "check-session"
                | "check-not-exists"
        )
    });
    let mode = if read_only {
        match consistency(q) {
            Ok(m) => Some(m),
            Err(r) => return r,
        }
    } else {
        None
    };
    let outcome = app.lock().txn(&ops, Instant::now());
    let mut r = match outcome {
        Ok((results, wrote)) => {
            if wrote {
                app.notify();
            }
            let results: Vec<TxnResultJson> = results
                .iter()
                .map(|r| TxnResultJson {
                    kv: entry_json(&r.entry, r.with_value),
                })
                .collect();
            json_response(
                StatusCode::OK,
                &TxnResponse {
                    results: if results.is_empty() {
                        None
                    } else {
                        Some(results)
                    },
                    errors: None,
                },
            )
        }
        Err(errors) => json_response(
            StatusCode::CONFLICT,
            &TxnResponse {
                results: None,
                errors: Some(
                    errors
                        .into_iter()
                        .map(|e| TxnErrorJson {
                            op_index: e.op_index,
                            what: e.what,
                        })
                        .collect(),
                ),
            },
        ),
    };
    // Read-only transactions report leader contact but no index; writes report neither (A4).
    if let Some(mode) = mode {
        read_headers(&mut r, None, mode);
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Sessions (A3)

#[derive(Serialize)]
struct SessionJson {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Node")]
    node: String,
    #[serde(rename = "LockDelay")]
    lock_delay: u64,
    #[serde(rename = "Behavior")]
    behavior: &'static str,
    #[serde(rename = "TTL")]
    ttl: String,
    #[serde(rename = "NodeChecks")]
    node_checks: Vec<String>,
    #[serde(rename = "ServiceChecks")]
    service_checks: Option<Vec<Json>>,
    #[serde(rename = "CreateIndex")]
    create_index: u64,
    #[serde(rename = "ModifyIndex")]
    modify_index: u64,
}

fn session_json(s: &state::Session) -> SessionJson {
    SessionJson {
        id: s.id.clone(),
        name: s.name.clone(),
        node: s.node.clone(),
        lock_delay: s.lock_delay.as_nanos() as u64,
        behavior: s.behavior.as_str(),
        // Stored as the create request spelled it, and returned so (also by renew).
        ttl: s.ttl_text.clone(),
        node_checks: s.node_checks.clone(),
        service_checks: if s.service_checks.is_empty() {
            None
        } else {
            Some(s.service_checks.clone())
        },
        create_index: s.create_index,
        modify_index: s.modify_index,
    }
}

fn session_create(app: &App, body: &[u8]) -> Response {
    let err500 = |m: String| text(StatusCode::INTERNAL_SERVER_ERROR, m);
    let obj = if body.iter().all(|b| b.is_ascii_whitespace()) {
        serde_json::Map::new()
    } else {
        match serde_json::from_slice::<Json>(body) {
            Ok(Json::Object(m)) => m,
            Ok(_) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "Request decode failed: not an object",
                )
            }
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: {e}"),
                )
            }
        }
    };
    let get_str = |name: &str| field(&obj, name).and_then(|v| v.as_str()).unwrap_or("");
    if let Some(node) = field(&obj, "Node").and_then(|v| v.as_str()) {
        if !node.is_empty() && node != state::NODE {
            return err500("Missing node registration".into());
        }
    }
    let behavior = match get_str("Behavior") {
        "" | "release" => Behavior::Release,
        "delete" => Behavior::Delete,
        _ => return err500("Invalid Behavior setting".into()),
    };
    let ttl = match get_str("TTL") {
        "" => None,
        s => match state::parse_go_duration(s) {
            None => return err500(format!("Session TTL '{s}' invalid")),
            Some(d) if d.is_zero() => None,
            Some(d) if d < SESSION_TTL_MIN || d > SESSION_TTL_MAX => {
                return err500(format!(
                    "Invalid Session TTL '{}', must be between [10s=24h0m0s]",
                    d.as_nanos()
                ))
            }
            Some(d) => Some(d),
        },
    };
    // LockDelay: a duration string or nanoseconds; values under 1000 mean seconds (A3).
    let lock_delay = match field(&obj, "LockDelay") {
        None | Some(Json::Null) => DEFAULT_LOCK_DELAY,
        Some(Json::String(s)) => match state::parse_go_duration(s) {
            Some(d) if d.as_nanos() < 1000 => Duration::from_secs(d.as_nanos() as u64),
            Some(d) => d,
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: invalid LockDelay {s:?}"),
                )
            }
        },
        Some(Json::Number(n)) => {
            let ns = n.as_f64().unwrap_or(0.0).max(0.0) as u64;
            if ns < 1000 {
                Duration::from_secs(ns)
            } else {
                Duration::from_nanos(ns)
            }
        }
        Some(other) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: LockDelay {other}"),
            )
        }
    };
    // Checks (deprecated) and NodeChecks both default to serfHealth; a key that is present
    // replaces its default (A3). Then Consul's `fixupEmptySessionChecks` (1.7+): an empty
    // `Checks` empties `NodeChecks` too (how older clients ask for no checks); a `Checks` left
    // at the default defers to `NodeChecks`; otherwise both lists count.
    let serf = || vec!["serfHealth".to_string()];
    let list = |name: &str| -> Result<Option<Vec<String>>, Response> {
        match field(&obj, name) {
            None => Ok(None),
            Some(Json::Null) => Ok(Some(Vec::new())),
            Some(Json::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| {
                    text(
                        StatusCode::BAD_REQUEST,
                        format!("Request decode failed: {name} must be a list of check IDs"),
                    )
                }),
            Some(other) => Err(text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {name} {other}"),
            )),
        }
    };
    let checks = match list("Checks") {
        Ok(c) => c.unwrap_or_else(serf),
        Err(r) => return r,
    };
    let mut node_checks = match list("NodeChecks") {
        Ok(c) => c.unwrap_or_else(serf),
        Err(r) => return r,
    };
    if checks.is_empty() {
        node_checks.clear();
    } else if checks != serf() && !node_checks.is_empty() {
        for c in checks {
            if !node_checks.contains(&c) {
                node_checks.push(c);
            }
        }
    }
    let service_checks = match field(&obj, "ServiceChecks") {
        Some(Json::Array(a)) => a.clone(),
        _ => vec![],
    };
    let name = get_str("Name").to_string();
    let id = app.lock().create_session(
        name,
        behavior,
        ttl,
        get_str("TTL").to_string(),
        lock_delay,
        node_checks,
        service_checks,
        Instant::now(),
    );
    app.notify();
    json_response(StatusCode::OK, &serde_json::json!({ "ID": id }))
}

// ---------------------------------------------------------------------------------------------
// base64 (standard alphabet, padded), kept here so the simulator shares no code with the client

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(B64[(n >> 18) as usize & 63] as char);
        out.push(B64[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            B64[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            B64[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
