//! `DistLock` for the embedded backends (`sqlite://`, `file://`): a lock is a lease record
//! (holder, fencing token, expiry on the host clock) that a backend grants, renews and ends in
//! short critical sections of its own ([`LeaseRecords`]); everything else — the wait, the
//! wake-ups, the lease clock, the guard — is here, once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::host_clock::HostClock;
use crate::caps::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{deadline_after, until, Lease, Renew, RenewPolicy, Renewal};
use crate::lock::{FencingToken, LockGuard, LockHandle, LockOptions};

/// What a grant attempt found: `Ok(token)` if the lock was free (or its lease had run out) and
/// is now the caller's, else `Err(expiry)` of the current holder's lease (host clock ms).
pub(crate) type Attempt = std::result::Result<u64, i64>;

/// A backend's lease records.
#[async_trait]
pub(crate) trait LeaseRecords: Send + Sync + 'static {
    /// The backend's name, for errors.
    fn backend(&self) -> &'static str;
    /// The host clock the expiries are written in.
    fn clock(&self) -> &HostClock;
    /// How long one renewal may take before it counts as failed.
    fn attempt_timeout(&self) -> Duration;
    /// How long a waiter goes at most without a look when no notification came.
    fn recheck(&self) -> Duration;
    /// What wakes the waiters of `name` when its record may have changed.
    fn changes(&self, name: &str) -> Arc<Notify>;
    /// One grant attempt for `holder`, its expiry `ttl` from now; a new token with a grant.
    async fn grant(self: Arc<Self>, name: String, holder: String, ttl: Duration)
        -> Result<Attempt>;
    /// Pushes the expiry `ttl` past now if the record is still `(holder, token)`'s and live;
    /// whether it was.
    async fn renew(
        self: Arc<Self>,
        name: String,
        holder: String,
        token: u64,
        ttl: Duration,
    ) -> Result<bool>;
    /// Ends the hold `(holder, token)` if it is still the current one.
    async fn end(self: Arc<Self>, name: String, holder: String, token: u64) -> Result<()>;
}

/// One attempt, run to its end even if the caller goes away: a grant nobody received is ended
/// at once.
async fn try_once<R: LeaseRecords>(
    records: &Arc<R>,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<Attempt> {
    let (tx, rx) = oneshot::channel();
    let r = records.clone();
    let (n, h) = (name.to_string(), holder.to_string());
    tokio::spawn(async move {
        let out = r.clone().grant(n.clone(), h.clone(), ttl).await;
        if let Err(Ok(Ok(token))) = tx.send(out) {
            let _ = r.end(n, h, token).await;
        }
    });
    rx.await.map_err(|_| {
        Error::new(
            ErrorKind::Backend,
            records.backend(),
            "the lock attempt was dropped",
        )
    })?
}

/// Takes the lock `name`: waits (within `opts.wait`) unless `try_only`, in which case a held
/// lock gives `None`.
pub(crate) async fn acquire<R: LeaseRecords>(
    records: &Arc<R>,
    caps: &Capabilities,
    name: &str,
    opts: &LockOptions,
    try_only: bool,
) -> Result<Option<LockGuard>> {
    caps.check_lock(name, opts)?;
    let deadline = if try_only {
        None
    } else {
        deadline_after(opts.wait)
    };
    let holder = uuid::Uuid::new_v4().to_string();
    let changes = records.changes(name);
    let mut first = true;
    loop {
        // Enabled before the attempt: a change after it wakes this task.
        let changed = changes.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let sent = Instant::now();
        let attempt = try_once(records, name, &holder, opts.ttl);
        // The first attempt runs to its end (bounded by the backend's own timeout), so that a
        // zero wait still tries once.
        let outcome = if std::mem::take(&mut first) {
            Some(attempt.await)
        } else {
            until(deadline, attempt).await
        };
        let expiry = match outcome {
            Some(r) => match r.map_err(|e| e.with_key(name))? {
                Ok(token) => return Ok(Some(guard(records, name, holder, token, sent, opts.ttl))),
                Err(expiry) => Some(expiry),
            },
            None => None,
        };
        if try_only {
            return Ok(None);
        }
        // Held: try again when the record may have changed, when the holder's lease runs out,
        // or after `recheck`, within the wait.
        let wake = async {
            let left = expiry.map_or(Duration::ZERO, |at| {
                Duration::from_millis((at - records.clock().now_ms()).max(0) as u64)
            });
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(left.min(records.recheck())) => {}
            }
        };
        if expiry.is_none() || until(deadline, wake).await.is_none() {
            return Err(Error::new(
                ErrorKind::Timeout,
                records.backend(),
                format!(
                    "the lock was not acquired within {:?}",
                    opts.wait.unwrap_or_default()
                ),
            )
            .with_key(name));
        }
    }
}

/// [`acquire`] for `DistLock::lock`.
pub(crate) async fn lock<R: LeaseRecords>(
    records: &Arc<R>,
    caps: &Capabilities,
    name: &str,
    opts: &LockOptions,
) -> Result<LockGuard> {
    match acquire(records, caps, name, opts, false).await? {
        Some(g) => Ok(g),
        None => Err(Error::new(
            ErrorKind::Timeout,
            records.backend(),
            "the lock was not acquired",
        )
        .with_key(name)),
    }
}

fn guard<R: LeaseRecords>(
    records: &Arc<R>,
    name: &str,
    holder: String,
    token: u64,
    sent: Instant,
    ttl: Duration,
) -> LockGuard {
    let hold = Hold {
        records: records.clone(),
        name: name.to_string(),
        holder,
        token,
    };
    let renewer = Renewer {
        hold: hold.clone(),
        ttl,
    };
    let policy = RenewPolicy {
        attempt_timeout: records.attempt_timeout(),
    };
    let lease = Lease::start(renewer, sent, ttl, policy);
    let handle = Handle {
        hold,
        lease: lease.clone(),
    };
    LockGuard::new(
        name,
        FencingToken::from_raw(token),
        lease.lost_token().child_token(),
        Box::new(handle),
    )
    .with_lease(&lease)
}

/// One hold of a lock: whose record it is.
struct Hold<R> {
    records: Arc<R>,
    name: String,
    holder: String,
    token: u64,
}

impl<R> Clone for Hold<R> {
    fn clone(&self) -> Self {
        Hold {
            records: self.records.clone(),
            name: self.name.clone(),
            holder: self.holder.clone(),
            token: self.token,
        }
    }
}

struct Renewer<R> {
    hold: Hold<R>,
    ttl: Duration,
}

impl<R: LeaseRecords> Renew for Renewer<R> {
    fn renew(&mut self) -> Pin<Box<dyn Future<Output = Result<Renewal>> + Send + '_>> {
        let h = self.hold.clone();
        let ttl = self.ttl;
        Box::pin(async move {
            let renewed = h.records.renew(h.name, h.holder, h.token, ttl).await?;
            Ok(if renewed {
                Renewal::Confirmed(ttl)
            } else {
                Renewal::Gone("the lease record expired or another holder took the lock".into())
            })
        })
    }
}

struct Handle<R> {
    hold: Hold<R>,
    lease: Lease,
}

#[async_trait]
impl<R: LeaseRecords> LockHandle for Handle<R> {
    async fn release(self: Box<Self>) -> Result<()> {
        self.lease.stop();
        let h = self.hold.clone();
        h.records
            .end(h.name, h.holder, h.token)
            .await
            .map_err(|e| e.with_key(&self.hold.name))
    }

    fn suspend_keep_alive(&self, _lost: &CancellationToken) {
        self.lease.suspend();
    }
}
