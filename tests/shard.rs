//! The conformance suite over a sharded store of three in-memory shards, plus sharding-specific
//! tests: routing, fan-out, capabilities, errors naming the shard, and resharding.

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
