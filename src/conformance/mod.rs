//! The conformance suite: what every backend must do, as public async functions.
//!
//! Each function takes a [`Harness`] (how to open clients of the backend under test) and panics
//! with a message when the backend breaks the contract. Backends outside this crate can run the
//! same suite. A test file runs it all with one line:
//!
//! ```no_run
//! use std::sync::Arc;
//! use coordkit::{conformance::Harness, Backend, MemoryStore};
//!
//! fn memory() -> Harness {
//!     let store = MemoryStore::new();
//!     Harness::new("memory", move || {
//!         let store = store.clone();
//!         async move { Ok(Arc::new(store) as Arc<dyn Backend>) }
//!     })
//! }
//!
//! coordkit::conformance_tests!(memory());
//! # fn main() {}
//! ```
//!
//! (For memory, the harness must hand out clones of one store so that "clients" share data.)
//!
//! Every test works under its own fresh key prefix and lock names, so the suite can run against
//! a shared server (or a real Consul) without tests seeing each other. Tests that depend on an
//! optional capability (key TTLs, watch) check [`Capabilities`](crate::Capabilities) and test
//! the declared error instead.

mod election_tests;
mod kv_tests;
mod lock_tests;
mod recipe_tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use election_tests::*;
pub use kv_tests::*;
pub use lock_tests::*;
pub use recipe_tests::*;

use crate::error::Result;
use crate::Backend;

type OpenFn =
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Arc<dyn Backend>>> + Send>> + Send + Sync;

/// How the suite opens clients of the backend under test.
#[derive(Clone)]
pub struct Harness {
    name: String,
    open: Arc<OpenFn>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness").field("name", &self.name).finish()
    }
}

static SCOPE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The bound on any single call made by the suite: a call that takes longer fails the test
/// rather than hanging it.
pub const CALL_BOUND: Duration = Duration::from_secs(30);

impl Harness {
    /// A harness named `name` whose `open` connects a new client to the backend under test.
    /// Clients opened by the same harness must see the same data and locks.
    pub fn new<F, Fut>(name: impl Into<String>, open: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn Backend>>> + Send + 'static,
    {
        Harness {
            name: name.into(),
            open: Arc::new(move || Box::pin(open())),
        }
    }

    /// The backend's name, as given to [`Harness::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opens a new client. Panics if it cannot (a test failure).
    pub async fn open(&self) -> Arc<dyn Backend> {
        match tokio::time::timeout(CALL_BOUND, (self.open)()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => panic!("[{}] cannot open a client: {e}", self.name),
            Err(_) => panic!("[{}] opening a client took over {CALL_BOUND:?}", self.name),
        }
    }

    /// A key prefix (ending in `/`) used by no other test of this process or any other run.
    pub fn scope(&self, test: &str) -> String {
        let n = SCOPE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!("ct-{}-{nanos}-{n}/{test}/", std::process::id())
    }
}

/// Awaits `fut` for at most [`CALL_BOUND`]; panics naming `what` otherwise.
pub async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(CALL_BOUND, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {CALL_BOUND:?} (hang)"),
    }
}

/// Awaits a backend call for at most [`CALL_BOUND`] and unwraps it, panicking with the error.
pub async fn ok<T>(what: &str, fut: impl Future<Output = Result<T>>) -> T {
    match bounded(what, fut).await {
        Ok(v) => v,
        Err(e) => panic!("{what}: unexpected error: {e}"),
    }
}

/// Calls the macro `$callback` with `$($prefix)*` followed by the names of every conformance
/// test, comma-separated, in the order the suite runs them. The one list of the suite: [`ALL`]
/// and [`conformance_tests!`](crate::conformance_tests) are generated from it.
///
/// ```
/// macro_rules! names {
///     ($($name:ident),*) => {
///         const NAMES: &[&str] = &[$(stringify!($name)),*];
///     };
/// }
/// coordkit::for_each_conformance_test!(names, []);
/// assert_eq!(NAMES, coordkit::conformance::ALL);
/// ```
#[macro_export]
macro_rules! for_each_conformance_test {
    ($callback:path, [$($prefix:tt)*]) => {
        $callback! {
            $($prefix)*
            values_round_trip, cas_create_update_delete, list_by_prefix, key_ttl_expiry,
            watch_order_and_start, watch_concurrent_writers, watch_survives_burst,
            watch_state_matches_list, invalid_keys_rejected, oversized_value_rejected,
            lock_mutual_exclusion, fencing_tokens_increase, try_lock_on_held_lock,
            lock_wait_times_out, lost_fires_when_lease_lapses, release_hands_over_promptly,
            dropped_guard_releases, run_locked_job, guard_dropped_off_runtime_releases,
            nested_lock_names_are_independent, absurd_wait_is_unbounded,
            cas_makes_a_ttl_key_permanent
        }
    };
}

macro_rules! all_names {
    ($($name:ident),* $(,)?) => {
        /// The names of every conformance test, in the order
        /// [`conformance_tests!`](crate::conformance_tests) runs them.
        pub const ALL: &[&str] = &[$(stringify!($name)),*];
    };
}

crate::for_each_conformance_test!(all_names, []);

/// Generates one `#[tokio::test]` per conformance test, each calling
/// `coordkit::conformance::<test>(&harness)`. `$harness` is evaluated once per test.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::for_each_conformance_test!($crate::conformance_tests, [@each $harness;]);
    };
    (@each $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let harness = $harness;
                $crate::conformance::$name(&harness).await;
            }
        )*
    };
}

/// As [`for_each_conformance_test!`], for the election tests ([`crate::Election`]): the one
/// list of [`ELECTION`] and [`election_conformance_tests!`](crate::election_conformance_tests).
#[macro_export]
macro_rules! for_each_election_test {
    ($callback:path, [$($prefix:tt)*]) => {
        $callback! {
            $($prefix)*
            election_one_leader_at_a_time, election_failover_raises_the_term,
            election_observe_in_order, election_proclaim_visible, election_wait_times_out,
            election_bad_input
        }
    };
}

macro_rules! election_names {
    ($($name:ident),* $(,)?) => {
        /// The names of the election conformance tests, in the order
        /// [`election_conformance_tests!`](crate::election_conformance_tests) runs them.
        pub const ELECTION: &[&str] = &[$(stringify!($name)),*];
    };
}

crate::for_each_election_test!(election_names, []);

/// Generates one `#[tokio::test]` per election conformance test (see
/// [`conformance_tests!`](crate::conformance_tests)).
#[macro_export]
macro_rules! election_conformance_tests {
    ($harness:expr) => {
        $crate::for_each_election_test!($crate::conformance_tests, [@each $harness;]);
    };
}

/// As [`for_each_conformance_test!`], for the semaphore and read-write lock tests: the one
/// list of [`RECIPES`] and [`recipe_conformance_tests!`](crate::recipe_conformance_tests).
#[macro_export]
macro_rules! for_each_recipe_test {
    ($callback:path, [$($prefix:tt)*]) => {
        $callback! {
            $($prefix)*
            semaphore_bounds_holders, semaphore_permits_must_agree, semaphore_waits_and_times_out,
            semaphore_bad_input_and_lost, rwlock_readers_share_writers_exclude,
            rwlock_writer_not_starved, rwlock_mixed_and_lost
        }
    };
}

macro_rules! recipe_names {
    ($($name:ident),* $(,)?) => {
        /// The names of the semaphore and read-write lock conformance tests, in the order
        /// [`recipe_conformance_tests!`](crate::recipe_conformance_tests) runs them.
        pub const RECIPES: &[&str] = &[$(stringify!($name)),*];
    };
}

crate::for_each_recipe_test!(recipe_names, []);

/// Generates one `#[tokio::test]` per semaphore and read-write lock conformance test (see
/// [`conformance_tests!`](crate::conformance_tests)).
#[macro_export]
macro_rules! recipe_conformance_tests {
    ($harness:expr) => {
        $crate::for_each_recipe_test!($crate::conformance_tests, [@each $harness;]);
    };
}

#[cfg(test)]
mod tests {
    /// The suite's functions, as declared in its source files: `pub async fn NAME(h: &Harness)`.
    fn declared() -> Vec<String> {
        [include_str!("kv_tests.rs"), include_str!("lock_tests.rs")]
            .iter()
            .flat_map(|src| src.lines())
            .filter_map(|line| {
                let rest = line.strip_prefix("pub async fn ")?;
                let (name, args) = rest.split_once('(')?;
                args.starts_with("h: &Harness)").then(|| name.to_string())
            })
            .collect()
    }

    /// The one list names every test function of the suite exactly once, and nothing else:
    /// a test added to `kv_tests.rs`/`lock_tests.rs` but not to the list (so never run by
    /// `conformance_tests!`), or listed twice, fails here.
    #[test]
    fn the_list_names_every_test_function_once() {
        let mut listed: Vec<String> = super::ALL.iter().map(|s| s.to_string()).collect();
        let n = listed.len();
        listed.sort();
        listed.dedup();
        assert_eq!(listed.len(), n, "a test is listed twice: {:?}", super::ALL);
        let mut declared = declared();
        declared.sort();
        assert_eq!(
            listed, declared,
            "for_each_conformance_test! vs the suite's functions"
        );
    }

    /// The same for the election list and `election_tests.rs`, and the recipe list and
    /// `recipe_tests.rs`.
    #[test]
    fn the_election_list_names_every_election_test_once() {
        check_list(super::ELECTION, include_str!("election_tests.rs"));
        check_list(super::RECIPES, include_str!("recipe_tests.rs"));
    }

    fn check_list(list: &[&str], source: &str) {
        let mut listed: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        listed.sort();
        let mut declared: Vec<String> = source
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("pub async fn ")?;
                let (name, args) = rest.split_once('(')?;
                args.starts_with("h: &Harness)").then(|| name.to_string())
            })
            .collect();
        declared.sort();
        assert_eq!(listed, declared, "a recipe list vs its source file");
    }
}
