//! [`KvStore`] on znodes.
//!
//! - A key is one persistent znode (a TTL znode when written with a TTL) whose data is the value,
//!   unchanged (no header). Its parents are container znodes named `<segment>~` (see
//!   [`super::path`]).
//! - [`Version`] is the znode's `mzxid`: the zxid of the write that produced the value. It is
//!   unique per write across the whole ensemble and never reused, also when a key is deleted and
//!   created again, so a version read before a delete never matches the re-created key.
//! - CAS on a version reads the znode's stat, compares its `mzxid`, and writes with the stat's
//!   data version as ZooKeeper's own precondition (`setData`/`delete` with version).
//! - A key made permanent after having a TTL gets a child `~keep`: ZooKeeper never reaps a TTL
//!   znode that has children.

use async_trait::async_trait;
use zookeeper_client as zk;

use super::error::err;
use super::path::{self, PIN};
use super::{e_zk, lock_std, Inner, ZkStore};
use crate::caps::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::key::{matches_prefix, validate_key, validate_prefix};
use crate::kv::{Consistency, Entry, Expect, KvStore, PutOptions, Version, WatchStream};

/// How often a write retries after racing with a concurrent create/delete of the same znode
/// or of a parent container.
const RETRIES: usize = 32;
/// The largest TTL a TTL znode can carry (40 bits of milliseconds).
const TTL_MAX_MS: u128 = 0x00FF_FFFF_FFFF;
/// Remembered TTL keys per client before the set is cleared (it is only a hint).
const TTL_KEYS_MAX: usize = 100_000;

fn version_of(stat: &zk::Stat) -> Version {
    Version::from_raw(stat.mzxid as u64)
}

fn is(e: &Error, z: zk::Error) -> bool {
    e_zk(e) == Some(&z)
}

fn conflict(key: &str, msg: impl Into<String>) -> Error {
    err(ErrorKind::Conflict, key, msg)
}

impl Inner {
    fn check_value(&self, key: &str, value: &[u8]) -> Result<()> {
        if value.len() > super::MAX_VALUE_SIZE {
            return Err(err(
                ErrorKind::ValueTooLarge,
                key,
                format!(
                    "{} bytes exceeds the limit of {} bytes (jute.maxbuffer)",
                    value.len(),
                    super::MAX_VALUE_SIZE
                ),
            ));
        }
        Ok(())
    }

    async fn sync(&self, client: &zk::Client, key: &str) -> Result<()> {
        let at = if self.root.is_empty() {
            "/"
        } else {
            &self.root
        };
        self.bounded("sync", key, client.sync(at)).await
    }

    /// Creates `path` (persistent, or TTL), creating parents as needed. `Ok(None)` if it exists.
    async fn create_key(
        &self,
        client: &zk::Client,
        key: &str,
        path: &str,
        value: &[u8],
        ttl: Option<std::time::Duration>,
    ) -> Result<Option<zk::Stat>> {
        let mut opts = zk::CreateMode::Persistent.with_acls(self.acls());
        if let Some(t) = ttl {
            opts = opts.with_ttl(t);
        }
        for _ in 0..RETRIES {
            match self
                .bounded("create", key, client.create(path, value, &opts))
                .await
            {
                Ok((stat, _)) => return Ok(Some(stat)),
                Err(e) if is(&e, zk::Error::NodeExists) => return Ok(None),
                Err(e) if is(&e, zk::Error::NoNode) => {
                    self.ensure_parents(client, path, key).await?
                }
                Err(e) if is(&e, zk::Error::Unimplemented) && ttl.is_some() => {
                    return Err(err(
                        ErrorKind::Unsupported,
                        key,
                        "this ZooKeeper server does not allow TTL nodes \
                         (start it with -Dzookeeper.extendedTypesEnabled=true)",
                    ))
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

    /// Deletes `path`, with its pin child if it has one. `expected` is the data version.
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
        let pin = format!("{path}/{PIN}");
        let mut w = client.new_multi_writer();
        w.add_delete(&pin, None)
            .and_then(|_| w.add_delete(path, expected))
            .map_err(|e| super::error::map(e, "delete", key))?;
        let commit = w.commit();
        self.bounded("delete", key, async move {
            commit.await.map_err(zk::Error::from)
        })
        .await
        .map(|_| ())
    }

    async fn pin(&self, client: &zk::Client, key: &str, path: &str) -> Result<()> {
        let pin = format!("{path}/{PIN}");
        let opts = zk::CreateMode::Persistent.with_acls(self.acls());
        match self
            .bounded("pin", key, client.create(&pin, b"", &opts))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is(&e, zk::Error::NodeExists) || is(&e, zk::Error::NoNode) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn put_permanent(&self, key: &str, value: &[u8]) -> Result<Version> {
        let client = self.client().await?;
        let path = path::key_path(&self.root, key);
        let was_ttl = lock_std(&self.ttl_keys).remove(key).is_some();
        if was_ttl {
            // This client wrote the key with a TTL (ZooKeeper does not tell clients whether a
            // znode is a TTL node: its stat shows ephemeralOwner 0). If it still exists and is
            // not pinned, pin it first, then write, so that it is never reaped from now on.
            let stat = self.bounded("stat", key, client.check_stat(&path)).await?;
            if stat.is_some_and(|s| s.num_children == 0) {
                self.pin(&client, key, &path).await?;
            }
        }
        for _ in 0..RETRIES {
            match self
                .bounded("put", key, client.set_data(&path, value, None))
                .await
            {
                Ok(stat) => return Ok(version_of(&stat)),
                Err(e) if is(&e, zk::Error::NoNode) => {}
                Err(e) => return Err(e),
            }
            if let Some(stat) = self.create_key(&client, key, &path, value, None).await? {
                return Ok(version_of(&stat));
            }
        }
        Err(err(ErrorKind::Unavailable, key, "the key kept changing"))
    }

    async fn put_ttl(&self, key: &str, value: &[u8], ttl: std::time::Duration) -> Result<Version> {
        let caps = self.capabilities();
        if ttl < caps.min_ttl || ttl.as_millis() > TTL_MAX_MS {
            return Err(err(
                ErrorKind::InvalidArgument,
                key,
                format!(
                    "TTL {ttl:?} outside [{:?}, {TTL_MAX_MS} ms]; the server reaps TTL nodes every \
                     {:?}",
                    caps.min_ttl, self.cfg.ttl_reap_interval
                ),
            ));
        }
        let client = self.client().await?;
        let path = path::key_path(&self.root, key);
        let ttl_ms = ttl.as_millis() as u64;
        for _ in 0..RETRIES {
            if let Some(stat) = self
                .create_key(&client, key, &path, value, Some(ttl))
                .await?
            {
                let mut keys = lock_std(&self.ttl_keys);
                if keys.len() >= TTL_KEYS_MAX {
                    keys.clear();
                }
                keys.insert(key.to_string(), ttl_ms);
                return Ok(version_of(&stat));
            }
            let Some(stat) = self.bounded("stat", key, client.check_stat(&path)).await? else {
                continue;
            };
            let known = lock_std(&self.ttl_keys).get(key).copied();
            if known == Some(ttl_ms) && stat.num_children == 0 {
                // Same TTL: a write restarts its clock.
                match self
                    .bounded(
                        "put",
                        key,
                        client.set_data(&path, value, Some(stat.version)),
                    )
                    .await
                {
                    Ok(stat) => return Ok(version_of(&stat)),
                    Err(e) if is(&e, zk::Error::BadVersion) || is(&e, zk::Error::NoNode) => {
                        continue
                    }
                    Err(e) => return Err(e),
                }
            }
            // Another node type or TTL: replace the znode (watchers see a delete, then a put).
            match self
                .delete_node(&client, key, &path, Some(stat.version))
                .await
            {
                Ok(()) => {}
                Err(e) if is(&e, zk::Error::BadVersion) || is(&e, zk::Error::NoNode) => {}
                Err(e) => return Err(e),
            }
        }
        Err(err(ErrorKind::Unavailable, key, "the key kept changing"))
    }

    async fn read(&self, key: &str, consistency: Consistency) -> Result<Option<Entry>> {
        let client = self.client().await?;
        if consistency == Consistency::Strong {
            self.sync(&client, key).await?;
        }
        let path = path::key_path(&self.root, key);
        match self.bounded("get", key, client.get_data(&path)).await {
            Ok((value, stat)) => Ok(Some(Entry {
                key: key.to_string(),
                value,
                version: version_of(&stat),
            })),
            Err(e) if is(&e, zk::Error::NoNode) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list_keys(&self, prefix: &str, consistency: Consistency) -> Result<Vec<Entry>> {
        let client = self.client().await?;
        if consistency == Consistency::Strong {
            self.sync(&client, prefix).await?;
        }
        let (dir, partial) = path::split_prefix(prefix);
        let mut keys = Vec::new();
        let mut dirs = vec![(path::dir_path(&self.root, dir), dir.to_string(), true)];
        while let Some((zpath, kdir, top)) = dirs.pop() {
            let children = match self
                .bounded("list", prefix, client.list_children(&zpath))
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
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(128) {
            // Pipelined: the requests go out in order on the one connection.
            let reads: Vec<_> = chunk
                .iter()
                .map(|k| client.get_data(&path::key_path(&self.root, k)))
                .collect();
            let results = self
                .bounded("list", prefix, async move {
                    Ok(futures::future::join_all(reads).await)
                })
                .await?;
            for (k, r) in chunk.iter().zip(results) {
                match r {
                    Ok((value, stat)) => out.push(Entry {
                        key: k.clone(),
                        value,
                        version: version_of(&stat),
                    }),
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
        match (expect, new) {
            (Expect::Absent, Some(value)) => {
                match self.create_key(&client, key, &path, &value, None).await? {
                    Some(stat) => Ok(Some(version_of(&stat))),
                    None => Err(conflict(key, "expected no key, found one")),
                }
            }
            (Expect::Absent, None) => {
                match self.bounded("stat", key, client.check_stat(&path)).await? {
                    None => Ok(None),
                    Some(_) => Err(conflict(key, "expected no key, found one")),
                }
            }
            (Expect::Version(v), new) => {
                let Some(stat) = self.bounded("stat", key, client.check_stat(&path)).await? else {
                    return Err(conflict(key, format!("expected version {v}, found no key")));
                };
                if version_of(&stat) != v {
                    return Err(conflict(
                        key,
                        format!("expected version {v}, found {}", version_of(&stat)),
                    ));
                }
                let r = match new {
                    Some(value) => self
                        .bounded(
                            "cas",
                            key,
                            client.set_data(&path, &value, Some(stat.version)),
                        )
                        .await
                        .map(|s| Some(version_of(&s))),
                    None => self
                        .delete_node(&client, key, &path, Some(stat.version))
                        .await
                        .map(|_| None),
                };
                match r {
                    Err(e) if is(&e, zk::Error::BadVersion) || is(&e, zk::Error::NoNode) => Err(
                        conflict(key, format!("version {v} changed during the swap")),
                    ),
                    other => other,
                }
            }
        }
    }

    async fn remove(&self, key: &str) -> Result<()> {
        let client = self.client().await?;
        let path = path::key_path(&self.root, key);
        lock_std(&self.ttl_keys).remove(key);
        for _ in 0..RETRIES {
            match self.delete_node(&client, key, &path, None).await {
                Ok(()) => return Ok(()),
                Err(e) if is(&e, zk::Error::NoNode) => {
                    // Gone already, or the pin vanished under us: check again.
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
        validate_key(key)?;
        self.inner.check_value(key, &value)?;
        match opts.ttl {
            Some(t) if t.is_zero() => {
                Err(err(ErrorKind::InvalidArgument, key, "TTL must be positive"))
            }
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
        validate_key(key)?;
        if let Some(v) = &new {
            self.inner.check_value(key, v)?;
        }
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
