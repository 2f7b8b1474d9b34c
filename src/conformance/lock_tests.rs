//! Lock conformance tests.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{bounded, ok, Harness};
use crate::error::ErrorKind;
use crate::lock::{DistLockExt, FencingToken, LockOptions};

/// A lock TTL short enough to test lapses, and long enough for the backend.
pub(crate) fn short_ttl(min: Duration) -> Duration {
    min.max(Duration::from_secs(2))
}

fn opts() -> LockOptions {
    LockOptions::new().ttl(Duration::from_secs(20))
}

/// 16 tasks over 4 clients each take the lock several times and do a non-atomic
/// read-modify-write of a shared counter inside it (with a pause between read and write). The
/// final count is exact, no two tasks are ever inside at once, and the fencing tokens, in the
/// order the critical sections ran, strictly increase.
pub async fn lock_mutual_exclusion(h: &Harness) {
    const TASKS: usize = 16;
    const ROUNDS: usize = 4;
    let name = format!("{}counter", h.scope("mutex"));
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(h.open().await);
    }
    let counter = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(Mutex::new(Vec::<FencingToken>::new()));
    let mut tasks: Vec<tokio::task::JoinHandle<crate::Result<()>>> = Vec::new();
    for t in 0..TASKS {
        let client = clients[t % clients.len()].clone();
        let (counter, inside, tokens, name) = (
            counter.clone(),
            inside.clone(),
            tokens.clone(),
            name.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = client.lock(&name, &opts()).await?;
                let now_inside = inside.fetch_add(1, Ordering::SeqCst);
                assert_eq!(now_inside, 0, "two holders inside the critical section");
                tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(guard.token());
                let read = counter.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                counter.store(read + 1, Ordering::SeqCst);
                inside.fetch_sub(1, Ordering::SeqCst);
                assert!(!guard.is_lost(), "lock lost during the critical section");
                guard.release().await?;
            }
            crate::Result::Ok(())
        }));
    }
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(120), t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("[{}] contender failed: {e}", h.name()),
            Ok(Err(e)) => panic!("[{}] contender panicked: {e}", h.name()),
            Err(_) => panic!("[{}] contenders did not finish within 120 s", h.name()),
        }
    }
    let expected = (TASKS * ROUNDS) as u64;
    assert_eq!(
        counter.load(Ordering::SeqCst),
        expected,
        "[{}] lost updates",
        h.name()
    );
    let tokens = tokens.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(tokens.len() as u64, expected);
    for w in tokens.windows(2) {
        assert!(
            w[0] < w[1],
            "[{}] fencing tokens not strictly increasing: {tokens:?}",
            h.name()
        );
    }
}

/// Successive acquisitions of one lock, from one client and from another, get strictly
/// increasing tokens.
pub async fn fencing_tokens_increase(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let name = format!("{}tokens", h.scope("fencing"));
    let mut last: Option<FencingToken> = None;
    for i in 0..6 {
        let client = if i % 2 == 0 { &a } else { &b };
        let guard = ok("lock", client.lock(&name, &opts())).await;
        if let Some(prev) = last {
            assert!(
                guard.token() > prev,
                "[{}] token {} after {prev}",
                h.name(),
                guard.token()
            );
        }
        last = Some(guard.token());
        ok("release", guard.release()).await;
    }
}

/// `try_lock` on a held lock returns `None` at once (and takes it once it is free).
pub async fn try_lock_on_held_lock(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let name = format!("{}held", h.scope("trylock"));
    let held = ok("lock", a.lock(&name, &opts())).await;
    let started = Instant::now();
    let second = ok("try_lock held", b.try_lock(&name, &opts())).await;
    assert!(second.is_none(), "[{}] try_lock got a held lock", h.name());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "[{}] try_lock waited {:?}",
        h.name(),
        started.elapsed()
    );
    let same_client = ok("try_lock held, same client", a.try_lock(&name, &opts())).await;
    assert!(
        same_client.is_none(),
        "[{}] same client took a held lock twice",
        h.name()
    );
    let token = held.token();
    ok("release", held.release()).await;
    let got = ok("try_lock free", b.try_lock(&name, &opts())).await;
    let got = got.unwrap_or_else(|| panic!("[{}] try_lock on a free lock returned None", h.name()));
    assert!(got.token() > token);
    ok("release", got.release()).await;
}

/// `lock` with a bounded wait on a held lock gives `Timeout` close to the bound, and leaves no
/// trace: the next contender gets the lock as soon as it is released.
pub async fn lock_wait_times_out(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let name = format!("{}busy", h.scope("timeout"));
    let held = ok("lock", a.lock(&name, &opts())).await;
    let wait = Duration::from_secs(1);
    let started = Instant::now();
    let r = bounded("lock with wait", b.lock(&name, &opts().wait(wait))).await;
    let took = started.elapsed();
    match r {
        Err(e) if e.kind() == ErrorKind::Timeout => {}
        Err(e) => panic!("[{}] expected Timeout, got {e}", h.name()),
        Ok(g) => panic!("[{}] acquired a held lock: {g:?}", h.name()),
    }
    assert!(
        took + Duration::from_millis(20) >= wait,
        "[{}] gave up after {took:?}",
        h.name()
    );
    assert!(
        took < wait + Duration::from_secs(2),
        "[{}] gave up only after {took:?}",
        h.name()
    );
    ok("release", held.release()).await;
    let started = Instant::now();
    let next = ok(
        "lock after release",
        b.lock(&name, &opts().wait(Duration::from_secs(10))),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "[{}] the timed-out waiter left a trace: next lock took {:?}",
        h.name(),
        started.elapsed()
    );
    ok("release", next.release()).await;
}

/// A holder whose keep-alive stops loses the lock after its TTL: `lost()` fires, `is_lost()`
/// turns true, and another client takes the lock with a larger token — and `lost()` fired
/// strictly before the other client's `lock()` returned.
pub async fn lost_fires_when_lease_lapses(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let caps = a.capabilities();
    let ttl = short_ttl(caps.min_lock_ttl);
    let name = format!("{}lapse", h.scope("lost"));
    let guard = ok("lock", a.lock(&name, &LockOptions::new().ttl(ttl))).await;
    assert!(!guard.is_lost());
    // The instant lost() fires, taken by a task of its own so that it does not depend on when
    // this task gets to run.
    let lost_at = {
        let lost = guard.lost();
        tokio::spawn(async move {
            lost.await;
            Instant::now()
        })
    };
    // Renewal keeps it held past the TTL.
    tokio::time::sleep(ttl + ttl / 2).await;
    assert!(
        !guard.is_lost(),
        "[{}] lock lost although its lease was renewed",
        h.name()
    );
    guard.suspend_keep_alive();
    let paused = Instant::now();
    let bound = ttl * (caps.lease_expiry_factor + 1) + Duration::from_secs(10);
    let waiter = {
        let b = b.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let r = b
                .lock(&name, &LockOptions::new().ttl(ttl).wait(bound))
                .await;
            (r, Instant::now())
        })
    };
    let lost_at = match tokio::time::timeout(bound, lost_at).await {
        Ok(Ok(at)) => at,
        Ok(Err(e)) => panic!("[{}] lost() task failed: {e}", h.name()),
        Err(_) => panic!(
            "[{}] lost() did not fire within {bound:?} of the lease lapsing",
            h.name()
        ),
    };
    assert!(guard.is_lost());
    let (next, acquired_at) = match tokio::time::timeout(bound, waiter).await {
        Ok(Ok((Ok(g), at))) => (g, at),
        Ok(Ok((Err(e), _))) => panic!("[{}] next client failed to lock: {e}", h.name()),
        Ok(Err(e)) => panic!("[{}] waiter panicked: {e}", h.name()),
        Err(_) => panic!(
            "[{}] next client did not get the lock within {bound:?}",
            h.name()
        ),
    };
    let took = acquired_at.duration_since(paused);
    // The central promise: the holder learns of the loss before anyone else can acquire.
    assert!(
        lost_at < acquired_at,
        "[{}] the next client acquired {:?} before the holder's lost() fired (lost {:?}, \
         acquired {:?} after keep-alive stopped)",
        h.name(),
        lost_at.saturating_duration_since(acquired_at),
        lost_at.saturating_duration_since(paused),
        took
    );
    assert!(
        next.token() > guard.token(),
        "[{}] token did not increase",
        h.name()
    );
    // The last renewal may have come up to half a TTL before the pause.
    assert!(
        took + Duration::from_millis(100) >= ttl / 2,
        "[{}] lock taken over {took:?} after the pause, well before the TTL {ttl:?}",
        h.name()
    );
    match bounded("release lost guard", guard.release()).await {
        Err(e) if e.kind() == ErrorKind::LockLost => {}
        other => panic!(
            "[{}] releasing a lost lock: expected LockLost, got {other:?}",
            h.name()
        ),
    }
    assert!(
        !next.is_lost(),
        "[{}] releasing the lost guard broke the new holder",
        h.name()
    );
    ok("release", next.release()).await;
}

/// Releasing hands the lock to a waiting client promptly (well under a second here; the
/// benchmarks measure the real figure).
pub async fn release_hands_over_promptly(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let name = format!("{}handoff", h.scope("handoff"));
    let held = ok("lock", a.lock(&name, &opts())).await;
    let token = held.token();
    let waiter = {
        let name = name.clone();
        tokio::spawn(async move {
            let g = b.lock(&name, &opts().wait(Duration::from_secs(20))).await;
            (g, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiter.is_finished(),
        "[{}] waiter got a held lock",
        h.name()
    );
    let released = Instant::now();
    ok("release", held.release()).await;
    let (next, acquired) = match tokio::time::timeout(Duration::from_secs(20), waiter).await {
        Ok(Ok((Ok(g), at))) => (g, at),
        other => panic!("[{}] waiter did not get the lock: {other:?}", h.name()),
    };
    let handoff = acquired.duration_since(released);
    assert!(
        handoff < Duration::from_secs(1),
        "[{}] handoff took {handoff:?}",
        h.name()
    );
    assert!(next.token() > token);
    ok("release", next.release()).await;
}

/// Dropping a guard releases the lock in the background.
pub async fn dropped_guard_releases(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let name = format!("{}dropped", h.scope("drop"));
    let held = ok("lock", a.lock(&name, &opts())).await;
    drop(held);
    let started = Instant::now();
    let next = ok(
        "lock after drop",
        b.lock(&name, &opts().wait(Duration::from_secs(10))),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "[{}] dropped guard released only after {:?}",
        h.name(),
        started.elapsed()
    );
    ok("release", next.release()).await;
}

/// `run_locked` runs the job under the lock with its fencing token, releases afterwards, and
/// excludes a concurrent `try_lock` while the job runs.
pub async fn run_locked_job(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let name = format!("{}job", h.scope("job"));
    let first = ok("lock", a.lock(&name, &opts())).await;
    let before = first.token();
    ok("release", first.release()).await;
    let b2 = b.clone();
    let name2 = name.clone();
    let (token, excluded) = ok(
        "run_locked",
        a.run_locked(&name, &opts(), move |ctx| async move {
            assert!(!ctx.is_lost());
            let other = b2.try_lock(&name2, &opts()).await;
            (ctx.token(), matches!(other, Ok(None)))
        }),
    )
    .await;
    assert!(
        token > before,
        "[{}] job token {token} not above {before}",
        h.name()
    );
    assert!(
        excluded,
        "[{}] another client got the lock during the job",
        h.name()
    );
    let after = ok("try_lock after job", b.try_lock(&name, &opts())).await;
    assert!(after.is_some(), "[{}] run_locked did not release", h.name());
}

/// A guard dropped on a thread with no tokio runtime still ends its lock: another client gets
/// it well before the TTL, while the dropping client keeps other locks (and so its lease or
/// session) alive.
pub async fn guard_dropped_off_runtime_releases(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let scope = h.scope("offrt");
    let keep = ok("lock", a.lock(&format!("{scope}keep"), &opts())).await;
    let name = format!("{scope}dropped");
    let held = ok("lock", a.lock(&name, &opts())).await;
    let dropped = std::thread::spawn(move || drop(held)).join();
    assert!(
        dropped.is_ok(),
        "[{}] dropping off the runtime panicked",
        h.name()
    );
    let started = Instant::now();
    let next = bounded(
        "lock after an off-runtime drop",
        b.lock(&name, &opts().wait(Duration::from_secs(15))),
    )
    .await;
    let next = match next {
        Ok(g) => g,
        Err(e) => panic!(
            "[{}] a guard dropped outside a runtime kept its lock: {e}",
            h.name()
        ),
    };
    // The TTL is 20 s and the other lock keeps the lease or session alive: a lock that is not
    // ended by the drop stays held far longer.
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "[{}] released only after {:?}",
        h.name(),
        started.elapsed()
    );
    assert!(!keep.is_lost(), "[{}] the other lock was lost", h.name());
    ok("release", next.release()).await;
    ok("release", keep.release()).await;
}

/// Every valid name is its own lock: holding `n/a/b` does not block `n/a`, holding `n/a` does
/// not block `n/a/b`, on other clients and on the holding client itself.
pub async fn nested_lock_names_are_independent(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let scope = h.scope("nested");
    let (outer, inner) = (format!("{scope}a"), format!("{scope}a/b"));
    let short = opts().wait(Duration::from_secs(5));

    let deep = ok("lock a/b", a.lock(&inner, &opts())).await;
    let got = ok("try_lock a beside a/b", b.try_lock(&outer, &opts())).await;
    assert!(
        got.is_some(),
        "[{}] holding {inner:?} blocks try_lock({outer:?})",
        h.name()
    );
    ok("release", got.expect("checked").release()).await;
    // The holder of a/b takes a: it must not wait behind its own nested lock.
    let same = bounded("lock a by the holder of a/b", a.lock(&outer, &short)).await;
    let same = match same {
        Ok(g) => g,
        Err(e) => panic!(
            "[{}] the holder of {inner:?} cannot lock {outer:?}: {e}",
            h.name()
        ),
    };
    ok("release", deep.release()).await;
    // Now a is held: a/b and a/b/c are free.
    let below = ok("try_lock a/b beside a", b.try_lock(&inner, &opts())).await;
    assert!(
        below.is_some(),
        "[{}] holding {outer:?} blocks try_lock({inner:?})",
        h.name()
    );
    let deeper = bounded(
        "lock a/b/c beside a and a/b",
        b.lock(&format!("{inner}/c"), &short),
    )
    .await;
    assert!(
        deeper.is_ok(),
        "[{}] {inner:?}/c blocked by its parents: {:?}",
        h.name(),
        deeper.err()
    );
    // And a is still exclusive.
    let other = ok("try_lock a while held", b.try_lock(&outer, &opts())).await;
    assert!(
        other.is_none(),
        "[{}] {outer:?} was not exclusive",
        h.name()
    );
    ok("release", below.expect("checked").release()).await;
    ok("release", deeper.expect("checked").release()).await;
    ok("release", same.release()).await;
}

/// A wait too large to represent as a deadline means "unbounded": no panic, no instant
/// timeout, and the waiter gets the lock when it is released.
pub async fn absurd_wait_is_unbounded(h: &Harness) {
    let a = h.open().await;
    let b = h.open().await;
    let name = format!("{}huge", h.scope("wait"));
    let huge = opts().wait(Duration::MAX);
    let first = ok("lock with wait MAX", a.lock(&name, &huge)).await;
    let waiter = {
        let (b, name, huge) = (b.clone(), name.clone(), huge.clone());
        tokio::spawn(async move { b.lock(&name, &huge).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "[{}] a wait of Duration::MAX ended at once",
        h.name()
    );
    ok("release", first.release()).await;
    let next = match bounded("waiter with wait MAX", waiter).await {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => panic!("[{}] waiter with wait MAX failed: {e}", h.name()),
        Err(e) => panic!("[{}] waiter with wait MAX panicked: {e}", h.name()),
    };
    ok("release", next.release()).await;
}
