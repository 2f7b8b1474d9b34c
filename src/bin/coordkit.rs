//! The `coordkit` command-line tool: get, put, del, ls and watch keys, and run commands under
//! a fenced distributed lock (or a semaphore's permit, or a read-write lock), on any backend
//! coordkit supports.
//!
//! `coordkit --help` describes the usage and the exit codes; `docs/cli.md` more fully.

#[path = "coordkit/args.rs"]
mod args;
#[path = "coordkit/exit.rs"]
mod exit;
#[path = "coordkit/lock_cmd.rs"]
mod lock_cmd;
#[path = "coordkit/run.rs"]
mod run;

use std::ffi::OsString;
use std::io::Read;
use std::process::ExitCode;

use args::{Cli, Command, Parsed};
use exit::CliError;
use tokio::sync::mpsc;

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let json = argv.iter().any(|a| a == "--json");
    let code = match args::parse(argv) {
        Ok(Parsed::Print(text)) => {
            use std::io::Write as _;
            let nl = if text.ends_with('\n') { "" } else { "\n" };
            let _ = write!(std::io::stdout().lock(), "{text}{nl}");
            exit::OK
        }
        Ok(Parsed::Run(cli)) => {
            let json = cli.json;
            match run_cli(*cli) {
                Ok(code) => code,
                Err(e) => report(&e, json),
            }
        }
        Err(e) => report(&e, json),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn report(e: &CliError, json: bool) -> i32 {
    crate::exit::note!("{}", e.render(json));
    e.code
}

fn init_tracing(verbose: u8) {
    use tracing_subscriber::fmt::format::FmtSpan;
    let filter = match std::env::var("COORDKIT_LOG") {
        Ok(f) if !f.is_empty() => f,
        _ => match verbose {
            0 => return,
            1 => "coordkit=debug".to_string(),
            _ => "coordkit=trace,debug".to_string(),
        },
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_span_events(FmtSpan::CLOSE)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

fn run_cli(cli: Cli) -> Result<i32, CliError> {
    init_tracing(cli.verbose);
    // Read standard input for `put` before anything else, so a broken pipe is a clear error.
    let stdin_value = match &cli.command {
        Command::Put { value, .. } if matches!(value.as_deref(), None | Some("-")) => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).map_err(|e| {
                CliError::new(
                    exit::FAILED,
                    "io",
                    format!("cannot read standard input: {e}"),
                )
            })?;
            Some(buf)
        }
        _ => None,
    };
    let target = run::process_backend(cli.url.as_deref(), cli.config.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::new(exit::FAILED, "runtime", format!("cannot start: {e}")))?;
    let result = rt.block_on(dispatch(cli, target, stdin_value));
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

async fn dispatch(
    cli: Cli,
    target: coordkit::config_file::Resolved,
    stdin_value: Option<Vec<u8>>,
) -> Result<i32, CliError> {
    let t = cli.timeout;
    let backend = run::connect(&target, t).await?;
    let b = &*backend;
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Get { key, stale } => run::get(b, &key, stale, cli.json, t, &mut out).await,
        Command::Put { key, value, ttl } => {
            let value = match stdin_value {
                Some(v) => v,
                None => value.unwrap_or_default().into_bytes(),
            };
            run::put(b, &key, value, ttl, cli.json, t, &mut out).await
        }
        Command::Del { key } => run::del(b, &key, cli.json, t, &mut out).await,
        Command::Ls {
            prefix,
            long,
            stale,
        } => run::ls(b, &prefix, long, stale, cli.json, t, &mut out).await,
        Command::Watch { prefix } => {
            drop(out);
            let mut out = std::io::stdout();
            run::watch(b, &prefix, cli.json, t, &mut out, interrupted()).await
        }
        Command::Lock(l) => {
            drop(out);
            let job = lock_cmd::LockJob {
                hold: l.hold(),
                name: l.name,
                ttl: l.ttl,
                wait: l.wait,
                kill_after: l.kill_after,
                command: l.command,
            };
            let signals = forward_signals()?;
            lock_cmd::run(b, &job, signals).await
        }
        Command::Elect(e) => {
            drop(out);
            let job = lock_cmd::LockJob {
                name: e.name,
                hold: lock_cmd::Hold::Lock,
                ttl: e.ttl,
                wait: e.wait,
                kill_after: e.kill_after,
                command: e.command,
            };
            let signals = forward_signals()?;
            lock_cmd::run_elect(b, &job, e.value.as_bytes(), signals).await
        }
        Command::Leader { name, watch } => {
            drop(out);
            let mut out = std::io::stdout();
            run::leader(b, &name, watch, cli.json, t, &mut out, interrupted()).await
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut i), Ok(mut t)) => {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Delivers SIGINT, SIGTERM, SIGHUP and SIGQUIT received by coordkit, to be forwarded to CMD.
fn forward_signals() -> Result<mpsc::UnboundedReceiver<i32>, CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = mpsc::unbounded_channel();
    for (kind, num) in [
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
        (SignalKind::quit(), libc::SIGQUIT),
    ] {
        let mut s = signal(kind).map_err(|e| {
            CliError::new(
                exit::FAILED,
                "signal",
                format!("cannot install a signal handler: {e}"),
            )
        })?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(num).is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
}
