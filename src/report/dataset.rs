//! What `report` and `diff` read from tapes: requests by endpoint class, each class's statuses
//! and latency in two phases, a timeline, and a results tape's accounting and examples.
//!
//! Either kind of tape makes a dataset. A capture tape gives what the proxy saw of the real
//! service; a results tape gives two: the replay's (its live answers) and the recording's
//! baseline that every results record carries, so a replay compares against its recording
//! without the source tape.
//!
//! Latency is kept per phase, because the two kinds measure from different instants:
//!
//! * `first_byte`: from the request going out to the response head. On a capture, the proxy's
//!   view of the upstream; on a replay, from the send (connection set-up and waits excluded).
//!   This is what compares a replay with its recording.
//! * `total`: on a replay, from the *intended* instant to the last byte (what a user of the
//!   open model waited, waits included); on a capture, the exchange's whole time at the proxy.
//!   This is what compares two replays.
//!
//! Memory stays bounded whatever the tape's size: histograms per class, and a timeline whose
//! buckets widen (pairs merged) rather than grow past [`MAX_BUCKETS`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::tape::reader::discover;
use crate::tape::{
    replayed_flags, Exchange, Outcome, ReadOptions, Record, Replayed, TapeError, TapeKind,
    TapeReader,
};

/// µs, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant digits is a valid precision")
}

/// Which latency a comparison reads (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    FirstByte,
    Total,
}

impl Phase {
    /// As `--phase` and the JSON name it.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::FirstByte => "first-byte",
            Phase::Total => "total",
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Phase::FirstByte => {
                "time to first byte (from the request's send; connection set-up and waits excluded)"
            }
            Phase::Total => {
                "latency from the intended instant to the last byte (open model, waits included)"
            }
        }
    }
}

/// Where a dataset's figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A capture tape: the real service as the proxy saw it.
    Capture,
    /// A results tape's live answers.
    Replay,
    /// The recording's figures a results tape carries beside each live answer.
    RecordedBaseline,
}

/// One endpoint class (or all of them).
#[derive(Debug, Clone)]
pub struct ClassStats {
    pub count: u64,
    /// `"200"`, `"404"`, or a failure kind (`"timeout"`, `"refused"`).
    pub statuses: BTreeMap<String, u64>,
    /// µs; see [`Phase`].
    pub first_byte: Histogram<u64>,
    pub total: Histogram<u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl Default for ClassStats {
    fn default() -> Self {
        ClassStats {
            count: 0,
            statuses: BTreeMap::new(),
            first_byte: histogram(),
            total: histogram(),
            bytes_sent: 0,
            bytes_received: 0,
        }
    }
}

impl ClassStats {
    fn add(&mut self, s: &Sample) {
        self.count += 1;
        // Keyed by text without allocating per record (the replay's results thread sees every
        // request): a status code is written into a stack buffer.
        let mut buf = [0u8; 8];
        let key = s.status.text(&mut buf);
        match self.statuses.get_mut(key) {
            Some(n) => *n += 1,
            None => {
                self.statuses.insert(key.to_string(), 1);
            }
        }
        if let Some(fb) = s.first_byte_us {
            self.first_byte
                .record(fb)
                .expect("auto-resizing histograms take any u64");
        }
        self.total
            .record(s.total_us)
            .expect("auto-resizing histograms take any u64");
        self.bytes_sent += s.bytes_sent;
        self.bytes_received += s.bytes_received;
    }

    pub fn merge(&mut self, other: &ClassStats) {
        self.count += other.count;
        for (k, v) in &other.statuses {
            *self.statuses.entry(k.clone()).or_default() += v;
        }
        self.first_byte
            .add(&other.first_byte)
            .expect("auto-resizing histograms add");
        self.total
            .add(&other.total)
            .expect("auto-resizing histograms add");
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
    }

    pub fn latency(&self, phase: Phase) -> &Histogram<u64> {
        match phase {
            Phase::FirstByte => &self.first_byte,
            Phase::Total => &self.total,
        }
    }

    /// Requests that got no response (failure kinds, not status codes).
    pub fn no_response(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(k, _)| !k.bytes().all(|b| b.is_ascii_digit()))
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests answered 5xx or not at all.
    pub fn errors(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(k, _)| super::verdict::is_error(k))
            .map(|(_, n)| n)
            .sum()
    }
}

/// Throughput and latency over time, in buckets that widen to stay at most [`MAX_BUCKETS`].
#[derive(Debug, Clone)]
pub struct Timeline {
    /// ns per bucket.
    pub width: u64,
    pub buckets: Vec<Bucket>,
}

#[derive(Debug, Clone)]
pub struct Bucket {
    pub count: u64,
    pub errors: u64,
    /// Total latency, µs, 2 significant digits (enough for a plot).
    pub latency: Histogram<u64>,
}

pub const MAX_BUCKETS: usize = 600;

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            width: 1_000_000_000,
            buckets: Vec::new(),
        }
    }
}

impl Timeline {
    fn add(&mut self, offset: u64, s: &Sample) {
        let mut i = (offset / self.width) as usize;
        while i >= MAX_BUCKETS {
            self.widen();
            i = (offset / self.width) as usize;
        }
        while self.buckets.len() <= i {
            self.buckets.push(Bucket {
                count: 0,
                errors: 0,
                latency: Histogram::new(2).expect("a valid precision"),
            });
        }
        let b = &mut self.buckets[i];
        b.count += 1;
        b.errors += u64::from(s.status.is_error());
        b.latency
            .record(s.total_us)
            .expect("auto-resizing histograms take any u64");
    }

    fn widen(&mut self) {
        let old = std::mem::take(&mut self.buckets);
        for pair in old.chunks(2) {
            let mut b = pair[0].clone();
            if let Some(second) = pair.get(1) {
                b.count += second.count;
                b.errors += second.errors;
                b.latency
                    .add(&second.latency)
                    .expect("auto-resizing histograms add");
            }
            self.buckets.push(b);
        }
        self.width *= 2;
    }
}

/// A request whose live status differed from the recorded one, to show why.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    pub exchange: u64,
    pub target: String,
    pub recorded: Option<u16>,
    pub live: String,
    /// The start of the live body, as text (lossy).
    pub body: String,
}

/// At most this many examples per class.
const EXAMPLES_PER_CLASS: usize = 5;

/// How a results tape's replay went (none for a capture).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Accounting {
    pub late: u64,
    pub rewritten: u64,
    pub synthesised: u64,
    pub unmapped: u64,
    pub skipped: u64,
    /// loadtape's own dispatch lag p99, µs.
    pub dispatch_lag_p99_us: u64,
    /// The limit the run was held to, µs (from its provenance).
    pub lag_limit_us: Option<u64>,
}

/// One side of a report or a comparison.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The files read.
    pub label: String,
    pub kind: Kind,
    pub classes: BTreeMap<String, ClassStats>,
    pub all: ClassStats,
    pub timeline: Timeline,
    /// The span of the requests counted, ns (intended instants on a replay).
    pub first: Option<u64>,
    pub last: u64,
    pub accounting: Option<Accounting>,
    pub provenance: Vec<(String, String)>,
    pub examples: BTreeMap<String, Vec<Example>>,
    /// Requests read but left out by `--warmup`, `--from`, `--to`.
    pub outside_window: u64,
}

impl Dataset {
    pub(super) fn new(label: String, kind: Kind) -> Dataset {
        Dataset {
            label,
            kind,
            classes: BTreeMap::new(),
            all: ClassStats::default(),
            timeline: Timeline::default(),
            first: None,
            last: 0,
            accounting: None,
            provenance: Vec::new(),
            examples: BTreeMap::new(),
            outside_window: 0,
        }
    }

    fn add(&mut self, class: &str, at: u64, origin: u64, s: &Sample) {
        match self.classes.get_mut(class) {
            Some(c) => c.add(s),
            None => {
                let mut c = ClassStats::default();
                c.add(s);
                self.classes.insert(class.to_string(), c);
            }
        }
        self.all.add(s);
        self.first = Some(self.first.map_or(at, |f| f.min(at)));
        self.last = self.last.max(at);
        self.timeline.add(at.saturating_sub(origin), s);
    }

    /// Seconds between the first and the last request counted.
    pub fn span_s(&self) -> f64 {
        self.first
            .map_or(0.0, |f| self.last.saturating_sub(f) as f64 / 1e9)
    }

    /// Why a replay's figures cannot be trusted, if they cannot: loadtape's own lag passed the
    /// run's limit.
    pub fn invalid(&self) -> Option<String> {
        let a = self.accounting.as_ref()?;
        let limit = a.lag_limit_us?;
        (a.dispatch_lag_p99_us > limit).then(|| {
            format!(
                "{}: loadtape could not keep the schedule (its own lag p99 {} > the run's limit {}): the figures measure loadtape, not the target",
                self.label,
                super::micros(a.dispatch_lag_p99_us),
                super::micros(limit)
            )
        })
    }
}

/// A response's status, or why there was none.
#[derive(Clone, Copy)]
enum Status {
    Code(u16),
    Failed(&'static str),
}

impl Status {
    fn text<'b>(&self, buf: &'b mut [u8; 8]) -> &'b str {
        match *self {
            Status::Code(c) => {
                use std::io::Write as _;
                let mut cursor = std::io::Cursor::new(&mut buf[..]);
                let _ = write!(cursor, "{c}");
                let len = cursor.position() as usize;
                std::str::from_utf8(&buf[..len]).expect("digits are UTF-8")
            }
            Status::Failed(kind) => kind,
        }
    }

    fn is_error(&self) -> bool {
        match *self {
            Status::Code(c) => c >= 500,
            Status::Failed(_) => true,
        }
    }

    fn into_string(self) -> String {
        match self {
            Status::Code(c) => c.to_string(),
            Status::Failed(k) => k.to_string(),
        }
    }
}

/// A request as a dataset counts it.
struct Sample {
    status: Status,
    first_byte_us: Option<u64>,
    total_us: u64,
    bytes_sent: u64,
    bytes_received: u64,
}

/// Which requests count: offsets from the first request read (ns).
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    pub warmup: u64,
    pub from: u64,
    pub to: Option<u64>,
}

impl Window {
    fn admits(&self, offset: u64) -> bool {
        offset >= self.warmup.max(self.from) && self.to.map_or(true, |t| offset < t)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Tape(#[from] TapeError),
    #[error("{0}: no requests in it, or none in the window asked for: check the path, or widen --warmup/--from/--to")]
    Empty(String),
    #[error("the inputs mix capture and results tapes ({0}): give one kind per side")]
    Mixed(String),
}

/// Builds the two datasets of a replay's results one record at a time: the live answers and
/// the recording's baseline beside them. `load` reads results tapes through it; the replay's
/// results thread feeds it live, for the closing comparison.
pub struct ResultsBuilder {
    pub replay: Dataset,
    pub baseline: Dataset,
    window: Window,
    origin: Option<u64>,
    accounting: Accounting,
    dispatch_lag: Histogram<u64>,
    send_lag: Histogram<u64>,
}

impl ResultsBuilder {
    pub fn new(label: String, window: Window, provenance: Vec<(String, String)>) -> ResultsBuilder {
        let mut replay = Dataset::new(label.clone(), Kind::Replay);
        let mut baseline = Dataset::new(label, Kind::RecordedBaseline);
        replay.provenance = provenance.clone();
        baseline.provenance = provenance;
        ResultsBuilder {
            replay,
            baseline,
            window,
            origin: None,
            accounting: Accounting::default(),
            dispatch_lag: histogram(),
            send_lag: histogram(),
        }
    }

    pub fn add(&mut self, r: &Replayed) {
        let at = r.intended;
        let origin = *self.origin.get_or_insert(at);
        if r.outcome == Outcome::Skipped {
            self.accounting.skipped += 1;
            return;
        }
        if !self.window.admits(at.saturating_sub(origin)) {
            self.replay.outside_window += 1;
            return;
        }
        let a = &mut self.accounting;
        let flag = |f: u32| u64::from(r.flags & f != 0);
        a.late += flag(replayed_flags::LATE);
        a.rewritten += flag(replayed_flags::REWRITTEN);
        a.synthesised += flag(replayed_flags::SYNTHESISED);
        a.unmapped += flag(replayed_flags::UNMAPPED);
        self.dispatch_lag
            .record(r.dispatched / 1000)
            .expect("auto-resizing histograms take any u64");
        self.send_lag
            .record(r.sent / 1000)
            .expect("auto-resizing histograms take any u64");
        self.replay.add(&r.endpoint, at, origin, &replayed(r));
        self.baseline.add(&r.endpoint, at, origin, &recorded(r));
        note_example(&mut self.replay.examples, r);
    }

    /// The replay's dataset and its recording's.
    pub fn finish(self) -> (Dataset, Dataset) {
        let s = self.finish_summary();
        (s.replayed, s.recorded)
    }

    /// Everything: both datasets and loadtape's own lags.
    pub fn finish_summary(mut self) -> super::Summary {
        self.accounting.dispatch_lag_p99_us = self.dispatch_lag.value_at_quantile(0.99);
        self.accounting.lag_limit_us = self
            .replay
            .provenance
            .iter()
            .find(|(k, _)| k == "lag_limit_us")
            .and_then(|(_, v)| v.parse().ok());
        self.replay.accounting = Some(self.accounting);
        super::Summary {
            replayed: self.replay,
            recorded: self.baseline,
            dispatch_lag: self.dispatch_lag,
            send_lag: self.send_lag,
        }
    }
}

/// Reads `inputs` (files or directories, one kind): a capture tape gives one dataset, a results
/// tape two, the replay's and its recorded baseline's.
pub fn load(
    inputs: &[PathBuf],
    window: Window,
    read: &ReadOptions,
    classes: &crate::endpoint::Classifier,
) -> Result<(Dataset, Option<Dataset>), LoadError> {
    let files = discover(inputs)?;
    let label = inputs
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let results = files
        .first()
        .is_some_and(|f| f.header.kind == TapeKind::Results);
    if files
        .iter()
        .any(|f| (f.header.kind == TapeKind::Results) != results)
    {
        return Err(LoadError::Mixed(label));
    }
    let provenance = files
        .first()
        .map(|f| f.header.options.clone())
        .unwrap_or_default();
    let reader = TapeReader::from_sources(files, read);
    if results {
        let mut b = ResultsBuilder::new(label.clone(), window, provenance);
        for record in reader {
            if let Record::Replayed(r) = record? {
                b.add(&r);
            }
        }
        let (replay, baseline) = b.finish();
        if replay.all.count == 0 {
            return Err(LoadError::Empty(label));
        }
        return Ok((replay, Some(baseline)));
    }
    let mut capture = Dataset::new(label.clone(), Kind::Capture);
    capture.provenance = provenance;
    let mut origin = None;
    for record in reader {
        if let Record::Exchange(e) = record? {
            let at = e.timing.start;
            let origin = *origin.get_or_insert(at);
            if !window.admits(at.saturating_sub(origin)) {
                capture.outside_window += 1;
                continue;
            }
            let class = classes.classify(e.request.method.as_str(), &e.request.target);
            capture.add(&class, at, origin, &captured(&e));
        }
    }
    if capture.all.count == 0 {
        return Err(LoadError::Empty(label));
    }
    Ok((capture, None))
}

fn captured(e: &Exchange) -> Sample {
    let (status, received) = match &e.response {
        Ok(r) => (Status::Code(r.status), r.body.len),
        Err(f) => (Status::Failed(f.kind.as_str()), 0),
    };
    Sample {
        status,
        first_byte_us: e.timing.response_head.map(|n| n / 1000),
        total_us: e.timing.response_done / 1000,
        bytes_sent: e.request.body.len,
        bytes_received: received,
    }
}

fn replayed(r: &Replayed) -> Sample {
    let status = match &r.outcome {
        Outcome::Status(s) => Status::Code(*s),
        Outcome::Failed(f) => Status::Failed(f.kind.as_str()),
        Outcome::Skipped => Status::Failed("skipped"),
    };
    Sample {
        status,
        first_byte_us: r.first_byte.map(|n| n / 1000),
        total_us: r.latency() / 1000,
        bytes_sent: r.bytes_sent,
        bytes_received: r.bytes_received,
    }
}

fn recorded(r: &Replayed) -> Sample {
    Sample {
        status: match r.recorded.status {
            Some(s) => Status::Code(s),
            None => Status::Failed("upstream_failed"),
        },
        first_byte_us: r.recorded.first_byte.map(|n| n / 1000),
        total_us: r.recorded.total / 1000,
        bytes_sent: 0,
        bytes_received: 0,
    }
}

fn note_example(examples: &mut BTreeMap<String, Vec<Example>>, r: &Replayed) {
    let Some(d) = &r.divergence else {
        return;
    };
    let list = match examples.get_mut(&r.endpoint) {
        Some(l) => l,
        None => examples.entry(r.endpoint.clone()).or_default(),
    };
    if list.len() >= EXAMPLES_PER_CLASS {
        return;
    }
    list.push(Example {
        exchange: r.exchange,
        target: d.target.clone(),
        recorded: r.recorded.status,
        live: replayed(r).status.into_string(),
        body: String::from_utf8_lossy(&d.body).into_owned(),
    });
}
