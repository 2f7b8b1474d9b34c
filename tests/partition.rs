//! Partition faults: the lock holder is cut off from the server by a black-holing proxy
//! (`tests/support/proxy.rs`: connections stay open, nothing is forwarded), while a second
//! client, connected directly, waits for the same lock. The lock's central promise is checked:
//! the holder's `lost()` fires **strictly before** the other client's `lock()` returns.
//!
//! Each case: holder A connects through the proxy and takes the lock; B connects directly and
//! starts `lock()` on the same name; then the proxy stalls. Recorded: the instant A's `lost()`
//! fired and the instant B's `lock()` returned; the margin is B acquired − A lost (a violation
//! if A's lost came at the same time, later, or never). Then the proxy heals, A releases late
//! (`LockLost` or `Ok`, no panic, bounded), and B's lock must be undisturbed: B's guard not
//! lost, a third client's `try_lock` gets `None`, and B's token is above A's.
//!
//! Per backend, at its smallest lock TTL (`Capabilities::min_lock_ttl`): a stall with the
//! client's default request timeout, a stall with a request timeout of 3 × TTL, and a reset of
//! every connection (new ones too) with the default request timeout. The cases of a run (20 by
//! default, `COORDKIT_PARTITION_CASES=N` for more) run at once on distinct lock names, each
//! with its own clients, their acquisitions spread over one TTL so that the stall hits each at
//! a different point of its renewal cycle; `COORDKIT_PARTITION_RUNS=N` repeats every run N
//! times. Figures are printed and written to `target/reliability/partition-<run>.txt`; see
//! `docs/reliability.md`.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use coordkit::{ErrorKind, LockGuard, LockOptions};
use support::proxy::Proxy;

/// Runs at the smallest TTLs take turns, so that their timing does not depend on what else
/// runs. (The Consul runs, whose TTL is 10 s, run alongside.)
fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// Cases per run: `COORDKIT_PARTITION_CASES`, default 20.
fn cases() -> usize {
    env_usize("COORDKIT_PARTITION_CASES", 20)
}

/// Repetitions of each run: `COORDKIT_PARTITION_RUNS`, default 1.
fn runs() -> usize {
    env_usize("COORDKIT_PARTITION_RUNS", 1)
}

/// One partition run's setting.
struct Run {
    /// Label for the figures.
    label: String,
    /// The holders' URL, through the proxy.
    through_proxy: String,
    /// The waiters' (and the third client's) URL, direct.
    direct: String,
    /// The request timeout the holders' client is configured with (for the report).
    request_timeout: Duration,
    /// What the proxy does to the holders' connections.
    fault: Fault,
}

/// How the holders are cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Black hole: connections stay open, nothing is forwarded ([`Proxy::stall`]).
    Stall,
    /// Every connection is reset, new ones too ([`Proxy::reset`]).
    Reset,
}

/// What one case saw.
#[derive(Debug, Default)]
struct Case {
    name: String,
    token_a: u64,
    token_b: Option<u64>,
    /// When A's lost() fired, after the stall (None: never, within the bound).
    lost: Option<Duration>,
    /// When B's lock() returned a guard, after the stall.
    acquired: Option<Duration>,
    /// Everything that went wrong.
    problems: Vec<String>,
}

impl Case {
    /// B acquired − A lost, in seconds (negative: a violation).
    fn margin(&self) -> Option<f64> {
        Some(self.acquired?.as_secs_f64() - self.lost?.as_secs_f64())
    }

    /// The ordering failed: B acquired while A's lost had not fired.
    fn violation(&self) -> bool {
        match (self.acquired, self.lost) {
            (Some(b), Some(a)) => a >= b,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// A run's outcome.
struct Report {
    label: String,
    fault: Fault,
    ttl: Duration,
    request_timeout: Duration,
    cases: Vec<Case>,
    took: Duration,
}

fn stats(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    Some((v[0], median, v[v.len() - 1]))
}

fn fmt_stats(v: Vec<f64>) -> String {
    match stats(v) {
        Some((min, med, max)) => format!("{min:+.3} / {med:+.3} / {max:+.3} s"),
        None => "-".into(),
    }
}

impl Report {
    fn violations(&self) -> usize {
        self.cases.iter().filter(|c| c.violation()).count()
    }

    fn problems(&self) -> usize {
        self.cases.iter().filter(|c| !c.problems.is_empty()).count()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let margins: Vec<f64> = self.cases.iter().filter_map(Case::margin).collect();
        let lost: Vec<f64> = self
            .cases
            .iter()
            .filter_map(|c| c.lost.map(|d| d.as_secs_f64()))
            .collect();
        let acquired: Vec<f64> = self
            .cases
            .iter()
            .filter_map(|c| c.acquired.map(|d| d.as_secs_f64()))
            .collect();
        writeln!(
            f,
            "partition run {} ({:?}): lock TTL {:?}, holder's request timeout {:?}, {} cases, {:.1} s",
            self.label,
            self.fault,
            self.ttl,
            self.request_timeout,
            self.cases.len(),
            self.took.as_secs_f64()
        )?;
        writeln!(
            f,
            "  margin (B acquired - A lost) min / median / max: {}",
            fmt_stats(margins)
        )?;
        writeln!(
            f,
            "  A lost after the stall: {}; B acquired after the stall: {}",
            fmt_stats(lost),
            fmt_stats(acquired)
        )?;
        writeln!(
            f,
            "  violations (B acquired before A's lost fired): {} of {}; cases with other problems: {}",
            self.violations(),
            self.cases.len(),
            self.problems()
        )?;
        writeln!(
            f,
            "  | {} | {:?} | {:?} | {} | {} | {} | {} |",
            self.label,
            self.ttl,
            self.request_timeout,
            self.cases.len(),
            fmt_stats(self.cases.iter().filter_map(Case::margin).collect()),
            self.violations(),
            self.problems()
        )?;
        for c in &self.cases {
            if c.violation() || !c.problems.is_empty() {
                writeln!(
                    f,
                    "  case {}: token A {} B {:?}; A lost {:?}, B acquired {:?} after the stall; \
                     margin {:?}{}",
                    c.name,
                    c.token_a,
                    c.token_b,
                    c.lost,
                    c.acquired,
                    c.margin(),
                    if c.violation() { " VIOLATION" } else { "" }
                )?;
                for p in &c.problems {
                    writeln!(f, "    {p}")?;
                }
            }
        }
        Ok(())
    }
}

/// Prints the report and writes it to `target/reliability/partition-<label>.txt`.
fn publish(report: &Report) {
    println!("{report}");
    let dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("reliability");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(
            dir.join(format!("partition-{}.txt", report.label)),
            format!("{report}\n"),
        );
    }
}

async fn connect(url: &str) -> std::sync::Arc<dyn coordkit::Backend> {
    match tokio::time::timeout(Duration::from_secs(30), coordkit::connect(url)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!("connect {url}: {e}"),
        Err(_) => panic!("connect {url}: no answer within 30 s"),
    }
}

/// A case set up and waiting for the stall.
struct Armed {
    case: Case,
    a: std::sync::Arc<dyn coordkit::Backend>,
    guard_a: LockGuard,
    lost_at: tokio::task::JoinHandle<Instant>,
    b_lock: tokio::task::JoinHandle<(coordkit::Result<LockGuard>, Instant)>,
    /// Kept so B's client outlives its guard.
    _b: std::sync::Arc<dyn coordkit::Backend>,
}

async fn arm(run: &Run, i: usize, n: usize, ttl: Duration, bound: Duration) -> Armed {
    let a = connect(&run.through_proxy).await;
    let b = connect(&run.direct).await;
    // Spread the acquisitions over one TTL: the stall then falls at a different point of
    // each holder's renewal cycle.
    tokio::time::sleep(ttl.mul_f64(i as f64 / n as f64)).await;
    let name = format!("partition/{}/{i}", run.label);
    let opts = LockOptions::new().ttl(ttl);
    let guard_a = match tokio::time::timeout(bound, a.lock(&name, &opts)).await {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => panic!("[{}] A could not lock {name}: {e}", run.label),
        Err(_) => panic!("[{}] A could not lock {name} within {bound:?}", run.label),
    };
    let lost = guard_a.lost();
    let lost_at = tokio::spawn(async move {
        lost.await;
        Instant::now()
    });
    let b_lock = {
        let b = b.clone();
        let name = name.clone();
        let opts = opts.clone().wait(bound);
        tokio::spawn(async move {
            let r = b.lock(&name, &opts).await;
            (r, Instant::now())
        })
    };
    Armed {
        case: Case {
            name,
            token_a: guard_a.token().get(),
            ..Case::default()
        },
        a,
        guard_a,
        lost_at,
        b_lock,
        _b: b,
    }
}

/// Waits for both events of a stalled case; returns B's guard if it got one.
async fn observe(armed: &mut Armed, stalled: Instant, bound: Duration) -> Option<LockGuard> {
    let case = &mut armed.case;
    let b_guard = match tokio::time::timeout(bound, &mut armed.b_lock).await {
        Ok(Ok((Ok(g), at))) => {
            case.acquired = Some(at.saturating_duration_since(stalled));
            case.token_b = Some(g.token().get());
            Some(g)
        }
        Ok(Ok((Err(e), _))) => {
            case.problems.push(format!("B's lock() failed: {e}"));
            None
        }
        Ok(Err(e)) => {
            case.problems.push(format!("B's lock() task failed: {e}"));
            None
        }
        Err(_) => {
            armed.b_lock.abort();
            case.problems.push(format!(
                "B did not get the lock within {bound:?} of the stall"
            ));
            None
        }
    };
    // A's lost() should have fired by now; if not, wait on to measure how late it comes.
    let wait = (stalled + 2 * bound).saturating_duration_since(Instant::now());
    match tokio::time::timeout(wait, &mut armed.lost_at).await {
        Ok(Ok(at)) => {
            let d = at.saturating_duration_since(stalled);
            // An instant before the stall would be a loss for another reason.
            if at < stalled {
                case.problems.push(format!(
                    "A's lost() fired {:?} before the stall",
                    stalled - at
                ));
            }
            case.lost = Some(d);
        }
        Ok(Err(e)) => case.problems.push(format!("A's lost() task failed: {e}")),
        Err(_) => {
            armed.lost_at.abort();
            case.problems.push(format!(
                "A's lost() did not fire within {:?} of the stall",
                2 * bound
            ))
        }
    }
    b_guard
}

/// After the heal: A's late release must not disturb B.
async fn late_release(
    armed: Armed,
    b_guard: Option<LockGuard>,
    c: &dyn coordkit::Backend,
    ttl: Duration,
) -> Case {
    let Armed {
        mut case,
        a,
        guard_a,
        ..
    } = armed;
    match tokio::time::timeout(Duration::from_secs(60), guard_a.release()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.kind() == ErrorKind::LockLost => {}
        Ok(Err(e)) => case.problems.push(format!(
            "A's late release: expected LockLost or Ok, got {:?}: {e}",
            e.kind()
        )),
        Err(_) => case
            .problems
            .push("A's late release did not return within 60 s".into()),
    }
    // Whatever A's client still had queued has now reached the server.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Some(g) = b_guard {
        if g.is_lost() {
            case.problems
                .push("B's guard was lost after A's late release".into());
        }
        match tokio::time::timeout(
            Duration::from_secs(20),
            c.try_lock(&case.name, &LockOptions::new().ttl(ttl)),
        )
        .await
        {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(third))) => {
                case.problems.push(format!(
                    "a third client got the lock (token {}) while B held it",
                    third.token()
                ));
                let _ = third.release().await;
            }
            Ok(Err(e)) => case.problems.push(format!("third client's try_lock: {e}")),
            Err(_) => case
                .problems
                .push("third client's try_lock did not return within 20 s".into()),
        }
        if g.token().get() <= case.token_a {
            case.problems.push(format!(
                "B's token {} is not above A's {}",
                g.token(),
                case.token_a
            ));
        }
        if g.is_lost() {
            case.problems
                .push("B's guard was lost after the third client's try".into());
        }
        if let Err(e) = tokio::time::timeout(Duration::from_secs(20), g.release())
            .await
            .unwrap_or_else(|_| Err(coordkit::Error::new(ErrorKind::Timeout, "test", "20 s")))
        {
            case.problems.push(format!("B's release: {e}"));
        }
    }
    drop(a);
    case
}

/// One run: `cases()` cases at once through `proxy`.
async fn partition_run(run: &Run, proxy: &Proxy) -> Report {
    let probe = connect(&run.direct).await;
    let caps = probe.capabilities();
    let ttl = caps.min_lock_ttl;
    let n = cases();
    // Ample: the server's expiry (TTL × factor), a lock-delay, a request timeout, slack.
    let bound =
        ttl * (caps.lease_expiry_factor + 1) + run.request_timeout + Duration::from_secs(15);
    let started = Instant::now();
    let mut armed: Vec<Armed> =
        futures::future::join_all((0..n).map(|i| arm(run, i, n, ttl, bound))).await;
    // Every B has called lock() and waits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for a in &armed {
        assert!(
            !a.guard_a.is_lost(),
            "[{}] {} lost before the stall",
            run.label,
            a.case.name
        );
    }
    let stalled = Instant::now();
    match run.fault {
        Fault::Stall => proxy.stall(),
        Fault::Reset => proxy.reset(),
    }
    let b_guards =
        futures::future::join_all(armed.iter_mut().map(|a| observe(a, stalled, bound))).await;
    proxy.heal();
    let c = connect(&run.direct).await;
    let cases = futures::future::join_all(
        armed
            .into_iter()
            .zip(b_guards)
            .map(|(a, g)| late_release(a, g, c.as_ref(), ttl)),
    )
    .await;
    Report {
        label: run.label.clone(),
        fault: run.fault,
        ttl,
        request_timeout: run.request_timeout,
        cases,
        took: started.elapsed(),
    }
}

/// Runs `run` through a fresh proxy to `target_port` [`runs`] times, publishes every report,
/// then asserts 0 violations and no other problem.
fn check(label: &str, target_port: u16, make: impl Fn(u16) -> Run) {
    let mut failed = Vec::new();
    for r in 0..runs() {
        let proxy = Proxy::to_port(target_port);
        let mut run = make(proxy.port());
        if runs() > 1 {
            run.label = format!("{}-{r}", run.label);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let report = rt.block_on(partition_run(&run, &proxy));
        // Stop every task of the run (clients, renewers) before the proxy goes.
        rt.shutdown_timeout(Duration::from_secs(5));
        drop(proxy);
        publish(&report);
        if report.violations() > 0 || report.problems() > 0 {
            failed.push(format!("{report}"));
        }
    }
    assert!(
        failed.is_empty(),
        "[{label}] lost() must fire before another client acquires:\n{}",
        failed.join("\n")
    );
}

#[cfg(feature = "etcd")]
mod etcd {
    use super::*;
    use support::etcd::EtcdCluster;

    /// The etcd client's default request timeout.
    const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// The server's version, from `etcdctl endpoint status`.
    fn server_version(server: &EtcdCluster) -> Option<String> {
        let (ok, out, _) =
            support::etcd::etcdctl(&server.endpoints(), &["endpoint", "status", "-w", "json"]);
        if !ok {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v[0]["Status"]["version"].as_str().map(str::to_string)
    }

    fn etcd_run(label: &str, query: &str, request_timeout: Duration, fault: Fault) {
        let _turn = turn();
        let server = EtcdCluster::start(1);
        let port = server.members[0].client_port;
        // The figures name the server version (the test command runs these on 3.4 and 3.5).
        let label = match server_version(&server) {
            Some(v) => label.replacen("etcd", &format!("etcd-{v}"), 1),
            None => label.to_string(),
        };
        let label = label.as_str();
        check(label, port, |proxy_port| Run {
            label: label.into(),
            through_proxy: format!("etcd://127.0.0.1:{proxy_port}{query}"),
            direct: server.url(),
            request_timeout,
            fault,
        });
    }

    #[test]
    fn etcd_holder_partitioned_min_ttl() {
        etcd_run("etcd", "", DEFAULT_TIMEOUT, Fault::Stall);
    }

    #[test]
    fn etcd_holder_partitioned_min_ttl_request_timeout_3x_ttl() {
        // The smallest TTL is 2 s: a request timeout of 6 s.
        etcd_run(
            "etcd-timeout-6s",
            "?request_timeout=6s",
            Duration::from_secs(6),
            Fault::Stall,
        );
    }

    #[test]
    fn etcd_holder_connections_reset_min_ttl() {
        etcd_run("etcd-reset", "", DEFAULT_TIMEOUT, Fault::Reset);
    }
}

#[cfg(feature = "zookeeper")]
mod zookeeper {
    use super::*;
    use support::zookeeper::{url_options, ZkStandalone, TICK_MS};

    /// The ZooKeeper backend's default request timeout.
    const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    fn zk_run(label: &str, extra: &str, request_timeout: Duration, fault: Fault) {
        let _turn = turn();
        let server = ZkStandalone::start();
        check(label, server.port(), |proxy_port| Run {
            label: label.into(),
            through_proxy: format!("zk://127.0.0.1:{proxy_port}?{}{extra}", url_options()),
            direct: server.url(),
            request_timeout,
            fault,
        });
    }

    #[test]
    fn zookeeper_holder_partitioned_min_ttl() {
        zk_run("zookeeper", "", DEFAULT_TIMEOUT, Fault::Stall);
    }

    #[test]
    fn zookeeper_holder_partitioned_min_ttl_request_timeout_3x_ttl() {
        // The test server's smallest session timeout is 2 ticks.
        let t = Duration::from_millis(3 * 2 * TICK_MS);
        zk_run(
            "zookeeper-timeout-3s",
            &format!("&request_timeout={}ms", t.as_millis()),
            t,
            Fault::Stall,
        );
    }

    #[test]
    fn zookeeper_holder_connections_reset_min_ttl() {
        zk_run("zookeeper-reset", "", DEFAULT_TIMEOUT, Fault::Reset);
    }
}

#[cfg(feature = "consul")]
mod consul {
    use super::*;
    use support::consul_sim::ConsulSim;

    /// The Consul backend's default request timeout.
    const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    fn consul_run(label: &str, query: &str, request_timeout: Duration, fault: Fault) {
        let sim = ConsulSim::start();
        check(label, sim.addr().port(), |proxy_port| Run {
            label: label.into(),
            through_proxy: format!("consul://127.0.0.1:{proxy_port}{query}"),
            direct: sim.url(),
            request_timeout,
            fault,
        });
    }

    /// The three settings run at once (each with its own simulator and proxy): their 10 s TTL,
    /// reaped after 2 × TTL, makes each take half a minute.
    #[test]
    fn consul_sim_holder_partitioned_min_ttl() {
        let settings: [(&str, &str, Duration, Fault); 3] = [
            ("consul-sim", "", DEFAULT_TIMEOUT, Fault::Stall),
            // The smallest session TTL is 10 s: a request timeout of 30 s.
            (
                "consul-sim-timeout-30s",
                "?timeout=30s",
                Duration::from_secs(30),
                Fault::Stall,
            ),
            ("consul-sim-reset", "", DEFAULT_TIMEOUT, Fault::Reset),
        ];
        let failed: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = settings
                .iter()
                .map(|(label, query, timeout, fault)| {
                    scope.spawn(move || consul_run(label, query, *timeout, *fault))
                })
                .collect();
            handles
                .into_iter()
                .zip(&settings)
                .filter_map(|(h, (label, ..))| {
                    h.join().err().map(|e| {
                        let msg = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        format!("{label}: {msg}")
                    })
                })
                .collect()
        });
        assert!(failed.is_empty(), "{}", failed.join("\n"));
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use support::postgres::PgServer;

    /// The PostgreSQL backend's default request timeout.
    const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    fn pg_run(label: &str, query: &str, request_timeout: Duration, fault: Fault) {
        let _turn = turn();
        let pg = PgServer::start();
        check(label, pg.port(), |proxy_port| Run {
            label: label.into(),
            through_proxy: format!("{}{query}", pg.url_at(proxy_port, "partition")),
            direct: pg.url("partition"),
            request_timeout,
            fault,
        });
    }

    #[test]
    fn postgres_holder_partitioned_min_ttl() {
        pg_run("postgres", "", DEFAULT_TIMEOUT, Fault::Stall);
    }

    #[test]
    fn postgres_holder_partitioned_min_ttl_request_timeout_3x_ttl() {
        // The smallest lock TTL is 1 s: a request timeout of 3 s.
        pg_run(
            "postgres-timeout-3s",
            "&request_timeout=3s",
            Duration::from_secs(3),
            Fault::Stall,
        );
    }

    #[test]
    fn postgres_holder_connections_reset_min_ttl() {
        pg_run("postgres-reset", "", DEFAULT_TIMEOUT, Fault::Reset);
    }
}
