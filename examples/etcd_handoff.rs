//! Contended lock handoff on etcd: N clients (default 8) take one lock in turn; prints the
//! handoff latency (from the holder starting its release to the next holder's `lock`
//! returning) for coordkit and, in the same run on the same server, for etcd's own Lock RPC.
//! The two alternate in blocks of 100 rounds so that a change in machine load hits both.
//!
//! Starts its own single-node etcd (`/usr/bin/etcd`) on a free port:
//! `cargo run --features etcd --example etcd_handoff [rounds] [contenders]`

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

    use coordkit::{Backend, LockOptions};

    type Samples = Arc<Mutex<Vec<Duration>>>;

    fn report(what: &str, mut v: Vec<Duration>, busy: Duration) {
        v.sort();
        if v.is_empty() {
            return;
        }
        let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        let slow = v
            .iter()
            .filter(|d| **d >= Duration::from_millis(50))
            .count();
        println!(
            "{what:<28} n {:>5}  rounds/s {:>7.1}  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  >=50ms {slow}",
            v.len(),
            v.len() as f64 / busy.as_secs_f64(),
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            v.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
    }

    async fn coordkit_block(
        clients: &[Arc<dyn Backend>],
        per: usize,
        handoffs: &Samples,
        releases: &Samples,
    ) {
        let released: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let mut tasks = Vec::new();
        for store in clients {
            let store = store.clone();
            let (released, handoffs, releases) =
                (released.clone(), handoffs.clone(), releases.clone());
            tasks.push(tokio::spawn(async move {
                let opts = LockOptions::new().ttl(Duration::from_secs(10));
                for _ in 0..per {
                    let g = store.lock("bench/handoff", &opts).await.expect("lock");
                    if let Some(at) = released.lock().unwrap().take() {
                        handoffs.lock().unwrap().push(at.elapsed());
                    }
                    *released.lock().unwrap() = Some(Instant::now());
                    let t = Instant::now();
                    g.release().await.expect("release");
                    releases.lock().unwrap().push(t.elapsed());
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    }

    async fn rpc_block(
        clients: &[(etcd_client::Client, i64)],
        per: usize,
        handoffs: &Samples,
        releases: &Samples,
    ) {
        let released: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let mut tasks = Vec::new();
        for (client, lease) in clients {
            let (mut client, lease) = (client.clone(), *lease);
            let (released, handoffs, releases) =
                (released.clone(), handoffs.clone(), releases.clone());
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
                        handoffs.lock().unwrap().push(at.elapsed());
                    }
                    *released.lock().unwrap() = Some(Instant::now());
                    let t = Instant::now();
                    client.unlock(resp.key()).await.expect("unlock");
                    releases.lock().unwrap().push(t.elapsed());
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    }

    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(1000);
    let contenders = args.get(1).copied().unwrap_or(8).max(1);
    let server = support::etcd::EtcdCluster::start(1);

    let mut ck = Vec::new();
    let mut rpc = Vec::new();
    for _ in 0..contenders {
        ck.push(coordkit::connect(&server.url()).await.expect("connect"));
        let mut c = etcd_client::Client::connect([server.endpoints()], None)
            .await
            .expect("connect");
        let lease = c.lease_grant(60, None).await.expect("lease").id();
        rpc.push((c, lease));
    }
    let (ck_h, ck_r, rpc_h, rpc_r): (Samples, Samples, Samples, Samples) = Default::default();
    let (mut ck_busy, mut rpc_busy) = (Duration::ZERO, Duration::ZERO);
    let per = (100 / contenders).max(1);
    let blocks = (rounds / (per * contenders)).max(1);
    for _ in 0..blocks {
        let t = Instant::now();
        coordkit_block(&ck, per, &ck_h, &ck_r).await;
        ck_busy += t.elapsed();
        let t = Instant::now();
        rpc_block(&rpc, per, &rpc_h, &rpc_r).await;
        rpc_busy += t.elapsed();
    }
    let take = |s: &Samples| s.lock().unwrap().clone();
    report("coordkit handoff", take(&ck_h), ck_busy);
    report("  coordkit release call", take(&ck_r), ck_busy);
    report("etcd Lock RPC handoff", take(&rpc_h), rpc_busy);
    report("  Unlock RPC call", take(&rpc_r), rpc_busy);
}
