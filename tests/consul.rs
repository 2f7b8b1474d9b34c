//! The Consul backend: the whole conformance suite against the in-process Consul simulator
//! (`tests/support/consul_sim/`), the same suite against a real Consul when `CONSUL_HTTP_ADDR`
//! is set, and fault and bad-input tests against the simulator.
#![cfg(feature = "consul")]

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

    real_tests!(
        values_round_trip,
        cas_create_update_delete,
        list_by_prefix,
        key_ttl_expiry,
        watch_order_and_start,
        watch_concurrent_writers,
        watch_survives_burst,
        watch_state_matches_list,
        invalid_keys_rejected,
        oversized_value_rejected,
        lock_mutual_exclusion,
        fencing_tokens_increase,
        try_lock_on_held_lock,
        lock_wait_times_out,
        lost_fires_when_lease_lapses,
        release_hands_over_promptly,
        dropped_guard_releases,
        run_locked_job,
    );
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

/// A holder whose renewals stop: `lost()` fires once a TTL passes without renewal, the
/// simulator invalidates the session at 2 × TTL (A3), and the next client gets the lock only
/// after the session's lock-delay, with a larger fencing token (A6).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_session_lapse_then_lock_delay_then_larger_token() {
    let sim = ConsulSim::start();
    let a = store_on(&sim, |c| c.lock_delay_ms = 3000).await;
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
    let lost_after = acquired.elapsed();
    assert!(
        lost_after >= Duration::from_millis(9500) && lost_after < Duration::from_secs(21),
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
    let store = store_on(&sim, |c| c.timeout_ms = 1500).await;
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
/// session; release deletes it and destroys the session. A lock taken the way Consul's Go API
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
    g.release().await.unwrap();
    assert_eq!(sim.keys(), ["app/kv/data"]);
    eventually("session destroyed", Duration::from_secs(2), || {
        sim.session_count() == 0
    })
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

/// A lock wait that times out leaves nothing behind: its session is destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_wait_leaves_no_session() {
    let sim = ConsulSim::start();
    let store = store_on(&sim, |_| {}).await;
    let g = store.lock("busy", &LockOptions::new()).await.unwrap();
    let e = store
        .lock("busy", &LockOptions::new().wait(Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    eventually("waiter's session destroyed", Duration::from_secs(3), || {
        sim.session_count() == 1
    })
    .await;
    g.release().await.unwrap();
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
