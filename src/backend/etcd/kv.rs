//! [`KvStore`] over etcd: data key `K` is stored at `<namespace>kv/K`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions as EtcdPut, SortOrder, SortTarget, Txn,
    TxnOp, WatchFilterType, WatchOptions,
};
use tokio::sync::mpsc;

use super::{error, grant_lease, ttl_secs, EtcdStore, Inner, NAME};
use crate::caps::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{validate_key, validate_prefix};
use crate::kv::{
    Consistency, Entry, Expect, KvStore, PutOptions, Version, WatchEvent, WatchStream,
};

impl Inner {
    fn data_key(&self, key: &str) -> String {
        format!("{}{key}", self.kv_prefix)
    }

    /// The coordkit key of an etcd key under the data prefix; `None` for keys that are not
    /// coordkit data keys (not UTF-8, outside the prefix).
    fn user_key(&self, raw: &[u8]) -> Option<String> {
        let s = std::str::from_utf8(raw).ok()?;
        s.strip_prefix(self.kv_prefix.as_str()).map(str::to_string)
    }

    fn entry(&self, kv: &KeyValue) -> Option<Entry> {
        Some(Entry {
            key: self.user_key(kv.key())?,
            value: kv.value().to_vec(),
            version: version_of(kv.mod_revision()),
        })
    }
}

fn version_of(rev: i64) -> Version {
    Version::from_raw(u64::try_from(rev).unwrap_or(0))
}

fn rev_of(v: Version) -> i64 {
    i64::try_from(v.as_raw()).unwrap_or(i64::MAX)
}

fn header_rev(h: Option<&etcd_client::ResponseHeader>) -> Result<i64> {
    h.map(|h| h.revision()).ok_or_else(|| {
        Error::new(
            ErrorKind::Backend,
            NAME,
            "etcd sent a response without a header",
        )
    })
}

impl EtcdStore {
    /// Says where etcd's value limit comes from, on a `ValueTooLarge` error.
    fn explain_limit(&self, e: Error) -> Error {
        if e.kind() != ErrorKind::ValueTooLarge {
            return e;
        }
        e.context(format_args!(
            "etcd's request limit --max-request-bytes={} less {} bytes for key and framing",
            self.inner.config.max_request_bytes,
            super::REQUEST_OVERHEAD
        ))
    }
}

#[async_trait]
impl KvStore for EtcdStore {
    async fn get(&self, key: &str, consistency: Consistency) -> Result<Option<Entry>> {
        validate_key(key)?;
        let inner = &self.inner;
        let mut opts = GetOptions::new();
        if consistency == Consistency::Stale {
            opts = opts.with_serializable();
        }
        let k = inner.data_key(key);
        let resp = inner
            .call("get", Some(key), || {
                let (mut kv, k, o) = (inner.kv.clone(), k.clone(), opts.clone());
                async move { kv.get(k, Some(o)).await }
            })
            .await?;
        Ok(resp.kvs().first().and_then(|kv| inner.entry(kv)))
    }

    async fn put(&self, key: &str, value: Vec<u8>, opts: PutOptions) -> Result<Version> {
        self.caps()
            .check_put(key, &value, &opts)
            .map_err(|e| self.explain_limit(e))?;
        let inner = &self.inner;
        let lease = match opts.ttl {
            Some(ttl) => {
                let secs = ttl_secs(ttl, "key", key)?;
                Some(grant_lease(inner, secs, key).await?)
            }
            None => None,
        };
        let mut put = EtcdPut::new();
        if let Some(id) = lease {
            put = put.with_lease(id);
        }
        let k = inner.data_key(key);
        let resp = inner
            .call("put", Some(key), || {
                let (mut kv, k, v, o) = (inner.kv.clone(), k.clone(), value.clone(), put.clone());
                async move { kv.put(k, v, Some(o)).await }
            })
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                // Revoking the lease deletes every key on it. After `Timeout` or `Unavailable`
                // the put may have been applied (the answer, not the request, may be what was
                // lost), so the lease is left to expire by its TTL: the key, if written, lives
                // out the TTL it was given. Any other error is the server's answer refusing the
                // put, which then changed nothing, and the unused lease is revoked.
                if let Some(id) = lease {
                    if !matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Unavailable) {
                        revoke_quietly(inner, id).await;
                    }
                }
                return Err(e);
            }
        };
        Ok(version_of(header_rev(resp.header())?))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        let inner = &self.inner;
        let k = inner.data_key(key);
        inner
            .call("delete", Some(key), || {
                let (mut kv, k) = (inner.kv.clone(), k.clone());
                async move { kv.delete(k, None).await }
            })
            .await?;
        Ok(())
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        new: Option<Vec<u8>>,
    ) -> Result<Option<Version>> {
        self.caps()
            .check_cas(key, new.as_deref())
            .map_err(|e| self.explain_limit(e))?;
        let inner = &self.inner;
        let k = inner.data_key(key);
        let cmp = match expect {
            // A missing key compares as mod revision 0.
            Expect::Absent => Compare::mod_revision(k.clone(), CompareOp::Equal, 0),
            Expect::Version(v) => Compare::mod_revision(k.clone(), CompareOp::Equal, rev_of(v)),
        };
        if matches!(expect, Expect::Version(v) if v.as_raw() == 0 || rev_of(v) == i64::MAX) {
            return Err(conflict(key, expect));
        }
        let op = match &new {
            Some(v) => vec![TxnOp::put(k.clone(), v.clone(), None)],
            None if matches!(expect, Expect::Absent) => vec![],
            None => vec![TxnOp::delete(k.clone(), None)],
        };
        let txn = Txn::new().when(vec![cmp]).and_then(op);
        let resp = inner
            .call("compare-and-swap", Some(key), || {
                let (mut kv, t) = (inner.kv.clone(), txn.clone());
                async move { kv.txn(t).await }
            })
            .await?;
        if !resp.succeeded() {
            return Err(conflict(key, expect));
        }
        match new {
            Some(_) => Ok(Some(version_of(header_rev(resp.header())?))),
            None => Ok(None),
        }
    }

    async fn list(&self, prefix: &str, consistency: Consistency) -> Result<Vec<Entry>> {
        validate_prefix(prefix)?;
        let inner = &self.inner;
        let mut opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        if consistency == Consistency::Stale {
            opts = opts.with_serializable();
        }
        let k = inner.data_key(prefix);
        let resp = inner
            .call("list", Some(prefix), || {
                let (mut kv, k, o) = (inner.kv.clone(), k.clone(), opts.clone());
                async move { kv.get(k, Some(o)).await }
            })
            .await?;
        Ok(resp.kvs().iter().filter_map(|kv| inner.entry(kv)).collect())
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream> {
        validate_prefix(prefix)?;
        let inner = self.inner.clone();
        let etcd_prefix = inner.data_key(prefix);
        let (stream, created_rev) = open_watch(&inner, &etcd_prefix, 0, prefix, false).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(pump(
            inner,
            etcd_prefix,
            prefix.to_string(),
            stream,
            created_rev,
            tx,
        ));
        Ok(Box::pin(stream_from(rx)))
    }

    fn capabilities(&self) -> Capabilities {
        self.caps()
    }
}

fn stream_from<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

fn conflict(key: &str, expect: Expect) -> Error {
    let what = match expect {
        Expect::Absent => "the key exists".to_string(),
        Expect::Version(v) => format!("the key is not at version {v}"),
    };
    Error::new(
        ErrorKind::Conflict,
        NAME,
        format!("compare-and-swap failed: {what}"),
    )
    .with_key(key)
}

async fn revoke_quietly(inner: &Inner, id: i64) {
    let _ = inner
        .call("revoking a lease", None, || {
            let mut lease = inner.lease.clone();
            async move { lease.revoke(id).await }
        })
        .await;
}

/// Opens a watch on `etcd_prefix` from `start_rev` (0: now) and waits until etcd confirms it;
/// returns the stream and the revision it was created at.
///
/// A watch whose start revision was compacted gives `WatchGap`.
pub(crate) async fn open_watch(
    inner: &Inner,
    etcd_prefix: &str,
    start_rev: i64,
    shown: &str,
    deletes_only: bool,
) -> Result<(etcd_client::WatchStream, i64)> {
    let mut opts = WatchOptions::new().with_prefix();
    if deletes_only {
        opts = opts.with_filters([WatchFilterType::NoPut]);
    }
    if start_rev > 0 {
        opts = opts.with_start_revision(start_rev);
    }
    if !deletes_only {
        // The server's timed progress notifications (no events, the header's revision) let a
        // watch of a quiet prefix advance its resume point. Only the timed ones are used: a
        // progress notification *requested* by the client can overtake events still queued on
        // etcd before 3.4.24 / 3.5.8 (etcd issue 15220), and using it would skip them.
        opts = opts.with_progress_notify();
    }
    // Ok(Err(compact_revision)): the start revision was compacted.
    let opened = inner
        .call("watch", Some(shown), || {
            let (mut client, key, opts) =
                (inner.watch.clone(), etcd_prefix.to_string(), opts.clone());
            async move {
                let mut stream = client.watch(key, Some(opts)).await?;
                loop {
                    match stream.message().await? {
                        Some(resp) if resp.canceled() => {
                            if resp.compact_revision() > 0 {
                                return Ok(Err(Refused::Compacted(resp.compact_revision())));
                            }
                            if is_denied(resp.cancel_reason()) {
                                return Ok(Err(Refused::Denied(resp.cancel_reason().to_string())));
                            }
                            return Err(etcd_client::Error::WatchError(format!(
                                "etcd canceled the watch at creation: {}",
                                resp.cancel_reason()
                            )));
                        }
                        Some(resp) if resp.created() => {
                            let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                            return Ok(Ok((stream, rev)));
                        }
                        Some(_) => continue,
                        None => {
                            return Err(etcd_client::Error::WatchError(
                                "watch stream closed before it was created".into(),
                            ))
                        }
                    }
                }
            }
        })
        .await?;
    opened.map_err(|refused| match refused {
        Refused::Compacted(compacted) => gap(shown, start_rev - 1, compacted),
        Refused::Denied(reason) => denied(shown, &reason),
    })
}

/// Why etcd refused to create a watch, when that is final.
enum Refused {
    /// The start revision was compacted (up to this revision).
    Compacted(i64),
    /// The credentials do not allow reading the prefix.
    Denied(String),
}

/// Whether a watch's cancel reason says that the credentials do not allow it.
fn is_denied(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    r.contains("permission denied")
        || r.contains("invalid auth token")
        || r.contains("user name is empty")
}

fn denied(shown: &str, reason: &str) -> Error {
    Error::new(
        ErrorKind::PermissionDenied,
        NAME,
        format!("etcd refused the watch: {reason}"),
    )
    .with_key(shown)
}

/// Errors after which re-watching cannot help: the stream ends with them.
fn is_final(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::WatchGap | ErrorKind::PermissionDenied)
}

/// One event of an etcd watch response, classified without `Event::event_type` (which panics
/// on a type it does not know): a delete event carries the key with version 0.
pub(crate) enum RawEvent {
    Put(KeyValue),
    Delete(KeyValue),
}

pub(crate) fn classify(ev: &etcd_client::Event) -> Option<RawEvent> {
    let kv = ev.kv()?.clone();
    if kv.version() == 0 {
        Some(RawEvent::Delete(kv))
    } else {
        Some(RawEvent::Put(kv))
    }
}

/// Moves events from etcd to the user's stream; on a dropped stream it re-watches from the
/// revision after the last one delivered.
async fn pump(
    inner: Arc<Inner>,
    etcd_prefix: String,
    shown: String,
    mut stream: etcd_client::WatchStream,
    created_rev: i64,
    tx: mpsc::Sender<Result<WatchEvent>>,
) {
    // Every event at or below `delivered` has been handed over.
    let mut delivered = created_rev;
    let mut backoff = Duration::from_millis(50);
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return,
            m = stream.message() => m,
        };
        match next {
            Ok(Some(resp)) => {
                backoff = Duration::from_millis(50);
                if resp.canceled() {
                    if resp.compact_revision() > 0 {
                        let _ = tx
                            .send(Err(gap(&shown, delivered, resp.compact_revision())))
                            .await;
                        return;
                    }
                    if is_denied(resp.cancel_reason()) {
                        let _ = tx.send(Err(denied(&shown, resp.cancel_reason()))).await;
                        return;
                    }
                    // Canceled for another reason (no leader, …): re-watch.
                } else {
                    for ev in resp.events() {
                        let Some(raw) = classify(ev) else { continue };
                        let (kv, is_put) = match &raw {
                            RawEvent::Put(kv) => (kv, true),
                            RawEvent::Delete(kv) => (kv, false),
                        };
                        if kv.mod_revision() <= delivered {
                            continue; // already delivered before a resume
                        }
                        let Some(key) = inner.user_key(kv.key()) else {
                            continue;
                        };
                        let event = if is_put {
                            WatchEvent::Put(Entry {
                                key,
                                value: kv.value().to_vec(),
                                version: version_of(kv.mod_revision()),
                            })
                        } else {
                            WatchEvent::Delete { key }
                        };
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    // All events of one revision arrive in one response: everything up to
                    // the last event's revision is delivered.
                    if let Some(last) = resp.events().iter().filter_map(|e| e.kv()).next_back() {
                        delivered = delivered.max(last.mod_revision());
                    } else if !resp.created() {
                        // A timed progress notification: every event of this prefix up to the
                        // header's revision has been sent (on the same stream, before it).
                        if let Some(h) = resp.header() {
                            delivered = delivered.max(h.revision());
                        }
                    }
                    continue;
                }
            }
            Ok(None) => {}
            Err(e) => {
                let e = error::map(e, "watch");
                if is_final(e.kind()) {
                    let _ = tx.send(Err(e.with_key(shown.clone()))).await;
                    return;
                }
                tracing::debug!(prefix = %shown, error = %e, "watch stream broke; resuming");
            }
        }
        // Re-watch from the revision after the last delivered one, until it works, the user
        // drops the stream, or history turns out to be compacted.
        loop {
            if tx.is_closed() {
                return;
            }
            match open_watch(&inner, &etcd_prefix, delivered + 1, &shown, false).await {
                Ok((s, _)) => {
                    stream = s;
                    break;
                }
                Err(e) if is_final(e.kind()) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(e) => {
                    tracing::debug!(prefix = %shown, error = %e, "re-watch failed; retrying");
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

fn gap(shown: &str, delivered: i64, compacted: i64) -> Error {
    Error::new(
        ErrorKind::WatchGap,
        NAME,
        format!(
            "events after revision {delivered} are no longer available: etcd compacted its \
             history up to revision {compacted}; start a new watch and re-read"
        ),
    )
    .with_key(shown)
}
