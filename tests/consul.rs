//! The Consul backend: the whole conformance suite against the in-process Consul simulator
//! (`tests/support/consul_sim/`), the same suite against a real Consul when `CONSUL_HTTP_ADDR`
//! is set, and fault and bad-input tests against the simulator.
#![cfg(all(feature = "consul", feature = "conformance"))]

mod support;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use coordkit::backend::consul::{ConsulConfig, ConsulStore};
use coordkit::conformance::Harness;
use coordkit::{Backend, Consistency, DistLock, ErrorKind, KvStore, LockOptions, PutOptions};
use support::consul_sim::{ConsulSim, SimOptions};

/// One simulator for the conformance tests of this binary (it runs on its own thread).
fn shared_sim() -> &'static ConsulSim {
    static SIM: OnceLock<ConsulSim> = OnceLock::new();
    SIM.get_or_init(ConsulSim::start)
}

fn config_for(sim: &ConsulSim) -> ConsulConfig {
    ConsulConfig {
        address: sim.addr().to_string(),
        ..ConsulConfig::default()
    }
}

fn simulated() -> Harness {
    let cfg = config_for(shared_sim());
    Harness::new("consul-sim", move || {
        let cfg = cfg.clone();
        async move { Ok(Arc::new(ConsulStore::connect(cfg).await?) as Arc<dyn Backend>) }
    })
}

mod simulator {
    coordkit::conformance_tests!(super::simulated());
    coordkit::election_conformance_tests!(super::simulated());
    coordkit::recipe_conformance_tests!(super::simulated());
}

/// The same suite against a real Consul named by `CONSUL_HTTP_ADDR` (`host:port`, or an
/// `http(s)://` URL; `CONSUL_HTTP_TOKEN` is sent as the ACL token). Each test is skipped, with
/// a notice, when it is unset.
mod real {
    use super::*;

    pub fn harness() -> Option<Harness> {
        let addr = std::env::var("CONSUL_HTTP_ADDR").ok()?;
        let addr = addr.trim();
        if addr.is_empty() {
            return None;
        }
        let (https, address) = if let Some(a) = addr.strip_prefix("https://") {
            (true, a)
        } else {
            (false, addr.strip_prefix("http://").unwrap_or(addr))
        };
        let cfg = ConsulConfig {
            address: address.trim_end_matches('/').to_string(),
            https,
            token: std::env::var("CONSUL_HTTP_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
            ..ConsulConfig::default()
        };
        Some(Harness::new("consul-real", move || {
            let cfg = cfg.clone();
            async move { Ok(Arc::new(ConsulStore::connect(cfg).await?) as Arc<dyn Backend>) }
        }))
    }

    /// Prints the skip notice straight to stderr (past the test harness's output capture),
    /// once per test binary.
    fn skipped_notice(test: &str) {
        use std::io::Write;
        static SHOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !SHOWN.swap(true, std::sync::atomic::Ordering::Relaxed) {
            let _ = writeln!(
                std::io::stderr(),
                "NOTICE: CONSUL_HTTP_ADDR is not set: the conformance suite against a real Consul (consul::real::*) is SKIPPED; only the simulator was tested (first skipped: real::{test})"
            );
        }
    }

    macro_rules! real_tests {
        ($($name:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    match harness() {
                        Some(h) => coordkit::conformance::$name(&h).await,
                        None => skipped_notice(stringify!($name)),
                    }
                }
            )*
        };
    }

    coordkit::for_each_conformance_test!(real_tests, []);
}

// ---------------------------------------------------------------------------------------------
// Faults, bad input and layout, against a simulator of each test's own.

async fn store_on(sim: &ConsulSim, f: impl FnOnce(&mut ConsulConfig)) -> ConsulStore {
    let mut cfg = config_for(sim);
    f(&mut cfg);
    ConsulStore::connect(cfg)
        .await
        .expect("connect to the simulator")
}

async fn eventually(what: &str, bound: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A holder whose renewals stop: `lost()` fires at the lease deadline (the session create's
/// send time + TTL − margin), before the TTL has passed; the simulator invalidates the session
/// later (at 2 × TTL, A3: Consul only promises not before the TTL), and the next client gets
/// the lock only after the session's lock-delay, with a larger fencing token (A6), strictly
/// after the holder's `lost()` fired.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_session_lapse_then_lock_delay_then_larger_token() {
    let sim = ConsulSim::start();
    let a = store_on(&sim, |c| c.lock_delay = Duration::from_secs(3)).await;
    let b = store_on(&sim, |_| {}).await;
    let ttl = Duration::from_secs(10);
    let guard = a.lock("job", &LockOptions::new().ttl(ttl)).await.unwrap();
    let acquired = Instant::now();
    guard.suspend_keep_alive();
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move {
            let g = b
                .lock(
                    "job",
                    &LockOptions::new().ttl(ttl).wait(Duration::from_secs(60)),
                )
                .await;
            (g, Instant::now())
        })
    };
    tokio::time::timeout(Duration::from_secs(25), guard.lost())
        .await
        .expect("lost() fired");
    let lost_at = Instant::now();
    let lost_after = acquired.elapsed();
    // TTL 10 s − margin 300 ms, counted from the create, which came before the acquisition.
    assert!(
        lost_after >= Duration::from_millis(9500) && lost_after < ttl - Duration::from_millis(250),
        "lost after {lost_after:?}"
    );
    let (next, at) = tokio::time::timeout(Duration::from_secs(40), waiter)
        .await
        .expect("waiter finished")
        .unwrap();
    let next = next.expect("the next client got the lock");
    let took = at.duration_since(acquired);
    // Invalidation at 2 × TTL after the last renewal (the acquisition), then 3 s of lock-delay.
    assert!(
        took >= Duration::from_millis(22_500),
        "taken over after {took:?}"
    );
    assert!(
        took < Duration::from_secs(30),
        "taken over only after {took:?}"
    );
    assert!(next.token() > guard.token());
    assert!(at > lost_at, "the next holder acquired before lost() fired");
    eprintln!(
        "consul sim lapse: lost() fired {:?} before the next holder acquired",
        at - lost_at
    );
    assert_eq!(
        guard.release().await.unwrap_err().kind(),
        ErrorKind::LockLost
    );
    assert!(!next.is_lost());
    next.release().await.unwrap();
}

/// Nothing listening: Unavailable at once. A server that accepts but never answers: Timeout
/// within the configured timeout. A server that goes away: every call fails within it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_unreachable_server_gives_unavailable_or_timeout_in_bounded_time() {
    let port = support::free_port();
    let started = Instant::now();
    let e = coordkit::connect(&format!("consul://127.0.0.1:{port}?timeout=2s"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));

    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let _keep = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in hole.incoming().take(4) {
            conns.push(c);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let started = Instant::now();
    let e = coordkit::connect(&format!("consul://{hole_addr}?timeout=1s"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );

    let sim = ConsulSim::start();
    let store = store_on(&sim, |c| c.timeout = Duration::from_millis(1500)).await;
    store
        .put("k", b"v".to_vec(), PutOptions::default())
        .await
        .unwrap();
    sim.stop();
    for (what, r) in [
        ("get", store.get("k", Consistency::Strong).await.map(|_| ())),
        (
            "put",
            store
                .put("k", b"w".to_vec(), PutOptions::default())
                .await
                .map(|_| ()),
        ),
        ("list", store.list("", Consistency::Stale).await.map(|_| ())),
        (
            "lock",
            store.lock("l", &LockOptions::new()).await.map(|_| ()),
        ),
        ("watch", store.watch("").await.map(|_| ())),
    ] {
        let e = r.unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
            "{what}: {e}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// Oversized values and invalid keys never reach the server: the Raft index does not move.
/// Values too big for a transaction body but within 512 KiB take the plain-PUT path and
/// still report their exact version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_sends_nothing_and_large_values_round_trip() {
    let sim = ConsulSim::start();
    let store = store_on(&sim, |_| {}).await;
    let v1 = store
        .put("big", b"small".to_vec(), PutOptions::default())
        .await
        .unwrap();
    let before = sim.raft_index();
    let e = store
        .put("big", vec![1; 524_289], PutOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueTooLarge);
    let e = store
        .compare_and_swap("big", coordkit::Expect::Version(v1), Some(vec![1; 600_000]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueTooLarge);
    for bad in coordkit::conformance::invalid_keys() {
        let e = store
            .put(&bad, b"x".to_vec(), PutOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidKey, "{bad:?}");
        let e = store.lock(&bad, &LockOptions::new()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidKey, "{bad:?}");
    }
    let e = store
        .lock("short", &LockOptions::new().ttl(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = store
        .put("t", b"x".to_vec(), PutOptions::ttl(Duration::from_secs(30)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert_eq!(
        sim.raft_index(),
        before,
        "rejected input reached the server"
    );
    assert_eq!(sim.session_count(), 0);

    let exact = vec![7u8; 524_288];
    let v2 = store
        .put("big", exact.clone(), PutOptions::default())
        .await
        .unwrap();
    let got = store
        .get("big", Consistency::Strong)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.value.len(), got.version), (exact.len(), v2));
    let v3 = store
        .compare_and_swap(
            "big",
            coordkit::Expect::Version(v2),
            Some(vec![8u8; 500_000]),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store
            .get("big", Consistency::Strong)
            .await
            .unwrap()
            .unwrap()
            .version,
        v3
    );
    let e = store
        .compare_and_swap(
            "big",
            coordkit::Expect::Version(v2),
            Some(vec![9u8; 500_000]),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
}

/// The lock key is `<prefix>locks/NAME` with Consul's lock flag value (A5), held by a
/// session; release deletes it and keeps the session for the client's next lock, and dropping
/// the client destroys it. A lock taken the way Consul's Go API
/// takes it (`?acquire=` with the same flags) excludes coordkit, and its release wakes a
/// coordkit waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_layout_and_interop_with_consul_api_locks() {
    let sim = ConsulSim::start();
    let store = store_on(&sim, |c| c.prefix = "app".into()).await;
    store
        .put("data", b"d".to_vec(), PutOptions::default())
        .await
        .unwrap();
    let g = store.lock("jobs/x", &LockOptions::new()).await.unwrap();
    let mut keys = sim.keys();
    keys.sort();
    assert_eq!(keys, ["app/kv/data", "app/locks/jobs/x"]);
    let http = reqwest::Client::new();
    let base = sim.http_base();
    let e: serde_json::Value = http
        .get(format!("{base}/v1/kv/app/locks/jobs/x"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap();
    assert_eq!(e[0]["Flags"], coordkit::backend::consul::LOCK_FLAG_VALUE);
    assert_eq!(e[0]["ModifyIndex"], g.token().get());
    assert!(e[0]["Session"].is_string());
    assert_eq!(sim.session_count(), 1);
    let session = e[0]["Session"].as_str().unwrap().to_string();
    g.release().await.unwrap();
    assert_eq!(sim.keys(), ["app/kv/data"]);
    assert_eq!(
        sim.session_count(),
        1,
        "the session is kept for the next lock"
    );
    let g = store.lock("jobs/x", &LockOptions::new()).await.unwrap();
    assert_eq!(
        holder_of(&sim, "app/locks/jobs/x").await.as_deref(),
        Some(session.as_str())
    );
    g.release().await.unwrap();
    assert_eq!(sim.keys(), ["app/kv/data"]);
    {
        let other = store_on(&sim, |c| c.prefix = "app".into()).await;
        let g = other.lock("jobs/y", &LockOptions::new()).await.unwrap();
        assert_eq!(sim.session_count(), 2, "a session per client");
        g.release().await.unwrap();
    }
    eventually(
        "the dropped client's session destroyed",
        Duration::from_secs(2),
        || sim.session_count() == 1,
    )
    .await;

    // A foreign holder, the Go API's way.
    let sid: serde_json::Value = http
        .put(format!("{base}/v1/session/create"))
        .body(r#"{"Name":"Consul API Lock","TTL":"15s"}"#)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap();
    let sid = sid["ID"].as_str().unwrap().to_string();
    let flags = coordkit::backend::consul::LOCK_FLAG_VALUE;
    let ok = http
        .put(format!(
            "{base}/v1/kv/app/locks/jobs/x?acquire={sid}&flags={flags}"
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(ok, "true");
    assert!(store
        .try_lock("jobs/x", &LockOptions::new())
        .await
        .unwrap()
        .is_none());
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.lock("jobs/x", &LockOptions::new()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished());
    http.put(format!(
        "{base}/v1/kv/app/locks/jobs/x?release={sid}&flags={flags}"
    ))
    .send()
    .await
    .unwrap();
    let g = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    g.release().await.unwrap();
}

/// The ACL token is sent as a header, is required by a simulator that demands it, and never
/// appears in `Debug` output or error messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_token_is_sent_and_hidden() {
    let sim = ConsulSim::start_with(SimOptions {
        acl_token: Some("s3cr3t-token".into()),
        ..SimOptions::default()
    })
    .unwrap();
    let e = coordkit::connect(&sim.url()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    let e = coordkit::connect(&format!("{}?token=wrong", sim.url()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    let store = coordkit::connect(&format!("{}?token=s3cr3t-token&dc=dc1", sim.url()))
        .await
        .unwrap();
    store
        .put("k", b"v".to_vec(), PutOptions::default())
        .await
        .unwrap();
    let g = store.lock("l", &LockOptions::new()).await.unwrap();
    g.release().await.unwrap();
    assert!(!format!("{store:?}").contains("s3cr3t"), "{store:?}");
    let e = coordkit::connect(&format!("{}?token=s3cr3t-token&dc=mars", sim.url()))
        .await
        .unwrap_err();
    assert!(!e.to_string().contains("s3cr3t"), "{e}");
    assert_eq!(e.kind(), ErrorKind::Unavailable);
}

/// A lock wait that times out leaves nothing behind: no key of its own, no session but the
/// client's one, which goes with the client. A wait behind another task of the same client
/// (the local queue) times out too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_wait_leaves_no_session() {
    let sim = ConsulSim::start();
    let store = store_on(&sim, |_| {}).await;
    let g = store.lock("busy", &LockOptions::new()).await.unwrap();
    let holder = holder_of(&sim, "locks/busy").await.unwrap();
    let e = store
        .lock("busy", &LockOptions::new().wait(Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    let other = store_on(&sim, |_| {}).await;
    let e = other
        .lock("busy", &LockOptions::new().wait(Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert_eq!(holder_of(&sim, "locks/busy").await, Some(holder));
    assert_eq!(sim.keys(), ["locks/busy"]);
    drop(other);
    eventually("waiter's session destroyed", Duration::from_secs(3), || {
        sim.session_count() == 1
    })
    .await;
    g.release().await.unwrap();
    assert!(sim.keys().is_empty());
    drop(store);
    eventually("holder's session destroyed", Duration::from_secs(3), || {
        sim.session_count() == 0
    })
    .await;
}

/// The watch diffs successive blocking-query results. Changes between two polls come out in
/// index order (deletes placed by their tombstones' index, A2), unmarked when the indexes prove
/// each is one write; a key created and deleted atomically, which no poll can see, produces no
/// event (the coalescing contract allows it) and the watch goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_orders_batched_changes_and_survives_unseen_ones() {
    let sim = ConsulSim::start();
    let store = store_on(&sim, |_| {}).await;
    for k in ["w/a", "w/b", "w/c"] {
        store
            .put(k, b"0".to_vec(), PutOptions::default())
            .await
            .unwrap();
    }
    let mut events = store.watch("w/").await.unwrap();
    // One transaction: several changes land between two polls, with the same index.
    let http = reqwest::Client::new();
    let txn = |ops: serde_json::Value| {
        let http = http.clone();
        let url = format!("{}/v1/txn", sim.http_base());
        async move {
            let r = http.put(url).body(ops.to_string()).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    txn(serde_json::json!([
        {"KV": {"Verb": "delete", "Key": "kv/w/c"}},
        {"KV": {"Verb": "set", "Key": "kv/w/d", "Value": "MQ=="}},
    ]))
    .await;
    store.delete("w/a").await.unwrap();
    let mut got = Vec::new();
    while got
        .iter()
        .filter(|e: &&String| !e.starts_with("coalesced"))
        .count()
        < 3
    {
        got.push(event_line(&mut events).await);
    }
    // w/a was written long before its delete: other writes lie between, so it is marked.
    let unmarked: Vec<&String> = got.iter().filter(|e| !e.starts_with("coalesced")).collect();
    assert!(
        unmarked == ["delete w/c", "put w/d", "delete w/a"]
            || unmarked == ["put w/d", "delete w/c", "delete w/a"],
        "{got:?}"
    );
    assert!(got.contains(&"coalesced w/a".to_string()), "{got:?}");
    // Created and deleted in one transaction: invisible to any poll (its tombstone raises the
    // prefix index). No event, no end: the next write is reported.
    txn(serde_json::json!([
        {"KV": {"Verb": "set", "Key": "kv/w/ghost", "Value": "MQ=="}},
        {"KV": {"Verb": "delete", "Key": "kv/w/ghost"}},
    ]))
    .await;
    store
        .put("w/after", b"1".to_vec(), PutOptions::default())
        .await
        .unwrap();
    let mut ev = event_line(&mut events).await;
    if ev.starts_with("coalesced") {
        assert_eq!(ev, "coalesced w/after");
        ev = event_line(&mut events).await;
    }
    assert_eq!(ev, "put w/after");
}

async fn event_line(events: &mut coordkit::WatchStream) -> String {
    use futures::StreamExt;
    let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("event")
        .expect("stream open")
        .expect("no error");
    match ev {
        coordkit::WatchEvent::Put(e) => format!("put {}", e.key),
        coordkit::WatchEvent::Delete { key } => format!("delete {key}"),
        coordkit::WatchEvent::Coalesced { key } => format!("coalesced {key}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The lease clock, bounded waits and lock cleanup.

/// The IDs of the sessions the simulator holds, with whether each holds a key.
async fn sessions_of(sim: &ConsulSim) -> Vec<(String, Vec<String>)> {
    let list: serde_json::Value = reqwest::get(format!("{}/v1/session/list", sim.http_base()))
        .await
        .unwrap()
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let checks = s["NodeChecks"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            (s["ID"].as_str().unwrap().to_string(), checks)
        })
        .collect()
}

/// The session that holds `key`, read from the simulator.
async fn holder_of(sim: &ConsulSim, key: &str) -> Option<String> {
    let r = reqwest::get(format!("{}/v1/kv/{key}", sim.http_base()))
        .await
        .unwrap();
    if r.status() == 404 {
        return None;
    }
    let e: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    e[0]["Session"].as_str().map(str::to_string)
}

/// `wait(Duration::MAX)` and other waits too large for a deadline mean "unbounded": they
/// neither panic nor time out, on a free lock and on a held one that is then released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_waits_are_unbounded_and_never_panic() {
    let sim = ConsulSim::start();
    let store = store_on(&sim, |_| {}).await;
    let g = tokio::time::timeout(
        Duration::from_secs(5),
        store.lock("huge", &LockOptions::new().wait(Duration::MAX)),
    )
    .await
    .expect("bounded")
    .expect("a free lock with wait(Duration::MAX)");
    let mut held = g;
    for wait in [
        Duration::MAX,
        Duration::from_secs(u64::MAX / 2),
        // `--wait 3000000000000000h`
        Duration::from_secs(3_000_000_000_000_000 * 3600),
    ] {
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.lock("huge", &LockOptions::new().wait(wait)).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished(), "{wait:?}: the waiter gave up");
        held.release().await.unwrap();
        held = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("handed over")
            .expect("no panic")
            .unwrap_or_else(|e| panic!("{wait:?}: {e}"));
    }
    held.release().await.unwrap();
}

/// The wait bounds every step of `lock()`: with the lock held elsewhere, a `wait(300ms)`
/// returns `Timeout` within the wait plus a small bound even when the server stalls the
/// session create, the acquire transaction or the read of the key. Nothing stays behind: a
/// session created after the waiter gave up is destroyed, an acquire that went through
/// after it gave up is released, and the client keeps at most its one session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_wait_bounds_every_step_and_cleans_up() {
    let sim = ConsulSim::start();
    let a = store_on(&sim, |_| {}).await;
    let b = store_on(&sim, |_| {}).await;
    let held = a.lock("busy", &LockOptions::new()).await.unwrap();
    let wait = Duration::from_millis(300);
    let slack = Duration::from_millis(250);
    // With the sessions expected afterwards: the holder's, and the waiter's once it has one.
    for (path, delay, sessions) in [
        ("/v1/session/create", Duration::from_millis(1500), 1),
        ("/v1/session/create", Duration::MAX, 1),
        ("/v1/txn", Duration::from_millis(1500), 2),
        ("/v1/kv/locks/", Duration::from_millis(1500), 2),
    ] {
        sim.set_delay(path, Some(delay));
        let t = Instant::now();
        let e = b
            .lock("busy", &LockOptions::new().wait(wait))
            .await
            .unwrap_err();
        let took = t.elapsed();
        sim.set_delay(path, None);
        eprintln!("{path} stalled for {delay:?}: lock(wait {wait:?}) gave up after {took:?}");
        assert_eq!(e.kind(), ErrorKind::Timeout, "{path} stalled: {e}");
        assert!(
            took < wait + slack,
            "{path} stalled for {delay:?}: lock(wait {wait:?}) returned after {took:?}"
        );
        // Once the stalled requests are answered: a session created late is destroyed.
        eventually(
            &format!("{path}: the waiter's late session destroyed"),
            Duration::from_secs(4),
            || sim.session_count() == sessions,
        )
        .await;
        assert_eq!(sim.keys(), ["locks/busy"]);
    }
    held.release().await.unwrap();

    // A free lock whose acquire is answered only after the waiter gave up: the key was taken
    // on the server; the cleanup releases it and destroys the session.
    sim.set_delay("/v1/txn", Some(Duration::from_millis(1000)));
    let e = b
        .lock("late", &LockOptions::new().wait(wait))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    sim.set_delay("/v1/txn", None);
    eventually("nothing left behind", Duration::from_secs(5), || {
        sim.keys().is_empty()
    })
    .await;
    drop(b);
    eventually(
        "the waiter's session destroyed",
        Duration::from_secs(5),
        || sim.session_count() == 1,
    )
    .await;
    let g = tokio::time::timeout(
        Duration::from_secs(3),
        a.lock("late", &LockOptions::new().wait(Duration::from_secs(3))),
    )
    .await
    .expect("bounded")
    .expect("the late acquire did not keep the lock");
    g.release().await.unwrap();
}

/// A lock attempt whose session is invalidated while it waits fails with `LockLost` (as on
/// etcd), not `Unavailable`: here the session is destroyed behind its back, and in a second
/// attempt its renewals are stalled until the lease clock runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_attempt_whose_session_is_lost_gives_lock_lost() {
    let sim = ConsulSim::start();
    let a = store_on(&sim, |_| {}).await;
    let b = store_on(&sim, |_| {}).await;
    // A TTL long enough for the holder to outlive the stalled renewals below.
    let held = a
        .lock("w", &LockOptions::new().ttl(Duration::from_secs(60)))
        .await
        .unwrap();
    let mine = holder_of(&sim, "locks/w").await.unwrap();
    let ttl = Duration::from_secs(10);

    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.lock("w", &LockOptions::new().ttl(ttl)).await })
    };
    eventually("the waiter's session", Duration::from_secs(3), || {
        sim.session_count() == 2
    })
    .await;
    let theirs = sessions_of(&sim)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .find(|id| *id != mine)
        .unwrap();
    let http = reqwest::Client::new();
    http.put(format!("{}/v1/session/destroy/{theirs}", sim.http_base()))
        .send()
        .await
        .unwrap();
    let t = Instant::now();
    // The next renew (a third of the TTL after the create) finds the session gone.
    let e = tokio::time::timeout(ttl, waiter)
        .await
        .expect("the waiter noticed")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    assert!(t.elapsed() < ttl / 2, "{:?}", t.elapsed());

    // Renewals that get no answer: the lease clock runs out at TTL − margin after the create.
    sim.set_delay("/v1/session/renew", Some(Duration::MAX));
    let t = Instant::now();
    let e = tokio::time::timeout(
        ttl + Duration::from_secs(2),
        b.lock("w", &LockOptions::new().ttl(ttl)),
    )
    .await
    .expect("bounded by the TTL")
    .unwrap_err();
    let took = t.elapsed();
    sim.set_delay("/v1/session/renew", None);
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    assert!(
        took >= ttl - Duration::from_millis(500) && took < ttl,
        "lost after {took:?}"
    );
    assert!(!held.is_lost());
    held.release().await.unwrap();
}

/// Lock sessions carry no health checks (`NodeChecks: []`, `Checks: []`): a node health
/// failure, which invalidates sessions with the default `serfHealth` check, leaves the lock
/// held; only the TTL can end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_health_failure_does_not_end_a_lock() {
    let sim = ConsulSim::start();
    let store = store_on(&sim, |_| {}).await;
    let g = store.lock("h", &LockOptions::new()).await.unwrap();
    let sessions = sessions_of(&sim).await;
    assert_eq!(sessions.len(), 1);
    assert!(sessions[0].1.is_empty(), "node checks {:?}", sessions[0].1);
    // A session with the default checks, for contrast.
    let http = reqwest::Client::new();
    http.put(format!("{}/v1/session/create", sim.http_base()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(sim.fail_node_check("serfHealth"), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!g.is_lost(), "a node health failure ended the lock");
    assert!(holder_of(&sim, "locks/h").await.is_some());
    g.release().await.unwrap();
}

/// A guard dropped on a thread with no tokio runtime ends the lock: its release runs on the
/// runtime the guard was made on, and another client gets the lock long before the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_dropped_on_a_plain_thread_ends_the_lock() {
    let sim = ConsulSim::start();
    let a = store_on(&sim, |_| {}).await;
    let b = store_on(&sim, |_| {}).await;
    let ttl = Duration::from_secs(30);
    let g = a.lock("t", &LockOptions::new().ttl(ttl)).await.unwrap();
    let dropped = Instant::now();
    std::thread::spawn(move || drop(g)).join().unwrap();
    let g2 = b
        .lock("t", &LockOptions::new().wait(Duration::from_secs(5)))
        .await
        .expect("the dropped guard's lock was freed");
    let took = dropped.elapsed();
    assert!(took < Duration::from_secs(3), "freed after {took:?}");
    drop(a);
    eventually(
        "the dropped guard's session destroyed",
        Duration::from_secs(3),
        || sim.session_count() == 1,
    )
    .await;
    g2.release().await.unwrap();
}

/// The requests of each kind the simulator received between two counts.
fn requests_between(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    kind: &str,
) -> u64 {
    after.get(kind).copied().unwrap_or(0) - before.get(kind).copied().unwrap_or(0)
}

/// One session per client and TTL: every lock of a client with one TTL is taken with the same
/// session, created by the first of them; another TTL gets a session of its own; a lock+unlock
/// on the kept session costs one transaction and one delete, and no session request. Tasks of the client
/// still exclude each other on one lock (the second waits, `try_lock` finds it held), with
/// increasing tokens. Invalidating the session makes every guard on it lost, and the next lock
/// creates a new session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn locks_of_one_client_and_ttl_share_one_session() {
    let sim = ConsulSim::start();
    let store = store_on(&sim, |_| {}).await;
    let ttl = Duration::from_secs(15);
    let opts = LockOptions::new().ttl(ttl).wait(Duration::from_secs(10));
    let one = store.lock("one", &opts).await.unwrap();
    let two = store.lock("two", &opts).await.unwrap();
    assert_eq!(
        sim.requests("session create"),
        1,
        "one session for both locks"
    );
    let session = holder_of(&sim, "locks/one").await.unwrap();
    assert_eq!(
        holder_of(&sim, "locks/two").await.as_deref(),
        Some(session.as_str())
    );
    let other_ttl = store
        .lock("three", &LockOptions::new().ttl(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(sim.requests("session create"), 2, "a session per TTL");
    assert_ne!(holder_of(&sim, "locks/three").await.unwrap(), session);
    other_ttl.release().await.unwrap();

    let before = sim.request_counts();
    let mut last = 0;
    for _ in 0..20 {
        let g = store.lock("seq", &opts).await.unwrap();
        assert!(g.token().get() > last);
        last = g.token().get();
        g.release().await.unwrap();
    }
    let after = sim.request_counts();
    for kind in ["session create", "session destroy"] {
        assert_eq!(requests_between(&before, &after, kind), 0, "{kind}");
    }
    // The acquire is a `lock` transaction, the release one `DELETE ?cas=`.
    assert_eq!(requests_between(&before, &after, "txn"), 20, "{after:?}");
    assert_eq!(
        requests_between(&before, &after, "kv DELETE"),
        20,
        "{after:?}"
    );

    // Two tasks of the client on one lock.
    let first = store.lock("seq", &opts).await.unwrap();
    assert!(store.try_lock("seq", &opts).await.unwrap().is_none());
    let waiter = {
        let (store, opts) = (store.clone(), opts.clone());
        tokio::spawn(async move { store.lock("seq", &opts).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "two tasks of one client held one lock"
    );
    assert!(!first.is_lost());
    let first_token = first.token();
    first.release().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("handed over")
        .unwrap()
        .unwrap();
    assert!(second.token() > first_token);
    assert_eq!(
        holder_of(&sim, "locks/seq").await.as_deref(),
        Some(session.as_str())
    );
    second.release().await.unwrap();

    // The session is invalidated behind the client's back: both guards on it are lost.
    reqwest::Client::new()
        .put(format!("{}/v1/session/destroy/{session}", sim.http_base()))
        .send()
        .await
        .unwrap();
    for g in [&one, &two] {
        tokio::time::timeout(Duration::from_secs(3), g.lost())
            .await
            .unwrap_or_else(|_| panic!("{} not lost after its session was destroyed", g.name()));
        assert!(g.is_lost());
    }
    let one_token = one.token();
    for g in [one, two] {
        assert_eq!(g.release().await.unwrap_err().kind(), ErrorKind::LockLost);
    }
    // The next lock gets a new session (after the destroyed one's lock-delay on the key).
    let next = store.lock("one", &opts).await.unwrap();
    assert_eq!(sim.requests("session create"), 3);
    let renewed = holder_of(&sim, "locks/one").await.unwrap();
    assert_ne!(renewed, session);
    assert!(next.token() > one_token);
    let also = store.lock("two", &opts).await.unwrap();
    assert_eq!(holder_of(&sim, "locks/two").await, Some(renewed));
    assert_eq!(sim.requests("session create"), 3);
    next.release().await.unwrap();
    also.release().await.unwrap();
    assert!(sim.keys().is_empty(), "{:?}", sim.keys());
}

/// A session that no lock uses is destroyed at the first renewal time that finds it unused
/// for a whole renewal period (between a third and two thirds of the TTL after its last lock
/// went), instead of being renewed; the next lock creates a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_is_destroyed_after_a_renewal_period() {
    let sim = ConsulSim::start();
    let store = store_on(&sim, |_| {}).await;
    let ttl = Duration::from_secs(10);
    let opts = LockOptions::new().ttl(ttl);
    let g = store.lock("idle", &opts).await.unwrap();
    let t = Instant::now();
    g.release().await.unwrap();
    assert_eq!(sim.session_count(), 1);
    eventually("the idle session destroyed", ttl, || {
        sim.session_count() == 0
    })
    .await;
    let took = t.elapsed();
    assert!(took >= ttl / 3, "destroyed after {took:?}");
    assert!(
        sim.requests("session renew") <= 1,
        "{:?}",
        sim.request_counts()
    );
    let g = store.lock("idle", &opts).await.unwrap();
    assert_eq!(sim.requests("session create"), 2);
    g.release().await.unwrap();
}

/// The lease adopts the TTL a renew answer reports (a loaded server may raise it, A3): after a
/// renew that raised the TTL from 10 s to 20 s, a holder that stops renewing is lost at that
/// renew's send time + 20 s − margin, not at 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_adopts_the_ttl_of_the_renew_answer() {
    let sim = ConsulSim::start();
    let store = store_on(&sim, |_| {}).await;
    sim.raise_ttl_on_renew(Some(Duration::from_secs(20)));
    let ttl = Duration::from_secs(10);
    let t = Instant::now();
    let g = store
        .lock("raised", &LockOptions::new().ttl(ttl))
        .await
        .unwrap();
    // The first renew goes out a third of the TTL after the create.
    tokio::time::sleep(Duration::from_secs(4)).await;
    g.suspend_keep_alive();
    tokio::time::timeout(Duration::from_secs(25), g.lost())
        .await
        .expect("lost() fired");
    let took = t.elapsed();
    // First renew at about 3.3 s: lost at about 3.3 + 20 − 0.5 s (10 s unadopted: 13 s).
    assert!(
        took > Duration::from_secs(20) && took < Duration::from_secs(23),
        "lost after {took:?}"
    );
    assert!(
        holder_of(&sim, "locks/raised").await.is_some(),
        "the server still holds it"
    );
}

/// Renewals that hang (a server or path that accepts requests and never answers) with a request
/// timeout longer than the TTL: `lost()` still fires at the lease deadline, TTL − margin after
/// the last confirmed send, not when the hanging renew times out; and strictly before another
/// client can acquire.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_fires_at_the_deadline_while_renewals_hang() {
    let sim = ConsulSim::start();
    let a = store_on(&sim, |c| c.timeout = Duration::from_secs(25)).await;
    let b = store_on(&sim, |_| {}).await;
    let ttl = Duration::from_secs(10);
    let t = Instant::now();
    let g = a.lock("hang", &LockOptions::new().ttl(ttl)).await.unwrap();
    sim.set_delay("/v1/session/renew", Some(Duration::MAX));
    tokio::time::timeout(ttl + Duration::from_secs(5), g.lost())
        .await
        .expect("lost() fired");
    let lost_at = Instant::now();
    let lost_after = lost_at - t;
    assert!(g.is_lost());
    assert!(
        lost_after >= ttl - Duration::from_millis(400) && lost_after < ttl,
        "lost after {lost_after:?}"
    );
    assert!(
        holder_of(&sim, "locks/hang").await.is_some(),
        "the server still counts the session valid"
    );
    sim.set_delay("/v1/session/renew", None);
    let next = b
        .lock(
            "hang",
            &LockOptions::new().ttl(ttl).wait(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    let acquired_at = Instant::now();
    assert!(acquired_at > lost_at);
    eprintln!(
        "consul sim, renewals hanging: lost() after {lost_after:?}, next holder {:?} later",
        acquired_at - lost_at
    );
    assert!(next.token() > g.token());
    next.release().await.unwrap();
}

/// A value over 380 KiB goes through a plain PUT followed by a read for its version. When
/// another client writes the key between the two, the put has still happened and must not
/// report `Conflict` (which means nothing changed); the version it returns is not the key's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_put_overwritten_before_its_version_is_read_still_succeeds() {
    let sim = ConsulSim::start();
    let store = store_on(&sim, |_| {}).await;
    let big = vec![5u8; 450 * 1024];
    let v0 = store
        .put("race", b"first".to_vec(), PutOptions::default())
        .await
        .unwrap();
    sim.overwrite_after_next_put("kv/race", b"theirs");
    let v = store
        .put("race", big.clone(), PutOptions::default())
        .await
        .expect("an applied put reported an error");
    let now = store
        .get("race", Consistency::Strong)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.value, b"theirs");
    assert_ne!(v, now.version);
    assert_ne!(v, v0);
    let e = store
        .compare_and_swap("race", coordkit::Expect::Version(v), Some(b"x".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    // The same through compare-and-swap with a large value.
    sim.overwrite_after_next_put("kv/race", b"again");
    let v2 = store
        .compare_and_swap("race", coordkit::Expect::Version(now.version), Some(big))
        .await
        .expect("an applied compare-and-swap reported an error")
        .unwrap();
    let after = store
        .get("race", Consistency::Strong)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.value, b"again");
    assert_ne!(v2, after.version);
}

/// A watch whose ACL token is revoked ends with `PermissionDenied` instead of retrying for ever
/// while its consumer waits for events that never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ends_when_its_token_is_revoked() {
    use futures::StreamExt;
    let sim = ConsulSim::start_with(SimOptions {
        acl_token: Some("old-token".into()),
        ..SimOptions::default()
    })
    .unwrap();
    let store = coordkit::connect(&format!("{}?token=old-token", sim.url()))
        .await
        .unwrap();
    let mut w = store.watch("revoked/").await.unwrap();
    store
        .put("revoked/a", b"1".to_vec(), PutOptions::default())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("an event");
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    sim.set_acl_token(Some("new-token"));
    // The next write (with the new token) ends the running blocking query.
    let writer = coordkit::connect(&format!("{}?token=new-token", sim.url()))
        .await
        .unwrap();
    writer
        .put("revoked/b", b"2".to_vec(), PutOptions::default())
        .await
        .unwrap();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(15), w.next()).await {
            Ok(Some(Ok(_))) => continue,
            other => break other,
        }
    };
    match end {
        Ok(Some(Err(e))) => assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}"),
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    let after = tokio::time::timeout(Duration::from_secs(5), w.next()).await;
    assert!(matches!(after, Ok(None)), "the stream must end: {after:?}");
}

/// The release deletes with `?cas=` the acquiring ModifyIndex. When the key was written while
/// held (a plain PUT keeps its session, and moves its ModifyIndex), that delete is refused, and
/// the release still frees the lock (check-session + delete): another client takes it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_key_written_while_held_is_still_released() {
    let sim = ConsulSim::start();
    let a = store_on(&sim, |_| {}).await;
    let b = store_on(&sim, |_| {}).await;
    let opts = LockOptions::new().ttl(Duration::from_secs(15));
    let g = a.lock("written", &opts).await.unwrap();
    let session = holder_of(&sim, "locks/written").await.unwrap();
    let put = reqwest::Client::new()
        .put(format!("{}/v1/kv/locks/written", sim.http_base()))
        .body("overwritten")
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    assert_eq!(
        holder_of(&sim, "locks/written").await.as_deref(),
        Some(session.as_str()),
        "a plain write keeps the lock's session"
    );
    let before = sim.request_counts();
    g.release().await.unwrap();
    let after = sim.request_counts();
    assert_eq!(
        requests_between(&before, &after, "kv DELETE"),
        1,
        "{after:?}"
    );
    assert_eq!(requests_between(&before, &after, "txn"), 1, "{after:?}");
    assert_eq!(holder_of(&sim, "locks/written").await, None);
    let taken = b.try_lock("written", &opts).await.unwrap();
    assert!(
        taken.is_some(),
        "the released lock is free for another client"
    );
    taken.unwrap().release().await.unwrap();
}
