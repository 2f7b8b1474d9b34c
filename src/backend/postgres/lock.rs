//! `DistLock` for [`PostgresStore`]: lease rows in `locks` (holder, fencing token, expiry in
//! database time), granted in write transactions, renewed and released by one statement each;
//! waiters woken by `NOTIFY` on release and by a timer to the holder's expiry.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use super::kv::micros;
use super::{bump, lock_counter, map_err, Inner, PostgresStore, NAME};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{deadline_after, until, Lease, Renew, RenewPolicy, Renewal};
use crate::lock::{DistLock, FencingToken, LockGuard, LockHandle, LockOptions};

/// One grant attempt: `Ok(token)` if the lock was free (or its lease had run out), else
/// `Err(ms)`, the milliseconds left of the current holder's lease; with the token cancelled
/// when the connection that answered ends.
type Attempt = (std::result::Result<i64, f64>, CancellationToken);

async fn attempt(
    inner: &Arc<Inner>,
    name: String,
    holder: String,
    ttl: Duration,
) -> Result<Attempt> {
    let i = inner.clone();
    inner
        .with_lock_conn("lock", move |c| {
            Box::pin(async move {
                let map = |e| map_err(e, "lock");
                let tx = c.transaction().await.map_err(map)?;
                lock_counter(&tx, &i).await?;
                let row = tx
                    .query_typed_opt(
                        &i.q("SELECT COALESCE(holder IS NOT NULL AND expires > clock_timestamp(), false),
                                 (EXTRACT(EPOCH FROM (expires - clock_timestamp())) * 1000)::float8
                              FROM @.locks WHERE name = $1"),
                        &[(&name, Type::TEXT)],
                    )
                    .await
                    .map_err(map)?;
                if let Some(r) = row {
                    if r.get::<_, bool>(0) {
                        let left: Option<f64> = r.get(1);
                        // Dropping the transaction rolls it back.
                        return Ok(Err(left.unwrap_or(0.0)));
                    }
                }
                // The token is a new store-wide revision, taken in the transaction of the
                // grant: it increases with every grant of every lock.
                let token = bump(&tx, &i).await?;
                let us = micros(ttl);
                tx.query_typed(
                    &i.q("INSERT INTO @.locks (name, holder, token, expires)
                          VALUES ($1, $2, $3, clock_timestamp() + $4 * interval '1 microsecond')
                          ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                              token = excluded.token, expires = excluded.expires"),
                    &[
                        (&name, Type::TEXT),
                        (&holder, Type::TEXT),
                        (&token, Type::INT8),
                        (&us, Type::INT8),
                    ],
                )
                .await
                .map_err(map)?;
                tx.commit().await.map_err(map)?;
                Ok(Ok(token))
            })
        })
        .await
}

/// Ends the hold `(holder, token)` of `name`, if it is still the current one, and wakes the
/// waiters (one statement).
async fn end_hold(inner: &Arc<Inner>, name: String, holder: String, token: i64) -> Result<()> {
    let sql = inner.q("WITH u AS (UPDATE @.locks SET holder = NULL, expires = NULL
                    WHERE name = $1 AND holder = $2 AND token = $3 RETURNING 1)
         SELECT pg_notify($4, 'lock') FROM u");
    let channel = inner.cfg.channel();
    inner
        .with_lock_conn("release", move |c| {
            Box::pin(async move {
                c.query_typed(
                    &sql,
                    &[
                        (&name, Type::TEXT),
                        (&holder, Type::TEXT),
                        (&token, Type::INT8),
                        (&channel, Type::TEXT),
                    ],
                )
                .await
                .map_err(|e| map_err(e, "release"))?;
                Ok(())
            })
        })
        .await
        .map(|_| ())
}

impl PostgresStore {
    /// One attempt, run to its end even if the caller goes away: a grant nobody received is
    /// released at once.
    async fn try_once(&self, name: &str, holder: &str, ttl: Duration) -> Result<Attempt> {
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        let (n, h) = (name.to_string(), holder.to_string());
        tokio::spawn(async move {
            let r = attempt(&inner, n.clone(), h.clone(), ttl).await;
            if let Err(Ok((Ok(token), _))) = tx.send(r) {
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
        let timeout = || {
            Error::new(
                ErrorKind::Timeout,
                NAME,
                format!(
                    "the lock was not acquired within {:?}",
                    opts.wait.unwrap_or_default()
                ),
            )
            .with_key(name)
        };
        let holder = uuid::Uuid::new_v4().to_string();
        let mut first = true;
        let mut wake: Option<tokio::sync::watch::Receiver<u64>> = None;
        loop {
            if let Some(w) = &mut wake {
                // Marked before the attempt: a release after it wakes the wait below.
                w.borrow_and_update();
            }
            let sent = Instant::now();
            let attempt = self.try_once(name, &holder, opts.ttl);
            // The first attempt runs to its end (bounded by the request timeout), so that a
            // zero wait still tries once.
            let outcome = if std::mem::take(&mut first) {
                Some(attempt.await)
            } else {
                until(deadline, attempt).await
            };
            let left_ms = match outcome {
                Some(r) => match r.map_err(|e| e.with_key(name))? {
                    (Ok(token), closed) => {
                        return Ok(Some(
                            self.guard(name, holder, token, sent, opts.ttl, closed),
                        ))
                    }
                    (Err(ms), _) => ms,
                },
                None => return Err(timeout()),
            };
            if try_only {
                return Ok(None);
            }
            let Some(w) = &mut wake else {
                // The first wait: listen first, then look again at once (a release between
                // the attempt and the LISTEN would otherwise be missed).
                match until(deadline, self.inner.wake()).await {
                    Some(w) => wake = Some(w.lock.subscribe()),
                    None => return Err(timeout()),
                }
                continue;
            };
            // Held: try again on a release notification, when the holder's lease runs out, or
            // after the recheck interval, within the wait.
            let wait = self
                .inner
                .recheck()
                .min(Duration::from_secs_f64(left_ms.max(0.0) / 1000.0 + 0.001));
            let woken = async {
                tokio::select! {
                    _ = w.changed() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            };
            if until(deadline, woken).await.is_none() {
                return Err(timeout());
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
        closed: CancellationToken,
    ) -> LockGuard {
        let renewer = PgRenewer {
            inner: self.inner.clone(),
            name: name.to_string(),
            holder: holder.clone(),
            token,
            ttl,
        };
        let policy = RenewPolicy {
            attempt_timeout: self.inner.cfg.request_timeout,
        };
        let lease = Lease::start(renewer, sent, ttl, policy);
        let released = CancellationToken::new();
        // The connection that granted the lock ending counts as losing it.
        {
            let (lease, released, lost) = (lease.clone(), released.clone(), lease.lost_token());
            tokio::spawn(async move {
                tokio::select! {
                    _ = closed.cancelled() => {
                        if !released.is_cancelled() {
                            lease.lose("the connection the lock was granted on ended");
                        }
                    }
                    _ = released.cancelled() => {}
                    _ = lost.cancelled() => {}
                }
            });
        }
        let handle = PgLock {
            inner: self.inner.clone(),
            name: name.to_string(),
            holder,
            token,
            lease: lease.clone(),
            released,
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
impl DistLock for PostgresStore {
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

/// Pushes the lease row's expiry one TTL past the database's now, if the row is still this
/// hold's and not yet expired.
struct PgRenewer {
    inner: Arc<Inner>,
    name: String,
    holder: String,
    token: i64,
    ttl: Duration,
}

impl Renew for PgRenewer {
    fn renew(&mut self) -> Pin<Box<dyn Future<Output = Result<Renewal>> + Send + '_>> {
        let (name, holder, token, ttl) =
            (self.name.clone(), self.holder.clone(), self.token, self.ttl);
        let inner = self.inner.clone();
        Box::pin(async move {
            let sql = inner.q(
                "UPDATE @.locks SET expires = clock_timestamp() + $4 * interval '1 microsecond'
                 WHERE name = $1 AND holder = $2 AND token = $3 AND expires > clock_timestamp()",
            );
            let us = micros(ttl);
            let (n, _) = inner
                .with_lock_conn("renew", move |c| {
                    Box::pin(async move {
                        c.execute_typed(
                            &sql,
                            &[
                                (&name, Type::TEXT),
                                (&holder, Type::TEXT),
                                (&token, Type::INT8),
                                (&us, Type::INT8),
                            ],
                        )
                        .await
                        .map_err(|e| map_err(e, "renew"))
                    })
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

/// The PostgreSQL backend's side of a held lock.
struct PgLock {
    inner: Arc<Inner>,
    name: String,
    holder: String,
    token: i64,
    lease: Lease,
    released: CancellationToken,
}

#[async_trait]
impl LockHandle for PgLock {
    async fn release(self: Box<Self>) -> Result<()> {
        self.released.cancel();
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

    fn suspend_keep_alive(&self, _lost: &CancellationToken) {
        self.lease.suspend();
    }
}

crate::election_via_lock!(PostgresStore);
crate::recipes_via_lock!(PostgresStore);
