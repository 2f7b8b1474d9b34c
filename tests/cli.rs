//! The `coordkit` binary, run as a separate process: every subcommand against real etcd and
//! ZooKeeper servers started by the test harness, `lock -- CMD` exclusion across concurrent
//! processes, and the documented exit codes and messages for bad input.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_coordkit");
/// Bound on any single coordkit run in these tests.
const RUN_BOUND: Duration = Duration::from_secs(60);

/// The outcome of one run.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
    took: Duration,
}

impl Out {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// A `coordkit` command with no backend from the environment.
fn ck(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("COORDKIT_URL")
        .env_remove("COORDKIT_CONFIG")
        .env_remove("COORDKIT_LOG");
    c
}

fn wait_bounded(child: Child, started: Instant) -> std::process::Output {
    support::wait_child_output(child, started + RUN_BOUND).unwrap_or_else(|child| {
        let out = child.wait_with_output().expect("collect output");
        panic!(
            "coordkit did not finish within {RUN_BOUND:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Runs `cmd` to completion (bounded), feeding `stdin`.
fn run_cmd(mut cmd: Command, stdin: Option<&[u8]>) -> Out {
    let started = Instant::now();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start coordkit");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        pipe.write_all(input).expect("write stdin");
    }
    let out = wait_bounded(child, started);
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// Runs `coordkit --url URL ARGS…`.
fn run(url: &str, args: &[&str]) -> Out {
    let mut all = vec!["--url", url];
    all.extend_from_slice(args);
    run_cmd(ck(&all), None)
}

fn assert_one_line_error(out: &Out) {
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stderr should be one line: {:?}",
        out.stderr
    );
    assert!(lines[0].starts_with("coordkit: "), "{:?}", out.stderr);
}

fn unique(name: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "clitest-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------------------
// Without a server: help, usage errors, configuration errors.

#[test]
fn help_reads_well() {
    let out = run_cmd(ck(&["--help"]), None);
    assert_eq!(out.code, 0);
    let help = out.text();
    for needle in [
        "get",
        "put",
        "del",
        "ls",
        "watch",
        "lock",
        "--url",
        "--config",
        "--json",
        "COORDKIT_URL",
        "124",
        "125",
        "127",
        "128+N",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
    for (sub, needle) in [
        ("get", "<KEY>"),
        ("put", "--ttl"),
        ("del", "<KEY>"),
        ("ls", "--long"),
        ("watch", "PREFIX"),
        ("lock", "COORDKIT_FENCING_TOKEN"),
        ("lock", "COORDKIT_PERMIT_SLOT"),
        ("lock", "--exclusive"),
    ] {
        let out = run_cmd(ck(&[sub, "--help"]), None);
        assert_eq!(out.code, 0, "{sub} --help");
        assert!(out.text().contains(needle), "{sub} --help:\n{}", out.text());
    }
    let out = run_cmd(ck(&["--version"]), None);
    assert_eq!(out.code, 0);
    assert!(out.text().starts_with("coordkit "));
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (&["frobnicate"], "unrecognized subcommand 'frobnicate'"),
        (
            &["--url", "memory://", "lock", "jobs/x", "echo", "hi"],
            "missing '--' before the command",
        ),
        (&["--url", "memory://", "lock", "jobs/x"], "missing '--'"),
        (
            &[
                "--url",
                "memory://",
                "lock",
                "jobs/x",
                "--permits",
                "2",
                "--shared",
                "--",
                "true",
            ],
            "'--permits <N>' cannot be used with '--shared'",
        ),
        (
            &[
                "--url",
                "memory://",
                "lock",
                "jobs/x",
                "--shared",
                "--exclusive",
                "--",
                "true",
            ],
            "cannot be used with",
        ),
        (
            &[
                "--url",
                "memory://",
                "lock",
                "jobs/x",
                "--permits",
                "0",
                "--",
                "true",
            ],
            "permits must be between 1 and 256, not 0",
        ),
        (
            &[
                "--url",
                "memory://",
                "lock",
                "jobs/x",
                "--permits",
                "257",
                "--",
                "true",
            ],
            "permits must be between 1 and 256, not 257",
        ),
        (
            &["--url", "memory://", "lock", "jobs/x", "--shared", "true"],
            "missing '--' before the command",
        ),
        (&["--url", "memory://", "get"], "<KEY>"),
        (
            &["--url", "memory://", "put", "k", "v", "--ttl", "10"],
            "a unit is missing",
        ),
        (&["get", "k"], "no backend given"),
        (
            &["--url", "nosuch://x", "get", "k"],
            "unknown backend scheme \"nosuch\"",
        ),
        (&["--url", "not a url", "get", "k"], "malformed backend URL"),
        (&["--url", "memory://", "get", "/bad//key"], "invalid key"),
        (
            &["--url", "memory://", "--config", "x.toml", "get", "k"],
            "not both",
        ),
        (
            &["--config", "/nonexistent/coordkit.toml", "get", "k"],
            "cannot read configuration file",
        ),
    ];
    for (args, needle) in cases {
        let out = run_cmd(ck(args), None);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert_one_line_error(&out);
        assert!(out.stderr.contains(needle), "{args:?}: {:?}", out.stderr);
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // With --json the error is one JSON line carrying the exit code.
    let out = run_cmd(ck(&["--json", "--url", "nosuch://x", "get", "k"]), None);
    assert_eq!(out.code, 2);
    let v: serde_json::Value = serde_json::from_str(out.stderr.trim()).expect("JSON error line");
    assert_eq!(v["error"]["exit_code"], 2);
    assert_eq!(v["error"]["kind"], "invalid config");
}

#[test]
fn invalid_config_file_names_the_problem() {
    let dir = support::fresh_dir("cli-config");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[etcd]\nendpoints = [\"127.0.0.1:2379\"]\ntimeout = \"5s\"\n",
    )
    .unwrap();
    let out = run_cmd(ck(&["--config", path.to_str().unwrap(), "ls"]), None);
    assert_eq!(out.code, 2, "{out:?}");
    assert_one_line_error(&out);
    assert!(
        out.stderr.contains("unknown field `timeout`"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("bad.toml"), "{}", out.stderr);
    // An unset secret variable is named.
    std::fs::write(
        &path,
        "url = \"etcd://u@127.0.0.1:1\"\npassword_env = \"COORDKIT_TEST_UNSET_PW\"\n",
    )
    .unwrap();
    let out = run_cmd(ck(&["--config", path.to_str().unwrap(), "ls"]), None);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("COORDKIT_TEST_UNSET_PW"),
        "{}",
        out.stderr
    );
}

#[test]
fn verbose_shows_spans_without_values() {
    let out = run_cmd(
        ck(&[
            "-v",
            "--url",
            "memory://",
            "put",
            "cfg/k",
            "very-secret-value",
        ]),
        None,
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("coordkit.put"), "{}", out.stderr);
    assert!(out.stderr.contains("key=\"cfg/k\""), "{}", out.stderr);
    assert!(out.stderr.contains("backend=\"memory\""), "{}", out.stderr);
    assert!(!out.stderr.contains("very-secret-value"), "{}", out.stderr);
    // Silent without -v.
    let out = run_cmd(ck(&["--url", "memory://", "put", "cfg/k", "v"]), None);
    assert_eq!(out.stderr, "");
}

#[test]
fn lock_runs_command_with_token_and_exit_status_on_memory() {
    let out = run(
        "memory://",
        &[
            "lock",
            "jobs/a",
            "--",
            "sh",
            "-c",
            "echo \"$COORDKIT_LOCK_NAME $COORDKIT_FENCING_TOKEN\"; exit 7",
        ],
    );
    assert_eq!(out.code, 7, "{out:?}");
    let text = out.text();
    let (name, token) = text.trim().split_once(' ').expect("name and token");
    assert_eq!(name, "jobs/a");
    assert!(token.parse::<u64>().expect("numeric token") > 0);
    let out = run(
        "memory://",
        &["lock", "jobs/a", "--", "sh", "-c", "kill -9 $$"],
    );
    assert_eq!(out.code, 137, "killed by SIGKILL: 128 + 9");
    let out = run("memory://", &["lock", "jobs/a", "--", "/nonexistent/cmd"]);
    assert_eq!(out.code, 127);
    assert_one_line_error(&out);
    let dir = support::fresh_dir("cli-noexec");
    let f = dir.join("not-executable");
    std::fs::write(&f, "#!/bin/sh\n").unwrap();
    let out = run("memory://", &["lock", "jobs/a", "--", f.to_str().unwrap()]);
    assert_eq!(out.code, 126);
}

/// coordkit killed with SIGKILL while CMD runs: CMD gets SIGTERM from the kernel and does not
/// run on without the lock.
#[test]
fn command_dies_with_coordkit() {
    let dir = support::fresh_dir("cli-pdeathsig");
    let pidfile = dir.join("pid");
    let script = format!("echo $$ > {}; exec sleep 60", pidfile.display());
    let mut holder = ck(&[
        "--url",
        "memory://",
        "lock",
        "jobs/p",
        "--",
        "sh",
        "-c",
        &script,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("start coordkit");
    let read_pid = || {
        std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    };
    assert!(support::wait_until(Duration::from_secs(30), || read_pid().is_some()));
    let cmd_pid = read_pid().expect("pid");
    // Running: /proc/PID/stat exists and the state (after the command name) is not Z (zombie).
    let alive = || {
        std::fs::read_to_string(format!("/proc/{cmd_pid}/stat"))
            .map(|s| {
                !s.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    };
    assert!(alive());
    holder.kill().expect("SIGKILL coordkit");
    holder.wait().expect("reap coordkit");
    assert!(
        support::wait_until(Duration::from_secs(10), || !alive()),
        "CMD (pid {cmd_pid}) still runs after coordkit was killed"
    );
}

// ---------------------------------------------------------------------------------------------
// Against real servers.

/// Every key-value subcommand, human and JSON output, stdin input, missing keys, and TTL
/// (the `--ttl` part only if `key_ttl`: for backends without key TTLs).
fn kv_subcommands(url: &str, key_ttl: bool) {
    let p = unique("kv");
    let k = format!("{p}/greeting");
    let out = run(url, &["put", &k, "hello world"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.text().starts_with("OK version "), "{}", out.text());

    let out = run(url, &["get", &k]);
    assert_eq!(
        (out.code, out.text().as_str()),
        (0, "hello world\n"),
        "{out:?}"
    );
    let out = run(url, &["--json", "get", &k]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["key"], k.as_str());
    assert_eq!(v["value"], "hello world");
    assert!(v["version"].as_u64().is_some());

    // Binary value from stdin, with '-' and with no VALUE at all.
    let bin = format!("{p}/bin");
    let out = run_cmd(
        ck(&["--url", url, "put", &bin, "-"]),
        Some(&[0xff, 0x00, 0x0a, 0x80]),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let out = run(url, &["--json", "get", &bin]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["value_base64"], "/wAKgA==", "{v}");
    let out = run(url, &["get", &bin]);
    assert_eq!(out.stdout, vec![0xff, 0x00, 0x0a, 0x80, b'\n']);
    let empty = format!("{p}/empty");
    let out = run_cmd(ck(&["--url", url, "put", &empty]), Some(b""));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(run(url, &["get", &empty]).stdout, b"\n");

    // ls: plain, long, JSON; the prefix does not mix `p/a` with `p/ab`.
    run(url, &["put", &format!("{p}ab/x"), "other"]);
    let out = run(url, &["ls", &format!("{p}/")]);
    assert_eq!(
        out.text(),
        format!("{p}/bin\n{p}/empty\n{p}/greeting\n"),
        "{out:?}"
    );
    let out = run(url, &["ls", "--long", &format!("{p}/")]);
    let line = out.text().lines().nth(2).unwrap_or_default().to_string();
    let cols: Vec<&str> = line.split('\t').collect();
    assert_eq!(cols.len(), 3, "{line}");
    assert_eq!((cols[0], cols[2]), (k.as_str(), "hello world"));
    let out = run(url, &["--json", "ls", &format!("{p}/")]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v.as_array().map(|a| a.len()), Some(3), "{v}");

    // del, then get exits 3; deleting again still succeeds.
    let out = run(url, &["del", &k]);
    assert_eq!((out.code, out.text().as_str()), (0, "OK\n"));
    let out = run(url, &["get", &k]);
    assert_eq!(out.code, 3, "{out:?}");
    assert_one_line_error(&out);
    assert!(out.stderr.contains("not found"));
    assert_eq!(run(url, &["del", &k]).code, 0);

    // put --ttl: the key disappears by itself (or a clear error where TTLs are unsupported).
    let t = format!("{p}/ttl");
    if !key_ttl {
        let out = run(url, &["put", &t, "short-lived", "--ttl", "2s"]);
        assert_eq!(out.code, 1, "{out:?}");
        assert_one_line_error(&out);
        assert!(out.stderr.contains("unsupported"), "{}", out.stderr);
        return;
    }
    let out = run(url, &["put", &t, "short-lived", "--ttl", "2s"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(run(url, &["get", &t]).code, 0);
    let gone = support::wait_until(Duration::from_secs(20), || run(url, &["get", &t]).code == 3);
    assert!(gone, "a key put with --ttl 2s still exists after 20 s");

    // Invalid key: exit 2, nothing stored.
    let out = run(url, &["put", &format!("{p}/a b"), "x"]);
    assert_eq!(out.code, 2);
    assert_one_line_error(&out);
    assert_eq!(run(url, &["ls", &format!("{p}/a")]).text(), "");
}

/// Reads lines from a child's stdout into a channel.
fn line_reader(stream: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child this test started and has not reaped.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// `watch` prints puts and deletes made by other processes, in order, and exits 0 on SIGINT.
fn watch_prints_events(url: &str, json: bool) {
    let p = unique("watch");
    let mut args = vec!["--url", url];
    if json {
        args.push("--json");
    }
    let prefix = format!("{p}/");
    args.extend(["watch", prefix.as_str()]);
    let mut child = ck(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start watch");
    let started = Instant::now();
    let out = line_reader(child.stdout.take().expect("stdout"));
    let err = line_reader(child.stderr.take().expect("stderr"));
    let ready = err
        .recv_timeout(Duration::from_secs(30))
        .expect("watch ready line");
    assert!(ready.contains("watching"), "{ready}");

    assert_eq!(run(url, &["put", &format!("{p}/a"), "one"]).code, 0);
    assert_eq!(run(url, &["put", &format!("{p}/b"), "two"]).code, 0);
    assert_eq!(run(url, &["del", &format!("{p}/a")]).code, 0);
    assert_eq!(run(url, &["put", &format!("{p}x"), "outside"]).code, 0);

    let mut lines = Vec::new();
    while lines.len() < 3 {
        match out.recv_timeout(Duration::from_secs(20)) {
            // A coalescing backend's marks (Consul: the delete of `a` comes after other writes).
            Ok(l) if l.starts_with("COALESCED ") || l.contains("\"coalesced\"") => {}
            Ok(l) => lines.push(l),
            Err(_) => panic!("watch printed only {lines:?}"),
        }
    }
    if json {
        let evs: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).expect("json event"))
            .collect();
        assert_eq!(evs[0]["event"], "put");
        assert_eq!(evs[0]["key"], format!("{p}/a"));
        assert_eq!(evs[0]["value"], "one");
        assert_eq!(evs[1]["value"], "two");
        assert_eq!(evs[2]["event"], "delete");
        assert_eq!(evs[2]["key"], format!("{p}/a"));
    } else {
        assert_eq!(
            lines,
            vec![
                format!("PUT {p}/a one"),
                format!("PUT {p}/b two"),
                format!("DELETE {p}/a")
            ]
        );
    }
    signal(&child, libc::SIGINT);
    let status = wait_bounded(child, started).status;
    assert_eq!(status.code(), Some(0), "watch exits 0 when interrupted");
    // Nothing outside the prefix was printed.
    assert!(out.try_recv().is_err());
}

/// Parses the log written by concurrent lock holders: `start TOKEN` / `end TOKEN` lines.
fn check_exclusive(log: &str, expected_rounds: usize) -> Vec<u64> {
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2 * expected_rounds, "{log}");
    let mut tokens = Vec::new();
    for pair in lines.chunks(2) {
        let (s, e) = (pair[0], pair[1]);
        let st = s
            .strip_prefix("start ")
            .unwrap_or_else(|| panic!("overlap: {log}"));
        let et = e
            .strip_prefix("end ")
            .unwrap_or_else(|| panic!("overlap: {log}"));
        assert_eq!(st, et, "another holder ran in between: {log}");
        tokens.push(st.parse::<u64>().expect("numeric token"));
    }
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens not strictly increasing: {tokens:?}"
    );
    tokens
}

/// Concurrent `coordkit lock` processes run their commands one at a time, each with a larger
/// fencing token; a bounded wait on a held lock exits 124; signals reach CMD.
fn lock_excludes_across_processes(url: &str) {
    let name = format!("{}/job", unique("lock"));
    let dir = support::fresh_dir("cli-lock");
    let log = dir.join("log");
    let script = format!(
        "echo \"start $COORDKIT_FENCING_TOKEN\" >> {l}; sleep 0.3; echo \"end $COORDKIT_FENCING_TOKEN\" >> {l}",
        l = log.display()
    );
    let started = Instant::now();
    let children: Vec<Child> = (0..4)
        .map(|_| {
            ck(&[
                "--url", url, "lock", &name, "--ttl", "10s", "--", "sh", "-c", &script,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lock")
        })
        .collect();
    for c in children {
        let out = wait_bounded(c, started);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&log).expect("log");
    check_exclusive(&text, 4);

    // Held by one process: another with --wait 500ms gives up with 124.
    let marker = dir.join("held");
    let holder_script = format!("touch {}; exec sleep 30", marker.display());
    let holder = ck(&[
        "--url",
        url,
        "lock",
        &name,
        "--",
        "sh",
        "-c",
        &holder_script,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start holder");
    let held_at = Instant::now();
    assert!(
        support::wait_until(Duration::from_secs(30), || marker.exists()),
        "holder never ran"
    );
    let out = run(url, &["lock", &name, "--wait", "500ms", "--", "true"]);
    assert_eq!(out.code, 124, "{out:?}");
    assert_one_line_error(&out);
    assert!(
        out.stderr.contains("not acquired within 500ms"),
        "{}",
        out.stderr
    );
    assert!(out.took < Duration::from_secs(15), "took {:?}", out.took);
    let out = run(url, &["lock", &name, "--wait", "0s", "--", "true"]);
    assert_eq!(out.code, 124, "{out:?}");

    // SIGTERM to coordkit reaches CMD (sleep), whose status 128+15 coordkit exits with, and
    // the lock is released: the next holder gets it at once.
    signal(&holder, libc::SIGTERM);
    let out = wait_bounded(holder, held_at);
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(url, &["lock", &name, "--wait", "10s", "--", "true"]);
    assert_eq!(out.code, 0, "{out:?}");
}

/// Whether process `pid` runs: it exists and is not a zombie (this machine's init may never
/// reap orphans).
fn pid_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Waits for a pid written to `path`.
fn read_pid_file(path: &std::path::Path) -> i32 {
    let read = || {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    };
    assert!(
        support::wait_until(Duration::from_secs(30), || read().is_some()),
        "no pid in {}",
        path.display()
    );
    read().expect("pid")
}

/// A shell script that starts a grandchild ignoring SIGTERM, writes its pid to `pidfile`, then
/// runs `then`.
fn stubborn_grandchild(pidfile: &std::path::Path, then: &str) -> String {
    // The pid file appears only once the grandchild ignores SIGTERM, and `then` runs only
    // after that.
    format!(
        "sh -c 'trap \"\" TERM; echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 300 </dev/null >/dev/null 2>&1' & \
         while [ ! -s {p} ]; do sleep 0.05; done; {then}",
        p = pidfile.display()
    )
}

/// A shell script printing `alive` if process `pid` runs, else `dead` (zombies are dead).
fn print_pid_state(pid: i32) -> String {
    format!(
        "s=$(cat /proc/{pid}/stat 2>/dev/null); case \"${{s##*) }}\" in ''|Z*) echo dead;; *) echo alive;; esac"
    )
}

/// Waits up to `bound` for `child`; `None` (and the child killed) if it runs on.
fn wait_within(child: Child, bound: Duration) -> Option<std::process::Output> {
    support::wait_child_output(child, Instant::now() + bound).ok()
}

/// CMD exits at once, leaving a process that ignores SIGTERM in its group: the lock is not
/// released until that process is gone (SIGKILL after --kill-after), so the next holder's
/// command finds it dead; coordkit exits with CMD's status.
fn lock_covers_processes_left_behind(url: &str) {
    let name = format!("{}/job", unique("group"));
    let dir = support::fresh_dir("cli-group");
    let pidfile = dir.join("pid");
    let script = stubborn_grandchild(&pidfile, "exit 0");
    let started = Instant::now();
    let holder = ck(&[
        "--url",
        url,
        "lock",
        &name,
        "--kill-after",
        "2s",
        "--",
        "sh",
        "-c",
        &script,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start holder");
    let gpid = read_pid_file(&pidfile);
    let next = run(
        url,
        &[
            "lock",
            &name,
            "--wait",
            "30s",
            "--",
            "sh",
            "-c",
            &print_pid_state(gpid),
        ],
    );
    assert_eq!(next.code, 0, "{next:?}");
    assert_eq!(
        next.text().trim(),
        "dead",
        "the next holder ran while pid {gpid}, started under the previous holder, still ran"
    );
    let out = wait_bounded(holder, started);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("SIGKILL"), "{stderr}");
    assert!(!pid_running(gpid));
}

/// SIGTERM (SIGINT) while waiting for a held lock: exit 143 (130) at once, the queued attempt
/// withdrawn, so that when the holder releases, a third client gets the lock at once.
fn signal_while_waiting_withdraws(url: &str) {
    let name = format!("{}/job", unique("sigwait"));
    let dir = support::fresh_dir("cli-sigwait");
    let marker = dir.join("held");
    let holder_script = format!("touch {}; exec sleep 60", marker.display());
    let held_at = Instant::now();
    let holder = ck(&[
        "--url",
        url,
        "lock",
        &name,
        "--",
        "sh",
        "-c",
        &holder_script,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start holder");
    assert!(
        support::wait_until(Duration::from_secs(30), || marker.exists()),
        "holder never ran"
    );
    for (sig, code, wait) in [(libc::SIGTERM, 143, "60s"), (libc::SIGINT, 130, "")] {
        let mut args = vec!["--url", url, "lock", &name, "--ttl", "30s"];
        if !wait.is_empty() {
            args.extend(["--wait", wait]);
        }
        args.extend(["--", "sh", "-c", "echo ran"]);
        let waiter = ck(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start waiter");
        // Let it connect and queue behind the holder.
        std::thread::sleep(Duration::from_millis(1500));
        let signalled = Instant::now();
        signal(&waiter, sig);
        let out = wait_within(waiter, Duration::from_secs(15))
            .unwrap_or_else(|| panic!("signal {sig} did not end the wait"));
        let took = signalled.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{stderr}");
        assert!(stderr.contains("while waiting"), "{stderr}");
        assert!(out.stdout.is_empty(), "CMD ran: {:?}", out.stdout);
        assert!(took < Duration::from_secs(5), "took {took:?}");
        eprintln!("{url}: signal {sig} while waiting: exit {code} after {took:?}");
    }
    // A third client queues; when the holder releases, nothing stands before it.
    let third = ck(&["--url", url, "lock", &name, "--wait", "60s", "--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start third");
    std::thread::sleep(Duration::from_millis(1000));
    signal(&holder, libc::SIGTERM);
    let out = wait_bounded(holder, held_at);
    assert_eq!(out.status.code(), Some(143));
    let released = Instant::now();
    let out = wait_within(third, Duration::from_secs(40)).expect("third client finishes");
    let waited = released.elapsed();
    eprintln!("{url}: third client acquired {waited:?} after the release");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        waited < Duration::from_secs(5),
        "the third client waited {waited:?} after the release: an interrupted attempt was left queued"
    );
}

/// Durations too large for the clock mean "unbounded": no panic, the lock is taken.
fn huge_durations(url: &str) {
    let name = format!("{}/job", unique("huge"));
    let out = run(
        url,
        &["lock", &name, "--wait", "3000000000000000h", "--", "true"],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let out = run(
        url,
        &[
            "lock",
            &name,
            "--wait",
            "3000000000000000h",
            "--kill-after",
            "3000000000000000h",
            "--",
            "sh",
            "-c",
            "sleep 0.2 & exit 5",
        ],
    );
    assert_eq!(out.code, 5, "{out:?}");
}

/// A shell command for a holder that must run alongside another: it writes `SLOT TOKEN NAME`
/// (from its environment) to `DIR/ME`, waits (at most 20 s, else exit 9) for the file
/// `DIR/OTHER`, then (at most 60 s, else exit 8) for `DIR/go`.
fn meet_script(dir: &std::path::Path, me: &str, other: &str) -> String {
    format!(
        "echo \"$COORDKIT_PERMIT_SLOT $COORDKIT_FENCING_TOKEN $COORDKIT_LOCK_NAME\" > {d}/{me}.tmp; \
         mv {d}/{me}.tmp {d}/{me}; n=0; \
         while [ ! -e {d}/{other} ]; do n=$((n+1)); [ $n -gt 400 ] && exit 9; sleep 0.05; done; \
         n=0; while [ ! -e {d}/go ]; do n=$((n+1)); [ $n -gt 1200 ] && exit 8; sleep 0.05; done",
        d = dir.display()
    )
}

/// Starts `coordkit lock NAME FLAGS -- sh -c SCRIPT` in the background.
fn spawn_lock(url: &str, name: &str, flags: &[&str], script: &str) -> Child {
    let mut args = vec!["--url", url, "lock", name, "--ttl", "10s"];
    args.extend_from_slice(flags);
    args.extend(["--", "sh", "-c", script]);
    ck(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start coordkit lock")
}

/// Lets the holders started at `started` go on (creates `DIR/go`) and checks they all exit 0.
fn let_go(dir: &std::path::Path, holders: Vec<Child>, started: Instant) {
    std::fs::write(dir.join("go"), "").unwrap();
    for h in holders {
        let out = wait_bounded(h, started);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_file(dir.join("go")).unwrap();
}

/// `lock --permits 2`: two processes hold a permit each at once (each waits for the other's
/// file), in slots 0 and 1 given in COORDKIT_PERMIT_SLOT; a third trying once exits 124;
/// another number of permits while held exits 2 with one line naming the semaphore.
fn lock_permits_across_processes(url: &str) {
    let name = format!("{}/pool", unique("permits"));
    let dir = support::fresh_dir("cli-permits");
    let started = Instant::now();
    let holders: Vec<Child> = [("a", "b"), ("b", "a")]
        .iter()
        .map(|(me, other)| {
            spawn_lock(
                url,
                &name,
                &["--permits", "2"],
                &meet_script(&dir, me, other),
            )
        })
        .collect();
    assert!(
        support::wait_until(Duration::from_secs(30), || dir.join("a").exists()
            && dir.join("b").exists()),
        "the two permit holders did not run at once"
    );
    let out = run(
        url,
        &[
            "lock",
            &name,
            "--permits",
            "2",
            "--wait",
            "0s",
            "--",
            "true",
        ],
    );
    assert_eq!(out.code, 124, "{out:?}");
    assert_one_line_error(&out);
    assert!(
        out.stderr.contains(&format!("semaphore {name:?}")),
        "{}",
        out.stderr
    );
    let out = run(
        url,
        &[
            "lock",
            &name,
            "--permits",
            "3",
            "--wait",
            "10s",
            "--",
            "true",
        ],
    );
    assert_eq!(out.code, 2, "{out:?}");
    assert_one_line_error(&out);
    assert!(out.stderr.contains("invalid argument"), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("{name:?}")), "{}", out.stderr);
    let_go(&dir, holders, started);
    let mut slots: Vec<String> = ["a", "b"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            let v: Vec<&str> = text.split_whitespace().collect();
            assert_eq!(v.len(), 3, "slot, token, name: {text:?}");
            assert!(v[1].parse::<u64>().expect("numeric token") > 0);
            assert_eq!(v[2], name);
            v[0].to_string()
        })
        .collect();
    slots.sort();
    assert_eq!(slots, ["0", "1"]);
    // Both permits are free again.
    let out = run(
        url,
        &[
            "lock",
            &name,
            "--permits",
            "2",
            "--wait",
            "0s",
            "--",
            "true",
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
}

/// `lock --shared` twice at once (each waits for the other's file); `--exclusive --wait 0s`
/// while they run exits 124; `--shared --wait 0s` while an exclusive holder runs exits 124.
fn lock_shared_exclusive_across_processes(url: &str) {
    let name = format!("{}/data", unique("rwlock"));
    let dir = support::fresh_dir("cli-rwlock");
    let started = Instant::now();
    let readers: Vec<Child> = [("a", "b"), ("b", "a")]
        .iter()
        .map(|(me, other)| spawn_lock(url, &name, &["--shared"], &meet_script(&dir, me, other)))
        .collect();
    assert!(
        support::wait_until(Duration::from_secs(30), || dir.join("a").exists()
            && dir.join("b").exists()),
        "the two shared holders did not run at once"
    );
    let out = run(
        url,
        &["lock", &name, "--exclusive", "--wait", "0s", "--", "true"],
    );
    assert_eq!(out.code, 124, "{out:?}");
    assert_one_line_error(&out);
    assert!(out.stderr.contains("(exclusive)"), "{}", out.stderr);
    let_go(&dir, readers, started);
    // An exclusive holder (it meets nobody: `none` exists already).
    std::fs::write(dir.join("none"), "").unwrap();
    let writer = spawn_lock(
        url,
        &name,
        &["--exclusive"],
        &meet_script(&dir, "c", "none"),
    );
    assert!(
        support::wait_until(Duration::from_secs(30), || dir.join("c").exists()),
        "the exclusive holder never ran"
    );
    let out = run(
        url,
        &["lock", &name, "--shared", "--wait", "0s", "--", "true"],
    );
    assert_eq!(out.code, 124, "{out:?}");
    assert_one_line_error(&out);
    assert!(out.stderr.contains("(shared)"), "{}", out.stderr);
    let_go(&dir, vec![writer], started);
    let out = run(
        url,
        &["lock", &name, "--shared", "--wait", "0s", "--", "true"],
    );
    assert_eq!(out.code, 0, "{out:?}");
}

/// The `lock --permits` and `lock --shared/--exclusive` tests, one `#[test]` each, in a
/// backend module (as [`backend_tests!`]).
macro_rules! recipe_tests {
    () => {
        backend_tests!(@each
            lock_permits_across_processes(),
            lock_shared_exclusive_across_processes(),
        );
    };
}

/// The tests every backend that spans processes runs, one `#[test]` each, calling the shared
/// test function of the same name with the backend module's `url()` (as
/// `coordkit::conformance_tests!` does for the library). `key_ttl`: whether the backend has key
/// TTLs (the `--ttl` part of `kv_subcommands`).
macro_rules! backend_tests {
    (key_ttl: $key_ttl:expr) => {
        backend_tests!(@each
            kv_subcommands($key_ttl),
            watch_prints_events(false),
            lock_excludes_across_processes(),
            lock_covers_processes_left_behind(),
            signal_while_waiting_withdraws(),
            huge_durations(),
        );
    };
    (@each $($name:ident($($arg:expr),*)),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                super::$name(&url() $(, $arg)*);
            }
        )*
    };
}

/// A server that does not listen, named by `url` (for `port`, free): `get` fails with exit 1
/// and one line, well within its timeout.
fn unreachable_server_fails_within_bound(url: impl Fn(u16) -> String) {
    let port = support::free_port();
    let out = run(&url(port), &["--timeout", "5s", "get", "k"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_one_line_error(&out);
    assert!(out.took < Duration::from_secs(20), "took {:?}", out.took);
}

#[cfg(feature = "etcd")]
mod etcd {
    use super::*;
    use support::etcd;

    fn url() -> String {
        etcd::shared_url()
    }

    backend_tests!(key_ttl: true);
    recipe_tests!();

    #[test]
    fn watch_prints_json_events() {
        super::watch_prints_events(&url(), true);
    }

    #[test]
    fn config_file_and_environment() {
        let dir = support::fresh_dir("cli-etcd-config");
        let path = dir.join("coordkit.toml");
        let endpoints: Vec<String> = etcd::shared()
            .endpoints()
            .split(',')
            .map(|e| format!("{e:?}"))
            .collect();
        std::fs::write(
            &path,
            format!(
                "[etcd]\nendpoints = [{}]\nconnect_timeout = \"5s\"\nnamespace_env = \"CLI_TEST_NS\"\n",
                endpoints.join(", ")
            ),
        )
        .unwrap();
        let k = format!("{}/k", unique("cfg"));
        let mut cmd = ck(&["--config", path.to_str().unwrap(), "put", &k, "from-config"]);
        cmd.env("CLI_TEST_NS", "cfgns/");
        let out = run_cmd(cmd, None);
        assert_eq!(out.code, 0, "{out:?}");
        // COORDKIT_CONFIG works the same way; the namespace from the environment applied.
        let mut cmd = ck(&["get", &k]);
        cmd.env("COORDKIT_CONFIG", &path)
            .env("CLI_TEST_NS", "cfgns/");
        assert_eq!(run_cmd(cmd, None).text(), "from-config\n");
        // COORDKIT_ETCD_NAMESPACE overrides the file: another namespace, no such key.
        let mut cmd = ck(&["get", &k]);
        cmd.env("COORDKIT_CONFIG", &path)
            .env("CLI_TEST_NS", "cfgns/")
            .env("COORDKIT_ETCD_NAMESPACE", "other/");
        assert_eq!(run_cmd(cmd, None).code, 3);
        // The namespace is honoured: the key is stored under it.
        let (ok, keys, err) = etcd::etcdctl(
            &etcd::shared().endpoints(),
            &["get", "--prefix", "--keys-only", "cfgns/kv/"],
        );
        assert!(ok, "{err}");
        assert!(keys.contains(&format!("cfgns/kv/{k}")), "{keys}");
        // Unset secret variable: exit 2, names it.
        let out = run_cmd(ck(&["--config", path.to_str().unwrap(), "get", &k]), None);
        assert_eq!(out.code, 2);
        assert!(out.stderr.contains("CLI_TEST_NS"), "{}", out.stderr);
    }

    #[test]
    fn unreachable_server_fails_within_bound() {
        super::unreachable_server_fails_within_bound(|port| format!("etcd://127.0.0.1:{port}"));
    }

    /// Revokes the lease of the etcd lock `name`'s key (the lock is lost at once).
    fn revoke_lock_lease(name: &str) {
        let eps = etcd::shared().endpoints();
        let (ok, keys, err) = etcd::etcdctl(
            &eps,
            &["get", "--prefix", "--keys-only", &format!("locks/{name}/")],
        );
        assert!(ok, "{err}");
        let key = keys
            .lines()
            .find(|l| !l.trim().is_empty())
            .expect("the lock key")
            .trim()
            .to_string();
        let lease = key.rsplit('/').next().expect("lease hex").to_string();
        let (ok, _, err) = etcd::etcdctl(&eps, &["lease", "revoke", &lease]);
        assert!(ok, "revoke {lease}: {err}");
    }

    /// The lock is lost while CMD runs; CMD dies of the SIGTERM, but a process it started
    /// ignores SIGTERM: it gets SIGKILL after --kill-after, and coordkit exits 125 only once
    /// it is gone.
    #[test]
    fn lost_lock_ends_the_whole_group() {
        let name = format!("{}/job", unique("lostgroup"));
        let dir = support::fresh_dir("cli-lost-group");
        let pidfile = dir.join("pid");
        let script = stubborn_grandchild(&pidfile, "wait");
        let started = Instant::now();
        let holder = ck(&[
            "--url",
            &url(),
            "lock",
            &name,
            "--ttl",
            "30s",
            "--kill-after",
            "1s",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start holder");
        let gpid = read_pid_file(&pidfile);
        assert!(pid_running(gpid));
        revoke_lock_lease(&name);
        let lost_at = Instant::now();
        let out = wait_bounded(holder, started);
        let took = lost_at.elapsed();
        let survived = pid_running(gpid);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{stderr}");
        assert!(
            !survived,
            "coordkit exited while pid {gpid} of the command's group ran"
        );
        assert!(stderr.contains("SIGKILL"), "{stderr}");
        assert!(took >= Duration::from_secs(1), "{took:?}");
        assert!(took < Duration::from_secs(20), "{took:?}");
    }

    /// The lock's lease revoked behind the holder's back: CMD gets SIGTERM, exit 125.
    #[test]
    fn lost_lock_stops_command() {
        let name = format!("{}/job", unique("lost"));
        let dir = support::fresh_dir("cli-lost");
        let marker = dir.join("running");
        let script = format!("touch {}; exec sleep 60", marker.display());
        let started = Instant::now();
        let holder = ck(&[
            "--url",
            &url(),
            "lock",
            &name,
            "--ttl",
            "30s",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start holder");
        assert!(support::wait_until(Duration::from_secs(30), || marker.exists()));
        revoke_lock_lease(&name);
        let out = wait_bounded(holder, started);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{stderr}");
        assert!(stderr.contains("lost"), "{stderr}");
        assert!(started.elapsed() < Duration::from_secs(45));
    }
}

#[cfg(feature = "zookeeper")]
mod zookeeper {
    use super::*;
    use support::zookeeper;

    fn url() -> String {
        zookeeper::shared().url()
    }

    backend_tests!(key_ttl: true);

    #[test]
    fn unreachable_server_fails_within_bound() {
        super::unreachable_server_fails_within_bound(|port| {
            format!("zk://127.0.0.1:{port}?connect_timeout=2s")
        });
    }
}

/// Consul, against the in-process simulator of its HTTP API (no Consul server can be installed
/// on these machines).
#[cfg(feature = "consul")]
mod consul {
    use super::*;
    use std::sync::OnceLock;
    use support::consul_sim::ConsulSim;

    fn url() -> String {
        static SIM: OnceLock<ConsulSim> = OnceLock::new();
        SIM.get_or_init(ConsulSim::start).url()
    }

    /// Whether the backend declares key TTLs.
    fn key_ttl() -> bool {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let b = coordkit::connect(&url()).await.expect("connect");
            b.capabilities().key_ttl
        })
    }

    backend_tests!(key_ttl: key_ttl());
}

/// CPU time (user + system, clock ticks) of a running process, from `/proc/PID/stat`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A `coordkit lock` waiting behind a held lock and a `coordkit watch` with nothing to report
/// sleep (the embedded backends: woken by inotify and timers, never by their own looks).
fn waiting_and_watching_processes_are_idle(url: &str) {
    let spawn = |args: &[&str]| {
        Command::new(BIN)
            .arg("--url")
            .arg(url)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut holder = spawn(&["lock", "idle", "--ttl", "30s", "--", "sleep", "6"]);
    std::thread::sleep(Duration::from_millis(800));
    let mut waiter = spawn(&["lock", "idle", "--wait", "30s", "--", "true"]);
    let mut watcher = spawn(&["watch", "quiet/"]);
    // Let both start up, then count their CPU over three seconds.
    std::thread::sleep(Duration::from_secs(1));
    let before = (cpu_ticks(waiter.id()), cpu_ticks(watcher.id()));
    std::thread::sleep(Duration::from_secs(3));
    let after = (cpu_ticks(waiter.id()), cpu_ticks(watcher.id()));
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "the waiter waits while the lock is held"
    );
    let held = holder.wait().unwrap();
    let got = waiter.wait().unwrap();
    watcher.kill().unwrap();
    watcher.wait().unwrap();
    assert!(
        held.success() && got.success(),
        "holder {held:?}, waiter {got:?}"
    );
    // 3 s is 300 ticks of 10 ms; a process that kept waking itself would use most of them.
    assert!(
        after.0 - before.0 <= 15,
        "waiting lock used {} ticks in 3 s",
        after.0 - before.0
    );
    assert!(
        after.1 - before.1 <= 15,
        "idle watch used {} ticks in 3 s",
        after.1 - before.1
    );
}

/// SQLite: a database file and no server at all.
#[cfg(feature = "sqlite")]
mod sqlite {
    use std::sync::OnceLock;

    fn url() -> String {
        static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
        let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory"));
        format!("sqlite://{}", dir.path().join("cli.db").display())
    }

    backend_tests!(key_ttl: true);
    recipe_tests!();

    #[test]
    fn watch_prints_json_events() {
        super::watch_prints_events(&url(), true);
    }

    #[test]
    fn waiting_and_watching_processes_are_idle() {
        super::waiting_and_watching_processes_are_idle(&url());
    }
}

/// A shared directory and no server at all.
#[cfg(feature = "file")]
mod file {
    use std::sync::OnceLock;

    fn url() -> String {
        static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
        let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory"));
        format!("file://{}", dir.path().join("cli").display())
    }

    backend_tests!(key_ttl: true);
    recipe_tests!();

    #[test]
    fn watch_prints_json_events() {
        super::watch_prints_events(&url(), true);
    }

    #[test]
    fn waiting_and_watching_processes_are_idle() {
        super::waiting_and_watching_processes_are_idle(&url());
    }
}

/// PostgreSQL: the test binary's server, a schema of the module's own.
#[cfg(feature = "postgres")]
mod postgres {
    use std::sync::OnceLock;

    fn url() -> String {
        static URL: OnceLock<String> = OnceLock::new();
        URL.get_or_init(|| {
            let pg = crate::support::postgres::shared();
            pg.url(&crate::support::postgres::fresh_schema("cli"))
        })
        .clone()
    }

    backend_tests!(key_ttl: true);

    #[test]
    fn unreachable_server_fails_within_bound() {
        super::unreachable_server_fails_within_bound(|port| {
            format!("postgres://postgres@127.0.0.1:{port}/postgres?connect_timeout=2s")
        });
    }
}
