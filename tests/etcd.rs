//! The etcd backend against a real etcd (Debian's `/usr/bin/etcd`, started by the test):
//! the whole conformance suite, interoperation with `etcdctl lock`, oversized values.
#![cfg(all(feature = "etcd", feature = "conformance"))]

mod support;

use coordkit::conformance::Harness;

fn etcd() -> Harness {
    let url = support::etcd::shared_url();
    Harness::new("etcd", move || {
        let url = url.clone();
        async move { coordkit::connect(&url).await }
    })
}

coordkit::conformance_tests!(etcd());
coordkit::election_conformance_tests!(etcd());
coordkit::recipe_conformance_tests!(etcd());

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use coordkit::{Consistency, ErrorKind, LockOptions, PutOptions};
use support::etcd::{etcdctl, etcdctl_bin, grpc_requests, shared, EtcdCluster};
use support::{fresh_dir, wait_until, Proc};

/// Starts `etcdctl lock locks/<name> sh -c …`: the shell touches `<dir>/acquired` once etcdctl
/// holds the lock, then waits until `<dir>/release` exists; etcdctl unlocks when it exits.
fn etcdctl_lock(name: &str, dir: &Path) -> Proc {
    let script = format!(
        "touch '{d}/acquired'; while [ ! -f '{d}/release' ]; do sleep 0.05; done",
        d = dir.display()
    );
    let mut cmd = Command::new(etcdctl_bin());
    cmd.env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(shared().endpoints())
        .args([
            "lock",
            "--ttl",
            "10",
            &format!("locks/{name}"),
            "--",
            "sh",
            "-c",
            &script,
        ]);
    Proc::spawn("etcdctl lock", &mut cmd, &dir.join("etcdctl.log"))
}

fn lock_keys(name: &str) -> Vec<(String, u64)> {
    let (ok, out, err) = etcdctl(
        &shared().endpoints(),
        &["get", "--prefix", &format!("locks/{name}/"), "-w", "json"],
    );
    assert!(ok, "etcdctl get: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    v["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| {
                    let key = kv["key"].as_str().unwrap_or("");
                    let key = String::from_utf8(decode_b64(key)).unwrap_or_default();
                    (key, kv["create_revision"].as_u64().unwrap_or(0))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn decode_b64(s: &str) -> Vec<u8> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let Some(v) = T.iter().position(|t| *t == c) else {
            continue;
        };
        buf = (buf << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

/// A lock held by `etcdctl lock locks/NAME` excludes coordkit's lock `NAME`; once etcdctl
/// releases it, coordkit gets it with a token above etcdctl's key revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_excludes_coordkit() {
    let store = coordkit::connect(&shared().url()).await.expect("connect");
    let name = format!("interop-a-{}", std::process::id());
    let dir = fresh_dir("etcdctl-lock");
    let mut holder = etcdctl_lock(&name, &dir);
    assert!(
        wait_until(Duration::from_secs(10), || dir.join("acquired").exists()),
        "etcdctl did not acquire the lock"
    );
    let keys = lock_keys(&name);
    assert_eq!(keys.len(), 1, "etcdctl's lock key: {keys:?}");
    let etcdctl_rev = keys[0].1;
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let tried = store.try_lock(&name, &opts).await.expect("try_lock");
    assert!(tried.is_none(), "coordkit took a lock etcdctl holds");
    let waited = store
        .lock(&name, &opts.clone().wait(Duration::from_secs(1)))
        .await;
    assert_eq!(waited.map(|_| ()).unwrap_err().kind(), ErrorKind::Timeout);
    // A waiter queued behind etcdctl gets the lock when etcdctl releases.
    let waiter = {
        let store = store.clone();
        let (name, opts) = (name.clone(), opts.clone());
        tokio::spawn(async move { store.lock(&name, &opts.wait(Duration::from_secs(20))).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "waiter got the lock while etcdctl held it"
    );
    std::fs::write(dir.join("release"), b"").expect("release file");
    let guard = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("waiter finished")
        .expect("waiter task")
        .expect("lock after etcdctl released");
    assert!(
        guard.token().get() > etcdctl_rev,
        "token {} vs etcdctl's {etcdctl_rev}",
        guard.token()
    );
    assert!(wait_until(Duration::from_secs(5), || !holder.alive()));
    guard.release().await.expect("release");
    assert!(lock_keys(&name).is_empty(), "keys left behind");
}

/// A lock held by coordkit excludes `etcdctl lock locks/NAME` until coordkit releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordkit_lock_excludes_etcdctl() {
    let store = coordkit::connect(&shared().url()).await.expect("connect");
    let name = format!("interop-b-{}", std::process::id());
    let guard = store
        .lock(&name, &LockOptions::new().ttl(Duration::from_secs(10)))
        .await
        .expect("lock");
    let keys = lock_keys(&name);
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].0.starts_with(&format!("locks/{name}/")), "{keys:?}");
    assert_eq!(
        keys[0].1,
        guard.token().get(),
        "token is the key's create revision"
    );
    let dir = fresh_dir("etcdctl-wait");
    let mut waiter = etcdctl_lock(&name, &dir);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !dir.join("acquired").exists(),
        "etcdctl took a lock coordkit holds"
    );
    assert_eq!(lock_keys(&name).len(), 2, "etcdctl should be queued");
    let released = Instant::now();
    guard.release().await.expect("release");
    assert!(
        wait_until(Duration::from_secs(5), || dir.join("acquired").exists()),
        "etcdctl did not get the lock after coordkit released it"
    );
    eprintln!(
        "etcdctl acquired {:?} after coordkit's release",
        released.elapsed()
    );
    std::fs::write(dir.join("release"), b"").expect("release file");
    assert!(wait_until(Duration::from_secs(5), || !waiter.alive()));
}

/// Values over the limit give ValueTooLarge naming the limit, checked before sending, and
/// leave the stored value alone; when the client is told a larger limit than the server's,
/// the server's refusal maps to ValueTooLarge too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_values_name_the_limit_and_change_nothing() {
    let store = coordkit::connect(&shared().url()).await.expect("connect");
    let key = format!("big-{}/k", std::process::id());
    store
        .put(&key, b"small".to_vec(), PutOptions::default())
        .await
        .expect("put");
    let max = store.capabilities().max_value_size;
    assert!(max < 1_572_864 && max > 1_500_000, "max {max}");
    let e = store
        .put(&key, vec![1u8; max + 1], PutOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueTooLarge);
    assert!(e.to_string().contains("1572864"), "{e}");
    assert!(e.to_string().contains(&max.to_string()), "{e}");
    // Exactly at the limit is stored.
    store
        .put(&key, vec![2u8; max], PutOptions::default())
        .await
        .expect("put at the limit");
    store
        .put(&key, b"small".to_vec(), PutOptions::default())
        .await
        .expect("put");
    // A client that believes the server takes 8 MiB: the server refuses.
    let lax = coordkit::connect(&format!("{}?max_request_bytes=8388608", shared().url()))
        .await
        .expect("connect");
    for size in [1_800_000usize, 3_000_000] {
        let started = Instant::now();
        let e = lax
            .put(&key, vec![3u8; size], PutOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueTooLarge, "{size}: {e}");
        assert!(started.elapsed() < Duration::from_secs(6));
    }
    let got = store.get(&key, Consistency::Strong).await.expect("get");
    assert_eq!(got.map(|e| e.value), Some(b"small".to_vec()));
}

/// Data keys live under `kv/`, and a namespace prefixes everything (checked with etcdctl).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_layout_and_namespace() {
    let ns = format!("app{}/", std::process::id());
    let store = coordkit::connect(&format!("{}?namespace={ns}", shared().url()))
        .await
        .expect("connect");
    store
        .put("cfg/a", b"1".to_vec(), PutOptions::default())
        .await
        .expect("put");
    let (ok, out, err) = etcdctl(
        &shared().endpoints(),
        &["get", &format!("{ns}kv/cfg/a"), "--print-value-only"],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "1");
    let guard = store
        .lock("jobs/x", &LockOptions::new().ttl(Duration::from_secs(5)))
        .await
        .expect("lock");
    let (ok, out, _) = etcdctl(
        &shared().endpoints(),
        &[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{ns}locks/jobs/x/"),
        ],
    );
    assert!(ok);
    assert_eq!(out.lines().filter(|l| !l.is_empty()).count(), 1, "{out}");
    guard.release().await.expect("release");
    // The plain client does not see the namespaced key.
    let plain = coordkit::connect(&shared().url()).await.expect("connect");
    assert!(plain
        .get("cfg/a", Consistency::Strong)
        .await
        .expect("get")
        .is_none());
}

/// Locks of one client share one lease per TTL (no lease per lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_share_one_lease_per_ttl() {
    let store = coordkit::connect(&shared().url()).await.expect("connect");
    let opts = LockOptions::new().ttl(Duration::from_secs(7));
    let mut guards = Vec::new();
    let p = std::process::id();
    for i in 0..5 {
        guards.push(
            store
                .lock(&format!("share-{p}/l{i}"), &opts)
                .await
                .expect("lock"),
        );
    }
    let (ok, out, err) = etcdctl(
        &shared().endpoints(),
        &[
            "get",
            "--prefix",
            &format!("locks/share-{p}/"),
            "-w",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let leases: std::collections::HashSet<i64> = v["kvs"]
        .as_array()
        .expect("kvs")
        .iter()
        .map(|kv| kv["lease"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert!(!leases.contains(&0));
    for g in guards {
        g.release().await.expect("release");
    }
}

/// `lost()` fires when someone else deletes the lock key, and when the lease is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fires_on_key_deletion_and_lease_revocation() {
    let store = coordkit::connect(&shared().url()).await.expect("connect");
    let name = format!("lost-{}", std::process::id());
    let opts = LockOptions::new().ttl(Duration::from_secs(9));
    let guard = store.lock(&name, &opts).await.expect("lock");
    let (ok, _, err) = etcdctl(
        &shared().endpoints(),
        &["del", "--prefix", &format!("locks/{name}/")],
    );
    assert!(ok, "{err}");
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("lost() after the key was deleted");
    eprintln!(
        "lost() fired {:?} after the key was deleted",
        started.elapsed()
    );
    assert_eq!(
        guard.release().await.unwrap_err().kind(),
        ErrorKind::LockLost
    );

    // Revoking the lease (which deletes its keys and ends keep-alives).
    let name2 = format!("{name}-revoke");
    let guard = store.lock(&name2, &opts).await.expect("lock again");
    let (ok, out, err) = etcdctl(
        &shared().endpoints(),
        &["get", "--prefix", &format!("locks/{name2}/"), "-w", "json"],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let lease = v["kvs"][0]["lease"].as_i64().expect("lease id");
    let (ok, _, err) = etcdctl(
        &shared().endpoints(),
        &["lease", "revoke", &format!("{lease:x}")],
    );
    assert!(ok, "{err}");
    tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("lost() after the lease was revoked");
    drop(guard);
    // The client grants a new lease for the next lock.
    let next = store
        .lock(&name2, &opts)
        .await
        .expect("lock after revocation");
    assert!(!next.is_lost());
    next.release().await.expect("release");
}

/// A `lock()` that times out has deleted its own queued key before it returns: right after
/// the `Timeout`, only the holder's key is in the lock's directory. (The test runs on one
/// thread and reads the directory with a blocking `etcdctl`, so nothing left to a background
/// task could run in between.)
#[tokio::test]
async fn timed_out_lock_leaves_no_key_behind() {
    let name = format!("abandon-{}", std::process::id());
    let a = coordkit::connect(&shared().url()).await.expect("connect a");
    let b = coordkit::connect(&shared().url()).await.expect("connect b");
    let opts = LockOptions::new().ttl(Duration::from_secs(30));
    let held = a.lock(&name, &opts).await.expect("a locks");
    let before = lock_keys(&name);
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].1, held.token().get(), "holder key: {before:?}");
    for round in 0..2 {
        let started = Instant::now();
        let r = b
            .lock(&name, &opts.clone().wait(Duration::from_millis(500)))
            .await;
        let e = r.expect_err("b must not get the held lock");
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(started.elapsed() >= Duration::from_millis(450));
        let after = lock_keys(&name);
        assert_eq!(
            after, before,
            "round {round}: the abandoned attempt left its key behind"
        );
    }
    // try_lock behind a holder withdraws before it returns, too.
    assert!(b.try_lock(&name, &opts).await.expect("try_lock").is_none());
    assert_eq!(lock_keys(&name), before, "try_lock left its key behind");
    held.release().await.expect("release");
    // The next contender is not held up by a leftover key.
    let started = Instant::now();
    let next = b
        .lock(&name, &opts.clone().wait(Duration::from_secs(5)))
        .await
        .expect("b locks after the release");
    assert!(started.elapsed() < Duration::from_secs(5));
    next.release().await.expect("release b");
}

/// Two clients `a` and `b` of the shared server, lock options with a 20 s TTL, and a lock of
/// `a` that keeps `a`'s lease alive, and so the name of its lock keys the same, for the test.
async fn clients_with_a_kept_lease(
    name: &str,
) -> (
    std::sync::Arc<dyn coordkit::Backend>,
    std::sync::Arc<dyn coordkit::Backend>,
    LockOptions,
    coordkit::LockGuard,
) {
    let a = coordkit::connect(&shared().url()).await.expect("connect a");
    let b = coordkit::connect(&shared().url()).await.expect("connect b");
    let opts = LockOptions::new().ttl(Duration::from_secs(20));
    let keep = a
        .lock(&format!("{name}-keep"), &opts)
        .await
        .expect("lock keep");
    (a, b, opts, keep)
}

/// Starts the release of `held`, polls it once and drops it: the delete never completes in it.
async fn cut_release(held: coordkit::LockGuard) {
    let mut release = Box::pin(held.release());
    let _ = futures::poll!(release.as_mut());
}

/// A release cut short (its future dropped before etcd answered) must not leave the lock key
/// on the client's lease, which goes on being renewed for the client's other locks: the key
/// is deleted in the background, and another client gets the lock at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_release_leaves_no_key_on_the_kept_alive_lease() {
    let name = format!("cut-release-{}", std::process::id());
    let (a, b, opts, keep) = clients_with_a_kept_lease(&name).await;
    for round in 0..3 {
        cut_release(a.lock(&name, &opts).await.expect("a locks")).await;
        let started = Instant::now();
        let next = b
            .lock(&name, &opts.clone().wait(Duration::from_secs(15)))
            .await
            .unwrap_or_else(|e| panic!("round {round}: the cut-short release kept the lock: {e}"));
        // Without the background delete the key would stay for good (the lease is renewed).
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "round {round}: the key was removed only after {:?}",
            started.elapsed()
        );
        assert!(!keep.is_lost());
        next.release().await.expect("release b");
    }
    keep.release().await.expect("release keep");
}

/// A lock key is released with a plain delete, so a delete still pending from an interrupted
/// release must never meet a newer key of the same client (same lease, so same key name): the
/// client's next lock of the name waits until that delete is done, and the new hold keeps its
/// key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relock_after_an_interrupted_release_keeps_its_key() {
    let name = format!("relock-{}", std::process::id());
    let (a, b, opts, keep) = clients_with_a_kept_lease(&name).await;
    for round in 0..5 {
        cut_release(a.lock(&name, &opts).await.expect("a locks")).await;
        let again = a
            .lock(&name, &opts.clone().wait(Duration::from_secs(15)))
            .await
            .unwrap_or_else(|e| panic!("round {round}: a could not lock again: {e}"));
        // Time for any delete still in flight to land.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!again.is_lost(), "round {round}: the new hold was lost");
        let other = b.try_lock(&name, &opts).await.expect("b try_lock");
        assert!(
            other.is_none(),
            "round {round}: b took the lock, so a's new key was deleted"
        );
        again.release().await.expect("release again");
    }
    keep.release().await.expect("release keep");
}

/// A `try_lock` or `lock` attempt cancelled while its key is queued leaves no key behind:
/// the next contender is not held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_attempt_leaves_no_key_on_the_kept_alive_lease() {
    let name = format!("cut-attempt-{}", std::process::id());
    let a = coordkit::connect(&shared().url()).await.expect("connect a");
    let b = coordkit::connect(&shared().url()).await.expect("connect b");
    let c = coordkit::connect(&shared().url()).await.expect("connect c");
    let opts = LockOptions::new().ttl(Duration::from_secs(20));
    let keep = b
        .lock(&format!("{name}-keep"), &opts)
        .await
        .expect("lock keep");
    let held = a.lock(&name, &opts).await.expect("a locks");
    // b queues behind a, then gives up by dropping the future.
    let cut = tokio::time::timeout(Duration::from_millis(300), b.lock(&name, &opts)).await;
    assert!(cut.is_err(), "b cannot have the held lock");
    held.release().await.expect("release a");
    let started = Instant::now();
    let next = c
        .lock(&name, &opts.clone().wait(Duration::from_secs(5)))
        .await
        .expect("c waited behind b's abandoned key");
    assert!(started.elapsed() < Duration::from_secs(3));
    next.release().await.expect("release c");
    keep.release().await.expect("release keep");
}

/// The server under test is the etcd version the test command asked for
/// (`COORDKIT_ETCD_VERSION`, a prefix such as `3.5.`), so that a run meant for etcd 3.5 cannot
/// silently test another version. Without the variable, any version passes.
#[test]
fn server_is_the_requested_etcd_version() {
    let Ok(want) = std::env::var("COORDKIT_ETCD_VERSION") else {
        return;
    };
    let (ok, out, err) = etcdctl(&shared().endpoints(), &["endpoint", "status", "-w", "json"]);
    assert!(ok, "etcdctl endpoint status: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    let version = v[0]["Status"]["version"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        version.starts_with(&want),
        "the etcd server is {version:?}, not {want}*"
    );
}

/// Starts `etcdctl elect elections/<name> <value>`: etcdctl prints its key and the value once
/// it is leader, and resigns on SIGINT. The value names a path under the test directory.
fn etcdctl_elect(name: &str, value: &str, dir: &Path, log: &str) -> Proc {
    let mut cmd = Command::new(etcdctl_bin());
    cmd.env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(shared().endpoints())
        .args(["elect", &format!("elections/{name}"), value]);
    Proc::spawn("etcdctl elect", &mut cmd, &dir.join(log))
}

fn log_has(dir: &Path, log: &str, needle: &str) -> bool {
    std::fs::read_to_string(dir.join(log)).is_ok_and(|s| s.contains(needle))
}

fn election_keys(name: &str) -> Vec<(String, u64)> {
    let (ok, out, err) = etcdctl(
        &shared().endpoints(),
        &[
            "get",
            "--prefix",
            &format!("elections/{name}/"),
            "-w",
            "json",
        ],
    );
    assert!(ok, "etcdctl get: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    v["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| {
                    let key = String::from_utf8(decode_b64(kv["key"].as_str().unwrap_or("")));
                    (
                        key.unwrap_or_default(),
                        kv["create_revision"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A leader elected through `etcdctl elect elections/NAME V` is coordkit's `leader()` of the
/// election `NAME` (value and term = its key's create revision), excludes coordkit's
/// campaign, and when it resigns (SIGINT) coordkit's waiting campaign takes over with a
/// higher term; `observe` sees both leaders in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_elect_leader_is_seen_and_excludes_coordkit() {
    use futures::StreamExt;
    let store = coordkit::connect(&shared().url()).await.expect("connect");
    let name = format!("interop-elect-a-{}", std::process::id());
    let dir = fresh_dir("etcdctl-elect-a");
    let value = dir.join("etcdctl-leader").display().to_string();
    let mut leader = etcdctl_elect(&name, &value, &dir, "elect.log");
    assert!(
        wait_until(Duration::from_secs(10), || log_has(
            &dir,
            "elect.log",
            &value
        )),
        "etcdctl did not become leader"
    );
    let keys = election_keys(&name);
    assert_eq!(keys.len(), 1, "etcdctl's election key: {keys:?}");
    let seen = store
        .leader(&name)
        .await
        .expect("leader")
        .expect("a leader");
    assert_eq!(seen.value, value.as_bytes());
    assert_eq!(
        seen.term.get(),
        keys[0].1,
        "term = the key's create revision"
    );
    let mut events = store.observe(&name).await.expect("observe");
    let first = events.next().await.expect("first item").expect("no error");
    assert_eq!(first.as_ref(), Some(&seen));
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let r = store
        .campaign(
            &name,
            b"ck".to_vec(),
            &opts.clone().wait(Duration::from_millis(500)),
        )
        .await;
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Timeout);
    let waiter = {
        let store = store.clone();
        let (name, opts) = (name.clone(), opts.clone());
        tokio::spawn(async move {
            store
                .campaign(&name, b"ck".to_vec(), &opts.wait(Duration::from_secs(20)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "coordkit leader while etcdctl leads");
    let resigned = Instant::now();
    leader.interrupt();
    let guard = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("campaign finished")
        .expect("campaign task")
        .expect("leader after etcdctl resigned");
    eprintln!(
        "etcdctl resign -> coordkit leader: {:?}",
        resigned.elapsed()
    );
    assert!(
        guard.term() > seen.term,
        "{} vs {}",
        guard.term(),
        seen.term
    );
    let next = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let item = events.next().await.expect("item").expect("no error");
            if item.as_ref().is_some_and(|l| l.value == b"ck") {
                return item;
            }
        }
    })
    .await
    .expect("observe saw coordkit's leadership");
    assert_eq!(next.map(|l| l.term), Some(guard.term()));
    assert!(wait_until(Duration::from_secs(5), || !leader.alive()));
    guard.resign().await.expect("resign");
    assert!(election_keys(&name).is_empty(), "keys left behind");
}

/// coordkit's leader is `etcdctl elect -l`'s leader and excludes `etcdctl elect`, which takes
/// over (with a higher create revision) when coordkit resigns; a proclaimed value reaches
/// etcdctl's observer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordkit_leader_is_seen_and_excludes_etcdctl_elect() {
    let store = coordkit::connect(&shared().url()).await.expect("connect");
    let dir = fresh_dir("etcdctl-elect-b");
    // The name is the test directory's path: etcdctl's command line names it (for the reaper).
    let name = dir
        .display()
        .to_string()
        .trim_start_matches('/')
        .to_string();
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let guard = store
        .campaign(&name, b"coordkit-1".to_vec(), &opts)
        .await
        .expect("campaign");
    let mut cmd = Command::new(etcdctl_bin());
    cmd.env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(shared().endpoints())
        .args(["elect", "-l", &format!("elections/{name}")]);
    let _listener = Proc::spawn("etcdctl elect -l", &mut cmd, &dir.join("listen.log"));
    assert!(
        wait_until(Duration::from_secs(10), || log_has(
            &dir,
            "listen.log",
            "coordkit-1"
        )),
        "etcdctl elect -l did not see coordkit's leader"
    );
    guard
        .proclaim(b"coordkit-2".to_vec())
        .await
        .expect("proclaim");
    assert!(
        wait_until(Duration::from_secs(10), || log_has(
            &dir,
            "listen.log",
            "coordkit-2"
        )),
        "etcdctl elect -l did not see the proclaimed value"
    );
    let value = dir.join("etcdctl-leader").display().to_string();
    let mut contender = etcdctl_elect(&name, &value, &dir, "elect.log");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !log_has(&dir, "elect.log", &value),
        "etcdctl became leader while coordkit leads"
    );
    assert_eq!(election_keys(&name).len(), 2, "both contenders' keys");
    let term = guard.term();
    guard.resign().await.expect("resign");
    assert!(
        wait_until(Duration::from_secs(10), || log_has(
            &dir,
            "elect.log",
            &value
        )),
        "etcdctl did not take over after coordkit resigned"
    );
    let now = store
        .leader(&name)
        .await
        .expect("leader")
        .expect("a leader");
    assert_eq!(now.value, value.as_bytes());
    assert!(now.term > term, "{} vs {term}", now.term);
    contender.interrupt();
    assert!(wait_until(Duration::from_secs(5), || !contender.alive()));
}

/// Requests etcd received from `before` to `after`, per method, keep-alives left out.
fn requests_between(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    after
        .iter()
        .filter(|(m, _)| m.as_str() != "LeaseKeepAlive")
        .map(|(m, a)| (m.clone(), a - before.get(m).copied().unwrap_or(0)))
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// An uncontended lock+unlock costs two requests, counted by the server, the raw recipe's: the
/// transaction that enqueues (and reads the queue) and the plain delete that releases. Only the
/// client's first lock of a name also opens the watch of that lock (and grants the lease),
/// which later locks reuse.
/// The server is this test's own, so that no other test's requests are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_lock_and_unlock_is_two_requests() {
    let cluster = tokio::task::block_in_place(|| EtcdCluster::start(1));
    let port = cluster.members[0].client_port;
    let store = coordkit::connect(&cluster.url()).await.expect("connect");
    let opts = LockOptions::new().ttl(Duration::from_secs(30));
    let before = grpc_requests(port);
    store
        .lock("rpc-count", &opts)
        .await
        .expect("first lock")
        .release()
        .await
        .expect("first release");
    let first = requests_between(&before, &grpc_requests(port));
    eprintln!("first lock+unlock: {first:?}");
    assert_eq!(first.get("Watch"), Some(&1), "{first:?}");
    assert_eq!(first.get("Txn"), Some(&1), "{first:?}");
    assert_eq!(first.get("DeleteRange"), Some(&1), "{first:?}");
    const N: u64 = 50;
    let before = grpc_requests(port);
    for _ in 0..N {
        let g = store.lock("rpc-count", &opts).await.expect("lock");
        assert!(!g.is_lost());
        g.release().await.expect("release");
    }
    let counted = requests_between(&before, &grpc_requests(port));
    eprintln!("{N} lock+unlock: {counted:?}");
    let expected =
        std::collections::BTreeMap::from([("DeleteRange".to_string(), N), ("Txn".to_string(), N)]);
    assert_eq!(
        counted, expected,
        "requests for {N} uncontended lock+unlock"
    );
    // A lock taken through the kept watch still notices that its key was deleted.
    let g = store.lock("rpc-count", &opts).await.expect("lock");
    let (ok, _, err) = etcdctl(
        &cluster.endpoints(),
        &["del", "--prefix", "locks/rpc-count/"],
    );
    assert!(ok, "{err}");
    tokio::time::timeout(Duration::from_secs(5), g.lost())
        .await
        .expect("lost() after the key was deleted");
}
