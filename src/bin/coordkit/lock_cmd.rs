//! `coordkit lock NAME -- CMD`: run a command while holding a lock.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use coordkit::config_file::format_duration;
use coordkit::{Backend, ErrorKind, LockGuard, LockOptions};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::exit::{CliError, CANNOT_EXECUTE, LOCK_LOST, LOCK_TIMEOUT, NOT_FOUND_CMD, SIGNAL_BASE};

/// The environment variable holding the fencing token for CMD.
pub const TOKEN_ENV: &str = "COORDKIT_FENCING_TOKEN";
/// The environment variable holding the lock's name for CMD.
pub const NAME_ENV: &str = "COORDKIT_LOCK_NAME";

/// Extra time, beyond `--wait`, granted to a backend to report its own timeout.
const WAIT_GRACE: Duration = Duration::from_secs(5);
/// Bound on releasing the lock after CMD exits.
const RELEASE_BOUND: Duration = Duration::from_secs(10);

/// What `lock` runs.
#[derive(Debug, Clone)]
pub struct LockJob {
    /// The lock's name.
    pub name: String,
    /// Lease TTL.
    pub ttl: Duration,
    /// Bound on waiting for the lock; `None` waits forever; zero only tries once.
    pub wait: Option<Duration>,
    /// Grace between SIGTERM and SIGKILL after the lock is lost.
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

/// Acquires the lock, honouring `--wait`. A wait that runs out is exit 124.
pub async fn acquire(b: &dyn Backend, job: &LockJob) -> Result<LockGuard, CliError> {
    let opts = LockOptions::new().ttl(job.ttl);
    let timed_out = |w: Duration| {
        CliError::new(
            LOCK_TIMEOUT,
            "lock timeout",
            format!(
                "lock {:?} was not acquired within {}",
                job.name,
                format_duration(w)
            ),
        )
    };
    let result = match job.wait {
        Some(w) if w.is_zero() => b
            .try_lock(&job.name, &opts)
            .await
            .map_err(CliError::from)
            .and_then(|g| g.ok_or_else(|| timed_out(w))),
        Some(w) => {
            let opts = opts.wait(w);
            let attempt = b.lock(&job.name, &opts);
            match tokio::time::timeout(w + WAIT_GRACE, attempt).await {
                Err(_) => Err(timed_out(w)),
                Ok(Err(e)) if e.is(ErrorKind::Timeout) => Err(timed_out(w)),
                Ok(r) => r.map_err(CliError::from),
            }
        }
        None => b.lock(&job.name, &opts).await.map_err(CliError::from),
    };
    result
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

fn signal_group(pgid: Option<u32>, sig: i32) {
    if let Some(pid) = pgid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a negative pid signals the process group of a child this process
        // started in its own group; it has no memory-safety preconditions.
        unsafe {
            libc::kill(-pid, sig);
        }
    }
}

/// Runs CMD under the held `guard`; forwards the signals received on `signals` to CMD's
/// process group. Returns CMD's exit code, or exit 125 if the lock was lost.
pub async fn run_under(
    guard: LockGuard,
    job: &LockJob,
    mut signals: mpsc::UnboundedReceiver<i32>,
) -> Result<i32, CliError> {
    let Some((program, args)) = job.command.split_first() else {
        return Err(CliError::usage("lock: no command given after '--'"));
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env(TOKEN_ENV, guard.token().to_string())
        .env(NAME_ENV, guard.name())
        .process_group(0);
    die_with_parent(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            release(guard).await;
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
    let pgid = child.id();
    let lost = guard.lost();
    tokio::pin!(lost);
    let mut lost_seen = false;
    let mut kill_at: Option<Instant> = None;
    let far = Instant::now() + Duration::from_secs(86400 * 365);
    let mut signals_open = true;
    let status = loop {
        tokio::select! {
            biased;
            status = child.wait() => break status,
            _ = &mut lost, if !lost_seen => {
                lost_seen = true;
                crate::exit::note!(
                    "coordkit: lock {:?} lost while the command ran; sending SIGTERM to it",
                    job.name
                );
                signal_group(pgid, libc::SIGTERM);
                kill_at = Some(Instant::now() + job.kill_after);
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                crate::exit::note!(
                    "coordkit: the command did not exit within {} of SIGTERM; sending SIGKILL",
                    format_duration(job.kill_after)
                );
                signal_group(pgid, libc::SIGKILL);
                kill_at = None;
            }
            sig = signals.recv(), if signals_open => match sig {
                Some(sig) => signal_group(pgid, sig),
                None => signals_open = false,
            },
        }
    };
    let status = status.map_err(|e| {
        CliError::new(
            crate::exit::FAILED,
            "command",
            format!("waiting for the command failed: {e}"),
        )
    })?;
    let code = status_code(status);
    if lost_seen || guard.is_lost() {
        release(guard).await;
        return Err(CliError::new(
            LOCK_LOST,
            "lock lost",
            format!(
                "lock {:?} was lost while the command ran (the command exited with status {code})",
                job.name
            ),
        ));
    }
    release(guard).await;
    Ok(code)
}

async fn release(guard: LockGuard) {
    let name = guard.name().to_string();
    match tokio::time::timeout(RELEASE_BOUND, guard.release()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => crate::exit::note!("coordkit: warning: releasing lock {name:?}: {e}"),
        Err(_) => crate::exit::note!(
            "coordkit: warning: releasing lock {name:?} timed out; its lease will expire by itself"
        ),
    }
}

/// Acquires and runs: what `coordkit lock` does.
pub async fn run(
    b: &dyn Backend,
    job: &LockJob,
    signals: mpsc::UnboundedReceiver<i32>,
) -> Result<i32, CliError> {
    let guard = acquire(b, job).await?;
    tracing::info!(lock = %job.name, token = guard.token().get(), "lock acquired");
    run_under(guard, job, signals).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordkit::MemoryStore;
    use std::sync::Arc;

    fn job(name: &str, cmd: &[&str]) -> LockJob {
        LockJob {
            name: name.into(),
            ttl: Duration::from_secs(5),
            wait: None,
            kill_after: Duration::from_secs(5),
            command: cmd.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn no_signals() -> mpsc::UnboundedReceiver<i32> {
        mpsc::unbounded_channel().1
    }

    #[tokio::test]
    async fn passes_token_and_exit_status() {
        let b: Arc<dyn Backend> = Arc::new(MemoryStore::new());
        let dir = std::env::temp_dir().join(format!("coordkit-lockcmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
        std::fs::remove_dir_all(&dir).unwrap();
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
        // Forwarded signals reach the command.
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(libc::SIGTERM).unwrap();
        let code = run(&*b, &job("j/d", &["sleep", "30"]), rx).await.unwrap();
        assert_eq!(code, SIGNAL_BASE + libc::SIGTERM);
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
        let mut j = job("j/f", &["sleep", "30"]);
        j.ttl = Duration::from_millis(300);
        let guard = acquire(&*b, &j).await.unwrap();
        guard.suspend_keep_alive();
        let started = std::time::Instant::now();
        let e = run_under(guard, &j, no_signals()).await.unwrap_err();
        assert_eq!(e.code, LOCK_LOST, "{e:?}");
        assert!(e.message.contains("143"), "{}", e.message);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
