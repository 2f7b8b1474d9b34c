//! The conformance suite against the SQLite backend: each test on a database file of its own
//! in a temporary directory (removed when the test process ends), opened by a new store per
//! client. (One file for all tests at once would test SQLite's single writer under the whole
//! suite's load instead; `tests/mutex_processes.rs` tests contention on one file.)
#![cfg(all(feature = "conformance", feature = "sqlite"))]

use std::sync::{Arc, OnceLock};

use coordkit::backend::sqlite::{SqliteConfig, SqliteStore};
use coordkit::conformance::Harness;
use coordkit::ErrorKind;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory"))
}

fn sqlite() -> Harness {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir().path().join(format!("conformance-{n}.db"));
    Harness::new("sqlite", move || {
        let cfg = SqliteConfig::new(path.clone());
        async move { Ok(Arc::new(SqliteStore::open(cfg).await?) as Arc<dyn coordkit::Backend>) }
    })
}

coordkit::conformance_tests!(sqlite());
coordkit::election_conformance_tests!(sqlite());
coordkit::recipe_conformance_tests!(sqlite());

#[tokio::test]
async fn opening_bad_paths_gives_typed_errors() {
    let d = dir().path();
    let missing = SqliteStore::open(SqliteConfig::new(d.join("no/such/dir/x.db")))
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::Unavailable, "{missing}");
    let e = SqliteStore::open(SqliteConfig::new(d)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    let garbage = d.join("garbage.db");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    let e = SqliteStore::open(SqliteConfig::new(&garbage))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    let e = coordkit::connect("sqlite://relative.db").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
}

#[tokio::test]
async fn data_outlives_the_store_and_is_shared_by_url() {
    let path = dir().path().join("reopen.db");
    let url = format!("sqlite://{}", path.display());
    let a = coordkit::connect(&url).await.unwrap();
    a.put("k", b"v1".to_vec(), Default::default())
        .await
        .unwrap();
    drop(a);
    let b = coordkit::connect(&url).await.unwrap();
    let e = b
        .get("k", coordkit::Consistency::Strong)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.value, b"v1");
    assert_eq!(b.capabilities().backend, "sqlite");
}
