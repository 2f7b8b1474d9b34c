//! The sharding report: for each hash strategy, over 1,000,000 keys and 1 to 16 shards, the
//! fraction of keys that move when a 17th… shard is added (against the ideal 1/(n+1)), the load
//! balance (most loaded shard / mean), and the routing cost per key. Also sweeps the ring's
//! virtual-node count, and draws the figures as an SVG plot.
//!
//! ```text
//! cargo run --release --example shard_report [-- --keys N --max-shards N --svg PATH]
//! ```
//!
//! Defaults: 1,000,000 keys `key/0000000`…, n = 1..16, plot written to `docs/sharding.svg`.

use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use coordkit::shard::{key_hash, HashStrategy, ShardSpec, StrategyKind, DEFAULT_VNODES};

struct Row {
    n: usize,
    moved: f64,
    ideal: f64,
    balance: f64,
    ns_per_key: f64,
}

fn specs(n: usize) -> Vec<ShardSpec> {
    (0..n)
        .map(|i| ShardSpec::new(format!("shard-{i}")))
        .collect()
}

fn build(kind: StrategyKind, n: usize, vnodes: Option<u32>) -> Arc<dyn HashStrategy> {
    match kind.build(&specs(n), vnodes) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot build {kind} over {n} shards: {e}");
            std::process::exit(2);
        }
    }
}

fn owners(s: &dyn HashStrategy, hashes: &[u64]) -> Vec<u16> {
    hashes.iter().map(|&h| s.route_hash(h) as u16).collect()
}

fn balance(owners: &[u16], n: usize) -> f64 {
    let mut counts = vec![0usize; n];
    for &o in owners {
        counts[o as usize] += 1;
    }
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    max / (owners.len() as f64 / n as f64)
}

/// This thread's CPU time: on a shared machine, time spent descheduled does not count.
fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Instant::now().elapsed().as_nanos();
    }
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// Best of three passes of `f` over every key, in thread CPU ns per key.
fn cpu_ns_per_key(keys: &[String], f: impl Fn(&str) -> usize) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = thread_cpu_ns();
        let mut acc = 0usize;
        for k in keys {
            acc = acc.wrapping_add(f(black_box(k)));
        }
        black_box(acc);
        best = best.min((thread_cpu_ns() - start) as f64 / keys.len() as f64);
    }
    best
}

fn ns_per_key(s: &dyn HashStrategy, keys: &[String]) -> f64 {
    cpu_ns_per_key(keys, |k| s.route(k))
}

fn main() {
    let mut keys_n = 1_000_000usize;
    let mut max_n = 16usize;
    let mut svg_path = String::from("docs/sharding.svg");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next();
        match (a.as_str(), v) {
            ("--keys", Some(v)) => keys_n = v.parse().unwrap_or(keys_n),
            ("--max-shards", Some(v)) => max_n = v.parse().unwrap_or(max_n).clamp(1, 1000),
            ("--svg", Some(v)) => svg_path = v,
            _ => {
                eprintln!("usage: shard_report [--keys N] [--max-shards N] [--svg PATH]");
                std::process::exit(2);
            }
        }
    }
    let keys: Vec<String> = (0..keys_n).map(|i| format!("key/{i:07}")).collect();
    let hashes: Vec<u64> = keys.iter().map(|k| key_hash(k)).collect();
    println!(
        "# Sharding report: {keys_n} keys, n = 1..{max_n} shards, ring vnodes = {DEFAULT_VNODES}\n"
    );
    println!("moved = fraction of keys whose shard changes from n to n+1 shards; ideal = 1/(n+1);");
    println!("balance = keys on the most loaded shard / mean; ns/key = route(key), MD5 included,");
    println!("in thread CPU time (best of 3 passes over all keys).\n");
    let md5_ns = cpu_ns_per_key(&keys, |k| key_hash(k) as usize);
    println!("key_hash (MD5 alone): {md5_ns:.0} ns/key\n");
    let mut all: Vec<(StrategyKind, Vec<Row>)> = Vec::new();
    for kind in StrategyKind::ALL {
        let mut rows = Vec::new();
        let mut prev = build(kind, 1, None);
        let mut prev_owners = owners(&*prev, &hashes);
        for n in 1..=max_n {
            let next = build(kind, n + 1, None);
            let next_owners = owners(&*next, &hashes);
            let moved = prev_owners
                .iter()
                .zip(&next_owners)
                .filter(|(a, b)| a != b)
                .count() as f64
                / keys_n as f64;
            rows.push(Row {
                n,
                moved,
                ideal: 1.0 / (n + 1) as f64,
                balance: balance(&prev_owners, n),
                ns_per_key: ns_per_key(&*prev, &keys),
            });
            prev = next;
            prev_owners = next_owners;
        }
        all.push((kind, rows));
    }
    for (kind, rows) in &all {
        println!("## {kind}\n");
        println!("| n | moved n→n+1 | ideal 1/(n+1) | moved / ideal | balance max/mean | ns/key |");
        println!("|---:|---:|---:|---:|---:|---:|");
        for r in rows {
            println!(
                "| {} | {:.4} | {:.4} | {:.3} | {:.3} | {:.0} |",
                r.n,
                r.moved,
                r.ideal,
                r.moved / r.ideal,
                r.balance,
                r.ns_per_key
            );
        }
        let worst_ratio = rows
            .iter()
            .map(|r| r.moved / r.ideal)
            .fold(0.0f64, f64::max);
        let worst_balance = rows.iter().map(|r| r.balance).fold(0.0f64, f64::max);
        let worst_ns = rows.iter().map(|r| r.ns_per_key).fold(0.0f64, f64::max);
        let mut ns: Vec<f64> = rows.iter().map(|r| r.ns_per_key).collect();
        ns.sort_by(f64::total_cmp);
        let median_ns = ns.get(ns.len() / 2).copied().unwrap_or(0.0);
        println!(
            "\n{kind}: worst moved/ideal {worst_ratio:.3}, worst balance {worst_balance:.3}, \
             median {median_ns:.0} ns/key, slowest {worst_ns:.0} ns/key\n"
        );
    }
    println!("## ring: balance by virtual nodes per shard\n");
    println!("| vnodes | worst balance over n = 2..{max_n} | worst moved / ideal |");
    println!("|---:|---:|---:|");
    for vnodes in [64u32, 128, 256, 512, 1024, 2048] {
        let mut worst_b = 0.0f64;
        let mut worst_m = 0.0f64;
        let mut prev = owners(&*build(StrategyKind::Ring, 1, Some(vnodes)), &hashes);
        for n in 1..=max_n {
            let next = owners(&*build(StrategyKind::Ring, n + 1, Some(vnodes)), &hashes);
            let moved =
                prev.iter().zip(&next).filter(|(a, b)| a != b).count() as f64 / keys_n as f64;
            worst_m = worst_m.max(moved * (n + 1) as f64);
            if n >= 2 {
                worst_b = worst_b.max(balance(&prev, n));
            }
            prev = next;
        }
        println!("| {vnodes} | {worst_b:.3} | {worst_m:.3} |");
    }
    let svg = plot(&all, max_n);
    match std::fs::write(&svg_path, svg) {
        Ok(()) => println!("\nplot written to {svg_path}"),
        Err(e) => {
            eprintln!("cannot write {svg_path}: {e}");
            std::process::exit(1);
        }
    }
}

const COLORS: [&str; 4] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"];

/// Two panels: moved fraction (log scale) against the ideal, and balance.
fn plot(all: &[(StrategyKind, Vec<Row>)], max_n: usize) -> String {
    let (w, h) = (960.0, 420.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="{w}" height="{h}" fill="white"/>"##);
    // Panel geometry.
    let panels = [
        (
            60.0,
            "keys moved when going from n to n+1 shards (log scale)",
        ),
        (540.0, "balance: most loaded shard / mean"),
    ];
    let (pw, ph, top) = (380.0, 300.0, 50.0);
    let x_of = |x0: f64, n: usize| x0 + (n as f64 - 1.0) / (max_n.max(2) as f64 - 1.0) * pw;
    // Panel 1: log10(moved) from 0.03 to 1.
    let (lo, hi) = (0.03f64.log10(), 0.0f64);
    let y1 = |v: f64| top + ph - (v.max(0.03).log10() - lo) / (hi - lo) * ph;
    // Panel 2: balance from 1.0 to the largest seen (at least 1.3).
    let bmax = all
        .iter()
        .flat_map(|(_, rows)| rows.iter().map(|r| r.balance))
        .fold(1.3f64, f64::max);
    let y2 = |v: f64| top + ph - (v - 1.0) / (bmax - 1.0) * ph;
    for (x0, title) in panels {
        let _ = writeln!(
            s,
            r##"<rect x="{x0}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" font-weight="bold">{title}</text>"##,
            x0,
            top - 12.0
        );
        for n in 1..=max_n {
            let x = x_of(x0, n);
            let _ = writeln!(
                s,
                r##"<text x="{x}" y="{}" text-anchor="middle">{n}</text>"##,
                top + ph + 16.0
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">n (shards)</text>"##,
            x0 + pw / 2.0,
            top + ph + 34.0
        );
    }
    for v in [0.03, 0.05, 0.1, 0.2, 0.5, 1.0] {
        let y = y1(v);
        let _ = writeln!(
            s,
            r##"<line x1="60" x2="{}" y1="{y}" y2="{y}" stroke="#eee"/><text x="55" y="{}" text-anchor="end">{v}</text>"##,
            60.0 + pw,
            y + 4.0
        );
    }
    let mut b = 1.0;
    while b <= bmax + 1e-9 {
        let y = y2(b);
        let _ = writeln!(
            s,
            r##"<line x1="540" x2="{}" y1="{y}" y2="{y}" stroke="#eee"/><text x="535" y="{}" text-anchor="end">{b:.2}</text>"##,
            540.0 + pw,
            y + 4.0
        );
        b += if bmax > 2.0 { 0.25 } else { 0.05 };
    }
    // The 1.10 balance target.
    let y = y2(1.10);
    let _ = writeln!(
        s,
        r##"<line x1="540" x2="{}" y1="{y}" y2="{y}" stroke="#000" stroke-dasharray="4 3"/>"##,
        540.0 + pw
    );
    // Ideal movement.
    let ideal: Vec<String> = (1..=max_n)
        .map(|n| format!("{:.1},{:.1}", x_of(60.0, n), y1(1.0 / (n + 1) as f64)))
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#000" stroke-dasharray="4 3"/>"##,
        ideal.join(" ")
    );
    for (i, (kind, rows)) in all.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let p1: Vec<String> = rows
            .iter()
            .map(|r| format!("{:.1},{:.1}", x_of(60.0, r.n), y1(r.moved)))
            .collect();
        let p2: Vec<String> = rows
            .iter()
            .map(|r| format!("{:.1},{:.1}", x_of(540.0, r.n), y2(r.balance)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"##,
            p1.join(" ")
        );
        let _ = writeln!(
            s,
            r##"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"##,
            p2.join(" ")
        );
        let ly = h - 14.0;
        let lx = 60.0 + i as f64 * 140.0;
        let _ = writeln!(
            s,
            r##"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"/><text x="{}" y="{}">{kind}</text>"##,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="660" x2="680" y1="{0}" y2="{0}" stroke="#000" stroke-dasharray="4 3"/><text x="686" y="{1}">ideal 1/(n+1); balance target 1.10</text>"##,
        h - 14.0,
        h - 10.0
    );
    s.push_str("</svg>\n");
    s
}
