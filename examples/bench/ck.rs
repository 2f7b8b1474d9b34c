//! coordkit itself, through `Arc<dyn Backend>` as users get it from `coordkit::connect`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use coordkit::{Backend, Consistency, Expect, LockGuard, LockOptions, PutOptions, Version};

use crate::harness::{err, Contender, Held, Op, Target, R};

pub const KEY: &str = "bench/key";
pub const CAS_KEY: &str = "bench/cas";
pub const LOCK: &str = "bench/uncontended";
/// The semaphore, read-write lock and election of the recipe rows.
pub const RECIPE: &str = "bench/recipe";
/// The permits of the semaphore row.
pub const PERMITS: u32 = 3;

pub struct Coordkit {
    pub store: Arc<dyn Backend>,
    version: AtomicU64,
    value: Vec<u8>,
}

impl Coordkit {
    pub fn new(store: Arc<dyn Backend>, value_size: usize) -> Self {
        Coordkit {
            store,
            version: AtomicU64::new(0),
            value: vec![b'v'; value_size],
        }
    }
}

#[async_trait]
impl Target for Coordkit {
    fn name(&self) -> String {
        "coordkit".into()
    }

    fn supports(&self, _op: Op) -> bool {
        true
    }

    async fn setup(&self, op: Op) -> R<()> {
        match op {
            Op::GetStrong | Op::GetStale => {
                self.store
                    .put(KEY, self.value.clone(), PutOptions::default())
                    .await?;
            }
            Op::Cas => {
                let v = self
                    .store
                    .put(CAS_KEY, self.value.clone(), PutOptions::default())
                    .await?;
                self.version.store(v.as_raw(), Ordering::SeqCst);
            }
            Op::Put | Op::LockUnlock | Op::Semaphore | Op::ReadLock | Op::Campaign => {}
        }
        Ok(())
    }

    async fn run(&self, op: Op) -> R<()> {
        match op {
            Op::GetStrong => {
                self.store
                    .get(KEY, Consistency::Strong)
                    .await?
                    .ok_or_else(|| err("key missing"))?;
            }
            Op::GetStale => {
                self.store
                    .get(KEY, Consistency::Stale)
                    .await?
                    .ok_or_else(|| err("key missing"))?;
            }
            Op::Put => {
                self.store
                    .put(KEY, self.value.clone(), PutOptions::default())
                    .await?;
            }
            Op::Cas => {
                let expect = Version::from_raw(self.version.load(Ordering::SeqCst));
                let new = self
                    .store
                    .compare_and_swap(CAS_KEY, Expect::Version(expect), Some(self.value.clone()))
                    .await?
                    .ok_or_else(|| err("CAS returned no version"))?;
                self.version.store(new.as_raw(), Ordering::SeqCst);
            }
            Op::LockUnlock => {
                let g = self.store.lock(LOCK, &LockOptions::new()).await?;
                g.release().await?;
            }
            Op::Semaphore => {
                let p = self
                    .store
                    .acquire(RECIPE, PERMITS, &LockOptions::new())
                    .await?;
                p.release().await?;
            }
            Op::ReadLock => {
                let g = self.store.read(RECIPE, &LockOptions::new()).await?;
                g.release().await?;
            }
            Op::Campaign => {
                let g = self
                    .store
                    .campaign(RECIPE, self.value.clone(), &LockOptions::new())
                    .await?;
                g.resign().await?;
            }
        }
        Ok(())
    }
}

/// A coordkit client contending for a lock.
pub struct CkContender(pub Arc<dyn Backend>);

struct CkHeld(LockGuard);

#[async_trait]
impl Held for CkHeld {
    async fn release(self: Box<Self>) -> R<()> {
        self.0.release().await?;
        Ok(())
    }
}

#[async_trait]
impl Contender for CkContender {
    async fn acquire(&self, name: &str) -> R<Box<dyn Held>> {
        Ok(Box::new(CkHeld(
            self.0.lock(name, &LockOptions::new()).await?,
        )))
    }
}
