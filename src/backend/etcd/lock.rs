//! [`DistLock`] over etcd: the `concurrency.Mutex` algorithm of etcd's Go client (and so of
//! `etcdctl lock`), with one lease per client and TTL.
//!
//! Lock `N` is the set of keys under `<namespace>locks/N/`; each contender puts its own key
//! `<namespace>locks/N/<lease id in hex>` attached to its lease; the contender whose key has
//! the lowest create revision holds the lock; every other one waits for the deletion of the key
//! created just before its own. The holder's create revision is the fencing token.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, LeaseClient, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lockwatch::{Step, Subscription};
use super::{error, grant_lease, ttl_secs, EtcdStore, Inner, NAME};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{deadline_after, until, Lease, Renew, RenewPolicy, Renewal};
use crate::lock::{DistLock, FencingToken, LockGuard, LockHandle, LockOptions};

/// A lease shared by every lock of one client with one TTL, kept alive by the lease clock
/// ([`crate::lease`]): its deadline is the send time of the last keep-alive that etcd
/// answered, plus the TTL, minus the margin.
pub(crate) struct Session {
    pub(crate) id: i64,
    pub(crate) lease: Lease,
}

impl Session {
    /// Stops renewing this lease (fault tests): every lock on it is lost at its deadline.
    fn suspend(&self) {
        self.lease.suspend();
    }
}

/// Renews one etcd lease over a keep-alive stream, opened on the first renewal and again after
/// any failure (a stream whose answer did not come in time is never reused, so an answer is
/// always that of the keep-alive just sent).
struct Renewer {
    client: LeaseClient,
    id: i64,
    ttl: Duration,
    keeper: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
}

impl Renew for Renewer {
    fn renew(&mut self) -> Pin<Box<dyn Future<Output = Result<Renewal>> + Send + '_>> {
        Box::pin(async move {
            // Taken out for the attempt: an attempt dropped half-way leaves no stream behind.
            let mut keeper = self.keeper.take();
            let r = renew(&mut self.client, &mut keeper, self.id).await;
            match r {
                Ok(Some(secs)) => {
                    self.keeper = keeper;
                    let secs = u64::try_from(secs).unwrap_or(0);
                    // Opening a stream confirms the granted TTL without reporting it.
                    let ttl = if secs == 0 {
                        self.ttl
                    } else {
                        Duration::from_secs(secs)
                    };
                    Ok(Renewal::Confirmed(ttl))
                }
                Ok(None) => Ok(Renewal::Gone(format!(
                    "etcd lease {:x} expired or was revoked",
                    self.id
                ))),
                Err(e) => Err(error::map(e, "lease keep-alive")),
            }
        })
    }
}

/// One keep-alive round trip: `Some(ttl)` if renewed (`Some(0)`: renewed by opening a new
/// stream, whose first answer etcd-client checks but does not report), `None` if the lease no
/// longer exists.
async fn renew(
    lease: &mut LeaseClient,
    keeper: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    id: i64,
) -> std::result::Result<Option<i64>, etcd_client::Error> {
    let Some((k, stream)) = keeper.as_mut() else {
        // Opening the stream sends the first keep-alive and checks its answer.
        return match lease.keep_alive(id).await {
            Ok(k) => {
                *keeper = Some(k);
                Ok(Some(0))
            }
            Err(etcd_client::Error::LeaseKeepAliveError(msg)) if msg.contains("not found") => {
                Ok(None)
            }
            Err(e) => Err(e),
        };
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

impl Inner {
    /// The live session for a TTL of `secs` seconds, granting a lease if there is none.
    async fn session(self: &Arc<Self>, secs: i64, name: &str) -> Result<Arc<Session>> {
        let mut sessions = self.sessions.lock().await;
        if let Some(s) = sessions.get(&secs) {
            if !s.lease.is_lost() && !s.lease.is_stopped() {
                return Ok(s.clone());
            }
        }
        let sent = Instant::now();
        let id = grant_lease(self, secs, name).await?;
        let ttl = Duration::from_secs(u64::try_from(secs).unwrap_or(1));
        let renewer = Renewer {
            client: self.lease.clone(),
            id,
            ttl,
            keeper: None,
        };
        let policy = RenewPolicy {
            attempt_timeout: self.config.request_timeout,
        };
        let session = Arc::new(Session {
            id,
            lease: Lease::start(renewer, sent, ttl, policy),
        });
        tokio::spawn(revoke_on_shutdown(
            self.lease.clone(),
            self.config.request_timeout,
            id,
            session.lease.clone(),
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

    pub(crate) fn lock_dir(&self, name: &str) -> String {
        format!("{}{name}/", self.lock_prefix)
    }
}

/// Whether `key` is a contender key of the lock whose directory is `dir`: `dir` followed by a
/// lease id, with no further `/`. Keys of locks nested below (`dir` + `b/<lease>` for lock
/// `N/b`) share the prefix but are not contenders of this lock.
pub(crate) fn is_contender(dir: &str, key: &[u8]) -> bool {
    key.strip_prefix(dir.as_bytes())
        .is_some_and(|rest| !rest.is_empty() && !rest.contains(&b'/'))
}

/// Revokes the lease when the store is dropped (its last handle), and stops its clock.
async fn revoke_on_shutdown(
    mut client: LeaseClient,
    request_timeout: Duration,
    id: i64,
    lease: Lease,
    shutdown: CancellationToken,
) {
    let lost = lease.lost_token();
    tokio::select! {
        _ = shutdown.cancelled() => {
            lease.stop();
            let _ = tokio::time::timeout(request_timeout, client.revoke(id)).await;
        }
        _ = lost.cancelled() => {}
    }
}

/// A lock key that must be deleted, because the attempt or the lock it belonged to has ended,
/// while its lease may go on being renewed for other locks.
///
/// A plain delete of the key is enough, with no compare of its create revision (as etcd's own
/// `concurrency.Mutex` unlocks): a lock key is `<dir><lease id in hex>`, so only this client's
/// session on that lease ever creates it, and this client's attempts on one lock go through
/// its local queue one at a time, whose place every release and cleanup holds until the key is
/// gone. So when the delete is sent, the key is the ended hold's own or already gone. (A
/// cleanup that stops because the lease is lost gives the place back early; the next attempt
/// then grants a new lease, whose key has another name.)
struct Cleanup {
    key: String,
    name: String,
    /// The local queue (the contenders' directory) the place belongs to.
    queue: String,
    session: Option<Arc<Session>>,
    /// The local queue place, given back once the key is gone.
    local: Option<OwnedMutexGuard<()>>,
}

/// Deletes a lock key in the background, on the current runtime (or, from a thread without
/// one, on the store's), retrying until the delete succeeds or the key's lease is gone. A key
/// must never outlive its lock on a lease that is kept alive: if etcd refuses the delete for
/// good, the lease is given up (revoked and no longer renewed), which removes the key.
fn spawn_cleanup(inner: &Arc<Inner>, mut c: Cleanup) {
    let weak = Arc::downgrade(inner);
    // The current runtime first: a caller that drops an attempt on a runtime of its own (the
    // CLI, before it exits) waits for that runtime's tasks.
    let rt = tokio::runtime::Handle::try_current().unwrap_or_else(|_| inner.rt.clone());
    rt.spawn(async move {
        let mut backoff = Duration::from_millis(25);
        loop {
            let Some(inner) = weak.upgrade() else { return };
            if c.session.as_ref().is_some_and(|s| s.lease.is_lost()) {
                // The key dies with its lease, which is no longer renewed.
                break;
            }
            let r = delete_key(&inner, &c.key, &c.name).await;
            match r {
                Ok(()) => break,
                Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::InvalidArgument | ErrorKind::InvalidKey) => {
                    tracing::warn!(key = %c.key, error = %e, "cannot delete a lock key; giving up its lease");
                    if let Some(s) = &c.session {
                        s.lease.lose("a lock key on this lease could not be deleted");
                        s.lease.stop();
                        let id = s.id;
                        let _ = inner
                            .call("revoking a lease", None, || {
                                let mut lease = inner.lease.clone();
                                async move { lease.revoke(id).await }
                            })
                            .await;
                    }
                    break;
                }
                Err(e) => {
                    tracing::debug!(key = %c.key, error = %e, "deleting a lock key failed; retrying");
                    drop(inner);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        if let (Some(inner), Some(local)) = (weak.upgrade(), c.local.take()) {
            inner.leave_local(&c.queue, local);
        }
    });
}

/// A lock key put (or being put) by this client. An attempt that gives up (timeout) deletes it
/// with [`Enqueued::withdraw`] before returning; one whose future is dropped (cancellation)
/// deletes it in the background. Only then is the local queue left, so that the next local
/// attempt never meets the leftover key.
struct Enqueued {
    inner: Arc<Inner>,
    name: String,
    queue: String,
    key: String,
    session: Arc<Session>,
    local: Option<OwnedMutexGuard<()>>,
}

/// How long an attempt that gives up (timeout, `try_lock` behind others) waits for the
/// deletion of its key before returning; a deletion that takes longer goes on in the
/// background.
const WITHDRAW_GRACE: Duration = Duration::from_millis(250);

impl Enqueued {
    /// Gives back the local queue place without deleting anything (no key was put).
    fn into_local(mut self) -> Option<OwnedMutexGuard<()>> {
        self.local.take()
    }

    /// Deletes the key and leaves the local queue: waits up to [`WITHDRAW_GRACE`] for the
    /// delete, then leaves it to the background cleanup, which retries until it succeeds.
    async fn withdraw(mut self) {
        let done = tokio::time::timeout(
            WITHDRAW_GRACE,
            delete_key(&self.inner, &self.key, &self.name),
        )
        .await;
        match done {
            Ok(Ok(())) => {
                if let Some(g) = self.local.take() {
                    self.inner.leave_local(&self.queue, g);
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "withdrawing a lock attempt failed; retrying in the background");
            }
            Err(_) => {
                tracing::debug!("withdrawing a lock attempt is slow; finishing in the background");
            }
        }
        // Anything left (a failed or slow delete) goes to the background cleanup on drop.
    }
}

/// Background withdrawal, for an attempt whose future was dropped by the caller (cancelled),
/// that failed, or whose withdrawal did not finish within the grace.
impl Drop for Enqueued {
    fn drop(&mut self) {
        let Some(local) = self.local.take() else {
            return;
        };
        spawn_cleanup(
            &self.inner,
            Cleanup {
                key: std::mem::take(&mut self.key),
                name: self.name.clone(),
                queue: self.queue.clone(),
                session: Some(self.session.clone()),
                local: Some(local),
            },
        );
    }
}

/// Deletes `key`: one `DeleteRange` (see [`Cleanup`] for why it needs no compare).
async fn delete_key(inner: &Inner, key: &str, name: &str) -> Result<()> {
    inner
        .call("deleting a lock key", Some(name), || {
            let (mut kv, k) = (inner.kv.clone(), key.to_string());
            async move { kv.delete(k, None).await }
        })
        .await
        .map(|_| ())
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

/// A lock acquired by [`EtcdStore::acquire_in`]: its guard, own key, the key's create
/// revision and the lease it is attached to.
pub(crate) struct Held {
    pub(crate) guard: LockGuard,
    pub(crate) key: String,
    pub(crate) rev: i64,
    pub(crate) lease: i64,
}

pub(crate) fn rev_token(rev: i64) -> FencingToken {
    FencingToken::from_raw(u64::try_from(rev).unwrap_or(0))
}

impl EtcdStore {
    async fn acquire(
        &self,
        name: &str,
        opts: &LockOptions,
        try_only: bool,
    ) -> Result<Option<LockGuard>> {
        self.caps().check_lock(name, opts)?;
        let dir = self.inner.lock_dir(name);
        let held = self
            .acquire_in(&dir, name, Vec::new(), opts, try_only)
            .await?;
        Ok(held.map(|h| h.guard))
    }

    /// Acquires the lock whose contenders are the keys `<dir><lease hex>`, putting `value` as
    /// the own key's value: the lock of [`DistLock`] (directory `<namespace>locks/NAME/`,
    /// empty values) and the election of [`crate::Election`] (`<namespace>elections/NAME/`,
    /// the leader's value), which are etcd's `concurrency.Mutex` and `concurrency.Election`.
    /// `name` and `opts` are checked by the caller; `name` is shown in errors.
    pub(crate) async fn acquire_in(
        &self,
        dir: &str,
        name: &str,
        value: Vec<u8>,
        opts: &LockOptions,
        try_only: bool,
    ) -> Result<Option<Held>> {
        let secs = ttl_secs(opts.ttl, "lock", name)?;
        let deadline = match (try_only, opts.wait) {
            (false, w) => deadline_after(w),
            _ => None,
        };
        let queue = self.inner.local_queue(dir);
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
        self.acquire_remote(dir, name, value, secs, try_only, local, deadline, opts.wait)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn acquire_remote(
        &self,
        dir: &str,
        name: &str,
        value: Vec<u8>,
        secs: i64,
        try_only: bool,
        local: OwnedMutexGuard<()>,
        deadline: Option<Instant>,
        wait: Option<Duration>,
    ) -> Result<Option<Held>> {
        let inner = &self.inner;
        let dir = dir.to_string();
        let mut local = Some(local);
        let mut watch: Option<Subscription> = None;
        let mut retried = false;
        let (session, enq, my_key, my_rev, ahead) = loop {
            let session = match until(deadline, inner.session(secs, name)).await {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    if let Some(l) = local.take() {
                        inner.leave_local(&dir, l);
                    }
                    return Err(e);
                }
                None => {
                    if let Some(l) = local.take() {
                        inner.leave_local(&dir, l);
                    }
                    return Err(timed_out(name, wait));
                }
            };
            let my_key = format!("{dir}{:x}", session.id);
            let enq = Enqueued {
                inner: inner.clone(),
                name: name.to_string(),
                queue: dir.clone(),
                key: my_key.clone(),
                session: session.clone(),
                local: local.take(),
            };
            // Every deletion in the directory after our key is put must reach us: this
            // client's long-lived watch of the directory (no request), or, for the first
            // attempt, a new one opened at "now" and confirmed before enqueuing. See
            // `lockwatch` for why it is not opened per attempt.
            if watch.is_none() {
                watch = inner.subscribe_lock_watch(&dir);
            }
            if watch.is_none() {
                match until(deadline, inner.open_lock_watch(&dir, name)).await {
                    Some(w) => watch = Some(w?),
                    None => {
                        // Nothing put yet: only the local queue place is given back.
                        if let Some(l) = enq.into_local() {
                            inner.leave_local(&dir, l);
                        }
                        return Err(timed_out(name, wait));
                    }
                }
            }
            let enqueued = match until(
                deadline,
                self.enqueue(name, &dir, &my_key, &value, session.id),
            )
            .await
            {
                Some(r) => r,
                None => {
                    // The put may have landed: withdraw before answering.
                    enq.withdraw().await;
                    return Err(timed_out(name, wait));
                }
            };
            match enqueued {
                Ok((rev, ahead)) => break (session, enq, my_key, rev, ahead),
                // The lease vanished (revoked, or expired before the keep-alive noticed):
                // drop it and try once more with a new one.
                Err(e) if e.kind() == ErrorKind::LockLost && !retried => {
                    tracing::debug!(lock = name, error = %e, "lease gone; granting a new one");
                    session.lease.lose("etcd no longer knows the lease");
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
                enq.withdraw().await;
                return Ok(None);
            }
            // Returns only once our key is the oldest *and* still exists (the lesson of etcd
            // issue 11456: after waiting, the lease may have expired).
            let waited = until(
                deadline,
                self.wait_predecessors(name, &dir, &my_key, my_rev, ahead, &mut watch, &session),
            )
            .await;
            match waited {
                Some(r) => r?,
                None => {
                    // Give up: the own key is deleted before `Timeout` is returned, so the
                    // next contender does not wait for it.
                    enq.withdraw().await;
                    return Err(timed_out(name, wait));
                }
            }
        }
        if session.lease.is_lost() {
            return Err(lock_lost(
                name,
                "the lease was lost while acquiring the lock",
            ));
        }
        let lost = session.lease.lost_token().child_token();
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
        let lease = session.lease.clone();
        let lease_id = session.id;
        let handle = EtcdLockHandle {
            inner: inner.clone(),
            name: name.to_string(),
            queue: dir.clone(),
            key: my_key.clone(),
            session,
            stop,
            releasing,
            local,
        };
        Ok(Some(Held {
            guard: LockGuard::new(name, rev_token(my_rev), lost, Box::new(handle))
                .with_lease(&lease),
            key: my_key,
            rev: my_rev,
            lease: lease_id,
        }))
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
        value: &[u8],
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
                        value.to_vec(),
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
                        .filter(|kv| kv.create_revision() < my_rev && is_contender(dir, kv.key()))
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
            Some(TxnOpResponse::Get(g)) => g
                .kvs()
                .iter()
                .filter(|kv| is_contender(dir, kv.key()))
                .map(|kv| kv.key().to_vec())
                .collect(),
            _ => BTreeSet::new(),
        };
        Ok((ahead, as_of))
    }

    /// Waits until every key created before ours (`ahead`, as of revision `as_of`) is deleted,
    /// following the deletions in `watch` (this client's watch of the directory, subscribed to
    /// before our key was put, so it reports every deletion after `as_of`): no request per
    /// wake-up, and the handoff costs no round trip beyond the holder's delete. Returns only
    /// while our own key still exists (the lesson of etcd issue 11456): its deletion would be
    /// in the same, revision-ordered stream before the last predecessor's.
    #[allow(clippy::too_many_arguments)]
    async fn wait_predecessors(
        &self,
        name: &str,
        dir: &str,
        my_key: &str,
        my_rev: i64,
        mut ahead: BTreeSet<Vec<u8>>,
        watch: &mut Subscription,
        session: &Session,
    ) -> Result<()> {
        let mut as_of = my_rev;
        let lease_lost = session.lease.lost_token();
        while !ahead.is_empty() {
            // A lease that cannot be renewed (etcd unreachable for a whole TTL) ends the wait.
            let step = tokio::select! {
                _ = lease_lost.cancelled() => {
                    return Err(lock_lost(
                        name,
                        "the lease could not be kept alive while waiting for the lock",
                    ));
                }
                step = watch.next() => step,
            };
            match step {
                None => {
                    return Err(Error::new(
                        ErrorKind::Backend,
                        NAME,
                        "the lock watch ended (the client is shutting down)",
                    )
                    .with_key(name));
                }
                Some(Step::Resynced) => {
                    (ahead, as_of) = self.read_queue(name, dir, my_key, my_rev).await?;
                }
                Some(Step::Deletes(deleted)) => {
                    for d in deleted.iter() {
                        if d.rev <= as_of {
                            continue;
                        }
                        if d.key == my_key.as_bytes() {
                            return Err(own_key_gone(name));
                        }
                        ahead.remove(&d.key);
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
    mut watch: Subscription,
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
            s = watch.next() => s,
        };
        let Some(step) = step else {
            return; // the client is shutting down
        };
        match step {
            Step::Deletes(deleted) => {
                let gone = deleted
                    .iter()
                    .any(|d| d.key == my_key.as_bytes() && d.rev > my_rev);
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
    queue: String,
    key: String,
    session: Arc<Session>,
    stop: CancellationToken,
    releasing: Arc<AtomicBool>,
    local: Option<OwnedMutexGuard<()>>,
}

impl EtcdLockHandle {
    /// Hands the deletion of the own key to the background cleanup (with the local queue
    /// place, given back once the key is gone).
    fn clean_up_later(&mut self) {
        self.stop.cancel();
        if self.key.is_empty() {
            return;
        }
        spawn_cleanup(
            &self.inner,
            Cleanup {
                key: std::mem::take(&mut self.key),
                name: self.name.clone(),
                queue: self.queue.clone(),
                session: Some(self.session.clone()),
                local: self.local.take(),
            },
        );
    }
}

#[async_trait]
impl LockHandle for EtcdLockHandle {
    async fn release(mut self: Box<Self>) -> Result<()> {
        // The monitor (and its watch) stays until the delete is done: cancelling a watch while
        // the delete is in flight measurably slows the delete on a busy etcd.
        self.releasing.store(true, Ordering::SeqCst);
        // One plain delete, the raw recipe's (see `Cleanup` for why no compare is needed).
        let r = delete_key(&self.inner, &self.key, &self.name).await;
        if r.is_ok() {
            self.key.clear();
            self.stop.cancel();
            if let Some(g) = self.local.take() {
                self.inner.leave_local(&self.queue, g);
            }
        }
        // On failure, dropping the handle hands the delete to the background cleanup: the key
        // must not outlive the lock on a lease that goes on being renewed.
        r
    }

    fn release_detached(self: Box<Self>) {
        // Dropping hands the delete to the background cleanup, which needs no runtime here.
        drop(self);
    }

    fn suspend_keep_alive(&self, _lost: &CancellationToken) {
        self.session.suspend();
    }
}

impl Drop for EtcdLockHandle {
    fn drop(&mut self) {
        self.clean_up_later();
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
crate::recipes_via_lock!(EtcdStore);
