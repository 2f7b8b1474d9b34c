//! The recipes across OS processes: `examples/contender` processes take permits of one
//! semaphore, or read and write holds of one read-write lock, and announce every hold to the
//! fence server's occupancy record (`tests/support/fenced.rs`), which counts the holders
//! atomically and flags two holders of a slot, a writer inside with anyone else and tokens out
//! of order. Against every backend that spans processes (the in-memory backend does not).
//!
//! Per backend:
//! - a semaphore of 3 permits, 8 processes × 100 rounds: no violation, every round done, at
//!   most and at least once exactly 3 holders inside at once (a semaphore, not a mutex), each
//!   slot's tokens strictly increasing;
//! - a read-write lock, 8 processes × 50 rounds, a write every 4th round: no writer with anyone
//!   else inside, readers inside together at least once, tokens in order, every round done.
//!
//! Holds last 4 ms; a permit holder then stays until the semaphore is full (at most 100 ms),
//! and a reader until another reader is in (at most 25 ms): the fence server's `AWAIT`. So the
//! semaphore is full most of the time, with waiters for a fourth permit, and the checks do not
//! depend on the backend granting holds fast enough to overlap 4 ms sections.
//!
//! `COORDKIT_RECIPE_ROUNDS` (default 100) sets the semaphore's rounds per process, the
//! read-write lock's being half of it; `COORDKIT_RELIABILITY_PROCS` (default 8) the processes.

mod support;

use std::time::Duration;

use support::contention::{
    caps, publish_recipe, run_recipe, Recipe, RecipeReport, RunConfig, RwMode,
};

/// Permits of the semaphore.
const PERMITS: u32 = 3;
/// A write every this many rounds of the read-write lock.
const WRITE_EVERY: u64 = 4;

/// Semaphore rounds per process: `COORDKIT_RECIPE_ROUNDS`, else 100.
fn semaphore_rounds() -> u64 {
    std::env::var("COORDKIT_RECIPE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn config(label: &str, url: &str, recipe: Recipe, rounds: u64) -> RunConfig {
    let c = caps(url);
    let mut cfg = RunConfig::new(label, url);
    cfg.procs = support::contention::procs(8);
    cfg.rounds = rounds;
    // Long leases: nothing here pauses a holder, so no hold may be lost.
    cfg.ttl = Duration::from_secs(15).max(c.min_lock_ttl);
    cfg.expiry_factor = c.lease_expiry_factor;
    cfg.pause = Duration::from_millis(4);
    cfg.deadline = Duration::from_secs(240);
    cfg.recipe = Some(recipe);
    cfg
}

/// 8 processes × 100 rounds on a semaphore of 3 permits.
fn semaphore_run(label: &str, url: &str) -> RecipeReport {
    let recipe = Recipe::Semaphore { permits: PERMITS };
    let mut cfg = config(
        &format!("{label}-semaphore"),
        url,
        recipe,
        semaphore_rounds(),
    );
    // Each holder stays (up to 100 ms) until the semaphore is full, so that reaching all the
    // permits at once does not depend on how fast the backend grants them.
    cfg.gather = PERMITS as usize;
    cfg.gather_for = Duration::from_millis(100);
    let report = run_recipe(&cfg);
    publish_recipe(&report);
    let total = cfg.procs * cfg.rounds as usize;
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.rounds_done, total, "{report}");
    assert_eq!(report.permits, total, "{report}");
    assert_eq!(
        report.max_holders, PERMITS as usize,
        "the semaphore never had {PERMITS} holders at once: {report}"
    );
    assert_eq!(report.slots, (0..PERMITS).collect::<Vec<_>>(), "{report}");
    report
}

/// 8 processes × 50 rounds on a read-write lock, a write every 4th round.
fn rwlock_run(label: &str, url: &str) -> RecipeReport {
    let recipe = Recipe::RwLock {
        mode: RwMode::Mixed,
        write_every: WRITE_EVERY,
    };
    let rounds = (semaphore_rounds() / 2).max(WRITE_EVERY);
    let mut cfg = config(&format!("{label}-rwlock"), url, recipe, rounds);
    // Each reader stays (up to 25 ms) until another reader is inside too.
    cfg.gather = 2;
    cfg.gather_for = Duration::from_millis(25);
    let report = run_recipe(&cfg);
    publish_recipe(&report);
    let total = cfg.procs * cfg.rounds as usize;
    let writes = cfg.procs * (cfg.rounds / WRITE_EVERY) as usize;
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.rounds_done, total, "{report}");
    assert_eq!(report.writes, writes, "{report}");
    assert_eq!(report.reads, total - writes, "{report}");
    assert!(
        report.reader_overlaps >= 1 && report.max_readers >= 2,
        "readers never held the lock together: {report}"
    );
    report
}

/// The control: contenders that announce holds they never took (`--no-lock`: slot
/// `round % permits`, token `round + 1`). The checks must flag too many holders, two holders of
/// a slot, tokens that did not increase, and writers with others inside, or they prove nothing.
#[test]
fn without_the_recipes_the_checks_catch_violations() {
    let control = |label: &str, recipe: Recipe, gather: usize| {
        let mut cfg = RunConfig::new(label, "memory://");
        cfg.no_lock = true;
        cfg.procs = 8;
        cfg.rounds = 12;
        cfg.pause = Duration::from_millis(4);
        cfg.recipe = Some(recipe);
        cfg.gather = gather;
        cfg.gather_for = Duration::from_millis(20);
        let report = run_recipe(&cfg);
        publish_recipe(&report);
        assert_eq!(report.rounds_done, 8 * 12, "{report}");
        report
    };
    let has = |r: &RecipeReport, what: &str| r.violations.iter().any(|v| v.contains(what));

    let sem = control(
        "control-semaphore",
        Recipe::Semaphore { permits: PERMITS },
        PERMITS as usize,
    );
    assert!(sem.max_holders > PERMITS as usize, "{sem}");
    assert!(has(&sem, "above the 3 permits"), "{sem}");
    assert!(
        has(&sem, "was inside"),
        "two holders of a slot not flagged: {sem}"
    );
    assert!(has(&sem, "did not increase"), "{sem}");

    let rw = control(
        "control-rwlock",
        Recipe::RwLock {
            mode: RwMode::Mixed,
            write_every: 2,
        },
        2,
    );
    assert!(
        rw.violations
            .iter()
            .any(|v| v.contains("(write slot") && v.contains("was inside")),
        "a writer with others inside not flagged: {rw}"
    );
    assert!(has(&rw, "handed out twice"), "{rw}");
}

/// The two tests of a backend: `$sem`, the semaphore run, and `$rw`, the read-write lock run.
/// The setup is an expression giving what to keep alive for the run (servers, directories;
/// `()` for a shared server) and the URL.
macro_rules! recipe_tests {
    ($label:literal { $sem:ident, $rw:ident: $setup:expr $(,)? }) => {
        #[test]
        fn $sem() {
            let (_keep, url) = $setup;
            semaphore_run($label, &url);
        }

        #[test]
        fn $rw() {
            let (_keep, url) = $setup;
            rwlock_run($label, &url);
        }
    };
}

#[cfg(feature = "file")]
mod file {
    use super::*;

    /// A store directory in a temporary directory of this test's own, and its URL.
    fn store() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("file://{}", dir.path().join("locks").display());
        (dir, url)
    }

    recipe_tests!("file" { file_semaphore, file_rwlock: store() });
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;

    /// A database file in a temporary directory of this test's own, and its URL.
    fn db() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}", dir.path().join("locks.db").display());
        (dir, url)
    }

    recipe_tests!("sqlite" { sqlite_semaphore, sqlite_rwlock: db() });
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use crate::support::postgres::{fresh_schema, shared};

    recipe_tests!("postgres" {
        postgres_semaphore,
        postgres_rwlock: ((), shared().url(&fresh_schema("recipes"))),
    });
}

#[cfg(feature = "etcd")]
mod etcd {
    use super::*;
    use crate::support::etcd::shared_url;

    recipe_tests!("etcd" { etcd_semaphore, etcd_rwlock: ((), shared_url()) });
}

#[cfg(feature = "zookeeper")]
mod zookeeper {
    use super::*;
    use crate::support::zookeeper::shared;

    recipe_tests!("zookeeper" { zookeeper_semaphore, zookeeper_rwlock: ((), shared().url()) });
}

#[cfg(feature = "consul")]
mod consul {
    use super::*;
    use crate::support::consul_sim::ConsulSim;

    /// A simulator of this test's own, and its URL.
    fn sim() -> (ConsulSim, String) {
        let sim = ConsulSim::start();
        let url = sim.url();
        (sim, url)
    }

    recipe_tests!("consul-sim" { consul_sim_semaphore, consul_sim_rwlock: sim() });
}
