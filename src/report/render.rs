//! Reports and comparisons as text (terminals, the replay's closing lines), Markdown (pull
//! request comments), JUnit XML (a CI's test view: one test case per endpoint class) and JSON
//! (dashboards; the shapes carry a `schema` name and only grow within it). HTML is `html.rs`.

use std::fmt::Write as _;

use serde::Serialize;

use super::dataset::{ClassStats, Dataset, Kind, Phase};
use super::diff::{ClassDiff, Comparison};
use super::micros;
use super::verdict::{Check, Verdict};

/// `+1.20 ms [+0.90 ms, +1.60 ms]`.
pub fn delta(c: &Check) -> String {
    format!(
        "{} [{}, {}]",
        signed(c.candidate - c.baseline),
        signed(c.delta_low),
        signed(c.delta_high)
    )
}

/// A signed duration in µs as text; an unbounded one as `±inf`.
pub fn signed(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 { "+inf" } else { "-inf" }.into();
    }
    let sign = if v < 0.0 { "-" } else { "+" };
    format!("{sign}{}", micros(v.abs().round() as u64))
}

fn share(v: f64) -> String {
    format!("{:.2}%", v * 100.0)
}

fn statuses(s: &std::collections::BTreeMap<String, u64>) -> String {
    let mut v: Vec<_> = s.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(k, n)| format!("{k} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check<'a>(d: &'a ClassDiff, what: &str) -> Option<&'a Check> {
    d.checks.iter().find(|c| c.what == what)
}

pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Capture => "capture tape",
        Kind::Replay => "replay results",
        Kind::RecordedBaseline => "the recording, as the results carry it",
    }
}

impl Comparison {
    /// Classes with this verdict.
    pub fn count(&self, verdict: Verdict) -> usize {
        self.classes.iter().filter(|c| c.verdict == verdict).count()
    }

    /// The verdict's headline.
    pub fn headline(&self) -> String {
        let regressed = self.count(Verdict::Regression);
        let inconclusive = self.count(Verdict::Inconclusive);
        let mut out = match self.verdict {
            Verdict::Regression if regressed == 0 => format!(
                "verdict: REGRESSION (all requests together regressed: {}; no single one of {} endpoint classes did",
                regressions(&self.overall),
                self.classes.len()
            ),
            Verdict::Regression => format!(
                "verdict: REGRESSION ({regressed} of {} endpoint classes regressed",
                self.classes.len()
            ),
            Verdict::Inconclusive | Verdict::Pass => format!(
                "verdict: pass (within thresholds on {} endpoint classes",
                self.classes.len()
            ),
        };
        if inconclusive > 0 {
            let _ = write!(
                out,
                "; {inconclusive} inconclusive: too few requests or too much noise to tell"
            );
        }
        out.push(')');
        if !self.invalid.is_empty() {
            out = format!("verdict: INVALID RUN ({})", self.invalid.join("; "));
        }
        out
    }

    pub fn to_text(&self, max_classes: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.headline());
        let _ = writeln!(
            out,
            "baseline:  {} ({})\ncandidate: {} ({})\ncompared:  {}",
            self.baseline,
            kind_name(self.baseline_kind),
            self.candidate,
            kind_name(self.candidate_kind),
            self.phase_description
        );
        for c in self.classes.iter().filter(|c| !c.new_statuses.is_empty()) {
            let _ = writeln!(
                out,
                "NEW STATUS: {} answers {} (never in the baseline)",
                c.class,
                c.new_statuses.join(", ")
            );
        }
        let width = self
            .classes
            .iter()
            .take(max_classes)
            .map(|c| c.class.len())
            .max()
            .unwrap_or(3)
            .max(5);
        let _ = writeln!(
            out,
            "{:width$}  {:>7} {:>7}  {:>9} {:>9}  {:>30}  {:>9} {:>9}  {:>30}  {:>7} {:>7}  verdict",
            "class", "base n", "cand n", "base p50", "cand p50", "Δp50 [CI]", "base p99", "cand p99", "Δp99 [CI]", "base err", "cand err"
        );
        let row = |out: &mut String, d: &ClassDiff| {
            let (b, c) = (d.baseline.as_ref(), d.candidate.as_ref());
            let n = |s: Option<&super::diff::SideSummary>| {
                s.map_or("-".into(), |s| s.count.to_string())
            };
            let q = |s: Option<&super::diff::SideSummary>,
                     f: fn(&super::diff::SideSummary) -> u64| {
                s.map_or("-".into(), |s| micros(f(s)))
            };
            let dq = |what| check(d, what).map_or("-".into(), delta);
            let err = |which: fn(&Check) -> f64| {
                check(d, "error share").map_or("-".into(), |c| share(which(c)))
            };
            let verdict = match &d.note {
                Some(note) => note.clone(),
                None => d.verdict.as_str().to_string(),
            };
            let _ = writeln!(
                out,
                "{:width$}  {:>7} {:>7}  {:>9} {:>9}  {:>30}  {:>9} {:>9}  {:>30}  {:>7} {:>7}  {verdict}",
                d.class,
                n(b),
                n(c),
                q(b, |s| s.p50_us),
                q(c, |s| s.p50_us),
                dq("p50"),
                q(b, |s| s.p99_us),
                q(c, |s| s.p99_us),
                dq("p99"),
                err(|c| c.baseline),
                err(|c| c.candidate),
            );
        };
        for d in self.classes.iter().take(max_classes) {
            row(&mut out, d);
        }
        if self.classes.len() > max_classes {
            let _ = writeln!(
                out,
                "... and {} more classes",
                self.classes.len() - max_classes
            );
        }
        row(&mut out, &self.overall);
        let shifted: Vec<&ClassDiff> = self
            .classes
            .iter()
            .filter(|c| !c.examples.is_empty())
            .collect();
        if !shifted.is_empty() {
            let _ = writeln!(out, "\nrequests answered otherwise than recorded:");
            let total: usize = shifted.iter().map(|d| d.examples.len()).sum();
            let mut shown = 0;
            for d in shifted.iter().take(max_classes.min(6)) {
                for e in d.examples.iter().take(2) {
                    shown += 1;
                    let body: String = e.body.chars().take(120).collect();
                    let _ = writeln!(
                        out,
                        "  {} #{} {}: recorded {}, live {}: {}",
                        d.class,
                        e.exchange,
                        e.target,
                        e.recorded.map_or("none".into(), |s| s.to_string()),
                        e.live,
                        body.replace('\n', " ")
                    );
                }
            }
            if total > shown {
                let _ = writeln!(
                    out,
                    "  ... {} more (--format html or json lists them)",
                    total - shown
                );
            }
        }
        out
    }

    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "### loadtape diff: {}\n",
            self.headline().trim_start_matches("verdict: ")
        );
        let _ = writeln!(
            out,
            "Baseline `{}` ({}), candidate `{}` ({}). Compared: {}.\n",
            self.baseline,
            kind_name(self.baseline_kind),
            self.candidate,
            kind_name(self.candidate_kind),
            self.phase_description
        );
        let _ = writeln!(
            out,
            "| class | requests (base → cand) | p50 | Δp50 [95% CI] | p99 | Δp99 [95% CI] | errors | verdict |\n|---|---|---|---|---|---|---|---|"
        );
        for d in self.classes.iter().chain(std::iter::once(&self.overall)) {
            let (b, c) = (d.baseline.as_ref(), d.candidate.as_ref());
            let n = |s: Option<&super::diff::SideSummary>| {
                s.map_or("-".into(), |s| s.count.to_string())
            };
            let p = |f: fn(&super::diff::SideSummary) -> u64| {
                format!(
                    "{} → {}",
                    b.map_or("-".into(), |s| micros(f(s))),
                    c.map_or("-".into(), |s| micros(f(s)))
                )
            };
            let errors = check(d, "error share").map_or("-".into(), |c| {
                format!("{} → {}", share(c.baseline), share(c.candidate))
            });
            let verdict = d.label();
            let _ = writeln!(
                out,
                "| `{}` | {} → {} | {} | {} | {} | {} | {} | **{}** |",
                d.class,
                n(b),
                n(c),
                p(|s| s.p50_us),
                check(d, "p50").map_or("-".into(), delta),
                p(|s| s.p99_us),
                check(d, "p99").map_or("-".into(), delta),
                errors,
                verdict
            );
        }
        out
    }

    pub fn to_junit(&self) -> String {
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let failures = self.count(Verdict::Regression);
        let skipped = self.count(Verdict::Inconclusive);
        let _ = writeln!(
            out,
            "<testsuites name=\"loadtape diff\" tests=\"{}\" failures=\"{failures}\" errors=\"{}\">",
            self.classes.len(),
            usize::from(!self.invalid.is_empty())
        );
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" errors=\"{}\">",
            xml(&format!("{} vs {}", self.baseline, self.candidate)),
            self.classes.len(),
            usize::from(!self.invalid.is_empty())
        );
        for reason in &self.invalid {
            let _ = writeln!(
                out,
                "    <testcase classname=\"loadtape\" name=\"run validity\"><error message=\"{}\"/></testcase>",
                xml(reason)
            );
        }
        for d in &self.classes {
            let _ = write!(
                out,
                "    <testcase classname=\"loadtape.endpoint\" name=\"{}\">",
                xml(&d.class)
            );
            let details: Vec<String> = d
                .checks
                .iter()
                .map(|c| format!("{}: {} ({})", c.what, describe_check(c), c.verdict.as_str()))
                .chain(
                    d.new_statuses
                        .iter()
                        .map(|s| format!("new status class {s}")),
                )
                .collect();
            match d.verdict {
                Verdict::Regression => {
                    let _ = write!(
                        out,
                        "<failure message=\"{}\">{}</failure>",
                        xml(&regressions(d)),
                        xml(&details.join("\n"))
                    );
                }
                Verdict::Inconclusive => {
                    let why = d.note.clone().unwrap_or_else(|| straddling(d));
                    let _ = write!(out, "<skipped message=\"inconclusive: {}\"/>", xml(&why));
                }
                Verdict::Pass => {
                    let _ = write!(out, "<system-out>{}</system-out>", xml(&details.join("\n")));
                }
            }
            out.push_str("</testcase>\n");
        }
        out.push_str("  </testsuite>\n</testsuites>\n");
        out
    }
}

/// Why a class is inconclusive: the checks whose interval straddles their threshold, so a
/// reader sees whether more requests would settle it or the run was noisy.
fn straddling(d: &ClassDiff) -> String {
    let open: Vec<String> = d
        .checks
        .iter()
        .filter(|c| c.verdict == Verdict::Inconclusive)
        .map(|c| format!("{}: {}", c.what, describe_check(c)))
        .collect();
    if open.is_empty() {
        "too few requests to tell".into()
    } else {
        format!(
            "{} straddles its threshold (too few requests or too much noise to tell)",
            open.join("; ")
        )
    }
}

fn describe_check(c: &Check) -> String {
    if c.what == "error share" {
        format!(
            "{} -> {} (allowed growth {} points)",
            share(c.baseline),
            share(c.candidate),
            c.allowed * 100.0
        )
    } else {
        format!(
            "{} -> {}, {} (allowed {})",
            micros(c.baseline as u64),
            micros(c.candidate as u64),
            delta(c),
            micros(c.allowed as u64)
        )
    }
}

/// What regressed in a class, in one line.
pub fn regressions(d: &ClassDiff) -> String {
    let mut what: Vec<String> = d
        .checks
        .iter()
        .filter(|c| c.verdict == Verdict::Regression)
        .map(|c| format!("{} {}", c.what, describe_check(c)))
        .collect();
    what.extend(
        d.new_statuses
            .iter()
            .map(|s| format!("new status class {s}")),
    );
    what.join("; ")
}

/// `s` escaped for XML and HTML text and attributes.
pub fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A report of one dataset, as JSON.
#[derive(Debug, Serialize)]
pub struct ReportJson<'a> {
    /// `loadtape.report/1`.
    pub schema: &'static str,
    pub input: &'a str,
    pub kind: Kind,
    pub span_s: f64,
    pub all: ClassJson,
    pub classes: std::collections::BTreeMap<&'a str, ClassJson>,
    /// Per bucket of `bucket_s`: requests, errors, p99 of total latency (µs).
    pub bucket_s: f64,
    pub timeline: Vec<[u64; 3]>,
    pub accounting: Option<&'a super::dataset::Accounting>,
    pub provenance: &'a [(String, String)],
}

#[derive(Debug, Serialize)]
pub struct ClassJson {
    pub count: u64,
    pub rate_per_s: f64,
    pub statuses: std::collections::BTreeMap<String, u64>,
    pub errors: u64,
    pub first_byte: Quantiles,
    pub total: Quantiles,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Debug, Serialize)]
pub struct Quantiles {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Quantiles {
    /// p50, p90, p99, p99.9 and max as people read them.
    pub fn texts(&self) -> [String; 5] {
        [
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
        ]
        .map(micros)
    }
}

pub fn quantiles(h: &hdrhistogram::Histogram<u64>) -> Quantiles {
    Quantiles {
        p50_us: h.value_at_quantile(0.5),
        p90_us: h.value_at_quantile(0.9),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    }
}

fn class_json(c: &ClassStats, span_s: f64) -> ClassJson {
    ClassJson {
        count: c.count,
        rate_per_s: if span_s > 0.0 {
            c.count as f64 / span_s
        } else {
            0.0
        },
        statuses: c.statuses.clone(),
        errors: c.errors(),
        first_byte: quantiles(&c.first_byte),
        total: quantiles(&c.total),
        bytes_sent: c.bytes_sent,
        bytes_received: c.bytes_received,
    }
}

impl Dataset {
    pub fn to_json(&self) -> ReportJson<'_> {
        let span = self.span_s();
        ReportJson {
            schema: "loadtape.report/1",
            input: &self.label,
            kind: self.kind,
            span_s: span,
            all: class_json(&self.all, span),
            classes: self
                .classes
                .iter()
                .map(|(k, c)| (k.as_str(), class_json(c, span)))
                .collect(),
            bucket_s: self.timeline.width as f64 / 1e9,
            timeline: self
                .timeline
                .buckets
                .iter()
                .map(|b| [b.count, b.errors, b.latency.value_at_quantile(0.99)])
                .collect(),
            accounting: self.accounting.as_ref(),
            provenance: &self.provenance,
        }
    }

    /// Per class: requests, rate, statuses, latency quantiles of `phase`, errors, bytes.
    pub fn to_text(&self, phase: Phase) -> String {
        let mut out = String::new();
        let span = self.span_s();
        let _ = writeln!(
            out,
            "{} ({}): {} requests over {:.1} s, {:.1}/s; latency: {}",
            self.label,
            kind_name(self.kind),
            self.all.count,
            span,
            if span > 0.0 {
                self.all.count as f64 / span
            } else {
                0.0
            },
            phase.describe()
        );
        if self.outside_window > 0 {
            let _ = writeln!(
                out,
                "{} requests outside the window asked for",
                self.outside_window
            );
        }
        if let Some(a) = &self.accounting {
            let _ = writeln!(
                out,
                "replay: {} late, {} rewritten, {} synthesised, {} unmapped, {} skipped; loadtape's own lag p99 {}",
                a.late,
                a.rewritten,
                a.synthesised,
                a.unmapped,
                a.skipped,
                micros(a.dispatch_lag_p99_us)
            );
        }
        if let Some(why) = self.invalid() {
            let _ = writeln!(out, "INVALID: {why}");
        }
        let mut classes: Vec<_> = self.classes.iter().collect();
        classes.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        let width = classes
            .iter()
            .map(|(k, _)| k.len())
            .max()
            .unwrap_or(3)
            .max(5);
        let _ = writeln!(
            out,
            "{:width$}  {:>8} {:>8}  {:>9} {:>9} {:>9} {:>9} {:>9}  {:>7}  statuses",
            "class", "requests", "per s", "p50", "p90", "p99", "p99.9", "max", "errors"
        );
        let row = |out: &mut String, name: &str, c: &ClassStats| {
            let [p50, p90, p99, p999, max] = quantiles(c.latency(phase)).texts();
            let _ = writeln!(
                out,
                "{name:width$}  {:>8} {:>8.1}  {:>9} {:>9} {:>9} {:>9} {:>9}  {:>7}  {}",
                c.count,
                if span > 0.0 {
                    c.count as f64 / span
                } else {
                    0.0
                },
                p50,
                p90,
                p99,
                p999,
                max,
                c.errors(),
                statuses(&c.statuses)
            );
        };
        for (name, c) in &classes {
            row(&mut out, name, c);
        }
        row(&mut out, "all", &self.all);
        out
    }

    pub fn to_markdown(&self, phase: Phase) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "### loadtape report: `{}` ({})\n\n{} requests over {:.1} s. Latency: {}.\n",
            self.label,
            kind_name(self.kind),
            self.all.count,
            self.span_s(),
            phase.describe()
        );
        let _ = writeln!(
            out,
            "| class | requests | p50 | p90 | p99 | p99.9 | max | errors | statuses |\n|---|---|---|---|---|---|---|---|---|"
        );
        for (name, c) in self
            .classes
            .iter()
            .chain(std::iter::once((&"all".to_string(), &self.all)))
        {
            let [p50, p90, p99, p999, max] = quantiles(c.latency(phase)).texts();
            let _ = writeln!(
                out,
                "| `{name}` | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.count,
                p50,
                p90,
                p99,
                p999,
                max,
                c.errors(),
                statuses(&c.statuses)
            );
        }
        out
    }

    /// One test case per class; a class with errors (5xx, no response) fails.
    pub fn to_junit(&self) -> String {
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let failing = self.classes.values().filter(|c| c.errors() > 0).count();
        let _ = writeln!(
            out,
            "<testsuites name=\"loadtape report\" tests=\"{}\" failures=\"{failing}\">\n  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failing}\">",
            self.classes.len(),
            xml(&self.label),
            self.classes.len()
        );
        for (name, c) in &self.classes {
            let _ = write!(
                out,
                "    <testcase classname=\"loadtape.endpoint\" name=\"{}\">",
                xml(name)
            );
            if c.errors() > 0 {
                let _ = write!(
                    out,
                    "<failure message=\"{} of {} requests answered 5xx or not at all\">{}</failure>",
                    c.errors(),
                    c.count,
                    xml(&statuses(&c.statuses))
                );
            }
            out.push_str("</testcase>\n");
        }
        out.push_str("  </testsuite>\n</testsuites>\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::dataset::{ClassStats, Dataset, Kind, Phase};
    use super::super::diff::compare;
    use super::super::verdict::Gate;

    /// A class of `n` answers of 200, `total` µs each plus `spread` µs cycling over ten values.
    fn class(n: u64, total: u64, spread: u64) -> ClassStats {
        let mut c = ClassStats {
            count: n,
            ..ClassStats::default()
        };
        c.statuses.insert("200".into(), n);
        for i in 0..n {
            let v = total + (i % 10) * spread / 10;
            c.first_byte.record(v).unwrap();
            c.total.record(v).unwrap();
        }
        c
    }

    fn side(label: &str, classes: &[(&str, ClassStats)]) -> Dataset {
        let mut d = Dataset::new(label.into(), Kind::Replay);
        for (name, c) in classes {
            d.all.merge(c);
            d.classes.insert(name.to_string(), c.clone());
        }
        d
    }

    #[test]
    fn junit_fails_a_regression_shows_a_pass_and_says_why_a_class_is_inconclusive() {
        let base = side(
            "a",
            &[
                ("GET /slowed", class(1000, 300, 100)),
                ("GET /same", class(1000, 300, 100)),
                ("GET /rare", class(3, 300, 100)),
            ],
        );
        let cand = side(
            "b",
            &[
                ("GET /slowed", class(1000, 25_300, 100)),
                ("GET /same", class(1000, 300, 100)),
                ("GET /rare", class(3, 900, 100)),
            ],
        );
        let junit = compare(&base, &cand, &Gate::default(), Phase::Total).to_junit();
        assert_eq!(junit.matches("<failure").count(), 1, "{junit}");
        assert!(
            junit.contains("name=\"GET /slowed\"><failure message=\"p50 "),
            "{junit}"
        );
        assert!(
            junit.contains("name=\"GET /same\"><system-out>p50: "),
            "{junit}"
        );
        // Three requests bound no quantile: the message names the checks left open.
        let rare = junit
            .lines()
            .find(|l| l.contains("name=\"GET /rare\""))
            .unwrap();
        assert!(
            rare.contains("<skipped message=\"inconclusive: p50: "),
            "{rare}"
        );
        assert!(rare.contains("p99: "), "{rare}");
        assert!(rare.contains("straddles its threshold"), "{rare}");
    }
}
