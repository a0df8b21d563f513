//! Forwarding: each request goes upstream as the client sent it, the response comes back as the
//! upstream sent it, both bodies streaming through taps.
//!
//! Only what RFC 9110 asks of an intermediary changes: hop-by-hop fields (`Connection` and the
//! fields it names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`)
//! are not forwarded, and `X-Forwarded-For`, `-Proto` and `-Host` are added unless turned off.
//! `Host` reaches the upstream as the client sent it (Quay builds its token realm and
//! `Location` URLs from it) unless `--upstream-host` says otherwise. An upstream that refuses,
//! resets or times out gets the client a quick 502 or 504 with a short body, and the tape the
//! failure's kind.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use anyhow::Context as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use smallvec::SmallVec;

use super::admin::{Counts, Metrics};
use super::exchange::{BodyDone, Capture, Connection, Fields};
use super::fields::{push_field, RawFields};
use super::h1::InBody;
use super::tap::TapBody;
use super::upstream::{self, Dedicated, DirectBody, SendError};
use super::RecordConfig;
use crate::tape::{FailureKind, Nanos};

/// A body on its way through the proxy.
// One per body, moved once into hyper: boxing the tap would cost an allocation per body.
#[allow(clippy::large_enum_variant)]
pub enum ProxyBody {
    /// Recorded: measured as it passes (a request's, or a response from the pooled client).
    Tapped(TapBody<InBody, BodyDone>),
    /// Not recorded (sampled out, excluded): passed as is.
    Plain(InBody),
    /// A response read off a dedicated upstream connection ([`upstream`]), recorded.
    TappedDirect(TapBody<DirectBody, BodyDone>),
    /// The same, not recorded.
    PlainDirect(DirectBody),
    /// Written by the proxy itself (an error response).
    Local(Option<Bytes>),
    /// A request's body on its way upstream, with how far it has gone ([`Upload`]).
    Upload(Box<Upload>),
}

/// A request body going upstream. Boxed (only requests with a body have one) and watched: the
/// upstream's timeout runs from the body's end, and while it goes, from its last byte taken
/// ([`upstream::Deadline`]), so that a slow 1 GiB layer push is not cut off midway.
pub struct Upload {
    body: ProxyBody,
    progress: Arc<Progress>,
}

/// How far a request body has gone upstream; written by whoever polls the body, read by the
/// upstream's timer.
#[derive(Default)]
pub struct Progress {
    /// Bytes taken so far.
    pub sent: AtomicU64,
    /// When the last of it was taken.
    pub ended: OnceLock<std::time::Instant>,
}

impl Upload {
    /// Out of line: most requests have no body.
    #[inline(never)]
    fn poll_watched(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = self.body.poll_uncounted(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, Bytes::len);
                self.progress.sent.fetch_add(n as u64, Ordering::Relaxed);
                // The end is not always polled for: a client of a body of known length stops
                // at its last byte.
                self.body.is_end_stream() || self.body.size_hint().exact() == Some(0)
            }
            Poll::Ready(_) => true,
            Poll::Pending => false,
        };
        if ended {
            self.progress.ended.get_or_init(std::time::Instant::now);
        }
        polled
    }
}

thread_local! {
    /// The counters of the proxy thread polling a body (set as the thread starts), for the
    /// bytes bodies carry: a body does not know its thread, and one counter per body would be
    /// a reference count the threads share.
    static BODY_COUNTS: std::cell::RefCell<Option<(Arc<Metrics>, usize)>> =
        const { std::cell::RefCell::new(None) };
}

/// Counts `n` bytes of a body passed, a request's or a response's, on this thread's counters.
fn count_body_bytes(request: bool, n: usize) {
    BODY_COUNTS.with_borrow(|counts| {
        if let Some((metrics, thread)) = counts {
            let c = metrics.of_thread(*thread);
            let counter = if request {
                &c.request_body_bytes
            } else {
                &c.response_body_bytes
            };
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl ProxyBody {
    /// The response's fields as the upstream wrote them, when it came from a dedicated
    /// connection (its `HeaderMap` is then empty); taken once.
    pub fn take_fields(&mut self) -> Option<RawFields> {
        match self {
            ProxyBody::TappedDirect(b) => b.inner_mut().take_fields(),
            ProxyBody::PlainDirect(b) => b.take_fields(),
            _ => None,
        }
    }
}

impl ProxyBody {
    /// The next frame, not counted in the body bytes (an [`Upload`]'s body is counted once,
    /// as the request's).
    fn poll_uncounted(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        fn boxed<E: Into<BoxError>>(
            p: Poll<Option<Result<Frame<Bytes>, E>>>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            p.map(|f| f.map(|r| r.map_err(Into::into)))
        }
        match self {
            ProxyBody::Tapped(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::Plain(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::TappedDirect(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::PlainDirect(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Upload(u) => u.poll_watched(cx),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = this.poll_uncounted(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                count_body_bytes(matches!(this, ProxyBody::Upload(_)), data.len());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Tapped(b) => b.is_end_stream(),
            ProxyBody::Plain(b) => b.is_end_stream(),
            ProxyBody::TappedDirect(b) => b.is_end_stream(),
            ProxyBody::PlainDirect(b) => b.is_end_stream(),
            ProxyBody::Local(b) => b.is_none(),
            ProxyBody::Upload(u) => u.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Tapped(b) => b.size_hint(),
            ProxyBody::Plain(b) => b.size_hint(),
            ProxyBody::TappedDirect(b) => b.size_hint(),
            ProxyBody::PlainDirect(b) => b.size_hint(),
            ProxyBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
            ProxyBody::Upload(u) => u.body.size_hint(),
        }
    }
}

/// A response from the upstream, from either way to it.
// Moved once, taken apart at once: boxing the direct one would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Answer {
    Pooled(Response<Incoming>),
    Direct(Response<DirectBody>),
}

/// Connects to the configured upstream whatever authority a request names. Requests carry the
/// client's `Host` as their authority, so that an HTTP/2 upstream sees it as `:authority`
/// (Quay builds its token realm and `Location` URLs from it); the connection, SNI and
/// certificate check are the upstream's own.
#[derive(Clone)]
pub struct FixedUpstream<C> {
    inner: C,
    upstream: http::Uri,
}

impl<C> tower_service::Service<http::Uri> for FixedUpstream<C>
where
    C: tower_service::Service<http::Uri>,
{
    type Response = C::Response;
    type Error = C::Error;
    type Future = C::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, _requested: http::Uri) -> Self::Future {
        self.inner.call(self.upstream.clone())
    }
}

/// Sends requests upstream and responses back. One per recorder, shared by all connections.
pub struct Proxy {
    config: Arc<RecordConfig>,
    client: Client<FixedUpstream<HttpsConnector<HttpConnector>>, ProxyBody>,
    /// The scheme of the upstream, for request URIs.
    scheme: http::uri::Scheme,
    /// `scheme://authority` of the upstream, for messages.
    base: String,
    /// `host:port` of a plain-HTTP/1.1 upstream, which HTTP/1.1 client connections reach over
    /// connections of their own ([`super::upstream`]).
    direct: Option<String>,
    /// `Host` for requests that name none: `--upstream-host`, else the upstream's authority.
    default_host: HeaderValue,
    /// `--upstream-host`, for every request.
    fixed_host: Option<HeaderValue>,
    capture: Arc<Capture>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    pub fn new(
        config: Arc<RecordConfig>,
        capture: Arc<Capture>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Proxy> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
        // An http upstream is never reached over TLS: the system's roots (read per proxy
        // thread) are not needed.
        let tls = if config.upstream.scheme() == Some(&http::uri::Scheme::HTTPS) {
            super::listen::upstream_tls(&config)?
        } else {
            crate::tls::trusting_nothing()?
        };
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let https = if config.upstream_h2c {
            builder.enable_http2().wrap_connector(http)
        } else {
            builder.enable_all_versions().wrap_connector(http)
        };
        let upstream_authority = config
            .upstream
            .authority()
            .context("the upstream URL has no host")?
            .to_string();
        let scheme = config
            .upstream
            .scheme()
            .cloned()
            .unwrap_or(http::uri::Scheme::HTTP);
        let base = format!("{scheme}://{upstream_authority}");
        let fixed = FixedUpstream {
            inner: https,
            upstream: base.parse().context("the upstream URL")?,
        };
        let client = Client::builder(TokioExecutor::new())
            .http2_only(config.upstream_h2c)
            .build(fixed);
        let direct = (scheme == http::uri::Scheme::HTTP && !config.upstream_h2c).then(|| {
            let port = config.upstream.port_u16().unwrap_or(80);
            let host = config.upstream.host().unwrap_or_default();
            format!("{host}:{port}")
        });
        let fixed_host = match &config.upstream_host {
            Some(h) if !is_authority(h.as_bytes()) => {
                anyhow::bail!("--upstream-host {h:?} is not a host[:port] (try quay.example.com)")
            }
            Some(h) => Some(
                HeaderValue::from_str(h)
                    .with_context(|| format!("--upstream-host {h:?} cannot be a Host header"))?,
            ),
            None => None,
        };
        let default_host = match &fixed_host {
            Some(h) => h.clone(),
            None => HeaderValue::from_str(&upstream_authority)
                .context("the upstream's authority cannot be a Host header")?,
        };
        Ok(Proxy {
            config,
            client,
            scheme,
            base,
            direct,
            default_host,
            fixed_host,
            capture,
            metrics,
        })
    }

    /// The counters of this proxy's thread.
    pub fn counts(&self) -> &Counts {
        self.metrics.of_thread(self.capture.thread())
    }

    /// Counts the bytes of the bodies this thread passes on this proxy's counters: called
    /// once, on the proxy's thread, as it starts.
    pub fn count_bodies_here(&self) {
        let counts = (self.metrics.clone(), self.capture.thread());
        BODY_COUNTS.with_borrow_mut(|c| *c = Some(counts));
    }

    /// The capture of this proxy's thread.
    pub fn capture(&self) -> &Arc<Capture> {
        &self.capture
    }

    /// Handles one request from `connection` (on HTTP/2 stream `stream`, 0 on HTTP/1.x), whose
    /// upstream connection, on HTTP/1.x, is `dedicated`. Its fields are in `raw` when the
    /// recorder read its head itself (`request`'s map is then empty).
    pub async fn handle(
        self: Arc<Self>,
        mut request: Request<InBody>,
        raw: Option<RawFields>,
        connection: Arc<Connection>,
        stream: u32,
        dedicated: Arc<Dedicated>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let direct = self
            .direct
            .as_deref()
            .filter(|_| request.version() != http::Version::HTTP_2);
        // Fields read off the wire go on as they are on a connection of the recorder's own;
        // hyper's pooled client takes a map.
        let raw = match raw {
            Some(raw) if direct.is_none() => {
                *request.headers_mut() = raw.to_map();
                None
            }
            raw => raw,
        };
        // A protocol switch (WebSocket): the upgrade fields go on to the upstream, and after its
        // 101 the two connections are joined byte for byte. The tape notes the exchange as
        // upgraded; what follows the switch is not recorded. (A switch the recorder's own
        // HTTP/1.1 server read went to hyper first: `raw` never asks for one.)
        let upgrade = upgrade_requested(request.headers()).then(|| {
            let protocol = request.headers().get(header::UPGRADE).cloned();
            (hyper::upgrade::on(&mut request), protocol)
        });
        let started = std::time::Instant::now();
        let start = self.capture.clock().at(started);
        let m = self.counts();
        m.requests.fetch_add(1, Ordering::Relaxed);
        m.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(m);
        // The proxy's own answers are counted with the upstream's.
        let answer = |status: StatusCode, text: &str| {
            m.count_status(status.as_u16());
            local(status, text)
        };

        let (mut parts, body) = request.into_parts();
        // The Host the client named: its request's authority (HTTP/2, absolute form) or `Host`.
        let named = match (parts.uri.authority(), &raw) {
            (Some(a), _) => HeaderValue::from_str(a.as_str()).ok(),
            (None, Some(raw)) => raw
                .get_shared("host")
                .and_then(|h| HeaderValue::from_maybe_shared(h).ok()),
            (None, None) => parts.headers.get(header::HOST).cloned(),
        };
        if let Some(bad) = named.as_ref().filter(|h| !is_authority(h.as_bytes())) {
            // RFC 9112, 3.2: a server answers 400 to an invalid Host. Passed on, it would reach
            // the upstream's URI (the pooled client builds it from the name) unlike the tape's.
            let shown = String::from_utf8_lossy(bad.as_bytes()).into_owned();
            return Ok(answer(
                StatusCode::BAD_REQUEST,
                &format!("loadtape: the request's Host {shown:?} is not a host[:port]"),
            ));
        }
        let pending = self.capture.wants(parts.uri.path()).then(|| {
            let fields = raw
                .as_ref()
                .map_or(Fields::Map(&parts.headers), Fields::Raw);
            self.capture
                .begin(&connection, stream, &parts, fields, named.as_ref(), start)
        });
        // The Host the upstream sees: `--upstream-host`, else the client's, else the upstream's.
        let host = match (&self.fixed_host, &named) {
            (Some(fixed), _) => fixed.clone(),
            (None, Some(named)) => named.clone(),
            (None, None) => self.default_host.clone(),
        };
        if direct.is_some() {
            // Origin form on a connection of its own: the upstream reads the name in `Host`.
            if parts.uri.authority().is_some() {
                parts.uri = match parts.uri.path_and_query() {
                    Some(p) => http::Uri::from(p.clone()),
                    None => http::Uri::from_static("/"),
                };
            }
        } else {
            // The pooled client wants an absolute URI; it connects to the upstream whatever
            // authority this names (FixedUpstream), and an HTTP/2 upstream sees it as
            // `:authority`.
            let host = host.to_str().unwrap_or_default();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            parts.uri = match format!("{}://{host}{path}", self.scheme).parse::<http::Uri>() {
                Ok(u) => u,
                Err(e) => {
                    return Ok(answer(
                        StatusCode::BAD_REQUEST,
                        &format!("bad request target: {e}"),
                    ))
                }
            };
        }
        let forwarded_headers = self.config.forwarded_headers;
        let outgoing = match raw {
            // Hop-by-hop fields are marked as the head is read; what forwarding replaces is
            // left out as the fields are written (`Outgoing::write`).
            Some(fields) => {
                let mut added = SmallVec::new();
                added.push((header::HOST, host));
                if forwarded_headers {
                    let earlier = fields.get_forwarded(X_FORWARDED_FOR.as_str());
                    added.extend(forwarded(earlier, &connection, named.as_ref()));
                }
                Some(Outgoing {
                    fields,
                    forwarded: forwarded_headers,
                    added,
                })
            }
            None => {
                strip_hop_by_hop(&mut parts.headers);
                if let Some((_, Some(protocol))) = &upgrade {
                    parts.headers.insert(header::UPGRADE, protocol.clone());
                    parts
                        .headers
                        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                }
                if forwarded_headers {
                    let earlier = parts.headers.get(X_FORWARDED_FOR).map(|v| v.as_bytes());
                    let added: SmallVec<[_; 3]> =
                        forwarded(earlier, &connection, named.as_ref()).collect();
                    // The client's are replaced, also one `added` has no value for.
                    parts.headers.remove(X_FORWARDED_HOST);
                    for (name, value) in added {
                        parts.headers.insert(name, value);
                    }
                }
                parts.headers.insert(header::HOST, host);
                None
            }
        };
        parts.version = http::Version::HTTP_11;
        // A body goes watched ([`Upload`]); made in place, since a body moved is copied.
        let mut progress = None;
        let mut watched = |body| {
            let watching = Arc::<Progress>::default();
            progress = Some(watching.clone());
            ProxyBody::Upload(Box::new(Upload {
                body,
                progress: watching,
            }))
        };
        let body = match &pending {
            // Nothing to measure: done with its head (and a clock read the fewer).
            Some(p) if body.is_end_stream() => {
                p.request_bodiless();
                ProxyBody::Plain(body)
            }
            Some(p) => watched(ProxyBody::Tapped(TapBody::spooling(
                body,
                p.request_keep(),
                self.capture.spool().filter(|_| p.request_spooled()),
                p.request_tap(),
            ))),
            None if body.is_end_stream() => ProxyBody::Plain(body),
            None => watched(ProxyBody::Plain(body)),
        };
        let deadline = upstream::Deadline {
            timeout: self.config.upstream_timeout,
            started,
            progress: progress.as_deref(),
        };
        // `None`: the upstream took too long (`deadline`).
        let sent = match direct {
            // Lent, not moved: a request's parts and body passed down by value were copied at
            // every level of the futures that send it.
            Some(address) => {
                let mut body = Some(body);
                let outgoing = outgoing.as_ref();
                upstream::send(&dedicated, address, &parts, &mut body, outgoing, &deadline)
                    .await
                    .map(|r| r.map(Answer::Direct))
            }
            None => {
                let upstream = Request::from_parts(parts, body);
                let timer = std::pin::pin!(tokio::time::sleep_until(deadline.first()));
                let work = std::pin::pin!(self.client.request(upstream));
                upstream::within(work, timer, &deadline)
                    .await
                    .map(|r| r.map(Answer::Pooled).map_err(SendError::Pooled))
            }
        };
        let upstream_at = self.capture.clock().now();
        m.upstream_latency
            .observe(upstream_at.saturating_sub(start));
        let response = match sent {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                let (kind, status) = classify(&e);
                let detail = describe(&e);
                if kind != FailureKind::ClientGone {
                    m.upstream_failures.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!("upstream failed: {detail}");
                if let Some(p) = &pending {
                    p.failed(kind, detail.clone());
                }
                return Ok(answer(
                    status,
                    &format!("loadtape: upstream {}: {detail}", self.base),
                ));
            }
            None => {
                m.upstream_failures.fetch_add(1, Ordering::Relaxed);
                let detail = deadline.missed();
                if let Some(p) = &pending {
                    p.failed(FailureKind::Timeout, detail.clone());
                }
                return Ok(answer(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("loadtape: upstream {}: {detail}", self.base),
                ));
            }
        };
        let status = match &response {
            Answer::Pooled(r) => r.status(),
            Answer::Direct(r) => r.status(),
        };
        if status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some((client_side, _)) = upgrade {
                return Ok(self.switch(client_side, response, pending.as_ref(), upstream_at));
            }
        }
        let pending = pending.as_ref();
        let (mut parts, body) = match response {
            Answer::Pooled(r) => {
                let (mut parts, body) = r.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let body = InBody::Hyper(body);
                let body = match self.recorded(
                    pending,
                    &parts,
                    Fields::Map(&parts.headers),
                    upstream_at,
                ) {
                    Some((done, keep, spool)) => {
                        ProxyBody::Tapped(TapBody::spooling(body, keep, spool, done))
                    }
                    None => ProxyBody::Plain(body),
                };
                (parts, body)
            }
            Answer::Direct(r) => {
                // Its hop-by-hop fields were left out as its head was read, and its fields
                // stay as the upstream wrote them, in the body, for the client's side.
                let (parts, body) = r.into_parts();
                let fields = body
                    .fields()
                    .map_or(Fields::Map(&parts.headers), Fields::Raw);
                let body = match self.recorded(pending, &parts, fields, upstream_at) {
                    Some((done, keep, spool)) => {
                        ProxyBody::TappedDirect(TapBody::spooling(body, keep, spool, done))
                    }
                    None => ProxyBody::PlainDirect(body),
                };
                (parts, body)
            }
        };
        m.count_status(parts.status.as_u16());
        // The client's connection has its own version (hyper writes HTTP/2 frames regardless);
        // an HTTP/1.0 upstream must not turn the client's keep-alive connection into 1.0.
        parts.version = http::Version::HTTP_11;
        Ok(Response::from_parts(parts, body))
    }
}

impl Proxy {
    /// What taps a response's body when the exchange is recorded: the end of its record, how
    /// much of the body it keeps, and where the rest spools.
    fn recorded(
        &self,
        pending: Option<&Arc<super::exchange::Pending>>,
        parts: &http::response::Parts,
        fields: Fields<'_>,
        at: Nanos,
    ) -> Option<(BodyDone, usize, Option<Arc<super::spool::Spool>>)> {
        let p = pending?;
        let done = p.response_head(parts.status, parts.version, fields, at);
        let keep = self
            .capture
            .keep_for(fields.content_type(), p.token_endpoint());
        let spooled = !p.token_endpoint() && self.capture.spools(fields.content_type());
        let spool = self.capture.spool().filter(|_| spooled);
        Some((done, keep, spool))
    }

    /// The upstream agreed to switch protocols: answer the client's 101 and, once both sides
    /// have switched, copy bytes both ways until either closes.
    fn switch(
        &self,
        client_side: hyper::upgrade::OnUpgrade,
        response: Answer,
        pending: Option<&Arc<super::exchange::Pending>>,
        at: Nanos,
    ) -> Response<ProxyBody> {
        self.counts().count_status(101);
        // Noted before the 101's tap ends, which completes the exchange's record.
        if let Some(p) = pending {
            p.set_upgraded();
        }
        let (parts, upstream_side) = match response {
            Answer::Pooled(mut r) => {
                let upstream_side = hyper::upgrade::on(&mut r);
                let (parts, body) = r.into_parts();
                if let Some(p) = pending {
                    // A 101 has no body: its tap ends at once.
                    let fields = Fields::Map(&parts.headers);
                    let done = p.response_head(parts.status, parts.version, fields, at);
                    drop(TapBody::new(body, 0, done));
                }
                (parts, Switch::Pooled(upstream_side))
            }
            Answer::Direct(r) => {
                let switched = r.extensions().get::<upstream::Switched>().cloned();
                let (mut parts, mut body) = r.into_parts();
                // hyper writes the 101: it takes a map.
                if let Some(fields) = body.take_fields() {
                    parts.headers = fields.to_map();
                }
                if let Some(p) = pending {
                    let fields = Fields::Map(&parts.headers);
                    let done = p.response_head(parts.status, parts.version, fields, at);
                    drop(TapBody::new(body, 0, done));
                }
                (parts, Switch::Direct(switched.and_then(|s| s.take())))
            }
        };
        tokio::spawn(async move {
            let client = match client_side.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("protocol switch failed on the client's side: {e}");
                    return;
                }
            };
            let mut client = hyper_util::rt::TokioIo::new(client);
            let _ = match upstream_side {
                Switch::Pooled(upstream_side) => match upstream_side.await {
                    Ok(upstream) => {
                        let mut upstream = hyper_util::rt::TokioIo::new(upstream);
                        tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                    }
                    Err(e) => {
                        tracing::debug!("protocol switch failed on the upstream's side: {e}");
                        return;
                    }
                },
                Switch::Direct(Some((mut upstream, early))) => {
                    use tokio::io::AsyncWriteExt;
                    // What the upstream sent right after its 101 goes first.
                    if client.write_all(&early).await.is_err() {
                        return;
                    }
                    tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                }
                Switch::Direct(None) => return,
            };
        });
        Response::from_parts(parts, ProxyBody::Local(None))
    }
}

/// The upstream's side of a protocol switch.
enum Switch {
    Pooled(hyper::upgrade::OnUpgrade),
    Direct(Option<(tokio::net::TcpStream, Bytes)>),
}

/// Whether an HTTP/1.1 request asks to switch protocols (`Connection: upgrade` and `Upgrade`).
fn upgrade_requested(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Whether `host` can be a URI's authority (`host`, `host:port`, `[v6]:port`): no path, query,
/// fragment, user info, space or anything outside the characters RFC 3986 allows there.
fn is_authority(host: &[u8]) -> bool {
    !host.is_empty()
        && host.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'['
                        | b']'
                )
        })
}

/// Decrements the in-flight gauge however the handler ends.
struct InFlight<'a>(&'a Counts);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response written by the proxy itself.
fn local(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::Local(Some(Bytes::from(format!("{text}\n")))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The fields that concern one connection only (RFC 9110, 7.6.1), beside those `Connection`
/// names.
pub const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes the fields that concern one connection only (RFC 9110, 7.6.1).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none but `Connection` (and `Transfer-Encoding`): one pass over the
    // names decides, rather than a lookup per field that might be there.
    let hop_by_hop = |n: &HeaderName| HOP_BY_HOP.contains(n);
    if !headers.keys().any(hop_by_hop) {
        return;
    }
    // Split as bytes, as the recorder's own HTTP/1.1 reads it (`framing::Framed`): a value
    // that is not all ASCII still names the fields it names.
    let mut named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|n| {
            // The common `keep-alive` and `close` name no field worth a lookup of its own.
            !n.eq_ignore_ascii_case(b"keep-alive") && !n.eq_ignore_ascii_case(b"close")
        })
        .filter_map(|n| HeaderName::from_bytes(n).ok())
        .collect();
    named.extend(headers.keys().filter(|n| hop_by_hop(n)).cloned());
    for name in named {
        headers.remove(name);
    }
}

/// `X-Forwarded-For`, `-Proto` and `-Host` for a request from `connection` that named `host`,
/// the first after an `X-Forwarded-For` the request brought (`earlier`).
fn forwarded(
    earlier: Option<&[u8]>,
    connection: &Connection,
    host: Option<&HeaderValue>,
) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
    let ip = &connection.client_ip;
    // An earlier value that is not visible ASCII (as `HeaderValue::to_str` reads it) is
    // replaced rather than extended.
    let visible = |v: &[u8]| v.iter().all(|&b| b == b'\t' || (32..127).contains(&b));
    let chain = match earlier.filter(|v| visible(v)) {
        Some(earlier) => {
            let earlier = String::from_utf8_lossy(earlier);
            HeaderValue::from_str(&format!("{earlier}, {}", connection.client.ip()))
                .unwrap_or_else(|_| ip.clone())
        }
        None => ip.clone(),
    };
    let proto = HeaderValue::from_static(connection.scheme.as_str());
    let host = host.map(|v| (X_FORWARDED_HOST, v.clone()));
    [(X_FORWARDED_FOR, chain), (X_FORWARDED_PROTO, proto)]
        .into_iter()
        .chain(host)
}

/// A request's fields as they go upstream on a connection of the recorder's own: the client's
/// as it sent them, less the hop-by-hop ones and those forwarding replaces, then forwarding's.
pub struct Outgoing {
    fields: RawFields,
    /// The client's `X-Forwarded-*` are replaced (`added` has the new ones).
    forwarded: bool,
    added: SmallVec<[(HeaderName, HeaderValue); 4]>,
}

impl Outgoing {
    /// Writes the fields as `name: value` lines; whether a `Content-Length` is among them.
    pub fn write(&self, out: &mut Vec<u8>) -> bool {
        let mut length = false;
        self.fields.write_forwarded(out, |name| {
            length |= name.len() == 14 && name.eq_ignore_ascii_case(b"content-length");
            !self.replaced(name)
        });
        for (name, value) in &self.added {
            push_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
        length
    }

    fn replaced(&self, name: &[u8]) -> bool {
        let is = |n: &HeaderName| name.eq_ignore_ascii_case(n.as_str().as_bytes());
        match name.len() {
            4 => is(&header::HOST),
            15..=17 if self.forwarded => {
                is(&X_FORWARDED_FOR) || is(&X_FORWARDED_PROTO) || is(&X_FORWARDED_HOST)
            }
            _ => false,
        }
    }
}

/// What kind of upstream failure an error is, and the status the client gets for it.
fn classify(e: &SendError) -> (FailureKind, StatusCode) {
    // The request's own body failed: its client went away mid-upload, not the upstream.
    if let SendError::Body(_) = e {
        return (FailureKind::ClientGone, StatusCode::BAD_GATEWAY);
    }
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match io.kind() {
                ConnectionRefused => (FailureKind::Refused, StatusCode::BAD_GATEWAY),
                TimedOut => (FailureKind::Timeout, StatusCode::GATEWAY_TIMEOUT),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => {
                    (FailureKind::Reset, StatusCode::BAD_GATEWAY)
                }
                _ if s.to_string().contains("certificate") || s.to_string().contains("tls") => {
                    (FailureKind::Tls, StatusCode::BAD_GATEWAY)
                }
                _ => (FailureKind::Other, StatusCode::BAD_GATEWAY),
            };
        }
        if s.downcast_ref::<rustls::Error>().is_some() {
            return (FailureKind::Tls, StatusCode::BAD_GATEWAY);
        }
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                return (FailureKind::Reset, StatusCode::BAD_GATEWAY);
            }
            if h.is_timeout() {
                return (FailureKind::Timeout, StatusCode::GATEWAY_TIMEOUT);
            }
        }
        source = s.source();
    }
    let connect = match e {
        SendError::Connect(_) => true,
        SendError::Pooled(e) => e.is_connect(),
        SendError::Io(_) | SendError::Protocol(_) | SendError::Body(_) => false,
    };
    if connect {
        return (FailureKind::Refused, StatusCode::BAD_GATEWAY);
    }
    (FailureKind::Other, StatusCode::BAD_GATEWAY)
}

/// The error and its causes on one line.
fn describe(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::is_authority;

    #[test]
    fn a_host_is_an_authority_without_path_query_or_user() {
        for good in [
            "quay.example.com",
            "quay:8443",
            "127.0.0.1:18000",
            "[::1]:443",
            "a_b-c",
        ] {
            assert!(is_authority(good.as_bytes()), "{good}");
        }
        for bad in ["", "a/x", "a?b", "a#b", "user@host", "a b", "h\u{e9}te"] {
            assert!(!is_authority(bad.as_bytes()), "{bad}");
        }
    }
}
