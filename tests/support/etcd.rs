//! Real etcd servers for tests: Debian's `/usr/bin/etcd` started as plain processes on free
//! loopback ports under [`fresh_dir`](super::fresh_dir), health-checked over HTTP, and stopped
//! by PID (by `Drop`, and by the reaper if the test process dies).
//!
//! - [`shared`]: one single-node server per test binary, started on first use and left to the
//!   reaper at exit. Tests share it, so they must use their own key prefixes.
//! - [`EtcdCluster::start`]: an owned cluster of N members for fault tests (kill, restart,
//!   find the leader); dropping it kills every member.
//!
//! `url()` gives an `etcd://` URL for `coordkit::connect`, `endpoints()` the plain
//! `host:port` list (as `etcdctl --endpoints` wants it).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::server::{deref_server, log_tails, Server, Tail};
use super::{free_port, fresh_dir, wait_until};

/// The etcd server binary: `$COORDKIT_ETCD_BIN`, or Debian's (package `etcd-server`).
/// `scripts/test.sh` runs the etcd tests a second time with etcd 3.5 this way.
pub fn etcd_bin() -> String {
    std::env::var("COORDKIT_ETCD_BIN").unwrap_or_else(|_| "/usr/bin/etcd".to_string())
}

/// The etcdctl binary: `$COORDKIT_ETCDCTL_BIN`, or Debian's (package `etcd-client`).
pub fn etcdctl_bin() -> String {
    std::env::var("COORDKIT_ETCDCTL_BIN").unwrap_or_else(|_| "/usr/bin/etcdctl".to_string())
}

/// How long a start may take before the harness gives up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether etcd answers `GET /health` on `port` with `"health":"true"`.
pub fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// gRPC messages etcd on `port` has received so far, per method (its `/metrics`
/// `grpc_server_msg_received_total`: one per unary request, one per message on a stream, so a
/// watch created costs one `Watch`). Panics if the metrics cannot be read.
pub fn grpc_requests(port: u16) -> std::collections::BTreeMap<String, u64> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("metrics connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // HTTP/1.0: no chunked body.
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("metrics request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("metrics body");
    let mut out = std::collections::BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_msg_received_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let method = labels
            .split(',')
            .find_map(|l| l.strip_prefix("grpc_method=\""))
            .map(|m| m.trim_end_matches('"').to_string());
        if let (Some(m), Ok(v)) = (method, value.trim().parse::<f64>()) {
            *out.entry(m).or_insert(0) += v as u64;
        }
    }
    assert!(!out.is_empty(), "no gRPC counters in etcd's /metrics");
    out
}

/// One etcd member process. It derefs to its [`Server`] for `alive`, `kill`, `pause`,
/// `resume` and `log_tail`.
pub struct Member {
    /// The member name (`n0`, `n1`, …).
    pub name: String,
    /// Client port (gRPC + HTTP) on 127.0.0.1.
    pub client_port: u16,
    /// Peer port on 127.0.0.1.
    pub peer_port: u16,
    /// Its data directory (kept across a restart).
    pub data_dir: PathBuf,
    dir: PathBuf,
    initial_cluster: String,
    /// Extra command-line flags for this member.
    extra: Vec<String>,
    server: Server,
}

deref_server!(Member);

impl Member {
    fn new(name: &str, dir: &Path) -> Member {
        let client_port = free_port();
        Member {
            name: name.to_string(),
            client_port,
            peer_port: client_port + 1,
            data_dir: dir.join(format!("{name}.etcd")),
            dir: dir.to_path_buf(),
            initial_cluster: String::new(),
            extra: Vec::new(),
            // Logs `<name>-<start>.log`; the last 3000 bytes for failure messages.
            server: Server::new(&format!("etcd {name}"), dir, name, Tail::Bytes(3000)),
        }
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// `127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// (Re)starts the process with its data directory; does not wait until it is healthy.
    fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let mut cmd = Command::new(etcd_bin());
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(
                self.dir
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default(),
            );
        cmd.args(&self.extra);
        self.server.start(&mut cmd);
    }

    /// The member's `etcdctl endpoint status` as JSON, if it answers.
    fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(etcdctl_bin())
            .env("ETCDCTL_API", "3")
            .args(["--dial-timeout", "2s", "--command-timeout", "3s"])
            .arg("--endpoints")
            .arg(self.endpoint())
            .args(["endpoint", "status", "-w", "json"])
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }
}

/// A single etcd node or a cluster of members, owned by the test that started it.
pub struct EtcdCluster {
    /// The members, in start order.
    pub members: Vec<Member>,
    dir: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` members on free loopback ports and waits until every one is healthy.
    /// Panics (failing the test) if they are not healthy within 30 s.
    pub fn start(n: usize) -> EtcdCluster {
        Self::start_with(n, &[])
    }

    /// [`EtcdCluster::start`] with extra etcd flags on every member.
    pub fn start_with(n: usize, extra: &[&str]) -> EtcdCluster {
        assert!(n >= 1);
        assert!(
            Path::new(&etcd_bin()).exists(),
            "{} missing: install the Debian package etcd-server (scripts/test.sh does)",
            etcd_bin()
        );
        let dir = fresh_dir("etcd");
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member::new(&format!("n{i}"), &dir))
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = initial.clone();
            m.extra = extra.iter().map(|a| a.to_string()).collect();
            m.spawn();
        }
        let mut c = EtcdCluster { members, dir };
        c.wait_healthy_all();
        c
    }

    fn wait_healthy_all(&mut self) {
        let ports: Vec<u16> = self.members.iter().map(|m| m.client_port).collect();
        let ok = wait_until(START_TIMEOUT, || ports.iter().all(|p| healthy(*p)));
        if !ok {
            panic!(
                "etcd did not become healthy within {START_TIMEOUT:?}\n{}",
                log_tails(self.members.iter().map(|m| &m.server))
            );
        }
    }

    /// The client endpoints, `127.0.0.1:P1,127.0.0.1:P2,…` (every member, running or not).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.endpoint())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcd://127.0.0.1:P1,127.0.0.1:P2,…` for `coordkit::connect`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoints())
    }

    /// The index of the current leader, asked of the running members through `etcdctl endpoint
    /// status`; `None` if no running member names one.
    pub fn leader(&mut self) -> Option<usize> {
        for i in 0..self.members.len() {
            if !self.members[i].alive() {
                continue;
            }
            let Some(v) = self.members[i].status() else {
                continue;
            };
            let status = &v[0]["Status"];
            let (Some(me), Some(leader)) = (
                status["header"]["member_id"].as_u64(),
                status["leader"].as_u64(),
            ) else {
                continue;
            };
            if leader == 0 {
                continue;
            }
            if me == leader {
                return Some(i);
            }
            // Ask the leader's own status to map its ID to an index.
            for j in 0..self.members.len() {
                if j == i || !self.members[j].alive() {
                    continue;
                }
                if let Some(v) = self.members[j].status() {
                    if v[0]["Status"]["header"]["member_id"].as_u64() == Some(leader) {
                        return Some(j);
                    }
                }
            }
        }
        None
    }

    /// SIGKILL member `i`.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Restarts a killed member `i` with its data directory and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        let m = &mut self.members[i];
        m.spawn();
        let port = m.client_port;
        m.expect_ready(START_TIMEOUT, || healthy(port));
    }

    /// The directory holding data dirs and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A single etcd node shared by every test of this test binary (started on first use; the
/// reaper kills it when the test process exits).
pub fn shared() -> &'static EtcdCluster {
    static SHARED: OnceLock<EtcdCluster> = OnceLock::new();
    SHARED.get_or_init(|| EtcdCluster::start(1))
}

/// The shared single node's `etcd://` URL.
pub fn shared_url() -> String {
    shared().url()
}

/// Runs `etcdctl` (API v3) against `endpoints` with `args`; returns (success, stdout, stderr).
pub fn etcdctl(endpoints: &str, args: &[&str]) -> (bool, String, String) {
    match Command::new(etcdctl_bin())
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoints)
        .args(args)
        .output()
    {
        Ok(out) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        ),
        Err(e) => (false, String::new(), e.to_string()),
    }
}
