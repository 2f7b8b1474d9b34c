//! Peer libraries from PyPI (kazoo, tooz) run on the same servers in the same run, in a venv
//! under the target directory. Skipped, with a notice, when Python or the packages are missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{err, R};
use crate::report::Row;
use crate::stats::Series;

const SCRIPT: &str = include_str!("peers.py");
const PACKAGES: &[&str] = &["kazoo", "tooz", "etcd3gw", "filelock", "psycopg[binary]"];

/// A ready venv's python, or why there is none.
pub fn prepare(venv: &Path) -> Result<PathBuf, String> {
    let python = venv.join("bin/python");
    let ready = venv.join(".coordkit-bench-ready");
    let wanted = PACKAGES.join(" ");
    if python.exists() && std::fs::read_to_string(&ready).is_ok_and(|r| r == wanted) {
        return Ok(python);
    }
    eprintln!(
        "peers: creating a Python venv at {} and installing {:?} from PyPI",
        venv.display(),
        PACKAGES
    );
    let ok = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(venv)
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err("`python3 -m venv` failed (on Debian: apt-get install python3-venv)".into());
    }
    let ok = run_with_timeout(
        Command::new(venv.join("bin/pip"))
            .arg("install")
            .arg("-q")
            .args(PACKAGES)
            .stdout(Stdio::null()),
        Duration::from_secs(600),
    )
    .map(|(ok, _)| ok)
    .unwrap_or(false);
    if !ok {
        return Err(format!(
            "pip install {} failed (is PyPI reachable?)",
            PACKAGES.join(" ")
        ));
    }
    let _ = std::fs::write(&ready, wanted);
    Ok(python)
}

/// Runs a command to completion or kills it (by its PID) after `limit`; (success, stdout).
fn run_with_timeout(cmd: &mut Command, limit: Duration) -> R<(bool, String)> {
    let out_file = tempfile::NamedTempFile::new()?;
    let mut child = cmd.stdout(out_file.reopen()?).spawn()?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let out = std::fs::read_to_string(out_file.path())?;
            return Ok((status.success(), out));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err(format!("timed out after {limit:?}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What one peer run gave: rows for the single-client table and the handoff row.
pub struct PeerResult {
    pub rows: Vec<Row>,
    pub handoff: Option<Row>,
}

fn series(v: &serde_json::Value) -> Series {
    let lat_us = v["lat_us"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    Series {
        lat_us,
        busy: Duration::from_secs_f64(v["busy_s"].as_f64().unwrap_or(0.0).max(0.0)),
        ops: v["ops"].as_u64().unwrap_or(0),
    }
}

/// Runs one peer (`kazoo`, `tooz-zk`, `tooz-etcd`) against `addr` (`host:port`).
pub fn run(
    python: &Path,
    work: &Path,
    mode: &str,
    label: &str,
    addr: &str,
    counts: (usize, usize, usize, usize),
) -> R<PeerResult> {
    let script = work.join("peers.py");
    std::fs::write(&script, SCRIPT)?;
    let (n_kv, n_lock, rounds, contenders) = counts;
    let (ok, out) = run_with_timeout(
        Command::new(python)
            .arg(&script)
            .arg(mode)
            .arg(addr)
            .arg(n_kv.to_string())
            .arg(n_lock.to_string())
            .arg(rounds.to_string())
            .arg(contenders.to_string())
            .stderr(Stdio::inherit()),
        Duration::from_secs(900),
    )?;
    if !ok {
        return Err(err(format!("{mode} exited with an error")));
    }
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or(""))?;
    let rows = v["rows"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| Row::new(r["op"].as_str().unwrap_or("?"), label, series(r)))
                .collect()
        })
        .unwrap_or_default();
    let handoff = v
        .get("handoff")
        .map(|h| Row::new("handoff", label, series(h)));
    Ok(PeerResult { rows, handoff })
}
