//! The conformance suite over a sharded store of one real etcd server and one real ZooKeeper
//! server, started by the test: keys and locks spread over two different coordinators.
#![cfg(all(feature = "etcd", feature = "zookeeper", feature = "conformance"))]

mod support;

use std::sync::Arc;

use coordkit::conformance::Harness;
use coordkit::shard::{ShardConfig, ShardedConfig, StrategyKind};
use coordkit::Backend;

/// Every "client" is a new sharded store with its own connections to both servers.
fn sharded_mixed() -> Harness {
    let config = ShardedConfig::new(
        StrategyKind::Rendezvous,
        vec![
            ShardConfig::new(support::etcd::shared().url()).named("etcd"),
            ShardConfig::new(support::zookeeper::shared().url()).named("zookeeper"),
        ],
    );
    Harness::new("sharded-etcd-zookeeper", move || {
        let config = config.clone();
        async move { Ok(Arc::new(config.connect().await?) as Arc<dyn Backend>) }
    })
}

coordkit::conformance_tests!(sharded_mixed());
