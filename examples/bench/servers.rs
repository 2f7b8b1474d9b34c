//! The servers a benchmark run starts for itself: plain processes on free loopback ports,
//! killed by PID when dropped, and by the test-support reaper if this process dies.

use std::process::Command;
use std::time::Duration;

use crate::harness::{err, R};
use crate::support::{free_port, fresh_dir, wait_until, Proc};

/// A standalone ZooKeeper server from the Debian package.
pub struct Zk {
    pub port: u16,
    _proc: Proc,
}

impl Zk {
    pub fn start() -> R<Zk> {
        let jar = "/usr/share/java/zookeeper.jar";
        if !std::path::Path::new(jar).exists() {
            return Err(err(format!(
                "{jar} missing: install the Debian package zookeeper"
            )));
        }
        let dir = fresh_dir("zk");
        let port = free_port();
        let cfg = dir.join("zoo.cfg");
        std::fs::write(
            &cfg,
            format!(
                "tickTime=2000\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
                 admin.enableServer=false\n4lw.commands.whitelist=*\nmaxClientCnxns=0\n",
                dir.join("data").display()
            ),
        )?;
        let mut cmd = Command::new("java");
        cmd.arg("-Xmx256m")
            .arg("-cp")
            .arg(format!("{jar}:/usr/share/java/slf4j-simple.jar"))
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&cfg);
        let proc = Proc::spawn("zookeeper", &mut cmd, &dir.join("zk.log"));
        let ok = wait_until(Duration::from_secs(30), || {
            srvr(port).contains("Mode: standalone")
        });
        if !ok {
            return Err(err("ZooKeeper did not start serving within 30 s"));
        }
        Ok(Zk { port, _proc: proc })
    }
}

/// The `srvr` four-letter word's answer, or "" when the server does not answer.
pub fn srvr(port: u16) -> String {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"srvr").is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}
