//! Semaphores on any backend's [`DistLock`] and [`KvStore`].
//!
//! Layout of semaphore `NAME` with `N` permits:
//! - the **slots** are the locks `_semaphores/NAME/s/0` … `_semaphores/NAME/s/N-1`: a permit is
//!   the hold of one slot, with that lock's lease, lost signal and fencing token;
//! - the **queue** is the lock `_semaphores/NAME/q`: a caller takes it, takes a free slot (or,
//!   if none is free, waits for the first slot to come free: the only waiter on slots is the
//!   queue's holder), then releases it. Callers behind it wait in the backend's own lock queue;
//! - the key `_semaphores/NAME` holds `N`, written by the first caller and checked by every
//!   later one under the queue lock.
//!
//! Safety rests on the slot locks alone (at most one holder per slot, so at most `N` holders);
//! the queue only keeps waiters from all watching the slots at once.

use std::time::Duration;

use tokio::time::Instant;

use super::{Permit, MAX_PERMITS};
use crate::error::{Error, ErrorKind, Result};
use crate::key::validate_lock_name;
use crate::kv::{Consistency, Expect, KvStore};
use crate::lease::deadline_after;
use crate::lock::{DistLock, LockGuard, LockOptions};

/// The prefix of a semaphore's locks and of its record key.
pub const PREFIX: &str = "_semaphores/";

/// The longest suffix a recipe appends to its name.
const SUFFIX_ROOM: usize = 8;

/// Checks a recipe's name: the lock-name grammar, with room for the recipe's prefix and suffix.
pub(crate) fn validate_recipe_name(name: &str, prefix: &str) -> Result<()> {
    validate_lock_name(name)?;
    let max = crate::key::MAX_KEY_LEN - prefix.len() - SUFFIX_ROOM;
    if name.len() > max {
        return Err(Error::new(
            ErrorKind::InvalidKey,
            "coordkit",
            format!("the name is longer than {max} bytes"),
        )
        .with_key(name.chars().take(80).collect::<String>()));
    }
    Ok(())
}

/// The options of one step of an acquisition that must end by `deadline`.
fn step(opts: &LockOptions, deadline: Option<Instant>) -> LockOptions {
    let mut o = opts.clone();
    if let Some(d) = deadline {
        o.wait = Some(d.saturating_duration_since(Instant::now()));
    }
    o
}

pub(crate) fn timed_out(name: &str, opts: &LockOptions) -> Error {
    Error::new(
        ErrorKind::Timeout,
        "coordkit",
        format!(
            "not acquired within {:?}",
            opts.wait.unwrap_or(Duration::ZERO)
        ),
    )
    .with_key(name)
}

/// A deadline for `opts.wait`, and whether the wait is zero (try once).
pub(crate) fn deadline_of(opts: &LockOptions) -> (Option<Instant>, bool) {
    (
        deadline_after(opts.wait),
        opts.wait.is_some_and(|w| w.is_zero()),
    )
}

/// Takes the lock `name` by `deadline`; once only when `try_only`.
pub(crate) async fn take<L: DistLock + ?Sized>(
    locks: &L,
    name: &str,
    opts: &LockOptions,
    deadline: Option<Instant>,
    try_only: bool,
) -> Result<LockGuard> {
    let o = step(opts, deadline);
    if try_only || o.wait.is_some_and(|w| w.is_zero()) {
        return locks
            .try_lock(name, &o)
            .await?
            .ok_or_else(|| timed_out(name, opts));
    }
    locks.lock(name, &o).await
}

/// Takes the first of `names` that is free, or (unless `try_only`) waits by `deadline` for the
/// first to come free; its index and guard. Attempts that lose the race are dropped, which
/// withdraws them (every backend's `lock` is cancel-safe).
pub(crate) async fn take_any<L: DistLock + ?Sized>(
    locks: &L,
    names: &[String],
    opts: &LockOptions,
    deadline: Option<Instant>,
    try_only: bool,
) -> Result<(usize, LockGuard)> {
    let o = step(opts, deadline);
    for (i, n) in names.iter().enumerate() {
        if let Some(g) = locks.try_lock(n, &o).await? {
            return Ok((i, g));
        }
    }
    if try_only || o.wait.is_some_and(|w| w.is_zero()) {
        return Err(timed_out(names.first().map_or("", |n| n), opts));
    }
    let o = &o;
    let mut waits: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| Box::pin(async move { (i, locks.lock(n, o).await) }))
        .collect();
    loop {
        let ((i, r), _, rest) = futures::future::select_all(waits).await;
        match r {
            Ok(g) => return Ok((i, g)),
            Err(e) if rest.is_empty() || !e.is(ErrorKind::Timeout) => return Err(e),
            // A wait that ran out: the others end at the same deadline.
            Err(_) => waits = rest,
        }
    }
}

/// The record key of semaphore `name`.
pub fn key_of(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn slot_names(name: &str, permits: u32) -> Vec<String> {
    (0..permits)
        .map(|i| format!("{PREFIX}{name}/s/{i}"))
        .collect()
}

fn parse_permits(raw: &[u8]) -> Option<u32> {
    std::str::from_utf8(raw).ok()?.trim().parse().ok()
}

/// Checks (and on first use stores) the number of permits, under the queue lock.
async fn agree<S: KvStore + DistLock + ?Sized>(
    store: &S,
    name: &str,
    permits: u32,
    opts: &LockOptions,
) -> Result<()> {
    let key = key_of(name);
    for _ in 0..4 {
        let Some(e) = store.get(&key, Consistency::Strong).await? else {
            match store
                .compare_and_swap(&key, Expect::Absent, Some(permits.to_string().into_bytes()))
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.is(ErrorKind::Conflict) => continue,
                Err(e) => return Err(e),
            }
        };
        let stored = parse_permits(&e.value);
        if stored == Some(permits) {
            return Ok(());
        }
        // Another number: taken over only if nobody holds a slot of the stored number.
        let held = stored.unwrap_or(MAX_PERMITS).min(MAX_PERMITS);
        let mut probes = Vec::new();
        let mut idle = true;
        for n in slot_names(name, held) {
            match store.try_lock(&n, opts).await? {
                Some(g) => probes.push(g),
                None => {
                    idle = false;
                    break;
                }
            }
        }
        let outcome = if idle {
            store
                .compare_and_swap(
                    &key,
                    Expect::Version(e.version),
                    Some(permits.to_string().into_bytes()),
                )
                .await
        } else {
            Ok(None)
        };
        for p in probes {
            let _ = p.release().await;
        }
        match outcome {
            Ok(Some(_)) => return Ok(()),
            Err(e) if e.is(ErrorKind::Conflict) => continue,
            Err(e) => return Err(e),
            Ok(None) => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "coordkit",
                    format!(
                        "the semaphore has {} permits and holders; this call asked for {permits}",
                        stored.map_or_else(
                            || "an unreadable number of".to_string(),
                            |n| n.to_string()
                        )
                    ),
                )
                .with_key(name))
            }
        }
    }
    Err(Error::new(
        ErrorKind::Conflict,
        "coordkit",
        "the semaphore's number of permits kept changing",
    )
    .with_key(name))
}

/// [`DistSemaphore::acquire`](super::DistSemaphore::acquire) on `store`'s locks.
pub async fn acquire<S: KvStore + DistLock + ?Sized>(
    store: &S,
    name: &str,
    permits: u32,
    opts: &LockOptions,
) -> Result<Permit> {
    validate_recipe_name(name, PREFIX)?;
    if permits == 0 || permits > MAX_PERMITS {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "coordkit",
            format!("permits must be between 1 and {MAX_PERMITS}, not {permits}"),
        )
        .with_key(name));
    }
    store.capabilities().check_lock(&key_of(name), opts)?;
    let (deadline, try_only) = deadline_of(opts);
    let queue = take(
        store,
        &format!("{PREFIX}{name}/q"),
        opts,
        deadline,
        try_only,
    )
    .await?;
    let outcome = async {
        agree(store, name, permits, opts).await?;
        take_any(store, &slot_names(name, permits), opts, deadline, try_only).await
    }
    .await;
    let released = queue.release().await;
    let (slot, guard) = outcome.map_err(|e| e.with_key(name))?;
    if let Err(e) = released {
        // The queue lock's lease lapsed while this caller waited for a slot: harmless to the
        // permit (slots alone bound the holders), so the permit stands.
        tracing::debug!(semaphore = name, error = %e, "releasing the queue lock failed");
    }
    Ok(Permit::new(name, slot as u32, guard))
}

/// Implements [`DistSemaphore`](crate::DistSemaphore) and [`DistRwLock`](crate::DistRwLock)
/// for a backend type (`KvStore + DistLock`) with the layouts of
/// [`semaphore::via_lock`](crate::semaphore::via_lock) and
/// [`rwlock::via_lock`](crate::rwlock::via_lock).
#[macro_export]
macro_rules! recipes_via_lock {
    ($ty:ty) => {
        #[$crate::__async_trait]
        impl $crate::DistSemaphore for $ty {
            async fn acquire(
                &self,
                name: &str,
                permits: u32,
                opts: &$crate::LockOptions,
            ) -> $crate::Result<$crate::Permit> {
                $crate::semaphore::via_lock::acquire(self, name, permits, opts).await
            }
        }

        #[$crate::__async_trait]
        impl $crate::DistRwLock for $ty {
            async fn read(
                &self,
                name: &str,
                opts: &$crate::LockOptions,
            ) -> $crate::Result<$crate::LockGuard> {
                $crate::rwlock::via_lock::read(self, name, opts).await
            }

            async fn write(
                &self,
                name: &str,
                opts: &$crate::LockOptions,
            ) -> $crate::Result<$crate::LockGuard> {
                $crate::rwlock::via_lock::write(self, name, opts).await
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_records() {
        assert_eq!(
            slot_names("a/b", 2),
            vec!["_semaphores/a/b/s/0", "_semaphores/a/b/s/1"]
        );
        assert_eq!(parse_permits(b"3"), Some(3));
        assert_eq!(parse_permits(b"x"), None);
        let long = "x".repeat(crate::key::MAX_KEY_LEN - PREFIX.len() - SUFFIX_ROOM + 1);
        assert_eq!(
            validate_recipe_name(&long, PREFIX).unwrap_err().kind(),
            ErrorKind::InvalidKey
        );
        assert!(validate_recipe_name(&long[1..], PREFIX).is_ok());
    }
}
