//! [`DistLock`] over Consul sessions: one TTL session per acquisition, the lock key acquired
//! through `/v1/txn`'s `lock` verb so the acquiring ModifyIndex (the fencing token) comes back
//! atomically.
//!
//! The session is the lease: its clock (`crate::lease`) starts when the session create is
//! sent, moves on every confirmed `PUT /v1/session/renew/<id>` (to that renew's send time +
//! the TTL the server returned − the margin), and fires the guard's lost signal at that
//! deadline, whatever the server or the network do meanwhile. A blocking query on the lock
//! key fires it earlier if the key is no longer held by the session.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;
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

/// The session behind one lock attempt, and the lease clock that says until when this client
/// may count on it (`crate::lease`: the last confirmed renew's send time + the session TTL −
/// the margin).
#[derive(Clone)]
struct Session {
    id: String,
    lease: Lease,
    /// Ends the lock monitor (the lock is being released).
    stop: CancellationToken,
}

/// Renews a session: `PUT /v1/session/renew/<id>`. A 404 means the session was invalidated;
/// an answer gives the TTL the server now applies (it may raise it, see "Renew Session" in
/// <https://developer.hashicorp.com/consul/api-docs/session>), else the TTL the session was
/// created with.
struct SessionRenewer {
    client: Client,
    id: String,
    key: String,
    ttl: Duration,
}

impl Renew for SessionRenewer {
    fn renew(&mut self) -> Pin<Box<dyn Future<Output = Result<Renewal>> + Send + '_>> {
        Box::pin(async move {
            match self.client.session_renew(&self.id, &self.key).await? {
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
    key: String,
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
                let key = self.key.clone();
                rt.spawn(async move {
                    let _ = client.session_destroy(&id, &key).await;
                });
            }
        }
    }
}

impl Session {
    /// Creates the session of one lock attempt, waiting for the answer until `deadline`
    /// (`Ok(None)` once it passed), and starts its lease clock from the moment the create
    /// request was sent.
    async fn create(
        store: &ConsulStore,
        name: &str,
        key: &str,
        ttl: Duration,
        deadline: Option<Instant>,
    ) -> Result<Option<Session>> {
        let client = store.inner.client.clone();
        let delay = store.inner.cfg.lock_delay;
        let (tx, rx) = oneshot::channel();
        let mut pending = PendingCreate {
            rx: Some(rx),
            client: client.clone(),
            key: key.to_string(),
        };
        let sent = Instant::now();
        {
            let client = client.clone();
            let name = format!("coordkit lock {name}");
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
        let renewer = SessionRenewer {
            client,
            id: id.clone(),
            key: key.to_string(),
            ttl,
        };
        let policy = RenewPolicy {
            attempt_timeout: store.inner.cfg.timeout(),
        };
        Ok(Some(Session {
            id,
            lease: Lease::start(renewer, sent, ttl, policy),
            stop: CancellationToken::new(),
        }))
    }

    /// Stops renewing and monitoring, without firing the lost signal.
    fn stop(&self) {
        self.stop.cancel();
        self.lease.stop();
    }
}

/// Destroys a session that never got (or no longer has) a lock, in the background if need be.
/// Used on every path that gives up, including a dropped `lock()` future.
struct SessionCleanup {
    store: ConsulStore,
    session: Session,
    key: String,
    armed: bool,
}

impl SessionCleanup {
    fn new(store: &ConsulStore, session: Session, key: &str) -> Self {
        SessionCleanup {
            store: store.clone(),
            session,
            key: key.to_string(),
            armed: true,
        }
    }

    fn session(&self) -> &Session {
        &self.session
    }

    /// Hands the session over to a lock guard: no cleanup any more.
    fn disarm(mut self) -> Session {
        self.armed = false;
        self.session.clone()
    }
}

impl Drop for SessionCleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let s = self.session.clone();
        s.stop();
        let store = self.store.clone();
        let key = self.key.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                // If an acquire answer was lost, the session may hold the key: release first
                // (no lock-delay), then destroy.
                let _ = release_key(&store, &key, &s.id).await;
                let _ = store.inner.client.session_destroy(&s.id, &key).await;
            });
        }
    }
}

/// Deletes the lock key if (and only if) `session` holds it, atomically.
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
                    Err(Error::new(
                        ErrorKind::LockLost,
                        NAME,
                        format!("the session of this lock attempt was invalidated while acquiring: {what}"),
                    )
                    .with_key(key))
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

    fn guard(&self, name: &str, key: String, session: Session, token: u64) -> LockGuard {
        self.spawn_monitor(key.clone(), &session, token);
        let lease = session.lease.clone();
        let lost = lease.lost_token().child_token();
        let handle = ConsulLock {
            store: self.clone(),
            key,
            session,
        };
        LockGuard::new(name, FencingToken::from_raw(token), lost, Box::new(handle))
            .with_lease(&lease)
    }

    /// While held: consistent blocking queries on the key; the lease is declared lost as soon
    /// as the key is gone or held by another session (like `monitorLock` in Consul's
    /// api/lock.go). This is a trigger on top of the lease clock, which fires on its own at
    /// the deadline whatever the monitor sees.
    fn spawn_monitor(&self, key: String, session: &Session, mut index: u64) {
        let store = self.clone();
        let id = session.id.clone();
        let lease = session.lease.clone();
        let lost = lease.lost_token();
        let stop = session.stop.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let poll = store.inner.client.kv_get(
                    &key,
                    false,
                    Mode::Consistent,
                    Some((index.max(1), MAX_BLOCK)),
                );
                let r = tokio::select! {
                    r = poll => r,
                    _ = stop.cancelled() => return,
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
                            lease.lose(
                                "the lock key is no longer held by this lock's Consul session",
                            );
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
        let Some(session) = Session::create(self, name, &key, opts.ttl, deadline).await? else {
            return Err(timeout());
        };
        let cleanup = SessionCleanup::new(self, session, &key);
        loop {
            if cleanup.session().lease.is_lost() {
                return Err(session_lost(name, cleanup.session()));
            }
            if passed(deadline) {
                return Err(timeout());
            }
            // An attempt cut off by the deadline may have acquired the key on the server; the
            // cleanup releases it (only if this session holds it) and destroys the session.
            let attempt = match until(deadline, self.attempt(&key, &cleanup.session().id)).await {
                None => return Err(timeout()),
                Some(a) => a?,
            };
            match attempt {
                Attempt::Acquired(token) => {
                    if cleanup.session().lease.is_lost() {
                        // Granted to a session this client can no longer vouch for.
                        return Err(session_lost(name, cleanup.session()));
                    }
                    let session = cleanup.disarm();
                    return Ok(self.guard(name, key, session, token));
                }
                Attempt::LockDelay => {
                    let mut nap = LOCK_DELAY_RETRY;
                    if let Some(t) = deadline {
                        nap = nap.min(t.saturating_duration_since(Instant::now()));
                    }
                    let lost = cleanup.session().lease.lost_token();
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
                        self.wait_for_change(&key, cleanup.session(), deadline),
                    )
                    .await;
                    match waited {
                        None => return Err(timeout()),
                        Some(r) => r?,
                    }
                }
            }
        }
    }

    async fn try_lock(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>> {
        Self::caps().check_lock(name, opts)?;
        let key = self.lock_key(name);
        // Cheap check first, so a held lock costs no session.
        let (entries, _) = self
            .inner
            .client
            .kv_get(&key, false, Mode::Default, None)
            .await?;
        if entries.iter().any(|e| e.key == key && e.holder().is_some()) {
            return Ok(None);
        }
        let session = Session::create(self, name, &key, opts.ttl, None)
            .await?
            .ok_or_else(|| {
                Error::new(ErrorKind::Timeout, NAME, "the session create got no answer")
                    .with_key(name)
            })?;
        let cleanup = SessionCleanup::new(self, session, &key);
        match self.attempt(&key, &cleanup.session().id).await? {
            Attempt::Acquired(token) => {
                if cleanup.session().lease.is_lost() {
                    return Err(session_lost(name, cleanup.session()));
                }
                let session = cleanup.disarm();
                Ok(Some(self.guard(name, key, session, token)))
            }
            Attempt::Held | Attempt::LockDelay => Ok(None),
        }
    }
}

/// The Consul side of a held lock.
struct ConsulLock {
    store: ConsulStore,
    key: String,
    session: Session,
}

/// A handle dropped without its release running (a guard dropped where no runtime runs) stops
/// renewing: the session then lapses at its TTL, and the lock with it.
impl Drop for ConsulLock {
    fn drop(&mut self) {
        self.session.stop();
    }
}

#[async_trait]
impl LockHandle for ConsulLock {
    async fn release(self: Box<Self>) -> Result<()> {
        self.session.stop();
        let client = &self.store.inner.client;
        // Release first (an explicit release sets no lock-delay), then destroy: destroying a
        // session applies the lock-delay to the keys it holds
        // (https://developer.hashicorp.com/consul/api-docs/session,
        // https://developer.hashicorp.com/consul/docs/dynamic-app-config/sessions). The
        // release deletes the key if and only if our session still holds it.
        let released = release_key(&self.store, &self.key, &self.session.id).await;
        let destroyed = client.session_destroy(&self.session.id, &self.key).await;
        released?;
        destroyed
    }

    fn suspend_keep_alive(&self) {
        self.session.lease.suspend();
    }
}

crate::election_via_lock!(ConsulStore);
crate::recipes_via_lock!(ConsulStore);
