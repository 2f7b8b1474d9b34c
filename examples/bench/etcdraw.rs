//! The same operations through etcd-client directly: KV, the server-side Lock RPC with a lease
//! granted once, and the textbook client-side mutex of etcd's Go `concurrency` package.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LockOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};

use crate::harness::{err, Contender, Held, Op, Target, R};

const KEY: &str = "rawbench/key";
const CAS_KEY: &str = "rawbench/cas";
const LOCK: &str = "rawbench/uncontended";
/// Raw leases are granted once with a long TTL and never renewed during the run, so no
/// keep-alive traffic is counted against the raw client.
const LEASE_TTL: i64 = 600;

pub async fn connect(endpoint: &str) -> R<Client> {
    Ok(Client::connect([endpoint], None).await?)
}

/// Which lock recipe the raw client uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Recipe {
    /// etcd's v3lock Lock/Unlock RPC (server-side `concurrency.Mutex`).
    LockRpc,
    /// The client-side `concurrency.Mutex` recipe: one txn to enqueue and read the owner, watch
    /// the predecessor from the read's header revision, delete to unlock.
    Textbook,
    /// The same queue with a watch etcd serves from its synced group: the enqueue txn also
    /// reads the predecessor; the waiter watches the predecessor key with no start revision,
    /// waits for `created`, re-checks the predecessor with one Range, then waits for its
    /// delete; after a delete, one txn reads the next predecessor and the own key.
    SyncedWatch,
}

pub struct EtcdRaw {
    client: Client,
    recipe: Recipe,
    lease: i64,
    version: AtomicI64,
    value: Vec<u8>,
}

impl EtcdRaw {
    pub async fn new(endpoint: &str, recipe: Recipe, value_size: usize) -> R<Self> {
        let mut client = connect(endpoint).await?;
        let lease = client.lease_grant(LEASE_TTL, None).await?.id();
        Ok(EtcdRaw {
            client,
            recipe,
            lease,
            version: AtomicI64::new(0),
            value: vec![b'v'; value_size],
        })
    }

    pub fn label(recipe: Recipe) -> &'static str {
        match recipe {
            Recipe::LockRpc => "etcd-client (Lock RPC)",
            Recipe::Textbook => "etcd-client (txn mutex)",
            Recipe::SyncedWatch => "etcd-client (txn mutex, synced watch)",
        }
    }
}

#[async_trait]
impl Target for EtcdRaw {
    fn name(&self) -> String {
        Self::label(self.recipe).into()
    }

    /// KV operations are measured once, with the Lock RPC client.
    fn supports(&self, op: Op) -> bool {
        !op.is_recipe() && (op == Op::LockUnlock || self.recipe == Recipe::LockRpc)
    }

    async fn setup(&self, op: Op) -> R<()> {
        let mut c = self.client.clone();
        match op {
            Op::Semaphore | Op::ReadLock | Op::Campaign => {
                return Err(err("recipes are measured on coordkit only"))
            }
            Op::GetStrong | Op::GetStale => {
                c.put(KEY, self.value.clone(), None).await?;
            }
            Op::Cas => {
                let r = c.put(CAS_KEY, self.value.clone(), None).await?;
                let rev = r.header().ok_or_else(|| err("no header"))?.revision();
                self.version.store(rev, Ordering::SeqCst);
            }
            _ => {}
        }
        Ok(())
    }

    async fn run(&self, op: Op) -> R<()> {
        let mut c = self.client.clone();
        match op {
            Op::Semaphore | Op::ReadLock | Op::Campaign => {
                return Err(err("recipes are measured on coordkit only"))
            }
            Op::GetStrong => {
                let r = c.get(KEY, None).await?;
                r.kvs().first().ok_or_else(|| err("key missing"))?;
            }
            Op::GetStale => {
                let r = c
                    .get(KEY, Some(GetOptions::new().with_serializable()))
                    .await?;
                r.kvs().first().ok_or_else(|| err("key missing"))?;
            }
            Op::Put => {
                c.put(KEY, self.value.clone(), None).await?;
            }
            Op::Cas => {
                let v = self.version.load(Ordering::SeqCst);
                let txn = Txn::new()
                    .when([Compare::mod_revision(CAS_KEY, CompareOp::Equal, v)])
                    .and_then([TxnOp::put(CAS_KEY, self.value.clone(), None)]);
                let r = c.txn(txn).await?;
                if !r.succeeded() {
                    return Err(err("raw CAS conflict"));
                }
                let rev = r.header().ok_or_else(|| err("no header"))?.revision();
                self.version.store(rev, Ordering::SeqCst);
            }
            Op::LockUnlock => {
                let h = acquire(&self.client, self.recipe, self.lease, LOCK).await?;
                h.release().await?;
            }
        }
        Ok(())
    }
}

struct EtcdHeld {
    client: Client,
    recipe: Recipe,
    key: Vec<u8>,
}

#[async_trait]
impl Held for EtcdHeld {
    async fn release(self: Box<Self>) -> R<()> {
        let mut c = self.client;
        match self.recipe {
            Recipe::LockRpc => {
                c.unlock(self.key).await?;
            }
            Recipe::Textbook | Recipe::SyncedWatch => {
                c.delete(self.key, None).await?;
            }
        }
        Ok(())
    }
}

async fn acquire(client: &Client, recipe: Recipe, lease: i64, name: &str) -> R<Box<dyn Held>> {
    let mut c = client.clone();
    let key = match recipe {
        Recipe::LockRpc => {
            let r = c
                .lock(name, Some(LockOptions::new().with_lease(lease)))
                .await?;
            r.key().to_vec()
        }
        Recipe::Textbook => textbook_lock(&mut c, lease, name).await?,
        Recipe::SyncedWatch => synced_watch_lock(&mut c, lease, name).await?,
    };
    Ok(Box::new(EtcdHeld {
        client: client.clone(),
        recipe,
        key,
    }))
}

/// etcd `clientv3/concurrency` `Mutex.Lock`, step for step.
async fn textbook_lock(c: &mut Client, lease: i64, name: &str) -> R<Vec<u8>> {
    let pfx = format!("{name}/");
    let my_key = format!("{pfx}{lease:x}");
    let owner = TxnOp::get(
        pfx.clone(),
        Some(
            GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_limit(1),
        ),
    );
    let txn = Txn::new()
        .when([Compare::create_revision(
            my_key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then([
            TxnOp::put(
                my_key.clone(),
                "",
                Some(PutOptions::new().with_lease(lease)),
            ),
            owner.clone(),
        ])
        .or_else([TxnOp::get(my_key.clone(), None), owner]);
    let r = c.txn(txn).await?;
    let header_rev = r.header().ok_or_else(|| err("no header"))?.revision();
    let ops = r.op_responses();
    let my_rev = if r.succeeded() {
        header_rev
    } else {
        match ops.first() {
            Some(TxnOpResponse::Get(g)) => {
                g.kvs().first().map(|kv| kv.create_revision()).unwrap_or(0)
            }
            _ => return Err(err("unexpected txn response")),
        }
    };
    let owner_rev = match ops.get(1) {
        Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.create_revision()),
        _ => return Err(err("unexpected txn response")),
    };
    if owner_rev.is_none() || owner_rev == Some(my_rev) {
        return Ok(my_key.into_bytes());
    }
    // waitDeletes: wait for every key created before ours, latest first.
    loop {
        let opts = GetOptions::new()
            .with_prefix()
            .with_max_create_revision(my_rev - 1)
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(1);
        let r = c.get(pfx.clone(), Some(opts)).await?;
        let Some(last) = r.kvs().first() else { break };
        let rev = r.header().ok_or_else(|| err("no header"))?.revision();
        let mut stream = c
            .watch(
                last.key().to_vec(),
                Some(WatchOptions::new().with_start_revision(rev)),
            )
            .await?;
        'wait: loop {
            let Some(msg) = stream.message().await? else {
                return Err(err("watch stream ended"));
            };
            if msg.canceled() {
                return Err(err("watch cancelled"));
            }
            for ev in msg.events() {
                if ev.event_type() == EventType::Delete {
                    break 'wait;
                }
            }
        }
    }
    // Go's Lock re-checks that its own key survived the wait.
    let r = c.get(my_key.clone(), None).await?;
    if r.kvs().is_empty() {
        return Err(err("session expired while waiting"));
    }
    Ok(my_key.into_bytes())
}

/// The queue of [`Recipe::SyncedWatch`]: uncontended, one txn to lock and one delete to
/// unlock.
async fn synced_watch_lock(c: &mut Client, lease: i64, name: &str) -> R<Vec<u8>> {
    let pfx = format!("{name}/");
    let my_key = format!("{pfx}{lease:x}");
    // The newest two keys: ours (just created) and the one created just before it.
    let newest = TxnOp::get(
        pfx.clone(),
        Some(
            GetOptions::new()
                .with_prefix()
                .with_keys_only()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(2),
        ),
    );
    let txn = Txn::new()
        .when([Compare::create_revision(
            my_key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then([
            TxnOp::put(
                my_key.clone(),
                "",
                Some(PutOptions::new().with_lease(lease)),
            ),
            newest,
        ]);
    let r = c.txn(txn).await?;
    if !r.succeeded() {
        return Err(err("own key already exists"));
    }
    let my_rev = r.header().ok_or_else(|| err("no header"))?.revision();
    let mut pred = match r.op_responses().get(1) {
        Some(TxnOpResponse::Get(g)) => g
            .kvs()
            .iter()
            .find(|kv| kv.create_revision() < my_rev)
            .map(|kv| (kv.key().to_vec(), kv.create_revision())),
        _ => return Err(err("unexpected txn response")),
    };
    while let Some((key, rev)) = pred.take() {
        let mut stream = c.watch(key.clone(), None).await?;
        let mut created = false;
        'wait: loop {
            let Some(msg) = stream.message().await? else {
                return Err(err("watch stream ended"));
            };
            if msg.canceled() {
                return Err(err("watch cancelled"));
            }
            if msg.created() && !created {
                created = true;
                // The predecessor may have gone before the watch existed.
                let r = c.get(key.clone(), None).await?;
                if r.kvs().first().map(|kv| kv.create_revision()) != Some(rev) {
                    break 'wait;
                }
            }
            for ev in msg.events() {
                if ev.event_type() == EventType::Delete {
                    break 'wait;
                }
            }
        }
        // A predecessor that died without holding: the next one, and the own key.
        let txn = Txn::new().and_then([
            TxnOp::get(
                pfx.clone(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_max_create_revision(my_rev - 1)
                        .with_sort(SortTarget::Create, SortOrder::Descend)
                        .with_limit(1),
                ),
            ),
            TxnOp::get(my_key.clone(), Some(GetOptions::new().with_keys_only())),
        ]);
        let r = c.txn(txn).await?;
        let ops = r.op_responses();
        match ops.get(1) {
            Some(TxnOpResponse::Get(g)) if !g.kvs().is_empty() => {}
            _ => return Err(err("session expired while waiting")),
        }
        if let Some(TxnOpResponse::Get(g)) = ops.first() {
            pred = g
                .kvs()
                .first()
                .map(|kv| (kv.key().to_vec(), kv.create_revision()));
        }
    }
    Ok(my_key.into_bytes())
}

/// One raw etcd contender: its own connection and its own lease.
pub struct EtcdContender {
    client: Client,
    recipe: Recipe,
    lease: i64,
}

impl EtcdContender {
    pub async fn new(endpoint: &str, recipe: Recipe) -> R<Self> {
        let mut client = connect(endpoint).await?;
        let lease = client.lease_grant(LEASE_TTL, None).await?.id();
        Ok(EtcdContender {
            client,
            recipe,
            lease,
        })
    }
}

#[async_trait]
impl Contender for EtcdContender {
    async fn acquire(&self, name: &str) -> R<Box<dyn Held>> {
        acquire(&self.client, self.recipe, self.lease, name).await
    }
}

/// gRPC messages the server received, per method (from etcd's Prometheus `/metrics`).
pub async fn grpc_counts(http: &reqwest::Client, endpoint: &str) -> R<BTreeMap<String, f64>> {
    let text = http
        .get(format!("{endpoint}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_msg_received_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let method = labels
            .split(',')
            .find_map(|l| l.strip_prefix("grpc_method=\""))
            .map(|m| m.trim_end_matches('"').to_string());
        if let (Some(m), Ok(v)) = (method, value.trim().parse::<f64>()) {
            *out.entry(m).or_insert(0.0) += v;
        }
    }
    Ok(out)
}

/// Round trips per operation by method: the difference of two [`grpc_counts`] over `n` ops.
pub fn per_op(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    n: usize,
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (m, a) in after {
        let d = a - before.get(m).copied().unwrap_or(0.0);
        if d > 0.0 {
            out.insert(m.clone(), d / n as f64);
        }
    }
    out
}
