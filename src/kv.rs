//! The key-value contract: [`KvStore`] and its types.

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

use crate::caps::Capabilities;
use crate::error::Result;

/// An opaque per-key version, used as the precondition of [`KvStore::compare_and_swap`].
///
/// Every successful write of a key gives it a new version. What the number is depends on the
/// backend (etcd: the key's mod revision; ZooKeeper: the znode data version; Consul: the
/// ModifyIndex; memory: a store-wide revision), so only compare versions of the same key from
/// the same backend, and only for equality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version(u64);

impl Version {
    /// Wraps a backend's raw version number. For backend implementations.
    pub const fn from_raw(raw: u64) -> Self {
        Version(raw)
    }

    /// The backend's raw version number.
    pub const fn as_raw(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How fresh a read must be.
///
/// This is strong and eventual consistency as a per-call option. Each backend documents what
/// it does for each (see `docs/backends.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Consistency {
    /// The read reflects every write that completed before it started (linearizable where the
    /// backend can: etcd linearizable read, Consul `?consistent`, ZooKeeper `sync` + read).
    #[default]
    Strong,
    /// The read may be served from a replica's local copy and miss recent writes; cheaper.
    Stale,
}

/// A stored key with its value and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value: arbitrary bytes, possibly empty.
    pub value: Vec<u8>,
    /// The version of this value.
    pub version: Version,
}

/// Options of [`KvStore::put`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PutOptions {
    /// Remove the key this long after the write (see [`Capabilities::key_ttl`] and
    /// [`Capabilities::min_ttl`]). `None`: keep it until deleted.
    pub ttl: Option<Duration>,
}

impl PutOptions {
    /// Options with a time-to-live.
    pub fn ttl(ttl: Duration) -> Self {
        PutOptions { ttl: Some(ttl) }
    }
}

/// The precondition of [`KvStore::compare_and_swap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist with exactly this version.
    Version(Version),
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or updated; the entry holds the new value and version.
    Put(Entry),
    /// The key was deleted (explicitly, or because its TTL ran out).
    Delete {
        /// The deleted key.
        key: String,
    },
    /// A mark, not a change: the *next* event of `key` on this stream stands for several
    /// changes of it merged into one. The changes of `key` between its previous event (or the
    /// start of the watch) and that next event were not delivered one by one; that next event
    /// carries the latest state. Only backends declaring
    /// [`Capabilities::watch_coalesces`] send it (see [`KvStore::watch`]); a consumer that only
    /// rebuilds state can ignore it.
    Coalesced {
        /// The key whose next event merges several changes.
        key: String,
    },
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(e) => &e.key,
            WatchEvent::Delete { key } | WatchEvent::Coalesced { key } => key,
        }
    }
}

/// The stream returned by [`KvStore::watch`].
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent>> + Send + 'static>>;

/// Key-value storage over a coordinator.
///
/// Keys and prefixes follow the portable grammar of [`crate::key`]; values are arbitrary bytes
/// (binary and empty values round-trip).
///
/// # Contract
/// - Every method validates its key or prefix first; an invalid one gives
///   [`ErrorKind::InvalidKey`](crate::ErrorKind::InvalidKey) and changes nothing.
/// - A value larger than [`Capabilities::max_value_size`] gives
///   [`ErrorKind::ValueTooLarge`](crate::ErrorKind::ValueTooLarge) and changes nothing.
/// - A write either happens completely or not at all; a failed call leaves the stored data as
///   it was, except that a call that fails with `Timeout` or `Unavailable` may or may not have
///   been applied (as with any remote write).
/// - Every call returns within the backend's configured request timeout; an unreachable backend
///   gives `Unavailable` or `Timeout`, never a hang.
/// - Implementations are `Send + Sync` and usable as `dyn KvStore`.
#[async_trait]
pub trait KvStore: Send + Sync + fmt::Debug {
    /// Reads one key. `Ok(None)` if it does not exist.
    ///
    /// # Errors
    /// `InvalidKey`; `Unavailable`/`Timeout` when the backend cannot answer.
    async fn get(&self, key: &str, consistency: Consistency) -> Result<Option<Entry>>;

    /// Writes `value` to `key` unconditionally and returns the new version.
    ///
    /// # Contract
    /// With `opts.ttl`, the key disappears (and watchers see a delete) once the TTL has run out,
    /// unless it is written again before; a later put without TTL makes it permanent. TTLs below
    /// [`Capabilities::min_ttl`] give `InvalidArgument`; a backend without key TTLs gives
    /// `Unsupported`.
    ///
    /// # Errors
    /// `InvalidKey`, `ValueTooLarge`, `InvalidArgument`, `Unsupported`, `Unavailable`, `Timeout`.
    async fn put(&self, key: &str, value: Vec<u8>, opts: PutOptions) -> Result<Version>;

    /// Deletes `key`. Deleting a missing key succeeds.
    ///
    /// # Errors
    /// `InvalidKey`, `Unavailable`, `Timeout`.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Atomically checks `expect` and, if it holds, writes `new` (`Some`) or deletes the key
    /// (`None`).
    ///
    /// - `(Expect::Absent, Some(v))`: create if absent;
    /// - `(Expect::Version(ver), Some(v))`: update if the version is still `ver`;
    /// - `(Expect::Version(ver), None)`: delete if the version is still `ver`;
    /// - `(Expect::Absent, None)`: succeeds, changing nothing, if the key is absent.
    ///
    /// Returns the new version after a write, `None` after a delete (or the no-op).
    ///
    /// A write by compare-and-swap is like a put without TTL: the key is permanent afterwards,
    /// also if it had a TTL (on every backend with [`Capabilities::key_ttl`]). To keep a TTL,
    /// `put` with it.
    ///
    /// # Errors
    /// `Conflict` when the precondition does not hold (nothing is changed); `InvalidKey`,
    /// `ValueTooLarge`, `Unavailable`, `Timeout`.
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        new: Option<Vec<u8>>,
    ) -> Result<Option<Version>>;

    /// Lists every key that starts with `prefix` (see [`crate::key`]), sorted by key.
    ///
    /// # Errors
    /// `InvalidKey` for an invalid prefix; `Unavailable`, `Timeout`.
    async fn list(&self, prefix: &str, consistency: Consistency) -> Result<Vec<Entry>>;

    /// Watches every key that starts with `prefix`.
    ///
    /// # Contract
    /// - The watch is established when this returns: every change committed after the call
    ///   returns is reflected in the events, and none from before it is delivered.
    /// - Every [`WatchEvent::Put`] and [`WatchEvent::Delete`] carries the state of its key at
    ///   some moment after the previous event of that key: its value and version then (or its
    ///   absence). Events of one key arrive in the order of its changes, and the last event of
    ///   a key reflects its latest change: the state rebuilt from the events converges to
    ///   [`list`](Self::list) once writes stop.
    /// - **Exact backends** ([`Capabilities::watch_coalesces`] `false`: memory, etcd) deliver
    ///   every change once, in the order the backend applied them, across all keys.
    /// - **Coalescing backends** ([`Capabilities::watch_coalesces`] `true`: ZooKeeper, Consul)
    ///   may merge consecutive changes of one key into one event carrying the latest state;
    ///   each such event is preceded by [`WatchEvent::Coalesced`] naming the key (an unmarked
    ///   event is exactly one change). Events of different keys may arrive out of their
    ///   commit order. A key created and deleted again between two observations of the
    ///   backend may produce no event at all (its state before and after is the same); each
    ///   backend's documentation says when that can happen.
    /// - If the backend cannot keep this contract (etcd: history compacted past the resume
    ///   point), the stream yields one [`ErrorKind::WatchGap`](crate::ErrorKind::WatchGap)
    ///   error and ends; it never skips silently. Permanent errors end the stream with that
    ///   error. Disconnects and reconnects are otherwise handled inside the stream.
    /// - Dropping the stream cancels the watch.
    ///
    /// # Errors
    /// `InvalidKey`, `Unsupported` (see [`Capabilities::watch`]), `Unavailable`, `Timeout`.
    async fn watch(&self, prefix: &str) -> Result<WatchStream>;

    /// What this backend supports and its limits.
    fn capabilities(&self) -> Capabilities;
}
