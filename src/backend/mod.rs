//! The backends: one module (or folder) each.
//!
//! | backend | module | feature | URL scheme |
//! |---|---|---|---|
//! | in-memory | [`memory`] | always built | `memory://` |
//! | etcd v3 | `etcd` | `etcd` | `etcd://host:port[,host:port…]` |
//! | ZooKeeper | `zookeeper` | `zookeeper` (default) | `zk://host:port[,host:port…][/chroot]` |
//! | Consul | `consul` | `consul` (default) | `consul://host:port`, `consul+https://host:port` |

pub mod memory;

#[cfg(feature = "consul")]
pub mod consul;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "zookeeper")]
pub mod zookeeper;
