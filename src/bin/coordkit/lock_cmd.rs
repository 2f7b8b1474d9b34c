//! `coordkit lock NAME -- CMD`: run a command while holding a lock, a permit of a semaphore
//! (`--permits N`) or a side of a read-write lock (`--shared`, `--exclusive`); `coordkit elect
//! NAME -- CMD`: run a command while leader of an election (the same runner, with the
//! leadership's term as the fencing token).
//!
//! CMD runs in a process group of its own, and the lock covers that whole group: when CMD
//! exits, the processes it left behind in the group get `SIGTERM` (then `SIGKILL` after
//! `--kill-after`), and the lock is released only once no process of the group runs any more.
//! The same happens when the lock is lost, and on every other way out of `coordkit` while CMD
//! runs (a failure, or an unwinding panic, which sends `SIGKILL`).

use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::process::ExitStatus;
use std::time::Duration;

use coordkit::config_file::format_duration;
use coordkit::lease::deadline_after;
use coordkit::{
    Backend, DistRwLock, DistSemaphore, ErrorKind, FencingToken, LeaderGuard, LockGuard,
    LockOptions,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::exit::{
    CliError, CANNOT_EXECUTE, FAILED, LOCK_LOST, LOCK_TIMEOUT, NOT_FOUND_CMD, SIGNAL_BASE,
};

/// The environment variable holding the fencing token for CMD.
pub const TOKEN_ENV: &str = "COORDKIT_FENCING_TOKEN";
/// The environment variable holding the lock's name for CMD.
pub const NAME_ENV: &str = "COORDKIT_LOCK_NAME";
/// The environment variable holding the slot of the permit CMD runs under (`--permits`).
pub const SLOT_ENV: &str = "COORDKIT_PERMIT_SLOT";

/// Extra time, beyond `--wait`, granted to a backend to report its own timeout.
const WAIT_GRACE: Duration = Duration::from_secs(5);
/// Bound on releasing the lock after CMD exits.
const RELEASE_BOUND: Duration = Duration::from_secs(10);
/// Bound on the background withdrawal of an abandoned lock attempt (one backend request, with
/// its retries).
const WITHDRAW_BOUND: Duration = Duration::from_secs(10);
/// How long the runtime running a withdrawal must stay idle (its worker parked, nothing waking
/// it) for the withdrawal to count as done although tasks remain (see [`abandon`]).
const WITHDRAW_QUIET: Duration = Duration::from_millis(500);
/// How often CMD's process group is checked for members once CMD itself has exited.
const GROUP_POLL: Duration = Duration::from_millis(20);
/// How long members of CMD's group may survive `SIGKILL` (stuck in the kernel, where they run
/// no more of their own code) before coordkit stops waiting for them.
const KILLED_BOUND: Duration = Duration::from_secs(10);

/// What CMD runs under: a lock's guard or a leadership's.
pub trait Held: Send + 'static {
    /// The lock's or election's name.
    fn name(&self) -> &str;
    /// The fencing token (a leadership's term).
    fn token(&self) -> FencingToken;
    /// The slot of a semaphore's permit; `None` for everything else.
    fn slot(&self) -> Option<u32> {
        None
    }
    /// Whether it may no longer be held.
    fn is_lost(&self) -> bool;
    /// Resolves once it may no longer be held.
    fn lost(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
    /// Releases (resigns).
    fn release(self) -> Pin<Box<dyn Future<Output = coordkit::Result<()>> + Send + 'static>>;
}

/// What `lock` takes of NAME.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hold {
    /// The lock NAME.
    #[default]
    Lock,
    /// One of the given number of permits of the semaphore NAME.
    Permits(u32),
    /// The shared (read) side of the read-write lock NAME.
    Shared,
    /// The exclusive (write) side of the read-write lock NAME.
    Exclusive,
}

impl Hold {
    /// What is taken of `name`, as messages say it.
    pub fn describe(self, name: &str) -> String {
        match self {
            Hold::Lock => format!("lock {name:?}"),
            Hold::Permits(_) => format!("a permit of semaphore {name:?}"),
            Hold::Shared => format!("read-write lock {name:?} (shared)"),
            Hold::Exclusive => format!("read-write lock {name:?} (exclusive)"),
        }
    }
}

/// A hold taken by [`acquire`]: its guard, under the name CMD is given, and a permit's slot.
pub struct Taken {
    guard: LockGuard,
    name: String,
    slot: Option<u32>,
}

impl Held for Taken {
    fn name(&self) -> &str {
        &self.name
    }
    fn token(&self) -> FencingToken {
        self.guard.token()
    }
    fn slot(&self) -> Option<u32> {
        self.slot
    }
    fn is_lost(&self) -> bool {
        self.guard.is_lost()
    }
    fn lost(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(self.guard.lost())
    }
    fn release(self) -> Pin<Box<dyn Future<Output = coordkit::Result<()>> + Send + 'static>> {
        Box::pin(self.guard.release())
    }
}

impl Held for LeaderGuard {
    fn name(&self) -> &str {
        LeaderGuard::name(self)
    }
    fn token(&self) -> FencingToken {
        self.term()
    }
    fn is_lost(&self) -> bool {
        LeaderGuard::is_lost(self)
    }
    fn lost(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        LeaderGuard::lost(self)
    }
    fn release(self) -> Pin<Box<dyn Future<Output = coordkit::Result<()>> + Send + 'static>> {
        Box::pin(self.resign())
    }
}

/// What `lock` runs.
#[derive(Debug, Clone)]
pub struct LockJob {
    /// The lock's name (the semaphore's, the read-write lock's).
    pub name: String,
    /// What is taken of `name` (`elect` ignores it).
    pub hold: Hold,
    /// Lease TTL.
    pub ttl: Duration,
    /// Bound on waiting for the lock; `None` waits forever; zero only tries once. A wait too
    /// large to represent as a deadline also waits forever.
    pub wait: Option<Duration>,
    /// Grace between SIGTERM and SIGKILL for CMD's process group (after the lock is lost, or
    /// for the processes left behind when CMD exits). Too large to represent: never SIGKILL.
    pub kill_after: Duration,
    /// CMD and its arguments.
    pub command: Vec<String>,
}

/// The exit code for a finished CMD: its status, or 128 + the signal that killed it.
pub fn status_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => SIGNAL_BASE + sig,
        (None, None) => SIGNAL_BASE,
    }
}

/// The name of a signal coordkit handles, for messages.
fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        other => format!("signal {other}"),
    }
}

/// The error for a signal that ended `lock` before CMD started: exit 128 + the signal.
/// `held` is what was being taken, as [`Hold::describe`] says it.
fn interrupted(sig: i32, held: &str, what: &str) -> CliError {
    CliError::new(
        SIGNAL_BASE + sig,
        "interrupted",
        format!("interrupted by {} {what} {held}", signal_name(sig)),
    )
}

/// Drops an unfinished lock attempt, which withdraws it (the backends delete a queued key or
/// node in background tasks they spawn when the attempt's future is dropped), and waits,
/// bounded, until that withdrawal has finished, so that coordkit does not end its runtime (and
/// the withdrawal with it) half way. A signal received meanwhile stops waiting.
///
/// The attempt is dropped inside a runtime of its own, so that the tasks its drop spawns, and
/// only those, run there: the withdrawal is over when that runtime has no task left.
async fn abandon<F>(attempt: F, signals: Option<&mut mpsc::UnboundedReceiver<i32>>) {
    let side = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("coordkit-withdraw")
        .enable_all()
        .build();
    let side = match side {
        Ok(rt) => rt,
        Err(e) => {
            tracing::debug!(error = %e, "no runtime for the withdrawal; giving it a moment");
            drop(attempt);
            tokio::time::sleep(Duration::from_secs(1)).await;
            return;
        }
    };
    {
        let _in_side = side.enter();
        drop(attempt);
    }
    let metrics = side.metrics();
    // Over when no task is left there; or when the side runtime's one worker has been parked,
    // with nothing waking it, for a while: what remains then waits on nothing that comes soon,
    // such as a pooled HTTP connection that the withdrawal opened (it would linger for the
    // pool's idle timeout), or a server that does not answer.
    let settled = async {
        let mut last = None;
        let mut still_since = Instant::now();
        loop {
            if metrics.num_alive_tasks() == 0 {
                return;
            }
            let now = parked_count(&metrics);
            if now != last {
                last = now;
                still_since = Instant::now();
            } else if now.is_some_and(|n| n % 2 == 1) && still_since.elapsed() >= WITHDRAW_QUIET {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let again = async {
        match signals {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = coordkit::lease::until(deadline_after(Some(WITHDRAW_BOUND)), settled) => {
            if r.is_none() {
                crate::exit::note!(
                    "coordkit: warning: withdrawing the lock attempt did not finish within {}; \
                     the backend drops it when its lease expires",
                    format_duration(WITHDRAW_BOUND)
                );
            }
        }
        _ = again => {}
    }
    side.shutdown_background();
}

/// The park/unpark count of the runtime's first worker: odd while it is parked. `None` where
/// the count is not kept.
#[cfg(target_has_atomic = "64")]
fn parked_count(metrics: &tokio::runtime::RuntimeMetrics) -> Option<u64> {
    (metrics.num_workers() > 0).then(|| metrics.worker_park_unpark_count(0))
}

#[cfg(not(target_has_atomic = "64"))]
fn parked_count(_metrics: &tokio::runtime::RuntimeMetrics) -> Option<u64> {
    None
}

/// Takes `job.hold` of `job.name`, waiting as `opts.wait` says.
async fn take(b: &dyn Backend, job: &LockJob, opts: &LockOptions) -> coordkit::Result<Taken> {
    let name = job.name.as_str();
    let taken = |guard, slot| Taken {
        guard,
        name: name.to_string(),
        slot,
    };
    Ok(match job.hold {
        Hold::Lock => taken(b.lock(name, opts).await?, None),
        Hold::Permits(n) => {
            let permit = DistSemaphore::acquire(b, name, n, opts).await?;
            let slot = permit.slot();
            taken(permit.into_guard(), Some(slot))
        }
        Hold::Shared => taken(DistRwLock::read(b, name, opts).await?, None),
        Hold::Exclusive => taken(DistRwLock::write(b, name, opts).await?, None),
    })
}

/// Tries once to take `job.hold` of `job.name`: `None` when others hold it.
///
/// A recipe tried once reports "held by others" as a `Timeout` of its own (from coordkit, not
/// from the backend); a `Timeout` from the backend is a request that got no answer.
async fn take_once(
    b: &dyn Backend,
    job: &LockJob,
    opts: &LockOptions,
) -> coordkit::Result<Option<Taken>> {
    if job.hold == Hold::Lock {
        return Ok(b.try_lock(&job.name, opts).await?.map(|guard| Taken {
            guard,
            name: job.name.clone(),
            slot: None,
        }));
    }
    match take(b, job, &opts.clone().wait(Duration::ZERO)).await {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.is(ErrorKind::Timeout) && e.backend() == "coordkit" => Ok(None),
        Err(e) => Err(e),
    }
}

/// Acquires what `job.hold` says (the lock, a permit of the semaphore, a side of the
/// read-write lock), honouring `--wait`.
///
/// Exit 124 only when the wait really ran out; a backend request that got no answer before
/// that (a `Timeout` error while time was left) is exit 1 with a message saying so.
pub async fn acquire(b: &dyn Backend, job: &LockJob) -> Result<Taken, CliError> {
    let opts = LockOptions::new().ttl(job.ttl);
    let held = job.hold.describe(&job.name);
    let timed_out = |w: Duration| {
        CliError::new(
            LOCK_TIMEOUT,
            "lock timeout",
            format!("{held} was not acquired within {}", format_duration(w)),
        )
    };
    let started = Instant::now();
    let no_answer = |e: coordkit::Error| {
        let e = CliError::from(e);
        CliError::new(
            FAILED,
            "timeout",
            format!(
                "the backend did not answer while acquiring {held} (after {}): {}",
                format_duration(started.elapsed()),
                e.message
            ),
        )
    };
    match job.wait {
        Some(w) if w.is_zero() => match take_once(b, job, &opts).await {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(timed_out(w)),
            Err(e) if e.is(ErrorKind::Timeout) => Err(no_answer(e)),
            Err(e) => Err(e.into()),
        },
        // A wait too large to represent as a deadline waits without bound.
        Some(w) if deadline_after(Some(w)).is_some() => {
            let opts = opts.wait(w);
            let mut attempt = Box::pin(take(b, job, &opts));
            let bound = deadline_after(w.checked_add(WAIT_GRACE));
            let result = coordkit::lease::until(bound, &mut attempt).await;
            match result {
                None => {
                    abandon(attempt, None).await;
                    Err(timed_out(w))
                }
                Some(Err(e)) if e.is(ErrorKind::Timeout) => {
                    if started.elapsed() >= w {
                        Err(timed_out(w))
                    } else {
                        Err(no_answer(e))
                    }
                }
                Some(r) => r.map_err(CliError::from),
            }
        }
        _ => match take(b, job, &opts).await {
            Ok(t) => Ok(t),
            Err(e) if e.is(ErrorKind::Timeout) => Err(no_answer(e)),
            Err(e) => Err(e.into()),
        },
    }
}

/// [`acquire`], abandoned when coordkit receives a signal: the attempt is withdrawn and the
/// result is exit 128 + the signal (130 for SIGINT, 143 for SIGTERM).
pub async fn acquire_interruptible(
    b: &dyn Backend,
    job: &LockJob,
    signals: &mut mpsc::UnboundedReceiver<i32>,
) -> Result<Taken, CliError> {
    let held = job.hold.describe(&job.name);
    interruptible(acquire(b, job), &held, signals).await
}

/// Awaits an acquisition of `held` (as [`Hold::describe`] says it), abandoned (withdrawn) when
/// coordkit receives a signal.
async fn interruptible<G, F>(
    attempt: F,
    held: &str,
    signals: &mut mpsc::UnboundedReceiver<i32>,
) -> Result<G, CliError>
where
    F: Future<Output = Result<G, CliError>>,
{
    let mut attempt = Box::pin(attempt);
    let sig = tokio::select! {
        biased;
        r = &mut attempt => return r,
        sig = signals.recv() => sig,
    };
    match sig {
        // No signal handlers any more: nothing can interrupt the wait.
        None => attempt.await,
        Some(sig) => {
            abandon(attempt, Some(signals)).await;
            Err(interrupted(sig, held, "while waiting for"))
        }
    }
}

/// Makes the kernel send CMD SIGTERM if coordkit dies first (even by SIGKILL), so that CMD
/// never runs on after its lock's holder is gone. Linux only; elsewhere a no-op.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut tokio::process::Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only the
    // async-signal-safe functions prctl(2) and getppid(2).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // coordkit died between fork and prctl: do not start CMD at all.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::other(
                    "coordkit exited before the command started",
                ));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut tokio::process::Command) {}

/// CMD's process group. Dropped while still armed (an early return or a panic while CMD may
/// still run), it sends the group SIGKILL and waits a moment for it to go.
struct Group {
    pgid: Option<i32>,
    armed: bool,
}

impl Group {
    fn new(pgid: Option<u32>) -> Self {
        Group {
            pgid: pgid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 1),
            armed: true,
        }
    }

    fn signal(&self, sig: i32) {
        if let Some(pgid) = self.pgid {
            // SAFETY: kill(2) with a negative pid signals the process group of the child this
            // process started in its own group; it has no memory-safety preconditions.
            unsafe {
                libc::kill(-pgid, sig);
            }
        }
    }

    /// Whether any process of the group may still run. Zombies (exited, not yet reaped by
    /// their parent or by init) do not count: they run no code.
    fn alive(&self) -> bool {
        let Some(pgid) = self.pgid else {
            return false;
        };
        // SAFETY: as in `signal`; signal 0 only checks that the group has members.
        if unsafe { libc::kill(-pgid, 0) } != 0 {
            return std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
        }
        running_member(pgid).unwrap_or(true)
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.armed || !self.alive() {
            return;
        }
        self.signal(libc::SIGKILL);
        let give_up = std::time::Instant::now() + Duration::from_secs(2);
        while self.alive() && std::time::Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether a process of group `pgid` runs (is not a zombie), from `/proc`; `None` where that
/// cannot be told.
#[cfg(target_os = "linux")]
fn running_member(pgid: i32) -> Option<bool> {
    // The fields after the command name in /proc/PID/stat: state, ppid, pgrp, ...
    fn fields(stat: &str) -> Option<(char, i32)> {
        let (_, rest) = stat.rsplit_once(')')?;
        let mut f = rest.split_whitespace();
        let state = f.next()?.chars().next()?;
        let _ppid = f.next()?;
        Some((state, f.next()?.parse().ok()?))
    }
    let dead = |state: char| matches!(state, 'Z' | 'X' | 'x');
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Some((state, pgrp)) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .as_deref()
            .and_then(fields)
        else {
            continue;
        };
        if pgrp != pgid {
            continue;
        }
        if !dead(state) {
            return Some(true);
        }
        // A zombie main thread whose other threads still run.
        let threads = std::fs::read_dir(format!("/proc/{pid}/task")).ok();
        for t in threads.into_iter().flatten().flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            if fields(&stat).is_some_and(|(s, _)| !dead(s)) {
                return Some(true);
            }
        }
    }
    Some(false)
}

#[cfg(not(target_os = "linux"))]
fn running_member(_pgid: i32) -> Option<bool> {
    None
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs CMD under the held `guard`; forwards the signals received on `signals` to CMD's
/// process group. Returns CMD's exit code, or exit 125 if the lock was lost.
///
/// The lock is released only once CMD's whole process group is gone: processes CMD left
/// behind get SIGTERM when CMD exits, and SIGKILL `kill_after` later.
pub async fn run_under<G: Held>(
    guard: G,
    job: &LockJob,
    mut signals: mpsc::UnboundedReceiver<i32>,
) -> Result<i32, CliError> {
    let held = job.hold.describe(&job.name);
    let Some((program, args)) = job.command.split_first() else {
        release(guard, &held).await;
        return Err(CliError::usage("lock: no command given after '--'"));
    };
    // A signal that came while the lock was being granted: do not start CMD.
    if let Ok(sig) = signals.try_recv() {
        release(guard, &held).await;
        return Err(interrupted(sig, &held, "after acquiring"));
    }
    // The lock may have been lost since it was granted: never start CMD without it.
    if guard.is_lost() {
        release(guard, &held).await;
        return Err(CliError::new(
            LOCK_LOST,
            "lock lost",
            format!("{held} was lost before the command started; the command was not run"),
        ));
    }
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env(TOKEN_ENV, guard.token().to_string())
        .env(NAME_ENV, guard.name())
        .process_group(0);
    // Only a permit's holder has a slot; none is passed on from an enclosing one.
    match guard.slot() {
        Some(slot) => cmd.env(SLOT_ENV, slot.to_string()),
        None => cmd.env_remove(SLOT_ENV),
    };
    die_with_parent(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            release(guard, &held).await;
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                NOT_FOUND_CMD
            } else {
                CANNOT_EXECUTE
            };
            return Err(CliError::new(
                code,
                "command",
                format!("cannot run {program:?}: {e}"),
            ));
        }
    };
    let mut group = Group::new(child.id());
    let lost = guard.lost();
    tokio::pin!(lost);
    let mut lost_seen = false;
    let mut status: Option<std::io::Result<ExitStatus>> = None;
    // Set once coordkit has sent the group SIGTERM (on loss, or when CMD exited).
    let mut terminating = false;
    let mut kill_at: Option<Instant> = None;
    let mut killed_at: Option<Instant> = None;
    let mut signals_open = true;
    let mut poll = tokio::time::interval(GROUP_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let terminate = |kill_at: &mut Option<Instant>| {
        group.signal(libc::SIGTERM);
        // Stopped members act on SIGTERM only once continued.
        group.signal(libc::SIGCONT);
        *kill_at = deadline_after(Some(job.kill_after));
    };
    loop {
        tokio::select! {
            biased;
            r = child.wait(), if status.is_none() => {
                if r.is_err() {
                    // CMD's fate is unknown: end the group.
                    group.signal(libc::SIGKILL);
                    killed_at = Some(Instant::now());
                    kill_at = None;
                }
                status = Some(r);
                if !group.alive() {
                    break;
                }
                if !terminating {
                    crate::exit::note!(
                        "coordkit: the command exited, but processes it started still run in its \
                         process group; sending them SIGTERM (the lock is released once they are gone)"
                    );
                    terminating = true;
                    terminate(&mut kill_at);
                }
            }
            _ = &mut lost, if !lost_seen => {
                lost_seen = true;
                crate::exit::note!(
                    "coordkit: {held} lost while the command ran; sending SIGTERM to its process group"
                );
                if !terminating {
                    terminating = true;
                    terminate(&mut kill_at);
                }
            }
            _ = sleep_until(kill_at), if kill_at.is_some() => {
                crate::exit::note!(
                    "coordkit: the command's process group did not exit within {} of SIGTERM; \
                     sending SIGKILL",
                    format_duration(job.kill_after)
                );
                group.signal(libc::SIGKILL);
                kill_at = None;
                killed_at = Some(Instant::now());
            }
            sig = signals.recv(), if signals_open => match sig {
                Some(sig) => group.signal(sig),
                None => signals_open = false,
            },
            _ = poll.tick(), if status.is_some() => {
                if !group.alive() {
                    break;
                }
                if killed_at.is_some_and(|k| k.elapsed() >= KILLED_BOUND) {
                    crate::exit::note!(
                        "coordkit: warning: processes of the command's group still exist {} after \
                         SIGKILL (stuck in the kernel); releasing the lock",
                        format_duration(KILLED_BOUND)
                    );
                    break;
                }
            }
        }
    }
    group.disarm();
    // The loop ends only once the command was waited for.
    let status = match status.unwrap_or_else(|| Err(std::io::Error::other("not waited for"))) {
        Ok(s) => s,
        Err(e) => {
            release(guard, &held).await;
            return Err(CliError::new(
                FAILED,
                "command",
                format!("waiting for the command failed: {e}"),
            ));
        }
    };
    let code = status_code(status);
    if lost_seen || guard.is_lost() {
        release(guard, &held).await;
        return Err(CliError::new(
            LOCK_LOST,
            "lock lost",
            format!(
                "{held} was lost while the command ran (the command exited with status {code})"
            ),
        ));
    }
    release(guard, &held).await;
    Ok(code)
}

/// Releases `guard`, which holds `held` (as [`Hold::describe`] says it); failures are warnings.
async fn release<G: Held>(guard: G, held: &str) {
    let was_lost = guard.is_lost();
    match tokio::time::timeout(RELEASE_BOUND, guard.release()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if was_lost && e.is(ErrorKind::LockLost) => {}
        Ok(Err(e)) => crate::exit::note!("coordkit: warning: releasing {held}: {e}"),
        Err(_) => crate::exit::note!(
            "coordkit: warning: releasing {held} timed out; its lease will expire by itself"
        ),
    }
}

/// Acquires and runs: what `coordkit lock` does.
pub async fn run(
    b: &dyn Backend,
    job: &LockJob,
    mut signals: mpsc::UnboundedReceiver<i32>,
) -> Result<i32, CliError> {
    let guard = acquire_interruptible(b, job, &mut signals).await?;
    tracing::info!(
        lock = %job.name,
        hold = ?job.hold,
        token = guard.token().get(),
        slot = guard.slot(),
        "lock acquired"
    );
    run_under(guard, job, signals).await
}

/// Campaigns for the election `job.name` with `value`, honouring `--wait` as [`acquire`]
/// does (exit 124 when the wait ran out).
pub async fn campaign(
    b: &dyn Backend,
    job: &LockJob,
    value: &[u8],
) -> Result<LeaderGuard, CliError> {
    let opts = LockOptions::new().ttl(job.ttl);
    let timed_out = |w: Duration| {
        CliError::new(
            LOCK_TIMEOUT,
            "election timeout",
            format!(
                "not elected leader of {:?} within {}",
                job.name,
                format_duration(w)
            ),
        )
    };
    match job.wait {
        Some(w) if deadline_after(Some(w)).is_some() => {
            let opts = opts.wait(w);
            let mut attempt = Box::pin(b.campaign(&job.name, value.to_vec(), &opts));
            let bound = deadline_after(w.checked_add(WAIT_GRACE));
            match coordkit::lease::until(bound, &mut attempt).await {
                None => {
                    abandon(attempt, None).await;
                    Err(timed_out(w))
                }
                Some(Err(e)) if e.is(ErrorKind::Timeout) => Err(timed_out(w)),
                Some(r) => r.map_err(CliError::from),
            }
        }
        _ => b
            .campaign(&job.name, value.to_vec(), &opts)
            .await
            .map_err(CliError::from),
    }
}

/// Campaigns and runs CMD while leader: what `coordkit elect` does.
pub async fn run_elect(
    b: &dyn Backend,
    job: &LockJob,
    value: &[u8],
    mut signals: mpsc::UnboundedReceiver<i32>,
) -> Result<i32, CliError> {
    let held = Hold::Lock.describe(&job.name);
    let guard = interruptible(campaign(b, job, value), &held, &mut signals).await?;
    tracing::info!(election = %job.name, term = guard.term().get(), "elected leader");
    run_under(guard, job, signals).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordkit::MemoryStore;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    fn job(name: &str, cmd: &[&str]) -> LockJob {
        LockJob {
            name: name.into(),
            hold: Hold::Lock,
            ttl: Duration::from_secs(5),
            wait: None,
            kill_after: Duration::from_secs(5),
            command: cmd.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn no_signals() -> mpsc::UnboundedReceiver<i32> {
        mpsc::unbounded_channel().1
    }

    fn temp_dir(what: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("coordkit-lockcmd-{}-{what}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Whether process `pid` runs: exists and is not a zombie.
    fn running(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    }

    async fn read_pid(path: &Path) -> i32 {
        for _ in 0..500 {
            if let Some(pid) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no pid in {}", path.display());
    }

    /// A shell command that starts a grandchild ignoring SIGTERM (its pid in `pidfile`), then
    /// runs `then`.
    fn stubborn_grandchild(pidfile: &Path, then: &str) -> String {
        // The pid file appears only once the grandchild ignores SIGTERM, and `then` runs only
        // after that.
        format!(
            "sh -c 'trap \"\" TERM; echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 300 </dev/null >/dev/null 2>&1' & \
             while [ ! -s {p} ]; do sleep 0.05; done; {then}",
            p = pidfile.display()
        )
    }

    /// `elect` runs CMD while leader, with the term in the environment and the value
    /// published; it resigns when CMD exits, and a second `elect` behind a leader times out
    /// with exit 124.
    #[tokio::test]
    async fn elect_runs_the_command_while_leader() {
        let b: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let dir = temp_dir("elect");
        let out = dir.join("term");
        let script = format!(
            "echo \"$COORDKIT_FENCING_TOKEN $COORDKIT_LOCK_NAME\" > {}; exit 5",
            out.display()
        );
        let code = run_elect(
            &*b,
            &job("e/a", &["sh", "-c", &script]),
            b"me",
            no_signals(),
        )
        .await
        .unwrap();
        assert_eq!(code, 5);
        let text = std::fs::read_to_string(&out).unwrap();
        let (term, name) = text.trim().split_once(' ').unwrap();
        assert!(term.parse::<u64>().unwrap() > 0);
        assert_eq!(name, "e/a");
        assert_eq!(b.leader("e/a").await.unwrap(), None, "resigned after CMD");
        let g = b
            .campaign("e/a", b"other".to_vec(), &LockOptions::new())
            .await
            .unwrap();
        assert!(g.term().get() > term.parse::<u64>().unwrap());
        let mut j = job("e/a", &["true"]);
        j.wait = Some(Duration::from_millis(200));
        let e = run_elect(&*b, &j, b"me", no_signals()).await.unwrap_err();
        assert_eq!(e.code, LOCK_TIMEOUT);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn passes_token_and_exit_status() {
        let b: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let dir = temp_dir("token");
        let out = dir.join("token");
        let script = format!(
            "echo \"$COORDKIT_FENCING_TOKEN $COORDKIT_LOCK_NAME\" > {}; exit 7",
            out.display()
        );
        let code = run(&*b, &job("j/a", &["sh", "-c", &script]), no_signals())
            .await
            .unwrap();
        assert_eq!(code, 7);
        let text = std::fs::read_to_string(&out).unwrap();
        let (token, name) = text.trim().split_once(' ').unwrap();
        assert!(token.parse::<u64>().unwrap() > 0);
        assert_eq!(name, "j/a");
        // Released: the lock is free again.
        assert!(b
            .try_lock("j/a", &LockOptions::new())
            .await
            .unwrap()
            .is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn missing_command_and_signals() {
        let b: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let e = run(&*b, &job("j/b", &["/nonexistent/cmd"]), no_signals())
            .await
            .unwrap_err();
        assert_eq!(e.code, NOT_FOUND_CMD);
        assert!(b
            .try_lock("j/b", &LockOptions::new())
            .await
            .unwrap()
            .is_some());
        let code = run(&*b, &job("j/c", &["sh", "-c", "kill -9 $$"]), no_signals())
            .await
            .unwrap();
        assert_eq!(code, SIGNAL_BASE + 9);
        // Signals that come once CMD runs are forwarded to it.
        let (tx, rx) = mpsc::unbounded_channel();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.send(libc::SIGTERM).unwrap();
            tx
        });
        let code = run(&*b, &job("j/d", &["sleep", "30"]), rx).await.unwrap();
        assert_eq!(code, SIGNAL_BASE + libc::SIGTERM);
        drop(sender.await.unwrap());
    }

    #[tokio::test]
    async fn wait_runs_out_and_lost_lock_stops_the_command() {
        let b: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let held = b.lock("j/e", &LockOptions::new()).await.unwrap();
        let mut j = job("j/e", &["true"]);
        j.wait = Some(Duration::from_millis(200));
        assert_eq!(
            run(&*b, &j, no_signals()).await.unwrap_err().code,
            LOCK_TIMEOUT
        );
        j.wait = Some(Duration::ZERO);
        assert_eq!(
            run(&*b, &j, no_signals()).await.unwrap_err().code,
            LOCK_TIMEOUT
        );
        drop(held);

        // The holder stops renewing: the lease lapses, the command gets SIGTERM, exit 125.
        #[cfg(feature = "test-hooks")]
        {
            let mut j = job("j/f", &["sleep", "30"]);
            j.ttl = Duration::from_millis(300);
            let guard = acquire(&*b, &j).await.unwrap();
            guard.guard.suspend_keep_alive();
            let started = std::time::Instant::now();
            let e = run_under(guard, &j, no_signals()).await.unwrap_err();
            assert_eq!(e.code, LOCK_LOST, "{e:?}");
            assert!(e.message.contains("143"), "{}", e.message);
            assert!(started.elapsed() < Duration::from_secs(10));
        }
    }

    /// CMD exits, leaving a process that ignores SIGTERM in its group: the lock is not released
    /// until that process is gone (SIGKILL after `kill_after`), and CMD's status is kept.
    #[tokio::test]
    async fn lock_covers_processes_left_behind() {
        let b: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let dir = temp_dir("left");
        let pidfile = dir.join("pid");
        let script = stubborn_grandchild(&pidfile, "exit 4");
        let mut j = job("j/g", &["sh", "-c", &script]);
        j.kill_after = Duration::from_millis(500);
        let started = Instant::now();
        let runner = {
            let (b, j) = (b.clone(), j.clone());
            tokio::spawn(async move { run(&*b, &j, no_signals()).await })
        };
        let gpid = read_pid(&pidfile).await;
        // The next holder gets the lock only once the grandchild is gone.
        let next = b.lock("j/g", &LockOptions::new()).await.unwrap();
        let grandchild_ran = running(gpid);
        let waited = started.elapsed();
        assert_eq!(runner.await.unwrap().unwrap(), 4);
        assert!(
            !grandchild_ran,
            "the lock was released while pid {gpid} ran"
        );
        assert!(waited >= Duration::from_millis(500), "{waited:?}");
        drop(next);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The lock is lost; CMD dies of the SIGTERM, but a process it started ignores SIGTERM:
    /// coordkit returns (exit 125) only once that process is gone too. Needs the `test-hooks`
    /// feature (to stop the keep-alive).
    #[cfg(feature = "test-hooks")]
    #[tokio::test]
    async fn lost_lock_ends_the_whole_group() {
        let b: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let dir = temp_dir("lost");
        let pidfile = dir.join("pid");
        let script = stubborn_grandchild(&pidfile, "wait");
        let mut j = job("j/h", &["sh", "-c", &script]);
        j.ttl = Duration::from_millis(300);
        j.kill_after = Duration::from_millis(300);
        let guard = acquire(&*b, &j).await.unwrap();
        // The holder stops renewing: the lock is lost once the TTL runs out.
        guard.guard.suspend_keep_alive();
        let runner = {
            let j = j.clone();
            tokio::spawn(async move { run_under(guard, &j, no_signals()).await })
        };
        let gpid = read_pid(&pidfile).await;
        assert!(running(gpid));
        let e = tokio::time::timeout(Duration::from_secs(20), runner)
            .await
            .expect("run_under returns")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code, LOCK_LOST, "{e:?}");
        assert!(!running(gpid), "pid {gpid} survived the lost lock");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A lock lost between its grant and the start of CMD: CMD is not run, exit 125. Needs the
    /// `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    #[tokio::test]
    async fn lost_before_start_does_not_run_the_command() {
        let b: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let dir = temp_dir("early");
        let marker = dir.join("ran");
        let script = format!("touch {}", marker.display());
        let mut j = job("j/i", &["sh", "-c", &script]);
        j.ttl = Duration::from_millis(200);
        let guard = acquire(&*b, &j).await.unwrap();
        guard.guard.suspend_keep_alive();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let e = run_under(guard, &j, no_signals()).await.unwrap_err();
        assert_eq!(e.code, LOCK_LOST, "{e:?}");
        assert!(e.message.contains("not run"), "{}", e.message);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!marker.exists(), "the command ran without the lock");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A signal while waiting for the lock ends the wait at once with 128 + the signal, and
    /// withdraws the attempt; it is not delivered to CMD later.
    #[tokio::test]
    async fn signal_while_waiting_withdraws() {
        let b: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let held = b.lock("j/k", &LockOptions::new()).await.unwrap();
        for (sig, code, wait) in [
            (libc::SIGTERM, 143, None),
            (libc::SIGINT, 130, Some(Duration::from_secs(60))),
        ] {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut j = job("j/k", &["true"]);
            j.wait = wait;
            let runner = {
                let (b, j) = (b.clone(), j.clone());
                tokio::spawn(async move { run(&*b, &j, rx).await })
            };
            tokio::time::sleep(Duration::from_millis(200)).await;
            tx.send(sig).unwrap();
            let e = tokio::time::timeout(Duration::from_secs(5), runner)
                .await
                .expect("the wait ends on the signal")
                .unwrap()
                .unwrap_err();
            assert_eq!(e.code, code, "{e:?}");
            assert!(e.message.contains("while waiting"), "{}", e.message);
        }
        drop(held);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // No waiter is left behind: the lock is free at once (memory's try_lock returns None
        // while others are queued).
        assert!(b
            .try_lock("j/k", &LockOptions::new())
            .await
            .unwrap()
            .is_some());
    }

    /// Durations too large for the clock mean "unbounded": no panic.
    #[tokio::test]
    async fn huge_durations_do_not_overflow() {
        let b: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let mut j = job("j/l", &["sh", "-c", "sleep 0.2 & exit 0"]);
        j.wait = Some(Duration::MAX);
        j.kill_after = Duration::MAX;
        assert_eq!(run(&*b, &j, no_signals()).await.unwrap(), 0);
        j.wait = Some(Duration::from_secs(3_000_000_000_000_000 * 3600));
        assert_eq!(run(&*b, &j, no_signals()).await.unwrap(), 0);
    }

    /// A backend whose `lock` fails with `Timeout` after `after` (a request that got no
    /// answer); everything else is the memory store's.
    #[derive(Debug, Clone)]
    struct Unanswered {
        mem: MemoryStore,
        after: Duration,
    }

    #[async_trait::async_trait]
    impl coordkit::KvStore for Unanswered {
        async fn get(
            &self,
            key: &str,
            c: coordkit::Consistency,
        ) -> coordkit::Result<Option<coordkit::Entry>> {
            self.mem.get(key, c).await
        }
        async fn put(
            &self,
            key: &str,
            value: Vec<u8>,
            opts: coordkit::PutOptions,
        ) -> coordkit::Result<coordkit::Version> {
            self.mem.put(key, value, opts).await
        }
        async fn delete(&self, key: &str) -> coordkit::Result<()> {
            self.mem.delete(key).await
        }
        async fn compare_and_swap(
            &self,
            key: &str,
            expect: coordkit::Expect,
            new: Option<Vec<u8>>,
        ) -> coordkit::Result<Option<coordkit::Version>> {
            self.mem.compare_and_swap(key, expect, new).await
        }
        async fn list(
            &self,
            prefix: &str,
            c: coordkit::Consistency,
        ) -> coordkit::Result<Vec<coordkit::Entry>> {
            self.mem.list(prefix, c).await
        }
        async fn watch(&self, prefix: &str) -> coordkit::Result<coordkit::WatchStream> {
            self.mem.watch(prefix).await
        }
        fn capabilities(&self) -> coordkit::Capabilities {
            self.mem.capabilities()
        }
    }

    #[async_trait::async_trait]
    impl coordkit::DistLock for Unanswered {
        async fn lock(&self, _name: &str, _opts: &LockOptions) -> coordkit::Result<LockGuard> {
            tokio::time::sleep(self.after).await;
            Err(coordkit::Error::new(
                ErrorKind::Timeout,
                "fake",
                "no answer within the request timeout",
            ))
        }
        async fn try_lock(
            &self,
            _name: &str,
            _opts: &LockOptions,
        ) -> coordkit::Result<Option<LockGuard>> {
            Err(coordkit::Error::new(
                ErrorKind::Timeout,
                "fake",
                "no answer within the request timeout",
            ))
        }
    }

    coordkit::election_via_lock!(Unanswered);
    coordkit::recipes_via_lock!(Unanswered);

    /// A request timeout while acquiring is not "not acquired within --wait" (124): it is exit
    /// 1, saying the backend did not answer. 124 only when the wait ran out.
    #[tokio::test]
    async fn request_timeout_is_not_a_wait_timeout() {
        for hold in [Hold::Lock, Hold::Permits(2), Hold::Shared, Hold::Exclusive] {
            let b = Unanswered {
                mem: MemoryStore::new(),
                after: Duration::from_millis(100),
            };
            let mut j = job("j/m", &["true"]);
            j.hold = hold;
            for wait in [Some(Duration::from_secs(60)), None, Some(Duration::ZERO)] {
                j.wait = wait;
                let e = run(&b, &j, no_signals()).await.unwrap_err();
                assert_eq!(e.code, FAILED, "{hold:?} {wait:?}: {e:?}");
                assert!(e.message.contains("did not answer"), "{}", e.message);
            }
            // The same error once the wait has run out: 124.
            let b = Unanswered {
                mem: MemoryStore::new(),
                after: Duration::from_millis(300),
            };
            j.wait = Some(Duration::from_millis(200));
            let e = run(&b, &j, no_signals()).await.unwrap_err();
            assert_eq!(e.code, LOCK_TIMEOUT, "{hold:?}: {e:?}");
        }
    }

    /// Waits until `path` exists.
    async fn appears(path: &Path) -> bool {
        for _ in 0..1000 {
            if path.exists() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// A shell command that records its slot and token in `DIR/NAME` (as `SLOT TOKEN`), waits
    /// for the file `DIR/OTHER` (at most 10 s: exit 9 if it never comes), then for `DIR/go`.
    fn meet(dir: &Path, name: &str, other: &str) -> String {
        format!(
            "echo \"$COORDKIT_PERMIT_SLOT $COORDKIT_FENCING_TOKEN $COORDKIT_LOCK_NAME\" > {d}/{name}.tmp; \
             mv {d}/{name}.tmp {d}/{name}; n=0; \
             while [ ! -e {d}/{other} ]; do n=$((n+1)); [ $n -gt 200 ] && exit 9; sleep 0.05; done; \
             while [ ! -e {d}/go ]; do sleep 0.05; done",
            d = dir.display()
        )
    }

    /// `--permits 2`: two holders run at once, in slots 0 and 1, with the slot in the
    /// environment; a third trying once gets 124; another number of permits while held is
    /// refused as an invalid argument (exit 2) naming the semaphore.
    #[tokio::test]
    async fn permits_let_that_many_run_at_once() {
        let b: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let dir = temp_dir("permits");
        let spawn = |me: &str, other: &str| {
            let mut j = job("pool/a", &["sh", "-c", &meet(&dir, me, other)]);
            j.hold = Hold::Permits(2);
            let b = b.clone();
            tokio::spawn(async move { run(&*b, &j, no_signals()).await })
        };
        let first = spawn("a", "b");
        let second = spawn("b", "a");
        assert!(appears(&dir.join("a")).await && appears(&dir.join("b")).await);
        let mut j = job("pool/a", &["true"]);
        j.hold = Hold::Permits(2);
        j.wait = Some(Duration::ZERO);
        let e = run(&*b, &j, no_signals()).await.unwrap_err();
        assert_eq!(e.code, LOCK_TIMEOUT, "{e:?}");
        assert!(e.message.contains("semaphore \"pool/a\""), "{}", e.message);
        j.hold = Hold::Permits(3);
        let e = run(&*b, &j, no_signals()).await.unwrap_err();
        assert_eq!(e.code, crate::exit::USAGE, "{e:?}");
        assert!(e.message.contains("\"pool/a\""), "{}", e.message);
        std::fs::write(dir.join("go"), "").unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 0);
        assert_eq!(second.await.unwrap().unwrap(), 0);
        let mut slots: Vec<String> = ["a", "b"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(dir.join(f)).unwrap();
                let v: Vec<&str> = text.split_whitespace().collect();
                assert_eq!(v.len(), 3, "{text:?}");
                assert!(v[1].parse::<u64>().unwrap() > 0, "{text:?}");
                assert_eq!(v[2], "pool/a");
                v[0].to_string()
            })
            .collect();
        slots.sort();
        assert_eq!(slots, ["0", "1"]);
        // Released: both permits are free again, and a plain lock holder has no slot.
        j.hold = Hold::Permits(2);
        assert_eq!(run(&*b, &j, no_signals()).await.unwrap(), 0);
        let out = dir.join("plain");
        let script = format!("echo \"[$COORDKIT_PERMIT_SLOT]\" > {}", out.display());
        let plain = job("pool/a", &["sh", "-c", &script]);
        assert_eq!(run(&*b, &plain, no_signals()).await.unwrap(), 0);
        assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "[]");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `--shared` holders run together; `--exclusive` tried once while they run gets 124, and
    /// so does `--shared` tried once while an exclusive holder runs. The plain lock of the same
    /// name is another object.
    #[tokio::test]
    async fn shared_and_exclusive_holds() {
        let b: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let dir = temp_dir("rw");
        let spawn = |hold: Hold, me: &str, other: &str| {
            let mut j = job("data/x", &["sh", "-c", &meet(&dir, me, other)]);
            j.hold = hold;
            let b = b.clone();
            tokio::spawn(async move { run(&*b, &j, no_signals()).await })
        };
        let r1 = spawn(Hold::Shared, "a", "b");
        let r2 = spawn(Hold::Shared, "b", "a");
        assert!(appears(&dir.join("a")).await && appears(&dir.join("b")).await);
        let mut j = job("data/x", &["true"]);
        j.wait = Some(Duration::ZERO);
        j.hold = Hold::Exclusive;
        let e = run(&*b, &j, no_signals()).await.unwrap_err();
        assert_eq!(e.code, LOCK_TIMEOUT, "{e:?}");
        assert!(e.message.contains("(exclusive)"), "{}", e.message);
        j.hold = Hold::Lock;
        assert_eq!(run(&*b, &j, no_signals()).await.unwrap(), 0);
        std::fs::write(dir.join("go"), "").unwrap();
        assert_eq!(r1.await.unwrap().unwrap(), 0);
        assert_eq!(r2.await.unwrap().unwrap(), 0);
        std::fs::remove_file(dir.join("go")).unwrap();
        // The exclusive holder meets nobody: it waits for `go` alone.
        std::fs::write(dir.join("none"), "").unwrap();
        let w = spawn(Hold::Exclusive, "c", "none");
        assert!(appears(&dir.join("c")).await);
        j.hold = Hold::Shared;
        let e = run(&*b, &j, no_signals()).await.unwrap_err();
        assert_eq!(e.code, LOCK_TIMEOUT, "{e:?}");
        assert!(e.message.contains("(shared)"), "{}", e.message);
        std::fs::write(dir.join("go"), "").unwrap();
        assert_eq!(w.await.unwrap().unwrap(), 0);
        assert_eq!(run(&*b, &j, no_signals()).await.unwrap(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A permit or a read-write hold is run as a lock is: a signal while waiting ends the wait
    /// (128 + the signal) and withdraws the attempt; one lost while CMD runs stops CMD (125).
    #[tokio::test]
    async fn recipe_holds_are_interrupted_and_lost_as_locks() {
        let b: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let opts = LockOptions::new();
        let held = b.acquire("r/p", 1, &opts).await.unwrap();
        let writer = b.write("r/w", &opts).await.unwrap();
        for (name, hold) in [
            ("r/p", Hold::Permits(1)),
            ("r/w", Hold::Shared),
            ("r/w", Hold::Exclusive),
        ] {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut j = job(name, &["true"]);
            j.hold = hold;
            let runner = {
                let (b, j) = (b.clone(), j.clone());
                tokio::spawn(async move { run(&*b, &j, rx).await })
            };
            tokio::time::sleep(Duration::from_millis(200)).await;
            tx.send(libc::SIGINT).unwrap();
            let e = tokio::time::timeout(Duration::from_secs(5), runner)
                .await
                .expect("the wait ends on the signal")
                .unwrap()
                .unwrap_err();
            assert_eq!(e.code, SIGNAL_BASE + libc::SIGINT, "{hold:?}: {e:?}");
            assert!(
                e.message
                    .contains(&format!("while waiting for {}", hold.describe(name))),
                "{}",
                e.message
            );
        }
        drop((held, writer));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Nothing was left queued: both are free at once.
        let mut j = job("r/p", &["true"]);
        j.wait = Some(Duration::ZERO);
        j.hold = Hold::Permits(1);
        assert_eq!(run(&*b, &j, no_signals()).await.unwrap(), 0);
        j.name = "r/w".into();
        j.hold = Hold::Exclusive;
        assert_eq!(run(&*b, &j, no_signals()).await.unwrap(), 0);

        #[cfg(feature = "test-hooks")]
        for hold in [Hold::Permits(2), Hold::Shared, Hold::Exclusive] {
            let mut j = job("r/lost", &["sleep", "30"]);
            j.hold = hold;
            j.ttl = Duration::from_millis(300);
            let guard = acquire(&*b, &j).await.unwrap();
            guard.guard.suspend_keep_alive();
            let e =
                tokio::time::timeout(Duration::from_secs(10), run_under(guard, &j, no_signals()))
                    .await
                    .expect("the lost hold stops the command")
                    .unwrap_err();
            assert_eq!(e.code, LOCK_LOST, "{hold:?}: {e:?}");
            assert!(
                e.message.contains(&hold.describe("r/lost")),
                "{}",
                e.message
            );
        }
    }
}
