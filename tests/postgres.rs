//! The PostgreSQL backend against a real PostgreSQL server started by the test (`initdb` in a
//! temporary directory, the server as the `postgres` user on a free loopback port): the whole
//! conformance suite (a fresh schema per test), typed errors on open (wrong password, missing
//! database, schema without rights, unreachable server), concurrent first opens, SQL
//! metacharacters, the change log's gap and pruning, watch latency, and a server restart under
//! contention.
#![cfg(all(feature = "conformance", feature = "postgres"))]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordkit::backend::postgres::{PostgresConfig, PostgresStore};
use coordkit::conformance::Harness;
use coordkit::{
    Consistency, DistLock, ErrorKind, Expect, KvStore, LockOptions, PutOptions, WatchEvent,
};
use futures::StreamExt;
use support::postgres::{fresh_schema, shared, PgServer, PASSWORD};

const STRONG: Consistency = Consistency::Strong;

fn postgres() -> Harness {
    let url = shared().url(&fresh_schema("ct"));
    Harness::new("postgres", move || {
        let url = url.clone();
        async move { coordkit::connect(&url).await }
    })
}

coordkit::conformance_tests!(postgres());
coordkit::election_conformance_tests!(postgres());
coordkit::recipe_conformance_tests!(postgres());

async fn open(url: &str) -> PostgresStore {
    let cfg = PostgresConfig::from_url_str(url).expect("url");
    PostgresStore::open(cfg).await.expect("open")
}

/// Opening fails with `kind` within 10 s, and the message never shows `secret`.
async fn open_fails(url: &str, kind: ErrorKind, secret: &str) -> String {
    let t0 = Instant::now();
    let e = match tokio::time::timeout(Duration::from_secs(20), coordkit::connect(url)).await {
        Ok(Err(e)) => e,
        Ok(Ok(_)) => panic!("{url}: opened"),
        Err(_) => panic!("{url}: no answer within 20 s"),
    };
    assert_eq!(e.kind(), kind, "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "{e}: {:?}",
        t0.elapsed()
    );
    assert!(!e.to_string().contains(secret), "{e}");
    assert!(!format!("{e:?}").contains(secret), "{e:?}");
    e.to_string()
}

#[tokio::test]
async fn opening_gives_typed_errors() {
    let pg = shared();
    let port = pg.port();
    let wrong = format!("postgres://postgres:not-the-password@127.0.0.1:{port}/postgres");
    open_fails(&wrong, ErrorKind::PermissionDenied, "not-the-password").await;
    let nopw = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let msg = open_fails(&nopw, ErrorKind::PermissionDenied, PASSWORD).await;
    assert!(msg.contains("password missing"), "{msg}");
    let nouser = format!("postgres://nosuchrole:{PASSWORD}@127.0.0.1:{port}/postgres");
    open_fails(&nouser, ErrorKind::PermissionDenied, PASSWORD).await;
    let nodb = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/nosuchdb");
    let msg = open_fails(&nodb, ErrorKind::InvalidConfig, PASSWORD).await;
    assert!(msg.contains("nosuchdb"), "{msg}");

    // A role without rights: on a schema someone else owns, and to create a schema at all.
    let locked = fresh_schema("locked");
    pg.psql(&format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'weak') THEN
             CREATE ROLE weak LOGIN PASSWORD 'weak-pw'; END IF; END $$;
         CREATE SCHEMA {locked};"
    ));
    let weak =
        |schema: &str| format!("postgres://weak:weak-pw@127.0.0.1:{port}/postgres?schema={schema}");
    let msg = open_fails(&weak(&locked), ErrorKind::PermissionDenied, "weak-pw").await;
    assert!(msg.contains("permission denied"), "{msg}");
    open_fails(
        &weak(&fresh_schema("new")),
        ErrorKind::PermissionDenied,
        "weak-pw",
    )
    .await;
    // Once the owner created the tables and granted their use, the weak role works.
    let shared_schema = fresh_schema("granted");
    drop(open(&pg.url(&shared_schema)).await);
    pg.psql(&format!(
        "GRANT USAGE ON SCHEMA {shared_schema} TO weak;
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {shared_schema} TO weak;"
    ));
    let s = open(&weak(&shared_schema)).await;
    s.put("k", b"v".to_vec(), PutOptions::default())
        .await
        .expect("put as the weak role");

    // Nobody listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    open_fails(
        &format!("postgres://postgres:{PASSWORD}@127.0.0.1:{closed}/postgres"),
        ErrorKind::Unavailable,
        PASSWORD,
    )
    .await;
    // The password stays out of the configuration's Debug.
    let cfg = PostgresConfig::from_url_str(&pg.url("x")).unwrap();
    assert!(!format!("{cfg:?}").contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_opens_create_the_schema_once() {
    let url = shared().url(&fresh_schema("first"));
    let opens = (0..8).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { PostgresStore::open(PostgresConfig::from_url_str(&url)?).await })
    });
    let stores: Vec<PostgresStore> = futures::future::join_all(opens)
        .await
        .into_iter()
        .map(|r| r.expect("join").expect("open"))
        .collect();
    stores[0]
        .put("a", b"1".to_vec(), PutOptions::default())
        .await
        .unwrap();
    for s in &stores {
        assert_eq!(s.get("a", STRONG).await.unwrap().unwrap().value, b"1");
    }
}

#[tokio::test]
async fn sql_metacharacters_change_nothing() {
    let schema = fresh_schema("meta");
    let s = open(&shared().url(&schema)).await;
    let nasty: Vec<Vec<u8>> = vec![
        b"'; DROP TABLE kv; --".to_vec(),
        b"\\x00\\\\ %_ $1 $$ \" '' E'\\n'".to_vec(),
        vec![0, 0x27, 0x5c, 0xff, 0xfe, 0],
        b"%".to_vec(),
        Vec::new(),
    ];
    for (i, v) in nasty.iter().enumerate() {
        let key = format!("m/k{i}");
        s.put(&key, v.clone(), PutOptions::default()).await.unwrap();
        assert_eq!(&s.get(&key, STRONG).await.unwrap().unwrap().value, v);
    }
    // `_` and `%` in prefixes are plain characters, not patterns.
    s.put("m/a_b", b"1".to_vec(), PutOptions::default())
        .await
        .unwrap();
    s.put("m/axb", b"2".to_vec(), PutOptions::default())
        .await
        .unwrap();
    let keys: Vec<String> = s
        .list("m/a_", STRONG)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["m/a_b"]);
    assert_eq!(s.list("m/", STRONG).await.unwrap().len(), nasty.len() + 2);
    // Schema names that would need quoting are refused before any SQL is sent.
    for bad in ["a\"b", "a;b", "A", "a b", "a'b"] {
        let url = format!("{}&x=1", shared().url(bad));
        let e = coordkit::connect(&url).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}: {e}");
    }
    // The tables are all still there.
    let n = shared().psql(&format!(
        "SELECT count(*) FROM pg_tables WHERE schemaname = '{schema}'"
    ));
    assert_eq!(n, "4");
}

/// A watch that cannot keep up with a change log pruned to a few changes ends with `WatchGap`,
/// after delivering an unbroken run of revisions; with the default pruning the same writes give
/// no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_gap_only_when_the_log_was_pruned_past_it() {
    for (kept, expect_gap) in [(8u64, true), (100_000, false)] {
        let url = format!("{}&changes_kept={kept}", shared().url(&fresh_schema("gap")));
        let s = open(&url).await;
        let mut w = s.watch("g/").await.unwrap();
        // The watch buffers 1024 events; 2000 unread changes leave it far behind the last 8.
        let n = 2000;
        for i in 0..n {
            s.put(
                &format!("g/{}", i % 7),
                i.to_string().into_bytes(),
                PutOptions::default(),
            )
            .await
            .unwrap();
        }
        let mut last: Option<u64> = None;
        let mut got = 0;
        let mut gap = false;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
                Ok(Some(Ok(WatchEvent::Put(e)))) => {
                    if let Some(l) = last {
                        assert_eq!(e.version.as_raw(), l + 1, "a change was skipped");
                    }
                    last = Some(e.version.as_raw());
                    got += 1;
                }
                Ok(Some(Ok(other))) => panic!("unexpected {other:?}"),
                Ok(Some(Err(e))) => {
                    assert_eq!(e.kind(), ErrorKind::WatchGap, "{e}");
                    gap = true;
                    break;
                }
                Ok(None) => panic!("the watch ended without an error"),
                Err(_) => panic!("no event within 10 s after {got}"),
            }
        }
        assert_eq!(gap, expect_gap, "kept {kept}: {got} events");
        if gap {
            assert!(got < n, "{got}");
            assert!(
                w.next().await.is_none(),
                "the stream goes on after WatchGap"
            );
        }
    }
}

/// Put-to-event latency through `NOTIFY`, printed; well under the recheck interval (2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_latency_is_that_of_a_notification() {
    let url = shared().url(&fresh_schema("lat"));
    let (a, b) = (open(&url).await, open(&url).await);
    assert_eq!(b.notifications_work(), None);
    let mut w = b.watch("l/").await.unwrap();
    assert_eq!(b.notifications_work(), Some(true));
    let mut lat = Vec::new();
    for i in 0..40 {
        let t0 = Instant::now();
        a.put("l/k", vec![i], PutOptions::default()).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
            Ok(Some(Ok(WatchEvent::Put(e)))) => assert_eq!(e.value, vec![i]),
            other => panic!("{other:?}"),
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    let (p50, p99) = (lat[lat.len() / 2], lat[lat.len() - 1]);
    println!("postgres watch latency (put start to event): p50 {p50:?}, max {p99:?}");
    assert!(p50 < Duration::from_millis(500), "p50 {p50:?}");
}

/// TTL keys expire in database time and their deletes reach watchers without any other write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_are_reaped_with_delete_events() {
    let s = open(&shared().url(&fresh_schema("ttl"))).await;
    let mut w = s.watch("t/").await.unwrap();
    s.put(
        "t/k",
        b"v".to_vec(),
        PutOptions::ttl(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let mut saw_delete = false;
    while t0.elapsed() < Duration::from_secs(5) {
        match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
            Ok(Some(Ok(WatchEvent::Delete { key }))) => {
                assert_eq!(key, "t/k");
                saw_delete = true;
                break;
            }
            Ok(Some(Ok(WatchEvent::Put(_)))) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(saw_delete);
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert!(s.get("t/k", STRONG).await.unwrap().is_none());
}

/// A second `lock()` by the same store waits (no re-entry), and wakes on the release through a
/// notification, long before the holder's TTL or the recheck interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_wake_on_release_not_by_polling() {
    let s = open(&shared().url(&fresh_schema("wake"))).await;
    let opts = LockOptions::new().ttl(Duration::from_secs(30));
    let g = s.lock("l", &opts).await.unwrap();
    assert!(s.try_lock("l", &opts).await.unwrap().is_none());
    let s2 = s.clone();
    let o2 = opts.clone().wait(Duration::from_secs(20));
    let waiter = tokio::spawn(async move {
        let g = s2.lock("l", &o2).await;
        (g, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    let t1 = g.token();
    g.release().await.unwrap();
    let (g2, at) = waiter.await.unwrap();
    let g2 = g2.unwrap();
    let handoff = at.duration_since(released);
    println!("postgres lock handoff after release: {handoff:?}");
    assert!(handoff < Duration::from_millis(1000), "{handoff:?}");
    assert!(g2.token() > t1);
}

/// PostgreSQL stopped as by a crash and started again while clients hold and wait for a lock:
/// calls fail with `Unavailable` (or `Timeout`) while it is down, the holders' `lost()` fires,
/// the watch resumes without loss or repetition, and everything works again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_fails_calls_and_everything_recovers() {
    let mut pg = PgServer::start();
    let url = format!(
        "{}&request_timeout=2s&connect_timeout=2s",
        pg.url("restart")
    );
    let a = open(&url).await;
    let b = open(&url).await;
    let mut w = b.watch("r/").await.unwrap();
    for i in 0..5u8 {
        a.put("r/k", vec![i], PutOptions::default()).await.unwrap();
    }
    let opts = LockOptions::new().ttl(Duration::from_secs(2));
    let g = a.lock("r", &opts).await.unwrap();
    let t_before = g.token();

    let lost = g.lost();
    let b2 = b.clone();
    let down = std::thread::spawn(move || {
        let took = pg.restart();
        (pg, took)
    });
    // While it is down: typed errors, in bounded time.
    let mut failures = Vec::new();
    let t0 = Instant::now();
    while failures.is_empty() && t0.elapsed() < Duration::from_secs(20) {
        match tokio::time::timeout(Duration::from_secs(5), b2.get("r/k", STRONG)).await {
            Ok(Err(e)) => failures.push(e.kind()),
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(_) => panic!("a call hung while the server was down"),
        }
    }
    let (pg, took) = down.join().unwrap();
    println!("postgres restart took {took:?}; failures while down: {failures:?}");
    assert!(
        failures
            .iter()
            .all(|k| matches!(k, ErrorKind::Unavailable | ErrorKind::Timeout)),
        "{failures:?}"
    );
    assert!(
        !failures.is_empty(),
        "no call failed while the server was down"
    );
    tokio::time::timeout(Duration::from_secs(5), lost)
        .await
        .expect("the holder's lost() fired");

    // Recovery: writes, the watch (resumed without loss or repetition), and the lock.
    let t1 = Instant::now();
    loop {
        match a.put("r/k", vec![5], PutOptions::default()).await {
            Ok(_) => break,
            Err(e) if t1.elapsed() < Duration::from_secs(20) => {
                assert!(
                    matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
                    "{e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    }
    let mut seen = Vec::new();
    while seen.len() < 6 {
        match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Ok(WatchEvent::Put(e)))) => seen.push(e.value[0]),
            other => panic!("{other:?} after {seen:?}"),
        }
    }
    assert_eq!(seen, [0, 1, 2, 3, 4, 5]);
    // The listening connection is back: a change arrives by notification again, well before
    // the 2 s recheck.
    let back = Instant::now();
    while b.notifications_work() != Some(true) && back.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.notifications_work(), Some(true));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t2 = Instant::now();
    a.put("r/k", vec![6], PutOptions::default()).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(Ok(WatchEvent::Put(e)))) => assert_eq!(e.value, [6]),
        other => panic!("{other:?}"),
    }
    assert!(
        t2.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t2.elapsed()
    );
    let g2 = b
        .lock("r", &opts.clone().wait(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(g2.token() > t_before);
    assert!(
        a.try_lock("r", &opts).await.unwrap().is_none(),
        "two holders"
    );
    drop(pg);
}

#[tokio::test]
async fn both_schemes_and_cas() {
    let url = shared().url(&fresh_schema("reg"));
    let s = coordkit::connect(&url).await.unwrap();
    assert_eq!(s.capabilities().backend, "postgres");
    let alias = url.replacen("postgres://", "postgresql://", 1);
    let s2 = coordkit::connect(&alias).await.unwrap();
    s.put("x", b"1".to_vec(), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(s2.get("x", STRONG).await.unwrap().unwrap().value, b"1");
    let _ = Arc::clone(&s2);
    // CAS in one transaction: a stale version conflicts, nothing changes.
    let v = s2.get("x", STRONG).await.unwrap().unwrap().version;
    s.compare_and_swap("x", Expect::Version(v), Some(b"2".to_vec()))
        .await
        .unwrap();
    let e = s2
        .compare_and_swap("x", Expect::Version(v), Some(b"3".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert_eq!(s.get("x", STRONG).await.unwrap().unwrap().value, b"2");
}

/// The whole conformance suite again, through pgbouncer in transaction mode: every operation
/// is one transaction or one unprepared statement, so the pooled server connections can change
/// between any two of them. `LISTEN` does not carry through transaction pooling, so the store
/// runs with `listen=false` and looks every `recheck` (100 ms).
mod through_pgbouncer {
    use super::*;
    use crate::support::postgres::shared_bouncer;

    fn bounced() -> Harness {
        let url = shared_bouncer().url(&fresh_schema("pgb"), "&listen=false&recheck=100ms");
        Harness::new("postgres-pgbouncer", move || {
            let url = url.clone();
            async move { coordkit::connect(&url).await }
        })
    }

    coordkit::conformance_tests!(bounced());

    /// Behind transaction pooling with `listen` left on, a watch still delivers (by its
    /// recheck when notifications are lost), not hanging on them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_listen_on_a_watch_falls_back_to_its_recheck() {
        let url = shared_bouncer().url(&fresh_schema("pgbl"), "&recheck=300ms");
        let (a, b) = (open(&url).await, open(&url).await);
        let mut w = b.watch("p/").await.unwrap();
        // The probe may pass or not (an idle pool can hand the listening server connection
        // back); either way the watch delivers.
        assert!(b.notifications_work().is_some());
        for i in 0..3u8 {
            a.put("p/k", vec![i], PutOptions::default()).await.unwrap();
            match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
                Ok(Some(Ok(WatchEvent::Put(e)))) => assert_eq!(e.value, vec![i]),
                other => panic!("{other:?}"),
            }
        }
    }
}

/// TLS (rustls): `require` and `prefer` encrypt (the server sees TLS sessions), `verify-full`
/// checks the chain against `sslrootcert` and the host name; a certificate from another CA, a
/// server without TLS under `require`, and a missing root file give typed errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes() {
    let pg = PgServer::start_tls();
    let ca = pg.ca().expect("TLS server").display().to_string();
    let other = pg
        .ca()
        .unwrap()
        .with_file_name("other-ca.pem")
        .display()
        .to_string();
    let base = pg.url("tls");
    let mut stores = Vec::new();
    for q in [
        "&sslmode=require".to_string(),
        "&sslmode=prefer".to_string(),
        format!("&sslmode=verify-full&sslrootcert={ca}"),
    ] {
        let s = open(&format!("{base}{q}")).await;
        s.put("t", q.clone().into_bytes(), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(
            s.get("t", STRONG).await.unwrap().unwrap().value,
            q.as_bytes()
        );
        stores.push(s);
    }
    let localhost = format!(
        "postgres://postgres:{PASSWORD}@localhost:{}/postgres?schema=tls&sslmode=verify-full&sslrootcert={ca}",
        pg.port()
    );
    stores.push(open(&localhost).await);
    let encrypted = pg.psql(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'coordkit' AND s.ssl",
    );
    assert!(encrypted.parse::<u32>().unwrap() >= 4, "{encrypted}");
    let plain = pg.psql(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'coordkit' AND NOT s.ssl",
    );
    assert_eq!(plain, "0");

    let msg = open_fails(
        &format!("{base}&sslmode=verify-full&sslrootcert={other}"),
        ErrorKind::Unavailable,
        PASSWORD,
    )
    .await;
    assert!(msg.contains("TLS"), "{msg}");
    // The Web PKI roots do not know the test CA.
    open_fails(
        &format!("{base}&sslmode=verify-full"),
        ErrorKind::Unavailable,
        PASSWORD,
    )
    .await;
    let msg = open_fails(
        &format!("{}&sslmode=require", shared().url("tls")),
        ErrorKind::Unavailable,
        PASSWORD,
    )
    .await;
    assert!(msg.contains("TLS"), "{msg}");
    open_fails(
        &format!("{base}&sslmode=verify-full&sslrootcert=/no/such/ca.pem"),
        ErrorKind::InvalidConfig,
        PASSWORD,
    )
    .await;
}
