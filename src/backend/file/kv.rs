//! `KvStore` for [`FileStore`]: one bucket file per MD5 of the key (`kv/<32 hex>`, holding the
//! keys with that hash), written whole by rename; the change log as the write-ahead log and
//! the watches' source; `ttl/` markers for the buckets that hold keys with a TTL.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::codec::{bucket_name, open_file, seal_file, Dec, Enc};
use super::log::{Change, Cursor, Read};
use super::{
    corrupt, flock, io_err, lock, read_opt, remove_durably, write_atomic, FileStore, Flock,
    HostClock, Inner, NAME, RECHECK,
};
use crate::caps::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{matches_prefix, validate_key, validate_prefix};
use crate::kv::{
    Consistency, Entry, Expect, KvStore, PutOptions, Version, WatchEvent, WatchStream,
};

const BUCKET_MAGIC: &[u8; 4] = b"CKV1";

/// How many bytes of the log a watch reads at a time.
const WATCH_READ: usize = 1 << 20;

/// One key in a bucket file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KvEntry {
    key: String,
    value: Vec<u8>,
    version: u64,
    expires: Option<(String, i64)>,
}

impl KvEntry {
    fn live(&self, clock: &HostClock) -> bool {
        match &self.expires {
            None => true,
            Some((boot, at)) => clock.live(Some(boot), Some(*at)),
        }
    }

    fn entry(self) -> Entry {
        Entry {
            key: self.key,
            value: self.value,
            version: Version::from_raw(self.version),
        }
    }
}

fn bucket_path(dir: &Path, key: &str) -> PathBuf {
    dir.join("kv").join(bucket_name(key))
}

fn read_bucket_file(path: &Path) -> Result<Vec<KvEntry>> {
    let Some(bytes) = read_opt(path)? else {
        return Ok(Vec::new());
    };
    let body = open_file(BUCKET_MAGIC, &bytes).ok_or_else(|| corrupt(path))?;
    let mut d = Dec::new(body);
    let mut out = Vec::new();
    while !d.is_empty() {
        let e = (|| {
            Some(KvEntry {
                key: d.string()?,
                value: d.bytes()?.to_vec(),
                version: d.u64()?,
                expires: d.expiry()?,
            })
        })()
        .ok_or_else(|| corrupt(path))?;
        out.push(e);
    }
    Ok(out)
}

fn write_bucket_file(dir: &Path, path: &Path, entries: &[KvEntry]) -> Result<()> {
    if entries.is_empty() {
        return remove_durably(dir, path);
    }
    let mut e = Enc::default();
    for x in entries {
        e.str(&x.key)
            .bytes(&x.value)
            .u64(x.version)
            .expiry(&x.expires);
    }
    write_atomic(dir, path, &seal_file(BUCKET_MAGIC, &e.0))
}

/// A `ttl/<bucket>.<expiry ms>.<boot id>` marker: the bucket holds a key with a TTL.
#[derive(Debug, Clone)]
pub(crate) struct TtlMarker {
    pub(crate) bucket: String,
    /// When it is due, in host clock ms (now, for a marker of another boot).
    pub(crate) at: i64,
    file: PathBuf,
}

pub(crate) fn ttl_markers(dir: &Path) -> Result<Vec<TtlMarker>> {
    let clock = HostClock::new();
    let ttl = dir.join("ttl");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&ttl).map_err(|e| io_err(e, format!("listing {}", ttl.display())))? {
        let e = e.map_err(|e| io_err(e, format!("listing {}", ttl.display())))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let mut parts = name.splitn(3, '.');
        let (Some(bucket), Some(at), Some(boot)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Ok(at) = at.parse::<i64>() else { continue };
        out.push(TtlMarker {
            bucket: bucket.to_string(),
            at: if boot == clock.boot { at } else { i64::MIN },
            file: e.path(),
        });
    }
    Ok(out)
}

/// A write critical section: the store's flock, and this process's log cursor caught up to
/// the end of the log.
pub(crate) struct Section<'a> {
    inner: &'a Inner,
    head: std::sync::MutexGuard<'a, Cursor>,
    _flock: Flock,
}

impl<'a> Section<'a> {
    /// Takes the store's lock and catches up with the log: cuts off a torn append, finishes a
    /// seal, and applies the last change if its writer died before applying it.
    pub(crate) fn enter(inner: &'a Inner) -> Result<Section<'a>> {
        let mut head = lock(&inner.head);
        let fl = flock(&inner.path("store.lock"), true, inner.cfg.lock_timeout)?;
        let what = "reading the change log";
        let log_dir = inner.path("log");
        loop {
            match head.read(usize::MAX).map_err(|e| io_err(e, what))? {
                Read::Changes(c) if c.is_empty() => break,
                Read::Changes(c) => note_expiries(inner, &c),
                // This process was idle while the log was pruned past it: start at the end.
                Read::Gap { .. } => {
                    *head = Cursor::at_end(&log_dir, true).map_err(|e| io_err(e, what))?
                }
            }
        }
        if head.torn().map_err(|e| io_err(e, what))? {
            head.repair_seal().map_err(|e| io_err(e, what))?;
            while let Read::Changes(c) = head.read(usize::MAX).map_err(|e| io_err(e, what))? {
                if c.is_empty() {
                    break;
                }
            }
            if head.torn().map_err(|e| io_err(e, what))? {
                head.cut_torn().map_err(|e| io_err(e, what))?;
            }
        }
        let mut s = Section {
            inner,
            head,
            _flock: fl,
        };
        s.redo()?;
        Ok(s)
    }

    /// Makes sure the key files hold the last logged change (a writer that died between the
    /// append and the rename left it undone).
    fn redo(&mut self) -> Result<()> {
        let rev = self.head.rev;
        if *lock(&self.inner.applied) >= rev {
            return Ok(());
        }
        if let Some(change) = self.head.last.clone() {
            if change.rev() == Some(rev) {
                self.apply(&change)?;
            }
        }
        *lock(&self.inner.applied) = rev;
        Ok(())
    }

    /// The store's current revision.
    pub(crate) fn rev(&self) -> u64 {
        self.head.rev
    }

    pub(crate) fn read(&self, key: &str) -> Result<Option<KvEntry>> {
        let path = bucket_path(&self.inner.cfg.dir, key);
        Ok(read_bucket_file(&path)?
            .into_iter()
            .find(|e| e.key == key && e.live(&self.inner.clock)))
    }

    /// Logs `change` (the commit) and applies it to the key files.
    fn commit(&mut self, change: Change) -> Result<u64> {
        let rev = change.rev().unwrap_or_default();
        self.head
            .append(change.clone())
            .map_err(|e| io_err(e, "appending to the change log"))?;
        self.apply(&change)?;
        *lock(&self.inner.applied) = rev;
        self.head
            .roll(super::log::SEGMENT_BYTES, self.inner.cfg.changes_kept)
            .map_err(|e| io_err(e, "starting a change log segment"))?;
        Ok(rev)
    }

    fn apply(&self, change: &Change) -> Result<()> {
        let dir = &self.inner.cfg.dir;
        let (key, new) = match change {
            Change::Put {
                rev,
                key,
                value,
                expires,
            } => (
                key,
                Some(KvEntry {
                    key: key.clone(),
                    value: value.clone(),
                    version: *rev,
                    expires: expires.clone(),
                }),
            ),
            Change::Delete { key, .. } => (key, None),
            Change::Seal { .. } => return Ok(()),
        };
        let path = bucket_path(dir, key);
        let mut entries = read_bucket_file(&path)?;
        let rev = change.rev().unwrap_or_default();
        let old = entries.iter().position(|e| e.key == *key);
        match old.map(|i| &entries[i]) {
            // Applied already (this is a redo).
            Some(e) if e.version >= rev => return Ok(()),
            None if new.is_none() => return Ok(()),
            _ => {}
        }
        if let Some(old) = old.map(|i| entries.remove(i)) {
            // The replaced key's TTL marker goes, unless another key of the bucket shares it.
            if let Some((boot, at)) = &old.expires {
                let shared = entries.iter().any(|e| e.expires == old.expires);
                if !shared {
                    let marker = dir
                        .join("ttl")
                        .join(format!("{}.{at}.{boot}", bucket_name(key)));
                    let _ = std::fs::remove_file(marker);
                }
            }
        }
        if let Some(e) = new {
            if let Some((boot, at)) = &e.expires {
                mark_ttl(dir, &bucket_name(key), *at, boot)?;
                let mut due = lock(&self.inner.next_due);
                *due = Some(due.map_or(*at, |d| d.min(*at)));
            }
            entries.push(e);
        }
        write_bucket_file(dir, &path, &entries)
    }

    pub(crate) fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<std::time::Duration>,
    ) -> Result<u64> {
        let clock = &self.inner.clock;
        let expires = ttl.map(|t| (clock.boot.clone(), clock.expiry(t)));
        let rev = self.rev() + 1;
        self.commit(Change::Put {
            rev,
            key: key.to_string(),
            value,
            expires,
        })
    }

    /// Deletes `key` if it is there (live); whether it was.
    pub(crate) fn delete(&mut self, key: &str) -> Result<bool> {
        if self.read(key)?.is_none() {
            return Ok(false);
        }
        let rev = self.rev() + 1;
        self.commit(Change::Delete {
            rev,
            key: key.to_string(),
        })?;
        Ok(true)
    }

    /// Deletes the keys whose TTL ran out (a delete in the log for each), if any is due.
    pub(crate) fn reap(&mut self) -> Result<()> {
        let now = self.inner.clock.now_ms();
        if lock(&self.inner.next_due).is_none_or(|d| d > now) {
            return Ok(());
        }
        let dir = self.inner.cfg.dir.clone();
        let markers = ttl_markers(&dir)?;
        let mut next: Option<i64> = None;
        let mut done = std::collections::HashSet::new();
        for m in &markers {
            if m.at > now {
                next = Some(next.map_or(m.at, |n| n.min(m.at)));
                continue;
            }
            if !done.insert(m.bucket.clone()) {
                continue;
            }
            let path = dir.join("kv").join(&m.bucket);
            let entries = read_bucket_file(&path)?;
            for e in entries
                .iter()
                .filter(|e| e.expires.is_some() && !e.live(&self.inner.clock))
            {
                let rev = self.rev() + 1;
                self.commit(Change::Delete {
                    rev,
                    key: e.key.clone(),
                })?;
            }
            // The keys with a TTL still there get a marker of their own.
            for e in read_bucket_file(&path)? {
                if let Some((boot, at)) = &e.expires {
                    mark_ttl(&dir, &m.bucket, *at, boot)?;
                    next = Some(next.map_or(*at, |n| n.min(*at)));
                }
            }
        }
        for m in markers.iter().filter(|m| m.at <= now) {
            let _ = std::fs::remove_file(&m.file);
        }
        *lock(&self.inner.next_due) = next;
        Ok(())
    }
}

fn mark_ttl(dir: &Path, bucket: &str, at: i64, boot: &str) -> Result<()> {
    let path = dir.join("ttl").join(format!("{bucket}.{at}.{boot}"));
    if path.exists() {
        return Ok(());
    }
    write_atomic(dir, &path, b"")
}

/// Notes the expiries of TTL puts read from the log (by any process), for the reaper.
fn note_expiries(inner: &Inner, changes: &[Change]) {
    let mut due = lock(&inner.next_due);
    for c in changes {
        if let Change::Put {
            expires: Some((_, at)),
            ..
        } = c
        {
            *due = Some(due.map_or(*at, |d| d.min(*at)));
        }
    }
}

impl Inner {
    /// Runs `f` in a write critical section on the blocking pool, after reaping expired keys.
    pub(crate) async fn write<T, F>(self: &Arc<Self>, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Section<'_>) -> Result<T> + Send + 'static,
    {
        self.blocking(what, move |inner| {
            let mut s = Section::enter(inner)?;
            s.reap()?;
            f(&mut s)
        })
        .await
    }
}

fn conflict(expect: &Expect, found: Option<&KvEntry>) -> Error {
    let found = found.map_or("no key".to_string(), |c| format!("version {}", c.version));
    Error::new(
        ErrorKind::Conflict,
        NAME,
        format!("expected {expect:?}, found {found}"),
    )
}

#[async_trait]
impl KvStore for FileStore {
    async fn get(&self, key: &str, _consistency: Consistency) -> Result<Option<Entry>> {
        validate_key(key)?;
        let k = key.to_string();
        self.inner
            .blocking("get", move |inner| {
                let path = bucket_path(&inner.cfg.dir, &k);
                Ok(read_bucket_file(&path)?
                    .into_iter()
                    .find(|e| e.key == k && e.live(&inner.clock))
                    .map(KvEntry::entry))
            })
            .await
            .map_err(|e| e.with_key(key))
    }

    async fn put(&self, key: &str, value: Vec<u8>, opts: PutOptions) -> Result<Version> {
        Self::caps().check_put(key, &value, &opts)?;
        let k = key.to_string();
        self.inner
            .write("put", move |s| s.put(&k, value, opts.ttl))
            .await
            .map(Version::from_raw)
            .map_err(|e| e.with_key(key))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        let k = key.to_string();
        self.inner
            .write("delete", move |s| s.delete(&k))
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
            .write("compare-and-swap", move |s| {
                let cur = s.read(&k)?;
                let holds = match expect {
                    Expect::Absent => cur.is_none(),
                    Expect::Version(v) => cur.as_ref().is_some_and(|c| c.version == v.as_raw()),
                };
                if !holds {
                    return Err(conflict(&expect, cur.as_ref()));
                }
                match new {
                    // A compare-and-swap writes a permanent key, as on every backend.
                    Some(v) => s.put(&k, v, None).map(|r| Some(Version::from_raw(r))),
                    None => s.delete(&k).map(|_| None),
                }
            })
            .await
            .map_err(|e| e.with_key(key))
    }

    async fn list(&self, prefix: &str, _consistency: Consistency) -> Result<Vec<Entry>> {
        validate_prefix(prefix)?;
        let p = prefix.to_string();
        self.inner
            .blocking("list", move |inner| {
                // A shared hold of the store's lock: no write runs while the buckets are read,
                // so the list is one state of the store.
                let _l = flock(&inner.path("store.lock"), false, inner.cfg.lock_timeout)?;
                let kv = inner.path("kv");
                let mut out = Vec::new();
                for e in std::fs::read_dir(&kv).map_err(|e| io_err(e, "listing kv/"))? {
                    let e = e.map_err(|e| io_err(e, "listing kv/"))?;
                    for x in read_bucket_file(&e.path())? {
                        if matches_prefix(&x.key, &p) && x.live(&inner.clock) {
                            out.push(x.entry());
                        }
                    }
                }
                out.sort_by(|a, b| a.key.cmp(&b.key));
                Ok(out)
            })
            .await
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream> {
        validate_prefix(prefix)?;
        let (cursor, due) = self
            .inner
            .blocking("watch", |inner| {
                let what = "reading the change log";
                let mut head = lock(&inner.head);
                // Caught up without the store's lock: an append in progress is not complete,
                // so it comes after the watch's start.
                loop {
                    match head.read(usize::MAX).map_err(|e| io_err(e, what))? {
                        Read::Changes(c) if c.is_empty() => break,
                        Read::Changes(c) => note_expiries(inner, &c),
                        Read::Gap { .. } => {
                            *head = Cursor::at_end(&inner.path("log"), true)
                                .map_err(|e| io_err(e, what))?
                        }
                    }
                }
                let due = ttl_markers(&inner.cfg.dir)?.iter().map(|m| m.at).min();
                Ok((head.reader().map_err(|e| io_err(e, what))?, due))
            })
            .await?;
        let (tx, mut rx) = mpsc::channel(1024);
        tokio::spawn(watch_loop(
            self.inner.clone(),
            prefix.to_string(),
            cursor,
            due,
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

async fn watch_loop(
    inner: Arc<Inner>,
    prefix: String,
    mut cursor: Cursor,
    mut due: Option<i64>,
    tx: mpsc::Sender<Result<WatchEvent>>,
) {
    let waker = inner.waker("log");
    loop {
        // Enabled before the read: an append after it wakes this task.
        let notified = waker.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let read = tokio::task::spawn_blocking(move || {
            let r = cursor.read(WATCH_READ);
            (cursor, r)
        })
        .await;
        let (c, read) = match read {
            Ok(x) => x,
            Err(e) => {
                let _ = tx
                    .send(Err(Error::new(
                        ErrorKind::Backend,
                        NAME,
                        format!("watch: {e}"),
                    )))
                    .await;
                return;
            }
        };
        cursor = c;
        let changes = match read {
            Ok(Read::Changes(c)) => c,
            Ok(Read::Gap { next }) => {
                let _ = tx
                    .send(Err(Error::new(
                        ErrorKind::WatchGap,
                        NAME,
                        format!(
                            "the change log no longer holds revision {next} (it keeps the last {} changes)",
                            inner.cfg.changes_kept
                        ),
                    )))
                    .await;
                return;
            }
            Err(e) => {
                let _ = tx
                    .send(Err(io_err(e, "watch: reading the change log")))
                    .await;
                return;
            }
        };
        let any = !changes.is_empty();
        for c in changes {
            let ev = match c {
                Change::Put {
                    rev,
                    key,
                    value,
                    expires,
                } => {
                    if let Some((_, at)) = expires {
                        due = Some(due.map_or(at, |d| d.min(at)));
                    }
                    if !matches_prefix(&key, &prefix) {
                        continue;
                    }
                    WatchEvent::Put(Entry {
                        key,
                        value,
                        version: Version::from_raw(rev),
                    })
                }
                Change::Delete { key, .. } if matches_prefix(&key, &prefix) => {
                    WatchEvent::Delete { key }
                }
                _ => continue,
            };
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
        if any {
            continue;
        }
        // A key whose TTL ran out is deleted (and its delete logged) by whoever looks first.
        if due.is_some_and(|at| at <= inner.clock.now_ms()) {
            if let Err(e) = inner.write("reap", |_| Ok(())).await {
                if e.kind() != ErrorKind::Timeout {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
            due = *lock(&inner.next_due);
            continue;
        }
        let until_due = due
            .map(|at| std::time::Duration::from_millis((at - inner.clock.now_ms()).max(0) as u64));
        let sleep = until_due.map_or(RECHECK, |d| d.min(RECHECK));
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(sleep) => {}
            _ = tx.closed() => return,
        }
    }
}
