//! Client-side hash sharding: one [`KvStore`](crate::KvStore) + [`DistLock`](crate::DistLock)
//! over several backend clusters.
//!
//! - [`strategy`]: how a key is mapped to a shard ([`Modulo`], [`Ring`], [`Rendezvous`],
//!   [`Jump`]), deterministic across processes, platforms and releases.
//! - [`ShardedStore`]: routes every key and lock name to one shard; `list` and `watch` fan out.
//! - [`reshard`]: [`plan`](reshard::plan) and [`migrate`](reshard::migrate) when the shard list
//!   changes, and what happens to locks.
//! - [`ShardedConfig`]: from TOML, from a `sharded+ring://?shard=…` URL through
//!   [`crate::connect`], or from code.
//!
//! ```
//! use coordkit::shard::{ShardConfig, ShardedConfig, StrategyKind};
//! use coordkit::{Consistency, KvStore, PutOptions};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> coordkit::Result<()> {
//! let config = ShardedConfig::new(
//!     StrategyKind::Ring,
//!     vec![ShardConfig::new("memory://a"), ShardConfig::new("memory://b")],
//! );
//! let store = config.connect().await?;
//! store.put("users/42", b"ada".to_vec(), PutOptions::default()).await?;
//! println!("users/42 lives on {}", store.shard_for("users/42").name());
//! assert_eq!(store.list("users/", Consistency::Strong).await?.len(), 1);
//! # Ok(())
//! # }
//! ```
#![doc = include_str!("docs.md")]

pub mod config;
pub mod reshard;
pub mod store;
pub mod strategy;

pub use config::{ShardConfig, ShardedConfig};
pub use store::{Shard, ShardedStore};
pub use strategy::{
    key_hash, HashStrategy, Jump, Modulo, Rendezvous, Ring, ShardSpec, StrategyKind, DEFAULT_VNODES,
};
