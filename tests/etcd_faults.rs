//! Fault tests against real etcd processes: a killed lock holder, a killed leader, an
//! unreachable endpoint.
#![cfg(feature = "etcd")]

mod support;

use std::time::Duration;

use support::etcd::{etcdctl, EtcdCluster};

/// The harness itself: a 3-member cluster starts, names a leader, survives the leader's death
/// and takes the restarted member back.
#[test]
fn harness_cluster_leader_kill_and_restart() {
    let mut c = EtcdCluster::start(3);
    let leader = c.leader().expect("a leader");
    let (ok, _, err) = etcdctl(&c.endpoints(), &["put", "harness/k", "v"]);
    assert!(ok, "put: {err}");
    c.kill(leader);
    assert!(support::wait_until(Duration::from_secs(10), || {
        matches!(c.leader(), Some(l) if l != leader)
    }));
    c.restart(leader);
    let (ok, out, err) = etcdctl(
        &c.members[leader].endpoint(),
        &["get", "harness/k", "--print-value-only"],
    );
    assert!(ok, "get: {err}");
    assert_eq!(out.trim(), "v");
}
