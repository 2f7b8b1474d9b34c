//! Latency samples and their summary figures.

use std::time::Duration;

/// One measured series: the latency of each operation, and the time the series was busy.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Per-operation latencies in microseconds, in measurement order.
    pub lat_us: Vec<f64>,
    /// Wall time spent running the operations (sum over measured blocks).
    pub busy: Duration,
    /// Operations counted for throughput (may differ from `lat_us.len()` for batch timing).
    pub ops: u64,
}

impl Series {
    pub fn push(&mut self, d: Duration) {
        self.lat_us.push(d.as_secs_f64() * 1e6);
    }

    /// Operations per second.
    pub fn ops_per_s(&self) -> f64 {
        let secs = self.busy.as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        self.ops as f64 / secs
    }

    /// The p-th percentile (0..=100) in microseconds, nearest-rank on sorted samples.
    pub fn pct(&self, p: f64) -> f64 {
        percentile(&self.lat_us, p)
    }

    /// Samples at or above `us` microseconds.
    pub fn count_ge(&self, us: f64) -> usize {
        self.lat_us.iter().filter(|&&x| x >= us).count()
    }

    pub fn max(&self) -> f64 {
        self.lat_us.iter().cloned().fold(0.0, f64::max)
    }

    pub fn mean(&self) -> f64 {
        if self.lat_us.is_empty() {
            return 0.0;
        }
        self.lat_us.iter().sum::<f64>() / self.lat_us.len() as f64
    }
}

/// Nearest-rank percentile of unsorted samples; 0 for none.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Formats microseconds compactly: `83 µs`, `1.25 ms`, `94.1 ms`.
pub fn fmt_us(us: f64) -> String {
    if us < 1.0 {
        format!("{us:.2} µs")
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

/// Formats a rate compactly.
pub fn fmt_rate(r: f64) -> String {
    if r >= 100_000.0 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 10_000.0 {
        format!("{:.0}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        let s = Series {
            lat_us: vec![10.0, 60_000.0, 50_000.0, 20.0],
            busy: Duration::from_secs(2),
            ops: 4,
        };
        assert_eq!(s.count_ge(50_000.0), 2);
        assert_eq!(s.ops_per_s(), 2.0);
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_us(83.2), "83 µs");
        assert_eq!(fmt_us(1250.0), "1.25 ms");
        assert_eq!(fmt_us(94_100.0), "94.1 ms");
    }
}
