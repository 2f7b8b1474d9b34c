//! `KvStore` for [`PostgresStore`]: rows of `kv`, versions from the store-wide revision,
//! watches from the change log `changes`, woken by `LISTEN`/`NOTIFY`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use super::{bump, lock_counter, log_change, map_err, reap, Inner, PostgresStore, NAME};
use crate::caps::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{matches_prefix, validate_key, validate_prefix};
use crate::kv::{
    Consistency, Entry, Expect, KvStore, PutOptions, Version, WatchEvent, WatchStream,
};

/// How many change rows a watch reads at a time.
const WATCH_BATCH: i64 = 512;

/// A TTL in microseconds, for `clock_timestamp() + $n * interval '1 microsecond'`.
pub(crate) fn micros(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX)
}

/// Writes `key` with a new revision as its version.
async fn store(
    tx: &Transaction<'_>,
    inner: &Inner,
    key: &str,
    value: &[u8],
    ttl: Option<Duration>,
) -> Result<i64> {
    let rev = bump(tx, inner).await?;
    let ttl = ttl.map(micros);
    tx.query_typed(
        &inner.q("INSERT INTO @.kv (key, value, version, expires)
             VALUES ($1, $2, $3, clock_timestamp() + $4 * interval '1 microsecond')
             ON CONFLICT (key) DO UPDATE SET value = excluded.value,
                 version = excluded.version, expires = excluded.expires"),
        &[
            (&key, Type::TEXT),
            (&value, Type::BYTEA),
            (&rev, Type::INT8),
            (&ttl, Type::INT8),
        ],
    )
    .await
    .map_err(|e| map_err(e, "writing the key"))?;
    log_change(tx, inner, rev, key, Some(value)).await?;
    Ok(rev)
}

/// Deletes `key` (expired keys were reaped); whether it existed.
async fn remove(tx: &Transaction<'_>, inner: &Inner, key: &str) -> Result<bool> {
    let n = tx
        .execute_typed(
            &inner.q("DELETE FROM @.kv WHERE key = $1"),
            &[(&key, Type::TEXT)],
        )
        .await
        .map_err(|e| map_err(e, "deleting the key"))?;
    if n > 0 {
        let rev = bump(tx, inner).await?;
        log_change(tx, inner, rev, key, None).await?;
    }
    Ok(n > 0)
}

/// What a write does inside its transaction, after the counter lock and the reaping.
enum Write {
    Put(Vec<u8>, Option<Duration>),
    Delete,
    Cas(Expect, Option<Vec<u8>>),
    /// Nothing: only the reaping.
    Reap,
}

/// Runs one write transaction; the new version, if the write made one.
async fn write(
    inner: &Arc<Inner>,
    what: &'static str,
    key: String,
    op: Write,
) -> Result<Option<i64>> {
    let i = inner.clone();
    inner
        .run(what, move |c| {
            Box::pin(async move {
                let map = |e| map_err(e, what);
                let tx = c.transaction().await.map_err(map)?;
                lock_counter(&tx, &i).await?;
                reap(&tx, &i).await?;
                let out = match op {
                    Write::Put(v, ttl) => Some(store(&tx, &i, &key, &v, ttl).await?),
                    Write::Delete => {
                        remove(&tx, &i, &key).await?;
                        None
                    }
                    Write::Reap => None,
                    Write::Cas(expect, new) => {
                        let cur: Option<i64> = tx
                            .query_typed_opt(
                                &i.q("SELECT version FROM @.kv WHERE key = $1"),
                                &[(&key, Type::TEXT)],
                            )
                            .await
                            .map_err(map)?
                            .map(|r| r.get(0));
                        let holds = match expect {
                            Expect::Absent => cur.is_none(),
                            Expect::Version(v) => cur.is_some_and(|c| c as u64 == v.as_raw()),
                        };
                        if !holds {
                            let found =
                                cur.map_or("no key".to_string(), |c| format!("version {c}"));
                            return Err(Error::new(
                                ErrorKind::Conflict,
                                NAME,
                                format!("expected {expect:?}, found {found}"),
                            ));
                        }
                        match new {
                            // A compare-and-swap writes a permanent key, as on every backend.
                            Some(v) => Some(store(&tx, &i, &key, &v, None).await?),
                            None => {
                                remove(&tx, &i, &key).await?;
                                None
                            }
                        }
                    }
                };
                tx.commit().await.map_err(map)?;
                Ok(out)
            })
        })
        .await
}

const LIVE: &str = "(expires IS NULL OR expires > clock_timestamp())";

#[async_trait]
impl KvStore for PostgresStore {
    async fn get(&self, key: &str, _consistency: Consistency) -> Result<Option<Entry>> {
        validate_key(key)?;
        let sql = self.inner.q(&format!(
            "SELECT value, version FROM @.kv WHERE key = $1 AND {LIVE}"
        ));
        let k = key.to_string();
        self.inner
            .run("get", move |c| {
                Box::pin(async move {
                    let row = c
                        .query_typed_opt(&sql, &[(&k, Type::TEXT)])
                        .await
                        .map_err(|e| map_err(e, "get"))?;
                    Ok(row.map(|r| Entry {
                        key: k.clone(),
                        value: r.get(0),
                        version: Version::from_raw(r.get::<_, i64>(1) as u64),
                    }))
                })
            })
            .await
            .map_err(|e| e.with_key(key))
    }

    async fn put(&self, key: &str, value: Vec<u8>, opts: PutOptions) -> Result<Version> {
        Self::caps().check_put(key, &value, &opts)?;
        let rev = write(
            &self.inner,
            "put",
            key.to_string(),
            Write::Put(value, opts.ttl),
        )
        .await
        .map_err(|e| e.with_key(key))?;
        Ok(Version::from_raw(rev.unwrap_or_default() as u64))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        write(&self.inner, "delete", key.to_string(), Write::Delete)
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
        write(
            &self.inner,
            "compare-and-swap",
            key.to_string(),
            Write::Cas(expect, new),
        )
        .await
        .map(|r| r.map(|rev| Version::from_raw(rev as u64)))
        .map_err(|e| e.with_key(key))
    }

    async fn list(&self, prefix: &str, _consistency: Consistency) -> Result<Vec<Entry>> {
        validate_prefix(prefix)?;
        let p = prefix.to_string();
        // '~' sorts after every character of the key grammar (the columns use the C collation):
        // an index range, no LIKE pattern to escape.
        let upper = format!("{p}~");
        let sql = self.inner.q(&format!(
            "SELECT key, value, version FROM @.kv
             WHERE key >= $1 AND key < $2 AND {LIVE} ORDER BY key"
        ));
        self.inner
            .run("list", move |c| {
                Box::pin(async move {
                    let rows = c
                        .query_typed(&sql, &[(&p, Type::TEXT), (&upper, Type::TEXT)])
                        .await
                        .map_err(|e| map_err(e, "list"))?;
                    Ok(rows
                        .iter()
                        .map(|r| Entry {
                            key: r.get(0),
                            value: r.get(1),
                            version: Version::from_raw(r.get::<_, i64>(2) as u64),
                        })
                        .filter(|e| matches_prefix(&e.key, &p))
                        .collect())
                })
            })
            .await
            .map_err(|e| e.with_key(prefix))
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream> {
        validate_prefix(prefix)?;
        // Listening before the start revision is read: no notification after it is missed.
        let wake = self.inner.wake().await;
        let mut rx_wake = wake.kv.subscribe();
        rx_wake.borrow_and_update();
        let sql = self
            .inner
            .q("SELECT value FROM @.meta WHERE name = 'revision'");
        let start: i64 = self
            .inner
            .run("watch", move |c| {
                Box::pin(async move {
                    Ok(c.query_typed_one(&sql, &[])
                        .await
                        .map_err(|e| map_err(e, "watch"))?
                        .get(0))
                })
            })
            .await?;
        let (tx, mut rx) = mpsc::channel(1024);
        tokio::spawn(watch_loop(
            self.inner.clone(),
            prefix.to_string(),
            start,
            tx,
            rx_wake,
        ));
        Ok(Box::pin(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
        })))
    }

    fn capabilities(&self) -> Capabilities {
        Self::caps()
    }
}

/// What one look at the change log found, in one snapshot.
struct Batch {
    changes: Vec<(i64, String, Option<Vec<u8>>)>,
    /// The newest revision deleted from the log.
    pruned: i64,
    /// Milliseconds until the earliest expiry of a key with a TTL (negative: past).
    next_expiry_ms: Option<f64>,
}

async fn read_batch(inner: &Arc<Inner>, after: i64) -> Result<Batch> {
    let sql = inner.q("SELECT m.value, c.rev, c.key, c.value,
             (SELECT (EXTRACT(EPOCH FROM (MIN(expires) - clock_timestamp())) * 1000)::float8
              FROM @.kv WHERE expires IS NOT NULL)
         FROM @.meta m LEFT JOIN LATERAL (
             SELECT rev, key, value FROM @.changes WHERE rev > $1 ORDER BY rev LIMIT $2
         ) c ON true
         WHERE m.name = 'pruned' ORDER BY c.rev");
    inner
        .run("watch", move |c| {
            Box::pin(async move {
                let rows = c
                    .query_typed(&sql, &[(&after, Type::INT8), (&WATCH_BATCH, Type::INT8)])
                    .await
                    .map_err(|e| map_err(e, "watch"))?;
                let mut b = Batch {
                    changes: Vec::with_capacity(rows.len()),
                    pruned: 0,
                    next_expiry_ms: None,
                };
                for r in &rows {
                    b.pruned = r.get(0);
                    b.next_expiry_ms = r.get(4);
                    if let Some(rev) = r.get::<_, Option<i64>>(1) {
                        b.changes.push((rev, r.get(2), r.get(3)));
                    }
                }
                Ok(b)
            })
        })
        .await
}

async fn watch_loop(
    inner: Arc<Inner>,
    prefix: String,
    mut seen: i64,
    tx: mpsc::Sender<Result<WatchEvent>>,
    mut wake: tokio::sync::watch::Receiver<u64>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if tx.is_closed() {
            return;
        }
        // Marked before the query: a notification after it wakes the wait below.
        wake.borrow_and_update();
        let batch = match read_batch(&inner, seen).await {
            Ok(b) => {
                backoff = Duration::from_millis(50);
                b
            }
            Err(e) if matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout) => {
                // The server is away: resume from the last delivered revision once it is back.
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
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
                        inner.cfg.changes_kept
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
        if batch.next_expiry_ms.is_some_and(|ms| ms <= 0.0) {
            if let Err(e) = write(&inner, "reap", String::new(), Write::Reap).await {
                tracing::debug!(error = %e, "reaping expired keys failed");
                tokio::time::sleep(backoff).await;
            }
            continue;
        }
        let mut wait = inner.recheck();
        if let Some(ms) = batch.next_expiry_ms {
            wait = wait.min(Duration::from_secs_f64(ms / 1000.0 + 0.001));
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = wake.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
