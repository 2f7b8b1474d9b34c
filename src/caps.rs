//! What each backend supports, and its limits.

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::key::{validate_key, validate_lock_name};
use crate::kv::PutOptions;
use crate::lock::LockOptions;

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
    /// The largest key TTL accepted; longer TTLs give `InvalidArgument`.
    pub max_ttl: Duration,
    /// The smallest lock TTL accepted ([`crate::LockOptions::ttl`]); shorter ones give
    /// `InvalidArgument`.
    pub min_lock_ttl: Duration,
    /// The largest lock TTL accepted; longer ones give `InvalidArgument`.
    pub max_lock_ttl: Duration,
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
    /// Capabilities that claim nothing: no key TTL, no watch, no linearizable reads, no value
    /// and no TTL accepted, per-lock fencing, the weaker watch promise and a lease expiry
    /// factor of 2. A backend sets every field it supports, so one it forgets claims less than
    /// it has, never more.
    pub fn new(backend: &'static str) -> Self {
        Capabilities {
            backend,
            key_ttl: false,
            min_ttl: Duration::MAX,
            max_ttl: Duration::ZERO,
            min_lock_ttl: Duration::MAX,
            max_lock_ttl: Duration::ZERO,
            lease_expiry_factor: 2,
            max_value_size: 0,
            watch: false,
            watch_coalesces: true,
            linearizable_reads: false,
            fencing_scope: FencingScope::PerLock,
        }
    }

    /// What every one of `all` supports (the sharded store's capabilities): the intersection
    /// of features, the tightest limits, the weakest promises. Fencing is per lock when there
    /// is more than one.
    pub fn intersection(backend: &'static str, all: &[Capabilities]) -> Self {
        let mut caps = Capabilities {
            backend,
            key_ttl: true,
            min_ttl: Duration::ZERO,
            max_ttl: Duration::MAX,
            min_lock_ttl: Duration::ZERO,
            max_lock_ttl: Duration::MAX,
            lease_expiry_factor: 1,
            max_value_size: usize::MAX,
            watch: true,
            watch_coalesces: false,
            linearizable_reads: true,
            fencing_scope: FencingScope::Cluster,
        };
        if all.is_empty() {
            return Capabilities::new(backend);
        }
        for c in all {
            caps.key_ttl &= c.key_ttl;
            caps.min_ttl = caps.min_ttl.max(c.min_ttl);
            caps.max_ttl = caps.max_ttl.min(c.max_ttl);
            caps.min_lock_ttl = caps.min_lock_ttl.max(c.min_lock_ttl);
            caps.max_lock_ttl = caps.max_lock_ttl.min(c.max_lock_ttl);
            caps.lease_expiry_factor = caps.lease_expiry_factor.max(c.lease_expiry_factor);
            caps.max_value_size = caps.max_value_size.min(c.max_value_size);
            caps.watch &= c.watch;
            caps.watch_coalesces |= c.watch_coalesces;
            caps.linearizable_reads &= c.linearizable_reads;
            if c.fencing_scope == FencingScope::PerLock {
                caps.fencing_scope = FencingScope::PerLock;
            }
        }
        if all.len() > 1 {
            caps.fencing_scope = FencingScope::PerLock;
        }
        caps
    }

    fn error(&self, kind: ErrorKind, key: &str, message: String) -> Error {
        Error::new(kind, self.backend, message).with_key(key)
    }

    /// The checks of a value against [`max_value_size`](Self::max_value_size).
    ///
    /// # Errors
    /// `ValueTooLarge` naming the size and the limit.
    pub fn check_value(&self, key: &str, value: &[u8]) -> Result<()> {
        if value.len() > self.max_value_size {
            return Err(self.error(
                ErrorKind::ValueTooLarge,
                key,
                format!(
                    "{} bytes exceeds the {} backend's limit of {} bytes",
                    value.len(),
                    self.backend,
                    self.max_value_size
                ),
            ));
        }
        Ok(())
    }

    /// The checks every backend makes before a put, in this order: the key grammar, the value
    /// size, and a TTL's support and bounds.
    ///
    /// # Errors
    /// `InvalidKey`; `ValueTooLarge`; `Unsupported` for a TTL on a backend without key TTLs;
    /// `InvalidArgument` for a TTL outside [`min_ttl`](Self::min_ttl)..=[`max_ttl`](Self::max_ttl)
    /// (a zero TTL included).
    pub fn check_put(&self, key: &str, value: &[u8], opts: &PutOptions) -> Result<()> {
        validate_key(key)?;
        self.check_value(key, value)?;
        let Some(ttl) = opts.ttl else {
            return Ok(());
        };
        if !self.key_ttl {
            return Err(self.error(
                ErrorKind::Unsupported,
                key,
                format!("the {} backend has no key TTLs", self.backend),
            ));
        }
        if ttl.is_zero() || ttl < self.min_ttl || ttl > self.max_ttl {
            return Err(self.error(
                ErrorKind::InvalidArgument,
                key,
                format!(
                    "TTL {ttl:?} is outside the {} backend's range {:?}..={:?}",
                    self.backend, self.min_ttl, self.max_ttl
                ),
            ));
        }
        Ok(())
    }

    /// The checks every backend makes before a compare-and-swap: the key grammar and, when a
    /// value is written, its size.
    ///
    /// # Errors
    /// `InvalidKey`; `ValueTooLarge`.
    pub fn check_cas(&self, key: &str, new: Option<&[u8]>) -> Result<()> {
        validate_key(key)?;
        match new {
            Some(v) => self.check_value(key, v),
            None => Ok(()),
        }
    }

    /// The checks every backend makes before a lock attempt: the lock name's grammar and the
    /// TTL's bounds.
    ///
    /// # Errors
    /// `InvalidKey` for a bad name; `InvalidArgument` for a TTL outside
    /// [`min_lock_ttl`](Self::min_lock_ttl)..=[`max_lock_ttl`](Self::max_lock_ttl).
    pub fn check_lock(&self, name: &str, opts: &LockOptions) -> Result<()> {
        validate_lock_name(name)?;
        let ttl = opts.ttl;
        if ttl.is_zero() || ttl < self.min_lock_ttl || ttl > self.max_lock_ttl {
            return Err(self.error(
                ErrorKind::InvalidArgument,
                name,
                format!(
                    "lock TTL {ttl:?} is outside the {} backend's range {:?}..={:?}",
                    self.backend, self.min_lock_ttl, self.max_lock_ttl
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_claims_nothing() {
        let c = Capabilities::new("x");
        assert!(!c.key_ttl && !c.watch && !c.linearizable_reads);
        assert!(c.check_value("k", b"v").is_err());
        let put = PutOptions::ttl(Duration::from_secs(5));
        assert_eq!(
            c.check_put("k", b"", &put).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        let lock = LockOptions::new().ttl(Duration::from_secs(5));
        assert_eq!(
            c.check_lock("n", &lock).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn checks_follow_the_limits() {
        let mut c = Capabilities::new("x");
        c.key_ttl = true;
        c.max_value_size = 3;
        c.min_ttl = Duration::from_secs(1);
        c.max_ttl = Duration::from_secs(10);
        c.min_lock_ttl = Duration::from_secs(2);
        c.max_lock_ttl = Duration::from_secs(20);
        let ttl = |s: u64| PutOptions::ttl(Duration::from_secs(s));
        assert!(c.check_put("k", b"abc", &ttl(1)).is_ok());
        assert!(c.check_put("k", b"abc", &PutOptions::default()).is_ok());
        assert_eq!(
            c.check_put("k", b"abcd", &ttl(1)).unwrap_err().kind(),
            ErrorKind::ValueTooLarge
        );
        assert_eq!(
            c.check_put("/k", b"", &ttl(1)).unwrap_err().kind(),
            ErrorKind::InvalidKey
        );
        for bad in [0, 11] {
            let e = c.check_put("k", b"", &ttl(bad)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
            assert!(e.message().contains("x backend"), "{e}");
        }
        let lock = |s: u64| LockOptions::new().ttl(Duration::from_secs(s));
        assert!(c.check_lock("n", &lock(2)).is_ok());
        assert!(c.check_lock("n", &lock(20)).is_ok());
        for bad in [0, 1, 21] {
            assert_eq!(
                c.check_lock("n", &lock(bad)).unwrap_err().kind(),
                ErrorKind::InvalidArgument
            );
        }
        assert_eq!(
            c.check_lock("a//b", &lock(2)).unwrap_err().kind(),
            ErrorKind::InvalidKey
        );
    }

    #[test]
    fn intersection_is_the_tightest() {
        let mut a = Capabilities::new("a");
        a.key_ttl = true;
        a.watch = true;
        a.max_value_size = 10;
        a.min_ttl = Duration::from_secs(1);
        a.max_ttl = Duration::from_secs(100);
        a.fencing_scope = FencingScope::Cluster;
        a.watch_coalesces = false;
        let mut b = a.clone();
        b.max_value_size = 5;
        b.min_ttl = Duration::from_secs(2);
        b.watch_coalesces = true;
        let one = Capabilities::intersection("s", std::slice::from_ref(&a));
        assert_eq!(one.fencing_scope, FencingScope::Cluster);
        assert!(!one.watch_coalesces);
        let c = Capabilities::intersection("s", &[a, b]);
        assert_eq!((c.max_value_size, c.min_ttl), (5, Duration::from_secs(2)));
        assert!(c.key_ttl && c.watch && c.watch_coalesces);
        assert_eq!(c.fencing_scope, FencingScope::PerLock);
        assert!(!Capabilities::intersection("s", &[]).key_ttl);
    }
}
