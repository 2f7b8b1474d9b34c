//! The simulator's data model: the KV table with tombstones, sessions with TTL timers and
//! lock-delays, and one Raft-like index shared by everything. Pure logic, no HTTP.
//!
//! Fact numbers (A1…A6) refer to section A of the protocol fact sheet the simulator is written
//! from; `docs.md` of the Consul backend lists what is and is not implemented.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

/// `kv_max_value_size` / `txn_max_req_len` default: raft's SuggestedMaxDataSize (A1, A4).
pub const MAX_VALUE_SIZE: usize = 524_288;
/// Most operations in one transaction (A4).
pub const MAX_TXN_OPS: usize = 64;
/// Session TTL bounds (A3).
pub const SESSION_TTL_MIN: Duration = Duration::from_secs(10);
/// Session TTL upper bound (A3).
pub const SESSION_TTL_MAX: Duration = Duration::from_secs(86_400);
/// The leader's timer is TTL × this (A3, `SessionTTLMultiplier`).
pub const SESSION_TTL_MULTIPLIER: u32 = 2;
/// Default lock-delay (A3).
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
/// Largest lock-delay (A3, `MaxLockDelay`).
pub const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
/// The only node the simulated agent knows.
pub const NODE: &str = "consul-sim";

/// One KV entry (A1 field order is kept by the JSON writer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub key: String,
    pub value: Vec<u8>,
    pub flags: u64,
    pub session: Option<String>,
    pub lock_index: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

/// Behavior of a session on invalidation (A3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    Release,
    Delete,
}

impl Behavior {
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

/// A session (A3).
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub name: String,
    pub node: String,
    pub lock_delay: Duration,
    pub behavior: Behavior,
    pub ttl: Option<Duration>,
    /// The TTL exactly as the create request spelled it: Consul stores and returns the string
    /// (`"10s"`, `"10000ms"`), it does not normalise it.
    pub ttl_text: String,
    pub node_checks: Vec<String>,
    pub service_checks: Vec<serde_json::Value>,
    pub create_index: u64,
    pub modify_index: u64,
    /// When the leader's timer fires: last renewal + TTL × 2 (A3).
    pub expires: Option<Instant>,
}

/// Everything the simulated cluster stores.
#[derive(Debug, Default)]
pub struct State {
    /// The Raft index: bumped by one per write (a transaction is one write).
    pub index: u64,
    pub kv: BTreeMap<String, DirEntry>,
    /// Deleted keys and the index of their deletion (A1: deletes leave tombstones).
    pub tombstones: BTreeMap<String, u64>,
    /// Index of the last change to the kvs or tombstone tables.
    pub kvs_index: u64,
    pub sessions: HashMap<String, Session>,
    pub sessions_index: u64,
    /// Per-key lock-delay expiry (A3).
    pub lock_delays: HashMap<String, Instant>,
    pub uuid_counter: u64,
    /// Fault hook: renewals raise a session's TTL to this (a loaded server, A3).
    pub renew_ttl: Option<Duration>,
}

/// A transaction KV op (A4).
#[derive(Debug, Clone, Default)]
pub struct TxnOp {
    pub verb: String,
    pub key: String,
    pub value: Vec<u8>,
    pub flags: u64,
    pub index: u64,
    pub session: String,
}

/// What one op of a successful transaction gives back.
#[derive(Debug, Clone)]
pub struct TxnResult {
    pub entry: DirEntry,
    /// Get verbs return the value; write verbs return `Value: null` (A4).
    pub with_value: bool,
}

/// A failed op of a rolled-back transaction (A4).
#[derive(Debug, Clone)]
pub struct TxnError {
    pub op_index: usize,
    pub what: String,
}

/// Result of a KV write through the plain endpoint: `Ok(bool)` is the `true`/`false` body;
/// `Err` a 500 with that message (A1).
pub type WriteResult = Result<bool, String>;

impl State {
    pub fn new() -> Self {
        // The index never reads as 0 (A2); start the log at 1 like a fresh cluster after its
        // first (internal) writes.
        State {
            index: 1,
            kvs_index: 1,
            sessions_index: 1,
            ..Default::default()
        }
    }

    fn next_index(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    pub fn new_uuid(&mut self) -> String {
        self.uuid_counter += 1;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let a = nanos ^ self.uuid_counter.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let b = self.uuid_counter.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (nanos >> 7);
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            (a >> 32) as u32,
            (a >> 16) as u16,
            a as u16,
            (b >> 48) as u16,
            b & 0xffff_ffff_ffff
        )
    }

    // ---- indexes (A2) ----

    /// The index of a single-key GET: the key's ModifyIndex, else the table's (at least 1).
    pub fn key_index(&self, key: &str) -> u64 {
        match self.kv.get(key) {
            Some(e) => e.modify_index,
            None => self.kvs_index.max(1),
        }
    }

    /// The index of a recurse/keys GET: the highest ModifyIndex under the prefix, tombstones
    /// included; the whole table's index when nothing is under it.
    pub fn prefix_index(&self, prefix: &str) -> u64 {
        let live = self
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e.modify_index)
            .max()
            .unwrap_or(0);
        let dead = self
            .tombstones
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0);
        let idx = live.max(dead);
        if idx == 0 {
            self.kvs_index.max(1)
        } else {
            idx
        }
    }

    pub fn list(&self, prefix: &str) -> Vec<DirEntry> {
        self.kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// `?keys` with an optional separator (A1).
    pub fn keys(&self, prefix: &str, separator: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for k in self
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k)
        {
            let name = if separator.is_empty() {
                k.clone()
            } else {
                match k[prefix.len()..].find(separator) {
                    Some(pos) => k[..prefix.len() + pos + separator.len()].to_string(),
                    None => k.clone(),
                }
            };
            if out.last() != Some(&name) {
                out.push(name);
            }
        }
        out
    }

    /// Reaps every tombstone (what Consul's tombstone GC eventually does). After this, a
    /// prefix index may go backwards (A2).
    pub fn reap_tombstones(&mut self) {
        self.tombstones.clear();
    }

    // ---- KV writes on a working copy (shared by the plain endpoint and /v1/txn) ----

    fn lock_delayed(&self, key: &str, now: Instant) -> bool {
        self.lock_delays.get(key).is_some_and(|until| *until > now)
    }

    fn set_entry(&mut self, idx: u64, key: &str, value: Vec<u8>, flags: u64) -> DirEntry {
        // A plain set keeps the Session, but takes LockIndex from the request, i.e. 0 (A1).
        let (create_index, session) = match self.kv.get(key) {
            Some(e) => (e.create_index, e.session.clone()),
            None => (idx, None),
        };
        let entry = DirEntry {
            key: key.to_string(),
            value,
            flags,
            session,
            lock_index: 0,
            create_index,
            modify_index: idx,
        };
        self.put_entry(entry.clone());
        entry
    }

    fn put_entry(&mut self, entry: DirEntry) {
        self.tombstones.remove(&entry.key);
        self.kvs_index = entry.modify_index;
        self.kv.insert(entry.key.clone(), entry);
    }

    fn delete_entry(&mut self, idx: u64, key: &str) {
        if self.kv.remove(key).is_some() {
            self.tombstones.insert(key.to_string(), idx);
            self.kvs_index = idx;
        }
    }

    fn delete_tree(&mut self, idx: u64, prefix: &str) {
        let keys: Vec<String> = self.list(prefix).into_iter().map(|e| e.key).collect();
        for k in keys {
            self.delete_entry(idx, &k);
        }
    }

    /// `acquire` (A1): Ok(true) locked, Ok(false) held elsewhere or lock-delayed, Err 500.
    fn lock_entry(
        &mut self,
        idx: u64,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: &str,
        now: Instant,
    ) -> Result<Option<DirEntry>, String> {
        if session.is_empty() {
            return Err("missing session".into());
        }
        if !self.sessions.contains_key(session) {
            return Err(format!("invalid session {session:?}"));
        }
        let (create_index, lock_index) = match self.kv.get(key) {
            Some(e) if e.session.as_deref() == Some(session) => (e.create_index, e.lock_index),
            Some(e) if e.session.is_some() => return Ok(None),
            Some(e) => {
                if self.lock_delayed(key, now) {
                    return Ok(None);
                }
                (e.create_index, e.lock_index + 1)
            }
            None => {
                if self.lock_delayed(key, now) {
                    return Ok(None);
                }
                (idx, 1)
            }
        };
        let entry = DirEntry {
            key: key.to_string(),
            value,
            flags,
            session: Some(session.to_string()),
            lock_index,
            create_index,
            modify_index: idx,
        };
        self.put_entry(entry.clone());
        Ok(Some(entry))
    }

    /// `release` (A1): clears Session, keeps LockIndex, overwrites value and flags.
    fn unlock_entry(
        &mut self,
        idx: u64,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: &str,
    ) -> Result<Option<DirEntry>, String> {
        if session.is_empty() {
            return Err("missing session".into());
        }
        let existing = match self.kv.get(key) {
            Some(e) if e.session.as_deref() == Some(session) => e.clone(),
            _ => return Ok(None),
        };
        let entry = DirEntry {
            key: key.to_string(),
            value,
            flags,
            session: None,
            lock_index: existing.lock_index,
            create_index: existing.create_index,
            modify_index: idx,
        };
        self.put_entry(entry.clone());
        Ok(Some(entry))
    }

    fn cas_ok(&self, key: &str, cas: u64) -> bool {
        match self.kv.get(key) {
            None => cas == 0,
            Some(e) => cas != 0 && e.modify_index == cas,
        }
    }

    // ---- the plain KV endpoint (A1) ----

    /// `PUT /v1/kv/<key>` with at most one of cas / acquire / release.
    pub fn kv_put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
        acquire: Option<&str>,
        release: Option<&str>,
        now: Instant,
    ) -> WriteResult {
        let idx = self.index + 1;
        let done = if let Some(s) = acquire {
            self.lock_entry(idx, key, value, flags, s, now)?.is_some()
        } else if let Some(s) = release {
            self.unlock_entry(idx, key, value, flags, s)?.is_some()
        } else if let Some(c) = cas {
            if self.cas_ok(key, c) {
                self.set_entry(idx, key, value, flags);
                true
            } else {
                false
            }
        } else {
            self.set_entry(idx, key, value, flags);
            true
        };
        if done {
            self.next_index();
        }
        Ok(done)
    }

    /// `DELETE /v1/kv/<key>` (A1). `cas` on a missing key returns true.
    pub fn kv_delete(&mut self, key: &str, recurse: bool, cas: Option<u64>) -> bool {
        let idx = self.index + 1;
        if recurse {
            let had = !self.list(key).is_empty();
            self.delete_tree(idx, key);
            if had {
                self.next_index();
            }
            return true;
        }
        if let Some(c) = cas {
            match self.kv.get(key) {
                None => return true,
                Some(e) if e.modify_index != c => return false,
                Some(_) => {}
            }
        }
        if self.kv.contains_key(key) {
            self.delete_entry(idx, key);
            self.next_index();
        }
        true
    }

    // ---- /v1/txn (A4) ----

    /// Runs a transaction atomically: all ops see the effects of the ones before them; on any
    /// failure nothing is applied and every failure is reported.
    pub fn txn(
        &mut self,
        ops: &[TxnOp],
        now: Instant,
    ) -> Result<(Vec<TxnResult>, bool), Vec<TxnError>> {
        let idx = self.index + 1;
        // Work on a copy of the KV tables; commit only if every op succeeded.
        let mut work = State {
            index: self.index,
            kv: self.kv.clone(),
            tombstones: self.tombstones.clone(),
            kvs_index: self.kvs_index,
            sessions: self.sessions.clone(),
            sessions_index: self.sessions_index,
            lock_delays: self.lock_delays.clone(),
            uuid_counter: self.uuid_counter,
            renew_ttl: self.renew_ttl,
        };
        let mut results = Vec::new();
        let mut errors = Vec::new();
        let mut wrote = false;
        for (i, op) in ops.iter().enumerate() {
            let k = op.key.as_str();
            let fail = |what: String| TxnError { op_index: i, what };
            let r: Result<Option<TxnResult>, String> = match op.verb.as_str() {
                "set" => {
                    wrote = true;
                    Ok(Some(plain(work.set_entry(
                        idx,
                        k,
                        op.value.clone(),
                        op.flags,
                    ))))
                }
                "cas" => {
                    if work.cas_ok(k, op.index) {
                        wrote = true;
                        Ok(Some(plain(work.set_entry(
                            idx,
                            k,
                            op.value.clone(),
                            op.flags,
                        ))))
                    } else {
                        Err(format!("failed to set key {k:?}, index is stale"))
                    }
                }
                "lock" => {
                    let holder = work.kv.get(k).and_then(|e| e.session.clone());
                    let delayed = holder.is_none() && work.lock_delayed(k, now);
                    match work.lock_entry(idx, k, op.value.clone(), op.flags, &op.session, now) {
                        Ok(Some(e)) => {
                            wrote = true;
                            Ok(Some(plain(e)))
                        }
                        Ok(None) if delayed => {
                            Err(format!("failed to lock key {k:?} due to lock delay"))
                        }
                        Ok(None) => Err(format!("failed to lock key {k:?}, lock is already held")),
                        Err(e) => Err(e),
                    }
                }
                "unlock" => {
                    match work.unlock_entry(idx, k, op.value.clone(), op.flags, &op.session) {
                        Ok(Some(e)) => {
                            wrote = true;
                            Ok(Some(plain(e)))
                        }
                        Ok(None) => Err(format!(
                        "failed to unlock key {k:?}, lock isn't held, or is held by another session"
                    )),
                        Err(e) => Err(e),
                    }
                }
                "get" => match work.kv.get(k) {
                    Some(e) => Ok(Some(TxnResult {
                        entry: e.clone(),
                        with_value: true,
                    })),
                    None => Err(format!("key {k:?} doesn't exist")),
                },
                "get-or-empty" => Ok(work.kv.get(k).map(|e| TxnResult {
                    entry: e.clone(),
                    with_value: true,
                })),
                "get-tree" => {
                    for e in work.list(k) {
                        results.push(TxnResult {
                            entry: e,
                            with_value: true,
                        });
                    }
                    Ok(None)
                }
                "check-index" => match work.kv.get(k) {
                    None => Err(format!("key {k:?} doesn't exist")),
                    Some(e) if e.modify_index != op.index => Err(format!(
                        "failed index check for key {k:?}, current modify index {} != {}",
                        e.modify_index, op.index
                    )),
                    Some(e) => Ok(Some(plain(e.clone()))),
                },
                "check-session" => match work.kv.get(k) {
                    None => Err(format!("key {k:?} doesn't exist")),
                    Some(e) if e.session.as_deref().unwrap_or("") != op.session => Err(format!(
                        "failed session check for key {k:?}, current session {} != {}",
                        e.session.as_deref().unwrap_or(""),
                        op.session
                    )),
                    Some(e) => Ok(Some(plain(e.clone()))),
                },
                "check-not-exists" => match work.kv.get(k) {
                    Some(_) => Err(format!("key {k:?} exists")),
                    None => Ok(None),
                },
                "delete" => {
                    wrote = true;
                    work.delete_entry(idx, k);
                    Ok(None)
                }
                "delete-tree" => {
                    wrote = true;
                    work.delete_tree(idx, k);
                    Ok(None)
                }
                "delete-cas" => match work.kv.get(k) {
                    // A missing key counts as deleted (A1 [code]: `entry == nil`).
                    None => Ok(None),
                    Some(e) if e.modify_index != op.index => {
                        Err(format!("failed to delete key {k:?}, index is stale"))
                    }
                    Some(_) => {
                        wrote = true;
                        work.delete_entry(idx, k);
                        Ok(None)
                    }
                },
                other => Err(format!("unknown KV verb {other:?}")),
            };
            match r {
                Ok(Some(res)) => results.push(res),
                Ok(None) => {}
                Err(what) => errors.push(fail(what)),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        if wrote {
            self.kv = work.kv;
            self.tombstones = work.tombstones;
            self.kvs_index = work.kvs_index;
            self.index = idx;
        }
        Ok((results, wrote))
    }

    // ---- sessions (A3) ----

    pub fn create_session(
        &mut self,
        name: String,
        behavior: Behavior,
        ttl: Option<Duration>,
        ttl_text: String,
        lock_delay: Duration,
        node_checks: Vec<String>,
        service_checks: Vec<serde_json::Value>,
        now: Instant,
    ) -> String {
        let idx = self.next_index();
        let id = self.new_uuid();
        let s = Session {
            id: id.clone(),
            name,
            node: NODE.to_string(),
            lock_delay: lock_delay.min(MAX_LOCK_DELAY),
            behavior,
            ttl,
            ttl_text,
            node_checks,
            service_checks,
            create_index: idx,
            modify_index: idx,
            expires: ttl.map(|t| now + t * SESSION_TTL_MULTIPLIER),
        };
        self.sessions.insert(id.clone(), s);
        self.sessions_index = idx;
        id
    }

    /// Renew: resets the leader's timer to TTL × 2 (A3). Renewal is not a Raft write.
    pub fn renew_session(&mut self, id: &str, now: Instant) -> Option<Session> {
        let raise = self.renew_ttl;
        let s = self.sessions.get_mut(id)?;
        if let (Some(t), Some(old)) = (raise, s.ttl) {
            // A loaded server asks for fewer renewals by raising the TTL (A3); its timer then
            // honours the raised TTL.
            if t > old {
                s.ttl = Some(t);
                s.ttl_text = format_go_duration(t);
            }
        }
        if let Some(ttl) = s.ttl {
            s.expires = Some(now + ttl * SESSION_TTL_MULTIPLIER);
        }
        Some(s.clone())
    }

    /// Invalidates a session (destroy or TTL expiry): its keys are released or deleted per its
    /// Behavior, and each gets the session's lock-delay (A3). Returns whether it existed.
    pub fn invalidate_session(&mut self, id: &str, now: Instant) -> bool {
        let Some(s) = self.sessions.remove(id) else {
            return false;
        };
        let idx = self.next_index();
        self.sessions_index = idx;
        let held: Vec<String> = self
            .kv
            .values()
            .filter(|e| e.session.as_deref() == Some(id))
            .map(|e| e.key.clone())
            .collect();
        for key in held {
            if !s.lock_delay.is_zero() {
                self.lock_delays.insert(key.clone(), now + s.lock_delay);
            }
            match s.behavior {
                Behavior::Release => {
                    if let Some(mut e) = self.kv.get(&key).cloned() {
                        e.session = None;
                        e.modify_index = idx;
                        self.put_entry(e);
                    }
                }
                Behavior::Delete => self.delete_entry(idx, &key),
            }
        }
        true
    }

    /// A node check went critical (A3: a critical check invalidates every session that lists
    /// it): invalidates the sessions whose `NodeChecks` contain `check`. Returns how many.
    pub fn fail_node_check(&mut self, check: &str, now: Instant) -> usize {
        let hit: Vec<String> = self
            .sessions
            .values()
            .filter(|s| s.node_checks.iter().any(|c| c == check))
            .map(|s| s.id.clone())
            .collect();
        for id in &hit {
            self.invalidate_session(id, now);
        }
        hit.len()
    }

    /// Invalidates every session whose TTL timer fired; whether anything changed.
    pub fn expire_sessions(&mut self, now: Instant) -> bool {
        let due: Vec<String> = self
            .sessions
            .values()
            .filter(|s| s.expires.is_some_and(|at| at <= now))
            .map(|s| s.id.clone())
            .collect();
        let mut changed = false;
        for id in due {
            changed |= self.invalidate_session(&id, now);
        }
        changed
    }
}

fn plain(entry: DirEntry) -> TxnResult {
    TxnResult {
        entry,
        with_value: false,
    }
}

/// Parses a Go duration string (`"1h2m3.5s"`, `"150ms"`, `"0"`): what `time.ParseDuration`
/// accepts, without the sign. A duration beyond Go's range (an i64 of nanoseconds, about 292
/// years) is `None`, as Go's parser rejects it, never a panic.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * scale;
    }
    // Go's time.Duration is an i64 of nanoseconds: longer spans are a parse error.
    Duration::try_from_secs_f64(total)
        .ok()
        .filter(|d| d.as_nanos() <= i64::MAX as u128)
}

/// Formats a duration like Go's `time.Duration.String()` for the values sessions use.
pub fn format_go_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let total = d.as_secs();
    let h = total / 3600;
    let m = (total % 3600) / 60;
    let s = total % 60;
    let frac = d.subsec_nanos();
    let secs = if frac == 0 {
        format!("{s}s")
    } else {
        let f = format!("{:.9}", frac as f64 / 1e9);
        format!("{s}{}s", f.trim_start_matches('0').trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{secs}")
    } else if m > 0 {
        format!("{m}m{secs}")
    } else if total == 0 && frac.is_multiple_of(1_000_000) {
        format!("{}ms", frac / 1_000_000)
    } else {
        secs
    }
}
