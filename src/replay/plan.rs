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

    fn plan_exchange(&mut self, source: usize, e: &Exchange, at: Nanos) -> Option<Planned> {
        let (mut request, mut flags, dropped) = prepare(e, &self.template, &self.blobs)?;
        let (after, mut done) = self.causality(e);
        let mut after: Vec<Arc<Done>> = after.into_iter().collect();

        // Credentials: fresh ones where the profile gives them.
        let (auth_use, auth_token, issues_token, fallback) =
            self.credentials(e, &mut request, &mut after, &mut done);
        let recorded_credential = request
            .authorization
            .take()
            .map(|r| (r.kind, r.fingerprint));
        if !matches!(auth_use, AuthUse::None | AuthUse::Dropped) {
            flags |= replayed_flags::REWRITTEN;
            request.dropped_credentials.clear();
        } else if dropped {
            self.counters.credentials_dropped += 1;
        }

        // Digests: an upload's bytes are hashed as they will be sent, and every digest the
        // replay changed is followed, in JSON bodies (a manifest's own digest then changes
        // too) and in the target.
        let path = e.request.path();
        if is_upload(path) {
            let completion = done.clone().map(|d| (d, e.timing.end()));
            self.digests
                .upload(path, &e.request.target, &request.body, completion);
        }
        // A request naming a digest uploaded earlier on the tape waits for that upload.
        after.extend(self.digests.depends(&e.request.target, e.timing.start));
        if let Some(text) = e
            .request
            .body
            .whole_inline()
            .filter(|_| !is_upload(path))
            .and_then(|b| std::str::from_utf8(b).ok())
        {
            after.extend(self.digests.depends(text, e.timing.start));
        }
        // A write creates or changes the resource its target or its answer's `Location` names
        // by digest (a manifest, a Clair index report): later requests naming it wait for it.
        if let (Some(d), false) = (&done, is_upload(path)) {
            self.digests.wrote(&e.request.target, d, e.timing.end());
            if let Some(location) = e
                .response
                .as_ref()
                .ok()
                .and_then(|r| r.headers.get_str("location"))
            {
                self.digests.wrote(location, d, e.timing.end());
            }
        }
        if let (BodySource::Bytes(bytes), false) = (&request.body, is_upload(path)) {
            // (A blob's bytes are opaque: only manifests and JSON requests are rewritten, by
            // the profile's literals, then by the digests the replay changed.)
            let rewritten = std::str::from_utf8(bytes).ok().and_then(|text| {
                let literal = self.template.rewrites.text(text);
                let base = literal.as_deref().unwrap_or(text);
                self.digests.rewrite(base).or(literal)
            });
            if let Some(text) = rewritten {
                let new = Bytes::from(text);
                if let Some(recorded) = e.request.body.sha256 {
                    self.digests.insert(recorded, Sha256::digest(&new).into());
                }
                request
                    .headers
                    .insert(http::header::CONTENT_LENGTH, new.len().into());
                request.body = BodySource::Bytes(new);
                flags |= replayed_flags::REWRITTEN;
            }
        }
        if let Some(target) = self.digests.rewrite(request.path.as_str()) {
            request.path = http::uri::PathAndQuery::try_from(target).ok()?;
            flags |= replayed_flags::REWRITTEN;
        }

        // Locations: a request to one a recorded answer gave waits for the live answer.
        let live_target = self.locations.find(request.path.as_str());
        let unmappable = match &live_target {
            Some(t) => {
                after.push(t.issued.done.clone());
                flags |= replayed_flags::REWRITTEN;
                // The request that opened or moved the session could not be mapped either.
                t.issued.doomed()
            }
            // The session was opened before the tape began: no live answer will name it.
            None => is_upload_session(request.path.path()),
        };
        if unmappable {
            if self.template.state.unmappable == Unmappable::Skip {
                // Not sent: whatever waits for it must not wait for ever.
                if let Some(d) = &done {
                    d.set();
                }
                if let Some(t) = &issues_token {
                    t.done.set();
                }
                return None;
            }
            flags |= replayed_flags::UNMAPPED;
        }
        // Values of the profile's JSON fields that earlier answers gave.
        let live_values = self.live_values(&request, e.timing.start);
        for (_, issued) in &live_values {
            after.push(issued.done.clone());
            flags |= replayed_flags::REWRITTEN;
        }
        // ETags: conditional requests carry the live one of the answer that gave the recorded.
        let mut live_headers = Vec::new();
        for name in [http::header::IF_NONE_MATCH, http::header::IF_MATCH] {
            if let Some(issued) = e
                .request
                .headers
                .get_str(name.as_str())
                .and_then(|v| self.etags.get(v))
            {
                after.push(issued.done.clone());
                live_headers.push((name, issued));
                flags |= replayed_flags::REWRITTEN;
            }
        }
        let issues_etag = match &e.response {
            Ok(r) => r.headers.get_str("etag").map(|etag| {
                let done = done
                    .get_or_insert_with(|| Arc::new(Done::default()))
                    .clone();
                let issued = Arc::new(Issued::new(done));
                self.etags.insert(etag.trim().to_string(), issued.clone());
                issued
            }),
            Err(_) => None,
        };
        let issues_json = self.issues_json(e, &mut done);
        let issues = match &e.response {
            Ok(r) if (200..300).contains(&r.status) => r
                .headers
                .get_str("location")
                .and_then(location_path)
                // Stored as the later requests that use it will look once rewritten.
                .map(|l| self.template.rewrites.target(&l).unwrap_or(l))
                .filter(|l| is_upload(l))
                .map(|location| {
                    let done = done
                        .get_or_insert_with(|| Arc::new(Done::default()))
                        .clone();
                    let issued = Arc::new(Issued::new(done));
                    if flags & replayed_flags::UNMAPPED != 0 {
                        issued.doom();
                    }
                    self.locations.insert(location, issued.clone());
                    issued
                }),
            _ => None,
        };
        Some(Planned {
            conn: self.key(source, e.connection),
            at,
            exchange: e.id,
            version: e.request.version,
            method: e.request.method.clone(),
            endpoint: self
                .template
                .classes
                .classify(e.request.method.as_str(), &e.request.target),
            request,
            recorded: RecordedOutcome {
                status: e.response.as_ref().ok().map(|r| r.status),
                first_byte: e.timing.response_head,
                total: e.timing.response_done,
            },
            flags,
            after,
            done,
            live_target,
            issues,
            auth_token,
            issues_token,
            live_headers,
            issues_etag,
            auth_use,
            recorded_credential,
            fallback,
            live_values,
            issues_json,
        })
    }

    /// The recorded values of the profile's JSON fields that `request` carries (target,
    /// header values, text body), with the exchanges whose live answers give theirs.
    fn live_values(&self, request: &Prepared, start: Nanos) -> Vec<(String, Arc<Issued>)> {
        let mut out: Vec<(String, Arc<Issued>)> = Vec::new();
        if self.values.is_empty() {
            return out;
        }
        let mut look = |text: &str| {
            for_each_token(text, |t| {
                // Only a value an answer gave before this request started on the tape.
                if let Some(issued) = self.values.get(t).filter(|i| i.recorded_end <= start) {
                    if !out.iter().any(|(v, _)| v == t) {
                        out.push((t.to_string(), issued));
                    }
                }
            })
        };
        look(request.path.as_str());
        for v in request.headers.values() {
            if let Ok(text) = v.to_str() {
                look(text);
            }
        }
        if let BodySource::Bytes(b) = &request.body {
            if let Ok(text) = std::str::from_utf8(b) {
                look(text);
            }
        }
        out
    }

    /// The values of the profile's JSON fields in the recorded answer: later requests that
    /// carry one take the live answer's instead.
    fn issues_json(
        &mut self,
        e: &Exchange,
        done: &mut Option<Arc<Done>>,
    ) -> Vec<(String, Arc<Issued>)> {
        let fields = &self.template.state.json_fields;
        let Ok(response) = &e.response else {
            return Vec::new();
        };
        let body = match response.body.whole_inline() {
            Some(b) if !fields.is_empty() && (200..300).contains(&response.status) => b,
            _ => return Vec::new(),
        };
        let found = json_values(body, fields);
        let mut out = Vec::with_capacity(found.len());
        for (value, pointer) in found {
            let done = done
                .get_or_insert_with(|| Arc::new(Done::default()))
                .clone();
            let issued = Arc::new(Issued::ending(done, e.timing.end()));
            self.values.insert(value, issued.clone());
            out.push((pointer, issued));
        }
        out
    }

    /// Where the request's credential comes from (see `auth.rs`): a rule's, a token request
    /// sent with a rule's account, the live token of a token request on the tape, or one
    /// fetched after the target's 401. Sets the header where it is known now.
    #[allow(clippy::type_complexity)]
    fn credentials(
        &mut self,
        e: &Exchange,
        request: &mut Prepared,
        after: &mut Vec<Arc<Done>>,
        done: &mut Option<Arc<Done>>,
    ) -> (
        AuthUse,
        Option<Arc<Issued>>,
        Option<Arc<Issued>>,
        Option<Arc<Fallback>>,
    ) {
        let path = e.request.path();
        if crate::redact::is_token_endpoint(path) {
            // The tokens it issues replace the recorded ones in later requests, whether the
            // request was anonymous (a public pull) or sent with an account.
            let mut issues_token = None;
            if !e.issued_secrets.is_empty() {
                let done = done
                    .get_or_insert_with(|| Arc::new(Done::default()))
                    .clone();
                let issued = Arc::new(Issued::new(done));
                for secret in &e.issued_secrets {
                    self.tokens.insert(secret.fingerprint, issued.clone());
                }
                issues_token = Some(issued);
            }
            let Some(redacted) = request.authorization.as_ref() else {
                return (AuthUse::None, None, issues_token, None);
            };
            let account = query_value(&e.request.target, "account");
            let rule =
                self.template
                    .auth
                    .rule_for(path, Some(redacted.fingerprint), account.as_deref());
            return match rule {
                Some((i, rule)) => match &rule.credential {
                    Credential::RegistryToken(account) => {
                        request
                            .headers
                            .insert(http::header::AUTHORIZATION, account.clone());
                        (AuthUse::TokenRequest(i), None, issues_token, None)
                    }
                    _ => (AuthUse::Dropped, None, issues_token, None),
                },
                None => (AuthUse::Dropped, None, issues_token, None),
            };
        }
        let Some(redacted) = request.authorization.as_ref() else {
            return (AuthUse::None, None, None, None);
        };
        let recorded = redacted.fingerprint;
        let bearer = matches!(redacted.kind, SecretKind::Bearer | SecretKind::BearerJwt);
        let auth = &self.template.auth;
        let fallback = if bearer {
            auth.token_account(path).map(|(i, account)| {
                if self.fallbacks.len() >= 16_384 {
                    self.fallbacks.clear();
                }
                let f = self
                    .fallbacks
                    .entry(recorded)
                    .or_insert_with(|| Arc::new(Fallback::new(account)))
                    .clone();
                (i, f)
            })
        } else {
            None
        };
        if let Some(issued) = self.tokens.get(recorded) {
            after.push(issued.done.clone());
            return (
                AuthUse::LiveToken,
                Some(issued),
                None,
                fallback.map(|(_, f)| f),
            );
        }
        match auth.rule_for(path, Some(recorded), None) {
            Some((i, rule)) => match &rule.credential {
                Credential::Basic(v) | Credential::Bearer(v) => {
                    request
                        .headers
                        .insert(http::header::AUTHORIZATION, v.clone());
                    (AuthUse::Rule(i), None, None, None)
                }
                Credential::Jwt { key, issuer } => {
                    request
                        .headers
                        .insert(http::header::AUTHORIZATION, sign_jwt(key, issuer));
                    (AuthUse::Rule(i), None, None, None)
                }
                Credential::RegistryToken(_) => match fallback {
                    Some((i, f)) => (AuthUse::Fetched(i), None, None, Some(f)),
                    None => (AuthUse::Dropped, None, None, None),
                },
            },
            None => (AuthUse::Dropped, None, None, None),
        }
    }

    /// A request waits for the latest write to the same path that ended on the tape before it
    /// started and is still in flight (a push's manifest, then its pull). Requests that
    /// overlapped it on the tape do not: the recorded client did not wait either.
    fn causality(&mut self, e: &Exchange) -> (Option<Arc<Done>>, Option<Arc<Done>>) {
        let path = e.request.path();
        let after = self
            .writes
            .get(path)
            .filter(|(d, end)| *end <= e.timing.start && !d.is_set())
            .map(|(d, _)| d.clone());
        if matches!(
            e.request.method,
            Method::Get | Method::Head | Method::Options | Method::Trace
        ) {
            return (after, None);
        }
        let done = Arc::new(Done::default());
        self.writes
            .insert(path.to_string(), (done.clone(), e.timing.end()));
        self.inserted_since_sweep += 1;
        if self.inserted_since_sweep >= 1024 {
            // Forget completed writes: the map holds only what is in flight.
            self.writes.retain(|_, (d, _)| !d.is_set());
            self.inserted_since_sweep = 0;
        }
        (after, Some(done))
    }
}

/// What a run would do: `--dry-run`'s output.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlanSummary {
    pub target: String,
    pub requests: u64,
    /// Requests per endpoint class.
    pub endpoints: BTreeMap<String, u64>,
    /// Requests that change state (not GET, HEAD, OPTIONS).
    pub writes: u64,
    /// Requests changed from the recording (`--header`).
    pub rewritten: u64,
    /// Requests whose body is generated (not stored on the tape).
    pub synthesised: u64,
    /// Requests that go to an upload location the live target will issue (stateful replay).
    pub live_locations: u64,
    /// Requests whose answer issues such a location.
    pub issuing: u64,
    /// Recorded digests replaced by those of the bytes the replay sends.
    pub digests_remapped: u64,
    /// Redacted credentials by kind: a replay sends these requests without them.
    pub auth: BTreeMap<String, u64>,
    /// Where requests' credentials come from (rules, token requests, live tokens, fetches),
    /// and which recorded ones get none.
    pub auth_sources: BTreeMap<String, u64>,
    /// Requests carrying values of the profile's JSON fields that live answers will give.
    pub json_mapped: u64,
    /// Requests known unmappable now (an upload session opened before the tape began, and
    /// the requests that continue it).
    pub unmapped: u64,
    /// Live connections opened for recorded ones (preserve mode).
    pub connections: u64,
    /// Seconds from the first to the last intended instant.
    pub duration_s: f64,
    /// The most requests intended within one second.
    pub peak_rate: u64,
    pub counters: PlanCounters,
}

impl Plan {
    /// Drains the plan without sending anything.
    pub fn summarise(mut self, target: String) -> Result<PlanSummary, TapeError> {
        let mut s = PlanSummary {
            target,
            ..PlanSummary::default()
        };
        let (mut second, mut in_second) = (u64::MAX, 0u64);
        let mut conns = std::collections::HashSet::new();
        let mut first = None;
        while let Some(step) = self.next_step()? {
            let Step::Send(p) = step else { continue };
            s.requests += 1;
            first.get_or_insert(p.at);
            s.duration_s = (p.at - first.unwrap_or(0)) as f64 / 1e9;
            *s.endpoints.entry(p.endpoint.clone()).or_default() += 1;
            if !matches!(p.method, Method::Get | Method::Head | Method::Options) {
                s.writes += 1;
            }
            use crate::tape::replayed_flags::{REWRITTEN, SYNTHESISED};
            s.rewritten += u64::from(p.flags & REWRITTEN != 0);
            s.synthesised += u64::from(p.flags & SYNTHESISED != 0);
            s.live_locations += u64::from(p.live_target.is_some());
            s.issuing += u64::from(p.issues.is_some());
            for kind in &p.request.dropped_credentials {
                *s.auth.entry(kind.clone()).or_default() += 1;
            }
            if let Some(source) = self.describe_auth(&p) {
                *s.auth_sources.entry(source).or_default() += 1;
            }
            s.json_mapped += u64::from(!p.live_values.is_empty());
            s.unmapped += u64::from(p.flags & crate::tape::replayed_flags::UNMAPPED != 0);
            if self.options.connections == ConnectionMode::Preserve {
                conns.insert(p.conn);
            }
            let sec = p.at / 1_000_000_000;
            if sec == second {
                in_second += 1;
            } else {
                second = sec;
                in_second = 1;
            }
            s.peak_rate = s.peak_rate.max(in_second);
        }
        s.connections = conns.len() as u64;
        s.digests_remapped = self.digests.len() as u64;
        s.counters = self.counters.clone();
        Ok(s)
    }
}

impl Plan {
    /// Where a planned request's credential comes from, as the dry run lists it.
    fn describe_auth(&self, p: &Planned) -> Option<String> {
        let recorded = p
            .recorded_credential
            .map(|(kind, fp)| format!("recorded {} {fp:016x}", kind.as_str()));
        let rule = |i: usize| self.template.auth.rule(i).describe();
        Some(match p.auth_use {
            AuthUse::None => return None,
            AuthUse::Rule(i) => format!(
                "{} (replaces recorded {})",
                rule(i),
                p.recorded_credential.map_or("?", |(k, _)| k.as_str())
            ),
            AuthUse::TokenRequest(i) => format!(
                "token request with the account of the {}, for {}{}",
                rule(i),
                recorded.unwrap_or_default(),
                query_value(p.request.path.as_str(), "account")
                    .map(|a| format!(" (account={a})"))
                    .unwrap_or_default()
            ),
            AuthUse::LiveToken => "live token from a token request on the tape".to_string(),
            AuthUse::Fetched(i) => format!(
                "token fetched after the target's 401 with the account of the {}: {} was issued before the tape began",
                rule(i),
                recorded.unwrap_or_default()
            ),
            AuthUse::Dropped => format!(
                "NONE: {} has no [[auth]] rule, sent without",
                recorded.unwrap_or_default()
            ),
        })
    }
}

impl PlanSummary {
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let c = &self.counters;
        let _ = writeln!(out, "dry run: nothing is sent");
        let _ = writeln!(out, "target:      {}", self.target);
        let _ = writeln!(
            out,
            "requests:    {} planned over {:.1} s, peak {} per second; {} writes",
            self.requests, self.duration_s, self.peak_rate, self.writes
        );
        if self.connections > 0 {
            let _ = writeln!(
                out,
                "connections: {} (one per recorded connection)",
                self.connections
            );
        }
        let _ = writeln!(
            out,
            "left out:    {} filtered, {} upgrades (WebSocket), {} unmappable, {} for other shards",
            c.filtered, c.upgrades, c.unmappable, c.other_shards
        );
        let _ = writeln!(
            out,
            "rewritten:   {} (credentials, headers, hosts or paths changed by flags or the profile)",
            self.rewritten
        );
        let _ = writeln!(
            out,
            "synthesised: {} bodies not stored on the tape, generated with their recorded length; {} recorded digests follow the bytes sent",
            self.synthesised, self.digests_remapped
        );
        let _ = writeln!(
            out,
            "mapped:      {} requests go to upload locations that {} live answers will issue",
            self.live_locations, self.issuing
        );
        if self.auth.is_empty() {
            let _ = writeln!(out, "auth:        no redacted credentials in the requests");
        } else {
            let kinds: Vec<String> = self.auth.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            let _ = writeln!(
                out,
                "auth:        recorded credentials were redacted ({}); these requests go without them unless --header sets one",
                kinds.join(", ")
            );
        }
        if self.json_mapped > 0 || self.unmapped > 0 {
            let _ = writeln!(
                out,
                "values:      {} requests carry values of the profile's JSON fields that live answers will give; {} cannot be mapped (sessions opened before the tape began)",
                self.json_mapped, self.unmapped
            );
        }
        if !self.auth_sources.is_empty() {
            let _ = writeln!(out, "credentials:");
            for (source, n) in &self.auth_sources {
                let _ = writeln!(out, "  {n:>8}  {source}");
            }
        }
        let _ = writeln!(out, "endpoints:");
        let mut v: Vec<_> = self.endpoints.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (k, n) in v {
            let _ = writeln!(out, "  {n:>8}  {k}");
        }
        out
    }
}

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
