//! A linearizability checker for key-value histories, and a recorder that produces such
//! histories from concurrent coordkit clients.
//!
//! # The checker
//! Wing & Gong's search with Lowe's memoization (the algorithm Porcupine uses): walk the
//! history's call/return events in time order; at a call, try to linearize that operation next
//! (apply it to the model; it must give the result the client saw), remembering every
//! (set of linearized operations, model state) pair already explored; at a return whose
//! operation is not yet linearized, backtrack. A history is linearizable iff the search
//! linearizes every operation. Keys are independent registers, so the history is split per key
//! (linearizability is compositional) and each key is checked alone.
//!
//! The model is a register of unique values: every write writes a value never written before,
//! so a value identifies the write that produced it, and a compare-and-swap expecting version
//! `V` (which the client read together with value `x`) is a compare-and-swap expecting value
//! `x`. Operations whose outcome is unknown (timeout, connection lost) may take effect at any
//! point after their call, or never: they get an infinite return time and any result.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One operation on a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Unconditional write of a unique value.
    Write(u64),
    /// Read.
    Read,
    /// Compare-and-swap: if the register holds `expect` (`None`: absent), write `new`.
    Cas { expect: Option<u64>, new: u64 },
}

/// What the client saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ret {
    /// A write or a successful CAS.
    Ok,
    /// A read's value (`None`: absent).
    Value(Option<u64>),
    /// A CAS whose precondition did not hold.
    CasFailed,
    /// Unknown outcome: may or may not have taken effect.
    Unknown,
}

/// One completed (or indeterminate) operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub client: usize,
    pub key: String,
    pub op: Op,
    pub ret: Ret,
    /// Call time, nanoseconds from the history's start.
    pub call: u64,
    /// Return time; `None` when the outcome is unknown (treated as never returning).
    pub ret_at: Option<u64>,
}

/// The register model: the result of applying `op` to `state`, if `ret` is what it gives.
fn step(state: Option<u64>, op: Op, ret: Ret) -> Option<Option<u64>> {
    match (op, ret) {
        (Op::Write(v), Ret::Ok | Ret::Unknown) => Some(Some(v)),
        (Op::Read, Ret::Value(x)) => (x == state).then_some(state),
        (Op::Read, Ret::Unknown) => Some(state),
        (Op::Cas { expect, new }, Ret::Ok) => (state == expect).then_some(Some(new)),
        (Op::Cas { expect, .. }, Ret::CasFailed) => (state != expect).then_some(state),
        (Op::Cas { expect, new }, Ret::Unknown) => {
            Some(if state == expect { Some(new) } else { state })
        }
        _ => None,
    }
}

/// The verdict on a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// Not linearizable: the key whose sub-history fails, and how many of its operations the
    /// deepest search path linearized.
    NotLinearizable {
        key: String,
        ops: usize,
        deepest: usize,
    },
    /// The search exceeded its step budget (never seen with the histories the tests record).
    Inconclusive {
        key: String,
    },
}

/// Checks a whole history, key by key.
pub fn check(history: &[Event]) -> Verdict {
    check_with_budget(history, 50_000_000)
}

/// Checks with a bound on search steps per key.
pub fn check_with_budget(history: &[Event], budget: u64) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in history {
        by_key.entry(&e.key).or_default().push(e);
    }
    for (key, events) in by_key {
        match check_register(&events, budget) {
            Some(Ok(())) => {}
            Some(Err(deepest)) => {
                return Verdict::NotLinearizable {
                    key: key.to_string(),
                    ops: events.len(),
                    deepest,
                }
            }
            None => {
                return Verdict::Inconclusive {
                    key: key.to_string(),
                }
            }
        }
    }
    Verdict::Linearizable
}

const NIL: usize = usize::MAX;

struct Node {
    op: usize,
    is_call: bool,
    /// For a call: the index of its return node.
    partner: usize,
    prev: usize,
    next: usize,
}

/// Checks one register's history, starting absent. `Some(Ok)`: linearizable; `Some(Err(n))`:
/// not, the deepest path linearized `n` ops; `None`: budget exhausted.
fn check_register(events: &[&Event], budget: u64) -> Option<Result<(), usize>> {
    let n = events.len();
    if n == 0 {
        return Some(Ok(()));
    }
    // Time-ordered call and return points; returns before calls at equal times would be
    // stricter, so calls sort first (the usual convention).
    let mut points: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in events.iter().enumerate() {
        points.push((e.call, 0, i));
        points.push((e.ret_at.unwrap_or(u64::MAX), 1, i));
    }
    points.sort();
    // Node 0 is the head sentinel.
    let mut nodes: Vec<Node> = Vec::with_capacity(2 * n + 1);
    nodes.push(Node {
        op: NIL,
        is_call: false,
        partner: NIL,
        prev: NIL,
        next: NIL,
    });
    let mut call_node = vec![NIL; n];
    for (_, kind, op) in &points {
        let idx = nodes.len();
        let prev = idx - 1;
        nodes[prev].next = idx;
        nodes.push(Node {
            op: *op,
            is_call: *kind == 0,
            partner: NIL,
            prev,
            next: NIL,
        });
        if *kind == 0 {
            call_node[*op] = idx;
        } else {
            nodes[call_node[*op]].partner = idx;
        }
    }

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    let mut state: Option<u64> = None;
    let mut entry = nodes[0].next;
    let mut deepest = 0usize;
    let mut steps = 0u64;

    fn lift(nodes: &mut [Node], call: usize) {
        let ret = nodes[call].partner;
        let (p, nx) = (nodes[call].prev, nodes[call].next);
        nodes[p].next = nx;
        if nx != NIL {
            nodes[nx].prev = p;
        }
        let (p, nx) = (nodes[ret].prev, nodes[ret].next);
        nodes[p].next = nx;
        if nx != NIL {
            nodes[nx].prev = p;
        }
    }
    fn unlift(nodes: &mut [Node], call: usize) {
        let ret = nodes[call].partner;
        let (p, nx) = (nodes[ret].prev, nodes[ret].next);
        nodes[p].next = ret;
        if nx != NIL {
            nodes[nx].prev = ret;
        }
        let (p, nx) = (nodes[call].prev, nodes[call].next);
        nodes[p].next = call;
        if nx != NIL {
            nodes[nx].prev = call;
        }
    }

    while nodes[0].next != NIL {
        steps += 1;
        if steps > budget {
            return None;
        }
        if entry == NIL {
            // Only possible when every remaining point is a call we could not linearize and no
            // return follows; cannot happen since every call has a later return.
            return Some(Err(deepest));
        }
        if nodes[entry].is_call {
            let op = nodes[entry].op;
            let e = events[op];
            let mut advanced = false;
            if let Some(next_state) = step(state, e.op, e.ret) {
                linearized[op / 64] |= 1 << (op % 64);
                if cache.insert((linearized.clone(), next_state)) {
                    stack.push((entry, state));
                    state = next_state;
                    lift(&mut nodes, entry);
                    deepest = deepest.max(stack.len());
                    entry = nodes[0].next;
                    advanced = true;
                } else {
                    linearized[op / 64] &= !(1 << (op % 64));
                }
            }
            if !advanced {
                entry = nodes[entry].next;
            }
        } else {
            // A return whose call is not linearized yet: backtrack.
            let Some((call, prev_state)) = stack.pop() else {
                return Some(Err(deepest));
            };
            let op = nodes[call].op;
            linearized[op / 64] &= !(1 << (op % 64));
            state = prev_state;
            unlift(&mut nodes, call);
            entry = nodes[call].next;
        }
    }
    Some(Ok(()))
}

/// A slow exhaustive checker for small histories (every order that respects real time), to
/// test the fast one against.
pub fn brute_force(history: &[Event]) -> bool {
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in history {
        by_key.entry(&e.key).or_default().push(e);
    }
    by_key.values().all(|evs| {
        let n = evs.len();
        fn go(evs: &[&Event], done: &mut Vec<bool>, state: Option<u64>, left: usize) -> bool {
            if left == 0 {
                return true;
            }
            for i in 0..evs.len() {
                if done[i] {
                    continue;
                }
                // i may go next only if no pending op returned before i was called.
                let blocked = (0..evs.len())
                    .any(|j| !done[j] && j != i && evs[j].ret_at.is_some_and(|r| r < evs[i].call));
                if blocked {
                    continue;
                }
                if let Some(s) = step(state, evs[i].op, evs[i].ret) {
                    done[i] = true;
                    if go(evs, done, s, left - 1) {
                        return true;
                    }
                    done[i] = false;
                }
            }
            false
        }
        go(evs, &mut vec![false; n], None, n)
    })
}

/// Summary of a recorded history.
#[derive(Debug, Clone, Default)]
pub struct HistoryStats {
    pub ops: usize,
    pub clients: usize,
    pub keys: usize,
    pub writes: usize,
    pub reads: usize,
    pub cas_ok: usize,
    pub cas_failed: usize,
    pub unknown: usize,
    pub elapsed: Duration,
}

impl HistoryStats {
    pub fn of(history: &[Event], elapsed: Duration) -> Self {
        let mut s = HistoryStats {
            ops: history.len(),
            clients: history
                .iter()
                .map(|e| e.client)
                .collect::<HashSet<_>>()
                .len(),
            keys: history.iter().map(|e| &e.key).collect::<HashSet<_>>().len(),
            elapsed,
            ..Default::default()
        };
        for e in history {
            match (e.op, e.ret) {
                (_, Ret::Unknown) => s.unknown += 1,
                (Op::Write(_), _) => s.writes += 1,
                (Op::Read, _) => s.reads += 1,
                (Op::Cas { .. }, Ret::Ok) => s.cas_ok += 1,
                (Op::Cas { .. }, _) => s.cas_failed += 1,
            }
        }
        s
    }
}

impl std::fmt::Display for HistoryStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ops ({} writes, {} reads, {} CAS ok, {} CAS failed, {} unknown) from {} clients on {} keys in {:.2}s",
            self.ops,
            self.writes,
            self.reads,
            self.cas_ok,
            self.cas_failed,
            self.unknown,
            self.clients,
            self.keys,
            self.elapsed.as_secs_f64()
        )
    }
}

fn encode(v: u64) -> Vec<u8> {
    format!("v{v}").into_bytes()
}

fn decode(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.strip_prefix('v')?.parse().ok()
}

/// Records a concurrent history: each client (its own connection) runs `ops_per_client`
/// random put / get / compare-and-swap operations on `keys` (under `prefix`), with
/// `consistency` reads. Values are unique per write.
///
/// Panics on errors other than `Timeout`/`Unavailable` (those become unknown outcomes), and
/// on values it cannot decode.
pub async fn record(
    clients: Vec<Arc<dyn coordkit::Backend>>,
    prefix: &str,
    keys: usize,
    ops_per_client: usize,
    consistency: coordkit::Consistency,
) -> (Vec<Event>, Duration) {
    use coordkit::{ErrorKind, Expect, PutOptions, Version};
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut seed: u64 = 0x9E37_79B9_7F4A_7C15 ^ (c as u64 + 1).wrapping_mul(0x2545_F491);
            let mut rnd = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let mut out = Vec::new();
            // What this client last read per key: (version, value) or absent.
            let mut last: BTreeMap<usize, Option<(Version, u64)>> = BTreeMap::new();
            let now = |start: Instant| start.elapsed().as_nanos() as u64;
            for i in 0..ops_per_client {
                let k = (rnd() % keys as u64) as usize;
                let key = format!("{prefix}k{k}");
                let value = ((c as u64) << 32) | i as u64;
                let choice = rnd() % 10;
                let call = now(start);
                let (op, res) = if choice < 4 {
                    let r = client.get(&key, consistency).await;
                    let ret = r.map(|e| {
                        let seen = e.map(|e| {
                            let v = decode(&e.value).expect("decodable value");
                            (e.version, v)
                        });
                        last.insert(k, seen);
                        Ret::Value(seen.map(|s| s.1))
                    });
                    (Op::Read, ret)
                } else if choice < 7 || !last.contains_key(&k) {
                    let r = client.put(&key, encode(value), PutOptions::default()).await;
                    (Op::Write(value), r.map(|_| Ret::Ok))
                } else {
                    let seen = last.get(&k).copied().flatten();
                    let expect = match seen {
                        Some((ver, _)) => Expect::Version(ver),
                        None => Expect::Absent,
                    };
                    let op = Op::Cas {
                        expect: seen.map(|s| s.1),
                        new: value,
                    };
                    let r = client
                        .compare_and_swap(&key, expect, Some(encode(value)))
                        .await;
                    let ret = match r {
                        Ok(_) => Ok(Ret::Ok),
                        Err(e) if e.is(ErrorKind::Conflict) => Ok(Ret::CasFailed),
                        Err(e) => Err(e),
                    };
                    (op, ret)
                };
                let (ret, ret_at) = match res {
                    Ok(ret) => (ret, Some(now(start))),
                    Err(e) if e.is(ErrorKind::Timeout) || e.is(ErrorKind::Unavailable) => {
                        (Ret::Unknown, None)
                    }
                    Err(e) => panic!("client {c}: unexpected error: {e}"),
                };
                out.push(Event {
                    client: c,
                    key: key.clone(),
                    op,
                    ret,
                    call,
                    ret_at,
                });
            }
            out
        }));
    }
    let mut history = Vec::new();
    for t in tasks {
        history.extend(t.await.expect("history client task"));
    }
    (history, start.elapsed())
}
