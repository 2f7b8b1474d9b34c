//! Memory: a separate client process that connects, holds 1,000 locks and watches 1,000 keys,
//! then reports its peak resident set size (`VmHWM`).

use std::process::{Command, Stdio};
use std::time::Duration;

use coordkit::{LockOptions, PutOptions, WatchEvent};
use futures::StreamExt;

use crate::harness::{err, R};

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The child side: prints `RSS <connected_kb> <peak_kb> <current_kb>`.
pub async fn child(url: &str, locks: usize, watches: usize) -> R<()> {
    let store = coordkit::connect(url).await?;
    store
        .put("rss/probe", b"x".to_vec(), PutOptions::default())
        .await?;
    let connected = status_kb("VmHWM:");
    let mut guards = Vec::with_capacity(locks);
    for i in 0..locks {
        let g = store
            .try_lock(&format!("rss/lock-{i:05}"), &LockOptions::new())
            .await?
            .ok_or_else(|| err(format!("rss/lock-{i:05} is held by someone else")))?;
        guards.push(g);
    }
    let mut streams = Vec::with_capacity(watches);
    for i in 0..watches {
        streams.push(store.watch(&format!("rss/keys/{i:05}/")).await?);
    }
    // The watches are live: a write under the last one arrives on it.
    if let Some(last) = streams.last_mut() {
        let key = format!("rss/keys/{:05}/k", watches - 1);
        store
            .put(&key, b"x".to_vec(), PutOptions::default())
            .await?;
        match tokio::time::timeout(Duration::from_secs(15), last.next()).await {
            Ok(Some(Ok(WatchEvent::Put(e)))) if e.key == key => {}
            other => {
                return Err(err(format!(
                    "watch did not deliver the probe write: {other:?}"
                )))
            }
        }
    }
    // Let keep-alives and watch traffic run for a while before reading the peak.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if guards.iter().any(|g| g.is_lost()) {
        return Err(err("a lock was lost while held"));
    }
    println!(
        "RSS {connected} {} {}",
        status_kb("VmHWM:"),
        status_kb("VmRSS:")
    );
    for g in guards {
        let _ = g.release().await;
    }
    Ok(())
}

/// The parent side: runs the child and parses its line; (connected_kb, peak_kb, current_kb).
pub fn measure(url: &str, locks: usize, watches: usize) -> R<(u64, u64, u64)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("--rss-child")
        .arg(url)
        .arg(locks.to_string())
        .arg(watches.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err(format!("memory child {pid} timed out")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RSS "))
        .ok_or_else(|| err(format!("memory child failed ({}): {text}", out.status)))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    match v[..] {
        [a, b, c] => Ok((a, b, c)),
        _ => Err(err(format!("bad memory child line {line:?}"))),
    }
}
