//! Linearizability: the checker's own tests (it accepts linearizable histories and rejects
//! non-linearizable ones, and agrees with an exhaustive search on thousands of small random
//! histories), then concurrent put / get / compare-and-swap histories recorded from several
//! clients of each backend, checked with it. See `docs/reliability.md`.

mod support;

use std::sync::Arc;

use coordkit::Consistency;
use support::linearizability::{brute_force, check, record, Event, HistoryStats, Op, Ret, Verdict};

fn ev(client: usize, op: Op, ret: Ret, call: u64, ret_at: u64) -> Event {
    Event {
        client,
        key: "k".into(),
        op,
        ret,
        call,
        ret_at: Some(ret_at),
    }
}

fn assert_verdict(h: &[Event], linearizable: bool) {
    let v = check(h);
    assert_eq!(
        v == Verdict::Linearizable,
        linearizable,
        "checker said {v:?} for {h:#?}"
    );
    assert_eq!(
        brute_force(h),
        linearizable,
        "brute force disagrees on {h:#?}"
    );
}

#[test]
fn checker_accepts_linearizable_histories() {
    // Sequential.
    assert_verdict(
        &[
            ev(0, Op::Read, Ret::Value(None), 0, 1),
            ev(0, Op::Write(1), Ret::Ok, 2, 3),
            ev(1, Op::Read, Ret::Value(Some(1)), 4, 5),
            ev(
                1,
                Op::Cas {
                    expect: Some(1),
                    new: 2,
                },
                Ret::Ok,
                6,
                7,
            ),
            ev(
                0,
                Op::Cas {
                    expect: Some(1),
                    new: 3,
                },
                Ret::CasFailed,
                8,
                9,
            ),
            ev(0, Op::Read, Ret::Value(Some(2)), 10, 11),
        ],
        true,
    );
    // A read overlapping a write may see either value.
    for seen in [None, Some(1)] {
        assert_verdict(
            &[
                ev(0, Op::Write(1), Ret::Ok, 0, 10),
                ev(1, Op::Read, Ret::Value(seen), 2, 5),
            ],
            true,
        );
    }
    // Overlapping writes may land in either order.
    assert_verdict(
        &[
            ev(0, Op::Write(1), Ret::Ok, 0, 10),
            ev(1, Op::Write(2), Ret::Ok, 1, 9),
            ev(2, Op::Read, Ret::Value(Some(1)), 11, 12),
        ],
        true,
    );
    // A write with unknown outcome may or may not have happened.
    let mut unknown = ev(0, Op::Write(7), Ret::Unknown, 0, 0);
    unknown.ret_at = None;
    assert_verdict(
        &[unknown.clone(), ev(1, Op::Read, Ret::Value(None), 5, 6)],
        true,
    );
    assert_verdict(
        &[unknown.clone(), ev(1, Op::Read, Ret::Value(Some(7)), 5, 6)],
        true,
    );
}

#[test]
fn checker_rejects_non_linearizable_histories() {
    // Stale read: the write had returned before the read began.
    assert_verdict(
        &[
            ev(0, Op::Write(1), Ret::Ok, 0, 1),
            ev(1, Op::Read, Ret::Value(None), 2, 3),
        ],
        false,
    );
    // A value nobody wrote.
    assert_verdict(&[ev(0, Op::Read, Ret::Value(Some(9)), 0, 1)], false);
    // Two CAS from the same expectation both succeed (a lost update).
    assert_verdict(
        &[
            ev(0, Op::Write(1), Ret::Ok, 0, 1),
            ev(
                1,
                Op::Cas {
                    expect: Some(1),
                    new: 2,
                },
                Ret::Ok,
                2,
                6,
            ),
            ev(
                2,
                Op::Cas {
                    expect: Some(1),
                    new: 3,
                },
                Ret::Ok,
                3,
                7,
            ),
        ],
        false,
    );
    // Reads go back in time: 2 then 1, after both writes finished in order 1, 2.
    assert_verdict(
        &[
            ev(0, Op::Write(1), Ret::Ok, 0, 1),
            ev(0, Op::Write(2), Ret::Ok, 2, 3),
            ev(1, Op::Read, Ret::Value(Some(2)), 4, 5),
            ev(1, Op::Read, Ret::Value(Some(1)), 6, 7),
        ],
        false,
    );
    // A failed CAS whose precondition held.
    assert_verdict(
        &[
            ev(0, Op::Write(1), Ret::Ok, 0, 1),
            ev(
                1,
                Op::Cas {
                    expect: Some(1),
                    new: 2,
                },
                Ret::CasFailed,
                2,
                3,
            ),
        ],
        false,
    );
    // Real-time order across keys does not matter, but within a key it does.
    let mut h = vec![
        ev(0, Op::Write(1), Ret::Ok, 0, 1),
        ev(1, Op::Read, Ret::Value(Some(1)), 2, 3),
    ];
    h[1].key = "other".into();
    assert!(check(&h) != Verdict::Linearizable);
}

/// Small random histories: the fast checker and the exhaustive search must agree, and both
/// verdicts must occur often.
#[test]
fn checker_agrees_with_exhaustive_search() {
    let mut seed = 0x1234_5678_9abc_def1u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let (mut yes, mut no) = (0, 0);
    for _ in 0..3000 {
        let n = 2 + rnd(6) as usize;
        let mut h = Vec::new();
        for i in 0..n {
            let call = rnd(20);
            let ret_at = call + 1 + rnd(8);
            let val = |x: u64| if x == 0 { None } else { Some(x) };
            let (op, ret) = match rnd(3) {
                0 => (Op::Write(i as u64 + 1), Ret::Ok),
                1 => (Op::Read, Ret::Value(val(rnd(n as u64 + 1)))),
                _ => (
                    Op::Cas {
                        expect: val(rnd(n as u64 + 1)),
                        new: i as u64 + 1,
                    },
                    if rnd(2) == 0 { Ret::Ok } else { Ret::CasFailed },
                ),
            };
            let mut e = ev(i % 3, op, ret, call, ret_at);
            if rnd(10) == 0 && matches!(op, Op::Write(_) | Op::Cas { .. }) {
                e.ret = Ret::Unknown;
                e.ret_at = None;
            }
            h.push(e);
        }
        let fast = check(&h) == Verdict::Linearizable;
        assert_eq!(fast, brute_force(&h), "disagreement on {h:#?}");
        if fast {
            yes += 1
        } else {
            no += 1
        }
    }
    assert!(yes > 300 && no > 300, "too one-sided: {yes} yes, {no} no");
}

/// A large history made linearizable by construction (each op takes effect at a random point
/// inside its interval) is accepted quickly; moving one read's result to a value written only
/// after the read returned makes it rejected.
#[test]
fn checker_handles_large_histories() {
    let mut seed = 0xdead_beef_cafe_f00du64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // (linearization point, client, op) generated in point order per key.
    let mut h = Vec::new();
    let mut state: [Option<u64>; 3] = [None; 3];
    let mut t = 0u64;
    let mut next_val = 1u64;
    for i in 0..3000 {
        t += 1 + rnd(3);
        let k = rnd(3) as usize;
        let point = t * 10;
        let call = point - rnd(40);
        let ret_at = point + rnd(40);
        let (op, ret) = match rnd(3) {
            0 => {
                next_val += 1;
                state[k] = Some(next_val);
                (Op::Write(next_val), Ret::Ok)
            }
            1 => (Op::Read, Ret::Value(state[k])),
            _ => {
                next_val += 1;
                let expect = if rnd(2) == 0 { state[k] } else { Some(0) };
                if expect == state[k] {
                    state[k] = Some(next_val);
                    (
                        Op::Cas {
                            expect,
                            new: next_val,
                        },
                        Ret::Ok,
                    )
                } else {
                    (
                        Op::Cas {
                            expect,
                            new: next_val,
                        },
                        Ret::CasFailed,
                    )
                }
            }
        };
        let mut e = ev(i % 6, op, ret, call, ret_at);
        e.key = format!("k{k}");
        h.push(e);
    }
    let started = std::time::Instant::now();
    assert_eq!(check(&h), Verdict::Linearizable);
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // A read that returns a value written only later.
    let (ri, wi) = {
        let ri = h
            .iter()
            .position(|e| e.op == Op::Read && e.key == "k0")
            .expect("a read");
        let wi = h
            .iter()
            .enumerate()
            .position(|(i, e)| i > ri + 50 && e.key == "k0" && matches!(e.op, Op::Write(_)))
            .expect("a later write");
        (ri, wi)
    };
    let Op::Write(future) = h[wi].op else {
        unreachable!()
    };
    h[ri].ret = Ret::Value(Some(future));
    assert!(matches!(check(&h), Verdict::NotLinearizable { .. }));
}

async fn record_and_check(
    label: &str,
    clients: Vec<Arc<dyn coordkit::Backend>>,
    prefix: &str,
    consistency: Consistency,
) {
    let n = clients.len();
    let per_client = 1200usize.div_ceil(n);
    let (history, elapsed) = record(clients, prefix, 3, per_client, consistency).await;
    let stats = HistoryStats::of(&history, elapsed);
    let started = std::time::Instant::now();
    let verdict = check(&history);
    println!(
        "[{label}] history: {stats}; verdict {verdict:?} in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    assert!(stats.ops >= 1000, "{stats}");
    assert!(
        stats.writes > 0 && stats.reads > 0 && stats.cas_ok > 0,
        "{stats}"
    );
    assert_eq!(verdict, Verdict::Linearizable, "{label}: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_histories_are_linearizable() {
    let store = coordkit::MemoryStore::new();
    let clients: Vec<Arc<dyn coordkit::Backend>> = (0..6)
        .map(|_| Arc::new(store.clone()) as Arc<dyn coordkit::Backend>)
        .collect();
    record_and_check("memory", clients, "lin/", Consistency::Strong).await;
}

async fn clients(url: &str, n: usize) -> Vec<Arc<dyn coordkit::Backend>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            coordkit::connect(url)
                .await
                .unwrap_or_else(|e| panic!("connect {url}: {e}")),
        );
    }
    out
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_strong_histories_are_linearizable() {
    let url = support::etcd::shared_url();
    record_and_check(
        "etcd",
        clients(&url, 6).await,
        "lin/etcd/",
        Consistency::Strong,
    )
    .await;
}

#[cfg(feature = "zookeeper")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_strong_histories_are_linearizable() {
    let url = support::zookeeper::shared().url();
    record_and_check(
        "zookeeper",
        clients(&url, 6).await,
        "lin/zk/",
        Consistency::Strong,
    )
    .await;
}

#[cfg(feature = "consul")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_sim_histories_are_linearizable() {
    let sim = support::consul_sim::ConsulSim::start();
    record_and_check(
        "consul-sim",
        clients(&sim.url(), 6).await,
        "lin/consul/",
        Consistency::Strong,
    )
    .await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_histories_are_linearizable() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite://{}", dir.path().join("lin.db").display());
    // Six stores, six connections to one file; stale reads are strong reads here.
    record_and_check(
        "sqlite",
        clients(&url, 6).await,
        "lin/sqlite/",
        Consistency::Stale,
    )
    .await;
}

#[cfg(feature = "file")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_histories_are_linearizable() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("file://{}", dir.path().join("lin").display());
    // Six stores on one directory; stale reads are strong reads here.
    record_and_check(
        "file",
        clients(&url, 6).await,
        "lin/file/",
        Consistency::Stale,
    )
    .await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_histories_are_linearizable() {
    let pg = support::postgres::shared();
    let url = pg.url(&support::postgres::fresh_schema("lin"));
    record_and_check(
        "postgres",
        clients(&url, 6).await,
        "lin/postgres/",
        Consistency::Strong,
    )
    .await;
}
