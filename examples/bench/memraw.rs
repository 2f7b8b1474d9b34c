//! The in-memory baseline: a plain `Mutex<BTreeMap>` for keys, a `tokio::sync::Mutex` per lock
//! name for locks.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::ck::{CAS_KEY, KEY, LOCK};
use crate::harness::{err, Contender, Held, Op, Target, R};

#[derive(Default)]
pub struct RawMap {
    map: Mutex<BTreeMap<String, (Vec<u8>, u64)>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    rev: AtomicU64,
    version: AtomicU64,
    value: Vec<u8>,
}

impl RawMap {
    pub fn new(value_size: usize) -> Self {
        RawMap {
            value: vec![b'v'; value_size],
            ..Default::default()
        }
    }

    pub fn get(&self, key: &str) -> R<Option<(Vec<u8>, u64)>> {
        Ok(self
            .map
            .lock()
            .map_err(|_| err("poisoned"))?
            .get(key)
            .cloned())
    }

    pub fn put(&self, key: &str, value: Vec<u8>) -> R<u64> {
        let v = self.rev.fetch_add(1, Ordering::SeqCst) + 1;
        self.map
            .lock()
            .map_err(|_| err("poisoned"))?
            .insert(key.to_string(), (value, v));
        Ok(v)
    }

    pub fn cas(&self, key: &str, expect: u64, value: Vec<u8>) -> R<u64> {
        let mut m = self.map.lock().map_err(|_| err("poisoned"))?;
        match m.get_mut(key) {
            Some(e) if e.1 == expect => {
                let v = self.rev.fetch_add(1, Ordering::SeqCst) + 1;
                *e = (value, v);
                Ok(v)
            }
            _ => Err(err("conflict")),
        }
    }

    pub fn mutex(&self, name: &str) -> R<Arc<tokio::sync::Mutex<()>>> {
        let mut l = self.locks.lock().map_err(|_| err("poisoned"))?;
        Ok(l.entry(name.to_string()).or_default().clone())
    }
}

#[async_trait]
impl Target for RawMap {
    fn name(&self) -> String {
        "Mutex<BTreeMap>".into()
    }

    fn supports(&self, op: Op) -> bool {
        !op.is_recipe() && op != Op::GetStale
    }

    async fn setup(&self, op: Op) -> R<()> {
        match op {
            Op::Semaphore | Op::ReadLock | Op::Campaign => {
                return Err(err("recipes are measured on coordkit only"))
            }
            Op::GetStrong | Op::GetStale => {
                self.put(KEY, self.value.clone())?;
            }
            Op::Cas => {
                let v = self.put(CAS_KEY, self.value.clone())?;
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
                self.get(KEY)?.ok_or_else(|| err("key missing"))?;
            }
            Op::Put => {
                self.put(KEY, self.value.clone())?;
            }
            Op::Cas => {
                let v = self.cas(
                    CAS_KEY,
                    self.version.load(Ordering::SeqCst),
                    self.value.clone(),
                )?;
                self.version.store(v, Ordering::SeqCst);
            }
            Op::LockUnlock => {
                let m = self.mutex(LOCK)?;
                let g = m.lock_owned().await;
                drop(g);
            }
        }
        Ok(())
    }
}

pub struct MapContender(pub Arc<RawMap>);

struct MapHeld(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<()>);

#[async_trait]
impl Held for MapHeld {
    async fn release(self: Box<Self>) -> R<()> {
        Ok(())
    }
}

#[async_trait]
impl Contender for MapContender {
    async fn acquire(&self, name: &str) -> R<Box<dyn Held>> {
        let m = self.0.mutex(name)?;
        Ok(Box::new(MapHeld(m.lock_owned().await)))
    }
}
