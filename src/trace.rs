//! `tracing` spans around backend calls: [`Traced`].
//!
//! [`connect`](crate::connect) wraps every backend it returns in [`Traced`], so each
//! [`KvStore`] and [`DistLock`] call runs inside a `DEBUG` span named after the operation
//! (`coordkit.get`, `coordkit.put`, `coordkit.delete`, `coordkit.cas`, `coordkit.list`,
//! `coordkit.watch`, `coordkit.lock`, `coordkit.try_lock`, and for the recipes
//! `coordkit.campaign`, `coordkit.leader`, `coordkit.observe`, `coordkit.acquire`,
//! `coordkit.read_lock`, `coordkit.write_lock`) with the fields `backend` and `key`
//! (or `prefix`, `lock`), and on completion `error` (the [`ErrorKind`](crate::ErrorKind)) or a
//! result summary (`found`, `version`, `count`, `token`, `acquired`).
//!
//! Values and credentials are never recorded. Without a `tracing` subscriber nothing is
//! printed and the cost is a few nanoseconds per call. To see the spans, install a subscriber,
//! for example with `tracing-subscriber`:
//!
//! ```ignore
//! tracing_subscriber::fmt()
//!     .with_env_filter("coordkit=debug")
//!     .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
//!     .init();
//! ```
//!
//! The `coordkit` command shows them with `-v`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use tracing::field::Empty;
use tracing::{debug_span, Instrument, Span};

use crate::caps::Capabilities;
use crate::election::{Election, Leader, LeaderGuard, LeaderStream};
use crate::error::Result;
use crate::kv::{Consistency, Entry, Expect, KvStore, PutOptions, Version, WatchStream};
use crate::lock::{DistLock, LockGuard, LockOptions};
use crate::rwlock::DistRwLock;
use crate::semaphore::{DistSemaphore, Permit};
use crate::Backend;

/// A backend whose every call is wrapped in a `tracing` span (see the [module docs](self)).
///
/// It behaves exactly as the backend it wraps: same results, errors and capabilities.
pub struct Traced<B: ?Sized> {
    backend: &'static str,
    inner: Arc<B>,
}

impl<B: KvStore + ?Sized> Traced<B> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<B>) -> Self {
        Traced {
            backend: inner.capabilities().backend,
            inner,
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &Arc<B> {
        &self.inner
    }
}

/// Wraps a backend in [`Traced`]. What [`connect`](crate::connect) applies.
pub fn traced(inner: Arc<dyn Backend>) -> Arc<dyn Backend> {
    Arc::new(Traced::new(inner))
}

impl<B: fmt::Debug + ?Sized> fmt::Debug for Traced<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

fn finish<T>(span: &Span, r: &Result<T>) {
    if let Err(e) = r {
        span.record("error", e.kind().as_str());
    }
}

/// The future of a backend call, as `async_trait` declares it.
type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Runs `call` inside `span`, then records the outcome: `done` (a result summary) and the
/// error kind. When no subscriber wants the span, `call` is returned as it is: nothing is
/// recorded, and the call costs no second future.
fn in_span<'a, T: Send + 'a>(span: Span, call: Call<'a, T>, done: fn(&Span, &T)) -> Call<'a, T> {
    if span.is_disabled() {
        return call;
    }
    Box::pin(async move {
        let r = call.instrument(span.clone()).await;
        if let Ok(v) = &r {
            done(&span, v);
        }
        finish(&span, &r);
        r
    })
}

/// Whether no `tracing` dispatcher, global or scoped, was ever set in this process. Then no
/// span can be wanted, and a call goes straight to the backend without building one (a
/// disabled span still costs its fields' recording when `tracing`'s `log` feature is on).
fn untraced() -> bool {
    !tracing::dispatcher::has_been_set()
}

/// A `done` for calls without a result summary.
fn nothing<T>(_: &Span, _: &T) {}

// The methods are written out as `async_trait` declares them (not as `async fn`), so that a
// call without a subscriber returns the backend's own future.
#[async_trait]
impl<B: KvStore + ?Sized> KvStore for Traced<B> {
    fn get<'s, 'k, 'f>(&'s self, key: &'k str, consistency: Consistency) -> Call<'f, Option<Entry>>
    where
        's: 'f,
        'k: 'f,
        Self: 'f,
    {
        if untraced() {
            return self.inner.get(key, consistency);
        }
        let span = debug_span!("coordkit.get", backend = self.backend, key, consistency = ?consistency, found = Empty, error = Empty);
        in_span(span, self.inner.get(key, consistency), |span, found| {
            span.record("found", found.is_some());
        })
    }

    fn put<'s, 'k, 'f>(
        &'s self,
        key: &'k str,
        value: Vec<u8>,
        opts: PutOptions,
    ) -> Call<'f, Version>
    where
        's: 'f,
        'k: 'f,
        Self: 'f,
    {
        if untraced() {
            return self.inner.put(key, value, opts);
        }
        let span = debug_span!(
            "coordkit.put",
            backend = self.backend,
            key,
            bytes = value.len(),
            ttl = ?opts.ttl,
            version = Empty,
            error = Empty
        );
        in_span(span, self.inner.put(key, value, opts), |span, v| {
            span.record("version", v.as_raw());
        })
    }

    fn delete<'s, 'k, 'f>(&'s self, key: &'k str) -> Call<'f, ()>
    where
        's: 'f,
        'k: 'f,
        Self: 'f,
    {
        if untraced() {
            return self.inner.delete(key);
        }
        let span = debug_span!(
            "coordkit.delete",
            backend = self.backend,
            key,
            error = Empty
        );
        in_span(span, self.inner.delete(key), nothing)
    }

    fn compare_and_swap<'s, 'k, 'f>(
        &'s self,
        key: &'k str,
        expect: Expect,
        new: Option<Vec<u8>>,
    ) -> Call<'f, Option<Version>>
    where
        's: 'f,
        'k: 'f,
        Self: 'f,
    {
        if untraced() {
            return self.inner.compare_and_swap(key, expect, new);
        }
        let span = debug_span!("coordkit.cas", backend = self.backend, key, expect = ?expect, delete = new.is_none(), error = Empty);
        in_span(span, self.inner.compare_and_swap(key, expect, new), nothing)
    }

    fn list<'s, 'p, 'f>(&'s self, prefix: &'p str, consistency: Consistency) -> Call<'f, Vec<Entry>>
    where
        's: 'f,
        'p: 'f,
        Self: 'f,
    {
        if untraced() {
            return self.inner.list(prefix, consistency);
        }
        let span = debug_span!("coordkit.list", backend = self.backend, prefix, consistency = ?consistency, count = Empty, error = Empty);
        in_span(
            span,
            self.inner.list(prefix, consistency),
            |span, entries| {
                span.record("count", entries.len());
            },
        )
    }

    fn watch<'s, 'p, 'f>(&'s self, prefix: &'p str) -> Call<'f, WatchStream>
    where
        's: 'f,
        'p: 'f,
        Self: 'f,
    {
        if untraced() {
            return self.inner.watch(prefix);
        }
        let span = debug_span!(
            "coordkit.watch",
            backend = self.backend,
            prefix,
            error = Empty
        );
        in_span(span, self.inner.watch(prefix), nothing)
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

#[async_trait]
impl<B: KvStore + DistLock + ?Sized> DistLock for Traced<B> {
    fn lock<'s, 'n, 'o, 'f>(&'s self, name: &'n str, opts: &'o LockOptions) -> Call<'f, LockGuard>
    where
        's: 'f,
        'n: 'f,
        'o: 'f,
        Self: 'f,
    {
        if untraced() {
            return self.inner.lock(name, opts);
        }
        let span = debug_span!("coordkit.lock", backend = self.backend, lock = name, ttl = ?opts.ttl, wait = ?opts.wait, token = Empty, error = Empty);
        in_span(span, self.inner.lock(name, opts), |span, g| {
            span.record("token", g.token().get());
        })
    }

    fn try_lock<'s, 'n, 'o, 'f>(
        &'s self,
        name: &'n str,
        opts: &'o LockOptions,
    ) -> Call<'f, Option<LockGuard>>
    where
        's: 'f,
        'n: 'f,
        'o: 'f,
        Self: 'f,
    {
        if untraced() {
            return self.inner.try_lock(name, opts);
        }
        let span = debug_span!("coordkit.try_lock", backend = self.backend, lock = name, ttl = ?opts.ttl, acquired = Empty, token = Empty, error = Empty);
        in_span(span, self.inner.try_lock(name, opts), |span, g| {
            span.record("acquired", g.is_some());
            if let Some(g) = g {
                span.record("token", g.token().get());
            }
        })
    }
}

#[async_trait]
impl<B: Election + KvStore + ?Sized> Election for Traced<B> {
    async fn campaign(
        &self,
        name: &str,
        value: Vec<u8>,
        opts: &LockOptions,
    ) -> Result<LeaderGuard> {
        let span = debug_span!("coordkit.campaign", backend = self.backend, election = name, ttl = ?opts.ttl, wait = ?opts.wait, term = Empty, error = Empty);
        let r = self
            .inner
            .campaign(name, value, opts)
            .instrument(span.clone())
            .await;
        if let Ok(g) = &r {
            span.record("term", g.term().get());
        }
        finish(&span, &r);
        r
    }

    async fn leader(&self, name: &str) -> Result<Option<Leader>> {
        let span = debug_span!(
            "coordkit.leader",
            backend = self.backend,
            election = name,
            error = Empty
        );
        let r = self.inner.leader(name).instrument(span.clone()).await;
        finish(&span, &r);
        r
    }

    async fn observe(&self, name: &str) -> Result<LeaderStream> {
        let span = debug_span!(
            "coordkit.observe",
            backend = self.backend,
            election = name,
            error = Empty
        );
        let r = self.inner.observe(name).instrument(span.clone()).await;
        finish(&span, &r);
        r
    }
}

#[async_trait]
impl<B: DistSemaphore + ?Sized> DistSemaphore for Traced<B> {
    async fn acquire(&self, name: &str, permits: u32, opts: &LockOptions) -> Result<Permit> {
        let span = debug_span!("coordkit.acquire", backend = self.backend, semaphore = name, permits, ttl = ?opts.ttl, wait = ?opts.wait, slot = Empty, token = Empty, error = Empty);
        let r = self
            .inner
            .acquire(name, permits, opts)
            .instrument(span.clone())
            .await;
        if let Ok(p) = &r {
            span.record("slot", p.slot());
            span.record("token", p.token().get());
        }
        finish(&span, &r);
        r
    }
}

#[async_trait]
impl<B: DistRwLock + ?Sized> DistRwLock for Traced<B> {
    async fn read(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        let span = debug_span!("coordkit.read_lock", backend = self.backend, rwlock = name, ttl = ?opts.ttl, wait = ?opts.wait, token = Empty, error = Empty);
        let r = self.inner.read(name, opts).instrument(span.clone()).await;
        if let Ok(g) = &r {
            span.record("token", g.token().get());
        }
        finish(&span, &r);
        r
    }

    async fn write(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        let span = debug_span!("coordkit.write_lock", backend = self.backend, rwlock = name, ttl = ?opts.ttl, wait = ?opts.wait, token = Empty, error = Empty);
        let r = self.inner.write(name, opts).instrument(span.clone()).await;
        if let Ok(g) = &r {
            span.record("token", g.token().get());
        }
        finish(&span, &r);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DistLockExt, ErrorKind, MemoryStore};

    #[tokio::test]
    async fn behaves_like_the_inner_backend() {
        let inner = MemoryStore::new();
        let t = traced(Arc::new(inner.clone()));
        assert_eq!(t.capabilities(), inner.capabilities());
        let v = t
            .put("a/b", b"x".to_vec(), PutOptions::default())
            .await
            .unwrap();
        let e = inner
            .get("a/b", Consistency::Strong)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((e.value, e.version), (b"x".to_vec(), v));
        assert_eq!(t.list("a/", Consistency::Stale).await.unwrap().len(), 1);
        let err = t.get("/bad", Consistency::Strong).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidKey);
        let g = t.lock("l", &LockOptions::new()).await.unwrap();
        assert!(t
            .try_lock("l", &LockOptions::new())
            .await
            .unwrap()
            .is_none());
        g.release().await.unwrap();
        let token = t
            .run_locked("l", &LockOptions::new(), |c| async move { c.token() })
            .await
            .unwrap();
        assert!(token.get() > 0);
    }
}
