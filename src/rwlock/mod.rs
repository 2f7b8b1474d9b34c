//! Read-write locks: [`DistRwLock`], with shared and exclusive guards that carry fencing tokens.
//!
//! Readers of a read-write lock `NAME` hold it together; a writer holds it alone. Writers are
//! not starved: once a writer waits, readers that come after it wait behind it. A read hold
//! cannot be upgraded to a write hold (release it and ask for a write hold; someone else may get
//! in between).
//!
//! Every hold's token comes from one sequence per read-write lock, taken when the hold entered
//! the queue: a writer's token is greater than the token of every reader or writer that got in
//! before it, and smaller than the token of every one that gets in after. A resource that
//! refuses tokens lower than the highest *writer's* token it has seen refuses a deposed
//! writer's writes and reads begun before the current writer.
//!
//! The layout on every backend is built from its own locks ([`via_lock`]); `docs/recipes.md`
//! describes it.

pub mod via_lock;

use std::fmt;

use async_trait::async_trait;

use crate::error::Result;
use crate::lock::{LockGuard, LockOptions};

/// At most this many readers hold a read-write lock at once; more wait for one to leave.
pub const MAX_READERS: u32 = 16;

/// Read-write locks over a coordinator.
///
/// Names follow the lock-name grammar ([`crate::key`]).
///
/// # Contract
/// - While an un-lost write guard of `NAME` exists, no other guard (read or write) of `NAME` is
///   un-lost, across all clients of the same backend cluster, as long as leases are renewed in
///   time. Up to [`MAX_READERS`] read guards are held at once.
/// - A writer waiting behind readers gets in before readers that asked after it.
/// - Guards have a fencing token ([`LockGuard::token`]), a lost signal, and release on drop,
///   as lock guards; a write guard is lost when any part of it is.
/// - No upgrade from read to write.
#[async_trait]
pub trait DistRwLock: Send + Sync + fmt::Debug {
    /// Takes a shared (read) hold of `name`, waiting at most `opts.wait` (a zero wait tries
    /// once).
    ///
    /// # Errors
    /// As [`DistLock::lock`](crate::DistLock::lock).
    async fn read(&self, name: &str, opts: &LockOptions) -> Result<LockGuard>;

    /// Takes the exclusive (write) hold of `name`, waiting at most `opts.wait` (a zero wait
    /// tries once).
    ///
    /// # Errors
    /// As [`DistLock::lock`](crate::DistLock::lock).
    async fn write(&self, name: &str, opts: &LockOptions) -> Result<LockGuard>;
}
