//! The ZooKeeper backend against a real standalone ZooKeeper 3.8 server started by the test:
//! the whole conformance suite, the key mapping as seen on the server, versions across a
//! delete and re-create, TTL keys made permanent, oversized values, and lock interop with a real
//! Apache Curator `InterProcessMutex` (Java, compiled here with javac).

#![cfg(all(feature = "zookeeper", feature = "conformance"))]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use coordkit::backend::zookeeper::{ZkConfig, ZkStore, MAX_VALUE_SIZE};
use coordkit::conformance::Harness;
use coordkit::{Consistency, DistLock, ErrorKind, Expect, KvStore, LockOptions, PutOptions};
use support::zookeeper::shared;
use zookeeper_client as zk;

fn zookeeper() -> Harness {
    let url = shared().url();
    Harness::new("zookeeper", move || {
        let url = url.clone();
        async move { coordkit::connect(&url).await }
    })
}

coordkit::conformance_tests!(zookeeper());
coordkit::election_conformance_tests!(zookeeper());
coordkit::recipe_conformance_tests!(zookeeper());

const STRONG: Consistency = Consistency::Strong;

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{name}{}x{nanos}", std::process::id())
}

async fn store(chroot: &str) -> ZkStore {
    let cfg = ZkConfig::from_url_str(&shared().url_with_chroot(chroot)).expect("url");
    ZkStore::connect(cfg).await.expect("connect")
}

async fn raw() -> zk::Client {
    zk::Client::connect(&format!("127.0.0.1:{}", shared().port()))
        .await
        .expect("raw connect")
}

async fn exists(c: &zk::Client, path: &str) -> bool {
    c.check_stat(path).await.expect("stat").is_some()
}

#[tokio::test]
async fn keys_map_onto_znodes_reversibly() {
    let root = format!("/{}", unique("map"));
    let s = store(&root).await;
    let keys = ["zookeeper", "a/b", "a/b/c", "a/bc", "x.y/-_/Z9"];
    for k in keys {
        s.put(k, k.as_bytes().to_vec(), PutOptions::default())
            .await
            .expect("put");
    }
    let c = raw().await;
    for (k, path) in [
        ("zookeeper", format!("{root}/kv/zookeeper")),
        ("a/b", format!("{root}/kv/a~/b")),
        ("a/b/c", format!("{root}/kv/a~/b~/c")),
        ("a/bc", format!("{root}/kv/a~/bc")),
        ("x.y/-_/Z9", format!("{root}/kv/x.y~/-_~/Z9")),
    ] {
        let (data, _) = c.get_data(&path).await.expect("znode of the key");
        assert_eq!(data, k.as_bytes(), "{path} holds the raw value");
        assert_eq!(
            coordkit::backend::zookeeper::path::path_to_key(&root, &path).as_deref(),
            Some(k)
        );
    }
    // Lists return only keys, never the directory znodes.
    let all: Vec<String> = s
        .list("", STRONG)
        .await
        .expect("list")
        .into_iter()
        .map(|e| e.key)
        .collect();
    let mut want: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    want.sort();
    assert_eq!(all, want);
    // Deleting the deeper key leaves `a/b` itself, and nothing else shows up.
    s.delete("a/b/c").await.expect("delete");
    let under: Vec<String> = s
        .list("a/", STRONG)
        .await
        .expect("list")
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(under, ["a/b", "a/bc"]);
    // Nothing outside the chroot was touched.
    assert!(!exists(&c, "/kv/a~/b").await || root.is_empty());
    // A key whose znode was put there by hand with a bad name is skipped, not mis-reported.
    c.create(
        &format!("{root}/kv/a~/bad name"),
        b"x",
        &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
    )
    .await
    .expect("create odd znode");
    let under: Vec<String> = s
        .list("a/", STRONG)
        .await
        .expect("list")
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(under, ["a/b", "a/bc"]);
}

#[tokio::test]
async fn version_does_not_survive_delete_and_recreate() {
    let s = store("").await;
    let key = format!("{}/k", unique("aba"));
    let v1 = s
        .put(&key, b"one".to_vec(), PutOptions::default())
        .await
        .expect("put");
    s.delete(&key).await.expect("delete");
    let v2 = s
        .put(&key, b"two".to_vec(), PutOptions::default())
        .await
        .expect("re-create");
    assert_ne!(v1, v2, "a re-created key reused the old version");
    let e = s
        .compare_and_swap(&key, Expect::Version(v1), Some(b"stale".to_vec()))
        .await
        .expect_err("CAS with a version from before the delete");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    let e = s
        .compare_and_swap(&key, Expect::Version(v1), None)
        .await
        .expect_err("delete-CAS with a version from before the delete");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    let got = s
        .get(&key, STRONG)
        .await
        .expect("get")
        .expect("still there");
    assert_eq!((got.value, got.version), (b"two".to_vec(), v2));
    // Every write gets a new version, even of the same bytes.
    let v3 = s
        .put(&key, b"two".to_vec(), PutOptions::default())
        .await
        .expect("put");
    assert_ne!(v2, v3);
}

#[tokio::test]
async fn ttl_key_made_permanent_is_pinned_and_invisible_pin() {
    let s = store("").await;
    let caps = s.capabilities();
    let ns = unique("pin");
    let key = format!("{ns}/k");
    s.put(&key, b"t".to_vec(), PutOptions::ttl(caps.min_ttl))
        .await
        .expect("put ttl");
    s.put(&key, b"p".to_vec(), PutOptions::default())
        .await
        .expect("put permanent");
    let c = raw().await;
    assert!(
        exists(&c, &format!("/kv/{ns}~/k/~keep")).await,
        "TTL znode not pinned"
    );
    let listed = s.list(&format!("{ns}/"), STRONG).await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    tokio::time::sleep(caps.min_ttl * 2 + Duration::from_secs(1)).await;
    assert_eq!(
        s.get(&key, STRONG).await.expect("get").map(|e| e.value),
        Some(b"p".to_vec()),
        "a key made permanent expired"
    );
    s.delete(&key).await.expect("delete pinned key");
    assert_eq!(s.get(&key, STRONG).await.expect("get"), None);
    assert!(s
        .list(&format!("{ns}/"), STRONG)
        .await
        .expect("list")
        .is_empty());
}

#[tokio::test]
async fn values_up_to_the_limit_are_stored_and_larger_ones_rejected() {
    let s = store("").await;
    let key = format!("{}/big", unique("size"));
    s.put(&key, b"small".to_vec(), PutOptions::default())
        .await
        .expect("put");
    // The declared limit is what the server really takes (with the longest chroot-less key).
    let at_limit = vec![3u8; MAX_VALUE_SIZE];
    let long_key = format!("{}/{}", unique("size"), "k".repeat(400));
    s.put(&long_key, at_limit.clone(), PutOptions::default())
        .await
        .expect("a value of exactly max_value_size");
    assert_eq!(
        s.get(&long_key, STRONG)
            .await
            .expect("get")
            .map(|e| e.value.len()),
        Some(MAX_VALUE_SIZE)
    );
    for size in [MAX_VALUE_SIZE + 1, 2 * 1024 * 1024] {
        let started = Instant::now();
        let e = s
            .put(&key, vec![1u8; size], PutOptions::default())
            .await
            .expect_err("oversized put");
        assert_eq!(e.kind(), ErrorKind::ValueTooLarge, "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "checked before sending"
        );
    }
    assert_eq!(
        s.get(&key, STRONG).await.expect("get").map(|e| e.value),
        Some(b"small".to_vec())
    );
    // The session survived (the oversized value never reached the server).
    s.put(&key, b"after".to_vec(), PutOptions::default())
        .await
        .expect("put after");
}

#[tokio::test]
async fn lock_nodes_follow_curators_layout() {
    let root = format!("/{}", unique("layout"));
    let s = store(&root).await;
    let g = s
        .lock(
            "jobs/nightly",
            &LockOptions::new().ttl(Duration::from_secs(5)),
        )
        .await
        .expect("lock");
    let c = raw().await;
    let (children, _) = c
        .get_children(&format!("{root}/locks/jobs/nightly"))
        .await
        .expect("lock dir");
    assert_eq!(children.len(), 1);
    let name = &children[0];
    let re_ok = name.starts_with("_c_")
        && name.len() == "_c_".len() + 36 + "-lock-".len() + 10
        && name[3 + 36..].starts_with("-lock-")
        && name[name.len() - 10..].bytes().all(|b| b.is_ascii_digit());
    assert!(re_ok, "node {name} is not _c_<uuid>-lock-<10 digits>");
    let stat = c
        .check_stat(&format!("{root}/locks/jobs/nightly/{name}"))
        .await
        .expect("stat")
        .expect("node");
    assert_eq!(
        g.token().get(),
        stat.czxid as u64,
        "token is the czxid of the own node"
    );
    assert_ne!(stat.ephemeral_owner, 0, "lock node is ephemeral");
    g.release().await.expect("release");
    // The lock directory is a container: empty, or already removed by the server.
    match c.get_children(&format!("{root}/locks/jobs/nightly")).await {
        Ok((children, _)) => assert!(children.is_empty(), "release left {children:?}"),
        Err(zk::Error::NoNode) => {}
        Err(e) => panic!("lock dir: {e}"),
    }
    // Locks and keys never collide.
    assert!(s.list("", STRONG).await.expect("list").is_empty());
}

// ---- Curator interop ---------------------------------------------------------------------

const CURATOR_CP: &str = "/usr/share/java/curator-recipes.jar:/usr/share/java/curator-framework.jar:\
/usr/share/java/curator-client.jar:/usr/share/java/zookeeper.jar:/usr/share/java/zookeeper-jute.jar:\
/usr/share/java/guava.jar:/usr/share/java/slf4j-api.jar:/usr/share/java/slf4j-nop.jar";

const HOLDER: &str = r#"
import java.util.concurrent.TimeUnit;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.framework.recipes.locks.InterProcessMutex;
import org.apache.curator.retry.RetryOneTime;

public class Holder {
    public static void main(String[] a) throws Exception {
        String connect = a[0], path = a[1];
        long waitMs = Long.parseLong(a[2]), holdMs = Long.parseLong(a[3]);
        CuratorFramework c = CuratorFrameworkFactory.newClient(connect, 10000, 5000, new RetryOneTime(100));
        c.start();
        c.blockUntilConnected();
        InterProcessMutex m = new InterProcessMutex(c, path);
        System.out.println("TRYING");
        System.out.flush();
        if (!m.acquire(waitMs, TimeUnit.MILLISECONDS)) {
            System.out.println("TIMEOUT");
            System.out.flush();
            c.close();
            return;
        }
        System.out.println("ACQUIRED");
        System.out.flush();
        Thread.sleep(holdMs);
        m.release();
        System.out.println("RELEASED");
        System.out.flush();
        c.close();
    }
}
"#;

fn compile_holder() -> PathBuf {
    let dir = support::fresh_dir("curator-holder");
    std::fs::write(dir.join("Holder.java"), HOLDER).expect("write Holder.java");
    let out = Command::new("javac")
        .arg("-cp")
        .arg(CURATOR_CP)
        .arg("-d")
        .arg(&dir)
        .arg(dir.join("Holder.java"))
        .output()
        .expect("run javac (scripts/test.sh installs a JDK)");
    assert!(
        out.status.success(),
        "javac failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// Starts the Curator holder: contends for `path`, waits at most `wait_ms`, holds `hold_ms`.
fn curator(classes: &Path, path: &str, wait_ms: u64, hold_ms: u64) -> (support::Proc, PathBuf) {
    let log = classes.join(format!("holder-{}.log", unique("")));
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{}:{CURATOR_CP}", classes.display()))
        .arg("Holder")
        .arg(format!("127.0.0.1:{}", shared().port()))
        .arg(path)
        .arg(wait_ms.to_string())
        .arg(hold_ms.to_string());
    (support::Proc::spawn("curator-holder", &mut cmd, &log), log)
}

fn log_has(log: &Path, word: &str) -> bool {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .any(|l| l.trim() == word)
}

async fn wait_log(log: &Path, word: &str, within: Duration) -> Option<Instant> {
    let started = Instant::now();
    while started.elapsed() < within {
        if log_has(log, word) {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curator_interprocess_mutex_interoperates_both_ways() {
    if !support::zookeeper::installed() {
        panic!("ZooKeeper is not installed; run scripts/test.sh");
    }
    let classes = compile_holder();
    let name = unique("interop");
    let zk_path = format!("/locks/{name}");
    let s = store("").await;
    let opts = LockOptions::new().ttl(Duration::from_secs(10));

    // 1. coordkit holds; Curator queues behind it and gets the lock only after the release.
    let held = s.lock(&name, &opts).await.expect("coordkit lock");
    let (mut proc1, log1) = curator(&classes, &zk_path, 30_000, 3_000);
    assert!(
        wait_log(&log1, "TRYING", Duration::from_secs(30))
            .await
            .is_some(),
        "Curator holder did not start"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !log_has(&log1, "ACQUIRED"),
        "Curator acquired a lock coordkit holds"
    );
    let released = Instant::now();
    held.release().await.expect("release");
    let acquired = wait_log(&log1, "ACQUIRED", Duration::from_secs(10))
        .await
        .expect("Curator never got the lock after coordkit released it");
    eprintln!("coordkit -> Curator handoff: {:?}", acquired - released);

    // 2. Curator holds; coordkit is excluded, queues behind it and takes over after it.
    let other = store("").await;
    assert!(
        other
            .try_lock(&name, &opts)
            .await
            .expect("try_lock")
            .is_none(),
        "coordkit got a lock Curator holds"
    );
    let e = other
        .lock(&name, &opts.clone().wait(Duration::from_millis(500)))
        .await
        .expect_err("bounded lock while Curator holds");
    assert_eq!(e.kind(), ErrorKind::Timeout);
    let g = other
        .lock(&name, &opts.clone().wait(Duration::from_secs(20)))
        .await
        .expect("coordkit lock after Curator");
    let got = Instant::now();
    let curator_released = wait_log(&log1, "RELEASED", Duration::from_secs(5)).await;
    assert!(
        curator_released.is_some(),
        "coordkit got the lock before Curator released it"
    );
    assert!(
        got.duration_since(acquired) >= Duration::from_millis(2500),
        "coordkit got the lock {:?} after Curator took it for 3 s",
        got.duration_since(acquired)
    );
    proc1.kill();

    // 3. And Curator is excluded while coordkit holds (bounded try on the Java side).
    let (mut proc2, log2) = curator(&classes, &zk_path, 1_000, 0);
    assert!(
        wait_log(&log2, "TIMEOUT", Duration::from_secs(30))
            .await
            .is_some(),
        "Curator was not excluded by coordkit's lock"
    );
    assert!(!log_has(&log2, "ACQUIRED"));
    proc2.kill();
    g.release().await.expect("release");
}

/// The next watch event within 20 s, rendered as (kind, key, value); panics on an error or end.
async fn next_ev(events: &mut coordkit::WatchStream) -> coordkit::WatchEvent {
    use futures::StreamExt;
    match tokio::time::timeout(Duration::from_secs(20), events.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch error: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within 20 s"),
    }
}

/// Applies an event to a rebuilt state; whether it was a coalesced mark.
fn apply(state: &mut std::collections::BTreeMap<String, Vec<u8>>, ev: &coordkit::WatchEvent) {
    match ev {
        coordkit::WatchEvent::Put(e) => {
            state.insert(e.key.clone(), e.value.clone());
        }
        coordkit::WatchEvent::Delete { key } => {
            state.remove(key);
        }
        coordkit::WatchEvent::Coalesced { .. } => {}
    }
}

/// Two other clients each pipeline 200 writes of one key (all sent at once on their
/// connection) while a watch follows the prefix: the watch lives, every event is a value
/// written, every event that skips writes is marked, and the last event is the final value.
/// (Before the per-key cache, the watch ended with `WatchGap` at the first event.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_survives_two_pipelining_writers() {
    use futures::StreamExt;
    let s = store("").await;
    let ns = format!("{}/", unique("hammer"));
    let key = format!("{ns}hot");
    let mut events = s.watch(&ns).await.expect("watch");
    const WRITES: usize = 200;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..2 {
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let s = store("").await;
            let puts = (0..WRITES).map(|i| {
                s.put(
                    &key,
                    format!("w{w}-{i}").into_bytes(),
                    PutOptions::default(),
                )
            });
            let versions: Vec<_> = futures::future::join_all(puts).await;
            versions
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("w{w}-{i}"), v.expect("put")))
                .collect::<Vec<_>>()
        }));
    }
    let mut written = std::collections::HashMap::new();
    for t in tasks {
        written.extend(t.await.expect("writer"));
    }
    let wrote = started.elapsed();
    let last = s.get(&key, STRONG).await.expect("get").expect("key");
    let (mut puts, mut marks, mut prev) = (0usize, 0usize, None::<u64>);
    let mut marked = false;
    let mut last_of: Option<(String, usize)> = None;
    loop {
        match next_ev(&mut events).await {
            coordkit::WatchEvent::Coalesced { key: k } => {
                assert_eq!(k, key);
                marked = true;
                marks += 1;
            }
            coordkit::WatchEvent::Put(e) => {
                let v = String::from_utf8(e.value.clone()).expect("utf8");
                assert_eq!(written.get(&v), Some(&e.version), "{v} was not written so");
                // Versions are mzxids: they grow with every write of the key.
                if let Some(p) = prev {
                    assert!(e.version.as_raw() > p, "versions out of order");
                }
                prev = Some(e.version.as_raw());
                // An unmarked event after one of the same writer is that writer's next write.
                let (w, i) = v[1..].split_once('-').expect("w<w>-<i>");
                let now: (String, usize) = (w.to_string(), i.parse().expect("index"));
                if let (false, Some((pw, pi))) = (std::mem::take(&mut marked), &last_of) {
                    assert!(
                        *pw != now.0 || now.1 == pi + 1,
                        "unmarked event {v} hides writes after w{pw}-{pi}"
                    );
                }
                last_of = Some(now);
                puts += 1;
                if e.version == last.version {
                    assert_eq!(e.value, last.value);
                    break;
                }
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    let extra = tokio::time::timeout(Duration::from_millis(500), events.next()).await;
    assert!(extra.is_err(), "event after the final value: {extra:?}");
    eprintln!(
        "2 x {WRITES} pipelined writes in {wrote:?}: {puts} put events ({marks} marked \
         coalesced), the last one the final value"
    );
    assert!(
        marks > 0 || puts == 2 * WRITES,
        "writes merged without a mark"
    );
}

/// A burst of pipelined puts to distinct keys, then at once a rewrite of the first: the watch
/// lives and reaches the store's final state, the first key with its final value and version
/// (the old watch ended with `WatchGap` when the rewrite's notification was queued before the
/// first key's re-read was answered).
///
/// The first key's two puts overlap in time, and a put takes two requests (a read, then a
/// create or a write), so either may be the one that lands last: the expected state is what
/// the store holds once both have returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_survives_burst_then_rewrite() {
    let s = store("").await;
    let ns = format!("{}/", unique("burst"));
    let mut events = s.watch(&ns).await.expect("watch");
    let writer = store("").await;
    const N: usize = 500;
    let keys: Vec<String> = (0..N).map(|i| format!("{ns}k{i:03}")).collect();
    let puts = keys
        .iter()
        .map(|k| writer.put(k, b"1".to_vec(), PutOptions::default()));
    let rewrite = writer.put(&keys[0], b"2".to_vec(), PutOptions::default());
    // All sent before any answer: the rewrite is queued right behind the burst.
    let (burst, rewritten) = tokio::join!(futures::future::join_all(puts), rewrite);
    for r in burst {
        r.expect("put");
    }
    rewritten.expect("rewrite");
    let stored = writer.list(&ns, Consistency::Strong).await.expect("list");
    assert_eq!(stored.len(), N);
    let first = stored.iter().find(|e| e.key == keys[0]).expect("first key");
    let expected: std::collections::BTreeMap<String, Vec<u8>> = stored
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    let mut state = std::collections::BTreeMap::new();
    let mut first_version = None;
    let mut n = 0;
    while state != expected || first_version != Some(first.version) {
        let ev = next_ev(&mut events).await;
        if let coordkit::WatchEvent::Put(e) = &ev {
            if e.key == keys[0] {
                first_version = Some(e.version);
            }
        }
        apply(&mut state, &ev);
        n += 1;
    }
    eprintln!(
        "burst of {N} puts + rewrite: state complete after {n} events (first key {:?})",
        String::from_utf8_lossy(&first.value)
    );
}

/// A TCP proxy in front of a server whose connections can be cut (all of them dropped, new
/// ones refused) and restored.
mod proxy {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    pub struct Proxy {
        pub port: u16,
        cut: Arc<AtomicBool>,
        generation: watch::Sender<u64>,
    }

    impl Proxy {
        pub async fn start(upstream: u16) -> Proxy {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let cut = Arc::new(AtomicBool::new(false));
            let (generation, _) = watch::channel(0u64);
            let gen_rx = generation.subscribe();
            let is_cut = cut.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((mut down, _)) = listener.accept().await else {
                        return;
                    };
                    if is_cut.load(Ordering::SeqCst) {
                        drop(down);
                        continue;
                    }
                    let mut gen = gen_rx.clone();
                    // Only a cut after this connection was accepted ends it.
                    gen.borrow_and_update();
                    tokio::spawn(async move {
                        let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                            _ = gen.changed() => {}
                        }
                    });
                }
            });
            Proxy {
                port,
                cut,
                generation,
            }
        }

        /// Drops every connection and refuses new ones.
        pub fn cut(&self) {
            self.cut.store(true, Ordering::SeqCst);
            self.generation.send_modify(|g| *g += 1);
        }

        pub fn restore(&self) {
            self.cut.store(false, Ordering::SeqCst);
        }
    }
}

/// The watch survives a server restart (same data directory and port) and a session expiry,
/// and reports the changes made while it was cut off. Two watches reach the server through a
/// proxy: one with a 10 s session (it reconnects to the same session), one with a 2 s session
/// (it expires while cut off: the watch opens a new session and registers a new watch). While
/// the proxy is cut, the server is restarted and a direct client updates, deletes, creates,
/// and creates-then-deletes keys. (Before, any disconnect ended the watch with `WatchGap`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_survives_server_restart_and_reports_missed_changes() {
    let mut zk = support::zookeeper::ZkStandalone::start();
    let proxy = proxy::Proxy::start(zk.port()).await;
    let via_proxy = |session: &str| {
        format!(
            "zk://127.0.0.1:{}?{}&session_timeout={session}&request_timeout=2s",
            proxy.port,
            support::zookeeper::url_options()
        )
    };
    let direct = ZkStore::connect(ZkConfig::from_url_str(&zk.url()).expect("url"))
        .await
        .expect("connect direct");
    for k in ["r/keep", "r/gone", "r/same"] {
        direct
            .put(k, b"1".to_vec(), PutOptions::default())
            .await
            .expect("seed");
    }
    let mut watches = Vec::new();
    for session in ["10s", "2s"] {
        let s = ZkStore::connect(ZkConfig::from_url_str(&via_proxy(session)).expect("url"))
            .await
            .expect("connect via proxy");
        let w = s.watch("r/").await.expect("watch");
        watches.push((session, s, w));
    }
    direct
        .put("r/live", b"1".to_vec(), PutOptions::default())
        .await
        .expect("put live");
    for (session, _, w) in &mut watches {
        match next_ev(w).await {
            coordkit::WatchEvent::Put(e) if e.key == "r/live" => {}
            other => panic!("[{session}] expected put r/live, got {other:?}"),
        }
    }
    // Cut off; restart the server; change things behind the watches' backs.
    proxy.cut();
    let down = Instant::now();
    zk.node().restart();
    while zk.node().mode().as_deref() != Some("standalone") {
        assert!(
            down.elapsed() < Duration::from_secs(60),
            "server did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let retry = |what: &'static str| {
        move |r: coordkit::Result<()>| {
            if let Err(e) = &r {
                eprintln!("{what}: {e} (retrying)");
            }
            r.is_ok()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    macro_rules! until_ok {
        ($what:literal, $op:expr) => {
            loop {
                if retry($what)($op.await.map(|_| ())) {
                    break;
                }
                assert!(Instant::now() < deadline, "{} kept failing", $what);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
    }
    until_ok!(
        "put keep",
        direct.put("r/keep", b"2".to_vec(), PutOptions::default())
    );
    until_ok!("delete gone", direct.delete("r/gone"));
    until_ok!(
        "put new",
        direct.put("r/new", b"1".to_vec(), PutOptions::default())
    );
    until_ok!(
        "put flash",
        direct.put("r/flash", b"1".to_vec(), PutOptions::default())
    );
    until_ok!("delete flash", direct.delete("r/flash"));
    // Past the short session's expiry (1.4 x its timeout after the restart at the latest).
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(down.elapsed())).await;
    let restored = Instant::now();
    proxy.restore();
    let want: std::collections::BTreeMap<String, Vec<u8>> = direct
        .list("r/", STRONG)
        .await
        .expect("list")
        .into_iter()
        .map(|e| (e.key, e.value))
        .collect();
    for (session, _, w) in &mut watches {
        let mut state: std::collections::BTreeMap<String, Vec<u8>> = [
            ("r/keep", b"1"),
            ("r/gone", b"1"),
            ("r/same", b"1"),
            ("r/live", b"1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
        let mut got = Vec::new();
        while state != want {
            let ev = next_ev(w).await;
            apply(&mut state, &ev);
            got.push(ev);
        }
        assert!(
            !got.iter()
                .any(|e| e.key() == "r/same" || e.key() == "r/flash"),
            "[{session}] events for unchanged keys: {got:?}"
        );
        eprintln!(
            "[{session} session] after the restart: {} events within {:?} of reconnecting: {:?}",
            got.len(),
            restored.elapsed(),
            got.iter()
                .map(|e| match e {
                    coordkit::WatchEvent::Put(e) => format!("put {}", e.key),
                    coordkit::WatchEvent::Delete { key } => format!("delete {key}"),
                    coordkit::WatchEvent::Coalesced { key } => format!("coalesced {key}"),
                })
                .collect::<Vec<_>>()
        );
    }
    // Still alive: a later write is delivered, exactly.
    direct
        .put("r/after", b"1".to_vec(), PutOptions::default())
        .await
        .expect("put after");
    for (session, _, w) in &mut watches {
        match next_ev(w).await {
            coordkit::WatchEvent::Put(e) if e.key == "r/after" => {}
            other => panic!("[{session}] expected put r/after, got {other:?}"),
        }
    }
}

/// Deleting the holder's lock node (an operator, or another tool) fires `lost()` at once, and
/// the next contender gets the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_fires_when_the_lock_node_is_deleted() {
    let root = format!("/{}", unique("nodedel"));
    let s = store(&root).await;
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let g = s.lock("victim", &opts).await.expect("lock");
    let c = raw().await;
    let dir = format!("{root}/locks/victim");
    let (children, _) = c.get_children(&dir).await.expect("lock dir");
    assert_eq!(children.len(), 1);
    let deleted = Instant::now();
    c.delete(&format!("{dir}/{}", children[0]), None)
        .await
        .expect("delete the lock node");
    tokio::time::timeout(Duration::from_secs(5), g.lost())
        .await
        .expect("lost() did not fire after the lock node was deleted");
    eprintln!("lock node deleted -> lost() after {:?}", deleted.elapsed());
    assert!(g.is_lost());
    let next = s
        .lock("victim", &opts.clone().wait(Duration::from_secs(5)))
        .await
        .expect("next lock");
    assert!(next.token() > g.token());
    assert_eq!(
        g.release()
            .await
            .expect_err("release of a lost lock")
            .kind(),
        ErrorKind::LockLost
    );
    assert!(
        !next.is_lost(),
        "releasing the lost guard broke the new holder"
    );
    next.release().await.expect("release");
}

/// Children of `dir`, read over a fresh connection on another thread while this (single)
/// test thread is blocked, so that no background task of the store can run in between.
fn children_now(dir: &str) -> Vec<String> {
    let dir = dir.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            match raw().await.get_children(&dir).await {
                Ok((mut c, _)) => {
                    c.sort();
                    c
                }
                Err(zk::Error::NoNode) => Vec::new(),
                Err(e) => panic!("get_children {dir}: {e}"),
            }
        })
    })
    .join()
    .expect("reader thread")
}

/// A `lock()` that times out has deleted its own contender node before it returns: right
/// after the `Timeout`, only the holder's node is in the lock's directory.
#[tokio::test]
async fn timed_out_lock_leaves_no_node_behind() {
    let root = format!("/{}", unique("abandon"));
    let a = store(&root).await;
    let b = store(&root).await;
    let dir = format!("{root}/locks/job");
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let held = a.lock("job", &opts).await.expect("a locks");
    let before = children_now(&dir);
    assert_eq!(before.len(), 1, "{before:?}");
    for round in 0..2 {
        let started = Instant::now();
        let r = b
            .lock("job", &opts.clone().wait(Duration::from_millis(500)))
            .await;
        let e = r.expect_err("b must not get the held lock");
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(450));
        // The withdrawal is one round trip here; the contract's bound is wait + one request
        // timeout.
        assert!(
            took < Duration::from_millis(1500),
            "a 500 ms wait took {took:?}"
        );
        assert_eq!(
            children_now(&dir),
            before,
            "round {round}: the abandoned attempt left its node behind"
        );
    }
    assert!(b.try_lock("job", &opts).await.expect("try_lock").is_none());
    assert_eq!(children_now(&dir), before, "try_lock left its node behind");
    held.release().await.expect("release");
    let started = Instant::now();
    let next = b
        .lock("job", &opts.clone().wait(Duration::from_secs(5)))
        .await
        .expect("b locks after the release");
    assert!(started.elapsed() < Duration::from_secs(5));
    next.release().await.expect("release b");
}

/// `LockOptions::wait(Duration::MAX)` is an unbounded wait: it takes a free lock (it used to
/// panic computing `now + wait`), and a held one once it is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_with_the_largest_wait_works() {
    let root = format!("/{}", unique("maxwait"));
    let s = store(&root).await;
    let opts = LockOptions::new()
        .ttl(Duration::from_secs(10))
        .wait(Duration::MAX);
    let g = tokio::time::timeout(Duration::from_secs(10), s.lock("free", &opts))
        .await
        .expect("lock with wait MAX hung")
        .expect("lock with wait MAX");
    let waiter = {
        let s = store(&root).await;
        let opts = opts.clone();
        tokio::spawn(async move { s.lock("free", &opts).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "got a held lock");
    g.release().await.expect("release");
    let next = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("waiter not woken")
        .expect("waiter task")
        .expect("waiter lock");
    next.release().await.expect("release");
}

/// Every name is its own lock: holding `a/b` does not block `a` (whose lock directory then
/// contains the directory `b`), holding `a` does not block `a/b`, and a nested name whose last
/// segment looks like a contender node (`n/lock-0000000001`) does not block `n`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_lock_names_and_lock_like_children_are_independent() {
    let root = format!("/{}", unique("nested"));
    let s = store(&root).await;
    let other = store(&root).await;
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let bounded = opts.clone().wait(Duration::from_secs(3));
    for (held, free) in [
        ("a/b", "a"),
        ("a", "a/b"),
        ("x/y/z", "x"),
        ("n/lock-0000000001", "n"),
        (
            "_c_0e8b1e4a-1b5e-4b8c-9a5b-0a1b2c3d4e5f-lock-0000000000/q",
            "p",
        ),
    ] {
        let h = s.lock(held, &opts).await.expect("lock the held name");
        let g = other
            .try_lock(free, &opts)
            .await
            .expect("try_lock")
            .unwrap_or_else(|| panic!("try_lock({free}) blocked while {held} is held"));
        g.release().await.expect("release");
        let g = other
            .lock(free, &bounded)
            .await
            .unwrap_or_else(|e| panic!("lock({free}) while {held} is held: {e}"));
        // Still exclusive among equals.
        assert!(s.try_lock(free, &opts).await.expect("try_lock").is_none());
        assert!(other
            .try_lock(held, &opts)
            .await
            .expect("try_lock")
            .is_none());
        g.release().await.expect("release");
        h.release().await.expect("release");
    }
}

/// A waiter whose own node disappears (deleted by an operator, or its session expired) gets
/// `LockLost`, the same kind as on etcd, not `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_node_vanishing_while_waiting_is_lock_lost() {
    let root = format!("/{}", unique("vanish"));
    let a = store(&root).await;
    let b = store(&root).await;
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let held = a.lock("v", &opts).await.expect("a locks");
    let waiter = {
        let opts = opts.clone().wait(Duration::from_secs(20));
        tokio::spawn(async move { b.lock("v", &opts).await })
    };
    let c = raw().await;
    let dir = format!("{root}/locks/v");
    let started = Instant::now();
    let mine = loop {
        let (mut children, _) = c.get_children(&dir).await.expect("lock dir");
        if children.len() == 2 {
            // Curator's order: by the sequence number after the last `lock-`.
            children.sort_by_key(|c| c.rsplit("lock-").next().unwrap_or_default().to_string());
            break children[1].clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waiter never queued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    c.delete(&format!("{dir}/{mine}"), None)
        .await
        .expect("delete the waiter's node");
    held.release().await.expect("release");
    let e = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("waiter hung")
        .expect("waiter task")
        .expect_err("the waiter's node is gone");
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
}

/// A guard dropped on a thread without a tokio runtime ends the lock: another client gets it
/// within the TTL plus a bound (here at once: the release runs on the guard's runtime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_dropped_without_a_runtime_ends_the_lock() {
    let root = format!("/{}", unique("noruntime"));
    let a = store(&root).await;
    let b = store(&root).await;
    let ttl = Duration::from_secs(3);
    let opts = LockOptions::new().ttl(ttl);
    let g = a.lock("plain", &opts).await.expect("lock");
    let token = g.token();
    std::thread::spawn(move || drop(g))
        .join()
        .expect("dropping thread");
    let started = Instant::now();
    let next = b
        .lock("plain", &opts.clone().wait(ttl + Duration::from_secs(5)))
        .await
        .expect("the lock of a guard dropped without a runtime was never freed");
    eprintln!(
        "guard dropped on a plain thread -> next holder after {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < ttl + Duration::from_secs(2));
    assert!(next.token() > token);
    next.release().await.expect("release");
}

/// A `lock()` future dropped while its create is in flight leaves no node behind: the node is
/// found by its uuid and deleted in the background, so the next client is not blocked until
/// the (30 s) session expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_create_leaves_no_orphan() {
    let root = format!("/{}", unique("cancel"));
    let s = store(&root).await;
    let other = store(&root).await;
    let opts = LockOptions::new().ttl(Duration::from_secs(30));
    // A persistent lock directory, so that the very first create is the one cut short, and a
    // session in the pool, so that the create is sent on the first poll.
    let c = raw().await;
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    c.mkdir(&format!("{root}/locks/c"), &persistent)
        .await
        .expect("lock dir");
    s.lock("c", &opts)
        .await
        .expect("warm-up")
        .release()
        .await
        .expect("release");
    let mut cancelled = 0;
    for round in 0..12u64 {
        let delay = Duration::from_millis(round % 3);
        match tokio::time::timeout(delay, s.lock("c", &opts)).await {
            Ok(r) => {
                r.expect("lock").release().await.expect("release");
                continue;
            }
            Err(_) => cancelled += 1,
        }
        let started = Instant::now();
        let g = other
            .lock("c", &opts.clone().wait(Duration::from_secs(5)))
            .await
            .unwrap_or_else(|e| {
                panic!("round {round}: the cancelled attempt left a node behind: {e}")
            });
        assert!(started.elapsed() < Duration::from_secs(3));
        g.release().await.expect("release");
        // Let the background cleanup put the session back into the pool.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (children, _) = c
            .get_children(&format!("{root}/locks/c"))
            .await
            .expect("dir");
        assert!(children.is_empty(), "round {round}: left {children:?}");
    }
    assert!(cancelled >= 4, "only {cancelled} attempts were cancelled");
}

/// A holder whose keep-alive stops sees `lost()` fire at its lease deadline, strictly before
/// another client gets the lock (the server expires the session only a session timeout after
/// the last packet it got, which is after the last answered request was sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_holder_is_lost_before_the_next_client_acquires() {
    let root = format!("/{}", unique("order"));
    let a = store(&root).await;
    let b = store(&root).await;
    let ttl = Duration::from_secs(2);
    for round in 0..3 {
        let g = a
            .lock("o", &LockOptions::new().ttl(ttl))
            .await
            .expect("lock");
        tokio::time::sleep(ttl / 2).await;
        let lost_at = {
            let lost = g.lost();
            tokio::spawn(async move {
                lost.await;
                Instant::now()
            })
        };
        let suspended = Instant::now();
        g.suspend_keep_alive();
        let next = b
            .lock("o", &LockOptions::new().ttl(ttl).wait(ttl * 4))
            .await
            .expect("next client");
        let acquired = Instant::now();
        let lost_at = lost_at.await.expect("lost task");
        eprintln!(
            "round {round}: lost {:?} after the suspension, next holder {:?} after; margin {:?}",
            lost_at - suspended,
            acquired - suspended,
            acquired.checked_duration_since(lost_at)
        );
        assert!(
            lost_at < acquired,
            "lost() fired {:?} after the next client acquired",
            lost_at - acquired
        );
        assert!(g.is_lost());
        drop(g);
        next.release().await.expect("release");
    }
}

/// A TTL key written by one client and then put without TTL by *another* client (or the same
/// one after a restart) is permanent: the kind is read from the server, not remembered.
#[tokio::test]
async fn plain_put_by_another_client_makes_a_ttl_key_permanent() {
    let a = store("").await;
    let ttl = a.capabilities().min_ttl;
    let key = format!("{}/k", unique("ttlother"));
    a.put(&key, b"t".to_vec(), PutOptions::ttl(ttl))
        .await
        .expect("put ttl");
    let b = store("").await;
    b.put(&key, b"p".to_vec(), PutOptions::default())
        .await
        .expect("plain put by another client");
    tokio::time::sleep(ttl * 2 + Duration::from_secs(2)).await;
    let fresh = store("").await;
    assert_eq!(
        fresh.get(&key, STRONG).await.expect("get").map(|e| e.value),
        Some(b"p".to_vec()),
        "the server reaped a key made permanent by another client"
    );
    // And the other way: a key made TTL by one client, rewritten with the same TTL by another,
    // still expires.
    let key2 = format!("{key}2");
    b.put(&key2, b"p".to_vec(), PutOptions::default())
        .await
        .expect("put");
    a.put(&key2, b"t".to_vec(), PutOptions::ttl(ttl))
        .await
        .expect("put ttl");
    b.put(&key2, b"t2".to_vec(), PutOptions::ttl(ttl))
        .await
        .expect("put ttl again");
    tokio::time::sleep(ttl * 2 + Duration::from_secs(2)).await;
    assert_eq!(fresh.get(&key2, STRONG).await.expect("get"), None);
}

/// Changing a key between permanent and TTL is one transaction: a reader polling the key
/// meanwhile never finds it missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kind_changes_never_show_the_key_missing() {
    let w = store("").await;
    let r = store("").await;
    let ttl = Duration::from_secs(30);
    let key = format!("{}/k", unique("kind"));
    w.put(&key, b"0".to_vec(), PutOptions::default())
        .await
        .expect("put");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, key) = (stop.clone(), key.clone());
        tokio::spawn(async move {
            let (mut reads, mut missing) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if r.get(&key, Consistency::Stale)
                    .await
                    .expect("get")
                    .is_none()
                {
                    missing += 1;
                }
                reads += 1;
            }
            (reads, missing)
        })
    };
    for i in 0..60u32 {
        let opts = if i % 2 == 0 {
            PutOptions::ttl(ttl + Duration::from_secs(u64::from(i % 3)))
        } else {
            PutOptions::default()
        };
        w.put(&key, i.to_string().into_bytes(), opts)
            .await
            .expect("put");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (reads, missing) = reader.await.expect("reader");
    assert!(reads > 20, "only {reads} reads");
    assert_eq!(
        missing, 0,
        "the key was missing in {missing} of {reads} reads"
    );
    assert_eq!(
        w.get(&key, STRONG).await.expect("get").map(|e| e.value),
        Some(b"59".to_vec())
    );
}

/// With ZooKeeper's default reaper interval (60 s) an expired TTL node lingers on the server;
/// `get`, `list` and create-if-absent treat the key as gone at its TTL anyway.
#[tokio::test]
async fn expired_ttl_keys_vanish_at_their_ttl_before_the_reaper_runs() {
    if !support::zookeeper::installed() {
        return;
    }
    let server = support::zookeeper::ZkStandalone::start_with_reap_interval(60_000);
    // The store is told a 1 s interval so that a 1 s TTL is accepted.
    let url = format!(
        "zk://127.0.0.1:{}?min_session_timeout=1s&ttl_reap_interval=1s&connect_timeout=5s",
        server.port()
    );
    let s = coordkit::connect(&url).await.expect("connect");
    let ns = unique("expire");
    let key = format!("{ns}/k");
    let ttl = Duration::from_secs(1);
    s.put(&key, b"v".to_vec(), PutOptions::ttl(ttl))
        .await
        .expect("put ttl");
    s.put(&format!("{ns}/p"), b"p".to_vec(), PutOptions::default())
        .await
        .expect("put");
    assert!(s.get(&key, STRONG).await.expect("get").is_some());
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    // A fresh client (no clock sample of its own yet) sees the same.
    let other = coordkit::connect(&url).await.expect("connect");
    for c in [&s, &other] {
        assert_eq!(
            c.get(&key, STRONG).await.expect("get"),
            None,
            "expired key read"
        );
        let listed: Vec<String> = c
            .list(&format!("{ns}/"), STRONG)
            .await
            .expect("list")
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(listed, vec![format!("{ns}/p")]);
    }
    let raw = zk::Client::connect(&format!("127.0.0.1:{}", server.port()))
        .await
        .expect("raw connect");
    assert!(
        exists(&raw, &format!("/kv/{ns}~/k")).await,
        "the server reaped the node already: the test proves nothing"
    );
    // Create-if-absent succeeds on the expired key, and makes it permanent.
    other
        .compare_and_swap(&key, Expect::Absent, Some(b"new".to_vec()))
        .await
        .expect("create over an expired key");
    assert_eq!(
        s.get(&key, STRONG).await.expect("get").map(|e| e.value),
        Some(b"new".to_vec())
    );
}

// ---- Curator LeaderLatch interop -----------------------------------------------------------

const LATCH: &str = r#"
import java.util.concurrent.TimeUnit;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.framework.recipes.leader.LeaderLatch;
import org.apache.curator.retry.RetryOneTime;

public class Latch {
    public static void main(String[] a) throws Exception {
        String connect = a[0], path = a[1], id = a[2];
        long waitMs = Long.parseLong(a[3]), holdMs = Long.parseLong(a[4]);
        CuratorFramework c = CuratorFrameworkFactory.newClient(connect, 10000, 5000, new RetryOneTime(100));
        c.start();
        c.blockUntilConnected();
        LeaderLatch l = new LeaderLatch(c, path, id);
        l.start();
        System.out.println("STARTED");
        System.out.flush();
        Thread.sleep(1000);
        System.out.println("SEES " + l.getLeader().getId());
        System.out.flush();
        if (!l.await(waitMs, TimeUnit.MILLISECONDS)) {
            System.out.println("TIMEOUT");
            System.out.flush();
            l.close();
            c.close();
            return;
        }
        System.out.println("LEADER");
        System.out.flush();
        Thread.sleep(holdMs);
        l.close();
        System.out.println("CLOSED");
        System.out.flush();
        c.close();
    }
}
"#;

fn compile_latch() -> PathBuf {
    let dir = support::fresh_dir("curator-latch");
    std::fs::write(dir.join("Latch.java"), LATCH).expect("write Latch.java");
    let out = Command::new("javac")
        .arg("-cp")
        .arg(CURATOR_CP)
        .arg("-d")
        .arg(&dir)
        .arg(dir.join("Latch.java"))
        .output()
        .expect("run javac (scripts/test.sh installs a JDK)");
    assert!(
        out.status.success(),
        "javac failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// Starts a Curator `LeaderLatch` on `path` with participant id `id`: prints `SEES <leader
/// id>` after a second, `LEADER` once leader (or `TIMEOUT` after `wait_ms`), and closes the
/// latch `hold_ms` later.
fn latch(
    classes: &Path,
    path: &str,
    id: &str,
    wait_ms: u64,
    hold_ms: u64,
) -> (support::Proc, PathBuf) {
    let log = classes.join(format!("latch-{}.log", unique("")));
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{}:{CURATOR_CP}", classes.display()))
        .arg("Latch")
        .arg(format!("127.0.0.1:{}", shared().port()))
        .arg(path)
        .arg(id)
        .arg(wait_ms.to_string())
        .arg(hold_ms.to_string());
    (support::Proc::spawn("curator-latch", &mut cmd, &log), log)
}

/// coordkit's election `NAME` is Curator's `LeaderLatch` on `/elections/NAME`: Curator sees
/// coordkit's leader (its value as participant id) and waits behind it; when coordkit
/// resigns Curator leads, coordkit's `leader()` shows Curator's id with a higher term, and
/// coordkit's campaign waits until Curator closes its latch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curator_leader_latch_interoperates_both_ways() {
    use coordkit::Election;
    if !support::zookeeper::installed() {
        panic!("ZooKeeper is not installed; run scripts/test.sh");
    }
    let classes = compile_latch();
    let name = unique("latch");
    let zk_path = format!("/elections/{name}");
    let s = store("").await;
    let opts = LockOptions::new().ttl(Duration::from_secs(10));

    // 1. coordkit leads; Curator sees it and waits.
    let lead = s
        .campaign(&name, b"coordkit-1".to_vec(), &opts)
        .await
        .expect("campaign");
    let (mut proc1, log1) = latch(&classes, &zk_path, "curator-1", 30_000, 3_000);
    assert!(
        wait_log(&log1, "SEES coordkit-1", Duration::from_secs(30))
            .await
            .is_some(),
        "Curator did not see coordkit's leader"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !log_has(&log1, "LEADER"),
        "Curator leads while coordkit does"
    );
    let term1 = lead.term();
    let resigned = Instant::now();
    lead.resign().await.expect("resign");
    let took = wait_log(&log1, "LEADER", Duration::from_secs(10))
        .await
        .expect("Curator did not take over after coordkit resigned");
    eprintln!(
        "coordkit -> Curator LeaderLatch handoff: {:?}",
        took - resigned
    );

    // 2. Curator leads; coordkit sees it, is excluded, and takes over after it.
    let seen = s.leader(&name).await.expect("leader").expect("a leader");
    assert_eq!(seen.value, b"curator-1");
    assert!(seen.term > term1, "{} vs {term1}", seen.term);
    let other = store("").await;
    let e = other
        .campaign(
            &name,
            b"coordkit-2".to_vec(),
            &opts.clone().wait(Duration::from_millis(500)),
        )
        .await
        .expect_err("bounded campaign while Curator leads");
    assert_eq!(e.kind(), ErrorKind::Timeout);
    let g = other
        .campaign(
            &name,
            b"coordkit-2".to_vec(),
            &opts.clone().wait(Duration::from_secs(20)),
        )
        .await
        .expect("campaign after Curator");
    assert!(
        wait_log(&log1, "CLOSED", Duration::from_secs(5))
            .await
            .is_some(),
        "coordkit led before Curator closed its latch"
    );
    assert!(g.term() > seen.term);
    proc1.kill();
    g.resign().await.expect("resign");
}

/// Packets the server has received (`srvr` `Received:`).
fn received(port: u16) -> u64 {
    support::zookeeper::four_letter(port, "srvr")
        .lines()
        .find_map(|l| l.strip_prefix("Received: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("srvr answers with a packet count")
}

/// A permanent key is read with one packet (stale) or two (sync + read, strong); the `~ttl`
/// child is asked for only when the key znode has children. A TTL key still reads as one.
#[tokio::test]
async fn reading_a_permanent_key_costs_one_packet() {
    let zk = support::zookeeper::ZkStandalone::start();
    let store = ZkStore::connect(ZkConfig::from_url_str(&zk.url()).expect("url"))
        .await
        .expect("connect");
    store
        .put("p/k", b"v".to_vec(), PutOptions::default())
        .await
        .unwrap();
    store
        .put(
            "p/t",
            b"t".to_vec(),
            PutOptions::ttl(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    const N: u64 = 20;
    for (consistency, per_read) in [(Consistency::Stale, 1), (STRONG, 2)] {
        let before = received(zk.port());
        for _ in 0..N {
            let e = store.get("p/k", consistency).await.unwrap().unwrap();
            assert_eq!(e.value, b"v");
        }
        let sent = received(zk.port()) - before;
        // A session ping may fall in the window.
        assert!(
            sent >= N * per_read && sent <= N * per_read + 2,
            "{consistency:?}: {sent} packets for {N} reads"
        );
    }
    let t = store.get("p/t", Consistency::Stale).await.unwrap().unwrap();
    assert_eq!(t.value, b"t");
}

/// A free lock is taken after one round trip's wait: the create of the lock node and the
/// listing of the lock directory both go out before the first answer comes back (the server
/// answers a session's requests in order, so the listing shows the new node). With the
/// server's answers held back, the server receives exactly those two requests; once they are
/// let through, the lock is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_lock_sends_its_create_and_listing_together() {
    use support::proxy::{Mode, Proxy};
    let zk = support::zookeeper::ZkStandalone::start();
    let proxy = Proxy::to_port(zk.port());
    let store = ZkStore::connect(
        ZkConfig::from_url_str(&format!("zk://127.0.0.1:{}", proxy.port())).expect("url"),
    )
    .await
    .expect("connect");
    // A long TTL (the lock session's timeout): no session ping falls in the window below.
    let opts = LockOptions::new()
        .ttl(Duration::from_secs(30))
        .wait(Duration::from_secs(20));
    // The lock session and the lock's directory exist after a first lock.
    let g = store.lock("pipelined", &opts).await.expect("first lock");
    g.release().await.expect("release");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // What asking for the count adds to it (the question itself may be counted).
    let asked = received(zk.port());
    let before = received(zk.port());
    let asking = before - asked;
    proxy.set_mode(Mode::HoldReplies);
    let pending = {
        let (store, opts) = (store.clone(), opts.clone());
        tokio::spawn(async move { store.lock("pipelined", &opts).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let sent = received(zk.port()) - before - asking;
    assert!(!pending.is_finished(), "granted without an answer");
    proxy.heal();
    let g = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("granted once the answers arrive")
        .expect("task")
        .expect("lock");
    assert_eq!(sent, 2, "requests sent before the first answer");
    g.release().await.expect("release");
}

/// Waits (at most 5 s) until this process has a connection to `port` and all of them have
/// `TCP_NODELAY`; the last `(connections, with TCP_NODELAY)` seen.
async fn nodelay_on_all(port: u16) -> (usize, usize) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = support::zookeeper::nodelay_connections(port, false);
        if (seen.0 > 0 && seen.0 == seen.1) || Instant::now() >= until {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sessions' connections run without Nagle's algorithm, so that a read sent right after
/// a `sync` is not held back until the sync's answer: after connecting, for lock sessions too,
/// and again after the server restarts and the sessions reconnect.
#[tokio::test]
async fn session_connections_have_tcp_nodelay_across_reconnects() {
    let mut zk = support::zookeeper::ZkStandalone::start();
    let port = zk.port();
    let store = ZkStore::connect(ZkConfig::from_url_str(&zk.url()).expect("url"))
        .await
        .expect("connect");
    store
        .put("n/k", b"v".to_vec(), PutOptions::default())
        .await
        .unwrap();
    let held = store
        .lock("n/l", &LockOptions::new().ttl(Duration::from_secs(20)))
        .await
        .unwrap();
    let (total, on) = nodelay_on_all(port).await;
    assert!(total >= 2, "{total} connections (main and lock session)");
    assert_eq!(on, total, "connections without TCP_NODELAY after connect");

    zk.node().restart();
    let until = Instant::now() + Duration::from_secs(30);
    while zk.node().mode().as_deref() != Some("standalone") {
        assert!(Instant::now() < until, "server did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Reconnected once a read goes through.
    let until = Instant::now() + Duration::from_secs(30);
    while store.get("n/k", STRONG).await.is_err() {
        assert!(Instant::now() < until, "no read after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (total, on) = nodelay_on_all(port).await;
    assert!(total >= 1, "no connection after the restart");
    assert_eq!(
        on, total,
        "connections without TCP_NODELAY after reconnecting"
    );
    drop(held);
}
