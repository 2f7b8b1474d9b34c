//! The conformance suite against the in-memory backend.
#![cfg(feature = "conformance")]

use std::sync::Arc;

use coordkit::conformance::Harness;
use coordkit::MemoryStore;

fn memory() -> Harness {
    let store = MemoryStore::new();
    Harness::new("memory", move || {
        let store = store.clone();
        async move { Ok(Arc::new(store) as Arc<dyn coordkit::Backend>) }
    })
}

coordkit::conformance_tests!(memory());
coordkit::election_conformance_tests!(memory());
coordkit::recipe_conformance_tests!(memory());
