//! Several workers contend for one lock over several rounds of a job; exactly one runs each round.
//!
//! Each worker loops: take the lock `jobs/report` with [`DistLockExt::run_locked`], read the next
//! round number from the store, run that round (recording who ran it, with the fencing token),
//! and advance the round. The example checks the invariant — every round ran exactly once and the
//! fencing tokens strictly increase from round to round — prints a summary, and exits non-zero if
//! it is broken.
//!
//! ```text
//! cargo run --example lock_guarded_job                    # in-memory backend
//! COORDKIT_URL=etcd://127.0.0.1:2379 cargo run --features etcd --example lock_guarded_job
//! COORDKIT_URL=file:///tmp/jobs cargo run --example lock_guarded_job -- --processes
//! ```
//!
//! With `memory://` the workers share one in-process store; with any other URL each worker opens
//! its own client, as separate services would. With `--processes` each worker is a process of
//! its own (this program run again as `worker ID NAMESPACE`), which reports the rounds it ran on
//! its standard output; that needs a backend that outlives one process (not `memory://`).

use std::sync::Arc;
use std::time::Duration;

use coordkit::{connect, Backend, Consistency, DistLockExt, Expect, LockOptions, PutOptions};

const WORKERS: usize = 4;
const ROUNDS: u64 = 8;
const LOCK: &str = "jobs/report";

fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("example-{}-{nanos}", std::process::id())
}

/// One worker: runs rounds until all are done. Returns the rounds it ran as (round, token).
async fn worker(
    id: usize,
    store: Arc<dyn Backend>,
    ns: String,
) -> coordkit::Result<Vec<(u64, u64)>> {
    let mut ran = Vec::new();
    let opts = LockOptions::new()
        .ttl(Duration::from_secs(15))
        .wait(Duration::from_secs(60));
    let lock = format!("{ns}/{LOCK}");
    loop {
        let store2 = store.clone();
        let ns2 = ns.clone();
        let outcome = store
            .run_locked(&lock, &opts, move |ctx| async move {
                let next_key = format!("{ns2}/next-round");
                let next = match store2.get(&next_key, Consistency::Strong).await? {
                    Some(e) => parse_u64(&e.value)?,
                    None => 0,
                };
                if next >= ROUNDS {
                    return Ok(None);
                }
                // The job itself: a little work, then the record of this run. The record is a
                // create-if-absent, so a second run of the same round would be caught.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let record = format!("{ns2}/runs/{next:04}");
                let body = format!("{id} {}", ctx.token());
                store2
                    .compare_and_swap(&record, Expect::Absent, Some(body.into_bytes()))
                    .await?;
                store2
                    .put(
                        &next_key,
                        (next + 1).to_string().into_bytes(),
                        PutOptions::default(),
                    )
                    .await?;
                println!(
                    "round {next}: worker {id} ran it with fencing token {}",
                    ctx.token()
                );
                Ok::<_, coordkit::Error>(Some((next, ctx.token().get())))
            })
            .await??;
        match outcome {
            Some(round) => ran.push(round),
            None => return Ok(ran),
        }
        // Give the others a chance, as independent services would.
        tokio::task::yield_now().await;
    }
}

fn parse_u64(bytes: &[u8]) -> coordkit::Result<u64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            coordkit::Error::new(
                coordkit::ErrorKind::Backend,
                "example",
                "corrupt round counter",
            )
        })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [cmd, id, ns] = args.as_slice() {
        if cmd == "worker" {
            std::process::exit(worker_process(id, ns).await);
        }
    }
    let processes = args.iter().any(|a| a == "--processes");
    match run(processes).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

fn url() -> String {
    std::env::var("COORDKIT_URL").unwrap_or_else(|_| "memory://".to_string())
}

/// A worker process: runs rounds, prints `ran ROUND TOKEN` for each, exits 0 (or 2 on error).
async fn worker_process(id: &str, ns: &str) -> i32 {
    let id: usize = id.parse().unwrap_or(usize::MAX);
    let result = async {
        let store = connect(&url()).await?;
        worker(id, store, ns.to_string()).await
    }
    .await;
    match result {
        Ok(ran) => {
            for (round, token) in ran {
                println!("ran {round} {token}");
            }
            0
        }
        Err(e) => {
            eprintln!("worker {id}: error: {e}");
            2
        }
    }
}

/// Runs the workers as processes of their own and gathers the rounds they ran.
async fn run_processes(ns: &str) -> coordkit::Result<Option<Vec<(u64, u64)>>> {
    let exe = std::env::current_exe().map_err(|e| {
        coordkit::Error::new(coordkit::ErrorKind::Backend, "example", e.to_string())
    })?;
    let children: Vec<_> = (0..WORKERS)
        .map(|id| {
            tokio::process::Command::new(&exe)
                .args(["worker", &id.to_string(), ns])
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
        })
        .collect::<std::io::Result<_>>()
        .map_err(|e| {
            coordkit::Error::new(coordkit::ErrorKind::Backend, "example", e.to_string())
        })?;
    let mut runs = Vec::new();
    for child in children {
        let out = child.wait_with_output().await.map_err(|e| {
            coordkit::Error::new(coordkit::ErrorKind::Backend, "example", e.to_string())
        })?;
        if !out.status.success() {
            eprintln!("a worker process failed: {}", out.status);
            return Ok(None);
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(rest) = line.strip_prefix("ran ") else {
                // The worker's own progress lines.
                println!("{line}");
                continue;
            };
            let mut f = rest.split(' ').map(|x| x.parse::<u64>());
            if let (Some(Ok(round)), Some(Ok(token))) = (f.next(), f.next()) {
                runs.push((round, token));
            }
        }
    }
    Ok(Some(runs))
}

async fn run(processes: bool) -> coordkit::Result<bool> {
    let url = url();
    let shared = url.trim().starts_with("memory:");
    if processes && shared {
        eprintln!("error: --processes needs a backend that outlives one process, not memory://");
        return Ok(false);
    }
    let first = connect(&url).await?;
    let ns = run_id();
    println!(
        "{WORKERS} workers{}, {ROUNDS} rounds, lock {LOCK:?} on {} backend",
        if processes { " (one process each)" } else { "" },
        first.capabilities().backend
    );
    let mut runs: Vec<(u64, u64)> = Vec::new();
    if processes {
        match run_processes(&ns).await? {
            Some(r) => runs = r,
            None => return Ok(false),
        }
    }
    let mut tasks = Vec::new();
    for id in (0..WORKERS).filter(|_| !processes) {
        let store = if shared || id == 0 {
            first.clone()
        } else {
            connect(&url).await?
        };
        tasks.push(tokio::spawn(worker(id, store, ns.clone())));
    }
    for t in tasks {
        match t.await {
            Ok(Ok(ran)) => runs.extend(ran),
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                eprintln!("a worker panicked: {e}");
                return Ok(false);
            }
        }
    }
    runs.sort();
    let rounds: Vec<u64> = runs.iter().map(|r| r.0).collect();
    let once = rounds == (0..ROUNDS).collect::<Vec<_>>();
    let increasing = runs.windows(2).all(|w| w[0].1 < w[1].1);
    // Clean up what the example stored.
    for e in first.list(&format!("{ns}/"), Consistency::Strong).await? {
        first.delete(&e.key).await?;
    }
    let (lo, hi) = (runs.first().map(|r| r.1), runs.last().map(|r| r.1));
    if once && increasing {
        println!(
            "summary: {ROUNDS} rounds by {WORKERS} workers, each round ran exactly once, \
             fencing tokens strictly increasing ({} .. {})",
            lo.unwrap_or(0),
            hi.unwrap_or(0)
        );
        Ok(true)
    } else {
        println!(
            "summary: INVARIANT BROKEN: rounds run {rounds:?} (want each of 0..{ROUNDS} once), \
             tokens strictly increasing: {increasing}"
        );
        Ok(false)
    }
}
