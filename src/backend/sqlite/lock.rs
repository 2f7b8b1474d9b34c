//! `DistLock` for [`SqliteStore`]: lease rows in `coordkit_locks` (holder, fencing token,
//! expiry on the host clock), granted and renewed in write transactions.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Transaction};

use super::{bump, map_err, HostClock, Inner, SqliteStore, NAME};
use crate::backend::lease_lock::{self, Attempt, LeaseRecords};
use crate::error::Result;
use crate::lock::{DistLock, LockGuard, LockOptions};

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

#[async_trait]
impl LeaseRecords for Inner {
    fn backend(&self) -> &'static str {
        NAME
    }

    fn clock(&self) -> &HostClock {
        &self.clock
    }

    fn attempt_timeout(&self) -> Duration {
        self.cfg.busy_timeout
    }

    fn recheck(&self) -> Duration {
        self.cfg.poll_interval
    }

    fn changes(&self, _name: &str) -> Arc<tokio::sync::Notify> {
        Inner::changes(self)
    }

    async fn grant(
        self: Arc<Self>,
        name: String,
        holder: String,
        ttl: Duration,
    ) -> Result<Attempt> {
        self.write("lock", move |tx, clock| {
            attempt(tx, clock, &name, &holder, ttl)
                .map(|r| r.map(|token| token as u64))
                .map_err(|e| map_err(e, "lock"))
        })
        .await
    }

    async fn renew(
        self: Arc<Self>,
        name: String,
        holder: String,
        token: u64,
        ttl: Duration,
    ) -> Result<bool> {
        let n = self
            .write("renew", move |tx, clock| {
                tx.execute(
                    "UPDATE coordkit_locks SET expires = ?1
                     WHERE name = ?2 AND holder = ?3 AND token = ?4 AND boot = ?5 AND expires > ?6",
                    rusqlite::params![
                        clock.expiry(ttl),
                        name,
                        holder,
                        token as i64,
                        clock.boot,
                        clock.now_ms()
                    ],
                )
                .map_err(|e| map_err(e, "renew"))
            })
            .await?;
        Ok(n == 1)
    }

    async fn end(self: Arc<Self>, name: String, holder: String, token: u64) -> Result<()> {
        self.write("release", move |tx, _| {
            tx.execute(
                "UPDATE coordkit_locks SET holder = NULL, boot = NULL, expires = NULL
                 WHERE name = ?1 AND holder = ?2 AND token = ?3",
                rusqlite::params![name, holder, token as i64],
            )
            .map_err(|e| map_err(e, "release"))
        })
        .await
        .map(|_| ())
    }
}

#[async_trait]
impl DistLock for SqliteStore {
    async fn lock(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        lease_lock::lock(&self.inner, &Self::caps(), name, opts).await
    }

    async fn try_lock(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>> {
        lease_lock::acquire(&self.inner, &Self::caps(), name, opts, true).await
    }
}

crate::election_via_lock!(SqliteStore);
crate::recipes_via_lock!(SqliteStore);
