//! What is measured, and how: the [`Target`] and [`Contender`] traits every client (coordkit or
//! raw) implements, the interleaved runner, and the contended handoff runner.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::stats::Series;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type R<T> = Result<T, BoxError>;

/// Makes an error from a message.
pub fn err(msg: impl Into<String>) -> BoxError {
    msg.into().into()
}

/// A measured single-client operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Linearizable (strong) read of an existing key.
    GetStrong,
    /// Stale (serializable / local) read of an existing key.
    GetStale,
    /// Unconditional write.
    Put,
    /// Compare-and-swap on the key's current version (always succeeds: one client).
    Cas,
    /// Acquire an uncontended lock, then release it.
    LockUnlock,
    /// Acquire a permit of an idle 3-permit semaphore, then release it (coordkit only).
    Semaphore,
    /// Take the read side of an idle read-write lock, then release it (coordkit only).
    ReadLock,
    /// Win an uncontested election, then resign (coordkit only).
    Campaign,
}

impl Op {
    pub fn label(self) -> &'static str {
        match self {
            Op::GetStrong => "get (strong)",
            Op::GetStale => "get (stale)",
            Op::Put => "put",
            Op::Cas => "CAS",
            Op::LockUnlock => "lock+unlock",
            Op::Semaphore => "semaphore acquire+release",
            Op::ReadLock => "read lock+unlock",
            Op::Campaign => "campaign+resign",
        }
    }

    /// Whether this is a coordination recipe, which raw clients do not measure.
    pub fn is_recipe(self) -> bool {
        matches!(self, Op::Semaphore | Op::ReadLock | Op::Campaign)
    }

    /// Whether the operation takes and gives back a lock (and is run with the lock count).
    pub fn is_lock(self) -> bool {
        self == Op::LockUnlock || self.is_recipe()
    }
}

/// A client under test. `run` performs one operation; state it needs between operations (the
/// CAS version) lives inside the target.
#[async_trait]
pub trait Target: Send + Sync {
    /// How the row is labelled (`coordkit`, `etcd-client`, …).
    fn name(&self) -> String;
    /// Whether this client measures `op`.
    fn supports(&self, op: Op) -> bool;
    /// Prepares `op` (writes the key it reads, reads the CAS version).
    async fn setup(&self, op: Op) -> R<()>;
    /// One operation.
    async fn run(&self, op: Op) -> R<()>;
}

/// Runs `op` on every target that supports it: a warm-up, then `n` measured operations per
/// target in interleaved blocks of `block`, so that drift on a shared machine hits all alike.
pub async fn interleaved(
    targets: &[Arc<dyn Target>],
    op: Op,
    n: usize,
    block: usize,
) -> R<Vec<(String, Series)>> {
    let active: Vec<&Arc<dyn Target>> = targets.iter().filter(|t| t.supports(op)).collect();
    let mut out: Vec<(String, Series)> = active
        .iter()
        .map(|t| (t.name(), Series::default()))
        .collect();
    for t in &active {
        t.setup(op).await?;
        for _ in 0..(n / 10).clamp(20, 200) {
            t.run(op).await?;
        }
    }
    let mut done = 0;
    let mut round = 0;
    while done < n {
        let this = block.min(n - done);
        for k in 0..active.len() {
            // Rotate who goes first in each round.
            let i = (k + round) % active.len();
            let t = active[i];
            let series = &mut out[i].1;
            let start = Instant::now();
            for _ in 0..this {
                let t0 = Instant::now();
                t.run(op).await?;
                series.push(t0.elapsed());
            }
            series.busy += start.elapsed();
            series.ops += this as u64;
        }
        done += this;
        round += 1;
    }
    Ok(out)
}

/// A held lock of some client.
#[async_trait]
pub trait Held: Send {
    async fn release(self: Box<Self>) -> R<()>;
}

/// One contender: a client of its own (own connection, own session or lease).
#[async_trait]
pub trait Contender: Send + Sync {
    async fn acquire(&self, name: &str) -> R<Box<dyn Held>>;
}

/// What the handoff runner measured.
pub struct Handoff {
    /// Time from a holder starting its release to the next holder's acquire returning.
    pub series: Series,
}

/// Contended handoff: every contender loops lock → note the time → release, on one lock name,
/// until `rounds` handoffs were seen. Each sample is the time from the moment a holder began
/// its release to the moment the next holder's acquire returned. `busy` is the wall time.
pub async fn handoff(
    contenders: Vec<Arc<dyn Contender>>,
    name: &str,
    rounds: usize,
    limit: Duration,
) -> R<Handoff> {
    struct Shared {
        last_release: Mutex<Option<Instant>>,
        samples: Mutex<Vec<Duration>>,
        acquisitions: AtomicUsize,
    }
    let shared = Arc::new(Shared {
        last_release: Mutex::new(None),
        samples: Mutex::new(Vec::with_capacity(rounds)),
        acquisitions: AtomicUsize::new(0),
    });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in contenders {
        let shared = shared.clone();
        let name = name.to_string();
        tasks.push(tokio::spawn(async move {
            loop {
                let held = c.acquire(&name).await?;
                let now = Instant::now();
                let prev = shared
                    .last_release
                    .lock()
                    .map_err(|_| err("poisoned"))?
                    .take();
                let n = shared.acquisitions.fetch_add(1, Ordering::SeqCst);
                if n > rounds {
                    held.release().await?;
                    return Ok::<(), BoxError>(());
                }
                if let Some(t) = prev {
                    shared
                        .samples
                        .lock()
                        .map_err(|_| err("poisoned"))?
                        .push(now - t);
                }
                *shared.last_release.lock().map_err(|_| err("poisoned"))? = Some(Instant::now());
                held.release().await?;
            }
        }));
    }
    let all = futures::future::join_all(tasks);
    match tokio::time::timeout(limit, all).await {
        Ok(results) => {
            for r in results {
                r.map_err(|e| err(format!("contender task failed: {e}")))??;
            }
        }
        Err(_) => return Err(err(format!("handoff did not finish within {limit:?}"))),
    }
    let busy = start.elapsed();
    let samples = shared.samples.lock().map_err(|_| err("poisoned"))?.clone();
    let mut series = Series::default();
    for d in &samples {
        series.push(*d);
    }
    series.ops = samples.len() as u64;
    series.busy = busy;
    Ok(Handoff { series })
}

/// Throughput without per-operation clocks (for the in-memory backend, where reading the clock
/// would cost as much as the operation): `n` operations per target in interleaved blocks;
/// (name, wall time, operations) per target.
pub async fn batch(
    targets: &[Arc<dyn Target>],
    op: Op,
    n: usize,
    block: usize,
) -> R<Vec<(String, Duration, u64)>> {
    let active: Vec<&Arc<dyn Target>> = targets.iter().filter(|t| t.supports(op)).collect();
    let mut out: Vec<(String, Duration, u64)> = active
        .iter()
        .map(|t| (t.name(), Duration::ZERO, 0))
        .collect();
    for t in &active {
        t.setup(op).await?;
    }
    let mut done = 0;
    let mut round = 0;
    while done < n {
        let this = block.min(n - done);
        for k in 0..active.len() {
            let i = (k + round) % active.len();
            let t = active[i];
            let start = Instant::now();
            for _ in 0..this {
                t.run(op).await?;
            }
            out[i].1 += start.elapsed();
            out[i].2 += this as u64;
        }
        done += this;
        round += 1;
    }
    Ok(out)
}
