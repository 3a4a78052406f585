//! latency.png: the request/response latency distribution of each topology, TCP and UDP side by
//! side, as a percentile plot (x: percentile on a log scale of 1/(1-p), so the tail gets as much
//! room as the median; y: round-trip time, log scale). All rounds' samples are pooled.

use std::path::Path;

use anyhow::anyhow;
use plotters::{prelude::*, style::FontStyle};

use crate::{
    measure::Data,
    report::{Results, num},
    stats::percentile,
    topology::Kind,
};

const FONT: &str = "sans-serif";

fn color(kind: Kind) -> RGBColor {
    match kind {
        Kind::NoOverlay => RGBColor(90, 90, 90),
        Kind::KernelVxlan => RGBColor(220, 110, 20),
        Kind::Ebpf => RGBColor(30, 100, 200),
    }
}

/// x coordinate of percentile p (0..1), drawn on a log axis: 1/(1 - p), so p0 → 1, p50 → 2,
/// p90 → 10, p99 → 100, p99.9 → 1000.
fn x_of(p: f64) -> f64 {
    1.0 / (1.0 - p)
}

/// The percentile at x, with as few decimals as it needs: p50, p90, p99.9.
fn pct_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    for digits in 0..4 {
        let scale = 10f64.powi(digits as i32);
        if ((p * scale).round() - p * scale).abs() < 1e-6 {
            return format!("p{p:.digits$}");
        }
    }
    format!("p{p:.3}")
}

/// Round numbers (1, 2, 3, 5, 7 times a power of ten) between lo and hi, for a log axis.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 3.0, 5.0, 7.0] {
            let v = m * decade;
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
        decade *= 10.0;
    }
    out
}

pub fn latency_png(path: &Path, r: &Results) -> anyhow::Result<()> {
    // Once per process; a second registration of the same name is harmless.
    plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("the embedded font does not load"))?;
    let root = BitMapBackend::new(path, (1600, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, body) = root.split_vertically(70);
    top.draw_text(
        &format!(
            "Container-to-container request/response latency across two hosts ({} B messages, {} round{} pooled{})",
            r.plan.rr_size,
            r.rounds,
            if r.rounds == 1 { "" } else { "s" },
            if r.quick { ", QUICK SMOKE RUN" } else { "" }
        ),
        &(FONT, 26).into_font().color(&BLACK),
        (20, 12),
    )
    .map_err(|e| anyhow!("{e}"))?;
    top.draw_text(
        &format!("{} UTC · {} · {}", r.started_utc, r.machine.cpu_model, r.machine.kernel),
        &(FONT, 17).into_font().color(&RGBColor(80, 80, 80)),
        (20, 44),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let panels = body.split_evenly((1, 2));
    for (panel, proto) in panels.iter().zip(["tcp", "udp"]) {
        panel_chart(panel, r, proto).map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn panel_chart(panel: &Area<'_>, r: &Results, proto: &str) -> Result<(), Box<dyn std::error::Error>> {
    // Pooled, sorted RTTs per topology, µs.
    let series: Vec<(Kind, Vec<u64>)> = Kind::ALL
        .iter()
        .map(|k| {
            let mut v: Vec<u64> = r
                .samples
                .iter()
                .filter(|s| s.topology == *k)
                .filter_map(|s| match &s.data {
                    Data::Rr { proto: p, rtt_ns, .. } if p == proto => Some(rtt_ns.iter().copied()),
                    _ => None,
                })
                .flatten()
                .collect();
            v.sort_unstable();
            (*k, v)
        })
        .collect();
    let n_min = series.iter().map(|(_, v)| v.len()).filter(|n| *n > 0).min().unwrap_or(0);
    // Only as far into the tail as every topology has samples for (10 samples past the edge):
    // a power of ten, p90 at least, p99.999 at most.
    let decades = if n_min >= 100 { (n_min as f64 / 10.0).log10().clamp(1.0, 5.0).floor() } else { 1.0 };
    let x_max = 10f64.powf(decades);
    let p_max = 1.0 - 1.0 / x_max;
    let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
    for (_, v) in &series {
        if v.is_empty() {
            continue;
        }
        lo = lo.min(v[0] as f64 / 1000.0);
        hi = hi.max(percentile(v, p_max) / 1000.0);
    }
    if !lo.is_finite() || hi <= 0.0 {
        (lo, hi) = (1.0, 1000.0);
    }
    let (y0, y1) = (lo * 0.8, hi * 1.25);

    let caption = format!("{} request/response", proto.to_uppercase());
    let x_ticks: Vec<f64> = [0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999]
        .into_iter()
        .map(x_of)
        .filter(|x| *x <= x_max * (1.0 + 1e-9))
        .collect();
    let mut chart = ChartBuilder::on(panel)
        .caption(caption, (FONT, 24))
        .margin(18)
        // Room for the last percentile label, centred on the right edge.
        .margin_right(45)
        .x_label_area_size(55)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (1f64..x_max).log_scale().with_key_points(x_ticks),
            (y0..y1).log_scale().with_key_points(log_ticks(y0, y1)),
        )?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| pct_label(*x))
        .y_label_formatter(&|y| if *y >= 10.0 { format!("{y:.0}") } else { num(*y) })
        .x_desc("percentile")
        .y_desc("round-trip time (µs, log scale)")
        .label_style((FONT, 17))
        .axis_desc_style((FONT, 19))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;

    for (kind, v) in &series {
        if v.is_empty() {
            continue;
        }
        let steps = 600;
        let points: Vec<(f64, f64)> = (0..=steps)
            .map(|i| {
                let x = x_max.powf(f64::from(i) / f64::from(steps));
                let p = 1.0 - 1.0 / x;
                (x, percentile(v, p.max(1.0 / v.len() as f64)) / 1000.0)
            })
            .collect();
        let c = color(*kind);
        let label = format!(
            "{}: p50 {} µs, p99 {} µs ({} samples)",
            kind.title(),
            num(percentile(v, 0.5) / 1000.0),
            num(percentile(v, 0.99) / 1000.0),
            v.len()
        );
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(3)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_axis_labels() {
        assert_eq!(pct_label(1.0), "p0");
        assert_eq!(pct_label(2.0), "p50");
        assert_eq!(pct_label(10.0), "p90");
        assert_eq!(pct_label(100.0), "p99");
        assert_eq!(pct_label(1000.0), "p99.9");
        assert_eq!(pct_label(x_of(0.9999)), "p99.99");
        assert_eq!(log_ticks(15.0, 120.0), vec![20.0, 30.0, 50.0, 70.0, 100.0]);
    }
}
