//! `DistLock` for [`SqliteStore`]: lease rows in `coordkit_locks` (holder, fencing token,
//! expiry on the host clock), granted and renewed in write transactions.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Transaction};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{bump, map_err, HostClock, Inner, SqliteStore, NAME};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{deadline_after, until, Lease, Renew, RenewPolicy, Renewal};
use crate::lock::{DistLock, FencingToken, LockGuard, LockHandle, LockOptions};

/// One grant attempt: `Ok(token)` if the lock was free (or its lease had run out), else
/// `Err(expiry)` of the current holder's lease (host clock milliseconds).
fn attempt(
    tx: &Transaction<'_>,
    clock: &HostClock,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> rusqlite::Result<std::result::Result<i64, i64>> {
    let row: Option<(Option<String>, Option<String>, Option<i64>)> = tx
        .query_row(
            "SELECT holder, boot, expires FROM coordkit_locks WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    if let Some((Some(_), boot, Some(expires))) = &row {
        if clock.live(boot.as_deref(), Some(*expires)) {
            return Ok(Err(*expires));
        }
    }
    // The token is a new store-wide revision, written in the transaction of the grant.
    let token = bump(tx)?;
    tx.execute(
        "INSERT INTO coordkit_locks (name, holder, token, boot, expires) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = excluded.token,
             boot = excluded.boot, expires = excluded.expires",
        rusqlite::params![name, holder, token, clock.boot, clock.expiry(ttl)],
    )?;
    Ok(Ok(token))
}

/// Ends the hold `(holder, token)` of `name`, if it is still the current one.
async fn end_hold(inner: &Arc<Inner>, name: String, holder: String, token: i64) -> Result<()> {
    inner
        .write("release", move |tx, _| {
            tx.execute(
                "UPDATE coordkit_locks SET holder = NULL, boot = NULL, expires = NULL
                 WHERE name = ?1 AND holder = ?2 AND token = ?3",
                rusqlite::params![name, holder, token],
            )
            .map_err(|e| map_err(e, "release"))
        })
        .await
        .map(|_| ())
}

impl SqliteStore {
    /// One attempt, run to its end even if the caller goes away: a grant nobody received is
    /// released at once.
    async fn try_once(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<std::result::Result<i64, i64>> {
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        let (n, h) = (name.to_string(), holder.to_string());
        tokio::spawn(async move {
            let (n2, h2) = (n.clone(), h.clone());
            let r = inner
                .write("lock", move |tx, clock| {
                    attempt(tx, clock, &n2, &h2, ttl).map_err(|e| map_err(e, "lock"))
                })
                .await;
            if let Err(Ok(Ok(token))) = tx.send(r) {
                let _ = end_hold(&inner, n, h, token).await;
            }
        });
        rx.await
            .map_err(|_| Error::new(ErrorKind::Backend, NAME, "the lock attempt was dropped"))?
    }

    async fn acquire(
        &self,
        name: &str,
        opts: &LockOptions,
        try_only: bool,
    ) -> Result<Option<LockGuard>> {
        Self::caps().check_lock(name, opts)?;
        let deadline = if try_only {
            None
        } else {
            deadline_after(opts.wait)
        };
        let holder = uuid::Uuid::new_v4().to_string();
        let mut first = true;
        loop {
            let sent = Instant::now();
            // Enabled before the attempt: a release after it wakes this task.
            let changes = self.inner.changes();
            let changed = changes.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let attempt = self.try_once(name, &holder, opts.ttl);
            // The first attempt runs to its end (bounded by the busy timeout), so that a zero
            // wait still tries once.
            let outcome = if std::mem::take(&mut first) {
                Some(attempt.await)
            } else {
                until(deadline, attempt).await
            };
            let expiry = match outcome {
                Some(r) => match r.map_err(|e| e.with_key(name))? {
                    Ok(token) => return Ok(Some(self.guard(name, holder, token, sent, opts.ttl))),
                    Err(expiry) => Some(expiry),
                },
                None => None,
            };
            if try_only {
                return Ok(None);
            }
            // Held: try again when the database changes (a release), when the holder's lease
            // runs out, or after a while, within the wait.
            let wake = self.inner.wait_for_change(changed, expiry);
            if expiry.is_none() || until(deadline, wake).await.is_none() {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    NAME,
                    format!(
                        "the lock was not acquired within {:?}",
                        opts.wait.unwrap_or_default()
                    ),
                )
                .with_key(name));
            }
        }
    }

    fn guard(
        &self,
        name: &str,
        holder: String,
        token: i64,
        sent: Instant,
        ttl: Duration,
    ) -> LockGuard {
        let renewer = SqliteRenewer {
            inner: self.inner.clone(),
            name: name.to_string(),
            holder: holder.clone(),
            token,
            ttl,
        };
        let policy = RenewPolicy {
            attempt_timeout: self.inner.cfg.busy_timeout,
        };
        let lease = Lease::start(renewer, sent, ttl, policy);
        let handle = SqliteLock {
            inner: self.inner.clone(),
            name: name.to_string(),
            holder,
            token,
            lease: lease.clone(),
        };
        LockGuard::new(
            name,
            FencingToken::from_raw(token as u64),
            lease.lost_token().child_token(),
            Box::new(handle),
        )
        .with_lease(&lease)
    }
}

#[async_trait]
impl DistLock for SqliteStore {
    async fn lock(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        match self.acquire(name, opts, false).await? {
            Some(g) => Ok(g),
            None => Err(
                Error::new(ErrorKind::Timeout, NAME, "the lock was not acquired").with_key(name),
            ),
        }
    }

    async fn try_lock(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>> {
        self.acquire(name, opts, true).await
    }
}

/// Pushes the lease row's expiry one TTL past now, if the row is still this hold's.
struct SqliteRenewer {
    inner: Arc<Inner>,
    name: String,
    holder: String,
    token: i64,
    ttl: Duration,
}

impl Renew for SqliteRenewer {
    fn renew(&mut self) -> Pin<Box<dyn Future<Output = Result<Renewal>> + Send + '_>> {
        let (name, holder, token, ttl) =
            (self.name.clone(), self.holder.clone(), self.token, self.ttl);
        let inner = self.inner.clone();
        Box::pin(async move {
            let n = inner
                .write("renew", move |tx, clock| {
                    tx.execute(
                        "UPDATE coordkit_locks SET expires = ?1
                         WHERE name = ?2 AND holder = ?3 AND token = ?4 AND boot = ?5 AND expires > ?6",
                        rusqlite::params![clock.expiry(ttl), name, holder, token, clock.boot, clock.now_ms()],
                    )
                    .map_err(|e| map_err(e, "renew"))
                })
                .await?;
            Ok(if n == 1 {
                Renewal::Confirmed(ttl)
            } else {
                Renewal::Gone("the lease row expired or another holder took the lock".into())
            })
        })
    }
}

/// The SQLite backend's side of a held lock.
struct SqliteLock {
    inner: Arc<Inner>,
    name: String,
    holder: String,
    token: i64,
    lease: Lease,
}

#[async_trait]
impl LockHandle for SqliteLock {
    async fn release(self: Box<Self>) -> Result<()> {
        self.lease.stop();
        end_hold(
            &self.inner,
            self.name.clone(),
            self.holder.clone(),
            self.token,
        )
        .await
        .map_err(|e| e.with_key(&self.name))
    }

    fn suspend_keep_alive(&self) {
        self.lease.suspend();
    }
}

crate::election_via_lock!(SqliteStore);
