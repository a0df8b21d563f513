//! Distributions of a replay's outcomes, per endpoint, beside the recording's.
//!
//! Everything here is built from results records ([`Replayed`]) alone: each carries what the
//! recording said of its exchange, so the baseline needs no second pass over the source tape,
//! and the statistics of shards merge exactly (histograms add). The replay builds one
//! [`Stats`] live for its closing summary; `report` and `diff` build [`dataset::Dataset`]s
//! from capture and results tapes (`dataset.rs`), compare them (`diff.rs`, `verdict.rs`) and
//! render them (`render.rs`, `html.rs`, `hdrlog.rs`).

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

use crate::tape::{replayed_flags, Outcome, Replayed};

/// Latencies are kept in microseconds with 3 significant digits: 0.1% error at any scale.
fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant digits is a valid precision")
}

/// Statuses and latency of one side (recorded or replayed) of one endpoint.
#[derive(Debug, Clone)]
pub struct Side {
    pub count: u64,
    /// `"200"`, `"404"`, or a failure kind (`"refused"`, `"timeout"`).
    pub statuses: BTreeMap<String, u64>,
    /// Microseconds. Replayed: from the intended send time to the last byte. Recorded: from the
    /// request's head to the last byte, as the proxy saw the upstream.
    pub latency: Histogram<u64>,
}

impl Default for Side {
    fn default() -> Self {
        Side {
            count: 0,
            statuses: BTreeMap::new(),
            latency: histogram(),
        }
    }
}

impl Side {
    fn add(&mut self, status: Option<&str>, status_code: Option<u16>, latency_ns: u64) {
        self.count += 1;
        // Keyed by text without allocating per record (the results thread sees every request).
        let mut buf = [0u8; 8];
        let key = match (status, status_code) {
            (Some(s), _) => s,
            (None, Some(c)) => {
                use std::io::Write as _;
                let mut cursor = std::io::Cursor::new(&mut buf[..]);
                let _ = write!(cursor, "{c}");
                let len = cursor.position() as usize;
                std::str::from_utf8(&buf[..len]).expect("digits are UTF-8")
            }
            (None, None) => "none",
        };
        match self.statuses.get_mut(key) {
            Some(n) => *n += 1,
            None => {
                self.statuses.insert(key.to_string(), 1);
            }
        }
        self.latency
            .record(latency_ns / 1000)
            .expect("auto-resizing histograms take any u64");
    }

    fn merge(&mut self, other: &Side) {
        self.count += other.count;
        for (k, v) in &other.statuses {
            *self.statuses.entry(k.clone()).or_default() += v;
        }
        self.latency
            .add(&other.latency)
            .expect("auto-resizing histograms add");
    }

    /// The latency at quantile `q`, in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        self.latency.value_at_quantile(q)
    }
}

/// One endpoint class: the recording's side and the replay's, over the same exchanges.
#[derive(Debug, Clone, Default)]
pub struct EndpointStats {
    pub recorded: Side,
    pub replayed: Side,
}

impl EndpointStats {
    fn add(&mut self, r: &Replayed) {
        match &r.outcome {
            Outcome::Status(s) => self.replayed.add(None, Some(*s), r.latency()),
            Outcome::Failed(f) => self.replayed.add(Some(f.kind.as_str()), None, r.latency()),
            Outcome::Skipped => return,
        }
        let recorded_status = if r.recorded.status.is_none() {
            Some("upstream_failed")
        } else {
            None
        };
        self.recorded
            .add(recorded_status, r.recorded.status, r.recorded.total);
    }

    fn merge(&mut self, other: &EndpointStats) {
        self.recorded.merge(&other.recorded);
        self.replayed.merge(&other.replayed);
    }
}

/// Everything the summary and the verdict need, built one record at a time.
#[derive(Debug, Clone)]
pub struct Stats {
    pub endpoints: BTreeMap<String, EndpointStats>,
    pub all: EndpointStats,
    /// Microseconds from the intended instant to the scheduler's hand-off: loadtape's own lag.
    pub dispatch_lag: Histogram<u64>,
    /// Microseconds from the intended instant to the request going out, waits included.
    pub send_lag: Histogram<u64>,
    pub late: u64,
    pub rewritten: u64,
    pub synthesised: u64,
    /// Requests that carried a value a live answer should have replaced, and went as recorded.
    pub unmapped: u64,
    /// Requests that got no response (refused, reset, timed out, TLS).
    pub failed: u64,
    /// Requests not sent: a live value they needed never came, and the profile said skip.
    pub skipped: u64,
    /// The schedule's span: first and last intended instants, ns.
    pub first_intended: Option<u64>,
    pub last_intended: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            endpoints: BTreeMap::new(),
            all: EndpointStats::default(),
            dispatch_lag: histogram(),
            send_lag: histogram(),
            late: 0,
            rewritten: 0,
            synthesised: 0,
            unmapped: 0,
            failed: 0,
            skipped: 0,
            first_intended: None,
            last_intended: 0,
        }
    }
}

impl Stats {
    pub fn add(&mut self, r: &Replayed) {
        if r.outcome == Outcome::Skipped {
            // Not sent: neither side of the comparison counts it.
            self.skipped += 1;
            return;
        }
        match self.endpoints.get_mut(&r.endpoint) {
            Some(e) => e.add(r),
            None => {
                let mut e = EndpointStats::default();
                e.add(r);
                self.endpoints.insert(r.endpoint.clone(), e);
            }
        }
        self.all.add(r);
        self.dispatch_lag
            .record(r.dispatched / 1000)
            .expect("auto-resizing histograms take any u64");
        self.send_lag
            .record(r.sent / 1000)
            .expect("auto-resizing histograms take any u64");
        let flag = |f: u32| u64::from(r.flags & f != 0);
        self.late += flag(replayed_flags::LATE);
        self.rewritten += flag(replayed_flags::REWRITTEN);
        self.synthesised += flag(replayed_flags::SYNTHESISED);
        self.unmapped += flag(replayed_flags::UNMAPPED);
        self.failed += u64::from(matches!(r.outcome, Outcome::Failed(_)));
        self.first_intended = Some(
            self.first_intended
                .map_or(r.intended, |f| f.min(r.intended)),
        );
        self.last_intended = self.last_intended.max(r.intended);
    }

    /// Adds another shard's statistics: the result is what one run over both would give.
    pub fn merge(&mut self, other: &Stats) {
        for (k, v) in &other.endpoints {
            self.endpoints.entry(k.clone()).or_default().merge(v);
        }
        self.all.merge(&other.all);
        self.dispatch_lag
            .add(&other.dispatch_lag)
            .expect("auto-resizing histograms add");
        self.send_lag
            .add(&other.send_lag)
            .expect("auto-resizing histograms add");
        self.late += other.late;
        self.rewritten += other.rewritten;
        self.synthesised += other.synthesised;
        self.unmapped += other.unmapped;
        self.failed += other.failed;
        self.skipped += other.skipped;
        self.first_intended = match (self.first_intended, other.first_intended) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_intended = self.last_intended.max(other.last_intended);
    }

    /// The summary as text: per endpoint, the recording's statuses and latency quantiles above
    /// the replay's. At most `max_endpoints` endpoints, the busiest first.
    pub fn to_text(&self, max_endpoints: usize) -> String {
        let mut out = String::new();
        let mut endpoints: Vec<_> = self.endpoints.iter().collect();
        endpoints.sort_by(|a, b| {
            b.1.replayed
                .count
                .cmp(&a.1.replayed.count)
                .then(a.0.cmp(b.0))
        });
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
        let line = |out: &mut String, name: &str, e: &EndpointStats| {
            for (label, side) in [("recorded", &e.recorded), ("replayed", &e.replayed)] {
                let first = if label == "recorded" { name } else { "" };
                let _ = writeln!(
                    out,
                    "{first:width$}  {label:>8}  {:<28} {:>10} {:>10} {:>10}",
                    statuses_text(&side.statuses),
                    micros(side.quantile_us(0.5)),
                    micros(side.quantile_us(0.9)),
                    micros(side.quantile_us(0.99)),
                );
            }
        };
        for (name, e) in endpoints.iter().take(max_endpoints) {
            line(&mut out, name, e);
        }
        if endpoints.len() > max_endpoints {
            let _ = writeln!(
                out,
                "... and {} more endpoints",
                endpoints.len() - max_endpoints
            );
        }
        line(&mut out, "all", &self.all);
        out
    }

    /// Machine-readable figures (stable keys).
    pub fn to_json(&self) -> SummaryJson {
        let side = |s: &Side| SideJson {
            count: s.count,
            statuses: s.statuses.clone(),
            p50_us: s.quantile_us(0.5),
            p90_us: s.quantile_us(0.9),
            p99_us: s.quantile_us(0.99),
            max_us: s.latency.max(),
        };
        SummaryJson {
            endpoints: self
                .endpoints
                .iter()
                .map(|(k, e)| {
                    (
                        k.clone(),
                        EndpointJson {
                            recorded: side(&e.recorded),
                            replayed: side(&e.replayed),
                        },
                    )
                })
                .collect(),
            all: EndpointJson {
                recorded: side(&self.all.recorded),
                replayed: side(&self.all.replayed),
            },
            dispatch_lag_p99_us: self.dispatch_lag.value_at_quantile(0.99),
            send_lag_p99_us: self.send_lag.value_at_quantile(0.99),
            late: self.late,
            failed: self.failed,
            skipped: self.skipped,
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
