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
//! ```
//!
//! With `memory://` the workers share one in-process store; with any other URL each worker opens
//! its own client, as separate services would.

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
    match run().await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

async fn run() -> coordkit::Result<bool> {
    let url = std::env::var("COORDKIT_URL").unwrap_or_else(|_| "memory://".to_string());
    let shared = url.trim().starts_with("memory:");
    let first = connect(&url).await?;
    let ns = run_id();
    println!(
        "{WORKERS} workers, {ROUNDS} rounds, lock {LOCK:?} on {} backend",
        first.capabilities().backend
    );
    let mut tasks = Vec::new();
    for id in 0..WORKERS {
        let store = if shared || id == 0 {
            first.clone()
        } else {
            connect(&url).await?
        };
        tasks.push(tokio::spawn(worker(id, store, ns.clone())));
    }
    let mut runs: Vec<(u64, u64)> = Vec::new();
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
