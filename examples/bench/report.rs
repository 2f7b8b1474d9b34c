//! Tables: per backend, single-client operations with round trips and coordkit/raw ratios,
//! contended handoff, memory; then the targets.

use std::fmt::Write as _;

use crate::stats::{fmt_rate, fmt_us, Series};

pub const COORDKIT: &str = "coordkit";

/// One measured row.
pub struct Row {
    pub op: String,
    pub client: String,
    pub series: Series,
    /// Round trips (server-counted requests) per operation, with a breakdown.
    pub rtt: Option<(f64, String)>,
    /// A peer library (not the raw reference for ratios).
    pub peer: bool,
}

impl Row {
    pub fn new(op: &str, client: &str, series: Series) -> Row {
        Row {
            op: op.to_string(),
            client: client.to_string(),
            series,
            rtt: None,
            peer: false,
        }
    }

    fn time_per_op(&self) -> f64 {
        let r = self.series.ops_per_s();
        if r > 0.0 {
            1.0 / r
        } else {
            f64::NAN
        }
    }
}

/// Memory of a client holding locks and watches.
pub struct Rss {
    pub locks: usize,
    pub watches: usize,
    pub connected_kb: u64,
    pub peak_kb: u64,
}

/// One backend's results.
pub struct Section {
    pub backend: String,
    pub server: String,
    pub rows: Vec<Row>,
    pub handoff: Vec<Row>,
    pub rss: Option<Rss>,
    pub notes: Vec<String>,
}

impl Section {
    pub fn new(backend: &str, server: &str) -> Section {
        Section {
            backend: backend.into(),
            server: server.into(),
            rows: Vec::new(),
            handoff: Vec::new(),
            rss: None,
            notes: Vec::new(),
        }
    }

    pub fn ck(&self, op: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.op == op && r.client == COORDKIT)
    }

    /// The first raw (non-peer, non-coordkit) row of `op`: the reference for the ratio.
    pub fn raw(&self, op: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.op == op && r.client != COORDKIT && !r.peer)
    }

    /// coordkit time per op ÷ raw time per op (mean, from throughput), and the p50 ratio.
    pub fn ratio(&self, op: &str) -> Option<(f64, f64)> {
        let (c, r) = (self.ck(op)?, self.raw(op)?);
        Some((
            c.time_per_op() / r.time_per_op(),
            c.series.pct(50.0) / r.series.pct(50.0),
        ))
    }

    pub fn handoff_row(&self, client: &str) -> Option<&Row> {
        self.handoff.iter().find(|r| r.client == client)
    }
}

fn ratio_cell(ck: Option<&Row>, row: &Row) -> String {
    match ck {
        Some(c) if row.client != COORDKIT => format!(
            "{:.2} / {:.2}",
            c.time_per_op() / row.time_per_op(),
            c.series.pct(50.0) / row.series.pct(50.0)
        ),
        _ => "—".into(),
    }
}

/// The markdown tables of one section.
pub fn section_md(s: &Section) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "### {} ({})\n", s.backend, s.server);
    let _ = writeln!(
        o,
        "| operation | client | ops/s | p50 | p99 | max | round trips/op | coordkit ÷ this (mean / p50) |"
    );
    let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---|---:|");
    for r in &s.rows {
        let rtt = r
            .rtt
            .as_ref()
            .map(|(n, d)| {
                if d.is_empty() {
                    format!("{n:.2}")
                } else {
                    format!("{n:.2} ({d})")
                }
            })
            .unwrap_or_else(|| "".into());
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.op,
            r.client,
            fmt_rate(r.series.ops_per_s()),
            fmt_us(r.series.pct(50.0)),
            fmt_us(r.series.pct(99.0)),
            fmt_us(r.series.max()),
            rtt,
            ratio_cell(s.ck(&r.op), r)
        );
    }
    if !s.handoff.is_empty() {
        let _ = writeln!(
            o,
            "\nContended handoff (release → next holder's acquire), {} contenders each with its own client:\n",
            crate::CONTENDERS
        );
        let _ = writeln!(
            o,
            "| client | handoffs | rounds/s | p50 | p99 | max | ≥ 50 ms |"
        );
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|");
        for r in &s.handoff {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.client,
                r.series.lat_us.len(),
                fmt_rate(r.series.ops_per_s()),
                fmt_us(r.series.pct(50.0)),
                fmt_us(r.series.pct(99.0)),
                fmt_us(r.series.max()),
                r.series.count_ge(50_000.0)
            );
        }
    }
    if let Some(m) = &s.rss {
        let _ = writeln!(
            o,
            "\nMemory: a coordkit client process holding {} locks and watching {} keys: peak RSS {:.1} MiB \
             ({:.1} MiB after connecting).",
            m.locks,
            m.watches,
            m.peak_kb as f64 / 1024.0,
            m.connected_kb as f64 / 1024.0
        );
    }
    for n in &s.notes {
        let _ = writeln!(o, "\n> {n}");
    }
    o.push('\n');
    o
}

fn check(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

/// coordkit's time per op ÷ the named raw row's (mean, from throughput), and the p50 ratio.
fn ratio_to(s: &Section, op: &str, raw: &str) -> Option<(f64, f64)> {
    let c = s.ck(op)?;
    let r = s.rows.iter().find(|r| r.op == op && r.client == raw)?;
    Some((
        c.time_per_op() / r.time_per_op(),
        c.series.pct(50.0) / r.series.pct(50.0),
    ))
}

/// One row of the targets table: at most `limit`, judged on the mean ratio.
fn ratio_target(o: &mut String, what: &str, b: &str, r: Option<(f64, f64)>, limit: f64) {
    if let Some((mean, p50)) = r {
        let _ = writeln!(
            o,
            "| {what} | {b} | {mean:.2} mean, {p50:.2} p50 | {} |",
            check(mean <= limit)
        );
    }
}

/// The targets, evaluated on this run.
pub fn targets_md(sections: &[Section]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "| target | backend | measured | verdict |");
    let _ = writeln!(o, "|---|---|---|---|");
    for s in sections {
        let b = s.backend.as_str();
        match b {
            "etcd" => {
                for op in ["get (strong)", "get (stale)", "put", "CAS"] {
                    ratio_target(&mut o, &format!("{op} ≤ 1.05× raw"), b, s.ratio(op), 1.05);
                }
                if let Some((n, d)) = s.ck("lock+unlock").and_then(|r| r.rtt.clone()) {
                    let _ = writeln!(
                        o,
                        "| uncontended lock+unlock in 2 round trips | etcd | {n:.2} ({d}) | {} |",
                        check(n <= 2.05)
                    );
                }
                ratio_target(
                    &mut o,
                    "uncontended lock+unlock ≤ 1.05× the raw txn mutex",
                    b,
                    ratio_to(s, "lock+unlock", "etcd-client (txn mutex)"),
                    1.05,
                );
                if let Some(h) = s.handoff_row(COORDKIT) {
                    let p99 = h.series.pct(99.0);
                    let rate = h.series.ops_per_s();
                    let _ = writeln!(
                        o,
                        "| contended handoff p99 < 10 ms and ≥ 400 rounds/s | etcd | p99 {}, {} rounds/s, {} of {} ≥ 50 ms | {} |",
                        fmt_us(p99),
                        fmt_rate(rate),
                        h.series.count_ge(50_000.0),
                        h.series.lat_us.len(),
                        check(p99 < 10_000.0 && rate >= 400.0)
                    );
                }
            }
            "zookeeper" => {
                ratio_target(
                    &mut o,
                    "get (strong) ≤ 1.0× raw",
                    b,
                    s.ratio("get (strong)"),
                    1.0,
                );
                for op in ["get (stale)", "put"] {
                    ratio_target(&mut o, &format!("{op} ≤ 1.05× raw"), b, s.ratio(op), 1.05);
                }
                ratio_target(&mut o, "CAS ≤ 1.10× raw", b, s.ratio("CAS"), 1.10);
                ratio_target(
                    &mut o,
                    "lock+unlock ≤ 1.10× raw",
                    b,
                    s.ratio("lock+unlock"),
                    1.10,
                );
                let kazoo = s
                    .rows
                    .iter()
                    .find(|r| r.op == "lock+unlock" && r.client.starts_with("kazoo"));
                if let (Some(c), Some(k)) = (s.ck("lock+unlock"), kazoo) {
                    let x = c.series.ops_per_s() / k.series.ops_per_s();
                    let _ = writeln!(
                        o,
                        "| lock+unlock ≥ 1.5× kazoo's throughput | zookeeper | {x:.2}× ({} vs {} ops/s) | {} |",
                        fmt_rate(c.series.ops_per_s()),
                        fmt_rate(k.series.ops_per_s()),
                        check(x >= 1.5)
                    );
                }
            }
            "consul" => ratio_target(
                &mut o,
                "lock+unlock ≤ 1.2× raw (one session)",
                b,
                s.ratio("lock+unlock"),
                1.2,
            ),
            "memory" => {
                for (op, limit) in [
                    ("get (strong)", 0.8),
                    ("put", 0.8),
                    ("CAS", 0.8),
                    ("lock+unlock", 0.3),
                ] {
                    if let (Some(c), Some(r)) = (s.ck(op), s.raw(op)) {
                        let x = c.series.ops_per_s() / r.series.ops_per_s();
                        let _ = writeln!(
                            o,
                            "| ≥ {limit}× raw throughput ({op}) | memory | {x:.2}× ({} vs {} ops/s) | {} |",
                            fmt_rate(c.series.ops_per_s()),
                            fmt_rate(r.series.ops_per_s()),
                            check(x >= limit)
                        );
                    }
                }
            }
            _ => {}
        }
        if b != "memory" {
            if let (Some(h), Some(put)) = (s.handoff_row(COORDKIT), s.ck("put")) {
                let p50 = h.series.pct(50.0);
                let rt = put.series.pct(50.0);
                let _ = writeln!(
                    o,
                    "| handoff without polling (p50 within ~1 write round trip of the release) | {b} | handoff p50 {} vs put p50 {} ({:.1}×) | {} |",
                    fmt_us(p50),
                    fmt_us(rt),
                    p50 / rt,
                    check(p50 <= 3.0 * rt)
                );
            }
        }
    }
    o
}

/// The whole report.
pub fn full_md(sections: &[Section], header: &str) -> String {
    let mut o = String::new();
    o.push_str(header);
    o.push_str("\n## Targets\n\n");
    o.push_str(&targets_md(sections));
    o.push_str("\n## Results per backend\n\n");
    for s in sections {
        o.push_str(&section_md(s));
    }
    o
}
