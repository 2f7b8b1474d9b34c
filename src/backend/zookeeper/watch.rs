//! [`KvStore::watch`](crate::KvStore::watch) on ZooKeeper: a per-key cache in the manner of
//! Apache Curator's `CuratorCache`.
//!
//! - One persistent recursive watch on the prefix's directory delivers a notification per change
//!   (path and type only: ZooKeeper 3.8 sends no data and no zxid with it).
//! - The cache holds, per key, the `(czxid, data version)` of the state last reported (or seen
//!   when the watch started: that state is not reported). It is seeded by listing the prefix
//!   once the watch is registered.
//! - Notifications are taken in batches: every notification already received is consumed, the
//!   keys they name are re-read with pipelined `getData` requests (sent together, answered in
//!   order on the one connection), and a key yields an event only when its `(czxid, version)`
//!   differs from the cache: a put carrying the value read, or a delete when the node is gone.
//!   A key written again before its re-read is answered therefore yields one event with the
//!   latest value.
//! - An event is exact (one change) when that can be proven, and otherwise preceded by
//!   [`WatchEvent::Coalesced`]. Proofs: the data version grew by exactly one within one
//!   incarnation (same `czxid`); or exactly one notification was consumed for the key since its
//!   previous read, and none arrived while that read and this one were in flight. (ZooKeeper
//!   sends a change's notification before any reply that reflects the change, and the client
//!   dispatches them in order, so once a read is answered every notification it reflects has
//!   been received.)
//! - On a reconnect (the server was restarted, a leader election, a dropped connection) the
//!   client re-registers the watch, but notifications for changes made while disconnected are
//!   lost (ZOOKEEPER-4698); when the session expired the watch is gone. Either way the task
//!   re-lists the prefix (registering a new watch first on a new session) and reports the
//!   differences with the cache, as coalesced events, instead of ending.
//! - Nothing about the state is beyond reconstruction, so the stream never yields `WatchGap`
//!   for traffic or reconnects. It ends with an error only when the watch cannot continue: a
//!   permanent error (`PermissionDenied`: the credentials or the prefix's ACL are refused), or
//!   `WatchGap` if the watch task itself stopped unexpectedly.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::mpsc;
use zookeeper_client as zk;

use super::error::NAME;
use super::{path, Inner};
use crate::error::{Error, ErrorKind, Result};
use crate::key::matches_prefix;
use crate::kv::{Entry, Version, WatchEvent, WatchStream};

/// Re-reads sent together at most (each batch is bounded by the request timeout).
const READ_CHUNK: usize = 512;
/// Backoff between attempts to re-list after a failure or reconnect.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A node's identity and data version: what a change of it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    czxid: i64,
    version: i32,
}

impl Seen {
    fn of(stat: &zk::Stat) -> Seen {
        Seen {
            czxid: stat.czxid,
            version: stat.version,
        }
    }
}

/// What the watch knows of one key. A key missing from the map is absent, with an exact
/// boundary and nothing pending.
#[derive(Debug, Clone, Copy)]
struct KeyState {
    /// The state last reported (or seeded): `None` = absent.
    node: Option<Seen>,
    /// Every notification of this key consumed since `node` was read is for a change after it.
    exact: bool,
    /// Notifications of this key consumed since `node` was read.
    pending: u32,
}

impl Default for KeyState {
    fn default() -> Self {
        KeyState {
            node: None,
            exact: true,
            pending: 0,
        }
    }
}

/// Starts a watch of `prefix` (already validated).
pub(super) async fn start(inner: Arc<Inner>, prefix: &str) -> Result<WatchStream> {
    let client = inner.client().await?;
    let watcher = register(&inner, &client, prefix).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut task = WatchTask {
        inner,
        client,
        prefix: prefix.to_string(),
        watcher: Some(watcher),
        keys: HashMap::new(),
        queue: VecDeque::new(),
        disconnected: false,
        session_ended: false,
        auth_failed: false,
        rewatch: false,
        tx,
    };
    // Seed the cache: the state now is the starting point, not reported.
    let listed = task.list().await?;
    task.drain();
    let noticed = task.noticed();
    for (key, (_, stat)) in listed {
        task.keys.insert(
            key.clone(),
            KeyState {
                node: Some(Seen::of(&stat)),
                exact: !noticed.contains(&key),
                pending: 0,
            },
        );
    }
    for key in noticed {
        task.keys.entry(key).or_default().exact = false;
    }
    tokio::spawn(task.run());
    Ok(Box::pin(WatchRx {
        rx,
        ended: false,
        prefix: prefix.to_string(),
    }))
}

async fn register(
    inner: &Inner,
    client: &zk::Client,
    prefix: &str,
) -> Result<zk::PersistentWatcher> {
    let (dir, _) = path::split_prefix(prefix);
    let zdir = path::dir_path(&inner.root, dir);
    inner
        .bounded(
            "watch",
            prefix,
            client.watch(&zdir, zk::AddWatchMode::PersistentRecursive),
        )
        .await
}

/// The receiving end: turns an unexpected end of the task into one `WatchGap` error.
struct WatchRx {
    rx: mpsc::UnboundedReceiver<Result<WatchEvent>>,
    ended: bool,
    prefix: String,
}

impl futures::Stream for WatchRx {
    type Item = Result<WatchEvent>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.ended {
            return std::task::Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(Some(Err(e))) => {
                self.ended = true;
                std::task::Poll::Ready(Some(Err(e)))
            }
            std::task::Poll::Ready(None) => {
                self.ended = true;
                let e = Error::new(
                    ErrorKind::WatchGap,
                    NAME,
                    "the watch task stopped; events may have been missed: start a new watch \
                     and re-read",
                )
                .with_key(self.prefix.clone());
                std::task::Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }
}

/// Whether an error means the watch can never succeed (so retrying is pointless).
fn permanent(e: &Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::PermissionDenied | ErrorKind::InvalidConfig | ErrorKind::InvalidArgument
    )
}

struct WatchTask {
    inner: Arc<Inner>,
    client: zk::Client,
    prefix: String,
    /// `None` after a terminal session event (polling it again would panic).
    watcher: Option<zk::PersistentWatcher>,
    keys: HashMap<String, KeyState>,
    /// Notifications received and not yet consumed.
    queue: VecDeque<zk::WatchedEvent>,
    /// A `Disconnected` was consumed and no reconnect since.
    disconnected: bool,
    /// The session ended (expired or closed): a new one and a new watch are needed.
    session_ended: bool,
    /// The session failed authentication.
    auth_failed: bool,
    /// The connection was re-established: the persistent watch must be registered again
    /// (zookeeper-client 0.11 does not re-send persistent watches on reconnect).
    rewatch: bool,
    tx: mpsc::UnboundedSender<Result<WatchEvent>>,
}

/// What consuming the queued notifications asks for.
#[derive(Default)]
struct Work {
    /// Keys to re-read, in the order of their first notification.
    dirty: Vec<String>,
    /// The cache must be rebuilt from a listing (reconnect).
    resync: bool,
}

impl WatchTask {
    /// Moves every notification already received into the queue (up to a terminal one).
    fn drain(&mut self) {
        let Some(w) = self.watcher.as_mut() else {
            return;
        };
        if self.queue.back().is_some_and(|e| {
            e.event_type == zk::EventType::Session && e.session_state.is_terminated()
        }) {
            return;
        }
        while let Some(ev) = w.changed().now_or_never() {
            let terminal =
                ev.event_type == zk::EventType::Session && ev.session_state.is_terminated();
            self.queue.push_back(ev);
            if terminal {
                break;
            }
        }
    }

    /// The keys named by the queued notifications.
    fn noticed(&self) -> HashSet<String> {
        self.queue
            .iter()
            .filter(|e| e.event_type != zk::EventType::Session)
            .filter_map(|e| self.key_of(&e.path))
            .collect()
    }

    fn key_of(&self, zpath: &str) -> Option<String> {
        path::path_to_key(&self.inner.root, zpath).filter(|k| matches_prefix(k, &self.prefix))
    }

    /// Consumes the queue.
    fn consume(&mut self) -> Work {
        let mut work = Work::default();
        let mut seen = HashSet::new();
        while let Some(ev) = self.queue.pop_front() {
            match ev.event_type {
                zk::EventType::Session => match ev.session_state {
                    zk::SessionState::Disconnected => self.disconnected = true,
                    zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                        if std::mem::take(&mut self.disconnected) {
                            work.resync = true;
                            self.rewatch = true;
                        }
                    }
                    zk::SessionState::AuthFailed => {
                        self.auth_failed = true;
                        self.watcher = None;
                    }
                    zk::SessionState::Expired | zk::SessionState::Closed => {
                        self.session_ended = true;
                        self.watcher = None;
                    }
                },
                zk::EventType::NodeCreated
                | zk::EventType::NodeDataChanged
                | zk::EventType::NodeDeleted => {
                    if let Some(key) = self.key_of(&ev.path) {
                        let st = self.keys.entry(key.clone()).or_default();
                        st.pending = st.pending.saturating_add(1);
                        if seen.insert(key.clone()) {
                            work.dirty.push(key);
                        }
                    }
                }
                zk::EventType::NodeChildrenChanged => {}
            }
        }
        work
    }

    /// Waits until a notification is queued; `false` if the stream was dropped.
    async fn wait(&mut self) -> bool {
        if !self.queue.is_empty() {
            return true;
        }
        let Some(w) = self.watcher.as_mut() else {
            return !self.tx.is_closed();
        };
        tokio::select! {
            ev = w.changed() => {
                self.queue.push_back(ev);
                true
            }
            _ = self.tx.closed() => false,
        }
    }

    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.tx.closed() => false,
        }
    }

    fn send(&self, ev: WatchEvent) -> bool {
        self.tx.send(Ok(ev)).is_ok()
    }

    /// Sends an event, marked when it may stand for several changes.
    fn emit(&self, ev: WatchEvent, exact: bool) -> bool {
        if !exact
            && !self.send(WatchEvent::Coalesced {
                key: ev.key().to_string(),
            })
        {
            return false;
        }
        self.send(ev)
    }

    async fn run(mut self) {
        let mut resync = false;
        let mut backoff = RETRY_MIN;
        loop {
            if !resync && !self.wait().await {
                return;
            }
            self.drain();
            tracing::trace!(queued = ?self.queue, "watch batch");
            let work = self.consume();
            if self.auth_failed {
                let e = Error::new(
                    ErrorKind::PermissionDenied,
                    NAME,
                    "the ZooKeeper session failed authentication; the watch cannot continue",
                )
                .with_key(self.prefix.clone());
                let _ = self.tx.send(Err(e));
                return;
            }
            if self.session_ended {
                tracing::info!(backend = NAME, prefix = %self.prefix, "watch session ended; re-establishing the watch");
                match self.renew_session().await {
                    Ok(()) => {}
                    Err(e) if permanent(&e) => {
                        let _ = self.tx.send(Err(e));
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(backend = NAME, prefix = %self.prefix, error = %e, "cannot re-establish the watch yet; retrying");
                        if !self.sleep(backoff).await {
                            return;
                        }
                        backoff = (backoff * 2).min(RETRY_MAX);
                        resync = true;
                        continue;
                    }
                }
                resync = true;
            }
            resync |= work.resync;
            if self.watcher.is_none() {
                // No watch to follow: get a new session and watch.
                self.session_ended = true;
                resync = true;
                if !self.sleep(backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
            if resync || self.disconnected {
                if self.disconnected {
                    // Wait for the reconnect (a SyncConnected notification) or the expiry.
                    resync = true;
                    if !self.wait().await {
                        return;
                    }
                    continue;
                }
                match self.resync().await {
                    Ok(true) => {
                        resync = false;
                        backoff = RETRY_MIN;
                    }
                    Ok(false) => return,
                    Err(e) if permanent(&e) => {
                        let _ = self.tx.send(Err(e));
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(backend = NAME, prefix = %self.prefix, error = %e, "watch re-list failed; retrying");
                        if !self.sleep(backoff).await {
                            return;
                        }
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                }
                continue;
            }
            match self.reread(work.dirty).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) if permanent(&e) => {
                    let _ = self.tx.send(Err(e));
                    return;
                }
                Err(e) => {
                    tracing::debug!(backend = NAME, prefix = %self.prefix, error = %e, "watch re-read failed; re-listing");
                    resync = true;
                }
            }
        }
    }

    /// A new session (the old one ended) and a new watch on it.
    async fn renew_session(&mut self) -> Result<()> {
        self.watcher = None;
        self.queue.clear();
        self.disconnected = false;
        let client = self.inner.client().await?;
        let watcher = register(&self.inner, &client, &self.prefix).await?;
        self.client = client;
        self.watcher = Some(watcher);
        self.session_ended = false;
        self.rewatch = false;
        Ok(())
    }

    /// Re-reads `dirty` (pipelined) and reports what changed. `Ok(false)`: the stream was
    /// dropped.
    async fn reread(&mut self, dirty: Vec<String>) -> Result<bool> {
        let mut results = Vec::with_capacity(dirty.len());
        let mut issued = Vec::with_capacity(dirty.len());
        for chunk in dirty.chunks(READ_CHUNK) {
            // Notifications consumed so far are all for changes the reads below reflect.
            for key in chunk {
                let st = self.keys.entry(key.clone()).or_default();
                issued.push(std::mem::take(&mut st.pending));
            }
            let reads: Vec<_> = chunk
                .iter()
                .map(|k| self.client.get_data(&path::key_path(&self.inner.root, k)))
                .collect();
            let answers = self
                .inner
                .bounded("watch read", &self.prefix, async move {
                    Ok(futures::future::join_all(reads).await)
                })
                .await;
            match answers {
                Ok(a) => results.extend(a),
                Err(e) => {
                    self.forget_exactness(&dirty);
                    return Err(e);
                }
            }
        }
        // Every notification that the answers reflect has been received by now.
        self.drain();
        let later = self.noticed();
        for ((key, n), r) in dirty.into_iter().zip(issued).zip(results) {
            let now = match r {
                Ok((value, stat)) => Some((value, stat)),
                Err(zk::Error::NoNode) => None,
                Err(e) => {
                    self.forget_exactness(std::slice::from_ref(&key));
                    return Err(super::error::map(e, "watch read", &key));
                }
            };
            let k = later.contains(&key);
            if !self.report(key, n, k, now) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn forget_exactness(&mut self, keys: &[String]) {
        for key in keys {
            self.keys.entry(key.clone()).or_default().exact = false;
        }
    }

    /// Reports the state `now` of `key` read after consuming `n` notifications of it, `later`
    /// telling whether more arrived while the read was in flight.
    fn report(
        &mut self,
        key: String,
        n: u32,
        later: bool,
        now: Option<(Vec<u8>, zk::Stat)>,
    ) -> bool {
        let prev = self.keys.get(&key).copied().unwrap_or_default();
        // Exactly `n` changes lie between the cached state and the one read.
        let counted = prev.exact && !later;
        let one = counted && n == 1;
        let next = now.as_ref().map(|(_, s)| Seen::of(s));
        let ok = match (prev.node, now) {
            (None, None) => {
                if counted && n > 0 {
                    // Created and deleted again between two reads.
                    self.emit(WatchEvent::Delete { key: key.clone() }, false)
                } else {
                    true
                }
            }
            (Some(_), None) => self.emit(WatchEvent::Delete { key: key.clone() }, one),
            (Some(p), Some(_)) if Some(p) == next => true,
            (p, Some((value, stat))) => {
                let stepped =
                    p.is_some_and(|p| p.czxid == stat.czxid && stat.version == p.version + 1);
                let e = Entry {
                    key: key.clone(),
                    value,
                    version: Version::from_raw(stat.mzxid as u64),
                };
                self.emit(WatchEvent::Put(e), one || stepped)
            }
        };
        let st = KeyState {
            node: next,
            exact: !later,
            pending: self.keys.get(&key).map_or(0, |s| s.pending),
        };
        if st.node.is_none() && st.exact && st.pending == 0 {
            self.keys.remove(&key);
        } else {
            self.keys.insert(key, st);
        }
        ok
    }

    /// Re-lists the prefix and reports every difference with the cache (as coalesced events:
    /// changes made while disconnected were not notified). `Ok(false)`: the stream was dropped.
    async fn resync(&mut self) -> Result<bool> {
        // Notifications consumed before the listing are reflected by it.
        self.drain();
        let _ = self.consume();
        if self.watcher.is_none() || self.disconnected {
            return Err(Error::new(
                ErrorKind::Unavailable,
                NAME,
                "the ZooKeeper connection is not back yet",
            ));
        }
        if self.rewatch {
            // The server may have lost the watch (a restart, another server): register it again
            // before listing, so that every change after the listing is notified. The old
            // watcher is dropped once the new one exists (the client then keeps the server's
            // watch).
            let w = register(&self.inner, &self.client, &self.prefix).await?;
            self.watcher = Some(w);
            self.rewatch = false;
        }
        let listed = self.list().await?;
        self.drain();
        let later = self.noticed();
        let mut puts: Vec<(String, Vec<u8>, zk::Stat)> = Vec::new();
        let mut gone: Vec<String> = Vec::new();
        for (key, st) in &self.keys {
            if st.node.is_some() && !listed.contains_key(key) {
                gone.push(key.clone());
            }
        }
        for (key, (value, stat)) in listed {
            let prev = self.keys.get(&key).and_then(|s| s.node);
            if prev != Some(Seen::of(&stat)) {
                puts.push((key, value, stat));
            } else if later.contains(&key) {
                if let Some(s) = self.keys.get_mut(&key) {
                    s.exact = false;
                    s.pending = 0;
                }
            } else if let Some(s) = self.keys.get_mut(&key) {
                s.exact = true;
                s.pending = 0;
            }
        }
        // Puts in commit order as far as it is known (by the zxid of their write), then deletes.
        puts.sort_by_key(|(_, _, s)| s.mzxid);
        gone.sort();
        for (key, value, stat) in puts {
            let prev = self.keys.get(&key).and_then(|s| s.node);
            let stepped =
                prev.is_some_and(|p| p.czxid == stat.czxid && stat.version == p.version + 1);
            let e = Entry {
                key: key.clone(),
                value,
                version: Version::from_raw(stat.mzxid as u64),
            };
            if !self.emit(WatchEvent::Put(e), stepped) {
                return Ok(false);
            }
            self.keys.insert(
                key.clone(),
                KeyState {
                    node: Some(Seen::of(&stat)),
                    exact: !later.contains(&key),
                    pending: 0,
                },
            );
        }
        for key in gone {
            if !self.emit(WatchEvent::Delete { key: key.clone() }, false) {
                return Ok(false);
            }
            self.keys.remove(&key);
        }
        // Absent keys: only those with notifications in flight keep an entry.
        self.keys.retain(|k, s| {
            if s.node.is_none() {
                s.pending = 0;
                s.exact = !later.contains(k);
                !s.exact
            } else {
                true
            }
        });
        for key in later {
            self.keys.entry(key).or_default().exact = false;
        }
        Ok(true)
    }

    /// Every key under the prefix with its value and stat (children listed, then the values
    /// read pipelined).
    async fn list(&self) -> Result<HashMap<String, (Vec<u8>, zk::Stat)>> {
        let inner = &self.inner;
        let client = &self.client;
        let prefix = self.prefix.as_str();
        let keys = inner.key_names(client, prefix, "watch list").await?;
        let mut out = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(READ_CHUNK) {
            let reads: Vec<_> = chunk
                .iter()
                .map(|k| client.get_data(&path::key_path(&inner.root, k)))
                .collect();
            let results = inner
                .bounded("watch list", prefix, async move {
                    Ok(futures::future::join_all(reads).await)
                })
                .await?;
            for (k, r) in chunk.iter().zip(results) {
                match r {
                    Ok(v) => {
                        out.insert(k.clone(), v);
                    }
                    Err(zk::Error::NoNode) => {}
                    Err(e) => return Err(super::error::map(e, "watch list", prefix)),
                }
            }
        }
        Ok(out)
    }
}
