//! The bad-input matrix against every backend: invalid keys, path tricks, values at and over
//! the limit, non-UTF-8 values, zero and extreme TTLs, locks named like keys, malformed and
//! unknown URLs, unreachable and black-holed servers. Each case gives the documented
//! `ErrorKind` within a bound, and a read-back proves nothing stored changed. See
//! `docs/reliability.md`.

#[path = "support/bad_input.rs"]
mod bad_input;
mod support;

use std::sync::Arc;

use bad_input::{run_matrix, url_cases, Matrix};

fn report(m: &Matrix) {
    println!("{m}");
    m.assert_ok();
}

#[tokio::test]
async fn memory_bad_input_matrix() {
    let store = coordkit::MemoryStore::new();
    let a: Arc<dyn coordkit::Backend> = Arc::new(store.clone());
    let b: Arc<dyn coordkit::Backend> = Arc::new(store);
    let m = run_matrix("memory", a, b, "bad/").await;
    report(&m);
    assert!(m.cases.len() > 150, "{}", m.cases.len());
}

#[tokio::test]
async fn malformed_and_unknown_urls() {
    let mut m = Matrix {
        label: "urls".into(),
        ..Default::default()
    };
    url_cases(
        &mut m,
        &[
            "",
            "   ",
            "not a url",
            "nosuch://host:1",
            "http://127.0.0.1:2379",
            "memory",
            "://x",
            "etcd:",
            "zk:",
            "consul:",
        ],
    )
    .await;
    report(&m);
}
