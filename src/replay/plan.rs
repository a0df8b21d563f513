//! The plan: what to send, on which connection, at which instant.
//!
//! A [`Plan`] streams records from the tapes and turns them into [`Step`]s in the order of their
//! intended instants, which the clock (`clock.rs`) then keeps. It runs on a thread of its own, a
//! bounded channel ahead of the clock, so requests are built off the timing path and memory stays
//! bounded whatever the tape's size. `--dry-run` drains the same plan into a [`PlanSummary`]
//! without sending anything: what it prints is what a run would do.
//!
//! Everything that decides *which* requests go and *when* lives here, deterministically: the
//! schedule (`--speed`, `--rate`, `--ramp`), the window and limits, `--loop` passes, filters, and
//! `--shard K/N`, which keeps whole recorded connections and computes the instants over the whole
//! tape, so that N shards started at one `--start-at` reproduce the unsharded run's timing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use super::auth::{sign_jwt, AuthUse, Credential, Fallback, Tokens};
use super::request::{prepare, BodySource, Prepared, RequestTemplate};
use super::state::{
    for_each_token, is_upload, is_upload_session, json_values, location_path, query_value, Digests,
    Etags, Issued, LiveTarget, Locations, Recent, Unmappable,
};
use crate::tape::reader::SourceFile;
use crate::tape::replayed_flags;
use crate::tape::{
    Exchange, HttpVersion, Method, Nanos, ReadOptions, Record, RecordedOutcome, SecretKind,
    TapeError, TapeReader,
};
use sha2::{Digest as _, Sha256};

/// When requests go out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// The recorded inter-arrival times divided by this factor.
    Speed(f64),
    /// A constant rate (requests per second), in the tape's order.
    Rate(f64),
    /// A rate rising linearly from `from` to `to` over `over`, then holding `to`.
    Ramp { from: f64, to: f64, over: Duration },
}

impl Schedule {
    /// The intended instant, ns from the schedule's zero, of the `i`-th request (from 0), which
    /// the tape has `recorded` ns after the pass's first record.
    pub fn at(&self, i: u64, recorded: Nanos) -> Nanos {
        match *self {
            Schedule::Speed(x) => (recorded as f64 / x) as Nanos,
            Schedule::Rate(r) => (i as f64 * 1e9 / r) as Nanos,
            Schedule::Ramp { from, to, over } => {
                let d = over.as_secs_f64();
                let n = i as f64;
                // Requests sent by time t during the ramp: from*t + (to-from)*t^2/(2d).
                let ramp_total = (from + to) / 2.0 * d;
                let t = if n >= ramp_total {
                    d + (n - ramp_total) / to
                } else if (to - from).abs() < f64::EPSILON {
                    n / from
                } else {
                    let k = (to - from) / (2.0 * d);
                    (-from + (from * from + 4.0 * k * n).sqrt()) / (2.0 * k)
                };
                (t * 1e9) as Nanos
            }
        }
    }

    /// Whether connections open and close at their recorded instants (only when the recorded
    /// timing is kept); otherwise a connection opens with its first request.
    fn keeps_recorded_time(&self) -> bool {
        matches!(self, Schedule::Speed(_))
    }
}

/// `--shard K/N`: the connections whose hash falls in bucket K of N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Shard, String> {
        let bad = || {
            format!("{s:?} is not a shard: write K/N with 0 <= K < N, e.g. `0/4` (K is the Kubernetes Indexed Job's JOB_COMPLETION_INDEX)")
        };
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let index: u64 = k.trim().parse().map_err(|_| bad())?;
        let count: u64 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// Whether this shard replays the recorded connection `connection` of tape `tape_id`. The
    /// hash is fixed (not Rust's randomised one): every replayer must agree.
    pub fn owns(&self, tape_id: &[u8; 16], connection: u64) -> bool {
        connection_hash(tape_id, connection) % self.count == self.index
    }
}

/// A fixed hash of a recorded connection (not Rust's randomised one: every replayer must agree).
pub fn connection_hash(tape_id: &[u8; 16], connection: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in tape_id.iter().chain(connection.to_le_bytes().iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // A final mix, so that consecutive connection ids spread over the buckets.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// Whether `--fraction` keeps a recorded connection: whole connections, so flows stay intact,
/// chosen independently of the shards.
fn sampled(tape_id: &[u8; 16], connection: u64, fraction: f64) -> bool {
    let h = connection_hash(tape_id, connection).rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    let h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

/// Which recorded requests are replayed at all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only paths matching one of these (all when empty).
    pub include: Vec<regex::Regex>,
    /// Never paths matching one of these.
    pub exclude: Vec<regex::Regex>,
    /// Only these methods (all when empty), upper case.
    pub methods: Vec<String>,
    /// Only this fraction of the recorded connections (whole connections, chosen by a fixed
    /// hash).
    pub fraction: Option<f64>,
}

impl Filter {
    fn admits(&self, e: &Exchange) -> bool {
        let path = e.request.path();
        (self.include.is_empty() || self.include.iter().any(|r| r.is_match(path)))
            && !self.exclude.iter().any(|r| r.is_match(path))
            && (self.methods.is_empty()
                || self
                    .methods
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(e.request.method.as_str())))
    }
}

/// `--connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConnectionMode {
    /// One live connection per recorded one, opened and closed where the tape says.
    #[default]
    Preserve,
    /// Requests spread over a pool of connections.
    Pooled,
}

/// What decides the plan, besides the tapes.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub schedule: Schedule,
    pub read: ReadOptions,
    /// Stop planning requests intended after this long.
    pub duration: Option<Duration>,
    /// Stop after this many requests (counted over all shards, so shards split one run).
    pub limit: Option<u64>,
    /// Start over at the end of the tape (needs `duration` or `limit` to end, or Ctrl-C).
    pub looped: bool,
    pub shard: Option<Shard>,
    pub filter: Filter,
    pub connections: ConnectionMode,
}

/// A recorded connection, in one `--loop` pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub pass: u32,
    pub source: u32,
    pub id: u64,
}

/// One thing the clock does at an instant.
pub enum Step {
    /// Open the live connection standing for a recorded one.
    Open {
        conn: ConnKey,
        at: Nanos,
        version: HttpVersion,
    },
    /// Send a request.
    Send(Box<Planned>),
    /// Close it once its requests are done.
    Close { conn: ConnKey, at: Nanos },
}

impl Step {
    pub fn at(&self) -> Nanos {
        match self {
            Step::Open { at, .. } | Step::Close { at, .. } => *at,
            Step::Send(p) => p.at,
        }
    }
}

/// A request ready to go, with what its result record needs.
pub struct Planned {
    pub conn: ConnKey,
    /// Intended instant, ns from the schedule's zero.
    pub at: Nanos,
    pub exchange: u64,
    /// The recorded connection's protocol.
    pub version: HttpVersion,
    pub method: Method,
    pub endpoint: String,
    pub request: Prepared,
    pub recorded: RecordedOutcome,
    /// `replayed_flags` known before sending (rewritten, synthesised).
    pub flags: u32,
    /// Earlier exchanges this one must wait for: a write to the same resource in flight, the
    /// exchange whose answer gives the live location this request goes to.
    pub after: Vec<Arc<Done>>,
    /// Set when this exchange completes, if something may wait for it.
    pub done: Option<Arc<Done>>,
    /// The target starts with a location a live answer replaces (stateful replay).
    pub live_target: Option<LiveTarget>,
    /// This exchange's answer gives a location later requests use.
    pub issues: Option<Arc<Issued>>,
    /// The live token (registry token flow) this request carries, once its token request is
    /// answered.
    pub auth_token: Option<Arc<Issued>>,
    /// This exchange is a token request whose answer's token later requests carry.
    pub issues_token: Option<Arc<Issued>>,
    /// Conditional headers whose recorded ETag a live answer replaces.
    pub live_headers: Vec<(http::header::HeaderName, Arc<Issued>)>,
    /// This exchange's answer gives an ETag later requests use.
    pub issues_etag: Option<Arc<Issued>>,
    /// Where its credential comes from, and the recorded one's kind and fingerprint.
    pub auth_use: AuthUse,
    pub recorded_credential: Option<(SecretKind, u64)>,
    /// A token to fetch after an unexpected 401 (registry token flow).
    pub fallback: Option<Arc<Fallback>>,
    /// Recorded values of the profile's JSON fields this request carries, and the answers
    /// that give the live ones.
    pub live_values: Vec<(String, Arc<Issued>)>,
    /// This exchange's answer gives values of the profile's JSON fields (JSON pointer, slot).
    pub issues_json: Vec<(String, Arc<Issued>)>,
}

/// Completion of an exchange others may depend on: a flag and a wake-up.
#[derive(Default)]
pub struct Done {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Done {
    pub fn set(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

/// What the plan left out, and why.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlanCounters {
    /// Exchanges read from the tapes (all passes).
    pub exchanges_read: u64,
    /// Requests planned (this shard's).
    pub planned: u64,
    /// Left to other shards.
    pub other_shards: u64,
    /// Left out by the profile's or flags' filters.
    pub filtered: u64,
    /// Connection upgrades (WebSocket): their traffic after the switch is not on the tape.
    pub upgrades: u64,
    /// Requests that cannot be sent as recorded (a method or target that does not parse).
    pub unmappable: u64,
    /// Requests whose recorded credential was redacted and that go without it.
    pub credentials_dropped: u64,
    pub passes: u32,
}

/// Reopens the tapes for a `--loop` pass.
pub struct Sources {
    pub files: Vec<SourceFile>,
    pub read: ReadOptions,
}

impl Sources {
    fn open(&self) -> TapeReader {
        TapeReader::from_sources(self.files.clone(), &self.read)
    }
}

/// Stored bodies (`--bodies full` tapes), kept under a byte budget for the requests that use
/// them; older ones are forgotten first (their requests then get synthetic bodies).
pub struct Blobs {
    map: HashMap<[u8; 32], Bytes>,
    order: VecDeque<[u8; 32]>,
    bytes: usize,
    budget: usize,
}

impl Blobs {
    pub fn new(budget: usize) -> Blobs {
        Blobs {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    fn insert(&mut self, sha: [u8; 32], data: Vec<u8>) {
        if data.len() > self.budget || self.map.contains_key(&sha) {
            return;
        }
        self.bytes += data.len();
        self.map.insert(sha, Bytes::from(data));
        self.order.push_back(sha);
        while self.bytes > self.budget {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.map.remove(&old) {
                self.bytes -= b.len();
            }
        }
    }

    pub fn get(&self, sha: &[u8; 32]) -> Option<Bytes> {
        self.map.get(sha).cloned()
    }
}

/// The plan. See the module docs.
pub struct Plan {
    options: PlanOptions,
    sources: Sources,
    template: RequestTemplate,
    reader: TapeReader,
    source_ids: Vec<[u8; 16]>,
    blobs: Blobs,
    pass: u32,
    /// Added to this pass's instants: where the previous pass ended.
    pass_offset: Nanos,
    /// The recorded instant of this pass's first record.
    pass_origin: Option<Nanos>,
    /// The gap between passes: the tape's mean inter-arrival time.
    last_at: Nanos,
    /// Requests counted by the schedule (all shards).
    index: u64,
    /// Writes in flight per path: a later write to the same resource waits for the earlier.
    writes: HashMap<String, (Arc<Done>, Nanos)>,
    inserted_since_sweep: usize,
    /// Recorded digests mapped to those of the bytes sent (stateful replay).
    digests: Digests,
    /// Recorded upload locations and the exchanges whose live answers replace them.
    locations: Locations,
    /// Live registry tokens by the fingerprint of the recorded token they replace.
    tokens: Tokens,
    /// Recorded ETags and the exchanges whose live answers replace them.
    etags: Etags,
    /// Tokens fetched after a 401, by the fingerprint of the recorded token they replace.
    fallbacks: HashMap<u64, Arc<Fallback>>,
    /// Recorded values of the profile's JSON fields and the exchanges whose live answers
    /// replace them.
    values: Recent,
    pub counters: PlanCounters,
    finished: bool,
}

impl Plan {
    pub fn new(
        options: PlanOptions,
        sources: Sources,
        template: RequestTemplate,
    ) -> Result<Plan, TapeError> {
        let reader = sources.open();
        let source_ids = reader.source_ids();
        Ok(Plan {
            options,
            sources,
            template,
            reader,
            source_ids,
            blobs: Blobs::new(256 << 20),
            pass: 0,
            pass_offset: 0,
            pass_origin: None,
            last_at: 0,
            index: 0,
            writes: HashMap::new(),
            inserted_since_sweep: 0,
            digests: Digests::default(),
            locations: Locations::default(),
            tokens: Tokens::default(),
            etags: Etags::default(),
            fallbacks: HashMap::new(),
            values: Recent::default(),
            counters: PlanCounters {
                passes: 1,
                ..PlanCounters::default()
            },
            finished: false,
        })
    }

    /// The tape ids of the recordings replayed, as results records count them.
    pub fn source_ids(&self) -> &[[u8; 16]] {
        &self.source_ids
    }

    fn owns(&self, source: usize, connection: u64) -> bool {
        match &self.options.shard {
            Some(s) => s.owns(&self.source_ids[source], connection),
            None => true,
        }
    }

    fn sampled(&self, source: usize, connection: u64) -> bool {
        match self.options.filter.fraction {
            Some(f) => sampled(&self.source_ids[source], connection, f),
            None => true,
        }
    }

    /// The instant of a record at `recorded` (or of the next request under a rate).
    fn instant(&mut self, recorded: Nanos) -> Nanos {
        let origin = *self.pass_origin.get_or_insert(recorded);
        match self.options.schedule {
            Schedule::Speed(_) => {
                self.pass_offset
                    + self
                        .options
                        .schedule
                        .at(self.index, recorded.saturating_sub(origin))
            }
            // A rate counts requests across passes already.
            _ => self.options.schedule.at(self.index, 0),
        }
    }

    fn out_of_time(&self, at: Nanos) -> bool {
        self.options
            .duration
            .is_some_and(|d| at > d.as_nanos() as Nanos)
    }

    fn out_of_requests(&self) -> bool {
        self.options.limit.is_some_and(|l| self.index >= l)
    }

    /// The next step, `None` at the end of the plan.
    pub fn next_step(&mut self) -> Result<Option<Step>, TapeError> {
        loop {
            if self.finished || self.out_of_requests() {
                return Ok(None);
            }
            let record = match self.reader.next() {
                Some(r) => r?,
                None => {
                    if !self.options.looped || self.index == 0 {
                        self.finished = true;
                        return Ok(None);
                    }
                    // The next pass starts one mean gap after this one's last request.
                    let span = self.last_at.saturating_sub(self.pass_offset);
                    let gap = span / self.index.max(1);
                    self.pass_offset = self.last_at + gap.max(1_000_000);
                    self.pass_origin = None;
                    self.pass += 1;
                    self.counters.passes += 1;
                    self.reader = self.sources.open();
                    continue;
                }
            };
            // The pass's zero is its first record, whichever shard or filter keeps it: every
            // shard must compute the same instants.
            if self.pass_origin.is_none() && !matches!(record, Record::Unknown { .. }) {
                self.pass_origin = Some(record.start());
            }
            let source = self.reader.last_source();
            let preserve = self.options.connections == ConnectionMode::Preserve;
            match record {
                Record::Blob(b) => self.blobs.insert(b.sha256, b.data),
                Record::ConnectionOpened(c) => {
                    if !preserve
                        || !self.options.schedule.keeps_recorded_time()
                        || !self.owns(source, c.id)
                        || !self.sampled(source, c.id)
                    {
                        continue;
                    }
                    let at = self.instant(c.at);
                    if self.out_of_time(at) {
                        continue;
                    }
                    return Ok(Some(Step::Open {
                        conn: self.key(source, c.id),
                        at,
                        version: c.version,
                    }));
                }
                Record::ConnectionClosed(c) => {
                    if !preserve || !self.owns(source, c.id) {
                        continue;
                    }
                    let at = if self.options.schedule.keeps_recorded_time() {
                        self.instant(c.at)
                    } else {
                        self.last_at
                    };
                    return Ok(Some(Step::Close {
                        conn: self.key(source, c.id),
                        at,
                    }));
                }
                Record::Exchange(e) => {
                    self.counters.exchanges_read += 1;
                    if e.upgraded {
                        self.counters.upgrades += 1;
                        continue;
                    }
                    if !self.options.filter.admits(&e) || !self.sampled(source, e.connection) {
                        self.counters.filtered += 1;
                        continue;
                    }
                    let at = self.instant(e.timing.start);
                    if self.out_of_time(at) {
                        // Instants only grow: nothing later fits either.
                        self.finished = true;
                        return Ok(None);
                    }
                    // Counted by the schedule whichever shard sends it.
                    self.index += 1;
                    self.last_at = self.last_at.max(at);
                    if !self.owns(source, e.connection) {
                        self.counters.other_shards += 1;
                        continue;
                    }
                    match self.plan_exchange(source, &e, at) {
                        Some(p) => {
                            self.counters.planned += 1;
                            return Ok(Some(Step::Send(Box::new(p))));
                        }
                        None => self.counters.unmappable += 1,
                    }
                }
                _ => {}
            }
        }
    }

    fn key(&self, source: usize, id: u64) -> ConnKey {
        ConnKey {
            pass: self.pass,
            source: source as u32,
            id,
        }
    }
}

mod exchange;
mod summary;

pub use summary::PlanSummary;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ramp_reaches_its_rate_and_holds_it() {
        let s = Schedule::Ramp {
            from: 0.0,
            to: 100.0,
            over: Duration::from_secs(10),
        };
        // 500 requests go out during the ramp, the 500th at 10 s; then one every 10 ms.
        assert_eq!(s.at(0, 0), 0);
        assert!((s.at(500, 0) as f64 / 1e9 - 10.0).abs() < 1e-6);
        assert!((s.at(600, 0) as f64 / 1e9 - 11.0).abs() < 1e-6);
        // Halfway through the ramp (5 s), 125 have gone.
        assert!((s.at(125, 0) as f64 / 1e9 - 5.0).abs() < 1e-6);
        let flat = Schedule::Ramp {
            from: 50.0,
            to: 50.0,
            over: Duration::from_secs(2),
        };
        assert_eq!(flat.at(50, 0), 1_000_000_000);
    }

    #[test]
    fn speed_divides_recorded_gaps_and_rate_ignores_them() {
        assert_eq!(Schedule::Speed(10.0).at(7, 5_000_000_000), 500_000_000);
        assert_eq!(Schedule::Rate(4.0).at(2, 123), 500_000_000);
    }

    #[test]
    fn shards_partition_connections() {
        let id = [7u8; 16];
        let shards: Vec<Shard> = (0..4).map(|k| Shard { index: k, count: 4 }).collect();
        let mut sizes = [0; 4];
        for conn in 0..4000 {
            let owners: Vec<usize> = (0..4).filter(|&k| shards[k].owns(&id, conn)).collect();
            assert_eq!(owners.len(), 1, "connection {conn} owned by {owners:?}");
            sizes[owners[0]] += 1;
        }
        assert!(sizes.iter().all(|&n| n > 800), "uneven shards: {sizes:?}");
        assert!("4/4"
            .parse::<Shard>()
            .unwrap_err()
            .contains("JOB_COMPLETION_INDEX"));
        assert_eq!("1/3".parse::<Shard>(), Ok(Shard { index: 1, count: 3 }));
    }
}
