//! The records a tape holds, as the rest of loadtape sees them.
//!
//! A record is what one stage hands the next: the proxy turns each request/response pair into an
//! [`Exchange`], each client connection into a [`ConnectionOpened`]/[`ConnectionClosed`] pair, each
//! stored body into a [`Blob`]; the writer notes records it had to drop in a [`Dropped`]. These
//! types are also the wire format (bincode, see `captures/README.md`), so two rules hold:
//!
//! * a field is only ever appended at the end of a top-level record struct, never inserted,
//!   removed or reordered, so an older reader decodes what it knows and skips the rest;
//! * a new kind of record gets a new kind code; readers keep records of kinds they do not know
//!   as [`Record::Unknown`] instead of failing.
//!
//! Timestamps are nanoseconds since the tape's epoch (a wall-clock instant in the tape header),
//! so they stay small and monotonic however the host's clock is set.

use std::net::SocketAddr;

use bincode::{Decode, Encode};
use serde::Serialize;

pub use super::headers::{HeaderValue, Headers, Redaction, SecretKind};

/// Nanoseconds since the tape epoch.
pub type Nanos = u64;

/// Kind codes as they stand in a frame (see `captures/README.md`, "Records").
pub mod kind {
    pub const EXCHANGE: u8 = 1;
    pub const CONNECTION_OPENED: u8 = 2;
    pub const CONNECTION_CLOSED: u8 = 3;
    pub const BLOB: u8 = 4;
    pub const DROPPED: u8 = 5;
    /// What a replay did with one recorded exchange (results tapes).
    pub const REPLAYED: u8 = 16;
    // 32..: observation samples (target metrics, database activity) on the replay's timeline.
}

/// One record of a tape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Exchange(Box<Exchange>),
    ConnectionOpened(Box<ConnectionOpened>),
    ConnectionClosed(Box<ConnectionClosed>),
    Blob(Box<Blob>),
    Dropped(Dropped),
    Replayed(Box<Replayed>),
    /// A record of a kind this build does not know (written by a newer loadtape). Kept whole so
    /// that tools copying tapes lose nothing.
    Unknown {
        code: u8,
        #[serde(skip)]
        payload: Vec<u8>,
    },
}

impl Record {
    /// The record's kind code on the wire.
    pub fn kind_code(&self) -> u8 {
        match self {
            Record::Exchange(_) => kind::EXCHANGE,
            Record::ConnectionOpened(_) => kind::CONNECTION_OPENED,
            Record::ConnectionClosed(_) => kind::CONNECTION_CLOSED,
            Record::Blob(_) => kind::BLOB,
            Record::Dropped(_) => kind::DROPPED,
            Record::Replayed(_) => kind::REPLAYED,
            Record::Unknown { code, .. } => *code,
        }
    }

    /// A short name of the kind, as `inspect` counts them.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Record::Exchange(_) => "exchange",
            Record::ConnectionOpened(_) => "connection_opened",
            Record::ConnectionClosed(_) => "connection_closed",
            Record::Blob(_) => "blob",
            Record::Dropped(_) => "dropped",
            Record::Replayed(_) => "replayed",
            Record::Unknown { .. } => "unknown",
        }
    }

    /// The instant the record is ordered by: an exchange's request start, an event's time.
    pub fn start(&self) -> Nanos {
        match self {
            Record::Exchange(e) => e.timing.start,
            Record::ConnectionOpened(c) => c.at,
            Record::ConnectionClosed(c) => c.at,
            Record::Blob(b) => b.at,
            Record::Dropped(d) => d.at,
            Record::Replayed(r) => r.intended,
            Record::Unknown { .. } => 0,
        }
    }

    /// The latest instant the record speaks of: when it could have been written at the earliest.
    pub fn end(&self) -> Nanos {
        match self {
            Record::Exchange(e) => e.timing.end(),
            Record::Replayed(r) => r.intended.saturating_add(r.latency()),
            other => other.start(),
        }
    }

    /// A cheap estimate of the record's size in memory, used to bound queues by bytes.
    pub fn approx_size(&self) -> usize {
        match self {
            Record::Exchange(e) => e.approx_size(),
            Record::Blob(b) => 64 + b.data.len(),
            Record::Unknown { payload, .. } => 16 + payload.len(),
            _ => 64,
        }
    }
}

/// One request/response pair as the proxy saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exchange {
    /// Unique within the tape; results and reports refer to it.
    pub id: u64,
    /// The client connection it came on ([`ConnectionOpened::id`]).
    pub connection: u64,
    /// The HTTP/2 stream id; 0 on HTTP/1.x.
    pub stream: u32,
    pub client: Option<SocketAddr>,
    pub timing: Timing,
    pub request: Request,
    /// What the upstream answered, or why it could not.
    pub response: Result<Response, UpstreamFailure>,
    /// Fingerprints of the credentials the upstream issued in the response body (token
    /// endpoints), whose bodies are never stored. A replay matches them against the redacted
    /// `Authorization` headers of later exchanges.
    pub issued_secrets: Vec<Redaction>,
    /// The connection was upgraded (WebSocket): the exchange's bytes after the upgrade are not on
    /// the tape.
    pub upgraded: bool,
}

impl Exchange {
    /// About how many bytes it holds in memory (the capture queue's bound).
    pub fn approx_size(&self) -> usize {
        256 + self.request.target.len()
            + self.request.authority.len()
            + self.request.headers.approx_size()
            + self.request.body.stored_len()
            + self
                .response
                .as_ref()
                .map_or(0, |r| r.headers.approx_size() + r.body.stored_len())
    }
}

/// When the phases of an exchange happened. `start` is absolute (ns since the tape epoch); the
/// rest are offsets from it, which keeps them small on the wire and makes phase durations direct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timing {
    /// The request head was received from the client.
    pub start: Nanos,
    /// The request body was received whole (offset from `start`); 0 when the request had no
    /// body (it was whole with its head; tapes from before 2026-11-27 may hold the moment
    /// the proxy let go of the empty body instead, a few microseconds later).
    pub request_done: u64,
    /// The upstream's response head arrived (offset from `start`); `None` when it never did.
    pub response_head: Option<u64>,
    /// The response body was sent whole, or the exchange failed (offset from `start`).
    pub response_done: u64,
}

impl Timing {
    /// The exchange's last instant, absolute.
    pub fn end(&self) -> Nanos {
        self.start
            .saturating_add(self.response_done.max(self.request_done))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Request {
    pub method: Method,
    pub scheme: Scheme,
    /// `Host` or `:authority` as the client sent it.
    pub authority: String,
    /// Path and query, as sent (secret-looking query values redacted).
    pub target: String,
    pub version: HttpVersion,
    pub headers: Headers,
    pub body: Body,
}

impl Request {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Response {
    pub status: u16,
    pub version: HttpVersion,
    pub headers: Headers,
    pub body: Body,
}

/// Why the upstream gave no response.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct UpstreamFailure {
    pub kind: FailureKind,
    /// A short human-readable cause.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The upstream refused the connection.
    Refused,
    Timeout,
    /// The upstream reset or closed the connection mid-exchange.
    Reset,
    Tls,
    /// The client went away before the exchange finished.
    ClientGone,
    Other,
}

impl FailureKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            FailureKind::Refused => "refused",
            FailureKind::Timeout => "timeout",
            FailureKind::Reset => "reset",
            FailureKind::Tls => "tls",
            FailureKind::ClientGone => "client_gone",
            FailureKind::Other => "other",
        }
    }
}

/// The HTTP method. The common ones are a byte on the wire and no allocation in memory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    Connect,
    Trace,
    Other(String),
}

impl Method {
    pub fn parse(s: &str) -> Method {
        match s {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "CONNECT" => Method::Connect,
            "TRACE" => Method::Trace,
            other => Method::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Connect => "CONNECT",
            Method::Trace => "TRACE",
            Method::Other(s) => s,
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(&self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub enum HttpVersion {
    Http10,
    Http11,
    H2,
    H3,
}

impl HttpVersion {
    /// As HTTP/1 writes it on the status line (and HAR stores it).
    pub fn as_str(&self) -> &'static str {
        match self {
            HttpVersion::Http10 => "HTTP/1.0",
            HttpVersion::Http11 => "HTTP/1.1",
            HttpVersion::H2 => "HTTP/2.0",
            HttpVersion::H3 => "HTTP/3.0",
        }
    }

    /// Reads the forms HAR producers use (`HTTP/1.1`, `http/2.0`, `h2`, `HTTP/2`).
    pub fn parse(s: &str) -> Option<HttpVersion> {
        match s.to_ascii_lowercase().as_str() {
            "http/1.0" => Some(HttpVersion::Http10),
            "http/1.1" | "" => Some(HttpVersion::Http11),
            "http/2" | "http/2.0" | "h2" | "h2c" => Some(HttpVersion::H2),
            "http/3" | "http/3.0" | "h3" => Some(HttpVersion::H3),
            _ => None,
        }
    }
}

impl Serialize for HttpVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A request or response body: what passed, and what of it was kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Body {
    /// Bytes that passed.
    pub len: u64,
    /// sha256 of the bytes that passed; `None` for an empty body or where it was not computed.
    #[serde(serialize_with = "serialize_opt_digest")]
    pub sha256: Option<[u8; 32]>,
    pub stored: Stored,
    /// False when the body was cut short (client or upstream went away mid-body).
    pub complete: bool,
}

impl Body {
    /// An empty, complete body.
    pub fn empty() -> Body {
        Body {
            len: 0,
            sha256: None,
            stored: Stored::None,
            complete: true,
        }
    }

    /// A body of which all of `bytes` is kept inline.
    pub fn inline(bytes: Vec<u8>) -> Body {
        use sha2::Digest;
        if bytes.is_empty() {
            return Body::empty();
        }
        Body {
            len: bytes.len() as u64,
            sha256: Some(sha2::Sha256::digest(&bytes).into()),
            stored: Stored::Prefix(bytes),
            complete: true,
        }
    }

    /// The bytes kept inline, when they are the whole body.
    pub fn whole_inline(&self) -> Option<&[u8]> {
        match &self.stored {
            Stored::Prefix(p) if p.len() as u64 == self.len => Some(p),
            _ => None,
        }
    }

    fn stored_len(&self) -> usize {
        match &self.stored {
            Stored::Prefix(p) => p.len(),
            _ => 0,
        }
    }
}

/// How much of a body the tape keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Stored {
    /// Only length and digest.
    None,
    /// The first bytes (all of them when as long as [`Body::len`]).
    Prefix(#[serde(serialize_with = "serialize_bytes_lossy")] Vec<u8>),
    /// The whole body is a [`Blob`] with this sha256, written earlier in the tape directory.
    Full(#[serde(serialize_with = "serialize_digest")] [u8; 32]),
}

/// A client connection was opened.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct ConnectionOpened {
    pub id: u64,
    pub at: Nanos,
    pub client: Option<SocketAddr>,
    pub version: HttpVersion,
    pub tls: Option<TlsInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct TlsInfo {
    /// E.g. `TLSv1.3`.
    pub protocol: String,
    pub alpn: Option<String>,
    pub server_name: Option<String>,
}

/// A client connection was closed.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct ConnectionClosed {
    pub id: u64,
    pub at: Nanos,
    pub reason: CloseReason,
    /// Exchanges the connection carried.
    pub exchanges: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The client closed it.
    Client,
    /// The proxy closed it (idle timeout, `Connection: close` from upstream).
    Proxy,
    /// The recorder was shutting down.
    Shutdown,
    Error(String),
    /// The tape does not say (imported traffic).
    Unknown,
}

/// A stored body, content-addressed. Written once per tape directory however often it passes,
/// always before the first exchange that refers to it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct Blob {
    pub at: Nanos,
    #[serde(serialize_with = "serialize_digest")]
    pub sha256: [u8; 32],
    #[serde(skip)]
    pub data: Vec<u8>,
}

/// The writer dropped records (its queue was full, or the disk refused them).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct Dropped {
    pub at: Nanos,
    /// Records dropped since the previous `Dropped` record of this recording.
    pub records: u64,
    pub bytes: u64,
}

/// What a replay did with one recorded exchange: when it was meant to go and went, how long each
/// phase took, what came back, beside what the recording says of the same exchange. Results
/// tapes hold these; their header's `source` options list the tapes replayed, in the order
/// [`Replayed::source`] counts them.
///
/// Times are like wrk2's and vegeta's: `intended` is the schedule's instant, and latency counts
/// from it (no coordinated omission); `sent` tells how late the request actually went.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct Replayed {
    /// Index of the source recording in the results header's `source` list.
    pub source: u32,
    /// The recorded exchange's id and connection (ids are unique per source recording).
    pub exchange: u64,
    pub connection: u64,
    /// The `--loop` pass, from 0.
    pub pass: u32,
    pub method: Method,
    /// The endpoint class (`GET /v2/{repo}/blobs/{digest}`).
    pub endpoint: String,
    /// When the schedule meant it to go out (ns since the results tape's epoch, which is the
    /// schedule's zero).
    pub intended: Nanos,
    /// Offset from `intended` at which the scheduler handed it to its connection: loadtape's own
    /// lag, which decides whether the run is valid.
    pub dispatched: u64,
    /// Offset from `intended` at which the request went out: includes waiting for a busy
    /// connection, the in-flight cap or an earlier exchange it depends on.
    pub sent: u64,
    /// Connection set-up this request waited for (a fresh connection), ns: TCP connect, TLS.
    pub connect: Option<u64>,
    pub tls: Option<u64>,
    /// Offsets from `sent`: the response head arrived; the response was read whole, or the
    /// request failed.
    pub first_byte: Option<u64>,
    pub done: u64,
    pub outcome: Outcome,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// What the recording says of the same exchange.
    pub recorded: RecordedOutcome,
    /// [`replayed_flags`].
    pub flags: u32,
    /// When the live status differed from the recorded one, what a report shows of why: the
    /// target sent and the start of the live body. Kept for a few requests per endpoint and
    /// status. (Appended to the record: results written before it read as `None`.)
    pub divergence: Option<Box<Divergence>>,
}

/// See [`Replayed::divergence`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct Divergence {
    /// Path and query as sent.
    pub target: String,
    /// The first bytes of the live response body (at most 512).
    pub body: Vec<u8>,
}

impl Replayed {
    /// From the intended send time to the response's last byte.
    pub fn latency(&self) -> u64 {
        self.sent.saturating_add(self.done)
    }

    pub fn status(&self) -> Option<u16> {
        match self.outcome {
            Outcome::Status(s) => Some(s),
            Outcome::Failed(_) | Outcome::Skipped => None,
        }
    }
}

/// Bits of [`Replayed::flags`].
pub mod replayed_flags {
    /// The request was changed from the recording (headers, path, host).
    pub const REWRITTEN: u32 = 1;
    /// Its body was not on the tape and was generated with the recorded length.
    pub const SYNTHESISED: u32 = 2;
    /// It went out later than intended because it waited (busy connection, in-flight cap,
    /// an exchange it depends on).
    pub const LATE: u32 = 4;
    /// It carried a value an earlier exchange should have issued live, and that exchange gave
    /// none: it went as recorded.
    pub const UNMAPPED: u32 = 8;
}

/// What came back to a replayed request.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Status(u16),
    /// No response: the connection was refused, reset, timed out, TLS failed.
    Failed(UpstreamFailure),
    /// Not sent: it needed a value no live answer gave, and the profile said skip.
    Skipped,
}

/// The recorded exchange's outcome and upstream timings, for like-for-like comparison.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct RecordedOutcome {
    /// `None` when the upstream failed.
    pub status: Option<u16>,
    /// From the request's head to the upstream's response head, ns.
    pub first_byte: Option<u64>,
    /// From the request's head to the response's last byte, ns.
    pub total: u64,
}

/// `sha256:<hex>`, as registries write digests.
pub fn digest_string(sha256: &[u8; 32]) -> String {
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    s.push_str(&hex(sha256));
    s
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn serialize_digest<S: serde::Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&digest_string(d))
}

fn serialize_opt_digest<S: serde::Serializer>(
    d: &Option<[u8; 32]>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&digest_string(d)),
        None => s.serialize_none(),
    }
}

fn serialize_bytes_lossy<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}
