//! Read-write locks on any backend's [`DistLock`].
//!
//! Layout of read-write lock `NAME`:
//! - the **turnstile** is the lock `_rwlocks/NAME/t`. Everyone passes it in order: a reader
//!   holds it only while it takes a reader slot, a writer holds it for its whole hold, so
//!   readers that come after a writer wait behind it;
//! - the **reader slots** are the locks `_rwlocks/NAME/r/0` … `_rwlocks/NAME/r/15`
//!   ([`MAX_READERS`]): a reader holds one, a writer holds all of them (waiting, turnstile in
//!   hand, for the readers before it to leave).
//!
//! Mutual exclusion rests on the slot locks alone: a writer holds every slot, a reader one.
//! Every hold's token is the turnstile's token of its passage.

use super::MAX_READERS;
use crate::error::Result;
use crate::lock::{DistLock, LockGuard, LockOptions};
use crate::semaphore::via_lock::{deadline_of, take, take_any, validate_recipe_name};

/// The prefix of a read-write lock's locks.
pub const PREFIX: &str = "_rwlocks/";

fn turnstile(name: &str) -> String {
    format!("{PREFIX}{name}/t")
}

fn reader_slots(name: &str) -> Vec<String> {
    (0..MAX_READERS)
        .map(|i| format!("{PREFIX}{name}/r/{i}"))
        .collect()
}

fn check<L: DistLock + crate::KvStore + ?Sized>(
    locks: &L,
    name: &str,
    opts: &LockOptions,
) -> Result<()> {
    validate_recipe_name(name, PREFIX)?;
    locks.capabilities().check_lock(&turnstile(name), opts)
}

/// [`DistRwLock::read`](super::DistRwLock::read) on `locks`.
pub async fn read<L: DistLock + crate::KvStore + ?Sized>(
    locks: &L,
    name: &str,
    opts: &LockOptions,
) -> Result<LockGuard> {
    check(locks, name, opts)?;
    let (deadline, try_only) = deadline_of(opts);
    let gate = take(locks, &turnstile(name), opts, deadline, try_only)
        .await
        .map_err(|e| e.with_key(name))?;
    let token = gate.token();
    let slot = take_any(locks, &reader_slots(name), opts, deadline, try_only).await;
    if let Err(e) = gate.release().await {
        tracing::debug!(rwlock = name, error = %e, "releasing the turnstile failed");
    }
    let (_, slot) = slot.map_err(|e| e.with_key(name))?;
    Ok(LockGuard::combine(name, token, vec![slot]))
}

/// [`DistRwLock::write`](super::DistRwLock::write) on `locks`.
pub async fn write<L: DistLock + crate::KvStore + ?Sized>(
    locks: &L,
    name: &str,
    opts: &LockOptions,
) -> Result<LockGuard> {
    check(locks, name, opts)?;
    let (deadline, try_only) = deadline_of(opts);
    let gate = take(locks, &turnstile(name), opts, deadline, try_only)
        .await
        .map_err(|e| e.with_key(name))?;
    let token = gate.token();
    // Every free slot at once, then the held ones as their readers leave.
    let names = reader_slots(name);
    let tried = futures::future::join_all(names.iter().map(|n| locks.try_lock(n, opts))).await;
    let mut parts = vec![gate];
    let mut missing = Vec::new();
    let mut failure = None;
    for (n, r) in names.iter().zip(tried) {
        match r {
            Ok(Some(g)) => parts.push(g),
            Ok(None) => missing.push(n),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if failure.is_none() {
        for n in missing {
            match take(locks, n, opts, deadline, try_only).await {
                Ok(g) => parts.push(g),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    if let Some(e) = failure {
        let _ = futures::future::join_all(parts.into_iter().map(|g| g.release())).await;
        return Err(e.with_key(name));
    }
    Ok(LockGuard::combine(name, token, parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(turnstile("a"), "_rwlocks/a/t");
        let s = reader_slots("a");
        assert_eq!(s.len(), MAX_READERS as usize);
        assert_eq!(s[15], "_rwlocks/a/r/15");
    }
}
