//! Test support: real servers started as plain processes on free loopback ports, and cleaned up
//! even when a test fails or the test process dies.
//!
//! Every server is started under one base directory per test process
//! (`$TMPDIR/coordkit-test-<pid>/`), its PID recorded there. A small reaper process (one per
//! test process) waits for the test process to exit, however it exits, then kills exactly the
//! recorded PIDs that still run from that directory and removes the directory. Servers are
//! never killed by name.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod bad_input;
pub mod consul_sim;
pub mod contention;
pub mod etcd;
pub mod fenced;
pub mod linearizability;
pub mod postgres;
pub mod proxy;
pub mod server;
pub mod zookeeper;

static BASE: OnceLock<PathBuf> = OnceLock::new();
static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();

/// The per-process base directory; starts the reaper on first use.
// The reaper outlives this process on purpose: it is never waited for.
#[allow(clippy::zombie_processes)]
pub fn base_dir() -> &'static Path {
    BASE.get_or_init(|| {
        let me = std::process::id();
        let dir = std::env::temp_dir().join(format!("coordkit-test-{me}"));
        std::fs::create_dir_all(&dir).expect("create test base dir");
        let registry = dir.join("pids");
        std::fs::write(&registry, b"").expect("create pid registry");
        // The reaper: when this process is gone, kill the PIDs it recorded (only those whose
        // command line still names the base dir, against PID reuse) and remove the dir.
        let script = format!(
            r#"while kill -0 {me} 2>/dev/null; do sleep 0.5; done
for p in $(cat '{reg}' 2>/dev/null); do
  if tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | grep -qF '{dir}'; then kill -9 $p 2>/dev/null; fi
done
rm -rf '{dir}'"#,
            reg = registry.display(),
            dir = dir.display()
        );
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start reaper");
        dir
    })
}

/// A fresh directory under the base dir.
pub fn fresh_dir(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = base_dir().join(format!("{name}-{n}"));
    std::fs::create_dir_all(&dir).expect("create server dir");
    dir
}

/// A loopback port that was free a moment ago and has not been handed out by this process,
/// with the port after it free too (etcd puts its peer port there).
///
/// Ports come from 20000–32699, below Linux's ephemeral range (32768–60999): a server restarted
/// on its old port must not find it taken by some client's outgoing connection, whose local
/// port the kernel picks from the ephemeral range.
pub fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_700;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let used = PORTS.get_or_init(|| Mutex::new(HashSet::new()));
    let seed = std::process::id().wrapping_mul(7919) % SPAN;
    loop {
        let n = NEXT.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        let port = (LOW + (seed + n) % SPAN) as u16;
        let mut used = used.lock().unwrap_or_else(|p| p.into_inner());
        if used.contains(&port) || used.contains(&(port + 1)) {
            continue;
        }
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 1) {
            used.insert(port);
            used.insert(port + 1);
            return port;
        }
    }
}

/// Whether something accepts TCP connections on the loopback port.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// Polls `f` every 50 ms until it is true or `timeout` passes; whether it became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Waits until `deadline` for `child` to exit and returns its status. If it is still running
/// then, kills it (SIGKILL, through its own handle, so by its PID), reaps it and returns `None`.
pub fn wait_child(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => break,
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// [`wait_child`], then what the child wrote to its piped stdout and stderr. `Err` gives back
/// the child, killed and reaped, when it ran past `deadline` (its pipes not read, which could
/// block on processes it left behind; `wait_with_output` reads them).
pub fn wait_child_output(mut child: Child, deadline: Instant) -> Result<Output, Child> {
    match wait_child(&mut child, deadline) {
        Some(_) => Ok(child.wait_with_output().expect("collect output")),
        None => Err(child),
    }
}

/// A server process this test process started. Dropping it kills it (by PID).
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `cmd` (whose command line must name a path under [`base_dir`], such as its data
    /// directory, so the reaper can recognise it), with output to `<log>`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Proc {
        let out = std::fs::File::create(log).expect("create log");
        let err = out.try_clone().expect("clone log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut reg = std::fs::OpenOptions::new()
            .append(true)
            .open(base_dir().join("pids"))
            .expect("open pid registry");
        writeln!(reg, "{}", child.id()).expect("record pid");
        Proc {
            name: name.to_string(),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a PID this process started and has not yet reaped.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if self.alive() {
            self.signal(libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// SIGINT: asks the process to stop (as Ctrl-C would).
    pub fn interrupt(&self) {
        self.signal(libc::SIGINT);
    }

    /// SIGSTOP: the process stops answering (a black hole). Returns once every thread of it
    /// has stopped (the signal takes effect asynchronously; a request sent meanwhile could
    /// still be answered), or after a second.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
        let tasks = PathBuf::from(format!("/proc/{}/task", self.child.id()));
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until && !all_stopped(&tasks) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }
}

/// Whether every thread under `/proc/PID/task` is stopped (state `T`, or `t` when traced).
fn all_stopped(tasks: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(tasks) else {
        return true; // gone
    };
    entries.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).map_or(true, |stat| {
            // The state follows the parenthesized command name.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|st| st == "T" || st == "t")
        })
    })
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}
