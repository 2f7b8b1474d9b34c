//! The bad-input matrix against every backend: invalid keys, path tricks, values at and over
//! the limit, non-UTF-8 values, zero and extreme TTLs, locks named like keys, malformed and
//! unknown URLs, unreachable and black-holed servers. Each case gives the documented
//! `ErrorKind` within a bound, and a read-back proves nothing stored changed. See
//! `docs/reliability.md`.

mod support;

use std::sync::Arc;

use support::bad_input::{run_matrix, url_cases, Matrix};

fn report(m: &Matrix) {
    println!("{m}");
    m.assert_ok();
}

#[tokio::test]
async fn memory_bad_input_matrix() {
    let store = coordkit::MemoryStore::new();
    let a: Arc<dyn coordkit::Backend> = Arc::new(store.clone());
    let b: Arc<dyn coordkit::Backend> = Arc::new(store);
    let m = run_matrix("memory", a, b, "bad/").await;
    report(&m);
    assert!(m.cases.len() > 150, "{}", m.cases.len());
}

#[tokio::test]
async fn malformed_and_unknown_urls() {
    let mut m = Matrix {
        label: "urls".into(),
        ..Default::default()
    };
    url_cases(
        &mut m,
        &[
            "",
            "   ",
            "not a url",
            "nosuch://host:1",
            "http://127.0.0.1:2379",
            "memory",
            "://x",
            "etcd:",
            "zk:",
            "consul:",
        ],
    )
    .await;
    report(&m);
}

async fn two(url: &str) -> (Arc<dyn coordkit::Backend>, Arc<dyn coordkit::Backend>) {
    let a = coordkit::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    let b = coordkit::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    (a, b)
}

/// Reads `key`, retrying `Unavailable`/`Timeout` for up to 15 s (a client may need a moment,
/// or a new session, after its server was stopped).
async fn read_back_recovering(
    store: &Arc<dyn coordkit::Backend>,
    key: &str,
) -> coordkit::Result<Option<coordkit::Entry>> {
    let t0 = std::time::Instant::now();
    loop {
        match store.get(key, coordkit::Consistency::Strong).await {
            Err(e)
                if (e.is(coordkit::ErrorKind::Unavailable)
                    || e.is(coordkit::ErrorKind::Timeout))
                    && t0.elapsed() < std::time::Duration::from_secs(15) =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await
            }
            other => return other,
        }
    }
}

/// A port nobody listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let p = l.local_addr().expect("addr").port();
    drop(l);
    p
}

/// One `#[tokio::test]` running the whole bad-input matrix against a backend: two clients of
/// `url` (evaluated after `server`, which lives for the test and may be unit), the backend's malformed URLs,
/// and one unreachable server.
macro_rules! bad_input_matrix {
    ($test:ident, $label:literal,
     server: $server:ident = $start:expr, url: $url:expr,
     bad_urls: [$($bad:expr),* $(,)?],
     unreachable: $unreachable:expr $(,)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let $server = $start;
            let url = $url;
            let (a, b) = two(&url).await;
            let mut m = run_matrix($label, a, b, "bad/").await;
            url_cases(&mut m, &[$($bad),*]).await;
            unreachable_case(&mut m, &$unreachable).await;
            report(&m);
        }
    };
}

#[cfg(feature = "etcd")]
mod etcd {
    use super::*;
    use crate::support::etcd::{etcdctl, shared_url, EtcdCluster};
    use std::time::Duration;
    use support::bad_input::{black_hole_cases, unreachable_case};

    bad_input_matrix!(
        etcd_bad_input_matrix,
        "etcd",
        server: _server = (),
        url: shared_url(),
        bad_urls: [
            "etcd://",
            "etcd://127.0.0.1:notaport",
            "etcd://127.0.0.1:99999",
            "etcd://127.0.0.1:2379?timeout=banana",
            "etcd://127.0.0.1:2379?no_such_option=1",
        ],
        unreachable: format!(
            "etcd://127.0.0.1:{}?timeout=2s&connect_timeout=1s",
            closed_port()
        ),
    );

    /// With authentication enabled: wrong password and unknown user give PermissionDenied;
    /// the right ones work, and nothing the refused calls attempted was written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_wrong_credentials() {
        let c = EtcdCluster::start(1);
        let ep = c.endpoints();
        for args in [
            vec!["user", "add", "root:rootpw"],
            vec!["user", "add", "app:apppw"],
            vec!["role", "add", "app"],
            vec![
                "role",
                "grant-permission",
                "app",
                "--prefix=true",
                "readwrite",
                "",
            ],
            vec!["user", "grant-role", "app", "app"],
            vec!["auth", "enable"],
        ] {
            let (ok, out, err) = etcdctl(&ep, &args);
            assert!(ok, "etcdctl {args:?}: {out} {err}");
        }
        let good = format!("etcd://app:apppw@{ep}?timeout=3s");
        let store = coordkit::connect(&good)
            .await
            .expect("connect with credentials");
        store
            .put("auth/k", b"v".to_vec(), coordkit::PutOptions::default())
            .await
            .expect("put with the right credentials");
        let mut m = Matrix {
            label: "etcd-auth".into(),
            ..Default::default()
        };
        let denied = [coordkit::ErrorKind::PermissionDenied];
        for url in [
            format!("etcd://app:wrong@{ep}?timeout=3s"),
            format!("etcd://nobody:pw@{ep}?timeout=3s"),
        ] {
            m.expect_err(format!("{url} put"), &denied, async {
                let s = coordkit::connect(&url).await?;
                s.put("auth/k", b"evil".to_vec(), coordkit::PutOptions::default())
                    .await
                    .map(|_| ())
            })
            .await;
        }
        m.expect_err("no credentials: get", &denied, async {
            let s = coordkit::connect(&format!("etcd://{ep}?timeout=3s")).await?;
            s.get("auth/k", coordkit::Consistency::Strong)
                .await
                .map(|_| ())
        })
        .await;
        m.expect_ok(
            "read-back with the right credentials",
            store.get("auth/k", coordkit::Consistency::Strong),
            |e| e.as_ref().is_some_and(|e| e.value == b"v"),
        )
        .await;
        report(&m);
    }

    /// A server stopped with SIGSTOP: every call returns within the configured timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_black_holed_server() {
        let c = EtcdCluster::start(1);
        let timeout = Duration::from_secs(2);
        let store = coordkit::connect(&format!("{}?timeout=2s&connect_timeout=1s", c.url()))
            .await
            .expect("connect");
        store
            .put("bh/before", b"v".to_vec(), coordkit::PutOptions::default())
            .await
            .expect("put before the pause");
        c.members[0].pause();
        let mut m = Matrix {
            label: "etcd-black-hole".into(),
            ..Default::default()
        };
        black_hole_cases(&mut m, &store, "bh/", timeout).await;
        c.members[0].resume();
        m.expect_ok(
            "after SIGCONT the client recovers and the data is intact",
            read_back_recovering(&store, "bh/before"),
            |e| e.as_ref().is_some_and(|e| e.value == b"v"),
        )
        .await;
        report(&m);
    }
}

#[cfg(feature = "zookeeper")]
mod zookeeper {
    use super::*;
    use crate::support::zookeeper::{shared, url_options, ZkStandalone};
    use std::time::Duration;
    use support::bad_input::{black_hole_cases, unreachable_case};

    bad_input_matrix!(
        zookeeper_bad_input_matrix,
        "zookeeper",
        server: _server = (),
        url: shared().url(),
        bad_urls: [
            "zk://",
            "zk://127.0.0.1:notaport",
            "zk://127.0.0.1:99999",
            "zk://127.0.0.1:2181/bad//chroot",
            "zk://127.0.0.1:2181?session_timeout=banana",
            "zk://127.0.0.1:2181?no_such_option=1",
        ],
        unreachable: format!(
            "zk://127.0.0.1:{}?{}&connect_timeout=1s&request_timeout=2s",
            closed_port(),
            url_options()
        ),
    );

    /// A server stopped with SIGSTOP: every call returns within the configured timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn zookeeper_black_holed_server() {
        let mut zk = ZkStandalone::start();
        let timeout = Duration::from_secs(2);
        let url = format!("{}&request_timeout=2s&connect_timeout=2s", zk.url());
        let store = coordkit::connect(&url).await.expect("connect");
        store
            .put("bh/before", b"v".to_vec(), coordkit::PutOptions::default())
            .await
            .expect("put before the pause");
        zk.node().pause();
        let mut m = Matrix {
            label: "zookeeper-black-hole".into(),
            ..Default::default()
        };
        black_hole_cases(&mut m, &store, "bh/", timeout).await;
        zk.node().resume();
        m.expect_ok(
            "after SIGCONT the client recovers and the data is intact",
            read_back_recovering(&store, "bh/before"),
            |e| e.as_ref().is_some_and(|e| e.value == b"v"),
        )
        .await;
        report(&m);
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use support::bad_input::unreachable_case;

    bad_input_matrix!(
        sqlite_bad_input_matrix,
        "sqlite",
        server: dir = tempfile::tempdir().expect("temporary directory"),
        url: format!("sqlite://{}", dir.path().join("bad.db").display()),
        bad_urls: [
            "sqlite://",
            "sqlite://relative.db",
            "sqlite://host/x.db",
            "sqlite:///x.db?busy_timeout=banana",
            "sqlite:///x.db?no_such_option=1",
        ],
        // A database in a directory that does not exist.
        unreachable: format!(
            "sqlite://{}",
            dir.path().join("no/such/dir/x.db").display()
        ),
    );
}

#[cfg(feature = "file")]
mod file {
    use super::*;
    use support::bad_input::unreachable_case;

    bad_input_matrix!(
        file_bad_input_matrix,
        "file",
        server: dir = tempfile::tempdir().expect("temporary directory"),
        url: format!("file://{}", dir.path().join("store").display()),
        bad_urls: [
            "file://",
            "file://relative",
            "file://host/x",
            "file:///x?lock_timeout=banana",
            "file:///x?no_such_option=1",
        ],
        // A store whose parent directory does not exist.
        unreachable: format!("file://{}", dir.path().join("no/such/dir").display()),
    );
}

#[cfg(feature = "consul")]
mod consul {
    use super::*;
    use crate::support::consul_sim::{ConsulSim, SimOptions};
    use support::bad_input::unreachable_case;

    bad_input_matrix!(
        consul_sim_bad_input_matrix,
        "consul-sim",
        server: sim = ConsulSim::start(),
        url: sim.url(),
        bad_urls: [
            "consul://",
            "consul://127.0.0.1:notaport",
            "consul://127.0.0.1:99999",
            "consul://127.0.0.1:8500?timeout=banana",
            "consul://127.0.0.1:8500?no_such_option=1",
        ],
        unreachable: format!(
            "consul://127.0.0.1:{}?timeout=2s&connect_timeout=1s",
            closed_port()
        ),
    );

    /// With an ACL token required: a wrong or missing token gives PermissionDenied and writes
    /// nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn consul_sim_wrong_token() {
        let sim = ConsulSim::start_with(SimOptions {
            acl_token: Some("s3cret".into()),
            ..Default::default()
        })
        .expect("start simulator");
        let good = format!("{}?token=s3cret", sim.url());
        let store = coordkit::connect(&good).await.expect("connect with token");
        store
            .put("auth/k", b"v".to_vec(), coordkit::PutOptions::default())
            .await
            .expect("put with the right token");
        let mut m = Matrix {
            label: "consul-sim-auth".into(),
            ..Default::default()
        };
        let denied = [coordkit::ErrorKind::PermissionDenied];
        for url in [format!("{}?token=wrong", sim.url()), sim.url()] {
            m.expect_err(format!("{url} put"), &denied, async {
                let s = coordkit::connect(&url).await?;
                s.put("auth/k", b"evil".to_vec(), coordkit::PutOptions::default())
                    .await
                    .map(|_| ())
            })
            .await;
        }
        m.expect_ok(
            "read-back with the right token",
            store.get("auth/k", coordkit::Consistency::Strong),
            |e| e.as_ref().is_some_and(|e| e.value == b"v"),
        )
        .await;
        report(&m);
    }
}

#[cfg(all(feature = "etcd", feature = "zookeeper"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_bad_input_matrix() {
    let enc = |u: &str| -> String { url::form_urlencoded::byte_serialize(u.as_bytes()).collect() };
    let url = format!(
        "sharded+ring://?shard={}&shard={}",
        enc(&support::etcd::shared_url()),
        enc(&support::zookeeper::shared().url())
    );
    let (a, b) = two(&url).await;
    let mut m = run_matrix("sharded", a, b, "bad-sharded/").await;
    url_cases(
        &mut m,
        &[
            "sharded+ring://",
            "sharded+nosuch://?shard=memory://",
            "sharded+ring://host?shard=memory://",
            "sharded+ring://?shard=nosuch://x",
            "sharded+ring://?shard=memory://&weights=1,2,3",
        ],
    )
    .await;
    report(&m);
}

/// The embedded backends' own bad inputs, through the `coordkit` binary as separate processes:
/// a store another user cannot write, and a new store opened by several processes at once.
#[cfg(all(feature = "file", feature = "sqlite", feature = "cli"))]
mod embedded {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::process::{Command, Output};

    const BIN: &str = env!("CARGO_BIN_EXE_coordkit");

    fn urls(dir: &Path) -> [String; 2] {
        [
            format!("file://{}", dir.join("store").display()),
            format!("sqlite://{}", dir.join("store.db").display()),
        ]
    }

    fn cli(url: &str, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--url")
            .arg(url)
            .args(args)
            .output()
            .expect("run coordkit")
    }

    fn text(o: &Output) -> String {
        format!(
            "status {:?}, stdout {:?}, stderr {:?}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// Runs the CLI as a user who cannot write the store: `nobody` when this is root (who may
    /// write anything), this user after the store was made read-only otherwise.
    fn cli_without_write(dir: &Path, url: &str, args: &[&str]) -> Output {
        if unsafe { libc::geteuid() } == 0 {
            Command::new("runuser")
                .args(["-u", "nobody", "--", BIN, "--url", url])
                .args(args)
                .output()
                .expect("run coordkit through runuser")
        } else {
            for e in walk(dir) {
                let mode = if e.is_dir() { 0o555 } else { 0o444 };
                std::fs::set_permissions(&e, std::fs::Permissions::from_mode(mode)).unwrap();
            }
            let o = cli(url, args);
            for e in walk(dir) {
                let mode = if e.is_dir() { 0o755 } else { 0o644 };
                std::fs::set_permissions(&e, std::fs::Permissions::from_mode(mode)).unwrap();
            }
            o
        }
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut out = vec![dir.to_path_buf()];
        let mut i = 0;
        while i < out.len() {
            if out[i].is_dir() {
                for e in std::fs::read_dir(&out[i]).unwrap() {
                    out.push(e.unwrap().path());
                }
            }
            i += 1;
        }
        out
    }

    #[test]
    fn a_store_that_cannot_be_written_gives_permission_denied_and_keeps_its_data() {
        let tmp = tempfile::tempdir().unwrap();
        // Others may enter the temporary directory (tempfile makes it 0700).
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for url in urls(tmp.path()) {
            let o = cli(&url, &["put", "k", "kept"]);
            assert!(o.status.success(), "{url}: {}", text(&o));
            let o = cli_without_write(tmp.path(), &url, &["put", "k", "lost"]);
            assert_eq!(o.status.code(), Some(1), "{url}: {}", text(&o));
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("permission denied"),
                "{url}: {}",
                text(&o)
            );
            let o = cli(&url, &["get", "k"]);
            assert_eq!(
                String::from_utf8_lossy(&o.stdout).trim(),
                "kept",
                "{url}: {}",
                text(&o)
            );
        }
    }

    #[test]
    fn a_new_store_opened_by_several_processes_at_once_serves_them_all() {
        let tmp = tempfile::tempdir().unwrap();
        for url in urls(tmp.path()) {
            let children: Vec<_> = (0..6)
                .map(|i| {
                    Command::new(BIN)
                        .args(["--url", &url, "put", &format!("k{i}"), &format!("v{i}")])
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::piped())
                        .spawn()
                        .expect("spawn coordkit")
                })
                .collect();
            for c in children {
                let o = c.wait_with_output().unwrap();
                assert!(o.status.success(), "{url}: {}", text(&o));
            }
            let o = cli(&url, &["ls", "--long"]);
            let listing = String::from_utf8_lossy(&o.stdout);
            for i in 0..6 {
                assert!(listing.contains(&format!("k{i}\t")), "{url}: {listing}");
            }
            // Six writes, six distinct versions.
            let mut versions: Vec<&str> = listing
                .lines()
                .filter_map(|l| l.split('\t').nth(1))
                .collect();
            versions.sort_unstable();
            versions.dedup();
            assert_eq!(versions.len(), 6, "{url}: {listing}");
        }
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use crate::support::postgres::{fresh_schema, shared, PASSWORD};
    use crate::support::proxy::Proxy;
    use std::time::Duration;
    use support::bad_input::{black_hole_cases, unreachable_case};

    bad_input_matrix!(
        postgres_bad_input_matrix,
        "postgres",
        server: _server = (),
        url: shared().url(&fresh_schema("bad")),
        bad_urls: [
            "postgres://",
            "postgres://127.0.0.1:notaport/db",
            "postgres://127.0.0.1:99999/db",
            "postgres://h1:5432,h2:5432/db",
            "postgres://127.0.0.1/db?request_timeout=banana",
            "postgres://127.0.0.1/db?no_such_option=1",
            "postgres://127.0.0.1/db?schema=x%22%3B%20DROP%20TABLE%20y",
            "postgres://127.0.0.1/db?sslmode=verify-ca",
            "postgres://127.0.0.1/db?sslrootcert=/ca.pem",
            "postgresql://127.0.0.1/a/b",
        ],
        unreachable: format!(
            "postgres://postgres@127.0.0.1:{}/postgres?connect_timeout=2s",
            closed_port()
        ),
    );

    /// Wrong credentials, a missing database and a schema the role may not use give typed
    /// errors in bounded time; a black-holed server (through a stalled proxy) gives `Timeout`
    /// or `Unavailable` on every call; nothing the refused calls attempted was written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_credentials_databases_schemas_and_black_holes() {
        let pg = shared();
        let port = pg.port();
        let schema = fresh_schema("badauth");
        let store = coordkit::connect(&pg.url(&schema)).await.expect("connect");
        store
            .put("auth/k", b"v".to_vec(), coordkit::PutOptions::default())
            .await
            .expect("put");
        pg.psql(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outsider') THEN
                 CREATE ROLE outsider LOGIN PASSWORD 'outsider-pw'; END IF; END $$;",
        );
        let mut m = Matrix {
            label: "postgres-auth".into(),
            ..Default::default()
        };
        let denied = [coordkit::ErrorKind::PermissionDenied];
        for url in [
            format!("postgres://postgres:wrong@127.0.0.1:{port}/postgres?schema={schema}"),
            format!("postgres://nobody:pw@127.0.0.1:{port}/postgres?schema={schema}"),
            format!("postgres://outsider:outsider-pw@127.0.0.1:{port}/postgres?schema={schema}"),
        ] {
            m.expect_err(format!("{url} put"), &denied, async {
                let s = coordkit::connect(&url).await?;
                s.put("auth/k", b"evil".to_vec(), coordkit::PutOptions::default())
                    .await
                    .map(|_| ())
            })
            .await;
        }
        m.expect_err(
            "missing database",
            &[coordkit::ErrorKind::InvalidConfig],
            async {
                coordkit::connect(&format!(
                    "postgres://postgres:{PASSWORD}@127.0.0.1:{port}/no_such_db"
                ))
                .await
                .map(|_| ())
            },
        )
        .await;
        m.expect_ok(
            "read-back with the right credentials",
            store.get("auth/k", coordkit::Consistency::Strong),
            |e| e.as_ref().is_some_and(|e| e.value == b"v"),
        )
        .await;

        let proxy = Proxy::to_port(port);
        let through = coordkit::connect(&format!(
            "{}&request_timeout=2s&connect_timeout=2s",
            pg.url_at(proxy.port(), &schema)
        ))
        .await
        .expect("connect through the proxy");
        through
            .get("auth/k", coordkit::Consistency::Strong)
            .await
            .expect("get through the proxy");
        proxy.stall();
        black_hole_cases(&mut m, &through, "bh/", Duration::from_secs(8)).await;
        proxy.heal();
        report(&m);
    }
}
