//! # coordkit
//!
//! One async API for **key-value storage** and **fenced distributed locks** over the
//! coordinators services already run — etcd, ZooKeeper, Consul — plus an in-memory backend, with
//! client-side hash sharding across several backend clusters.
//!
//! - [`KvStore`]: get / put (with TTL) / delete / compare-and-swap / list / watch, with a
//!   per-read [`Consistency`].
//! - [`DistLock`]: locks whose [`LockGuard`] carries a strictly increasing [`FencingToken`],
//!   renews its lease in the background, and tells its holder when the lock is lost.
//! - [`DistLockExt::run_locked`]: run a job while holding a lock.
//! - [`Election`]: leader election whose [`LeaderGuard`] carries a strictly increasing term (a
//!   fencing token), with the published leader value readable and observable by everyone; in
//!   etcd's and Curator's own layouts on etcd and ZooKeeper (see `docs/recipes.md`).
//! - [`DistSemaphore`] and [`DistRwLock`]: counting semaphores and read-write locks whose
//!   holds carry fencing tokens and lost signals, built on each backend's locks.
//! - [`connect`]: pick the backend from a URL (`memory://`, `etcd://…`, `zk://…`, `consul://…`,
//!   or `sharded+ring://?shard=…&shard=…` for a [`shard::ShardedStore`] over several).
//!
//! ```
//! use coordkit::{connect, DistLockExt, KvStore, LockOptions, PutOptions, Consistency};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> coordkit::Result<()> {
//! let store = connect("memory://").await?;
//! store.put("config/greeting", b"hello".to_vec(), PutOptions::default()).await?;
//! let entry = store.get("config/greeting", Consistency::Strong).await?;
//! assert_eq!(entry.map(|e| e.value), Some(b"hello".to_vec()));
//!
//! let ran_with = store
//!     .run_locked("jobs/nightly", &LockOptions::new(), |ctx| async move { ctx.token() })
//!     .await?;
//! println!("ran under fencing token {ran_with}");
//! # Ok(())
//! # }
//! ```
//!
//! ## Features
//! | feature | default | what it adds |
//! |---|---|---|
//! | `zookeeper` | yes | the ZooKeeper backend (`zk://`) |
//! | `consul` | yes | the Consul backend (`consul://`) |
//! | `cli` | yes | the `coordkit` command-line tool |
//! | `etcd` | no | the etcd backend (`etcd://`); its build needs `protoc` and the protobuf include files |
//! | `conformance` | no | the conformance suite ([`conformance`], [`conformance_tests!`]) that every backend passes, for testing a backend; enables `test-hooks` |
//! | `test-hooks` | no | hooks for fault tests (stopping a lock's keep-alive), hidden from these docs |
//!
//! The in-memory backend is always built.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod backend;
pub mod caps;
pub mod config;
pub mod config_file;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod election;
pub mod error;
pub mod fencing;
pub mod key;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod rwlock;
pub mod semaphore;
pub mod shard;
pub mod trace;

pub use backend::memory::MemoryStore;
pub use caps::{Capabilities, FencingScope};
pub use config::{connect, connect_from_env};
pub use config_file::connect_config;
pub use election::{Election, Leader, LeaderGuard, LeaderHandle, LeaderStream};
pub use error::{Error, ErrorKind, Result};
pub use fencing::FencedResource;
pub use kv::{Consistency, Entry, Expect, KvStore, PutOptions, Version, WatchEvent, WatchStream};
pub use lock::{
    DistLock, DistLockExt, FencingToken, JobContext, LockGuard, LockHandle, LockOptions,
};
pub use rwlock::DistRwLock;
pub use semaphore::{DistSemaphore, Permit};

/// A backend: key-value storage, locks, leader election, semaphores and read-write locks from
/// one client. What [`connect`] returns.
pub trait Backend: KvStore + DistLock + Election + DistSemaphore + DistRwLock {}

impl<T: KvStore + DistLock + Election + DistSemaphore + DistRwLock + ?Sized> Backend for T {}

#[doc(hidden)]
pub use async_trait::async_trait as __async_trait;

/// The README's code samples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The Rust samples of `docs/locking.md`, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/locking.md")]
pub struct LockingDocDoctests;

/// The Rust samples of `docs/recipes.md`, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/recipes.md")]
pub struct RecipesDocDoctests;

/// The Rust samples of `docs/configuration.md`, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/configuration.md")]
pub struct ConfigurationDocDoctests;
