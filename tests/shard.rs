//! The conformance suite over a sharded store of three in-memory shards, plus sharding-specific
//! tests: routing, fan-out, capabilities, errors naming the shard, and resharding.
#![cfg(feature = "conformance")]

use std::sync::Arc;

use coordkit::conformance::Harness;
use coordkit::shard::{Shard, ShardedStore, StrategyKind};
use coordkit::{Backend, MemoryStore};

/// Three memory shards behind one ring; every "client" is a handle on the same sharded store,
/// as the memory harness hands out handles on one store.
fn sharded_memory() -> Harness {
    let shards = ["m0", "m1", "m2"]
        .into_iter()
        .map(|n| Shard::new(n, Arc::new(MemoryStore::new()) as Arc<dyn Backend>))
        .collect();
    let store = ShardedStore::new(StrategyKind::Ring, None, shards).expect("valid shards");
    Harness::new("sharded-memory", move || {
        let store = store.clone();
        async move { Ok(Arc::new(store) as Arc<dyn Backend>) }
    })
}

coordkit::conformance_tests!(sharded_memory());
coordkit::election_conformance_tests!(sharded_memory());
coordkit::recipe_conformance_tests!(sharded_memory());

mod sharding {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use async_trait::async_trait;
    use coordkit::shard::reshard::{lock_moves, migrate, plan};
    use coordkit::shard::{Shard, ShardedStore, StrategyKind};
    use coordkit::{
        connect, Backend, Capabilities, Consistency, DistLock, Entry, Error, ErrorKind, Expect,
        FencingScope, KvStore, LockGuard, LockOptions, MemoryStore, PutOptions, Version,
        WatchStream,
    };
    use futures::StreamExt;

    const STRONG: Consistency = Consistency::Strong;

    /// A memory store that records the keys written to it, can fail on demand, and can
    /// declare smaller capabilities.
    #[derive(Debug, Clone, Default)]
    struct Probe {
        inner: MemoryStore,
        writes: Arc<Mutex<Vec<String>>>,
        /// Fail every call with `Unavailable`.
        down: Arc<std::sync::atomic::AtomicBool>,
        /// Fail the n-th compare-and-swap from now (1-based); 0: never.
        fail_cas_at: Arc<AtomicUsize>,
        max_value: Option<usize>,
        no_ttl: bool,
        /// The watch stream reports a gap after this many events.
        gap_after: Option<usize>,
        /// The next compare-and-swap first deletes its key (a concurrent delete just before).
        delete_before_cas: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Probe {
        fn check(&self) -> coordkit::Result<()> {
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    "memory",
                    "probe is down",
                ));
            }
            Ok(())
        }
        fn wrote(&self, key: &str) {
            self.writes.lock().unwrap().push(key.to_string());
        }
        fn written(&self) -> Vec<String> {
            self.writes.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl KvStore for Probe {
        async fn get(&self, key: &str, c: Consistency) -> coordkit::Result<Option<Entry>> {
            self.check()?;
            self.inner.get(key, c).await
        }
        async fn put(&self, key: &str, v: Vec<u8>, o: PutOptions) -> coordkit::Result<Version> {
            self.check()?;
            self.wrote(key);
            self.inner.put(key, v, o).await
        }
        async fn delete(&self, key: &str) -> coordkit::Result<()> {
            self.check()?;
            self.wrote(key);
            self.inner.delete(key).await
        }
        async fn compare_and_swap(
            &self,
            key: &str,
            expect: Expect,
            new: Option<Vec<u8>>,
        ) -> coordkit::Result<Option<Version>> {
            self.check()?;
            let at = self.fail_cas_at.load(Ordering::SeqCst);
            if at > 0 {
                self.fail_cas_at.store(at - 1, Ordering::SeqCst);
                if at == 1 {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        "memory",
                        "injected crash",
                    ));
                }
            }
            if self.delete_before_cas.swap(false, Ordering::SeqCst) {
                self.inner.delete(key).await?;
            }
            self.wrote(key);
            self.inner.compare_and_swap(key, expect, new).await
        }
        async fn list(&self, prefix: &str, c: Consistency) -> coordkit::Result<Vec<Entry>> {
            self.check()?;
            self.inner.list(prefix, c).await
        }
        async fn watch(&self, prefix: &str) -> coordkit::Result<WatchStream> {
            self.check()?;
            let stream = self.inner.watch(prefix).await?;
            Ok(match self.gap_after {
                None => stream,
                Some(n) => Box::pin(stream.take(n).chain(futures::stream::once(async {
                    Err(Error::new(ErrorKind::WatchGap, "memory", "injected gap"))
                }))),
            })
        }
        fn capabilities(&self) -> Capabilities {
            let mut caps = self.inner.capabilities();
            if let Some(m) = self.max_value {
                caps.max_value_size = m;
            }
            if self.no_ttl {
                caps.key_ttl = false;
                caps.min_ttl = Duration::from_secs(5);
            }
            caps
        }
    }

    #[async_trait]
    impl DistLock for Probe {
        async fn lock(&self, name: &str, o: &LockOptions) -> coordkit::Result<LockGuard> {
            self.check()?;
            self.inner.lock(name, o).await
        }
        async fn try_lock(
            &self,
            name: &str,
            o: &LockOptions,
        ) -> coordkit::Result<Option<LockGuard>> {
            self.check()?;
            self.inner.try_lock(name, o).await
        }
    }
    coordkit::election_via_lock!(Probe);
    coordkit::recipes_via_lock!(Probe);

    fn store(kind: StrategyKind, probes: &[(&str, Probe)]) -> ShardedStore {
        let shards = probes
            .iter()
            .map(|(n, p)| Shard::new(*n, Arc::new(p.clone()) as Arc<dyn Backend>))
            .collect();
        ShardedStore::new(kind, None, shards).unwrap()
    }

    fn probes(names: &[&'static str]) -> Vec<(&'static str, Probe)> {
        names.iter().map(|n| (*n, Probe::default())).collect()
    }

    #[tokio::test]
    async fn keys_and_locks_live_on_their_owner_only() {
        let ps = probes(&["a", "b", "c"]);
        let s = store(StrategyKind::Rendezvous, &ps);
        let mut per_shard = BTreeMap::new();
        for i in 0..300 {
            let key = format!("route/{i}");
            s.put(&key, vec![i as u8], PutOptions::default())
                .await
                .unwrap();
            let owner = s.shard_index(&key);
            *per_shard.entry(owner).or_insert(0) += 1;
            for (j, (_, p)) in ps.iter().enumerate() {
                let there = p.inner.get(&key, STRONG).await.unwrap();
                assert_eq!(there.is_some(), j == owner, "{key} on shard {j}");
            }
        }
        assert_eq!(
            per_shard.len(),
            3,
            "300 keys all landed on fewer than 3 shards"
        );
        // A lock taken through the store is held on its owner shard and nowhere else.
        let name = "jobs/compact";
        let owner = s.shard_index(name);
        let g = s.lock(name, &LockOptions::new()).await.unwrap();
        for (j, (_, p)) in ps.iter().enumerate() {
            let other = p.inner.try_lock(name, &LockOptions::new()).await.unwrap();
            assert_eq!(other.is_none(), j == owner, "lock on shard {j}");
        }
        g.release().await.unwrap();
        assert!(s
            .try_lock(name, &LockOptions::new())
            .await
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn list_merges_sorted_and_hides_strays() {
        let ps = probes(&["a", "b", "c"]);
        let s = store(StrategyKind::Ring, &ps);
        let mut want = Vec::new();
        for i in 0..60 {
            let key = format!("l/{i:03}");
            s.put(&key, b"v".to_vec(), PutOptions::default())
                .await
                .unwrap();
            want.push(key);
        }
        want.sort();
        // A stray copy of a key on a shard that does not own it (as an unfinished reshard
        // leaves) is not listed, and an orphan key that only lives on a non-owner is not either.
        let key = &want[7];
        let stray = (s.shard_index(key) + 1) % 3;
        ps[stray]
            .1
            .inner
            .put(key, b"old".to_vec(), PutOptions::default())
            .await
            .unwrap();
        let orphan = (0..)
            .map(|i| format!("l/orphan{i}"))
            .find(|k| s.shard_index(k) != 0)
            .unwrap();
        ps[0]
            .1
            .inner
            .put(&orphan, b"x".to_vec(), PutOptions::default())
            .await
            .unwrap();
        let got: Vec<String> = s
            .list("l/", STRONG)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(got, want);
        let listed = s.list("l/", STRONG).await.unwrap();
        assert_eq!(
            listed[7].value,
            b"v".to_vec(),
            "list returned the stray copy"
        );
        assert_eq!(s.get(&orphan, STRONG).await.unwrap(), None);
    }

    #[tokio::test]
    async fn errors_name_the_shard_and_keep_their_kind() {
        let ps = probes(&["east", "west"]);
        let s = store(StrategyKind::Ring, &ps);
        ps[1]
            .1
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let key = (0..)
            .map(|i| format!("e/{i}"))
            .find(|k| s.shard_index(k) == 1)
            .unwrap();
        let fine = (0..)
            .map(|i| format!("e/{i}"))
            .find(|k| s.shard_index(k) == 0)
            .unwrap();
        let e = s
            .put(&key, b"x".to_vec(), PutOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.to_string().contains("shard \"west\""), "{e}");
        let e = s.get(&key, STRONG).await.unwrap_err();
        assert!(e.message().starts_with("shard \"west\""), "{e}");
        let e = s.list("e/", STRONG).await.unwrap_err();
        assert!(
            e.message().contains("west") && e.is(ErrorKind::Unavailable),
            "{e}"
        );
        let e = s.watch("e/").await.err().expect("watch with a shard down");
        assert!(e.message().contains("west"), "{e}");
        let e = s.lock(&key, &LockOptions::new()).await.unwrap_err();
        assert!(e.message().contains("west"), "{e}");
        // The other shard keeps working.
        s.put(&fine, b"ok".to_vec(), PutOptions::default())
            .await
            .unwrap();
        // Invalid input is rejected before any shard is asked.
        let e = s
            .put("bad key", b"x".to_vec(), PutOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidKey);
        assert!(ps
            .iter()
            .all(|(_, p)| !p.written().contains(&"bad key".to_string())));
    }

    #[tokio::test]
    async fn capabilities_are_the_most_restrictive_and_enforced() {
        let small = Probe {
            max_value: Some(100),
            no_ttl: true,
            ..Probe::default()
        };
        let ps = vec![("big", Probe::default()), ("small", small)];
        let s = store(StrategyKind::Ring, &ps);
        let caps = s.capabilities();
        assert_eq!(caps.backend, "sharded");
        assert_eq!(caps.max_value_size, 100);
        assert!(!caps.key_ttl);
        assert_eq!(caps.min_ttl, Duration::from_secs(5));
        assert_eq!(caps.fencing_scope, FencingScope::PerLock);
        // A key owned by the shard with the larger limit still gets the smaller one.
        let key = (0..)
            .map(|i| format!("c/{i}"))
            .find(|k| s.shard_index(k) == 0)
            .unwrap();
        let e = s
            .put(&key, vec![0; 101], PutOptions::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueTooLarge);
        let e = s
            .compare_and_swap(&key, Expect::Absent, Some(vec![0; 101]))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueTooLarge);
        let e = s
            .put(
                &key,
                b"x".to_vec(),
                PutOptions::ttl(Duration::from_secs(60)),
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert_eq!(
            s.get(&key, STRONG).await.unwrap(),
            None,
            "a refused write changed data"
        );
        // One shard alone keeps the backend's fencing scope.
        let one = store(StrategyKind::Ring, &probes(&["solo"]));
        assert_eq!(one.capabilities().fencing_scope, FencingScope::Cluster);
    }

    #[tokio::test]
    async fn watch_merges_shards_and_ends_on_a_shard_error() {
        let ps = probes(&["a", "b", "c"]);
        let s = store(StrategyKind::Jump, &ps);
        let mut w = s.watch("w/").await.unwrap();
        let keys: Vec<String> = (0..30).map(|i| format!("w/{i}")).collect();
        for k in &keys {
            s.put(k, b"1".to_vec(), PutOptions::default())
                .await
                .unwrap();
        }
        let mut seen = Vec::new();
        for _ in 0..keys.len() {
            let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .unwrap();
            seen.push(ev.unwrap().unwrap().key().to_string());
        }
        assert_eq!(
            seen, keys,
            "writes through one handle arrive in the order made"
        );
        let shards_used: HashSet<usize> = keys.iter().map(|k| s.shard_index(k)).collect();
        assert_eq!(shards_used.len(), 3);
        drop(w);
        // Dropping the merged stream cancels the shard watches: nothing is left delivering.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for k in &keys {
            s.delete(k).await.unwrap();
        }

        // A gap on one shard ends the merged stream with that error, naming the shard.
        let gappy = Probe {
            gap_after: Some(1),
            ..Probe::default()
        };
        let ps = vec![("a", Probe::default()), ("b", gappy)];
        let s = store(StrategyKind::Ring, &ps);
        let mut w = s.watch("g/").await.unwrap();
        let on_b: Vec<String> = (0..)
            .map(|i| format!("g/{i}"))
            .filter(|k| s.shard_index(k) == 1)
            .take(2)
            .collect();
        for k in &on_b {
            s.put(k, b"1".to_vec(), PutOptions::default())
                .await
                .unwrap();
        }
        let first = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap();
        assert_eq!(first.unwrap().unwrap().key(), on_b[0]);
        let second = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap();
        let e = second.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WatchGap);
        assert!(e.message().contains("shard \"b\""), "{e}");
        let end = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap();
        assert!(end.is_none(), "the merged stream went on after a gap");
    }

    /// Two separate sharded stores over the same clusters (same identities): changes made
    /// through one reach a watch of the other in the order they were made, across shards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn watch_order_across_handles_of_one_process() {
        let mems: Vec<MemoryStore> = (0..3).map(|_| MemoryStore::new()).collect();
        let build = || {
            let shards = mems
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    Shard::new(format!("m{i}"), Arc::new(m.clone()) as Arc<dyn Backend>)
                        .with_identity(format!("memory-{i}"))
                })
                .collect();
            ShardedStore::new(StrategyKind::Ring, None, shards).unwrap()
        };
        let (watcher, writer) = (build(), build());
        let mut w = watcher.watch("x/").await.unwrap();
        let mut want = Vec::new();
        for round in 0..3 {
            for i in 0..20 {
                let key = format!("x/{i}");
                if round < 2 {
                    writer
                        .put(&key, vec![round], PutOptions::default())
                        .await
                        .unwrap();
                    want.push(format!("put {key} {round}"));
                } else {
                    writer.delete(&key).await.unwrap();
                    want.push(format!("delete {key}"));
                }
            }
        }
        let mut got = Vec::new();
        while got.len() < want.len() {
            let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .unwrap();
            got.push(match ev.unwrap().unwrap() {
                coordkit::WatchEvent::Put(e) => format!("put {} {}", e.key, e.value[0]),
                coordkit::WatchEvent::Delete { key } => format!("delete {key}"),
                // Memory shards are exact: a mark would be a failure.
                coordkit::WatchEvent::Coalesced { key } => format!("coalesced {key}"),
            });
        }
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn connect_by_url() {
        let s = connect("sharded+ring://?shard=memory://a&shard=memory://b&shard=memory://c")
            .await
            .unwrap();
        assert_eq!(s.capabilities().backend, "sharded");
        s.put("u/1", b"x".to_vec(), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(s.list("u/", STRONG).await.unwrap().len(), 1);
        let s2 = connect("sharded://?strategy=jump&shard=memory://a")
            .await
            .unwrap();
        assert!(format!("{s2:?}").contains("jump"));
        for bad in [
            "sharded+ring://",
            "sharded+ring://?shard=memory://a&shard=memory://a",
            "sharded+ring://?shard=memory://a&weights=0",
            "sharded+nosuch://?shard=memory://a",
            "sharded+ring://?shard=nosuch://x",
            "sharded+jump://?shard=memory://a&weights=2",
        ] {
            let e = connect(bad).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}: {e}");
        }
    }

    /// Resharding from 3 to 4 shards: the plan names exactly the keys whose owner changes, a
    /// migration interrupted half-way (an injected failure between copy and delete) resumes,
    /// and afterwards no key is lost or changed and no other key was touched.
    #[tokio::test]
    async fn reshard_moves_exactly_the_keys_whose_owner_changed() {
        const KEYS: usize = 2000;
        let old_ps = probes(&["s0", "s1", "s2"]);
        let mut new_ps = old_ps.clone();
        new_ps.push(("s3", Probe::default()));
        let old = store(StrategyKind::Ring, &old_ps);
        let new = store(StrategyKind::Ring, &new_ps);
        let mut original = BTreeMap::new();
        for i in 0..KEYS {
            let key = format!("data/{i:05}");
            let value = format!("value-{i}").into_bytes();
            let v = old
                .put(&key, value.clone(), PutOptions::default())
                .await
                .unwrap();
            original.insert(key, (value, v));
        }
        for (_, p) in &new_ps {
            p.writes.lock().unwrap().clear();
        }
        let should_move: BTreeMap<String, (String, String)> = original
            .keys()
            .filter(|k| old.shard_index(k) != new.shard_index(k))
            .map(|k| {
                let from = old.shard_for(k).name().to_string();
                (k.clone(), (from, new.shard_for(k).name().to_string()))
            })
            .collect();
        let p = plan(&old, &new).await.unwrap();
        assert_eq!(p.keys_scanned, KEYS);
        let planned: BTreeMap<String, (String, String)> = p
            .moves
            .iter()
            .map(|m| (m.key.clone(), (m.from.clone(), m.to.clone())))
            .collect();
        assert_eq!(
            planned, should_move,
            "the plan differs from the owner change"
        );
        // A ring only moves keys to the new shard, about 1/4 of them.
        assert!(p.moves.iter().all(|m| m.to == "s3"));
        let frac = p.moved_fraction();
        assert!((0.2..0.3).contains(&frac), "moved {frac}");

        // Crash half-way: the 2·k-th CAS on the old shards is a delete; fail one of them, so
        // one key is copied but not yet deleted.
        let victim = &old_ps[0].1;
        let victim_moves = p.moves.iter().filter(|m| m.from == "s0").count();
        assert!(victim_moves > 10);
        victim.fail_cas_at.store(victim_moves / 2, Ordering::SeqCst);
        let e = migrate(&old, &new, &p).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.message().contains("shard \"s0\""), "{e}");
        victim.fail_cas_at.store(0, Ordering::SeqCst);
        // Mid-way: some keys moved, and at least one key is on both shards.
        let on_new = new_ps[3].1.inner.list("", STRONG).await.unwrap().len();
        assert!(
            on_new > 0 && on_new < p.moves.len(),
            "{on_new} of {}",
            p.moves.len()
        );

        // Resume with a fresh plan: only the remaining keys, including the half-moved one.
        let rest = plan(&old, &new).await.unwrap();
        assert!(!rest.moves.is_empty() && rest.moves.len() < p.moves.len());
        let report = migrate(&old, &new, &rest).await.unwrap();
        assert!(report.conflicts.is_empty(), "{report:?}");
        assert_eq!(report.moved, rest.moves.len());
        // Running the original plan again is a no-op.
        let again = migrate(&old, &new, &p).await.unwrap();
        assert_eq!((again.moved, again.already_done), (0, p.moves.len()));
        assert!(plan(&old, &new).await.unwrap().moves.is_empty());

        // Nothing lost, nothing changed, every key exactly once, on its new owner.
        let mut stored = 0;
        for (_, probe) in &new_ps {
            stored += probe.inner.list("", STRONG).await.unwrap().len();
        }
        assert_eq!(stored, KEYS, "keys duplicated or lost across shards");
        for (key, (value, version)) in &original {
            let got = new.get(key, STRONG).await.unwrap().expect("key lost");
            assert_eq!(&got.value, value, "{key} changed");
            if !should_move.contains_key(key) {
                assert_eq!(
                    got.version, *version,
                    "{key} was rewritten although it did not move"
                );
            }
        }
        // Only moved keys were written, on any shard.
        let touched: HashSet<String> = new_ps.iter().flat_map(|(_, p)| p.written()).collect();
        let moved: HashSet<String> = should_move.keys().cloned().collect();
        assert_eq!(touched, moved, "keys outside the plan were written");
    }

    #[tokio::test]
    async fn migrate_keeps_a_newer_value_on_the_new_owner() {
        let old_ps = probes(&["s0", "s1"]);
        let mut new_ps = old_ps.clone();
        new_ps.push(("s2", Probe::default()));
        let old = store(StrategyKind::Rendezvous, &old_ps);
        let new = store(StrategyKind::Rendezvous, &new_ps);
        let key = (0..)
            .map(|i| format!("k/{i}"))
            .find(|k| new.shard_index(k) == 2)
            .unwrap();
        old.put(&key, b"old".to_vec(), PutOptions::default())
            .await
            .unwrap();
        // Written through the new layout before the migration reached it.
        new.put(&key, b"new".to_vec(), PutOptions::default())
            .await
            .unwrap();
        let p = plan(&old, &new).await.unwrap();
        let report = migrate(&old, &new, &p).await.unwrap();
        assert_eq!(report.conflicts, vec![key.clone()]);
        assert_eq!(new.get(&key, STRONG).await.unwrap().unwrap().value, b"new");
        assert_eq!(old.get(&key, STRONG).await.unwrap().unwrap().value, b"old");
    }

    /// Old layout 2 shards, new layout 3; a key that moves to the new shard.
    async fn pending_move() -> (
        Vec<(&'static str, Probe)>,
        ShardedStore,
        ShardedStore,
        String,
    ) {
        let old_ps = probes(&["s0", "s1"]);
        let mut new_ps = old_ps.clone();
        new_ps.push(("s2", Probe::default()));
        let old = store(StrategyKind::Rendezvous, &old_ps);
        let new = store(StrategyKind::Rendezvous, &new_ps);
        let key = (0..)
            .map(|i| format!("d/{i}"))
            .find(|k| new.shard_index(k) == 2)
            .unwrap();
        old.put(&key, b"old".to_vec(), PutOptions::default())
            .await
            .unwrap();
        (new_ps, old, new, key)
    }

    async fn everywhere(ps: &[(&str, Probe)], key: &str) -> Vec<String> {
        let mut on = Vec::new();
        for (n, p) in ps {
            if p.inner.get(key, STRONG).await.unwrap().is_some() {
                on.push(n.to_string());
            }
        }
        on
    }

    /// The documented procedure: writers use the new layout, then `migrate`. A delete made
    /// before the key moved must stay a delete (a plain new-layout delete would be a no-op on
    /// the new owner, and `migrate` would copy the old value back).
    #[tokio::test]
    async fn delete_before_the_move_is_not_undone_by_migrate() {
        let (ps, old, new, key) = pending_move().await;
        let writer = new.migrating_from(&old);
        writer.delete(&key).await.unwrap();
        let p = plan(&old, &new).await.unwrap();
        migrate(&old, &new, &p).await.unwrap();
        assert_eq!(writer.get(&key, STRONG).await.unwrap(), None);
        assert_eq!(new.get(&key, STRONG).await.unwrap(), None);
        assert!(
            everywhere(&ps, &key).await.is_empty(),
            "the deleted key came back"
        );
    }

    /// A crash between copy and delete leaves the key on both shards; a delete through the new
    /// layout then, and a resumed `migrate`, must not bring it back. Also a delete by
    /// compare-and-swap.
    #[tokio::test]
    async fn delete_after_a_crash_between_copy_and_delete_is_not_undone() {
        for by_cas in [false, true] {
            let (ps, old, new, key) = pending_move().await;
            let from = ps
                .iter()
                .find(|(n, _)| *n == old.shard_for(&key).name())
                .unwrap();
            // The first CAS on the old owner is the migration's delete: fail it.
            from.1.fail_cas_at.store(1, Ordering::SeqCst);
            let p = plan(&old, &new).await.unwrap();
            migrate(&old, &new, &p).await.unwrap_err();
            from.1.fail_cas_at.store(0, Ordering::SeqCst);
            assert_eq!(
                everywhere(&ps, &key).await.len(),
                2,
                "copied and not deleted"
            );
            let writer = new.migrating_from(&old);
            if by_cas {
                let v = writer.get(&key, STRONG).await.unwrap().unwrap().version;
                writer
                    .compare_and_swap(&key, Expect::Version(v), None)
                    .await
                    .unwrap();
            } else {
                writer.delete(&key).await.unwrap();
            }
            let p = plan(&old, &new).await.unwrap();
            migrate(&old, &new, &p).await.unwrap();
            assert_eq!(
                new.get(&key, STRONG).await.unwrap(),
                None,
                "by_cas={by_cas}"
            );
            assert!(
                everywhere(&ps, &key).await.is_empty(),
                "the deleted key came back (by_cas={by_cas})"
            );
        }
    }

    /// A delete (through the new layout, reaching both owners) that lands while `migrate` is
    /// between its copy and its delete: the delete wins and `migrate` takes its copy back.
    #[tokio::test]
    async fn delete_during_the_copy_wins() {
        let (ps, old, new, key) = pending_move().await;
        let from = ps
            .iter()
            .find(|(n, _)| *n == old.shard_for(&key).name())
            .unwrap();
        from.1.delete_before_cas.store(true, Ordering::SeqCst);
        let p = plan(&old, &new).await.unwrap();
        let report = migrate(&old, &new, &p).await.unwrap();
        assert_eq!((report.moved, report.already_done), (0, 1), "{report:?}");
        assert!(
            everywhere(&ps, &key).await.is_empty(),
            "the deleted key came back"
        );
    }

    #[tokio::test]
    async fn lock_moves_names_locks_that_change_shard() {
        let old_ps = probes(&["s0", "s1"]);
        let mut new_ps = old_ps.clone();
        new_ps.push(("s2", Probe::default()));
        let old = store(StrategyKind::Ring, &old_ps);
        let new = store(StrategyKind::Ring, &new_ps);
        let names: Vec<String> = (0..200).map(|i| format!("lock/{i}")).collect();
        let moves = lock_moves(&old, &new, names.iter().map(String::as_str));
        assert!(!moves.is_empty() && moves.len() < 120);
        // A moved lock held through the old layout does not exclude the new layout: the
        // documented reason to drain locks before switching.
        let (name, _, _) = &moves[0];
        let held = old.lock(name, &LockOptions::new()).await.unwrap();
        let other = new.try_lock(name, &LockOptions::new()).await.unwrap();
        assert!(other.is_some());
        held.release().await.unwrap();
    }
}
