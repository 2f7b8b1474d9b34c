//! `DistLock` for [`FileStore`]: a lease record per lock (holder, fencing token, expiry on the
//! host clock) in `locks/<MD5 of the name>`, changed only inside a short `flock` critical
//! section on `locks/<MD5>.lock`, written by rename and synced before a grant is reported. The
//! record keeps the lock's last token after a release; neither file is ever deleted.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::codec::{bucket_name, open_file, seal_file, Dec, Enc};
use super::{corrupt, flock, read_opt, write_atomic, FileStore, HostClock, Inner, NAME, RECHECK};
use crate::backend::lease_lock::{self, Attempt, LeaseRecords};
use crate::error::Result;
use crate::lock::{DistLock, LockGuard, LockOptions};

const LOCK_MAGIC: &[u8; 4] = b"CKL1";

/// One lock's record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LockRecord {
    name: String,
    /// The holder's id, while held.
    holder: Option<String>,
    /// The last token granted.
    token: u64,
    expires: Option<(String, i64)>,
}

/// The lock's files: the record and its flock file.
fn paths(inner: &Inner, name: &str) -> (PathBuf, PathBuf, String) {
    let b = bucket_name(name);
    let locks = inner.cfg.dir.join("locks");
    (locks.join(&b), locks.join(format!("{b}.lock")), b)
}

fn read_records(path: &std::path::Path) -> Result<Vec<LockRecord>> {
    let Some(bytes) = read_opt(path)? else {
        return Ok(Vec::new());
    };
    let body = open_file(LOCK_MAGIC, &bytes).ok_or_else(|| corrupt(path))?;
    let mut d = Dec::new(body);
    let mut out = Vec::new();
    while !d.is_empty() {
        let r = (|| {
            let name = d.string()?;
            let holder = match d.u8()? {
                0 => None,
                _ => Some(d.string()?),
            };
            Some(LockRecord {
                name,
                holder,
                token: d.u64()?,
                expires: d.expiry()?,
            })
        })()
        .ok_or_else(|| corrupt(path))?;
        out.push(r);
    }
    Ok(out)
}

fn write_records(inner: &Inner, path: &std::path::Path, records: &[LockRecord]) -> Result<()> {
    let mut e = Enc::default();
    for r in records {
        e.str(&r.name);
        match &r.holder {
            None => e.u8(0),
            Some(h) => e.u8(1).str(h),
        };
        e.u64(r.token).expiry(&r.expires);
    }
    write_atomic(&inner.cfg.dir, path, &seal_file(LOCK_MAGIC, &e.0))
}

/// Runs `f` on the record of `name` inside the lock's flock critical section; writes the
/// record back if `f` says so.
fn with_record<T>(
    inner: &Inner,
    name: &str,
    f: impl FnOnce(&mut LockRecord) -> (bool, T),
) -> Result<T> {
    let (path, flock_path, _) = paths(inner, name);
    let _l = flock(&flock_path, true, inner.cfg.lock_timeout)?;
    let mut records = read_records(&path)?;
    let i = match records.iter().position(|r| r.name == name) {
        Some(i) => i,
        None => {
            records.push(LockRecord {
                name: name.to_string(),
                holder: None,
                token: 0,
                expires: None,
            });
            records.len() - 1
        }
    };
    let (write, out) = f(&mut records[i]);
    if write {
        write_records(inner, &path, &records)?;
    }
    Ok(out)
}

/// One grant attempt (inside the lock's critical section).
fn attempt(inner: &Inner, name: &str, holder: &str, ttl: Duration) -> Result<Attempt> {
    let clock = &inner.clock;
    with_record(inner, name, |r| {
        if let (Some(_), Some((boot, at))) = (&r.holder, &r.expires) {
            if clock.live(Some(boot), Some(*at)) {
                return (false, Err(*at));
            }
        }
        r.token += 1;
        r.holder = Some(holder.to_string());
        r.expires = Some((clock.boot.clone(), clock.expiry(ttl)));
        (true, Ok(r.token))
    })
}

async fn blocking<T: Send + 'static>(
    inner: Arc<Inner>,
    what: &'static str,
    f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
) -> Result<T> {
    inner.blocking(what, f).await
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
        self.cfg.lock_timeout
    }

    fn recheck(&self) -> Duration {
        RECHECK
    }

    fn changes(&self, name: &str) -> Arc<tokio::sync::Notify> {
        self.waker(&format!("locks/{}", paths(self, name).2))
    }

    async fn grant(
        self: Arc<Self>,
        name: String,
        holder: String,
        ttl: Duration,
    ) -> Result<Attempt> {
        blocking(self, "lock", move |inner| {
            attempt(inner, &name, &holder, ttl)
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
        blocking(self, "renew", move |inner| {
            let clock = &inner.clock;
            with_record(inner, &name, |r| {
                let ours = r.holder.as_deref() == Some(holder.as_str())
                    && r.token == token
                    && r.expires
                        .as_ref()
                        .is_some_and(|(b, at)| clock.live(Some(b), Some(*at)));
                if ours {
                    r.expires = Some((clock.boot.clone(), clock.expiry(ttl)));
                }
                (ours, ours)
            })
        })
        .await
    }

    async fn end(self: Arc<Self>, name: String, holder: String, token: u64) -> Result<()> {
        blocking(self, "release", move |inner| {
            with_record(inner, &name, |r| {
                if r.holder.as_deref() == Some(holder.as_str()) && r.token == token {
                    r.holder = None;
                    r.expires = None;
                    (true, ())
                } else {
                    (false, ())
                }
            })
        })
        .await
    }
}

#[async_trait]
impl DistLock for FileStore {
    async fn lock(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        lease_lock::lock(&self.inner, &Self::caps(), name, opts).await
    }

    async fn try_lock(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>> {
        lease_lock::acquire(&self.inner, &Self::caps(), name, opts, true).await
    }
}

crate::election_via_lock!(FileStore);
crate::recipes_via_lock!(FileStore);
