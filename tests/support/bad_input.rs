//! The bad-input matrix: every kind of bad input a caller can pass, against one backend. Each
//! case must give the documented [`ErrorKind`] within [`BOUND`], and a read-back afterwards
//! proves that nothing stored changed.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordkit::{Backend, Consistency, Error, ErrorKind, Expect, LockOptions, PutOptions};

/// No case may take longer than this.
pub const BOUND: Duration = Duration::from_secs(20);

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub expected: String,
    pub got: String,
    pub elapsed: Duration,
    pub pass: bool,
}

/// The outcome of the matrix.
#[derive(Debug, Clone, Default)]
pub struct Matrix {
    pub label: String,
    pub cases: Vec<Case>,
}

impl Matrix {
    pub fn failures(&self) -> Vec<&Case> {
        self.cases.iter().filter(|c| !c.pass).collect()
    }

    pub fn slowest(&self) -> Duration {
        self.cases
            .iter()
            .map(|c| c.elapsed)
            .max()
            .unwrap_or_default()
    }

    /// Panics listing every failed case.
    pub fn assert_ok(&self) {
        let failures = self.failures();
        assert!(
            failures.is_empty(),
            "[{}] {} of {} bad-input cases failed:\n{}",
            self.label,
            failures.len(),
            self.cases.len(),
            failures
                .iter()
                .map(|c| format!(
                    "  {}: expected {}, got {} ({:?})",
                    c.name, c.expected, c.got, c.elapsed
                ))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

impl std::fmt::Display for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] bad-input matrix: {} cases, {} failed, slowest {:.3}s",
            self.label,
            self.cases.len(),
            self.failures().len(),
            self.slowest().as_secs_f64()
        )
    }
}

fn describe<T: std::fmt::Debug>(
    r: &Result<coordkit::Result<T>, tokio::time::error::Elapsed>,
) -> String {
    match r {
        Err(_) => format!("no answer within {BOUND:?}"),
        Ok(Ok(v)) => {
            let s = format!("Ok({v:?})");
            s.chars().take(120).collect()
        }
        Ok(Err(e)) => format!(
            "{:?}: {}",
            e.kind(),
            e.to_string().chars().take(200).collect::<String>()
        ),
    }
}

impl Matrix {
    /// Runs `fut` bounded by [`BOUND`]; passes if it fails with one of `kinds`.
    pub async fn expect_err<T: std::fmt::Debug>(
        &mut self,
        name: impl Into<String>,
        kinds: &[ErrorKind],
        fut: impl Future<Output = coordkit::Result<T>>,
    ) {
        let t0 = Instant::now();
        let r = tokio::time::timeout(BOUND, fut).await;
        let elapsed = t0.elapsed();
        let pass = matches!(&r, Ok(Err(e)) if kinds.contains(&e.kind()));
        self.cases.push(Case {
            name: name.into(),
            expected: format!("{kinds:?}"),
            got: describe(&r),
            elapsed,
            pass,
        });
    }

    /// Runs `fut` bounded by [`BOUND`]; passes if it succeeds and `check` holds for its value.
    pub async fn expect_ok<T: std::fmt::Debug>(
        &mut self,
        name: impl Into<String>,
        fut: impl Future<Output = coordkit::Result<T>>,
        check: impl FnOnce(&T) -> bool,
    ) -> Option<T> {
        let t0 = Instant::now();
        let r = tokio::time::timeout(BOUND, fut).await;
        let elapsed = t0.elapsed();
        let got = describe(&r);
        let (pass, value) = match r {
            Ok(Ok(v)) => (check(&v), Some(v)),
            _ => (false, None),
        };
        self.cases.push(Case {
            name: name.into(),
            expected: "Ok".into(),
            got,
            elapsed,
            pass,
        });
        value
    }

    /// Records a plain check.
    pub fn check(&mut self, name: impl Into<String>, pass: bool, got: impl Into<String>) {
        self.cases.push(Case {
            name: name.into(),
            expected: "true".into(),
            got: got.into(),
            elapsed: Duration::ZERO,
            pass,
        });
    }
}

/// Keys that break the portable grammar, with a name each. `prefix` is the test's own
/// (valid) prefix, ending in `/`; `sentinel` is a stored key the tricks aim at.
pub fn invalid_keys(prefix: &str, sentinel: &str) -> Vec<(String, String)> {
    let trimmed = prefix.trim_end_matches('/');
    let last = sentinel.rsplit('/').next().unwrap_or(sentinel);
    vec![
        ("empty".into(), String::new()),
        ("NUL".into(), format!("{prefix}a\0b")),
        ("control char 0x01".into(), format!("{prefix}a\u{1}b")),
        ("newline".into(), format!("{prefix}a\nb")),
        ("tab".into(), format!("{prefix}a\tb")),
        ("DEL 0x7f".into(), format!("{prefix}a\u{7f}b")),
        ("space".into(), format!("{prefix}a b")),
        ("non-ASCII".into(), format!("{prefix}\u{fc}")),
        ("percent-encoded slash".into(), format!("{prefix}a%2Fb")),
        ("backslash".into(), format!("{prefix}a\\b")),
        ("query-like".into(), format!("{prefix}a?recurse=true")),
        (
            "too long".into(),
            format!("{prefix}{}", "k".repeat(coordkit::key::MAX_KEY_LEN)),
        ),
        ("dot-dot".into(), "..".into()),
        ("dot".into(), ".".into()),
        (
            "dot-dot to the sentinel".into(),
            format!("{prefix}x/../{last}"),
        ),
        ("dot segment".into(), format!("{prefix}./{last}")),
        ("double slash".into(), format!("{trimmed}//{last}")),
        ("leading slash".into(), format!("/{sentinel}")),
        ("trailing slash".into(), format!("{sentinel}/")),
        ("only a slash".into(), "/".into()),
    ]
}

/// Runs the matrix against `store` (and a second client `other` of the same backend) under
/// `prefix` (valid, ending in `/`, used by nothing else).
pub async fn run_matrix(
    label: &str,
    store: Arc<dyn Backend>,
    other: Arc<dyn Backend>,
    prefix: &str,
) -> Matrix {
    let mut m = Matrix {
        label: label.to_string(),
        cases: Vec::new(),
    };
    let caps = store.capabilities();
    let sentinel = format!("{prefix}sentinel");
    let Some(ver) = m
        .expect_ok(
            "setup: put sentinel",
            store.put(&sentinel, b"keep".to_vec(), PutOptions::default()),
            |_| true,
        )
        .await
    else {
        return m;
    };

    // Keys.
    for (what, key) in invalid_keys(prefix, &sentinel) {
        let ik = &[ErrorKind::InvalidKey];
        m.expect_err(
            format!("get {what}"),
            ik,
            store.get(&key, Consistency::Strong),
        )
        .await;
        m.expect_err(
            format!("put {what}"),
            ik,
            store.put(&key, b"x".to_vec(), PutOptions::default()),
        )
        .await;
        m.expect_err(format!("delete {what}"), ik, store.delete(&key))
            .await;
        m.expect_err(
            format!("cas-create {what}"),
            ik,
            store.compare_and_swap(&key, Expect::Absent, Some(b"x".to_vec())),
        )
        .await;
        m.expect_err(
            format!("cas-delete {what}"),
            ik,
            store.compare_and_swap(&key, Expect::Version(ver), None),
        )
        .await;
        let opts = LockOptions::new().ttl(Duration::from_secs(10));
        m.expect_err(format!("lock {what}"), ik, store.lock(&key, &opts))
            .await;
        m.expect_err(format!("try_lock {what}"), ik, store.try_lock(&key, &opts))
            .await;
        m.expect_err(
            format!("campaign {what}"),
            ik,
            store.campaign(&key, b"v".to_vec(), &opts),
        )
        .await;
        m.expect_err(format!("leader {what}"), ik, store.leader(&key))
            .await;
        m.expect_err(format!("observe {what}"), ik, async {
            store.observe(&key).await.map(|_| ())
        })
        .await;
    }
    for p in ["/", "/a", "a//", "../", "a/../", "a b", "a\0"] {
        let p = if p.starts_with('/') || p.starts_with('.') {
            p.to_string()
        } else {
            format!("{prefix}{p}")
        };
        m.expect_err(
            format!("list bad prefix {p:?}"),
            &[ErrorKind::InvalidKey],
            store.list(&p, Consistency::Strong),
        )
        .await;
        let w = store.watch(&p).await.map(|_| ());
        m.cases.push(Case {
            name: format!("watch bad prefix {p:?}"),
            expected: "InvalidKey".into(),
            got: format!("{w:?}"),
            elapsed: Duration::ZERO,
            pass: matches!(&w, Err(e) if e.is(ErrorKind::InvalidKey)),
        });
    }
    // The longest valid key works.
    let longest = format!(
        "{prefix}{}",
        "k".repeat(coordkit::key::MAX_KEY_LEN - prefix.len())
    );
    m.expect_ok(
        "put longest valid key",
        store.put(&longest, b"l".to_vec(), PutOptions::default()),
        |_| true,
    )
    .await;
    m.expect_ok(
        "get longest valid key",
        store.get(&longest, Consistency::Strong),
        |e| e.as_ref().is_some_and(|e| e.value == b"l"),
    )
    .await;
    m.expect_ok("delete longest valid key", store.delete(&longest), |_| true)
        .await;

    // Values.
    let max = caps.max_value_size;
    if max <= 64 << 20 {
        let big = format!("{prefix}big");
        let at_limit = vec![0xA5u8; max];
        m.expect_ok(
            format!("put value at the limit ({max} bytes)"),
            store.put(&big, at_limit.clone(), PutOptions::default()),
            |_| true,
        )
        .await;
        m.expect_ok(
            "read back value at the limit",
            store.get(&big, Consistency::Strong),
            |e| e.as_ref().is_some_and(|e| e.value == at_limit),
        )
        .await;
        let over = vec![0x5Au8; max + 1];
        m.expect_err(
            format!("put value one over the limit ({} bytes)", max + 1),
            &[ErrorKind::ValueTooLarge],
            store.put(&sentinel, over.clone(), PutOptions::default()),
        )
        .await;
        m.expect_err(
            "cas-create value one over the limit",
            &[ErrorKind::ValueTooLarge],
            store.compare_and_swap(&format!("{prefix}big2"), Expect::Absent, Some(over.clone())),
        )
        .await;
        m.expect_err(
            "cas-update value one over the limit",
            &[ErrorKind::ValueTooLarge],
            store.compare_and_swap(&sentinel, Expect::Version(ver), Some(over)),
        )
        .await;
        m.expect_ok(
            "value at the limit unchanged by the oversized writes",
            store.get(&big, Consistency::Strong),
            |e| e.as_ref().is_some_and(|e| e.value == at_limit),
        )
        .await;
        m.expect_ok("delete big", store.delete(&big), |_| true)
            .await;
    } else {
        m.check(
            format!("max_value_size {max} too large to test the limit"),
            true,
            "skipped",
        );
    }
    for (what, value) in [
        ("non-UTF-8 value", vec![0xff, 0xfe, 0x00, 0x80, 0xc3, 0x28]),
        ("empty value", vec![]),
        ("all byte values", (0..=255u8).collect()),
    ] {
        let key = format!("{prefix}bytes");
        m.expect_ok(
            format!("put {what}"),
            store.put(&key, value.clone(), PutOptions::default()),
            |_| true,
        )
        .await;
        m.expect_ok(
            format!("read back {what}"),
            store.get(&key, Consistency::Strong),
            |e| e.as_ref().is_some_and(|e| e.value == value),
        )
        .await;
    }

    // TTLs.
    let ttl_kinds: &[ErrorKind] = if caps.key_ttl {
        &[ErrorKind::InvalidArgument]
    } else {
        &[ErrorKind::Unsupported]
    };
    m.expect_err(
        "put with zero TTL",
        ttl_kinds,
        store.put(&sentinel, b"zero".to_vec(), PutOptions::ttl(Duration::ZERO)),
    )
    .await;
    if caps.min_ttl > Duration::from_nanos(1) {
        m.expect_err(
            format!("put with TTL below the minimum ({:?})", caps.min_ttl / 2),
            ttl_kinds,
            store.put(
                &sentinel,
                b"short".to_vec(),
                PutOptions::ttl(caps.min_ttl / 2),
            ),
        )
        .await;
    }
    m.expect_err(
        "put with a 1 ns TTL",
        ttl_kinds,
        store.put(
            &sentinel,
            b"ns".to_vec(),
            PutOptions::ttl(Duration::from_nanos(1)),
        ),
    )
    .await;
    // A TTL too large for any clock: rejected or accepted, but answered.
    let huge = format!("{prefix}huge-ttl");
    let r = tokio::time::timeout(
        BOUND,
        store.put(&huge, b"h".to_vec(), PutOptions::ttl(Duration::MAX)),
    )
    .await;
    let pass = matches!(&r, Ok(Ok(_)))
        || matches!(&r, Ok(Err(e)) if e.is(ErrorKind::InvalidArgument) || e.is(ErrorKind::Unsupported));
    m.check(
        "put with Duration::MAX TTL answers Ok or InvalidArgument",
        pass,
        describe(&r),
    );
    let _ = store.delete(&huge).await;
    let lock_name = format!("{prefix}ttl-lock");
    m.expect_err(
        "lock with zero TTL",
        &[ErrorKind::InvalidArgument],
        store.lock(&lock_name, &LockOptions::new().ttl(Duration::ZERO)),
    )
    .await;
    m.expect_err(
        "try_lock with zero TTL",
        &[ErrorKind::InvalidArgument],
        store.try_lock(&lock_name, &LockOptions::new().ttl(Duration::ZERO)),
    )
    .await;
    m.expect_err(
        "campaign with zero TTL",
        &[ErrorKind::InvalidArgument],
        store.campaign(
            &lock_name,
            Vec::new(),
            &LockOptions::new().ttl(Duration::ZERO),
        ),
    )
    .await;
    if caps.min_lock_ttl > Duration::from_nanos(1) {
        m.expect_err(
            format!(
                "lock with TTL below the minimum ({:?})",
                caps.min_lock_ttl / 2
            ),
            &[ErrorKind::InvalidArgument],
            store.lock(&lock_name, &LockOptions::new().ttl(caps.min_lock_ttl / 2)),
        )
        .await;
    }
    let r = tokio::time::timeout(
        BOUND,
        store.try_lock(&lock_name, &LockOptions::new().ttl(Duration::MAX)),
    )
    .await;
    let pass = matches!(&r, Ok(Ok(Some(_))))
        || matches!(&r, Ok(Err(e)) if e.is(ErrorKind::InvalidArgument));
    m.check(
        "try_lock with Duration::MAX TTL answers Ok or InvalidArgument",
        pass,
        describe(&r),
    );
    if let Ok(Ok(Some(g))) = r {
        let _ = g.release().await;
    }

    // Locks named like stored keys do not touch them.
    let before = store.list(prefix, Consistency::Strong).await;
    let guard = m
        .expect_ok(
            "lock named like the sentinel key",
            store.lock(&sentinel, &LockOptions::new().ttl(Duration::from_secs(10))),
            |_| true,
        )
        .await;
    m.expect_ok(
        "sentinel unchanged while a lock of its name is held",
        store.get(&sentinel, Consistency::Strong),
        |e| {
            e.as_ref()
                .is_some_and(|e| e.value == b"keep" && e.version == ver)
        },
    )
    .await;
    let during = store.list(prefix, Consistency::Strong).await;
    m.check(
        "listing unchanged while a lock of a key's name is held",
        matches!((&before, &during), (Ok(a), Ok(b)) if a == b),
        format!("{} keys before, {} during", count(&before), count(&during)),
    );
    // Writing and deleting a key of the lock's name does not disturb the lock.
    let held = format!("{prefix}held-lock");
    let g2 = store
        .lock(&held, &LockOptions::new().ttl(Duration::from_secs(10)))
        .await;
    m.expect_ok(
        "put key named like a held lock",
        store.put(&held, b"k".to_vec(), PutOptions::default()),
        |_| true,
    )
    .await;
    m.expect_ok(
        "delete key named like a held lock",
        store.delete(&held),
        |_| true,
    )
    .await;
    m.expect_ok(
        "lock still held after its namesake key was written and deleted",
        other.try_lock(&held, &LockOptions::new().ttl(Duration::from_secs(10))),
        |g| g.is_none(),
    )
    .await;
    m.check(
        "held lock not lost after its namesake key was written and deleted",
        matches!(&g2, Ok(g) if !g.is_lost()),
        format!("{g2:?}"),
    );
    if let Ok(g) = g2 {
        let _ = g.release().await;
    }
    if let Some(g) = guard {
        let _ = g.release().await;
    }

    // Read-back: everything stored is as it was.
    m.expect_ok(
        "read-back: sentinel value and version unchanged",
        store.get(&sentinel, Consistency::Strong),
        |e| {
            e.as_ref()
                .is_some_and(|e| e.value == b"keep" && e.version == ver)
        },
    )
    .await;
    m.expect_ok(
        "read-back: no other key created under the prefix",
        store.list(prefix, Consistency::Strong),
        |l| {
            l.iter()
                .map(|e| e.key.as_str())
                .all(|k| k == sentinel || k == format!("{prefix}bytes"))
        },
    )
    .await;
    m
}

fn count(r: &coordkit::Result<Vec<coordkit::Entry>>) -> String {
    match r {
        Ok(v) => v.len().to_string(),
        Err(e) => e.to_string(),
    }
}

/// Malformed and unknown URLs give `InvalidConfig`, within the bound.
pub async fn url_cases(m: &mut Matrix, urls: &[&str]) {
    for url in urls {
        m.expect_err(
            format!("connect {url:?}"),
            &[ErrorKind::InvalidConfig],
            async { coordkit::connect(url).await.map(|_| ()) },
        )
        .await;
    }
}

/// A URL that points at nothing gives `Unavailable` or `Timeout` (at connect or at the first
/// call), within the bound.
pub async fn unreachable_case(m: &mut Matrix, url: &str) {
    let kinds = [ErrorKind::Unavailable, ErrorKind::Timeout];
    let t0 = Instant::now();
    let r = tokio::time::timeout(BOUND, async {
        let s = coordkit::connect(url).await?;
        s.get("probe", Consistency::Strong).await.map(|_| ())
    })
    .await;
    m.cases.push(Case {
        name: format!("unreachable {url}"),
        expected: format!("{kinds:?}"),
        got: describe(&r),
        elapsed: t0.elapsed(),
        pass: matches!(&r, Ok(Err(e)) if kinds.contains(&e.kind())),
    });
}

type Call<'a> = std::pin::Pin<Box<dyn Future<Output = coordkit::Result<()>> + Send + 'a>>;

/// Every kind of call against a black-holed server returns within `bound` with `Timeout` or
/// `Unavailable`.
pub async fn black_hole_cases(
    m: &mut Matrix,
    store: &Arc<dyn Backend>,
    prefix: &str,
    bound: Duration,
) {
    let key = format!("{prefix}bh");
    let kinds = [ErrorKind::Timeout, ErrorKind::Unavailable];
    let calls: Vec<(&str, Call<'_>)> = vec![
        (
            "get",
            Box::pin(async { store.get(&key, Consistency::Strong).await.map(|_| ()) }),
        ),
        (
            "stale get",
            Box::pin(async { store.get(&key, Consistency::Stale).await.map(|_| ()) }),
        ),
        (
            "put",
            Box::pin(async {
                store
                    .put(&key, b"x".to_vec(), PutOptions::default())
                    .await
                    .map(|_| ())
            }),
        ),
        ("delete", Box::pin(async { store.delete(&key).await })),
        (
            "cas",
            Box::pin(async {
                store
                    .compare_and_swap(&key, Expect::Absent, Some(b"x".to_vec()))
                    .await
                    .map(|_| ())
            }),
        ),
        (
            "list",
            Box::pin(async { store.list(prefix, Consistency::Strong).await.map(|_| ()) }),
        ),
        (
            "try_lock",
            Box::pin(async {
                store
                    .try_lock(&key, &LockOptions::new().ttl(Duration::from_secs(10)))
                    .await
                    .map(|_| ())
            }),
        ),
        (
            "lock",
            Box::pin(async {
                store
                    .lock(
                        &key,
                        &LockOptions::new()
                            .ttl(Duration::from_secs(10))
                            .wait(bound * 10),
                    )
                    .await
                    .map(|_| ())
            }),
        ),
    ];
    for (what, fut) in calls {
        let t0 = Instant::now();
        let r = tokio::time::timeout(bound * 3 + Duration::from_secs(5), fut).await;
        let elapsed = t0.elapsed();
        m.cases.push(Case {
            name: format!("black-holed server: {what} within {bound:?}"),
            expected: format!("{kinds:?} within {:?}", bound + Duration::from_secs(2)),
            got: format!("{} after {elapsed:?}", describe(&r)),
            elapsed,
            pass: matches!(&r, Ok(Err(e)) if kinds.contains(&e.kind()))
                && elapsed <= bound + Duration::from_secs(2),
        });
    }
}

/// An `Error` for messages.
pub fn show(e: &Error) -> String {
    format!("{:?}: {e}", e.kind())
}
