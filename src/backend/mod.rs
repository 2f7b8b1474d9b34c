//! The backends: one module (or folder) each, and [`REGISTRY`], the one list of them.
//!
//! | backend | module | feature | URL scheme |
//! |---|---|---|---|
//! | in-memory | [`memory`] | always built | `memory://` |
//! | etcd v3 | `etcd` | `etcd` | `etcd://host:port[,host:port…]` |
//! | ZooKeeper | `zookeeper` | `zookeeper` (default) | `zk://host:port[,host:port…][/chroot]` |
//! | Consul | `consul` | `consul` (default) | `consul://host:port`, `consul+https://host:port` |
//! | SQLite | `sqlite` | `sqlite` (default) | `sqlite:///abs/path/to.db` |
//! | a shared directory | `file` | `file` (default) | `file:///abs/dir` |
//! | PostgreSQL | `postgres` | `postgres` (default) | `postgres://user:password@host:port/db` |

pub mod memory;

#[cfg(feature = "consul")]
pub mod consul;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "file")]
pub mod file;
#[cfg(any(feature = "sqlite", feature = "file"))]
mod fs_events;
#[cfg(any(feature = "sqlite", feature = "file"))]
mod host_clock;
#[cfg(any(feature = "sqlite", feature = "file"))]
mod lease_lock;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "zookeeper")]
pub mod zookeeper;

crate::config::registry::registry! {
    memory: "memory", schemes ["memory"], table "memory", feature always,
        memory::MemoryConfig;
    etcd: "etcd", schemes ["etcd"], table "etcd", feature "etcd",
        etcd::EtcdConfig;
    zookeeper: "zookeeper", schemes ["zk"], table "zookeeper", feature "zookeeper",
        zookeeper::ZkConfig;
    consul: "consul", schemes ["consul", "consul+https"], table "consul", feature "consul",
        consul::ConsulConfig;
    sqlite: "sqlite", schemes ["sqlite"], table "sqlite", feature "sqlite",
        sqlite::SqliteConfig;
    file: "file", schemes ["file"], table "file", feature "file",
        file::FileConfig;
    postgres: "postgres", schemes ["postgres", "postgresql"], table "postgres", feature "postgres",
        postgres::PostgresConfig;
    sharded: "sharded", schemes ["sharded", "sharded+<strategy>"], table "sharded",
        feature always, crate::shard::ShardedConfig;
}
