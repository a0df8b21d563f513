//! What passed becomes records.
//!
//! An exchange is finished by two parties that run on different tasks: the request body's tap
//! (polled by the upstream connection) and the response side (the response body's tap, or the
//! handler when the upstream failed). Each leaves its part in a [`Pending`] and counts down; the
//! last one completes the [`Exchange`] and offers it to the tape. The count is atomic; the parts
//! sit behind one lock ([`Parts`]) that each party takes once, so it is never contended. The
//! record is made in place, from its request on, in a box that the tape writer's thread gives
//! back once it has written it, with the capacity of its strings and body buffers
//! ([`Unredacted`]): the box, its strings and its buffers are not made on one core to be freed
//! on the other.
//!
//! Heads the recorder read itself ([`RawFields`]) are kept as read, in a copy, and redacted and
//! classified on the tape writer's thread ([`Unredacted`]): that work is a third of recording
//! an exchange and nothing the forwarding needs, so it leaves the request's path. Fields from
//! hyper's map are redacted at once, and so are an exchange's whose bodies were spooled
//! (`--bodies full`: the spool, not the writer, takes it). A client sends the same fields
//! request after request: a connection shares its last copy of a head with the next head of
//! the same fields, and the copy keeps its redaction once made ([`LastCopy`]), so the copy, the
//! redaction and the memory the writer's core would read are made once; and the thread that
//! redacts heads remembers the last few it redacted ([`redacted_recalled`]), for the first head
//! of a connection whose client's others it has seen.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use super::admin::Metrics;
use super::fields::RawFields;
use super::spool::Spool;
use super::tap::{BodySummary, TapDone};
use super::{BodyCapture, Clock, RecordConfig, WHOLE_JSON_LIMIT};
use crate::redact::{is_token_endpoint, mentions, Redactor};
use crate::tape::capture::{CaptureSink, Finisher, Unfinished};
use crate::tape::{
    Body, CloseReason, ConnectionClosed, ConnectionOpened, Exchange, FailureKind, Headers,
    HttpVersion, Method, Nanos, Record, Request, Response, Scheme, Stored, Timing, TlsInfo,
    UpstreamFailure,
};
use sha2::{Digest, Sha256};

/// Turns one proxy thread's connections and exchanges into records, and counts them.
///
/// Each proxy thread has its own, and so its own reference count, counters and ids: an
/// exchange's record takes nothing another thread writes to (ids are unique across threads by
/// construction, not by a counter they share), so no cache line passes between cores for it.
pub struct Capture {
    sink: CaptureSink,
    /// Shared with the records the writer's thread finishes ([`Unredacted`]).
    redactor: Arc<Redactor>,
    clock: Clock,
    config: Arc<RecordConfig>,
    metrics: Arc<Metrics>,
    /// This capture's proxy thread, of `threads`.
    thread: usize,
    threads: u64,
    /// Exchanges and connections begun on this thread: the n-th has id
    /// `n * threads + thread + 1`.
    exchanges_begun: AtomicU64,
    connections_opened: AtomicU64,
    /// Requests `--sample` thinned or kept on this thread.
    sampled: AtomicU64,
    /// With `--bodies full`: where bodies larger than the inline limit go.
    spool: Option<Arc<Spool>>,
    /// Where the tape writer's thread gives back the boxes of this thread's records.
    returns: Arc<Returns>,
}

/// A head's fields: hyper's map, or the bytes the recorder read ([`RawFields`]).
#[derive(Clone, Copy)]
pub enum Fields<'a> {
    Map(&'a http::HeaderMap),
    Raw(&'a RawFields),
}

impl Fields<'_> {
    pub fn content_type(&self) -> Option<&[u8]> {
        match self {
            Fields::Map(map) => map.get(http::header::CONTENT_TYPE).map(|v| v.as_bytes()),
            Fields::Raw(raw) => raw.get("content-type"),
        }
    }
}

/// A client connection, as the exchanges on it need to know it.
pub struct Connection {
    pub id: u64,
    pub client: SocketAddr,
    /// The client's address as `X-Forwarded-For` writes it.
    pub client_ip: http::HeaderValue,
    pub scheme: Scheme,
    pub exchanges: AtomicU64,
    /// HTTP/2 requests seen on this connection.
    h2_requests: std::sync::atomic::AtomicU32,
    /// The last request and response heads copied for the capture on this connection.
    copied: [LastCopy; 2],
}

/// The last head of one kind (requests or responses) copied for the capture on a connection.
/// A client sends the same fields request after request (its `User-Agent`, its bearer token),
/// and a server answers with the same until its `Date` ticks: the next head with the same
/// fields shares that copy rather than making its own, and the redaction the tape writer's
/// thread makes of it once ([`CopiedHead`]); the tape writes it once a frame (its
/// `Headers::shared` number). A comparison on the proxy's thread replaces a copy, and the
/// writer's work on the head, that the writer's core would then read and free: memory that
/// passes between cores, where recording costs most.
///
/// The head is told from the copy by comparing their fields ([`RawFields::same_fields`]: a
/// `memcmp` of the fields' bytes and their places). Until the tape wrote a repeated head once a
/// frame, the writer's core read the copy for each record, and a keyed digest of the new head,
/// kept beside the copy, was cheaper than reading the copy back; it hashed both heads' bytes
/// (~920 instructions an exchange), where the comparison costs about 600, and is exact.
///
/// Each record holds a reference to the copy it shares, which the tape writer's thread lets go
/// of once the record is written: a reference count that both cores write, whose line was on
/// the writer's core each time the next record took a reference. A connection takes them
/// [`LEASED`] at a time instead, and hands them out one per record.
#[derive(Default)]
struct LastCopy(std::sync::Mutex<Option<Kept>>);

struct Kept {
    copy: Arc<CopiedHead>,
    /// References to `copy` taken beforehand ([`Arc::increment_strong_count`]), each to give a
    /// record: counted here, in the line the connection touches anyway, not in a list elsewhere.
    leased: usize,
}

impl Kept {
    /// A reference to the copy, for a record.
    fn lend(&mut self) -> Arc<CopiedHead> {
        if self.leased == 0 {
            for _ in 0..LEASED {
                // SAFETY: `copy` is a live `Arc`, so the pointer is one `Arc::into_raw` gave.
                unsafe { Arc::increment_strong_count(Arc::as_ptr(&self.copy)) };
            }
            self.leased = LEASED;
        }
        self.leased -= 1;
        // SAFETY: the strong count this takes over is one of those `leased` counted, taken
        // above, which nothing else owns.
        unsafe { Arc::from_raw(Arc::as_ptr(&self.copy)) }
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        for _ in 0..self.leased {
            // SAFETY: a count taken in `lend` and never given out; `copy` holds one more, so
            // this never frees the copy.
            unsafe { Arc::decrement_strong_count(Arc::as_ptr(&self.copy)) };
        }
    }
}

/// How many references to its last copy a connection takes at once ([`LastCopy`]).
const LEASED: usize = 16;

/// The largest head a connection remembers: it holds its copy, and the copy's redaction, as
/// long as it is open (about twice this, for each of its two kinds, at most). Like the
/// connection's own buffers, that copy holds the client's credentials in memory, never on a
/// tape.
const LAST_COPY_LONGEST: usize = 8 << 10;

impl LastCopy {
    /// A copy of `raw`: the last one made here if it holds the same fields, else a new one.
    fn of(&self, raw: &RawFields) -> Arc<CopiedHead> {
        let Ok(mut last) = self.0.lock() else {
            return CopiedHead::of(raw);
        };
        if let Some(kept) = last.as_mut().filter(|k| k.copy.fields.same_fields(raw)) {
            return kept.lend();
        }
        let copy = CopiedHead::of(raw);
        *last = (raw.approx_size() <= LAST_COPY_LONGEST).then(|| Kept {
            copy: copy.clone(),
            leased: 0,
        });
        copy
    }
}

/// A head's fields copied for the capture, shared by the records of the heads with the same
/// fields ([`LastCopy`]), and what they became once redacted.
///
/// Aligned to a cache line of its own, away from the reference counts before it, which both
/// the proxy's thread and the writer's write: reading the fields to compare them would
/// otherwise wait for the line the writer's core just took.
#[repr(align(64))]
struct CopiedHead {
    fields: RawFields,
    redacted: KeptRedaction,
}

/// The fields of a [`CopiedHead`] redacted, with the id of the redactor that did it: made once,
/// on the tape writer's thread, and lent to each record that shares the copy while it is
/// written ([`Unredacted`]), rather than copied into each and freed. Taken and given back by
/// the writer's thread alone (and by a proxy thread for a spooled exchange's, which then makes
/// its own while the writer has it): the lock is not contended, and on a line of its own, it
/// stays in the writer's core while the proxy's reads the fields.
#[repr(align(64))]
#[derive(Default)]
struct KeptRedaction(std::sync::Mutex<Option<(u64, Headers)>>);

impl CopiedHead {
    fn of(raw: &RawFields) -> Arc<CopiedHead> {
        Arc::new(CopiedHead {
            fields: raw.copied(),
            redacted: KeptRedaction::default(),
        })
    }

    /// The fields redacted by `redactor`, to give back once written ([`CopiedHead::give_back`]):
    /// as this copy keeps them, else worked out (or recalled from another copy of the same
    /// fields, [`redacted_recalled`]).
    fn lend(self: &Arc<Self>, redactor: &Redactor) -> Headers {
        let kept = (self.redacted.0.lock()).ok().and_then(|mut k| k.take());
        match kept {
            Some((id, headers)) if id == redactor.id() => headers,
            _ => redacted_recalled(redactor, self),
        }
    }

    /// Keeps `headers`, lent by [`CopiedHead::lend`], for the next record of these fields.
    fn give_back(&self, redactor: &Redactor, headers: Headers) {
        if let Ok(mut kept) = self.redacted.0.lock() {
            *kept = Some((redactor.id(), headers));
        }
    }

    /// The fields redacted by `redactor`, a copy of its own.
    fn redacted(self: &Arc<Self>, redactor: &Redactor) -> Headers {
        let lent = self.lend(redactor);
        let copy = lent.clone();
        self.give_back(redactor, lent);
        copy
    }
}

impl Connection {
    /// The HTTP/2 stream id of the next request: hyper does not expose it, but a client opens
    /// streams with increasing odd ids, one per request, so the n-th request is stream 2n-1.
    /// 0 on HTTP/1.x.
    pub fn stream_of(&self, version: http::Version) -> u32 {
        if version != http::Version::HTTP_2 {
            return 0;
        }
        let n = self.h2_requests.fetch_add(1, Ordering::Relaxed) + 1;
        n.saturating_mul(2) - 1
    }
}

impl Capture {
    /// The captures of `threads` proxy threads, the i-th for thread i.
    pub fn per_thread(
        sink: CaptureSink,
        redactor: Redactor,
        clock: Clock,
        config: Arc<RecordConfig>,
        metrics: Arc<Metrics>,
        spool: Option<Arc<Spool>>,
        threads: usize,
    ) -> Vec<Arc<Capture>> {
        let threads = threads.max(1);
        // Each its own, so that no reference count is shared; the writer's thread finishes
        // each lane's records with its thread's ([`Unredacted`]).
        let finishing: Vec<_> = (0..threads)
            .map(|_| {
                Arc::new(Finishing {
                    redactor: Arc::new(redactor.clone()),
                    returns: Arc::default(),
                    batch: Default::default(),
                })
            })
            .collect();
        let finishers = (finishing.iter())
            .map(|f| Some(f.clone() as Finisher))
            .collect();
        (sink
            .lanes_with(finishers)
            .into_iter()
            .zip(finishing)
            .enumerate())
        .map(|(thread, (sink, finishing))| {
            Arc::new(Capture {
                sink,
                redactor: finishing.redactor.clone(),
                returns: finishing.returns.clone(),
                clock,
                config: config.clone(),
                metrics: metrics.clone(),
                thread,
                threads: threads as u64,
                exchanges_begun: AtomicU64::new(0),
                connections_opened: AtomicU64::new(0),
                sampled: AtomicU64::new(0),
                spool: spool.clone(),
            })
        })
        .collect()
    }

    /// The proxy thread this capture serves.
    pub fn thread(&self) -> usize {
        self.thread
    }

    /// The id of the `n`-th exchange or connection begun on this thread.
    fn id(&self, n: u64) -> u64 {
        n * self.threads + self.thread as u64 + 1
    }

    /// Where a body that outgrows its kept prefix is spooled whole (`--bodies full`).
    pub fn spool(&self) -> Option<Arc<Spool>> {
        self.spool.clone()
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Notes a new client connection; returns it for its exchanges.
    pub fn connection_opened(
        &self,
        client: SocketAddr,
        version: HttpVersion,
        tls: Option<TlsInfo>,
    ) -> Arc<Connection> {
        let id = self.id(self.connections_opened.fetch_add(1, Ordering::Relaxed));
        let scheme = if tls.is_some() {
            Scheme::Https
        } else {
            Scheme::Http
        };
        self.sink
            .offer(Record::ConnectionOpened(Box::new(ConnectionOpened {
                id,
                at: self.clock.now(),
                client: Some(client),
                version,
                tls,
            })));
        Arc::new(Connection {
            id,
            client,
            client_ip: http::HeaderValue::from_str(&client.ip().to_string())
                .expect("an IP address is a valid header value"),
            scheme,
            exchanges: AtomicU64::new(0),
            h2_requests: std::sync::atomic::AtomicU32::new(0),
            copied: Default::default(),
        })
    }

    pub fn connection_closed(&self, connection: &Connection, reason: CloseReason) {
        self.sink
            .offer(Record::ConnectionClosed(Box::new(ConnectionClosed {
                id: connection.id,
                at: self.clock.now(),
                reason,
                exchanges: connection.exchanges.load(Ordering::Relaxed),
            })));
    }

    /// Whether the exchange with this path goes on the tape (include, exclude, sampling). All
    /// are forwarded either way.
    pub fn wants(&self, path: &str) -> bool {
        let c = &self.config;
        if !c.include.is_empty() && !c.include.iter().any(|r| r.is_match(path)) {
            return false;
        }
        if c.exclude.iter().any(|r| r.is_match(path)) {
            return false;
        }
        if c.sample >= 1.0 {
            return true;
        }
        if c.sample <= 0.0 {
            return false;
        }
        // Deterministic thinning: a fixed fraction of the requests each thread takes, in their
        // order of arrival.
        let n = self.id(self.sampled.fetch_add(1, Ordering::Relaxed));
        let hash = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (hash as f64 / u64::MAX as f64) < c.sample
    }

    /// Starts recording an exchange whose request head has arrived, naming `authority` (the
    /// request URI's, on HTTP/2 and in absolute form, else its `Host`).
    pub fn begin(
        self: &Arc<Self>,
        connection: &Arc<Connection>,
        stream: u32,
        parts: &http::request::Parts,
        fields: Fields<'_>,
        authority: Option<&http::HeaderValue>,
        start: Nanos,
    ) -> Arc<Pending> {
        connection.exchanges.fetch_add(1, Ordering::Relaxed);
        let mut record = self.spare_record();
        let (headers, raw, raw_size) = self.head_fields(fields, &connection.copied[0]);
        (record.raw.request, record.raw.size) = (raw, raw_size);
        let request = &mut record.exchange_mut().request;
        let authority = authority.and_then(|a| a.to_str().ok());
        request.authority.push_str(authority.unwrap_or_default());
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        self.redactor.target_into(target, &mut request.target);
        request.method = Method::parse(parts.method.as_str());
        request.scheme = connection.scheme;
        request.version = version_of(parts.version);
        request.headers = headers;
        // A token endpoint's request may carry a password or client secret: never kept.
        let token_endpoint = is_token_endpoint(parts.uri.path());
        let keep = if token_endpoint {
            0
        } else {
            self.keep_for(fields.content_type(), false)
        };
        let request_spooled = keep > 0 && self.spools(fields.content_type());
        self.sink.exchange_started(start);
        Arc::new(Pending {
            capture: self.clone(),
            id: self.id(self.exchanges_begun.fetch_add(1, Ordering::Relaxed)),
            connection: connection.clone(),
            stream,
            start,
            token_endpoint,
            parts: std::sync::Mutex::new(Parts {
                record: Some(record),
                ..Parts::default()
            }),
            request_keep: keep,
            request_spooled,
            remaining: AtomicU8::new(2),
            upgraded: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A head's fields as the record takes them: hyper's map redacted now; the fields the
    /// recorder read itself copied as they are (or as `last` copied them), for the writer's
    /// thread (module docs), with their size in memory (the copy's, known without reading it).
    fn head_fields(
        &self,
        fields: Fields<'_>,
        last: &LastCopy,
    ) -> (Headers, Option<Arc<CopiedHead>>, usize) {
        match fields {
            Fields::Map(_) => (redacted(&self.redactor, fields), None, 0),
            Fields::Raw(raw) => (Headers::new(), Some(last.of(raw)), raw.approx_size()),
        }
    }

    /// Whether a body of this content type goes whole to the spool (`--bodies full`): not JSON
    /// or a form, whose credentials the writer overwrites only in the bytes a record keeps
    /// (`Redactor::scrub_stored`); of those, the first 64 KiB are kept. Image manifests and
    /// indexes, JSON that never holds a credential, are spooled, so a push replays whole.
    pub fn spools(&self, content_type: Option<&[u8]>) -> bool {
        let has = |what: &[u8]| content_type.is_some_and(|t| mentions(t, what));
        let manifest = has(b"manifest") || has(b"image.index");
        self.spool.is_some() && (manifest || !has(b"json")) && !has(b"x-www-form-urlencoded")
    }

    /// How many bytes of a body with these headers to keep.
    pub fn keep_for(&self, content_type: Option<&[u8]>, token_response: bool) -> usize {
        let prefix = match self.config.bodies {
            BodyCapture::None => return if token_response { WHOLE_JSON_LIMIT } else { 0 },
            BodyCapture::Prefix(n) => n,
            // Whole bodies: up to the inline limit as a prefix, beyond it spooled as blobs.
            BodyCapture::Full => WHOLE_JSON_LIMIT,
        };
        let json = content_type.is_some_and(|t| t.windows(4).any(|w| w == b"json"));
        if json || token_response {
            prefix.max(WHOLE_JSON_LIMIT)
        } else {
            prefix
        }
    }

    /// A box for the next exchange's record: one the writer's thread gave back, else a new one
    /// ([`Unredacted`]).
    fn spare_record(&self) -> Box<Unredacted> {
        let spare = SPARE_RECORDS.with_borrow_mut(|spares| {
            let mut taken = false;
            if spares.is_empty() {
                // Never waits: while the writer's thread gives some back, a new box will do.
                if let Ok(mut returned) = self.returns.0.try_lock() {
                    std::mem::swap(spares, &mut *returned);
                    taken = true;
                }
            }
            let spare = spares.pop()?;
            // The next box's lines ahead of its exchange ([`Spare`]); this box's were asked
            // for with the last one, but the first of a batch just taken: all at once, rather
            // than one after the other as they are written.
            if taken {
                spare.prefetch();
            }
            if let Some(next) = spares.last() {
                next.prefetch();
            }
            Some(spare.record)
        });
        spare.unwrap_or_else(Unredacted::blank)
    }

    fn count_recorded(&self) {
        (self.metrics.of_thread(self.thread).recorded).fetch_add(1, Ordering::Relaxed);
    }
}

/// A head's fields, redacted, as the tape keeps them.
fn redacted(redactor: &Redactor, fields: Fields<'_>) -> Headers {
    match fields {
        Fields::Map(map) => {
            let mut headers = Headers::with_capacity(map.len(), 512);
            for (name, value) in map {
                redactor.push_http_header(&mut headers, name, value);
            }
            headers
        }
        Fields::Raw(raw) => {
            let mut headers = Headers::with_capacity(raw.len(), 512);
            for (name, value) in raw.iter() {
                redactor.push_raw_header(&mut headers, name, value);
            }
            headers
        }
    }
}

/// HTTP version as the tape writes it.
pub fn version_of(v: http::Version) -> HttpVersion {
    match v {
        http::Version::HTTP_10 | http::Version::HTTP_09 => HttpVersion::Http10,
        http::Version::HTTP_2 => HttpVersion::H2,
        http::Version::HTTP_3 => HttpVersion::H3,
        _ => HttpVersion::Http11,
    }
}

/// The response side of an exchange, once known.
enum ResponsePart {
    Head {
        status: u16,
        version: HttpVersion,
        headers: Headers,
        at: Nanos,
        keep_body: bool,
    },
    Failed(UpstreamFailure),
}

/// The parts of an exchange as they come: each left once by the task that has it (the
/// request's when it arrives, then its body's tap; the response's head, then its body's tap)
/// and all taken at once by the last. One lock for all, taken once by each party and never
/// contended: a lock per part took and released four, a few times over.
#[derive(Default)]
struct Parts {
    /// The record, made in place: its request from the start, the rest when all has come.
    record: Option<Box<Unredacted>>,
    request_body: Option<(BodySummary, Nanos)>,
    response: Option<ResponsePart>,
    response_body: Option<(BodySummary, Nanos)>,
}

/// An exchange under way. See the module docs.
pub struct Pending {
    capture: Arc<Capture>,
    id: u64,
    connection: Arc<Connection>,
    stream: u32,
    start: Nanos,
    token_endpoint: bool,
    request_keep: usize,
    /// With `--bodies full`, the request's body beyond what is kept goes to the spool.
    request_spooled: bool,
    parts: std::sync::Mutex<Parts>,
    /// Parts still to come: the request body, and the response (with its body).
    remaining: AtomicU8,
    /// The connection switched protocols after this exchange (WebSocket).
    upgraded: std::sync::atomic::AtomicBool,
}

impl Pending {
    pub fn request_keep(&self) -> usize {
        self.request_keep
    }

    pub fn token_endpoint(&self) -> bool {
        self.token_endpoint
    }

    pub fn request_spooled(&self) -> bool {
        self.request_spooled
    }

    /// The request has no body: it was whole with its head.
    pub fn request_bodiless(&self) {
        let whole = BodySummary {
            complete: true,
            ..BodySummary::default()
        };
        self.put(|p| {
            p.request_body.get_or_insert((whole, self.start));
        });
        self.part_done();
    }

    /// The request body's tap.
    pub fn request_tap(self: &Arc<Self>) -> BodyDone {
        let mut buffer = Vec::new();
        self.put(|p| buffer = p.take_buffer(Side::Request));
        BodyDone(self.clone(), Side::Request, buffer)
    }

    /// The upstream answered with this head, read at `at`; the response body's tap follows.
    pub fn response_head(
        self: &Arc<Self>,
        status: http::StatusCode,
        version: http::Version,
        fields: Fields<'_>,
        at: Nanos,
    ) -> BodyDone {
        let capture = &self.capture;
        let (headers, raw, raw_size) = capture.head_fields(fields, &self.connection.copied[1]);
        let head = ResponsePart::Head {
            status: status.as_u16(),
            version: version_of(version),
            headers,
            at,
            keep_body: !self.token_endpoint && capture.config.bodies != BodyCapture::None,
        };
        let mut buffer = Vec::new();
        self.put(|p| {
            if p.response.is_none() {
                p.response = Some(head);
                buffer = p.take_buffer(Side::Response);
                if let Some(record) = p.record.as_mut() {
                    record.raw.response = raw;
                    record.raw.size += raw_size;
                }
            }
        });
        BodyDone(self.clone(), Side::Response, buffer)
    }

    /// The connection switches protocols after this exchange.
    pub fn set_upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
    }

    /// The upstream gave no response.
    pub fn failed(&self, kind: FailureKind, detail: String) {
        let at = self.capture.clock.now();
        self.put(|p| {
            p.response
                .get_or_insert(ResponsePart::Failed(UpstreamFailure { kind, detail }));
            p.response_body.get_or_insert((BodySummary::default(), at));
        });
        self.part_done();
    }

    /// Leaves a part (the first left of each kind stays).
    fn put(&self, leave: impl FnOnce(&mut Parts)) {
        if let Ok(mut parts) = self.parts.lock() {
            leave(&mut parts);
        }
    }

    fn part_done(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.build();
        }
    }

    fn build(&self) {
        let parts =
            (self.parts.lock()).map_or_else(|_| Parts::default(), |mut p| std::mem::take(&mut *p));
        let (Some(mut record), Some(response)) = (parts.record, parts.response) else {
            self.capture.sink.exchange_abandoned(self.start);
            return;
        };
        let capture = &self.capture;
        let (req_body, req_done) = parts.request_body.unwrap_or_default();
        let (resp_body, resp_done) = parts.response_body.unwrap_or_default();
        let mut spooled = [req_body.spooled, None];
        let keep_request = capture.config.bodies != BodyCapture::None && !self.token_endpoint;
        let Unredacted {
            exchange, buffers, ..
        } = &mut *record;
        let exchange = exchange
            .as_mut()
            .expect("a record being made has its exchange");
        exchange.request.body = body_of(req_body, keep_request, Some(&mut buffers[0]));
        let mut response_head = None;
        exchange.response = match response {
            ResponsePart::Head {
                status,
                version,
                headers,
                at,
                keep_body,
            } => {
                if self.token_endpoint && resp_body.complete {
                    exchange.issued_secrets = capture.redactor.issued_secrets(&resp_body.prefix);
                }
                spooled[1] = resp_body.spooled.filter(|_| keep_body);
                // A token endpoint's body held the token it issued: its buffer is not reused.
                let spare = (!self.token_endpoint).then_some(&mut buffers[1]);
                response_head = Some(at.saturating_sub(self.start));
                Ok(Response {
                    status,
                    version,
                    headers,
                    body: body_of(resp_body, keep_body, spare),
                })
            }
            ResponsePart::Failed(failure) => Err(failure),
        };
        exchange.id = self.id;
        exchange.connection = self.connection.id;
        exchange.stream = self.stream;
        exchange.client = Some(self.connection.client);
        exchange.timing = Timing {
            start: self.start,
            request_done: req_done.saturating_sub(self.start),
            response_head,
            response_done: resp_done.saturating_sub(self.start),
        };
        exchange.upgraded = self.upgraded.load(Ordering::Relaxed);
        capture.count_recorded();
        match (&capture.spool, spooled) {
            (Some(spool), ids) if ids.iter().any(Option::is_some) => {
                // After its blobs, which the spool writes as they come: redacted here.
                let mut exchange = *record.exchange.take().expect("made above");
                record.raw.redact_into(&mut exchange, &capture.redactor);
                finish_exchange(&mut exchange, &capture.redactor);
                // If the spool is swamped, with its prefixes instead.
                if let Err(exchange) = spool.exchange(exchange, ids, &capture.sink) {
                    capture.sink.offer(Record::Exchange(exchange));
                }
            }
            _ => {
                capture.sink.offer_unfinished(record);
            }
        }
    }
}

/// The fields of an exchange's heads as read, still to be redacted into its record.
#[derive(Default)]
struct Heads {
    request: Option<Arc<CopiedHead>>,
    response: Option<Arc<CopiedHead>>,
    /// The copies' size in memory, as the queue counts it: known when they were taken, so that
    /// counting does not read the copies, which the proxy's core no longer holds.
    size: usize,
}

impl Heads {
    fn redact_into(&self, exchange: &mut Exchange, redactor: &Redactor) {
        for (copy, headers) in self.with_headers(exchange) {
            *headers = copy.redacted(redactor);
        }
    }

    /// Each head's copy, with the headers of `exchange` it becomes (a failed exchange's
    /// response has none).
    fn with_headers<'a>(
        &'a self,
        exchange: &'a mut Exchange,
    ) -> impl Iterator<Item = (&'a Arc<CopiedHead>, &'a mut Headers)> {
        let response = exchange.response.as_mut().ok().map(|r| &mut r.headers);
        [
            (self.request.as_ref(), Some(&mut exchange.request.headers)),
            (self.response.as_ref(), response),
        ]
        .into_iter()
        .filter_map(|(copy, headers)| Some((copy?, headers?)))
    }
}

/// How many heads [`redacted_recalled`] remembers, and the largest it remembers.
const RECENT_HEADS: usize = 8;
const RECENT_HEAD_LONGEST: usize = 16 << 10;

/// The heads last redacted on this thread (the tape writer's, mostly), with what they became;
/// the most recently used first.
struct RecentHeads {
    redactor: u64,
    heads: Vec<(Arc<CopiedHead>, Headers)>,
}

thread_local! {
    static RECENT: std::cell::RefCell<RecentHeads> = const {
        std::cell::RefCell::new(RecentHeads { redactor: 0, heads: Vec::new() })
    };
}

/// [`redacted`] for a head the recorder read, remembering the last [`RECENT_HEADS`]: a client
/// sends the same fields on each of its connections (its `User-Agent`, `Accept`, the same
/// bearer token), and a server answers every client with the same fields until its `Date`
/// ticks, so a head new to its connection ([`LastCopy`]) was often redacted a moment ago for
/// another. Looking one up is a byte comparison; redacting it anew classifies and checks every
/// field, and was a third of the writer's work on each exchange. Like the redactor's own cache
/// of credentials, this holds credentials in memory, never on the tape.
fn redacted_recalled(redactor: &Redactor, copy: &Arc<CopiedHead>) -> Headers {
    let raw = &copy.fields;
    let fresh = || {
        let mut headers = redacted(redactor, Fields::Raw(raw));
        headers.mark_shared();
        headers
    };
    if raw.approx_size() > RECENT_HEAD_LONGEST {
        return fresh();
    }
    RECENT.with(|recent| {
        let mut recent = recent.borrow_mut();
        if recent.redactor != redactor.id() {
            recent.redactor = redactor.id();
            recent.heads.clear();
        }
        let same = |(c, _): &(Arc<CopiedHead>, Headers)| c.fields.same_fields(raw);
        if let Some(i) = recent.heads.iter().position(same) {
            recent.heads[..=i].rotate_right(1);
            return recent.heads[0].1.clone();
        }
        let headers = fresh();
        recent.heads.truncate(RECENT_HEADS - 1);
        recent.heads.insert(0, (copy.clone(), headers.clone()));
        headers
    })
}

/// An exchange's record, made in place on the proxy's thread from the parts as they come, its
/// heads redacted on the tape writer's thread (module docs) by the redactor of the lane it
/// came through. Until then its credentials are in memory as the traffic's own buffers hold
/// them, never on the tape.
///
/// The box makes a round trip: once the writer has written the record, it clears it, keeping
/// the capacity of its strings and of its bodies' buffers, and gives it back to the proxy
/// thread it came from ([`Finishing`]), whose next exchange is made in it. Made and freed for
/// each exchange, the record's box, its two strings and its body's buffer were each made on
/// the proxy's core and freed on the writer's (the allocator then collecting them back on the
/// proxy's), and the record was assembled by moving its parts from one place to the next
/// (about 3.7 KB of copies an exchange, and one more into a box on the writer's thread).
struct Unredacted {
    /// `None` only while the writer writes it.
    exchange: Option<Box<Exchange>>,
    raw: Heads,
    /// Buffers for the bodies' kept prefixes (request, response), emptied, for the next
    /// exchange's taps ([`TapDone::prefix_buffer`]).
    buffers: [Vec<u8>; 2],
}

/// What the tape writer's thread finishes a proxy thread's records with: its redactor, and the
/// way back for their boxes.
struct Finishing {
    redactor: Arc<Redactor>,
    returns: Arc<Returns>,
    /// Boxes written and not yet given back, [`RETURNED_AT_ONCE`] at most: locked by the
    /// writer's thread alone.
    batch: std::sync::Mutex<Boxes>,
}

/// Boxes of written records given back to a proxy thread ([`Unredacted`]), a batch at a time:
/// one lock a batch, so the line passes between the cores once a batch rather than once a
/// record.
#[derive(Default)]
struct Returns(std::sync::Mutex<Boxes>);

/// Records' boxes given back.
type Boxes = Vec<Spare>;

/// A record's box given back, with where the memory lies that the next exchange made in it
/// writes: its exchange, strings and response body buffer, as (address, bytes), noted by the
/// writer's thread as it clears the box.
///
/// The box was last written on the writer's core: each line of it the proxy's thread then
/// writes waited for the line to come over, one after the other (a quarter of recording an
/// exchange, more when the machine is busy). Held in the proxy thread's own list, beside the
/// box rather than in it, the addresses can be read at once, and the proxy's thread asks for
/// the next box's lines as it takes one ([`prefetch_for_writing`]): they come over while it
/// serves the exchange in hand.
struct Spare {
    record: Box<Unredacted>,
    lines: [(usize, usize); 4],
}

impl Spare {
    fn of(record: Box<Unredacted>) -> Spare {
        let mut lines = [(0, 0); 4];
        if let Some(exchange) = record.exchange.as_deref() {
            let request = &exchange.request;
            let address = |bytes: &[u8]| bytes.as_ptr() as usize;
            lines = [
                (exchange as *const Exchange as usize, size_of::<Exchange>()),
                (
                    address(request.authority.as_bytes()),
                    request.authority.capacity(),
                ),
                (
                    address(request.target.as_bytes()),
                    request.target.capacity(),
                ),
                (address(&record.buffers[1]), record.buffers[1].capacity()),
            ];
        }
        Spare { record, lines }
    }

    /// Asks for the lines of the box and of what the next exchange writes in it.
    fn prefetch(&self) {
        let record = &*self.record as *const Unredacted as usize;
        prefetch_for_writing(record, size_of::<Unredacted>());
        for (address, bytes) in self.lines {
            // A body buffer's first lines: most bodies a registry answers with are small.
            prefetch_for_writing(address, bytes.min(PREFETCHED_BODY));
        }
    }
}

/// How much of a body's buffer is asked for ahead ([`Spare::prefetch`]).
const PREFETCHED_BODY: usize = 2 << 10;

/// Asks this core to fetch the cache lines of `bytes` bytes at `address`, to write them: a
/// hint, which never faults and changes nothing the program sees, whatever the address.
/// `prefetchw` takes the lines for writing, where a plain prefetch (for the processors
/// without it) leaves their owner to be asked again on the first write.
#[inline]
fn prefetch_for_writing(address: usize, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let writing = has_prefetchw();
        let mut line = address & !63;
        while line < address + bytes {
            if writing {
                // SAFETY: `prefetchw` reads and writes nothing the program sees, and ignores
                // an address that is not mapped; the processor has it (`has_prefetchw`).
                unsafe {
                    std::arch::asm!("prefetchw [{}]", in(reg) line, options(nostack, preserves_flags, readonly));
                }
            } else {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                // SAFETY: as above; a safe function for compilers since 1.86.
                #[allow(unused_unsafe)]
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(line as *const i8)
                };
            }
            line += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (address, bytes);
}

/// Whether the processor has `prefetchw` (CPUID 8000_0001h, ECX bit 8: every AMD64 processor,
/// Intel's since 2014). Rust's `prfchw` target feature is not stable yet.
#[cfg(target_arch = "x86_64")]
fn has_prefetchw() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        use std::arch::x86_64::{__cpuid, CpuidResult};
        // SAFETY: CPUID exists on every x86-64 processor (a safe function for compilers since
        // 1.86).
        #[allow(unused_unsafe)]
        let cpuid = |leaf: u32| -> CpuidResult { unsafe { __cpuid(leaf) } };
        cpuid(0x8000_0000).eax >= 0x8000_0001 && cpuid(0x8000_0001).ecx & (1 << 8) != 0
    })
}

/// How many boxes the writer gives back at once, and the most it leaves waiting for a proxy
/// thread: the thread holds at most twice that, with those it took the last time, and the
/// writer a batch (beyond, boxes are freed on the writer's thread, as they all were before).
const RETURNED_AT_ONCE: usize = 32;
const SPARE_RECORDS_MOST: usize = 128;
/// The largest body buffer, and string, a spare box keeps: a larger one is freed with its
/// record, so that a box holds at most about 13 KiB, whatever passed in it once.
const SPARE_BUFFER_LONGEST: usize = 4 << 10;
const SPARE_STRING_LONGEST: usize = 2 << 10;

thread_local! {
    /// The boxes given back to this proxy thread, for its next exchanges
    /// ([`Capture::spare_record`]).
    static SPARE_RECORDS: std::cell::RefCell<Boxes> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Unredacted {
    /// An empty record in a new box.
    fn blank() -> Box<Unredacted> {
        Box::new(Unredacted {
            exchange: Some(Box::new(Exchange {
                id: 0,
                connection: 0,
                stream: 0,
                client: None,
                timing: Timing {
                    start: 0,
                    request_done: 0,
                    response_head: None,
                    response_done: 0,
                },
                request: Request {
                    method: Method::Get,
                    scheme: Scheme::Http,
                    authority: String::new(),
                    target: String::new(),
                    version: HttpVersion::Http11,
                    headers: Headers::new(),
                    body: Body::empty(),
                },
                response: Err(UpstreamFailure {
                    kind: FailureKind::Other,
                    detail: String::new(),
                }),
                issued_secrets: Vec::new(),
                upgraded: false,
            })),
            raw: Heads::default(),
            buffers: [Vec::new(), Vec::new()],
        })
    }

    fn exchange_mut(&mut self) -> &mut Exchange {
        (self.exchange.as_mut()).expect("a record being made has its exchange")
    }

    /// What a lane of a capture's always carries (`Capture::per_thread`). Were it missing, the
    /// panic costs this record (counted as dropped), never its credentials.
    fn finishing(with: Option<&(dyn std::any::Any + Send + Sync)>) -> &Finishing {
        (with.and_then(|w| w.downcast_ref::<Finishing>()))
            .expect("a capture's lane carries its thread's redactor")
    }

    /// Empties the record for the next exchange, keeping what has capacity worth keeping: its
    /// strings, its bodies' buffers. What it shared (the heads' copies) is let go of.
    fn clear(&mut self) {
        self.raw = Heads::default();
        let Unredacted {
            exchange, buffers, ..
        } = self;
        let Some(exchange) = exchange.as_mut() else {
            return;
        };
        let request = &mut exchange.request;
        for string in [&mut request.authority, &mut request.target] {
            if string.capacity() > SPARE_STRING_LONGEST {
                *string = String::new();
            }
            string.clear();
        }
        request.headers = Headers::new();
        reclaim(&mut request.body, &mut buffers[0]);
        if let Ok(response) = exchange.response.as_mut() {
            response.headers = Headers::new();
            reclaim(&mut response.body, &mut buffers[1]);
        }
        exchange.issued_secrets = Vec::new();
    }

    /// The memory it holds beyond what [`Exchange::approx_size`] counts (which counts lengths):
    /// the capacity its strings and buffers kept from earlier records, so that the capture
    /// queue's byte bound holds for records made in reused boxes.
    fn kept_capacity(&self) -> usize {
        let Some(exchange) = self.exchange.as_ref() else {
            return 0;
        };
        let unused = |capacity: usize, len: usize| capacity - len;
        let stored = |body: &Body| match &body.stored {
            Stored::Prefix(bytes) => unused(bytes.capacity(), bytes.len()),
            _ => 0,
        };
        let request = &exchange.request;
        unused(request.authority.capacity(), request.authority.len())
            + unused(request.target.capacity(), request.target.len())
            + stored(&request.body)
            + exchange.response.as_ref().map_or(0, |r| stored(&r.body))
            + self.buffers.iter().map(Vec::capacity).sum::<usize>()
    }
}

/// Takes a written body's kept bytes back into `buffer`, emptied, for the next record.
fn reclaim(body: &mut Body, buffer: &mut Vec<u8>) {
    if let Stored::Prefix(bytes) = std::mem::replace(&mut body.stored, Stored::None) {
        keep_buffer(bytes, buffer);
    }
}

/// Keeps `bytes`' buffer, emptied, as `spare` if it is larger and not too large.
fn keep_buffer(mut bytes: Vec<u8>, spare: &mut Vec<u8>) {
    if bytes.capacity() > spare.capacity() && bytes.capacity() <= SPARE_BUFFER_LONGEST {
        bytes.clear();
        *spare = bytes;
    }
}

impl Finishing {
    /// Gives a written record's box back to its proxy thread: with a batch of others, unless
    /// the thread has as many as it keeps (then it is freed here).
    fn give_back(&self, mut record: Box<Unredacted>) {
        record.clear();
        let Ok(mut batch) = self.batch.lock() else {
            return;
        };
        batch.push(Spare::of(record));
        if batch.len() < RETURNED_AT_ONCE {
            return;
        }
        if let Ok(mut returned) = self.returns.0.lock() {
            if returned.len() + batch.len() <= SPARE_RECORDS_MOST {
                returned.append(&mut batch);
            }
        }
        batch.clear();
    }
}

impl Unfinished for Unredacted {
    fn finish(mut self: Box<Self>, with: Option<&(dyn std::any::Any + Send + Sync)>) -> Record {
        let mut exchange = self
            .exchange
            .take()
            .expect("an unfinished record has its exchange");
        let redactor = &Self::finishing(with).redactor;
        self.raw.redact_into(&mut exchange, redactor);
        finish_exchange(&mut exchange, redactor);
        Record::Exchange(exchange)
    }

    /// Writes the exchange with its heads' redactions lent by their copies, and gives them
    /// back: a connection's records share them ([`LastCopy`]). Then the box goes back to its
    /// proxy thread ([`Unredacted`]).
    fn finish_into(
        mut self: Box<Self>,
        with: Option<&(dyn std::any::Any + Send + Sync)>,
        write: &mut dyn FnMut(&Record),
    ) {
        let finishing = Self::finishing(with);
        let redactor = &*finishing.redactor;
        let Some(mut exchange) = self.exchange.take() else {
            return;
        };
        for (copy, headers) in self.raw.with_headers(&mut exchange) {
            *headers = copy.lend(redactor);
        }
        finish_exchange(&mut exchange, redactor);
        let record = Record::Exchange(exchange);
        write(&record);
        let Record::Exchange(mut exchange) = record else {
            unreachable!("made an exchange above")
        };
        for (copy, headers) in self.raw.with_headers(&mut exchange) {
            copy.give_back(redactor, std::mem::take(headers));
        }
        self.exchange = Some(exchange);
        finishing.give_back(self);
    }

    fn approx_size(&self) -> usize {
        let exchange = self.exchange.as_ref().map_or(0, |e| e.approx_size());
        exchange + self.raw.size + self.kept_capacity()
    }

    fn exchange_start(&self) -> Option<Nanos> {
        self.exchange.as_ref().map(|e| e.timing.start)
    }
}

/// What is left to do with an exchange once its heads are redacted, on the tape writer's
/// thread: the credentials in what it keeps of its bodies overwritten
/// ([`Redactor::scrub_stored`]), and a token realm that bypasses the recorder told.
fn finish_exchange(exchange: &mut Exchange, redactor: &Redactor) {
    let request = &mut exchange.request;
    redactor.scrub_stored(&request.headers, &mut request.body);
    if let Ok(response) = exchange.response.as_mut() {
        redactor.scrub_stored(&response.headers, &mut response.body);
        if response.status == 401 {
            check_realm(&exchange.request.authority, &response.headers);
        }
    }
}

/// Warns, once, when a registry's 401 sends clients for their tokens to a host other than the
/// one they reached the recorder by: Quay builds its realm from its `SERVER_HOSTNAME`, so
/// unless the recorder has taken over that name (or the client's `Host` reaches Quay), clients
/// fetch their tokens around it, and the tape holds no issued token for a replay to match.
fn check_realm(authority: &str, headers: &Headers) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let challenge = headers.get_str("www-authenticate").unwrap_or_default();
    let bearer = challenge.get(..6);
    if !bearer.is_some_and(|b| b.eq_ignore_ascii_case("bearer")) {
        return;
    }
    let Some(host) = realm_host(challenge) else {
        return;
    };
    if authority.is_empty() || bare_host(host).eq_ignore_ascii_case(bare_host(authority)) {
        return;
    }
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "the upstream's token realm is at {host}, not at {authority} where clients reach the recorder: their token requests go around it, so the tape has no issued tokens for a replay to match (put the recorder at the registry's public name: README, \"Take over Quay's public name\")"
        );
    }
}

/// A `host[:port]`'s host (the realm's port is the registry's public one, the client's may
/// be another: what matters is the name).
fn bare_host(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// The host of a `Bearer realm="https://host[:port]/path"` challenge.
fn realm_host(challenge: &str) -> Option<&str> {
    let at = challenge.find("realm=\"")? + "realm=\"".len();
    let url = &challenge[at..];
    let url = &url[..url.find('"')?];
    let (_, rest) = url.split_once("://")?;
    let host = &rest[..rest.find('/').unwrap_or(rest.len())];
    (!host.is_empty()).then_some(host)
}

/// A body's record from what its tap saw; the buffer of a prefix not kept goes back to
/// `spare`, if any, for the next record.
fn body_of(summary: BodySummary, keep: bool, spare: Option<&mut Vec<u8>>) -> Body {
    let stored = keep && !summary.prefix.is_empty();
    // A body the tap kept whole was not hashed: a stored copy gives the reader its digest; one
    // not stored (a token endpoint's) is hashed here, off the body's path.
    let sha256 = match summary.sha256 {
        None if !stored && summary.len > 0 && summary.prefix.len() as u64 == summary.len => {
            Some(Sha256::digest(&summary.prefix).into())
        }
        sha256 => sha256,
    };
    Body {
        len: summary.len,
        sha256,
        stored: if stored {
            Stored::Prefix(summary.prefix)
        } else {
            if let Some(spare) = spare {
                keep_buffer(summary.prefix, spare);
            }
            Stored::None
        },
        complete: summary.complete,
    }
}

impl Parts {
    /// The record's spare buffer for one of its bodies' prefixes.
    fn take_buffer(&mut self, side: Side) -> Vec<u8> {
        let Some(record) = self.record.as_mut() else {
            return Vec::new();
        };
        std::mem::take(&mut record.buffers[side as usize])
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Never finished (a task cancelled half-way): no record will come for it.
        if self.remaining.load(Ordering::Acquire) > 0 {
            self.capture.sink.exchange_abandoned(self.start);
        }
    }
}

/// Which body of an exchange a tap measures.
#[derive(Clone, Copy)]
enum Side {
    Request,
    Response,
}

/// Leaves a tapped body's summary in its exchange, and counts the part done; lends the tap the
/// record's buffer for the body's prefix ([`TapDone::prefix_buffer`]).
pub struct BodyDone(Arc<Pending>, Side, Vec<u8>);

impl TapDone for BodyDone {
    fn body_done(&self, summary: BodySummary) {
        let pending = &self.0;
        let part = (summary, pending.capture.clock.now());
        pending.put(|p| {
            match self.1 {
                Side::Request => p.request_body.get_or_insert(part),
                Side::Response => p.response_body.get_or_insert(part),
            };
        });
        pending.part_done();
    }

    fn prefix_buffer(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.2)
    }
}

/// Why a connection closed, as the tape says it.
pub fn close_reason(result: Result<(), String>, shutting_down: bool) -> CloseReason {
    match result {
        Ok(()) if shutting_down => CloseReason::Shutdown,
        Ok(()) => CloseReason::Client,
        Err(e) => CloseReason::Error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::fields::read_for_tests;
    use crate::tape::{HeaderValue, Redaction};

    fn token_of(headers: &Headers) -> Redaction {
        match headers.get("authorization") {
            Some(HeaderValue::Redacted(r)) => r.clone(),
            other => panic!("the token is not redacted: {other:?}"),
        }
    }

    fn fields(path: &str, token: &str) -> RawFields {
        read_for_tests(
            format!("GET {path} HTTP/1.1\r\nHost: quay\r\nAuthorization: Bearer {token}\r\nUser-Agent: docker/27\r\n\r\n")
                .as_bytes(),
        )
    }

    #[test]
    fn a_connection_shares_its_last_copy_with_heads_of_the_same_fields_only() {
        let last = LastCopy::default();
        let first = last.of(&fields("/v2/", "tok-1"));
        // Another request line, the same fields: the same copy.
        let again = last.of(&fields("/v2/org/app/manifests/1", "tok-1"));
        assert!(Arc::ptr_eq(&first, &again));
        // Fields that differ: a copy of their own, which the next head then shares.
        let other = last.of(&fields("/v2/", "tok-2"));
        assert!(!Arc::ptr_eq(&first, &other));
        assert!(other.fields.same_fields(&fields("/", "tok-2")));
        assert!(Arc::ptr_eq(&other, &last.of(&fields("/", "tok-2"))));
        // References are taken ahead, a few at a time, and given back with the connection.
        let leasing = LastCopy::default();
        let copies: Vec<_> = (0..LEASED + 3)
            .map(|_| leasing.of(&fields("/", "tok-3")))
            .collect();
        let ahead = Arc::strong_count(&copies[0]) - copies.len() - 1;
        assert!(
            ahead > 0 && ahead < LEASED,
            "{ahead} references taken ahead"
        );
        drop(leasing);
        assert_eq!(Arc::strong_count(&copies[0]), copies.len());
        let weak = Arc::downgrade(&copies[0]);
        drop(copies);
        assert!(
            weak.upgrade().is_none(),
            "the copy is freed with its last record"
        );
        // Too large to keep for the connection's life: copied, never remembered.
        let huge = "t".repeat(LAST_COPY_LONGEST);
        let a = last.of(&fields("/", &huge));
        let b = last.of(&fields("/", &huge));
        assert!(!Arc::ptr_eq(&a, &b) && a.fields.same_fields(&b.fields));
    }

    #[test]
    fn a_shared_copy_is_redacted_once_per_redactor_and_as_a_fresh_redaction_would_be() {
        let redactor = Redactor::default();
        let copy = CopiedHead::of(&fields("/v2/", "tok-1"));
        let fresh = redacted(&redactor, Fields::Raw(&fields("/", "tok-1")));
        assert_eq!(copy.redacted(&redactor), fresh);
        let kept = |copy: &CopiedHead| copy.redacted.0.lock().unwrap().clone();
        assert!(kept(&copy).is_some_and(|(id, _)| id == redactor.id()));
        assert_eq!(copy.redacted(&redactor), fresh);
        // Another redactor (another key) gets its own redaction, not the one kept.
        let second = Redactor::default();
        let theirs = copy.redacted(&second);
        assert_eq!(
            theirs,
            redacted(&second, Fields::Raw(&fields("/", "tok-1")))
        );
        assert_ne!(token_of(&theirs).fingerprint, token_of(&fresh).fingerprint);
    }

    #[test]
    fn a_shared_copy_lends_the_redaction_it_keeps_and_makes_one_while_it_is_lent() {
        let redactor = Redactor::default();
        let copy = CopiedHead::of(&fields("/v2/", "tok-1"));
        let fresh = redacted(&redactor, Fields::Raw(&fields("/", "tok-1")));
        let lent = copy.lend(&redactor);
        assert_eq!(lent, fresh);
        // Lent out: whoever else asks gets one made for them, the same.
        assert_eq!(copy.lend(&redactor), fresh);
        // What is given back is what is lent next, not made again.
        let mut marked = lent.clone();
        marked.push("x-marked", "1");
        copy.give_back(&redactor, marked.clone());
        assert_eq!(copy.lend(&redactor), marked);
        // Kept by one redactor, it is never lent to another.
        copy.give_back(&redactor, marked);
        let second = Redactor::default();
        assert_eq!(
            copy.lend(&second),
            redacted(&second, Fields::Raw(&fields("/", "tok-1")))
        );
    }

    fn unredacted(id: u64, request: &Arc<CopiedHead>, response: &Arc<CopiedHead>) -> Unredacted {
        let exchange = Exchange {
            id,
            connection: 1,
            stream: 0,
            client: None,
            timing: Timing {
                start: id * 1000,
                request_done: 1,
                response_head: Some(2),
                response_done: 3,
            },
            request: Request {
                method: Method::parse("GET"),
                scheme: Scheme::Http,
                authority: "quay".into(),
                target: "/v2/".into(),
                version: HttpVersion::Http11,
                headers: Headers::new(),
                body: Body::empty(),
            },
            response: Ok(Response {
                status: 200,
                version: HttpVersion::Http11,
                headers: Headers::new(),
                body: Body::empty(),
            }),
            issued_secrets: Vec::new(),
            upgraded: false,
        };
        Unredacted {
            exchange: Some(Box::new(exchange)),
            buffers: Default::default(),
            raw: Heads {
                request: Some(request.clone()),
                response: Some(response.clone()),
                size: request.fields.approx_size() + response.fields.approx_size(),
            },
        }
    }

    #[test]
    fn unredacted_exchanges_are_written_redacted_and_their_copies_keep_the_redactions() {
        let finishing = Finishing {
            redactor: Arc::new(Redactor::default()),
            returns: Arc::default(),
            batch: Default::default(),
        };
        let redactor = &finishing.redactor;
        let with = Some(&finishing as &(dyn std::any::Any + Send + Sync));
        let request = CopiedHead::of(&fields("/v2/", "tok-1"));
        let response = CopiedHead::of(&read_for_tests(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nSet-Cookie: s=1\r\n\r\n",
        ));
        let fresh_request = redacted(redactor, Fields::Raw(&request.fields));
        let fresh_response = redacted(redactor, Fields::Raw(&response.fields));
        let mut written = Vec::new();
        for id in 1..=3 {
            Box::new(unredacted(id, &request, &response))
                .finish_into(with, &mut |r| written.push(r.clone()));
            for copy in [&request, &response] {
                let kept = copy.redacted.0.lock().unwrap().clone();
                assert!(kept.is_some_and(|(id, _)| id == redactor.id()));
            }
        }
        let finished = Box::new(unredacted(4, &request, &response)).finish(with);
        written.push(finished);
        assert_eq!(written.len(), 4);
        for (i, record) in written.iter().enumerate() {
            let Record::Exchange(e) = record else {
                panic!("not an exchange")
            };
            assert_eq!(e.id, i as u64 + 1);
            assert_eq!(e.request.headers, fresh_request);
            assert_eq!(e.response.as_ref().unwrap().headers, fresh_response);
        }
        assert!(matches!(
            fresh_response.get("set-cookie"),
            Some(HeaderValue::Redacted(_))
        ));
    }

    /// One exchange of [`records_made_in_boxes_given_back_hold_their_own_exchange_only`]'s,
    /// of one of six shapes, each leaving in its record what the others do not.
    fn exchange_of_shape(
        capture: &Arc<Capture>,
        connection: &Arc<Connection>,
        i: usize,
        runtime: &tokio::runtime::Runtime,
    ) {
        use crate::record::tap::TapBody;
        use http_body_util::{BodyExt, Full};
        // Through the taps the proxy puts on bodies, which take their buffers from the record.
        let tapped = |body: Vec<u8>, keep: usize, done: BodyDone| {
            let body = TapBody::spooling(Full::new(bytes::Bytes::from(body)), keep, None, done);
            runtime.block_on(body.collect()).unwrap();
        };
        let (method, target) = match i % 6 {
            0 => (
                "GET",
                format!("/v2/org/app/manifests/{i}?access_token=s{i}"),
            ),
            1 => ("PUT", format!("/v2/org/app/blobs/uploads/{i}")),
            2 => ("GET", "/v2/auth?service=quay".to_string()),
            3 => ("DELETE", format!("/v2/org/app/manifests/{i}")),
            4 => ("GET", "/ws".to_string()),
            _ => ("GET", format!("/v2/org/app/blobs/{i}")),
        };
        let request = http::Request::builder()
            .method(method)
            .uri(&target)
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let raw = fields(&target, &format!("tok-{i}"));
        let authority = http::HeaderValue::from_str(&format!("host-{i}")).unwrap();
        let authority = (i % 6 != 4).then_some(&authority);
        let start = capture.clock().now();
        let pending = capture.begin(connection, 0, &request, Fields::Raw(&raw), authority, start);
        if i % 6 == 1 {
            tapped(vec![b'u'; i], pending.request_keep(), pending.request_tap());
        } else {
            pending.request_bodiless();
        }
        if i % 6 == 3 {
            pending.failed(FailureKind::Reset, format!("reset {i}"));
            return;
        }
        if i % 6 == 4 {
            pending.set_upgraded();
        }
        let body = match i % 6 {
            2 => format!(r#"{{"token": "issued-{i}"}}"#).into_bytes(),
            5 => vec![b'b'; 5000 + i],
            _ => format!(r#"{{"i": {i}}}"#).into_bytes(),
        };
        let head = read_for_tests(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n");
        let status = http::StatusCode::from_u16(200 + (i % 6) as u16).unwrap();
        let at = capture.clock().now();
        let done = pending.response_head(status, http::Version::HTTP_11, Fields::Raw(&head), at);
        let keep = capture.keep_for(Some(b"application/json"), pending.token_endpoint());
        tapped(body, keep, done);
    }

    #[test]
    fn records_made_in_boxes_given_back_hold_their_own_exchange_only() {
        use crate::tape::capture::{spawn, CaptureLimits};
        use crate::tape::{ReadOptions, TapeHeader, TapeKind, TapeReader, TapeWriter};
        let dir = tempfile::tempdir().unwrap();
        let header = TapeHeader::new(TapeKind::Capture, "loadtape test");
        let writer = TapeWriter::create(dir.path(), header, Default::default()).unwrap();
        let (sink, thread) = spawn(writer, CaptureLimits::default());
        let config = Arc::new(RecordConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            "http://127.0.0.1:1".parse().unwrap(),
            dir.path().to_path_buf(),
        ));
        let metrics = Arc::new(Metrics::new(sink.counters().clone(), 1));
        let clock = Clock {
            start: std::time::Instant::now(),
        };
        let redactor = Redactor::default();
        let capture = Capture::per_thread(sink, redactor, clock, config, metrics, None, 1)
            .pop()
            .unwrap();
        let client = "127.0.0.1:4000".parse().unwrap();
        let connection = capture.connection_opened(client, HttpVersion::Http11, None);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let n = 6 * 40;
        for i in 0..n {
            if i == n / 2 {
                // The writer gives boxes back a batch at a time, and this thread keeps those it
                // takes (`SPARE_RECORDS`). Once it has one, or one waits for it, the next
                // exchange is made in a box a record was written from. (Once the writer has
                // written every record, at most a batch short of all the boxes is not back.)
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                let spare = || {
                    SPARE_RECORDS.with_borrow(|s| !s.is_empty())
                        || !capture.returns.0.lock().unwrap().is_empty()
                };
                while !spare() {
                    assert!(std::time::Instant::now() < deadline, "no box came back");
                    std::thread::yield_now();
                }
            }
            exchange_of_shape(&capture, &connection, i, &runtime);
        }
        capture.connection_closed(&connection, CloseReason::Client);
        drop((connection, capture));
        thread.finish().unwrap();

        let mut reader =
            TapeReader::open(&[dir.path().to_path_buf()], &ReadOptions::default()).unwrap();
        let records = reader.by_ref().collect::<Result<Vec<_>, _>>().unwrap();
        let exchanges: Vec<_> = (records.iter())
            .filter_map(|r| match r {
                Record::Exchange(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(exchanges.len(), n);
        let mut tokens = std::collections::HashSet::new();
        for (i, e) in exchanges.iter().enumerate() {
            let shape = i % 6;
            let request = &e.request;
            let expect_target = match shape {
                0 => format!("/v2/org/app/manifests/{i}?access_token=loadtape-redacted-"),
                1 => format!("/v2/org/app/blobs/uploads/{i}"),
                2 => "/v2/auth?service=quay".to_string(),
                3 => format!("/v2/org/app/manifests/{i}"),
                4 => "/ws".to_string(),
                _ => format!("/v2/org/app/blobs/{i}"),
            };
            assert!(
                request.target.starts_with(&expect_target),
                "{i}: {}",
                request.target
            );
            assert_eq!(shape == 0, request.target.len() > expect_target.len());
            let authority = if shape == 4 {
                String::new()
            } else {
                format!("host-{i}")
            };
            assert_eq!(request.authority, authority, "{i}");
            let method = ["GET", "PUT", "GET", "DELETE", "GET", "GET"][shape];
            assert_eq!(request.method, Method::parse(method), "{i}");
            assert!(
                tokens.insert(token_of(&request.headers).fingerprint),
                "{i}: a fresh token"
            );
            let uploaded = if shape == 1 {
                vec![b'u'; i]
            } else {
                Vec::new()
            };
            assert_eq!(request.body.len, uploaded.len() as u64, "{i}");
            assert_eq!(
                request.body.whole_inline(),
                (shape == 1).then_some(&uploaded[..])
            );
            assert!(request.body.complete, "{i}");
            assert_eq!(e.upgraded, shape == 4, "{i}");
            assert_eq!(e.issued_secrets.len(), usize::from(shape == 2), "{i}");
            match (&e.response, shape) {
                (Err(failure), 3) => {
                    assert_eq!(failure.kind, FailureKind::Reset);
                    assert_eq!(failure.detail, format!("reset {i}"));
                    assert_eq!(e.timing.response_head, None);
                }
                (Ok(response), _) if shape != 3 => {
                    assert_eq!(response.status, 200 + shape as u16, "{i}");
                    assert_eq!(response.headers.len(), 1, "{i}");
                    let body = match shape {
                        2 => None,
                        5 => Some(vec![b'b'; 5000 + i]),
                        _ => Some(format!(r#"{{"i": {i}}}"#).into_bytes()),
                    };
                    assert_eq!(response.body.whole_inline(), body.as_deref(), "{i}");
                    assert!(response.body.complete, "{i}");
                    assert!(e.timing.response_head.is_some());
                }
                (other, _) => panic!("{i}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_bearer_challenge_names_its_realm_host() {
        let quay = r#"Bearer realm="https://quay.example.com/v2/auth",service="quay.example.com",scope="repository:a/b:pull""#;
        assert_eq!(realm_host(quay), Some("quay.example.com"));
        let port = r#"Bearer realm="http://127.0.0.1:5000/token""#;
        assert_eq!(realm_host(port), Some("127.0.0.1:5000"));
        assert_eq!(realm_host(r#"Basic realm="registry""#), None);
        assert_eq!(realm_host("Bearer"), None);
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn prefetchw_is_used_where_the_kernel_says_the_processor_has_it() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap();
        let kernel_says = flags.split_whitespace().any(|f| f == "3dnowprefetch");
        assert_eq!(has_prefetchw(), kernel_says);
        // A hint: any address, mapped or not, and nothing changes.
        let bytes = vec![7u8; 300];
        prefetch_for_writing(bytes.as_ptr() as usize, bytes.len());
        prefetch_for_writing(64, 4096);
        assert!(bytes.iter().all(|&b| b == 7));
    }

    #[test]
    fn recalled_heads_are_redacted_as_a_fresh_redaction_would_be() {
        let head = |path: &str, token: &str| CopiedHead::of(&fields(path, token));
        let redactor = Redactor::default();
        let fresh = |copy: &Arc<CopiedHead>| redacted(&redactor, Fields::Raw(&copy.fields));
        let first = redacted_recalled(&redactor, &head("/v2/", "tok-1"));
        assert_eq!(first, fresh(&head("/v2/", "tok-1")));
        // The same fields under another path: recalled, and the same as redacting anew.
        let again = redacted_recalled(&redactor, &head("/v2/org/app/blobs/x", "tok-1"));
        assert!(again == first && again == fresh(&head("/", "tok-1")));
        // Another token: its own fingerprint, not the remembered one.
        let other = redacted_recalled(&redactor, &head("/v2/", "tok-2"));
        assert_eq!(other, fresh(&head("/v2/", "tok-2")));
        assert_ne!(token_of(&other).fingerprint, token_of(&first).fingerprint);
        // More heads than are remembered, then the first again.
        for i in 0..RECENT_HEADS * 2 {
            let token = format!("tok-{i}");
            let h = redacted_recalled(&redactor, &head("/v2/", &token));
            assert_eq!(h, fresh(&head("/v2/", &token)));
        }
        assert_eq!(redacted_recalled(&redactor, &head("/v2/", "tok-1")), first);
        assert_eq!(token_of(&first), token_of(&fresh(&head("/", "tok-1"))));
        // Another redactor (another key): nothing recalled from the first one's heads.
        let second = Redactor::default();
        let theirs = redacted_recalled(&second, &head("/v2/", "tok-1"));
        assert_eq!(
            theirs,
            redacted(&second, Fields::Raw(&fields("/v2/", "tok-1")))
        );
        assert_ne!(token_of(&theirs).fingerprint, token_of(&first).fingerprint);
    }
}
