//! Key-value conformance tests.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{bounded, ok, Harness};
use crate::error::ErrorKind;
use crate::kv::{Consistency, Expect, PutOptions, WatchEvent, WatchStream};
use crate::{Backend, LockOptions};

const STRONG: Consistency = Consistency::Strong;

fn expect_kind<T: std::fmt::Debug>(what: &str, r: crate::Result<T>, kind: ErrorKind) {
    match r {
        Err(e) if e.kind() == kind => {}
        Err(e) => panic!("{what}: expected {kind}, got error {e}"),
        Ok(v) => panic!("{what}: expected {kind}, got Ok({v:?})"),
    }
}

async fn value_of(store: &dyn Backend, key: &str) -> Option<Vec<u8>> {
    ok("get", store.get(key, STRONG)).await.map(|e| e.value)
}

/// Binary and empty values round-trip; overwrites get a new version; missing keys read as
/// `None`; deleting a missing key succeeds.
pub async fn values_round_trip(h: &Harness) {
    let store = h.open().await;
    let ns = h.scope("roundtrip");
    let binary: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("binary", binary),
        ("empty", Vec::new()),
        ("utf8", "grüße".as_bytes().to_vec()),
        ("zeros", vec![0u8; 1000]),
    ];
    for (name, value) in &cases {
        let key = format!("{ns}{name}");
        let v1 = ok("put", store.put(&key, value.clone(), PutOptions::default())).await;
        let got = ok("get", store.get(&key, STRONG)).await;
        let got = got.unwrap_or_else(|| panic!("[{}] {key} missing after put", h.name()));
        assert_eq!(
            &got.value,
            value,
            "[{}] {key}: value changed in round trip",
            h.name()
        );
        assert_eq!(got.key, key);
        assert_eq!(
            got.version,
            v1,
            "[{}] {key}: get version differs from put",
            h.name()
        );
        let stale = ok("stale get", store.get(&key, Consistency::Stale)).await;
        if let Some(stale) = stale {
            assert_eq!(&stale.value, value, "[{}] stale read of {key}", h.name());
        }
        let v2 = ok(
            "overwrite",
            store.put(&key, b"x".to_vec(), PutOptions::default()),
        )
        .await;
        assert_ne!(v1, v2, "[{}] overwrite kept the version", h.name());
        assert_eq!(value_of(&*store, &key).await, Some(b"x".to_vec()));
    }
    let missing = format!("{ns}missing");
    assert_eq!(
        value_of(&*store, &missing).await,
        None,
        "[{}] missing key",
        h.name()
    );
    ok("delete missing", store.delete(&missing)).await;
    let key = format!("{ns}binary");
    ok("delete", store.delete(&key)).await;
    assert_eq!(
        value_of(&*store, &key).await,
        None,
        "[{}] deleted key still there",
        h.name()
    );
    // A second client sees what the first wrote.
    let other = h.open().await;
    assert_eq!(
        ok(
            "get from 2nd client",
            other.get(&format!("{ns}empty"), STRONG)
        )
        .await
        .map(|e| e.value),
        Some(b"x".to_vec())
    );
}

/// Compare-and-swap: create-if-absent, update-if-version and delete-if-version succeed when the
/// precondition holds and give `Conflict` without changing anything when it does not.
pub async fn cas_create_update_delete(h: &Harness) {
    let store = h.open().await;
    let key = format!("{}k", h.scope("cas"));
    let v1 = ok(
        "create",
        store.compare_and_swap(&key, Expect::Absent, Some(b"1".to_vec())),
    )
    .await
    .unwrap_or_else(|| panic!("[{}] create returned no version", h.name()));
    expect_kind(
        "create on existing key",
        bounded(
            "cas",
            store.compare_and_swap(&key, Expect::Absent, Some(b"2".to_vec())),
        )
        .await,
        ErrorKind::Conflict,
    );
    assert_eq!(
        value_of(&*store, &key).await,
        Some(b"1".to_vec()),
        "failed create changed value"
    );
    let v2 = ok(
        "update",
        store.compare_and_swap(&key, Expect::Version(v1), Some(b"2".to_vec())),
    )
    .await
    .unwrap_or_else(|| panic!("[{}] update returned no version", h.name()));
    assert_ne!(v1, v2);
    expect_kind(
        "update with stale version",
        bounded(
            "cas",
            store.compare_and_swap(&key, Expect::Version(v1), Some(b"3".to_vec())),
        )
        .await,
        ErrorKind::Conflict,
    );
    expect_kind(
        "delete with stale version",
        bounded(
            "cas",
            store.compare_and_swap(&key, Expect::Version(v1), None),
        )
        .await,
        ErrorKind::Conflict,
    );
    assert_eq!(
        value_of(&*store, &key).await,
        Some(b"2".to_vec()),
        "failed CAS changed value"
    );
    let current = ok("get", store.get(&key, STRONG)).await.map(|e| e.version);
    assert_eq!(current, Some(v2), "[{}] version after update", h.name());
    let gone = ok(
        "delete if version",
        store.compare_and_swap(&key, Expect::Version(v2), None),
    )
    .await;
    assert_eq!(gone, None);
    assert_eq!(
        value_of(&*store, &key).await,
        None,
        "delete-if-version left the key"
    );
    expect_kind(
        "update of a deleted key",
        bounded(
            "cas",
            store.compare_and_swap(&key, Expect::Version(v2), Some(b"4".to_vec())),
        )
        .await,
        ErrorKind::Conflict,
    );
    assert_eq!(
        value_of(&*store, &key).await,
        None,
        "CAS on a missing key created it"
    );
    ok(
        "assert absent",
        store.compare_and_swap(&key, Expect::Absent, None),
    )
    .await;
    // Plain put, then CAS against the version it returned.
    let v3 = ok("put", store.put(&key, b"p".to_vec(), PutOptions::default())).await;
    ok(
        "cas after put",
        store.compare_and_swap(&key, Expect::Version(v3), Some(Vec::new())),
    )
    .await;
    assert_eq!(value_of(&*store, &key).await, Some(Vec::new()));
}

/// `list` returns exactly the keys with the prefix, sorted, and `a/` does not match `ab`.
pub async fn list_by_prefix(h: &Harness) {
    let store = h.open().await;
    let ns = h.scope("list");
    let keys = ["a/b", "a/b/c", "a/bc", "ab", "a-b", "b/a"];
    for k in keys {
        ok(
            "put",
            store.put(
                &format!("{ns}{k}"),
                k.as_bytes().to_vec(),
                PutOptions::default(),
            ),
        )
        .await;
    }
    let names = |entries: Vec<crate::Entry>| -> Vec<String> {
        entries
            .into_iter()
            .map(|e| e.key[ns.len()..].to_string())
            .collect()
    };
    let check = |prefix: &str, got: Vec<String>, want: &[&str]| {
        assert_eq!(got, want, "[{}] list({prefix:?})", h.name());
    };
    for consistency in [Consistency::Strong, Consistency::Stale] {
        let p = format!("{ns}a/");
        check(
            &p,
            names(ok("list", store.list(&p, consistency)).await),
            &["a/b", "a/b/c", "a/bc"],
        );
    }
    let p = format!("{ns}a/b");
    check(
        &p,
        names(ok("list", store.list(&p, STRONG)).await),
        &["a/b", "a/b/c", "a/bc"],
    );
    let p = format!("{ns}a/b/");
    check(
        &p,
        names(ok("list", store.list(&p, STRONG)).await),
        &["a/b/c"],
    );
    let p = format!("{ns}a");
    check(
        &p,
        names(ok("list", store.list(&p, STRONG)).await),
        &["a-b", "a/b", "a/b/c", "a/bc", "ab"],
    );
    let all = ok("list", store.list(&ns, STRONG)).await;
    assert_eq!(
        all.len(),
        keys.len(),
        "[{}] list of the whole scope",
        h.name()
    );
    for e in &all {
        assert_eq!(
            e.value,
            &e.key.as_bytes()[ns.len()..],
            "list returned a wrong value"
        );
    }
    let p = format!("{ns}zzz/");
    assert!(
        ok("list", store.list(&p, STRONG)).await.is_empty(),
        "list of an empty prefix"
    );
    // Deleting leaves nothing behind in the listing (no directory junk).
    for k in ["a/b/c", "a/b"] {
        ok("delete", store.delete(&format!("{ns}{k}"))).await;
    }
    let p = format!("{ns}a/");
    check(
        &p,
        names(ok("list", store.list(&p, STRONG)).await),
        &["a/bc"],
    );
}

/// Keys with a TTL disappear once it runs out and watchers see the delete; a put without TTL
/// makes a key permanent again. Backends without key TTL must say `Unsupported`.
pub async fn key_ttl_expiry(h: &Harness) {
    let store = h.open().await;
    let caps = store.capabilities();
    let ns = h.scope("ttl");
    let key = format!("{ns}short");
    let ttl = caps.min_ttl.max(Duration::from_secs(1));
    if !caps.key_ttl {
        expect_kind(
            "put with TTL on a backend without key TTL",
            bounded("put", store.put(&key, b"v".to_vec(), PutOptions::ttl(ttl))).await,
            ErrorKind::Unsupported,
        );
        assert_eq!(value_of(&*store, &key).await, None);
        return;
    }
    expect_kind(
        "zero TTL",
        bounded(
            "put",
            store.put(&key, b"v".to_vec(), PutOptions::ttl(Duration::ZERO)),
        )
        .await,
        ErrorKind::InvalidArgument,
    );
    let mut events = if caps.watch {
        Some(ok("watch", store.watch(&ns)).await)
    } else {
        None
    };
    let kept = format!("{ns}kept");
    ok(
        "put kept",
        store.put(&kept, b"k".to_vec(), PutOptions::ttl(ttl)),
    )
    .await;
    ok(
        "put kept again",
        store.put(&kept, b"k2".to_vec(), PutOptions::default()),
    )
    .await;
    let started = Instant::now();
    ok(
        "put with TTL",
        store.put(&key, b"v".to_vec(), PutOptions::ttl(ttl)),
    )
    .await;
    assert_eq!(
        value_of(&*store, &key).await,
        Some(b"v".to_vec()),
        "TTL key missing at once"
    );
    let bound = ttl * 3 + Duration::from_secs(5);
    loop {
        if value_of(&*store, &key).await.is_none() {
            break;
        }
        assert!(
            started.elapsed() < bound,
            "[{}] TTL key still there after {bound:?}",
            h.name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lived = started.elapsed();
    assert!(
        lived + Duration::from_millis(50) >= ttl,
        "[{}] TTL key vanished after {lived:?}, before its TTL {ttl:?}",
        h.name()
    );
    assert_eq!(
        value_of(&*store, &kept).await,
        Some(b"k2".to_vec()),
        "put without TTL expired"
    );
    if let Some(events) = events.as_mut() {
        let mut saw_delete = false;
        while !saw_delete {
            match next_event(h, events).await {
                WatchEvent::Delete { key: k } if k == key => saw_delete = true,
                WatchEvent::Delete { key: k } if k == kept => {
                    panic!("[{}] watch saw the permanent key deleted", h.name())
                }
                _ => {}
            }
        }
    }
}

async fn next_event(h: &Harness, events: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(Duration::from_secs(20), events.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("[{}] watch error: {e}", h.name()),
        Ok(None) => panic!("[{}] watch stream ended", h.name()),
        Err(_) => panic!("[{}] no watch event within 20 s", h.name()),
    }
}

/// A watch sees every change after it was created, in order, and none from before; it ignores
/// keys outside its prefix.
pub async fn watch_order_and_start(h: &Harness) {
    let store = h.open().await;
    let ns = h.scope("watch");
    if !store.capabilities().watch {
        expect_kind(
            "watch on a backend without watch",
            bounded("watch", store.watch(&ns)).await.map(|_| ()),
            ErrorKind::Unsupported,
        );
        return;
    }
    let dir = format!("{ns}w/");
    ok(
        "put before",
        store.put(
            &format!("{dir}before"),
            b"0".to_vec(),
            PutOptions::default(),
        ),
    )
    .await;
    let mut events = ok("watch", store.watch(&dir)).await;
    let writer = h.open().await;
    let k1 = format!("{dir}k1");
    let k2 = format!("{dir}sub/k2");
    let v1 = ok(
        "put k1",
        writer.put(&k1, b"1".to_vec(), PutOptions::default()),
    )
    .await;
    ok(
        "put outside",
        writer.put(
            &format!("{ns}outside"),
            b"x".to_vec(),
            PutOptions::default(),
        ),
    )
    .await;
    let v2 = ok("put k2", writer.put(&k2, Vec::new(), PutOptions::default())).await;
    let v3 = ok(
        "cas k1",
        writer.compare_and_swap(&k1, Expect::Version(v1), Some(b"2".to_vec())),
    )
    .await
    .unwrap_or_else(|| panic!("cas returned no version"));
    ok("delete k2", writer.delete(&k2)).await;
    ok("delete before", writer.delete(&format!("{dir}before"))).await;
    let history: Vec<Change> = vec![
        (k1.clone(), Some((b"1".to_vec(), v1))),
        (k2.clone(), Some((Vec::new(), v2))),
        (k1.clone(), Some((b"2".to_vec(), v3))),
        (k2.clone(), None),
        (format!("{dir}before"), None),
    ];
    let got = collect_until_state(h, &mut events, &history).await;
    check_history(h, &got, &history, store.capabilities().watch_coalesces);
    // Nothing else arrives (the pre-watch put and the outside key are not delivered).
    let extra = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
    assert!(
        extra.is_err(),
        "[{}] unexpected extra watch event: {extra:?}",
        h.name()
    );
}

/// One change of a key: its state after (`None`: deleted).
type Change = (String, Option<(Vec<u8>, crate::Version)>);

/// Reads events until the state they describe reaches the final state of `history` for every
/// key it names, a deleted key counting only once its delete was seen (20 s at most per
/// event). A key created and deleted after the watch started may have no event on a
/// coalescing backend: once only such keys are missing, a quiet second ends the wait.
async fn collect_until_state(
    h: &Harness,
    events: &mut WatchStream,
    history: &[Change],
) -> Vec<WatchEvent> {
    let mut want: BTreeMap<&str, &Option<(Vec<u8>, crate::Version)>> = BTreeMap::new();
    for (k, st) in history {
        want.insert(k, st);
    }
    let mut state: BTreeMap<String, Option<(Vec<u8>, crate::Version)>> = BTreeMap::new();
    let mut got = Vec::new();
    loop {
        let done = |lenient: bool| {
            want.iter().all(|(k, st)| match state.get(*k) {
                Some(now) => now == *st,
                None => lenient && st.is_none(),
            })
        };
        if done(false) {
            return got;
        }
        if done(true) {
            match tokio::time::timeout(Duration::from_secs(1), events.next()).await {
                Err(_) => return got,
                Ok(Some(Ok(ev))) => {
                    apply(&mut state, &ev);
                    got.push(ev);
                    continue;
                }
                Ok(other) => panic!("[{}] watch ended or failed: {other:?}", h.name()),
            }
        }
        let ev = next_event(h, events).await;
        apply(&mut state, &ev);
        got.push(ev);
    }
}

fn apply(state: &mut BTreeMap<String, Option<(Vec<u8>, crate::Version)>>, ev: &WatchEvent) {
    match ev {
        WatchEvent::Put(e) => {
            state.insert(e.key.clone(), Some((e.value.clone(), e.version)));
        }
        WatchEvent::Delete { key } => {
            state.insert(key.clone(), None);
        }
        WatchEvent::Coalesced { .. } => {}
    }
}

/// Checks `got` against the changes made (`history`, in commit order). Exact backends: every
/// change once, in order, unmarked. Coalescing backends: per key, the events are a subsequence
/// of its changes ending with the last one, and an event that skips changes is marked (a key
/// whose changes end where it started, absent, may have no event).
fn check_history(h: &Harness, got: &[WatchEvent], history: &[Change], coalesces: bool) {
    let as_change = |ev: &WatchEvent| -> Option<Change> {
        match ev {
            WatchEvent::Put(e) => Some((e.key.clone(), Some((e.value.clone(), e.version)))),
            WatchEvent::Delete { key } => Some((key.clone(), None)),
            WatchEvent::Coalesced { .. } => None,
        }
    };
    if !coalesces {
        let seen: Vec<Change> = got
            .iter()
            .map(|ev| {
                as_change(ev).unwrap_or_else(|| {
                    panic!(
                        "[{}] an exact backend sent a coalesced mark: {ev:?}",
                        h.name()
                    )
                })
            })
            .collect();
        assert_eq!(
            seen,
            history,
            "[{}] events differ from the changes",
            h.name()
        );
        return;
    }
    let mut keys: Vec<&String> = history.iter().map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let changes: Vec<&Option<(Vec<u8>, crate::Version)>> = history
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, s)| s)
            .collect();
        // (marked, state) of each event of this key.
        let mut evs = Vec::new();
        let mut marked = false;
        for ev in got.iter().filter(|e| e.key() == key.as_str()) {
            match as_change(ev) {
                None => marked = true,
                Some((_, st)) => evs.push((std::mem::take(&mut marked), st)),
            }
        }
        assert!(
            !marked,
            "[{}] {key}: a mark with no event after it",
            h.name()
        );
        if evs.is_empty() {
            assert!(
                changes.last().is_some_and(|s| s.is_none()),
                "[{}] {key}: no event at all",
                h.name()
            );
            continue;
        }
        let mut at = 0; // index in `changes` of the next change not yet reported
        for (m, st) in &evs {
            let Some(found) = changes[at..].iter().position(|c| *c == st) else {
                panic!(
                    "[{}] {key}: event {st:?} is not a later state of the key (changes \
                     {changes:?}, events {evs:?})",
                    h.name()
                );
            };
            assert!(
                found == 0 || *m,
                "[{}] {key}: event {st:?} skips {found} change(s) unmarked (changes \
                 {changes:?}, events {evs:?})",
                h.name()
            );
            at += found + 1;
        }
        assert_eq!(
            at,
            changes.len(),
            "[{}] {key}: the last event is not the last change",
            h.name()
        );
    }
}

/// Two writers put one key 100 times each, concurrently, while a third client watches: the
/// watch lives, every event is a value written, in each writer's order, the last one is the
/// final value; an exact backend delivers every write once, a coalescing one marks every
/// event that merges writes.
pub async fn watch_concurrent_writers(h: &Harness) {
    let watcher = h.open().await;
    if !watcher.capabilities().watch {
        return;
    }
    let coalesces = watcher.capabilities().watch_coalesces;
    let ns = h.scope("watchrace");
    let key = format!("{ns}k");
    let mut events = ok("watch", watcher.watch(&ns)).await;
    const N: usize = 100;
    let writers = [h.open().await, h.open().await];
    let runs = writers.iter().enumerate().map(|(w, store)| {
        let key = key.clone();
        async move {
            let mut versions = Vec::with_capacity(N);
            for i in 0..N {
                let v = ok(
                    "put",
                    store.put(&key, format!("{w}:{i}").into_bytes(), PutOptions::default()),
                )
                .await;
                versions.push(v);
            }
            versions
        }
    });
    let written = futures::future::join_all(runs).await;
    let last = ok("get", watcher.get(&key, STRONG))
        .await
        .unwrap_or_else(|| panic!("[{}] the key is missing", h.name()));
    // value -> (writer, index, version)
    let mut by_value = std::collections::HashMap::new();
    for (w, vs) in written.iter().enumerate() {
        for (i, v) in vs.iter().enumerate() {
            by_value.insert(format!("{w}:{i}").into_bytes(), (w, i, *v));
        }
    }
    let mut puts = Vec::new(); // (marked, writer, index)
    let mut marked = false;
    loop {
        match next_event(h, &mut events).await {
            WatchEvent::Coalesced { key: k } => {
                assert!(coalesces, "[{}] an exact backend sent a mark", h.name());
                assert_eq!(k, key);
                marked = true;
            }
            WatchEvent::Put(e) => {
                assert_eq!(e.key, key);
                let Some(&(w, i, v)) = by_value.get(&e.value) else {
                    panic!("[{}] event with a value never written: {e:?}", h.name());
                };
                assert_eq!(e.version, v, "[{}] event version of {w}:{i}", h.name());
                puts.push((std::mem::take(&mut marked), w, i));
                if e.version == last.version {
                    assert_eq!(e.value, last.value);
                    break;
                }
            }
            ev => panic!("[{}] unexpected event {ev:?}", h.name()),
        }
    }
    let extra = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
    assert!(
        extra.is_err(),
        "[{}] event after the final value: {extra:?}",
        h.name()
    );
    // Each writer's values in its own order.
    for w in 0..2 {
        let idx: Vec<usize> = puts.iter().filter(|p| p.1 == w).map(|p| p.2).collect();
        assert!(
            idx.windows(2).all(|p| p[0] < p[1]),
            "[{}] writer {w}'s values out of order: {idx:?}",
            h.name()
        );
    }
    if !coalesces {
        assert_eq!(
            puts.len(),
            2 * N,
            "[{}] an exact backend must deliver every write",
            h.name()
        );
    } else {
        // An unmarked event following one of the same writer must be its very next write.
        for p in puts.windows(2) {
            let ((_, w0, i0), (m1, w1, i1)) = (p[0], p[1]);
            assert!(
                m1 || w0 != w1 || i1 == i0 + 1,
                "[{}] unmarked event {w1}:{i1} after {w0}:{i0} hides writes",
                h.name()
            );
        }
    }
}

/// 2,000 puts to distinct keys (sent concurrently), then a rewrite of the first: the watch is
/// still alive and delivers the rewrite (and, on an exact backend, every put before it).
pub async fn watch_survives_burst(h: &Harness) {
    let watcher = h.open().await;
    if !watcher.capabilities().watch {
        return;
    }
    let coalesces = watcher.capabilities().watch_coalesces;
    let ns = h.scope("watchburst");
    let mut events = ok("watch", watcher.watch(&ns)).await;
    const N: usize = 2000;
    let writer = h.open().await;
    let started = Instant::now();
    futures::stream::iter(0..N)
        .map(|i| {
            let writer = writer.clone();
            let key = format!("{ns}k{i:04}");
            async move {
                ok(
                    "put",
                    writer.put(&key, b"1".to_vec(), PutOptions::default()),
                )
                .await;
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    let first = format!("{ns}k0000");
    let v = ok(
        "rewrite",
        writer.put(&first, b"2".to_vec(), PutOptions::default()),
    )
    .await;
    let wrote = started.elapsed();
    let mut keys = std::collections::HashSet::new();
    let mut count = 0usize;
    loop {
        match next_event(h, &mut events).await {
            WatchEvent::Put(e) if e.key == first && e.value == b"2" => {
                assert_eq!(e.version, v);
                break;
            }
            WatchEvent::Put(e) => {
                count += 1;
                keys.insert(e.key);
            }
            WatchEvent::Coalesced { .. } if coalesces => {}
            ev => panic!("[{}] unexpected event {ev:?}", h.name()),
        }
    }
    if !coalesces {
        assert_eq!(
            (count, keys.len()),
            (N, N),
            "[{}] an exact backend delivers every put before the rewrite",
            h.name()
        );
    }
    tracing::info!(backend = h.name(), ?wrote, events = count, "watch burst");
}

/// The state rebuilt from a watch's events equals `list()` after a mix of creates, updates,
/// CAS, deletes and re-creates by two clients.
pub async fn watch_state_matches_list(h: &Harness) {
    let watcher = h.open().await;
    if !watcher.capabilities().watch {
        return;
    }
    let ns = h.scope("watchstate");
    let mut events = ok("watch", watcher.watch(&ns)).await;
    let writers = [h.open().await, h.open().await];
    let runs = writers.iter().enumerate().map(|(w, store)| {
        let ns = ns.clone();
        async move {
            for round in 0..10u8 {
                for i in 0..8 {
                    let key = format!("{ns}d{}/k{i}", i % 3);
                    match (round + i as u8 + w as u8) % 5 {
                        0 | 1 => {
                            ok(
                                "put",
                                store.put(&key, vec![w as u8, round], PutOptions::default()),
                            )
                            .await;
                        }
                        2 => ok("delete", store.delete(&key)).await,
                        3 => {
                            // A CAS that may lose against the other writer: both outcomes are fine.
                            let _ = bounded(
                                "cas",
                                store.compare_and_swap(&key, Expect::Absent, Some(vec![9])),
                            )
                            .await;
                        }
                        _ => {
                            if let Some(e) = ok("get", store.get(&key, STRONG)).await {
                                let _ = bounded(
                                    "cas",
                                    store.compare_and_swap(
                                        &key,
                                        Expect::Version(e.version),
                                        Some(vec![7, round]),
                                    ),
                                )
                                .await;
                            }
                        }
                    }
                }
            }
        }
    });
    futures::future::join_all(runs).await;
    let want: BTreeMap<String, (Vec<u8>, crate::Version)> = ok("list", watcher.list(&ns, STRONG))
        .await
        .into_iter()
        .map(|e| (e.key, (e.value, e.version)))
        .collect();
    let mut state: BTreeMap<String, (Vec<u8>, crate::Version)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while state != want {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(Ok(WatchEvent::Put(e)))) => {
                state.insert(e.key, (e.value, e.version));
            }
            Ok(Some(Ok(WatchEvent::Delete { key }))) => {
                state.remove(&key);
            }
            Ok(Some(Ok(WatchEvent::Coalesced { .. }))) => {}
            Ok(Some(Err(e))) => panic!("[{}] watch error: {e}", h.name()),
            Ok(None) => panic!("[{}] watch stream ended", h.name()),
            Err(_) => panic!(
                "[{}] the state from the events never matched list():\n events: {state:?}\n list: {want:?}",
                h.name()
            ),
        }
    }
    let extra = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
    assert!(
        extra.is_err(),
        "[{}] event after the state matched list(): {extra:?}",
        h.name()
    );
}

/// The invalid keys every backend must reject with `InvalidKey`.
pub fn invalid_keys() -> Vec<String> {
    vec![
        String::new(),
        "/lead".into(),
        "trail/".into(),
        "dou//ble".into(),
        "a/../b".into(),
        "..".into(),
        ".".into(),
        "sp ace".into(),
        "nul\0byte".into(),
        "new\nline".into(),
        "tab\tkey".into(),
        "ctl\u{1}".into(),
        "ümlaut".into(),
        "per%cent".into(),
        "que?ry".into(),
        "hash#tag".into(),
        "back\\slash".into(),
        "k".repeat(crate::key::MAX_KEY_LEN + 1),
    ]
}

/// Every invalid key gives `InvalidKey` from every operation, and stored data is unchanged.
pub async fn invalid_keys_rejected(h: &Harness) {
    let store = h.open().await;
    let ns = h.scope("badkeys");
    let good = format!("{ns}good");
    ok(
        "put",
        store.put(&good, b"keep".to_vec(), PutOptions::default()),
    )
    .await;
    let before = ok("list", store.list(&ns, STRONG)).await;
    let opts = LockOptions::new().wait(Duration::from_millis(100));
    for bad in invalid_keys() {
        let k = bad.as_str();
        let show = format!("{:?}", k.chars().take(20).collect::<String>());
        expect_kind(
            &format!("get {show}"),
            bounded("get", store.get(k, STRONG)).await,
            ErrorKind::InvalidKey,
        );
        expect_kind(
            &format!("put {show}"),
            bounded("put", store.put(k, b"x".to_vec(), PutOptions::default())).await,
            ErrorKind::InvalidKey,
        );
        expect_kind(
            &format!("delete {show}"),
            bounded("delete", store.delete(k)).await,
            ErrorKind::InvalidKey,
        );
        expect_kind(
            &format!("cas {show}"),
            bounded(
                "cas",
                store.compare_and_swap(k, Expect::Absent, Some(b"x".to_vec())),
            )
            .await,
            ErrorKind::InvalidKey,
        );
        expect_kind(
            &format!("lock {show}"),
            bounded("lock", store.lock(k, &opts)).await,
            ErrorKind::InvalidKey,
        );
        expect_kind(
            &format!("try_lock {show}"),
            bounded("try_lock", store.try_lock(k, &opts)).await,
            ErrorKind::InvalidKey,
        );
        // The same key under the scope (a relative path trick) is rejected too.
        let scoped = format!("{ns}{k}");
        if crate::key::validate_key(&scoped).is_err() {
            expect_kind(
                &format!("put {ns}{show}"),
                bounded(
                    "put",
                    store.put(&scoped, b"x".to_vec(), PutOptions::default()),
                )
                .await,
                ErrorKind::InvalidKey,
            );
        }
    }
    for bad_prefix in ["/", "/x", "a//", "../", "sp ace", "nul\0"] {
        expect_kind(
            &format!("list {bad_prefix:?}"),
            bounded("list", store.list(bad_prefix, STRONG)).await,
            ErrorKind::InvalidKey,
        );
        if store.capabilities().watch {
            expect_kind(
                &format!("watch {bad_prefix:?}"),
                bounded("watch", store.watch(bad_prefix)).await.map(|_| ()),
                ErrorKind::InvalidKey,
            );
        }
    }
    let after = ok("list", store.list(&ns, STRONG)).await;
    assert_eq!(
        before,
        after,
        "[{}] invalid-key calls changed stored data",
        h.name()
    );
}

/// A value one byte over the backend's limit gives `ValueTooLarge` and changes nothing; a value
/// well under it is stored.
pub async fn oversized_value_rejected(h: &Harness) {
    let store = h.open().await;
    let caps = store.capabilities();
    let key = format!("{}big", h.scope("oversize"));
    ok(
        "put",
        store.put(&key, b"small".to_vec(), PutOptions::default()),
    )
    .await;
    if caps.max_value_size > 64 * 1024 * 1024 {
        return; // no practical limit to test
    }
    let over = vec![7u8; caps.max_value_size + 1];
    expect_kind(
        "put over the limit",
        bounded("put", store.put(&key, over.clone(), PutOptions::default())).await,
        ErrorKind::ValueTooLarge,
    );
    let version = ok("get", store.get(&key, STRONG)).await.map(|e| e.version);
    let version = version.unwrap_or_else(|| panic!("[{}] key lost by an oversized put", h.name()));
    expect_kind(
        "cas over the limit",
        bounded(
            "cas",
            store.compare_and_swap(&key, Expect::Version(version), Some(over)),
        )
        .await,
        ErrorKind::ValueTooLarge,
    );
    assert_eq!(
        value_of(&*store, &key).await,
        Some(b"small".to_vec()),
        "oversized put changed value"
    );
    let under = vec![9u8; caps.max_value_size / 2];
    ok(
        "put half the limit",
        store.put(&key, under.clone(), PutOptions::default()),
    )
    .await;
    assert_eq!(value_of(&*store, &key).await, Some(under));
}

/// A compare-and-swap write makes a key permanent, as a put without TTL does (the rule of every
/// backend with key TTLs): the key outlives the TTL it had.
pub async fn cas_makes_a_ttl_key_permanent(h: &Harness) {
    let store = h.open().await;
    let caps = store.capabilities();
    if !caps.key_ttl {
        return;
    }
    let ns = h.scope("casttl");
    let key = format!("{ns}k");
    let ttl = caps.min_ttl.max(Duration::from_secs(1));
    let v = ok(
        "put with TTL",
        store.put(&key, b"t".to_vec(), PutOptions::ttl(ttl)),
    )
    .await;
    let v2 = ok(
        "compare-and-swap",
        store.compare_and_swap(&key, Expect::Version(v), Some(b"c".to_vec())),
    )
    .await;
    assert!(v2.is_some());
    // Past the TTL, its slack and the reaping of every backend's test setup.
    tokio::time::sleep(ttl * 3 + Duration::from_secs(2)).await;
    assert_eq!(
        value_of(&*store, &key).await,
        Some(b"c".to_vec()),
        "[{}] a key written by compare-and-swap expired with its old TTL",
        h.name()
    );
}
