//! ZooKeeper test servers: Debian's `zookeeper` (3.8) started as plain java processes on free
//! loopback ports.
//!
//! - [`shared`]: one standalone server per test binary, started on first use and killed by the
//!   reaper when the test process exits.
//! - [`ZkEnsemble::start`]: an owned 3-node ensemble for fault tests; dropping it kills its nodes
//!   (by PID).
//!
//! Every server runs with `tickTime=500` (so the smallest session timeout is 1 s), a maximum
//! session timeout of 60 s, TTL nodes enabled (`zookeeper.extendedTypesEnabled=true`) and the
//! container/TTL reaper running every 500 ms (`znode.container.checkIntervalMs`). Readiness is
//! the `srvr` four-letter word showing a `Mode:` line (not `ruok`, which answers before the
//! server can serve). [`url`](ZkStandalone::url) gives a `zk://` URL for `coordkit::connect`
//! whose options match these settings.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::server::{deref_server, log_tails, Server, Tail};
use super::{free_port, fresh_dir};

/// The classpath of the Debian package (the jar's manifest pulls in the rest) plus a logger.
pub const CLASSPATH: &str = "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar";
/// The server's tick; sessions may be 2 to 120 ticks long (min/maxSessionTimeout below).
pub const TICK_MS: u64 = 500;
/// How often the server reaps expired TTL nodes and empty containers.
pub const REAP_INTERVAL_MS: u64 = 500;
/// How long a start may take before the harness gives up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `zk://` URL query that matches the servers started here: the server's smallest session
/// timeout (2 ticks) and TTL reaping interval, so the backend declares honest limits.
pub fn url_options() -> String {
    format!(
        "min_session_timeout={}ms&ttl_reap_interval={}ms&connect_timeout=5s",
        2 * TICK_MS,
        REAP_INTERVAL_MS
    )
}

/// Whether ZooKeeper is installed (`scripts/test.sh` installs it).
pub fn installed() -> bool {
    Path::new("/usr/share/java/zookeeper.jar").exists()
}

/// Sends a four-letter word to `127.0.0.1:port` and returns the answer (empty on failure).
pub fn four_letter(port: u16, word: &str) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1000)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(1000)));
    if s.write_all(word.as_bytes()).is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The server's mode from `srvr` (`standalone`, `leader`, `follower`), if it is serving.
pub fn mode(port: u16) -> Option<String> {
    let out = four_letter(port, "srvr");
    out.lines()
        .find_map(|l| l.strip_prefix("Mode: "))
        .map(|m| m.trim().to_string())
}

/// One ZooKeeper server process and how to restart it. It derefs to its [`Server`] for
/// `alive`, `kill`, `pause`, `resume` and `log_tail`.
pub struct ZkNode {
    /// The server id (`myid`), 1-based; 0 for a standalone server.
    pub id: u32,
    /// The client port on 127.0.0.1.
    pub port: u16,
    cfg: PathBuf,
    /// `znode.container.checkIntervalMs`.
    reap_ms: u64,
    server: Server,
}

deref_server!(ZkNode);

impl ZkNode {
    /// A node not yet started, configured by `cfg`, logging to `dir/server-<start>.log`.
    fn new(id: u32, port: u16, dir: &Path, cfg: PathBuf, reap_ms: u64) -> ZkNode {
        ZkNode {
            id,
            port,
            cfg,
            reap_ms,
            // The last 30 lines of the log for failure messages.
            server: Server::new(&format!("zookeeper-{id}"), dir, "server", Tail::Lines(30)),
        }
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("java");
        cmd.arg("-Xmx256m")
            .arg("-XX:+UseSerialGC")
            .arg("-Dzookeeper.extendedTypesEnabled=true")
            .arg(format!(
                "-Dznode.container.checkIntervalMs={}",
                self.reap_ms
            ))
            .arg("-Dzookeeper.admin.enableServer=false")
            .arg("-cp")
            .arg(CLASSPATH)
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&self.cfg);
        self.server.start(&mut cmd);
    }

    /// Kills the process (SIGKILL, if it runs) and starts it again with the same data
    /// directory and port; does not wait until it serves (see [`ZkNode::mode`]).
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// The `srvr` mode, if serving.
    pub fn mode(&self) -> Option<String> {
        mode(self.port)
    }
}

fn write_config(dir: &Path, port: u16, id: u32, peers: &[(u32, u16)]) -> PathBuf {
    write_config_with(dir, port, id, peers, 2 * TICK_MS)
}

fn write_config_with(
    dir: &Path,
    port: u16,
    id: u32,
    peers: &[(u32, u16)],
    min_session_ms: u64,
) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("create data dir");
    let mut cfg = format!(
        "tickTime={TICK_MS}\nminSessionTimeout={min_session_ms}\nmaxSessionTimeout=60000\n\
         dataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\nadmin.enableServer=false\n\
         4lw.commands.whitelist=*\nmaxClientCnxns=0\n",
        data.display()
    );
    if !peers.is_empty() {
        cfg.push_str("initLimit=20\nsyncLimit=10\ncnxTimeout=500\n");
        for (pid, quorum) in peers {
            cfg.push_str(&format!("server.{pid}=127.0.0.1:{quorum}:{}\n", quorum + 1));
        }
        std::fs::write(data.join("myid"), format!("{id}\n")).expect("write myid");
    }
    let path = dir.join("zoo.cfg");
    std::fs::write(&path, cfg).expect("write zoo.cfg");
    path
}

/// A standalone server.
pub struct ZkStandalone {
    node: ZkNode,
}

impl ZkStandalone {
    /// Starts a standalone server and waits until it serves.
    pub fn start() -> ZkStandalone {
        Self::start_with(Duration::from_millis(2 * TICK_MS), REAP_INTERVAL_MS)
    }

    /// Starts a standalone server whose `minSessionTimeout` is `min` (the URL options still
    /// declare the default of 2 ticks), and waits until it serves.
    pub fn start_with_min_session(min: Duration) -> ZkStandalone {
        Self::start_with(min, REAP_INTERVAL_MS)
    }

    /// Starts a standalone server that reaps expired TTL nodes and empty containers every
    /// `reap_ms` (ZooKeeper's default is 60000), and waits until it serves.
    pub fn start_with_reap_interval(reap_ms: u64) -> ZkStandalone {
        Self::start_with(Duration::from_millis(2 * TICK_MS), reap_ms)
    }

    /// Starts a standalone server with `minSessionTimeout` `min` and reap interval `reap_ms`.
    pub fn start_with(min: Duration, reap_ms: u64) -> ZkStandalone {
        let dir = fresh_dir("zk-standalone");
        let port = free_port();
        let cfg = write_config_with(&dir, port, 0, &[], min.as_millis() as u64);
        let mut node = ZkNode::new(0, port, &dir, cfg, reap_ms);
        node.spawn();
        node.expect_ready(START_TIMEOUT, || {
            mode(port).as_deref() == Some("standalone")
        });
        ZkStandalone { node }
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// `zk://127.0.0.1:PORT?…` for `coordkit::connect`.
    pub fn url(&self) -> String {
        format!("zk://127.0.0.1:{}?{}", self.node.port, url_options())
    }

    /// The same, with a chroot (`/app` style).
    pub fn url_with_chroot(&self, chroot: &str) -> String {
        format!(
            "zk://127.0.0.1:{}{chroot}?{}",
            self.node.port,
            url_options()
        )
    }

    /// The server process.
    pub fn node(&mut self) -> &mut ZkNode {
        &mut self.node
    }
}

/// The standalone server shared by every test of this test binary (killed by the reaper at exit).
pub fn shared() -> &'static ZkStandalone {
    static SHARED: OnceLock<ZkStandalone> = OnceLock::new();
    SHARED.get_or_init(ZkStandalone::start)
}

/// An owned ensemble; dropping it kills every node.
pub struct ZkEnsemble {
    /// The nodes, by index (node `i` has `myid` `i + 1`).
    pub nodes: Vec<ZkNode>,
}

impl ZkEnsemble {
    /// Starts `n` nodes and waits until all serve (one leader).
    pub fn start(n: usize) -> ZkEnsemble {
        let base = fresh_dir("zk-ensemble");
        let peers: Vec<(u32, u16)> = (1..=n as u32).map(|id| (id, free_port())).collect();
        let mut nodes = Vec::new();
        for (id, _) in &peers {
            let dir = base.join(format!("node{id}"));
            std::fs::create_dir_all(&dir).expect("create node dir");
            let port = free_port();
            let cfg = write_config(&dir, port, *id, &peers);
            nodes.push(ZkNode::new(*id, port, &dir, cfg, REAP_INTERVAL_MS));
        }
        for node in &mut nodes {
            node.spawn();
        }
        let mut ens = ZkEnsemble { nodes };
        if !ens.wait_serving(START_TIMEOUT) {
            panic!(
                "ZooKeeper ensemble did not start within {START_TIMEOUT:?}:\n{}",
                log_tails(ens.nodes.iter().map(|n| &n.server))
            );
        }
        ens
    }

    /// Waits until every running node serves and one is the leader; whether that happened.
    pub fn wait_serving(&mut self, timeout: Duration) -> bool {
        let started = Instant::now();
        loop {
            let mut leaders = 0;
            let mut all = true;
            for node in &mut self.nodes {
                if !node.alive() {
                    continue;
                }
                match node.mode().as_deref() {
                    Some("leader") => leaders += 1,
                    Some("follower") => {}
                    _ => all = false,
                }
            }
            if all && leaders == 1 {
                return true;
            }
            if started.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The index of the current leader, if any.
    pub fn leader(&self) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.mode().as_deref() == Some("leader"))
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again with its data.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
    }

    /// The connect string `127.0.0.1:P1,127.0.0.1:P2,…`.
    pub fn hosts(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `zk://host:port,…?…` for `coordkit::connect`.
    pub fn url(&self) -> String {
        format!("zk://{}?{}", self.hosts(), url_options())
    }
}

impl Drop for ZkEnsemble {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

/// This process's TCP connections to `127.0.0.1:port`: how many there are, and how many of them
/// have `TCP_NODELAY` set. With `set`, sets it on each first (what the benchmark does for the
/// raw client, whose crate offers no setting for it).
pub fn nodelay_connections(port: u16, set: bool) -> (usize, usize) {
    let mut total = 0;
    let mut on = 0;
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return (0, 0);
    };
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: socket calls on a descriptor number with buffers of the sizes given; a
        // descriptor closed meanwhile makes them fail (EBADF), and nothing else is touched.
        unsafe {
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let peer = &mut sa as *mut libc::sockaddr_in as *mut libc::sockaddr;
            if libc::getpeername(fd, peer, &mut len) != 0
                || i32::from(sa.sin_family) != libc::AF_INET
                || u16::from_be(sa.sin_port) != port
            {
                continue;
            }
            let one: libc::c_int = 1;
            let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            if set {
                let value = &one as *const libc::c_int as *const libc::c_void;
                libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, value, size);
            }
            let mut value: libc::c_int = 0;
            let mut value_len = size;
            let out = &mut value as *mut libc::c_int as *mut libc::c_void;
            if libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                out,
                &mut value_len,
            ) == 0
            {
                total += 1;
                if value != 0 {
                    on += 1;
                }
            }
        }
    }
    (total, on)
}
