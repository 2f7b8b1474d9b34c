//! [`DistLock`] in Apache Curator's `InterProcessMutex` layout.
//!
//! A contender creates the ephemeral sequential znode `<root>/locks/NAME/_c_<uuid>-lock-<seq>`
//! (Curator's "protected" name: after a lost create response the contender finds its node again
//! by the uuid), sorts the contender children of `<root>/locks/NAME` by the text after the last
//! `lock-` (Curator's `StandardLockInternalsDriver`), holds the lock when its node is first, and
//! otherwise watches only the contender just before its own. Children that are not contender
//! nodes (the directories of nested lock names such as `NAME/sub`) never count.
//!
//! Every acquisition uses a ZooKeeper session of its own whose timeout is the lock's TTL
//! (sessions are pooled per TTL and reused). The lock's deadline is kept by the lease clock
//! ([`crate::lease`]): the server expires a session no earlier than the negotiated session
//! timeout after the last packet it received from it, so after every answered request on the
//! lock session the deadline is that request's send time + the negotiated timeout − margin. The
//! renewer is an `exists` of the own node on the lock session. The fencing token is the czxid of
//! the own node.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zookeeper_client as zk;

use super::error::{err, map, NAME};
use super::{e_zk, lock_std, open_session, path, Inner, ZkStore};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{self, Lease, Renew, RenewPolicy, Renewal};
use crate::lock::{DistLock, FencingToken, LockGuard, LockHandle, LockOptions};

/// The lock name Curator's `InterProcessMutex` uses inside node names.
pub const LOCK_NAME: &str = "lock-";
/// Idle lock sessions kept per TTL.
const POOL_MAX: usize = 8;
/// How long a lock is held before its node is watched for deletion by others (see
/// [`Monitor`]).
const ARM_DELAY: Duration = Duration::from_millis(100);

/// Curator's `StandardLockInternalsDriver.fixForSorting`: the text after the last `<node>`
/// (`lock-` for locks, `latch-` for `LeaderLatch`), or the whole name.
pub fn sort_key_for<'a>(node: &str, name: &'a str) -> &'a str {
    match name.rfind(node) {
        Some(i) => &name[i + node.len()..],
        None => name,
    }
}

/// Sorts contender names as Curator does (stable, by [`sort_key_for`]).
#[cfg(test)]
pub fn sort_contenders(children: &mut [String]) {
    sort_contenders_for(LOCK_NAME, children)
}

/// [`sort_contenders`] for nodes named `…<node><seq>`.
pub fn sort_contenders_for(node: &str, children: &mut [String]) {
    children.sort_by(|a, b| sort_key_for(node, a).cmp(sort_key_for(node, b)));
}

/// Whether a child of a lock directory has the form of a contender node: Curator's
/// `…lock-<sequence number>` (with or without the protected `_c_<uuid>-` prefix). Other
/// children, such as the directory of a nested lock name, are not contenders.
#[cfg(test)]
pub fn is_contender_name(name: &str) -> bool {
    is_contender_name_for(LOCK_NAME, name)
}

/// [`is_contender_name`] for nodes named `…<node><seq>`.
pub fn is_contender_name_for(node: &str, name: &str) -> bool {
    let seq = match name.rfind(node) {
        Some(i) => &name[i + node.len()..],
        None => return false,
    };
    !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit())
}

/// The contenders among `children`, sorted as Curator sorts them, without the names in
/// `skip` (children found not to be contender nodes), and the index of the first that belongs
/// to this attempt (starts with `protected`): every node with the attempt's uuid is its own.
#[cfg(test)]
pub fn queue(
    children: Vec<String>,
    protected: &str,
    skip: &HashSet<String>,
) -> (Vec<String>, Option<usize>) {
    queue_for(LOCK_NAME, children, protected, skip)
}

/// [`queue`] for nodes named `…<node><seq>`.
pub fn queue_for(
    node: &str,
    children: Vec<String>,
    protected: &str,
    skip: &HashSet<String>,
) -> (Vec<String>, Option<usize>) {
    let mut contenders: Vec<String> = children
        .into_iter()
        .filter(|c| is_contender_name_for(node, c) && !skip.contains(c))
        .collect();
    sort_contenders_for(node, &mut contenders);
    let own = contenders.iter().position(|c| c.starts_with(protected));
    (contenders, own)
}

pub(crate) fn is(e: &Error, z: zk::Error) -> bool {
    e_zk(e) == Some(&z)
}

/// Errors after which the session, and every ephemeral node it made, is gone.
fn e_is_final(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::SessionExpired | zk::Error::ClientClosed | zk::Error::AuthFailed
    )
}

/// `LockLost` for an error that means the lock session is gone, the error itself otherwise.
fn lost_or(e: Error, name: &str) -> Error {
    match e_zk(&e) {
        Some(z @ (zk::Error::SessionExpired | zk::Error::ClientClosed)) => err(
            ErrorKind::LockLost,
            name,
            format!("the lock session ended while acquiring: {z}"),
        ),
        _ => e,
    }
}

fn vanished(name: &str) -> Error {
    err(
        ErrorKind::LockLost,
        name,
        "the lock node vanished while waiting (session expired or node deleted)",
    )
}

impl Inner {
    /// An idle lock session for `ttl`, or a new one. A server that negotiates a session timeout
    /// above `ttl` is refused: the lock could then outlive its holder by more than its TTL.
    async fn take_session(&self, ttl: Duration, name: &str) -> Result<zk::Client> {
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
        let negotiated = client.session_timeout();
        if negotiated > ttl {
            close_session(&self.cfg, client);
            return Err(err(
                ErrorKind::InvalidArgument,
                name,
                format!(
                    "lock TTL {ttl:?} refused: the server negotiated a session timeout of \
                     {negotiated:?} (its minSessionTimeout is above the TTL); use a TTL of at \
                     least {negotiated:?}, and set min_session_timeout to the server's value"
                ),
            ));
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

/// Deletes this attempt's node(s): `path` if the create's answer named it, otherwise every
/// child of `dir` with the attempt's `protected` uuid prefix (after a `sync`, so that a create
/// sent before is seen).
async fn remove_own(
    client: &zk::Client,
    dir: &str,
    protected: &str,
    path: Option<&str>,
) -> std::result::Result<(), zk::Error> {
    if let Some(p) = path {
        return match client.delete(p, None).await {
            Ok(()) | Err(zk::Error::NoNode) => Ok(()),
            Err(e) => Err(e),
        };
    }
    match client.sync(dir).await {
        Ok(()) | Err(zk::Error::NoNode) => {}
        Err(e) => return Err(e),
    }
    let children = match client.list_children(dir).await {
        Ok(c) => c,
        Err(zk::Error::NoNode) => return Ok(()),
        Err(e) => return Err(e),
    };
    for own in children.iter().filter(|c| c.starts_with(protected)) {
        match client.delete(&format!("{dir}/{own}"), None).await {
            Ok(()) | Err(zk::Error::NoNode) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Armed before the contender node is created: if the attempt is abandoned (timeout, error, or
/// its future dropped by the caller), the node — found by its path, or by the attempt's uuid
/// when the create's answer never came — is deleted and the session put back into the pool: at
/// once with [`NodeGuard::withdraw`], or in a background task when dropped armed.
struct NodeGuard {
    inner: Weak<Inner>,
    ttl: Duration,
    request_timeout: Duration,
    client: Option<zk::Client>,
    dir: String,
    protected: String,
    /// The own node, once known.
    path: Option<String>,
}

impl NodeGuard {
    fn disarm(&mut self) {
        self.client = None;
    }

    /// Deletes the attempt's node now, bounded by one request timeout in all, and puts the
    /// session back into the pool. If that fails, the guard stays armed and its drop goes on
    /// trying in the background.
    async fn withdraw(mut self) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let r = tokio::time::timeout(
            self.request_timeout,
            remove_own(&client, &self.dir, &self.protected, self.path.as_deref()),
        )
        .await;
        match r {
            Ok(Ok(())) => {
                self.client = None;
                if let Some(inner) = self.inner.upgrade() {
                    inner.return_session(self.ttl, client);
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(backend = NAME, error = %e, "withdrawing a lock node failed");
            }
            Err(_) => tracing::debug!(backend = NAME, "withdrawing a lock node timed out"),
        }
    }

    /// Withdraws (see [`NodeGuard::withdraw`]) and returns the `Timeout` error to report.
    async fn give_up(self, name: &str, wait: Option<Duration>) -> Error {
        self.withdraw().await;
        timed_out(name, wait)
    }
}

/// Background deletion, for an attempt whose future was dropped by the caller (cancelled), that
/// failed, or whose withdrawal did not finish in time.
impl Drop for NodeGuard {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        // Without a runtime the session handle is dropped here: the session then expires on the
        // server, taking the node with it.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        let (ttl, timeout) = (self.ttl, self.request_timeout);
        let dir = std::mem::take(&mut self.dir);
        let protected = std::mem::take(&mut self.protected);
        let path = self.path.take();
        rt.spawn(async move {
            // `None`: too far to represent, no bound (the TTL and timeout come from users).
            let give_up =
                lease::deadline_after(Some(ttl.saturating_add(timeout).saturating_mul(2)));
            let mut pause = Duration::from_millis(50);
            loop {
                match tokio::time::timeout(
                    timeout,
                    remove_own(&client, &dir, &protected, path.as_deref()),
                )
                .await
                {
                    Ok(Ok(())) => {
                        if let Some(inner) = inner.upgrade() {
                            inner.return_session(ttl, client);
                        }
                        return;
                    }
                    // The session is gone, and its ephemeral nodes with it.
                    Ok(Err(e)) if e_is_final(&e) => return,
                    _ => {}
                }
                if give_up.is_some_and(|g| Instant::now().checked_add(pause).is_none_or(|t| t >= g))
                {
                    break;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            // Could not delete: closing the session removes its nodes (or it expires).
            match inner.upgrade() {
                Some(inner) => close_session(&inner.cfg, client),
                None => drop(client),
            }
        });
    }
}

fn timed_out(name: &str, wait: Option<Duration>) -> Error {
    err(
        ErrorKind::Timeout,
        name,
        format!("lock not acquired within {:?}", wait.unwrap_or_default()),
    )
}

/// The server calls a protected create makes (so that its decisions can be checked against a
/// scripted server in the unit tests).
#[async_trait]
trait Contend: Send + Sync {
    /// Creates the contender node: its path and czxid.
    async fn create(&self) -> Result<(String, i64)>;
    /// Looks for the attempt's node by its uuid, after a `sync`: its path and czxid, `None` if
    /// it does not exist.
    async fn find(&self) -> Result<Option<(String, i64)>>;
    /// Creates the lock directory and its parents.
    async fn ensure_parents(&self) -> Result<()>;
}

/// Whether a failed create may nevertheless have created the node (its answer was lost).
fn ambiguous(e: &Error) -> bool {
    match e_zk(e) {
        Some(
            zk::Error::NoNode
            | zk::Error::NodeExists
            | zk::Error::NoAuth
            | zk::Error::InvalidAcl
            | zk::Error::BadArguments(_)
            | zk::Error::NoChildrenForEphemerals
            | zk::Error::Unimplemented
            | zk::Error::QuotaExceeded,
        ) => false,
        Some(z) if e_is_final(z) => false,
        _ => true,
    }
}

/// Creates the contender node (Curator's protected mode). After a create whose answer was lost,
/// looks the node up by the attempt's uuid until it is found or known to be absent — for at most
/// `lookup_for` — and creates again only when it is known to be absent, so one attempt never
/// owns two nodes. `last_sent` is set to the send time of the last answered request. Returns
/// the node's path and czxid; `None` if no create got through in 16 tries.
async fn create_protected(
    ops: &dyn Contend,
    name: &str,
    lookup_for: Duration,
    last_sent: &mut Instant,
) -> Result<Option<(String, i64)>> {
    for _ in 0..16 {
        let sent = Instant::now();
        let e = match ops.create().await {
            Ok(created) => {
                *last_sent = sent;
                return Ok(Some(created));
            }
            Err(e) if is(&e, zk::Error::NoNode) => {
                ops.ensure_parents().await?;
                continue;
            }
            Err(e) if !ambiguous(&e) => return Err(e),
            Err(e) => e,
        };
        tracing::debug!(backend = NAME, lock = name, error = %e, "lock node create unanswered; looking it up");
        let until = lease::deadline_after(Some(lookup_for));
        let mut pause = Duration::from_millis(20);
        let mut last: Error;
        loop {
            let sent = Instant::now();
            match ops.find().await {
                Ok(Some(found)) => {
                    *last_sent = sent;
                    return Ok(Some(found));
                }
                // Known absent: the create did not land; create again.
                Ok(None) => {
                    *last_sent = sent;
                    break;
                }
                Err(e) if e_zk(&e).is_some_and(e_is_final) => return Err(e),
                Err(e) => last = e,
            }
            if until.is_some_and(|u| Instant::now().checked_add(pause).is_none_or(|t| t >= u)) {
                return Err(err(
                    ErrorKind::Unavailable,
                    name,
                    format!(
                        "the answer to creating the lock node was lost, and whether the node \
                         exists could not be found out within {lookup_for:?}: {last}"
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
    Ok(None)
}

/// [`Contend`] on a real lock session.
struct ZkContend<'a> {
    inner: &'a Inner,
    client: &'a zk::Client,
    dir: &'a str,
    prefix: &'a str,
    protected: &'a str,
    opts: &'a zk::CreateOptions<'a>,
    name: &'a str,
    layout: &'a Layout,
    /// The first create, sent already (with the first listing behind it).
    first: Mutex<Option<CreateCall<'a>>>,
    /// Whether that first create made the node.
    first_ok: AtomicBool,
}

/// A create request sent to the server, waiting for its answer.
type CreateCall<'a> = Pin<
    Box<
        dyn Future<Output = std::result::Result<(zk::Stat, zk::CreateSequence), zk::Error>>
            + Send
            + 'a,
    >,
>;

#[async_trait]
impl Contend for ZkContend<'_> {
    async fn create(&self) -> Result<(String, i64)> {
        let sent = lock_std(&self.first).take();
        let (stat, seq) = match sent {
            Some(call) => {
                let r = self.inner.bounded("lock", self.name, call).await;
                self.first_ok.store(r.is_ok(), Ordering::Release);
                r?
            }
            None => {
                self.inner
                    .bounded(
                        "lock",
                        self.name,
                        self.client
                            .create(self.prefix, &self.layout.data, self.opts),
                    )
                    .await?
            }
        };
        Ok((format!("{}{seq}", self.prefix), stat.czxid))
    }

    async fn find(&self) -> Result<Option<(String, i64)>> {
        let (inner, client, dir) = (self.inner, self.client, self.dir);
        match inner.bounded("lock", self.name, client.sync(dir)).await {
            Ok(()) => {}
            Err(e) if is(&e, zk::Error::NoNode) => {}
            Err(e) => return Err(e),
        }
        let children = match inner
            .bounded("lock", self.name, client.list_children(dir))
            .await
        {
            Ok(c) => c,
            Err(e) if is(&e, zk::Error::NoNode) => return Ok(None),
            Err(e) => return Err(e),
        };
        let (contenders, own) =
            queue_for(self.layout.node, children, self.protected, &HashSet::new());
        let Some(i) = own else { return Ok(None) };
        let own = format!("{dir}/{}", contenders[i]);
        let stat = inner
            .bounded("lock", self.name, client.check_stat(&own))
            .await?;
        Ok(stat.map(|s| (own, s.czxid)))
    }

    async fn ensure_parents(&self) -> Result<()> {
        self.inner
            .ensure_parents(self.client, self.prefix, self.name)
            .await
    }
}

/// Where and how a recipe's contenders are created: see [`ZkStore::acquire_in`].
pub(crate) struct Layout {
    /// The directory znode whose children are the contenders.
    pub(crate) dir: String,
    /// The recipe's name inside node names (`lock-`, `latch-`).
    pub(crate) node: &'static str,
    /// The contender nodes' data.
    pub(crate) data: Vec<u8>,
}

#[derive(Clone, Copy)]
pub(crate) enum Mode {
    Try,
    /// Wait at most this long (`None`: without bound).
    Wait(Option<Duration>),
}

pub(crate) struct Acquired {
    client: zk::Client,
    pub(crate) path: String,
    czxid: i64,
    /// The send time of the last answered request on the lock session before the grant.
    sent: Instant,
}

impl ZkStore {
    /// Whether `path` is a contender node (ephemeral), not the directory of a nested lock name.
    /// `None` if it does not exist; with `watch`, also a watcher on it.
    async fn contender_stat(
        &self,
        client: &zk::Client,
        path: &str,
        name: &str,
        watch: bool,
    ) -> Result<(Option<bool>, Option<zk::OneshotWatcher>)> {
        let inner = &self.inner;
        if watch {
            let (stat, w) = inner
                .bounded("lock", name, client.check_and_watch_stat(path))
                .await?;
            Ok((stat.map(|s| s.ephemeral_owner != 0), Some(w)))
        } else {
            let stat = inner.bounded("lock", name, client.check_stat(path)).await?;
            Ok((stat.map(|s| s.ephemeral_owner != 0), None))
        }
    }

    /// Whether any child of `dir` is a live contender node right now (for `try_lock`).
    async fn has_contender(
        &self,
        client: &zk::Client,
        dir: &str,
        node: &str,
        name: &str,
    ) -> Result<bool> {
        let children = match self
            .inner
            .bounded("lock", name, client.list_children(dir))
            .await
        {
            Ok(c) => c,
            Err(e) if is(&e, zk::Error::NoNode) => return Ok(false),
            Err(e) => return Err(e),
        };
        let (contenders, _) = queue_for(node, children, "\u{0}", &HashSet::new());
        for c in contenders {
            let path = format!("{dir}/{c}");
            if let (Some(true), _) = self.contender_stat(client, &path, name, false).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn acquire(&self, name: &str, ttl: Duration, mode: Mode) -> Result<Option<Acquired>> {
        let layout = Layout {
            dir: path::lock_dir(&self.inner.root, name),
            node: LOCK_NAME,
            data: Vec::new(),
        };
        self.acquire_in(&layout, name, ttl, mode).await
    }

    /// Acquires the recipe laid out as `layout` (Curator's `InterProcessMutex` for locks,
    /// `LeaderLatch` for elections): the contenders are the ephemeral sequential children
    /// `_c_<uuid>-<node><seq>` of `layout.dir`, created with `layout.data`.
    pub(crate) async fn acquire_in(
        &self,
        layout: &Layout,
        name: &str,
        ttl: Duration,
        mode: Mode,
    ) -> Result<Option<Acquired>> {
        self.acquire_inner(layout, name, ttl, mode)
            .await
            .map_err(|e| lost_or(e, name))
    }

    async fn acquire_inner(
        &self,
        layout: &Layout,
        name: &str,
        ttl: Duration,
        mode: Mode,
    ) -> Result<Option<Acquired>> {
        let inner = &self.inner;
        let (deadline, wait) = match mode {
            Mode::Wait(w) => (lease::deadline_after(w), w),
            Mode::Try => (None, None),
        };
        let client = match lease::until(deadline, inner.take_session(ttl, name)).await {
            Some(r) => r?,
            None => return Err(timed_out(name, wait)),
        };
        let dir = layout.dir.clone();
        if matches!(mode, Mode::Try) && self.has_contender(&client, &dir, layout.node, name).await?
        {
            inner.return_session(ttl, client);
            return Ok(None);
        }
        let id = uuid::Uuid::new_v4();
        let protected = format!("_c_{id}-");
        let prefix = format!("{dir}/{protected}{}", layout.node);
        let opts = zk::CreateMode::EphemeralSequential.with_acls(inner.acls());
        // Armed before the create, so that a node whose create is cut short (timeout, error,
        // or this future dropped) is found by its uuid and deleted.
        let mut guard = NodeGuard {
            inner: Arc::downgrade(&self.inner),
            ttl,
            request_timeout: inner.cfg.request_timeout,
            client: Some(client.clone()),
            dir: dir.clone(),
            protected: protected.clone(),
            path: None,
        };
        let mut last_sent = Instant::now();
        // The create and the first listing are sent at once, one behind the other: a server
        // answers a session's requests in order, so the listing includes the node the create
        // made, and a free lock is taken after one round trip's wait instead of two.
        // (On a handle of its own, which the pending calls borrow, as the handle the lock keeps
        // is moved into the result.)
        let sender = client.clone();
        let first_sent = Instant::now();
        let first_create: CreateCall<'_> = Box::pin(sender.create(&prefix, &layout.data, &opts));
        let mut first_list = Some(sender.list_children(&dir));
        let ops = ZkContend {
            inner,
            client: &sender,
            dir: &dir,
            prefix: &prefix,
            protected: &protected,
            opts: &opts,
            name,
            layout,
            first: Mutex::new(Some(first_create)),
            first_ok: AtomicBool::new(false),
        };
        let created = lease::until(
            deadline,
            create_protected(&ops, name, inner.cfg.request_timeout, &mut last_sent),
        )
        .await;
        let (own, czxid) = match created {
            Some(Ok(Some(c))) => c,
            Some(Ok(None)) => {
                return Err(err(
                    ErrorKind::Unavailable,
                    name,
                    "could not create the lock node",
                ))
            }
            Some(Err(e)) => return Err(e),
            None => return Err(guard.give_up(name, wait).await),
        };
        guard.path = Some(own.clone());
        let own_name = own.rsplit('/').next().unwrap_or_default().to_string();
        // Children found not to be contender nodes (directories of nested lock names).
        let mut not_contenders: HashSet<String> = HashSet::new();
        loop {
            let mut sent = Instant::now();
            let listed = match first_list.take() {
                // Only a listing sent behind the create that made the node shows it.
                Some(list) if ops.first_ok.load(Ordering::Acquire) => {
                    sent = first_sent;
                    lease::until(deadline, inner.bounded("lock", name, list)).await
                }
                _ => {
                    lease::until(
                        deadline,
                        inner.bounded("lock", name, client.list_children(&dir)),
                    )
                    .await
                }
            };
            let children = match listed {
                Some(Ok(c)) => c,
                Some(Err(e)) if is(&e, zk::Error::NoNode) => return Err(vanished(name)),
                Some(Err(e)) => return Err(e),
                None => return Err(guard.give_up(name, wait).await),
            };
            last_sent = sent;
            let (contenders, idx) = queue_for(layout.node, children, &protected, &not_contenders);
            let Some(idx) = idx else {
                return Err(vanished(name));
            };
            if idx == 0 {
                if !contenders.contains(&own_name) {
                    // Only another node of this attempt is listed: ours is gone.
                    return Err(vanished(name));
                }
                guard.disarm();
                // Never more than one node per attempt; should another one with this uuid
                // exist, it goes.
                for extra in contenders
                    .iter()
                    .filter(|c| c.starts_with(&protected) && **c != own_name)
                {
                    let _ = inner
                        .bounded("lock", name, client.delete(&format!("{dir}/{extra}"), None))
                        .await;
                }
                return Ok(Some(Acquired {
                    client,
                    path: own,
                    czxid,
                    sent: last_sent,
                }));
            }
            let pred_name = contenders[idx - 1].clone();
            let pred = format!("{dir}/{pred_name}");
            let watch = matches!(mode, Mode::Wait(_));
            let checked =
                lease::until(deadline, self.contender_stat(&client, &pred, name, watch)).await;
            let (is_contender, watcher) = match checked {
                Some(r) => r?,
                None => return Err(guard.give_up(name, wait).await),
            };
            match is_contender {
                // Gone already: look again.
                None => continue,
                // The directory of a nested lock name: not a contender.
                Some(false) => {
                    not_contenders.insert(pred_name);
                    continue;
                }
                Some(true) => {}
            }
            let Some(watcher) = watcher else {
                // `try_lock` queued behind others: leave at once.
                guard.withdraw().await;
                return Ok(None);
            };
            if lease::until(deadline, watcher.changed()).await.is_none() {
                // Give up: the own node is deleted before `Timeout` is returned, so the next
                // contender does not wait for it.
                return Err(guard.give_up(name, wait).await);
            }
            if client.state().is_terminated() {
                return Err(err(
                    ErrorKind::LockLost,
                    name,
                    format!("the lock session ended while waiting ({})", client.state()),
                ));
            }
        }
    }

    pub(crate) fn make_guard(&self, name: &str, ttl: Duration, acq: Acquired) -> Result<LockGuard> {
        let timeout = acq.client.session_timeout();
        let session = Arc::new(Mutex::new(Some(acq.client.clone())));
        let renewer = SessionRenewer {
            session: Arc::downgrade(&session),
            path: acq.path.clone(),
        };
        let stop = CancellationToken::new();
        let suspend = CancellationToken::new();
        let monitor = Monitor {
            session: Arc::downgrade(&session),
            path: acq.path.clone(),
            state: acq.client.state_watcher(),
            stop: stop.clone(),
            suspend: suspend.clone(),
        };
        // The monitor runs in the lease's task: one task per held lock.
        let lease = Lease::start_watched(
            renewer,
            Some(Box::pin(monitor.run())),
            acq.sent,
            timeout,
            RenewPolicy {
                attempt_timeout: self.inner.cfg.request_timeout,
            },
        );
        let handle = ZkLock {
            inner: self.inner.clone(),
            name: name.to_string(),
            ttl,
            path: acq.path.clone(),
            session: session.clone(),
            lease: lease.clone(),
            stop: stop.clone(),
            suspend: suspend.clone(),
            suspended: Arc::new(AtomicBool::new(false)),
        };
        if lease.is_lost() {
            // The grant came too late to be relied on.
            LockHandle::release_detached(Box::new(handle));
            return Err(err(
                ErrorKind::LockLost,
                name,
                "the lock session's deadline passed while the lock was granted",
            ));
        }
        drop(acq.client);
        Ok(LockGuard::new(
            name,
            FencingToken::from_raw(acq.czxid as u64),
            lease.lost_token().child_token(),
            Box::new(handle),
        )
        .with_lease(&lease))
    }
}

#[async_trait]
impl DistLock for ZkStore {
    async fn lock(&self, name: &str, opts: &LockOptions) -> Result<LockGuard> {
        self.inner.capabilities().check_lock(name, opts)?;
        // The wait bound is applied inside, where a node created by this attempt can be
        // deleted before `Timeout` is returned.
        let acquired = self.acquire(name, opts.ttl, Mode::Wait(opts.wait)).await?;
        match acquired {
            Some(acq) => self.make_guard(name, opts.ttl, acq),
            None => Err(err(
                ErrorKind::Backend,
                name,
                "waiting lock returned nothing",
            )),
        }
    }

    async fn try_lock(&self, name: &str, opts: &LockOptions) -> Result<Option<LockGuard>> {
        self.inner.capabilities().check_lock(name, opts)?;
        match self.acquire(name, opts.ttl, Mode::Try).await? {
            Some(acq) => self.make_guard(name, opts.ttl, acq).map(Some),
            None => Ok(None),
        }
    }
}

/// The lease renewer of a held lock: an `exists` of the own node on the lock session. Its
/// answer proves that the server heard from the session after it was sent, so the session
/// cannot expire before the send time + the negotiated session timeout.
struct SessionRenewer {
    /// The lock's session; dead once the lock handle is dropped, `None` once suspended.
    session: Weak<Mutex<Option<zk::Client>>>,
    path: String,
}

impl Renew for SessionRenewer {
    fn renew(&mut self) -> Pin<Box<dyn Future<Output = Result<Renewal>> + Send + '_>> {
        Box::pin(async move {
            let Some(slot) = self.session.upgrade() else {
                return Ok(Renewal::Gone(
                    "the lock was dropped without being released".into(),
                ));
            };
            let client = lock_std(&slot).clone();
            drop(slot);
            let Some(client) = client else {
                return Err(err(
                    ErrorKind::Unavailable,
                    &self.path,
                    "the lock session's keep-alive is suspended",
                ));
            };
            match client.check_stat(&self.path).await {
                Ok(Some(_)) => Ok(Renewal::Confirmed(client.session_timeout())),
                Ok(None) => Ok(Renewal::Gone("the lock node is gone".into())),
                Err(e) if e_is_final(&e) => {
                    Ok(Renewal::Gone(format!("the lock session ended: {e}")))
                }
                Err(e) => Err(map(e, "renew lock", &self.path)),
            }
        })
    }
}

/// The held lock.
struct ZkLock {
    inner: Arc<Inner>,
    name: String,
    ttl: Duration,
    path: String,
    /// The lock's own session; `None` once suspended. The only strong handle: dropping the lock
    /// unreleased lets go of the session, which then expires with the node.
    session: Arc<Mutex<Option<zk::Client>>>,
    lease: Lease,
    stop: CancellationToken,
    suspend: CancellationToken,
    suspended: Arc<AtomicBool>,
}

#[async_trait]
impl LockHandle for ZkLock {
    async fn release(self: Box<Self>) -> Result<()> {
        self.stop.cancel();
        self.lease.stop();
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

    fn suspend_keep_alive(&self, _lost: &CancellationToken) {
        if self.suspended.swap(true, Ordering::SeqCst) {
            return;
        }
        self.lease.suspend();
        self.suspend.cancel();
        // Dropping the last handle of the detached session closes its connection without
        // closing the session: heartbeats stop and the server expires it after its timeout.
        drop(lock_std(&self.session).take());
    }
}

/// Watches a held lock and declares its lease lost early: at the deletion of the own node or
/// the end of the lock session. Otherwise the lease clock decides (a disconnected session is
/// not lost before the lease's deadline). The node's watch is set [`ARM_DELAY`] after the
/// grant, so a deletion of the node by someone else (an operator; no coordkit client deletes
/// another's node) is noticed up to that much later in the first moments of a hold.
struct Monitor {
    session: Weak<Mutex<Option<zk::Client>>>,
    path: String,
    state: zk::StateWatcher,
    stop: CancellationToken,
    suspend: CancellationToken,
}

/// What the watch on the own node reported.
enum NodeOutcome {
    Event(zk::WatchedEvent),
    Gone,
    Failed(zk::Error),
}

type NodeFuture = Pin<Box<dyn Future<Output = NodeOutcome> + Send>>;

impl Monitor {
    /// Watches the own node through the lock session (a future, so that arming never blocks
    /// the monitor while the connection is down); `None` once the session was let go of.
    fn arm(&self) -> Option<NodeFuture> {
        let slot = self.session.upgrade()?;
        let client = lock_std(&slot).clone()?;
        drop(slot);
        let path = self.path.clone();
        Some(Box::pin(async move {
            let r = client.check_and_watch_stat(&path).await;
            // Hold no session handle while waiting.
            drop(client);
            match r {
                Ok((Some(_), w)) => NodeOutcome::Event(w.changed().await),
                Ok((None, _)) => NodeOutcome::Gone,
                Err(e) => NodeOutcome::Failed(e),
            }
        }))
    }

    /// The lease's [`LossWatch`](crate::lease::LossWatch): why the lock is lost, or `None`
    /// when there is nothing left to watch (released, suspended, dropped). The lease's task
    /// drops it once the lease is lost or stopped.
    async fn run(mut self) -> Option<String> {
        let why = self.watch().await;
        if let Some(why) = &why {
            tracing::info!(backend = NAME, lock = %self.path, "lock lost: {why}");
        }
        why
    }

    async fn watch(&mut self) -> Option<String> {
        // The watch is armed only once the lock has been held for `ARM_DELAY`: a short hold
        // (lock, work, release) costs no packet for it. Until then a deleted node or an ended
        // session is noticed by the next renewal or the session's state, and the lease clock
        // bounds everything as always.
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => return None,
            _ = self.suspend.cancelled() => return None,
            _ = tokio::time::sleep(ARM_DELAY) => {}
        }
        let mut node = Some(self.arm()?);
        let mut retry_at: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                _ = self.suspend.cancelled() => return None,
                out = poll_opt(&mut node) => {
                    node = None;
                    match out {
                        NodeOutcome::Gone => return Some("the lock node is gone".into()),
                        NodeOutcome::Failed(e) if e_is_final(&e) => {
                            return Some(format!("the lock session ended: {e}"));
                        }
                        NodeOutcome::Failed(_) => {
                            retry_at = Some(Instant::now() + Duration::from_millis(200));
                        }
                        NodeOutcome::Event(ev) => match ev.event_type {
                            zk::EventType::NodeDeleted => {
                                return Some("the lock node was deleted".into());
                            }
                            zk::EventType::Session if ev.session_state.is_terminated() => {
                                return Some(format!("the lock session is {}", ev.session_state));
                            }
                            // Disconnected: armed again shortly (and at the reconnect).
                            zk::EventType::Session
                                if ev.session_state == zk::SessionState::Disconnected =>
                            {
                                retry_at = Some(Instant::now() + Duration::from_millis(200));
                            }
                            _ => node = Some(self.arm()?),
                        },
                    }
                }
                _ = sleep_until_opt(retry_at), if node.is_none() && retry_at.is_some() => {
                    retry_at = None;
                    node = Some(self.arm()?);
                }
                st = self.state.changed() => match st {
                    // The lease clock decides how long a disconnection may last.
                    zk::SessionState::Disconnected => {}
                    zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly
                        if node.is_none() =>
                    {
                        node = Some(self.arm()?);
                    }
                    other if other.is_terminated() => {
                        return Some(format!("the lock session is {other}"));
                    }
                    _ => {}
                },
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
    use std::sync::atomic::AtomicUsize;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sorts_like_curator() {
        let mut c = strings(&[
            "_c_bbb-lock-0000000003",
            "_c_aaa-lock-0000000010",
            "_c_ccc-lock-0000000001",
            "other",
            "x-lock-lock-0000000002",
        ]);
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

    #[test]
    fn only_contender_nodes_queue_and_every_own_node_counts() {
        for (name, yes) in [
            ("_c_0b8e-lock-0000000001", true),
            ("lock-0000000007", true),
            ("b", false),
            ("lock-", false),
            ("jobs", false),
            ("lock-12x", false),
            ("_c_0b8e-lock-", false),
        ] {
            assert_eq!(is_contender_name(name), yes, "{name}");
        }
        // The directory `b` of the nested lock `a/b` is not a contender.
        let (c, own) = queue(
            strings(&["b", "_c_me-lock-0000000004"]),
            "_c_me-",
            &HashSet::new(),
        );
        assert_eq!((c.len(), own), (1, Some(0)));
        // Two nodes of one attempt: the first one counts, so it never waits behind itself.
        let (c, own) = queue(
            strings(&[
                "_c_me-lock-0000000009",
                "_c_other-lock-0000000005",
                "_c_me-lock-0000000003",
            ]),
            "_c_me-",
            &HashSet::new(),
        );
        assert_eq!(own, Some(0), "{c:?}");
        // A nested name that looks like a contender is skipped once found to be a directory.
        let skip: HashSet<String> = ["lock-0000000001".to_string()].into();
        let (c, own) = queue(
            strings(&["lock-0000000001", "_c_me-lock-0000000002"]),
            "_c_me-",
            &skip,
        );
        assert_eq!((c.len(), own), (1, Some(0)));
    }

    #[test]
    fn a_lock_session_that_ended_is_lock_lost() {
        for z in [zk::Error::SessionExpired, zk::Error::ClientClosed] {
            let e = lost_or(map(z, "lock", "n"), "n");
            assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
        }
        let e = lost_or(map(zk::Error::ConnectionLoss, "lock", "n"), "n");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert_eq!(vanished("n").kind(), ErrorKind::LockLost);
    }

    /// A scripted server: the first create lands but its answer is lost; the lookups fail
    /// `lookup_failures` times with ConnectionLoss, then answer from the server's state.
    struct Scripted {
        creates: AtomicUsize,
        finds: AtomicUsize,
        lookup_failures: usize,
        /// Whether the lost create really landed.
        landed: bool,
        nodes: Mutex<Vec<String>>,
    }

    impl Scripted {
        fn new(lookup_failures: usize, landed: bool) -> Scripted {
            Scripted {
                creates: AtomicUsize::new(0),
                finds: AtomicUsize::new(0),
                lookup_failures,
                landed,
                nodes: Mutex::new(Vec::new()),
            }
        }
    }

    fn loss() -> Error {
        map(zk::Error::ConnectionLoss, "lock", "n")
    }

    #[async_trait]
    impl Contend for Scripted {
        async fn create(&self) -> Result<(String, i64)> {
            let n = self.creates.fetch_add(1, Ordering::SeqCst);
            let path = format!("/locks/n/_c_me-lock-{n:010}");
            if n == 0 {
                if self.landed {
                    self.nodes.lock().unwrap().push(path);
                }
                return Err(loss());
            }
            self.nodes.lock().unwrap().push(path.clone());
            Ok((path, 100 + n as i64))
        }

        async fn find(&self) -> Result<Option<(String, i64)>> {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if self.finds.fetch_add(1, Ordering::SeqCst) < self.lookup_failures {
                return Err(loss());
            }
            Ok(self.nodes.lock().unwrap().first().map(|p| (p.clone(), 100)))
        }

        async fn ensure_parents(&self) -> Result<()> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_create_answer_never_makes_a_second_node() {
        // The lookups fail for a while: the node is looked up again, not created again.
        let s = Scripted::new(5, true);
        let mut sent = Instant::now();
        let got = create_protected(&s, "n", Duration::from_secs(10), &mut sent)
            .await
            .expect("found after the failures");
        assert_eq!(
            got.map(|g| g.0).as_deref(),
            Some("/locks/n/_c_me-lock-0000000000")
        );
        assert_eq!(s.creates.load(Ordering::SeqCst), 1, "created a second node");
        assert_eq!(s.nodes.lock().unwrap().len(), 1);

        // Lookups that never answer: an error within the bound, still one create.
        let s = Scripted::new(usize::MAX, true);
        let started = Instant::now();
        let e = create_protected(&s, "n", Duration::from_secs(2), &mut sent)
            .await
            .expect_err("undecidable");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(started.elapsed() <= Duration::from_secs(2));
        assert_eq!(s.creates.load(Ordering::SeqCst), 1, "created a second node");

        // The create really did not land (known absent): creating again is right.
        let s = Scripted::new(2, false);
        let got = create_protected(&s, "n", Duration::from_secs(10), &mut sent)
            .await
            .expect("created");
        assert!(got.is_some());
        assert_eq!(s.creates.load(Ordering::SeqCst), 2);
        assert_eq!(s.nodes.lock().unwrap().len(), 1);
    }
}
crate::recipes_via_lock!(ZkStore);
