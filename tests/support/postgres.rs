//! A real PostgreSQL server for the tests: a cluster made by `initdb` in a fresh directory under
//! the base dir (owned by the `postgres` user, since PostgreSQL refuses to run as root), and the
//! `postgres` server process started as that user on a free loopback port, its PID registered
//! with the reaper. Password authentication (SCRAM) over TCP, so that a wrong password fails.
//!
//! - [`PgServer::start`]: a server of a test's own, stopped (fast shutdown, then SIGKILL, by
//!   PID) when dropped;
//! - [`shared`]: one server per test binary, stopped by PID when the test process exits
//!   (an `atexit` handler; the reaper kills it if the process dies without exiting).
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::server::{Server, Tail};

/// The superuser's password in every test cluster.
pub const PASSWORD: &str = "pg-test-secret";

/// Where Debian puts the server binaries of `major`.
fn bin_dir() -> PathBuf {
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(base)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    versions.retain(|p| p.join("bin/initdb").exists());
    versions.sort();
    versions.pop().map(|p| p.join("bin")).unwrap_or_else(|| {
        panic!("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (apt-get install postgresql; scripts/test.sh does)")
    })
}

/// The uid and gid of the `postgres` user.
fn postgres_ids() -> (u32, u32) {
    let out = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .expect("id -u");
    let uid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("postgres uid");
    let out = Command::new("id")
        .args(["-g", "postgres"])
        .output()
        .expect("id -g");
    let gid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("postgres gid");
    (uid, gid)
}

/// A PostgreSQL server process on its own cluster.
pub struct PgServer {
    server: Server,
    port: u16,
    dir: PathBuf,
    data: PathBuf,
    /// With TLS: the CA certificate (PEM) that signed the server's certificate.
    ca: Option<PathBuf>,
}

impl PgServer {
    /// Makes a cluster and starts the server; panics (failing the test) if it is not ready
    /// within 60 s.
    pub fn start() -> PgServer {
        Self::start_with(false)
    }

    /// [`start`](Self::start) with TLS on: a test CA (see [`ca`](Self::ca)) and a server
    /// certificate for `localhost` and `127.0.0.1`, made with `openssl`.
    pub fn start_tls() -> PgServer {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> PgServer {
        let dir = super::fresh_dir("postgres");
        let (uid, gid) = postgres_ids();
        let data = dir.join("data");
        let ca = tls.then(|| make_certs(&dir));
        let pw = dir.join("pw");
        std::fs::write(&pw, PASSWORD).expect("write password file");
        let status = Command::new("chown")
            .args(["-R", &format!("{uid}:{gid}")])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(status.success(), "chown {}", dir.display());
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin_dir().join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--auth-local=trust",
            ])
            .args(["--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pw.display()))
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = super::free_port();
        let mut pg = PgServer {
            server: Server::new("postgres", &dir, "postgres", Tail::Lines(30)),
            port,
            dir,
            data,
            ca,
        };
        pg.run();
        pg
    }

    /// The test CA's certificate, with TLS on.
    pub fn ca(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    fn run(&mut self) {
        let (uid, gid) = postgres_ids();
        let mut cmd = Command::new(bin_dir().join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=400"])
            .args(["-c", "fsync=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "shared_buffers=32MB"]);
        if self.ca.is_some() {
            cmd.args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!(
                    "ssl_cert_file={}",
                    self.dir.join("server.pem").display()
                ))
                .arg("-c")
                .arg(format!(
                    "ssl_key_file={}",
                    self.dir.join("server.key").display()
                ));
        }
        cmd.uid(uid).gid(gid);
        self.server.start(&mut cmd);
        let log = self.server.log();
        self.server.expect_ready(Duration::from_secs(60), || {
            std::fs::read_to_string(&log)
                .is_ok_and(|t| t.contains("database system is ready to accept connections"))
        });
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PID of the running server process.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// A URL for the superuser, on `port` (the server's, or a proxy's), with `schema`.
    pub fn url_at(&self, port: u16, schema: &str) -> String {
        format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/postgres?schema={schema}")
    }

    /// A URL for the superuser with `schema`.
    pub fn url(&self, schema: &str) -> String {
        self.url_at(self.port, schema)
    }

    /// Runs `sql` through `psql` as the superuser; panics if it fails.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .env("PGPASSWORD", PASSWORD)
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-X",
                "-q",
                "-t",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-p"])
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql)
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Sends `sig` to the server process and waits up to `bound` for it to exit.
    fn signal_and_wait(&mut self, sig: i32, bound: Duration) -> bool {
        let Some(pid) = self.server.pid() else {
            return true;
        };
        // SAFETY: kill(2) on the PID of a child this process started and has not reaped.
        unsafe {
            libc::kill(pid as i32, sig);
        }
        let t0 = Instant::now();
        while self.server.alive() {
            if t0.elapsed() > bound {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Stops the server as a crash would (immediate shutdown: SIGQUIT; SIGKILL after 10 s),
    /// and starts it again on the same port and data; waits until it serves. Returns how long
    /// it was down.
    pub fn restart(&mut self) -> Duration {
        let t0 = Instant::now();
        self.signal_and_wait(libc::SIGQUIT, Duration::from_secs(10));
        self.server.kill();
        self.run();
        t0.elapsed()
    }

    /// Stops the server: fast shutdown (SIGINT), SIGKILL after 10 s.
    pub fn stop(&mut self) {
        self.server.resume();
        self.signal_and_wait(libc::SIGINT, Duration::from_secs(10));
        self.server.kill();
    }

    /// The end of the server's log.
    pub fn log_tail(&self) -> String {
        self.server.log_tail()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Makes a CA, a server certificate it signs (for `localhost` and `127.0.0.1`) and another CA
/// (`other-ca.pem`, which signed nothing) in `dir`; gives the CA's certificate.
fn make_certs(dir: &Path) -> PathBuf {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for (key, cert, cn) in [
        ("ca.key", "ca.pem", "coordkit test CA"),
        ("other-ca.key", "other-ca.pem", "another CA"),
    ] {
        let subj = format!("/CN={cn}");
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend(["-keyout", key, "-out", cert, "-days", "3", "-subj", &subj]);
        run(&a);
    }
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&a);
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "3",
        "-extfile",
        "ext",
    ]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod server.key");
    dir.join("ca.pem")
}

static SHARED_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn stop_shared() {
    let pid = SHARED_PID.load(Ordering::SeqCst);
    if pid <= 0 {
        return;
    }
    // SAFETY: signals and waits for the PID of the shared server, a child of this process.
    unsafe {
        libc::kill(pid, libc::SIGINT);
        for _ in 0..500 {
            let mut status = 0;
            if libc::waitpid(pid, &mut status, libc::WNOHANG) == pid {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// The test binary's shared server, started on first use.
pub fn shared() -> &'static PgServer {
    static SHARED: OnceLock<PgServer> = OnceLock::new();
    SHARED.get_or_init(|| {
        let s = PgServer::start();
        SHARED_PID.store(s.pid().expect("started") as i32, Ordering::SeqCst);
        // SAFETY: registers a plain function to run at exit.
        unsafe {
            libc::atexit(stop_shared);
        }
        s
    })
}

/// A schema name not used before by this test process.
pub fn fresh_schema(stem: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{stem}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A pgbouncer in front of a [`PgServer`], as the `postgres` user, on a free loopback port,
/// trusting its clients and logging in to the server with the superuser's password.
pub struct PgBouncer {
    proc: super::Proc,
    port: u16,
}

impl PgBouncer {
    /// Starts pgbouncer with `pool_mode` (`transaction`, `session`) and a server pool of 4
    /// connections; panics if it does not accept connections within 20 s.
    pub fn start(pg: &PgServer, pool_mode: &str) -> PgBouncer {
        let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("pgbouncer is not installed (apt-get install pgbouncer; scripts/test.sh does)");
        let dir = super::fresh_dir("pgbouncer");
        let port = super::free_port();
        std::fs::write(
            dir.join("userlist.txt"),
            format!("\"postgres\" \"{PASSWORD}\"\n"),
        )
        .expect("write userlist");
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 postgres = host=127.0.0.1 port={pgport} dbname=postgres user=postgres password={PASSWORD}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {users}\n\
                 pool_mode = {pool_mode}\n\
                 default_pool_size = 4\n\
                 max_client_conn = 500\n\
                 ignore_startup_parameters = extra_float_digits\n",
                pgport = pg.port(),
                users = dir.join("userlist.txt").display(),
            ),
        )
        .expect("write pgbouncer.ini");
        let (uid, gid) = postgres_ids();
        let status = Command::new("chown")
            .args(["-R", &format!("{uid}:{gid}")])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(status.success());
        let mut cmd = Command::new(bin);
        cmd.arg(&ini).uid(uid).gid(gid);
        let mut proc = super::Proc::spawn("pgbouncer", &mut cmd, &dir.join("pgbouncer.log"));
        let up = super::wait_until(Duration::from_secs(20), || {
            super::port_open(port) || !proc.alive()
        });
        assert!(
            up && proc.alive(),
            "pgbouncer did not start: {}",
            std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
        );
        PgBouncer { proc, port }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL through the pooler (no password: it trusts its clients) with `schema` and `query`
    /// (`&`-joined options).
    pub fn url(&self, schema: &str, query: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?schema={schema}{query}",
            self.port
        )
    }
}

/// The test binary's shared pgbouncer in transaction mode, in front of [`shared`] (killed by
/// the reaper when the test process exits).
pub fn shared_bouncer() -> &'static PgBouncer {
    static B: OnceLock<PgBouncer> = OnceLock::new();
    B.get_or_init(|| PgBouncer::start(shared(), "transaction"))
}
