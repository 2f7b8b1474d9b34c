//! The in-memory backend: the reference implementation every other backend is measured against.
//!
//! Exact and single-process: all clones of a [`MemoryStore`] share one store; nothing survives
//! the process. Key TTLs expire on time (watchers see the delete), locks have leases renewed by
//! a background task per guard, waiters are served first-in first-out and woken by a channel,
//! never by polling. Fencing tokens and versions come from one store-wide revision counter, like
//! etcd's revision, so tokens are comparable across locks.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::caps::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{matches_prefix, validate_key, validate_prefix};
use crate::kv::{
    Consistency, Entry, Expect, KvStore, PutOptions, Version, WatchEvent, WatchStream,
};
use crate::lease::{Lease, Renew, RenewPolicy, Renewal};
use crate::lock::{DistLock, FencingToken, LockGuard, LockHandle, LockOptions};

const NAME: &str = "memory";

/// The largest value the memory backend accepts (16 MiB), so that oversized input is an error
/// here as on every other backend.
pub const MAX_VALUE_SIZE: usize = 16 * 1024 * 1024;

/// The configuration of the in-memory backend: there is nothing to configure. `memory://`
/// (any host, path or query is ignored) and an empty `[memory]` table give it; each connect
/// gives a new, empty store.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MemoryConfig {}

#[async_trait]
impl crate::config::BackendConfig for MemoryConfig {
    async fn connect(&self) -> Result<Arc<dyn crate::Backend>> {
        Ok(Arc::new(MemoryStore::new()))
    }
}

impl crate::config::Configurable for MemoryConfig {
    fn from_backend_url(_url: &crate::config::BackendUrl) -> Result<Self> {
        Ok(MemoryConfig {})
    }

    fn validate(&self) -> Result<()> {
        Ok(())
    }

    fn from_table(table_name: &str, table: toml::Table) -> Result<Self> {
        match table.keys().next() {
            Some(k) => Err(Error::config(format!(
                "[{table_name}] takes no settings (found {k:?})"
            ))),
            None => Ok(MemoryConfig {}),
        }
    }
}

/// An in-memory store. Cloning gives another handle on the same data and locks.
#[derive(Clone, Default)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("MemoryStore")
            .field("keys", &state.data.len())
            .field("locks", &state.locks.len())
            .finish()
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock; recover anyway rather than propagate.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct State {
    rev: u64,
    next_id: u64,
    data: BTreeMap<String, Item>,
    expiries: BTreeSet<(Instant, String)>,
    watchers: Vec<Watcher>,
    locks: HashMap<String, LockState>,
}

struct Item {
    value: Vec<u8>,
    version: u64,
    expires: Option<Instant>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::UnboundedSender<Result<WatchEvent>>,
}

#[derive(Default)]
struct LockState {
    holder: Option<Holder>,
    waiters: VecDeque<Waiter>,
}

/// The store's side of a held lock: it expires at `deadline` (the "server" clock), which
/// renewals push forward; the holder's lease clock fires its lost signal a margin earlier.
struct Holder {
    id: u64,
    ttl: Duration,
    deadline: Instant,
}

struct Waiter {
    id: u64,
    ttl: Duration,
    tx: oneshot::Sender<Grant>,
}

struct Grant {
    token: u64,
    /// When the store granted the lock and started its expiry clock.
    granted_at: Instant,
}

impl State {
    fn next_rev(&mut self) -> u64 {
        self.rev += 1;
        self.rev
    }

    fn notify(&mut self, event: &WatchEvent) {
        self.watchers.retain(|w| {
            if !matches_prefix(event.key(), &w.prefix) {
                return !w.tx.is_closed();
            }
            w.tx.send(Ok(event.clone())).is_ok()
        });
    }

    /// Removes every key whose TTL has run out, telling watchers.
    fn purge_expired(&mut self, now: Instant) {
        while let Some((at, key)) = self.expiries.first().cloned() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            let expired = matches!(self.data.get(&key), Some(item) if item.expires == Some(at));
            if expired {
                self.data.remove(&key);
                self.next_rev();
                self.notify(&WatchEvent::Delete { key });
            }
        }
    }

    fn write(
        &mut self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> (u64, Option<Instant>) {
        let version = self.next_rev();
        let expires = ttl.map(|t| deadline_after(Instant::now(), t));
        if let Some(old) = self.data.get(key).and_then(|i| i.expires) {
            self.expiries.remove(&(old, key.to_string()));
        }
        if let Some(at) = expires {
            self.expiries.insert((at, key.to_string()));
        }
        self.notify(&WatchEvent::Put(Entry {
            key: key.to_string(),
            value: value.clone(),
            version: Version::from_raw(version),
        }));
        self.data.insert(
            key.to_string(),
            Item {
                value,
                version,
                expires,
            },
        );
        (version, expires)
    }

    fn remove(&mut self, key: &str) {
        if let Some(item) = self.data.remove(key) {
            if let Some(at) = item.expires {
                self.expiries.remove(&(at, key.to_string()));
            }
            self.next_rev();
            self.notify(&WatchEvent::Delete {
                key: key.to_string(),
            });
        }
    }

    /// Hands a free lock to the first waiter still waiting.
    fn grant_next(&mut self, name: &str) {
        let token = self.rev + 1;
        let Some(ls) = self.locks.get_mut(name) else {
            return;
        };
        if ls.holder.is_some() {
            return;
        }
        while let Some(w) = ls.waiters.pop_front() {
            let now = Instant::now();
            let grant = Grant {
                token,
                granted_at: now,
            };
            if w.tx.send(grant).is_ok() {
                ls.holder = Some(Holder {
                    id: w.id,
                    ttl: w.ttl,
                    deadline: deadline_after(now, w.ttl),
                });
                self.rev = token;
                return;
            }
        }
        self.locks.remove(name);
    }

    /// Ends the holding `id` of lock `name` (release or expiry), waking the next waiter.
    fn end_hold(&mut self, name: &str, id: u64) -> bool {
        let Some(ls) = self.locks.get_mut(name) else {
            return false;
        };
        match &ls.holder {
            Some(h) if h.id == id => {
                ls.holder = None;
                self.grant_next(name);
                true
            }
            _ => false,
        }
    }
}

/// `now + ttl`, saturating at a century from now: a TTL too large for the clock (such as
/// `Duration::MAX`) means "practically never" instead of an overflow panic.
fn deadline_after(now: Instant, ttl: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(ttl.min(CENTURY)).unwrap_or(now)
}

impl MemoryStore {
    /// A new, empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// What the store supports; every argument check goes through these limits.
    fn caps() -> Capabilities {
        let mut caps = Capabilities::new(NAME);
        caps.key_ttl = true;
        caps.min_ttl = Duration::from_millis(1);
        caps.max_ttl = crate::config::duration::MAX;
        caps.min_lock_ttl = Duration::from_millis(1);
        caps.max_lock_ttl = crate::config::duration::MAX;
        caps.lease_expiry_factor = 1;
        caps.max_value_size = MAX_VALUE_SIZE;
        caps.watch = true;
        // Every change is delivered once, in order (the store notifies under its lock).
        caps.watch_coalesces = false;
        caps.linearizable_reads = true;
        caps.fencing_scope = crate::caps::FencingScope::Cluster;
        caps
    }

    fn state(&self) -> MutexGuard<'_, State> {
        let mut state = self.shared.lock();
        state.purge_expired(Instant::now());
        state
    }

    fn schedule_expiry(&self, at: Instant) {
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(shared) = weak.upgrade() {
                shared.lock().purge_expired(Instant::now());
            }
        });
    }

    fn guard(&self, name: &str, id: u64, ttl: Duration, grant: Grant) -> LockGuard {
        let renewer = MemoryRenewer {
            shared: Arc::downgrade(&self.shared),
            name: name.to_string(),
            id,
        };
        let policy = RenewPolicy {
            attempt_timeout: ttl,
        };
        let lease = Lease::start(renewer, grant.granted_at, ttl, policy);
        spawn_reaper(Arc::downgrade(&self.shared), name.to_string(), id);
        let handle = MemoryLock {
            shared: Arc::downgrade(&self.shared),
            name: name.to_string(),
            id,
            lease: lease.clone(),
        };
        LockGuard::new(
            name,
            FencingToken::from_raw(grant.token),
            lease.lost_token().child_token(),
            Box::new(handle),
        )
        .with_lease(&lease)
    }
}

#[async_trait]
impl KvStore for MemoryStore {
    async fn get(&self, key: &str, _consistency: Consistency) -> Result<Option<Entry>> {
        validate_key(key)?;
        let state = self.state();
        Ok(state.data.get(key).map(|item| Entry {
            key: key.to_string(),
            value: item.value.clone(),
            version: Version::from_raw(item.version),
        }))
    }

    async fn put(&self, key: &str, value: Vec<u8>, opts: PutOptions) -> Result<Version> {
        Self::caps().check_put(key, &value, &opts)?;
        let (version, expires) = self.state().write(key, value, opts.ttl);
        if let Some(at) = expires {
            self.schedule_expiry(at);
        }
        Ok(Version::from_raw(version))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        self.state().remove(key);
        Ok(())
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        new: Option<Vec<u8>>,
    ) -> Result<Option<Version>> {
        Self::caps().check_cas(key, new.as_deref())?;
        let mut state = self.state();
        let current = state.data.get(key).map(|i| i.version);
        let holds = match expect {
            Expect::Absent => current.is_none(),
            Expect::Version(v) => current == Some(v.as_raw()),
        };
        if !holds {
            return Err(Error::new(
                ErrorKind::Conflict,
                NAME,
                format!("expected {expect:?}, found {}", describe(current)),
            )
            .with_key(key));
        }
        Ok(match new {
            Some(value) => Some(Version::from_raw(state.write(key, value, None).0)),
            None => {
                state.remove(key);
                None
            }
        })
    }

    async fn list(&self, prefix: &str, _consistency: Consistency) -> Result<Vec<Entry>> {
        validate_prefix(prefix)?;
        let state = self.state();
        Ok(state
            .data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| matches_prefix(k, prefix))
            .map(|(k, item)| Entry {
                key: k.clone(),
                value: item.value.clone(),
                version: Version::from_raw(item.version),
            })
            .collect())
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream> {
        validate_prefix(prefix)?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.state().watchers.push(Watcher {
            prefix: prefix.to_string(),
            tx,
        });
        Ok(Box::pin(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
        })))
    }

    fn capabilities(&self) -> Capabilities {
        Self::caps()
    }
}

fn describe(current: Option<u64>) -> String {
    match current {
        Some(v) => format!("version {v}"),
        None => "no key".to_string(),
    }
}

/// A waiter's place in the queue; dropping it (timeout, cancelled future) leaves the queue, or
/// releases the lock if it was granted in the meantime.
struct Ticket {
    shared: Arc<Shared>,
    name: String,
    id: u64,
    rx: Option<oneshot::Receiver<Grant>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let mut state = self.shared.lock();
        if let Some(ls) = state.locks.get_mut(&self.name) {
            ls.waiters.retain(|w| w.id != self.id);
        }
        if rx.try_recv().is_ok() {
            state.end_hold(&self.name, self.id);
        } else if state
            .locks
            .get(&self.name)
            .is_some_and(|ls| ls.holder.is_none() && ls.waiters.is_empty())
        {
            state.locks.remove(&self.name);
        }
    }
}

#[async_trait]
impl DistLock for MemoryStore {
    async fn lock(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        Self::caps().check_lock(name, opts)?;
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = self.state();
            state.next_id += 1;
            let id = state.next_id;
            state
                .locks
                .entry(name.to_string())
                .or_default()
                .waiters
                .push_back(Waiter {
                    id,
                    ttl: opts.ttl,
                    tx,
                });
            state.grant_next(name);
            id
        };
        let mut ticket = Ticket {
            shared: self.shared.clone(),
            name: name.to_string(),
            id,
            rx: Some(rx),
        };
        let rx = ticket.rx.as_mut().ok_or_else(|| {
            Error::new(ErrorKind::Backend, NAME, "lock ticket without receiver").with_key(name)
        })?;
        let granted = match crate::lease::deadline_after(opts.wait) {
            Some(at) => tokio::time::timeout_at(at, rx).await,
            None => Ok(rx.await),
        };
        match granted {
            Ok(Ok(grant)) => {
                ticket.rx = None;
                Ok(self.guard(name, id, opts.ttl, grant))
            }
            Ok(Err(_)) => Err(Error::new(
                ErrorKind::Unavailable,
                NAME,
                "the store dropped the lock request",
            )
            .with_key(name)),
            Err(_) => {
                // Granted at the very deadline? Then take it rather than waste it.
                if let Some(Ok(grant)) = ticket.rx.as_mut().map(|rx| rx.try_recv()) {
                    ticket.rx = None;
                    return Ok(self.guard(name, id, opts.ttl, grant));
                }
                Err(Error::new(
                    ErrorKind::Timeout,
                    NAME,
                    format!(
                        "lock not acquired within {:?}",
                        opts.wait.unwrap_or_default()
                    ),
                )
                .with_key(name))
            }
        }
    }

    async fn try_lock(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>> {
        Self::caps().check_lock(name, opts)?;
        let (tx, mut rx) = oneshot::channel();
        let id = {
            let mut state = self.state();
            let busy = state
                .locks
                .get(name)
                .is_some_and(|ls| ls.holder.is_some() || !ls.waiters.is_empty());
            if busy {
                return Ok(None);
            }
            state.next_id += 1;
            let id = state.next_id;
            state
                .locks
                .entry(name.to_string())
                .or_default()
                .waiters
                .push_back(Waiter {
                    id,
                    ttl: opts.ttl,
                    tx,
                });
            state.grant_next(name);
            id
        };
        match rx.try_recv() {
            Ok(grant) => Ok(Some(self.guard(name, id, opts.ttl, grant))),
            Err(_) => Err(
                Error::new(ErrorKind::Backend, NAME, "free lock was not granted").with_key(name),
            ),
        }
    }
}

/// The memory backend's side of a held lock.
struct MemoryLock {
    shared: Weak<Shared>,
    name: String,
    id: u64,
    lease: Lease,
}

/// Renews a held lock in the store: pushes the holder's expiry one TTL past now.
struct MemoryRenewer {
    shared: Weak<Shared>,
    name: String,
    id: u64,
}

impl Renew for MemoryRenewer {
    fn renew(&mut self) -> Pin<Box<dyn Future<Output = Result<Renewal>> + Send + '_>> {
        let r = (|| {
            let shared = self.shared.upgrade()?;
            let mut state = shared.lock();
            let holder = state
                .locks
                .get_mut(&self.name)
                .and_then(|ls| ls.holder.as_mut())
                .filter(|h| h.id == self.id)?;
            let now = Instant::now();
            if holder.deadline <= now {
                return None;
            }
            holder.deadline = deadline_after(now, holder.ttl);
            Some(holder.ttl)
        })();
        Box::pin(async move {
            Ok(match r {
                Some(ttl) => Renewal::Confirmed(ttl),
                None => Renewal::Gone("the lock expired in the store".into()),
            })
        })
    }
}

/// The store's expiry of a held lock, independent of the holder: ends the hold when its
/// deadline passes without a renewal.
fn spawn_reaper(shared: Weak<Shared>, name: String, id: u64) {
    tokio::spawn(async move {
        loop {
            let at = {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let mut state = shared.lock();
                let Some(holder) = state
                    .locks
                    .get(&name)
                    .and_then(|ls| ls.holder.as_ref())
                    .filter(|h| h.id == id)
                else {
                    return;
                };
                let at = holder.deadline;
                if at <= Instant::now() {
                    state.end_hold(&name, id);
                    return;
                }
                at
            };
            tokio::time::sleep_until(at).await;
        }
    });
}

impl MemoryLock {
    fn release_now(&self) {
        self.lease.stop();
        if let Some(shared) = self.shared.upgrade() {
            shared.lock().end_hold(&self.name, self.id);
        }
    }
}

#[async_trait]
impl LockHandle for MemoryLock {
    async fn release(self: Box<Self>) -> Result<()> {
        self.release_now();
        Ok(())
    }

    fn release_detached(self: Box<Self>) {
        self.release_now();
    }

    fn suspend_keep_alive(&self) {
        self.lease.suspend();
    }
}

crate::election_via_lock!(MemoryStore);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order() {
        let store = MemoryStore::new();
        let opts = LockOptions::new();
        let first = store.lock("l", &opts).await.unwrap();
        let order = Arc::new(StdMutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..6 {
            let (store, order, opts) = (store.clone(), order.clone(), opts.clone());
            tasks.push(tokio::spawn(async move {
                let g = store.lock("l", &opts).await.unwrap();
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
                g.release().await.unwrap();
            }));
            // Let task i enqueue before task i+1.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        first.release().await.unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let store = MemoryStore::new();
        let opts = LockOptions::new();
        let held = store.lock("l", &opts).await.unwrap();
        let waiting = {
            let store = store.clone();
            let opts = opts.clone();
            tokio::spawn(async move { store.lock("l", &opts).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiting.abort();
        let _ = waiting.await;
        held.release().await.unwrap();
        // Nobody is left holding or waiting: try_lock succeeds at once.
        let again = store.try_lock("l", &opts).await.unwrap();
        assert!(again.is_some());
        drop(again);
        assert!(store.shared.lock().locks.is_empty(), "lock state leaked");
    }

    #[tokio::test]
    async fn expired_keys_are_gone_for_reads_before_the_reaper_runs() {
        let store = MemoryStore::new();
        store
            .put(
                "k",
                b"v".to_vec(),
                PutOptions::ttl(Duration::from_millis(30)),
            )
            .await
            .unwrap();
        std::thread::sleep(Duration::from_millis(40)); // block the runtime: no reaper task runs
        assert!(store.get("k", Consistency::Strong).await.unwrap().is_none());
        assert!(store
            .list("", Consistency::Strong)
            .await
            .unwrap()
            .is_empty());
    }
}
crate::recipes_via_lock!(MemoryStore);
