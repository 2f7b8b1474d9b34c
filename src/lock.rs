//! The lock contract: [`DistLock`], [`LockGuard`] with its fencing token and lost signal, and
//! the lock-guarded job helper [`DistLockExt::run_locked`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};
use crate::lease::Lease;

/// The default lock TTL: how long a holder that stops renewing (crashed, paused, partitioned)
/// keeps others out.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(15);

/// Options of [`DistLock::lock`] and [`DistLock::try_lock`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockOptions {
    /// The lease/session TTL. The lock is renewed in the background while held; if renewal
    /// stops, `lost()` fires within this TTL (at the lease deadline, see [`crate::lease`]),
    /// while other clients may have to wait up to TTL ×
    /// [`lease_expiry_factor`](crate::Capabilities::lease_expiry_factor) before they can take
    /// it. Default 15 s.
    pub ttl: Duration,
    /// How long [`DistLock::lock`] waits before giving up with `Timeout`. `None` waits without
    /// bound. Ignored by `try_lock`.
    pub wait: Option<Duration>,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            ttl: DEFAULT_LOCK_TTL,
            wait: None,
        }
    }
}

impl LockOptions {
    /// The defaults: 15 s TTL, unbounded wait.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Bounds the wait of [`DistLock::lock`].
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }
}

/// A number that strictly increases with every acquisition of a lock.
///
/// Hand it to the resource the lock protects, and have the resource reject any write that
/// carries a token lower than the highest it has seen (see [`crate::fencing::FencedResource`]).
/// That is what keeps a paused holder, whose lease expired without it noticing, from
/// overwriting the work of the next holder.
///
/// Where it comes from: etcd, the lock key's create revision; ZooKeeper, the lock node's czxid;
/// Consul, the ModifyIndex of the acquiring write; memory, a store-wide counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// Wraps a backend's raw token. For backend implementations.
    pub const fn from_raw(raw: u64) -> Self {
        FencingToken(raw)
    }

    /// The token as a number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The backend side of a held lock. Backends implement it; users see only [`LockGuard`].
#[async_trait]
pub trait LockHandle: Send + Sync + 'static {
    /// Releases the lock and stops its keep-alive. Idempotent with respect to a lock that was
    /// already lost.
    ///
    /// # Errors
    /// `Unavailable`/`Timeout` if the backend cannot be told; the lease then runs out by itself.
    async fn release(self: Box<Self>) -> Result<()>;

    /// Releases without waiting: called when a [`LockGuard`] is dropped. Must not block and
    /// must not panic, also outside a tokio runtime (then the TTL frees the lock).
    fn release_detached(self: Box<Self>) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = self.release().await {
                    tracing::debug!(error = %e, "background lock release failed");
                }
            });
        }
    }

    /// Stops renewing the lease, as if the holder process were paused; the lock is then lost
    /// once the TTL runs out, and `lost`, the guard's signal, must fire before that. It is
    /// passed here for a backend that fires it from nowhere else, so that such a backend need
    /// not keep a second handle on it. A hook for fault tests, reached through
    /// `LockGuard::suspend_keep_alive` (feature `test-hooks`); not part of the API.
    #[doc(hidden)]
    fn suspend_keep_alive(&self, lost: &CancellationToken);

    /// Whether the backend already knows, without asking the server, that the lock may no
    /// longer be held. [`LockGuard::is_lost`] consults it; the default is `false` (the backend
    /// fires the guard's lost signal instead).
    fn is_lost(&self) -> bool {
        false
    }
}

/// A held lock.
///
/// # Contract
/// - [`token`](Self::token) strictly increases with every acquisition of the same lock.
/// - While the guard lives, the lease is renewed in the background.
/// - [`lost`](Self::lost) resolves as soon as the lock may no longer be held: lease or session
///   expired, keep-alive failing for the TTL, lock key deleted by someone else, or the guard
///   released. After that, writes made under the lock must be fenced by the token to be safe.
/// - [`release`](Self::release) releases now; dropping the guard releases in the background
///   without blocking or panicking.
pub struct LockGuard {
    name: Arc<str>,
    token: FencingToken,
    lost: CancellationToken,
    lease: Option<Lease>,
    /// The runtime the guard was made on: a guard dropped outside any runtime releases there.
    rt: Option<tokio::runtime::Handle>,
    handle: Option<Box<dyn LockHandle>>,
    /// Whether [`release`](Self::release) has fired `lost`, so that the drop need not again.
    fired: bool,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.name)
            .field("token", &self.token)
            .field("lost", &self.lost.is_cancelled())
            .finish()
    }
}

impl LockGuard {
    /// Builds a guard. For backend implementations: `lost` must be cancelled by the backend the
    /// moment the lock may no longer be held.
    pub fn new(
        name: impl Into<Arc<str>>,
        token: FencingToken,
        lost: CancellationToken,
        handle: Box<dyn LockHandle>,
    ) -> Self {
        LockGuard {
            name: name.into(),
            token,
            lost,
            lease: None,
            rt: tokio::runtime::Handle::try_current().ok(),
            handle: Some(handle),
            fired: false,
        }
    }

    /// Ties the guard to the [`Lease`] clock its lock depends on: [`is_lost`](Self::is_lost)
    /// then also compares the clock with the lease's deadline, so it is right even before the
    /// lease's timer task has run. `lost` (given to [`new`](Self::new)) should be a child of
    /// [`Lease::lost_token`]. For backend implementations.
    pub fn with_lease(mut self, lease: &Lease) -> Self {
        self.lease = Some(lease.clone());
        self
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token of this acquisition.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// Whether the lock may no longer be held. Past the lease's deadline this is true even if
    /// the timer that fires [`lost`](Self::lost) has not run yet.
    pub fn is_lost(&self) -> bool {
        let lease_lost = self.lease.as_ref().is_some_and(|l| l.is_lost());
        if lease_lost || self.handle.as_ref().is_some_and(|h| h.is_lost()) {
            self.lost.cancel();
        }
        self.lost.is_cancelled()
    }

    /// A future that resolves as soon as the lock may no longer be held. It does not borrow the
    /// guard, so it can be moved into another task or a `select!`.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let token = self.lost.clone();
        async move { token.cancelled_owned().await }
    }

    /// Stops renewing the lease, as if this process were paused; the lock is then lost once
    /// the TTL runs out. A hook for fault tests (and the conformance suite), behind the
    /// `test-hooks` feature; not part of the API.
    #[doc(hidden)]
    #[cfg(feature = "test-hooks")]
    pub fn suspend_keep_alive(&self) {
        if let Some(h) = &self.handle {
            h.suspend_keep_alive(&self.lost);
        }
    }

    /// Releases the lock.
    ///
    /// # Errors
    /// `LockLost` if the lock had already been lost (the backend's state is cleaned up anyway);
    /// `Unavailable`/`Timeout` if the backend could not be told, in which case the lease runs
    /// out by itself after the TTL.
    pub async fn release(mut self) -> Result<()> {
        let was_lost = self.is_lost();
        let result = match self.handle.take() {
            Some(h) => h.release().await,
            None => Ok(()),
        };
        self.lost.cancel();
        self.fired = true;
        result?;
        if was_lost {
            return Err(Error::new(
                ErrorKind::LockLost,
                "coordkit",
                "the lock was lost before it was released",
            )
            .with_key(&*self.name));
        }
        Ok(())
    }
}

impl LockGuard {
    /// One guard over several held locks (the parts of a recipe's hold): lost as soon as any
    /// part is, released by releasing every part.
    pub(crate) fn combine(name: &str, token: FencingToken, parts: Vec<LockGuard>) -> LockGuard {
        let lost = CancellationToken::new();
        let signals: Vec<_> = parts.iter().map(|g| Box::pin(g.lost())).collect();
        let fire = lost.clone();
        if !signals.is_empty() {
            tokio::spawn(async move {
                tokio::select! {
                    _ = futures::future::select_all(signals) => fire.cancel(),
                    _ = fire.cancelled() => {}
                }
            });
        }
        LockGuard::new(name, token, lost, Box::new(Parts(parts)))
    }
}

/// The handle of a [`LockGuard::combine`]d guard.
struct Parts(Vec<LockGuard>);

#[async_trait]
impl LockHandle for Parts {
    async fn release(self: Box<Self>) -> Result<()> {
        let results = futures::future::join_all(self.0.into_iter().map(|g| g.release())).await;
        // A part that was lost made the whole guard lost, which its own release reports.
        results
            .into_iter()
            .filter(|r| !r.as_ref().is_err_and(|e| e.is(ErrorKind::LockLost)))
            .collect::<Result<Vec<()>>>()
            .map(|_| ())
    }

    fn release_detached(self: Box<Self>) {
        // Each part's drop releases it in the background.
        drop(self);
    }

    fn suspend_keep_alive(&self, _lost: &CancellationToken) {
        for p in &self.0 {
            if let Some(h) = &p.handle {
                h.suspend_keep_alive(&p.lost);
            }
        }
    }

    fn is_lost(&self) -> bool {
        self.0.iter().any(|p| p.is_lost())
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            // Outside any runtime (a guard moved to a plain thread), the release runs on the
            // runtime the guard was made on, if it still runs.
            let _entered = match (tokio::runtime::Handle::try_current(), &self.rt) {
                (Err(_), Some(rt)) => Some(rt.enter()),
                _ => None,
            };
            h.release_detached();
        }
        // A release whose future was dropped before the backend answered did not fire it.
        if !self.fired {
            self.lost.cancel();
        }
    }
}

/// Distributed locks over a coordinator.
///
/// Lock names follow the key grammar ([`crate::key`]) in a namespace of their own.
///
/// # Contract
/// - At most one [`LockGuard`] for a name is un-lost at any time, across all clients of the
///   same backend cluster, as long as leases are renewed in time. A holder that cannot renew
///   sees [`LockGuard::lost`] fire; correctness under pauses needs the fencing token.
/// - Waiters are woken by the backend (no polling). Where the backend keeps a queue (memory,
///   etcd, ZooKeeper) they are served in arrival order and each waits only on its predecessor;
///   Consul keeps no queue, so its waiters race on each release (see its backend docs).
/// - A crashed holder blocks others for at most the TTL (times the backend's
///   `lease_expiry_factor`).
#[async_trait]
pub trait DistLock: Send + Sync + fmt::Debug {
    /// Acquires the lock `name`, waiting at most `opts.wait`.
    ///
    /// A wait too large to represent as a deadline (such as `Duration::MAX`) waits without
    /// bound.
    ///
    /// # Errors
    /// - `Timeout` when `opts.wait` runs out (no trace of the attempt is left behind, and the
    ///   call returns within `wait` plus one request timeout at most);
    /// - `LockLost` when the lease or session this attempt depends on was lost (expired, or
    ///   not renewable within its TTL) before the lock was granted, on every backend;
    /// - `InvalidKey` for a bad name; `InvalidArgument` for a TTL below
    ///   [`min_lock_ttl`](crate::Capabilities::min_lock_ttl) or one the server would not honour;
    /// - `Unavailable` when the backend cannot be reached, `Timeout` when a single request to
    ///   it got no answer within the backend's request timeout (see the error's message).
    async fn lock(&self, name: &str, opts: &LockOptions) -> Result<LockGuard>;

    /// Acquires the lock `name` if it is free right now; `Ok(None)` at once if it is held (or
    /// others are already queued for it).
    ///
    /// # Errors
    /// As [`lock`](Self::lock), without `Timeout` from waiting.
    async fn try_lock(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>>;
}

/// What a lock-guarded job receives: the fencing token and the lost signal.
#[derive(Debug, Clone)]
pub struct JobContext {
    name: String,
    token: FencingToken,
    lost: CancellationToken,
}

impl JobContext {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token: pass it with every write to the protected resource.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// Whether the lock may no longer be held.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Resolves when the lock may no longer be held.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let token = self.lost.clone();
        async move { token.cancelled_owned().await }
    }
}

/// Conveniences over any [`DistLock`].
#[async_trait]
pub trait DistLockExt: DistLock {
    /// Runs `job` while holding the lock `name`, then releases it.
    ///
    /// The job receives a [`JobContext`] with the fencing token and the lost signal. If the lock
    /// is lost while the job runs, the job's future is dropped at its next await point
    /// (cancelled) and the call returns `LockLost`; jobs that must not stop half-way should
    /// watch [`JobContext::lost`] themselves and fence their writes with the token.
    ///
    /// # Errors
    /// Whatever [`DistLock::lock`] returns; `LockLost` if the lock was lost during the job.
    /// A failure to release after the job completed is logged, not returned: the lease runs out
    /// by itself.
    async fn run_locked<F, Fut, T>(&self, name: &str, opts: &LockOptions, job: F) -> Result<T>
    where
        F: FnOnce(JobContext) -> Fut + Send,
        Fut: Future<Output = T> + Send,
        T: Send,
    {
        let guard = self.lock(name, opts).await?;
        let ctx = JobContext {
            name: guard.name().to_string(),
            token: guard.token(),
            lost: guard.lost.child_token(),
        };
        let lost = guard.lost();
        let out = tokio::select! {
            biased;
            _ = lost => None,
            out = job(ctx) => Some(out),
        };
        match out {
            Some(out) => {
                if let Err(e) = guard.release().await {
                    tracing::warn!(lock = name, error = %e, "releasing after a locked job failed");
                }
                Ok(out)
            }
            None => {
                let _ = guard.release().await;
                Err(Error::new(
                    ErrorKind::LockLost,
                    "coordkit",
                    "the lock was lost while the job ran; the job was cancelled",
                )
                .with_key(name))
            }
        }
    }
}

impl<T: DistLock + ?Sized> DistLockExt for T {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A lock whose guards are lost `after` the acquisition.
    #[derive(Debug)]
    struct LosingLock {
        after: Duration,
        released: Arc<AtomicBool>,
    }

    struct Handle(Arc<AtomicBool>);

    /// A handle whose release never completes.
    struct Stuck;

    #[async_trait]
    impl LockHandle for Stuck {
        async fn release(self: Box<Self>) -> Result<()> {
            futures::future::pending().await
        }
        fn suspend_keep_alive(&self, _lost: &CancellationToken) {}
    }

    /// `lost()` resolves once the guard is gone, also when its release was abandoned before the
    /// backend answered (a release under a timeout).
    #[tokio::test]
    async fn an_abandoned_release_still_fires_lost() {
        let guard = LockGuard::new(
            "l",
            FencingToken::from_raw(1),
            CancellationToken::new(),
            Box::new(Stuck),
        );
        let lost = guard.lost();
        let released = tokio::time::timeout(Duration::from_millis(20), guard.release()).await;
        assert!(released.is_err(), "the stuck release completed");
        let fired = tokio::time::timeout(Duration::from_secs(5), lost).await;
        assert!(
            fired.is_ok(),
            "lost() did not resolve after the guard was dropped"
        );
    }

    #[async_trait]
    impl LockHandle for Handle {
        async fn release(self: Box<Self>) -> Result<()> {
            self.0.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn suspend_keep_alive(&self, _lost: &CancellationToken) {}
    }

    #[async_trait]
    impl DistLock for LosingLock {
        async fn lock(&self, name: &str, _opts: &LockOptions) -> Result<LockGuard> {
            let lost = CancellationToken::new();
            let l2 = lost.clone();
            let after = self.after;
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                l2.cancel();
            });
            let handle = Box::new(Handle(self.released.clone()));
            Ok(LockGuard::new(
                name,
                FencingToken::from_raw(7),
                lost,
                handle,
            ))
        }
        async fn try_lock(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>> {
            self.lock(name, opts).await.map(Some)
        }
    }

    #[tokio::test]
    async fn run_locked_cancels_the_job_when_the_lock_is_lost() {
        let released = Arc::new(AtomicBool::new(false));
        let lock = LosingLock {
            after: Duration::from_millis(50),
            released: released.clone(),
        };
        let finished = Arc::new(AtomicBool::new(false));
        let f2 = finished.clone();
        let saw_signal = Arc::new(AtomicBool::new(false));
        let s2 = saw_signal.clone();
        let r = lock
            .run_locked("j", &LockOptions::new(), move |ctx| async move {
                assert_eq!(ctx.token().get(), 7);
                let lost = ctx.lost();
                tokio::spawn(async move {
                    lost.await;
                    s2.store(true, Ordering::SeqCst);
                });
                tokio::time::sleep(Duration::from_secs(5)).await;
                f2.store(true, Ordering::SeqCst);
            })
            .await;
        assert_eq!(r.unwrap_err().kind(), ErrorKind::LockLost);
        assert!(
            !finished.load(Ordering::SeqCst),
            "job ran to completion after loss"
        );
        assert!(
            released.load(Ordering::SeqCst),
            "lock not released after loss"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            saw_signal.load(Ordering::SeqCst),
            "job's lost signal did not fire"
        );
    }

    #[tokio::test]
    async fn run_locked_returns_the_job_output_and_releases() {
        let released = Arc::new(AtomicBool::new(false));
        let lock = LosingLock {
            after: Duration::from_secs(60),
            released: released.clone(),
        };
        let out = lock
            .run_locked("j", &LockOptions::new(), |ctx| async move {
                ctx.token().get() + 1
            })
            .await
            .unwrap();
        assert_eq!(out, 8);
        assert!(released.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn releasing_a_lost_guard_reports_lock_lost() {
        let lock = LosingLock {
            after: Duration::from_millis(1),
            released: Arc::new(AtomicBool::new(false)),
        };
        let g = lock.lock("j", &LockOptions::new()).await.unwrap();
        g.lost().await;
        assert!(g.is_lost());
        assert_eq!(g.release().await.unwrap_err().kind(), ErrorKind::LockLost);
    }
}
