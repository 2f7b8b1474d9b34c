//! [`DistLock`] over Consul sessions: one TTL session per client and TTL, shared by every lock
//! of that client with that TTL (as etcd's lease is), the lock key acquired through
//! `/v1/txn`'s `lock` verb so the acquiring ModifyIndex (the fencing token) comes back
//! atomically.
//!
//! The session is the lease: its clock (`crate::lease`) starts when the session create is
//! sent, moves on every confirmed `PUT /v1/session/renew/<id>` (to that renew's send time +
//! the TTL the server returned − the margin), and fires the lost signal of every guard on the
//! session at that deadline, whatever the server or the network do meanwhile. A blocking query
//! on each lock key fires that guard's lost signal earlier if the key is no longer held by the
//! session.
//!
//! Tasks of one client exclude each other on a lock through a local queue per lock key (one
//! session may hold a key only once): a task waits there until the key it wants is no longer
//! held, or being taken, by another task of the client.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, OwnedMutexGuard};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{Client, Mode, TxnKv, TxnOutcome};
use super::{ConsulStore, NAME};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{deadline_after, until, Lease, Renew, RenewPolicy, Renewal};
use crate::lock::{DistLock, FencingToken, LockGuard, LockHandle, LockOptions};

/// The `Flags` value of a lock key, the same as Consul's Go API (`api.LockFlagValue`), so that
/// its lock helpers recognise coordkit's lock keys and the other way round.
pub const LOCK_FLAG_VALUE: u64 = 0x2ddc_cbc0_58a5_0c18;

/// How long a waiter sleeps before retrying an acquire refused by a lock-delay (the delay's
/// end is not an event that can be waited for).
const LOCK_DELAY_RETRY: Duration = Duration::from_millis(250);

/// The longest single blocking query of a waiter or monitor.
const MAX_BLOCK: Duration = Duration::from_secs(300);

/// How long after the acquisition a lock's monitor sends its first blocking query: a lock held
/// for less costs no query. A change made meanwhile is reported at once by that first query,
/// which asks from the acquiring index.
const MONITOR_START: Duration = Duration::from_millis(50);

/// How long a released lock's monitor waits for the answer to its blocking query, which the
/// release's delete triggers, before dropping it: an answered request leaves its connection
/// in the pool, a dropped one closes it.
const MONITOR_DRAIN: Duration = Duration::from_secs(1);

/// The sessions of one client, one per TTL, each created by the first lock that needs it.
#[derive(Default)]
pub(super) struct Sessions {
    slots: std::sync::Mutex<HashMap<Duration, Arc<Slot>>>,
}

/// The session of one TTL, if any. Its mutex serializes creating the session; taking a
/// session from the slot and reaping an idle one both happen under it.
type Slot = tokio::sync::Mutex<Option<Arc<Session>>>;

impl Sessions {
    fn slot(&self, ttl: Duration) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(ttl).or_default().clone()
    }

    /// Stops and destroys every session still kept (the client is going away; nothing uses
    /// them any more), in the background on the current runtime, if there is one.
    pub(super) fn shutdown(&self) {
        let slots = std::mem::take(&mut *self.slots.lock().unwrap_or_else(|p| p.into_inner()));
        for slot in slots.into_values() {
            let Ok(mut s) = slot.try_lock() else { continue };
            if let Some(s) = s.take() {
                s.lease.stop();
                s.destroy_later();
            }
        }
    }
}

/// A session shared by the locks of one client and TTL, and the lease clock that says until
/// when this client may count on it (`crate::lease`: the last confirmed renew's send time +
/// the session TTL − the margin).
struct Session {
    id: String,
    lease: Lease,
    client: Client,
    /// Lock attempts, held locks and pending releases on this session.
    users: AtomicUsize,
    /// Whether a user came or went since the renewer last looked (idle reaping).
    used: AtomicBool,
    /// Whether the session was destroyed, or is being destroyed, by this client.
    destroyed: AtomicBool,
}

impl Session {
    /// Whether new locks may use this session: not lost, not stopped, renewing.
    fn usable(&self) -> bool {
        !self.lease.is_lost() && !self.lease.is_stopped() && !self.lease.is_suspended()
    }

    /// Whether nobody used the session since the last call, and nobody uses it now.
    fn idle_since_last_look(&self) -> bool {
        let used = self.used.swap(false, Ordering::SeqCst);
        !used && self.users.load(Ordering::SeqCst) == 0
    }

    /// Destroys the session on the server, once, in the background (a destroy of a session
    /// the server no longer knows answers `true` too).
    fn destroy_later(&self) {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let id = self.id.clone();
        rt.spawn(async move {
            if let Err(e) = client.session_destroy(&id, "").await {
                tracing::debug!(session = %id, error = %e, "destroying a consul session failed");
            }
        });
    }
}

/// One user of a session (a lock attempt, a held lock, a pending release). The last user of a
/// lost session destroys it, which also releases (with the lock-delay) any key it still holds.
struct SessionUse(Arc<Session>);

impl SessionUse {
    fn new(s: Arc<Session>) -> SessionUse {
        s.users.fetch_add(1, Ordering::SeqCst);
        s.used.store(true, Ordering::SeqCst);
        SessionUse(s)
    }
}

impl std::ops::Deref for SessionUse {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.0
    }
}

impl Drop for SessionUse {
    fn drop(&mut self) {
        self.0.used.store(true, Ordering::SeqCst);
        let last = self.0.users.fetch_sub(1, Ordering::SeqCst) == 1;
        if last && self.0.lease.is_lost() {
            self.0.destroy_later();
        }
    }
}

/// Renews a session: `PUT /v1/session/renew/<id>`. A 404 means the session was invalidated;
/// an answer gives the TTL the server now applies (it may raise it, see "Renew Session" in
/// <https://developer.hashicorp.com/consul/api-docs/session>), else the TTL the session was
/// created with.
///
/// A session that nobody used for a whole renewal period is destroyed instead of renewed.
struct SessionRenewer {
    client: Client,
    id: String,
    ttl: Duration,
    session: Weak<Session>,
    slot: Weak<Slot>,
}

impl SessionRenewer {
    /// Takes the session out of its slot and destroys it if nobody used it since the last
    /// renewal; true if it did.
    fn reap_if_idle(&self) -> bool {
        let Some(s) = self.session.upgrade() else {
            return false;
        };
        if !s.idle_since_last_look() {
            return false;
        }
        if let Some(slot) = self.slot.upgrade() {
            // Someone taking a session or creating one holds the slot: not idle after all.
            let Ok(mut cached) = slot.try_lock() else {
                return false;
            };
            if s.users.load(Ordering::SeqCst) != 0 {
                return false;
            }
            if cached.as_ref().is_some_and(|c| Arc::ptr_eq(c, &s)) {
                *cached = None;
            }
        }
        tracing::debug!(session = %self.id, "destroying an idle consul lock session");
        s.lease.stop();
        s.destroy_later();
        true
    }
}

impl Renew for SessionRenewer {
    fn renew(&mut self) -> Pin<Box<dyn Future<Output = Result<Renewal>> + Send + '_>> {
        Box::pin(async move {
            if self.reap_if_idle() {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    NAME,
                    "the idle session was destroyed",
                ));
            }
            match self.client.session_renew(&self.id, "").await? {
                None => Ok(Renewal::Gone(format!(
                    "the Consul session {} was invalidated (renew: not found)",
                    self.id
                ))),
                Some(ttl) => Ok(Renewal::Confirmed(ttl.unwrap_or(self.ttl))),
            }
        })
    }
}

/// A session create whose answer has not been taken: if it is given up on (the wait ran out,
/// or the `lock()` future was dropped), the session it creates is destroyed once the answer
/// comes, so nothing stays behind.
struct PendingCreate {
    rx: Option<oneshot::Receiver<Result<String>>>,
    client: Client,
}

impl Drop for PendingCreate {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        // After close, the create task's send fails and the task destroys the session itself;
        // an answer that came before close is taken here.
        rx.close();
        if let Ok(Ok(id)) = rx.try_recv() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let client = self.client.clone();
                rt.spawn(async move {
                    let _ = client.session_destroy(&id, "").await;
                });
            }
        }
    }
}

impl ConsulStore {
    /// A session for a lock with `ttl`: the client's session of that TTL if it is usable, else
    /// a new one (created while holding the slot, so concurrent locks wait for it rather than
    /// create their own), waiting until `deadline` (`Ok(None)` once it passed). The flag says
    /// whether the session was created for this call.
    async fn session(
        &self,
        ttl: Duration,
        deadline: Option<Instant>,
        key: &str,
    ) -> Result<Option<(SessionUse, bool)>> {
        let slot = self.inner.sessions.slot(ttl);
        let Some(mut cached) = until(deadline, slot.clone().lock_owned()).await else {
            return Ok(None);
        };
        if let Some(s) = cached.as_ref().filter(|s| s.usable()) {
            return Ok(Some((SessionUse::new(s.clone()), false)));
        }
        let client = self.inner.client.clone();
        let delay = self.inner.cfg.lock_delay;
        let (tx, rx) = oneshot::channel();
        let mut pending = PendingCreate {
            rx: Some(rx),
            client: client.clone(),
        };
        let sent = Instant::now();
        {
            let client = client.clone();
            let name = format!("coordkit locks (TTL {})", super::client::go_duration(ttl));
            let key = key.to_string();
            tokio::spawn(async move {
                let created = client
                    .session_create(&name, ttl, delay, "release", &key)
                    .await;
                if let Err(Ok(id)) = tx.send(created) {
                    // Given up on: nobody will use or destroy this session otherwise.
                    let _ = client.session_destroy(&id, &key).await;
                }
            });
        }
        let answer = match pending.rx.as_mut() {
            Some(rx) => until(deadline, rx).await,
            None => None,
        };
        let id = match answer {
            None => return Ok(None),
            Some(Ok(created)) => {
                pending.rx = None;
                created?
            }
            Some(Err(_)) => {
                pending.rx = None;
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    NAME,
                    "the session create was cancelled (the runtime is shutting down)",
                )
                .with_key(key));
            }
        };
        let policy = RenewPolicy {
            attempt_timeout: self.inner.cfg.timeout(),
        };
        let weak_slot = Arc::downgrade(&slot);
        let session = Arc::new_cyclic(|me| {
            let renewer = SessionRenewer {
                client: client.clone(),
                id: id.clone(),
                ttl,
                session: me.clone(),
                slot: weak_slot,
            };
            Session {
                id,
                lease: Lease::start(renewer, sent, ttl, policy),
                client,
                users: AtomicUsize::new(0),
                used: AtomicBool::new(true),
                destroyed: AtomicBool::new(false),
            }
        });
        let user = SessionUse::new(session.clone());
        if let Some(old) = cached.replace(session) {
            // Lost, stopped or suspended: its last user (if any is left) destroys a lost one;
            // one that is merely suspended (a fault test) lapses on the server.
            if old.users.load(Ordering::SeqCst) == 0 && old.lease.is_lost() {
                old.destroy_later();
            }
        }
        Ok(Some((user, true)))
    }

    /// This client's queue for the lock key `key`.
    fn local_queue(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.inner.local.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.to_string()).or_default().clone()
    }
}

/// A place at the head of this client's queue for one lock key: while it is held, no other task
/// of the client acquires or releases that key. Given back (and the queue forgotten when
/// nobody else is in it) on drop.
struct Place {
    store: ConsulStore,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Place {
    /// Waits for the place until `deadline` (`None` once it passed).
    async fn take(store: &ConsulStore, key: &str, deadline: Option<Instant>) -> Option<Place> {
        let queue = store.local_queue(key);
        let mut place = Place {
            store: store.clone(),
            key: key.to_string(),
            guard: None,
        };
        place.guard = Some(until(deadline, queue.lock_owned()).await?);
        Some(place)
    }

    /// The place if nobody of this client holds or waits for the key.
    fn try_take(store: &ConsulStore, key: &str) -> Option<Place> {
        let queue = store.local_queue(key);
        let mut place = Place {
            store: store.clone(),
            key: key.to_string(),
            guard: None,
        };
        place.guard = Some(queue.try_lock_owned().ok()?);
        Some(place)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self
            .store
            .inner
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|q| Arc::strong_count(q) == 1)
        {
            map.remove(&self.key);
        }
    }
}

/// A lock attempt in progress: its queue place and session. If it is given up (an error, the
/// wait ran out, the `lock()` future was dropped) after an acquire was sent, the key is
/// released in the background in case that acquire went through unseen, and only then is the
/// place given back.
struct Pending {
    store: ConsulStore,
    key: String,
    place: Option<Place>,
    session: Option<SessionUse>,
    acquire_sent: bool,
}

impl Pending {
    fn session(&self) -> &Session {
        match &self.session {
            Some(s) => s,
            None => unreachable!("a pending attempt always has its session until it ends"),
        }
    }

    /// Hands the place and session over to a lock guard: no cleanup any more.
    fn into_parts(mut self) -> (Place, SessionUse) {
        match (self.place.take(), self.session.take()) {
            (Some(p), Some(s)) => (p, s),
            _ => unreachable!("a pending attempt always has its place and session"),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let (Some(place), Some(session)) = (self.place.take(), self.session.take()) else {
            return;
        };
        if !self.acquire_sent {
            return;
        }
        let store = self.store.clone();
        let key = std::mem::take(&mut self.key);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                // An acquire whose answer was not taken may have gone through.
                let _ = release_key(&store, &key, &session.id).await;
                drop(place);
                drop(session);
            });
        }
    }
}

/// Releases a lock this client acquired at `index`: one `DELETE ?cas=<index>`, which deletes the
/// key only if it has not changed since the acquisition, so only while `session` still holds it
/// (a release or an invalidation of the session, or another session's acquire, all bump the
/// ModifyIndex). If the key did change (a plain write to a held lock key keeps its session), the
/// atomic check-session + delete transaction decides. Returns whether the key was deleted (or
/// already gone).
async fn release_acquired(
    store: &ConsulStore,
    key: &str,
    index: u64,
    session: &str,
) -> Result<bool> {
    let q = [("cas", index.to_string())];
    if store.inner.client.kv_delete_with(key, &q).await? {
        return Ok(true);
    }
    release_key(store, key, session).await
}

/// Deletes the lock key if (and only if) `session` holds it, atomically. A delete sets no
/// lock-delay (only an invalidated session does).
async fn release_key(store: &ConsulStore, key: &str, session: &str) -> Result<bool> {
    let ops = [
        TxnKv {
            verb: "check-session",
            key,
            session: Some(session),
            ..TxnKv::default()
        },
        TxnKv {
            verb: "delete",
            key,
            ..TxnKv::default()
        },
    ];
    Ok(matches!(
        store.inner.client.txn(&ops, key).await?,
        TxnOutcome::Ok(_)
    ))
}

enum Attempt {
    Acquired(u64),
    Held,
    LockDelay,
    /// The server no longer knows the session.
    InvalidSession(String),
}

impl ConsulStore {
    fn lock_key(&self, name: &str) -> String {
        format!("{}{name}", self.inner.lock_prefix)
    }

    /// One `lock` transaction (<https://developer.hashicorp.com/consul/api-docs/txn>): the result's
    /// ModifyIndex is the fencing token, a Raft index written by this acquisition (Consul's
    /// agent/consul/state/txn.go).
    async fn attempt(&self, key: &str, session: &str) -> Result<Attempt> {
        let op = TxnKv {
            verb: "lock",
            key,
            flags: LOCK_FLAG_VALUE,
            session: Some(session),
            ..TxnKv::default()
        };
        match self.inner.client.txn(&[op], key).await? {
            TxnOutcome::Ok(results) => match results.iter().find(|e| e.key == key) {
                Some(e) => Ok(Attempt::Acquired(e.modify_index)),
                None => Err(Error::new(
                    ErrorKind::Backend,
                    NAME,
                    "the lock transaction returned no entry",
                )
                .with_key(key)),
            },
            TxnOutcome::RolledBack(errors) => {
                let what = errors.first().map(|e| e.what.as_str()).unwrap_or("");
                if what.contains("lock delay") {
                    Ok(Attempt::LockDelay)
                } else if what.contains("already held") {
                    Ok(Attempt::Held)
                } else if what.contains("invalid session") {
                    Ok(Attempt::InvalidSession(what.to_string()))
                } else {
                    Err(Error::new(
                        ErrorKind::Backend,
                        NAME,
                        format!("lock transaction failed: {what}"),
                    )
                    .with_key(key))
                }
            }
        }
    }

    /// Waits until the lock key changes (blocking query on its index), or returns at once if
    /// it is not held any more.
    async fn wait_for_change(
        &self,
        key: &str,
        session: &Session,
        deadline: Option<Instant>,
    ) -> Result<()> {
        let client = &self.inner.client;
        let (entries, index) = client.kv_get(key, false, Mode::Default, None).await?;
        let Some(e) = entries.iter().find(|e| e.key == key) else {
            return Ok(());
        };
        if e.holder().is_none() {
            return Ok(());
        }
        if e.flags != LOCK_FLAG_VALUE {
            return Err(Error::new(
                ErrorKind::Conflict,
                NAME,
                format!(
                    "the lock key is held with flags {:#x}, not a lock's {LOCK_FLAG_VALUE:#x}: something else uses it",
                    e.flags
                ),
            )
            .with_key(key));
        }
        let wait = match deadline {
            Some(t) => t.saturating_duration_since(Instant::now()).min(MAX_BLOCK),
            None => MAX_BLOCK,
        };
        if wait.is_zero() {
            return Ok(());
        }
        let lost = session.lease.lost_token();
        tokio::select! {
            r = client.kv_get(key, false, Mode::Default, Some((index, wait))) => r.map(|_| ()),
            _ = lost.cancelled() => Ok(()),
        }
    }

    fn guard(&self, name: &str, pending: Pending, token: u64) -> LockGuard {
        let key = pending.key.clone();
        let (place, session) = pending.into_parts();
        let lease = session.lease.clone();
        // This lock's own signal: the session's loss fires it, and so does the monitor when
        // this key (and only this one) is no longer held by the session.
        let lost = lease.lost_token().child_token();
        let stop = CancellationToken::new();
        self.spawn_monitor(
            key.clone(),
            session.id.clone(),
            lost.clone(),
            stop.clone(),
            token,
        );
        let handle = ConsulLock {
            store: self.clone(),
            key,
            index: token,
            held: Some((place, session)),
            lost: lost.clone(),
            stop,
        };
        LockGuard::new(name, FencingToken::from_raw(token), lost, Box::new(handle))
            .with_lease(&lease)
    }

    /// While held: consistent blocking queries on the key; the lock is declared lost as soon
    /// as the key is gone or held by another session (like `monitorLock` in Consul's
    /// api/lock.go). This is a trigger on top of the lease clock, which fires on its own at
    /// the deadline whatever the monitor sees.
    fn spawn_monitor(
        &self,
        key: String,
        id: String,
        lost: CancellationToken,
        stop: CancellationToken,
        mut index: u64,
    ) {
        let store = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(MONITOR_START) => {}
                _ = stop.cancelled() => return,
                _ = lost.cancelled() => return,
            }
            let mut backoff = Duration::from_millis(100);
            loop {
                let poll = store.inner.client.kv_get(
                    &key,
                    false,
                    Mode::Consistent,
                    Some((index.max(1), MAX_BLOCK)),
                );
                tokio::pin!(poll);
                let r = tokio::select! {
                    r = &mut poll => r,
                    _ = stop.cancelled() => {
                        // The release's delete answers the query: take that answer, so the
                        // connection goes back to the pool instead of being closed.
                        let _ = tokio::time::timeout(MONITOR_DRAIN, &mut poll).await;
                        return;
                    }
                    _ = lost.cancelled() => return,
                };
                match r {
                    Ok((entries, new_index)) => {
                        backoff = Duration::from_millis(100);
                        let ours = entries
                            .iter()
                            .any(|e| e.key == key && e.holder() == Some(id.as_str()));
                        if !ours {
                            if stop.is_cancelled() {
                                return;
                            }
                            tracing::debug!(lock = %key, "consul lock key no longer held by our session");
                            lost.cancel();
                            return;
                        }
                        index = if new_index < index { 1 } else { new_index };
                    }
                    Err(e) => {
                        // The lease clock decides when failures mean loss.
                        tracing::debug!(lock = %key, error = %e, "consul lock monitor poll failed");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = stop.cancelled() => return,
                            _ = lost.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
    }

    /// Starts an attempt on `key` with the client's session for `ttl`, the place in the local
    /// queue already taken; `Ok(None)` if the wait ran out first. The flag says whether the
    /// session was created for this attempt.
    async fn pending(
        &self,
        key: &str,
        place: Place,
        ttl: Duration,
        deadline: Option<Instant>,
    ) -> Result<Option<(Pending, bool)>> {
        let Some((session, fresh)) = self.session(ttl, deadline, key).await? else {
            return Ok(None);
        };
        Ok(Some((
            Pending {
                store: self.clone(),
                key: key.to_string(),
                place: Some(place),
                session: Some(session),
                acquire_sent: false,
            },
            fresh,
        )))
    }
}

fn passed(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

fn session_lost(name: &str, session: &Session) -> Error {
    Error::new(
        ErrorKind::LockLost,
        NAME,
        format!(
            "the session of this lock attempt was lost before the lock was granted: {}",
            session
                .lease
                .why()
                .unwrap_or_else(|| "it could not be renewed within its TTL".into())
        ),
    )
    .with_key(name)
}

fn invalid_session(name: &str, what: &str) -> Error {
    Error::new(
        ErrorKind::LockLost,
        NAME,
        format!("the session of this lock attempt was invalidated while acquiring: {what}"),
    )
    .with_key(name)
}

/// What to do after an acquire answered `invalid session`.
enum AfterInvalid {
    /// The session was taken from the client's cache and this was its first acquire here: the
    /// server dropped it before this attempt began; try again with a new session.
    Retry(Place),
    Fail(Error),
}

/// Marks the session lost (every guard on it is lost: the server no longer knows it) and says
/// whether the attempt may go on with a new session.
fn after_invalid(
    mut pending: Pending,
    fresh: bool,
    first: bool,
    name: &str,
    what: &str,
) -> AfterInvalid {
    pending.session().lease.lose(format!(
        "the server no longer knows the Consul session: {what}"
    ));
    // Refused: nothing was acquired, so there is nothing to release.
    pending.acquire_sent = false;
    if fresh || !first {
        return AfterInvalid::Fail(invalid_session(name, what));
    }
    let (place, _) = pending.into_parts();
    AfterInvalid::Retry(place)
}

#[async_trait]
impl DistLock for ConsulStore {
    async fn lock(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        Self::caps().check_lock(name, opts)?;
        // Every step below is bounded by this deadline (None: a wait too large to represent,
        // or no wait, is unbounded).
        let deadline = deadline_after(opts.wait);
        let key = self.lock_key(name);
        let timeout = || {
            Error::new(
                ErrorKind::Timeout,
                NAME,
                format!(
                    "lock not acquired within {:?}",
                    opts.wait.unwrap_or_default()
                ),
            )
            .with_key(name)
        };
        let Some(mut place) = Place::take(self, &key, deadline).await else {
            return Err(timeout());
        };
        'session: loop {
            let Some((mut pending, fresh)) = self.pending(&key, place, opts.ttl, deadline).await?
            else {
                return Err(timeout());
            };
            let mut first = true;
            loop {
                if pending.session().lease.is_lost() {
                    return Err(session_lost(name, pending.session()));
                }
                if passed(deadline) {
                    return Err(timeout());
                }
                // An attempt cut off by the deadline may have acquired the key on the server;
                // dropping `pending` releases it (only if this session holds it).
                pending.acquire_sent = true;
                let id = pending.session().id.clone();
                let attempt = match until(deadline, self.attempt(&key, &id)).await {
                    None => return Err(timeout()),
                    Some(a) => a?,
                };
                match attempt {
                    Attempt::Acquired(token) => {
                        if pending.session().lease.is_lost() {
                            // Granted to a session this client can no longer vouch for.
                            return Err(session_lost(name, pending.session()));
                        }
                        return Ok(self.guard(name, pending, token));
                    }
                    Attempt::InvalidSession(what) => {
                        match after_invalid(pending, fresh, first, name, &what) {
                            AfterInvalid::Retry(p) => {
                                place = p;
                                continue 'session;
                            }
                            AfterInvalid::Fail(e) => return Err(e),
                        }
                    }
                    Attempt::LockDelay => {
                        let mut nap = LOCK_DELAY_RETRY;
                        if let Some(t) = deadline {
                            nap = nap.min(t.saturating_duration_since(Instant::now()));
                        }
                        let lost = pending.session().lease.lost_token();
                        tokio::select! {
                            _ = tokio::time::sleep(nap) => {}
                            _ = lost.cancelled() => {}
                        }
                    }
                    Attempt::Held => {
                        if passed(deadline) {
                            return Err(timeout());
                        }
                        let waited = until(
                            deadline,
                            self.wait_for_change(&key, pending.session(), deadline),
                        )
                        .await;
                        match waited {
                            None => return Err(timeout()),
                            Some(r) => r?,
                        }
                    }
                }
                first = false;
            }
        }
    }

    async fn try_lock(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>> {
        Self::caps().check_lock(name, opts)?;
        let key = self.lock_key(name);
        // Held by another task of this client.
        let Some(mut place) = Place::try_take(self, &key) else {
            return Ok(None);
        };
        // Cheap check first, so a held lock costs no session.
        let (entries, _) = self
            .inner
            .client
            .kv_get(&key, false, Mode::Default, None)
            .await?;
        if entries.iter().any(|e| e.key == key && e.holder().is_some()) {
            return Ok(None);
        }
        loop {
            let (mut pending, fresh) = self
                .pending(&key, place, opts.ttl, None)
                .await?
                .ok_or_else(|| {
                    Error::new(ErrorKind::Timeout, NAME, "the session create got no answer")
                        .with_key(name)
                })?;
            pending.acquire_sent = true;
            let id = pending.session().id.clone();
            match self.attempt(&key, &id).await? {
                Attempt::Acquired(token) => {
                    if pending.session().lease.is_lost() {
                        return Err(session_lost(name, pending.session()));
                    }
                    return Ok(Some(self.guard(name, pending, token)));
                }
                Attempt::Held | Attempt::LockDelay => {
                    pending.acquire_sent = false;
                    return Ok(None);
                }
                Attempt::InvalidSession(what) => {
                    match after_invalid(pending, fresh, true, name, &what) {
                        AfterInvalid::Retry(p) => place = p,
                        AfterInvalid::Fail(e) => return Err(e),
                    }
                }
            }
        }
    }
}

/// The Consul side of a held lock: its key, its place in the client's queue for the key, and
/// its use of the shared session.
struct ConsulLock {
    store: ConsulStore,
    key: String,
    /// The key's ModifyIndex as this lock's acquisition left it (the fencing token).
    index: u64,
    held: Option<(Place, SessionUse)>,
    /// This lock's lost signal (a child of the session's).
    lost: CancellationToken,
    /// Ends the monitor (the lock is being released).
    stop: CancellationToken,
}

impl ConsulLock {
    /// Releases the key, retrying in the background if the first try fails: the place (and
    /// the session use) are given back only once the key is no longer held by the session,
    /// or the session is lost, so another task of this client never acquires it while the old
    /// holder's delete may still come.
    async fn release_held(
        store: ConsulStore,
        key: String,
        index: u64,
        place: Place,
        session: SessionUse,
    ) -> Result<()> {
        let first = release_acquired(&store, &key, index, &session.id).await;
        let Err(e) = first else {
            return Ok(());
        };
        tracing::debug!(lock = %key, error = %e, "releasing a consul lock failed; retrying in the background");
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let lost = session.lease.lost_token();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = lost.cancelled() => break,
                }
                match release_acquired(&store, &key, index, &session.id).await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::debug!(lock = %key, error = %e, "releasing a consul lock failed; retrying");
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
            drop(place);
            drop(session);
        });
        Err(e)
    }
}

/// A handle dropped without its release running (a guard dropped where no runtime runs at
/// all): the key cannot be deleted, so the session is given up (no longer renewed, and lost
/// for every lock on it), and lapses at its TTL, and the lock with it.
impl Drop for ConsulLock {
    fn drop(&mut self) {
        self.stop.cancel();
        let Some((place, session)) = self.held.take() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = self.store.clone();
            let (key, index) = (std::mem::take(&mut self.key), self.index);
            rt.spawn(async move {
                let _ = ConsulLock::release_held(store, key, index, place, session).await;
            });
            return;
        }
        session
            .lease
            .lose("a lock on this session was dropped where it could not be released");
        session.lease.stop();
        drop(place);
    }
}

#[async_trait]
impl LockHandle for ConsulLock {
    async fn release(mut self: Box<Self>) -> Result<()> {
        self.stop.cancel();
        let Some((place, session)) = self.held.take() else {
            return Ok(());
        };
        // Delete the key if and only if our session still holds it: an explicit delete sets no
        // lock-delay, unlike a destroy or an expiry
        // (https://developer.hashicorp.com/consul/api-docs/session,
        // https://developer.hashicorp.com/consul/docs/dynamic-app-config/sessions). The
        // session stays for the client's next lock with this TTL.
        let key = std::mem::take(&mut self.key);
        ConsulLock::release_held(self.store.clone(), key, self.index, place, session).await
    }

    fn suspend_keep_alive(&self, _lost: &CancellationToken) {
        if let Some((_, s)) = &self.held {
            s.lease.suspend();
        }
    }

    fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }
}

crate::election_via_lock!(ConsulStore);
crate::recipes_via_lock!(ConsulStore);
