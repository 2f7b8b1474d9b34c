//! A fencing-checking shared resource for processes: a tiny loopback server that holds one
//! counter and rejects reads and writes that carry a stale fencing token.
//!
//! This is the process-level counterpart of [`coordkit::FencedResource`] (which it uses for the
//! check itself). It stands for whatever a lock protects in real life — a database row, a file
//! in object storage — and shows what such a resource must do for a lock to be safe when a
//! holder is paused past its TTL: remember the highest token it has seen, and refuse anything
//! lower, **on reads as well as writes** (a paused holder that read before the pause and writes
//! after it must not overwrite the next holder's work, and the next holder's read is what tells
//! the resource that a newer holder exists).
//!
//! It also watches for what a lock is meant to prevent, and records it:
//! - **overlap**: a client enters (fenced read) while another client has entered and not yet
//!   left (exit, or its connection closed);
//! - **lost update**: a write whose `read_value` is not the counter's current value (someone
//!   else wrote between this client's read and its write);
//! - **token order**: accepted entries whose tokens do not strictly increase.
//!
//! For the recipes (semaphores, read-write locks) it also keeps an **occupancy** record
//! ([`Occupancy`]): holders announce themselves with `ENTER <kind> <slot> <token>` once their
//! permit or guard is granted and `LEAVE` before they give it back, and the server counts the
//! holders atomically, keeps the largest number inside at once, and flags two holders of one
//! semaphore slot, a writer inside with anyone else, a slot's token that did not increase, and a
//! read-write lock token out of order with a writer's. `AWAIT` lets a holder stay until a
//! number of holders are inside (or a bound passes), so that a run shows a semaphore admitting
//! all its permits at once whatever the backend's speed.
//!
//! Protocol: one request line, one answer line, over TCP on 127.0.0.1.
//!
//! | request | answer |
//! |---|---|
//! | `HELLO <worker> <pid>` | `OK` |
//! | `READ <token>` (fenced; enters the critical section) | `VAL <value>` or `STALE <highest>` |
//! | `WRITE <token> <read_value> <new_value>` (fenced) | `OK` or `STALE <highest>` |
//! | `UREAD` / `UWRITE <read_value> <new_value>` (unfenced; for the no-lock control) | `VAL <v>` / `OK` |
//! | `SLOW <token>` (announces a long critical section) | `OK` |
//! | `EXIT <token>` (leaves the critical section) | `OK` |
//! | `ENTER sem\|read\|write <slot> <token>` (a recipe hold begins) | `OK` |
//! | `LEAVE` (the recipe hold ends) | `OK` |
//! | `AWAIT <n> <ms>` (waits until `n` recipe holders are inside, at most `ms`) | `INSIDE <holders>` |
//!
//! The server side ([`FenceServer`]) runs on plain threads inside the test process (which is
//! never paused); the client side ([`FenceClient`]) is async and used by `examples/contender.rs`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use coordkit::{FencedResource, FencingToken};

/// An entry into the critical section seen by the resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entered {
    pub worker: String,
    pub token: u64,
}

/// Two clients inside at once: `entering` came in while `inside` had not left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub entering: Entered,
    pub inside: Vec<Entered>,
}

/// A request refused because its token was stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub worker: String,
    pub op: &'static str,
    pub token: u64,
    pub highest: u64,
}

/// An accepted write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub worker: String,
    pub token: u64,
    pub read_value: i64,
    pub new_value: i64,
    /// `read_value` was not the current value: an update was lost.
    pub lost_update: bool,
}

/// Everything the resource saw.
#[derive(Debug, Clone, Default)]
pub struct FenceState {
    pub value: i64,
    pub entries: Vec<Entered>,
    pub writes: Vec<Written>,
    pub rejected: Vec<Rejected>,
    pub overlaps: Vec<Overlap>,
    /// Entries whose token was not above the previous entry's (possible only unfenced).
    pub order_violations: Vec<(u64, u64)>,
    pub connections: usize,
    /// The recipe holds (`ENTER` / `LEAVE`).
    pub occupancy: Occupancy,
    inside: HashMap<u64, Entered>,
    slow: HashMap<u64, Entered>,
}

/// What kind of recipe hold a holder announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HoldKind {
    /// A semaphore permit: one holder per slot.
    Permit,
    /// A shared hold of a read-write lock.
    Read,
    /// The exclusive hold of a read-write lock.
    Write,
}

impl HoldKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldKind::Permit => "sem",
            HoldKind::Read => "read",
            HoldKind::Write => "write",
        }
    }

    pub fn parse(s: &str) -> Option<HoldKind> {
        match s {
            "sem" => Some(HoldKind::Permit),
            "read" => Some(HoldKind::Read),
            "write" => Some(HoldKind::Write),
            _ => None,
        }
    }
}

/// A recipe holder inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub worker: String,
    pub kind: HoldKind,
    pub slot: u32,
    pub token: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} slot {} token {})",
            self.worker,
            self.kind.as_str(),
            self.slot,
            self.token
        )
    }
}

/// The occupancy record of recipe holds, updated atomically with each `ENTER` and `LEAVE`.
#[derive(Debug, Clone, Default)]
pub struct Occupancy {
    /// Holds begun.
    pub entries: usize,
    /// Entries by kind.
    pub by_kind: HashMap<&'static str, usize>,
    /// The largest number of holders inside at once.
    pub max_holders: usize,
    /// The largest number of readers inside at once.
    pub max_readers: usize,
    /// Reads that began while another reader was inside.
    pub reader_overlaps: usize,
    /// The slots semaphore holders occupied.
    pub slots: std::collections::BTreeSet<u32>,
    /// Everything that must not happen, described.
    pub violations: Vec<String>,
    holding: HashMap<u64, Holder>,
    /// The last token per semaphore slot.
    slot_tokens: HashMap<u32, u64>,
    /// The highest token of any read-write hold, and of any write hold.
    highest_rw: Option<u64>,
    highest_writer: Option<u64>,
    rw_tokens: std::collections::HashSet<u64>,
}

impl Occupancy {
    /// Who holds now.
    pub fn holders(&self) -> Vec<Holder> {
        self.holding.values().cloned().collect()
    }

    fn enter(&mut self, conn: u64, me: Holder) {
        self.entries += 1;
        *self.by_kind.entry(me.kind.as_str()).or_default() += 1;
        if let Some(old) = self.holding.remove(&conn) {
            self.violations
                .push(format!("{me} entered again without leaving {old}"));
        }
        for other in self.holding.values() {
            let clash = match (me.kind, other.kind) {
                (HoldKind::Permit, HoldKind::Permit) => other.slot == me.slot,
                (HoldKind::Read, HoldKind::Read) => false,
                _ => true,
            };
            if clash {
                self.violations
                    .push(format!("{me} entered while {other} was inside"));
            }
        }
        match me.kind {
            HoldKind::Permit => {
                self.slots.insert(me.slot);
                if let Some(prev) = self.slot_tokens.insert(me.slot, me.token) {
                    if me.token <= prev {
                        self.violations.push(format!(
                            "{me}: slot {}'s token did not increase (previous holder's {prev})",
                            me.slot
                        ));
                    }
                }
            }
            HoldKind::Read | HoldKind::Write => {
                if !self.rw_tokens.insert(me.token) {
                    self.violations
                        .push(format!("{me}: token {} handed out twice", me.token));
                }
                if let Some(w) = self.highest_writer.filter(|w| me.token <= *w) {
                    self.violations.push(format!(
                        "{me}: token not above the earlier writer's token {w}"
                    ));
                }
                if me.kind == HoldKind::Write {
                    if let Some(h) = self.highest_rw.filter(|h| me.token <= *h) {
                        self.violations.push(format!(
                            "{me}: writer's token not above the earlier hold's token {h}"
                        ));
                    }
                    self.highest_writer = Some(me.token);
                }
                self.highest_rw = Some(self.highest_rw.map_or(me.token, |h| h.max(me.token)));
            }
        }
        let readers = self
            .holding
            .values()
            .filter(|h| h.kind == HoldKind::Read)
            .count();
        let reading = me.kind == HoldKind::Read;
        if reading && readers > 0 {
            self.reader_overlaps += 1;
        }
        self.holding.insert(conn, me);
        self.max_holders = self.max_holders.max(self.holding.len());
        self.max_readers = self.max_readers.max(readers + usize::from(reading));
    }

    fn leave(&mut self, conn: u64) -> Option<Holder> {
        self.holding.remove(&conn)
    }
}

impl FenceState {
    /// Accepted writes that lost an update.
    pub fn lost_updates(&self) -> usize {
        self.writes.iter().filter(|w| w.lost_update).count()
    }

    /// The highest token any entry carried.
    pub fn highest_entry(&self) -> Option<u64> {
        self.entries.iter().map(|e| e.token).max()
    }
}

struct Shared {
    state: Mutex<FenceState>,
    /// Notified whenever a recipe holder enters or leaves.
    changed: Condvar,
    fence: FencedResource<()>,
}

/// The resource server. Dropping it stops accepting new connections.
pub struct FenceServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FenceServer {
    /// Starts the server on a free loopback port.
    pub fn start() -> FenceServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fence server");
        let addr = listener.local_addr().expect("fence server addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(FenceState::default()),
            changed: Condvar::new(),
            fence: FencedResource::new(()),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            let mut next_conn = 0u64;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                next_conn += 1;
                let (s, conn) = (s.clone(), next_conn);
                std::thread::spawn(move || serve(s, conn, stream));
            }
        });
        FenceServer { addr, shared }
    }

    /// `host:port` for clients.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// A copy of everything seen so far.
    pub fn snapshot(&self) -> FenceState {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Who is inside the critical section now (entered, not left, connection open).
    pub fn inside(&self) -> Vec<Entered> {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.inside.values().cloned().collect()
    }

    /// Holders that announced a long critical section and have not left it yet.
    pub fn slow_holders(&self) -> Vec<Entered> {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.slow.values().cloned().collect()
    }

    /// Polls until `f` holds for the state or `timeout` passes; whether it held.
    pub fn wait_for(&self, timeout: Duration, mut f: impl FnMut(&FenceState) -> bool) -> bool {
        let start = Instant::now();
        loop {
            if f(&self.shared.state.lock().unwrap_or_else(|p| p.into_inner())) {
                return true;
            }
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn serve(shared: Arc<Shared>, conn: u64, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut writer = stream;
    let mut worker = format!("conn{conn}");
    shared
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .connections += 1;
    for line in BufReader::new(read_half).lines() {
        let Ok(line) = line else { break };
        let answer = handle(&shared, conn, &mut worker, &line);
        if writer.write_all(format!("{answer}\n").as_bytes()).is_err() {
            break;
        }
    }
    // The connection closed (the client exited or was killed): it is no longer inside.
    let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    st.inside.remove(&conn);
    st.slow.remove(&conn);
    st.occupancy.leave(conn);
    shared.changed.notify_all();
}

fn handle(shared: &Shared, conn: u64, worker: &mut String, line: &str) -> String {
    let parts: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| parts.get(i).and_then(|s| s.parse::<i64>().ok());
    let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    match parts.first().copied() {
        Some("HELLO") => {
            if let Some(w) = parts.get(1) {
                *worker = (*w).to_string();
            }
            "OK".into()
        }
        Some(op @ ("READ" | "UREAD")) => {
            let token = if op == "READ" { num(1) } else { Some(0) };
            let Some(token) = token else {
                return "ERR bad request".into();
            };
            if op == "READ" {
                // The fencing check, done by the library's in-process helper.
                if let Err(_e) = shared
                    .fence
                    .write(FencingToken::from_raw(token as u64), |_| ())
                {
                    let highest = shared.fence.highest_token().map_or(0, |t| t.get());
                    st.rejected.push(Rejected {
                        worker: worker.clone(),
                        op: "read",
                        token: token as u64,
                        highest,
                    });
                    return format!("STALE {highest}");
                }
            }
            let me = Entered {
                worker: worker.clone(),
                token: token as u64,
            };
            let others: Vec<Entered> = st
                .inside
                .iter()
                .filter(|(c, _)| **c != conn)
                .map(|(_, e)| e.clone())
                .collect();
            if !others.is_empty() {
                st.overlaps.push(Overlap {
                    entering: me.clone(),
                    inside: others,
                });
            }
            if op == "READ" {
                if let Some(prev) = st.entries.last().map(|e| e.token) {
                    if me.token <= prev {
                        st.order_violations.push((prev, me.token));
                    }
                }
            }
            st.entries.push(me.clone());
            st.inside.insert(conn, me);
            format!("VAL {}", st.value)
        }
        Some(op @ ("WRITE" | "UWRITE")) => {
            st.slow.remove(&conn);
            let (token, read_value, new_value) = if op == "WRITE" {
                (num(1), num(2), num(3))
            } else {
                (Some(0), num(1), num(2))
            };
            let (Some(token), Some(read_value), Some(new_value)) = (token, read_value, new_value)
            else {
                return "ERR bad request".into();
            };
            if op == "WRITE" {
                if let Err(_e) = shared
                    .fence
                    .write(FencingToken::from_raw(token as u64), |_| ())
                {
                    let highest = shared.fence.highest_token().map_or(0, |t| t.get());
                    st.rejected.push(Rejected {
                        worker: worker.clone(),
                        op: "write",
                        token: token as u64,
                        highest,
                    });
                    return format!("STALE {highest}");
                }
            }
            let lost_update = read_value != st.value;
            st.value = new_value;
            st.writes.push(Written {
                worker: worker.clone(),
                token: token as u64,
                read_value,
                new_value,
                lost_update,
            });
            "OK".into()
        }
        Some("SLOW") => {
            if let Some(token) = num(1) {
                st.slow.insert(
                    conn,
                    Entered {
                        worker: worker.clone(),
                        token: token as u64,
                    },
                );
            }
            "OK".into()
        }
        Some("EXIT") => {
            st.inside.remove(&conn);
            st.slow.remove(&conn);
            "OK".into()
        }
        Some("ENTER") => {
            let kind = parts.get(1).and_then(|k| HoldKind::parse(k));
            let slot = parts.get(2).and_then(|s| s.parse::<u32>().ok());
            let token = parts.get(3).and_then(|s| s.parse::<u64>().ok());
            let (Some(kind), Some(slot), Some(token)) = (kind, slot, token) else {
                return "ERR bad request".into();
            };
            let me = Holder {
                worker: worker.clone(),
                kind,
                slot,
                token,
            };
            st.occupancy.enter(conn, me);
            shared.changed.notify_all();
            "OK".into()
        }
        Some("LEAVE") => {
            if st.occupancy.leave(conn).is_none() {
                let v = format!("{worker} left without having entered");
                st.occupancy.violations.push(v);
            }
            shared.changed.notify_all();
            "OK".into()
        }
        Some("AWAIT") => {
            let (Some(n), Some(ms)) = (num(1), num(2)) else {
                return "ERR bad request".into();
            };
            let bound = Duration::from_millis(ms.max(0) as u64);
            let (st, _) = shared
                .changed
                .wait_timeout_while(st, bound, |s| (s.occupancy.holding.len() as i64) < n)
                .unwrap_or_else(|p| p.into_inner());
            format!("INSIDE {}", st.occupancy.holding.len())
        }
        _ => "ERR unknown request".into(),
    }
}

/// The answer to a fenced request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced<T> {
    /// Accepted.
    Ok(T),
    /// Refused: a request with this higher token was already accepted.
    Stale(u64),
}

/// The client side, for worker processes.
pub struct FenceClient {
    reader: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl FenceClient {
    /// Connects and introduces itself as `worker`.
    pub async fn connect(addr: &str, worker: &str) -> std::io::Result<FenceClient> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut c = FenceClient {
            reader: tokio::io::BufReader::new(r),
            writer: w,
        };
        c.call(&format!("HELLO {worker} {}", std::process::id()))
            .await?;
        Ok(c)
    }

    async fn call(&mut self, request: &str) -> std::io::Result<String> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .await?;
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "fence server closed the connection",
            ));
        }
        Ok(line.trim().to_string())
    }

    fn parse(answer: &str) -> std::io::Result<Fenced<i64>> {
        let mut it = answer.split_whitespace();
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, answer.to_string());
        match it.next() {
            Some("OK") => Ok(Fenced::Ok(0)),
            Some("VAL") => Ok(Fenced::Ok(
                it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?,
            )),
            Some("STALE") => Ok(Fenced::Stale(
                it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?,
            )),
            _ => Err(bad()),
        }
    }

    /// Fenced read: enters the critical section with `token`.
    pub async fn read(&mut self, token: u64) -> std::io::Result<Fenced<i64>> {
        let a = self.call(&format!("READ {token}")).await?;
        Self::parse(&a)
    }

    /// Fenced write of `new_value`, stating the value read before.
    pub async fn write(
        &mut self,
        token: u64,
        read_value: i64,
        new_value: i64,
    ) -> std::io::Result<Fenced<()>> {
        let a = self
            .call(&format!("WRITE {token} {read_value} {new_value}"))
            .await?;
        Ok(match Self::parse(&a)? {
            Fenced::Ok(_) => Fenced::Ok(()),
            Fenced::Stale(h) => Fenced::Stale(h),
        })
    }

    /// Unfenced read (no lock in use).
    pub async fn read_unfenced(&mut self) -> std::io::Result<i64> {
        match Self::parse(&self.call("UREAD").await?)? {
            Fenced::Ok(v) => Ok(v),
            Fenced::Stale(_) => Err(std::io::Error::other("unexpected STALE")),
        }
    }

    /// Unfenced write (no lock in use).
    pub async fn write_unfenced(&mut self, read_value: i64, new_value: i64) -> std::io::Result<()> {
        self.call(&format!("UWRITE {read_value} {new_value}"))
            .await?;
        Ok(())
    }

    /// Announces a long critical section under `token` (fault tests act on it).
    pub async fn announce_slow(&mut self, token: u64) -> std::io::Result<()> {
        self.call(&format!("SLOW {token}")).await?;
        Ok(())
    }

    /// Announces a recipe hold: a permit of `slot`, or a read or write hold, under `token`.
    pub async fn enter(&mut self, kind: HoldKind, slot: u32, token: u64) -> std::io::Result<()> {
        self.ok(&format!("ENTER {} {slot} {token}", kind.as_str()))
            .await
    }

    /// Ends the recipe hold announced by [`enter`](Self::enter).
    pub async fn leave(&mut self) -> std::io::Result<()> {
        self.ok("LEAVE").await
    }

    /// Waits until at least `n` recipe holders are inside, at most `bound`; how many are.
    pub async fn await_holders(&mut self, n: usize, bound: Duration) -> std::io::Result<usize> {
        let a = self
            .call(&format!("AWAIT {n} {}", bound.as_millis()))
            .await?;
        a.strip_prefix("INSIDE ")
            .and_then(|k| k.parse().ok())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, a))
    }

    async fn ok(&mut self, request: &str) -> std::io::Result<()> {
        let a = self.call(request).await?;
        if a == "OK" {
            Ok(())
        } else {
            Err(std::io::Error::new(std::io::ErrorKind::InvalidData, a))
        }
    }

    /// Leaves the critical section.
    pub async fn exit(&mut self, token: u64) -> std::io::Result<()> {
        self.call(&format!("EXIT {token}")).await?;
        Ok(())
    }
}
