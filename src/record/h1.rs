//! The client's side of HTTP/1.1, spoken by the recorder itself.
//!
//! An HTTP/1.1 client connection is served in its own task by a loop that reads a request head
//! (httparse, as hyper does), hands the request to [`Proxy::handle`] with its fields as they
//! were read ([`super::fields`]: no `HeaderMap` unless hyper's client is who sends it on) and a
//! body that reads itself off the connection ([`RequestBody`]), and writes the response head
//! and body back,
//! the head and a first piece of body that is ready in one write. hyper's server ran a
//! dispatcher, a body channel and a response encoder around every request: about as much, per
//! request, as the forwarding and the upstream's side together (callgrind). The same reasoning
//! as the upstream's side ([`super::upstream`]) applies, with one difference: clients are not
//! chosen by the operator, so this side keeps hyper's defences. A head must be complete within
//! `--header-read-timeout`, hold at most 100 fields in 400 KiB (else 431), and parse (else
//! 400); a body's framing follows RFC 9112: a transfer coding other than chunked last, on
//! HTTP/1.0, or a length that is not one number (a list included, as hyper refused it) is
//! refused with a 400, and a length beside chunked is dropped, the connection closed after the
//! response. Chunk-size and trailer lines are read strictly: a bare CR or LF, or another
//! control byte, ends the body as cut short (the chunk-extension smuggling pattern), as do
//! trailers beyond hyper's bounds (100 lines, 16 KiB). Trailer fields go on where the next
//! hop's framing carries them (a chunked body, HTTP/2; through hyper's pooled client as hyper
//! passes them), less those that must not reach a next hop that merges trailers into the head
//! (`framing::passes_as_trailer`); the tape does not keep them.
//!
//! A request that expects `100 Continue` gets it when its body is first wanted (the upstream's
//! client starts sending it), as from hyper's server: one the recorder answers itself, or that
//! never reaches the upstream, is not invited to send its body.
//!
//! What this loop does not speak goes to hyper, with the bytes read so far put back in front
//! of the connection ([`Served::HandOff`]): HTTP/2 by prior knowledge (h2c), a protocol switch
//! (`Upgrade`, WebSocket) and `CONNECT`. HTTP/2 negotiated by ALPN never comes here.
//!
//! The connection closes after a response when the client asked (`Connection: close`, or
//! HTTP/1.0 without keep-alive), when the recorder is stopping, when a response has no length
//! an HTTP/1.0 client could read other than the close, or when the request's body was not read
//! to its end (the upstream answered without it; the next request's first byte could not be
//! found). A connection closed with a request body unread is read from a little longer (a
//! second, 1 MiB), so that the close does not reset the answer away (nginx's lingering
//! close). A 101 the client did not ask for ends the connection, as hyper ended it.

use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::rt::Timer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use super::exchange::Connection;
use super::fields::{push_field, RawFields, Span};
use super::forward::{Proxy, ProxyBody};
use super::framing::{self, After, Chunk, Decoder, Framed, Framing, READ_SIZE};
use super::head_timer::{self, HeadTimer};
use super::upstream::Dedicated;

/// The largest request head read: hyper's server's limit (its buffer's default), beyond which
/// it answered 431 too.
const MAX_HEAD: usize = 400 << 10;
const MAX_HEADERS: usize = 100;
/// A response's pieces of body are copied behind its head, up to this much per write; larger
/// ones are written from where they are.
const COALESCE: usize = 16 << 10;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// A client connection: plain TCP, or TLS that did not negotiate HTTP/2.
pub enum ClientIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// What serving a connection came to.
pub enum Served {
    /// It closed; with why, when not in the normal way, for the tape.
    Closed(Result<(), String>),
    /// It needs hyper from here on (see the module docs): the connection, with the bytes read
    /// off it so far.
    HandOff(ClientIo, Bytes),
}

/// What the loop needs from its proxy thread.
pub struct Serving {
    pub proxy: Arc<Proxy>,
    pub connection: Arc<Connection>,
    pub header_read_timeout: Duration,
    pub stop: CancellationToken,
}

/// The reading side of a client connection, and what was read off it but not yet taken. While
/// a request's body is being read, its [`RequestBody`] holds it.
struct ReadSide {
    io: ReadIo,
    buf: BytesMut,
}

/// What a request body shares with its connection's loop.
type Home = Arc<Mutex<Shared>>;

#[derive(Default)]
struct Shared {
    /// The reading side, left when the body ends or is dropped, with whether it was read to its
    /// end (the connection can then carry another request).
    back: Option<(ReadSide, bool)>,
    /// The writing side, lent while a request that expects `100 Continue` is handled: the body
    /// sends it when first wanted, as hyper's server did (a request answered without its body,
    /// a local 400 or 502 say, never invites it).
    write: Option<WriteIo>,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
const HELD: &str = "the loop holds the writing side between requests";

/// Serves HTTP/1.1 on `io` until it closes, or hands it over. See the module docs.
pub async fn serve(io: ClientIo, serving: Serving) -> Served {
    let Serving {
        proxy,
        connection,
        header_read_timeout: timeout,
        stop,
    } = serving;
    // TLS holds what is written until flushed; TCP sends it at once.
    let tls = matches!(io, ClientIo::Tls(_));
    let (read, write) = split(io);
    // Held by the loop but while a body that owes a `100 Continue` has it (see `Shared`).
    let mut writer = Some(write);
    let mut side = Some(ReadSide {
        io: read,
        buf: BytesMut::with_capacity(8 << 10),
    });
    let home: Home = Arc::default();
    // On HTTP/1.x, the upstream connection this client connection's requests go on.
    let dedicated = Arc::new(Dedicated::default());
    let mut out: Vec<u8> = Vec::with_capacity(4 << 10);
    // One timer and one stop signal for every head, rather than one registered per request.
    let mut timer = HeadTimer.sleep(timeout);
    let stopped = stop.clone().cancelled_owned();
    tokio::pin!(stopped);
    let mut first = true;
    loop {
        let reading = side
            .as_mut()
            .expect("the loop holds the reading side between requests");
        HeadTimer.reset(&mut timer, std::time::Instant::now() + timeout);
        let parsed = loop {
            if !reading.buf.is_empty() {
                match parse(&mut reading.buf, first) {
                    Parsed::Partial => {}
                    parsed => break parsed,
                }
            }
            if reading.buf.capacity() - reading.buf.len() < 1024 {
                reading.buf.reserve(READ_SIZE);
            }
            let idle = reading.buf.is_empty();
            let read = tokio::select! {
                biased;
                read = reading.io.read_buf(&mut reading.buf) => read,
                _ = timer.as_mut() => {
                    if idle {
                        return Served::Closed(Ok(()));
                    }
                    let why = format!("no complete request head within {timeout:?}");
                    let write = writer.as_mut().expect(HELD);
                    refuse(write, &mut out, StatusCode::REQUEST_TIMEOUT, &why).await;
                    linger(side).await;
                    return Served::Closed(Err(why));
                }
                _ = &mut stopped, if idle => return Served::Closed(Ok(())),
            };
            match read {
                Ok(0) if idle => return Served::Closed(Ok(())),
                Ok(0) => {
                    return Served::Closed(Err("the client closed mid-head".to_string()));
                }
                Ok(_) => {}
                Err(e) => return Served::Closed(Err(e.to_string())),
            }
        };
        let head = match parsed {
            Parsed::Head(head) => head,
            Parsed::HandOff => {
                let ReadSide { io, buf } = side.take().expect("held");
                return Served::HandOff(unsplit(io, writer.take().expect(HELD)), buf.freeze());
            }
            Parsed::Refused(status, why) => {
                refuse(writer.as_mut().expect(HELD), &mut out, status, &why).await;
                linger(side).await;
                return Served::Closed(Err(why));
            }
            Parsed::Partial => unreachable!("the loop above waits for more"),
        };
        first = false;
        // Busy with a request: the head's wait leaves the sweeper's list until the next head.
        head_timer::release(&mut timer);
        let Head {
            parts,
            fields,
            body,
            keep_alive,
            expect_continue,
        } = head;
        let head_request = parts.method == Method::HEAD;
        let version = parts.version;
        let has_body = body.is_some();
        let body = match body {
            Some(decoder) => {
                let invite = expect_continue && version == Version::HTTP_11;
                if invite {
                    match home.lock() {
                        Ok(mut shared) => shared.write = writer.take(),
                        Err(_) => return Served::Closed(Err("a poisoned lock".into())),
                    }
                }
                InBody::Own(RequestBody {
                    side: side.take(),
                    decoder,
                    home: home.clone(),
                    invite: invite.then_some(0),
                    tls,
                })
            }
            None => InBody::Empty,
        };
        let request = Request::from_parts(parts, body);
        let stream = connection.stream_of(version);
        // The response lives in this block and is dropped where it lies as the block ends
        // (moved, it would be copied whole): its body ends its exchange's record, and gives
        // the upstream connection back.
        let responded = {
            let Ok(mut response) = proxy
                .clone()
                .handle(
                    request,
                    Some(fields),
                    connection.clone(),
                    stream,
                    dedicated.clone(),
                )
                .await;
            if writer.is_none() {
                // Back from the body it was lent to (which may live on, in hyper's client).
                writer = home.lock().ok().and_then(|mut shared| shared.write.take());
            }
            let Some(write) = writer.as_mut() else {
                return Served::Closed(Err("a poisoned lock".into()));
            };
            // A switch nobody asked for (those asked for went to hyper) ends the connection,
            // as hyper ended it.
            let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            let keep = keep_alive && !switched && !stop.is_cancelled();
            respond(
                write,
                &mut out,
                &mut response,
                head_request,
                version,
                keep,
                tls,
            )
            .await
        };
        let kept = match responded {
            Ok(kept) => kept,
            Err(e) => return Served::Closed(Err(e)),
        };
        let write = writer.as_mut().expect(HELD);
        let mut unread = false;
        if has_body {
            // Whole only if the body was read to its end.
            let back = home.lock().ok().and_then(|mut h| h.back.take());
            unread = back.as_ref().is_some_and(|(_, whole)| !whole);
            side = back.map(|(side, _)| side);
        }
        if !kept || unread || side.is_none() {
            let _ = write.shutdown().await;
            if unread {
                linger(side).await;
            }
            return Served::Closed(Ok(()));
        }
    }
}

/// A request head, made a request without its body.
struct Head {
    /// Without its fields, which stay as they were read.
    parts: http::request::Parts,
    fields: RawFields,
    /// How its body is read; `None` when it has none.
    body: Option<Decoder>,
    keep_alive: bool,
    expect_continue: bool,
}

// Returned once per request and taken apart at once: boxing the head would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// More bytes needed.
    Partial,
    Head(Head),
    /// For hyper (see the module docs).
    HandOff,
    /// Answered with this status, then the connection closes.
    Refused(StatusCode, String),
}

/// Takes one complete request head off `buf`, if it is all there.
fn parse(buf: &mut BytesMut, first: bool) -> Parsed {
    let n = buf.len().min(H2_PREFACE.len());
    if first && buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Parsed::HandOff
        } else {
            Parsed::Partial
        };
    }
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Parsed::Partial,
        Ok(_) => {
            return too_large(format!("a request head larger than {} KiB", MAX_HEAD >> 10));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return too_large(format!("more than {MAX_HEADERS} header fields"));
        }
        Err(e) => return bad(format!("a malformed request head ({e})")),
    };
    let method = match parsed.method.map(|m| Method::from_bytes(m.as_bytes())) {
        Some(Ok(m)) => m,
        _ => return bad("a malformed request method".into()),
    };
    if method == Method::CONNECT {
        return Parsed::HandOff;
    }
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let base = buf.as_ptr();
    let target = parsed.path.unwrap_or("/").as_bytes();
    let target = (target.as_ptr() as usize - base as usize, target.len());
    let mut framed = Framed::default();
    let mut upgrade = false;
    let mut expect_continue = false;
    let mut spans = Vec::with_capacity(parsed.headers.len());
    let mut lengths = 0;
    for h in parsed.headers.iter() {
        let hop = framed.read(h.name, h.value);
        let length = h.name.len() == 14 && h.name.eq_ignore_ascii_case("content-length");
        if length {
            if h.value.contains(&b',') {
                return bad("a Content-Length list".into());
            }
            lengths += 1;
        }
        if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
        // Equal lengths repeated are passed on as one, as hyper did.
        if length && lengths > 1 {
            continue;
        }
        spans.push(Span::of(base, h.name.as_bytes(), h.value, hop));
    }
    if upgrade && framed.upgrade {
        return Parsed::HandOff;
    }
    // RFC 9112, 6.1 and 6.3.
    let decoder = match (framed.chunked, framed.length) {
        (Some(_), _) if version == Version::HTTP_10 => {
            return bad("Transfer-Encoding on an HTTP/1.0 request".into())
        }
        (Some(false), _) => return bad("a transfer coding other than chunked last".into()),
        (Some(true), _) => Some(Decoder::new(Framing::Chunked(Chunk::Size))),
        (None, Some(None)) => return bad("a Content-Length that is not one number".into()),
        (None, Some(Some(0))) | (None, None) => None,
        (None, Some(Some(n))) => Some(Decoder::new(Framing::Length(n))),
    };
    // A length beside chunked is dropped, and the connection not trusted further.
    let drop_length = framed.chunked.is_some();
    let trusted = !(drop_length && framed.length.is_some());
    let keep_alive = !framed.close && trusted && (version == Version::HTTP_11 || framed.keep_alive);
    let head = buf.split_to(len).freeze();
    let uri = match http::Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1)) {
        Ok(uri) => uri,
        Err(e) => return bad(format!("a request target that is not a URI ({e})")),
    };
    let mut fields = RawFields::new(head, spans);
    if drop_length && lengths > 0 {
        fields.retain(|name| !name.eq_ignore_ascii_case(b"content-length"));
    }
    // Fields the Connection header names concern the client's connection only, as the
    // hop-by-hop ones do: recorded, not forwarded.
    if !framed.connection_names.is_empty() {
        fields.mark_hop(|name| {
            framed
                .connection_names
                .iter()
                .any(|n| n.as_str().as_bytes().eq_ignore_ascii_case(name))
        });
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    Parsed::Head(Head {
        parts: request.into_parts().0,
        fields,
        body: decoder,
        keep_alive,
        expect_continue,
    })
}

fn bad(why: String) -> Parsed {
    Parsed::Refused(StatusCode::BAD_REQUEST, why)
}

fn too_large(why: String) -> Parsed {
    Parsed::Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, why)
}

/// Writes `response`; whether the connection can carry another (`keep`, unless the response
/// can only end with the connection). An error when the client cannot be written to, or the
/// body failed (the client learns it from the close).
async fn respond(
    write: &mut WriteIo,
    out: &mut Vec<u8>,
    response: &mut Response<ProxyBody>,
    head_request: bool,
    version: Version,
    mut keep: bool,
    tls: bool,
) -> Result<bool, String> {
    // Lent, not moved: a response moved into this future was copied whole once more.
    let status = response.status();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let status = status.as_u16();
    let bodiless = head_request || (100..200).contains(&status) || status == 204 || status == 304;
    // A body's length is written as the body says it (the upstream's own framing was read
    // off its connection); a bodiless answer keeps the upstream's, which describes the body
    // a GET would have had.
    let mut dated = false;
    let mut keep_field = |name: &[u8]| {
        dated |= name.len() == 4 && name.eq_ignore_ascii_case(b"date");
        !(name.len() == 14 && !bodiless && name.eq_ignore_ascii_case(b"content-length"))
    };
    match response.body_mut().take_fields() {
        // Its hop-by-hop fields were left out as it was read.
        Some(raw) => raw.write_forwarded(out, keep_field),
        None => {
            for (name, value) in response.headers() {
                if keep_field(name.as_str().as_bytes()) {
                    push_field(out, name.as_str().as_bytes(), value.as_bytes());
                }
            }
        }
    }
    let body = response.body_mut();
    if !dated {
        push_date(out);
    }
    let mut length = None;
    let mut chunked = false;
    if !bodiless {
        match body.size_hint().exact() {
            Some(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
                length = Some(n);
            }
            None if version == Version::HTTP_11 => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                chunked = true;
            }
            // An HTTP/1.0 client reads such a body to the close.
            None => keep = false,
        }
    }
    if !keep && version == Version::HTTP_11 {
        out.extend_from_slice(b"connection: close\r\n");
    } else if keep && version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let io = |e: io::Error| format!("writing to the client: {e}");
    let mut sent: u64 = 0;
    let mut trailers = None;
    while !bodiless && !body.is_end_stream() {
        // A piece ready at once goes out with what is waiting; otherwise that goes first.
        let ready =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await;
        let frame = match ready {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // What waits reaches the client while the next piece is awaited.
                send(write, out, tls).await.map_err(io)?;
                body.frame().await
            }
        };
        match frame {
            None => break,
            Some(Err(e)) => return Err(format!("the response's body failed: {e}")),
            Some(Ok(frame)) => {
                let data = match frame.into_data() {
                    Ok(data) => data,
                    // Trailer fields go on when the body goes chunked; a body of a known
                    // length has nowhere to carry them (RFC 9112, 7.1.2 lets them go).
                    Err(frame) => {
                        trailers = frame.into_trailers().ok().map(Box::new);
                        continue;
                    }
                };
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                if length.is_some_and(|n| sent > n) {
                    return Err("the response's body ran past its Content-Length".into());
                }
                if chunked {
                    let _ = write!(out, "{:x}\r\n", data.len());
                }
                if out.len() + data.len() <= COALESCE {
                    out.extend_from_slice(&data);
                } else {
                    write.write_all(out).await.map_err(io)?;
                    out.clear();
                    write.write_all(&data).await.map_err(io)?;
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
    }
    if chunked {
        framing::end_chunked(out, trailers.as_deref());
    }
    send(write, out, tls).await.map_err(io)?;
    if length.is_some_and(|n| n != sent) {
        return Err("the response's body did not match its Content-Length".into());
    }
    Ok(keep)
}

/// Writes what waits in `out`, emptying it; on TLS, flushes too (it holds written bytes until
/// flushed).
async fn send(write: &mut WriteIo, out: &mut Vec<u8>, tls: bool) -> io::Result<()> {
    if !out.is_empty() {
        write.write_all(out).await?;
        out.clear();
    }
    if tls {
        write.flush().await?;
    }
    Ok(())
}

/// Answers a request this side will not pass on, then closes.
async fn refuse(write: &mut WriteIo, out: &mut Vec<u8>, status: StatusCode, why: &str) {
    tracing::debug!("refused a request: {why}");
    let text = format!("loadtape: {why}\n");
    out.clear();
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n",
            status.as_str(),
            status.canonical_reason().unwrap_or(""),
            text.len()
        )
        .as_bytes(),
    );
    push_date(out);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(text.as_bytes());
    let _ = send(write, out, true).await;
    let _ = write.shutdown().await;
}

/// After answering a request whose body was not all read, reads what the client still sends
/// (up to a second and 1 MiB, or its close) before closing: a socket closed with unread bytes
/// is reset, and a reset can destroy the answer before the client reads it (nginx's lingering
/// close).
async fn linger(side: Option<ReadSide>) {
    let Some(ReadSide { mut io, mut buf }) = side else {
        return;
    };
    let drain = async {
        let mut left: usize = 1 << 20;
        while left > 0 {
            buf.clear();
            buf.reserve(READ_SIZE);
            match io.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// A `Date` field for responses that came without one (the proxy's own), as hyper's server
/// adds: formatted once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != second {
            *d = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(d.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// A request body read off the client's connection as the upstream takes it. At its end the
/// reading side goes back to the connection's loop; dropped before (the upstream answered
/// without it, or failed), it closes the connection.
pub struct RequestBody {
    side: Option<ReadSide>,
    decoder: Decoder,
    home: Home,
    /// A `100 Continue` owed to the client: how much of it went.
    invite: Option<usize>,
    tls: bool,
}

impl RequestBody {
    /// Leaves the reading side for the connection's loop; `whole` when the body was read to
    /// its end.
    fn leave(&mut self, whole: bool) {
        if let Some(side) = self.side.take() {
            if let Ok(mut home) = self.home.lock() {
                home.back = Some((side, whole));
            }
        }
    }

    fn finish(&mut self) {
        self.leave(true);
    }

    /// Sends the `100 Continue` the client waits for, with the writing side its loop lent.
    fn poll_invite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(sent) = self.invite.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let Ok(mut shared) = self.home.lock() else {
            return Poll::Ready(Err(io::Error::other("a poisoned lock")));
        };
        // Taken back: the answer went without the body.
        let Some(write) = shared.write.as_mut() else {
            self.invite = None;
            return Poll::Ready(Ok(()));
        };
        while *sent < CONTINUE.len() {
            match ready!(Pin::new(&mut *write).poll_write(cx, &CONTINUE[*sent..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => *sent += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if self.tls {
            ready!(Pin::new(&mut *write).poll_flush(cx))?;
        }
        self.invite = None;
        Poll::Ready(Ok(()))
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        // Not read to its end: the loop closes the connection, after reading what still comes.
        let whole = self.decoder.done();
        self.leave(whole);
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if this.invite.is_some() {
            if let Err(e) = ready!(this.poll_invite(cx)) {
                this.side = None;
                return Poll::Ready(Some(Err(e)));
            }
        }
        let Some(ReadSide { io, buf }) = this.side.as_mut() else {
            return Poll::Ready(None);
        };
        let (frame, after) = ready!(framing::poll_body(
            &mut this.decoder,
            Pin::new(io),
            buf,
            cx,
            "the client"
        ));
        match after {
            After::Going => {}
            After::Finished => this.finish(),
            After::Lost => this.side = None,
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

/// A request's body as it comes into the proxy: from hyper (HTTP/2, a connection handed
/// over) or from this side. The pooled client's responses come as hyper's too.
pub enum InBody {
    Hyper(hyper::body::Incoming),
    Own(RequestBody),
    Empty,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for InBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            InBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            InBody::Own(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            InBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            InBody::Hyper(b) => b.is_end_stream(),
            InBody::Own(b) => b.is_end_stream(),
            InBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            InBody::Hyper(b) => b.size_hint(),
            InBody::Own(b) => b.size_hint(),
            InBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A client connection's reading side: a TCP stream's halves share it without a lock (a read
/// and a write each took and released one, three times a request), TLS, whose state both
/// change, behind tokio's.
type ReadIo = Either<OwnedReadHalf, ReadHalf<ClientIo>>;

/// A client connection's writing side (see [`ReadIo`]). A TCP stream's shuts the connection's
/// sending direction down when dropped (tokio's waited for both halves to go): the loop drops
/// it only as the connection ends, which, when the client's side failed mid-request, may be
/// while a request body is still being read for the upstream.
type WriteIo = Either<OwnedWriteHalf, WriteHalf<ClientIo>>;

fn split(io: ClientIo) -> (ReadIo, WriteIo) {
    match io {
        ClientIo::Plain(stream) => {
            let (read, write) = stream.into_split();
            (Either::Left(read), Either::Left(write))
        }
        tls => {
            let (read, write) = tokio::io::split(tls);
            (Either::Right(read), Either::Right(write))
        }
    }
}

/// The connection [`split`] made `read` and `write` of.
fn unsplit(read: ReadIo, write: WriteIo) -> ClientIo {
    match (read, write) {
        (Either::Left(read), Either::Left(write)) => {
            ClientIo::Plain(read.reunite(write).expect("the halves of one stream"))
        }
        (Either::Right(read), Either::Right(write)) => read.unsplit(write),
        _ => unreachable!("the halves of one connection are of one kind"),
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Plain(s) => s.is_write_vectored(),
            ClientIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A connection handed to hyper: the bytes already read off it come first.
pub struct Rewind {
    read: Bytes,
    io: ClientIo,
}

impl Rewind {
    pub fn new(io: ClientIo, read: Bytes) -> Rewind {
        Rewind { read, io }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
