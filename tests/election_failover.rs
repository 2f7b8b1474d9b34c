//! Failover after the leader's process is killed: `coordkit elect` runs as a separate process,
//! is killed with SIGKILL while leader, and a campaign in this process takes over with a higher
//! term within TTL × the backend's lease expiry factor (plus a small allowance), on every
//! backend that more than one process can share. The measured times are printed.
#![cfg(feature = "cli")]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use coordkit::LockOptions;
use support::{fresh_dir, Proc};

const BIN: &str = env!("CARGO_BIN_EXE_coordkit");
const TTL: Duration = Duration::from_secs(2);

async fn failover_after_kill(backend: &str, url: &str) {
    let store = coordkit::connect(url).await.expect("connect");
    let caps = store.capabilities();
    let dir = fresh_dir(&format!("failover-{backend}"));
    let name = format!("failover-{}-{}", backend, std::process::id());
    // The value names the test directory: the process's command line then does too.
    let value = dir.join("leader").display().to_string();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--url", url, "elect", &name, "--value", &value, "--ttl", "2s",
    ])
    .args(["--", "sleep", "300"]);
    let mut leader = Proc::spawn("coordkit elect", &mut cmd, &dir.join("elect.log"));
    let started = Instant::now();
    let term = loop {
        if let Some(l) = store.leader(&name).await.expect("leader") {
            assert_eq!(l.value, value.as_bytes(), "[{backend}] the leader's value");
            break l.term;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "[{backend}] coordkit elect did not become leader: {}",
            std::fs::read_to_string(dir.join("elect.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // `coordkit leader` prints the term and the value.
    let out = Command::new(BIN)
        .args(["--url", url, "leader", &name])
        .output()
        .expect("run coordkit leader");
    assert!(out.status.success(), "[{backend}] coordkit leader: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{term} {value}\n"),
        "[{backend}] coordkit leader"
    );
    // Renewed past its TTL: still the leader.
    tokio::time::sleep(TTL + TTL / 2).await;
    let still = store.leader(&name).await.expect("leader").map(|l| l.term);
    assert_eq!(still, Some(term), "[{backend}] leadership kept by renewal");
    let bound = TTL * caps.lease_expiry_factor + Duration::from_secs(2);
    let killed = Instant::now();
    leader.kill();
    let g = store
        .campaign(
            &name,
            b"next".to_vec(),
            &LockOptions::new().ttl(TTL).wait(bound * 2),
        )
        .await
        .unwrap_or_else(|e| panic!("[{backend}] no failover: {e}"));
    let took = killed.elapsed();
    eprintln!(
        "[{backend}] failover after SIGKILL of the leader: {took:?} (ttl {TTL:?}, expiry factor {})",
        caps.lease_expiry_factor
    );
    assert!(g.term() > term, "[{backend}] term {} vs {term}", g.term());
    assert!(
        took <= bound,
        "[{backend}] failover took {took:?}, over {bound:?}"
    );
    let now = store
        .leader(&name)
        .await
        .expect("leader")
        .expect("a leader");
    assert_eq!(
        (now.value.as_slice(), now.term),
        (&b"next"[..], g.term()),
        "[{backend}] leader() after failover"
    );
    g.resign().await.expect("resign");
    let out = Command::new(BIN)
        .args(["--url", url, "--json", "leader", &name])
        .output()
        .expect("run coordkit leader");
    assert_eq!(out.status.code(), Some(3), "[{backend}] no leader: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"leader":null}"#,
        "[{backend}] coordkit --json leader"
    );
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_failover_after_kill() {
    let dir = fresh_dir("failover-sqlite-db");
    let url = format!("sqlite://{}", dir.join("e.db").display());
    failover_after_kill("sqlite", &url).await;
}

#[cfg(feature = "file")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_failover_after_kill() {
    let dir = fresh_dir("failover-file-dir");
    let url = format!("file://{}", dir.join("d").display());
    failover_after_kill("file", &url).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_failover_after_kill() {
    failover_after_kill("etcd", &support::etcd::shared_url()).await;
}

#[cfg(feature = "zookeeper")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_failover_after_kill() {
    failover_after_kill("zookeeper", &support::zookeeper::shared().url()).await;
}
