//! The etcd backend against a real etcd (Debian's `/usr/bin/etcd`, started by the test):
//! the whole conformance suite, interoperation with `etcdctl lock`, oversized values.
#![cfg(feature = "etcd")]

mod support;

use coordkit::conformance::Harness;

fn etcd() -> Harness {
    let url = support::etcd::shared_url();
    Harness::new("etcd", move || {
        let url = url.clone();
        async move { coordkit::connect(&url).await }
    })
}

coordkit::conformance_tests!(etcd());
