//! The latency plot: one panel per backend and operation, each a latency CDF (log scale) of
//! every client measured for it.

use std::path::Path;

use plotters::prelude::*;

use crate::harness::{err, R};
use crate::report::Section;

const OPS: &[&str] = &["get (strong)", "put", "CAS", "lock+unlock", "handoff"];

fn e<T: std::fmt::Display>(x: T) -> crate::harness::BoxError {
    err(x.to_string())
}

/// CDF points (latency µs, percentile), at most ~300 per line.
fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| *x > 0.0).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return Vec::new();
    }
    let step = (n / 300).max(1);
    let mut out: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (v[i], 100.0 * (i + 1) as f64 / n as f64))
        .collect();
    out.push((v[n - 1], 100.0));
    out
}

/// A fixed colour per client, so coordkit looks the same in every panel.
fn color(client: &str, i: usize) -> RGBColor {
    match client {
        "coordkit" => RGBColor(214, 39, 40),
        _ if client.contains("Python") => [RGBColor(255, 127, 14), RGBColor(148, 103, 189)][i % 2],
        _ => [
            RGBColor(31, 119, 180),
            RGBColor(44, 160, 44),
            RGBColor(23, 190, 207),
        ][i % 3],
    }
}

pub fn write(path: &Path, sections: &[Section], title: &str) -> R<()> {
    let sections: Vec<&Section> = sections
        .iter()
        .filter(|s| !s.rows.is_empty() || !s.handoff.is_empty())
        .collect();
    let rows = sections.len().max(1);
    let cols = OPS.len();
    let root =
        SVGBackend::new(path, (300 * cols as u32, 40 + 260 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let (head, body) = root.split_vertically(40);
    head.titled(title, ("sans-serif", 18)).map_err(e)?;
    let panels = body.split_evenly((rows, cols));
    for (ri, s) in sections.iter().enumerate() {
        for (ci, op) in OPS.iter().enumerate() {
            let panel = &panels[ri * cols + ci];
            let lines: Vec<(String, Vec<(f64, f64)>)> = if *op == "handoff" {
                s.handoff
                    .iter()
                    .map(|r| (r.client.clone(), cdf(&r.series.lat_us)))
                    .collect()
            } else {
                s.rows
                    .iter()
                    .filter(|r| r.op == *op)
                    .map(|r| (r.client.clone(), cdf(&r.series.lat_us)))
                    .collect()
            };
            // Plotted on log10(latency), whole decades, labelled in µs/ms.
            let all = lines.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x));
            let (lo, hi) = all.fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
            let (lo, hi) = if hi <= 0.0 {
                (0.0, 1.0)
            } else {
                let lo = lo.log10().floor();
                (lo, hi.log10().ceil().max(lo + 1.0))
            };
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("{} — {}", s.backend, op), ("sans-serif", 13))
                .margin(6)
                .x_label_area_size(28)
                .y_label_area_size(34)
                .build_cartesian_2d(lo..hi, 0f64..100f64)
                .map_err(e)?;
            chart
                .configure_mesh()
                .x_desc("latency (log scale)")
                .y_desc("percentile")
                .x_labels(if hi - lo > 3.0 {
                    (hi - lo) as usize + 1
                } else {
                    ((hi - lo) * 2.0) as usize + 1
                })
                .max_light_lines(1)
                .y_labels(5)
                .x_label_formatter(&|x| crate::stats::fmt_us(10f64.powf(*x)))
                .label_style(("sans-serif", 10))
                .draw()
                .map_err(e)?;
            let (mut raw_i, mut peer_i) = (0, 0);
            for (name, pts) in lines.iter() {
                let idx = if name.contains("Python") {
                    &mut peer_i
                } else {
                    &mut raw_i
                };
                let c = color(name, *idx);
                if name != "coordkit" {
                    *idx += 1;
                }
                chart
                    .draw_series(LineSeries::new(
                        pts.iter().map(|(x, y)| (x.log10(), *y)),
                        c.stroke_width(2),
                    ))
                    .map_err(e)?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 14, y)], c.stroke_width(2))
                    });
            }
            if !lines.is_empty() {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::LowerRight)
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 10))
                    .draw()
                    .map_err(e)?;
            }
        }
    }
    root.present().map_err(e)?;
    Ok(())
}
