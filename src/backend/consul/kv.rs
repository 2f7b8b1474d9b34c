//! [`KvStore`] over `/v1/kv` and `/v1/txn`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::client::{DirEntry, Mode, TxnKv, TxnOutcome};
use super::{ConsulStore, NAME};
use crate::caps::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{validate_key, validate_prefix};
use crate::kv::{
    Consistency, Entry, Expect, KvStore, PutOptions, Version, WatchEvent, WatchStream,
};

/// Values up to this size go through `/v1/txn`, whose whole body (base64 value included) is
/// limited to 512 KiB; larger ones through a plain PUT (see `docs.md`).
const TXN_VALUE_LIMIT: usize = 380 * 1024;

/// How long one blocking query of a watch waits server-side.
const WATCH_WAIT: Duration = Duration::from_secs(300);

fn mode(c: Consistency) -> Mode {
    match c {
        Consistency::Strong => Mode::Consistent,
        Consistency::Stale => Mode::Stale,
    }
}

fn conflict(key: &str, what: &str) -> Error {
    Error::new(ErrorKind::Conflict, NAME, what.to_string()).with_key(key)
}

impl ConsulStore {
    fn data_key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.kv_prefix)
    }

    fn to_entry(&self, e: &DirEntry) -> Result<Entry> {
        Ok(Entry {
            key: e
                .key
                .strip_prefix(&self.inner.kv_prefix)
                .unwrap_or(&e.key)
                .to_string(),
            value: e.bytes()?,
            version: Version::from_raw(e.modify_index),
        })
    }

    /// Runs a transaction whose first result is the written entry; its ModifyIndex.
    async fn txn_write(&self, key: &str, ops: &[TxnKv<'_>]) -> Result<Option<Version>> {
        match self.inner.client.txn(ops, key).await? {
            TxnOutcome::Ok(results) => Ok(results
                .iter()
                .rev()
                .find(|e| e.key == ops[ops.len() - 1].key)
                .map(|e| Version::from_raw(e.modify_index))),
            TxnOutcome::RolledBack(errors) => {
                let what = errors
                    .iter()
                    .map(|e| format!("op {}: {}", e.op_index, e.what))
                    .collect::<Vec<_>>()
                    .join("; ");
                Err(conflict(key, &what))
            }
        }
    }

    /// A write too large for `/v1/txn`: a plain PUT (with `?cas=` when given) tagged with a
    /// one-off `flags` value, then a consistent read that finds the tag to learn the version
    /// (a plain PUT answers no index).
    ///
    /// Once the PUT has answered `true` the write happened, so this never reports `Conflict`
    /// after it (`Conflict` means nothing changed). If another write replaced the key before
    /// the read, the exact version of this write can no longer be learnt; the version returned
    /// is then one below the index of what the read found (the replacing write's ModifyIndex, or
    /// the index of the key's deletion), which is no version the key has or will have: a
    /// compare-and-swap with it fails with `Conflict`, as it must, the key having changed since.
    async fn large_write(&self, key: &str, value: Vec<u8>, cas: Option<u64>) -> Result<Version> {
        let full = self.data_key(key);
        let nonce = write_nonce();
        let mut q = vec![("flags", nonce.to_string())];
        if let Some(c) = cas {
            q.push(("cas", c.to_string()));
        }
        if !self.inner.client.kv_put(&full, value, &q).await? {
            return Err(conflict(key, "the key's version changed"));
        }
        let (entries, index) = self
            .inner
            .client
            .kv_get(&full, false, Mode::Consistent, None)
            .await?;
        match entries.iter().find(|e| e.key == full) {
            Some(e) if e.flags == nonce => Ok(Version::from_raw(e.modify_index)),
            Some(e) => Ok(Version::from_raw(e.modify_index.saturating_sub(1))),
            None => Ok(Version::from_raw(index.saturating_sub(1))),
        }
    }
}

fn write_nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Never 0 (the default flags) and never the lock flag value.
    ((nanos ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ n) | 1
}

#[async_trait]
impl KvStore for ConsulStore {
    async fn get(&self, key: &str, consistency: Consistency) -> Result<Option<Entry>> {
        validate_key(key)?;
        let full = self.data_key(key);
        let (entries, _) = self
            .inner
            .client
            .kv_get(&full, false, mode(consistency), None)
            .await?;
        entries
            .iter()
            .find(|e| e.key == full)
            .map(|e| self.to_entry(e))
            .transpose()
    }

    async fn put(&self, key: &str, value: Vec<u8>, opts: PutOptions) -> Result<Version> {
        Self::caps().check_put(key, &value, &opts)?;
        if value.len() > TXN_VALUE_LIMIT {
            return self.large_write(key, value, None).await;
        }
        let full = self.data_key(key);
        let op = TxnKv {
            verb: "set",
            key: &full,
            value: Some(&value),
            ..TxnKv::default()
        };
        self.txn_write(key, &[op]).await?.ok_or_else(|| {
            Error::new(
                ErrorKind::Backend,
                NAME,
                "the transaction returned no entry",
            )
            .with_key(key)
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        self.inner.client.kv_delete(&self.data_key(key)).await?;
        Ok(())
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        new: Option<Vec<u8>>,
    ) -> Result<Option<Version>> {
        Self::caps().check_cas(key, new.as_deref())?;
        let full = self.data_key(key);
        match (expect, new) {
            (Expect::Absent, None) => {
                let op = TxnKv {
                    verb: "check-not-exists",
                    key: &full,
                    ..TxnKv::default()
                };
                self.txn_write(key, &[op]).await?;
                Ok(None)
            }
            (Expect::Version(v), None) => {
                // `delete-cas` (and `DELETE ?cas=`) succeed on a missing key (Consul's
                // agent/consul/state/kvs.go, `kvsDeleteCASTxn`), so check the index first: that
                // fails on a missing key.
                let ops = [
                    TxnKv {
                        verb: "check-index",
                        key: &full,
                        index: v.as_raw(),
                        ..TxnKv::default()
                    },
                    TxnKv {
                        verb: "delete",
                        key: &full,
                        ..TxnKv::default()
                    },
                ];
                self.txn_write(key, &ops).await?;
                Ok(None)
            }
            (expect, Some(value)) => {
                let index = match expect {
                    Expect::Absent => 0,
                    // ModifyIndex is never 0: such a version can match nothing, and `cas=0`
                    // would mean "create".
                    Expect::Version(v) if v.as_raw() == 0 => {
                        return Err(conflict(key, "version 0 never matches"))
                    }
                    Expect::Version(v) => v.as_raw(),
                };
                if value.len() > TXN_VALUE_LIMIT {
                    return self.large_write(key, value, Some(index)).await.map(Some);
                }
                let op = TxnKv {
                    verb: "cas",
                    key: &full,
                    value: Some(&value),
                    index,
                    ..TxnKv::default()
                };
                let v = self.txn_write(key, &[op]).await?;
                v.map(Some).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Backend,
                        NAME,
                        "the transaction returned no entry",
                    )
                    .with_key(key)
                })
            }
        }
    }

    async fn list(&self, prefix: &str, consistency: Consistency) -> Result<Vec<Entry>> {
        validate_prefix(prefix)?;
        let full = self.data_key(prefix);
        let (entries, _) = self
            .inner
            .client
            .kv_get(&full, true, mode(consistency), None)
            .await?;
        let mut out = entries
            .iter()
            .filter(|e| e.key.starts_with(&full))
            .map(|e| self.to_entry(e))
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream> {
        validate_prefix(prefix)?;
        let full = self.data_key(prefix);
        // The first, non-blocking read is the starting point: the watch is established once it
        // has answered.
        let (entries, index) = self
            .inner
            .client
            .kv_get(&full, true, Mode::Consistent, None)
            .await?;
        let snapshot: BTreeMap<String, DirEntry> = entries
            .into_iter()
            .filter(|e| e.key.starts_with(&full))
            .map(|e| (e.key.clone(), e))
            .collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let store = self.clone();
        tokio::spawn(async move {
            store.watch_loop(full, snapshot, index, tx).await;
        });
        Ok(Box::pin(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
        })))
    }

    fn capabilities(&self) -> Capabilities {
        Self::caps()
    }
}

impl ConsulStore {
    /// Blocking queries on the prefix, diffing successive results, following the client rules
    /// of <https://developer.hashicorp.com/consul/api-docs/features/blocking>: reset when the
    /// index goes backwards, never index 0, rate-limited.
    async fn watch_loop(
        self,
        full: String,
        mut snapshot: BTreeMap<String, DirEntry>,
        mut index: u64,
        tx: mpsc::UnboundedSender<Result<WatchEvent>>,
    ) {
        let mut backoff = Duration::from_millis(100);
        let mut reset = false;
        loop {
            let poll = self.inner.client.kv_get(
                &full,
                true,
                Mode::Default,
                Some((index.max(1), WATCH_WAIT)),
            );
            let answer = tokio::select! {
                a = poll => a,
                _ = tx.closed() => return,
            };
            let (entries, new_index) = match answer {
                Ok(a) => {
                    backoff = Duration::from_millis(100);
                    a
                }
                Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                    // A revoked or rotated token: retrying cannot help.
                    let _ = tx.send(Err(e));
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "consul watch poll failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = tx.closed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let next: BTreeMap<String, DirEntry> = entries
                .into_iter()
                .filter(|e| e.key.starts_with(&full))
                .map(|e| (e.key.clone(), e))
                .collect();
            // Exactness can only be shown from indexes that did not go backwards.
            let base = (!reset && new_index >= index).then_some(index);
            let events = self.order_changes(&snapshot, &next, new_index, base).await;
            // A key created and deleted between two answers leaves no trace in them (only its
            // tombstone may raise the prefix index): the contract lets a coalescing backend
            // miss it, and the state rebuilt from the events is still right.
            let changed = !events.is_empty();
            for (ev, exact) in events {
                let key = |k: &str| {
                    k.strip_prefix(&self.inner.kv_prefix)
                        .unwrap_or(k)
                        .to_string()
                };
                let ev = match ev {
                    Diff::Put(e) => match self.to_entry(&e) {
                        Ok(entry) => WatchEvent::Put(entry),
                        Err(err) => {
                            let _ = tx.send(Err(err));
                            return;
                        }
                    },
                    Diff::Delete(k) => WatchEvent::Delete { key: key(&k) },
                };
                if !exact
                    && tx
                        .send(Ok(WatchEvent::Coalesced {
                            key: ev.key().to_string(),
                        }))
                        .is_err()
                {
                    return;
                }
                if tx.send(Ok(ev)).is_err() {
                    return;
                }
            }
            snapshot = next;
            // An index that goes backwards (snapshot restore, reaped tombstones) resets the
            // loop (https://developer.hashicorp.com/consul/api-docs/features/blocking); the diff
            // against the last result still finds every change.
            reset = new_index < index;
            index = if reset { 1 } else { new_index.max(1) };
            if !changed {
                // Rate limit: a wake-up that changed nothing waits a little before the next.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = tx.closed() => return,
                }
            }
        }
    }
}

enum Diff {
    Put(DirEntry),
    Delete(String),
}

impl ConsulStore {
    /// The changes from `old` to `new`, in the order they were applied as far as Consul lets
    /// that be known, each with whether it is provably one write (else it is reported as
    /// coalesced). Writes are ordered by ModifyIndex; a deleted key's position comes from its
    /// tombstone, read as the index of a `?recurse` query on the key itself (that index
    /// counts tombstones: Consul's agent/consul/state/kvs.go, `kvsListTxn`), when that is
    /// unambiguous, and otherwise after the writes.
    ///
    /// Raft indexes are unique per write, so a change is exactly one write when no index lies
    /// between it and the state seen last: an update at `ModifyIndex == previous + 1` of the
    /// same incarnation, a delete whose tombstone index is `previous + 1`, a create at
    /// `index + 1` (`index`: the previous answer's, `base`; `None` after it went backwards).
    /// A key deleted and created again in between is one coalesced put.
    async fn order_changes(
        &self,
        old: &BTreeMap<String, DirEntry>,
        new: &BTreeMap<String, DirEntry>,
        header_index: u64,
        base: Option<u64>,
    ) -> Vec<(Diff, bool)> {
        // (position, tie-break, change, exact)
        let mut out: Vec<(u64, u8, Diff, bool)> = Vec::new();
        for e in new.values() {
            let exact = match old.get(&e.key) {
                Some(o) if o.modify_index == e.modify_index => continue,
                Some(o) => {
                    base.is_some()
                        && o.create_index == e.create_index
                        && e.modify_index == o.modify_index + 1
                }
                None => {
                    base.is_some_and(|b| e.create_index == b + 1)
                        && e.create_index == e.modify_index
                }
            };
            out.push((e.modify_index, 1, Diff::Put(e.clone()), exact));
        }
        let deleted: Vec<&String> = old.keys().filter(|k| !new.contains_key(*k)).collect();
        let max_put = out.iter().map(|(i, ..)| *i).max().unwrap_or(0);
        let was = |k: &String| old.get(k).map_or(0, |o| o.modify_index);
        if deleted.len() == 1 && out.is_empty() {
            // The only change: the prefix index is its tombstone's.
            let exact = base.is_some() && header_index == was(deleted[0]) + 1;
            out.push((header_index, 2, Diff::Delete(deleted[0].clone()), exact));
        } else {
            for k in deleted {
                let at = match self.inner.client.kv_get(k, true, Mode::Default, None).await {
                    Ok((live, idx)) => {
                        let live_max = live.iter().map(|e| e.modify_index).max().unwrap_or(0);
                        (idx > live_max).then_some(idx)
                    }
                    Err(_) => None,
                };
                let exact = base.is_some() && at == Some(was(k) + 1);
                out.push((
                    at.unwrap_or(max_put.max(header_index)),
                    2,
                    Diff::Delete(k.clone()),
                    exact,
                ));
            }
        }
        out.sort_by_key(|(i, t, ..)| (*i, *t));
        out.into_iter().map(|(_, _, d, x)| (d, x)).collect()
    }
}
