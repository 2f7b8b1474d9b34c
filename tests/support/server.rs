//! One server process as the etcd and ZooKeeper harnesses run it: started from a command line
//! its backend builds, with its output to a log file numbered per start (`<stem>-0.log`,
//! `<stem>-1.log`, … in its directory), its PID registered with the reaper (through
//! [`Proc`]), and killed, paused (SIGSTOP), resumed (SIGCONT) or started again by PID.
//!
//! The backends keep what differs: the command line, the configuration files and the probe
//! that tells when the server serves ([`Server::expect_ready`] polls it).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::Proc;

/// How much of the current log [`Server::log_tail`] gives.
#[derive(Clone, Copy, Debug)]
pub enum Tail {
    /// The last `n` bytes (from a character boundary).
    Bytes(usize),
    /// The last `n` lines.
    Lines(usize),
}

/// A restartable server process. Dropping it kills the running process (by PID, through its
/// [`Proc`]).
pub struct Server {
    /// Names the process in messages (`etcd n0`, `zookeeper-1`).
    label: String,
    /// Where the logs go.
    dir: PathBuf,
    /// The log file names' stem.
    stem: String,
    tail: Tail,
    /// How many times the process was started.
    starts: u32,
    proc: Option<Proc>,
}

impl Server {
    /// A server not yet started, logging to `dir/<stem>-<start>.log`.
    pub fn new(label: &str, dir: &Path, stem: &str, tail: Tail) -> Server {
        Server {
            label: label.to_string(),
            dir: dir.to_path_buf(),
            stem: stem.to_string(),
            tail,
            starts: 0,
            proc: None,
        }
    }

    /// The label given to [`Server::new`].
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Kills the running process, if any, then starts `cmd` (whose command line must name a
    /// path under [`base_dir`](super::base_dir), as [`Proc::spawn`] requires) with output to a
    /// new log file. Does not wait until it serves (see [`Server::expect_ready`]).
    pub fn start(&mut self, cmd: &mut Command) {
        self.kill();
        let log = self.log_path(self.starts);
        self.starts += 1;
        self.proc = Some(Proc::spawn(&self.label, cmd, &log));
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.join(format!("{}-{start}.log", self.stem))
    }

    /// The log of the latest start.
    pub fn log(&self) -> PathBuf {
        self.log_path(self.starts.saturating_sub(1))
    }

    /// The PID of the running process, if one was started and not killed.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Whether the process runs.
    pub fn alive(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.alive())
    }

    /// SIGKILL (by PID), then reap. Nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGSTOP: the server stops answering without closing its connections.
    pub fn pause(&self) {
        if let Some(p) = &self.proc {
            p.pause();
        }
    }

    /// SIGCONT.
    pub fn resume(&self) {
        if let Some(p) = &self.proc {
            p.resume();
        }
    }

    /// The end of the latest log (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        match self.tail {
            Tail::Bytes(n) => {
                let mut start = text.len().saturating_sub(n);
                while !text.is_char_boundary(start) {
                    start += 1;
                }
                text[start..].to_string()
            }
            Tail::Lines(n) => {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n")
            }
        }
    }

    /// Polls `ready` every 50 ms until it is true; whether it became true before `timeout`
    /// passed or the process exited.
    pub fn wait_ready(&mut self, timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
        let started = Instant::now();
        loop {
            if ready() {
                return true;
            }
            if !self.alive() || started.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`Server::wait_ready`], panicking (failing the test) with the log's tail if the server
    /// does not become ready.
    pub fn expect_ready(&mut self, timeout: Duration, ready: impl FnMut() -> bool) {
        if !self.wait_ready(timeout, ready) {
            let state = if self.alive() { "runs" } else { "exited" };
            panic!(
                "{} not ready within {timeout:?} (the process {state}; log {})\n{}",
                self.label,
                self.log().display(),
                self.log_tail()
            );
        }
    }
}

/// `Deref`/`DerefMut` from a backend's node type (with a field `server: Server`) to its
/// [`Server`], so the node answers `alive`, `kill`, `pause`, `resume` and `log_tail` itself.
macro_rules! deref_server {
    ($node:ty) => {
        impl std::ops::Deref for $node {
            type Target = $crate::support::server::Server;
            fn deref(&self) -> &Self::Target {
                &self.server
            }
        }

        impl std::ops::DerefMut for $node {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.server
            }
        }
    };
}
pub(crate) use deref_server;

/// The log tails of `servers`, each under a `--- label ---` line (for failure messages).
pub fn log_tails<'a>(servers: impl IntoIterator<Item = &'a Server>) -> String {
    servers
        .into_iter()
        .map(|s| format!("--- {} ---\n{}", s.label, s.log_tail()))
        .collect::<Vec<_>>()
        .join("\n")
}
