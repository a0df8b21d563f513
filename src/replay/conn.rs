//! Live connections to the target, and one request's trip over them.
//!
//! A connection task owns one connection (TCP, TLS by rustls, then HTTP/1.1 or HTTP/2 by hyper's
//! low-level client, so that connect, TLS and first-byte times are measured where they happen)
//! and a queue of [`Job`]s from the clock. On HTTP/1.1 it sends them one after the other, as the
//! recorded client did; on HTTP/2 each goes out as its own stream at once. A connection the
//! target closed is opened again for the next request (the set-up is charged to it). Redirects
//! are responses like any other: nothing is ever sent anywhere but the target.
//!
//! Every request ends as one [`Replayed`] record on the results channel, whatever happened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::plan::Planned;
use super::request::{BodySource, Prepared, ReplayBody};
use crate::tape::{
    replayed_flags, Divergence, FailureKind, HttpVersion, Nanos, Outcome, Replayed, UpstreamFailure,
};

/// Where requests go.
#[derive(Clone)]
pub struct Target {
    pub https: bool,
    pub host: String,
    pub port: u16,
    pub authority: http::uri::Authority,
    /// TLS offering h2 and http/1.1 by ALPN, and offering http/1.1 only.
    pub tls_h2: Option<Arc<rustls::ClientConfig>>,
    pub tls_h1: Option<Arc<rustls::ClientConfig>>,
    pub server_name: Option<ServerName<'static>>,
    /// `--http1` / `--http2`: instead of what the tape recorded.
    pub force: Option<Protocol>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Target {
    /// The protocol to speak for a connection recorded with `version`.
    pub fn protocol_for(&self, version: HttpVersion) -> Protocol {
        self.force.unwrap_or(match version {
            HttpVersion::H2 | HttpVersion::H3 => Protocol::Http2,
            _ => Protocol::Http1,
        })
    }
}

/// Counters the progress line and the end of the run read; written with relaxed atomics.
#[derive(Default)]
pub struct Live {
    pub dispatched: AtomicU64,
    pub sent: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    /// The intended instant of the latest dispatched request, ns (tape time, scaled).
    pub clock: AtomicU64,
    /// p99 of latency over the last second, µs (the results thread updates it).
    pub recent_p99_us: AtomicU64,
    pub connections_opened: AtomicU64,
    /// Dispatched but never sent: the run was stopped.
    pub abandoned: AtomicU64,
    /// Tokens fetched after an unexpected 401 (registry token flow).
    pub token_fetches: AtomicU64,
    /// Not sent: a recorded value no live answer gave, and the profile says skip.
    pub skipped: AtomicU64,
}

impl Live {
    pub fn in_flight(&self) -> u64 {
        self.dispatched
            .load(Ordering::Relaxed)
            .saturating_sub(self.completed.load(Ordering::Relaxed))
            .saturating_sub(self.abandoned.load(Ordering::Relaxed))
    }
}

/// What every connection task shares.
pub struct Shared {
    pub target: Target,
    /// The schedule's zero.
    pub t0: Instant,
    pub results: UnboundedSender<Replayed>,
    pub in_flight: Option<Arc<tokio::sync::Semaphore>>,
    pub live: Arc<Live>,
    /// How long a request may take, from its sending to its last byte.
    pub timeout: Duration,
    /// Set on Ctrl-C: queued requests are abandoned, not sent.
    pub stop: tokio_util::sync::CancellationToken,
    /// Requests this clock dispatched that have not ended yet.
    pub outstanding: AtomicU64,
    /// Requests dispatched and not yet written, by intended instant: the results tape's frame
    /// watermarks (see `tape::capture::InFlight`).
    pub unwritten: Arc<crate::tape::capture::InFlight>,
    /// The instant of the next step this clock will take (everything before it is
    /// dispatched); `u64::MAX` once its plan is done. The results' watermark never passes the
    /// slowest clock's: a clock running late has not yet announced what it has still to send.
    pub progress: Arc<AtomicU64>,
    /// What to do with a request whose recorded value no live answer gave.
    pub unmappable: super::state::Unmappable,
    /// Divergences (live status not the recorded one) kept so far per endpoint and status:
    /// the results keep a few of each, not one per request. Touched only on a divergence.
    pub divergences: std::sync::Mutex<std::collections::HashMap<(String, u16), u32>>,
}

/// Divergences kept per endpoint and live status, per clock.
const DIVERGENCES_KEPT: u32 = 8;
/// Bytes of a diverging answer's body kept.
const DIVERGENCE_BODY: usize = 512;

impl Shared {
    fn now(&self) -> Nanos {
        self.t0.elapsed().as_nanos() as Nanos
    }
}

/// How far past its instant a request may go out and still count as on time, ns.
pub const LATE_AFTER: u64 = 1_000_000;

/// A request handed to a connection.
pub struct Job {
    pub planned: Box<Planned>,
    /// When the clock handed it over, ns from the schedule's zero.
    pub dispatched: Nanos,
}

enum Sender {
    H1(http1::SendRequest<ReplayBody>),
    H2(http2::SendRequest<ReplayBody>),
}

/// Set-up times of a fresh connection, ns.
#[derive(Clone, Copy, Default)]
struct Setup {
    connect: Option<u64>,
    tls: Option<u64>,
}

/// Runs one live connection: takes jobs until the clock drops the queue, then closes.
/// `on_idle` is called whenever the queue runs dry after a job (the pool's bookkeeping).
pub async fn run_connection(
    shared: Arc<Shared>,
    mut jobs: UnboundedReceiver<Job>,
    protocol: Protocol,
    open_now: bool,
    on_idle: Option<Box<dyn Fn() + Send + Sync>>,
) {
    let mut sender: Option<Sender> = None;
    let mut setup: Option<Setup> = None;
    if open_now {
        // Opened at the recorded instant, before its first request: the set-up is reported
        // with that request, which did not wait for it.
        if let Ok((s, su)) = open(&shared, protocol).await {
            sender = Some(s);
            setup = Some(su);
        }
    }
    while let Some(job) = jobs.recv().await {
        if shared.stop.is_cancelled() {
            shared.live.abandoned.fetch_add(1, Ordering::Relaxed);
            shared.outstanding.fetch_sub(1, Ordering::AcqRel);
            shared.unwritten.settled(job.planned.at);
            if let Some(d) = &job.planned.done {
                d.set();
            }
            continue;
        }
        let job_setup = setup.take();
        // Wait for what this request depends on before taking the connection.
        let waited = wait_turn(&shared, &job).await;
        let permit = match &shared.in_flight {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        // A connection the target closed (keep-alive timeout, `Connection: close`) is opened
        // again; the request was not sent, so nothing is lost.
        let usable = match sender.take() {
            Some(Sender::H1(mut h)) => h.ready().await.is_ok().then_some(Sender::H1(h)),
            Some(Sender::H2(h)) => (!h.is_closed()).then_some(Sender::H2(h)),
            None => None,
        };
        let (s, job_setup) = match usable {
            Some(s) => (s, job_setup),
            None => match open(&shared, protocol).await {
                Ok((s, su)) => (s, Some(su)),
                Err(failure) => {
                    finish(&shared, job, waited, None, Err(Some(failure)), 0);
                    drop(permit);
                    continue;
                }
            },
        };
        match s {
            Sender::H1(mut h1) => {
                let ok = exchange_h1(&shared, &mut h1, job, waited, job_setup).await;
                drop(permit);
                if ok {
                    sender = Some(Sender::H1(h1));
                }
                if jobs.is_empty() {
                    if let Some(f) = &on_idle {
                        f();
                    }
                }
            }
            Sender::H2(h2) => {
                let task_shared = shared.clone();
                let stream = h2.clone();
                tokio::spawn(async move {
                    exchange_h2(&task_shared, stream, job, waited, job_setup).await;
                    drop(permit);
                });
                sender = Some(Sender::H2(h2));
            }
        }
    }
}

/// Waits for the earlier exchanges this one depends on; true when it had to.
async fn wait_turn(_shared: &Shared, job: &Job) -> bool {
    let mut waited = false;
    for d in &job.planned.after {
        if !d.is_set() {
            d.wait().await;
            waited = true;
        }
    }
    waited
}

async fn open(shared: &Shared, protocol: Protocol) -> Result<(Sender, Setup), UpstreamFailure> {
    let t = &shared.target;
    let started = Instant::now();
    let tcp = tokio::time::timeout(
        shared.timeout,
        TcpStream::connect((t.host.as_str(), t.port)),
    )
    .await
    .map_err(|_| failure(FailureKind::Timeout, "connecting timed out"))?
    .map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::ConnectionRefused {
            FailureKind::Refused
        } else {
            FailureKind::Other
        };
        failure(kind, &format!("cannot connect: {e}"))
    })?;
    let _ = tcp.set_nodelay(true);
    let connect = started.elapsed().as_nanos() as u64;
    shared
        .live
        .connections_opened
        .fetch_add(1, Ordering::Relaxed);
    let mut setup = Setup {
        connect: Some(connect),
        tls: None,
    };
    if !t.https {
        let io = TokioIo::new(tcp);
        return handshake(io, protocol).await.map(|s| (s, setup));
    }
    let config = match protocol {
        Protocol::Http2 => t.tls_h2.clone(),
        Protocol::Http1 => t.tls_h1.clone(),
    }
    .expect("https targets have TLS configurations");
    let name = t.server_name.clone().expect("https targets have a name");
    let tls_started = Instant::now();
    let tls = tokio::time::timeout(
        shared.timeout,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| failure(FailureKind::Timeout, "TLS handshake timed out"))?
    .map_err(|e| failure(FailureKind::Tls, &format!("TLS handshake failed: {e}")))?;
    setup.tls = Some(tls_started.elapsed().as_nanos() as u64);
    // The server may decline h2: speak what ALPN settled.
    let negotiated = match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::Http2,
        _ => Protocol::Http1,
    };
    handshake(TokioIo::new(tls), negotiated)
        .await
        .map(|s| (s, setup))
}

async fn handshake<T>(io: TokioIo<T>, protocol: Protocol) -> Result<Sender, UpstreamFailure>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let fail = |e: hyper::Error| failure(FailureKind::Other, &format!("HTTP handshake: {e}"));
    match protocol {
        Protocol::Http1 => {
            let (sender, conn) = http1::handshake(io).await.map_err(fail)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H1(sender))
        }
        Protocol::Http2 => {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(fail)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H2(sender))
        }
    }
}

fn failure(kind: FailureKind, detail: &str) -> UpstreamFailure {
    UpstreamFailure {
        kind,
        detail: detail.to_string(),
    }
}

/// Puts the live values into a job's request (stateful replay): the live location, token,
/// ETags and JSON field values that earlier answers gave. A value that never came leaves the
/// recorded one and flags the job unmapped.
fn resolve(job: &mut Job) {
    let p = &mut job.planned;
    if let Some(live) = &p.live_target {
        match live
            .resolve(p.request.path.as_str())
            .and_then(|t| http::uri::PathAndQuery::try_from(t).ok())
        {
            Some(path) => p.request.path = path,
            None => p.flags |= replayed_flags::UNMAPPED,
        }
    }
    // Registry token flow: a token fetched after a 401 first (the one its token request got
    // was refused), then the live token of the recorded token request.
    let token = p.fallback.as_ref().and_then(|f| f.get()).or_else(|| {
        let issued = p.auth_token.as_ref()?;
        let value = issued
            .get()
            .and_then(|t| http::HeaderValue::from_str(&format!("Bearer {t}")).ok());
        if value.is_none() && p.fallback.is_none() {
            p.flags |= replayed_flags::UNMAPPED;
        }
        value
    });
    if let Some(v) = token {
        p.request.headers.insert(http::header::AUTHORIZATION, v);
    }
    for (name, issued) in &p.live_headers {
        match issued
            .get()
            .and_then(|v| http::HeaderValue::from_str(v).ok())
        {
            Some(v) => {
                p.request.headers.insert(name.clone(), v);
            }
            None => p.flags |= replayed_flags::UNMAPPED,
        }
    }
    if !p.live_values.is_empty() {
        let mut pairs = Vec::with_capacity(p.live_values.len());
        for (recorded, issued) in &p.live_values {
            match issued.get() {
                Some(live) => pairs.push((recorded.as_str(), live)),
                None => p.flags |= replayed_flags::UNMAPPED,
            }
        }
        let r = &mut p.request;
        if let Some(path) = super::state::replace_tokens(r.path.as_str(), &pairs)
            .and_then(|t| http::uri::PathAndQuery::try_from(t).ok())
        {
            r.path = path;
        }
        for v in r.headers.values_mut() {
            if let Some(new) = v
                .to_str()
                .ok()
                .and_then(|text| super::state::replace_tokens(text, &pairs))
                .and_then(|text| http::HeaderValue::from_str(&text).ok())
            {
                *v = new;
            }
        }
        if let BodySource::Bytes(b) = &r.body {
            if let Some(new) = std::str::from_utf8(b)
                .ok()
                .and_then(|text| super::state::replace_tokens(text, &pairs))
            {
                r.headers
                    .insert(http::header::CONTENT_LENGTH, new.len().into());
                r.body = BodySource::Bytes(bytes::Bytes::from(new));
            }
        }
    }
}

/// Builds the hyper request of a job: origin-form for HTTP/1.1, absolute for HTTP/2 (where the
/// URI gives `:scheme` and `:authority`). A job that may need a fresh token keeps a copy of
/// its request, to send again after fetching one.
fn build(shared: &Shared, job: &mut Job, absolute: bool) -> (http::Request<ReplayBody>, u64) {
    resolve(job);
    let p = &mut job.planned.request;
    if job.planned.fallback.is_some() {
        let copy = p.clone();
        return to_request(shared, copy, absolute);
    }
    let taken = Prepared {
        method: p.method.clone(),
        path: p.path.clone(),
        headers: std::mem::take(&mut p.headers),
        body: std::mem::replace(&mut p.body, BodySource::Empty),
        dropped_credentials: Vec::new(),
        authorization: None,
    };
    to_request(shared, taken, absolute)
}

fn to_request(shared: &Shared, p: Prepared, absolute: bool) -> (http::Request<ReplayBody>, u64) {
    let uri = if absolute {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(if shared.target.https {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        });
        parts.authority = Some(shared.target.authority.clone());
        parts.path_and_query = Some(p.path);
        http::Uri::from_parts(parts).expect("scheme, authority and path make a URI")
    } else {
        http::Uri::from(p.path)
    };
    let len = p.body.len();
    let mut headers = p.headers;
    if absolute {
        // HTTP/2 carries the authority in the URI.
        headers.remove(http::header::HOST);
    }
    let mut req = http::Request::new(p.body.into_body());
    *req.method_mut() = p.method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    if absolute {
        *req.version_mut() = http::Version::HTTP_2;
    }
    (req, len)
}

/// One request over HTTP/1.1; false when the connection cannot be used again.
async fn exchange_h1(
    shared: &Shared,
    sender: &mut http1::SendRequest<ReplayBody>,
    mut job: Job,
    waited: bool,
    setup: Option<Setup>,
) -> bool {
    let (req, len) = build(shared, &mut job, false);
    if skipped(shared, &job) {
        finish(shared, job, waited, setup, Err(None), 0);
        return true;
    }
    if sender.ready().await.is_err() {
        closed(shared, job, waited, setup);
        return false;
    }
    send_and_finish(shared, job, waited, setup, len, || sender.send_request(req)).await
}

async fn exchange_h2(
    shared: &Shared,
    mut sender: http2::SendRequest<ReplayBody>,
    mut job: Job,
    waited: bool,
    setup: Option<Setup>,
) {
    let (req, len) = build(shared, &mut job, true);
    if skipped(shared, &job) {
        finish(shared, job, waited, setup, Err(None), 0);
        return;
    }
    if sender.ready().await.is_err() {
        closed(shared, job, waited, setup);
        return;
    }
    send_and_finish(shared, job, waited, setup, len, || sender.send_request(req)).await;
}

/// Whether the job is left unsent: a live value it needs never came, and the profile says skip.
fn skipped(shared: &Shared, job: &Job) -> bool {
    job.planned.flags & replayed_flags::UNMAPPED != 0
        && shared.unmappable == super::state::Unmappable::Skip
}

/// Ends a job whose connection the target closed before it could go.
fn closed(shared: &Shared, job: Job, waited: bool, setup: Option<Setup>) {
    let f = failure(FailureKind::Reset, "the target closed the connection");
    finish(shared, job, waited, setup, Err(Some(f)), 0);
}

/// Stamps the send, sends, reads the response within the timeout and ends the job; true when
/// a whole response came (the connection can carry another request).
async fn send_and_finish<F>(
    shared: &Shared,
    job: Job,
    waited: bool,
    setup: Option<Setup>,
    len: u64,
    send: impl FnOnce() -> F,
) -> bool
where
    F: std::future::Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>>,
{
    let sent = shared.now();
    shared.live.sent.fetch_add(1, Ordering::Relaxed);
    let issues = Issues {
        location: job.planned.issues.clone(),
        token: job.planned.issues_token.clone(),
        etag: job.planned.issues_etag.clone(),
        json: job.planned.issues_json.clone(),
        recorded_status: job.planned.recorded.status,
    };
    let outcome = timed(shared, roundtrip(send(), shared, &issues)).await;
    let complete = outcome.is_ok();
    // A token the target refused, or never saw issued: fetch one and send again, once.
    let outcome = match outcome {
        Ok(r) if r.status == 401 && job.planned.recorded.status != Some(401) => {
            match refetch(shared, &job, r.challenge.as_deref(), &issues).await {
                Some(again) => again,
                None => Ok(r),
            }
        }
        other => other,
    };
    finish_sent(shared, job, waited, setup, sent, outcome.map_err(Some), len);
    complete
}

async fn timed(
    shared: &Shared,
    work: impl std::future::Future<Output = Result<Response, UpstreamFailure>>,
) -> Result<Response, UpstreamFailure> {
    match tokio::time::timeout(shared.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(failure(
            FailureKind::Timeout,
            "no complete response in time",
        )),
    }
}

/// After an unexpected 401: fetches a token as the live challenge says (its realm's path and
/// query, on the target, with the profile's account), then sends the request again with it,
/// over a connection of its own. `None` when the job has no account to fetch with or the
/// challenge names no token request.
async fn refetch(
    shared: &Shared,
    job: &Job,
    challenge: Option<&str>,
    issues: &Issues,
) -> Option<Result<Response, UpstreamFailure>> {
    let fallback = job.planned.fallback.as_ref()?;
    let target = challenge.and_then(super::auth::token_request_target)?;
    let path = http::uri::PathAndQuery::try_from(target).ok()?;
    shared.live.token_fetches.fetch_add(1, Ordering::Relaxed);
    let protocol = shared.target.protocol_for(job.planned.version);
    let (mut sender, _) = match open(shared, protocol).await {
        Ok(s) => s,
        Err(f) => return Some(Err(f)),
    };
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, fallback.account.clone());
    if let Some(host) = job.planned.request.headers.get(http::header::HOST) {
        headers.insert(http::header::HOST, host.clone());
    }
    let token_request = Prepared {
        method: http::Method::GET,
        path,
        headers,
        body: BodySource::Empty,
        dropped_credentials: Vec::new(),
        authorization: None,
    };
    let token_issues = Issues {
        token: Some(Arc::new(super::state::Issued::default())),
        ..Issues::default()
    };
    let answer = timed(
        shared,
        send_on(shared, &mut sender, token_request, &token_issues),
    )
    .await;
    match (&answer, token_issues.token.as_ref().and_then(|t| t.get())) {
        (Ok(r), Some(token)) if (200..300).contains(&r.status) => fallback.set(token),
        // The account was refused: the request's own 401 stands.
        _ => return None,
    }
    let mut again = job.planned.request.clone();
    again
        .headers
        .insert(http::header::AUTHORIZATION, fallback.get()?);
    Some(timed(shared, send_on(shared, &mut sender, again, issues)).await)
}

/// Sends one request on a connection of its own and reads the answer.
async fn send_on(
    shared: &Shared,
    sender: &mut Sender,
    request: Prepared,
    issues: &Issues,
) -> Result<Response, UpstreamFailure> {
    match sender {
        Sender::H1(h) => {
            h.ready().await.map_err(|e| classify(&e))?;
            let (req, _) = to_request(shared, request, false);
            roundtrip(h.send_request(req), shared, issues).await
        }
        Sender::H2(h) => {
            h.ready().await.map_err(|e| classify(&e))?;
            let (req, _) = to_request(shared, request, true);
            roundtrip(h.send_request(req), shared, issues).await
        }
    }
}

impl Issues {
    /// Nothing to take from an answer, but what a divergence needs.
    fn none(of: &Issues) -> Issues {
        Issues {
            recorded_status: of.recorded_status,
            ..Issues::default()
        }
    }
}

/// Live values a response gives (stateful replay).
#[derive(Default)]
struct Issues {
    location: Option<Arc<super::state::Issued>>,
    token: Option<Arc<super::state::Issued>>,
    etag: Option<Arc<super::state::Issued>>,
    /// Values of the profile's JSON fields: (JSON pointer, slot).
    json: Vec<(String, Arc<super::state::Issued>)>,
    /// The recorded status: an answer with another keeps the start of its body.
    recorded_status: Option<u16>,
}

/// Status, first byte and last byte (ns from the schedule's zero), bytes received.
struct Response {
    status: u16,
    first_byte: Nanos,
    done: Nanos,
    bytes: u64,
    /// A 401's `WWW-Authenticate`.
    challenge: Option<String>,
    /// The start of the body of an answer whose status was not the recorded one.
    diverging_body: Option<Vec<u8>>,
}

async fn roundtrip(
    send: impl std::future::Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>>,
    shared: &Shared,
    issues: &Issues,
) -> Result<Response, UpstreamFailure> {
    let response = send.await.map_err(|e| classify(&e))?;
    let first_byte = shared.now();
    // Live values come from answers that succeeded: a 401 before a token fetch, or an error
    // page, names no location or state a later request could use.
    let status = response.status().as_u16();
    let succeeded = (200..300).contains(&status) || status == 304;
    let issues = if succeeded {
        issues
    } else {
        &Issues::none(issues)
    };
    if let Some(issued) = &issues.etag {
        if let Some(etag) = response
            .headers()
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
        {
            issued.set(etag.trim().to_string());
        }
    }
    if let Some(issued) = &issues.location {
        if let Some(location) = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(super::state::location_path)
        {
            issued.set(location);
        }
    }
    let challenge = (status == 401)
        .then(|| response.headers().get(http::header::WWW_AUTHENTICATE))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = response.into_body();
    let mut bytes = 0u64;
    // A token endpoint's answer is read for its token (never stored anywhere else), an answer
    // with JSON fields later requests use for them.
    let mut kept = (issues.token.is_some() || !issues.json.is_empty()).then(Vec::new);
    let mut diverging_body = (issues.recorded_status.is_some_and(|r| r != status)).then(Vec::new);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| classify(&e))?;
        if let Some(d) = frame.data_ref() {
            bytes += d.len() as u64;
            if let Some(k) = kept.as_mut().filter(|k| k.len() < 65_536) {
                k.extend_from_slice(d);
            }
            if let Some(k) = diverging_body
                .as_mut()
                .filter(|k| k.len() < DIVERGENCE_BODY)
            {
                k.extend_from_slice(&d[..d.len().min(DIVERGENCE_BODY - k.len())]);
            }
        }
    }
    if let (Some(issued), Some(body)) = (&issues.token, &kept) {
        if let Some(token) = super::auth::token_in(body) {
            issued.set(token);
        }
    }
    if let (false, Some(body)) = (issues.json.is_empty(), &kept) {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
            for (pointer, issued) in &issues.json {
                if let Some(live) = v.pointer(pointer).and_then(super::state::scalar) {
                    issued.set(live);
                }
            }
        }
    }
    Ok(Response {
        status,
        first_byte,
        done: shared.now(),
        bytes,
        challenge,
        diverging_body,
    })
}

fn classify(e: &hyper::Error) -> UpstreamFailure {
    let kind = if e.is_timeout() {
        FailureKind::Timeout
    } else if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        FailureKind::Reset
    } else {
        FailureKind::Other
    };
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    failure(kind, &detail)
}

/// Ends a job that never went out (no connection; `Err(None)`: skipped).
fn finish(
    shared: &Shared,
    job: Job,
    waited: bool,
    setup: Option<Setup>,
    outcome: Result<Response, Option<UpstreamFailure>>,
    len: u64,
) {
    let now = shared.now();
    finish_sent(shared, job, waited, setup, now, outcome, len)
}

/// Whether another example of `endpoint` answering `status` is kept.
fn keep_divergence(shared: &Shared, endpoint: &str, status: u16) -> bool {
    let Ok(mut kept) = shared.divergences.lock() else {
        return false;
    };
    if kept.len() >= 4096 {
        return false;
    }
    let n = kept.entry((endpoint.to_string(), status)).or_default();
    *n += 1;
    *n <= DIVERGENCES_KEPT
}

fn finish_sent(
    shared: &Shared,
    job: Job,
    waited: bool,
    setup: Option<Setup>,
    sent: Nanos,
    outcome: Result<Response, Option<UpstreamFailure>>,
    len: u64,
) {
    let p = job.planned;
    if let Some(d) = &p.done {
        d.set();
    }
    let setup = setup.unwrap_or_default();
    let mut flags = p.flags;
    // Late: it went out more than a millisecond after its instant, whatever held it (a busy
    // connection, the in-flight cap, an exchange it depends on, or loadtape itself).
    if waited || sent.saturating_sub(p.at) > LATE_AFTER {
        flags |= replayed_flags::LATE;
    }
    let divergence = match &outcome {
        Ok(r) => r
            .diverging_body
            .as_ref()
            .filter(|_| keep_divergence(shared, &p.endpoint, r.status))
            .map(|body| {
                // A tape never holds a credential: secret query values are redacted as the
                // recorder does, and a token endpoint's answer is not kept.
                let redactor = crate::redact::Redactor::default();
                let token_endpoint = crate::redact::is_token_endpoint(p.request.path.path())
                    || p.issues_token.is_some()
                    || matches!(p.auth_use, super::auth::AuthUse::TokenRequest(_));
                let body = if token_endpoint {
                    b"(the answer of a token endpoint is not kept)".to_vec()
                } else {
                    body.clone()
                };
                Box::new(Divergence {
                    target: redactor.target(p.request.path.as_str()),
                    body,
                })
            }),
        Err(_) => None,
    };
    let (outcome, first_byte, done, bytes_received, bytes_sent) = match outcome {
        Ok(r) => (
            Outcome::Status(r.status),
            Some(r.first_byte.saturating_sub(sent)),
            r.done.saturating_sub(sent),
            r.bytes,
            len,
        ),
        Err(Some(f)) => {
            shared.live.failed.fetch_add(1, Ordering::Relaxed);
            (
                Outcome::Failed(f),
                None,
                shared.now().saturating_sub(sent),
                0,
                0,
            )
        }
        Err(None) => {
            shared.live.skipped.fetch_add(1, Ordering::Relaxed);
            (Outcome::Skipped, None, 0, 0, 0)
        }
    };
    let record = Replayed {
        source: p.conn.source,
        exchange: p.exchange,
        connection: p.conn.id,
        pass: p.conn.pass,
        method: p.method,
        endpoint: p.endpoint,
        intended: p.at,
        dispatched: job.dispatched.saturating_sub(p.at),
        sent: sent.saturating_sub(p.at),
        connect: setup.connect,
        tls: setup.tls,
        first_byte,
        done,
        outcome,
        bytes_sent,
        bytes_received,
        recorded: p.recorded,
        flags,
        divergence,
    };
    shared.live.completed.fetch_add(1, Ordering::Relaxed);
    let _ = shared.results.send(record);
    shared.outstanding.fetch_sub(1, Ordering::AcqRel);
}
