//! [`Election`] in Apache Curator's `LeaderLatch` layout.
//!
//! Election `NAME` is the znode `<root>/elections/NAME` (the latch path). Each contender
//! creates the ephemeral sequential child `_c_<uuid>-latch-<seq>` with its value (Curator's
//! participant id) as data, on a session of its own whose timeout is the TTL; the contender
//! whose node sorts first (by the text after the last `latch-`) is the leader, and every other
//! one watches only the node just before its own (the lock's wait, [`ZkStore::acquire_in`]).
//! The term is the leader node's czxid. `proclaim` sets the leader node's data; resigning
//! deletes it. A Curator `LeaderLatch` on `<root>/elections/NAME` takes part in the same
//! election.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use zookeeper_client as zk;

use super::error::err;
use super::lock::{is, queue_for, Layout, Mode};
use super::{path, Inner, ZkStore};
use crate::election::LeaderStream;
use crate::election::{validate_election_name, Election, Leader, LeaderGuard, LeaderHandle};
use crate::error::{ErrorKind, Result};
use crate::lock::{FencingToken, LockOptions};

/// The name Curator's `LeaderLatch` uses inside node names.
pub const LATCH_NAME: &str = "latch-";

/// The backend side of a ZooKeeper leadership: the leader node.
struct ZkLeader {
    inner: Arc<Inner>,
    name: String,
    path: String,
}

#[async_trait]
impl LeaderHandle for ZkLeader {
    async fn proclaim(&self, value: Vec<u8>) -> Result<()> {
        self.inner.capabilities().check_value(&self.name, &value)?;
        let client = self.inner.client().await?;
        match self
            .inner
            .bounded(
                "proclaim",
                &self.name,
                client.set_data(&self.path, &value, None),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is(&e, zk::Error::NoNode) => Err(err(
                ErrorKind::LockLost,
                &self.name,
                "the leader node is gone (its session expired or it was deleted)",
            )),
            Err(e) => Err(e),
        }
    }
}

/// What a read of the election found, and (when asked for) the watchers that fire on its next
/// change.
struct Read {
    leader: Option<Leader>,
    watchers: Vec<zk::OneshotWatcher>,
}

impl ZkStore {
    async fn read_election(&self, dir: &str, name: &str, watch: bool) -> Result<Read> {
        let inner = &self.inner;
        loop {
            let client = inner.client().await?;
            let (children, mut watchers) = if watch {
                match inner
                    .bounded("observe", name, client.list_and_watch_children(dir))
                    .await
                {
                    Ok((c, w)) => (c, vec![w]),
                    Err(e) if is(&e, zk::Error::NoNode) => {
                        let (stat, w) = inner
                            .bounded("observe", name, client.check_and_watch_stat(dir))
                            .await?;
                        if stat.is_some() {
                            continue; // created meanwhile
                        }
                        return Ok(Read {
                            leader: None,
                            watchers: vec![w],
                        });
                    }
                    Err(e) => return Err(e),
                }
            } else {
                match inner
                    .bounded("leader", name, client.list_children(dir))
                    .await
                {
                    Ok(c) => (c, Vec::new()),
                    Err(e) if is(&e, zk::Error::NoNode) => {
                        return Ok(Read {
                            leader: None,
                            watchers: Vec::new(),
                        })
                    }
                    Err(e) => return Err(e),
                }
            };
            let (contenders, _) = queue_for(LATCH_NAME, children, "\u{0}", &HashSet::new());
            for c in contenders {
                let p = format!("{dir}/{c}");
                let got = if watch {
                    inner
                        .bounded("observe", name, client.get_and_watch_data(&p))
                        .await
                        .map(|(d, s, w)| (d, s, Some(w)))
                } else {
                    inner
                        .bounded("leader", name, client.get_data(&p))
                        .await
                        .map(|(d, s)| (d, s, None))
                };
                match got {
                    // A contender node (ephemeral), not the directory of a nested election.
                    Ok((data, stat, w)) if stat.ephemeral_owner != 0 => {
                        watchers.extend(w);
                        return Ok(Read {
                            leader: Some(Leader {
                                value: data,
                                term: FencingToken::from_raw(stat.czxid as u64),
                            }),
                            watchers,
                        });
                    }
                    Ok(_) => continue,
                    // Gone since the listing: the next one is the leader now.
                    Err(e) if is(&e, zk::Error::NoNode) => continue,
                    Err(e) => return Err(e),
                }
            }
            return Ok(Read {
                leader: None,
                watchers,
            });
        }
    }
}

struct Observer {
    store: ZkStore,
    dir: String,
    name: String,
    last: Option<Option<Leader>>,
    watchers: Vec<zk::OneshotWatcher>,
    ended: bool,
}

impl Observer {
    async fn next(&mut self) -> Option<Result<Option<Leader>>> {
        loop {
            if self.ended {
                return None;
            }
            let watchers = std::mem::take(&mut self.watchers);
            if !watchers.is_empty() {
                let fired = watchers.into_iter().map(|w| Box::pin(w.changed()));
                futures::future::select_all(fired).await;
            }
            let mut pause = Duration::from_millis(100);
            let read = loop {
                match self.store.read_election(&self.dir, &self.name, true).await {
                    Ok(r) => break r,
                    Err(e)
                        if matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout)
                            && pause < Duration::from_secs(5) =>
                    {
                        tracing::debug!(election = %self.name, error = %e, "reading the election failed; retrying");
                        tokio::time::sleep(pause).await;
                        pause *= 2;
                    }
                    Err(e) => {
                        self.ended = true;
                        return Some(Err(e));
                    }
                }
            };
            self.watchers = read.watchers;
            if self.last.as_ref() != Some(&read.leader) {
                self.last = Some(read.leader.clone());
                return Some(Ok(read.leader));
            }
        }
    }
}

#[async_trait]
impl Election for ZkStore {
    async fn campaign(
        &self,
        name: &str,
        value: Vec<u8>,
        opts: &LockOptions,
    ) -> Result<LeaderGuard> {
        validate_election_name(name)?;
        let caps = self.inner.capabilities();
        caps.check_lock(name, opts)?;
        caps.check_value(name, &value)?;
        let layout = Layout {
            dir: path::election_dir(&self.inner.root, name),
            node: LATCH_NAME,
            data: value,
        };
        let acquired = self
            .acquire_in(&layout, name, opts.ttl, Mode::Wait(opts.wait))
            .await?
            .ok_or_else(|| {
                err(
                    ErrorKind::Backend,
                    name,
                    "campaign ended without leadership",
                )
            })?;
        let path = acquired.path.clone();
        let guard = self.make_guard(name, opts.ttl, acquired)?;
        let handle = ZkLeader {
            inner: self.inner.clone(),
            name: name.to_string(),
            path,
        };
        Ok(LeaderGuard::new(name, guard, Box::new(handle)))
    }

    async fn leader(&self, name: &str) -> Result<Option<Leader>> {
        validate_election_name(name)?;
        let dir = path::election_dir(&self.inner.root, name);
        Ok(self.read_election(&dir, name, false).await?.leader)
    }

    async fn observe(&self, name: &str) -> Result<LeaderStream> {
        validate_election_name(name)?;
        let dir = path::election_dir(&self.inner.root, name);
        let first = self.read_election(&dir, name, true).await?;
        let observer = Observer {
            store: self.clone(),
            dir,
            name: name.to_string(),
            last: Some(first.leader.clone()),
            watchers: first.watchers,
            ended: false,
        };
        let first = first.leader;
        let rest = futures::stream::unfold(observer, |mut o| async move {
            let item = o.next().await?;
            Some((item, o))
        });
        use futures::StreamExt;
        Ok(Box::pin(
            futures::stream::once(async move { Ok(first) }).chain(rest),
        ))
    }
}
