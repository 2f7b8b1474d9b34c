//! `KvStore` for [`SqliteStore`]: rows of `coordkit_kv`, versions from the store-wide revision,
//! watches from the change log `coordkit_changes`.

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Transaction};
use tokio::sync::mpsc;

use super::{bump, log_change, map_err, revision, HostClock, Inner, SqliteStore, NAME};
use crate::caps::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{matches_prefix, validate_key, validate_prefix};
use crate::kv::{
    Consistency, Entry, Expect, KvStore, PutOptions, Version, WatchEvent, WatchStream,
};

/// How many change rows a watch reads at a time.
const WATCH_BATCH: i64 = 512;

type Row = (String, Vec<u8>, i64, Option<String>, Option<i64>);

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn entry((key, value, version, ..): Row) -> Entry {
    Entry {
        key,
        value,
        version: Version::from_raw(version as u64),
    }
}

/// The live version of `key` inside a write transaction (expired keys were reaped).
fn current(tx: &Transaction<'_>, key: &str) -> rusqlite::Result<Option<i64>> {
    tx.query_row(
        "SELECT version FROM coordkit_kv WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .optional()
}

fn store(
    tx: &Transaction<'_>,
    clock: &HostClock,
    key: &str,
    value: &[u8],
    ttl: Option<std::time::Duration>,
) -> rusqlite::Result<i64> {
    let rev = bump(tx)?;
    let (boot, expires) = match ttl {
        Some(t) => (Some(clock.boot.as_str()), Some(clock.expiry(t))),
        None => (None, None),
    };
    tx.execute(
        "INSERT INTO coordkit_kv (key, value, version, boot, expires) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = excluded.version,
             boot = excluded.boot, expires = excluded.expires",
        rusqlite::params![key, value, rev, boot, expires],
    )?;
    log_change(tx, rev, key, Some(value))?;
    Ok(rev)
}

fn remove(tx: &Transaction<'_>, key: &str) -> rusqlite::Result<bool> {
    let n = tx.execute("DELETE FROM coordkit_kv WHERE key = ?1", [key])?;
    if n > 0 {
        let rev = bump(tx)?;
        log_change(tx, rev, key, None)?;
    }
    Ok(n > 0)
}

#[async_trait]
impl KvStore for SqliteStore {
    async fn get(&self, key: &str, _consistency: Consistency) -> Result<Option<Entry>> {
        validate_key(key)?;
        let k = key.to_string();
        self.inner
            .run("get", move |conn, clock| {
                let r = conn
                    .query_row(
                        "SELECT key, value, version, boot, expires FROM coordkit_kv WHERE key = ?1",
                        [&k],
                        row,
                    )
                    .optional()
                    .map_err(|e| map_err(e, "get"))?;
                Ok(r.filter(|r| clock.live(r.3.as_deref(), r.4)).map(entry))
            })
            .await
            .map_err(|e| e.with_key(key))
    }

    async fn put(&self, key: &str, value: Vec<u8>, opts: PutOptions) -> Result<Version> {
        Self::caps().check_put(key, &value, &opts)?;
        let k = key.to_string();
        self.inner
            .write("put", move |tx, clock| {
                store(tx, clock, &k, &value, opts.ttl).map_err(|e| map_err(e, "put"))
            })
            .await
            .map(|rev| Version::from_raw(rev as u64))
            .map_err(|e| e.with_key(key))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        let k = key.to_string();
        self.inner
            .write("delete", move |tx, _| {
                remove(tx, &k).map_err(|e| map_err(e, "delete"))
            })
            .await
            .map(|_| ())
            .map_err(|e| e.with_key(key))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        new: Option<Vec<u8>>,
    ) -> Result<Option<Version>> {
        Self::caps().check_cas(key, new.as_deref())?;
        let k = key.to_string();
        self.inner
            .write("compare-and-swap", move |tx, clock| {
                let map = |e| map_err(e, "compare-and-swap");
                let cur = current(tx, &k).map_err(map)?;
                let holds = match expect {
                    Expect::Absent => cur.is_none(),
                    Expect::Version(v) => cur.is_some_and(|c| c as u64 == v.as_raw()),
                };
                if !holds {
                    let found = cur.map_or("no key".to_string(), |c| format!("version {c}"));
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        NAME,
                        format!("expected {expect:?}, found {found}"),
                    ));
                }
                match new {
                    // A compare-and-swap writes a permanent key, as on every backend.
                    Some(v) => store(tx, clock, &k, &v, None)
                        .map(|rev| Some(Version::from_raw(rev as u64)))
                        .map_err(map),
                    None => remove(tx, &k).map(|_| None).map_err(map),
                }
            })
            .await
            .map_err(|e| e.with_key(key))
    }

    async fn list(&self, prefix: &str, _consistency: Consistency) -> Result<Vec<Entry>> {
        validate_prefix(prefix)?;
        let p = prefix.to_string();
        self.inner
            .run("list", move |conn, clock| {
                // '~' sorts after every character of the key grammar.
                let upper = format!("{p}~");
                let mut st = conn
                    .prepare_cached(
                        "SELECT key, value, version, boot, expires FROM coordkit_kv
                         WHERE key >= ?1 AND key < ?2 ORDER BY key",
                    )
                    .map_err(|e| map_err(e, "list"))?;
                let rows = st
                    .query_map([&p, &upper], row)
                    .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(|e| map_err(e, "list"))?;
                Ok(rows
                    .into_iter()
                    .filter(|r| matches_prefix(&r.0, &p) && clock.live(r.3.as_deref(), r.4))
                    .map(entry)
                    .collect())
            })
            .await
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream> {
        validate_prefix(prefix)?;
        let start = self
            .inner
            .run("watch", |conn, _| {
                revision(conn).map_err(|e| map_err(e, "watch"))
            })
            .await?;
        let (tx, mut rx) = mpsc::channel(1024);
        tokio::spawn(watch_loop(
            self.inner.clone(),
            prefix.to_string(),
            start,
            tx,
        ));
        Ok(Box::pin(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
        })))
    }

    fn capabilities(&self) -> Capabilities {
        Self::caps()
    }
}

/// What one look at the change log found.
struct Batch {
    changes: Vec<(i64, String, Option<Vec<u8>>)>,
    /// The newest revision deleted from the log.
    pruned: i64,
    /// The earliest expiry of a key with a TTL.
    next_expiry: Option<i64>,
}

async fn watch_loop(
    inner: Arc<Inner>,
    prefix: String,
    mut seen: i64,
    tx: mpsc::Sender<Result<WatchEvent>>,
) {
    let poll = std::time::Duration::from_millis(10);
    loop {
        if tx.is_closed() {
            return;
        }
        // Enabled before the query: a commit after it wakes this task.
        let changes = inner.changes();
        let changed = changes.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let after = seen;
        let batch = inner
            .run("watch", move |conn, _| {
                let map = |e| map_err(e, "watch");
                let mut st = conn
                    .prepare_cached(
                        "SELECT rev, key, value FROM coordkit_changes WHERE rev > ?1
                         ORDER BY rev LIMIT ?2",
                    )
                    .map_err(map)?;
                let changes = st
                    .query_map([after, WATCH_BATCH], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(map)?;
                let pruned = conn
                    .query_row(
                        "SELECT value FROM coordkit_meta WHERE name = 'pruned'",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(map)?;
                let next_expiry = conn
                    .query_row(
                        "SELECT MIN(expires) FROM coordkit_kv WHERE expires IS NOT NULL",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(map)?;
                Ok(Batch {
                    changes,
                    pruned,
                    next_expiry,
                })
            })
            .await;
        let batch = match batch {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::Timeout => {
                tokio::time::sleep(poll).await;
                continue;
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        if batch.pruned > seen {
            let _ = tx
                .send(Err(Error::new(
                    ErrorKind::WatchGap,
                    NAME,
                    format!(
                        "the change log no longer holds revision {} (it keeps the last {})",
                        seen + 1,
                        super::CHANGES_KEPT
                    ),
                )))
                .await;
            return;
        }
        let full = batch.changes.len() as i64 == WATCH_BATCH;
        for (rev, key, value) in batch.changes {
            seen = rev;
            if !matches_prefix(&key, &prefix) {
                continue;
            }
            let ev = match value {
                Some(value) => WatchEvent::Put(Entry {
                    key,
                    value,
                    version: Version::from_raw(rev as u64),
                }),
                None => WatchEvent::Delete { key },
            };
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
        if full {
            continue;
        }
        // A key whose TTL ran out is deleted (and its delete logged) by whoever looks first.
        if batch
            .next_expiry
            .is_some_and(|at| at <= inner.clock.now_ms())
        {
            let _ = inner.write("reap", |_, _| Ok(())).await;
            continue;
        }
        inner.wait_for_change(changed, batch.next_expiry).await;
    }
}
