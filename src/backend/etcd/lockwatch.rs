//! One long-lived watch per lock directory and client, shared by every attempt and every held
//! lock of that client on that directory (locks and elections alike).
//!
//! Why long-lived: etcd serves a watch from its *synced* group (notified at commit time) only
//! if, when the watch is registered, its start revision is still in the future. A watch
//! created with no start revision gets "current revision + 1" read *before* the watch store's
//! lock is taken (`server/etcdserver/api/v3rpc/watch.go`, `recvLoop`), so a commit landing in
//! between sends it to the *unsynced* group (`server/mvcc/watchable_store.go`, `watch`),
//! which only `syncWatchersLoop` serves, every 100 ms. A contender that opens a watch each
//! time it locks opens it right after its own release, while the next holder, woken by the
//! same release, commits its own: the window is hit often, and a waiter whose watch is
//! unsynced when its predecessor goes sees the delete up to 100 ms late. A watch created once
//! stays in the synced group, so handoffs never wait for that loop, and an uncontended lock
//! costs no watch request at all.
//!
//! The watch reports deletions only (etcd's `NoPut` filter). It is closed [`LINGER`] after the
//! last attempt or lock using it ended. When its stream breaks it is reopened at "now", and
//! every subscriber is told to re-read what it depends on ([`Step::Resynced`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::kv::{classify, open_watch, RawEvent};
use super::{error, Inner};
use crate::error::Result;

/// How long a directory's watch stays open after its last subscriber ended: a client that
/// locks the same name again within this time needs no watch request.
pub(crate) const LINGER: Duration = Duration::from_secs(60);

/// How often a watch checks whether it has been idle for [`LINGER`].
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Steps buffered per subscriber; one that falls further behind re-reads
/// ([`Step::Resynced`]).
const CAPACITY: usize = 256;

/// The watches of one client, by lock directory.
pub(crate) type LockWatches = Mutex<HashMap<String, Arc<Shared>>>;

/// A deleted key of the directory, with the revision of its deletion.
#[derive(Clone, Debug)]
pub(crate) struct Deleted {
    pub(crate) key: Vec<u8>,
    pub(crate) rev: i64,
}

/// What a subscriber receives.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    /// The deletions of one watch response, in revision order.
    Deletes(Arc<[Deleted]>),
    /// Deletions may have been missed (the stream broke and was reopened at "now", or this
    /// subscriber fell behind): re-read the state.
    Resynced,
}

/// One directory's watch, held by its pump and (while registered) the client's map: once both
/// let go, subscribers see the end ([`Subscription::next`] returns `None`).
pub(crate) struct Shared {
    tx: broadcast::Sender<Step>,
    /// When the last subscription ended.
    released: Arc<Mutex<Instant>>,
}

impl Shared {
    fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
            released: self.released.clone(),
        }
    }

    /// Whether nobody has used the watch for `linger`.
    fn idle_for(&self, linger: Duration) -> bool {
        self.tx.receiver_count() == 0
            && self
                .released
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                >= linger
    }
}

/// A subscriber of a directory's watch: receives every deletion the watch reports after the
/// subscription was made.
pub(crate) struct Subscription {
    rx: broadcast::Receiver<Step>,
    released: Arc<Mutex<Instant>>,
}

impl Subscription {
    /// The next step; `None` once the watch has ended (the client is being dropped).
    pub(crate) async fn next(&mut self) -> Option<Step> {
        match self.rx.recv().await {
            Ok(step) => Some(step),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Step::Resynced),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        *self.released.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
}

impl Inner {
    /// A subscription to this client's watch of `dir`, if it has one: no request.
    pub(crate) fn subscribe_lock_watch(&self, dir: &str) -> Option<Subscription> {
        let map = self.lock_watches.lock().unwrap_or_else(|p| p.into_inner());
        map.get(dir).map(|s| s.subscribe())
    }

    /// Opens a watch of `dir` at "now" (one request), returns once etcd has confirmed it, and
    /// keeps it as this client's watch of `dir` unless another one was registered meanwhile
    /// (then this one serves only the returned subscription). Every deletion committed after
    /// this returns is reported to the subscription.
    pub(crate) async fn open_lock_watch(
        self: &Arc<Self>,
        dir: &str,
        name: &str,
    ) -> Result<Subscription> {
        let (stream, _) = open_watch(self, dir, 0, name, true).await?;
        let (tx, _) = broadcast::channel(CAPACITY);
        let shared = Arc::new(Shared {
            tx,
            released: Arc::new(Mutex::new(Instant::now())),
        });
        let sub = shared.subscribe();
        let registered = {
            let mut map = self.lock_watches.lock().unwrap_or_else(|p| p.into_inner());
            if map.contains_key(dir) {
                false
            } else {
                map.insert(dir.to_string(), shared.clone());
                true
            }
        };
        tokio::spawn(pump(
            Arc::downgrade(self),
            self.shutdown.clone(),
            dir.to_string(),
            name.to_string(),
            stream,
            shared,
            registered,
        ));
        Ok(sub)
    }
}

/// Forwards the watch's deletions to its subscribers, reopens a broken stream, and ends when
/// the client is dropped or the watch has been idle for [`LINGER`] (an unregistered watch: as
/// soon as its one subscriber is gone).
async fn pump(
    inner: Weak<Inner>,
    shutdown: CancellationToken,
    dir: String,
    name: String,
    mut stream: etcd_client::WatchStream,
    shared: Arc<Shared>,
    registered: bool,
) {
    let linger = if registered { LINGER } else { Duration::ZERO };
    let mut tick = tokio::time::interval(IDLE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if !shared.idle_for(linger) {
                    continue;
                }
                if !registered {
                    return;
                }
                let Some(inner) = inner.upgrade() else { return };
                let mut map = inner.lock_watches.lock().unwrap_or_else(|p| p.into_inner());
                // Subscribing happens under the same lock: nobody can join in between.
                if shared.idle_for(linger) {
                    if map.get(&dir).is_some_and(|s| Arc::ptr_eq(s, &shared)) {
                        map.remove(&dir);
                    }
                    return;
                }
                continue;
            }
            msg = stream.message() => msg,
        };
        match msg {
            Ok(Some(resp)) if !resp.canceled() => {
                let deleted: Vec<Deleted> = resp
                    .events()
                    .iter()
                    .filter_map(classify)
                    .filter_map(|ev| match ev {
                        RawEvent::Delete(kv) => Some(Deleted {
                            key: kv.key().to_vec(),
                            rev: kv.mod_revision(),
                        }),
                        RawEvent::Put(_) => None,
                    })
                    .collect();
                if !deleted.is_empty() {
                    let _ = shared.tx.send(Step::Deletes(deleted.into()));
                }
                continue;
            }
            Ok(_) => {
                tracing::debug!(lock = %name, "lock watch ended or was cancelled by etcd; reopening");
            }
            Err(e) => {
                tracing::debug!(lock = %name, error = %error::map(e, "lock watch"), "lock watch broke; reopening");
            }
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(strong) = inner.upgrade() else {
                return;
            };
            if shared.tx.receiver_count() == 0 {
                // Nobody to reopen it for: the next attempt opens a new one.
                let mut map = strong
                    .lock_watches
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if shared.tx.receiver_count() == 0 {
                    if map.get(&dir).is_some_and(|s| Arc::ptr_eq(s, &shared)) {
                        map.remove(&dir);
                    }
                    return;
                }
            }
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = open_watch(&strong, &dir, 0, &name, true) => r,
            };
            drop(strong);
            match opened {
                Ok((s, _)) => {
                    stream = s;
                    break;
                }
                Err(e) => {
                    tracing::debug!(lock = %name, error = %e, "reopening the lock watch failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        let _ = shared.tx.send(Step::Resynced);
    }
}
