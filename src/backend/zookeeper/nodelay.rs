//! `TCP_NODELAY` on the connections of the ZooKeeper sessions.
//!
//! `zookeeper-client` 0.11 opens its connections with Nagle's algorithm on and has no setting to
//! turn it off. With Nagle on, a request written while an earlier one on the same connection is
//! still unanswered is held back by the kernel until the server's ACK comes, which arrives with
//! the earlier answer: a `sync` and the read sent right after it (a strong get, see `kv.rs`)
//! then take two round trips instead of one. ZooKeeper's own Java client sets `TCP_NODELAY` on
//! every connection it opens (`ClientCnxnSocketNIO`, `ClientCnxnSocketNetty`).
//!
//! So coordkit sets it from outside the client: after a session connects, and again whenever it
//! reconnects, it looks through the process's open descriptors (`/proc/self/fd`) for TCP
//! sockets whose peer is one of the ensemble's servers, and sets the option on a duplicate of
//! each one taken with `pidfd_getfd` (a socket option belongs to the socket, which both
//! descriptors share; the duplicate is closed at once). Other connections of the process to the
//! same servers, such as another ZooKeeper client's, get the option too, which changes their
//! timing only.
//!
//! Where this is not possible (not Linux, Linux before 5.6, `/proc` not mounted, a seccomp
//! filter refusing `pidfd_getfd`), the connections keep Nagle's algorithm: pipelined requests
//! wait as described, results are the same. The first failure is logged once at `debug`.

use std::net::SocketAddr;

use zookeeper_client as zk;

use super::error::NAME;

/// Keeps `TCP_NODELAY` on `client`'s connection: sets it now and after every reconnect, until
/// the session ends. `servers` are the ensemble's `host:port` strings.
pub(crate) fn keep(client: &zk::Client, servers: &[String]) {
    let mut states = client.state_watcher();
    let servers = servers.to_vec();
    tokio::spawn(async move {
        let peers = resolve(&servers).await;
        set_on_connections_to(&peers);
        loop {
            // A terminal state is always delivered (and ends the loop); after it, `changed`
            // would wait forever.
            match states.changed().await {
                zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                    set_on_connections_to(&peers);
                }
                s if s.is_terminated() => return,
                _ => {}
            }
        }
    });
}

async fn resolve(servers: &[String]) -> Vec<SocketAddr> {
    let mut peers = Vec::new();
    for s in servers {
        if let Ok(addrs) = tokio::net::lookup_host(s.as_str()).await {
            peers.extend(addrs);
        }
    }
    peers
}

/// Sets `TCP_NODELAY` on every TCP socket of the process connected to one of `peers`; how many
/// were set.
#[cfg(target_os = "linux")]
pub(crate) fn set_on_connections_to(peers: &[SocketAddr]) -> usize {
    use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};

    if peers.is_empty() {
        return 0;
    }
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        static LOGGED: std::sync::Once = std::sync::Once::new();
        LOGGED.call_once(|| {
            tracing::debug!(backend = NAME, error = %e, "cannot set TCP_NODELAY ({what}); connections keep Nagle's algorithm")
        });
        0
    };
    let pidfd = match pidfd_open(getpid(), PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(e) => return fail("pidfd_open", &e),
    };
    let entries = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d,
        Err(e) => return fail("/proc/self/fd", &e),
    };
    let mut set = 0;
    for entry in entries.flatten() {
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|target| {
            target
                .as_os_str()
                .as_encoded_bytes()
                .starts_with(b"socket:")
        });
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // The descriptor may have been closed (or reused) since it was listed: then the
        // duplicate fails, or is another socket and its peer does not match.
        let dup = match pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()) {
            Ok(dup) => dup,
            Err(rustix::io::Errno::BADF) => continue,
            Err(e) => return fail("pidfd_getfd", &e),
        };
        let peer = rustix::net::getpeername(&dup)
            .ok()
            .flatten()
            .and_then(|a| SocketAddr::try_from(a).ok());
        if peer.is_some_and(|p| peers.contains(&p))
            && rustix::net::sockopt::set_tcp_nodelay(&dup, true).is_ok()
        {
            set += 1;
        }
    }
    set
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn set_on_connections_to(_peers: &[SocketAddr]) -> usize {
    0
}
