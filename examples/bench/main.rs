//! coordkit's benchmark: coordkit against the raw client crates and peer libraries, on the same
//! servers in the same run, reported as ratios, with a latency plot.
//!
//! ```text
//! cargo run --release --example bench --all-features [-- OPTIONS]
//!
//!   --quick             small operation counts (a smoke run, not figures)
//!   --only a,b          backends to run: memory, etcd, zookeeper, consul, sqlite, file,
//!                       postgres
//!                       (default: all)
//!   --no-peers          skip the Python peer libraries (kazoo, tooz, filelock)
//!   --force             report a run on a loaded machine and exit 0 (it is still marked
//!                       invalid)
//!   --out DIR           where results.md and latency.svg go
//!                       (default: $CARGO_TARGET_DIR/bench-report or target/bench-report)
//! ```
//!
//! It starts its own servers (etcd, ZooKeeper and the Consul simulator as processes on free
//! loopback ports, killed by PID when done, and by a reaper process if this one dies), or, with
//! `COORDKIT_URL` set, measures that one backend (raw clients go to the same host:port).
//! See docs/benchmarks.md.
//!
//! A run is **valid** only on a quiet machine: the 1-minute load average is at most 1.0 at the
//! start and stays at most 2.0 throughout (sampled every second). Otherwise the report says
//! INVALID and the command exits 3, unless `--force`.

#[path = "../../tests/support/mod.rs"]
#[allow(dead_code, unused_imports, clippy::all)]
mod support;

mod ck;
mod consulraw;
mod embeddedraw;
mod etcdraw;
mod harness;
mod memraw;
mod peers;
mod pgraw;
mod plot;
mod report;
mod rss;
mod stats;
mod zkraw;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordkit::Backend;

use crate::ck::{CkContender, Coordkit};
use crate::harness::{err, handoff, interleaved, Contender, Op, Target, R};
use crate::report::{Row, Rss, Section, COORDKIT};

/// Contenders in the handoff measurement.
pub const CONTENDERS: usize = 8;
/// Value size for put / CAS, bytes.
pub const VALUE: usize = 100;
const OPS: [Op; 8] = [
    Op::GetStrong,
    Op::GetStale,
    Op::Put,
    Op::Cas,
    Op::LockUnlock,
    Op::Semaphore,
    Op::ReadLock,
    Op::Campaign,
];

/// Operation counts.
#[derive(Clone, Copy, Debug)]
pub struct Counts {
    /// get / put / CAS per client.
    pub kv: usize,
    /// lock+unlock per client.
    pub lock: usize,
    /// Interleaving block.
    pub block: usize,
    /// Handoffs per contended run.
    pub rounds: usize,
    /// Operations per client for the in-memory backend.
    pub mem: usize,
    /// Handoffs of the in-memory contended run: a thousand take about a millisecond there, so
    /// that one stall of the runtime or the machine would set its rounds/s.
    pub mem_rounds: usize,
    /// Operations per server-side round-trip count.
    pub rtt: usize,
    /// Locks and watches of the memory child.
    pub rss: usize,
}

impl Counts {
    pub const FULL: Counts = Counts {
        kv: 2000,
        lock: 2000,
        block: 50,
        rounds: 1000,
        mem: 100_000,
        mem_rounds: 100_000,
        rtt: 200,
        rss: 1000,
    };
    pub const QUICK: Counts = Counts {
        kv: 60,
        lock: 30,
        block: 20,
        rounds: 40,
        mem: 2000,
        mem_rounds: 200,
        rtt: 20,
        rss: 20,
    };
}

struct Args {
    force: bool,
    counts: Counts,
    only: Option<Vec<String>>,
    peers: bool,
    out: PathBuf,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn parse_args(args: &[String]) -> R<Args> {
    let mut a = Args {
        force: false,
        counts: Counts::FULL,
        only: None,
        peers: true,
        out: target_dir().join("bench-report"),
    };
    let mut it = args.iter();
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.counts = Counts::QUICK,
            "--no-peers" => a.peers = false,
            "--force" => a.force = true,
            "--only" => {
                let v = it.next().ok_or_else(|| err("--only needs a list"))?;
                a.only = Some(v.split(',').map(|s| s.trim().to_string()).collect());
            }
            "--out" => {
                a.out = PathBuf::from(it.next().ok_or_else(|| err("--out needs a directory"))?)
            }
            "--bench" => {} // passed by `cargo bench`-style runners; ignored
            other => {
                return Err(err(format!(
                    "unknown argument {other:?} (see the header of examples/bench/main.rs)"
                )))
            }
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--rss-child") {
        let rt = match tokio::runtime::Runtime::new() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let url = argv.get(1).cloned().unwrap_or_default();
        let n = |i: usize| argv.get(i).and_then(|s| s.parse().ok()).unwrap_or(1000);
        return match rt.block_on(rss::child(&url, n(2), n(3))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("memory child: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if argv.first().map(String::as_str) == Some("--consul-sim") {
        // A separate server process: `--consul-sim PORT DIR` (DIR names the run's base directory
        // so the reaper recognises the process).
        let port = argv.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        let opts = support::consul_sim::SimOptions {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            acl_token: None,
        };
        return match support::consul_sim::ConsulSim::start_with(opts) {
            Ok(sim) => {
                println!("consul simulator listening on http://{}", sim.addr());
                loop {
                    std::thread::park();
                }
            }
            Err(e) => {
                eprintln!("consul simulator: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let force = args.force;
    match rt.block_on(run(args)) {
        Ok(Validity::Valid) => ExitCode::SUCCESS,
        Ok(Validity::Invalid(why)) => {
            eprintln!("INVALID run: {why}");
            if force {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Which backend, and where its server is.
enum Spec {
    Memory,
    Etcd {
        url: String,
        hostport: String,
    },
    Zk {
        url: String,
        hostport: String,
        port: u16,
    },
    Consul {
        url: String,
        hostport: String,
    },
}

/// Starts the Consul simulator as a separate process of this binary; (process, port).
fn start_consul_sim() -> R<(support::Proc, u16)> {
    let dir = support::fresh_dir("consul-sim");
    let port = support::free_port();
    let exe = std::env::current_exe()?;
    if !exe.exists() {
        return Err(err(format!(
            "{} is gone (rebuilt during the run?)",
            exe.display()
        )));
    }
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--consul-sim").arg(port.to_string()).arg(&dir);
    let proc = support::Proc::spawn("consul simulator", &mut cmd, &dir.join("sim.log"));
    if !support::wait_until(Duration::from_secs(20), || support::port_open(port)) {
        return Err(err("the Consul simulator did not listen within 20 s"));
    }
    Ok((proc, port))
}

fn first_hostport(url: &str) -> R<String> {
    let rest = url
        .split_once("://")
        .map(|x| x.1)
        .ok_or_else(|| err("URL without ://"))?;
    let hosts = rest.split(['/', '?']).next().unwrap_or("");
    let first = hosts.split(',').next().unwrap_or("");
    if first.is_empty() {
        return Err(err(format!("no host:port in {url:?}")));
    }
    Ok(first.to_string())
}

fn port_of(hostport: &str) -> u16 {
    hostport
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// Whether the machine was quiet enough for the figures to count.
enum Validity {
    Valid,
    Invalid(String),
}

/// When the 1-minute load is above `above`, waits (at most `max`, measuring nothing) until it
/// is at most `to`, saying so before `next`.
async fn wait_for_load(next: &str, above: f64, to: f64, max: Duration) {
    let l = load1();
    if l <= above {
        return;
    }
    eprintln!("   waiting for the load to fall before {next} ({l:.2})");
    let t = Instant::now();
    while load1() > to && t.elapsed() < max {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Before each backend's part: waits (at most 2 minutes) until the 1-minute load is at most
/// 0.8, so that the part starts on a quiet machine rather than on the load the previous part
/// left (client and server together keep both cores busy, and the 1-minute average lags a
/// minute).
async fn settle(next: &str) {
    wait_for_load(next, 0.8, 0.8, Duration::from_secs(120)).await;
}

/// Before each row, handoff, peer and memory child of a part: when the 1-minute load is above
/// 1.2, waits (at most 90 s) until it is at most 0.9. Over a long part the 1-minute average
/// climbs toward the benchmark's own thread count; the pause keeps it from reaching the
/// validity limit of 2.0 on the benchmark's own load, so the limit still flags other load.
async fn cool(next: &str) {
    wait_for_load(next, 1.2, 0.9, Duration::from_secs(90)).await;
}

/// [`cool`] from synchronous code running on the runtime (peers and the memory child run
/// through `block_in_place`).
fn cool_blocking(next: &str) {
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| rt.block_on(cool(next)));
}

/// The 1-minute load average.
fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(f64::INFINITY)
}

/// Samples the 1-minute load every second until dropped: the highest value seen, overall and
/// per backend section.
struct LoadWatch {
    /// The overall peak, and per section (in run order) its name and peak.
    state: Arc<std::sync::Mutex<LoadState>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

struct LoadState {
    peak: f64,
    sections: Vec<(String, f64)>,
}

impl LoadWatch {
    fn start() -> LoadWatch {
        let state = Arc::new(std::sync::Mutex::new(LoadState {
            peak: load1(),
            sections: Vec::new(),
        }));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, st) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let l = load1();
                if let Ok(mut m) = p.lock() {
                    m.peak = m.peak.max(l);
                    if let Some((_, peak)) = m.sections.last_mut() {
                        *peak = peak.max(l);
                    }
                }
            }
        });
        LoadWatch { state, stop }
    }

    /// From now on, samples also count for section `name`.
    fn section(&self, name: &str) {
        if let Ok(mut m) = self.state.lock() {
            m.sections.push((name.to_string(), load1()));
        }
    }

    fn peak(&self) -> f64 {
        self.state.lock().map(|m| m.peak).unwrap_or(f64::INFINITY)
    }

    /// `memory 0.52, etcd 0.91, …`: the peak 1-minute load during each section.
    fn per_section(&self) -> String {
        self.state
            .lock()
            .map(|m| {
                m.sections
                    .iter()
                    .map(|(n, p)| format!("{n} {p:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    }
}

impl Drop for LoadWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn run(args: Args) -> R<Validity> {
    std::fs::create_dir_all(&args.out)?;
    let start_load = load1();
    eprintln!("load average at the start: {}", loadavg());
    if start_load > 1.0 && !args.force {
        return Ok(Validity::Invalid(format!(
            "the 1-minute load average is {start_load:.2} (above 1.0): wait for a quiet machine, or pass --force"
        )));
    }
    let load = LoadWatch::start();
    let wanted = |b: &str| args.only.as_ref().is_none_or(|o| o.iter().any(|x| x == b));
    let started = Instant::now();
    let load_start = loadavg();
    let mut sections = Vec::new();
    let mut python: Option<Result<PathBuf, String>> = None;
    let mut peer_python = |sec: &mut Section| -> Option<PathBuf> {
        if !args.peers {
            return None;
        }
        let p = python.get_or_insert_with(|| peers::prepare(&target_dir().join("bench-venv")));
        match p {
            Ok(p) => Some(p.clone()),
            Err(e) => {
                sec.notes.push(format!("Peer libraries skipped: {e}."));
                None
            }
        }
    };

    let env_url = std::env::var("COORDKIT_URL")
        .ok()
        .filter(|u| !u.trim().is_empty());
    let specs: Vec<(String, Option<Spec>)> = match &env_url {
        Some(url) => {
            let scheme = url.split("://").next().unwrap_or("");
            let spec = match scheme {
                "memory" => Spec::Memory,
                "etcd" => Spec::Etcd {
                    url: url.clone(),
                    hostport: first_hostport(url)?,
                },
                "zk" => {
                    let hp = first_hostport(url)?;
                    Spec::Zk {
                        url: url.clone(),
                        port: port_of(&hp),
                        hostport: hp,
                    }
                }
                "consul" => Spec::Consul {
                    url: url.clone(),
                    hostport: first_hostport(url)?,
                },
                other => {
                    return Err(err(format!(
                        "COORDKIT_URL scheme {other:?} is not benchmarked"
                    )))
                }
            };
            vec![(scheme.to_string(), Some(spec))]
        }
        None => [
            "memory",
            "etcd",
            "zookeeper",
            "consul",
            "sqlite",
            "file",
            "postgres",
        ]
        .iter()
        .filter(|b| wanted(b))
        .map(|b| (b.to_string(), None))
        .collect(),
    };

    for (name, spec) in specs {
        settle(&name).await;
        eprintln!("== {name}");
        load.section(&name);
        let t = Instant::now();
        let result = match (name.as_str(), spec) {
            (_, Some(Spec::Memory)) | ("memory", None) => bench_memory(args.counts).await,
            (_, Some(Spec::Etcd { url, hostport })) => {
                let py = peer_python(&mut Section::new("", ""));
                bench_etcd(
                    &url,
                    &hostport,
                    "etcd (COORDKIT_URL)",
                    args.counts,
                    py,
                    &args.out,
                )
                .await
            }
            ("etcd", None) => {
                let cluster = tokio::task::block_in_place(|| support::etcd::EtcdCluster::start(1));
                let hp = cluster.members[0].endpoint();
                let mut pre = Section::new("", "");
                let py = peer_python(&mut pre);
                let mut s = bench_etcd(
                    &cluster.url(),
                    &hp,
                    &version_of("etcd"),
                    args.counts,
                    py,
                    &args.out,
                )
                .await;
                if let Ok(s) = &mut s {
                    s.notes.extend(pre.notes);
                }
                drop(cluster);
                s
            }
            (
                _,
                Some(Spec::Zk {
                    url,
                    hostport,
                    port,
                }),
            ) => {
                let py = peer_python(&mut Section::new("", ""));
                bench_zk(
                    &url,
                    &hostport,
                    port,
                    "ZooKeeper (COORDKIT_URL)",
                    args.counts,
                    py,
                    &args.out,
                )
                .await
            }
            ("zookeeper", None) => {
                let zk = tokio::task::block_in_place(support::zookeeper::ZkStandalone::start);
                let hp = format!("127.0.0.1:{}", zk.port());
                let server = support::zookeeper::four_letter(zk.port(), "srvr")
                    .lines()
                    .next()
                    .map(|l| {
                        l.replace("Zookeeper version: ", "ZooKeeper ")
                            .split('-')
                            .next()
                            .unwrap_or("")
                            .to_string()
                    })
                    .unwrap_or_else(|| "ZooKeeper".to_string());
                let mut pre = Section::new("", "");
                let py = peer_python(&mut pre);
                let mut s = bench_zk(
                    &zk.url(),
                    &hp,
                    zk.port(),
                    &format!("{server}, standalone"),
                    args.counts,
                    py,
                    &args.out,
                )
                .await;
                if let Ok(s) = &mut s {
                    s.notes.extend(pre.notes);
                }
                drop(zk);
                s
            }
            (_, Some(Spec::Consul { url, hostport })) => {
                bench_consul(&url, &hostport, "Consul (COORDKIT_URL)", args.counts, false).await
            }
            ("consul", None) => match start_consul_sim() {
                Ok((sim, port)) => {
                    let hp = format!("127.0.0.1:{port}");
                    let s = bench_consul(
                        &format!("consul://{hp}"),
                        &hp,
                        "the Consul API simulator (tests/support/consul_sim), own process",
                        args.counts,
                        true,
                    )
                    .await;
                    drop(sim);
                    s
                }
                Err(e) => Err(e),
            },
            ("sqlite", None) => bench_sqlite(args.counts).await,
            ("postgres", None) => {
                let py = peer_python(&mut Section::new("", ""));
                let pg = tokio::task::block_in_place(support::postgres::PgServer::start);
                let s = bench_postgres(&pg, args.counts, py, &args.out).await;
                drop(pg);
                s
            }
            ("file", None) => {
                let py = peer_python(&mut Section::new("", ""));
                bench_file(args.counts, py, &args.out).await
            }
            (other, _) => Err(err(format!("unknown backend {other}"))),
        };
        match result {
            Ok(s) => {
                eprintln!("{}", report::section_md(&s));
                eprintln!("   ({name} took {:.0} s)", t.elapsed().as_secs_f64());
                sections.push(s);
                // Partial results survive a later failure.
                let partial = report::full_md(&sections, "(partial: the run has not finished)\n");
                let _ = std::fs::write(args.out.join("results.md"), partial);
            }
            Err(e) => {
                eprintln!("{name}: failed: {e}");
                let mut s = Section::new(&name, "—");
                s.notes.push(format!("This backend's run failed: {e}"));
                sections.push(s);
            }
        }
    }

    let peak = load.peak();
    let validity = if start_load > 1.0 {
        Validity::Invalid(format!(
            "the 1-minute load average was {start_load:.2} at the start (above 1.0)"
        ))
    } else if peak > 2.0 {
        Validity::Invalid(format!(
            "the 1-minute load average rose to {peak:.2} (above 2.0)"
        ))
    } else {
        Validity::Valid
    };
    let mut header = header_md(args.counts, started.elapsed(), &load_start);
    header.push_str(&format!(
        "\nPeak 1-minute load during each backend's part: {}.\n",
        load.per_section()
    ));
    eprintln!("peak 1-minute load per part: {}", load.per_section());
    header.push_str(&match &validity {
        Validity::Valid => format!(
            "\nValid run: 1-minute load {start_load:.2} at the start, at most {peak:.2} during the run (limits 1.0 and 2.0).\n"
        ),
        Validity::Invalid(why) => format!("\n**INVALID run**: {why}. These figures are not results.\n"),
    });
    let md = report::full_md(&sections, &header);
    println!("{md}");
    std::fs::write(args.out.join("results.md"), &md)?;
    let svg = args.out.join("latency.svg");
    plot::write(
        &svg,
        &sections,
        "coordkit benchmark: latency CDFs (log x) per backend and operation",
    )?;
    eprintln!(
        "wrote {} and {}",
        args.out.join("results.md").display(),
        svg.display()
    );
    eprintln!("load average at the end: {}", loadavg());
    Ok(validity)
}

fn version_of(bin: &str) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| format!("{} single node", l.replace("etcd Version: ", "etcd ")))
        })
        .unwrap_or_else(|| format!("{bin} single node"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn header_md(c: Counts, took: Duration, load_start: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "Machine: {cpu}, {cores} cores, {:.0} GiB RAM, {os}, Linux {}; servers and clients share the cores, \
         loopback only.\n\nCounts: {} get/put/CAS and {} lock+unlock per client (interleaved in blocks of {}, after a \
         warm-up), {} handoffs among {} contenders ({} in memory), {} in-memory operations per client; round trips \
         counted on the server over {} operations. Run time {:.0} s; load average (1/5/15 min) {} at the start, {} at the end.\n",
        mem as f64 / 1048576.0,
        kernel.trim(),
        c.kv,
        c.lock,
        c.block,
        c.rounds,
        CONTENDERS,
        c.mem_rounds,
        c.mem,
        c.rtt,
        took.as_secs_f64(),
        load_start,
        loadavg()
    )
}

/// Runs every single-client operation over `targets`, interleaved, as rows.
async fn op_rows(
    s: &mut Section,
    targets: &[Arc<dyn Target>],
    c: Counts,
    n_kv: usize,
    n_lock: usize,
) -> R<()> {
    for op in OPS {
        let n = if op.is_lock() { n_lock } else { n_kv };
        cool(op.label()).await;
        eprintln!("   {} ×{n} (load {:.2})", op.label(), load1());
        for (name, series) in interleaved(targets, op, n, c.block).await? {
            s.rows.push(Row::new(op.label(), &name, series));
        }
    }
    Ok(())
}

/// Server-side counts, before and after `c.rtt` operations of each target, per row.
async fn count_round_trips<F, Fut>(
    s: &mut Section,
    targets: &[Arc<dyn Target>],
    c: Counts,
    snapshot: F,
) -> R<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = R<BTreeMap<String, f64>>>,
{
    for op in OPS {
        for t in targets.iter().filter(|t| t.supports(op)) {
            let before = snapshot().await?;
            for _ in 0..c.rtt {
                t.run(op).await?;
            }
            let after = snapshot().await?;
            let per = etcdraw::per_op(&before, &after, c.rtt);
            let total: f64 = per
                .iter()
                .filter(|(m, _)| m.as_str() != "LeaseKeepAlive")
                .map(|(_, v)| v)
                .sum();
            let detail = per
                .iter()
                .filter(|(m, v)| m.as_str() != "packets" && **v >= 0.05)
                .map(|(m, v)| format!("{m} {v:.2}"))
                .collect::<Vec<_>>()
                .join(", ");
            let name = t.name();
            if let Some(row) = s
                .rows
                .iter_mut()
                .find(|r| r.op == op.label() && r.client == name)
            {
                row.rtt = Some((total, detail));
            }
        }
    }
    Ok(())
}

async fn run_handoff(
    s: &mut Section,
    label: &str,
    contenders: Vec<Arc<dyn Contender>>,
    name: &str,
    c: Counts,
) {
    cool(&format!("the handoff of {label}")).await;
    eprintln!("   handoff: {label} (load {:.2})", load1());
    match handoff(contenders, name, c.rounds, Duration::from_secs(300)).await {
        Ok(h) => s.handoff.push(Row::new("handoff", label, h.series)),
        Err(e) => s.notes.push(format!("Handoff with {label} failed: {e}")),
    }
}

async fn coordkit_for(s: &mut Section, url: &str) -> Option<Arc<dyn Backend>> {
    match coordkit::connect(url).await {
        Ok(store) => Some(store),
        Err(e) => {
            s.notes.push(format!(
                "coordkit could not connect to {url}: {e}. Only the raw side was measured."
            ));
            None
        }
    }
}

async fn ck_contenders(url: &str) -> R<Vec<Arc<dyn Contender>>> {
    let mut v: Vec<Arc<dyn Contender>> = Vec::new();
    for _ in 0..CONTENDERS {
        v.push(Arc::new(CkContender(coordkit::connect(url).await?)));
    }
    Ok(v)
}

fn measure_rss(s: &mut Section, url: &str, n: usize) {
    cool_blocking("the memory child");
    eprintln!(
        "   memory: {n} locks + {n} watches in a child process (load {:.2})",
        load1()
    );
    match tokio::task::block_in_place(|| rss::measure(url, n, n)) {
        Ok((connected_kb, peak_kb, _)) => {
            s.rss = Some(Rss {
                locks: n,
                watches: n,
                connected_kb,
                peak_kb,
            })
        }
        Err(e) => s.notes.push(format!("Memory measurement failed: {e}")),
    }
}

fn add_peer(
    s: &mut Section,
    python: &Path,
    out: &Path,
    mode: &str,
    label: &str,
    addr: &str,
    c: Counts,
) {
    cool_blocking(label);
    eprintln!("   peer: {label} (load {:.2})", load1());
    let counts = (c.kv, c.lock, c.rounds, CONTENDERS);
    match tokio::task::block_in_place(|| peers::run(python, out, mode, label, addr, counts)) {
        Ok(p) => {
            for mut r in p.rows {
                r.peer = true;
                s.rows.push(r);
            }
            if let Some(mut h) = p.handoff {
                h.peer = true;
                if h.series.lat_us.len() < c.rounds {
                    s.notes.push(format!(
                        "{label}'s contended run stopped at its 60 s limit after {} of {} handoffs.",
                        h.series.lat_us.len(),
                        c.rounds
                    ));
                }
                s.handoff.push(h);
            }
        }
        Err(e) => s.notes.push(format!("Peer {label} failed: {e}")),
    }
}

/// Keeps rows grouped by operation in `OPS` order (peers were appended at the end).
fn sort_rows(s: &mut Section) {
    let order = |op: &str| {
        OPS.iter()
            .position(|o| o.label() == op)
            .unwrap_or(OPS.len())
    };
    s.rows.sort_by_key(|r| order(&r.op));
}

/// The embedded backends' rows: coordkit and the raw baseline interleaved, then the handoffs.
async fn embedded_rows(
    s: &mut Section,
    url: &str,
    raw: Arc<dyn Target>,
    raw_contenders: Vec<Arc<dyn Contender>>,
    raw_label: &str,
    c: Counts,
) -> R<()> {
    let store = coordkit::connect(url).await?;
    let targets: Vec<Arc<dyn Target>> = vec![Arc::new(Coordkit::new(store, VALUE)), raw];
    op_rows(s, &targets, c, c.kv, c.lock).await?;
    run_handoff(s, COORDKIT, ck_contenders(url).await?, "bench/contended", c).await;
    run_handoff(s, raw_label, raw_contenders, "contended", c).await;
    let lat = watch_latency(url, c.kv / 2).await?;
    s.notes.push(format!(
        "Watch latency (one store puts, another store's watch receives; put start → event): p50 {}, p99 {}, max {} over {} puts.",
        stats::fmt_us(lat.pct(50.0)),
        stats::fmt_us(lat.pct(99.0)),
        stats::fmt_us(lat.max()),
        lat.lat_us.len()
    ));
    let (cpu, wall) = idle_cpu(url, Duration::from_secs(10)).await?;
    s.notes.push(format!(
        "Idle CPU: a lock() waiting behind a held lock plus an idle watch, in this process, with nothing else running: \
         {:.2} % of one core ({:.1} ms of CPU in {:.0} s).",
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
        cpu.as_secs_f64() * 1000.0,
        wall.as_secs_f64()
    ));
    Ok(())
}

/// Put start → event received by another store's watch, one put at a time.
async fn watch_latency(url: &str, n: usize) -> R<stats::Series> {
    use futures::StreamExt;
    let writer = coordkit::connect(url).await?;
    let reader = coordkit::connect(url).await?;
    let mut w = reader.watch("bench/watch/").await?;
    let mut out = stats::Series::default();
    for i in 0..n.max(20) {
        let t0 = Instant::now();
        writer
            .put(
                "bench/watch/k",
                i.to_string().into_bytes(),
                Default::default(),
            )
            .await?;
        match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Ok(_))) => out.push(t0.elapsed()),
            other => return Err(err(format!("watch event missing: {other:?}"))),
        }
    }
    Ok(out)
}

/// This process's CPU time while one `lock()` waits behind a held lock and one watch is idle.
async fn idle_cpu(url: &str, span: Duration) -> R<(Duration, Duration)> {
    fn cpu() -> Duration {
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(u.ru_utime) + tv(u.ru_stime)
    }
    let holder = coordkit::connect(url).await?;
    let waiter = coordkit::connect(url).await?;
    let opts = coordkit::LockOptions::new().ttl(Duration::from_secs(60));
    let g = holder.lock("bench/idle", &opts).await?;
    let _watch = waiter.watch("bench/idle-watch/").await?;
    let w = waiter.clone();
    let wait = tokio::spawn(async move {
        w.lock(
            "bench/idle",
            &coordkit::LockOptions::new().wait(Duration::from_secs(120)),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (c0, t0) = (cpu(), Instant::now());
    tokio::time::sleep(span).await;
    let used = (cpu().saturating_sub(c0), t0.elapsed());
    g.release().await?;
    // The waiter gets the lock once it is released.
    let got = tokio::time::timeout(Duration::from_secs(10), wait).await;
    match got {
        Ok(Ok(Ok(g2))) => g2.release().await?,
        other => {
            return Err(err(format!(
                "the waiting lock() did not get the lock: {other:?}"
            )))
        }
    }
    Ok(used)
}

async fn bench_postgres(
    pg: &support::postgres::PgServer,
    c: Counts,
    python: Option<PathBuf>,
    out: &Path,
) -> R<Section> {
    let server = tokio::task::block_in_place(|| pg.psql("SHOW server_version"));
    let server = format!(
        "PostgreSQL {}",
        server
            .split_whitespace()
            .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
            .unwrap_or("?")
    );
    let mut s = Section::new(
        "PostgreSQL",
        &format!("{server}, a cluster started by the benchmark"),
    );
    let conn = format!(
        "host=127.0.0.1 port={} user=postgres password={} dbname=postgres",
        pg.port(),
        support::postgres::PASSWORD
    );
    let raw = Arc::new(pgraw::PgRaw::new(&conn, VALUE).await?);
    let mut contenders: Vec<Arc<dyn Contender>> = Vec::new();
    for _ in 0..CONTENDERS {
        contenders.push(Arc::new(pgraw::AdvisoryContender(Arc::new(
            pgraw::connect(&conn).await?,
        ))));
    }
    let url = pg.url("bench_ck");
    embedded_rows(&mut s, &url, raw, contenders, "pg_advisory_lock", c).await?;
    if let Some(py) = python {
        add_peer(
            &mut s,
            &py,
            out,
            "psycopg",
            "psycopg pg_advisory_lock (Python)",
            &conn,
            c,
        );
    }
    sort_rows(&mut s);
    s.notes.push(
        "The raw side is single statements through tokio-postgres on one connection (autocommit upserts, a CAS \
         as one conditional UPDATE) and session advisory locks, which the server queues: no lease, no token, \
         no store-wide revision, no change log. coordkit's writes take the revision counter row and log the \
         change in the same transaction, and its lock is a lease row with a token."
            .into(),
    );
    Ok(s)
}

async fn bench_sqlite(c: Counts) -> R<Section> {
    let dir = tempfile::tempdir()?;
    let mut s = Section::new(
        "SQLite",
        "SQLite as bundled by rusqlite, a file in a temporary directory",
    );
    let raw_db = dir.path().join("raw.db");
    let raw = Arc::new(embeddedraw::SqliteRaw::new(&raw_db, VALUE)?);
    let contenders = (0..CONTENDERS)
        .map(|i| Ok(Arc::new(embeddedraw::SqliteContender::new(&raw_db, i)?) as Arc<dyn Contender>))
        .collect::<R<Vec<_>>>()?;
    let url = format!("sqlite://{}", dir.path().join("ck.db").display());
    embedded_rows(&mut s, &url, raw, contenders, "raw lease row, 1 ms poll", c).await?;
    s.notes.push(
        "The raw side is the same statements through the same rusqlite crate (WAL, synchronous = FULL, \
         BEGIN IMMEDIATE for writes) on one connection; its contenders poll a lease row every millisecond, \
         coordkit's waiters are woken by inotify when a write commits."
            .into(),
    );
    Ok(s)
}

async fn bench_file(c: Counts, python: Option<PathBuf>, out: &Path) -> R<Section> {
    let dir = tempfile::tempdir()?;
    let mut s = Section::new(
        "file",
        "a directory in a temporary directory, on the local file system",
    );
    let raw_dir = dir.path().join("raw");
    let raw = Arc::new(embeddedraw::FsRaw::new(&raw_dir, VALUE)?);
    let contenders = (0..CONTENDERS)
        .map(|_| Arc::new(embeddedraw::FlockContender(raw_dir.clone())) as Arc<dyn Contender>)
        .collect();
    let url = format!("file://{}", dir.path().join("ck").display());
    embedded_rows(&mut s, &url, raw, contenders, "bare flock", c).await?;
    if let Some(py) = python {
        let peer_dir = dir.path().join("peer");
        std::fs::create_dir_all(&peer_dir)?;
        add_peer(
            &mut s,
            &py,
            out,
            "filelock",
            "filelock (Python)",
            &peer_dir.display().to_string(),
            c,
        );
    }
    sort_rows(&mut s);
    s.notes.push(
        "The raw side writes each value with the same durability (temporary file, fdatasync, rename, fsync of \
         the directory) and locks with a bare flock: no lease, no token, no record, so a paused holder blocks \
         everyone. The peer is the Python `filelock` package (flock, no lease either)."
            .into(),
    );
    Ok(s)
}

pub async fn bench_memory(c: Counts) -> R<Section> {
    let mut s = Section::new("memory", "in-process");
    let store: Arc<dyn Backend> = coordkit::connect("memory://").await?;
    let raw = Arc::new(memraw::RawMap::new(VALUE));
    let targets: Vec<Arc<dyn Target>> =
        vec![Arc::new(Coordkit::new(store.clone(), VALUE)), raw.clone()];
    op_rows(&mut s, &targets, c, c.mem, c.mem).await?;
    // Throughput without per-operation clock reads.
    for op in OPS {
        for (name, busy, ops) in harness::batch(&targets, op, c.mem, c.mem / 10).await? {
            if let Some(row) = s
                .rows
                .iter_mut()
                .find(|r| r.op == op.label() && r.client == name)
            {
                row.series.busy = busy;
                row.series.ops = ops;
            }
        }
    }
    let handoffs = Counts {
        rounds: c.mem_rounds,
        ..c
    };
    let ck: Vec<Arc<dyn Contender>> = (0..CONTENDERS)
        .map(|_| Arc::new(CkContender(store.clone())) as _)
        .collect();
    run_handoff(&mut s, COORDKIT, ck, "bench/contended", handoffs).await;
    let rawc: Vec<Arc<dyn Contender>> = (0..CONTENDERS)
        .map(|_| Arc::new(memraw::MapContender(raw.clone())) as _)
        .collect();
    run_handoff(&mut s, "tokio Mutex", rawc, "contended", handoffs).await;
    measure_rss(&mut s, "memory://", c.rss);
    s.notes.push(
        "Ops/s for memory come from a separate pass without per-operation clock reads; p50/p99 from the timed pass. \
         The raw side is a `Mutex<BTreeMap>` for keys and a `tokio::sync::Mutex` per lock name."
            .into(),
    );
    Ok(s)
}

async fn bench_etcd(
    url: &str,
    hostport: &str,
    server: &str,
    c: Counts,
    python: Option<PathBuf>,
    out: &Path,
) -> R<Section> {
    let mut s = Section::new("etcd", server);
    let endpoint = format!("http://{hostport}");
    let ck = coordkit_for(&mut s, url).await;
    let mut targets: Vec<Arc<dyn Target>> = Vec::new();
    if let Some(store) = &ck {
        targets.push(Arc::new(Coordkit::new(store.clone(), VALUE)));
    }
    targets.push(Arc::new(
        etcdraw::EtcdRaw::new(&endpoint, etcdraw::Recipe::LockRpc, VALUE).await?,
    ));
    targets.push(Arc::new(
        etcdraw::EtcdRaw::new(&endpoint, etcdraw::Recipe::Textbook, VALUE).await?,
    ));
    targets.push(Arc::new(
        etcdraw::EtcdRaw::new(&endpoint, etcdraw::Recipe::SyncedWatch, VALUE).await?,
    ));
    op_rows(&mut s, &targets, c, c.kv, c.lock).await?;
    let http = reqwest::Client::new();
    let ep = endpoint.clone();
    if let Err(e) =
        count_round_trips(&mut s, &targets, c, || etcdraw::grpc_counts(&http, &ep)).await
    {
        s.notes.push(format!("Round trips were not counted: {e}"));
    }
    drop(targets);
    if ck.is_some() {
        match ck_contenders(url).await {
            Ok(v) => run_handoff(&mut s, COORDKIT, v, "bench/contended", c).await,
            Err(e) => s
                .notes
                .push(format!("coordkit contenders could not connect: {e}")),
        }
    }
    for (recipe, name) in [
        (etcdraw::Recipe::LockRpc, "rawbench/contended-rpc"),
        (etcdraw::Recipe::Textbook, "rawbench/contended-txn"),
        (etcdraw::Recipe::SyncedWatch, "rawbench/contended-synced"),
    ] {
        let mut v: Vec<Arc<dyn Contender>> = Vec::new();
        for _ in 0..CONTENDERS {
            v.push(Arc::new(
                etcdraw::EtcdContender::new(&endpoint, recipe).await?,
            ));
        }
        run_handoff(&mut s, etcdraw::EtcdRaw::label(recipe), v, name, c).await;
    }
    if ck.is_some() {
        measure_rss(&mut s, url, c.rss);
    }
    if let Some(py) = python {
        add_peer(
            &mut s,
            &py,
            out,
            "tooz-etcd",
            "tooz (Python, etcd3gw)",
            hostport,
            c,
        );
    }
    sort_rows(&mut s);
    s.notes.push(
        "Round trips: gRPC messages etcd received per operation (its /metrics `grpc_server_msg_received_total`), \
         lease keep-alives left out of the total. The raw clients grant one lease per client (600 s TTL) and \
         never renew it during the run."
            .into(),
    );
    Ok(s)
}

async fn bench_zk(
    url: &str,
    hostport: &str,
    port: u16,
    server: &str,
    c: Counts,
    python: Option<PathBuf>,
    out: &Path,
) -> R<Section> {
    let mut s = Section::new("zookeeper", server);
    let ck = coordkit_for(&mut s, url).await;
    let mut targets: Vec<Arc<dyn Target>> = Vec::new();
    if let Some(store) = &ck {
        targets.push(Arc::new(Coordkit::new(store.clone(), VALUE)));
    }
    targets.push(Arc::new(zkraw::ZkRaw::new(hostport, VALUE).await?));
    op_rows(&mut s, &targets, c, c.kv, c.lock).await?;
    let snap = || async move {
        let n = zkraw::packets_received(port).await?;
        Ok::<_, harness::BoxError>(BTreeMap::from([("packets".to_string(), n as f64)]))
    };
    if let Err(e) = count_round_trips(&mut s, &targets, c, snap).await {
        s.notes.push(format!("Round trips were not counted: {e}"));
    }
    drop(targets);
    if ck.is_some() {
        match ck_contenders(url).await {
            Ok(v) => run_handoff(&mut s, COORDKIT, v, "bench/contended", c).await,
            Err(e) => s
                .notes
                .push(format!("coordkit contenders could not connect: {e}")),
        }
    }
    let mut v: Vec<Arc<dyn Contender>> = Vec::new();
    for _ in 0..CONTENDERS {
        v.push(Arc::new(
            zkraw::ZkContender::new(hostport, "contended").await?,
        ));
    }
    run_handoff(&mut s, "zookeeper-client", v, "contended", c).await;
    if ck.is_some() {
        measure_rss(&mut s, url, c.rss);
    }
    if let Some(py) = python {
        add_peer(&mut s, &py, out, "kazoo", "kazoo (Python)", hostport, c);
        add_peer(
            &mut s,
            &py,
            out,
            "tooz-zk",
            "tooz (Python, kazoo)",
            hostport,
            c,
        );
    }
    sort_rows(&mut s);
    s.notes.push(
        "Round trips: packets the server received per operation (`srvr` `Received:`), session pings included."
            .into(),
    );
    Ok(s)
}

/// `sim`: the server is the simulator, whose request counts (`GET /_sim/requests`) give the
/// HTTP requests per operation.
async fn bench_consul(url: &str, hostport: &str, server: &str, c: Counts, sim: bool) -> R<Section> {
    let mut s = Section::new("consul", server);
    let base = format!("http://{hostport}");
    let ck = coordkit_for(&mut s, url).await;
    let mut targets: Vec<Arc<dyn Target>> = Vec::new();
    if let Some(store) = &ck {
        targets.push(Arc::new(Coordkit::new(store.clone(), VALUE)));
    }
    targets.push(Arc::new(consulraw::ConsulRaw::new(&base, VALUE).await?));
    op_rows(&mut s, &targets, c, c.kv, c.lock).await?;
    if sim {
        let http = reqwest::Client::new();
        let snap = || consulraw::request_counts(&http, &base);
        match count_round_trips(&mut s, &targets, c, snap).await {
            Ok(()) => s.notes.push(
                "Round trips: HTTP requests the simulator received per operation, by kind \
                 (a blocking query counts when it arrives; session renewals included)."
                    .into(),
            ),
            Err(e) => s.notes.push(format!("Round trips were not counted: {e}")),
        }
    }
    drop(targets);
    if ck.is_some() {
        match ck_contenders(url).await {
            Ok(v) => run_handoff(&mut s, COORDKIT, v, "bench/contended", c).await,
            Err(e) => s
                .notes
                .push(format!("coordkit contenders could not connect: {e}")),
        }
    }
    let mut v: Vec<Arc<dyn Contender>> = Vec::new();
    for _ in 0..CONTENDERS {
        v.push(Arc::new(consulraw::ConsulContender::new(&base).await?));
    }
    run_handoff(&mut s, "reqwest HTTP", v, "rawbench/locks/contended", c).await;
    if ck.is_some() {
        measure_rss(&mut s, url, c.rss);
    }
    s.notes.push(
        "Consul figures are against the simulator, an in-memory model of Consul's HTTP API without Raft or disk: \
         they show client overhead and round trips, not what a real Consul cluster would do. No peer library: \
         tooz dropped its Consul driver and python-consul is unmaintained."
            .into(),
    );
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole pipeline in a tiny mode on the in-memory backend: rows for every operation
    /// on both sides, a full handoff count, a memory figure from the child process (skipped:
    /// the test binary is not the bench binary), and a plot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tiny_memory_run_produces_tables_and_plot() {
        let c = Counts {
            rss: 0,
            ..Counts::QUICK
        };
        let mut s = Section::new("memory", "in-process");
        let store: Arc<dyn Backend> = coordkit::connect("memory://").await.unwrap();
        let raw = Arc::new(memraw::RawMap::new(VALUE));
        let targets: Vec<Arc<dyn Target>> =
            vec![Arc::new(Coordkit::new(store.clone(), VALUE)), raw.clone()];
        op_rows(&mut s, &targets, c, 50, 50).await.unwrap();
        for op in OPS {
            assert!(s.ck(op.label()).is_some(), "{op:?}");
            assert_eq!(s.ck(op.label()).unwrap().series.lat_us.len(), 50);
        }
        let (mean, p50) = s.ratio("put").unwrap();
        assert!(mean.is_finite() && mean > 0.0 && p50 > 0.0);
        let ck: Vec<Arc<dyn Contender>> = (0..CONTENDERS)
            .map(|_| Arc::new(CkContender(store.clone())) as _)
            .collect();
        run_handoff(&mut s, COORDKIT, ck, "bench/contended", c).await;
        assert!(s.notes.is_empty(), "{:?}", s.notes);
        assert_eq!(
            s.handoff_row(COORDKIT).unwrap().series.lat_us.len(),
            c.rounds
        );
        let md = report::full_md(&[s], "header\n");
        assert!(md.contains("| lock+unlock | coordkit |"), "{md}");
        assert!(
            md.contains("| ≥ 0.8× raw throughput (put) | memory |"),
            "{md}"
        );
        assert!(
            md.contains("| ≥ 0.3× raw throughput (lock+unlock) | memory |"),
            "{md}"
        );
        assert!(
            md.contains("| semaphore acquire+release | coordkit |"),
            "{md}"
        );
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("l.svg");
        let s2 = bench_sections_for_plot();
        plot::write(&svg, &s2, "t").unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("polyline"),
            "{}",
            &text[..200.min(text.len())]
        );
    }

    fn bench_sections_for_plot() -> Vec<Section> {
        let mut s = Section::new("memory", "x");
        let series = stats::Series {
            lat_us: (1..=100).map(f64::from).collect(),
            busy: Duration::from_millis(5),
            ops: 100,
        };
        s.rows.push(Row::new("put", COORDKIT, series.clone()));
        s.handoff.push(Row::new("handoff", COORDKIT, series));
        vec![s]
    }
}
