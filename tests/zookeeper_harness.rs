//! The ZooKeeper test harness itself: servers start, serve and stop.

mod support;

use std::time::Duration;

use support::zookeeper::{mode, shared, ZkEnsemble};

#[test]
fn standalone_serves() {
    let zk = shared();
    assert_eq!(mode(zk.port()).as_deref(), Some("standalone"));
    assert!(zk.url().starts_with("zk://127.0.0.1:"));
}

#[test]
fn ensemble_elects_and_survives_leader_kill() {
    let mut ens = ZkEnsemble::start(3);
    let leader = ens.leader().expect("a leader");
    ens.kill(leader);
    assert!(ens.wait_serving(Duration::from_secs(30)), "no new leader");
    let new_leader = ens.leader().expect("a new leader");
    assert_ne!(new_leader, leader);
    ens.restart(leader);
    assert!(
        ens.wait_serving(Duration::from_secs(30)),
        "restarted node did not rejoin"
    );
    assert_eq!(mode(ens.nodes[leader].port).as_deref(), Some("follower"));
}
