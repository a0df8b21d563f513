//! `loadtape diff`: two datasets compared class by class, and the verdict a CI job gates on.
//!
//! Classes are compared phase for phase ([`Phase`]): against a recording (a capture tape, or the
//! baseline a results tape carries) the replay's time to first byte meets the recording's
//! upstream time; two replays compare their latency from the intended instant. The comparison
//! says which. See `verdict.rs` for the statistics.

use serde::Serialize;

use super::dataset::{ClassStats, Dataset, Example, Kind, Phase};
use super::verdict::{compare_quantile, compare_share, new_status_classes, Check, Gate, Verdict};

/// One side of one class, as the comparison shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SideSummary {
    pub count: u64,
    /// Of all the side's requests.
    pub share: f64,
    pub statuses: std::collections::BTreeMap<String, u64>,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl SideSummary {
    fn of(c: &ClassStats, all: u64, phase: Phase) -> SideSummary {
        let h = c.latency(phase);
        SideSummary {
            count: c.count,
            share: if all == 0 {
                0.0
            } else {
                c.count as f64 / all as f64
            },
            statuses: c.statuses.clone(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// One endpoint class compared.
#[derive(Debug, Clone, Serialize)]
pub struct ClassDiff {
    pub class: String,
    pub baseline: Option<SideSummary>,
    pub candidate: Option<SideSummary>,
    pub checks: Vec<Check>,
    /// Status classes (2xx..5xx, failure kinds) only the candidate has: called out first.
    pub new_statuses: Vec<String>,
    pub verdict: Verdict,
    /// Requests whose live status was not the recorded one (from a results tape).
    pub examples: Vec<Example>,
    /// Why a class was not compared (present on one side only).
    pub note: Option<String>,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// `loadtape.diff/1`: the JSON's shape, kept compatible within a major number.
    pub schema: &'static str,
    pub baseline: String,
    pub baseline_kind: Kind,
    pub candidate: String,
    pub candidate_kind: Kind,
    pub phase: Phase,
    pub phase_description: &'static str,
    pub method: &'static str,
    pub gate: Gate,
    pub verdict: Verdict,
    /// Runs whose figures cannot be trusted: exit 2 whatever the classes say.
    pub invalid: Vec<String>,
    pub overall: ClassDiff,
    /// Regressions first, then inconclusive, then by request count.
    pub classes: Vec<ClassDiff>,
}

pub const METHOD: &str = "latency quantiles: distribution-free order-statistic confidence intervals from the HDR histograms, combined into an interval of the difference; error share: Agresti-Caffo interval of the difference of proportions";

/// The phase to compare when the user names none: first byte against a recording, total
/// latency between two replays.
pub fn default_phase(base: Kind, cand: Kind) -> Phase {
    if base == Kind::Replay && cand == Kind::Replay {
        Phase::Total
    } else {
        Phase::FirstByte
    }
}

pub fn compare(base: &Dataset, cand: &Dataset, gate: &Gate, phase: Phase) -> Comparison {
    let mut classes = Vec::new();
    let names: std::collections::BTreeSet<&String> =
        base.classes.keys().chain(cand.classes.keys()).collect();
    for name in names {
        let d = match (base.classes.get(name), cand.classes.get(name)) {
            (Some(b), Some(c)) => compare_class(name, b, c, base, cand, gate, phase),
            (b, c) => ClassDiff {
                class: name.clone(),
                baseline: b.map(|b| SideSummary::of(b, base.all.count, phase)),
                candidate: c.map(|c| SideSummary::of(c, cand.all.count, phase)),
                checks: Vec::new(),
                new_statuses: Vec::new(),
                verdict: Verdict::Inconclusive,
                examples: cand.examples.get(name).cloned().unwrap_or_default(),
                note: Some(if b.is_none() {
                    "only in the candidate".into()
                } else {
                    "only in the baseline".into()
                }),
            },
        };
        classes.push(d);
    }
    classes.sort_by(|a, b| {
        b.verdict.cmp(&a.verdict).then(
            b.candidate
                .as_ref()
                .map_or(0, |s| s.count)
                .cmp(&a.candidate.as_ref().map_or(0, |s| s.count)),
        )
    });
    let overall = compare_class("all", &base.all, &cand.all, base, cand, gate, phase);
    let verdict = classes
        .iter()
        .map(|c| c.verdict)
        .chain(std::iter::once(overall.verdict))
        .max()
        .unwrap_or(Verdict::Pass);
    Comparison {
        schema: "loadtape.diff/1",
        baseline: base.label.clone(),
        baseline_kind: base.kind,
        candidate: cand.label.clone(),
        candidate_kind: cand.kind,
        phase,
        phase_description: phase.describe(),
        method: METHOD,
        gate: gate.clone(),
        verdict,
        invalid: [base.invalid(), cand.invalid()]
            .into_iter()
            .flatten()
            .collect(),
        overall,
        classes,
    }
}

fn compare_class(
    name: &str,
    b: &ClassStats,
    c: &ClassStats,
    base: &Dataset,
    cand: &Dataset,
    gate: &Gate,
    phase: Phase,
) -> ClassDiff {
    let mut checks: Vec<Check> = gate
        .latency
        .iter()
        .map(|rule| compare_quantile(b.latency(phase), c.latency(phase), rule, gate.confidence))
        .collect();
    checks.push(compare_share(
        (b.errors(), b.count),
        (c.errors(), c.count),
        gate.error_share_growth,
        gate.confidence,
    ));
    let new_statuses = new_status_classes(b, c);
    let mut verdict = checks
        .iter()
        .map(|c| c.verdict)
        .max()
        .unwrap_or(Verdict::Pass);
    if gate.new_status_class && !new_statuses.is_empty() {
        verdict = Verdict::Regression;
    }
    let examples = if name == "all" {
        Vec::new()
    } else {
        cand.examples.get(name).cloned().unwrap_or_default()
    };
    ClassDiff {
        class: name.to_string(),
        baseline: Some(SideSummary::of(b, base.all.count, phase)),
        candidate: Some(SideSummary::of(c, cand.all.count, phase)),
        checks,
        new_statuses,
        verdict,
        examples,
        note: None,
    }
}

impl ClassDiff {
    /// The verdict as a table shows it: why a class was not compared, or its verdict and the
    /// status classes only the candidate has.
    pub fn label(&self) -> String {
        let mut out = self
            .note
            .clone()
            .unwrap_or_else(|| self.verdict.as_str().to_string());
        if !self.new_statuses.is_empty() {
            out = format!("{out}: new {}", self.new_statuses.join(", "));
        }
        out
    }
}

impl Comparison {
    /// 0 within thresholds (or inconclusive), 1 a regression, 2 an invalid run.
    pub fn exit_code(&self) -> u8 {
        if !self.invalid.is_empty() {
            2
        } else if self.verdict == Verdict::Regression {
            1
        } else {
            0
        }
    }
}
