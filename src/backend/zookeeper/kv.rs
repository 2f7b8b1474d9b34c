//! [`KvStore`] on znodes.
//!
//! - A key is one znode whose data is the value, unchanged (no header). Its parents are
//!   container znodes named `<segment>~` (see [`super::path`]).
//! - A permanent key is a persistent znode without children, or a znode (persistent or TTL)
//!   with one child `~keep`.
//! - A key with a TTL is a ZooKeeper TTL znode with one child `~ttl`, itself a TTL znode with the
//!   same TTL, whose data is the TTL in milliseconds (decimal). Both are created in one `multi`
//!   (so they share their `czxid`), and every write of the key writes both in one `multi`, so
//!   they share their `mtime`. ZooKeeper hides a TTL znode's type from clients (the stat's
//!   `ephemeralOwner` reads 0 for TTL and container znodes: `DataNode.copyStat`), so this child
//!   is how every client reads a key's kind and TTL from the server. The server reaps `~ttl`
//!   first (a znode with children is never reaped), then the key: a key znode that has had
//!   children (`cversion` > 0) and has none is an expired TTL key whose `~ttl` was reaped.
//! - Making a TTL key permanent is one `multi` on the same znode: write the value (with the data
//!   version read as precondition), delete `~ttl`, create `~keep` (ZooKeeper never reaps a znode
//!   with children); watchers see a put. Giving a key a TTL, or another TTL, is one `multi` too:
//!   delete the key's child and the key (with the data version as precondition), create the
//!   new key and its child. Readers never see the key missing; watchers see a delete, then a
//!   put.
//! - Expired keys are not returned: a TTL key expires at its `mtime` + TTL in the server's
//!   clock, compared with a lower bound of the server's current time (the `mtime` of this
//!   client's latest write, plus the local time elapsed since its answer came). Without a
//!   recent write a read of a TTL key samples the clock by writing `<root>/kv/~clock`.
//! - [`Version`] is the znode's `mzxid`: the zxid of the write that produced the value. It is
//!   unique per write across the whole ensemble and never reused, also when a key is deleted and
//!   created again, so a version read before a delete never matches the re-created key.
//! - CAS on a version reads the znode's stat, compares its `mzxid`, and writes with the stat's
//!   data version as ZooKeeper's own precondition (`setData`/`delete` with version). A CAS write
//!   makes the key permanent, as on every backend.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use zookeeper_client as zk;

use super::error::err;
use super::path::{self, CLOCK, PIN, TTL_MARK};
use super::{e_zk, lock_std, Inner, ZkStore};
use crate::caps::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{matches_prefix, validate_key, validate_prefix};
use crate::kv::{Consistency, Entry, Expect, KvStore, PutOptions, Version, WatchStream};

/// How often a write retries after racing with a concurrent create/delete of the same znode
/// or of a parent container.
const RETRIES: usize = 32;
/// The largest TTL a TTL znode can carry (40 bits of milliseconds).
pub(crate) const TTL_MAX_MS: u64 = 0x00FF_FFFF_FFFF;
/// How long a server-time sample is used before a read of a TTL key takes a new one.
const CLOCK_MAX_AGE: Duration = Duration::from_secs(30);

fn version_of(stat: &zk::Stat) -> Version {
    Version::from_raw(stat.mzxid as u64)
}

fn is(e: &Error, z: zk::Error) -> bool {
    e_zk(e) == Some(&z)
}

/// An error that means the key changed under a write: read it again and retry.
fn raced(e: &Error) -> bool {
    is(e, zk::Error::BadVersion) || is(e, zk::Error::NoNode) || is(e, zk::Error::NodeExists)
}

fn conflict(key: &str, msg: impl Into<String>) -> Error {
    err(ErrorKind::Conflict, key, msg)
}

/// What a read for a write found at a key's znode.
enum NodeState {
    /// A znode holding a live key.
    Live(Node),
    /// A znode whose key expired (or is half reaped): absent for the caller, replaced by a write.
    Dead(Node),
    /// No znode.
    Absent,
}

/// A key znode's kind, as the server shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A persistent znode (maybe pinned with `~keep`).
    Permanent,
    /// A TTL key: its TTL, and its deadline in the server's clock (ms since the epoch).
    Ttl { ttl_ms: u64, deadline_ms: i64 },
    /// A TTL key whose `~ttl` child the server already reaped; the key goes next.
    Reaped,
}

/// A key znode read with its `~ttl` child.
struct Node {
    stat: zk::Stat,
    data: Vec<u8>,
    kind: Kind,
}

impl Node {
    /// Whether the key counts as absent at server time `now_ms`.
    fn expired(&self, now_ms: i64) -> bool {
        match self.kind {
            Kind::Permanent => false,
            Kind::Reaped => true,
            Kind::Ttl { deadline_ms, .. } => now_ms >= deadline_ms,
        }
    }
}

fn mark_of(path: &str) -> String {
    format!("{path}/{TTL_MARK}")
}

/// The kind of key znode `stat`, given the answer for its `~ttl` child.
fn classify(stat: &zk::Stat, mark: std::result::Result<(Vec<u8>, zk::Stat), zk::Error>) -> Kind {
    if let Ok((data, m)) = mark {
        // Created with the key in one multi; a `~ttl` of another incarnation (the key was
        // replaced between the two reads) does not count.
        if m.czxid == stat.czxid {
            if let Some(ttl_ms) = std::str::from_utf8(&data)
                .ok()
                .and_then(|t| t.parse::<u64>().ok())
            {
                return Kind::Ttl {
                    ttl_ms,
                    deadline_ms: m.mtime.saturating_add(ttl_ms as i64),
                };
            }
        }
    }
    if stat.num_children == 0 && stat.cversion > 0 {
        Kind::Reaped
    } else {
        Kind::Permanent
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Inner {
    async fn sync(&self, client: &zk::Client, key: &str) -> Result<()> {
        self.synced(client, key).await
    }

    /// Sends a sync of the root at once (before the returned future is polled), so that
    /// requests sent after this call are answered after the sync.
    fn synced<'a>(
        &'a self,
        client: &'a zk::Client,
        key: &'a str,
    ) -> impl std::future::Future<Output = Result<()>> + 'a {
        let at = if self.root.is_empty() {
            "/"
        } else {
            &self.root
        };
        let sent = client.sync(at);
        self.bounded("sync", key, sent)
    }

    /// Records a server-time sample: the `mtime` of a write whose answer just arrived.
    fn clock_sample(&self, stat: &zk::Stat) {
        *lock_std(&self.server_clock) = Some((stat.mtime, Instant::now()));
    }

    /// A lower bound of the server's current time (ms): the latest write's `mtime` plus the
    /// time elapsed here since its answer. Without a sample younger than [`CLOCK_MAX_AGE`],
    /// writes `<root>/kv/~clock` to take one; if that fails (no write permission), falls back
    /// to this machine's wall clock.
    async fn server_now_ms(&self, client: &zk::Client, key: &str) -> i64 {
        if let Some((ms, at)) = *lock_std(&self.server_clock) {
            if at.elapsed() < CLOCK_MAX_AGE {
                return ms.saturating_add(at.elapsed().as_millis() as i64);
            }
        }
        let probe = format!("{}/kv/{CLOCK}", self.root);
        let opts = zk::CreateMode::Persistent.with_acls(self.acls());
        let mut sampled = self
            .bounded("clock", key, client.set_data(&probe, b"", None))
            .await;
        if sampled.as_ref().is_err_and(|e| is(e, zk::Error::NoNode)) {
            sampled = match self
                .bounded("clock", key, client.create(&probe, b"", &opts))
                .await
            {
                Ok((stat, _)) => Ok(stat),
                Err(e) => Err(e),
            };
        }
        match sampled {
            Ok(stat) => {
                self.clock_sample(&stat);
                stat.mtime
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot sample the ZooKeeper server's clock; using the local clock");
                wall_ms()
            }
        }
    }

    /// Reads key znode `path`, and its `~ttl` child only if the znode has children (a TTL key
    /// always has one, created in the same `multi`; a childless znode is permanent or reaped,
    /// which its stat tells). A permanent key costs one packet. `data`: read the value too
    /// (otherwise only the stat).
    async fn read_node(
        &self,
        client: &zk::Client,
        key: &str,
        path: &str,
        data: bool,
    ) -> Result<Option<Node>> {
        let node = if data {
            self.bounded("get", key, async {
                match client.get_data(path).await {
                    Ok((d, s)) => Ok(Some((d, s))),
                    Err(zk::Error::NoNode) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?
        } else {
            self.bounded("stat", key, client.check_stat(path))
                .await?
                .map(|s| (Vec::new(), s))
        };
        let Some((data, stat)) = node else {
            return Ok(None);
        };
        let mark = if stat.num_children > 0 {
            let m = mark_of(path);
            let read = self
                .bounded("get", key, async {
                    match client.get_data(&m).await {
                        Ok(r) => Ok(Some(r)),
                        // The child is gone: an answer, not a failure.
                        Err(zk::Error::NoNode) => Ok(None),
                        Err(e) => Err(e),
                    }
                })
                .await?;
            read.ok_or(zk::Error::NoNode)
        } else {
            Err(zk::Error::NoNode)
        };
        Ok(Some(Node {
            kind: classify(&stat, mark),
            stat,
            data,
        }))
    }

    /// Reads key znode `path` for a write, in one read: `Live` if it holds a key, `Dead` if a
    /// znode is there but its key expired (or is half reaped), `Absent` if there is none.
    async fn node_state(&self, client: &zk::Client, key: &str, path: &str) -> Result<NodeState> {
        let Some(node) = self.read_node(client, key, path, false).await? else {
            return Ok(NodeState::Absent);
        };
        let expired = match node.kind {
            Kind::Permanent => false,
            Kind::Reaped => true,
            Kind::Ttl { .. } => node.expired(self.server_now_ms(client, key).await),
        };
        Ok(if expired {
            NodeState::Dead(node)
        } else {
            NodeState::Live(node)
        })
    }

    /// Creates a permanent key at `path`, creating parents as needed. `Ok(None)` if it exists.
    async fn create_key(
        &self,
        client: &zk::Client,
        key: &str,
        path: &str,
        value: &[u8],
    ) -> Result<Option<zk::Stat>> {
        let opts = zk::CreateMode::Persistent.with_acls(self.acls());
        for _ in 0..RETRIES {
            match self
                .bounded("create", key, client.create(path, value, &opts))
                .await
            {
                Ok((stat, _)) => {
                    self.clock_sample(&stat);
                    return Ok(Some(stat));
                }
                Err(e) if is(&e, zk::Error::NodeExists) => return Ok(None),
                Err(e) if is(&e, zk::Error::NoNode) => {
                    self.ensure_parents(client, path, key).await?
                }
                Err(e) => return Err(e),
            }
        }
        Err(err(
            ErrorKind::Unavailable,
            key,
            "parent directories keep vanishing",
        ))
    }

    /// One `multi` that (if `old` is given) deletes the key znode `old` (its child first, with
    /// its data version as precondition) and creates the key anew: a TTL znode with its `~ttl`
    /// child, or (`ttl` None) a persistent znode pinned with `~keep`. The last op writes the
    /// child again so that the answer carries a stat (ZooKeeper before 3.8.1 answers creates in
    /// a multi without one), whose `mzxid` is the multi's zxid: the key's version.
    async fn replace(
        &self,
        client: &zk::Client,
        key: &str,
        path: &str,
        old: Option<&Node>,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<zk::Stat> {
        let map = |e| super::error::map(e, "put", key);
        let mut w = client.new_multi_writer();
        if let Some(old) = old {
            if old.stat.num_children > 0 {
                let child = match old.kind {
                    Kind::Ttl { .. } => mark_of(path),
                    _ => format!("{path}/{PIN}"),
                };
                w.add_delete(&child, None).map_err(map)?;
            }
            w.add_delete(path, Some(old.stat.version)).map_err(map)?;
        }
        let persistent = zk::CreateMode::Persistent.with_acls(self.acls());
        let (child, child_data, opts) = match ttl {
            Some(t) => (
                mark_of(path),
                t.as_millis().to_string().into_bytes(),
                persistent.with_ttl(t),
            ),
            None => (format!("{path}/{PIN}"), Vec::new(), persistent),
        };
        w.add_create(path, value, &opts).map_err(map)?;
        w.add_create(&child, &child_data, &opts).map_err(map)?;
        w.add_set_data(&child, &child_data, None).map_err(map)?;
        let commit = w.commit();
        let results = self
            .bounded(
                "put",
                key,
                async move { commit.await.map_err(zk::Error::from) },
            )
            .await;
        let results = match results {
            Err(e) if is(&e, zk::Error::Unimplemented) && ttl.is_some() => {
                return Err(err(
                    ErrorKind::Unsupported,
                    key,
                    "this ZooKeeper server does not allow TTL nodes \
                     (start it with -Dzookeeper.extendedTypesEnabled=true)",
                ))
            }
            other => other?,
        };
        match results.last() {
            Some(zk::MultiWriteResult::SetData { stat }) => {
                self.clock_sample(stat);
                Ok(*stat)
            }
            _ => Err(err(
                ErrorKind::Backend,
                key,
                "the server's answer to a multi lacks its last result",
            )),
        }
    }

    /// Makes the TTL key `node` permanent in place, in one `multi`: writes `value` (with the
    /// node's data version as precondition), deletes `~ttl` and creates `~keep` (ZooKeeper
    /// never reaps a znode with children). The znode stays, so watchers see a put only.
    async fn pin_write(
        &self,
        client: &zk::Client,
        key: &str,
        path: &str,
        node: &Node,
        value: &[u8],
    ) -> Result<zk::Stat> {
        let map = |e| super::error::map(e, "put", key);
        let opts = zk::CreateMode::Persistent.with_acls(self.acls());
        let mut w = client.new_multi_writer();
        w.add_set_data(path, value, Some(node.stat.version))
            .map_err(map)?;
        w.add_delete(&mark_of(path), None).map_err(map)?;
        w.add_create(&format!("{path}/{PIN}"), b"", &opts)
            .map_err(map)?;
        let commit = w.commit();
        let results = self
            .bounded(
                "put",
                key,
                async move { commit.await.map_err(zk::Error::from) },
            )
            .await?;
        match results.first() {
            Some(zk::MultiWriteResult::SetData { stat }) => {
                self.clock_sample(stat);
                Ok(*stat)
            }
            _ => Err(err(
                ErrorKind::Backend,
                key,
                "the server's answer to a multi lacks its first result",
            )),
        }
    }

    /// Deletes `path`, with its child (`~ttl` or `~keep`) if it has one. `expected` is the
    /// data version.
    async fn delete_node(
        &self,
        client: &zk::Client,
        key: &str,
        path: &str,
        expected: Option<i32>,
    ) -> Result<()> {
        match self
            .bounded("delete", key, client.delete(path, expected))
            .await
        {
            Err(e) if is(&e, zk::Error::NotEmpty) => {}
            other => return other,
        }
        let children = self
            .bounded("delete", key, client.list_children(path))
            .await?;
        let mut w = client.new_multi_writer();
        for c in &children {
            w.add_delete(&format!("{path}/{c}"), None)
                .map_err(|e| super::error::map(e, "delete", key))?;
        }
        w.add_delete(path, expected)
            .map_err(|e| super::error::map(e, "delete", key))?;
        let commit = w.commit();
        self.bounded("delete", key, async move {
            commit.await.map_err(zk::Error::from)
        })
        .await
        .map(|_| ())
    }

    async fn put_permanent(&self, key: &str, value: &[u8]) -> Result<Version> {
        let client = self.client().await?;
        let path = path::key_path(&self.root, key);
        for _ in 0..RETRIES {
            let node = self.read_node(&client, key, &path, false).await?;
            let r = match &node {
                None => match self.create_key(&client, key, &path, value).await? {
                    Some(stat) => return Ok(version_of(&stat)),
                    None => continue,
                },
                Some(n) if n.kind == Kind::Permanent => {
                    // No version condition: under concurrent writers of one key a conditioned
                    // write loses the race again and again. A znode keeps its czxid for life
                    // and a permanent key never gains a `~ttl` child in place (a TTL put
                    // replaces the znode), so an unchanged czxid proves the write went to the
                    // permanent key that was read; otherwise the key was replaced in between
                    // and the next round writes it again.
                    match self
                        .bounded("put", key, client.set_data(&path, value, None))
                        .await
                    {
                        Ok(stat) if stat.czxid == n.stat.czxid => {
                            self.clock_sample(&stat);
                            return Ok(version_of(&stat));
                        }
                        Ok(_) => continue,
                        Err(e) => Err(e),
                    }
                }
                // A TTL key: pin it in place, in one multi.
                Some(n) if matches!(n.kind, Kind::Ttl { .. }) => self
                    .pin_write(&client, key, &path, n, value)
                    .await
                    .map(|s| version_of(&s)),
                // Expired and half reaped: create it anew (delete and create in one multi).
                Some(n) => self
                    .replace(&client, key, &path, Some(n), value, None)
                    .await
                    .map(|s| version_of(&s)),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e) if raced(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(err(ErrorKind::Unavailable, key, "the key kept changing"))
    }

    async fn put_ttl(&self, key: &str, value: &[u8], ttl: Duration) -> Result<Version> {
        // Whole milliseconds: what ZooKeeper stores and what `~ttl` records.
        let ttl = Duration::from_millis(ttl.as_millis() as u64);
        let ttl_ms = ttl.as_millis() as u64;
        let client = self.client().await?;
        let path = path::key_path(&self.root, key);
        for _ in 0..RETRIES {
            let node = self.read_node(&client, key, &path, false).await?;
            let r = match &node {
                None => {
                    match self
                        .replace(&client, key, &path, None, value, Some(ttl))
                        .await
                    {
                        Err(e) if is(&e, zk::Error::NoNode) => {
                            self.ensure_parents(&client, &path, key).await?;
                            continue;
                        }
                        other => other.map(|s| version_of(&s)),
                    }
                }
                Some(n) if matches!(n.kind, Kind::Ttl { ttl_ms: t, .. } if t == ttl_ms) => {
                    // Same TTL: writing the key and its `~ttl` restarts both clocks.
                    let map = |e| super::error::map(e, "put", key);
                    let mark = mark_of(&path);
                    let t = ttl_ms.to_string().into_bytes();
                    let mut w = client.new_multi_writer();
                    // Unconditioned, as for a permanent key; the czxid check below and the
                    // `~ttl` write (which fails if the mark is gone) catch a replaced znode.
                    w.add_set_data(&path, value, None).map_err(map)?;
                    w.add_set_data(&mark, &t, None).map_err(map)?;
                    let commit = w.commit();
                    match self
                        .bounded(
                            "put",
                            key,
                            async move { commit.await.map_err(zk::Error::from) },
                        )
                        .await
                    {
                        Ok(results) => match results.first() {
                            Some(zk::MultiWriteResult::SetData { stat })
                                if stat.czxid == n.stat.czxid =>
                            {
                                self.clock_sample(stat);
                                Ok(version_of(stat))
                            }
                            _ => continue,
                        },
                        Err(e) => Err(e),
                    }
                }
                // Permanent, another TTL, or half reaped: replace it in one multi.
                Some(n) => self
                    .replace(&client, key, &path, Some(n), value, Some(ttl))
                    .await
                    .map(|s| version_of(&s)),
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e) if raced(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(err(ErrorKind::Unavailable, key, "the key kept changing"))
    }

    async fn read(&self, key: &str, consistency: Consistency) -> Result<Option<Entry>> {
        let client = self.client().await?;
        let path = path::key_path(&self.root, key);
        let node = if consistency == Consistency::Strong {
            // Pipelined: the sync is sent now, the reads right behind it on the same session;
            // the server answers a session's requests in order, so the reads see everything
            // committed before the sync. One round trip instead of two.
            let synced = self.synced(&client, key);
            let read = self.read_node(&client, key, &path, true);
            let (synced, node) = futures::join!(synced, read);
            synced?;
            node?
        } else {
            self.read_node(&client, key, &path, true).await?
        };
        let Some(node) = node else {
            return Ok(None);
        };
        if node.kind != Kind::Permanent && node.expired(self.server_now_ms(&client, key).await) {
            return Ok(None);
        }
        Ok(Some(Entry {
            key: key.to_string(),
            version: version_of(&node.stat),
            value: node.data,
        }))
    }

    /// The names of every key under `prefix`: the key directories walked down from the
    /// prefix's, listing children (a missing directory is empty).
    pub(crate) async fn key_names(
        &self,
        client: &zk::Client,
        prefix: &str,
        what: &str,
    ) -> Result<Vec<String>> {
        let (dir, partial) = path::split_prefix(prefix);
        let mut keys = Vec::new();
        let mut dirs = vec![(path::dir_path(&self.root, dir), dir.to_string(), true)];
        while let Some((zpath, kdir, top)) = dirs.pop() {
            let children = match self
                .bounded(what, prefix, client.list_children(&zpath))
                .await
            {
                Ok(c) => c,
                Err(e) if is(&e, zk::Error::NoNode) => continue,
                Err(e) => return Err(e),
            };
            for name in children {
                if let Some(seg) = name.strip_suffix(path::DIR_SUFFIX) {
                    let Some(seg) = path::unescape_segment(seg) else {
                        continue;
                    };
                    if !top || seg.starts_with(partial) {
                        dirs.push((format!("{zpath}/{name}"), format!("{kdir}{seg}/"), false));
                    }
                } else if let Some(seg) = path::unescape_segment(&name) {
                    if !top || seg.starts_with(partial) {
                        keys.push(format!("{kdir}{seg}"));
                    }
                }
            }
        }
        keys.retain(|k| matches_prefix(k, prefix));
        Ok(keys)
    }

    async fn list_keys(&self, prefix: &str, consistency: Consistency) -> Result<Vec<Entry>> {
        let client = self.client().await?;
        if consistency == Consistency::Strong {
            self.sync(&client, prefix).await?;
        }
        let mut keys = self.key_names(&client, prefix, "list").await?;
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        let mut now_ms = None;
        for chunk in keys.chunks(128) {
            // Pipelined: the requests go out in order on the one connection; each key is read
            // with its `~ttl` child.
            let reads: Vec<_> = chunk
                .iter()
                .map(|k| {
                    let p = path::key_path(&self.root, k);
                    let m = mark_of(&p);
                    futures::future::join(client.get_data(&p), client.get_data(&m))
                })
                .collect();
            let results = self
                .bounded("list", prefix, async move {
                    Ok(futures::future::join_all(reads).await)
                })
                .await?;
            for (k, (r, mark)) in chunk.iter().zip(results) {
                match r {
                    Ok((value, stat)) => {
                        let node = Node {
                            kind: classify(&stat, mark),
                            stat,
                            data: value,
                        };
                        if node.kind != Kind::Permanent {
                            let now = match now_ms {
                                Some(n) => n,
                                None => *now_ms.insert(self.server_now_ms(&client, prefix).await),
                            };
                            if node.expired(now) {
                                continue;
                            }
                        }
                        out.push(Entry {
                            key: k.clone(),
                            version: version_of(&node.stat),
                            value: node.data,
                        })
                    }
                    Err(zk::Error::NoNode) => {}
                    Err(e) => return Err(super::error::map(e, "list", prefix)),
                }
            }
        }
        Ok(out)
    }

    async fn cas(
        &self,
        key: &str,
        expect: Expect,
        new: Option<Vec<u8>>,
    ) -> Result<Option<Version>> {
        let client = self.client().await?;
        let path = path::key_path(&self.root, key);
        for _ in 0..RETRIES {
            // An expired TTL key the server has not reaped yet counts as absent. One read
            // decides: a key created after it makes the create (or the replace, whose
            // precondition is the dead znode's version) fail, and the loop reads again.
            let (node, dead) = match self.node_state(&client, key, &path).await? {
                NodeState::Live(n) => (Some(n), None),
                NodeState::Dead(n) => (None, Some(n)),
                NodeState::Absent => (None, None),
            };
            let r = match (expect, &new, node) {
                (Expect::Absent, Some(value), None) => match dead {
                    None => match self.create_key(&client, key, &path, value).await? {
                        Some(stat) => return Ok(Some(version_of(&stat))),
                        None => continue,
                    },
                    // Expired: its znode is replaced atomically.
                    Some(dead) => self
                        .replace(&client, key, &path, Some(&dead), value, None)
                        .await
                        .map(|s| Some(version_of(&s))),
                },
                (Expect::Absent, None, None) => return Ok(None),
                (Expect::Absent, _, Some(_)) => {
                    return Err(conflict(key, "expected no key, found one"))
                }
                (Expect::Version(v), _, None) => {
                    return Err(conflict(key, format!("expected version {v}, found no key")))
                }
                (Expect::Version(v), _, Some(n)) if version_of(&n.stat) != v => {
                    return Err(conflict(
                        key,
                        format!("expected version {v}, found {}", version_of(&n.stat)),
                    ))
                }
                (Expect::Version(v), new, Some(n)) => {
                    let r = match new {
                        Some(value) if n.kind == Kind::Permanent => self
                            .bounded(
                                "cas",
                                key,
                                client.set_data(&path, value, Some(n.stat.version)),
                            )
                            .await
                            .map(|s| {
                                self.clock_sample(&s);
                                Some(version_of(&s))
                            }),
                        // A CAS write makes the key permanent (as a put without TTL does).
                        Some(value) => self
                            .pin_write(&client, key, &path, &n, value)
                            .await
                            .map(|s| Some(version_of(&s))),
                        None => self
                            .delete_node(&client, key, &path, Some(n.stat.version))
                            .await
                            .map(|_| None),
                    };
                    return match r {
                        Err(e) if raced(&e) => Err(conflict(
                            key,
                            format!("version {v} changed during the swap"),
                        )),
                        other => other,
                    };
                }
            };
            match r {
                Ok(v) => return Ok(v),
                // The dead znode changed under the create-if-absent: look again.
                Err(e) if raced(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(err(ErrorKind::Unavailable, key, "the key kept changing"))
    }

    async fn remove(&self, key: &str) -> Result<()> {
        let client = self.client().await?;
        let path = path::key_path(&self.root, key);
        for _ in 0..RETRIES {
            match self.delete_node(&client, key, &path, None).await {
                Ok(()) => return Ok(()),
                Err(e) if is(&e, zk::Error::NoNode) || is(&e, zk::Error::NotEmpty) => {
                    // Gone already, or a child vanished or appeared under us: check again.
                    if self
                        .bounded("stat", key, client.check_stat(&path))
                        .await?
                        .is_none()
                    {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(err(ErrorKind::Unavailable, key, "the key kept changing"))
    }
}

#[async_trait]
impl KvStore for ZkStore {
    async fn get(&self, key: &str, consistency: Consistency) -> Result<Option<Entry>> {
        validate_key(key)?;
        self.inner.read(key, consistency).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, opts: PutOptions) -> Result<Version> {
        self.inner.capabilities().check_put(key, &value, &opts)?;
        match opts.ttl {
            Some(t) => self.inner.put_ttl(key, &value, t).await,
            None => self.inner.put_permanent(key, &value).await,
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        self.inner.remove(key).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        new: Option<Vec<u8>>,
    ) -> Result<Option<Version>> {
        self.inner.capabilities().check_cas(key, new.as_deref())?;
        self.inner.cas(key, expect, new).await
    }

    async fn list(&self, prefix: &str, consistency: Consistency) -> Result<Vec<Entry>> {
        validate_prefix(prefix)?;
        self.inner.list_keys(prefix, consistency).await
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream> {
        validate_prefix(prefix)?;
        super::watch::start(self.inner.clone(), prefix).await
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}
