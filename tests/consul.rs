//! The Consul backend: the whole conformance suite against the in-process Consul simulator
//! (`tests/support/consul_sim/`), the same suite against a real Consul when `CONSUL_HTTP_ADDR`
//! is set, and fault and bad-input tests against the simulator.

mod support;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use coordkit::backend::consul::{ConsulConfig, ConsulStore};
use coordkit::conformance::Harness;
use coordkit::{Backend, Consistency, DistLock, ErrorKind, KvStore, LockOptions, PutOptions};
use support::consul_sim::{ConsulSim, SimOptions};

/// One simulator for the conformance tests of this binary (it runs on its own thread).
fn shared_sim() -> &'static ConsulSim {
    static SIM: OnceLock<ConsulSim> = OnceLock::new();
    SIM.get_or_init(ConsulSim::start)
}

fn config_for(sim: &ConsulSim) -> ConsulConfig {
    ConsulConfig {
        address: sim.addr().to_string(),
        ..ConsulConfig::default()
    }
}

fn simulated() -> Harness {
    let cfg = config_for(shared_sim());
    Harness::new("consul-sim", move || {
        let cfg = cfg.clone();
        async move { Ok(Arc::new(ConsulStore::connect(cfg).await?) as Arc<dyn Backend>) }
    })
}

mod simulator {
    coordkit::conformance_tests!(super::simulated());
}

/// The same suite against a real Consul named by `CONSUL_HTTP_ADDR` (`host:port`, or an
/// `http(s)://` URL; `CONSUL_HTTP_TOKEN` is sent as the ACL token). Each test is skipped, with
/// a notice, when it is unset.
mod real {
    use super::*;

    pub fn harness() -> Option<Harness> {
        let addr = std::env::var("CONSUL_HTTP_ADDR").ok()?;
        let addr = addr.trim();
        if addr.is_empty() {
            return None;
        }
        let (https, address) = if let Some(a) = addr.strip_prefix("https://") {
            (true, a)
        } else {
            (false, addr.strip_prefix("http://").unwrap_or(addr))
        };
        let cfg = ConsulConfig {
            address: address.trim_end_matches('/').to_string(),
            https,
            token: std::env::var("CONSUL_HTTP_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
            ..ConsulConfig::default()
        };
        Some(Harness::new("consul-real", move || {
            let cfg = cfg.clone();
            async move { Ok(Arc::new(ConsulStore::connect(cfg).await?) as Arc<dyn Backend>) }
        }))
    }

    macro_rules! real_tests {
        ($($name:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    match harness() {
                        Some(h) => coordkit::conformance::$name(&h).await,
                        None => eprintln!(
                            "SKIPPED consul real::{}: CONSUL_HTTP_ADDR is not set, so no real Consul was tested (the simulator tests ran)",
                            stringify!($name)
                        ),
                    }
                }
            )*
        };
    }

    real_tests!(
        values_round_trip,
        cas_create_update_delete,
        list_by_prefix,
        key_ttl_expiry,
        watch_order_and_start,
        invalid_keys_rejected,
        oversized_value_rejected,
        lock_mutual_exclusion,
        fencing_tokens_increase,
        try_lock_on_held_lock,
        lock_wait_times_out,
        lost_fires_when_lease_lapses,
        release_hands_over_promptly,
        dropped_guard_releases,
        run_locked_job,
    );
}
