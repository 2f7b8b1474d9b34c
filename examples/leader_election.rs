//! Several workers elect a leader that does the work; the leader is killed, and another takes
//! over with a higher term.
//!
//! Each worker campaigns for the election `services/report` with its name as the value. The
//! leader writes work units to a fenced resource, each stamped with its term; the resource
//! refuses terms lower than the highest it has seen. The main task follows the election with
//! `observe`, and once a leader has done some work it kills that leader's task (its guard is
//! dropped, as when a process exits; a process killed outright is replaced after the TTL).
//! After three leaders the example checks that every unit was written under one leader at a
//! time with increasing terms, prints a summary, and exits non-zero if not.
//!
//! ```text
//! cargo run --example leader_election                    # in-memory backend
//! COORDKIT_URL=etcd://127.0.0.1:2379 cargo run --features etcd --example leader_election
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use coordkit::{connect, Backend, FencedResource, LockOptions};
use futures::StreamExt;

const WORKERS: usize = 3;
const LEADERS: usize = 3;
const UNITS_PER_LEADER: usize = 5;

type Log = Arc<FencedResource<Vec<(String, u64)>>>;

/// One worker: campaigns, and while leader writes a unit of work every 20 ms.
async fn worker(name: String, store: Arc<dyn Backend>, election: String, log: Log) {
    let opts = LockOptions::new().ttl(Duration::from_secs(5));
    loop {
        let guard = match store
            .campaign(&election, name.clone().into_bytes(), &opts)
            .await
        {
            Ok(g) => g,
            Err(e) => {
                eprintln!("{name}: campaign failed: {e}");
                return;
            }
        };
        let term = guard.term();
        println!("{name} is leader with term {term}");
        while !guard.is_lost() {
            if let Err(e) = log.write(term, |units| units.push((name.clone(), term.get()))) {
                println!("{name}: the resource refused term {term}: {e}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::main]
async fn main() {
    let url = std::env::var("COORDKIT_URL").unwrap_or_else(|_| "memory://".to_string());
    let shared = connect(&url).await.expect("connect");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let election = format!("services/report-{}-{nanos}", std::process::id());
    let log: Log = Arc::new(FencedResource::new(Vec::new()));
    let mut changes = shared.observe(&election).await.expect("observe");

    let mut tasks = HashMap::new();
    for i in 0..WORKERS {
        let name = format!("worker-{i}");
        // memory:// workers share the one store; any other backend gets a client per worker.
        let store = if url.starts_with("memory:") {
            shared.clone()
        } else {
            connect(&url).await.expect("connect")
        };
        let task = tokio::spawn(worker(name.clone(), store, election.clone(), log.clone()));
        tasks.insert(name, task);
    }

    let mut leaders: Vec<(String, u64)> = Vec::new();
    while leaders.len() < LEADERS {
        let change = tokio::time::timeout(Duration::from_secs(30), changes.next())
            .await
            .expect("a leader within 30 s")
            .expect("the observe stream ended")
            .expect("observe");
        let Some(leader) = change else { continue };
        let name = String::from_utf8_lossy(&leader.value).to_string();
        if leaders.last().is_some_and(|(_, t)| *t == leader.term.get()) {
            continue; // a proclaimed value, not a new leader
        }
        leaders.push((name.clone(), leader.term.get()));
        // Let it work, then kill it.
        loop {
            let done = log.read(|units| {
                units
                    .iter()
                    .filter(|(_, t)| *t == leader.term.get())
                    .count()
            });
            if done >= UNITS_PER_LEADER {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("killing {name} (term {})", leader.term);
        if let Some(task) = tasks.remove(&name) {
            task.abort();
        }
    }
    for task in tasks.values() {
        task.abort();
    }

    let units = log.read(|u| u.clone());
    let mut ok = true;
    if !units.windows(2).all(|w| w[0].1 <= w[1].1) {
        println!("FAIL: terms went down: {units:?}");
        ok = false;
    }
    for (name, term) in &leaders {
        if units.iter().any(|(n, t)| t == term && n != name) {
            println!("FAIL: term {term} was used by someone other than {name}");
            ok = false;
        }
    }
    if !leaders.windows(2).all(|w| w[0].1 < w[1].1) {
        println!("FAIL: leader terms did not increase: {leaders:?}");
        ok = false;
    }
    println!(
        "{} leaders in turn ({}), {} units of work, terms strictly increasing: {}",
        leaders.len(),
        leaders
            .iter()
            .map(|(n, t)| format!("{n} term {t}"))
            .collect::<Vec<_>>()
            .join(", "),
        units.len(),
        if ok { "yes" } else { "NO" }
    );
    if !ok {
        std::process::exit(1);
    }
}
