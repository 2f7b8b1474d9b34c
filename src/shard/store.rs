//! [`ShardedStore`]: a [`KvStore`] + [`DistLock`] that spreads keys and locks over several
//! backends.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use tokio::sync::{mpsc, Notify};

use super::strategy::{HashStrategy, ShardSpec, StrategyKind};
use crate::caps::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{matches_prefix, validate_key, validate_prefix};
use crate::kv::{
    Consistency, Entry, Expect, KvStore, PutOptions, Version, WatchEvent, WatchStream,
};
use crate::lock::{DistLock, LockGuard, LockOptions};
use crate::Backend;

const NAME: &str = "sharded";

/// The longest a write waits for the process's own merged watches to receive its event (see
/// [`ShardedStore`]'s contract); after that it returns anyway.
pub const WATCH_SYNC_BOUND: Duration = Duration::from_secs(2);

/// Every live merged watch of this process.
static WATCHES: Mutex<Vec<Weak<WatchShared>>> = Mutex::new(Vec::new());

/// How many received events a merged watch remembers for writers waiting on them.
const RECENT: usize = 4096;

/// One shard of a [`ShardedStore`]: a named backend with a weight.
#[derive(Clone)]
pub struct Shard {
    name: String,
    weight: u32,
    backend: Arc<dyn Backend>,
    identity: String,
}

impl fmt::Debug for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shard")
            .field("name", &self.name)
            .field("weight", &self.weight)
            .field("backend", &self.backend.capabilities().backend)
            .finish()
    }
}

impl Shard {
    /// A shard of weight 1. The name identifies the shard to the hash strategy: keep it stable
    /// (a ring or rendezvous strategy places keys by shard name).
    pub fn new(name: impl Into<String>, backend: Arc<dyn Backend>) -> Self {
        let identity = format!("object:{:p}", Arc::as_ptr(&backend) as *const ());
        Shard {
            name: name.into(),
            weight: 1,
            backend,
            identity,
        }
    }

    /// Names the cluster behind this shard, for ordering watch events within this process (see
    /// [`ShardedStore`]'s contract). Default: the backend object itself, so only handles sharing
    /// the same backend object count as the same cluster. [`ShardedConfig`](super::ShardedConfig)
    /// uses the backend URL (except for `memory://`, where every connect is a new store).
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = identity.into();
        self
    }

    /// The identity set by [`with_identity`](Self::with_identity).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Sets the weight (only the ring and modulo strategies accept weights other than 1).
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The shard's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shard's weight.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The shard's backend, for direct access (resharding, inspection).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The strategy's view of this shard.
    pub fn spec(&self) -> ShardSpec {
        ShardSpec::new(self.name.clone()).weight(self.weight)
    }
}

/// A store that routes every key and every lock name to one of several backends.
///
/// # Contract
/// - Each key, and each lock name, lives on exactly one shard: the one the [`HashStrategy`]
///   picks from its name. `get`, `put` (with its TTL), `delete`, `compare_and_swap`, `lock` and
///   `try_lock` go to that shard only, so every per-key and per-lock guarantee of the shard's
///   backend holds unchanged: CAS is atomic, versions of one key increase, a lock's fencing
///   tokens strictly increase.
/// - [`Version`]s and [`FencingToken`](crate::FencingToken)s of *different* keys or locks may
///   come from different shards and are then not comparable; the sharded store's
///   [`Capabilities::fencing_scope`] is therefore [`FencingScope::PerLock`](crate::FencingScope::PerLock) when it has more than
///   one shard.
/// - `list` asks every shard at once, keeps only the keys each shard owns under this store's
///   strategy (a key left on a former owner by an unfinished reshard is not shown, exactly as
///   `get` does not see it), and returns them merged and sorted.
/// - `watch` watches every shard and merges the events as they arrive. Events of one key are in
///   order and exactly once (one key, one shard). Shards have no common clock, so in general
///   events of keys on different shards are delivered in the order they reach this client.
///   Within one process the order of changes is kept exactly: a write through any sharded store
///   of the process returns only once every merged watch of the process that covers the key on
///   the same cluster (by [`Shard::identity`]) has received the write's event (waiting at most
///   [`WATCH_SYNC_BOUND`]; writes made while no such watch exists do not wait). Changes made by
///   other processes are merged in arrival order. A gap or error on any shard ends the merged
///   stream with that error.
/// - [`capabilities`](KvStore::capabilities) are the most restrictive combination of the
///   shards' (smallest value limit, largest minimum TTLs, TTL and watch only if every shard has
///   them), and are enforced here for every key, whichever shard it lands on.
/// - Every error from a shard keeps its kind and backend and gets the shard's name in its
///   message (`shard "b": …`).
///
/// Cloning gives another handle on the same shards.
#[derive(Clone)]
pub struct ShardedStore {
    inner: Arc<Inner>,
    /// The layout a pending reshard moves keys away from (see [`ShardedStore::migrating_from`]).
    previous: Option<Arc<Inner>>,
}

struct Inner {
    shards: Vec<Shard>,
    strategy: Arc<dyn HashStrategy>,
    caps: Capabilities,
}

impl fmt::Debug for ShardedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedStore")
            .field("strategy", &self.inner.strategy.name())
            .field(
                "shards",
                &self
                    .inner
                    .shards
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ShardedStore {
    /// A sharded store over `shards`, routing with the strategy `kind` (`vnodes`: the ring's
    /// virtual nodes per unit of weight, default
    /// [`DEFAULT_VNODES`](super::strategy::DEFAULT_VNODES)).
    ///
    /// # Errors
    /// `InvalidConfig` for no shards, duplicate or empty names, a zero weight, or weights the
    /// strategy does not support.
    pub fn new(kind: StrategyKind, vnodes: Option<u32>, shards: Vec<Shard>) -> Result<Self> {
        let specs: Vec<ShardSpec> = shards.iter().map(Shard::spec).collect();
        let strategy = kind.build(&specs, vnodes)?;
        Self::with_strategy(strategy, shards)
    }

    /// A sharded store over `shards` with a strategy built elsewhere (its index `i` is
    /// `shards[i]`).
    ///
    /// # Errors
    /// `InvalidConfig` if the strategy's shard count differs from `shards.len()`, or for no
    /// shards or duplicate names.
    pub fn with_strategy(strategy: Arc<dyn HashStrategy>, shards: Vec<Shard>) -> Result<Self> {
        if shards.is_empty() {
            return Err(Error::config("a sharded store needs at least one shard"));
        }
        if strategy.shard_count() != shards.len() {
            return Err(Error::config(format!(
                "the strategy distributes over {} shards, but {} were given",
                strategy.shard_count(),
                shards.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &shards {
            if !seen.insert(s.name.as_str()) {
                return Err(Error::config(format!("duplicate shard {:?}", s.name)));
            }
        }
        let caps = combine_caps(&shards);
        Ok(ShardedStore {
            inner: Arc::new(Inner {
                shards,
                strategy,
                caps,
            }),
            previous: None,
        })
    }

    /// This layout while a reshard from `old` is pending: a handle on the same shards whose
    /// deletes also reach the key's owner under `old`.
    ///
    /// Writers switch to the new layout before [`migrate`](super::reshard::migrate) runs (see
    /// `docs/sharding.md`). Until a key has moved, its value is still on its old owner, so a
    /// plain delete through the new layout would change nothing there and the migration would
    /// then copy the deleted value back. Through this handle `delete`, and a `compare_and_swap`
    /// that deletes, remove the key from its old owner too (first the old owner, then the new
    /// one), so no deleted key comes back. Everything else behaves as on `self`. Use a handle
    /// without the old layout again once the migration has finished.
    pub fn migrating_from(&self, old: &ShardedStore) -> ShardedStore {
        ShardedStore {
            inner: self.inner.clone(),
            previous: Some(old.inner.clone()),
        }
    }

    /// The key's owner under the layout being migrated from, if that is another shard.
    fn previous_owner(&self, key: &str) -> Option<&Shard> {
        let prev = self.previous.as_ref()?;
        let i = prev
            .strategy
            .route(key)
            .min(prev.shards.len().saturating_sub(1));
        let old = prev.shards.get(i)?;
        (old.name != self.owner(key).1.name).then_some(old)
    }

    /// The shards, in strategy order.
    pub fn shards(&self) -> &[Shard] {
        &self.inner.shards
    }

    /// The hash strategy.
    pub fn strategy(&self) -> &Arc<dyn HashStrategy> {
        &self.inner.strategy
    }

    /// The index of the shard that owns `key` (or the lock named `key`). Does not validate.
    pub fn shard_index(&self, key: &str) -> usize {
        self.inner.strategy.route(key)
    }

    /// The shard that owns `key` (or the lock named `key`). Does not validate.
    pub fn shard_for(&self, key: &str) -> &Shard {
        let i = self.shard_index(key);
        // `route` is always < shard_count == shards.len() (checked in `with_strategy`).
        &self.inner.shards[i.min(self.inner.shards.len() - 1)]
    }

    fn owner(&self, key: &str) -> (usize, &Shard) {
        let i = self
            .shard_index(key)
            .min(self.inner.shards.len().saturating_sub(1));
        (i, &self.inner.shards[i])
    }

    /// The merged watches of this process that cover `key` on the cluster of shard `shard`,
    /// each with that shard's index in the watch and its current event count.
    fn watchers(&self, shard: usize, key: &str) -> Vec<Watcher> {
        let Some(identity) = self.inner.shards.get(shard).map(|s| s.identity.as_str()) else {
            return Vec::new();
        };
        let mut list = lock(&WATCHES);
        list.retain(|w| w.strong_count() > 0);
        list.iter()
            .filter_map(Weak::upgrade)
            .filter(|w| matches_prefix(key, &w.prefix))
            .filter_map(|w| {
                let index = w.identities.iter().position(|id| id == identity)?;
                let mark = lock(&w.state).seq;
                Some(Watcher {
                    watch: w,
                    index,
                    mark,
                })
            })
            .collect()
    }
}

/// A merged watch a writer waits on.
struct Watcher {
    watch: Arc<WatchShared>,
    index: usize,
    mark: u64,
}

/// What a writer waits for: the put of this version, or a delete. `Merged` records a
/// [`WatchEvent::Coalesced`] mark: the key's next event may stand for the awaited change.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Put(Version),
    Delete,
    Merged,
}

/// Waits (at most [`WATCH_SYNC_BOUND`] in all) until every watcher has received `change` of
/// `key` from its shard after its mark, or has ended.
async fn wait_seen(watchers: &[Watcher], key: &str, change: Change) {
    let deadline = tokio::time::Instant::now() + WATCH_SYNC_BOUND;
    for w in watchers {
        loop {
            let notified = w.watch.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Events the shard already delivered are taken at once (the memory backend
            // delivers before it acknowledges).
            w.watch.drain(Some(w.index), None);
            if w.watch.seen(w.index, w.mark, key, change) {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held; recover rather than propagate a poison.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn on_shard(shard: &Shard) -> impl FnOnce(Error) -> Error + '_ {
    move |e| e.context(format_args!("shard {:?}", shard.name))
}

/// The most restrictive combination of the shards' capabilities.
fn combine_caps(shards: &[Shard]) -> Capabilities {
    let all: Vec<Capabilities> = shards.iter().map(|s| s.backend.capabilities()).collect();
    Capabilities::intersection(NAME, &all)
}

#[async_trait]
impl KvStore for ShardedStore {
    async fn get(&self, key: &str, consistency: Consistency) -> Result<Option<Entry>> {
        validate_key(key)?;
        let (_, shard) = self.owner(key);
        shard
            .backend
            .get(key, consistency)
            .await
            .map_err(on_shard(shard))
    }

    async fn put(&self, key: &str, value: Vec<u8>, opts: PutOptions) -> Result<Version> {
        self.inner.caps.check_put(key, &value, &opts)?;
        let (i, shard) = self.owner(key);
        let watchers = self.watchers(i, key);
        let version = shard
            .backend
            .put(key, value, opts)
            .await
            .map_err(on_shard(shard))?;
        if !watchers.is_empty() {
            wait_seen(&watchers, key, Change::Put(version)).await;
        }
        Ok(version)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        let (i, shard) = self.owner(key);
        let watchers = self.watchers(i, key);
        // Only a key that exists makes a delete event; ask first when someone here waits for it.
        let existed = !watchers.is_empty()
            && matches!(
                shard.backend.get(key, Consistency::Strong).await,
                Ok(Some(_))
            );
        // A key not moved yet lives on its old owner: delete it there first, so that neither
        // a later migration nor a crash between the two deletes brings it back.
        if let Some(old) = self.previous_owner(key) {
            old.backend.delete(key).await.map_err(on_shard(old))?;
        }
        shard.backend.delete(key).await.map_err(on_shard(shard))?;
        if existed {
            wait_seen(&watchers, key, Change::Delete).await;
        }
        Ok(())
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        new: Option<Vec<u8>>,
    ) -> Result<Option<Version>> {
        self.inner.caps.check_cas(key, new.as_deref())?;
        let (i, shard) = self.owner(key);
        let watchers = self.watchers(i, key);
        let deletes = new.is_none();
        let result = shard
            .backend
            .compare_and_swap(key, expect, new)
            .await
            .map_err(on_shard(shard))?;
        if deletes && matches!(expect, Expect::Version(_)) {
            // The new owner's copy is the one seen; a copy left on the old owner (copied, not
            // yet deleted by the migration) must not be copied back.
            if let Some(old) = self.previous_owner(key) {
                old.backend.delete(key).await.map_err(on_shard(old))?;
            }
        }
        if !watchers.is_empty() {
            match (result, deletes, expect) {
                (Some(v), _, _) => wait_seen(&watchers, key, Change::Put(v)).await,
                (None, true, Expect::Version(_)) => wait_seen(&watchers, key, Change::Delete).await,
                _ => {}
            }
        }
        Ok(result)
    }

    async fn list(&self, prefix: &str, consistency: Consistency) -> Result<Vec<Entry>> {
        validate_prefix(prefix)?;
        let calls = self.inner.shards.iter().map(|s| async move {
            s.backend
                .list(prefix, consistency)
                .await
                .map_err(on_shard(s))
        });
        let results = futures::future::join_all(calls).await;
        let mut all = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            all.extend(r?.into_iter().filter(|e| self.shard_index(&e.key) == i));
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all.dedup_by(|a, b| a.key == b.key);
        Ok(all)
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream> {
        validate_prefix(prefix)?;
        if !self.inner.caps.watch {
            return Err(Error::new(
                ErrorKind::Unsupported,
                NAME,
                "watch is not supported by every shard",
            )
            .with_key(prefix));
        }
        let calls = self
            .inner
            .shards
            .iter()
            .map(|s| async move { s.backend.watch(prefix).await.map_err(on_shard(s)) });
        let results = futures::future::join_all(calls).await;
        let mut streams = Vec::with_capacity(results.len());
        for r in results {
            streams.push(Some(r?));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(WatchShared {
            prefix: prefix.to_string(),
            names: self.inner.shards.iter().map(|s| s.name.clone()).collect(),
            identities: self
                .inner
                .shards
                .iter()
                .map(|s| s.identity.clone())
                .collect(),
            notify: Notify::new(),
            strategy: self.inner.strategy.clone(),
            state: Mutex::new(WatchState {
                streams,
                tx: Some(tx),
                waker: None,
                seq: 0,
                recent: VecDeque::new(),
            }),
        });
        // Anything already delivered by a shard is taken now, in shard order.
        shared.drain(None, None);
        lock(&WATCHES).push(Arc::downgrade(&shared));
        let pump = {
            let shared = shared.clone();
            tokio::spawn(futures::future::poll_fn(move |cx| shared.pump(cx)))
        };
        Ok(Box::pin(MergedWatch {
            rx,
            pump: pump.abort_handle(),
        }))
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.caps.clone()
    }
}

#[async_trait]
impl DistLock for ShardedStore {
    async fn lock(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        self.inner.caps.check_lock(name, opts)?;
        let (_, shard) = self.owner(name);
        shard
            .backend
            .lock(name, opts)
            .await
            .map_err(on_shard(shard))
    }

    async fn try_lock(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>> {
        self.inner.caps.check_lock(name, opts)?;
        let (_, shard) = self.owner(name);
        shard
            .backend
            .try_lock(name, opts)
            .await
            .map_err(on_shard(shard))
    }
}

/// An election lives on the shard that owns the key `_elections/NAME`, with that shard's
/// layout.
#[async_trait]
impl crate::Election for ShardedStore {
    async fn campaign(
        &self,
        name: &str,
        value: Vec<u8>,
        opts: &LockOptions,
    ) -> Result<crate::LeaderGuard> {
        crate::election::validate_election_name(name)?;
        self.inner.caps.check_lock(name, opts)?;
        let (_, shard) = self.election_owner(name);
        shard
            .backend
            .campaign(name, value, opts)
            .await
            .map_err(on_shard(shard))
    }

    async fn leader(&self, name: &str) -> Result<Option<crate::Leader>> {
        crate::election::validate_election_name(name)?;
        let (_, shard) = self.election_owner(name);
        shard.backend.leader(name).await.map_err(on_shard(shard))
    }

    async fn observe(&self, name: &str) -> Result<crate::LeaderStream> {
        crate::election::validate_election_name(name)?;
        let (_, shard) = self.election_owner(name);
        shard.backend.observe(name).await.map_err(on_shard(shard))
    }
}

/// A semaphore lives on the shard that owns the key `_semaphores/NAME`, a read-write lock on
/// the shard that owns `_rwlocks/NAME`, with that shard's layout.
#[async_trait]
impl crate::DistSemaphore for ShardedStore {
    async fn acquire(&self, name: &str, permits: u32, opts: &LockOptions) -> Result<crate::Permit> {
        self.inner.caps.check_lock(name, opts)?;
        let (_, shard) = self.owner(&crate::semaphore::via_lock::key_of(name));
        shard
            .backend
            .acquire(name, permits, opts)
            .await
            .map_err(on_shard(shard))
    }
}

#[async_trait]
impl crate::DistRwLock for ShardedStore {
    async fn read(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        self.inner.caps.check_lock(name, opts)?;
        let shard = self.rwlock_owner(name);
        shard
            .backend
            .read(name, opts)
            .await
            .map_err(on_shard(shard))
    }

    async fn write(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        self.inner.caps.check_lock(name, opts)?;
        let shard = self.rwlock_owner(name);
        shard
            .backend
            .write(name, opts)
            .await
            .map_err(on_shard(shard))
    }
}

impl ShardedStore {
    fn rwlock_owner(&self, name: &str) -> &Shard {
        self.owner(&format!("{}{name}", crate::rwlock::via_lock::PREFIX))
            .1
    }

    fn election_owner(&self, name: &str) -> (usize, &Shard) {
        self.owner(&crate::election::via_lock::key_of(name))
    }
}

/// The state of one merged watch, shared by its pump task and the handle's writes.
struct WatchShared {
    prefix: String,
    names: Vec<String>,
    /// Per shard, the cluster identity ([`Shard::identity`]).
    identities: Vec<String>,
    /// Woken whenever events are received or the watch ends.
    notify: Notify,
    strategy: Arc<dyn HashStrategy>,
    state: Mutex<WatchState>,
}

struct WatchState {
    /// Per shard; `None` once that shard's stream ended (which ends the merged stream).
    streams: Vec<Option<WatchStream>>,
    /// `None` once the merged stream has ended or its receiver is gone.
    tx: Option<mpsc::UnboundedSender<Result<WatchEvent>>>,
    /// The pump task's waker, once it has run.
    waker: Option<Waker>,
    /// How many events were received from the shards.
    seq: u64,
    /// The last [`RECENT`] received events: (seq, shard, key, change).
    recent: VecDeque<(u64, usize, String, Change)>,
}

impl WatchShared {
    /// Moves every event that shard `only` (or every shard) has ready into the merged channel,
    /// registering `cx`'s waker (or the pump's, or none yet) for the next ones. Returns whether
    /// the merged stream has ended.
    fn drain(&self, only: Option<usize>, cx: Option<&mut Context<'_>>) -> bool {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if let Some(cx) = &cx {
            st.waker = Some(cx.waker().clone());
        }
        let waker = st.waker.clone().unwrap_or_else(futures::task::noop_waker);
        let mut wcx = Context::from_waker(&waker);
        let mut received = false;
        let range = match only {
            Some(i) => i..i + 1,
            None => 0..st.streams.len(),
        };
        'shards: for i in range {
            loop {
                if st.tx.is_none() {
                    break 'shards;
                }
                let Some(stream) = st.streams.get_mut(i).and_then(Option::as_mut) else {
                    break;
                };
                match stream.as_mut().poll_next(&mut wcx) {
                    Poll::Ready(Some(Ok(ev))) => {
                        st.seq += 1;
                        received = true;
                        let change = match &ev {
                            WatchEvent::Put(e) => Change::Put(e.version),
                            WatchEvent::Delete { .. } => Change::Delete,
                            WatchEvent::Coalesced { .. } => Change::Merged,
                        };
                        if st.recent.len() == RECENT {
                            st.recent.pop_front();
                        }
                        st.recent
                            .push_back((st.seq, i, ev.key().to_string(), change));
                        // A key another shard owns (left by an unfinished reshard) is not
                        // this store's, as in `list`.
                        if self.strategy.route(ev.key()) == i {
                            send(&mut st.tx, Ok(ev));
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        let name = &self.names[i];
                        send(&mut st.tx, Err(e.context(format_args!("shard {name:?}"))));
                        st.tx = None;
                    }
                    Poll::Ready(None) => {
                        let name = &self.names[i];
                        send(
                            &mut st.tx,
                            Err(Error::new(
                                ErrorKind::WatchGap,
                                NAME,
                                format!("shard {name:?}: its watch ended"),
                            )
                            .with_key(self.prefix.clone())),
                        );
                        st.tx = None;
                        st.streams[i] = None;
                    }
                    Poll::Pending => break,
                }
            }
        }
        if st.tx.as_ref().is_some_and(|tx| tx.is_closed()) {
            st.tx = None;
        }
        let ended = st.tx.is_none();
        drop(guard);
        if received || ended {
            self.notify.notify_waiters();
        }
        ended
    }

    /// Whether the event `change` of `key` was received from shard `index` after event number
    /// `mark`, or the watch has ended (nothing more will come).
    fn seen(&self, index: usize, mark: u64, key: &str, change: Change) -> bool {
        let st = lock(&self.state);
        if st.tx.is_none() {
            return true;
        }
        // Oldest first: an event after a `Merged` mark of the key may stand for `change`.
        let mut merged = false;
        let after = st
            .recent
            .iter()
            .rev()
            .take_while(|(seq, ..)| *seq > mark)
            .count();
        for (_, i, k, c) in st.recent.iter().skip(st.recent.len() - after) {
            if *i != index || k != key {
                continue;
            }
            match c {
                Change::Merged => merged = true,
                c if *c == change || merged => return true,
                _ => {}
            }
        }
        false
    }

    fn pump(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.drain(None, Some(cx)) {
            // Drop the shard streams now: that cancels the shard watches.
            lock(&self.state).streams.clear();
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

fn send(tx: &mut Option<mpsc::UnboundedSender<Result<WatchEvent>>>, ev: Result<WatchEvent>) {
    if let Some(t) = tx {
        if t.send(ev).is_err() {
            *tx = None;
        }
    }
}

/// The merged stream handed to the caller. Dropping it stops the pump task, which drops the
/// shard watches.
struct MergedWatch {
    rx: mpsc::UnboundedReceiver<Result<WatchEvent>>,
    pump: tokio::task::AbortHandle,
}

impl Stream for MergedWatch {
    type Item = Result<WatchEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for MergedWatch {
    fn drop(&mut self) {
        self.pump.abort();
    }
}
