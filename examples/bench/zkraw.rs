//! The same operations through zookeeper-client directly: data nodes, and the lock recipe
//! (ephemeral sequential node, list children, watch the predecessor, delete).

use std::sync::atomic::{AtomicI32, Ordering};

use async_trait::async_trait;
use zookeeper_client::{Acls, Client, CreateMode};

use crate::harness::{err, Contender, Held, Op, Target, R};

const ROOT: &str = "/rawbench";
const KEY: &str = "/rawbench/key";
const CAS_KEY: &str = "/rawbench/cas";
const LOCKS: &str = "/rawbench/locks";
const LOCK: &str = "uncontended";

/// A raw client, its connection given `TCP_NODELAY` as coordkit gives its own (the crate has
/// no setting for it), so that the two sides differ only in what they send.
pub async fn connect(hostport: &str) -> R<Client> {
    let client = Client::connect(hostport).await?;
    if let Some(port) = hostport.rsplit(':').next().and_then(|p| p.parse().ok()) {
        crate::support::zookeeper::nodelay_connections(port, true);
    }
    Ok(client)
}

async fn ensure(c: &Client, path: &str) -> R<()> {
    match c
        .create(
            path,
            b"",
            &CreateMode::Persistent.with_acls(Acls::anyone_all()),
        )
        .await
    {
        Ok(_) | Err(zookeeper_client::Error::NodeExists) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub struct ZkRaw {
    client: Client,
    version: AtomicI32,
    value: Vec<u8>,
}

impl ZkRaw {
    pub async fn new(hostport: &str, value_size: usize) -> R<Self> {
        let client = connect(hostport).await?;
        for p in [ROOT, KEY, CAS_KEY, LOCKS] {
            ensure(&client, p).await?;
        }
        Ok(ZkRaw {
            client,
            version: AtomicI32::new(0),
            value: vec![b'v'; value_size],
        })
    }
}

#[async_trait]
impl Target for ZkRaw {
    fn name(&self) -> String {
        "zookeeper-client".into()
    }

    fn supports(&self, op: Op) -> bool {
        !op.is_recipe()
    }

    async fn setup(&self, op: Op) -> R<()> {
        match op {
            Op::Semaphore | Op::ReadLock | Op::Campaign => {
                return Err(err("recipes are measured on coordkit only"))
            }
            Op::GetStrong | Op::GetStale => {
                self.client.set_data(KEY, &self.value, None).await?;
            }
            Op::Cas => {
                let st = self.client.set_data(CAS_KEY, &self.value, None).await?;
                self.version.store(st.version, Ordering::SeqCst);
            }
            Op::LockUnlock => ensure(&self.client, &format!("{LOCKS}/{LOCK}")).await?,
            Op::Put => {}
        }
        Ok(())
    }

    async fn run(&self, op: Op) -> R<()> {
        let c = &self.client;
        match op {
            Op::Semaphore | Op::ReadLock | Op::Campaign => {
                return Err(err("recipes are measured on coordkit only"))
            }
            Op::GetStrong => {
                c.sync(KEY).await?;
                c.get_data(KEY).await?;
            }
            Op::GetStale => {
                c.get_data(KEY).await?;
            }
            Op::Put => {
                c.set_data(KEY, &self.value, None).await?;
            }
            Op::Cas => {
                let v = self.version.load(Ordering::SeqCst);
                let st = c.set_data(CAS_KEY, &self.value, Some(v)).await?;
                self.version.store(st.version, Ordering::SeqCst);
            }
            Op::LockUnlock => {
                let h = acquire(c, LOCK).await?;
                h.release().await?;
            }
        }
        Ok(())
    }
}

struct ZkHeld {
    client: Client,
    path: String,
}

#[async_trait]
impl Held for ZkHeld {
    async fn release(self: Box<Self>) -> R<()> {
        self.client.delete(&self.path, None).await?;
        Ok(())
    }
}

/// The lock recipe: create `lock-<seq>` (ephemeral sequential), list the children; lowest
/// sequence holds; otherwise watch the next lower node's existence and look again when it goes.
async fn acquire(c: &Client, name: &str) -> R<Box<dyn Held>> {
    let dir = format!("{LOCKS}/{name}");
    let prefix = format!("{dir}/lock-");
    let (_, seq) = c
        .create(
            &prefix,
            b"",
            &CreateMode::EphemeralSequential.with_acls(Acls::anyone_all()),
        )
        .await?;
    let mine = format!("lock-{seq}");
    let path = format!("{dir}/{mine}");
    loop {
        let mut children = c.list_children(&dir).await?;
        children.sort();
        let pos = children
            .iter()
            .position(|n| *n == mine)
            .ok_or_else(|| err("own lock node vanished"))?;
        if pos == 0 {
            return Ok(Box::new(ZkHeld {
                client: c.clone(),
                path,
            }));
        }
        let pred = format!("{dir}/{}", children[pos - 1]);
        let (stat, watcher) = c.check_and_watch_stat(&pred).await?;
        if stat.is_none() {
            continue;
        }
        // Deleted (or a session event): look at the children again.
        let _ = watcher.changed().await;
    }
}

/// One raw ZooKeeper contender: its own session.
pub struct ZkContender {
    client: Client,
}

impl ZkContender {
    pub async fn new(hostport: &str, name: &str) -> R<Self> {
        let client = connect(hostport).await?;
        for p in [
            ROOT.to_string(),
            LOCKS.to_string(),
            format!("{LOCKS}/{name}"),
        ] {
            ensure(&client, &p).await?;
        }
        Ok(ZkContender { client })
    }
}

#[async_trait]
impl Contender for ZkContender {
    async fn acquire(&self, name: &str) -> R<Box<dyn Held>> {
        acquire(&self.client, name).await
    }
}

/// Packets the server has received so far (the `srvr` four-letter word's `Received:` line).
pub async fn packets_received(port: u16) -> R<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"srvr").await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    out.lines()
        .find_map(|l| l.strip_prefix("Received: "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| err(format!("no Received: line in srvr output: {out}")))
}
