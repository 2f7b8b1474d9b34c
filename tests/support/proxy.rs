//! A TCP proxy that can black-hole its connections: what a network partition, or a network path
//! stalled by a paused middlebox, looks like to the client on one side of it.
//!
//! [`Proxy::start`] listens on a free loopback port and forwards every accepted connection to a
//! target address. Its [`Mode`] can be switched at any time and applies at once to every
//! current and future connection:
//!
//! - [`Mode::Forward`]: bytes flow both ways (half-closes are passed on).
//! - [`Mode::Stall`]: every connection is held open and nothing is forwarded in either
//!   direction; new connections are accepted (the kernel completes the handshake) but not
//!   connected onwards. Neither side sees an error: writes fill socket buffers, reads wait.
//! - [`Mode::Reset`]: every connection is closed with a TCP reset (both sides), and new ones are
//!   reset as soon as they are accepted.
//! - [`Mode::HoldReplies`]: what the client sends reaches the target, what the target sends
//!   back is held (as in a stall): a test sees which requests a client sends before it has any
//!   answer.
//!
//! [`Proxy::heal`] goes back to `Forward`. As after a real partition that ends before TCP gives
//! up, stalled connections resume: data held back during the stall (at most one buffer per
//! direction in the proxy, the rest in the kernel's socket buffers) is delivered in order, and
//! connections accepted during the stall are connected to the target and start forwarding.
//! Connections closed by a reset stay closed.
//!
//! The proxy runs on its own thread with its own tokio runtime, so it serves any test, whatever
//! runtime the test uses (or none). Dropping it stops the listener and closes every connection.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways.
    Forward,
    /// Hold every connection open and forward nothing (a black hole).
    Stall,
    /// Reset every connection, and every new one.
    Reset,
    /// Forward towards the target only; hold what comes back.
    HoldReplies,
}

/// The direction a pump copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToTarget,
    ToClient,
}

/// Whether bytes flow in `dir` in `mode`; `Err` in `Reset`.
fn flows(mode: Mode, dir: Dir) -> Result<bool, End> {
    match mode {
        Mode::Forward => Ok(true),
        Mode::Stall => Ok(false),
        Mode::HoldReplies => Ok(dir == Dir::ToTarget),
        Mode::Reset => Err(End::Reset),
    }
}

/// Counters of a proxy.
#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    open: AtomicUsize,
    upstream_connects: AtomicU64,
    to_target: AtomicU64,
    to_client: AtomicU64,
}

/// A running proxy. Dropping it stops it and closes every connection.
pub struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    mode: watch::Sender<Mode>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("mode", &self.mode())
            .field("open", &self.open_connections())
            .finish()
    }
}

impl Proxy {
    /// Starts a proxy to `target` on a free loopback port, in [`Mode::Forward`].
    pub fn start(target: SocketAddr) -> Proxy {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("proxy: bind a loopback port");
        std_listener
            .set_nonblocking(true)
            .expect("proxy: nonblocking listener");
        let addr = std_listener.local_addr().expect("proxy: local addr");
        let (mode, mode_rx) = watch::channel(Mode::Forward);
        let stats = Arc::new(Stats::default());
        let stop = CancellationToken::new();
        let (stats2, stop2) = (stats.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy: runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("proxy: listener");
                    serve(listener, target, mode_rx, stats2, stop2).await;
                });
                // Dropping the runtime drops every connection task, closing its sockets.
                drop(rt);
            })
            .expect("proxy: start thread");
        Proxy {
            addr,
            target,
            mode,
            stats,
            stop,
            thread: Some(thread),
        }
    }

    /// Starts a proxy to `127.0.0.1:port`.
    pub fn to_port(port: u16) -> Proxy {
        Proxy::start(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port the proxy listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address it forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Switches every current and future connection to `mode`.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Black-holes every connection: held open, nothing forwarded.
    pub fn stall(&self) {
        self.set_mode(Mode::Stall);
    }

    /// Resets every connection, and every new one.
    pub fn reset(&self) {
        self.set_mode(Mode::Reset);
    }

    /// Back to forwarding: stalled connections resume with the data held back.
    pub fn heal(&self) {
        self.set_mode(Mode::Forward);
    }

    /// Client connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    /// Client connections currently open (accepted and not yet closed by the proxy).
    pub fn open_connections(&self) -> usize {
        self.stats.open.load(Ordering::SeqCst)
    }

    /// Connections made to the target so far.
    pub fn upstream_connects(&self) -> u64 {
        self.stats.upstream_connects.load(Ordering::SeqCst)
    }

    /// Bytes forwarded so far: (client → target, target → client).
    pub fn bytes_forwarded(&self) -> (u64, u64) {
        (
            self.stats.to_target.load(Ordering::SeqCst),
            self.stats.to_client.load(Ordering::SeqCst),
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: TcpListener,
    target: SocketAddr,
    mode: watch::Receiver<Mode>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((client, _)) => {
                stats.accepted.fetch_add(1, Ordering::SeqCst);
                stats.open.fetch_add(1, Ordering::SeqCst);
                let open = OpenGuard(stats.clone());
                tokio::spawn(connection(client, target, mode.clone(), open));
            }
            // Out of file descriptors and the like: try again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Counts a connection as open until dropped.
struct OpenGuard(Arc<Stats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How one direction of a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The source closed its side; the close was passed on.
    Eof,
    /// A read or write failed.
    Failed,
    /// The proxy was switched to `Reset`.
    Reset,
    /// The other direction failed or was reset.
    Aborted,
}

/// Waits until bytes flow in `dir` (Ok) or the mode is `Reset` (Err).
async fn until_forward(mode: &mut watch::Receiver<Mode>, dir: Dir) -> Result<(), End> {
    loop {
        if flows(*mode.borrow_and_update(), dir)? {
            return Ok(());
        }
        if mode.changed().await.is_err() {
            // The proxy is gone.
            return Err(End::Reset);
        }
    }
}

/// Resolves when the mode becomes `Reset`.
async fn until_reset(mode: &mut watch::Receiver<Mode>) {
    loop {
        if *mode.borrow_and_update() == Mode::Reset {
            return;
        }
        if mode.changed().await.is_err() {
            return;
        }
    }
}

/// Closes with a TCP reset rather than a FIN.
fn reset_close(s: TcpStream) {
    // SO_LINGER 0: close() sends RST at once and does not block.
    #[allow(deprecated)]
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
}

async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    open: OpenGuard,
) {
    let stats = open.0.clone();
    // A connection accepted during a stall is connected onwards only once forwarding resumes.
    if until_forward(&mut mode, Dir::ToTarget).await.is_err() {
        reset_close(client);
        return;
    }
    let upstream = tokio::select! {
        biased;
        _ = until_reset(&mut mode) => {
            reset_close(client);
            return;
        }
        u = TcpStream::connect(target) => u,
    };
    let mut upstream = match upstream {
        Ok(u) => u,
        Err(_) => {
            reset_close(client);
            return;
        }
    };
    stats.upstream_connects.fetch_add(1, Ordering::SeqCst);
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let abort = CancellationToken::new();
    let (ends_up, ends_down) = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        tokio::join!(
            pump(
                cr,
                uw,
                Dir::ToTarget,
                mode.clone(),
                &stats.to_target,
                &abort
            ),
            pump(
                ur,
                cw,
                Dir::ToClient,
                mode.clone(),
                &stats.to_client,
                &abort
            ),
        )
    };
    if ends_up == End::Reset || ends_down == End::Reset {
        reset_close(client);
        reset_close(upstream);
    }
    drop(open);
}

/// Copies `from` to `to` while the mode allows, holding one buffer back while stalled.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    dir: Dir,
    mut mode: watch::Receiver<Mode>,
    counter: &AtomicU64,
    abort: &CancellationToken,
) -> End {
    let end = pump_inner(&mut from, &mut to, dir, &mut mode, counter, abort).await;
    if end != End::Eof {
        abort.cancel();
    }
    end
}

async fn pump_inner(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    dir: Dir,
    mode: &mut watch::Receiver<Mode>,
    counter: &AtomicU64,
    abort: &CancellationToken,
) -> End {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            biased;
            _ = abort.cancelled() => return End::Aborted,
            _ = until_reset(mode) => return End::Reset,
            r = from.read(&mut buf) => match r {
                Ok(n) => n,
                Err(_) => return End::Failed,
            },
        };
        // Whatever was read (data, or the end of the stream) waits while the proxy stalls.
        tokio::select! {
            biased;
            _ = abort.cancelled() => return End::Aborted,
            r = until_forward(mode, dir) => if let Err(e) = r { return e; },
        }
        if n == 0 {
            let _ = to.shutdown().await;
            return End::Eof;
        }
        // Write it out, stopping as soon as the proxy stalls (a write is cancel-safe: an
        // unfinished one wrote nothing).
        let mut off = 0;
        while off < n {
            tokio::select! {
                biased;
                _ = abort.cancelled() => return End::Aborted,
                r = until_forward(mode, dir) => if let Err(e) = r { return e; },
            }
            tokio::select! {
                biased;
                _ = abort.cancelled() => return End::Aborted,
                _ = until_not_forward(mode, dir) => continue,
                w = to.write(&buf[off..n]) => match w {
                    Ok(0) | Err(_) => return End::Failed,
                    Ok(k) => {
                        off += k;
                        counter.fetch_add(k as u64, Ordering::SeqCst);
                    }
                },
            }
        }
    }
}

/// Resolves when bytes stop flowing in `dir`.
async fn until_not_forward(mode: &mut watch::Receiver<Mode>, dir: Dir) {
    loop {
        if flows(*mode.borrow_and_update(), dir) != Ok(true) {
            return;
        }
        if mode.changed().await.is_err() {
            return;
        }
    }
}
