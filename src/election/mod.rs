//! Leader election: [`Election`], with a [`LeaderGuard`] whose **term** is a fencing token.
//!
//! An election `NAME` has at most one leader at a time. A contender [`campaign`]s and, once it
//! is leader, holds a [`LeaderGuard`]: the guard's [`term`](LeaderGuard::term) strictly
//! increases with every new leader of `NAME` (hand it to the resources the leader writes, as
//! with a lock's fencing token), its [`lost`](LeaderGuard::lost) signal follows the same lease
//! clock as a lock's ([`crate::lease`]), and the leader publishes a value (its address, its
//! id) that everyone can read with [`leader`] or follow with [`observe`].
//!
//! Layouts: etcd uses etcd's own `v3election` layout (so `etcdctl elect` takes part in the
//! same elections); every other backend runs the election on its [`DistLock`] (the lock
//! `_elections/NAME`, whose fencing token is the term) and publishes the leader's value under
//! the key `_elections/NAME` (see [`via_lock`]). `docs/recipes.md` describes both.
//!
//! [`campaign`]: Election::campaign
//! [`leader`]: Election::leader
//! [`observe`]: Election::observe
//! [`DistLock`]: crate::DistLock

pub mod via_lock;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

use crate::error::{Error, ErrorKind, Result};
use crate::key::validate_lock_name;
use crate::lock::{FencingToken, LockGuard, LockOptions};

/// The leader of an election, as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The value the leader published (at [`Election::campaign`] or by
    /// [`LeaderGuard::proclaim`]).
    pub value: Vec<u8>,
    /// The leader's term: strictly greater than every earlier leader's of the same election.
    pub term: FencingToken,
}

/// The stream returned by [`Election::observe`]: the current leader first (`None`: no
/// leader), then every change.
pub type LeaderStream = Pin<Box<dyn Stream<Item = Result<Option<Leader>>> + Send + 'static>>;

/// The backend side of a leadership, next to the [`LockGuard`] it rests on. Backends implement
/// it; users see only [`LeaderGuard`].
#[async_trait]
pub trait LeaderHandle: Send + Sync + 'static {
    /// Publishes `value` as the leader's value. Called only while the lock guard is not lost.
    ///
    /// # Errors
    /// `LockLost` if the backend shows that this leadership has ended; `Unavailable`/`Timeout`.
    async fn proclaim(&self, value: Vec<u8>) -> Result<()>;

    /// Withdraws what the leadership published, before its lock guard is released.
    ///
    /// # Errors
    /// `Unavailable`/`Timeout` if the backend cannot be told.
    async fn resign(self: Box<Self>) -> Result<()> {
        Ok(())
    }

    /// As [`resign`](Self::resign), without waiting: called when a [`LeaderGuard`] is dropped.
    /// Must not block or panic, also outside a tokio runtime.
    fn resign_detached(self: Box<Self>) {}
}

/// A held leadership.
///
/// # Contract
/// - [`term`](Self::term) strictly increases with every new leader of the same election, and
///   is a fencing token: a resource that refuses terms lower than the highest it has seen
///   refuses a deposed leader's writes.
/// - [`lost`](Self::lost) and [`is_lost`](Self::is_lost) behave exactly as
///   [`LockGuard::lost`] and [`LockGuard::is_lost`]: they fire at the lease deadline (the send
///   time of the last confirmed renewal plus the TTL, minus the margin), or when the backend
///   shows that the leadership ended.
/// - [`proclaim`](Self::proclaim) changes the published value while leader.
/// - [`resign`](Self::resign) ends the leadership now; dropping the guard resigns in the
///   background, without blocking or panicking.
pub struct LeaderGuard {
    lock: Option<LockGuard>,
    handle: Option<Box<dyn LeaderHandle>>,
    name: String,
    term: FencingToken,
}

impl fmt::Debug for LeaderGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderGuard")
            .field("name", &self.name)
            .field("term", &self.term)
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl LeaderGuard {
    /// Builds a guard from the lock guard of the leadership (whose token is the term) and the
    /// backend's handle. For backend implementations.
    pub fn new(name: impl Into<String>, lock: LockGuard, handle: Box<dyn LeaderHandle>) -> Self {
        LeaderGuard {
            term: lock.token(),
            lock: Some(lock),
            handle: Some(handle),
            name: name.into(),
        }
    }

    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This leadership's term: a fencing token.
    pub fn term(&self) -> FencingToken {
        self.term
    }

    /// Whether this process may no longer be leader (see [`LockGuard::is_lost`]).
    pub fn is_lost(&self) -> bool {
        self.lock.as_ref().is_none_or(|l| l.is_lost())
    }

    /// A future that resolves as soon as this process may no longer be leader. It does not
    /// borrow the guard.
    pub fn lost(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        match &self.lock {
            Some(l) => Box::pin(l.lost()),
            None => Box::pin(async {}),
        }
    }

    /// Publishes `value` as the leader's value.
    ///
    /// # Errors
    /// `LockLost` if the leadership is lost; `ValueTooLarge`; `Unavailable`/`Timeout`.
    pub async fn proclaim(&self, value: impl Into<Vec<u8>>) -> Result<()> {
        if self.is_lost() {
            return Err(self.not_leader());
        }
        match &self.handle {
            Some(h) => h.proclaim(value.into()).await,
            None => Err(self.not_leader()),
        }
    }

    fn not_leader(&self) -> Error {
        Error::new(
            ErrorKind::LockLost,
            "coordkit",
            "the leadership was lost; nothing was proclaimed",
        )
        .with_key(self.name.clone())
    }

    /// Stops renewing the lease, as if this process were paused (fault tests; feature
    /// `test-hooks`).
    #[doc(hidden)]
    #[cfg(feature = "test-hooks")]
    pub fn suspend_keep_alive(&self) {
        if let Some(l) = &self.lock {
            l.suspend_keep_alive();
        }
    }

    /// Resigns: withdraws the published value and releases the leadership, so that the next
    /// contender takes over at once.
    ///
    /// # Errors
    /// `LockLost` if the leadership had already been lost; `Unavailable`/`Timeout` if the
    /// backend could not be told (the lease then runs out by itself).
    pub async fn resign(mut self) -> Result<()> {
        let handle = self.handle.take();
        let r1 = match handle {
            Some(h) => h.resign().await,
            None => Ok(()),
        };
        let r2 = match self.lock.take() {
            Some(l) => l.release().await,
            None => Ok(()),
        };
        r2.and(r1)
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.resign_detached();
        }
        // Dropping the lock guard releases it in the background.
        self.lock.take();
    }
}

/// Leader election over a coordinator.
///
/// Election names follow the lock-name grammar ([`crate::key`]).
///
/// # Contract
/// - At most one [`LeaderGuard`] of an election is un-lost at any time, across all clients of
///   the same backend cluster, as long as leases are renewed in time.
/// - Every new leader's term is greater than every earlier leader's.
/// - A crashed leader blocks the election for at most the TTL (times the backend's
///   [`lease_expiry_factor`](crate::Capabilities::lease_expiry_factor)).
/// - Contenders wait on the backend's notifications, not by polling.
#[async_trait]
pub trait Election: Send + Sync + fmt::Debug {
    /// Waits (at most `opts.wait`) to become leader of `name`, then publishes `value`.
    ///
    /// # Errors
    /// As [`DistLock::lock`](crate::DistLock::lock): `Timeout` when `opts.wait` runs out (the
    /// attempt leaves nothing behind), `LockLost`, `InvalidKey` for a bad name,
    /// `InvalidArgument` for a TTL out of range, `ValueTooLarge`, `Unavailable`, `Timeout`.
    async fn campaign(&self, name: &str, value: Vec<u8>, opts: &LockOptions)
        -> Result<LeaderGuard>;

    /// The current leader of `name` and its value, `None` if there is none.
    ///
    /// # Errors
    /// `InvalidKey`; `Unavailable`/`Timeout`.
    async fn leader(&self, name: &str) -> Result<Option<Leader>>;

    /// Follows the leader of `name`: the first item is the state when this is called, then
    /// one item per change (a new leader, a proclaimed value, no leader), in order. A change
    /// that leaves the published state as it was is not repeated.
    ///
    /// # Errors
    /// `InvalidKey`; `Unsupported` where the backend has no watch; `Unavailable`/`Timeout`.
    /// The stream ends with an error item if the backend cannot go on following.
    async fn observe(&self, name: &str) -> Result<LeaderStream>;
}

/// Checks an election name: the lock-name grammar, with room for the backend's prefix.
pub fn validate_election_name(name: &str) -> Result<()> {
    validate_lock_name(name)?;
    if name.len() + via_lock::PREFIX.len() > crate::key::MAX_KEY_LEN {
        return Err(Error::new(
            ErrorKind::InvalidKey,
            "coordkit",
            format!(
                "election name is longer than {} bytes",
                crate::key::MAX_KEY_LEN - via_lock::PREFIX.len()
            ),
        )
        .with_key(name.chars().take(80).collect::<String>()));
    }
    Ok(())
}
