//! What each backend supports, and its limits.

use std::time::Duration;

/// What a backend supports and its limits. Conformance tests skip only what a backend
/// declares here that it lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The backend's name, as used in error messages (`"memory"`, `"etcd"`, …).
    pub backend: &'static str,
    /// Whether [`crate::PutOptions::ttl`] is supported.
    pub key_ttl: bool,
    /// The smallest key TTL accepted; shorter TTLs give `InvalidArgument`.
    pub min_ttl: Duration,
    /// The smallest lock TTL accepted ([`crate::LockOptions::ttl`]); shorter ones give
    /// `InvalidArgument`.
    pub min_lock_ttl: Duration,
    /// How long after a holder stops renewing its lease the lock may still be held by it, as a
    /// multiple of the lock TTL, rounded up (memory and etcd: 1; Consul: 2, because today's
    /// Consul servers invalidate a session within twice its TTL — their implementation, not a
    /// documented promise). A liveness figure: how long others may have to wait. Tests use it
    /// to bound how long a lapse takes. The holder's lost signal never waits for it: it fires at
    /// the lease deadline (see [`crate::lease`]).
    pub lease_expiry_factor: u32,
    /// The largest value accepted, in bytes.
    pub max_value_size: usize,
    /// Whether [`crate::KvStore::watch`] is supported.
    pub watch: bool,
    /// Whether a watch may merge several consecutive changes of one key into one event
    /// (marked by [`crate::WatchEvent::Coalesced`]) and deliver events of different keys out of
    /// their commit order, or drop a key created and deleted between two observations (see
    /// [`crate::KvStore::watch`]). `false` means every change is delivered once, in commit
    /// order. [`Capabilities::new`] says `true`, the weaker promise; exact backends (memory,
    /// etcd) set `false`.
    pub watch_coalesces: bool,
    /// Whether [`crate::Consistency::Strong`] reads are linearizable (ZooKeeper's `sync` + read
    /// is not strictly so).
    pub linearizable_reads: bool,
    /// What fencing tokens are comparable across.
    pub fencing_scope: FencingScope,
}

/// Across what fencing tokens of a backend are comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FencingScope {
    /// Tokens increase across every lock of the cluster (etcd revision, ZooKeeper zxid, Consul
    /// Raft index, the memory store's counter): comparable between locks too.
    Cluster,
    /// Tokens only increase per lock name.
    PerLock,
}

impl Capabilities {
    /// Capabilities with every feature on and no limits, and the weaker watch promise
    /// ([`watch_coalesces`](Self::watch_coalesces) `true`); backends adjust the fields.
    pub fn new(backend: &'static str) -> Self {
        Capabilities {
            backend,
            key_ttl: true,
            min_ttl: Duration::from_millis(1),
            min_lock_ttl: Duration::from_millis(1),
            lease_expiry_factor: 1,
            max_value_size: usize::MAX,
            watch: true,
            watch_coalesces: true,
            linearizable_reads: true,
            fencing_scope: FencingScope::Cluster,
        }
    }
}
