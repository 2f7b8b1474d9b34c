//! Counting semaphores: [`DistSemaphore`], whose [`Permit`]s carry a fencing token per permit
//! slot.
//!
//! A semaphore `NAME` with `permits = N` lets at most `N` holders in at once, across all clients
//! of a backend cluster. Each holder occupies one of the `N` **slots**; its [`Permit`] says which
//! ([`Permit::slot`]) and carries that slot's fencing token ([`Permit::token`]), which strictly
//! increases with every new holder of the slot. A resource shared by several permit holders
//! fences per slot: it keeps the highest token seen for each slot and refuses lower ones.
//!
//! The number of permits is stored with the semaphore by its first user. A caller that asks for
//! another number gets `InvalidArgument` while the semaphore has holders; a semaphore nobody
//! holds takes the new number.
//!
//! The layout on every backend is built from its own locks ([`via_lock`]); `docs/recipes.md`
//! describes it.

pub mod via_lock;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;

use crate::error::Result;
use crate::lock::{FencingToken, LockGuard, LockOptions};

/// The largest number of permits a semaphore can have.
pub const MAX_PERMITS: u32 = 256;

/// A held permit of a semaphore.
///
/// # Contract
/// - At most `permits` un-lost permits of a semaphore exist at any time.
/// - [`token`](Self::token) strictly increases with every new holder of the same
///   [`slot`](Self::slot).
/// - [`lost`](Self::lost) and [`is_lost`](Self::is_lost) behave exactly as
///   [`LockGuard::lost`] and [`LockGuard::is_lost`].
/// - [`release`](Self::release) gives the permit back now; dropping the permit gives it back in
///   the background, without blocking or panicking.
pub struct Permit {
    guard: LockGuard,
    name: String,
    slot: u32,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("name", &self.name)
            .field("slot", &self.slot)
            .field("token", &self.guard.token())
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl Permit {
    /// Builds a permit from the lock guard of its slot. For backend implementations.
    pub fn new(name: impl Into<String>, slot: u32, guard: LockGuard) -> Self {
        Permit {
            guard,
            name: name.into(),
            slot,
        }
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which of the semaphore's slots this permit occupies: `0..permits`.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The fencing token of this permit: strictly greater than every earlier holder's of the
    /// same slot.
    pub fn token(&self) -> FencingToken {
        self.guard.token()
    }

    /// Whether this permit may no longer be held (see [`LockGuard::is_lost`]).
    pub fn is_lost(&self) -> bool {
        self.guard.is_lost()
    }

    /// A future that resolves as soon as this permit may no longer be held. It does not borrow
    /// the permit.
    pub fn lost(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(self.guard.lost())
    }

    /// Stops renewing the lease, as if this process were paused (fault tests; feature
    /// `test-hooks`).
    #[doc(hidden)]
    #[cfg(feature = "test-hooks")]
    pub fn suspend_keep_alive(&self) {
        self.guard.suspend_keep_alive();
    }

    /// The lock guard of the slot, for code that handles every kind of hold alike (its name is
    /// the slot's lock name).
    pub fn into_guard(self) -> LockGuard {
        self.guard
    }

    /// Gives the permit back.
    ///
    /// # Errors
    /// As [`LockGuard::release`].
    pub async fn release(self) -> Result<()> {
        self.guard.release().await
    }
}

/// Counting semaphores over a coordinator.
///
/// Semaphore names follow the lock-name grammar ([`crate::key`]).
///
/// # Contract
/// - At most `permits` [`Permit`]s of a semaphore are un-lost at any time, across all clients
///   of the same backend cluster, as long as leases are renewed in time.
/// - All users of a semaphore must agree on `permits`: the number is stored with the semaphore,
///   and a different one is refused with `InvalidArgument` while anyone holds a permit.
/// - Waiters queue on the semaphore's queue lock: only the first in line waits for a permit to
///   come free, and it is woken by the backend (no polling, no herd). Where the backend's locks
///   are fair (memory, etcd, ZooKeeper), waiters get permits in arrival order.
/// - A crashed holder keeps its permit for at most the TTL (times the backend's
///   [`lease_expiry_factor`](crate::Capabilities::lease_expiry_factor)).
#[async_trait]
pub trait DistSemaphore: Send + Sync + fmt::Debug {
    /// Takes one of the `permits` permits of semaphore `name`, waiting at most `opts.wait` (a
    /// zero wait tries once).
    ///
    /// # Errors
    /// - `InvalidArgument` when `permits` is 0 or above [`MAX_PERMITS`], or differs from the
    ///   number stored with the semaphore while it has holders; for a TTL out of range;
    /// - `Timeout` when `opts.wait` runs out (the attempt leaves nothing behind);
    /// - `InvalidKey` for a bad name; `LockLost`, `Unavailable`, `Timeout` as
    ///   [`DistLock::lock`](crate::DistLock::lock).
    async fn acquire(&self, name: &str, permits: u32, opts: &LockOptions) -> Result<Permit>;
}
