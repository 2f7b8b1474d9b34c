//! A sharded key-value store from a TOML configuration.
//!
//! ```text
//! cargo run --example sharded_kv                 # three in-memory shards
//! cargo run --example sharded_kv -- shards.toml  # your own configuration
//! ```
//!
//! The configuration is a [`ShardedConfig`]: a strategy and a list of shards, each a backend
//! URL with an optional name and weight.

use coordkit::shard::{ShardedConfig, ShardedStore};
use coordkit::{Consistency, DistLockExt, KvStore, LockOptions, PutOptions};

const DEFAULT_CONFIG: &str = r#"
strategy = "ring"
vnodes = 1024

[[shards]]
name = "alpha"
url = "memory://alpha"

[[shards]]
name = "beta"
url = "memory://beta"
weight = 2

[[shards]]
name = "gamma"
url = "memory://gamma"
"#;

#[tokio::main]
async fn main() -> coordkit::Result<()> {
    let text = match std::env::args().nth(1) {
        Some(path) => std::fs::read_to_string(&path)
            .map_err(|e| coordkit::Error::config(format!("cannot read {path}: {e}")))?,
        None => DEFAULT_CONFIG.to_string(),
    };
    let config = ShardedConfig::from_toml(&text)?;
    println!("configuration: {config:?}");
    let store: ShardedStore = config.connect().await?;

    // Writes go to the shard each key hashes to.
    for i in 0..12 {
        let key = format!("users/{i:02}");
        store
            .put(
                &key,
                format!("user number {i}").into_bytes(),
                PutOptions::default(),
            )
            .await?;
        println!("{key} -> shard {}", store.shard_for(&key).name());
    }

    // A list fans out to every shard and comes back merged and sorted.
    let users = store.list("users/", Consistency::Strong).await?;
    println!(
        "list users/: {} keys, first {:?}",
        users.len(),
        users.first().map(|e| &e.key)
    );
    for shard in store.shards() {
        let here = shard
            .backend()
            .list("users/", Consistency::Strong)
            .await?
            .len();
        println!(
            "  shard {:<6} (weight {}) holds {here}",
            shard.name(),
            shard.weight()
        );
    }

    // Compare-and-swap stays on the key's shard.
    let entry = store.get("users/03", Consistency::Strong).await?;
    if let Some(entry) = entry {
        store
            .compare_and_swap(
                "users/03",
                coordkit::Expect::Version(entry.version),
                Some(b"renamed".to_vec()),
            )
            .await?;
    }

    // So does a lock, with its fencing token.
    let token = store
        .run_locked("jobs/rebalance", &LockOptions::new(), |ctx| async move {
            ctx.token()
        })
        .await?;
    println!(
        "ran a job under lock jobs/rebalance on shard {} with fencing token {token}",
        store.shard_for("jobs/rebalance").name()
    );
    Ok(())
}
