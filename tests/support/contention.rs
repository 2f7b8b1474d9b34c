//! Multi-process lock contention: start `examples/contender` processes against one backend URL
//! and a [`FenceServer`], optionally inject faults while they run, and check the record.
//!
//! What counts as a violation (each is listed in [`RunReport::violations`]):
//! - the counter's final value differs from the number of accepted writes, or (without faults)
//!   from processes × rounds;
//! - an accepted write lost an update (someone wrote between its read and its write);
//! - a fresh acquisition's fenced read was refused, or entry tokens did not strictly increase
//!   in critical-section order, or two acquisitions reported the same token;
//! - two processes inside at once, unless the earlier one's lock had lapsed (it was paused, or
//!   reported `lost` before writing, or its write was refused as stale);
//! - without faults: any lost lock, any stale write, any process that did not finish;
//! - a paused holder that resumed and wrote without `lost()` having fired first, or whose stale
//!   write was accepted;
//! - a lock that nobody took over after its holder was killed or paused.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::fenced::{Entered, FenceServer, FenceState, Occupancy};

/// Rounds per process: `COORDKIT_RELIABILITY_ROUNDS`, else `default`.
pub fn rounds(default: u64) -> u64 {
    std::env::var("COORDKIT_RELIABILITY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Processes per run: `COORDKIT_RELIABILITY_PROCS`, else `default`.
pub fn procs(default: usize) -> usize {
    std::env::var("COORDKIT_RELIABILITY_PROCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The backend's capabilities, from a client connected to `url`.
pub fn caps(url: &str) -> coordkit::Capabilities {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let s = coordkit::connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        s.capabilities()
    })
}

/// The `contender` example binary, next to this test binary (`target/<profile>/examples/`).
///
/// `cargo test` builds examples, but `cargo test --test <name>` does not, and a binary left
/// from an older build may lack a backend: so this runs `cargo build --example contender` with
/// this test binary's features and profile once per test process (quick when up to date).
pub fn contender_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("current exe");
            // target/<profile>/deps/<test>-<hash>
            let profile_dir = exe
                .parent()
                .and_then(|p| p.parent())
                .expect("test binary lives in target/<profile>/deps")
                .to_path_buf();
            let bin = profile_dir.join("examples").join("contender");
            // The backends this build has, from the registry, so a new backend needs no line here.
            let mut features: Vec<&str> = coordkit::backend::REGISTRY
                .iter()
                .filter(|e| e.is_built())
                .filter_map(|e| e.feature)
                .collect();
            if cfg!(feature = "cli") {
                features.push("cli");
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args([
                "build",
                "--quiet",
                "--example",
                "contender",
                "--no-default-features",
            ]);
            if !features.is_empty() {
                cmd.arg("--features").arg(features.join(","));
            }
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            if let Some(target) = profile_dir.parent() {
                cmd.env("CARGO_TARGET_DIR", target);
            }
            let status = cmd
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo build --example contender");
            assert!(status.success(), "cargo build --example contender failed");
            assert!(bin.exists(), "{} missing", bin.display());
            bin
        })
        .clone()
}

/// How to run the contenders.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub label: String,
    pub url: String,
    pub procs: usize,
    pub rounds: u64,
    pub pause: Duration,
    pub ttl: Duration,
    pub lock: String,
    pub no_lock: bool,
    /// Every Nth critical section is long and announced (0: never); needed by holder faults.
    pub slow_every: u64,
    pub slow: Duration,
    /// The backend's `lease_expiry_factor`.
    pub expiry_factor: u32,
    /// Bound on the whole run.
    pub deadline: Duration,
    /// A recipe instead of the plain lock (run with [`run_recipe`]).
    pub recipe: Option<Recipe>,
    /// Recipe holders other than writers stay until this many holders are inside, at most
    /// `gather_for` (0: they do not wait).
    pub gather: usize,
    pub gather_for: Duration,
}

/// A recipe the contenders take instead of the plain lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    /// A permit of a semaphore with this many permits.
    Semaphore { permits: u32 },
    /// Holds of a read-write lock.
    RwLock { mode: RwMode, write_every: u64 },
}

/// Which holds of a read-write lock the contenders take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RwMode {
    Read,
    Write,
    /// Reads, and a write every `write_every`th round.
    Mixed,
}

impl RwMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RwMode::Read => "read",
            RwMode::Write => "write",
            RwMode::Mixed => "mixed",
        }
    }
}

impl RunConfig {
    pub fn new(label: &str, url: &str) -> Self {
        RunConfig {
            label: label.to_string(),
            url: url.to_string(),
            procs: procs(8),
            rounds: rounds(200),
            pause: Duration::from_millis(1),
            ttl: Duration::from_secs(10),
            lock: format!(
                "reliability/{}",
                label.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
            ),
            no_lock: false,
            slow_every: 0,
            slow: Duration::from_millis(250),
            expiry_factor: 1,
            deadline: Duration::from_secs(600),
            recipe: None,
            gather: 0,
            gather_for: Duration::from_millis(200),
        }
    }
}

/// A fault to inject while the contenders run.
pub enum Fault {
    /// SIGKILL a process while it holds the lock (in an announced long critical section).
    KillHolder,
    /// SIGSTOP a holder past its TTL (times the expiry factor), wait until another process has
    /// entered with a newer token, then SIGCONT it.
    PauseHolder,
    /// Anything else (killing a cluster leader…): returns a description.
    Custom(String, Box<dyn FnMut() -> String + Send>),
}

/// One contender process.
struct Worker {
    id: String,
    child: Child,
    out: PathBuf,
    exit: Option<std::process::ExitStatus>,
}

impl Worker {
    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child this process started and has not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.signal(libc::SIGCONT);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One line a contender wrote about one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    pub worker: String,
    pub round: u64,
    pub token: u64,
    pub entered: bool,
    pub written: String,
    pub lost_before_write: bool,
    pub paused: bool,
    pub lost_fired: bool,
}

/// What a run did and found.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub label: String,
    pub procs: usize,
    pub rounds_planned: u64,
    pub rounds_done: usize,
    pub writes_accepted: usize,
    pub stale_rejected: usize,
    pub lost_before_write: usize,
    pub lock_errors: usize,
    pub final_value: i64,
    pub overlaps: usize,
    pub overlaps_explained: usize,
    pub faults: Vec<String>,
    pub violations: Vec<String>,
    pub elapsed: Duration,
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] {} processes x {} rounds: {} rounds done, {} writes accepted, final count {}, \
             {} stale writes rejected, {} lost-before-write, {} lock errors retried, \
             overlaps {} ({} explained by a lapsed lock), faults {} {:?}, violations {} in {:.1}s",
            self.label,
            self.procs,
            self.rounds_planned,
            self.rounds_done,
            self.writes_accepted,
            self.final_value,
            self.stale_rejected,
            self.lost_before_write,
            self.lock_errors,
            self.overlaps,
            self.overlaps_explained,
            self.faults.len(),
            self.faults,
            self.violations.len(),
            self.elapsed.as_secs_f64()
        )?;
        for v in self.violations.iter().take(10) {
            write!(f, "\n  VIOLATION: {v}")?;
        }
        if self.violations.len() > 10 {
            write!(f, "\n  ... and {} more", self.violations.len() - 10)?;
        }
        Ok(())
    }
}

fn parse_rounds(worker: &str, text: &str) -> (Vec<Round>, usize, bool) {
    let mut rounds = Vec::new();
    let mut lock_errors = 0;
    let mut done = false;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.first().copied() {
            Some("round") => {
                let get = |k: &str| {
                    f.iter()
                        .position(|x| *x == k)
                        .and_then(|i| f.get(i + 1))
                        .copied()
                        .unwrap_or("")
                };
                rounds.push(Round {
                    worker: worker.to_string(),
                    round: get("round").parse().unwrap_or(u64::MAX),
                    token: get("token").parse().unwrap_or(0),
                    entered: get("entered") == "ok",
                    written: get("written").to_string(),
                    lost_before_write: get("lost_before_write") == "1",
                    paused: get("paused") == "1",
                    lost_fired: get("lost_fired") == "1",
                });
            }
            Some("lock_error") | Some("connect_error") => lock_errors += 1,
            Some("done") => done = true,
            _ => {}
        }
    }
    (rounds, lock_errors, done)
}

/// Starts `cfg.procs` contenders against `server`, their logs in `dir`.
fn spawn_workers(cfg: &RunConfig, server: &FenceServer, dir: &Path) -> Vec<Worker> {
    let bin = contender_bin();
    let mut workers = Vec::new();
    for i in 0..cfg.procs {
        let id = format!("w{i}");
        let out = dir.join(format!("{id}.log"));
        let err = std::fs::File::create(dir.join(format!("{id}.stderr"))).expect("stderr file");
        let mut cmd = Command::new(&bin);
        cmd.arg("--fence")
            .arg(server.addr())
            .arg("--id")
            .arg(&id)
            .arg("--out")
            .arg(&out)
            .arg("--rounds")
            .arg(cfg.rounds.to_string())
            .arg("--pause-ms")
            .arg(cfg.pause.as_millis().to_string())
            .arg("--ttl-ms")
            .arg(cfg.ttl.as_millis().to_string())
            .arg("--lock")
            .arg(&cfg.lock)
            .arg("--give-up-s")
            .arg("120");
        if cfg.no_lock {
            cmd.arg("--no-lock");
        } else {
            cmd.arg("--url").arg(&cfg.url);
        }
        if cfg.slow_every > 0 {
            cmd.arg("--slow-every")
                .arg(cfg.slow_every.to_string())
                .arg("--slow-ms")
                .arg(cfg.slow.as_millis().to_string());
        }
        if cfg.gather > 0 {
            cmd.arg("--gather")
                .arg(cfg.gather.to_string())
                .arg("--gather-ms")
                .arg(cfg.gather_for.as_millis().to_string());
        }
        match cfg.recipe {
            None => {}
            Some(Recipe::Semaphore { permits }) => {
                cmd.arg("--permits").arg(permits.to_string());
            }
            Some(Recipe::RwLock { mode, write_every }) => {
                cmd.arg("--rw")
                    .arg(mode.as_str())
                    .arg("--write-every")
                    .arg(write_every.to_string());
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start contender");
        // Recorded for the reaper: the command line names the run directory.
        if let Ok(mut reg) = std::fs::OpenOptions::new()
            .append(true)
            .open(super::base_dir().join("pids"))
        {
            use std::io::Write;
            let _ = writeln!(reg, "{}", child.id());
        }
        workers.push(Worker {
            id,
            child,
            out,
            exit: None,
        });
    }
    workers
}

/// Waits for every worker not yet reaped to finish by `deadline` (killing those still running
/// then); one violation per worker that did not finish.
fn wait_workers(workers: &mut [Worker], deadline: Instant, bound: Duration) -> Vec<String> {
    let mut violations = Vec::new();
    for w in workers.iter_mut() {
        if w.exit.is_some() {
            continue;
        }
        w.exit = Some(
            super::wait_child(&mut w.child, deadline).unwrap_or_else(|| {
                violations.push(format!("{} did not finish within {bound:?}", w.id));
                std::process::ExitStatus::default()
            }),
        );
    }
    violations
}

/// Runs the contenders, injecting `faults` one after another once the run is under way.
pub fn run(cfg: &RunConfig, faults: Vec<Fault>) -> RunReport {
    assert!(cfg.recipe.is_none(), "recipe runs go through run_recipe");
    contender_bin();
    let dir = super::fresh_dir(&format!("contention-{}", cfg.label));
    let server = FenceServer::start();
    let started = Instant::now();
    let mut workers = spawn_workers(cfg, &server, &dir);

    let mut report = RunReport {
        label: cfg.label.clone(),
        procs: cfg.procs,
        rounds_planned: cfg.rounds,
        ..Default::default()
    };
    let mut killed: HashSet<String> = HashSet::new();
    let mut victims: Vec<Entered> = Vec::new();
    let lapse = cfg.ttl * cfg.expiry_factor.max(1);
    let takeover_bound = lapse + Duration::from_secs(30);

    if !faults.is_empty() {
        // Let contention get going first.
        server.wait_for(Duration::from_secs(60), |s| {
            s.entries.len() >= 2 * cfg.procs
        });
    }
    for fault in faults {
        match fault {
            Fault::KillHolder => {
                let Some(h) = wait_slow_holder(&server, &killed, Duration::from_secs(60)) else {
                    report
                        .violations
                        .push("kill: no process announced a long critical section".into());
                    continue;
                };
                if let Some(w) = workers.iter_mut().find(|w| w.id == h.worker) {
                    w.signal(libc::SIGKILL);
                    let _ = w.child.wait();
                    w.exit = Some(std::process::ExitStatus::default());
                }
                killed.insert(h.worker.clone());
                let t0 = Instant::now();
                let taken = server.wait_for(takeover_bound, |s| {
                    s.highest_entry().is_some_and(|t| t > h.token)
                });
                report.faults.push(format!(
                    "SIGKILL {} holding token {}: lock taken over in {:.2}s",
                    h.worker,
                    h.token,
                    t0.elapsed().as_secs_f64()
                ));
                if !taken {
                    report.violations.push(format!(
                        "nobody took the lock within {takeover_bound:?} after {} was killed",
                        h.worker
                    ));
                }
            }
            Fault::PauseHolder => {
                let Some(h) = wait_slow_holder(&server, &killed, Duration::from_secs(60)) else {
                    report
                        .violations
                        .push("pause: no process announced a long critical section".into());
                    continue;
                };
                let Some(w) = workers.iter().find(|w| w.id == h.worker) else {
                    continue;
                };
                w.signal(libc::SIGSTOP);
                let t0 = Instant::now();
                // Past the TTL, and until someone else has entered with a newer token.
                std::thread::sleep(lapse);
                let taken = server.wait_for(takeover_bound, |s| {
                    s.highest_entry().is_some_and(|t| t > h.token)
                });
                let stopped_for = t0.elapsed();
                w.signal(libc::SIGCONT);
                report.faults.push(format!(
                    "SIGSTOP {} holding token {} for {:.2}s (TTL {:?}), then SIGCONT",
                    h.worker,
                    h.token,
                    stopped_for.as_secs_f64(),
                    cfg.ttl
                ));
                if !taken {
                    report.violations.push(format!(
                        "nobody took the lock while {} was stopped for {stopped_for:?}",
                        h.worker
                    ));
                }
                victims.push(h);
            }
            Fault::Custom(what, mut f) => {
                let result = f();
                report.faults.push(format!("{what}: {result}"));
            }
        }
    }

    // Wait for every process to finish.
    let unfinished = wait_workers(&mut workers, started + cfg.deadline, cfg.deadline);
    report.violations.extend(unfinished);
    report.elapsed = started.elapsed();
    // The fence server's threads see the closed connections a moment later.
    std::thread::sleep(Duration::from_millis(100));
    let state = server.snapshot();
    analyse(cfg, &workers, &killed, &victims, &state, &mut report);
    report
}

fn wait_slow_holder(
    server: &FenceServer,
    excluded: &HashSet<String>,
    timeout: Duration,
) -> Option<Entered> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Some(h) = server
            .slow_holders()
            .into_iter()
            .find(|h| !excluded.contains(&h.worker))
        {
            return Some(h);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn analyse(
    cfg: &RunConfig,
    workers: &[Worker],
    killed: &HashSet<String>,
    victims: &[Entered],
    state: &FenceState,
    report: &mut RunReport,
) {
    let faulty = !killed.is_empty() || !victims.is_empty() || !report.faults.is_empty();
    let mut all: Vec<Round> = Vec::new();
    for w in workers {
        let text = std::fs::read_to_string(&w.out).unwrap_or_default();
        let (rounds, errors, done) = parse_rounds(&w.id, &text);
        report.lock_errors += errors;
        all.extend(rounds);
        if !killed.contains(&w.id) {
            let ok = w.exit.is_some_and(|s| s.success());
            if !ok || !done {
                let err =
                    std::fs::read_to_string(w.out.with_extension("stderr")).unwrap_or_default();
                report.violations.push(format!(
                    "{} ended with {:?} (done: {done}); last lines: {:?}; stderr: {err}",
                    w.id,
                    w.exit,
                    text.lines().rev().take(3).collect::<Vec<_>>()
                ));
            }
        }
    }
    report.rounds_done = all.len();
    report.writes_accepted = state.writes.len();
    report.stale_rejected = all.iter().filter(|r| r.written == "stale").count();
    report.lost_before_write = all.iter().filter(|r| r.lost_before_write).count();
    report.final_value = state.value;

    if state.value != state.writes.len() as i64 {
        report.violations.push(format!(
            "final count {} but {} writes were accepted",
            state.value,
            state.writes.len()
        ));
    }
    if !faulty {
        let expected = cfg.procs as i64 * cfg.rounds as i64;
        if state.value != expected {
            report.violations.push(format!(
                "final count {} but {} processes x {} rounds = {expected}",
                state.value, cfg.procs, cfg.rounds
            ));
        }
    }
    let lost = state.lost_updates();
    if lost > 0 {
        report
            .violations
            .push(format!("{lost} accepted writes lost an update"));
    }
    for r in state.rejected.iter().filter(|r| r.op == "read") {
        report.violations.push(format!(
            "{} acquired token {} but the resource had already seen {}: tokens not increasing",
            r.worker, r.token, r.highest
        ));
    }
    for (prev, next) in &state.order_violations {
        report.violations.push(format!(
            "critical-section entries out of token order: {next} after {prev}"
        ));
    }
    if !cfg.no_lock {
        let mut seen: HashMap<u64, &str> = HashMap::new();
        for r in &all {
            if let Some(other) = seen.insert(r.token, &r.worker) {
                report.violations.push(format!(
                    "token {} reported twice ({} and {})",
                    r.token, other, r.worker
                ));
            }
        }
        let entered: HashSet<u64> = state.entries.iter().map(|e| e.token).collect();
        for r in all.iter().filter(|r| r.entered) {
            if !entered.contains(&r.token) {
                report.violations.push(format!(
                    "{} round {} token {} is missing from the resource's entries",
                    r.worker, r.round, r.token
                ));
            }
        }
    }
    // Overlaps: explained only by a lapsed lock.
    let lapsed: HashSet<u64> = all
        .iter()
        .filter(|r| r.paused || r.lost_before_write || r.written == "stale")
        .map(|r| r.token)
        .chain(victims.iter().map(|v| v.token))
        .collect();
    report.overlaps = state.overlaps.len();
    for o in &state.overlaps {
        if !cfg.no_lock && o.inside.iter().all(|e| lapsed.contains(&e.token)) {
            report.overlaps_explained += 1;
        } else {
            report.violations.push(format!(
                "{} entered with token {} while {:?} were inside",
                o.entering.worker, o.entering.token, o.inside
            ));
        }
    }
    if !faulty && (report.lost_before_write > 0 || report.stale_rejected > 0) {
        report.violations.push(format!(
            "without faults, {} locks were lost and {} writes refused",
            report.lost_before_write, report.stale_rejected
        ));
    }
    for v in victims {
        match all.iter().find(|r| r.token == v.token) {
            None => report.violations.push(format!(
                "paused {} (token {}) left no record of its round",
                v.worker, v.token
            )),
            Some(r) => {
                if !(r.paused && r.lost_fired && r.lost_before_write) {
                    report.violations.push(format!(
                        "paused {} resumed without lost() firing before its write: {r:?}",
                        v.worker
                    ));
                }
                if r.written != "stale" {
                    report.violations.push(format!(
                        "paused {}'s write with the old token {} was not refused: {r:?}",
                        v.worker, v.token
                    ));
                }
            }
        }
    }
}

/// Writes the report to `target/reliability/<label>.txt` (figures for the docs) and prints it.
pub fn publish(report: &RunReport) {
    println!("{report}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or(dir)
        .join("reliability");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(
            dir.join(format!("{}.txt", report.label.replace('/', "-"))),
            format!("{report}\n"),
        );
    }
}

/// What a recipe run did and found.
#[derive(Debug, Clone, Default)]
pub struct RecipeReport {
    pub label: String,
    pub recipe: String,
    pub procs: usize,
    pub rounds_planned: u64,
    /// Rounds the contenders reported, and by kind of hold.
    pub rounds_done: usize,
    pub reads: usize,
    pub writes: usize,
    pub permits: usize,
    pub lock_errors: usize,
    pub release_errors: usize,
    /// Rounds whose hold was already lost when they left.
    pub lost: usize,
    /// The most holders inside at once, and the most readers.
    pub max_holders: usize,
    pub max_readers: usize,
    /// Reads that began while another reader was inside.
    pub reader_overlaps: usize,
    /// Rounds (permits and reads) that saw `gather` holders inside before they left.
    pub gathered: usize,
    /// The semaphore slots that were used.
    pub slots: Vec<u32>,
    pub violations: Vec<String>,
    pub elapsed: Duration,
}

impl std::fmt::Display for RecipeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] {} {} processes x {} rounds: {} rounds done ({} permits, {} reads, {} writes), \
             max holders {}, max readers {}, reader overlaps {}, {} rounds saw the holders \
             gathered, slots {:?}, {} lock errors retried, {} release errors, {} lost, \
             violations {} in {:.1}s",
            self.label,
            self.recipe,
            self.procs,
            self.rounds_planned,
            self.rounds_done,
            self.permits,
            self.reads,
            self.writes,
            self.max_holders,
            self.max_readers,
            self.reader_overlaps,
            self.gathered,
            self.slots,
            self.lock_errors,
            self.release_errors,
            self.lost,
            self.violations.len(),
            self.elapsed.as_secs_f64()
        )?;
        for v in self.violations.iter().take(10) {
            write!(f, "\n  VIOLATION: {v}")?;
        }
        if self.violations.len() > 10 {
            write!(f, "\n  ... and {} more", self.violations.len() - 10)?;
        }
        Ok(())
    }
}

/// Runs contenders that take `cfg.recipe` (without faults) and checks the fence server's
/// occupancy record and their logs.
///
/// Violations: whatever the occupancy record flags (two holders of a slot, a writer with
/// anyone else, tokens out of order), a contender that did not finish all its rounds, a round
/// the record does not have, a lost hold or a failed release (there are no faults).
pub fn run_recipe(cfg: &RunConfig) -> RecipeReport {
    let recipe = cfg.recipe.expect("run_recipe needs cfg.recipe");
    assert_eq!(cfg.slow_every, 0, "recipe runs have no slow rounds");
    contender_bin();
    let dir = super::fresh_dir(&format!("recipe-{}", cfg.label));
    let server = FenceServer::start();
    let started = Instant::now();
    let mut workers = spawn_workers(cfg, &server, &dir);
    let mut report = RecipeReport {
        label: cfg.label.clone(),
        recipe: match recipe {
            Recipe::Semaphore { permits } => format!("semaphore of {permits} permits,"),
            Recipe::RwLock { mode, write_every } => match mode {
                RwMode::Mixed => format!("rwlock, a write every {write_every} rounds,"),
                m => format!("rwlock, {} only,", m.as_str()),
            },
        },
        procs: cfg.procs,
        rounds_planned: cfg.rounds,
        ..Default::default()
    };
    report.violations = wait_workers(&mut workers, started + cfg.deadline, cfg.deadline);
    report.elapsed = started.elapsed();
    // The fence server's threads see the closed connections a moment later.
    std::thread::sleep(Duration::from_millis(100));
    let occ: Occupancy = server.snapshot().occupancy;
    report.max_holders = occ.max_holders;
    report.max_readers = occ.max_readers;
    report.reader_overlaps = occ.reader_overlaps;
    report.slots = occ.slots.iter().copied().collect();
    report.violations.extend(occ.violations.iter().cloned());
    for w in &workers {
        let text = std::fs::read_to_string(&w.out).unwrap_or_default();
        let mut done = false;
        let mut rounds = 0u64;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let get = |k: &str| {
                f.iter()
                    .position(|x| *x == k)
                    .and_then(|i| f.get(i + 1))
                    .copied()
                    .unwrap_or("")
            };
            match f.first().copied() {
                Some("round") => {
                    if get("round").parse() != Ok(rounds) {
                        report
                            .violations
                            .push(format!("{}: rounds out of order at {line:?}", w.id));
                    }
                    rounds += 1;
                    report.rounds_done += 1;
                    match get("kind") {
                        "sem" => report.permits += 1,
                        "read" => report.reads += 1,
                        "write" => report.writes += 1,
                        k => report
                            .violations
                            .push(format!("{}: unknown kind {k:?} in {line:?}", w.id)),
                    }
                    if get("lost") == "1" {
                        report.lost += 1;
                    }
                    if cfg.gather > 0 && get("inside").parse::<usize>().unwrap_or(0) >= cfg.gather {
                        report.gathered += 1;
                    }
                }
                Some("lock_error") | Some("connect_error") => report.lock_errors += 1,
                Some("release_error") => report.release_errors += 1,
                Some("done") => done = true,
                _ => {}
            }
        }
        let ok = w.exit.is_some_and(|s| s.success());
        if !ok || !done || rounds != cfg.rounds {
            let err = std::fs::read_to_string(w.out.with_extension("stderr")).unwrap_or_default();
            report.violations.push(format!(
                "{} ended with {:?} after {rounds} rounds (done: {done}); last lines: {:?}; \
                 stderr: {err}",
                w.id,
                w.exit,
                text.lines().rev().take(3).collect::<Vec<_>>()
            ));
        }
    }
    if occ.entries != report.rounds_done {
        report.violations.push(format!(
            "the resource saw {} holds but the contenders reported {} rounds",
            occ.entries, report.rounds_done
        ));
    }
    if report.lost > 0 || report.release_errors > 0 {
        report.violations.push(format!(
            "without faults, {} holds were lost and {} releases failed",
            report.lost, report.release_errors
        ));
    }
    if let Recipe::Semaphore { permits } = recipe {
        if report.max_holders > permits as usize {
            report.violations.push(format!(
                "{} holders inside at once, above the {permits} permits",
                report.max_holders
            ));
        }
        if let Some(s) = report.slots.iter().find(|s| **s >= permits) {
            report
                .violations
                .push(format!("slot {s} used by a semaphore of {permits} permits"));
        }
    }
    report
}

/// [`publish`] for a recipe run.
pub fn publish_recipe(report: &RecipeReport) {
    println!("{report}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or(dir)
        .join("reliability");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(
            dir.join(format!("{}.txt", report.label.replace('/', "-"))),
            format!("{report}\n"),
        );
    }
}
