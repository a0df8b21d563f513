//! `loadtape inspect`: what a tape holds, in one screen or one JSON object.
//!
//! The JSON keys are a stable interface (scripts and CI read them): `records` (exchanges; in a
//! results tape, replayed requests), `record_kinds`, `dropped`, `first_ts`, `last_ts`,
//! `duration_s`, `status_counts` (keyed by status code as a string), `methods`, `endpoints`,
//! `bytes_on_disk`. Keys are only ever added.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::endpoint;
use crate::select::Selection;
use crate::tape::reader::ReadStats;
use crate::tape::{Nanos, Record, TapeError, TapeReader};

/// How many endpoint classes `inspect` lists.
const TOP_ENDPOINTS: usize = 15;

/// The summary `inspect` prints.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub files: Vec<FileLine>,
    /// Exchanges (in a results tape, replayed requests).
    pub records: u64,
    pub record_kinds: BTreeMap<String, u64>,
    /// Records the recorder dropped (queue full, disk full).
    pub dropped: u64,
    /// Records in damaged frames skipped by `--lenient`.
    pub lost: u64,
    /// Exchanges that came after the reorder window.
    pub out_of_order: u64,
    /// Start of the first and last exchange, ns since the tape epoch.
    pub first_ts: Option<Nanos>,
    pub last_ts: Option<Nanos>,
    /// Wall-clock time of the first exchange (RFC 3339).
    pub first_time: Option<String>,
    pub duration_s: f64,
    /// Exchanges per second over the tape's span, and in its busiest second.
    pub mean_rate: f64,
    pub peak_rate: u64,
    pub status_counts: BTreeMap<String, u64>,
    /// Exchanges with no response, by failure kind.
    pub failures: BTreeMap<String, u64>,
    pub methods: BTreeMap<String, u64>,
    /// The busiest endpoint classes, most requests first.
    pub endpoints: Vec<EndpointLine>,
    pub request_body_bytes: u64,
    pub response_body_bytes: u64,
    pub bytes_on_disk: u64,
    pub bytes_per_record: f64,
    /// Credentials redacted in headers.
    pub redacted_values: u64,
}

#[derive(Debug, Serialize)]
pub struct FileLine {
    pub path: String,
    pub version: u16,
    pub recorder: String,
    pub bytes: u64,
    pub records: u64,
    pub closed: bool,
    /// Said when the file ends inside a frame.
    pub truncated: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct EndpointLine {
    pub endpoint: String,
    pub count: u64,
}

/// Builds the summary while records stream by.
#[derive(Default)]
pub struct Summariser {
    summary: Summary,
    endpoints: BTreeMap<String, u64>,
    second: Option<u64>,
    in_second: u64,
}

/// Counts a request starting at `start` into the totals, time span and peak rate.
fn count_request(s: &mut Summary, second: &mut Option<u64>, in_second: &mut u64, start: u64) {
    s.records += 1;
    s.first_ts = Some(s.first_ts.map_or(start, |f| f.min(start)));
    s.last_ts = Some(s.last_ts.map_or(start, |l| l.max(start)));
    let sec = start / 1_000_000_000;
    if *second == Some(sec) {
        *in_second += 1;
    } else {
        *second = Some(sec);
        *in_second = 1;
    }
    s.peak_rate = s.peak_rate.max(*in_second);
}

impl Summariser {
    pub fn add(&mut self, record: &Record) {
        let s = &mut self.summary;
        *s.record_kinds
            .entry(record.kind_name().to_string())
            .or_default() += 1;
        match record {
            Record::Exchange(e) => {
                count_request(s, &mut self.second, &mut self.in_second, e.timing.start);
                *s.methods.entry(e.request.method.to_string()).or_default() += 1;
                match &e.response {
                    Ok(r) => {
                        *s.status_counts.entry(r.status.to_string()).or_default() += 1;
                        s.response_body_bytes += r.body.len;
                        s.redacted_values += r.headers.redactions().len() as u64;
                    }
                    Err(f) => *s.failures.entry(f.kind.as_str().to_string()).or_default() += 1,
                }
                s.request_body_bytes += e.request.body.len;
                s.redacted_values += e.request.headers.redactions().len() as u64;
                let class = endpoint::template(e.request.method.as_str(), &e.request.target);
                *self.endpoints.entry(class).or_default() += 1;
            }
            // A results tape: its records are the replayed requests, its statuses the live ones.
            Record::Replayed(r) => {
                count_request(s, &mut self.second, &mut self.in_second, r.intended);
                *s.methods.entry(r.method.to_string()).or_default() += 1;
                match &r.outcome {
                    crate::tape::Outcome::Status(status) => {
                        *s.status_counts.entry(status.to_string()).or_default() += 1
                    }
                    crate::tape::Outcome::Failed(f) => {
                        *s.failures.entry(f.kind.as_str().to_string()).or_default() += 1
                    }
                    crate::tape::Outcome::Skipped => {
                        *s.failures.entry("skipped".to_string()).or_default() += 1
                    }
                }
                s.request_body_bytes += r.bytes_sent;
                s.response_body_bytes += r.bytes_received;
                *self.endpoints.entry(r.endpoint.clone()).or_default() += 1;
            }
            Record::Dropped(d) => s.dropped += d.records,
            _ => {}
        }
    }

    /// Completes the summary with what the reader found.
    pub fn finish(mut self, stats: &ReadStats, epoch_unix_ns: i64) -> Summary {
        let s = &mut self.summary;
        s.lost = stats.lost();
        s.out_of_order = stats.out_of_order;
        for f in &stats.files {
            s.bytes_on_disk += f.bytes;
            s.files.push(FileLine {
                path: f.path.display().to_string(),
                version: f.version,
                recorder: format!("{} {}", f.header.recorder, f.header.recorder_version),
                bytes: f.bytes,
                records: f.records,
                closed: f.closed,
                truncated: f.truncated.as_ref().map(|t| match t.records {
                    Some(n) => format!(
                        "cut at byte {}: the last frame ({n} records) is incomplete, {} bytes present",
                        t.offset, t.present
                    ),
                    None => format!("cut at byte {}: {} bytes of an incomplete frame header", t.offset, t.present),
                }),
            });
        }
        if let (Some(first), Some(last)) = (s.first_ts, s.last_ts) {
            s.duration_s = (last - first) as f64 / 1e9;
            s.first_time = Some(
                chrono::DateTime::from_timestamp_nanos(epoch_unix_ns + first as i64)
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            );
            s.mean_rate = if s.duration_s > 0.0 {
                s.records as f64 / s.duration_s
            } else {
                s.records as f64
            };
        }
        let all: u64 = s.record_kinds.values().sum();
        s.bytes_per_record = if all > 0 {
            s.bytes_on_disk as f64 / all as f64
        } else {
            0.0
        };
        let mut endpoints: Vec<_> = self.endpoints.into_iter().collect();
        endpoints.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        s.endpoints = endpoints
            .into_iter()
            .take(TOP_ENDPOINTS)
            .map(|(endpoint, count)| EndpointLine { endpoint, count })
            .collect();
        self.summary
    }
}

/// Reads every record of `reader` (that `selection` keeps) into a summary.
pub fn summarise(mut reader: TapeReader, selection: &Selection) -> Result<Summary, TapeError> {
    let mut s = Summariser::default();
    for record in reader.by_ref() {
        let record = record?;
        if selection.matches(&record) {
            s.add(&record);
        }
    }
    let epoch = reader.epoch_unix_ns();
    Ok(s.finish(reader.stats(), epoch))
}

impl Summary {
    /// The human-readable form.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        for f in &self.files {
            let state = match (&f.truncated, f.closed) {
                (Some(t), _) => format!("TRUNCATED, {t}"),
                (None, true) => "closed cleanly".into(),
                (None, false) => "not closed (still being written, or the recorder stopped)".into(),
            };
            let _ = writeln!(
                o,
                "{}  v{}  {}  {} records  {}  [{}]",
                f.path,
                f.version,
                f.recorder,
                f.records,
                human_bytes(f.bytes),
                state
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "exchanges   {}  ({} records in all: {})",
            self.records,
            self.record_kinds.values().sum::<u64>(),
            self.record_kinds
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(t) = &self.first_time {
            let _ = writeln!(o, "span        {:.3} s from {t}", self.duration_s);
        }
        let _ = writeln!(
            o,
            "rate        {:.1}/s mean, {}/s peak",
            self.mean_rate, self.peak_rate
        );
        let _ = writeln!(
            o,
            "dropped     {} by the recorder{}",
            self.dropped,
            if self.lost > 0 {
                format!(", {} lost in damaged frames", self.lost)
            } else {
                String::new()
            }
        );
        if self.out_of_order > 0 {
            let _ = writeln!(
                o,
                "late        {} came after the reorder window",
                self.out_of_order
            );
        }
        let statuses: Vec<String> = self
            .status_counts
            .iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .chain(self.failures.iter().map(|(k, v)| format!("{k} x{v}")))
            .collect();
        let _ = writeln!(o, "statuses    {}", statuses.join("  "));
        let methods: Vec<String> = self
            .methods
            .iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect();
        let _ = writeln!(o, "methods     {}", methods.join("  "));
        let _ = writeln!(
            o,
            "bodies      {} up, {} down",
            human_bytes(self.request_body_bytes),
            human_bytes(self.response_body_bytes)
        );
        let _ = writeln!(o, "redacted    {} credential values", self.redacted_values);
        let _ = writeln!(
            o,
            "on disk     {} ({:.1} bytes/record)",
            human_bytes(self.bytes_on_disk),
            self.bytes_per_record
        );
        if !self.endpoints.is_empty() {
            let _ = writeln!(o, "\ntop endpoints");
            let width = self
                .endpoints
                .iter()
                .map(|e| e.count.to_string().len())
                .max()
                .unwrap_or(1);
            for e in &self.endpoints {
                let _ = writeln!(o, "  {:>width$}  {}", e.count, e.endpoint);
            }
        }
        o
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
