//! Leader election on any backend's [`DistLock`] and [`KvStore`], for backends without a
//! native election layout (memory, ZooKeeper, Consul, SQLite, `file://`).
//!
//! Layout of election `NAME`:
//! - leadership is the lock `_elections/NAME`; the term is the lock's fencing token (so terms
//!   increase exactly as that lock's tokens do);
//! - the leader publishes the key `_elections/NAME` with the value `<term>\n<value>`. On
//!   backends with key TTLs the key has the lock's TTL and the leader rewrites it every third
//!   of it, so a crashed leader's key disappears about when its lock does; on backends
//!   without, it stays until the next leader replaces it (and a leader that resigns deletes
//!   it).
//!
//! A record is only ever replaced by one of the same or a higher term, so a deposed leader
//! that has not noticed yet cannot hide its successor for longer than one rewrite interval;
//! readers take the record's term, never a stale lower one after a higher one.
//!
//! Between the new leader's lock grant and its first write, [`leader`] still shows the
//! previous record (or none). [`observe`] opens the watch of the record before reading it, so
//! no change after the call is missed; but changes committed while the call is being set up
//! (between opening the watch and reading the record) are delivered after the first item, which
//! already reflects them, so an item can repeat an earlier state before the current one comes
//! again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{validate_election_name, Leader, LeaderGuard, LeaderHandle, LeaderStream};
use crate::error::{Error, ErrorKind, Result};
use crate::kv::{Consistency, Entry, Expect, KvStore, PutOptions, WatchEvent};
use crate::lock::{DistLock, FencingToken, LockOptions};

/// The prefix of the lock and of the record key of an election.
pub const PREFIX: &str = "_elections/";

/// The lock name and record key of election `name`.
pub fn key_of(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn encode(term: FencingToken, value: &[u8]) -> Vec<u8> {
    let mut out = format!("{}\n", term.get()).into_bytes();
    out.extend_from_slice(value);
    out
}

/// Parses a record; `None` if it is not one.
pub fn decode(raw: &[u8]) -> Option<Leader> {
    let nl = raw.iter().position(|&b| b == b'\n')?;
    let term: u64 = std::str::from_utf8(&raw[..nl]).ok()?.parse().ok()?;
    Some(Leader {
        value: raw[nl + 1..].to_vec(),
        term: FencingToken::from_raw(term),
    })
}

fn record(entry: Option<Entry>) -> Option<Leader> {
    entry.and_then(|e| decode(&e.value))
}

/// How often a leader rewrites its record on a backend with key TTLs.
fn refresh_interval(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(50))
}

struct Shared<S> {
    store: S,
    key: String,
    name: String,
    term: FencingToken,
    ttl: Option<Duration>,
    value: Mutex<Vec<u8>>,
    /// Serializes writes of the record by this leader.
    writing: tokio::sync::Mutex<()>,
    stop: CancellationToken,
}

impl<S: KvStore> Shared<S> {
    fn deposed(&self) -> Error {
        Error::new(
            ErrorKind::LockLost,
            "coordkit",
            "a newer leader has published its record",
        )
        .with_key(self.name.clone())
    }

    /// Writes the record unless a newer leader's is there.
    async fn write(&self) -> Result<()> {
        let _w = self.writing.lock().await;
        if self.stop.is_cancelled() {
            return Err(self.deposed());
        }
        let current = record(self.store.get(&self.key, Consistency::Strong).await?);
        if current.as_ref().is_some_and(|c| c.term > self.term) {
            self.stop.cancel();
            return Err(self.deposed());
        }
        let value = encode(
            self.term,
            &self.value.lock().unwrap_or_else(|p| p.into_inner()),
        );
        let opts = match self.ttl {
            Some(ttl) => PutOptions::ttl(ttl),
            None => PutOptions::default(),
        };
        self.store.put(&self.key, value, opts).await?;
        Ok(())
    }

    /// Deletes the record if it is this leader's.
    async fn withdraw(&self) -> Result<()> {
        self.stop.cancel();
        let _w = self.writing.lock().await;
        for _ in 0..3 {
            let Some(e) = self.store.get(&self.key, Consistency::Strong).await? else {
                return Ok(());
            };
            if decode(&e.value).is_none_or(|l| l.term != self.term) {
                return Ok(());
            }
            if self
                .store
                .compare_and_swap(&self.key, Expect::Version(e.version), None)
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        Ok(())
    }
}

struct Handle<S> {
    shared: Arc<Shared<S>>,
}

#[async_trait::async_trait]
impl<S: KvStore + 'static> LeaderHandle for Handle<S> {
    async fn proclaim(&self, value: Vec<u8>) -> Result<()> {
        self.shared
            .store
            .capabilities()
            .check_value(&self.shared.key, &value)?;
        *self.shared.value.lock().unwrap_or_else(|p| p.into_inner()) = value;
        self.shared.write().await
    }

    async fn resign(self: Box<Self>) -> Result<()> {
        self.shared.withdraw().await
    }

    fn resign_detached(self: Box<Self>) {
        self.shared.stop.cancel();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = self.shared.withdraw().await {
                    tracing::debug!(error = %e, "withdrawing a leader record failed");
                }
            });
        }
    }
}

/// [`Election::campaign`](super::Election::campaign) on `store`'s lock and key-value store.
pub async fn campaign<S>(
    store: &S,
    name: &str,
    value: Vec<u8>,
    opts: &LockOptions,
) -> Result<LeaderGuard>
where
    S: KvStore + DistLock + Clone + 'static,
{
    validate_election_name(name)?;
    let key = key_of(name);
    let caps = store.capabilities();
    caps.check_value(&key, &encode(FencingToken::from_raw(u64::MAX), &value))?;
    let lock = store.lock(&key, opts).await?;
    let shared = Arc::new(Shared {
        store: store.clone(),
        key,
        name: name.to_string(),
        term: lock.token(),
        ttl: caps.key_ttl.then_some(opts.ttl),
        value: Mutex::new(value),
        writing: tokio::sync::Mutex::new(()),
        stop: CancellationToken::new(),
    });
    let guard = LeaderGuard::new(
        name,
        lock,
        Box::new(Handle {
            shared: shared.clone(),
        }),
    );
    shared.write().await?;
    if let Some(ttl) = shared.ttl {
        let lost = guard.lost();
        let weak = Arc::downgrade(&shared);
        let stop = shared.stop.clone();
        tokio::spawn(async move {
            tokio::pin!(lost);
            loop {
                tokio::select! {
                    _ = &mut lost => return,
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(refresh_interval(ttl)) => {}
                }
                let Some(shared) = weak.upgrade() else { return };
                if let Err(e) = shared.write().await {
                    tracing::debug!(election = %shared.name, error = %e, "rewriting the leader record failed");
                }
            }
        });
    }
    Ok(guard)
}

/// [`Election::leader`](super::Election::leader): the published record.
pub async fn leader<S: KvStore + ?Sized>(store: &S, name: &str) -> Result<Option<Leader>> {
    validate_election_name(name)?;
    Ok(record(store.get(&key_of(name), Consistency::Strong).await?))
}

/// [`Election::observe`](super::Election::observe): a watch of the record.
pub async fn observe<S: KvStore + ?Sized>(store: &S, name: &str) -> Result<LeaderStream> {
    validate_election_name(name)?;
    let key = key_of(name);
    let watch = store.watch(&key).await?;
    let first = record(store.get(&key, Consistency::Strong).await?);
    let state = (watch, Some(first.clone()), key);
    let rest = futures::stream::unfold(state, |(mut watch, mut last, key)| async move {
        loop {
            let ev = watch.next().await?;
            let now = match ev {
                Err(e) => return Some((Err(e), (watch, last, key))),
                Ok(ev) if ev.key() != key => continue,
                Ok(WatchEvent::Put(e)) => decode(&e.value),
                Ok(WatchEvent::Delete { .. }) => None,
                Ok(WatchEvent::Coalesced { .. }) => continue,
            };
            if last.as_ref() == Some(&now) {
                continue;
            }
            last = Some(now.clone());
            return Some((Ok(now), (watch, last, key)));
        }
    });
    Ok(Box::pin(
        futures::stream::once(async move { Ok(first) }).chain(rest),
    ))
}

/// Implements [`Election`](crate::Election) for a backend type (`Clone + KvStore + DistLock`)
/// with the layout of [`via_lock`](crate::election::via_lock).
#[macro_export]
macro_rules! election_via_lock {
    ($ty:ty) => {
        #[$crate::__async_trait]
        impl $crate::Election for $ty {
            async fn campaign(
                &self,
                name: &str,
                value: Vec<u8>,
                opts: &$crate::LockOptions,
            ) -> $crate::Result<$crate::LeaderGuard> {
                $crate::election::via_lock::campaign(self, name, value, opts).await
            }

            async fn leader(&self, name: &str) -> $crate::Result<Option<$crate::Leader>> {
                $crate::election::via_lock::leader(self, name).await
            }

            async fn observe(&self, name: &str) -> $crate::Result<$crate::LeaderStream> {
                $crate::election::via_lock::observe(self, name).await
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let raw = encode(FencingToken::from_raw(42), b"a\nb");
        let l = decode(&raw).unwrap();
        assert_eq!(l.term.get(), 42);
        assert_eq!(l.value, b"a\nb");
        assert!(decode(b"x\ny").is_none());
        assert!(decode(b"12").is_none());
    }
}
