//! Distributions of a replay's outcomes, per endpoint, beside the recording's.
//!
//! Everything here is built from results records ([`Replayed`](crate::tape::Replayed)) alone:
//! each carries what the recording said of its exchange, so the baseline needs no second pass
//! over the source tape, and the statistics of shards merge exactly (histograms add). One
//! builder, [`dataset::ResultsBuilder`], makes them: live on the replay's results thread (its
//! closing [`Summary`] and verdict), and from tapes for `report`, `diff` and `merge`
//! (`dataset.rs`); `diff.rs` and `verdict.rs` compare, `render.rs`, `html.rs` and `hdrlog.rs`
//! write them out.

pub mod dataset;
pub mod diff;
pub mod hdrlog;
#[cfg(feature = "cli")]
pub mod html;
pub mod merge;
pub mod render;
pub mod verdict;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use dataset::{ClassStats, Dataset};

/// A replay's figures: its dataset, its recording's, and loadtape's own lags.
#[derive(Debug, Clone)]
pub struct Summary {
    pub replayed: Dataset,
    pub recorded: Dataset,
    /// Microseconds from the intended instant to the scheduler's hand-off: loadtape's own lag.
    pub dispatch_lag: Histogram<u64>,
    /// Microseconds from the intended instant to the request going out, waits included.
    pub send_lag: Histogram<u64>,
}

impl Summary {
    /// Requests replayed (sent, or failed to be): skipped ones are not counted.
    pub fn replayed_count(&self) -> u64 {
        self.replayed.all.count
    }

    /// Requests that got no response.
    pub fn failed(&self) -> u64 {
        self.replayed.all.no_response()
    }

    pub fn accounting(&self) -> dataset::Accounting {
        self.replayed.accounting.clone().unwrap_or_default()
    }

    /// Per endpoint, the recording's statuses and latency quantiles above the replay's (total
    /// latency: the recording's at the proxy, the replay's from the intended instant). At most
    /// `max_endpoints` endpoints, the busiest first.
    pub fn to_text(&self, max_endpoints: usize) -> String {
        let mut out = String::new();
        let mut endpoints: Vec<_> = self.replayed.classes.iter().collect();
        endpoints.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        let width = endpoints
            .iter()
            .take(max_endpoints)
            .map(|(k, _)| k.len())
            .max()
            .unwrap_or(0)
            .max(12);
        let _ = writeln!(
            out,
            "{:width$}  {:>8}  {:<28} {:>10} {:>10} {:>10}",
            "endpoint", "requests", "statuses", "p50", "p90", "p99"
        );
        let empty = ClassStats::default();
        let line = |out: &mut String, name: &str, replayed: &ClassStats, recorded: &ClassStats| {
            for (label, side) in [("recorded", recorded), ("replayed", replayed)] {
                let first = if label == "recorded" { name } else { "" };
                let _ = writeln!(
                    out,
                    "{first:width$}  {label:>8}  {:<28} {:>10} {:>10} {:>10}",
                    statuses_text(&side.statuses),
                    micros(side.total.value_at_quantile(0.5)),
                    micros(side.total.value_at_quantile(0.9)),
                    micros(side.total.value_at_quantile(0.99)),
                );
            }
        };
        for (name, c) in endpoints.iter().take(max_endpoints) {
            let recorded = self.recorded.classes.get(*name).unwrap_or(&empty);
            line(&mut out, name, c, recorded);
        }
        if endpoints.len() > max_endpoints {
            let _ = writeln!(
                out,
                "... and {} more endpoints",
                endpoints.len() - max_endpoints
            );
        }
        line(&mut out, "all", &self.replayed.all, &self.recorded.all);
        out
    }

    /// Machine-readable figures (stable keys).
    pub fn to_json(&self) -> SummaryJson {
        let side = |s: &ClassStats| SideJson {
            count: s.count,
            statuses: s.statuses.clone(),
            p50_us: s.total.value_at_quantile(0.5),
            p90_us: s.total.value_at_quantile(0.9),
            p99_us: s.total.value_at_quantile(0.99),
            max_us: s.total.max(),
        };
        let empty = ClassStats::default();
        let a = self.accounting();
        SummaryJson {
            endpoints: self
                .replayed
                .classes
                .iter()
                .map(|(k, c)| {
                    let recorded = self.recorded.classes.get(k).unwrap_or(&empty);
                    (
                        k.clone(),
                        EndpointJson {
                            recorded: side(recorded),
                            replayed: side(c),
                        },
                    )
                })
                .collect(),
            all: EndpointJson {
                recorded: side(&self.recorded.all),
                replayed: side(&self.replayed.all),
            },
            dispatch_lag_p99_us: self.dispatch_lag.value_at_quantile(0.99),
            send_lag_p99_us: self.send_lag.value_at_quantile(0.99),
            late: a.late,
            failed: self.failed(),
            skipped: a.skipped,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SideJson {
    pub count: u64,
    pub statuses: BTreeMap<String, u64>,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

#[derive(Debug, Serialize)]
pub struct EndpointJson {
    pub recorded: SideJson,
    pub replayed: SideJson,
}

#[derive(Debug, Serialize)]
pub struct SummaryJson {
    pub endpoints: BTreeMap<String, EndpointJson>,
    pub all: EndpointJson,
    pub dispatch_lag_p99_us: u64,
    pub send_lag_p99_us: u64,
    pub late: u64,
    pub failed: u64,
    pub skipped: u64,
}

/// `200 x118, 404 x2`: the commonest first.
fn statuses_text(statuses: &BTreeMap<String, u64>) -> String {
    let mut v: Vec<_> = statuses.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let mut s = String::new();
    for (i, (k, n)) in v.iter().enumerate() {
        if i == 3 {
            let _ = write!(s, ", +{}", v.len() - 3);
            break;
        }
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{k} x{n}");
    }
    s
}

/// A duration in microseconds, as people read it: `850 µs`, `12.3 ms`, `4.20 s`.
pub fn micros(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else if us < 100_000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else if us < 1_000_000 {
        format!("{:.0} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}
