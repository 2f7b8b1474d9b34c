//! Command-line arguments, and turning clap's errors into one line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::exit::{one_line, CliError};
use crate::lock_cmd::Hold;

const AFTER_HELP: &str = "\
Backend: --url, else --config (or COORDKIT_CONFIG), else COORDKIT_URL.
URLs: memory://  etcd://HOST:PORT[,HOST:PORT...]  zk://HOST:PORT[,...][/CHROOT]
      consul://HOST:PORT  consul+https://HOST:PORT
Durations: 500ms, 10s, 2m, 1h, 1m30s.

Exit codes:
  0    success
  1    the operation failed (backend unreachable, timeout, permission, conflict, ...);
       lock: also when the backend did not answer while the lock was being acquired
  2    usage or configuration error (bad option, missing --, bad URL or config, bad key;
       lock: --permits 0 or above 256, or not the number the semaphore's holders use)
  3    get: the key does not exist
  124  lock: the lock (permit, shared or exclusive hold) was not acquired within --wait
       (the wait ran out)
  125  lock: lost while CMD ran (CMD's process group was sent SIGTERM), or lost before
       CMD could start (CMD was not run)
  126  lock: CMD could not be executed
  127  lock: CMD not found
  128+N  lock: CMD was killed by signal N; or coordkit got signal N while waiting for
       the lock (130 SIGINT, 143 SIGTERM: the wait is abandoned, CMD is not run)
  any other: lock: CMD's own exit status";

/// coordkit: key-value storage and fenced distributed locks over etcd, ZooKeeper, Consul and
/// memory.
#[derive(Debug, Parser)]
#[command(name = "coordkit", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// Backend URL [default: $COORDKIT_URL]
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,

    /// TOML configuration file (see docs/configuration.md) [env: COORDKIT_CONFIG]
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "COORDKIT_CONFIG",
        hide_env = true
    )]
    pub config: Option<PathBuf>,

    /// Machine-readable JSON output (errors too, as one JSON line on stderr)
    #[arg(long, global = true)]
    pub json: bool,

    /// Show backend calls on stderr (-v: each call with its timing; -vv: also backend details)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Bound on connecting and on each get/put/del/ls call
    #[arg(long, global = true, value_name = "D", default_value = "30s", value_parser = duration)]
    pub timeout: Duration,

    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the value of KEY (exit 3 if it does not exist)
    Get {
        /// The key, e.g. config/db/primary
        key: String,
        /// Allow a stale read from a replica (faster, may miss recent writes)
        #[arg(long)]
        stale: bool,
    },
    /// Set KEY to VALUE (or to standard input with '-' or no VALUE)
    Put {
        /// The key
        key: String,
        /// The value; '-' or nothing reads standard input (binary safe)
        value: Option<String>,
        /// Remove the key after this long, e.g. 30s
        #[arg(long, value_name = "D", value_parser = duration)]
        ttl: Option<Duration>,
    },
    /// Delete KEY (succeeds if it does not exist)
    Del {
        /// The key
        key: String,
    },
    /// List the keys that start with PREFIX (all keys if omitted)
    Ls {
        /// The prefix; end it with '/' to list one "directory"
        #[arg(default_value = "", hide_default_value = true)]
        prefix: String,
        /// Also print each key's version and value
        #[arg(short, long)]
        long: bool,
        /// Allow a stale read from a replica
        #[arg(long)]
        stale: bool,
    },
    /// Print changes to keys under PREFIX as they happen, until interrupted
    Watch {
        /// The prefix (all keys if omitted)
        #[arg(default_value = "", hide_default_value = true)]
        prefix: String,
    },
    /// Run CMD while holding the lock NAME (or a permit of a semaphore, or a read-write lock)
    #[command(
        long_about = "Run CMD while holding the lock NAME.\n\n\
        CMD gets the lock's fencing token in the environment variable COORDKIT_FENCING_TOKEN \
        (and the name in COORDKIT_LOCK_NAME): pass it with every write to the resource the \
        lock protects, which must reject tokens lower than the highest it has seen.\n\n\
        With --permits N, CMD runs holding one of the N permits of the semaphore NAME: at most \
        N holders run at once, and every user of the semaphore must give the same N. CMD also \
        gets the permit's slot (0 to N-1) in COORDKIT_PERMIT_SLOT; the token in \
        COORDKIT_FENCING_TOKEN is that slot's, increasing with every holder of the slot. With \
        --shared or --exclusive, CMD holds the read side or the write side of the read-write \
        lock NAME: shared holders run together (up to 16 at once), an exclusive holder runs \
        alone, and once an exclusive holder waits, later shared ones wait behind it. The lock \
        NAME, the semaphore NAME and the read-write lock NAME are three different objects: a \
        plain 'coordkit lock NAME' does not exclude '--shared' or '--exclusive' holders of \
        NAME, nor permit holders.\n\n\
        CMD runs in its own process group, and the lock covers the whole group: when CMD \
        exits, processes it left running in the group get SIGTERM (SIGKILL after \
        --kill-after), and the lock is released only once none of them runs any more. \
        Signals sent to coordkit (INT, TERM, HUP, QUIT) are forwarded to the group. If the \
        lock is lost while CMD runs, the group gets SIGTERM (SIGKILL after --kill-after) and \
        coordkit exits 125 once the group is gone; if coordkit itself dies, CMD gets SIGTERM. \
        A signal that comes while coordkit still waits for the lock abandons the wait \
        (the queued attempt is withdrawn) and coordkit exits 128+N without running CMD. \
        Otherwise coordkit releases the lock and exits with CMD's status (see \
        'coordkit --help' for every exit code).",
        after_help = "Examples:\n  coordkit --url etcd://127.0.0.1:2379 lock jobs/nightly --ttl 30s --wait 1m -- ./nightly.sh\n  \
        coordkit --url etcd://127.0.0.1:2379 lock pools/gpu --permits 4 -- ./train.sh\n  \
        coordkit --url etcd://127.0.0.1:2379 lock data/index --shared -- ./query.sh\n  \
        coordkit --url etcd://127.0.0.1:2379 lock data/index --exclusive -- ./reindex.sh"
    )]
    Lock(LockArgs),
    /// Run CMD while leader of the election NAME
    #[command(
        long_about = "Run CMD while leader of the election NAME.\n\n\
        coordkit campaigns with --value as the published value (see 'coordkit leader'), \
        waits until it is leader, then runs CMD exactly as 'coordkit lock' does: CMD gets the \
        leadership's term, which increases with every new leader, in COORDKIT_FENCING_TOKEN \
        (and the election's name in COORDKIT_LOCK_NAME); it runs in its own process group; if \
        the leadership is lost the group gets SIGTERM (SIGKILL after --kill-after) and \
        coordkit exits 125; otherwise coordkit resigns when CMD's group is gone and exits \
        with CMD's status. On etcd the election is etcd's own: \
        'etcdctl elect <namespace>elections/NAME' takes part in it.",
        after_help = "Example:\n  coordkit --url etcd://127.0.0.1:2379 elect services/scheduler --value host-a:8080 --ttl 10s -- ./scheduler"
    )]
    Elect(ElectArgs),
    /// Print the leader of the election NAME: its term and value (exit 3 if there is none)
    Leader {
        /// The election's name
        name: String,
        /// Go on printing every change of leader or value, until interrupted
        #[arg(long)]
        watch: bool,
    },
}

/// Arguments of `elect`.
#[derive(Debug, Args)]
pub struct ElectArgs {
    /// The election's name, e.g. services/scheduler
    pub name: String,
    /// The value to publish while leader (for example this instance's address)
    #[arg(long, value_name = "V", default_value = "")]
    pub value: String,
    /// Lease TTL: how long a crashed leader keeps others out
    #[arg(long, value_name = "D", default_value = "15s", value_parser = duration)]
    pub ttl: Duration,
    /// Give up (exit 124) if not leader within this long [default: wait forever]
    #[arg(long, value_name = "D", value_parser = wait_duration)]
    pub wait: Option<Duration>,
    /// How long CMD's process group has between SIGTERM and SIGKILL
    #[arg(long, value_name = "D", default_value = "10s", value_parser = wait_duration)]
    pub kill_after: Duration,
    /// The command to run, after '--'
    #[arg(last = true, required = true, num_args = 1.., value_name = "CMD")]
    pub command: Vec<String>,
}

/// Arguments of `lock`.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// The lock's name, e.g. jobs/nightly (the semaphore's, with --permits; the read-write
    /// lock's, with --shared or --exclusive)
    pub name: String,
    /// Hold one of the N permits of the semaphore NAME instead of the lock NAME (1 to 256;
    /// every user of the semaphore must give the same N)
    #[arg(long, value_name = "N", conflicts_with_all = ["shared", "exclusive"])]
    pub permits: Option<u32>,
    /// Hold the read-write lock NAME shared (with other shared holders), not the lock NAME
    #[arg(long, conflicts_with = "exclusive")]
    pub shared: bool,
    /// Hold the read-write lock NAME exclusively (no other holder, shared or exclusive)
    #[arg(long)]
    pub exclusive: bool,
    /// Lease TTL: how long a crashed holder keeps others out
    #[arg(long, value_name = "D", default_value = "15s", value_parser = duration)]
    pub ttl: Duration,
    /// Give up (exit 124) if the lock is not acquired within this long; 0s tries once
    /// [default: wait forever]
    #[arg(long, value_name = "D", value_parser = wait_duration)]
    pub wait: Option<Duration>,
    /// How long CMD's process group has between SIGTERM and SIGKILL: after the lock is lost,
    /// or for processes still running when CMD exits
    #[arg(long, value_name = "D", default_value = "10s", value_parser = wait_duration)]
    pub kill_after: Duration,
    /// The command to run, after '--'
    #[arg(last = true, required = true, num_args = 1.., value_name = "CMD")]
    pub command: Vec<String>,
}

impl LockArgs {
    /// What the options say to take of NAME.
    pub fn hold(&self) -> Hold {
        match (self.permits, self.shared, self.exclusive) {
            (Some(n), _, _) => Hold::Permits(n),
            (None, true, _) => Hold::Shared,
            (None, false, true) => Hold::Exclusive,
            (None, false, false) => Hold::Lock,
        }
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    coordkit::config::duration::parse(s).map_err(|e| e.message().to_string())
}

/// A wait: longer than the clock can count means without bound.
fn wait_duration(s: &str) -> Result<Duration, String> {
    coordkit::config::duration::parse_wait(s).map_err(|e| e.message().to_string())
}

/// What parsing the command line gave.
#[derive(Debug)]
pub enum Parsed {
    /// Run this.
    Run(Box<Cli>),
    /// Print this (help or version) to stdout and exit 0.
    Print(String),
}

/// Parses the command line. Help and version become [`Parsed::Print`]; every other problem a
/// one-line usage error (exit 2).
pub fn parse(args: Vec<OsString>) -> Result<Parsed, CliError> {
    match Cli::try_parse_from(&args) {
        Ok(cli) => Ok(Parsed::Run(Box::new(cli))),
        Err(e) => {
            use clap::error::ErrorKind as K;
            match e.kind() {
                K::DisplayHelp | K::DisplayVersion => Ok(Parsed::Print(e.render().to_string())),
                K::DisplayHelpOnMissingArgumentOrSubcommand => Err(CliError::usage(
                    "no subcommand given; one of get, put, del, ls, watch, lock, elect, leader \
                     (see 'coordkit --help')",
                )),
                kind => Err(clap_error(&args, kind, &e.render().to_string())),
            }
        }
    }
}

/// Whether the `lock` or `elect` subcommand (returned) was given without `--` before its
/// command.
fn lock_without_separator(args: &[OsString]) -> Option<&'static str> {
    let words: Vec<&str> = args.iter().skip(1).filter_map(|a| a.to_str()).collect();
    let (pos, sub) = words.iter().enumerate().find_map(|(i, w)| match *w {
        "lock" => Some((i, "lock")),
        "elect" => Some((i, "elect")),
        _ => None,
    })?;
    (!words[pos..].contains(&"--")).then_some(sub)
}

fn clap_error(args: &[OsString], kind: clap::error::ErrorKind, rendered: &str) -> CliError {
    use clap::error::ErrorKind as K;
    if let Some(sub) = lock_without_separator(args).filter(|_| {
        matches!(
            kind,
            K::UnknownArgument | K::MissingRequiredArgument | K::TooManyValues
        )
    }) {
        let usage = if sub == "lock" {
            "coordkit lock NAME [--permits N | --shared | --exclusive] [--ttl D] [--wait D] -- CMD [ARGS...]"
        } else {
            "coordkit elect NAME [--value V] [--ttl D] [--wait D] -- CMD [ARGS...]"
        };
        return CliError::usage(format!(
            "{sub}: missing '--' before the command; use: {usage}"
        ));
    }
    // clap's first line is the error; a "tip:" line may follow. Keep both, on one line.
    let mut parts: Vec<String> = Vec::new();
    let mut in_error = false;
    for line in rendered.lines() {
        if let Some(msg) = line.strip_prefix("error: ") {
            parts.push(msg.to_string());
            in_error = true;
        } else if in_error && line.starts_with(' ') && !line.trim().is_empty() {
            // The missing arguments, listed below the error line.
            if let Some(last) = parts.last_mut() {
                last.push(' ');
                last.push_str(line.trim());
            }
        } else if let Some(tip) = line.trim().strip_prefix("tip: ") {
            parts.push(tip.to_string());
            in_error = false;
        } else {
            in_error = false;
        }
    }
    if parts.is_empty() {
        parts.push(one_line(rendered));
    }
    CliError::usage(format!(
        "{} (see 'coordkit --help')",
        one_line(&parts.join("; "))
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::USAGE;

    fn args(s: &str) -> Vec<OsString> {
        std::iter::once("coordkit")
            .chain(s.split_whitespace())
            .map(OsString::from)
            .collect()
    }

    fn cli(s: &str) -> Cli {
        match parse(args(s)) {
            Ok(Parsed::Run(c)) => *c,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn usage_error(s: &str) -> String {
        match parse(args(s)) {
            Err(e) => {
                assert_eq!(e.code, USAGE, "{s}");
                assert!(!e.message.contains('\n'));
                e.message
            }
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn parses_every_subcommand() {
        let c = cli("--url memory:// get a/b");
        assert_eq!(c.url.as_deref(), Some("memory://"));
        assert!(matches!(c.command, Command::Get { ref key, stale: false } if key == "a/b"));
        let c = cli("put k v --ttl 1m30s --json -vv");
        assert!(c.json);
        assert_eq!(c.verbose, 2);
        assert!(
            matches!(c.command, Command::Put { ttl: Some(d), .. } if d == Duration::from_secs(90))
        );
        assert!(matches!(
            cli("put k").command,
            Command::Put { value: None, .. }
        ));
        assert!(matches!(cli("del k").command, Command::Del { .. }));
        assert!(matches!(cli("ls").command, Command::Ls { ref prefix, .. } if prefix.is_empty()));
        assert!(matches!(cli("watch a/").command, Command::Watch { .. }));
        let c = cli("lock jobs/x --ttl 5s --wait 500ms -- sh -c true");
        let Command::Lock(l) = c.command else {
            panic!()
        };
        assert_eq!(l.name, "jobs/x");
        assert_eq!(l.ttl, Duration::from_secs(5));
        assert_eq!(l.wait, Some(Duration::from_millis(500)));
        assert_eq!(l.command, vec!["sh", "-c", "true"]);
        assert_eq!(l.hold(), Hold::Lock);
        for (flags, hold) in [
            ("--permits 3", Hold::Permits(3)),
            ("--permits 0", Hold::Permits(0)),
            ("--shared", Hold::Shared),
            ("--exclusive", Hold::Exclusive),
        ] {
            let Command::Lock(l) = cli(&format!("lock pools/x {flags} --wait 0s -- true")).command
            else {
                panic!()
            };
            assert_eq!(l.hold(), hold, "{flags}");
            assert_eq!(l.wait, Some(Duration::ZERO));
        }
        let c = cli("elect svc/a --value host:1 --ttl 5s -- ./run");
        let Command::Elect(e) = c.command else {
            panic!()
        };
        assert_eq!((e.name.as_str(), e.value.as_str()), ("svc/a", "host:1"));
        assert_eq!(e.ttl, Duration::from_secs(5));
        assert_eq!(e.command, vec!["./run"]);
        assert!(matches!(
            cli("leader svc/a --watch").command,
            Command::Leader { watch: true, .. }
        ));
    }

    #[test]
    fn usage_errors_are_one_line() {
        assert!(usage_error("frobnicate").contains("unrecognized subcommand 'frobnicate'"));
        assert!(usage_error("lock jobs/x echo hi").contains("missing '--'"));
        assert!(usage_error("lock jobs/x").contains("missing '--'"));
        assert!(usage_error("elect svc/a echo hi").contains("elect: missing '--'"));
        assert!(usage_error("lock jobs/x --").contains("CMD"));
        for flags in [
            "--permits 2 --shared",
            "--permits 2 --exclusive",
            "--shared --exclusive",
        ] {
            let e = usage_error(&format!("lock jobs/x {flags} -- true"));
            assert!(e.contains("cannot be used with"), "{flags}: {e}");
        }
        assert!(usage_error("lock jobs/x --permits 2 echo hi").contains("missing '--'"));
        assert!(usage_error("lock jobs/x --shared").contains("--shared | --exclusive"));
        assert!(usage_error("lock jobs/x --permits x -- true").contains("--permits <N>"));
        assert!(usage_error("put k v --ttl 10").contains("unit is missing"));
        assert!(usage_error("").contains("no subcommand"));
        assert!(usage_error("get").contains("KEY"));
    }

    #[test]
    fn help_and_version_print() {
        for s in ["--help", "lock --help", "--version", "help get"] {
            assert!(matches!(parse(args(s)), Ok(Parsed::Print(_))), "{s}");
        }
    }
}
