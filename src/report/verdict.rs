//! The verdict: did the candidate keep the baseline's latency and statuses, per endpoint class?
//!
//! A CI job gates a release on this, so it must neither cry wolf on noise nor wave through a
//! regression because the sample was small. Every comparison is therefore made on a confidence
//! interval, not on two point estimates:
//!
//! * **Latency quantiles**: a distribution-free confidence interval for each side's quantile
//!   from its order statistics (the ranks `n·q ± z·√(n·q·(1-q))`, read off the HDR histogram),
//!   each at √0.95 so that both hold together with 95% confidence; the difference's interval is
//!   then `[lo_c - hi_b, hi_c - lo_b]`. It needs no raw samples, so merged shard histograms
//!   compare exactly as one run's would.
//! * **Error share** (5xx and requests that got no response): the difference of two
//!   proportions with the Agresti-Caffo interval (a pseudo-count added per side), which holds
//!   on small samples.
//!
//! A class regresses when the interval lies wholly beyond the threshold, passes when it lies
//! wholly within, and is inconclusive otherwise: too few requests (or too much noise) to tell,
//! said so, exit 0.
//! A status class (2xx..5xx, a failure kind) the baseline never saw is a regression outright.

use serde::{Deserialize, Serialize};

use super::dataset::ClassStats;

/// Thresholds; the profile's `[gate]` overrides the defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Gate {
    /// Latency quantiles compared, with how much each may grow.
    pub latency: Vec<QuantileRule>,
    /// How much the error share (5xx and no response) may grow, in points of share (0.001 =
    /// 0.1 percentage points).
    pub error_share_growth: f64,
    /// Whether a status class the baseline never saw fails the gate.
    pub new_status_class: bool,
    /// Confidence of the intervals.
    pub confidence: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QuantileRule {
    /// 0.5, 0.99...
    pub quantile: f64,
    /// Relative growth allowed (0.10: 10% of the baseline's value).
    pub growth: f64,
    /// Absolute growth under which nothing is a regression, in microseconds.
    pub floor_us: u64,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            latency: vec![
                QuantileRule {
                    quantile: 0.5,
                    growth: 0.10,
                    floor_us: 2_000,
                },
                QuantileRule {
                    quantile: 0.99,
                    growth: 0.10,
                    floor_us: 2_000,
                },
            ],
            error_share_growth: 0.001,
            new_status_class: true,
            confidence: 0.95,
        }
    }
}

impl Gate {
    /// Checks the values a profile gave.
    pub fn validate(&self) -> Result<(), String> {
        for r in &self.latency {
            if !(r.quantile > 0.0 && r.quantile < 1.0) {
                return Err(format!(
                    "[gate] latency quantile {} must lie between 0 and 1, e.g. 0.99",
                    r.quantile
                ));
            }
            if !(r.growth >= 0.0 && r.growth.is_finite()) {
                return Err(format!(
                    "[gate] growth {} must be a fraction of the baseline, e.g. 0.10 for 10%",
                    r.growth
                ));
            }
        }
        if !(self.confidence > 0.5 && self.confidence < 1.0) {
            return Err(format!(
                "[gate] confidence {} must lie between 0.5 and 1, e.g. 0.95",
                self.confidence
            ));
        }
        if !(0.0..=1.0).contains(&self.error_share_growth) {
            return Err(format!(
                "[gate] error-share-growth {} is a share in points, e.g. 0.001 for 0.1 points",
                self.error_share_growth
            ));
        }
        Ok(())
    }
}

/// What a comparison says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    /// Too little data to tell either way.
    Inconclusive,
    Regression,
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Inconclusive => "inconclusive",
            Verdict::Regression => "REGRESSION",
        }
    }
}

/// One check of one class.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `p99`, `error share`, `new status 5xx`.
    pub what: String,
    pub baseline: f64,
    pub candidate: f64,
    /// Interval of candidate - baseline (same unit: µs or share).
    pub delta_low: f64,
    pub delta_high: f64,
    /// The growth allowed.
    pub allowed: f64,
    pub verdict: Verdict,
}

/// A distribution-free interval for quantile `q` of `s`'s latency, at confidence `c`: values
/// at the order statistics around rank `n·q`. `None` bounds are open (too few samples).
pub fn quantile_interval(
    h: &hdrhistogram::Histogram<u64>,
    q: f64,
    c: f64,
) -> (Option<f64>, Option<f64>) {
    let n = h.len() as f64;
    if n == 0.0 {
        return (None, None);
    }
    let z = normal_quantile(0.5 + c / 2.0);
    let spread = z * (n * q * (1.0 - q)).sqrt();
    let (lo_rank, hi_rank) = ((n * q - spread).floor(), (n * q + spread).ceil());
    let at = |rank: f64| h.value_at_quantile((rank / n).clamp(0.0, 1.0)) as f64;
    let lo = (lo_rank >= 1.0).then(|| at(lo_rank));
    let hi = (hi_rank <= n).then(|| at(hi_rank));
    (lo, hi)
}

/// Compares one quantile of two sides.
pub fn compare_quantile(
    base: &hdrhistogram::Histogram<u64>,
    cand: &hdrhistogram::Histogram<u64>,
    rule: &QuantileRule,
    confidence: f64,
) -> Check {
    let each = confidence.sqrt();
    let (b_lo, b_hi) = quantile_interval(base, rule.quantile, each);
    let (c_lo, c_hi) = quantile_interval(cand, rule.quantile, each);
    let b = base.value_at_quantile(rule.quantile) as f64;
    let c = cand.value_at_quantile(rule.quantile) as f64;
    let low = match (c_lo, b_hi) {
        (Some(c), Some(b)) => c - b,
        _ => f64::NEG_INFINITY,
    };
    let high = match (c_hi, b_lo) {
        (Some(c), Some(b)) => c - b,
        _ => f64::INFINITY,
    };
    let allowed = (b * rule.growth).max(rule.floor_us as f64);
    let verdict = if low > allowed {
        Verdict::Regression
    } else if high <= allowed {
        Verdict::Pass
    } else {
        Verdict::Inconclusive
    };
    Check {
        what: quantile_name(rule.quantile),
        baseline: b,
        candidate: c,
        delta_low: low,
        delta_high: high,
        allowed,
        verdict,
    }
}

/// `p50`, `p99`, `p99.9`.
pub fn quantile_name(q: f64) -> String {
    let pct = q * 100.0;
    if (pct - pct.round()).abs() < 1e-9 {
        format!("p{}", pct.round() as u64)
    } else {
        format!("p{}", (pct * 1000.0).round() / 1000.0)
    }
}

/// Compares the error shares (`errors` of `n` each side), Agresti-Caffo.
pub fn compare_share(
    (base_errors, base_n): (u64, u64),
    (cand_errors, cand_n): (u64, u64),
    allowed: f64,
    confidence: f64,
) -> Check {
    let share = |e: u64, n: u64| if n == 0 { 0.0 } else { e as f64 / n as f64 };
    let (b, c) = (share(base_errors, base_n), share(cand_errors, cand_n));
    // One pseudo-success and one pseudo-failure per side.
    let adj = |e: u64, n: u64| (e as f64 + 1.0) / (n as f64 + 2.0);
    let (pb, pc) = (adj(base_errors, base_n), adj(cand_errors, cand_n));
    let se =
        (pb * (1.0 - pb) / (base_n as f64 + 2.0) + pc * (1.0 - pc) / (cand_n as f64 + 2.0)).sqrt();
    let z = normal_quantile(0.5 + confidence / 2.0);
    let (low, high) = (pc - pb - z * se, pc - pb + z * se);
    let verdict = if low > allowed {
        Verdict::Regression
    } else if high <= allowed || (cand_errors == 0) {
        // No error at all cannot be worse than the baseline, however few the requests.
        Verdict::Pass
    } else {
        Verdict::Inconclusive
    };
    Check {
        what: "error share".into(),
        baseline: b,
        candidate: c,
        delta_low: low,
        delta_high: high,
        allowed,
        verdict,
    }
}

/// Status classes of the candidate that the baseline never had: `5xx`, `timeout`...
pub fn new_status_classes(base: &ClassStats, cand: &ClassStats) -> Vec<String> {
    let classes = |s: &ClassStats| {
        s.statuses
            .keys()
            .map(|k| status_class(k))
            .collect::<std::collections::BTreeSet<_>>()
    };
    let known = classes(base);
    classes(cand)
        .into_iter()
        .filter(|c| !known.contains(c))
        .collect()
}

/// `404` -> `4xx`; every way of getting no response (a timeout, a reset, a recorded upstream
/// failure) is one class, `no response`: a replay's timeout where the recording failed too is
/// not new.
pub fn status_class(status: &str) -> String {
    match status.as_bytes() {
        [d @ b'1'..=b'5', b'0'..=b'9', b'0'..=b'9'] => format!("{}xx", *d as char),
        _ => "no response".to_string(),
    }
}

/// Whether a status key counts as an error: 5xx or no response.
pub fn is_error(status: &str) -> bool {
    match status.as_bytes() {
        [b'5', ..] => true,
        [d, ..] if d.is_ascii_digit() => false,
        _ => true,
    }
}

/// The standard normal's quantile (Acklam's rational approximation, |error| < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(values: impl IntoIterator<Item = u64>) -> hdrhistogram::Histogram<u64> {
        let mut h = hdrhistogram::Histogram::new(3).unwrap();
        for v in values {
            h.record(v).unwrap();
        }
        h
    }

    /// A deterministic log-normal-ish sample: latency shaped like a service's.
    fn service(n: usize, scale: f64, seed: u64) -> Vec<u64> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((x >> 11) as f64 / (1u64 << 53) as f64).clamp(1e-9, 1.0 - 1e-9);
                (scale * (0.6 * normal_quantile(u)).exp()) as u64
            })
            .collect()
    }

    #[test]
    fn the_normal_quantile_is_right() {
        assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-5);
        assert!((normal_quantile(0.5)).abs() < 1e-12);
        assert!((normal_quantile(0.001) + 3.090_232).abs() < 1e-5);
    }

    #[test]
    fn quantile_intervals_cover_the_known_quantile() {
        // Uniform 1..=10_000 µs: the true p99 is 9_900.
        let h = histogram(1..=10_000);
        let (lo, hi) = quantile_interval(&h, 0.99, 0.95);
        let (lo, hi) = (lo.unwrap(), hi.unwrap());
        assert!(lo <= 9_900.0 && 9_900.0 <= hi, "[{lo}, {hi}]");
        assert!(
            hi - lo < 100.0,
            "[{lo}, {hi}] is too wide for 10,000 samples"
        );
        // 50 samples cannot bound a p99 from above.
        let small = histogram(1..=50);
        assert_eq!(quantile_interval(&small, 0.99, 0.95).1, None);
    }

    #[test]
    fn a_20_percent_p99_regression_is_caught_and_identical_runs_pass() {
        let rule = &Gate::default().latency[1];
        let base = histogram(service(20_000, 20_000.0, 1));
        let same = histogram(service(20_000, 20_000.0, 2));
        let slower = histogram(service(20_000, 24_000.0, 3));
        assert_eq!(
            compare_quantile(&base, &same, rule, 0.95).verdict,
            Verdict::Pass
        );
        let c = compare_quantile(&base, &slower, rule, 0.95);
        assert_eq!(c.verdict, Verdict::Regression, "{c:?}");
        assert!(c.delta_low > c.allowed);
    }

    #[test]
    fn a_tiny_sample_is_inconclusive_and_a_clear_shift_is_flagged_on_dozens() {
        let rule = &Gate::default().latency[1];
        let base = histogram(service(30, 20_000.0, 4));
        let slightly = histogram(service(30, 23_000.0, 5));
        assert_eq!(
            compare_quantile(&base, &slightly, rule, 0.95).verdict,
            Verdict::Inconclusive
        );
        // A median that tripled, on 40 requests a side: no doubt.
        let p50 = &Gate::default().latency[0];
        let base = histogram(service(40, 20_000.0, 6));
        let tripled = histogram(service(40, 60_000.0, 7));
        assert_eq!(
            compare_quantile(&base, &tripled, p50, 0.95).verdict,
            Verdict::Regression
        );
    }

    #[test]
    fn shifts_under_the_floor_never_regress() {
        let rule = &Gate::default().latency[1];
        // 300 µs -> 600 µs: doubled, but by less than 2 ms.
        let base = histogram(service(5_000, 300.0, 8));
        let doubled = histogram(service(5_000, 600.0, 9));
        assert_eq!(
            compare_quantile(&base, &doubled, rule, 0.95).verdict,
            Verdict::Pass
        );
    }

    #[test]
    fn error_shares_compare_with_their_uncertainty() {
        let allowed = 0.001;
        assert_eq!(
            compare_share((0, 10_000), (0, 10_000), allowed, 0.95).verdict,
            Verdict::Pass
        );
        assert_eq!(
            compare_share((10, 10_000), (200, 10_000), allowed, 0.95).verdict,
            Verdict::Regression
        );
        assert_eq!(
            compare_share((0, 20), (1, 20), allowed, 0.95).verdict,
            Verdict::Inconclusive
        );
    }

    #[test]
    fn statuses_group_into_classes() {
        assert_eq!(status_class("404"), "4xx");
        assert_eq!(status_class("timeout"), "no response");
        assert_eq!(status_class("upstream_failed"), status_class("reset"));
        assert!(is_error("502") && is_error("refused") && !is_error("404"));
    }
}
