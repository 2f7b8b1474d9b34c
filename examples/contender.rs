//! A lock contender: one OS process that takes a coordkit lock many times and, under it, does a
//! non-atomic read-modify-write of a shared counter held by a fencing-checking resource.
//!
//! The reliability tests start several of these against one backend (and inject faults: SIGKILL,
//! SIGSTOP, killed cluster leaders), then check the resource's record: no two holders inside at
//! once, no lost update, tokens strictly increasing in critical-section order, and every write
//! made with a stale token rejected. It also shows the pattern an application should follow:
//! pass the fencing token with every read and write of the protected resource, and check
//! `is_lost()` before acting.
//!
//! ```text
//! contender --url URL --fence HOST:PORT --id NAME --out FILE
//!           [--lock NAME] [--rounds N] [--pause-ms MS] [--ttl-ms MS] [--give-up-s S] [--no-lock]
//!           [--slow-every N --slow-ms MS]
//! ```
//!
//! With `--slow-every N`, every Nth critical section lasts `--slow-ms` instead of `--pause-ms`
//! and is announced to the fence server first, so a fault test can stop or kill the process
//! while it certainly holds the lock.
//!
//! Start a fence server first (see `tests/support/fenced.rs`; the tests do it in-process).
//! Each round appends a line to `--out`:
//! `round R token T entered ok|stale written ok|stale|skip lost_before_write 0|1 paused 0|1 lost_fired 0|1`
//! and failures to take the lock append `lock_error KIND MESSAGE`. The last line is `done N`.
//! Exit status: 0 when all rounds ran, 2 for bad arguments, 3 when the backend could not be used.
//!
//! The recipes, through the same fence server's occupancy record (`ENTER` / `LEAVE`):
//!
//! ```text
//! contender ... --permits N                         # a permit of the N-permit semaphore --lock
//! contender ... --rw read|write|mixed [--write-every K]   # a hold of the read-write lock --lock
//!               [--gather N [--gather-ms MS]]
//! ```
//!
//! Each round takes the permit (or the read or write hold; `mixed` writes every Kth round,
//! default 4), announces it with `ENTER`, stays `--pause-ms`, and with `--gather N` (permits and
//! reads) stays on until N holders are inside or `--gather-ms` (default 200) passed; then it
//! announces `LEAVE`, gives the hold back, and appends
//! `round R kind sem|read|write slot S token T inside K lost 0|1` (K: holders inside when it
//! left).

#[path = "../tests/support/fenced.rs"]
mod fenced;

use std::io::Write;
use std::time::{Duration, Instant};

use coordkit::{DistRwLock, DistSemaphore, LockOptions};
use fenced::{FenceClient, Fenced, HoldKind};

/// Which read-write lock holds a `--rw` contender takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RwMode {
    Read,
    Write,
    Mixed,
}

struct Args {
    url: String,
    fence: String,
    id: String,
    out: String,
    lock: String,
    rounds: u64,
    pause: Duration,
    ttl: Duration,
    give_up: Duration,
    no_lock: bool,
    slow_every: u64,
    slow: Duration,
    permits: Option<u32>,
    rw: Option<RwMode>,
    write_every: u64,
    gather: usize,
    gather_for: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        url: String::new(),
        fence: String::new(),
        id: format!("p{}", std::process::id()),
        out: String::new(),
        lock: "reliability/counter".into(),
        rounds: 200,
        pause: Duration::from_millis(1),
        ttl: Duration::from_secs(2),
        give_up: Duration::from_secs(120),
        no_lock: false,
        slow_every: 0,
        slow: Duration::from_millis(200),
        permits: None,
        rw: None,
        write_every: 4,
        gather: 0,
        gather_for: Duration::from_millis(200),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--no-lock" {
            a.no_lock = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let ms = |v: &str| -> Result<Duration, String> {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|e| format!("{flag}: {e}"))
        };
        match flag.as_str() {
            "--url" => a.url = value,
            "--fence" => a.fence = value,
            "--id" => a.id = value,
            "--out" => a.out = value,
            "--lock" => a.lock = value,
            "--rounds" => a.rounds = value.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--pause-ms" => a.pause = ms(&value)?,
            "--ttl-ms" => a.ttl = ms(&value)?,
            "--give-up-s" => a.give_up = ms(&value)? * 1000,
            "--slow-every" => a.slow_every = value.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--slow-ms" => a.slow = ms(&value)?,
            "--permits" => a.permits = Some(value.parse().map_err(|e| format!("{flag}: {e}"))?),
            "--rw" => {
                a.rw = Some(match value.as_str() {
                    "read" => RwMode::Read,
                    "write" => RwMode::Write,
                    "mixed" => RwMode::Mixed,
                    _ => return Err(format!("{flag}: read, write or mixed, not {value}")),
                })
            }
            "--gather" => a.gather = value.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--gather-ms" => a.gather_for = ms(&value)?,
            "--write-every" => {
                a.write_every = value.parse().map_err(|e| format!("{flag}: {e}"))?;
                if a.write_every == 0 {
                    return Err(format!("{flag} must be at least 1"));
                }
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.fence.is_empty() || a.out.is_empty() || (a.url.is_empty() && !a.no_lock) {
        return Err("--url, --fence and --out are required".into());
    }
    if a.permits.is_some() && a.rw.is_some() {
        return Err("--permits and --rw exclude each other".into());
    }
    if (a.permits.is_some() || a.rw.is_some()) && a.slow_every > 0 {
        return Err("--permits and --rw go without --slow-every".into());
    }
    Ok(a)
}

struct Log(std::fs::File);

impl Log {
    fn line(&mut self, s: &str) {
        // One write per line, unbuffered, so a killed process leaves complete lines behind.
        let _ = self.0.write_all(format!("{s}\n").as_bytes());
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("contender: {e}");
            std::process::exit(2);
        }
    };
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("contender: cannot open {}: {e}", args.out);
            std::process::exit(2);
        }
    };
    let mut log = Log(file);
    let code = run(&args, &mut log).await;
    std::process::exit(code);
}

async fn run(args: &Args, log: &mut Log) -> i32 {
    let mut fence = match FenceClient::connect(&args.fence, &args.id).await {
        Ok(f) => f,
        Err(e) => {
            log.line(&format!("fatal fence {e}"));
            return 3;
        }
    };
    if args.no_lock && (args.permits.is_some() || args.rw.is_some()) {
        return run_recipe(args, log, &mut fence, None).await;
    }
    if args.no_lock {
        return run_without_lock(args, log, &mut fence).await;
    }
    let Some(store) = connect(args, log).await else {
        return 3;
    };
    if args.permits.is_some() || args.rw.is_some() {
        return run_recipe(args, log, &mut fence, Some(&*store)).await;
    }
    let factor = store.capabilities().lease_expiry_factor.max(1);
    let opts = LockOptions::new()
        .ttl(args.ttl)
        .wait(args.give_up.min(Duration::from_secs(60)));
    for round in 0..args.rounds {
        let last_progress = Instant::now();
        let guard = loop {
            match store.lock(&args.lock, &opts).await {
                Ok(g) => break g,
                Err(e) => {
                    if give_up_after(log, &e, last_progress, args.give_up) {
                        return 3;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let token = guard.token().get();
        // Enter: a fenced read of the counter.
        let read = match fence.read(token).await {
            Ok(Fenced::Ok(v)) => v,
            Ok(Fenced::Stale(h)) => {
                log.line(&format!(
                    "round {round} token {token} entered stale highest {h} written skip lost_before_write {} paused 0 lost_fired 0",
                    guard.is_lost() as u8
                ));
                let _ = fence.exit(token).await;
                let _ = guard.release().await;
                continue;
            }
            Err(e) => {
                log.line(&format!("fatal fence {e}"));
                return 3;
            }
        };
        let entered_at = Instant::now();
        let pause = if args.slow_every > 0 && round % args.slow_every == args.slow_every - 1 {
            // A long critical section, announced so that a fault test can stop or kill this
            // process while it certainly holds the lock.
            if let Err(e) = fence.announce_slow(token).await {
                log.line(&format!("fatal fence {e}"));
                return 3;
            }
            args.slow
        } else {
            args.pause
        };
        tokio::time::sleep(pause).await;
        // Back from the pause. If far more time passed than the pause (half the TTL or more),
        // this process was stopped or starved and its lease may have run out, but the
        // keep-alive task may not have run yet to find out. Give the lost signal the time it
        // needs to fire before acting (bounded: if the lease is still good it never fires).
        let paused = entered_at.elapsed() > pause + args.ttl / 2;
        let mut lost_fired = false;
        if paused {
            let bound = args.ttl * factor + Duration::from_secs(10);
            lost_fired = tokio::time::timeout(bound, guard.lost()).await.is_ok();
        }
        let lost_before_write = guard.is_lost();
        // Write even when the lock is known to be lost: this is the stale writer the fencing
        // check exists for, and the resource must refuse it if a newer holder has been in.
        let written = match fence.write(token, read, read + 1).await {
            Ok(Fenced::Ok(())) => "ok",
            Ok(Fenced::Stale(_)) => "stale",
            Err(e) => {
                log.line(&format!("fatal fence {e}"));
                return 3;
            }
        };
        let _ = fence.exit(token).await;
        log.line(&format!(
            "round {round} token {token} entered ok written {written} lost_before_write {} paused {} lost_fired {}",
            lost_before_write as u8, paused as u8, lost_fired as u8
        ));
        let _ = guard.release().await;
    }
    log.line(&format!("done {}", args.rounds));
    0
}

/// Connects to `--url`, retrying while the backend is not there yet; `None` (logged) when it
/// cannot be used.
async fn connect(args: &Args, log: &mut Log) -> Option<std::sync::Arc<dyn coordkit::Backend>> {
    let started = Instant::now();
    loop {
        match coordkit::connect(&args.url).await {
            Ok(s) => return Some(s),
            Err(e) if started.elapsed() < args.give_up && retryable(&e) => {
                log.line(&format!(
                    "connect_error {} {}",
                    e.kind().as_str().replace(' ', "_"),
                    e
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                log.line(&format!("fatal connect {e}"));
                return None;
            }
        }
    }
}

/// A held recipe: a semaphore permit or a read-write lock guard.
enum Hold {
    Permit(coordkit::Permit),
    Guard(coordkit::LockGuard),
}

impl Hold {
    fn token(&self) -> u64 {
        match self {
            Hold::Permit(p) => p.token().get(),
            Hold::Guard(g) => g.token().get(),
        }
    }

    fn is_lost(&self) -> bool {
        match self {
            Hold::Permit(p) => p.is_lost(),
            Hold::Guard(g) => g.is_lost(),
        }
    }

    async fn release(self) -> coordkit::Result<()> {
        match self {
            Hold::Permit(p) => p.release().await,
            Hold::Guard(g) => g.release().await,
        }
    }
}

/// The rounds of a `--permits` or `--rw` contender; without a store (`--no-lock`, the control),
/// it announces holds it never took: slot `round % permits`, token `round + 1`.
async fn run_recipe(
    args: &Args,
    log: &mut Log,
    fence: &mut FenceClient,
    store: Option<&dyn coordkit::Backend>,
) -> i32 {
    let opts = LockOptions::new()
        .ttl(args.ttl)
        .wait(args.give_up.min(Duration::from_secs(60)));
    for round in 0..args.rounds {
        let kind = match (args.permits, args.rw) {
            (Some(_), _) => HoldKind::Permit,
            (None, Some(RwMode::Read)) => HoldKind::Read,
            (None, Some(RwMode::Write)) => HoldKind::Write,
            (None, _) if round % args.write_every == args.write_every - 1 => HoldKind::Write,
            (None, _) => HoldKind::Read,
        };
        let last_progress = Instant::now();
        let Some(store) = store else {
            let permits = u64::from(args.permits.unwrap_or(1));
            let slot = if kind == HoldKind::Permit {
                (round % permits) as u32
            } else {
                0
            };
            let inside = match announce(args, fence, kind, slot, round + 1).await {
                Ok(k) => k,
                Err(e) => {
                    log.line(&format!("fatal fence {e}"));
                    return 3;
                }
            };
            log.line(&format!(
                "round {round} kind {} slot {slot} token {} inside {inside} lost 0",
                kind.as_str(),
                round + 1
            ));
            continue;
        };
        let (hold, slot) = loop {
            let taken = match kind {
                HoldKind::Permit => {
                    let permits = args.permits.unwrap_or(1);
                    DistSemaphore::acquire(store, &args.lock, permits, &opts)
                        .await
                        .map(|p| {
                            let slot = p.slot();
                            (Hold::Permit(p), slot)
                        })
                }
                HoldKind::Read => DistRwLock::read(store, &args.lock, &opts)
                    .await
                    .map(|g| (Hold::Guard(g), 0)),
                HoldKind::Write => DistRwLock::write(store, &args.lock, &opts)
                    .await
                    .map(|g| (Hold::Guard(g), 0)),
            };
            match taken {
                Ok(t) => break t,
                Err(e) => {
                    if give_up_after(log, &e, last_progress, args.give_up) {
                        return 3;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let token = hold.token();
        let inside = match announce(args, fence, kind, slot, token).await {
            Ok(k) => k,
            Err(e) => {
                log.line(&format!("fatal fence {e}"));
                return 3;
            }
        };
        let lost = hold.is_lost();
        log.line(&format!(
            "round {round} kind {} slot {slot} token {token} inside {inside} lost {}",
            kind.as_str(),
            lost as u8
        ));
        if let Err(e) = hold.release().await {
            log.line(&format!(
                "release_error {} {}",
                e.kind().as_str().replace(' ', "_"),
                e
            ));
        }
    }
    log.line(&format!("done {}", args.rounds));
    0
}

/// One recipe hold as the fence server sees it: `ENTER`, the pause, the gathering (`AWAIT`, for
/// permits and reads), `LEAVE`; how many holders were inside after the gathering (0 without).
async fn announce(
    args: &Args,
    fence: &mut FenceClient,
    kind: HoldKind,
    slot: u32,
    token: u64,
) -> std::io::Result<usize> {
    fence.enter(kind, slot, token).await?;
    tokio::time::sleep(args.pause).await;
    let mut inside = 0;
    if args.gather > 0 && kind != HoldKind::Write {
        inside = fence.await_holders(args.gather, args.gather_for).await?;
    }
    fence.leave().await?;
    Ok(inside)
}

/// Logs a failed lock call; true if the caller should give up (no progress for `give_up`, or an
/// error that will not go away by itself).
fn give_up_after(
    log: &mut Log,
    e: &coordkit::Error,
    last_progress: Instant,
    give_up: Duration,
) -> bool {
    log.line(&format!(
        "lock_error {} {}",
        e.kind().as_str().replace(' ', "_"),
        e
    ));
    if last_progress.elapsed() > give_up || !retryable(e) {
        log.line("fatal lock: no progress");
        return true;
    }
    false
}

/// Whether an error may go away by itself (the backend is failing over or restarting).
fn retryable(e: &coordkit::Error) -> bool {
    matches!(
        e.kind(),
        coordkit::ErrorKind::Unavailable
            | coordkit::ErrorKind::Timeout
            | coordkit::ErrorKind::LockLost
            | coordkit::ErrorKind::Backend
    )
}

/// The control: the same read-modify-write without any lock. The checks must catch it.
async fn run_without_lock(args: &Args, log: &mut Log, fence: &mut FenceClient) -> i32 {
    for round in 0..args.rounds {
        let step = async {
            let v = fence.read_unfenced().await?;
            tokio::time::sleep(args.pause).await;
            fence.write_unfenced(v, v + 1).await?;
            fence.exit(0).await
        };
        if let Err(e) = step.await {
            log.line(&format!("fatal fence {e}"));
            return 3;
        }
        log.line(&format!(
            "round {round} token 0 entered ok written ok lost_before_write 0 paused 0 lost_fired 0"
        ));
    }
    log.line(&format!("done {}", args.rounds));
    0
}
