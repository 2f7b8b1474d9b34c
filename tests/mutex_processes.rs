//! Mutual exclusion across OS processes: `examples/contender` processes contend for one lock
//! and do a non-atomic read-modify-write of a counter held by a fencing-checking resource
//! (`tests/support/fenced.rs`), against every backend that spans processes (the in-memory
//! backend does not), with and without faults. See `docs/reliability.md`.
//!
//! `COORDKIT_RELIABILITY_ROUNDS` (default 200) and `COORDKIT_RELIABILITY_PROCS` (default 8) set
//! the size of each run. Runs with faults take turns; runs without faults run alongside.

mod support;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use support::contention::{self, caps, publish, run, Fault, RunConfig, RunReport};

/// Runs with faults (short TTLs, timed pauses) take turns; runs without faults use long TTLs
/// and may share the machine with anything.
fn fault_turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// A run without faults: every round completes, the count is exact, tokens strictly increase.
fn clean_run(label: &str, url: &str) -> RunReport {
    let c = caps(url);
    let mut cfg = RunConfig::new(label, url);
    cfg.ttl = Duration::from_secs(15).max(c.min_lock_ttl);
    cfg.expiry_factor = c.lease_expiry_factor;
    let report = run(&cfg, vec![]);
    publish(&report);
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(
        report.final_value,
        (cfg.procs as u64 * cfg.rounds) as i64,
        "{report}"
    );
    assert_eq!(
        report.rounds_done as u64,
        cfg.procs as u64 * cfg.rounds,
        "{report}"
    );
    assert!(cfg.procs >= 8 || std::env::var("COORDKIT_RELIABILITY_PROCS").is_ok());
    report
}

/// A run with a SIGKILLed holder, a SIGSTOPped holder (past its TTL) and `extra` faults.
fn faulty_run(label: &str, url: &str, extra: Vec<Fault>) -> RunReport {
    let _turn = fault_turn();
    let c = caps(url);
    let mut cfg = RunConfig::new(label, url);
    // Fewer rounds than the clean runs by default: the faults, not the rounds, are the point,
    // and each costs up to twice the TTL of waiting. COORDKIT_RELIABILITY_ROUNDS sets both.
    cfg.rounds = contention::rounds(60);
    cfg.slow_every = (cfg.rounds / 6).max(2);
    cfg.ttl = Duration::from_secs(2).max(c.min_lock_ttl);
    cfg.expiry_factor = c.lease_expiry_factor;
    cfg.slow = Duration::from_millis(250);
    let mut faults = vec![Fault::KillHolder, Fault::PauseHolder];
    faults.extend(extra);
    let n_faults = faults.len();
    let report = run(&cfg, faults);
    publish(&report);
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.faults.len(), n_faults, "{report}");
    assert!(
        report.stale_rejected >= 1,
        "the paused holder's write was not refused: {report}"
    );
    // Everyone but the killed process finished all rounds.
    assert!(
        report.rounds_done as u64 >= (cfg.procs as u64 - 1) * cfg.rounds,
        "{report}"
    );
    report
}

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
    let lost = report
        .violations
        .iter()
        .any(|v| v.contains("lost an update") || v.contains("final count"));
    assert!(lost, "the control run lost no update: {report}");
    assert!(
        report.overlaps > 0,
        "the control run saw no overlap: {report}"
    );
    assert!(report.final_value < 8 * 40, "{report}");
}

/// A cluster whose leader a fault kills and restarts.
#[cfg(any(feature = "etcd", feature = "zookeeper"))]
trait Cluster: Send + 'static {
    /// What a member is called in the fault's description (`member`, `node`).
    const MEMBER: &'static str;
    /// How long a new leader may take to be elected.
    const ELECTION_BOUND: Duration;
    fn leader(&mut self) -> Option<usize>;
    fn kill(&mut self, i: usize);
    /// Restarts member `i`; the end of the fault's description (`restarted`, …).
    fn restart(&mut self, i: usize) -> String;
    /// The URL for `coordkit::connect`.
    fn url(&self) -> String;
}

#[cfg(feature = "etcd")]
impl Cluster for support::etcd::EtcdCluster {
    const MEMBER: &'static str = "member";
    const ELECTION_BOUND: Duration = Duration::from_secs(20);
    fn leader(&mut self) -> Option<usize> {
        support::etcd::EtcdCluster::leader(self)
    }
    fn kill(&mut self, i: usize) {
        support::etcd::EtcdCluster::kill(self, i)
    }
    fn restart(&mut self, i: usize) -> String {
        // Waits until the member is healthy (panics otherwise).
        support::etcd::EtcdCluster::restart(self, i);
        "restarted".into()
    }
    fn url(&self) -> String {
        support::etcd::EtcdCluster::url(self)
    }
}

#[cfg(feature = "zookeeper")]
impl Cluster for support::zookeeper::ZkEnsemble {
    const MEMBER: &'static str = "node";
    const ELECTION_BOUND: Duration = Duration::from_secs(30);
    fn leader(&mut self) -> Option<usize> {
        support::zookeeper::ZkEnsemble::leader(self)
    }
    fn kill(&mut self, i: usize) {
        support::zookeeper::ZkEnsemble::kill(self, i)
    }
    fn restart(&mut self, i: usize) -> String {
        support::zookeeper::ZkEnsemble::restart(self, i);
        let back = self.wait_serving(Duration::from_secs(60));
        format!(
            "restarted, {}",
            if back { "serving again" } else { "NOT serving" }
        )
    }
    fn url(&self) -> String {
        support::zookeeper::ZkEnsemble::url(self)
    }
}

/// The fault `what`: SIGKILL the leader of `cluster`, wait for a new one, restart the old one
/// 2 s later. Its description says `NOT` when no new leader was elected or the old one does
/// not serve again. Gives the cluster (to keep until the run ends), its URL and the fault, as
/// [`process_tests!`] wants a setup.
#[cfg(any(feature = "etcd", feature = "zookeeper"))]
fn leader_kill<C: Cluster>(
    what: &str,
    cluster: C,
) -> (std::sync::Arc<Mutex<C>>, String, Vec<Fault>) {
    let url = cluster.url();
    let cluster = std::sync::Arc::new(Mutex::new(cluster));
    let c = cluster.clone();
    let fault = Fault::Custom(
        what.into(),
        Box::new(move || {
            let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
            let Some(leader) = c.leader() else {
                return "no leader found".into();
            };
            let t0 = std::time::Instant::now();
            c.kill(leader);
            let new = support::wait_until(
                C::ELECTION_BOUND,
                || matches!(c.leader(), Some(l) if l != leader),
            );
            let elected = t0.elapsed();
            std::thread::sleep(Duration::from_secs(2));
            let restarted = c.restart(leader);
            format!(
                "killed {} {leader}; new leader {} after {:.2}s; {restarted}",
                C::MEMBER,
                if new { "elected" } else { "NOT elected" },
                elected.as_secs_f64()
            )
        }),
    );
    (cluster, url, vec![fault])
}

/// The two tests of a backend that spans processes, in the backend's module: `$clean`, a run
/// without faults, and `$faulty`, a run with faults (see [`faulty_run`]) whose extra faults
/// must not report `NOT`. Each setup is an expression giving what to keep alive for the run
/// (servers; `()` for a shared one) and the URL, and for `$faulty` the extra faults too.
macro_rules! process_tests {
    ($label:literal {
        $clean:ident: $clean_setup:expr,
        $faulty:ident: $faulty_setup:expr $(,)?
    }) => {
        #[test]
        fn $clean() {
            let (_keep, url) = $clean_setup;
            clean_run($label, &url);
        }

        #[test]
        fn $faulty() {
            let (_keep, url, extra) = $faulty_setup;
            let report = faulty_run(concat!($label, "-faults"), &url, extra);
            // The extra faults come after the killed and the paused holder.
            for fault in &report.faults[2..] {
                assert!(!fault.contains("NOT"), "{report}");
            }
        }
    };
}

#[cfg(feature = "etcd")]
mod etcd {
    use super::*;
    use crate::support::etcd::{shared_url, EtcdCluster};

    process_tests!("etcd" {
        etcd_processes: ((), shared_url()),
        etcd_processes_under_faults:
            leader_kill("SIGKILL the etcd leader, restart it", EtcdCluster::start(3)),
    });
}

#[cfg(feature = "zookeeper")]
mod zookeeper {
    use super::*;
    use crate::support::zookeeper::{shared, ZkEnsemble};

    process_tests!("zookeeper" {
        zookeeper_processes: ((), shared().url()),
        zookeeper_processes_under_faults:
            leader_kill("SIGKILL the ZooKeeper leader, restart it", ZkEnsemble::start(3)),
    });
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

    process_tests!("consul-sim" {
        consul_sim_processes: sim(),
        consul_sim_processes_under_faults: {
            let (sim, url) = sim();
            (sim, url, vec![])
        },
    });
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

    process_tests!("sqlite" {
        sqlite_processes: db(),
        sqlite_processes_under_faults: {
            let (dir, url) = db();
            (dir, url, vec![])
        },
    });
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

    process_tests!("file" {
        file_processes: store(),
        file_processes_under_faults: {
            let (dir, url) = store();
            (dir, url, vec![])
        },
    });
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use crate::support::postgres::PgServer;
    use std::sync::Arc;

    /// A server of this test's own, and its URL.
    fn server() -> (PgServer, String) {
        let pg = PgServer::start();
        let url = pg.url("locks");
        (pg, url)
    }

    process_tests!("postgres" {
        postgres_processes: server(),
        postgres_processes_under_faults: {
            let (pg, url) = server();
            let pg = Arc::new(Mutex::new(pg));
            let p = pg.clone();
            let restart = Fault::Custom(
                "stop PostgreSQL as by a crash (immediate shutdown) and start it again".into(),
                Box::new(move || {
                    let mut pg = p.lock().unwrap_or_else(|e| e.into_inner());
                    let took = pg.restart();
                    format!("serving again after {:.2}s", took.as_secs_f64())
                }),
            );
            (pg, url, vec![restart])
        },
    });
}

/// A sharded store over every backend of this build: the lock lives on one shard, picked by
/// the hash of its name.
#[cfg(all(feature = "etcd", feature = "zookeeper"))]
mod sharded {
    use super::*;

    fn enc(url: &str) -> String {
        url::form_urlencoded::byte_serialize(url.as_bytes()).collect()
    }

    #[test]
    fn sharded_processes() {
        let shards = [
            crate::support::etcd::shared_url(),
            crate::support::zookeeper::shared().url(),
        ];
        let url = format!(
            "sharded+ring://?{}",
            shards
                .iter()
                .map(|s| format!("shard={}", enc(s)))
                .collect::<Vec<_>>()
                .join("&")
        );
        clean_run("sharded", &url);
    }
}
