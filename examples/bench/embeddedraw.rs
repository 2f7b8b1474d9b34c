//! Raw baselines for the embedded backends, on the same kind of files: `std::fs` KV with the
//! same durability as coordkit's `file://` (temporary file, sync, rename, sync of the
//! directory) and a bare `flock` lock; SQL statements through the same `rusqlite` crate, in WAL
//! mode with `synchronous = FULL`, and a lease row polled every millisecond for waiting.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::ck::{CAS_KEY, KEY, LOCK};
use crate::harness::{err, Contender, Held, Op, Target, R};

/// `std::fs` KV and an `flock` lock in a directory.
pub struct FsRaw {
    dir: PathBuf,
    value: Vec<u8>,
    version: AtomicU64,
}

impl FsRaw {
    pub fn new(dir: &Path, value_size: usize) -> R<Self> {
        std::fs::create_dir_all(dir.join("kv"))?;
        Ok(FsRaw {
            dir: dir.to_path_buf(),
            value: vec![b'v'; value_size],
            version: AtomicU64::new(0),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join("kv").join(key.replace('/', "%2F"))
    }

    /// The value with an 8-byte version in front, written durably by rename.
    fn write(&self, key: &str, version: u64) -> R<()> {
        let tmp = self.dir.join(format!("tmp-{}", std::process::id()));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&version.to_le_bytes())?;
        f.write_all(&self.value)?;
        f.sync_data()?;
        std::fs::rename(&tmp, self.path(key))?;
        File::open(self.dir.join("kv"))?.sync_all()?;
        Ok(())
    }

    fn read(&self, key: &str) -> R<(u64, Vec<u8>)> {
        let b = std::fs::read(self.path(key))?;
        let v = u64::from_le_bytes(b[..8].try_into()?);
        Ok((v, b[8..].to_vec()))
    }

    fn flock(&self, name: &str) -> R<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.join(format!("{}.lock", name.replace('/', "%2F"))))?;
        f.lock()?;
        Ok(f)
    }
}

#[async_trait]
impl Target for FsRaw {
    fn name(&self) -> String {
        "std::fs + flock".into()
    }

    fn supports(&self, op: Op) -> bool {
        !op.is_recipe() && op != Op::GetStale
    }

    async fn setup(&self, op: Op) -> R<()> {
        match op {
            Op::Semaphore | Op::ReadLock | Op::Campaign => {
                return Err(err("recipes are measured on coordkit only"))
            }
            Op::GetStrong => self.write(KEY, 1),
            Op::Cas => {
                self.write(CAS_KEY, 1)?;
                self.version.store(1, Ordering::SeqCst);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn run(&self, op: Op) -> R<()> {
        match op {
            Op::Semaphore | Op::ReadLock | Op::Campaign => {
                return Err(err("recipes are measured on coordkit only"))
            }
            Op::GetStrong | Op::GetStale => {
                self.read(KEY)?;
            }
            Op::Put => self.write(KEY, 1)?,
            Op::Cas => {
                // Read, compare and write under the store's flock, as a CAS must.
                let _l = self.flock("store")?;
                let (v, _) = self.read(CAS_KEY)?;
                if v != self.version.load(Ordering::SeqCst) {
                    return Err(err("raw CAS conflict"));
                }
                self.write(CAS_KEY, v + 1)?;
                self.version.store(v + 1, Ordering::SeqCst);
            }
            Op::LockUnlock => {
                let f = self.flock(LOCK)?;
                f.unlock()?;
            }
        }
        Ok(())
    }
}

/// A contender holding a bare `flock` on a file descriptor of its own.
pub struct FlockContender(pub PathBuf);

struct FlockHeld(File);

#[async_trait]
impl Held for FlockHeld {
    async fn release(self: Box<Self>) -> R<()> {
        self.0.unlock()?;
        Ok(())
    }
}

#[async_trait]
impl Contender for FlockContender {
    async fn acquire(&self, name: &str) -> R<Box<dyn Held>> {
        let path = self.0.join(format!("{}.lock", name.replace('/', "%2F")));
        let f = tokio::task::spawn_blocking(move || -> std::io::Result<File> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)?;
            f.lock()?;
            Ok(f)
        })
        .await??;
        Ok(Box::new(FlockHeld(f)))
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, holder TEXT, token INTEGER NOT NULL, expires INTEGER) WITHOUT ROWID;
";

fn open(path: &Path) -> R<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    c.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    c.execute_batch("PRAGMA synchronous = FULL;")?;
    c.execute_batch(SCHEMA)?;
    Ok(c)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One grant attempt on a lease row: whether it was granted.
fn try_grant(c: &mut Connection, name: &str, holder: &str) -> R<bool> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now = now_ms();
    let row: Option<(Option<String>, Option<i64>)> = tx
        .query_row(
            "SELECT holder, expires FROM locks WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((Some(_), Some(exp))) = row {
        if exp > now {
            return Ok(false);
        }
    }
    tx.execute(
        "INSERT INTO locks (name, holder, token, expires) VALUES (?1, ?2, 1, ?3)
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = token + 1, expires = excluded.expires",
        params![name, holder, now + 15_000],
    )?;
    tx.commit()?;
    Ok(true)
}

fn release(c: &mut Connection, name: &str, holder: &str) -> R<()> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "UPDATE locks SET holder = NULL, expires = NULL WHERE name = ?1 AND holder = ?2",
        params![name, holder],
    )?;
    tx.commit()?;
    Ok(())
}

/// SQL statements through `rusqlite`, one connection.
pub struct SqliteRaw {
    conn: Mutex<Connection>,
    value: Vec<u8>,
    version: AtomicU64,
}

impl SqliteRaw {
    pub fn new(path: &Path, value_size: usize) -> R<Self> {
        Ok(SqliteRaw {
            conn: Mutex::new(open(path)?),
            value: vec![b'v'; value_size],
            version: AtomicU64::new(0),
        })
    }

    fn put(&self, key: &str) -> R<u64> {
        let mut c = self.conn.lock().map_err(|_| err("poisoned"))?;
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let v: i64 = tx.query_row(
            "INSERT INTO kv (key, value, version) VALUES (?1, ?2, 1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = version + 1
             RETURNING version",
            params![key, self.value],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(v as u64)
    }
}

#[async_trait]
impl Target for SqliteRaw {
    fn name(&self) -> String {
        "rusqlite SQL".into()
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
                self.put(KEY)?;
            }
            Op::Cas => {
                let v = self.put(CAS_KEY)?;
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
                let c = self.conn.lock().map_err(|_| err("poisoned"))?;
                let _: Vec<u8> =
                    c.query_row("SELECT value FROM kv WHERE key = ?1", [KEY], |r| r.get(0))?;
            }
            Op::Put => {
                self.put(KEY)?;
            }
            Op::Cas => {
                let expect = self.version.load(Ordering::SeqCst);
                let mut c = self.conn.lock().map_err(|_| err("poisoned"))?;
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let n = tx.execute(
                    "UPDATE kv SET value = ?1, version = version + 1 WHERE key = ?2 AND version = ?3",
                    params![self.value, CAS_KEY, expect as i64],
                )?;
                tx.commit()?;
                if n != 1 {
                    return Err(err("raw CAS conflict"));
                }
                self.version.store(expect + 1, Ordering::SeqCst);
            }
            Op::LockUnlock => {
                let mut c = self.conn.lock().map_err(|_| err("poisoned"))?;
                if !try_grant(&mut c, LOCK, "raw")? {
                    return Err(err("uncontended raw lock was held"));
                }
                release(&mut c, LOCK, "raw")?;
            }
        }
        Ok(())
    }
}

/// A contender on a lease row of its own connection, trying again every millisecond.
pub struct SqliteContender {
    conn: Arc<Mutex<Connection>>,
    id: String,
}

impl SqliteContender {
    pub fn new(path: &Path, i: usize) -> R<Self> {
        Ok(SqliteContender {
            conn: Arc::new(Mutex::new(open(path)?)),
            id: format!("raw-{i}"),
        })
    }
}

struct SqliteHeld {
    conn: Arc<Mutex<Connection>>,
    id: String,
    name: String,
}

#[async_trait]
impl Held for SqliteHeld {
    async fn release(self: Box<Self>) -> R<()> {
        let (c, id, name) = (self.conn.clone(), self.id.clone(), self.name.clone());
        tokio::task::spawn_blocking(move || {
            let mut c = c.lock().map_err(|_| err("poisoned"))?;
            release(&mut c, &name, &id)
        })
        .await?
    }
}

#[async_trait]
impl Contender for SqliteContender {
    async fn acquire(&self, name: &str) -> R<Box<dyn Held>> {
        loop {
            let (c, id, n) = (self.conn.clone(), self.id.clone(), name.to_string());
            let granted = tokio::task::spawn_blocking(move || {
                let mut c = c.lock().map_err(|_| err("poisoned"))?;
                try_grant(&mut c, &n, &id)
            })
            .await??;
            if granted {
                return Ok(Box::new(SqliteHeld {
                    conn: self.conn.clone(),
                    id: self.id.clone(),
                    name: name.to_string(),
                }));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
