//! Contended lock handoff on etcd: N clients (default 8) take one lock in turn; prints the
//! handoff latency (from the holder starting its release to the next holder's `lock` returning)
//! for coordkit and, in the same run on the same server, for etcd's own Lock RPC.
//!
//! Starts its own single-node etcd (`/usr/bin/etcd`) on a free port:
//! `cargo run --release --features etcd --example etcd_handoff [rounds] [contenders]`

#[cfg(feature = "etcd")]
#[path = "../tests/support/mod.rs"]
mod support;

#[cfg(not(feature = "etcd"))]
fn main() {
    eprintln!("this example needs the `etcd` feature: --features etcd");
}

#[cfg(feature = "etcd")]
#[tokio::main]
async fn main() {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use coordkit::LockOptions;

    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(1000);
    let contenders = args.get(1).copied().unwrap_or(8);
    let server = support::etcd::EtcdCluster::start(1);
    let url = server.url();

    fn report(what: &str, mut v: Vec<Duration>, wall: Duration) {
        v.sort();
        let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        let slow = v
            .iter()
            .filter(|d| **d >= Duration::from_millis(50))
            .count();
        println!(
            "{what:<28} handoffs {:>5}  rounds/s {:>7.1}  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  >=50ms {slow}",
            v.len(),
            v.len() as f64 / wall.as_secs_f64(),
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            v.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
    }

    // coordkit: one client per contender.
    {
        let released: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let per = rounds / contenders;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..contenders {
            let store = coordkit::connect(&url).await.expect("connect");
            let (released, samples) = (released.clone(), samples.clone());
            tasks.push(tokio::spawn(async move {
                let opts = LockOptions::new().ttl(Duration::from_secs(10));
                for _ in 0..per {
                    let g = store.lock("bench/handoff", &opts).await.expect("lock");
                    if let Some(at) = released.lock().unwrap().take() {
                        samples.lock().unwrap().push(at.elapsed());
                    }
                    *released.lock().unwrap() = Some(Instant::now());
                    g.release().await.expect("release");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let wall = start.elapsed();
        report("coordkit (etcd)", samples.lock().unwrap().clone(), wall);
    }

    // etcd's Lock RPC, lease granted once per contender.
    {
        let released: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let per = rounds / contenders;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..contenders {
            let mut client = etcd_client::Client::connect([server.endpoints()], None)
                .await
                .expect("connect");
            let lease = client.lease_grant(30, None).await.expect("lease").id();
            let (released, samples) = (released.clone(), samples.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..per {
                    let resp = client
                        .lock(
                            "rpc/handoff",
                            Some(etcd_client::LockOptions::new().with_lease(lease)),
                        )
                        .await
                        .expect("lock");
                    if let Some(at) = released.lock().unwrap().take() {
                        samples.lock().unwrap().push(at.elapsed());
                    }
                    *released.lock().unwrap() = Some(Instant::now());
                    client.unlock(resp.key()).await.expect("unlock");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let wall = start.elapsed();
        report(
            "etcd Lock RPC (raw client)",
            samples.lock().unwrap().clone(),
            wall,
        );
    }
}
