//! Fault tests against real etcd processes: a lock holder killed with SIGKILL, a killed leader,
//! unreachable and silent endpoints, and watches across dropped connections and compaction.
#![cfg(feature = "etcd")]

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordkit::{Consistency, ErrorKind, LockOptions, PutOptions, WatchEvent};
use futures::StreamExt;
use support::etcd::{etcdctl, shared, EtcdCluster};
use support::proxy::Proxy;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// An `etcd://` URL through `proxy` with the given query.
fn proxy_url(proxy: &Proxy, query: &str) -> String {
    format!("etcd://127.0.0.1:{}{query}", proxy.port())
}

async fn next_event(
    w: &mut coordkit::WatchStream,
    within: Duration,
) -> coordkit::Result<WatchEvent> {
    match tokio::time::timeout(within, w.next()).await {
        Ok(Some(r)) => r,
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {within:?}"),
    }
}

/// A watch whose connection drops resumes from the revision after the last one it delivered:
/// every change made while it was cut off arrives, in order, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_dropped_connection() {
    let server = shared();
    let port = server.members[0].client_port;
    let proxy = Proxy::to_port(port);
    let watcher = coordkit::connect(&proxy_url(&proxy, "?timeout=2s&connect_timeout=1s"))
        .await
        .expect("connect through proxy");
    let writer = coordkit::connect(&server.url()).await.expect("connect");
    let dir = format!("resume-{}/", std::process::id());
    let mut w = watcher.watch(&dir).await.expect("watch");
    for i in 0..3 {
        writer
            .put(&format!("{dir}k{i}"), vec![i], PutOptions::default())
            .await
            .expect("put");
    }
    for i in 0..3u8 {
        match next_event(&mut w, Duration::from_secs(5))
            .await
            .expect("event")
        {
            WatchEvent::Put(e) => assert_eq!(e.value, vec![i]),
            other => panic!("{other:?}"),
        }
    }
    proxy.reset();
    let cut_at = Instant::now();
    for i in 3..10u8 {
        writer
            .put(&format!("{dir}k{i}"), vec![i], PutOptions::default())
            .await
            .expect("put while cut");
    }
    writer
        .delete(&format!("{dir}k0"))
        .await
        .expect("delete while cut");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.heal();
    for i in 3..10u8 {
        match next_event(&mut w, Duration::from_secs(15))
            .await
            .expect("event")
        {
            WatchEvent::Put(e) => assert_eq!((e.key, e.value), (format!("{dir}k{i}"), vec![i])),
            other => panic!("expected put k{i}, got {other:?}"),
        }
    }
    match next_event(&mut w, Duration::from_secs(5))
        .await
        .expect("event")
    {
        WatchEvent::Delete { key } => assert_eq!(key, format!("{dir}k0")),
        other => panic!("expected delete, got {other:?}"),
    }
    eprintln!(
        "watch resumed; all events {:?} after the cut",
        cut_at.elapsed()
    );
    // Nothing is repeated.
    let extra = tokio::time::timeout(Duration::from_millis(500), w.next()).await;
    assert!(extra.is_err(), "extra event after resume: {extra:?}");
}

/// If history the watch needs to resume from was compacted while it was cut off, the stream
/// yields one WatchGap error and ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_gap_after_compaction() {
    let server = shared();
    let proxy = Proxy::to_port(server.members[0].client_port);
    let watcher = coordkit::connect(&proxy_url(&proxy, "?timeout=2s&connect_timeout=1s"))
        .await
        .expect("connect through proxy");
    let writer = coordkit::connect(&server.url()).await.expect("connect");
    let dir = format!("gap-{}/", std::process::id());
    let mut w = watcher.watch(&dir).await.expect("watch");
    writer
        .put(&format!("{dir}a"), b"1".to_vec(), PutOptions::default())
        .await
        .expect("put");
    assert!(matches!(
        next_event(&mut w, Duration::from_secs(5)).await,
        Ok(WatchEvent::Put(_))
    ));
    proxy.reset();
    let mut last = 0;
    for i in 0..3 {
        last = writer
            .put(&format!("{dir}b{i}"), b"2".to_vec(), PutOptions::default())
            .await
            .expect("put")
            .as_raw();
    }
    let (ok, _, err) = etcdctl(&server.endpoints(), &["compact", &last.to_string()]);
    assert!(ok, "compact: {err}");
    proxy.heal();
    match tokio::time::timeout(Duration::from_secs(15), w.next()).await {
        Ok(Some(Err(e))) => {
            assert_eq!(e.kind(), ErrorKind::WatchGap, "{e}");
            eprintln!("gap reported: {e}");
        }
        other => panic!("expected a WatchGap error, got {other:?}"),
    }
    let end = tokio::time::timeout(Duration::from_secs(5), w.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "stream must end after the gap: {end:?}"
    );
}

/// When this binary is re-executed as a lock holder, the lock URL and name.
const CHILD_URL: &str = "COORDKIT_ETCD_HOLDER_URL";
const CHILD_NAME: &str = "COORDKIT_ETCD_HOLDER_NAME";
const CHILD_FILE: &str = "COORDKIT_ETCD_HOLDER_FILE";
const HOLDER_TTL: Duration = Duration::from_secs(3);

/// Not a test on its own: the lock holder of `holder_killed_by_sigkill`, run in a child
/// process (this binary re-executed with `--ignored --exact lock_holder_child`).
#[tokio::test]
#[ignore = "run as a child process by holder_killed_by_sigkill"]
async fn lock_holder_child() {
    let (Ok(url), Ok(name), Ok(file)) = (
        std::env::var(CHILD_URL),
        std::env::var(CHILD_NAME),
        std::env::var(CHILD_FILE),
    ) else {
        return;
    };
    let store = coordkit::connect(&url).await.expect("child connect");
    let guard = store
        .lock(&name, &LockOptions::new().ttl(HOLDER_TTL))
        .await
        .expect("child lock");
    std::fs::write(&file, guard.token().to_string()).expect("write token");
    tokio::time::sleep(Duration::from_secs(120)).await;
    drop(guard);
}

/// (a) A lock holder in another OS process is killed with SIGKILL: another client gets the
/// lock within TTL + 2 s, with a larger fencing token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_killed_by_sigkill() {
    let server = shared();
    let name = format!("sigkill-{}", std::process::id());
    let dir = support::fresh_dir("holder");
    let exe = std::env::current_exe().expect("current exe");
    let token_file = dir.join("token");
    let mut cmd = Command::new(exe);
    // The second filter names the test dir so that the reaper recognises the child.
    cmd.args(["--ignored", "--exact", "--nocapture", "lock_holder_child"])
        .arg(dir.display().to_string())
        .env(CHILD_URL, server.url())
        .env(CHILD_NAME, &name)
        .env(CHILD_FILE, &token_file);
    let mut child = support::Proc::spawn("lock holder", &mut cmd, &dir.join("child.log"));
    assert!(
        support::wait_until(Duration::from_secs(60), || token_file.exists()),
        "the child did not report holding the lock"
    );
    std::thread::sleep(Duration::from_millis(50));
    let child_token: u64 = std::fs::read_to_string(&token_file)
        .expect("token file")
        .trim()
        .parse()
        .expect("token");
    let store = coordkit::connect(&server.url()).await.expect("connect");
    let opts = LockOptions::new().ttl(Duration::from_secs(5));
    assert!(
        store
            .try_lock(&name, &opts)
            .await
            .expect("try_lock")
            .is_none(),
        "got the lock the child holds"
    );
    child.kill();
    let killed = Instant::now();
    let guard = store
        .lock(
            &name,
            &opts.clone().wait(HOLDER_TTL + Duration::from_secs(10)),
        )
        .await
        .expect("lock after the holder died");
    let took = killed.elapsed();
    eprintln!("holder SIGKILLed (TTL {HOLDER_TTL:?}); lock acquired {took:?} later");
    assert!(
        took <= HOLDER_TTL + Duration::from_secs(2),
        "took {took:?}, more than TTL + 2 s"
    );
    assert!(
        guard.token().get() > child_token,
        "{} vs {child_token}",
        guard.token()
    );
    guard.release().await.expect("release");
}

/// Retries `f` (each call bounded by `per_call`, which must hold) until it succeeds; returns
/// how long that took.
async fn recovers<F, Fut, T>(what: &str, per_call: Duration, total: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = coordkit::Result<T>>,
{
    let start = Instant::now();
    loop {
        let call = Instant::now();
        let r = tokio::time::timeout(per_call + Duration::from_secs(1), f()).await;
        let took = call.elapsed();
        match r {
            Ok(Ok(_)) => return start.elapsed(),
            Ok(Err(e)) => {
                assert!(
                    matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
                    "{what}: unexpected error {e}"
                );
                eprintln!("{what}: {:?} after {took:?}: {e}", e.kind());
            }
            Err(_) => panic!("{what}: a call hung for {took:?}"),
        }
        assert!(
            start.elapsed() < total,
            "{what}: not working again within {total:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (b) The leader of a 3-member cluster is killed: KV operations and lock acquisition work
/// again within 5 s, no call hangs; the member is restarted and rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed() {
    let mut cluster = EtcdCluster::start(3);
    let timeout = Duration::from_secs(2);
    let store = coordkit::connect(&format!("{}?timeout=2s&connect_timeout=1s", cluster.url()))
        .await
        .expect("connect");
    store
        .put("leader/k", b"before".to_vec(), PutOptions::default())
        .await
        .expect("put");
    let held = store
        .lock(
            "leader/held",
            &LockOptions::new().ttl(Duration::from_secs(10)),
        )
        .await
        .expect("lock");
    let leader = cluster.leader().expect("a leader");
    cluster.kill(leader);
    let killed = Instant::now();
    let s = store.clone();
    let put = recovers("put", timeout, Duration::from_secs(5), || {
        let s = s.clone();
        async move {
            s.put("leader/k", b"after".to_vec(), PutOptions::default())
                .await
        }
    })
    .await;
    let s = store.clone();
    let lock = recovers("lock", timeout, Duration::from_secs(5), || {
        let s = s.clone();
        async move {
            let g = s
                .lock(
                    "leader/new",
                    &LockOptions::new().ttl(Duration::from_secs(5)).wait(timeout),
                )
                .await?;
            g.release().await
        }
    })
    .await;
    let got = store
        .get("leader/k", Consistency::Strong)
        .await
        .expect("get");
    assert_eq!(got.map(|e| e.value), Some(b"after".to_vec()));
    eprintln!(
        "leader killed: put worked again after {put:?}, lock after {:?} (total {:?})",
        lock,
        killed.elapsed()
    );
    assert!(killed.elapsed() < Duration::from_secs(10));
    assert!(
        !held.is_lost(),
        "a lock with a 10 s TTL was lost over a leader change"
    );
    held.release().await.expect("release held lock");
    cluster.restart(leader);
    let (ok, out, err) = etcdctl(
        &cluster.members[leader].endpoint(),
        &[
            "get",
            "kv/leader/k",
            "--print-value-only",
            "--consistency=s",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "after", "restarted member caught up");
}

/// (c) An endpoint nobody listens on gives Unavailable or Timeout within the configured
/// bounds; so does a server that stopped answering (SIGSTOP), for every kind of call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_and_silent_endpoints() {
    let port = support::free_port();
    let started = Instant::now();
    let r = coordkit::connect(&format!(
        "etcd://127.0.0.1:{port}?timeout=1s&connect_timeout=500ms"
    ))
    .await;
    let took = started.elapsed();
    let e = r.map(|_| ()).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
        "{e}"
    );
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    eprintln!("refused endpoint: {:?} after {took:?}: {e}", e.kind());

    let cluster = EtcdCluster::start(1);
    let store = coordkit::connect(&format!(
        "{}?timeout=1s&connect_timeout=500ms",
        cluster.url()
    ))
    .await
    .expect("connect");
    store
        .put("silent/k", b"v".to_vec(), PutOptions::default())
        .await
        .expect("put");
    cluster.members[0].pause();
    let bound = Duration::from_millis(2500);
    macro_rules! bounded_fail {
        ($what:expr, $fut:expr) => {{
            let started = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(10), $fut).await;
            let took = started.elapsed();
            let e = match r {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => panic!("{}: succeeded against a stopped server", $what),
                Err(_) => panic!("{}: hung", $what),
            };
            assert!(
                matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
                "{}: {e}",
                $what
            );
            assert!(took < bound, "{}: took {took:?}", $what);
            eprintln!("stopped server, {}: {:?} after {took:?}", $what, e.kind());
        }};
    }
    bounded_fail!("get", store.get("silent/k", Consistency::Strong));
    bounded_fail!(
        "put",
        store.put("silent/k", b"x".to_vec(), PutOptions::default())
    );
    bounded_fail!("list", store.list("silent/", Consistency::Stale));
    bounded_fail!("watch", store.watch("silent/"));
    bounded_fail!(
        "lock",
        store.lock("silent/l", &LockOptions::new().ttl(Duration::from_secs(5)))
    );
    bounded_fail!(
        "connect",
        coordkit::connect(&format!(
            "{}?timeout=1s&connect_timeout=500ms",
            cluster.url()
        ))
    );
    cluster.members[0].resume();
    let got = store
        .get("silent/k", Consistency::Strong)
        .await
        .expect("get after resume");
    // The put that timed out may or may not have been applied (it reaches the server once it
    // runs again), as the contract allows for Timeout.
    let value = got.map(|e| e.value);
    assert!(
        value == Some(b"v".to_vec()) || value == Some(b"x".to_vec()),
        "{value:?}"
    );
}

/// The harness itself: a 3-member cluster starts, names a leader, survives the leader's death
/// and takes the restarted member back.
#[test]
fn harness_cluster_leader_kill_and_restart() {
    let mut c = EtcdCluster::start(3);
    let leader = c.leader().expect("a leader");
    let (ok, _, err) = etcdctl(&c.endpoints(), &["put", "harness/k", "v"]);
    assert!(ok, "put: {err}");
    c.kill(leader);
    assert!(support::wait_until(Duration::from_secs(10), || {
        matches!(c.leader(), Some(l) if l != leader)
    }));
    c.restart(leader);
    let (ok, out, err) = etcdctl(
        &c.members[leader].endpoint(),
        &["get", "harness/k", "--print-value-only"],
    );
    assert!(ok, "get: {err}");
    assert_eq!(out.trim(), "v");
}

/// Authentication: the right credentials work (password given in the URL's userinfo), a wrong
/// password gives PermissionDenied at connect, and the password never shows in errors or Debug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication() {
    let cluster = EtcdCluster::start(1);
    let eps = cluster.endpoints();
    for args in [
        vec!["user", "add", "root", "--new-user-password=s3cr:et"],
        vec!["user", "grant-role", "root", "root"],
        vec!["auth", "enable"],
    ] {
        let (ok, out, err) = etcdctl(&eps, &args);
        assert!(ok, "{args:?}: {out} {err}");
    }
    let good = format!("etcd://root:s3cr%3Aet@{eps}?timeout=2s");
    let store = coordkit::connect(&good)
        .await
        .expect("connect with credentials");
    store
        .put("auth/k", b"v".to_vec(), PutOptions::default())
        .await
        .expect("put with credentials");
    assert!(!format!("{store:?}").contains("s3cr"), "{store:?}");
    let started = Instant::now();
    let e = coordkit::connect(&format!("etcd://root:wrong-pw@{eps}?timeout=2s"))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(!e.to_string().contains("wrong-pw"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let e = coordkit::connect(&format!("etcd://{eps}?timeout=2s"))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "no credentials: {e}");
}

/// A watch of a quiet prefix does not report a false gap: while other keys change and history
/// is compacted, the server's progress notifications move the watch's resume point, so after
/// a cut connection it resumes without `WatchGap` and without any event, and still delivers
/// the next change of its prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_watch_survives_compaction_and_a_cut() {
    let server =
        EtcdCluster::start_with(1, &["--experimental-watch-progress-notify-interval=300ms"]);
    let proxy = Proxy::to_port(server.members[0].client_port);
    let watcher = coordkit::connect(&proxy_url(&proxy, "?timeout=2s&connect_timeout=1s"))
        .await
        .expect("connect through proxy");
    let writer = coordkit::connect(&server.url()).await.expect("connect");
    let mut w = watcher.watch("quiet/").await.expect("watch");
    let mut last = 0;
    let mut puts = Vec::new();
    for i in 0..1000 {
        let writer = writer.clone();
        puts.push(tokio::spawn(async move {
            writer
                .put(
                    &format!("busy/k{}", i % 50),
                    vec![b'x'; 16],
                    PutOptions::default(),
                )
                .await
        }));
    }
    for p in puts {
        last = last.max(p.await.expect("task").expect("put").as_raw());
    }
    // Let at least two progress notifications pass the 1,000 writes.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (ok, _, err) = etcdctl(&server.endpoints(), &["compact", &last.to_string()]);
    assert!(ok, "compact: {err}");
    proxy.reset();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.heal();
    let quiet = tokio::time::timeout(Duration::from_secs(4), w.next()).await;
    assert!(
        quiet.is_err(),
        "a quiet prefix reported something after the cut: {quiet:?}"
    );
    writer
        .put("quiet/a", b"1".to_vec(), PutOptions::default())
        .await
        .expect("put");
    match next_event(&mut w, Duration::from_secs(10)).await {
        Ok(WatchEvent::Put(e)) => assert_eq!(e.key, "quiet/a"),
        other => panic!("the resumed watch missed the write: {other:?}"),
    }
}

/// A watch whose credentials lose the right to read its prefix ends with `PermissionDenied`
/// (after the next reconnect) instead of retrying for ever while the consumer waits for events
/// that never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ends_when_permission_is_revoked() {
    let server = EtcdCluster::start(1);
    let eps = server.endpoints();
    let ctl = |args: &[&str]| {
        let (ok, out, err) = etcdctl(&eps, args);
        assert!(ok, "etcdctl {args:?}: {out}{err}");
    };
    let as_root = |args: &[&str]| {
        let mut all = vec!["--user", "root:rootpw"];
        all.extend_from_slice(args);
        let (ok, out, err) = etcdctl(&eps, &all);
        assert!(ok, "etcdctl {args:?}: {out}{err}");
    };
    ctl(&[
        "user",
        "add",
        "root",
        "--new-user-password=rootpw",
        "--interactive=false",
    ]);
    ctl(&["user", "grant-role", "root", "root"]);
    ctl(&["role", "add", "reader"]);
    ctl(&["role", "grant-permission", "reader", "read", "kv/"]);
    ctl(&[
        "role",
        "grant-permission",
        "reader",
        "--prefix=true",
        "read",
        "kv/authw/",
    ]);
    ctl(&[
        "user",
        "add",
        "u",
        "--new-user-password=upw",
        "--interactive=false",
    ]);
    ctl(&["user", "grant-role", "u", "reader"]);
    ctl(&["auth", "enable"]);

    let proxy = Proxy::to_port(server.members[0].client_port);
    let watcher = coordkit::connect(&format!(
        "etcd://u:upw@127.0.0.1:{}?timeout=2s&connect_timeout=1s",
        proxy.port()
    ))
    .await
    .expect("connect as u through the proxy");
    let writer = coordkit::connect(&format!(
        "etcd://root:rootpw@{}",
        server.members[0].endpoint()
    ))
    .await
    .expect("connect as root");
    let mut w = watcher.watch("authw/").await.expect("watch");
    writer
        .put("authw/a", b"1".to_vec(), PutOptions::default())
        .await
        .expect("put");
    assert!(matches!(
        next_event(&mut w, Duration::from_secs(5)).await,
        Ok(WatchEvent::Put(_))
    ));
    as_root(&[
        "role",
        "revoke-permission",
        "reader",
        "--prefix=true",
        "kv/authw/",
    ]);
    proxy.reset();
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.heal();
    match tokio::time::timeout(Duration::from_secs(15), w.next()).await {
        Ok(Some(Err(e))) => assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}"),
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    let end = tokio::time::timeout(Duration::from_secs(5), w.next()).await;
    assert!(matches!(end, Ok(None)), "the stream must end: {end:?}");
}
/// A TCP proxy that forwards everything until the client sends `marker`; from then on it still
/// forwards requests but holds back every answer: a request that reaches the server whose
/// answer is lost.
struct MuteProxy {
    port: u16,
    muted: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl MuteProxy {
    async fn start(upstream: u16, marker: Vec<u8>) -> MuteProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let muted = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let (m, s) = (muted.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = s.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((inbound, _)) = accepted else {
                    continue;
                };
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (mut in_r, mut in_w) = inbound.into_split();
                let (mut out_r, mut out_w) = outbound.into_split();
                let (m1, m2, marker) = (m.clone(), m.clone(), marker.clone());
                let (s1, s2) = (s.clone(), s.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut tail: Vec<u8> = Vec::new();
                    loop {
                        let n = tokio::select! {
                            _ = s1.cancelled() => return,
                            r = in_r.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
                        };
                        tail.extend_from_slice(&buf[..n]);
                        if tail.windows(marker.len()).any(|w| w == marker.as_slice()) {
                            m1.store(true, Ordering::SeqCst);
                        }
                        let keep = tail.len().saturating_sub(marker.len());
                        tail.drain(..keep);
                        if out_w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = tokio::select! {
                            _ = s2.cancelled() => return,
                            r = out_r.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
                        };
                        if m2.load(Ordering::SeqCst) {
                            continue; // the answer is lost
                        }
                        if in_w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        MuteProxy { port, muted, stop }
    }
}

impl Drop for MuteProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A put with a TTL whose answer is lost (the request reached etcd, which applied it) reports
/// `Timeout`, and must not revoke its lease: that would delete the key the server wrote. The
/// key lives on and expires by its own TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_put_whose_answer_is_lost_keeps_its_key() {
    let server = shared();
    let port = server.members[0].client_port;
    let key = format!("lost-answer-{}", std::process::id());
    let proxy = MuteProxy::start(port, key.clone().into_bytes()).await;
    let client = coordkit::connect(&format!(
        "etcd://127.0.0.1:{}?timeout=1s&connect_timeout=1s",
        proxy.port
    ))
    .await
    .expect("connect through proxy");
    let direct = coordkit::connect(&server.url()).await.expect("connect");
    let ttl = Duration::from_secs(5);
    let started = Instant::now();
    let e = client
        .put(&key, b"landed".to_vec(), PutOptions::ttl(ttl))
        .await
        .unwrap_err();
    assert!(
        proxy.muted.load(Ordering::SeqCst),
        "the put never reached the proxy"
    );
    assert!(
        matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Unavailable),
        "{e}"
    );
    // Whatever the client did after its timeout (a revoke would have reached etcd by now).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = direct.get(&key, Consistency::Strong).await.expect("get");
    assert_eq!(
        got.map(|e| e.value),
        Some(b"landed".to_vec()),
        "the key the server wrote was deleted after the timeout"
    );
    // It still expires by its TTL (etcd may add up to an election timeout).
    let bound = ttl + Duration::from_secs(4);
    while direct
        .get(&key, Consistency::Strong)
        .await
        .expect("get")
        .is_some()
    {
        assert!(started.elapsed() < bound, "the key outlived its TTL");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A waiter whose network path is black-holed while it waits: when its wait runs out, it
/// returns `Timeout` within the wait plus the withdrawal's short grace (not plus a whole request
/// timeout), and its key is deleted once the path heals, so the next contender is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_waiter_times_out_on_time_and_leaves_nothing() {
    let server = shared();
    let name = format!("cutwait-{}", std::process::id());
    let holder = coordkit::connect(&server.url())
        .await
        .expect("connect holder");
    let proxy = Proxy::to_port(server.members[0].client_port);
    let waiter = coordkit::connect(&proxy_url(&proxy, "?timeout=5s&connect_timeout=1s"))
        .await
        .expect("connect waiter through the proxy");
    let third = coordkit::connect(&server.url())
        .await
        .expect("connect third");
    let ttl = LockOptions::new().ttl(Duration::from_secs(20));
    let held = holder.lock(&name, &ttl).await.expect("holder locks");
    let wait = Duration::from_millis(1500);
    let attempt = {
        let (waiter, name, opts) = (waiter.clone(), name.clone(), ttl.clone().wait(wait));
        tokio::spawn(async move {
            let started = Instant::now();
            let r = waiter.lock(&name, &opts).await;
            (r.map(|g| g.token()), started.elapsed())
        })
    };
    // Let the waiter queue its key, then cut its path: its withdrawal cannot reach etcd.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.stall();
    let (r, took) = attempt.await.expect("waiter task");
    let e = r.expect_err("the waiter cannot have the held lock");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(
        took < wait + Duration::from_millis(700),
        "Timeout came {took:?} after the start of a {wait:?} wait"
    );
    proxy.heal();
    held.release().await.expect("release");
    let started = Instant::now();
    let next = third
        .lock(&name, &ttl.clone().wait(Duration::from_secs(15)))
        .await
        .expect("third locks");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the waiter's key held the next contender up for {:?}",
        started.elapsed()
    );
    next.release().await.expect("release third");
}

/// A waiter whose lease cannot be renewed while it waits (its path black-holed past the TTL)
/// gives up with `LockLost`, the same kind every backend uses, and never returns a guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_lease_lapses_gets_lock_lost() {
    let server = shared();
    let name = format!("lapsewait-{}", std::process::id());
    let holder = coordkit::connect(&server.url())
        .await
        .expect("connect holder");
    let proxy = Proxy::to_port(server.members[0].client_port);
    let waiter = coordkit::connect(&proxy_url(&proxy, "?timeout=10s&connect_timeout=1s"))
        .await
        .expect("connect waiter through the proxy");
    let held = holder
        .lock(&name, &LockOptions::new().ttl(Duration::from_secs(20)))
        .await
        .expect("holder locks");
    let attempt = {
        let (waiter, name) = (waiter.clone(), name.clone());
        tokio::spawn(async move {
            waiter
                .lock(&name, &LockOptions::new().ttl(Duration::from_secs(2)))
                .await
                .map(|g| g.token())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.stall();
    let r = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .expect("the waiter must give up once its lease deadline passed")
        .expect("waiter task");
    let e = r.expect_err("a waiter with a lapsed lease must not get the lock");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    proxy.heal();
    held.release().await.expect("release");
}
