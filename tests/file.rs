//! The conformance suite against the shared-directory backend: each test on a store directory
//! of its own (removed when the test process ends), opened by a new store per client, plus the
//! file-specific cases: bad directories, data that outlives the store, damage, crashed writers.
#![cfg(all(feature = "conformance", feature = "file"))]

use std::sync::{Arc, OnceLock};

use coordkit::backend::file::{FileConfig, FileStore};
use coordkit::conformance::Harness;
use coordkit::{Consistency, ErrorKind, KvStore};

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory"))
}

fn file() -> Harness {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir().path().join(format!("conformance-{n}"));
    Harness::new("file", move || {
        let cfg = FileConfig::new(path.clone());
        async move { Ok(Arc::new(FileStore::open(cfg).await?) as Arc<dyn coordkit::Backend>) }
    })
}

coordkit::conformance_tests!(file());
coordkit::election_conformance_tests!(file());
coordkit::recipe_conformance_tests!(file());

#[tokio::test]
async fn opening_bad_paths_gives_typed_errors() {
    let d = dir().path();
    let missing = FileStore::open(FileConfig::new(d.join("no/such/dir")))
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::Unavailable, "{missing}");
    let plain = d.join("plain-file");
    std::fs::write(&plain, b"x").unwrap();
    let e = FileStore::open(FileConfig::new(&plain)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    // A directory with other files in it is not taken over.
    let busy = d.join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), b"mine").unwrap();
    let e = FileStore::open(FileConfig::new(&busy)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);
    // Another format version.
    let newer = d.join("newer");
    std::fs::create_dir(&newer).unwrap();
    std::fs::write(
        newer.join("coordkit.format"),
        b"coordkit file store, format 9\n",
    )
    .unwrap();
    let e = FileStore::open(FileConfig::new(&newer)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    let e = coordkit::connect("file://relative").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
}

#[tokio::test]
async fn data_and_tokens_outlive_the_store_and_are_shared_by_url() {
    let path = dir().path().join("reopen");
    let url = format!("file://{}", path.display());
    let a = coordkit::connect(&url).await.unwrap();
    a.put("k", b"v1".to_vec(), Default::default())
        .await
        .unwrap();
    let opts = coordkit::LockOptions::new().ttl(std::time::Duration::from_secs(5));
    let g = a.lock("job", &opts).await.unwrap();
    let t1 = g.token();
    g.release().await.unwrap();
    drop(a);
    let b = coordkit::connect(&url).await.unwrap();
    let e = b.get("k", Consistency::Strong).await.unwrap().unwrap();
    assert_eq!(e.value, b"v1");
    assert_eq!(b.capabilities().backend, "file");
    let g = b.lock("job", &opts).await.unwrap();
    assert!(g.token() > t1, "{:?} after {:?}", g.token(), t1);
    g.release().await.unwrap();
    // Versions keep increasing across reopenings too.
    let v2 = b
        .put("k", b"v2".to_vec(), Default::default())
        .await
        .unwrap();
    assert!(v2.as_raw() > e.version.as_raw());
}

#[tokio::test]
async fn a_damaged_key_file_gives_an_error_and_other_keys_still_work() {
    let path = dir().path().join("damaged");
    let s = FileStore::open(FileConfig::new(&path)).await.unwrap();
    s.put("a", b"1".to_vec(), Default::default()).await.unwrap();
    s.put("b", b"2".to_vec(), Default::default()).await.unwrap();
    // Damage one bucket file.
    let mut damaged = 0;
    for e in std::fs::read_dir(path.join("kv")).unwrap() {
        let p = e.unwrap().path();
        let mut bytes = std::fs::read(&p).unwrap();
        if bytes.windows(1).any(|w| w == b"a") {
            let n = bytes.len();
            bytes[n - 1] ^= 0xff;
            std::fs::write(&p, bytes).unwrap();
            damaged += 1;
            break;
        }
    }
    assert_eq!(damaged, 1);
    let e = s.get("a", Consistency::Strong).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.to_string().contains("damaged"), "{e}");
    let b = s.get("b", Consistency::Strong).await.unwrap().unwrap();
    assert_eq!(b.value, b"2");
}

#[tokio::test]
async fn a_write_logged_but_not_applied_is_applied_by_the_next_writer() {
    // A writer that dies between the log append and the rename of the key file leaves the
    // change in the log only: the next writer applies it before its own.
    let path = dir().path().join("redo");
    let s = FileStore::open(FileConfig::new(&path)).await.unwrap();
    let v1 = s
        .put("k", b"one".to_vec(), Default::default())
        .await
        .unwrap();
    let key_files = |p: &std::path::Path| {
        std::fs::read_dir(p.join("kv"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect::<Vec<_>>()
    };
    let before: Vec<Vec<u8>> = key_files(&path)
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    s.put("k", b"two".to_vec(), Default::default())
        .await
        .unwrap();
    // Undo the key file (as if the rename never happened).
    for (p, b) in key_files(&path).iter().zip(&before) {
        std::fs::write(p, b).unwrap();
    }
    drop(s);
    let s = FileStore::open(FileConfig::new(&path)).await.unwrap();
    assert_eq!(
        s.get("k", Consistency::Strong)
            .await
            .unwrap()
            .unwrap()
            .version,
        v1
    );
    s.put("other", b"x".to_vec(), Default::default())
        .await
        .unwrap();
    let e = s.get("k", Consistency::Strong).await.unwrap().unwrap();
    assert_eq!(e.value, b"two");
    assert!(e.version.as_raw() > v1.as_raw());
}

#[tokio::test]
async fn a_torn_log_append_is_cut_and_writes_go_on() {
    let path = dir().path().join("torn");
    let s = FileStore::open(FileConfig::new(&path)).await.unwrap();
    s.put("k", b"one".to_vec(), Default::default())
        .await
        .unwrap();
    let seg = std::fs::read_dir(path.join("log"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, &[9, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(f);
    let mut w = s.watch("").await.unwrap();
    let v = s
        .put("k", b"two".to_vec(), Default::default())
        .await
        .unwrap();
    let ev = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        futures::StreamExt::next(&mut w),
    )
    .await
    .expect("an event")
    .unwrap()
    .unwrap();
    match ev {
        coordkit::WatchEvent::Put(e) => {
            assert_eq!(e.value, b"two");
            assert_eq!(e.version, v);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn rewriting_a_ttl_key_leaves_one_marker_and_its_expiry_still_deletes_it() {
    let path = dir().path().join("markers");
    let s = FileStore::open(FileConfig::new(&path)).await.unwrap();
    let mut w = s.watch("t").await.unwrap();
    for i in 0..50u64 {
        let ttl = std::time::Duration::from_millis(600 + i);
        s.put("t", b"x".to_vec(), coordkit::PutOptions::ttl(ttl))
            .await
            .unwrap();
    }
    let markers = std::fs::read_dir(path.join("ttl")).unwrap().count();
    assert_eq!(markers, 1, "one marker for the one TTL key");
    // 50 puts, then the delete at the TTL, without any further write.
    let mut puts = 0;
    loop {
        let ev = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            futures::StreamExt::next(&mut w),
        )
        .await
        .expect("the delete comes within 10 s")
        .unwrap()
        .unwrap();
        match ev {
            coordkit::WatchEvent::Put(_) => puts += 1,
            coordkit::WatchEvent::Delete { key } => {
                assert_eq!(key, "t");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(puts, 50);
    assert!(s.get("t", Consistency::Strong).await.unwrap().is_none());
    assert_eq!(std::fs::read_dir(path.join("ttl")).unwrap().count(), 0);
}
