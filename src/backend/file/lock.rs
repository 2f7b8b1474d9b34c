//! `DistLock` for [`FileStore`]: a lease record per lock (holder, fencing token, expiry on the
//! host clock) in `locks/<MD5 of the name>`, changed only inside a short `flock` critical
//! section on `locks/<MD5>.lock`, written by rename and synced before a grant is reported. The
//! record keeps the lock's last token after a release; neither file is ever deleted.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::codec::{bucket_name, open_file, seal_file, Dec, Enc};
use super::{corrupt, flock, read_opt, write_atomic, FileStore, Inner, NAME, RECHECK};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{deadline_after, until, Lease, Renew, RenewPolicy, Renewal};
use crate::lock::{DistLock, FencingToken, LockGuard, LockHandle, LockOptions};

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

/// One grant attempt: `Ok(token)` if the lock was free (or its lease had run out), else
/// `Err(expiry)` of the current holder's lease (host clock milliseconds).
fn attempt(
    inner: &Inner,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<std::result::Result<u64, i64>> {
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

/// Ends the hold `(holder, token)` of `name`, if it is still the current one.
async fn end_hold(inner: &Arc<Inner>, name: String, holder: String, token: u64) -> Result<()> {
    inner
        .blocking("release", move |inner| {
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

impl FileStore {
    /// One attempt, run to its end even if the caller goes away: a grant nobody received is
    /// released at once.
    async fn try_once(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<std::result::Result<u64, i64>> {
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        let (n, h) = (name.to_string(), holder.to_string());
        tokio::spawn(async move {
            let (n2, h2) = (n.clone(), h.clone());
            let r = inner
                .blocking("lock", move |inner| attempt(inner, &n2, &h2, ttl))
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
        let waker = self
            .inner
            .waker(&format!("locks/{}", paths(&self.inner, name).2));
        let mut first = true;
        loop {
            // Enabled before the attempt: a release after it wakes this task.
            let notified = waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let sent = Instant::now();
            let attempt = self.try_once(name, &holder, opts.ttl);
            // The first attempt runs to its end (bounded by lock_timeout), so that a zero wait
            // still tries once.
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
            // Held: try again when the record changes (inotify), when the holder's lease runs
            // out, or after RECHECK, within the wait.
            let wake = async {
                let left = expiry.map_or(Duration::ZERO, |at| {
                    Duration::from_millis((at - self.inner.clock.now_ms()).max(0) as u64)
                });
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(left.min(RECHECK)) => {}
                }
            };
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
        token: u64,
        sent: Instant,
        ttl: Duration,
    ) -> LockGuard {
        let renewer = FileRenewer {
            inner: self.inner.clone(),
            name: name.to_string(),
            holder: holder.clone(),
            token,
            ttl,
        };
        let policy = RenewPolicy {
            attempt_timeout: self.inner.cfg.lock_timeout,
        };
        let lease = Lease::start(renewer, sent, ttl, policy);
        let handle = FileLock {
            inner: self.inner.clone(),
            name: name.to_string(),
            holder,
            token,
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
}

#[async_trait]
impl DistLock for FileStore {
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

/// Pushes the record's expiry one TTL past now, if the record is still this hold's and live.
struct FileRenewer {
    inner: Arc<Inner>,
    name: String,
    holder: String,
    token: u64,
    ttl: Duration,
}

impl Renew for FileRenewer {
    fn renew(&mut self) -> Pin<Box<dyn Future<Output = Result<Renewal>> + Send + '_>> {
        let (name, holder, token, ttl) =
            (self.name.clone(), self.holder.clone(), self.token, self.ttl);
        let inner = self.inner.clone();
        Box::pin(async move {
            let renewed = inner
                .blocking("renew", move |inner| {
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
                .await?;
            Ok(if renewed {
                Renewal::Confirmed(ttl)
            } else {
                Renewal::Gone("the lease record expired or another holder took the lock".into())
            })
        })
    }
}

/// The file backend's side of a held lock.
struct FileLock {
    inner: Arc<Inner>,
    name: String,
    holder: String,
    token: u64,
    lease: Lease,
}

#[async_trait]
impl LockHandle for FileLock {
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

crate::election_via_lock!(FileStore);
