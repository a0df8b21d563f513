//! The way to the upstream.
//!
//! An HTTP/1.1 client connection sends one request at a time, so it gets an upstream connection
//! of its own ([`Dedicated`]): opened on its first request, kept while both stay open, closed
//! with it. The upstream then sees the connections the clients made, one for one, and a request
//! costs no pool checkout, no pool key and no absolute URI.
//!
//! On that connection the recorder speaks HTTP/1.1 itself, in the task of the client's
//! connection: it writes the request head (the client's fields as they came, when the
//! recorder's own server read them: [`super::forward::Outgoing`]) and body, reads the response
//! head (httparse, as hyper does) and hands the client's side a [`DirectBody`] that reads the
//! response body off the upstream socket as the client takes it. The response's fields stay as
//! the upstream wrote them ([`RawFields`], its hop-by-hop ones left out): the recorder's own
//! HTTP/1.1 server
//! ([`super::h1`]) writes them to the client as they are, and only hyper (HTTP/2, a connection
//! handed over) gets them as a `HeaderMap`. hyper's client would run the connection as a task of
//! its own and pass each request and response through channels between the two tasks; that
//! machinery cost about as much as the rest of the forwarding (callgrind: 16.6k of the 38k
//! instructions a proxied request took). The upstream is a server the operator named (Quay,
//! Clair, nginx), so this side needs HTTP/1.1's framing, not a defence against every client.
//!
//! An idle connection may be closed by the upstream just as a request goes out on it. A kept
//! connection is checked for a close (or bytes nobody asked for) already received before it is
//! used: free while nothing came, as the runtime then knows the socket is not readable. A
//! bodiless GET, HEAD or OPTIONS lost with a reused connection before any answer is sent again
//! on a fresh one, as nginx does (`proxy_next_upstream error`); a POST, PUT or DELETE never is,
//! as it may have been acted on.
//!
//! An upload the upstream refuses while it goes (a status of 400 or more, or a close) stops
//! there, and the refusal is passed on. An early success does not stop it: the rest is written
//! unwatched, so an upstream that answers early and then reads nothing more holds it until
//! `--upstream-timeout`.
//!
//! HTTP/2 client connections (many streams at once), https upstreams and `--upstream-h2c` go
//! through hyper's pooled client instead, which speaks TLS, ALPN and HTTP/2.

use std::error::Error as StdError;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header;
use http::{Method, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::fields::{push_field, RawFields, Span};
use super::forward::{Outgoing, Progress, ProxyBody};
use super::framing::{self, After, Chunk, Decoder, Framed, Framing, READ_SIZE};

type BoxError = Box<dyn StdError + Send + Sync>;

/// How long opening an upstream connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest response head read; hyper's client allows about as much.
const MAX_HEAD: usize = 400 << 10;
const MAX_HEADERS: usize = 100;
/// Request bodies are written with their head when this small.
const SMALL_BODY: usize = 16 << 10;

/// The upstream connection of one HTTP/1.1 client connection, and the timer of its requests'
/// `--upstream-timeout`, while it is not sending. One timer serves every request: pushing a
/// registered timer's deadline later costs an atomic store, where a timer per request costs a
/// registration and a removal in the runtime's timer wheel.
#[derive(Default)]
pub struct Dedicated(Mutex<Held>);

#[derive(Default)]
struct Held {
    conn: Option<Box<Conn>>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Dedicated {
    fn take(&self) -> Held {
        self.0
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default()
    }

    fn put(&self, mut held: Held) {
        if let Ok(mut slot) = self.0.lock() {
            // A body that ended meanwhile gave its connection back already.
            if held.conn.is_none() {
                held.conn = slot.conn.take();
            }
            *slot = held;
        }
    }

    /// A response body ended and left its connection fit for the next request.
    fn give_back(&self, conn: Box<Conn>) {
        if let Ok(mut slot) = self.0.lock() {
            slot.conn = Some(conn);
        }
    }
}

/// Why a request got no response from the upstream.
#[derive(Debug)]
pub enum SendError {
    Connect(io::Error),
    /// Reading or writing the upstream connection failed.
    Io(io::Error),
    /// The upstream's answer is not HTTP/1.x as this proxy reads it.
    Protocol(String),
    /// The request's own body failed (its client went away mid-upload).
    Body(Box<dyn StdError + Send + Sync>),
    /// From the pooled client.
    Pooled(hyper_util::client::legacy::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "cannot connect: {e}"),
            SendError::Io(e) => write!(f, "connection failed: {e}"),
            SendError::Protocol(e) => write!(f, "bad response: {e}"),
            SendError::Body(e) => write!(f, "the request's body failed: {e}"),
            SendError::Pooled(e) => e.fmt(f),
        }
    }
}

impl StdError for SendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            SendError::Connect(e) | SendError::Io(e) => Some(e),
            SendError::Protocol(_) => None,
            SendError::Body(e) => Some(e.as_ref()),
            SendError::Pooled(e) => e.source(),
        }
    }
}

/// The upstream's side of a protocol switch (101): its connection, and what it sent after the
/// 101's head. In the response's extensions.
#[derive(Clone)]
pub struct Switched(Arc<Mutex<Option<(TcpStream, Bytes)>>>);

impl Switched {
    pub fn take(&self) -> Option<(TcpStream, Bytes)> {
        self.0.lock().ok()?.take()
    }
}

/// `timeout` after `from`; decades away for a timeout too large to add (someone meaning
/// "never").
fn deadline(from: std::time::Instant, timeout: Duration) -> Instant {
    let from = Instant::from_std(from);
    (from.checked_add(timeout)).unwrap_or_else(|| from + Duration::from_secs(30 * 365 * 86_400))
}

/// How long the upstream may take (`--upstream-timeout`): `timeout` for its response head
/// after the request's last byte, and while a request body goes, `timeout` without a byte of
/// it taken (nginx's `proxy_send_timeout` and `proxy_read_timeout` in one). A deadline from
/// the request's start would cut off every upload slower than its size over the timeout: a
/// 1 GiB layer pushed at 3 MB/s, against five minutes.
pub struct Deadline<'a> {
    pub timeout: Duration,
    pub started: std::time::Instant,
    /// The request's body, when it has one.
    pub progress: Option<&'a Progress>,
}

impl Deadline<'_> {
    /// The first instant to look again.
    pub fn first(&self) -> Instant {
        deadline(self.started, self.timeout)
    }

    /// The next instant to look again, at a look that found the body at `seen` bytes (then
    /// moved on to where it is); `None` when the time is up. Out of line: the request path
    /// runs it only when a request outlives the timeout.
    #[cold]
    #[inline(never)]
    fn next(&self, seen: &mut u64) -> Option<Instant> {
        let progress = self.progress?;
        if let Some(ended) = progress.ended.get() {
            let at = deadline(*ended, self.timeout);
            return (at > Instant::now()).then_some(at);
        }
        let sent = progress.sent.load(std::sync::atomic::Ordering::Relaxed);
        if sent == *seen {
            return None;
        }
        *seen = sent;
        Some(deadline(std::time::Instant::now(), self.timeout))
    }

    /// Why the time was up, for the client and the tape.
    #[cold]
    pub fn missed(&self) -> String {
        let ended = !matches!(self.progress, Some(p) if p.ended.get().is_none());
        if ended {
            format!(
                "no response head within {:?} of the request's end",
                self.timeout
            )
        } else {
            format!("the request's body stalled for {:?}", self.timeout)
        }
    }
}

/// `work`'s output, unless `deadline` passes first (`None`); `timer` is pushed on as the
/// deadline allows. `work` is lent pinned where it was made: a future moved in by value is
/// copied, and the request's are large.
pub async fn within<F: std::future::Future>(
    mut work: Pin<&mut F>,
    mut timer: Pin<&mut Sleep>,
    deadline: &Deadline<'_>,
) -> Option<F::Output> {
    let mut seen = 0;
    loop {
        tokio::select! {
            biased;
            done = work.as_mut() => return Some(done),
            _ = timer.as_mut() => match deadline.next(&mut seen) {
                Some(at) => timer.as_mut().reset(at),
                None => return None,
            },
        }
    }
}

/// Sends the request of `parts` and `body` (taken from its option as it is sent) on
/// `dedicated`'s connection to `upstream` (`host:port`), opening one if it has none or the one
/// it had closed. `None` when the upstream took too long (`deadline`).
pub async fn send(
    dedicated: &Arc<Dedicated>,
    upstream: &str,
    parts: &http::request::Parts,
    body: &mut Option<ProxyBody>,
    outgoing: Option<&Outgoing>,
    deadline: &Deadline<'_>,
) -> Option<Result<http::Response<DirectBody>, SendError>> {
    let Held { conn, timer } = dedicated.take();
    let mut timer = match timer {
        Some(mut t) => {
            t.as_mut().reset(deadline.first());
            t
        }
        None => Box::pin(tokio::time::sleep_until(deadline.first())),
    };
    let work = std::pin::pin!(exchange(conn, upstream, parts, body, outgoing, dedicated));
    let sent = within(work, timer.as_mut(), deadline).await;
    dedicated.put(Held {
        conn: None,
        timer: Some(timer),
    });
    sent
}

/// One request and its response head, on `conn` or a fresh connection. See the module docs
/// for when a request is sent twice.
async fn exchange(
    mut conn: Option<Box<Conn>>,
    upstream: &str,
    parts: &http::request::Parts,
    body: &mut Option<ProxyBody>,
    outgoing: Option<&Outgoing>,
    dedicated: &Arc<Dedicated>,
) -> Result<http::Response<DirectBody>, SendError> {
    let bodiless = !body.as_ref().is_some_and(|b| !b.is_end_stream());
    // Safe to send twice even if the first copy was acted on (Go's rule): a registry's
    // bodiless PUT completes an upload and a DELETE removes a manifest, and a second copy of
    // either after the first took effect answers 404.
    let idempotent = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    if conn.as_ref().is_some_and(|c| c.closed_by_upstream()) {
        conn = None;
    }
    loop {
        let reused = conn.is_some();
        let mut c = match conn.take() {
            Some(c) => c,
            None => Conn::open(upstream).await?,
        };
        match c.round_trip(parts, outgoing, body.take()).await {
            Ok(head) => return Ok(c.into_response(head, &parts.method, dedicated)),
            Err(Failed {
                error,
                before_answer: true,
            }) if reused && bodiless && idempotent => {
                tracing::debug!(
                    "upstream closed an idle connection under a request ({error}); resending it"
                );
            }
            Err(f) => return Err(f.error),
        }
    }
}

/// A request that got no response head, and whether nothing at all came back (the connection
/// was lost before any answer: safe to send an idempotent request again).
struct Failed {
    error: SendError,
    before_answer: bool,
}

impl Failed {
    fn io(e: io::Error) -> Failed {
        use io::ErrorKind::*;
        let before_answer = matches!(
            e.kind(),
            ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
        );
        Failed {
            error: SendError::Io(e),
            before_answer,
        }
    }

    fn protocol(text: impl Into<String>) -> Failed {
        Failed {
            error: SendError::Protocol(text.into()),
            before_answer: false,
        }
    }
}

/// A response head read off the connection.
struct Head {
    status: StatusCode,
    version: Version,
    /// Without the hop-by-hop fields (but on a 101).
    fields: RawFields,
    framing: Framed,
}

/// An HTTP/1.1 connection to the upstream.
struct Conn {
    io: TcpStream,
    /// Read from the upstream, not yet taken.
    buf: BytesMut,
    /// The request head being written (its memory reused).
    out: Vec<u8>,
    /// The last request's body did not all go: the connection is not reused.
    unfinished: bool,
    /// A final answer that came while the body was going, for `read_head` (boxed: rare, and
    /// a connection moves with every response body).
    early: Option<Box<Head>>,
}

impl Conn {
    async fn open(upstream: &str) -> Result<Box<Conn>, SendError> {
        let io = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SendError::Connect(e)),
            Err(_) => {
                return Err(SendError::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {CONNECT_TIMEOUT:?}"),
                )))
            }
        };
        let _ = io.set_nodelay(true);
        Ok(Box::new(Conn {
            io,
            buf: BytesMut::with_capacity(READ_SIZE),
            out: Vec::with_capacity(1024),
            unfinished: false,
            early: None,
        }))
    }

    /// Whether the upstream closed this idle connection (or sent something unasked).
    fn closed_by_upstream(&self) -> bool {
        let mut probe = [0u8; 1];
        !matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    async fn round_trip(
        &mut self,
        parts: &http::request::Parts,
        outgoing: Option<&Outgoing>,
        body: Option<ProxyBody>,
    ) -> Result<Head, Failed> {
        let body = body.filter(|b| !b.is_end_stream());
        let chunked = self.encode_head(parts, outgoing, body.as_ref());
        let Some(body) = body else {
            self.io.write_all(&self.out).await.map_err(Failed::io)?;
            return self.read_head().await;
        };
        match self.write_with_body(body, chunked).await {
            Ok(true) => self.read_head().await,
            // Answered before the whole body went: the connection cannot carry another request.
            Ok(false) => {
                self.unfinished = true;
                self.read_head().await
            }
            // The upstream may have answered, then closed, while the body was going.
            Err(failed) if matches!(failed.error, SendError::Io(_)) => {
                self.unfinished = true;
                self.read_head().await.map_err(|_| Failed {
                    before_answer: false,
                    ..failed
                })
            }
            Err(failed) => Err(failed),
        }
    }

    /// Writes the request head into `out`, its fields `outgoing`'s if it has them, else
    /// `parts`'; whether the body goes chunked.
    fn encode_head(
        &mut self,
        parts: &http::request::Parts,
        outgoing: Option<&Outgoing>,
        body: Option<&ProxyBody>,
    ) -> bool {
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(parts.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(
            parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes(),
        );
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let length = match outgoing {
            Some(outgoing) => outgoing.write(out),
            None => {
                for (name, value) in &parts.headers {
                    push_field(out, name.as_str().as_bytes(), value.as_bytes());
                }
                parts.headers.contains_key(header::CONTENT_LENGTH)
            }
        };
        let mut chunked = false;
        if !length {
            match body.map(|b| b.size_hint().exact()) {
                // As hyper's client: an empty body is said so where a body is expected.
                None if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) => {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                None => {}
                Some(Some(n)) => {
                    let _ = io::Write::write_fmt(out, format_args!("content-length: {n}\r\n"));
                }
                Some(None) => {
                    out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    chunked = true;
                }
            }
        }
        out.extend_from_slice(b"\r\n");
        chunked
    }

    /// Writes the head and the body as it comes. The head waits for a first piece of body that
    /// is ready at once (one write for a small upload), no longer. While writing, and while
    /// waiting for the client's next piece, the upstream is watched: a refusal (a status of 400
    /// or more, or a close) ends the upload there, `Ok(false)`, as a registry refusing an
    /// upload waits for no more of it. An early answer that is not a refusal does not (the
    /// upstream may still read the body); it waits in `buf`.
    async fn write_with_body(
        &mut self,
        mut body: ProxyBody,
        chunked: bool,
    ) -> Result<bool, Failed> {
        let mut head_sent = false;
        let mut trailers = None;
        loop {
            let frame = if head_sent {
                match self.next_frame_unless_refused(&mut body).await? {
                    Some(frame) => frame,
                    None => return Ok(false),
                }
            } else {
                let ready = std::future::poll_fn(|cx| {
                    Poll::Ready(match Pin::new(&mut body).poll_frame(cx) {
                        Poll::Ready(frame) => Some(frame),
                        Poll::Pending => None,
                    })
                })
                .await;
                match ready {
                    Some(frame) => frame,
                    None => {
                        if !self.send_out().await? {
                            return Ok(false);
                        }
                        head_sent = true;
                        continue;
                    }
                }
            };
            let frame = match frame {
                None => break,
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    return Err(Failed {
                        error: SendError::Body(e),
                        before_answer: false,
                    })
                }
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                // Trailer fields go on when the body goes chunked (see `h1::respond`).
                Err(frame) => {
                    trailers = frame.into_trailers().ok().map(Box::new);
                    continue;
                }
            };
            if data.is_empty() {
                continue;
            }
            if chunked {
                self.out
                    .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            }
            if !head_sent && data.len() <= SMALL_BODY {
                self.out.extend_from_slice(&data);
            } else {
                if !self.send_out().await? {
                    return Ok(false);
                }
                if !self.write_unless_refused(&data).await? {
                    return Ok(false);
                }
            }
            if chunked {
                self.out.extend_from_slice(b"\r\n");
            }
            if !head_sent && !self.send_out().await? {
                return Ok(false);
            }
            head_sent = true;
        }
        if chunked {
            framing::end_chunked(&mut self.out, trailers.as_deref());
        }
        self.send_out().await
    }

    /// The client's next piece of body, unless the upstream refuses the upload first (`None`).
    #[allow(clippy::type_complexity)]
    async fn next_frame_unless_refused(
        &mut self,
        body: &mut ProxyBody,
    ) -> Result<Option<Option<Result<Frame<Bytes>, BoxError>>>, Failed> {
        loop {
            if self.early.is_some() {
                return Ok(Some(body.frame().await));
            }
            tokio::select! {
                biased;
                frame = body.frame() => return Ok(Some(frame)),
                ready = self.io.readable() => {
                    ready.map_err(Failed::io)?;
                    if self.refused()? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Writes and clears `out`; see [`Conn::write_unless_refused`].
    async fn send_out(&mut self) -> Result<bool, Failed> {
        let out = std::mem::take(&mut self.out);
        let sent = self.write_unless_refused(&out).await;
        self.out = out;
        self.out.clear();
        sent
    }

    /// Writes `bytes`, unless the upstream refuses the upload first (`Ok(false)`).
    async fn write_unless_refused(&mut self, bytes: &[u8]) -> Result<bool, Failed> {
        if self.early.is_some() {
            self.io.write_all(bytes).await.map_err(Failed::io)?;
            return Ok(true);
        }
        let mut done = 0;
        while done < bytes.len() {
            let (reader, mut writer) = self.io.split();
            tokio::select! {
                biased;
                written = writer.write(&bytes[done..]) => match written {
                    Ok(0) => return Err(Failed::io(io::ErrorKind::WriteZero.into())),
                    Ok(n) => done += n,
                    Err(e) => return Err(Failed::io(e)),
                },
                ready = reader.readable() => {
                    ready.map_err(Failed::io)?;
                    if self.refused()? {
                        return Ok(false);
                    }
                    if self.early.is_some() {
                        self.io.write_all(&bytes[done..]).await.map_err(Failed::io)?;
                        return Ok(true);
                    }
                }
            }
        }
        Ok(true)
    }

    /// Reads what the upstream sent mid-upload (readiness may be stale: only what can be read
    /// says it spoke). Interim responses (a `100 Continue` to the client's `Expect`, most
    /// often) are taken off; a final one of 400 or more, or a close, refuses the upload; a
    /// final one below 400 is kept for `read_head`, and the upload goes on unwatched.
    fn refused(&mut self) -> Result<bool, Failed> {
        self.buf.reserve(READ_SIZE);
        match self.io.try_read_buf(&mut self.buf) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(Failed::io(e)),
        }
        let Some(head) = self.final_head()? else {
            return Ok(false);
        };
        let refusal = head.status.as_u16() >= 400;
        self.early = Some(Box::new(head));
        Ok(refusal)
    }

    /// Reads the response head, passing over interim (1xx) responses but a 101.
    async fn read_head(&mut self) -> Result<Head, Failed> {
        if let Some(head) = self.early.take() {
            return Ok(*head);
        }
        let mut answered = false;
        loop {
            if !self.buf.is_empty() {
                answered = true;
                if let Some(head) = self.final_head()? {
                    return Ok(head);
                }
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(READ_SIZE);
            }
            let read = tokio::io::AsyncReadExt::read_buf(&mut self.io, &mut self.buf).await;
            let n = read.map_err(|e| {
                let mut failed = Failed::io(e);
                failed.before_answer &= !answered;
                failed
            })?;
            if n == 0 {
                return Err(Failed {
                    error: SendError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before a complete response head",
                    )),
                    before_answer: !answered,
                });
            }
        }
    }

    /// Takes the final head off `buf`, if it is all there, and the interim (1xx but 101) ones
    /// before it.
    fn final_head(&mut self) -> Result<Option<Head>, Failed> {
        while let Some(head) = self.parse_head()? {
            if !head.status.is_informational() || head.status == StatusCode::SWITCHING_PROTOCOLS {
                return Ok(Some(head));
            }
        }
        Ok(None)
    }

    /// Takes one complete head off `buf`, if there is one. The fields that frame the message
    /// or concern this connection only (RFC 9110, 7.6.1) are read here and, but on a 101, left
    /// out of the headers handed on.
    fn parse_head(&mut self) -> Result<Option<Head>, Failed> {
        let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            &self.buf,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD => {
                return Err(Failed::protocol(format!(
                    "response head larger than {MAX_HEAD} bytes"
                )))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Failed::protocol(format!("response head: {e}"))),
        };
        let status = StatusCode::from_u16(parsed.code.unwrap_or(0))
            .map_err(|_| Failed::protocol(format!("status {:?}", parsed.code)))?;
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let switching = status == StatusCode::SWITCHING_PROTOCOLS;
        let mut framing = Framed::default();
        // Where each field handed on lies in the head, to slice it out without copying.
        let base = self.buf.as_ptr();
        // A Vec, not inline: the fields move with the response body through several hands.
        let mut spans = Vec::with_capacity(parsed.headers.len());
        let mut lengths = 0;
        for h in parsed.headers.iter() {
            let hop = framing.read(h.name, h.value);
            if hop && !switching {
                continue;
            }
            let length = h.name.len() == 14 && h.name.eq_ignore_ascii_case("content-length");
            if length {
                lengths += 1;
            }
            spans.push(Span::of(base, h.name.as_bytes(), h.value, false));
        }
        // RFC 9112, 6.3: a length beside a transfer coding is dropped (the coding frames the
        // body, and the client's framing must be the one the body has); a length that is not
        // one number is an answer a proxy cannot pass on; nor a transfer coding on HTTP/1.0.
        if framing.chunked.is_none() && framing.length == Some(None) {
            return Err(Failed::protocol("a Content-Length that is not one number"));
        }
        if framing.chunked.is_some() && version == Version::HTTP_10 {
            return Err(Failed::protocol(
                "Transfer-Encoding on an HTTP/1.0 response",
            ));
        }
        if framing.chunked == Some(false) {
            return Err(Failed::protocol("a transfer coding other than chunked"));
        }
        let mut fields = RawFields::new(self.buf.split_to(len).freeze(), spans);
        // Fields the Connection header names concern this connection only too, and a length
        // beside chunked goes.
        let named = !switching && !framing.connection_names.is_empty();
        let chunked = framing.chunked.is_some();
        if named || (lengths > 0 && chunked) {
            fields.retain(|name| {
                if name.eq_ignore_ascii_case(b"content-length") {
                    return !chunked;
                }
                !(named
                    && framing
                        .connection_names
                        .iter()
                        .any(|n| n.as_str().as_bytes().eq_ignore_ascii_case(name)))
            });
        }
        Ok(Some(Head {
            status,
            version,
            fields,
            framing,
        }))
    }

    /// The response to hand on: its body reads the rest off this connection.
    fn into_response(
        self: Box<Self>,
        head: Head,
        method: &Method,
        home: &Arc<Dedicated>,
    ) -> http::Response<DirectBody> {
        let Head {
            status,
            version,
            fields,
            framing: framed,
        } = head;
        let mut reusable =
            !self.unfinished && !framed.close && (version == Version::HTTP_11 || framed.keep_alive);
        let framing = if status == StatusCode::SWITCHING_PROTOCOLS {
            reusable = false;
            Framing::Done
        } else if *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Done
        } else if framed.chunked.is_some() {
            // Any other coding was refused as the head was read.
            Framing::Chunked(Chunk::Size)
        } else {
            match framed.length {
                Some(Some(n)) => Framing::Length(n),
                // No length, or lengths that disagree: the body ends with the connection.
                _ => {
                    reusable = false;
                    Framing::Close
                }
            }
        };
        let switched = status == StatusCode::SWITCHING_PROTOCOLS;
        let mut response = http::Response::new(DirectBody {
            conn: None,
            decoder: Decoder::new(Framing::Done),
            reusable,
            home: home.clone(),
            fields: Some(fields),
        });
        *response.status_mut() = status;
        *response.version_mut() = version;
        if switched {
            let Conn { io, buf, .. } = *self;
            response
                .extensions_mut()
                .insert(Switched(Arc::new(Mutex::new(Some((io, buf.freeze()))))));
        } else {
            let body = response.body_mut();
            body.conn = Some(self);
            body.decoder = Decoder::new(framing);
            if body.decoder.done() {
                body.finish();
            }
        }
        response
    }
}

/// A response body read off the upstream connection as the client takes it; at its end the
/// connection goes back to its [`Dedicated`] for the next request (unless the upstream closes
/// it). Dropped before its end (the client went away), it closes the connection.
pub struct DirectBody {
    /// Boxed: a response body moves through several hands on its way to the client.
    conn: Option<Box<Conn>>,
    decoder: Decoder,
    reusable: bool,
    home: Arc<Dedicated>,
    /// The response's fields, until taken: the response's `HeaderMap` is left empty.
    fields: Option<RawFields>,
}

impl DirectBody {
    /// The response's fields (see [`RawFields`]), until taken.
    pub fn fields(&self) -> Option<&RawFields> {
        self.fields.as_ref()
    }

    pub fn take_fields(&mut self) -> Option<RawFields> {
        self.fields.take()
    }

    fn finish(&mut self) {
        self.decoder.framing = Framing::Done;
        if let Some(conn) = self.conn.take() {
            // Bytes beyond the response (unasked) make the connection unfit to reuse.
            if self.reusable && conn.buf.is_empty() {
                self.home.give_back(conn);
            }
        }
    }
}

impl Body for DirectBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        let Some(Conn { io, buf, .. }) = this.conn.as_deref_mut() else {
            return Poll::Ready(None);
        };
        let (frame, after) = ready!(framing::poll_body(
            &mut this.decoder,
            Pin::new(io),
            buf,
            cx,
            "the upstream"
        ));
        match after {
            After::Going => {}
            After::Finished => this.finish(),
            After::Lost => this.conn = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}
