//! The conformance suite over a sharded store of two real single-node etcd servers (each its
//! own cluster), started by the test.
#![cfg(all(feature = "etcd", feature = "conformance"))]

mod support;

use std::sync::{Arc, OnceLock};

use coordkit::conformance::Harness;
use coordkit::shard::{ShardConfig, ShardedConfig, StrategyKind};
use coordkit::Backend;
use support::etcd::{shared, EtcdCluster};

/// A second single-node etcd, separate from the shared one.
fn second() -> &'static EtcdCluster {
    static SECOND: OnceLock<EtcdCluster> = OnceLock::new();
    SECOND.get_or_init(|| EtcdCluster::start(1))
}

/// Every "client" is a new sharded store with its own connections to both servers.
fn sharded_etcd() -> Harness {
    let config = ShardedConfig::new(
        StrategyKind::Ring,
        vec![
            ShardConfig::new(shared().url()).named("etcd-a"),
            ShardConfig::new(second().url()).named("etcd-b"),
        ],
    );
    Harness::new("sharded-etcd", move || {
        let config = config.clone();
        async move { Ok(Arc::new(config.connect().await?) as Arc<dyn Backend>) }
    })
}

coordkit::conformance_tests!(sharded_etcd());
