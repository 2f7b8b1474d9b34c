//! [`DistLock`] in Apache Curator's `InterProcessMutex` layout.
//!
//! A contender creates the ephemeral sequential znode `<root>/locks/NAME/_c_<uuid>-lock-<seq>`
//! (Curator's "protected" name: after a lost create response the contender finds its node again
//! by the uuid), sorts all children of `<root>/locks/NAME` by the text after the last `lock-`
//! (Curator's `StandardLockInternalsDriver`), holds the lock when its node is first, and
//! otherwise watches only the node just before its own.
//!
//! Every acquisition uses a ZooKeeper session of its own whose timeout is the lock's TTL
//! (sessions are pooled per TTL and reused). The session's heartbeats are the keep-alive: a
//! holder that stops (crash, pause, [`LockGuard::suspend_keep_alive`]) loses its node when the
//! server expires the session. The fencing token is the czxid of the own node.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zookeeper_client as zk;

use super::error::{err, NAME};
use super::{e_zk, lock_std, open_session, path, Inner, ZkStore};
use crate::error::{Error, ErrorKind, Result};
use crate::key::validate_lock_name;
use crate::lock::{DistLock, FencingToken, LockGuard, LockHandle, LockOptions};

/// The lock name Curator's `InterProcessMutex` uses inside node names.
pub const LOCK_NAME: &str = "lock-";
/// Idle lock sessions kept per TTL.
const POOL_MAX: usize = 8;

/// Curator's `StandardLockInternalsDriver.fixForSorting`: the text after the last `lock-`, or
/// the whole name.
pub fn sort_key(name: &str) -> &str {
    match name.rfind(LOCK_NAME) {
        Some(i) => &name[i + LOCK_NAME.len()..],
        None => name,
    }
}

/// Sorts contender names as Curator does (stable, by [`sort_key`]).
pub fn sort_contenders(children: &mut [String]) {
    children.sort_by(|a, b| sort_key(a).cmp(sort_key(b)));
}

fn is(e: &Error, z: zk::Error) -> bool {
    e_zk(e) == Some(&z)
}

impl Inner {
    /// An idle lock session for `ttl`, or a new one.
    async fn take_session(&self, ttl: Duration) -> Result<zk::Client> {
        let key = ttl.as_millis() as u64;
        loop {
            let idle = lock_std(&self.pool).get_mut(&key).and_then(|v| v.pop());
            match idle {
                Some(c) if c.state() == zk::SessionState::SyncConnected => return Ok(c),
                Some(c) => close_session(&self.cfg, c),
                None => break,
            }
        }
        let client = open_session(&self.cfg, ttl, true).await?;
        if client.session_timeout() > ttl + ttl / 2 {
            tracing::warn!(
                backend = NAME,
                "lock TTL {ttl:?} raised by the server to {:?} (its minSessionTimeout)",
                client.session_timeout()
            );
        }
        Ok(client)
    }

    fn return_session(&self, ttl: Duration, client: zk::Client) {
        if client.state() != zk::SessionState::SyncConnected {
            close_session(&self.cfg, client);
            return;
        }
        let mut pool = lock_std(&self.pool);
        let idle = pool.entry(ttl.as_millis() as u64).or_default();
        if idle.len() < POOL_MAX {
            idle.push(client);
        } else {
            drop(pool);
            close_session(&self.cfg, client);
        }
    }
}

/// Closes a detached session properly (re-attaching to it without `detached` and dropping the
/// handle sends CloseSession), in the background. Without a runtime, the session simply expires.
pub(crate) fn close_session(cfg: &super::ZkConfig, client: zk::Client) {
    let info = client.session().clone();
    let hosts = cfg.hosts();
    let timeout = cfg.connect_timeout;
    drop(client);
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let connect = zk::Client::connector()
                .with_session(info)
                .with_fail_eagerly()
                .connect(&hosts);
            // Dropping the re-attached handle closes the session.
            let _ = tokio::time::timeout(timeout, connect).await;
        });
    }
}

/// Deletes a contender node if the acquisition is abandoned (timeout, cancelled future, error),
/// then puts its session back into the pool: at once with [`NodeGuard::withdraw`], or in the
/// background when dropped armed.
struct NodeGuard {
    inner: Weak<Inner>,
    ttl: Duration,
    client: Option<zk::Client>,
    path: String,
}

impl NodeGuard {
    fn disarm(&mut self) -> Option<zk::Client> {
        self.client.take()
    }

    /// Deletes the contender node now (bounded by the request timeout) and puts the session
    /// back into the pool. If the delete fails, the session's expiry removes the node.
    async fn withdraw(mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let r =
            tokio::time::timeout(inner.cfg.request_timeout, client.delete(&self.path, None)).await;
        match r {
            Ok(Ok(())) | Ok(Err(zk::Error::NoNode)) => inner.return_session(self.ttl, client),
            Ok(Err(e)) => {
                tracing::debug!(backend = NAME, error = %e, "withdrawing a lock node failed");
            }
            Err(_) => {
                tracing::debug!(backend = NAME, "withdrawing a lock node timed out");
            }
        }
    }

    /// Withdraws (see [`NodeGuard::withdraw`]) and returns the `Timeout` error to report.
    async fn give_up(self, name: &str, wait: Option<Duration>) -> Error {
        self.withdraw().await;
        timed_out(name, wait)
    }
}

fn timed_out(name: &str, wait: Option<Duration>) -> Error {
    err(
        ErrorKind::Timeout,
        name,
        format!("lock not acquired within {:?}", wait.unwrap_or_default()),
    )
}

/// Runs `fut` until `deadline`: `None` if the deadline passed first (`fut` is then dropped).
async fn until<F: std::future::Future>(deadline: Option<Instant>, fut: F) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// Background deletion, for an attempt whose future was dropped by the caller (cancelled) or
/// that failed: an attempt that gives up by itself (timeout, `try_lock` behind others)
/// withdraws before it returns.
impl Drop for NodeGuard {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let path = std::mem::take(&mut self.path);
        let inner = self.inner.clone();
        let ttl = self.ttl;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for _ in 0..5 {
                    match tokio::time::timeout(Duration::from_secs(5), client.delete(&path, None))
                        .await
                    {
                        Ok(Ok(())) | Ok(Err(zk::Error::NoNode)) => {
                            if let Some(inner) = inner.upgrade() {
                                inner.return_session(ttl, client);
                            }
                            return;
                        }
                        Ok(Err(e)) if e_is_final(&e) => return,
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                // Could not delete: the session's expiry removes the node.
                drop(client);
            });
        }
    }
}

fn e_is_final(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::SessionExpired | zk::Error::ClientClosed | zk::Error::AuthFailed
    )
}

#[derive(Clone, Copy)]
enum Mode {
    Try,
    /// Wait at most this long (`None`: without bound).
    Wait(Option<Duration>),
}

struct Acquired {
    client: zk::Client,
    path: String,
    czxid: i64,
}

impl ZkStore {
    fn check_lock_args(&self, name: &str, opts: &LockOptions) -> Result<()> {
        validate_lock_name(name)?;
        let min = self.inner.cfg.min_session_timeout;
        if opts.ttl < min || opts.ttl.is_zero() {
            return Err(err(
                ErrorKind::InvalidArgument,
                name,
                format!(
                    "lock TTL {:?} is below the server's minimum session timeout {min:?}",
                    opts.ttl
                ),
            ));
        }
        if opts.ttl.as_millis() > i32::MAX as u128 {
            return Err(err(ErrorKind::InvalidArgument, name, "lock TTL too large"));
        }
        Ok(())
    }

    async fn acquire(&self, name: &str, ttl: Duration, mode: Mode) -> Result<Option<Acquired>> {
        let inner = &self.inner;
        let (deadline, wait) = match mode {
            Mode::Wait(w) => (w.map(|w| Instant::now() + w), w),
            Mode::Try => (None, None),
        };
        let client = match until(deadline, inner.take_session(ttl)).await {
            Some(r) => r?,
            None => return Err(timed_out(name, wait)),
        };
        let dir = path::lock_dir(&inner.root, name);
        if matches!(mode, Mode::Try) {
            match inner
                .bounded("lock", name, client.list_children(&dir))
                .await
            {
                Ok(children) if !children.is_empty() => {
                    inner.return_session(ttl, client);
                    return Ok(None);
                }
                Ok(_) => {}
                Err(e) if is(&e, zk::Error::NoNode) => {}
                Err(e) => return Err(e),
            }
        }
        let id = uuid::Uuid::new_v4();
        let protected = format!("_c_{id}-");
        let prefix = format!("{dir}/{protected}{LOCK_NAME}");
        let opts = zk::CreateMode::EphemeralSequential.with_acls(inner.acls());
        // Create the contender node, finding it again by its uuid after a lost response.
        let created = match until(
            deadline,
            self.create_node(&client, &dir, &prefix, &protected, &opts, name),
        )
        .await
        {
            Some(r) => r?,
            None => {
                // The create may have landed: find the node by its uuid and delete it.
                self.withdraw_protected(client, ttl, &dir, &protected, name)
                    .await;
                return Err(timed_out(name, wait));
            }
        };
        let Some((own, czxid)) = created else {
            return Err(err(
                ErrorKind::Unavailable,
                name,
                "could not create the lock node",
            ));
        };
        let mut guard = NodeGuard {
            inner: Arc::downgrade(&self.inner),
            ttl,
            client: Some(client.clone()),
            path: own.clone(),
        };
        let own_name = own.rsplit('/').next().unwrap_or_default().to_string();
        loop {
            let listed = until(
                deadline,
                inner.bounded("lock", name, client.list_children(&dir)),
            )
            .await;
            let mut children = match listed {
                Some(r) => r?,
                None => return Err(guard.give_up(name, wait).await),
            };
            sort_contenders(&mut children);
            let Some(idx) = children.iter().position(|c| *c == own_name) else {
                return Err(err(
                    ErrorKind::Unavailable,
                    name,
                    "the lock node vanished while waiting (session expired)",
                ));
            };
            if idx == 0 {
                guard.disarm();
                return Ok(Some(Acquired {
                    client,
                    path: own,
                    czxid,
                }));
            }
            if matches!(mode, Mode::Try) {
                // Queued behind others: leave at once.
                guard.withdraw().await;
                return Ok(None);
            }
            let pred = format!("{dir}/{}", children[idx - 1]);
            let watched = until(
                deadline,
                inner.bounded("lock", name, client.check_and_watch_stat(&pred)),
            )
            .await;
            let (stat, watcher) = match watched {
                Some(r) => r?,
                None => return Err(guard.give_up(name, wait).await),
            };
            if stat.is_none() {
                continue;
            }
            let changed = watcher.changed();
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, changed).await.is_err() {
                        // Give up: the own node is deleted before `Timeout` is returned, so
                        // the next contender does not wait for it.
                        return Err(guard.give_up(name, wait).await);
                    }
                }
                None => {
                    changed.await;
                }
            }
            if client.state().is_terminated() {
                return Err(err(
                    ErrorKind::Unavailable,
                    name,
                    format!("the lock session ended while waiting ({})", client.state()),
                ));
            }
        }
    }

    /// Creates the contender node `<prefix><seq>`; after a lost response, finds it again by
    /// its `protected` uuid prefix. Returns its path and czxid, `None` if it never got created.
    async fn create_node(
        &self,
        client: &zk::Client,
        dir: &str,
        prefix: &str,
        protected: &str,
        opts: &zk::CreateOptions<'_>,
        name: &str,
    ) -> Result<Option<(String, i64)>> {
        let inner = &self.inner;
        let mut created: Option<(String, i64)> = None;
        for _ in 0..16 {
            match inner
                .bounded("lock", name, client.create(prefix, b"", opts))
                .await
            {
                Ok((stat, seq)) => {
                    created = Some((format!("{prefix}{seq}"), stat.czxid));
                    break;
                }
                Err(e) if is(&e, zk::Error::NoNode) => {
                    inner.ensure_parents(client, prefix, name).await?;
                }
                Err(e) if is(&e, zk::Error::ConnectionLoss) => {
                    let children = inner
                        .bounded("lock", name, client.list_children(dir))
                        .await
                        .unwrap_or_default();
                    if let Some(own) = children.into_iter().find(|c| c.starts_with(protected)) {
                        let own = format!("{dir}/{own}");
                        if let Some(stat) =
                            inner.bounded("lock", name, client.check_stat(&own)).await?
                        {
                            created = Some((own, stat.czxid));
                            break;
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(created)
    }

    /// Deletes this attempt's node, found by its `protected` uuid prefix, if it exists
    /// (bounded by the request timeout); puts the session back into the pool when done.
    async fn withdraw_protected(
        &self,
        client: zk::Client,
        ttl: Duration,
        dir: &str,
        protected: &str,
        name: &str,
    ) {
        let inner = &self.inner;
        let children = match inner.bounded("lock", name, client.list_children(dir)).await {
            Ok(c) => c,
            Err(e) if is(&e, zk::Error::NoNode) => Vec::new(),
            Err(e) => {
                tracing::debug!(backend = NAME, error = %e, "withdrawing a lock node failed");
                return;
            }
        };
        for own in children.iter().filter(|c| c.starts_with(protected)) {
            let path = format!("{dir}/{own}");
            match inner
                .bounded("lock", name, client.delete(&path, None))
                .await
            {
                Ok(()) => {}
                Err(e) if is(&e, zk::Error::NoNode) => {}
                Err(e) => {
                    tracing::debug!(backend = NAME, error = %e, "withdrawing a lock node failed");
                    return;
                }
            }
        }
        inner.return_session(ttl, client);
    }

    fn make_guard(&self, name: &str, ttl: Duration, acq: Acquired) -> LockGuard {
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let suspend = CancellationToken::new();
        let handle = ZkLock {
            inner: self.inner.clone(),
            name: name.to_string(),
            ttl,
            path: acq.path.clone(),
            session: Arc::new(Mutex::new(Some(acq.client.clone()))),
            stop: stop.clone(),
            suspend: suspend.clone(),
            suspended: Arc::new(AtomicBool::new(false)),
        };
        let monitor = Monitor {
            inner: Arc::downgrade(&self.inner),
            path: acq.path,
            session: handle.session.clone(),
            state: acq.client.state_watcher(),
            timeout: acq.client.session_timeout(),
            ttl,
            lost: lost.clone(),
            stop,
            suspend,
        };
        drop(acq.client);
        tokio::spawn(monitor.run());
        LockGuard::new(
            name,
            FencingToken::from_raw(acq.czxid as u64),
            lost,
            Box::new(handle),
        )
    }
}

#[async_trait]
impl DistLock for ZkStore {
    async fn lock(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        self.check_lock_args(name, opts)?;
        // The wait bound is applied inside, where a node created by this attempt can be
        // deleted before `Timeout` is returned.
        let acquired = self.acquire(name, opts.ttl, Mode::Wait(opts.wait)).await?;
        match acquired {
            Some(acq) => Ok(self.make_guard(name, opts.ttl, acq)),
            None => Err(err(
                ErrorKind::Backend,
                name,
                "waiting lock returned nothing",
            )),
        }
    }

    async fn try_lock(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>> {
        self.check_lock_args(name, opts)?;
        Ok(self
            .acquire(name, opts.ttl, Mode::Try)
            .await?
            .map(|acq| self.make_guard(name, opts.ttl, acq)))
    }
}

/// The held lock.
struct ZkLock {
    inner: Arc<Inner>,
    name: String,
    ttl: Duration,
    path: String,
    /// The lock's own session; `None` once suspended.
    session: Arc<Mutex<Option<zk::Client>>>,
    stop: CancellationToken,
    suspend: CancellationToken,
    suspended: Arc<AtomicBool>,
}

#[async_trait]
impl LockHandle for ZkLock {
    async fn release(self: Box<Self>) -> Result<()> {
        self.stop.cancel();
        let session = lock_std(&self.session).take();
        if let Some(client) = session {
            let r = self
                .inner
                .bounded("unlock", &self.name, client.delete(&self.path, None))
                .await;
            match r {
                Ok(()) => {
                    self.inner.return_session(self.ttl, client);
                    return Ok(());
                }
                Err(e) if is(&e, zk::Error::NoNode) => {
                    self.inner.return_session(self.ttl, client);
                    return Ok(());
                }
                Err(_) => close_session(&self.inner.cfg, client),
            }
        }
        // Suspended or the lock session failed: remove the node through the main session (the
        // name is unique to this acquisition, so this never touches another holder's node).
        let client = self.inner.client().await?;
        match self
            .inner
            .bounded("unlock", &self.name, client.delete(&self.path, None))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is(&e, zk::Error::NoNode) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn suspend_keep_alive(&self) {
        if self.suspended.swap(true, Ordering::SeqCst) {
            return;
        }
        self.suspend.cancel();
        // Dropping the last handle of the detached session closes its connection without
        // closing the session: heartbeats stop and the server expires it after the TTL.
        drop(lock_std(&self.session).take());
    }
}

/// Watches a held lock and fires `lost`.
struct Monitor {
    inner: Weak<Inner>,
    path: String,
    session: Arc<Mutex<Option<zk::Client>>>,
    state: zk::StateWatcher,
    timeout: Duration,
    ttl: Duration,
    lost: CancellationToken,
    stop: CancellationToken,
    suspend: CancellationToken,
}

/// What the watch on the own node reported.
enum NodeOutcome {
    Event(zk::WatchedEvent),
    Gone,
    Failed(zk::Error),
}

type NodeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = NodeOutcome> + Send>>;

enum Step {
    Released,
    Suspended,
    Lost(String),
    Continue,
}

impl Monitor {
    /// Watches the own node through the lock session (a future, so that arming never blocks
    /// the monitor while the connection is down); `None` without a session.
    fn arm(&self) -> Option<NodeFuture> {
        let client = lock_std(&self.session).clone()?;
        let path = self.path.clone();
        Some(Box::pin(async move {
            let r = client.check_and_watch_stat(&path).await;
            drop(client);
            match r {
                Ok((Some(_), w)) => NodeOutcome::Event(w.changed().await),
                Ok((None, _)) => NodeOutcome::Gone,
                Err(e) => NodeOutcome::Failed(e),
            }
        }))
    }

    async fn run(mut self) {
        let why = self.watch_session().await;
        if let Some(why) = why {
            tracing::info!(backend = NAME, lock = %self.path, "lock lost: {why}");
            self.lost.cancel();
        }
    }

    /// Returns why the lock is lost, or `None` if it was released.
    async fn watch_session(&mut self) -> Option<String> {
        // `None` while disconnected: the node watch is re-armed after the reconnect.
        let mut node: Option<NodeFuture> = self.arm();
        let mut retry_at: Option<Instant> = None;
        let mut down_since: Option<Instant> = None;
        // The server expires the session one session timeout after it last heard from us; the
        // client notices a silent connection after 2/5 of it, so give up 3/5 after that.
        let limit = self.timeout * 3 / 5;
        loop {
            let give_up = down_since.map(|t| t + limit);
            let step = tokio::select! {
                biased;
                _ = self.stop.cancelled() => Step::Released,
                _ = self.suspend.cancelled() => Step::Suspended,
                out = poll_opt(&mut node) => {
                    node = None;
                    match out {
                        NodeOutcome::Gone => Step::Lost("the lock node is gone".into()),
                        NodeOutcome::Failed(e) if e_is_final(&e) => {
                            Step::Lost(format!("the lock session ended: {e}"))
                        }
                        NodeOutcome::Failed(_) => {
                            retry_at = Some(Instant::now() + Duration::from_millis(200));
                            Step::Continue
                        }
                        NodeOutcome::Event(ev) => match ev.event_type {
                            zk::EventType::NodeDeleted => {
                                Step::Lost("the lock node was deleted".into())
                            }
                            zk::EventType::Session if ev.session_state.is_terminated() => {
                                Step::Lost(format!("the lock session is {}", ev.session_state))
                            }
                            zk::EventType::Session => {
                                if ev.session_state == zk::SessionState::Disconnected {
                                    down_since.get_or_insert_with(Instant::now);
                                } else {
                                    node = self.arm();
                                }
                                Step::Continue
                            }
                            _ => {
                                node = self.arm();
                                Step::Continue
                            }
                        },
                    }
                }
                _ = sleep_until_opt(retry_at), if node.is_none() && down_since.is_none() => {
                    retry_at = None;
                    node = self.arm();
                    Step::Continue
                }
                st = self.state.changed() => match st {
                    zk::SessionState::Disconnected => {
                        down_since.get_or_insert_with(Instant::now);
                        Step::Continue
                    }
                    zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                        down_since = None;
                        if node.is_none() {
                            node = self.arm();
                        }
                        Step::Continue
                    }
                    other => Step::Lost(format!("the lock session is {other}")),
                },
                _ = sleep_until_opt(give_up) => Step::Lost(format!(
                    "disconnected from ZooKeeper for longer than the session timeout {:?}",
                    self.timeout
                )),
            };
            if self.suspend.is_cancelled() {
                // Let go of every handle on the lock session before waiting for it to lapse.
                drop(node.take());
                return self.suspended().await;
            }
            match step {
                Step::Released => return None,
                Step::Suspended => {
                    drop(node.take());
                    return self.suspended().await;
                }
                Step::Lost(why) => return Some(why),
                Step::Continue => {}
            }
        }
    }

    /// After `suspend_keep_alive`: the lock lapses when the server expires the session. Fires at
    /// the deletion of the node (seen through the main session) or one TTL after the
    /// suspension, whichever comes first.
    async fn suspended(&mut self) -> Option<String> {
        let give_up = Instant::now() + self.ttl;
        loop {
            if self.stop.is_cancelled() {
                return None;
            }
            let inner = self.inner.upgrade()?;
            let client = match inner.client().await {
                Ok(c) => c,
                Err(_) => {
                    drop(inner);
                    tokio::select! {
                        _ = self.stop.cancelled() => return None,
                        _ = tokio::time::sleep_until(give_up) => return Some("keep-alive suspended past the TTL".into()),
                    }
                }
            };
            drop(inner);
            let watched =
                tokio::time::timeout(self.timeout, client.check_and_watch_stat(&self.path)).await;
            drop(client);
            let watcher = match watched {
                Ok(Ok((Some(_), w))) => w,
                Ok(Ok((None, _))) => return Some("the lock node was deleted".into()),
                _ => {
                    tokio::select! {
                        _ = self.stop.cancelled() => return None,
                        _ = tokio::time::sleep_until(give_up) => return Some("keep-alive suspended past the TTL".into()),
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    }
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => return None,
                _ = tokio::time::sleep_until(give_up) => return Some("keep-alive suspended past the TTL".into()),
                ev = watcher.changed() => {
                    if ev.event_type == zk::EventType::NodeDeleted {
                        return Some("the lock node was deleted (session expired)".into());
                    }
                }
            }
        }
    }
}

async fn poll_opt(f: &mut Option<NodeFuture>) -> NodeOutcome {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_like_curator() {
        let mut c: Vec<String> = [
            "_c_bbb-lock-0000000003",
            "_c_aaa-lock-0000000010",
            "_c_ccc-lock-0000000001",
            "other",
            "x-lock-lock-0000000002",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        sort_contenders(&mut c);
        assert_eq!(
            c,
            [
                "_c_ccc-lock-0000000001",
                "x-lock-lock-0000000002",
                "_c_bbb-lock-0000000003",
                "_c_aaa-lock-0000000010",
                "other",
            ]
        );
    }
}
