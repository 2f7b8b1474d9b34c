//! The raw PostgreSQL baseline: the same operations through `tokio-postgres` on the same
//! server, one connection: single-statement reads and writes (autocommit), a CAS as one
//! conditional `UPDATE`, and for locks a session advisory lock (`pg_advisory_lock` /
//! `pg_advisory_unlock`), whose waiters the server queues.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio_postgres::{Client, NoTls};

use crate::ck::{CAS_KEY, KEY};
use crate::harness::{err, Contender, Held, Op, Target, R};

/// Connects with `conn` (a libpq key=value string) and drives the connection in a task.
pub async fn connect(conn: &str) -> R<Client> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

pub struct PgRaw {
    client: Client,
    value: Vec<u8>,
    version: AtomicI64,
}

impl PgRaw {
    pub async fn new(conn: &str, value_size: usize) -> R<Self> {
        let client = connect(conn).await?;
        client
            .batch_execute(
                "CREATE SCHEMA IF NOT EXISTS bench_raw;
                 CREATE TABLE IF NOT EXISTS bench_raw.kv (key TEXT PRIMARY KEY, value BYTEA NOT NULL, version BIGINT NOT NULL);",
            )
            .await?;
        Ok(PgRaw {
            client,
            value: vec![b'v'; value_size],
            version: AtomicI64::new(0),
        })
    }

    async fn put(&self, key: &str) -> R<i64> {
        let row = self
            .client
            .query_one(
                "INSERT INTO bench_raw.kv (key, value, version) VALUES ($1, $2, 1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = bench_raw.kv.version + 1
                 RETURNING version",
                &[&key, &self.value],
            )
            .await?;
        Ok(row.get(0))
    }
}

#[async_trait]
impl Target for PgRaw {
    fn name(&self) -> String {
        "tokio-postgres SQL".into()
    }

    fn supports(&self, op: Op) -> bool {
        !op.is_recipe() && op != Op::GetStale
    }

    async fn setup(&self, op: Op) -> R<()> {
        match op {
            Op::Semaphore | Op::ReadLock | Op::Campaign => {
                return Err(err("recipes are measured on coordkit only"))
            }
            Op::GetStrong => {
                self.put(KEY).await?;
            }
            Op::Cas => {
                let v = self.put(CAS_KEY).await?;
                self.version.store(v, Ordering::SeqCst);
            }
            _ => {}
        }
        Ok(())
    }

    async fn run(&self, op: Op) -> R<()> {
        match op {
            Op::Semaphore | Op::ReadLock | Op::Campaign => {
                return Err(err("recipes are measured on coordkit only"))
            }
            Op::GetStrong | Op::GetStale => {
                self.client
                    .query_one("SELECT value FROM bench_raw.kv WHERE key = $1", &[&KEY])
                    .await?;
            }
            Op::Put => {
                self.put(KEY).await?;
            }
            Op::Cas => {
                let expect = self.version.load(Ordering::SeqCst);
                let n = self
                    .client
                    .execute(
                        "UPDATE bench_raw.kv SET value = $1, version = version + 1 WHERE key = $2 AND version = $3",
                        &[&self.value, &CAS_KEY, &expect],
                    )
                    .await?;
                if n != 1 {
                    return Err(err("raw CAS conflict"));
                }
                self.version.store(expect + 1, Ordering::SeqCst);
            }
            Op::LockUnlock => {
                self.client
                    .execute("SELECT pg_advisory_lock(4242)", &[])
                    .await?;
                self.client
                    .execute("SELECT pg_advisory_unlock(4242)", &[])
                    .await?;
            }
        }
        Ok(())
    }
}

/// A contender with a connection of its own, blocking in `pg_advisory_lock`.
pub struct AdvisoryContender(pub Arc<Client>);

struct AdvisoryHeld(Arc<Client>);

#[async_trait]
impl Held for AdvisoryHeld {
    async fn release(self: Box<Self>) -> R<()> {
        self.0
            .execute("SELECT pg_advisory_unlock(4343)", &[])
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Contender for AdvisoryContender {
    async fn acquire(&self, _name: &str) -> R<Box<dyn Held>> {
        self.0.execute("SELECT pg_advisory_lock(4343)", &[]).await?;
        Ok(Box::new(AdvisoryHeld(self.0.clone())))
    }
}
