//! Resharding: moving keys when the shard list changes.
//!
//! 1. Build the new [`ShardedStore`] (old shards plus new ones, or fewer) next to the old one,
//!    and switch writers to `new.migrating_from(&old)`.
//! 2. [`plan`] lists every key on every shard of both and names each key whose shard is not its
//!    owner under the new layout.
//! 3. [`migrate`] moves exactly those keys: copy to the new owner with a compare-and-swap
//!    (create-if-absent), then delete from the old shard with delete-if-version.
//!
//! # Contract
//! - Only keys in the plan are written; a key whose owner does not change is never touched.
//! - A key is deleted from its old shard only after the new owner holds the same value, and only
//!   if the old copy is still the version that was copied: a concurrent write to the old copy
//!   makes the move start over for that key instead of losing the write.
//! - Idempotent and resumable: running [`migrate`] again, with the same plan or a fresh one from
//!   [`plan`], after a crash or an error at any point, finishes the job. A key found on both
//!   shards with the same value (copied, not yet deleted) is completed; a key already gone from
//!   its old shard is counted as done.
//! - A key the new owner already holds with a *different* value (written through the new layout
//!   meanwhile) is not overwritten: the old copy is left in place and reported in
//!   [`MigrateReport::conflicts`] for the operator to settle. Through the new layout the new
//!   owner's value is the one seen.
//!
//! # Limits
//! - Keys with a TTL: [`KvStore`](crate::KvStore) does not expose a key's remaining TTL, so moved keys are copied
//!   **without** TTL. Let short-lived keys expire, or have their owners write them again, rather
//!   than migrating them.
//! - Deletes while migrating: until a key has moved, its value is on its old owner, so delete
//!   through [`ShardedStore::migrating_from`] (the new layout that also deletes on the old
//!   owner). A plain delete through the new layout would leave the old copy, and `migrate` would
//!   copy the deleted value back; likewise after a crash between copy and delete. A delete that
//!   lands while `migrate` is copying the key makes `migrate` take its copy back. Run one
//!   `migrate` at a time.
//! - Writes through the old layout while migrating: a key written through the old layout after
//!   it moved is written to its old shard again and becomes invisible through the new layout
//!   until the next `plan`/`migrate`, which then reports it as a conflict. Switch writers to the
//!   new layout first (reads through the new layout of keys not yet moved return `None`), or stop
//!   writers during the move.
//! - Watches see a moved key as a put on the new owner (through the new layout) or a delete on
//!   the old one (through the old layout).
//!
//! # Locks across a reshard
//! Locks are not migrated: a lock lives only while held, on the shard its name routes to. If a
//! lock's name routes to a different shard in the new layout, a holder that took it through the
//! old layout and a client locking through the new layout take two different locks, and both
//! succeed; fencing tokens from the two shards are not comparable either. Mutual exclusion holds
//! only among clients using the same layout. So: switch every client to the new layout first,
//! then wait until no lock taken through the old layout can still be held (release them, or wait
//! the lock TTL × the backend's `lease_expiry_factor`), and only then rely on the locks again.
//! Resources fenced with tokens should restart their high-water mark for a lock whose shard
//! changed. [`lock_moves`] says which lock names change shard.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::store::ShardedStore;
use crate::error::{Error, ErrorKind, Result};
use crate::kv::{Consistency, Expect};
use crate::Backend;

/// One key to move.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Move {
    /// The key.
    pub key: String,
    /// The shard it is on now.
    pub from: String,
    /// The shard that owns it under the new layout.
    pub to: String,
}

/// What [`plan`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The keys to move, sorted by key.
    pub moves: Vec<Move>,
    /// How many stored keys (on all shards, counting a key on two shards twice) were examined.
    pub keys_scanned: usize,
}

impl Plan {
    /// The fraction of the scanned keys that move.
    pub fn moved_fraction(&self) -> f64 {
        if self.keys_scanned == 0 {
            0.0
        } else {
            self.moves.len() as f64 / self.keys_scanned as f64
        }
    }

    /// How many keys move to each shard.
    pub fn moves_by_target(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for mv in &self.moves {
            *m.entry(mv.to.clone()).or_insert(0) += 1;
        }
        m
    }
}

/// What [`migrate`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrateReport {
    /// Keys copied to their new owner and deleted from their old shard by this run.
    pub moved: usize,
    /// Keys already gone from their old shard (moved by an earlier run, or deleted).
    pub already_done: usize,
    /// Keys whose new owner holds a different value; their old copy was left in place.
    pub conflicts: Vec<String>,
}

/// Every shard known to either layout, by name (the old layout's backend first).
fn shard_map(old: &ShardedStore, new: &ShardedStore) -> Result<HashMap<String, Arc<dyn Backend>>> {
    let mut map: HashMap<String, Arc<dyn Backend>> = HashMap::new();
    for s in old.shards().iter().chain(new.shards()) {
        map.entry(s.name().to_string())
            .or_insert_with(|| s.backend().clone());
    }
    Ok(map)
}

/// Lists every key on every shard of `old` and `new` and returns those that are not on their
/// owner under `new`. Shards are matched by name.
///
/// # Errors
/// The first error of listing a shard, naming the shard.
pub async fn plan(old: &ShardedStore, new: &ShardedStore) -> Result<Plan> {
    let shards = shard_map(old, new)?;
    let mut names: Vec<&String> = shards.keys().collect();
    names.sort();
    let mut plan = Plan::default();
    for name in names {
        let backend = &shards[name];
        let entries = backend
            .list("", Consistency::Strong)
            .await
            .map_err(|e| e.context(format_args!("shard {name:?}")))?;
        plan.keys_scanned += entries.len();
        for e in entries {
            let owner = new.shard_for(&e.key).name();
            if owner != name {
                plan.moves.push(Move {
                    key: e.key,
                    from: name.clone(),
                    to: owner.to_string(),
                });
            }
        }
    }
    plan.moves.sort();
    Ok(plan)
}

/// The lock names among `names` whose shard differs between `old` and `new`, with the old and
/// new shard names.
pub fn lock_moves<'a>(
    old: &ShardedStore,
    new: &ShardedStore,
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, String, String)> {
    names
        .into_iter()
        .filter_map(|n| {
            let (a, b) = (old.shard_for(n).name(), new.shard_for(n).name());
            (a != b).then(|| (n.to_string(), a.to_string(), b.to_string()))
        })
        .collect()
}

/// How often one key's move is retried when its old copy changes during the move.
const ATTEMPTS: usize = 5;

/// Carries out `plan`: for each move, copies the key to its new owner (create-if-absent, or
/// update-if-version of the copy this run made), then deletes it from the old shard
/// (delete-if-version). See the [module contract](self).
///
/// # Errors
/// The first shard error (naming the shard and the key); keys before it are done, the rest are
/// untouched, and running `migrate` again resumes. `Conflict` if a key's old copy kept changing
/// over several attempts. `InvalidConfig` if a move names a shard neither layout has.
pub async fn migrate(old: &ShardedStore, new: &ShardedStore, plan: &Plan) -> Result<MigrateReport> {
    let shards = shard_map(old, new)?;
    let get_shard = |name: &str| {
        shards
            .get(name)
            .cloned()
            .ok_or_else(|| Error::config(format!("the plan names an unknown shard {name:?}")))
    };
    let mut report = MigrateReport::default();
    for mv in &plan.moves {
        let from = get_shard(&mv.from)?;
        let to = get_shard(&mv.to)?;
        let at_from = |e: Error| e.context(format_args!("shard {:?}", mv.from));
        let at_to = |e: Error| e.context(format_args!("shard {:?}", mv.to));
        let key = mv.key.as_str();
        // The version of the copy this run wrote on the new owner, if any.
        let mut copied = None;
        let mut done = false;
        for _ in 0..ATTEMPTS {
            let Some(src) = from.get(key, Consistency::Strong).await.map_err(at_from)? else {
                if let Some(c) = copied {
                    // The old copy was deleted after this run copied it (a delete through the
                    // new layout while migrating): the delete wins, so take the copy back,
                    // unless the key has been written on its new owner since.
                    match to.compare_and_swap(key, Expect::Version(c), None).await {
                        Ok(_) => {}
                        Err(e) if e.is(ErrorKind::Conflict) => {}
                        Err(e) => return Err(at_to(e)),
                    }
                }
                report.already_done += 1;
                done = true;
                break;
            };
            let dst = to.get(key, Consistency::Strong).await.map_err(at_to)?;
            let write = match dst {
                None => Some(Expect::Absent),
                Some(d) if d.value == src.value => None,
                Some(d) if copied == Some(d.version) => Some(Expect::Version(d.version)),
                Some(_) => {
                    report.conflicts.push(mv.key.clone());
                    done = true;
                    break;
                }
            };
            if let Some(expect) = write {
                match to
                    .compare_and_swap(key, expect, Some(src.value.clone()))
                    .await
                {
                    Ok(v) => copied = v,
                    Err(e) if e.is(ErrorKind::Conflict) => continue,
                    Err(e) => return Err(at_to(e)),
                }
            }
            match from
                .compare_and_swap(key, Expect::Version(src.version), None)
                .await
            {
                Ok(_) => {
                    report.moved += 1;
                    done = true;
                    break;
                }
                Err(e) if e.is(ErrorKind::Conflict) => continue,
                Err(e) => return Err(at_from(e)),
            }
        }
        if !done {
            return Err(Error::new(
                ErrorKind::Conflict,
                "sharded",
                format!(
                    "the key kept changing on shard {:?} during {ATTEMPTS} attempts to move it",
                    mv.from
                ),
            )
            .with_key(key));
        }
    }
    Ok(report)
}
