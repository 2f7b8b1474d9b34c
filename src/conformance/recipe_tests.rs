//! The semaphore and read-write lock conformance tests ([`crate::DistSemaphore`],
//! [`crate::DistRwLock`]), run by
//! [`recipe_conformance_tests!`](crate::recipe_conformance_tests).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::lock_tests::short_ttl;
use super::{bounded, ok, Harness};
use crate::error::ErrorKind;
use crate::fencing::FencedResource;
use crate::lock::LockOptions;
use crate::semaphore::MAX_PERMITS;

fn opts() -> LockOptions {
    LockOptions::new().ttl(Duration::from_secs(20))
}

/// 6 clients × 4 rounds share a semaphore of 3 permits: never more than 3 holders at once, all
/// 3 in use at some point, slots within `0..3`, and every slot's tokens accepted by a resource
/// fenced per slot (they only increase).
pub async fn semaphore_bounds_holders(h: &Harness) {
    let name = format!("{}sem", h.scope("sem-bound"));
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let fenced: Arc<Vec<FencedResource<u32>>> =
        Arc::new((0..3).map(|_| FencedResource::new(0)).collect());
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let store = h.open().await;
        let (name, inside, most, fenced) =
            (name.clone(), inside.clone(), most.clone(), fenced.clone());
        let hn = h.name().to_string();
        tasks.push(tokio::spawn(async move {
            for _ in 0..4 {
                let p = ok("acquire", store.acquire(&name, 3, &opts())).await;
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                assert!(now <= 3, "[{hn}] {now} holders of a 3-permit semaphore");
                assert!(p.slot() < 3, "[{hn}] slot {} of 3", p.slot());
                fenced[p.slot() as usize]
                    .write(p.token(), |n| *n += 1)
                    .unwrap_or_else(|e| panic!("[{hn}] slot {} refused: {e}", p.slot()));
                tokio::time::sleep(Duration::from_millis(40)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                ok("release", p.release()).await;
            }
        }));
    }
    for t in tasks {
        bounded("semaphore task", t).await.expect("task panicked");
    }
    let total: u32 = fenced.iter().map(|f| f.read(|n| *n)).sum();
    assert_eq!(total, 24, "[{}] permits granted", h.name());
    assert_eq!(
        most.load(Ordering::SeqCst),
        3,
        "[{}] the 3 permits were never all in use at once",
        h.name()
    );
}

/// A caller that asks for another number of permits than the semaphore's holders gets
/// `InvalidArgument`; once nobody holds it, the new number is taken.
pub async fn semaphore_permits_must_agree(h: &Harness) {
    let (a, b) = (h.open().await, h.open().await);
    let name = format!("{}sem", h.scope("sem-agree"));
    let p = ok("acquire", a.acquire(&name, 2, &opts())).await;
    let e = bounded(
        "acquire(3)",
        b.acquire(&name, 3, &opts().wait(Duration::from_secs(5))),
    )
    .await
    .expect_err("a mismatched number of permits was accepted");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "[{}] {e}", h.name());
    // The same number still works next to the holder.
    let p2 = ok("acquire(2)", b.acquire(&name, 2, &opts())).await;
    assert_ne!(
        p.slot(),
        p2.slot(),
        "[{}] two holders of one slot",
        h.name()
    );
    ok("release", p.release()).await;
    ok("release", p2.release()).await;
    let p3 = ok("acquire(3) when idle", b.acquire(&name, 3, &opts())).await;
    let e = bounded(
        "acquire(2)",
        a.acquire(&name, 2, &opts().wait(Duration::from_secs(5))),
    )
    .await
    .expect_err("the old number was accepted after the change");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "[{}] {e}", h.name());
    ok("release", p3.release()).await;
}

/// A full semaphore makes `acquire` wait: a zero wait and a bounded wait end with `Timeout`
/// within bounds, leave nothing behind, and a permit given back is taken at once by a waiter.
pub async fn semaphore_waits_and_times_out(h: &Harness) {
    let (a, b) = (h.open().await, h.open().await);
    let name = format!("{}sem", h.scope("sem-wait"));
    let p = ok("acquire", a.acquire(&name, 1, &opts())).await;
    let e = bounded("try", b.acquire(&name, 1, &opts().wait(Duration::ZERO)))
        .await
        .expect_err("a zero wait took a held permit");
    assert_eq!(e.kind(), ErrorKind::Timeout, "[{}] {e}", h.name());
    let started = Instant::now();
    let e = bounded(
        "bounded wait",
        b.acquire(&name, 1, &opts().wait(Duration::from_millis(500))),
    )
    .await
    .expect_err("a bounded wait took a held permit");
    assert_eq!(e.kind(), ErrorKind::Timeout, "[{}] {e}", h.name());
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "[{}] gave up after {:?} of a 500 ms wait",
        h.name(),
        started.elapsed()
    );
    let waiter = {
        let (b, name) = (b.clone(), name.clone());
        tokio::spawn(async move {
            b.acquire(&name, 1, &opts().wait(Duration::from_secs(20)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "[{}] the waiter got a held permit",
        h.name()
    );
    let token = p.token();
    let released = Instant::now();
    ok("release", p.release()).await;
    let p2 = bounded("waiter", waiter)
        .await
        .expect("waiter panicked")
        .unwrap_or_else(|e| panic!("[{}] the waiter failed: {e}", h.name()));
    assert!(
        released.elapsed() < Duration::from_secs(5),
        "[{}] the waiter took {:?} to get the permit given back",
        h.name(),
        released.elapsed()
    );
    assert!(p2.token() > token, "[{}] token did not increase", h.name());
    ok("release", p2.release()).await;
}

/// Bad input is refused with typed errors, and a permit whose lease lapses fires `lost()` and
/// frees its slot for another holder with a higher token.
pub async fn semaphore_bad_input_and_lost(h: &Harness) {
    let (a, b) = (h.open().await, h.open().await);
    let name = format!("{}sem", h.scope("sem-bad"));
    for permits in [0, MAX_PERMITS + 1] {
        let e = bounded("acquire", a.acquire(&name, permits, &opts()))
            .await
            .expect_err("an absurd number of permits was accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "[{}] {e}", h.name());
    }
    for bad in ["", "/x", "a//b", &"n".repeat(600)] {
        let e = bounded("acquire", a.acquire(bad, 1, &opts()))
            .await
            .expect_err("a bad name was accepted");
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidKey,
            "[{}] {bad:?}: {e}",
            h.name()
        );
    }
    let e = bounded("acquire", a.acquire(&name, 1, &opts().ttl(Duration::ZERO)))
        .await
        .expect_err("a zero TTL was accepted");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "[{}] {e}", h.name());

    let caps = a.capabilities();
    let ttl = short_ttl(caps.min_lock_ttl);
    let p = ok("acquire", a.acquire(&name, 1, &LockOptions::new().ttl(ttl))).await;
    p.suspend_keep_alive();
    let bound = ttl * (caps.lease_expiry_factor + 1) + Duration::from_secs(10);
    bounded("lost", tokio::time::timeout(bound, p.lost()))
        .await
        .unwrap_or_else(|_| panic!("[{}] lost() did not fire within {bound:?}", h.name()));
    assert!(p.is_lost());
    let p2 = ok(
        "acquire after the lapse",
        b.acquire(&name, 1, &LockOptions::new().ttl(ttl).wait(bound)),
    )
    .await;
    assert!(
        p2.token() > p.token(),
        "[{}] token did not increase",
        h.name()
    );
    ok("release", p2.release()).await;
    drop(p);
}

/// Readers hold together; a writer waits for them and then holds alone; a reader waits for the
/// writer. Tokens increase with every passage.
pub async fn rwlock_readers_share_writers_exclude(h: &Harness) {
    let (a, b, c) = (h.open().await, h.open().await, h.open().await);
    let name = format!("{}rw", h.scope("rw-share"));
    let short = || opts().wait(Duration::from_millis(400));
    let r1 = ok("read 1", a.read(&name, &opts())).await;
    let r2 = ok("read 2", b.read(&name, &opts())).await;
    let r3 = ok("read 3", c.read(&name, &opts())).await;
    assert!(r1.token() < r2.token() && r2.token() < r3.token());
    let e = bounded("write", c.write(&name, &short()))
        .await
        .expect_err("a writer got in next to readers");
    assert_eq!(e.kind(), ErrorKind::Timeout, "[{}] {e}", h.name());
    // The writer that timed out left nothing behind: another reader gets in.
    let r4 = ok("read after the writer gave up", c.read(&name, &short())).await;
    for g in [r1, r2, r3, r4] {
        ok("release", g.release()).await;
    }
    let w = ok("write", a.write(&name, &opts())).await;
    let e = bounded("read", b.read(&name, &short()))
        .await
        .expect_err("a reader got in next to a writer");
    assert_eq!(e.kind(), ErrorKind::Timeout, "[{}] {e}", h.name());
    let e = bounded("write", c.write(&name, &opts().wait(Duration::ZERO)))
        .await
        .expect_err("two writers");
    assert_eq!(e.kind(), ErrorKind::Timeout, "[{}] {e}", h.name());
    let wt = w.token();
    ok("release", w.release()).await;
    let r = ok("read after the writer", b.read(&name, &short())).await;
    assert!(r.token() > wt, "[{}] token did not increase", h.name());
    ok("release", r.release()).await;
}

/// A writer waiting behind a reader gets in before a reader that asked after it.
pub async fn rwlock_writer_not_starved(h: &Harness) {
    let (a, b, c) = (h.open().await, h.open().await, h.open().await);
    let name = format!("{}rw", h.scope("rw-fair"));
    let order = Arc::new(Mutex::new(Vec::new()));
    let r1 = ok("read", a.read(&name, &opts())).await;
    let writer = {
        let (b, name, order) = (b.clone(), name.clone(), order.clone());
        tokio::spawn(async move {
            let w = b.write(&name, &opts()).await?;
            order.lock().unwrap().push("writer");
            tokio::time::sleep(Duration::from_millis(200)).await;
            w.release().await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reader = {
        let (c, name, order) = (c.clone(), name.clone(), order.clone());
        tokio::spawn(async move {
            let r = c.read(&name, &opts()).await?;
            order.lock().unwrap().push("late reader");
            r.release().await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        order.lock().unwrap().is_empty(),
        "[{}] {:?} got in next to a reader",
        h.name(),
        order.lock().unwrap()
    );
    ok("release", r1.release()).await;
    bounded("writer", writer)
        .await
        .expect("writer panicked")
        .unwrap_or_else(|e| panic!("[{}] writer: {e}", h.name()));
    bounded("reader", reader)
        .await
        .expect("reader panicked")
        .unwrap_or_else(|e| panic!("[{}] reader: {e}", h.name()));
    assert_eq!(
        *order.lock().unwrap(),
        vec!["writer", "late reader"],
        "[{}] the writer was overtaken",
        h.name()
    );
}

/// 4 clients × 8 rounds, half reading, half writing: a writer is never inside with anyone else,
/// readers do overlap, and a write hold is lost (and its slots freed) when its lease lapses.
pub async fn rwlock_mixed_and_lost(h: &Harness) {
    let name = format!("{}rw", h.scope("rw-mixed"));
    let readers = Arc::new(AtomicUsize::new(0));
    let writing = Arc::new(AtomicBool::new(false));
    let overlapped = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..4 {
        let store = h.open().await;
        let (name, readers, writing, overlapped) = (
            name.clone(),
            readers.clone(),
            writing.clone(),
            overlapped.clone(),
        );
        let hn = h.name().to_string();
        tasks.push(tokio::spawn(async move {
            for round in 0..8 {
                if (c + round) % 4 == 0 {
                    let w = ok("write", store.write(&name, &opts())).await;
                    assert!(!writing.swap(true, Ordering::SeqCst), "[{hn}] two writers");
                    assert_eq!(
                        readers.load(Ordering::SeqCst),
                        0,
                        "[{hn}] writer with readers"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    writing.store(false, Ordering::SeqCst);
                    ok("release", w.release()).await;
                } else {
                    let r = ok("read", store.read(&name, &opts())).await;
                    assert!(
                        !writing.load(Ordering::SeqCst),
                        "[{hn}] reader with a writer"
                    );
                    if readers.fetch_add(1, Ordering::SeqCst) > 0 {
                        overlapped.store(true, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    readers.fetch_sub(1, Ordering::SeqCst);
                    ok("release", r.release()).await;
                }
            }
        }));
    }
    for t in tasks {
        bounded("rwlock task", t).await.expect("task panicked");
    }
    assert!(
        overlapped.load(Ordering::SeqCst),
        "[{}] readers never overlapped",
        h.name()
    );

    let (a, b) = (h.open().await, h.open().await);
    let caps = a.capabilities();
    let ttl = short_ttl(caps.min_lock_ttl);
    let w = ok("write", a.write(&name, &LockOptions::new().ttl(ttl))).await;
    w.suspend_keep_alive();
    let bound = ttl * (caps.lease_expiry_factor + 1) + Duration::from_secs(10);
    bounded("lost", tokio::time::timeout(bound, w.lost()))
        .await
        .unwrap_or_else(|_| panic!("[{}] lost() did not fire within {bound:?}", h.name()));
    assert!(w.is_lost());
    let r = ok(
        "read after the lapse",
        b.read(&name, &LockOptions::new().ttl(ttl).wait(bound)),
    )
    .await;
    assert!(
        r.token() > w.token(),
        "[{}] token did not increase",
        h.name()
    );
    ok("release", r.release()).await;
    drop(w);
}
