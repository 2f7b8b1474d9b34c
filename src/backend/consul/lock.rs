//! [`DistLock`] over Consul sessions: one TTL session per acquisition, the lock key acquired
//! through `/v1/txn`'s `lock` verb so the acquiring ModifyIndex (the fencing token) comes back
//! atomically.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{Mode, TxnKv, TxnOutcome};
use super::{ConsulStore, MAX_SESSION_TTL, MIN_SESSION_TTL, NAME};
use crate::error::{Error, ErrorKind, Result};
use crate::key::validate_lock_name;
use crate::lock::{DistLock, FencingToken, LockGuard, LockHandle, LockOptions};

/// The `Flags` value of a lock key, the same as Consul's Go API (`api.LockFlagValue`), so that
/// its lock helpers recognise coordkit's lock keys and the other way round.
pub const LOCK_FLAG_VALUE: u64 = 0x2ddc_cbc0_58a5_0c18;

/// How long a waiter sleeps before retrying an acquire refused by a lock-delay (the delay's
/// end is not an event that can be waited for).
const LOCK_DELAY_RETRY: Duration = Duration::from_millis(250);

/// The longest single blocking query of a waiter or monitor.
const MAX_BLOCK: Duration = Duration::from_secs(300);

/// A session and its renewer: renews every TTL/2, adopts the TTL the server returns, and
/// cancels `lost` when the session is gone or renewals have failed for a whole TTL.
#[derive(Clone)]
struct Session {
    id: String,
    lost: CancellationToken,
    stop: CancellationToken,
    suspended: Arc<AtomicBool>,
}

impl Session {
    async fn create(store: &ConsulStore, name: &str, key: &str, ttl: Duration) -> Result<Session> {
        let client = &store.inner.client;
        let delay = Duration::from_millis(store.inner.cfg.lock_delay_ms);
        let id = client
            .session_create(&format!("coordkit lock {name}"), ttl, delay, "release", key)
            .await?;
        let s = Session {
            id,
            lost: CancellationToken::new(),
            stop: CancellationToken::new(),
            suspended: Arc::new(AtomicBool::new(false)),
        };
        s.spawn_renewer(store.clone(), key.to_string(), ttl);
        Ok(s)
    }

    fn spawn_renewer(&self, store: ConsulStore, key: String, ttl: Duration) {
        let id = self.id.clone();
        let lost = self.lost.clone();
        let stop = self.stop.clone();
        let suspended = self.suspended.clone();
        tokio::spawn(async move {
            let ttl_ms = AtomicU64::new(ttl.as_millis() as u64);
            let mut last_ok = Instant::now();
            let mut next = last_ok + ttl / 2;
            loop {
                let ttl = Duration::from_millis(ttl_ms.load(Ordering::Relaxed));
                let give_up = last_ok + ttl;
                let wake = if suspended.load(Ordering::SeqCst) {
                    give_up
                } else {
                    next.min(give_up)
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = stop.cancelled() => return,
                    _ = lost.cancelled() => return,
                }
                if Instant::now() >= give_up {
                    // No renewal for a whole TTL: the session may be invalidated any moment.
                    tracing::debug!(lock = %key, "consul session not renewed for its TTL");
                    lost.cancel();
                    return;
                }
                if suspended.load(Ordering::SeqCst) {
                    continue;
                }
                let renewed = tokio::select! {
                    r = store.inner.client.session_renew(&id, &key) => r,
                    _ = stop.cancelled() => return,
                };
                match renewed {
                    Ok(Some(adopted)) => {
                        last_ok = Instant::now();
                        if let Some(t) = adopted.filter(|t| !t.is_zero()) {
                            ttl_ms.store(t.as_millis() as u64, Ordering::Relaxed);
                        }
                        let ttl = Duration::from_millis(ttl_ms.load(Ordering::Relaxed));
                        next = last_ok + ttl / 2;
                    }
                    Ok(None) => {
                        tracing::debug!(lock = %key, "consul session is gone");
                        lost.cancel();
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(lock = %key, error = %e, "consul session renewal failed");
                        next = Instant::now() + (ttl / 10).max(Duration::from_millis(200));
                    }
                }
            }
        });
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
        s.stop.cancel();
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

    fn check_lock_args(name: &str, opts: &LockOptions) -> Result<()> {
        validate_lock_name(name)?;
        if opts.ttl < MIN_SESSION_TTL || opts.ttl > MAX_SESSION_TTL {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                NAME,
                format!(
                    "lock TTL {:?} is outside Consul's session TTL range of 10 s to 86400 s",
                    opts.ttl
                ),
            )
            .with_key(name));
        }
        Ok(())
    }

    /// One `lock` transaction (A4, A6): the result's ModifyIndex is the fencing token.
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
                        ErrorKind::Unavailable,
                        NAME,
                        format!("the lock's session expired while acquiring: {what}"),
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
        until: Option<Instant>,
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
        let wait = match until {
            Some(t) => t.saturating_duration_since(Instant::now()).min(MAX_BLOCK),
            None => MAX_BLOCK,
        };
        if wait.is_zero() {
            return Ok(());
        }
        tokio::select! {
            r = client.kv_get(key, false, Mode::Default, Some((index, wait))) => r.map(|_| ()),
            _ = session.lost.cancelled() => Ok(()),
        }
    }

    fn guard(&self, name: &str, key: String, session: Session, token: u64) -> LockGuard {
        let lost = session.lost.clone();
        self.spawn_monitor(key.clone(), &session, token);
        let handle = ConsulLock {
            store: self.clone(),
            key,
            session,
        };
        LockGuard::new(name, FencingToken::from_raw(token), lost, Box::new(handle))
    }

    /// While held: consistent blocking queries on the key; `lost` fires as soon as the key is
    /// gone or held by another session (A5 `monitorLock`).
    fn spawn_monitor(&self, key: String, session: &Session, mut index: u64) {
        let store = self.clone();
        let id = session.id.clone();
        let lost = session.lost.clone();
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
                            lost.cancel();
                            return;
                        }
                        index = if new_index < index { 1 } else { new_index };
                    }
                    Err(e) => {
                        // The renewer decides when failures mean loss (a whole TTL).
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

#[async_trait]
impl DistLock for ConsulStore {
    async fn lock(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        Self::check_lock_args(name, opts)?;
        let until = opts.wait.map(|w| Instant::now() + w);
        let key = self.lock_key(name);
        let session = Session::create(self, name, &key, opts.ttl).await?;
        let cleanup = SessionCleanup::new(self, session, &key);
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
        loop {
            if cleanup.session().lost.is_cancelled() {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    NAME,
                    "the session expired while waiting for the lock (renewals failed)",
                )
                .with_key(name));
            }
            match self.attempt(&key, &cleanup.session().id).await? {
                Attempt::Acquired(token) => {
                    let session = cleanup.disarm();
                    return Ok(self.guard(name, key, session, token));
                }
                Attempt::LockDelay => {
                    let mut nap = LOCK_DELAY_RETRY;
                    if let Some(t) = until {
                        let left = t.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(timeout());
                        }
                        nap = nap.min(left);
                    }
                    tokio::time::sleep(nap).await;
                }
                Attempt::Held => {
                    if until.is_some_and(|t| Instant::now() >= t) {
                        return Err(timeout());
                    }
                    self.wait_for_change(&key, cleanup.session(), until).await?;
                    if until.is_some_and(|t| Instant::now() >= t) {
                        // One last try at the deadline, then give up.
                        if let Attempt::Acquired(token) =
                            self.attempt(&key, &cleanup.session().id).await?
                        {
                            let session = cleanup.disarm();
                            return Ok(self.guard(name, key, session, token));
                        }
                        return Err(timeout());
                    }
                }
            }
        }
    }

    async fn try_lock(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>> {
        Self::check_lock_args(name, opts)?;
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
        let session = Session::create(self, name, &key, opts.ttl).await?;
        let cleanup = SessionCleanup::new(self, session, &key);
        match self.attempt(&key, &cleanup.session().id).await? {
            Attempt::Acquired(token) => {
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

#[async_trait]
impl LockHandle for ConsulLock {
    async fn release(self: Box<Self>) -> Result<()> {
        self.session.stop.cancel();
        let client = &self.store.inner.client;
        // Release first (an explicit release sets no lock-delay), then destroy (A3). The
        // release deletes the key if and only if our session still holds it.
        let released = release_key(&self.store, &self.key, &self.session.id).await;
        let destroyed = client.session_destroy(&self.session.id, &self.key).await;
        released?;
        destroyed
    }

    fn suspend_keep_alive(&self) {
        self.session.suspended.store(true, Ordering::SeqCst);
    }
}
