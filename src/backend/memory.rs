//! The in-memory backend: the reference implementation every other backend is measured against.
//!
//! Exact and single-process: all clones of a [`MemoryStore`] share one store; nothing survives
//! the process. Key TTLs expire on time (watchers see the delete). A held lock lasts until its
//! guard releases it: the store is in the holder's process, so renewal is implicit and no task
//! runs per lock; when the fault-test hook stops renewal, the TTL runs as on a server. Waiters
//! are served first-in first-out and woken by a channel, never by polling. Fencing tokens and versions come from one store-wide revision counter, like
//! etcd's revision, so tokens are comparable across locks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::caps::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{matches_prefix, validate_key, validate_prefix};
use crate::kv::{
    Consistency, Entry, Expect, KvStore, PutOptions, Version, WatchEvent, WatchStream,
};
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
    /// Lock states by name; a name's entry lives while the lock is held or waited for. The
    /// key is shared with the holder's guard.
    locks: BTreeMap<Arc<str>, LockState>,
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

/// The store's side of a held lock. The store lives in the holder's process, so nothing can cut
/// a holder off: a hold lasts until it is released, or, once its renewal was stopped (the
/// fault-test hook), until its TTL runs out (see [`MemoryLock::suspend_keep_alive`]).
struct Holder {
    id: u64,
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Grant>,
}

struct Grant {
    token: u64,
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
        if self
            .watchers
            .iter()
            .any(|w| w.tx.is_closed() || matches_prefix(key, &w.prefix))
        {
            self.notify(&WatchEvent::Put(Entry {
                key: key.to_string(),
                value: value.clone(),
                version: Version::from_raw(version),
            }));
        }
        let item = Item {
            value,
            version,
            expires,
        };
        // An existing key is updated in place: no new key string.
        let old = match self.data.get_mut(key) {
            Some(slot) => std::mem::replace(slot, item).expires,
            None => {
                self.data.insert(key.to_string(), item);
                None
            }
        };
        if old != expires {
            if let Some(old) = old {
                self.expiries.remove(&(old, key.to_string()));
            }
            if let Some(at) = expires {
                self.expiries.insert((at, key.to_string()));
            }
        }
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
            if w.tx.send(Grant { token }).is_ok() {
                ls.holder = Some(Holder { id: w.id });
                self.rev = token;
                return;
            }
        }
        self.locks.remove(name);
    }

    /// Takes the lock `name` for a new holder if nobody holds or waits for it; the holder's id
    /// and token, and the name as the lock table keeps it.
    fn take_free(&mut self, name: &str) -> Option<(u64, u64, Arc<str>)> {
        let key = match self.locks.get_key_value(name) {
            Some((_, ls)) if ls.holder.is_some() || !ls.waiters.is_empty() => return None,
            Some((key, _)) => key.clone(),
            None => Arc::from(name),
        };
        self.next_id += 1;
        let id = self.next_id;
        let token = self.next_rev();
        let ls = LockState {
            holder: Some(Holder { id }),
            waiters: VecDeque::new(),
        };
        self.locks.insert(key.clone(), ls);
        Some((id, token, key))
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
    fn caps() -> &'static Capabilities {
        static CAPS: OnceLock<Capabilities> = OnceLock::new();
        CAPS.get_or_init(Self::make_caps)
    }

    fn make_caps() -> Capabilities {
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
        if !state.expiries.is_empty() {
            state.purge_expired(Instant::now());
        }
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

    fn guard(&self, name: Arc<str>, id: u64, ttl: Duration, token: u64) -> LockGuard {
        let handle = MemoryLock {
            hold: Hold {
                shared: Arc::downgrade(&self.shared),
                name: name.clone(),
                id,
            },
            ttl,
            stopped_at: OnceLock::new(),
        };
        let lost = CancellationToken::new();
        LockGuard::new(name, FencingToken::from_raw(token), lost, Box::new(handle))
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
        Self::caps().clone()
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
    name: Arc<str>,
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
        let (id, rx, key) = {
            let mut state = self.state();
            if let Some((id, token, name)) = state.take_free(name) {
                drop(state);
                return Ok(self.guard(name, id, opts.ttl, token));
            }
            // Only a waiter needs a channel: a free lock is granted without one.
            let (tx, rx) = oneshot::channel();
            state.next_id += 1;
            let id = state.next_id;
            let key: Arc<str> = Arc::from(name);
            state
                .locks
                .entry(key.clone())
                .or_default()
                .waiters
                .push_back(Waiter { id, tx });
            state.grant_next(name);
            (id, rx, key)
        };
        let mut ticket = Ticket {
            shared: self.shared.clone(),
            name: key,
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
                Ok(self.guard(ticket.name.clone(), id, opts.ttl, grant.token))
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
                    return Ok(self.guard(ticket.name.clone(), id, opts.ttl, grant.token));
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
        let taken = self.state().take_free(name);
        Ok(taken.map(|(id, token, name)| self.guard(name, id, opts.ttl, token)))
    }
}

/// One hold of a lock: what ends it in the store.
#[derive(Clone)]
struct Hold {
    shared: Weak<Shared>,
    name: Arc<str>,
    id: u64,
}

impl Hold {
    fn end(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.lock().end_hold(&self.name, self.id);
        }
    }
}

/// The memory backend's side of a held lock.
///
/// The store is in the holder's process, so a hold is renewed for as long as its guard lives,
/// with nothing to send: no renewal task runs. When renewal is stopped
/// ([`suspend_keep_alive`](LockHandle::suspend_keep_alive), the fault-test hook), the TTL
/// starts: `lost()` fires at the lease clock's deadline for a renewal confirmed at that
/// instant ([`crate::lease::deadline`]), and the store frees the lock at the end of the TTL.
struct MemoryLock {
    hold: Hold,
    ttl: Duration,
    /// When renewal was stopped: the TTL runs from then.
    stopped_at: OnceLock<Instant>,
}

#[async_trait]
impl LockHandle for MemoryLock {
    async fn release(self: Box<Self>) -> Result<()> {
        self.hold.end();
        Ok(())
    }

    fn release_detached(self: Box<Self>) {
        self.hold.end();
    }

    fn suspend_keep_alive(&self, lost: &CancellationToken) {
        let now = Instant::now();
        if self.stopped_at.set(now).is_err() {
            return;
        }
        // Ending a hold twice (here and by a release) is harmless: the store checks its id.
        let (hold, ttl, lost) = (self.hold.clone(), self.ttl, lost.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(crate::lease::deadline(now, ttl)).await;
            lost.cancel();
            tokio::time::sleep_until(deadline_after(now, ttl)).await;
            hold.end();
        });
    }

    fn is_lost(&self) -> bool {
        self.stopped_at
            .get()
            .is_some_and(|&at| Instant::now() >= crate::lease::deadline(at, self.ttl))
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

    /// Holding locks costs no task (the store is in the process: renewal is implicit), and a
    /// stopped renewal still lets the hold lapse: `lost()` first, then the store frees it.
    #[tokio::test]
    async fn held_locks_run_no_task_until_renewal_stops() {
        let store = MemoryStore::new();
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        let ttl = Duration::from_millis(300);
        let mut guards = Vec::new();
        for i in 0..50 {
            guards.push(
                store
                    .lock(&format!("l/{i}"), &LockOptions::new().ttl(ttl))
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(metrics.num_alive_tasks(), before, "tasks per held lock");
        tokio::time::sleep(ttl * 2).await;
        assert!(guards.iter().all(|g| !g.is_lost()), "a held lock lapsed");
        let g = guards.pop().unwrap();
        let stopped = Instant::now();
        g.suspend_keep_alive();
        g.lost().await;
        let lost_after = stopped.elapsed();
        assert!(
            lost_after >= ttl - crate::lease::margin(ttl),
            "{lost_after:?}"
        );
        assert!(
            store
                .try_lock("l/49", &LockOptions::new())
                .await
                .unwrap()
                .is_none(),
            "freed before the TTL ran out"
        );
        tokio::time::sleep(ttl).await;
        let next = store.try_lock("l/49", &LockOptions::new()).await.unwrap();
        assert!(
            next.is_some_and(|n| n.token() > g.token()),
            "not freed after the TTL"
        );
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
