//! [`Election`] over etcd: the layout of etcd's `concurrency.Election` (and so of its
//! `v3election` service and `etcdctl elect`).
//!
//! Election `NAME` is the set of keys under `<namespace>elections/NAME/`. Each contender puts
//! its own key `<namespace>elections/NAME/<lease id in hex>`, attached to its lease, with its
//! value; the contender whose key has the lowest create revision is the leader, and that create
//! revision is its term; every other one waits for the deletion of the keys created before its
//! own (the lock's wait, [`EtcdStore::acquire_in`]). `proclaim` puts a new value on the leader
//! key if its create revision is still the term; resigning deletes it. `etcdctl elect
//! <namespace>elections/NAME VALUE` campaigns in the same election.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp};

use super::kv::{classify, open_watch, RawEvent};
use super::lock::{is_contender, rev_token};
use super::{error, EtcdStore, Inner, NAME};
use crate::election::LeaderStream;
use crate::election::{validate_election_name, Election, Leader, LeaderGuard, LeaderHandle};
use crate::error::{Error, ErrorKind, Result};
use crate::lock::LockOptions;

impl Inner {
    fn election_dir(&self, name: &str) -> String {
        format!("{}{name}/", self.election_prefix)
    }
}

/// The backend side of an etcd leadership: the leader key, its create revision, its lease.
struct EtcdLeader {
    inner: Arc<Inner>,
    name: String,
    key: String,
    rev: i64,
    lease: i64,
}

#[async_trait]
impl LeaderHandle for EtcdLeader {
    async fn proclaim(&self, value: Vec<u8>) -> Result<()> {
        if value.len() > self.inner.max_value_size() {
            return Err(Error::new(
                ErrorKind::ValueTooLarge,
                NAME,
                format!(
                    "value of {} bytes is larger than the {} bytes accepted",
                    value.len(),
                    self.inner.max_value_size()
                ),
            )
            .with_key(self.name.clone()));
        }
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                self.rev,
            )])
            .and_then(vec![TxnOp::put(
                self.key.clone(),
                value,
                Some(PutOptions::new().with_lease(self.lease)),
            )]);
        let inner = &self.inner;
        let resp = inner
            .call("proclaiming", Some(&self.name), || {
                let (mut kv, t) = (inner.kv.clone(), txn.clone());
                async move { kv.txn(t).await }
            })
            .await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::LockLost,
                NAME,
                "the leader key is gone (its lease expired or it was deleted)",
            )
            .with_key(self.name.clone()))
        }
    }
}

/// The contenders of an election: key → (create revision, value).
type Contenders = BTreeMap<Vec<u8>, (i64, Vec<u8>)>;

fn leader_of(c: &Contenders) -> Option<Leader> {
    c.values()
        .min_by_key(|(rev, _)| *rev)
        .map(|(rev, value)| Leader {
            value: value.clone(),
            term: rev_token(*rev),
        })
}

fn contenders(dir: &str, kvs: &[KeyValue]) -> Contenders {
    kvs.iter()
        .filter(|kv| is_contender(dir, kv.key()))
        .map(|kv| {
            (
                kv.key().to_vec(),
                (kv.create_revision(), kv.value().to_vec()),
            )
        })
        .collect()
}

impl EtcdStore {
    /// Reads the contenders of the election in `dir`, with the revision of the read.
    async fn read_election(&self, dir: &str, name: &str) -> Result<(Contenders, i64)> {
        let inner = &self.inner;
        let resp = inner
            .call("reading the election", Some(name), || {
                let (mut kv, d) = (inner.kv.clone(), dir.to_string());
                async move { kv.get(d, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok((contenders(dir, resp.kvs()), rev))
    }
}

struct Observer {
    inner: Arc<Inner>,
    stream: Option<etcd_client::WatchStream>,
    dir: String,
    name: String,
    keys: Contenders,
    /// The revision up to which events have been applied.
    rev: i64,
    last: Option<Leader>,
    pending: VecDeque<Result<Option<Leader>>>,
    ended: bool,
}

impl Observer {
    /// Applies one watch response: the leader after each revision, when it changed.
    fn apply(&mut self, events: Vec<RawEvent>, header_rev: i64) {
        let mut at: Option<i64> = None;
        for ev in events {
            let (kv, put) = match ev {
                RawEvent::Put(kv) => (kv, true),
                RawEvent::Delete(kv) => (kv, false),
            };
            if at.is_some_and(|r| r != kv.mod_revision()) {
                self.emit_if_changed();
            }
            at = Some(kv.mod_revision());
            if !is_contender(&self.dir, kv.key()) {
                continue;
            }
            if put {
                self.keys.insert(
                    kv.key().to_vec(),
                    (kv.create_revision(), kv.value().to_vec()),
                );
            } else {
                self.keys.remove(kv.key());
            }
            self.rev = self.rev.max(kv.mod_revision());
        }
        self.emit_if_changed();
        self.rev = self.rev.max(header_rev);
    }

    fn emit_if_changed(&mut self) {
        let now = leader_of(&self.keys);
        if now != self.last {
            self.last = now.clone();
            self.pending.push_back(Ok(now));
        }
    }

    async fn next(&mut self) -> Option<Result<Option<Leader>>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.ended {
                return None;
            }
            let stream = match self.stream.as_mut() {
                Some(s) => s,
                None => match open_watch(&self.inner, &self.dir, self.rev + 1, &self.name, false)
                    .await
                {
                    Ok((s, _)) => self.stream.insert(s),
                    Err(e) => {
                        self.ended = true;
                        return Some(Err(e));
                    }
                },
            };
            match stream.message().await {
                Ok(Some(resp)) if !resp.canceled() => {
                    let header_rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                    let events = resp.events().iter().filter_map(classify).collect();
                    self.apply(events, header_rev);
                }
                Ok(_) => self.stream = None,
                Err(e) => {
                    tracing::debug!(election = %self.name, error = %error::map(e, "election watch"), "election watch broke; reopening");
                    self.stream = None;
                }
            }
        }
    }
}

#[async_trait]
impl Election for EtcdStore {
    async fn campaign(
        &self,
        name: &str,
        value: Vec<u8>,
        opts: &LockOptions,
    ) -> Result<LeaderGuard> {
        validate_election_name(name)?;
        let caps = self.caps();
        caps.check_lock(name, opts)?;
        caps.check_value(name, &value)?;
        let dir = self.inner.election_dir(name);
        let held = self
            .acquire_in(&dir, name, value, opts, false)
            .await?
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Backend,
                    NAME,
                    "campaign ended without leadership",
                )
                .with_key(name)
            })?;
        let handle = EtcdLeader {
            inner: self.inner.clone(),
            name: name.to_string(),
            key: held.key,
            rev: held.rev,
            lease: held.lease,
        };
        Ok(LeaderGuard::new(name, held.guard, Box::new(handle)))
    }

    async fn leader(&self, name: &str) -> Result<Option<Leader>> {
        validate_election_name(name)?;
        let dir = self.inner.election_dir(name);
        let (c, _) = self.read_election(&dir, name).await?;
        Ok(leader_of(&c))
    }

    async fn observe(&self, name: &str) -> Result<LeaderStream> {
        validate_election_name(name)?;
        let dir = self.inner.election_dir(name);
        let (keys, rev) = self.read_election(&dir, name).await?;
        let (stream, _) = open_watch(&self.inner, &dir, rev + 1, name, false).await?;
        let first = leader_of(&keys);
        let observer = Observer {
            inner: self.inner.clone(),
            stream: Some(stream),
            dir,
            name: name.to_string(),
            keys,
            rev,
            last: first.clone(),
            pending: VecDeque::from([Ok(first)]),
            ended: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            observer,
            |mut o| async move {
                let item = o.next().await?;
                Some((item, o))
            },
        )))
    }
}
