//! [`DistLock`] over etcd: the `concurrency.Mutex` algorithm of etcd's Go client (and so of
//! `etcdctl lock`), with one lease per client and TTL.
//!
//! Lock `N` is the set of keys under `<namespace>locks/N/`; each contender puts its own key
//! `<namespace>locks/N/<lease id in hex>` attached to its lease; the contender whose key has
//! the lowest create revision holds the lock; every other one waits for the deletion of the key
//! created just before its own. The holder's create revision is the fencing token.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, LeaseClient, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::kv::{classify, open_watch, RawEvent};
use super::{error, grant_lease, ttl_secs, EtcdStore, Inner, NAME};
use crate::error::{Error, ErrorKind, Result};
use crate::key::validate_lock_name;
use crate::lock::{DistLock, FencingToken, LockGuard, LockHandle, LockOptions};

/// A lease shared by every lock of one client with one TTL, kept alive in the background.
pub(crate) struct Session {
    pub(crate) id: i64,
    ttl: Duration,
    /// Cancelled when the lease is gone or may be gone (keep-alive answered TTL 0, or no
    /// renewal succeeded for a whole TTL).
    pub(crate) lost: CancellationToken,
    suspended: AtomicBool,
}

impl Session {
    /// Stops renewing this lease (fault tests): every lock on it is lost after the TTL.
    fn suspend(&self) {
        self.suspended.store(true, Ordering::SeqCst);
    }
}

impl Inner {
    /// The live session for a TTL of `secs` seconds, granting a lease if there is none.
    async fn session(self: &Arc<Self>, secs: i64, name: &str) -> Result<Arc<Session>> {
        let mut sessions = self.sessions.lock().await;
        if let Some(s) = sessions.get(&secs) {
            if !s.lost.is_cancelled() {
                return Ok(s.clone());
            }
        }
        let id = grant_lease(self, secs, name).await?;
        let ttl = Duration::from_secs(u64::try_from(secs).unwrap_or(1));
        let session = Arc::new(Session {
            id,
            ttl,
            lost: CancellationToken::new(),
            suspended: AtomicBool::new(false),
        });
        tokio::spawn(keep_alive(
            self.lease.clone(),
            self.config.request_timeout,
            session.clone(),
            self.shutdown.clone(),
        ));
        sessions.insert(secs, session.clone());
        Ok(session)
    }

    /// This client's FIFO queue for lock `name`.
    fn local_queue(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.local.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }

    /// Leaves the local queue of `name`, forgetting it when nobody else is in it.
    fn leave_local(&self, name: &str, guard: OwnedMutexGuard<()>) {
        drop(guard);
        let mut map = self.local.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(name).is_some_and(|q| Arc::strong_count(q) == 1) {
            map.remove(name);
        }
    }

    fn lock_dir(&self, name: &str) -> String {
        format!("{}{name}/", self.lock_prefix)
    }
}

/// Renews `session` every third of its TTL until the store is dropped (then revokes it) or
/// the lease is lost.
async fn keep_alive(
    mut lease: LeaseClient,
    request_timeout: Duration,
    session: Arc<Session>,
    shutdown: CancellationToken,
) {
    let ttl = session.ttl;
    let period = ttl / 3;
    let mut last_ok = Instant::now();
    let mut keeper: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    let mut next = Instant::now() + period;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let id = session.id;
                let _ = tokio::time::timeout(request_timeout, lease.revoke(id)).await;
                session.lost.cancel();
                return;
            }
            _ = session.lost.cancelled() => return,
            _ = tokio::time::sleep_until(next.min(last_ok + ttl)) => {}
        }
        if last_ok.elapsed() >= ttl {
            tracing::warn!(
                lease = session.id,
                "etcd lease not renewed for its TTL; locks on it are lost"
            );
            session.lost.cancel();
            return;
        }
        if session.suspended.load(Ordering::SeqCst) {
            next = Instant::now() + period;
            continue;
        }
        let sent = Instant::now();
        let bound = request_timeout.min(ttl);
        let renewed = tokio::time::timeout(bound, renew(&mut lease, &mut keeper, session.id)).await;
        match renewed {
            Ok(Ok(Some(_))) => {
                last_ok = sent;
                next = sent + period;
            }
            Ok(Ok(None)) => {
                tracing::warn!(
                    lease = session.id,
                    "etcd lease expired; locks on it are lost"
                );
                session.lost.cancel();
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(lease = session.id, error = %e, "etcd lease keep-alive failed");
                keeper = None;
                next = Instant::now() + period.min(Duration::from_millis(300));
            }
            Err(_) => {
                keeper = None;
                next = Instant::now();
            }
        }
    }
}

/// One keep-alive round trip: `Some(ttl)` if renewed, `None` if the lease no longer exists.
async fn renew(
    lease: &mut LeaseClient,
    keeper: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    id: i64,
) -> std::result::Result<Option<i64>, etcd_client::Error> {
    if keeper.is_none() {
        // Opening the stream sends the first keep-alive and checks its answer.
        return match lease.keep_alive(id).await {
            Ok(k) => {
                *keeper = Some(k);
                Ok(Some(1))
            }
            Err(etcd_client::Error::LeaseKeepAliveError(msg)) if msg.contains("not found") => {
                Ok(None)
            }
            Err(e) => Err(e),
        };
    }
    let Some((k, stream)) = keeper.as_mut() else {
        return Ok(None);
    };
    k.keep_alive().await?;
    match stream.message().await? {
        Some(resp) if resp.ttl() > 0 => Ok(Some(resp.ttl())),
        Some(_) => Ok(None),
        None => Err(etcd_client::Error::LeaseKeepAliveError(
            "keep-alive stream closed".into(),
        )),
    }
}

/// A lock key put (or being put) by this client. An attempt that gives up (timeout) deletes it
/// with [`Enqueued::withdraw`] before returning; one whose future is dropped (cancellation)
/// deletes it in the background. Only then is the local queue left, so that the next local
/// attempt never meets the leftover key.
struct Enqueued {
    inner: Arc<Inner>,
    name: String,
    key: String,
    local: Option<OwnedMutexGuard<()>>,
}

impl Enqueued {
    /// Gives back the local queue place without deleting anything (no key was put).
    fn into_local(mut self) -> Option<OwnedMutexGuard<()>> {
        self.local.take()
    }

    /// Deletes the key now and leaves the local queue.
    async fn withdraw(mut self) -> Result<()> {
        let r = delete_key(&self.inner, &self.key, &self.name).await;
        if let Some(g) = self.local.take() {
            self.inner.leave_local(&self.name, g);
        }
        r
    }

    /// [`Enqueued::withdraw`] for an abandoned attempt, whose own error is what the caller
    /// reports: a failed delete is only logged (the lease's expiry removes the key).
    async fn withdraw_quietly(self) {
        if let Err(e) = self.withdraw().await {
            tracing::debug!(error = %e, "withdrawing an abandoned lock attempt failed");
        }
    }
}

/// Background withdrawal, for an attempt whose future was dropped by the caller (cancelled):
/// an attempt that gives up by itself (timeout) withdraws before it returns.
impl Drop for Enqueued {
    fn drop(&mut self) {
        let Some(local) = self.local.take() else {
            return;
        };
        let inner = self.inner.clone();
        let (key, name) = (self.key.clone(), self.name.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = delete_key(&inner, &key, &name).await {
                        tracing::debug!(error = %e, "withdrawing an abandoned lock attempt failed");
                    }
                    inner.leave_local(&name, local);
                });
            }
            Err(_) => inner.leave_local(&name, local),
        }
    }
}

async fn delete_key(inner: &Inner, key: &str, name: &str) -> Result<()> {
    inner
        .call("deleting a lock key", Some(name), || {
            let (mut kv, k) = (inner.kv.clone(), key.to_string());
            async move { kv.delete(k, None).await }
        })
        .await
        .map(|_| ())
}

/// A watch on a lock's directory that survives broken streams: after a reconnect it says
/// `Resynced`, and the caller re-reads the state it depends on.
struct DirWatch {
    stream: etcd_client::WatchStream,
    dir: String,
    name: String,
}

enum Step {
    Events(Vec<RawEvent>),
    Resynced,
}

impl DirWatch {
    async fn open(inner: &Inner, dir: &str, name: &str) -> Result<DirWatch> {
        let (stream, _) = open_watch(inner, dir, 0, name, true).await?;
        Ok(DirWatch {
            stream,
            dir: dir.to_string(),
            name: name.to_string(),
        })
    }

    async fn next(&mut self, inner: &Inner) -> Step {
        match self.stream.message().await {
            Ok(Some(resp)) if !resp.canceled() => {
                return Step::Events(resp.events().iter().filter_map(classify).collect())
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(lock = %self.name, error = %error::map(e, "lock watch"), "lock watch broke; reopening");
            }
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            match open_watch(inner, &self.dir, 0, &self.name, true).await {
                Ok((s, _)) => {
                    self.stream = s;
                    return Step::Resynced;
                }
                Err(e) => {
                    tracing::debug!(lock = %self.name, error = %e, "reopening the lock watch failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Runs `fut` until `deadline`: `None` if the deadline passed first (`fut` is then dropped).
async fn until<F: std::future::Future>(deadline: Option<Instant>, fut: F) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

fn timed_out(name: &str, wait: Option<Duration>) -> Error {
    Error::new(
        ErrorKind::Timeout,
        NAME,
        format!(
            "the lock was not acquired within {:?}",
            wait.unwrap_or_default()
        ),
    )
    .with_key(name)
}

fn first_kv(r: &TxnOpResponse) -> Option<&KeyValue> {
    match r {
        TxnOpResponse::Get(g) => g.kvs().first(),
        _ => None,
    }
}

fn lock_lost(name: &str, msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::LockLost, NAME, msg).with_key(name)
}

fn rev_token(rev: i64) -> FencingToken {
    FencingToken::from_raw(u64::try_from(rev).unwrap_or(0))
}

impl EtcdStore {
    async fn acquire(
        &self,
        name: &str,
        opts: &LockOptions,
        try_only: bool,
    ) -> Result<Option<LockGuard>> {
        validate_lock_name(name)?;
        let secs = ttl_secs(opts.ttl, "lock", name)?;
        let deadline = match (try_only, opts.wait) {
            (false, Some(w)) => Some(Instant::now() + w),
            _ => None,
        };
        let queue = self.inner.local_queue(name);
        let local = if try_only {
            match queue.try_lock_owned() {
                Ok(g) => g,
                Err(_) => return Ok(None),
            }
        } else {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, queue.lock_owned())
                    .await
                    .map_err(|_| timed_out(name, opts.wait))?,
                None => queue.lock_owned().await,
            }
        };
        // The deadline is applied inside, where a key put by this attempt can be withdrawn
        // before `Timeout` is returned.
        self.acquire_remote(name, secs, try_only, local, deadline, opts.wait)
            .await
    }

    async fn acquire_remote(
        &self,
        name: &str,
        secs: i64,
        try_only: bool,
        local: OwnedMutexGuard<()>,
        deadline: Option<Instant>,
        wait: Option<Duration>,
    ) -> Result<Option<LockGuard>> {
        let inner = &self.inner;
        let dir = inner.lock_dir(name);
        let mut local = Some(local);
        let mut watch: Option<DirWatch> = None;
        let mut retried = false;
        let (session, enq, my_key, my_rev, ahead) = loop {
            let session = match until(deadline, inner.session(secs, name)).await {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    if let Some(l) = local.take() {
                        inner.leave_local(name, l);
                    }
                    return Err(e);
                }
                None => {
                    if let Some(l) = local.take() {
                        inner.leave_local(name, l);
                    }
                    return Err(timed_out(name, wait));
                }
            };
            let my_key = format!("{dir}{:x}", session.id);
            let enq = Enqueued {
                inner: inner.clone(),
                name: name.to_string(),
                key: my_key.clone(),
                local: local.take(),
            };
            // Watch the directory from "now" before enqueuing: the watch is in etcd's synced
            // group, so the predecessor's DELETE reaches us at once (a watch from a past
            // revision waits for etcd's 100 ms catch-up loop).
            if watch.is_none() {
                match until(deadline, DirWatch::open(inner, &dir, name)).await {
                    Some(w) => watch = Some(w?),
                    None => {
                        // Nothing put yet: only the local queue place is given back.
                        if let Some(l) = enq.into_local() {
                            inner.leave_local(name, l);
                        }
                        return Err(timed_out(name, wait));
                    }
                }
            }
            let enqueued =
                match until(deadline, self.enqueue(name, &dir, &my_key, session.id)).await {
                    Some(r) => r,
                    None => {
                        // The put may have landed: withdraw before answering.
                        enq.withdraw_quietly().await;
                        return Err(timed_out(name, wait));
                    }
                };
            match enqueued {
                Ok((rev, ahead)) => break (session, enq, my_key, rev, ahead),
                // The lease vanished (revoked, or expired before the keep-alive noticed):
                // drop it and try once more with a new one.
                Err(e) if e.kind() == ErrorKind::LockLost && !retried => {
                    tracing::debug!(lock = name, error = %e, "lease gone; granting a new one");
                    session.lost.cancel();
                    retried = true;
                    local = enq.into_local();
                }
                Err(e) => return Err(e),
            }
        };
        let Some(mut watch) = watch else {
            return Err(Error::new(ErrorKind::Backend, NAME, "lock watch missing").with_key(name));
        };
        if !ahead.is_empty() {
            if try_only {
                enq.withdraw().await?;
                return Ok(None);
            }
            // Returns only once our key is the oldest *and* still exists (the lesson of etcd
            // issue 11456: after waiting, the lease may have expired).
            let waited = until(
                deadline,
                self.wait_predecessors(name, &my_key, my_rev, ahead, &mut watch, &session),
            )
            .await;
            match waited {
                Some(r) => r?,
                None => {
                    // Give up: the own key is deleted before `Timeout` is returned, so the
                    // next contender does not wait for it.
                    enq.withdraw_quietly().await;
                    return Err(timed_out(name, wait));
                }
            }
        }
        if session.lost.is_cancelled() {
            return Err(lock_lost(
                name,
                "the lease was lost while acquiring the lock",
            ));
        }
        let lost = session.lost.child_token();
        let stop = CancellationToken::new();
        let releasing = Arc::new(AtomicBool::new(false));
        tokio::spawn(monitor(
            inner.clone(),
            watch,
            my_key.clone(),
            my_rev,
            lost.clone(),
            stop.clone(),
            releasing.clone(),
        ));
        let mut enq = enq;
        let local = enq.local.take();
        let handle = EtcdLockHandle {
            inner: inner.clone(),
            name: name.to_string(),
            key: my_key,
            rev: my_rev,
            session,
            stop,
            releasing,
            local,
        };
        Ok(Some(LockGuard::new(
            name,
            rev_token(my_rev),
            lost,
            Box::new(handle),
        )))
    }

    /// Puts the own key (unless it exists) and, in the same transaction, reads the queue.
    /// Returns the key's create revision and the keys created before it (the contenders
    /// ahead). A leftover own key (a release that could not reach etcd) is deleted and put
    /// again, so each acquisition gets a new revision.
    async fn enqueue(
        &self,
        name: &str,
        dir: &str,
        my_key: &str,
        lease: i64,
    ) -> Result<(i64, BTreeSet<Vec<u8>>)> {
        let inner = &self.inner;
        for _ in 0..3 {
            let txn = Txn::new()
                .when(vec![Compare::create_revision(
                    my_key.to_string(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then(vec![
                    TxnOp::put(
                        my_key.to_string(),
                        Vec::new(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    TxnOp::get(
                        dir.to_string(),
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    ),
                ]);
            let resp = inner
                .call("enqueuing for the lock", Some(name), || {
                    let (mut kv, t) = (inner.kv.clone(), txn.clone());
                    async move { kv.txn(t).await }
                })
                .await?;
            if resp.succeeded() {
                let my_rev = resp.header().map(|h| h.revision()).ok_or_else(|| {
                    Error::new(ErrorKind::Backend, NAME, "etcd sent no header").with_key(name)
                })?;
                let ahead = match resp.op_responses().get(1) {
                    Some(TxnOpResponse::Get(g)) => g
                        .kvs()
                        .iter()
                        .filter(|kv| kv.create_revision() < my_rev)
                        .map(|kv| kv.key().to_vec())
                        .collect(),
                    _ => {
                        return Err(Error::new(
                            ErrorKind::Backend,
                            NAME,
                            "etcd's lock transaction lacked its read",
                        )
                        .with_key(name))
                    }
                };
                return Ok((my_rev, ahead));
            }
            tracing::debug!(lock = name, "deleting a leftover own lock key");
            delete_key(inner, my_key, name).await?;
        }
        Err(Error::new(
            ErrorKind::Backend,
            NAME,
            "could not put the own lock key (it kept reappearing)",
        )
        .with_key(name))
    }

    /// Reads, in one snapshot, the keys created before ours and whether ours still exists;
    /// returns them with the snapshot's revision.
    async fn read_queue(
        &self,
        name: &str,
        dir: &str,
        my_key: &str,
        my_rev: i64,
    ) -> Result<(BTreeSet<Vec<u8>>, i64)> {
        let inner = &self.inner;
        let txn = Txn::new().and_then(vec![
            TxnOp::get(
                dir.to_string(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_max_create_revision(my_rev - 1),
                ),
            ),
            TxnOp::get(my_key.to_string(), None),
        ]);
        let resp = inner
            .call("reading the lock queue", Some(name), || {
                let (mut kv, t) = (inner.kv.clone(), txn.clone());
                async move { kv.txn(t).await }
            })
            .await?;
        let as_of = resp.header().map(|h| h.revision()).unwrap_or(0);
        let ops = resp.op_responses();
        let mine = ops.get(1).and_then(first_kv).map(|kv| kv.create_revision());
        if mine != Some(my_rev) {
            return Err(own_key_gone(name));
        }
        let ahead = match ops.first() {
            Some(TxnOpResponse::Get(g)) => g.kvs().iter().map(|kv| kv.key().to_vec()).collect(),
            _ => BTreeSet::new(),
        };
        Ok((ahead, as_of))
    }

    /// Waits until every key created before ours (`ahead`, as of revision `as_of`) is deleted,
    /// following the deletions in `watch` (which was created before our key, so it holds
    /// every deletion after `as_of`): no request per wake-up, and the handoff costs no round
    /// trip beyond the holder's delete. Returns only while our own key still exists (the
    /// lesson of etcd issue 11456): its deletion would be in the same, revision-ordered stream
    /// before the last predecessor's.
    async fn wait_predecessors(
        &self,
        name: &str,
        my_key: &str,
        my_rev: i64,
        mut ahead: BTreeSet<Vec<u8>>,
        watch: &mut DirWatch,
        session: &Session,
    ) -> Result<()> {
        let inner = &self.inner;
        let dir = inner.lock_dir(name);
        let mut as_of = my_rev;
        while !ahead.is_empty() {
            // A lease that cannot be renewed (etcd unreachable for a whole TTL) ends the wait.
            let step = tokio::select! {
                _ = session.lost.cancelled() => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        NAME,
                        "the lease could not be kept alive while waiting for the lock",
                    )
                    .with_key(name));
                }
                step = watch.next(inner) => step,
            };
            match step {
                Step::Resynced => {
                    (ahead, as_of) = self.read_queue(name, &dir, my_key, my_rev).await?;
                }
                Step::Events(events) => {
                    for ev in events {
                        let RawEvent::Delete(kv) = ev else { continue };
                        if kv.mod_revision() <= as_of {
                            continue;
                        }
                        if kv.key() == my_key.as_bytes() {
                            return Err(own_key_gone(name));
                        }
                        ahead.remove(kv.key());
                    }
                }
            }
        }
        Ok(())
    }
}

fn own_key_gone(name: &str) -> Error {
    lock_lost(
        name,
        "the own lock key vanished while waiting (the lease expired or the key was deleted)",
    )
}

/// Watches a held lock's own key: fires `lost` when someone else deletes it (or its lease
/// expires); ends on `stop` (release).
async fn monitor(
    inner: Arc<Inner>,
    mut watch: DirWatch,
    my_key: String,
    my_rev: i64,
    lost: CancellationToken,
    stop: CancellationToken,
    releasing: Arc<AtomicBool>,
) {
    loop {
        let step = tokio::select! {
            _ = stop.cancelled() => return,
            _ = lost.cancelled() => return,
            s = watch.next(&inner) => s,
        };
        match step {
            Step::Events(events) => {
                let gone = events.iter().any(|ev| {
                    matches!(ev, RawEvent::Delete(kv)
                        if kv.key() == my_key.as_bytes() && kv.mod_revision() > my_rev)
                });
                if gone && releasing.load(Ordering::SeqCst) {
                    return; // our own release
                }
                if gone {
                    tracing::warn!(key = %my_key, "etcd lock key deleted; the lock is lost");
                    lost.cancel();
                    return;
                }
            }
            Step::Resynced => {
                // Events may have been missed: read the own key.
                let r = inner
                    .call("checking the lock key", None, || {
                        let (mut kv, k) = (inner.kv.clone(), my_key.clone());
                        async move { kv.get(k, None).await }
                    })
                    .await;
                if let Ok(resp) = r {
                    let still = resp
                        .kvs()
                        .first()
                        .is_some_and(|kv| kv.create_revision() == my_rev);
                    if !still {
                        lost.cancel();
                        return;
                    }
                }
            }
        }
    }
}

/// The backend side of a held etcd lock.
struct EtcdLockHandle {
    inner: Arc<Inner>,
    name: String,
    key: String,
    rev: i64,
    session: Arc<Session>,
    stop: CancellationToken,
    releasing: Arc<AtomicBool>,
    local: Option<OwnedMutexGuard<()>>,
}

impl EtcdLockHandle {
    async fn delete_own(&self) -> Result<()> {
        // Delete only our own incarnation of the key.
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                self.rev,
            )])
            .and_then(vec![TxnOp::delete(
                self.key.clone(),
                Some(DeleteOptions::new()),
            )]);
        self.inner
            .call("releasing the lock", Some(&self.name), || {
                let (mut kv, t) = (self.inner.kv.clone(), txn.clone());
                async move { kv.txn(t).await }
            })
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl LockHandle for EtcdLockHandle {
    async fn release(mut self: Box<Self>) -> Result<()> {
        // The monitor (and its watch) stays until the delete is done: cancelling a watch while
        // the delete is in flight measurably slows the delete on a busy etcd.
        self.releasing.store(true, Ordering::SeqCst);
        let r = self.delete_own().await;
        self.stop.cancel();
        if let Some(g) = self.local.take() {
            self.inner.leave_local(&self.name, g);
        }
        r
    }

    fn suspend_keep_alive(&self) {
        self.session.suspend();
    }
}

impl Drop for EtcdLockHandle {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(g) = self.local.take() {
            self.inner.leave_local(&self.name, g);
        }
    }
}

#[async_trait]
impl DistLock for EtcdStore {
    async fn lock(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        match self.acquire(name, opts, false).await? {
            Some(g) => Ok(g),
            None => Err(Error::new(
                ErrorKind::Backend,
                NAME,
                "lock attempt ended without the lock",
            )
            .with_key(name)),
        }
    }

    async fn try_lock(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>> {
        self.acquire(name, opts, true).await
    }
}
