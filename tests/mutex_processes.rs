//! Mutual exclusion across OS processes: `examples/contender` processes contend for one lock
//! and do a non-atomic read-modify-write of a counter held by a fencing-checking resource
//! (`tests/support/fenced.rs`), with and without faults. See `docs/reliability.md`.
//!
//! `COORDKIT_RELIABILITY_ROUNDS` (default 200) and `COORDKIT_RELIABILITY_PROCS` (default 8) set
//! the size of each run.

#[path = "support/contention.rs"]
mod contention;
#[path = "support/fenced.rs"]
mod fenced;
mod support;

use std::time::Duration;

use contention::{publish, run, RunConfig};

/// The control: the same processes without a lock. The checks must report lost updates and
/// overlapping critical sections, or they prove nothing.
#[test]
fn without_a_lock_the_checks_catch_violations() {
    let mut cfg = RunConfig::new("control-no-lock", "memory://");
    cfg.no_lock = true;
    cfg.rounds = 40;
    cfg.procs = 8;
    cfg.pause = Duration::from_millis(3);
    let report = run(&cfg, vec![]);
    publish(&report);
    let state_lost = report
        .violations
        .iter()
        .any(|v| v.contains("lost an update") || v.contains("final count"));
    assert!(state_lost, "the control run lost no update: {report}");
    assert!(
        report.overlaps > 0,
        "the control run saw no overlap: {report}"
    );
    assert!(report.final_value < 8 * 40, "{report}");
}
