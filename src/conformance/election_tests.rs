//! The election conformance tests ([`crate::Election`]), run by
//! [`election_conformance_tests!`](crate::election_conformance_tests).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{bounded, ok, Harness};
use crate::election::{Leader, LeaderStream};
use crate::error::ErrorKind;
use crate::fencing::FencedResource;
use crate::lock::LockOptions;

fn opts() -> LockOptions {
    LockOptions::new().ttl(Duration::from_secs(20))
}

async fn next_item(h: &Harness, what: &str, s: &mut LeaderStream) -> Option<Leader> {
    match tokio::time::timeout(Duration::from_secs(15), s.next()).await {
        Ok(Some(Ok(l))) => l,
        Ok(Some(Err(e))) => panic!("[{}] observe ({what}): error {e}", h.name()),
        Ok(None) => panic!("[{}] observe ({what}): the stream ended", h.name()),
        Err(_) => panic!("[{}] observe ({what}): no item within 15 s", h.name()),
    }
}

/// 3 clients × 5 rounds campaign for one election; every leader enters a fenced resource with
/// its term. No two leaders overlap, the resource never refuses a leader's term (terms only
/// increase), and `leader()` shows the current leader's value and term.
pub async fn election_one_leader_at_a_time(h: &Harness) {
    let name = format!("{}e", h.scope("one-leader"));
    let fenced = Arc::new(FencedResource::new(Vec::<u64>::new()));
    let inside = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..3 {
        let store = h.open().await;
        let (name, fenced, inside) = (name.clone(), fenced.clone(), inside.clone());
        let hn = h.name().to_string();
        tasks.push(tokio::spawn(async move {
            for round in 0..5 {
                let value = format!("c{c}-r{round}").into_bytes();
                let g = ok("campaign", store.campaign(&name, value.clone(), &opts())).await;
                assert!(
                    !inside.swap(true, Ordering::SeqCst),
                    "[{hn}] two leaders at once"
                );
                let term = g.term();
                fenced
                    .write(term, |seen| seen.push(term.get()))
                    .unwrap_or_else(|e| {
                        panic!("[{hn}] the fenced resource refused term {term}: {e}")
                    });
                let l = ok("leader", store.leader(&name)).await;
                assert_eq!(
                    l,
                    Some(Leader { value, term }),
                    "[{hn}] leader() while leader"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
                assert!(!g.is_lost(), "[{hn}] leadership lost although renewed");
                inside.store(false, Ordering::SeqCst);
                ok("resign", g.resign()).await;
            }
        }));
    }
    for t in tasks {
        bounded("contenders", t)
            .await
            .expect("a contender panicked");
    }
    let terms = fenced.read(|v| v.clone());
    assert_eq!(terms.len(), 15, "[{}] leaderships: {terms:?}", h.name());
    assert!(
        terms.windows(2).all(|w| w[0] < w[1]),
        "[{}] terms do not strictly increase: {terms:?}",
        h.name()
    );
}

/// A contender waiting behind a leader takes over when the leader's guard is dropped, and
/// again when the next leader's lease lapses, each time with a higher term; a deposed leader
/// gets `LockLost` from `proclaim`.
pub async fn election_failover_raises_the_term(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let caps = a.capabilities();
    let ttl = caps.min_lock_ttl.max(Duration::from_secs(2));
    let bound = ttl * (caps.lease_expiry_factor + 1) + Duration::from_secs(10);
    let name = format!("{}e", h.scope("failover"));
    let o = LockOptions::new().ttl(ttl).wait(bound);
    let first = ok("campaign a", a.campaign(&name, b"a".to_vec(), &o)).await;
    let waiter = {
        let (b, name, o) = (b.clone(), name.clone(), o.clone());
        tokio::spawn(async move { b.campaign(&name, b"b".to_vec(), &o).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "[{}] two leaders at once", h.name());
    let t1 = first.term();
    let dropped = Instant::now();
    drop(first);
    let second = bounded("waiter", waiter)
        .await
        .expect("waiter panicked")
        .unwrap_or_else(|e| panic!("[{}] waiter failed: {e}", h.name()));
    let handover = dropped.elapsed();
    assert!(
        second.term() > t1,
        "[{}] new term {} not above {t1}",
        h.name(),
        second.term()
    );
    assert!(
        handover < Duration::from_secs(5),
        "[{}] handover after drop took {handover:?}",
        h.name()
    );
    // The lease of the second leader lapses: a third contender takes over.
    let c = h.open().await;
    let third = {
        let (c, name, o) = (c.clone(), name.clone(), o.clone());
        tokio::spawn(async move {
            let r = c.campaign(&name, b"c".to_vec(), &o).await;
            (r, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    second.suspend_keep_alive();
    let paused = Instant::now();
    bounded("lost", second.lost()).await;
    let lost_at = Instant::now();
    let (r, took_at) = bounded("third", third).await.expect("third panicked");
    let g3 = r.unwrap_or_else(|e| panic!("[{}] third contender failed: {e}", h.name()));
    assert!(g3.term() > second.term(), "[{}] term after lapse", h.name());
    assert!(
        lost_at <= took_at,
        "[{}] the next leader took over before the old one's lost() fired",
        h.name()
    );
    assert!(
        took_at.duration_since(paused) <= bound,
        "[{}] failover after lapse took {:?}",
        h.name(),
        took_at.duration_since(paused)
    );
    let err = second.proclaim(b"stale".to_vec()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LockLost, "[{}] {err}", h.name());
    let l = ok("leader", c.leader(&name)).await;
    assert_eq!(
        l.map(|l| l.term),
        Some(g3.term()),
        "[{}] leader()",
        h.name()
    );
    eprintln!(
        "[{}] failover: {handover:?} after drop, {:?} after the lease stopped (ttl {ttl:?})",
        h.name(),
        took_at.duration_since(paused)
    );
    ok("resign", g3.resign()).await;
}

/// `observe` yields the state at the call, then every change in order: a leader, its
/// proclaimed value, no leader after it resigns, the next leader.
pub async fn election_observe_in_order(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let o = h.open().await;
    let name = format!("{}e", h.scope("observe"));
    let mut s = ok("observe", o.observe(&name)).await;
    assert_eq!(next_item(h, "start", &mut s).await, None);
    let g = ok("campaign a", a.campaign(&name, b"a1".to_vec(), &opts())).await;
    let t1 = g.term();
    let want = |v: &[u8], term| {
        Some(Leader {
            value: v.to_vec(),
            term,
        })
    };
    assert_eq!(next_item(h, "a1", &mut s).await, want(b"a1", t1));
    ok("proclaim", g.proclaim(b"a2".to_vec())).await;
    assert_eq!(next_item(h, "a2", &mut s).await, want(b"a2", t1));
    ok("proclaim", g.proclaim(b"a3".to_vec())).await;
    assert_eq!(next_item(h, "a3", &mut s).await, want(b"a3", t1));
    ok("resign", g.resign()).await;
    assert_eq!(next_item(h, "resigned", &mut s).await, None);
    let g2 = ok("campaign b", b.campaign(&name, b"b1".to_vec(), &opts())).await;
    assert!(g2.term() > t1);
    assert_eq!(next_item(h, "b1", &mut s).await, want(b"b1", g2.term()));
    // A second observer starts from the current state.
    let mut s2 = ok("observe", o.observe(&name)).await;
    assert_eq!(
        next_item(h, "start 2", &mut s2).await,
        want(b"b1", g2.term())
    );
    ok("resign", g2.resign()).await;
    assert_eq!(next_item(h, "resigned 2", &mut s2).await, None);
}

/// `proclaim` is visible through `leader()`; no leader before and after.
pub async fn election_proclaim_visible(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let name = format!("{}e", h.scope("proclaim"));
    assert_eq!(ok("leader", b.leader(&name)).await, None);
    let g = ok("campaign", a.campaign(&name, b"v1".to_vec(), &opts())).await;
    let l = ok("leader", b.leader(&name)).await.expect("a leader");
    assert_eq!((l.value.as_slice(), l.term), (&b"v1"[..], g.term()));
    ok("proclaim", g.proclaim(b"v2".to_vec())).await;
    let l = ok("leader", b.leader(&name)).await.expect("a leader");
    assert_eq!((l.value.as_slice(), l.term), (&b"v2"[..], g.term()));
    ok("proclaim", g.proclaim(Vec::new())).await;
    let l = ok("leader", b.leader(&name)).await.expect("a leader");
    assert!(l.value.is_empty(), "[{}] empty value", h.name());
    let too_big = vec![b'x'; a.capabilities().max_value_size + 1];
    let err = g.proclaim(too_big).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ValueTooLarge, "[{}] {err}", h.name());
    ok("resign", g.resign()).await;
    assert_eq!(ok("leader", b.leader(&name)).await, None);
}

/// A campaign behind a leader gives `Timeout` when its wait runs out, and leaves nothing
/// behind: the next contender gets in at once after the leader resigns.
pub async fn election_wait_times_out(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let name = format!("{}e", h.scope("timeout"));
    let g = ok("campaign", a.campaign(&name, b"a".to_vec(), &opts())).await;
    let started = Instant::now();
    let r = bounded(
        "campaign",
        b.campaign(
            &name,
            b"b".to_vec(),
            &opts().wait(Duration::from_millis(300)),
        ),
    )
    .await;
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Timeout);
    assert!(started.elapsed() < Duration::from_secs(10));
    let t1 = g.term();
    ok("resign", g.resign()).await;
    let g2 = ok(
        "campaign",
        b.campaign(&name, b"b".to_vec(), &opts().wait(Duration::from_secs(5))),
    )
    .await;
    assert!(g2.term() > t1);
}

/// Malformed names and absurd TTLs give typed errors at once.
pub async fn election_bad_input(h: &Harness) {
    let a = h.open().await;
    let long = "x".repeat(600);
    for bad in ["", "/a", "a/", "a//b", "a b", "ü", long.as_str()] {
        let e = bounded("campaign", a.campaign(bad, Vec::new(), &opts()))
            .await
            .unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidKey,
            "[{}] {bad:?}: {e}",
            h.name()
        );
        let e = bounded("leader", a.leader(bad)).await.unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidKey,
            "[{}] {bad:?}: {e}",
            h.name()
        );
        let e = bounded("observe", a.observe(bad)).await.err().unwrap();
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidKey,
            "[{}] {bad:?}: {e}",
            h.name()
        );
    }
    let name = format!("{}e", h.scope("bad-ttl"));
    for ttl in [Duration::ZERO, Duration::MAX] {
        let e = bounded(
            "campaign",
            a.campaign(&name, Vec::new(), &LockOptions::new().ttl(ttl)),
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidArgument,
            "[{}] ttl {ttl:?}: {e}",
            h.name()
        );
    }
}
