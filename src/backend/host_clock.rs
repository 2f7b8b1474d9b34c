//! The clock that the embedded backends (`sqlite://`, `file://`) write expiries in: one clock
//! shared by every process of the host, which never goes backwards and ignores wall-clock
//! changes.
//!
//! It is `CLOCK_MONOTONIC`, in milliseconds, tagged with the kernel's boot id: an expiry
//! written before a reboot counts as past. `CLOCK_MONOTONIC` is the clock of
//! [`std::time::Instant`] and so of the lease clock ([`crate::lease`]) that fires `lost()`: a
//! holder's deadline and the expiry in its lease record run on the same clock, also across a
//! suspend of the machine, during which both stand still. (`CLOCK_BOOTTIME` would count the
//! suspend in the record but not in the holder's timer, so another process could take the lock
//! after a resume while the holder still believed it held it.)

use std::time::Duration;

/// The host clock and this boot's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostClock {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`).
    pub(crate) boot: String,
}

impl HostClock {
    pub(crate) fn new() -> Self {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown-boot".to_string());
        HostClock { boot }
    }

    /// Milliseconds of the host's monotonic clock.
    pub(crate) fn now_ms(&self) -> i64 {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        t.tv_sec.saturating_mul(1000) + i64::from(t.tv_nsec as u32 / 1_000_000)
    }

    /// The expiry `ttl` from now, in milliseconds of this clock.
    pub(crate) fn expiry(&self, ttl: Duration) -> i64 {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.now_ms().saturating_add(ms)
    }

    /// Whether a record with this boot id and expiry is still live (no expiry: forever).
    pub(crate) fn live(&self, boot: Option<&str>, expires: Option<i64>) -> bool {
        match expires {
            None => true,
            Some(at) => boot == Some(self.boot.as_str()) && at > self.now_ms(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_with_instant_and_expires() {
        let c = HostClock::new();
        let (a, i) = (c.now_ms(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(30));
        let (b, d) = (c.now_ms(), i.elapsed());
        // Same clock as `Instant`: the two measure the same interval to within a few ms.
        assert!(((b - a) - d.as_millis() as i64).abs() <= 2, "{a} {b} {d:?}");
        let at = c.expiry(Duration::from_millis(20));
        assert!(c.live(Some(&c.boot), Some(at)));
        assert!(!c.live(Some("another-boot"), Some(at)));
        assert!(c.live(None, None));
        std::thread::sleep(Duration::from_millis(25));
        assert!(!c.live(Some(&c.boot), Some(at)));
    }
}
