//! Faults against real ZooKeeper servers started by the test: a lock holder process killed, the
//! ensemble leader killed, the server paused past the session timeout, and no server at all.
//! Each test prints the timing it observed (`cargo test --test zookeeper_faults -- --nocapture`).

#![cfg(feature = "zookeeper")]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use coordkit::backend::zookeeper::{ZkConfig, ZkStore};
use coordkit::{Consistency, DistLock, ErrorKind, KvStore, LockOptions, PutOptions, WatchEvent};
use futures::StreamExt;
use support::zookeeper::{shared, ZkEnsemble, ZkStandalone};

const HOLDER_ENV: &str = "COORDKIT_ZK_HOLDER";

/// The lock holder of `holder_process_killed_lock_taken_over`, run as a separate OS process
/// (this test binary again). Not a test of its own: it only runs when that test starts it.
#[tokio::test]
#[ignore = "child process of holder_process_killed_lock_taken_over"]
async fn child_lock_holder() {
    let spec = std::env::var(HOLDER_ENV).expect("started by the parent test");
    let (url, rest) = spec.split_once(' ').expect("url name ttl");
    let (name, ttl) = rest.split_once(' ').expect("name ttl");
    let ttl = Duration::from_millis(ttl.parse().expect("ttl ms"));
    let store = coordkit::connect(url).await.expect("child connect");
    let guard = store
        .lock(name, &LockOptions::new().ttl(ttl))
        .await
        .expect("child lock");
    println!("HELD {}", guard.token());
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_process_killed_lock_taken_over() {
    let zk = shared();
    let name = format!("faults/killed-{}", std::process::id());
    let ttl = Duration::from_secs(3);
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    // The base dir as an extra (never matching) filter names the child for the reaper.
    cmd.arg("child_lock_holder")
        .arg(support::base_dir())
        .arg("--exact")
        .arg("--ignored")
        .arg("--nocapture")
        .env(
            HOLDER_ENV,
            format!("{} {name} {}", zk.url(), ttl.as_millis()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().expect("start holder process");
    let stdout = child.stdout.take().expect("holder stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(t) = line.strip_prefix("HELD ") {
                let _ = tx.send(t.trim().parse::<u64>().ok());
            }
        }
    });
    let holder_token = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Some(t)) => t,
        other => {
            let _ = child.kill();
            panic!("holder process did not take the lock: {other:?}");
        }
    };
    let store = ZkStore::connect(ZkConfig::from_url_str(&zk.url()).expect("url"))
        .await
        .expect("connect");
    assert!(
        store
            .try_lock(&name, &LockOptions::new().ttl(ttl))
            .await
            .expect("try_lock")
            .is_none(),
        "lock free while the holder process runs"
    );
    let killed = Instant::now();
    child.kill().expect("kill holder");
    let _ = child.wait();
    let guard = store
        .lock(
            &name,
            &LockOptions::new()
                .ttl(ttl)
                .wait(ttl + Duration::from_secs(10)),
        )
        .await
        .expect("lock after the holder died");
    let took = killed.elapsed();
    eprintln!(
        "holder killed -> lock taken over after {took:?} (session timeout {ttl:?}); tokens {holder_token} -> {}",
        guard.token()
    );
    assert!(
        took <= ttl + Duration::from_secs(2),
        "took {took:?}, more than the session timeout {ttl:?} + 2 s"
    );
    assert!(guard.token().get() > holder_token, "token did not increase");
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensemble_leader_killed_operations_resume() {
    let mut ens = ZkEnsemble::start(3);
    let store = ZkStore::connect(ZkConfig::from_url_str(&ens.url()).expect("url"))
        .await
        .expect("connect");
    store
        .put("f/before", b"1".to_vec(), PutOptions::default())
        .await
        .expect("put before");
    let guard = store
        .lock("f/held", &LockOptions::new().ttl(Duration::from_secs(10)))
        .await
        .expect("lock");
    let mut watch = store.watch("f/").await.expect("watch");
    let leader = ens.leader().expect("leader");
    let killed = Instant::now();
    ens.kill(leader);
    // Operations work again within 5 s.
    let mut n = 0u32;
    let recovered = loop {
        n += 1;
        let key = format!("f/after-{n}");
        let ok = store
            .put(&key, b"2".to_vec(), PutOptions::default())
            .await
            .is_ok()
            && store
                .get(&key, Consistency::Strong)
                .await
                .is_ok_and(|e| e.is_some());
        if ok {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "no successful put+get within 5 s of killing the leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("leader killed -> put+get succeeded again after {recovered:?} ({n} attempts)");
    assert!(recovered < Duration::from_secs(5));
    // The lock survived the failover (its session reconnected well within its TTL).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!guard.is_lost(), "lock lost across a leader failover");
    let e = store
        .try_lock("f/held", &LockOptions::new().ttl(Duration::from_secs(10)))
        .await
        .expect("try_lock");
    assert!(e.is_none(), "lock free while held across the failover");
    // The watch survives the failover: it reports the keys written while it reconnected (as
    // coalesced events, re-listed) and the probe written after, and never ends.
    store
        .put("f/probe", b"p".to_vec(), PutOptions::default())
        .await
        .expect("put probe");
    // A put that failed during the failover may or may not have been applied: expect what
    // is there.
    let mut missing: std::collections::BTreeSet<String> = store
        .list("f/", Consistency::Strong)
        .await
        .expect("list")
        .into_iter()
        .map(|e| e.key)
        .filter(|k| k.starts_with("f/after-") || k == "f/probe")
        .collect();
    assert!(missing.contains("f/probe"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, watch.next()).await {
            Ok(Some(Ok(WatchEvent::Put(e)))) => {
                missing.remove(&e.key);
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("watch error across the failover: {e}"),
            Ok(None) => panic!("watch ended across the failover"),
            Err(_) => panic!("watch across the failover never reported {missing:?}"),
        }
    }
    eprintln!("watch across the failover: every key written during and after it reported");
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_paused_past_session_timeout_lock_lost() {
    let mut zk = ZkStandalone::start();
    let store = ZkStore::connect(ZkConfig::from_url_str(&zk.url()).expect("url"))
        .await
        .expect("connect");
    // A second store whose main session expires while the server is silent.
    let short = ZkStore::connect(
        ZkConfig::from_url_str(&format!("{}&session_timeout=1s", zk.url())).expect("url"),
    )
    .await
    .expect("connect");
    short
        .put("f/short", b"1".to_vec(), PutOptions::default())
        .await
        .expect("put");
    let ttl = Duration::from_secs(2);
    let guard = store
        .lock("f/paused", &LockOptions::new().ttl(ttl))
        .await
        .expect("lock");
    let lost = guard.lost();
    let paused = Instant::now();
    zk.node().pause();
    let fired = tokio::time::timeout(ttl * 2 + Duration::from_secs(3), lost).await;
    let after = paused.elapsed();
    zk.node().resume();
    assert!(
        fired.is_ok(),
        "lost() did not fire while the server was silent for {after:?}"
    );
    eprintln!("server silent -> lost() fired after {after:?} (lock TTL {ttl:?})");
    assert!(guard.is_lost());
    // The lease deadline: the last answered request was sent before the pause, so lost() fires
    // at most TTL − margin after it (plus timer slack), before the server can expire the
    // session (it counts from the last packet it *received*).
    let bound = ttl - coordkit::lease::margin(ttl) + Duration::from_millis(60);
    assert!(
        after <= bound,
        "lost() fired only after {after:?}, later than the lease deadline (≤ {bound:?})"
    );
    // The store whose session expired opens a new one by itself.
    let started = Instant::now();
    let got = loop {
        match short.get("f/short", Consistency::Strong).await {
            Ok(v) => break v,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "store did not recover from its session expiry: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    eprintln!(
        "expired main session replaced after {:?}",
        started.elapsed()
    );
    assert_eq!(got.map(|e| e.value), Some(b"1".to_vec()));
}

/// A server whose minSessionTimeout (4 s) is above the requested lock TTL (2 s) would keep a
/// lapsed holder's lock for longer than its TTL: the lock is refused with `InvalidArgument`
/// naming both values (the config here declares the servers' usual 1 s minimum, so the
/// client-side check lets the TTL through). A TTL the server honours works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_timeout_raised_above_the_ttl_is_refused() {
    let zk = ZkStandalone::start_with_min_session(Duration::from_secs(4));
    let store = ZkStore::connect(ZkConfig::from_url_str(&zk.url()).expect("url"))
        .await
        .expect("connect");
    let opts = LockOptions::new().ttl(Duration::from_secs(2));
    let e = store
        .lock("f/raised", &opts)
        .await
        .expect_err("lock with a TTL the server raises");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("2s") && msg.contains("4s"), "{msg}");
    let e = store
        .try_lock("f/raised", &opts)
        .await
        .expect_err("try_lock with a TTL the server raises");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let g = store
        .lock("f/raised", &LockOptions::new().ttl(Duration::from_secs(4)))
        .await
        .expect("a TTL the server honours");
    g.release().await.expect("release");
}

#[tokio::test]
async fn unreachable_server_fails_within_connect_timeout() {
    // Nothing listens on this port.
    let port = support::free_port();
    let timeout = Duration::from_secs(2);
    let url = format!("zk://127.0.0.1:{port}?connect_timeout=2s");
    let cpu_before = cpu_time();
    let started = Instant::now();
    let r = coordkit::connect(&url).await;
    let took = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    let e = r.map(|_| ()).expect_err("connected to nothing");
    eprintln!("refused: {e} after {took:?}, {cpu:?} CPU");
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(
        took <= timeout + Duration::from_millis(500),
        "took {took:?}"
    );
    assert!(
        cpu < Duration::from_millis(500),
        "busy loop: {cpu:?} CPU in {took:?}"
    );

    // A black hole: accepts connections, never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hole_port = hole.local_addr().expect("addr").port();
    let keep = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in hole.incoming().take(64).flatten() {
            conns.push(c);
        }
    });
    let url = format!("zk://127.0.0.1:{hole_port}?connect_timeout=2s");
    let cpu_before = cpu_time();
    let started = Instant::now();
    let r = coordkit::connect(&url).await;
    let took = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    let e = r.map(|_| ()).expect_err("connected to a black hole");
    eprintln!("black hole: {e} after {took:?}, {cpu:?} CPU");
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(
        took <= timeout + Duration::from_millis(500),
        "took {took:?}"
    );
    assert!(
        cpu < Duration::from_millis(500),
        "busy loop: {cpu:?} CPU in {took:?}"
    );
    drop(keep);

    // A lock session that cannot be opened fails within the connect timeout too.
    let s = shared();
    let store = ZkStore::connect(ZkConfig::from_url_str(&s.url()).expect("url"))
        .await
        .expect("connect");
    assert!(store.get("f/x", Consistency::Stale).await.is_ok());
}

/// CPU time used by this process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
