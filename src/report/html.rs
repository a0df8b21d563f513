//! The HTML report: one self-contained file (inline SVG charts drawn with plotters, inline
//! CSS, no script, nothing fetched at view time), so it can be attached to a CI run or mailed.
//!
//! Order of reading: the verdict table first (what regressed and by how much), then per class
//! the latency distributions overlaid (CDFs), then throughput and latency over time, the
//! status mix, the replay's accounting and the provenance of both sides.

use std::fmt::Write as _;

use plotters::prelude::*;

use super::dataset::{ClassStats, Dataset, Phase, Timeline};
use super::diff::Comparison;
use super::micros;
use super::render::{kind_name, quantiles, signed, xml as esc};
use super::verdict::Verdict;

const BASE_COLOUR: RGBColor = RGBColor(90, 110, 140);
const CAND_COLOUR: RGBColor = RGBColor(214, 96, 28);
/// Classes given a CDF chart, the busiest first.
const CHARTED_CLASSES: usize = 12;

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}\
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}\
th:first-child,td:first-child{text-align:left;font-family:monospace}.REGRESSION{background:#f8d0c8;font-weight:bold}\
.inconclusive{background:#f4f0d0}.pass{background:#dcefdc}.charts{display:flex;flex-wrap:wrap;gap:12px}\
figure{margin:0}figcaption{font-family:monospace;font-size:13px}.verdict{font-size:22px;font-weight:bold}\
pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n",
        esc(title)
    )
}

/// Points of a latency CDF: (log10 of µs, cumulative fraction), denser in the tail. Latency
/// is plotted on its logarithm with labels in time units, so that every chart has ticks
/// whatever its range.
fn cdf(h: &hdrhistogram::Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut qs: Vec<f64> = (0..=100).map(|i| i as f64 / 100.0).collect();
    qs.extend([0.995, 0.999, 0.9995, 0.9999, 1.0]);
    qs.sort_by(|a, b| a.total_cmp(b));
    qs.into_iter()
        .map(|q| ((h.value_at_quantile(q) as f64).max(1.0).log10(), q))
        .collect()
}

fn chart_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot draw a chart: {e}")
}

/// Latency CDFs of one class, baseline and candidate overlaid, log-scaled latency.
fn cdf_chart(
    title: &str,
    sides: &[(&str, &hdrhistogram::Histogram<u64>, RGBColor)],
) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let max = sides
            .iter()
            .map(|(_, h, _)| h.max())
            .max()
            .unwrap_or(1)
            .max(2) as f64;
        let min = sides
            .iter()
            .filter(|(_, h, _)| !h.is_empty())
            .map(|(_, h, _)| h.min())
            .min()
            .unwrap_or(1)
            .max(1) as f64;
        let (lo, hi) = (min.log10() - 0.05, max.log10() + 0.05);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 14))
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(lo..hi, 0.0..1.0f64)
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .x_desc("latency (log scale)")
            .y_desc("fraction of requests")
            .x_labels(6)
            .x_label_formatter(&|v| micros(10f64.powf(*v).round() as u64))
            .draw()
            .map_err(chart_error)?;
        let lines = sides
            .iter()
            .map(|(label, h, colour)| (*label, cdf(h), *colour));
        draw_lines(&mut chart, lines, SeriesLabelPosition::LowerRight)?;
        root.present().map_err(chart_error)?;
    }
    Ok(svg)
}

/// Requests per second and p99 latency over time, one line per side.
fn timeline_chart(
    title: &str,
    sides: &[(&str, &Timeline, RGBColor)],
    what: Series,
) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let points = |t: &Timeline| -> Vec<(f64, f64)> {
            let width_s = t.width as f64 / 1e9;
            t.buckets
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let y = match what {
                        Series::Rate => b.count as f64 / width_s,
                        Series::P99 => b.latency.value_at_quantile(0.99) as f64 / 1000.0,
                    };
                    (i as f64 * width_s, y)
                })
                .collect()
        };
        let all: Vec<Vec<(f64, f64)>> = sides.iter().map(|(_, t, _)| points(t)).collect();
        let x_max = all.iter().flatten().map(|p| p.0).fold(1.0f64, f64::max);
        let y_max = all.iter().flatten().map(|p| p.1).fold(1e-3f64, f64::max);
        let root = SVGBackend::with_string(&mut svg, (560, 260)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 14))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..x_max * 1.02, 0.0..y_max * 1.1)
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .x_desc("seconds from the start")
            .y_desc(match what {
                Series::Rate => "requests/s",
                Series::P99 => "p99 (ms)",
            })
            .draw()
            .map_err(chart_error)?;
        let lines = sides
            .iter()
            .zip(all)
            .map(|((label, _, colour), points)| (*label, points, *colour));
        draw_lines(&mut chart, lines, SeriesLabelPosition::UpperRight)?;
        root.present().map_err(chart_error)?;
    }
    Ok(svg)
}

/// Draws one line per side, with its legend.
fn draw_lines<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<
        'a,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    lines: impl Iterator<Item = (&'a str, Vec<(f64, f64)>, RGBColor)>,
    legend_at: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    for (label, points, colour) in lines {
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(chart_error)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(legend_at)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(chart_error)?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Series {
    Rate,
    P99,
}

fn figure(out: &mut String, caption: &str, svg: &str) {
    let _ = write!(
        out,
        "<figure>{svg}<figcaption>{}</figcaption></figure>",
        esc(caption)
    );
}

/// Closes the CDF charts' block and adds throughput and p99 over time, one line per side.
fn over_time(body: &mut String, sides: &[(&str, &Timeline, RGBColor)]) -> anyhow::Result<()> {
    body.push_str("</div><h2>Over time</h2><div class=\"charts\">");
    figure(
        body,
        "throughput",
        &timeline_chart("requests per second", sides, Series::Rate)?,
    );
    figure(
        body,
        "p99 latency",
        &timeline_chart("p99 latency (ms, total)", sides, Series::P99)?,
    );
    body.push_str("</div>");
    Ok(())
}

fn statuses_table(out: &mut String, sides: &[(&str, &Dataset)]) {
    let _ = write!(out, "<h2>Status mix</h2><table><tr><th>class</th>");
    for (label, _) in sides {
        let _ = write!(out, "<th>{}</th>", esc(label));
    }
    out.push_str("</tr>");
    let names: std::collections::BTreeSet<&String> =
        sides.iter().flat_map(|(_, d)| d.classes.keys()).collect();
    for name in names {
        let _ = write!(out, "<tr><td>{}</td>", esc(name));
        for (_, d) in sides {
            let text = d.classes.get(name).map_or(String::from("-"), |c| {
                c.statuses
                    .iter()
                    .map(|(k, n)| format!("{k} x{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            });
            let _ = write!(out, "<td>{}</td>", esc(&text));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}

fn accounting_and_provenance(out: &mut String, sides: &[(&str, &Dataset)]) {
    for (label, d) in sides {
        if let Some(a) = &d.accounting {
            let _ = write!(
                out,
                "<h2>Replay accounting: {}</h2><table><tr><th>late</th><th>rewritten</th><th>synthesised</th><th>unmapped</th><th>skipped</th><th>loadtape's own lag p99</th></tr><tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
                esc(label), a.late, a.rewritten, a.synthesised, a.unmapped, a.skipped, micros(a.dispatch_lag_p99_us)
            );
        }
        if let Some(why) = d.invalid() {
            let _ = write!(out, "<p class=\"REGRESSION\">INVALID: {}</p>", esc(&why));
        }
    }
    out.push_str("<h2>Provenance</h2>");
    for (label, d) in sides {
        let _ = write!(
            out,
            "<h3>{}: {} ({})</h3><table>",
            esc(label),
            esc(&d.label),
            kind_name(d.kind)
        );
        for (k, v) in &d.provenance {
            let _ = write!(out, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(v));
        }
        out.push_str("</table>");
    }
}

fn busiest(d: &Dataset) -> Vec<(&String, &ClassStats)> {
    let mut v: Vec<_> = d.classes.iter().collect();
    v.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    v.truncate(CHARTED_CLASSES);
    v
}

/// A comparison as a page.
pub fn diff(c: &Comparison, base: &Dataset, cand: &Dataset) -> anyhow::Result<String> {
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>loadtape diff</h1><p class=\"verdict {}\">{}</p><p>Baseline <code>{}</code> ({}), candidate <code>{}</code> ({}).<br>Compared: {}.<br>Method: {}.</p>",
        c.verdict.as_str(),
        esc(&c.headline()),
        esc(&c.baseline),
        kind_name(c.baseline_kind),
        esc(&c.candidate),
        kind_name(c.candidate_kind),
        c.phase_description,
        super::diff::METHOD
    );
    body.push_str("<h2>Verdict per endpoint class</h2><table><tr><th>class</th><th>requests</th><th>p50</th><th>p99</th><th>Δp99 [95% CI]</th><th>errors</th><th>verdict</th></tr>");
    for d in c.classes.iter().chain(std::iter::once(&c.overall)) {
        let side = |s: Option<&super::diff::SideSummary>,
                    f: fn(&super::diff::SideSummary) -> String| {
            s.map_or("-".to_string(), f)
        };
        let (b, k) = (d.baseline.as_ref(), d.candidate.as_ref());
        let p99 = d.checks.iter().find(|x| x.what == "p99");
        let err = d.checks.iter().find(|x| x.what == "error share");
        let verdict = d.label();
        let _ = write!(
            body,
            "<tr class=\"{}\"><td>{}</td><td>{} → {}</td><td>{} → {}</td><td>{} → {}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            d.verdict.as_str(),
            esc(&d.class),
            side(b, |s| s.count.to_string()),
            side(k, |s| s.count.to_string()),
            side(b, |s| micros(s.p50_us)),
            side(k, |s| micros(s.p50_us)),
            side(b, |s| micros(s.p99_us)),
            side(k, |s| micros(s.p99_us)),
            p99.map_or("-".into(), |x| format!(
                "{} [{}, {}]",
                signed(x.candidate - x.baseline),
                signed(x.delta_low),
                signed(x.delta_high)
            )),
            err.map_or("-".into(), |x| format!(
                "{:.2}% → {:.2}%",
                x.baseline * 100.0,
                x.candidate * 100.0
            )),
            esc(&verdict)
        );
    }
    body.push_str("</table>");
    let shifted: Vec<_> = c
        .classes
        .iter()
        .filter(|d| !d.examples.is_empty())
        .collect();
    if !shifted.is_empty() {
        body.push_str("<h2>Requests answered otherwise than recorded</h2>");
        for d in shifted {
            let _ = write!(body, "<h3><code>{}</code></h3><pre>", esc(&d.class));
            for e in &d.examples {
                let _ = writeln!(
                    body,
                    "#{} {}: recorded {}, live {}\n  {}",
                    e.exchange,
                    esc(&e.target),
                    e.recorded.map_or("none".into(), |s| s.to_string()),
                    esc(&e.live),
                    esc(&e.body.chars().take(300).collect::<String>())
                );
            }
            body.push_str("</pre>");
        }
    }
    body.push_str("<h2>Latency distributions</h2><div class=\"charts\">");
    // Regressions first, then the busiest.
    let mut charted: Vec<&String> = c
        .classes
        .iter()
        .filter(|d| d.verdict == Verdict::Regression)
        .map(|d| &d.class)
        .collect();
    for (name, _) in busiest(cand) {
        if !charted.contains(&name) && charted.len() < CHARTED_CLASSES {
            charted.push(name);
        }
    }
    for name in charted {
        let (Some(b), Some(k)) = (base.classes.get(name), cand.classes.get(name)) else {
            continue;
        };
        let svg = cdf_chart(
            name,
            &[
                ("baseline", b.latency(c.phase), BASE_COLOUR),
                ("candidate", k.latency(c.phase), CAND_COLOUR),
            ],
        )?;
        figure(&mut body, name, &svg);
    }
    over_time(
        &mut body,
        &[
            ("baseline", &base.timeline, BASE_COLOUR),
            ("candidate", &cand.timeline, CAND_COLOUR),
        ],
    )?;
    statuses_table(&mut body, &[("baseline", base), ("candidate", cand)]);
    accounting_and_provenance(&mut body, &[("baseline", base), ("candidate", cand)]);
    Ok(page("loadtape diff", &body))
}

/// One dataset as a page.
pub fn report(d: &Dataset, phase: Phase) -> anyhow::Result<String> {
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>loadtape report</h1><p><code>{}</code> ({}): {} requests over {:.1} s.<br>Latency: {}.</p>",
        esc(&d.label),
        kind_name(d.kind),
        d.all.count,
        d.span_s(),
        phase.describe()
    );
    body.push_str("<table><tr><th>class</th><th>requests</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th><th>errors</th></tr>");
    for (name, c) in busiest(d)
        .into_iter()
        .chain(std::iter::once((&"all".to_string(), &d.all)))
    {
        let [p50, p90, p99, p999, max] = quantiles(c.latency(phase)).texts();
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{p50}</td><td>{p90}</td><td>{p99}</td><td>{p999}</td><td>{max}</td><td>{}</td></tr>",
            esc(name),
            c.count,
            c.errors()
        );
    }
    body.push_str("</table><h2>Latency distributions</h2><div class=\"charts\">");
    for (name, c) in busiest(d) {
        let svg = cdf_chart(name, &[("latency", c.latency(phase), CAND_COLOUR)])?;
        figure(&mut body, name, &svg);
    }
    over_time(&mut body, &[("requests", &d.timeline, CAND_COLOUR)])?;
    statuses_table(&mut body, &[("requests", d)]);
    accounting_and_provenance(&mut body, &[("input", d)]);
    Ok(page("loadtape report", &body))
}
