//! HTTP/1.1 message framing, shared by both sides the recorder speaks HTTP/1.1 on itself: the
//! client's ([`super::h1`]) and the upstream's ([`super::upstream`]).
//!
//! [`Framed`] reads what a head's framing and hop-by-hop fields say as the head is parsed;
//! [`Decoder`] takes a body off a connection's read buffer by its framing (a length, the
//! chunked coding, or the connection's end), handing on each piece as one read gave it. Both
//! follow RFC 9112 (6.1, 6.3, 7.1): a length beside a transfer coding gives way to it, a length
//! is digits only (a list of one value repeated is that value), and only `chunked` is decoded.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Frame, SizeHint};
use tokio::io::AsyncRead;

use super::forward::HOP_BY_HOP;

/// The longest chunk-size line, and the most trailer bytes and lines a body may carry (the
/// trailers' bounds are hyper's: what reaches the next hop, or waits in memory for it, is no
/// more than a head of its own would be).
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 << 10;
const MAX_TRAILER_LINES: u32 = 100;
/// Read buffer growth; a body is handed on in pieces of at most what one read gave.
pub const READ_SIZE: usize = 16 << 10;

/// What a head's hop-by-hop and length fields say.
#[derive(Default)]
pub struct Framed {
    /// `Content-Length`: `Some(None)` when its values are not one number.
    pub length: Option<Option<u64>>,
    /// `Transfer-Encoding` present: whether its last coding is chunked.
    pub chunked: Option<bool>,
    pub close: bool,
    pub keep_alive: bool,
    /// `Connection: upgrade`.
    pub upgrade: bool,
    /// Other fields `Connection` names.
    pub connection_names: Vec<HeaderName>,
}

impl Framed {
    /// Notes one field; whether it is hop-by-hop.
    pub fn read(&mut self, name: &str, value: &[u8]) -> bool {
        // Most fields are none of these: their length says so before any comparison.
        if !matches!(name.len(), 2 | 7 | 10 | 14 | 16 | 17) {
            return false;
        }
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("content-length") {
            // Digits only; a list of one value repeated is that value (RFC 9110, 8.6).
            let mut n = None;
            for v in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                let this = (!v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit))
                    .then(|| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                    .flatten();
                n = match (n, this) {
                    (None, Some(this)) => Some(Some(this)),
                    (Some(Some(earlier)), Some(this)) if earlier == this => Some(Some(this)),
                    _ => Some(None),
                };
            }
            self.length = match (self.length, n.flatten()) {
                (None, n) => Some(n),
                (Some(Some(earlier)), Some(n)) if earlier == n => Some(Some(n)),
                _ => Some(None),
            };
            return false;
        }
        if is("transfer-encoding") {
            // Only `chunked` is decoded here: a body under another coding would reach its
            // reader still coded, its Transfer-Encoding gone.
            self.chunked = Some(
                self.chunked != Some(false) && value.trim_ascii().eq_ignore_ascii_case(b"chunked"),
            );
            return true;
        }
        if is("connection") {
            for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    self.upgrade = true;
                } else if let Ok(n) = HeaderName::from_bytes(token) {
                    // Never one that frames the message.
                    if n != header::CONTENT_LENGTH {
                        self.connection_names.push(n);
                    }
                }
            }
            return true;
        }
        // The rest of `HOP_BY_HOP`, by name (the test below keeps the two in step): the
        // constant's `HeaderName`s would be made and dropped at each call.
        is("te") || is("upgrade") || is("keep-alive") || is("proxy-connection")
    }
}

/// How a body ends.
pub enum Framing {
    /// After this many more bytes.
    Length(u64),
    Chunked(Chunk),
    /// With the connection.
    Close,
    Done,
}

/// Where a chunked body's reading stands.
pub enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes to go.
    Data(u64),
    /// Before the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one; how many bytes and lines of
    /// them were read.
    Trailers { bytes: usize, lines: u32 },
}

/// Takes a body off a connection: what is buffered first, then what reads bring.
pub struct Decoder {
    pub framing: Framing,
    /// A chunked body's trailer fields worth passing on, once read and until taken (boxed:
    /// few bodies have any).
    trailers: Option<Box<HeaderMap>>,
}

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        let framing = match framing {
            Framing::Length(0) => Framing::Done,
            f => f,
        };
        Decoder {
            framing,
            trailers: None,
        }
    }

    /// Whether the whole body has been taken.
    pub fn done(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    /// The body's exact remaining length, when its framing says it.
    pub fn exact(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            Framing::Done => Some(0),
            _ => None,
        }
    }

    /// The next piece of body, reading `io` into `buf` when it holds none; `None` at the end.
    /// After an error, or the end of a body that ends with its connection, the connection is
    /// not fit for another message ([`Decoder::done`] is true either way).
    pub fn poll_data<R: AsyncRead + Unpin>(
        &mut self,
        mut io: Pin<&mut R>,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            let buffered = buf.len();
            match &mut self.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => {
                    self.framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Framing::Length(left) | Framing::Chunked(Chunk::Data(left)) if buffered > 0 => {
                    let n = buffered.min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    if *left == 0 {
                        self.framing = match self.framing {
                            Framing::Length(_) => Framing::Done,
                            _ => Framing::Chunked(Chunk::DataEnd),
                        };
                    }
                    return Poll::Ready(Some(Ok(buf.split_to(n).freeze())));
                }
                Framing::Close if buffered > 0 => {
                    return Poll::Ready(Some(Ok(buf.split().freeze())));
                }
                Framing::Chunked(Chunk::Size) => {
                    if let Some(end) = line_end(buf) {
                        let line = buf.split_to(end + 2);
                        self.framing = match chunk_size(&line[..end]) {
                            Some(0) => Framing::Chunked(Chunk::Trailers { bytes: 0, lines: 0 }),
                            Some(n) => Framing::Chunked(Chunk::Data(n)),
                            None => return self.cut_short("a bad chunk size"),
                        };
                        continue;
                    }
                    if buffered > MAX_LINE {
                        return self.cut_short("a chunk-size line too long");
                    }
                }
                Framing::Chunked(Chunk::DataEnd) if buffered >= 2 => {
                    if &buf[..2] != b"\r\n" {
                        return self.cut_short("a chunk not ended by CRLF");
                    }
                    buf.advance(2);
                    self.framing = Framing::Chunked(Chunk::Size);
                    continue;
                }
                Framing::Chunked(Chunk::Trailers { bytes, lines }) => {
                    if let Some(end) = line_end(buf) {
                        *bytes += end + 2;
                        *lines += u32::from(end > 0);
                        if *bytes > MAX_TRAILERS || *lines > MAX_TRAILER_LINES {
                            return self.cut_short("trailers too long");
                        }
                        if !plain_line(&buf[..end]) {
                            return self
                                .cut_short("a trailer line with a bare CR, LF or control byte");
                        }
                        if end == 0 {
                            buf.advance(2);
                            self.framing = Framing::Done;
                            return Poll::Ready(None);
                        }
                        self.keep_trailer(&buf[..end]);
                        buf.advance(end + 2);
                        continue;
                    }
                    if *bytes + buffered > MAX_TRAILERS {
                        return self.cut_short("trailers too long");
                    }
                }
                _ => {}
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(READ_SIZE);
            }
            let read = ready!(tokio_util::io::poll_read_buf(io.as_mut(), cx, buf));
            match read {
                Ok(0) if matches!(self.framing, Framing::Close) => {
                    // The end of a body that ends with its connection.
                    self.framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return self.cut_short("the connection closed mid-body"),
                Ok(_) => {}
                Err(e) => {
                    self.framing = Framing::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    /// The body cannot be read further: `why`.
    fn cut_short(&mut self, why: &str) -> Poll<Option<io::Result<Bytes>>> {
        self.framing = Framing::Done;
        Poll::Ready(Some(Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("body cut short: {why}"),
        ))))
    }
}

/// A chunk-size line's size (RFC 9112, 7.1): hex digits, then optional whitespace and an
/// extension; nothing else, and no bare CR, LF or other control byte, which a front proxy might
/// read as the line's end where this one does not.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if !(1..=16).contains(&digits) || !plain_line(line) {
        return None;
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

/// A line without control bytes but tabs.
fn plain_line(line: &[u8]) -> bool {
    !line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

/// What a body read by a [`Decoder`] leaves of its connection's reading side after a poll.
pub enum After {
    /// More to read.
    Going,
    /// The body was read to its end: the reading side can carry the next message.
    Finished,
    /// The body failed: the reading side is fit for nothing more.
    Lost,
}

/// One poll of a body read off a connection by `decoder` (the client's request body, the
/// upstream's response body): the frame to hand on, its errors saying `whose` connection
/// failed, and what it leaves of the reading side.
pub fn poll_body<R: AsyncRead + Unpin>(
    decoder: &mut Decoder,
    io: Pin<&mut R>,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    whose: &str,
) -> Poll<(Option<io::Result<Frame<Bytes>>>, After)> {
    Poll::Ready(match ready!(decoder.poll_data(io, buf, cx)) {
        Some(Ok(data)) => {
            let after = if decoder.done() {
                After::Finished
            } else {
                After::Going
            };
            (Some(Ok(Frame::data(data))), after)
        }
        // The trailer fields, if any, end the body.
        None => (decoder.take_trailers(), After::Finished),
        Some(Err(e)) => {
            let e = io::Error::new(e.kind(), format!("from {whose}: {e}"));
            (Some(Err(e)), After::Lost)
        }
    })
}

impl Decoder {
    /// Keeps a trailer line's field if it goes on (`trailer_field`); out of line, as
    /// [`Decoder::take_trailers`].
    #[cold]
    #[inline(never)]
    fn keep_trailer(&mut self, line: &[u8]) {
        if let Some((name, value)) = trailer_field(line) {
            self.trailers
                .get_or_insert_with(Default::default)
                .append(name, value);
        }
    }

    /// The trailers' frame, once: out of line, since few bodies have one and the body's path
    /// is every request's.
    #[cold]
    #[inline(never)]
    fn take_trailers(&mut self) -> Option<io::Result<Frame<Bytes>>> {
        self.trailers.take().map(|t| Ok(Frame::trailers(*t)))
    }

    /// The body's size as hyper's `Body::size_hint` says it.
    pub fn size_hint(&self) -> SizeHint {
        match self.exact() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// A trailer line's field, when it is well formed and may be passed on (`passes_as_trailer`).
/// A line that is not a field is left out rather than failing a body that has come whole.
fn trailer_field(line: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    let colon = line.iter().position(|b| *b == b':')?;
    let name = HeaderName::from_bytes(&line[..colon]).ok()?;
    let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).ok()?;
    passes_as_trailer(&name).then_some((name, value))
}

/// Whether a trailer field goes on to the next hop: not one about the connection, nor one
/// RFC 9110 (6.5.1) keeps out of trailers (framing, routing, request modifiers, authentication,
/// controls, how to process the content), nor one this proxy sets in heads itself
/// (`X-Forwarded-*`): a next hop that merges trailers into the head (as some servers do) must
/// not get there what the head's rules would have replaced or left out. Hyper's list, which
/// the pooled client and HTTP/2 paths apply, is within this one.
pub fn passes_as_trailer(name: &HeaderName) -> bool {
    const KEPT_OUT: [&str; 20] = [
        "authorization",
        "cache-control",
        "content-encoding",
        "content-length",
        "content-range",
        "content-type",
        "cookie",
        "expect",
        "host",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "set-cookie",
        "trailer",
        "www-authenticate",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
    ];
    let name = name.as_str();
    !(KEPT_OUT.contains(&name) || HOP_BY_HOP.iter().any(|h| h.as_str() == name))
}

/// Ends a chunked body: the last chunk, the trailer fields that may go on, the empty line.
pub fn end_chunked(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        if passes_as_trailer(name) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// The position of the first CRLF in `buf`.
fn line_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_framing_and_hop_by_hop_field_is_read_in_any_case() {
        // `Framed::read` names them itself: the same six, no more, no fewer.
        let hop_by_hop = HOP_BY_HOP;
        let mut names: Vec<_> = hop_by_hop.iter().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "connection",
                "keep-alive",
                "proxy-connection",
                "te",
                "transfer-encoding",
                "upgrade"
            ]
        );
        for name in names {
            let upper = name.to_ascii_uppercase();
            assert!(Framed::default().read(&upper, b"x"), "{name}");
        }
        let mut framed = Framed::default();
        assert!(!framed.read("Content-Length", b"7, 7"));
        assert_eq!(framed.length, Some(Some(7)));
        assert!(!Framed::default().read("Content-Type", b"text/plain"));
        assert!(!Framed::default().read("x-te", b"x"));
    }

    #[test]
    fn chunk_sizes_are_read_strictly() {
        for (line, size) in [
            (&b"5"[..], Some(5)),
            (b"1a", Some(26)),
            (b"5;name=value", Some(5)),
            (b"5 ; name", Some(5)),
            (b"5\t;x", Some(5)),
            (b"1;reject\nnewlines", None),
            (b"5\n", None),
            (b"5\r", None),
            (b" 5", None),
            (b"5 x", None),
            (b"", None),
            (b"12345678901234567", None),
            (b"5\xc2\xa0", None),
        ] {
            assert_eq!(
                chunk_size(line),
                size,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    /// Decodes `wire` as a chunked body: its data, its trailers' frame if any, or the error.
    fn decode(wire: &[u8]) -> (Vec<u8>, Option<HeaderMap>, Option<String>) {
        let mut decoder = Decoder::new(Framing::Chunked(Chunk::Size));
        let mut io: &[u8] = &[];
        let mut buf = BytesMut::from(wire);
        // An empty reader never waits: no wake-up is ever asked for.
        struct Never;
        impl std::task::Wake for Never {
            fn wake(self: std::sync::Arc<Self>) {}
        }
        let waker = std::task::Waker::from(std::sync::Arc::new(Never));
        let mut cx = Context::from_waker(&waker);
        let (mut data, mut trailers) = (Vec::new(), None);
        loop {
            let Poll::Ready((frame, _)) =
                poll_body(&mut decoder, Pin::new(&mut io), &mut buf, &mut cx, "test")
            else {
                unreachable!("an empty reader never waits")
            };
            match frame {
                None => return (data, trailers, None),
                Some(Err(e)) => return (data, trailers, Some(e.to_string())),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(frame) => trailers = Some(frame.into_trailers().unwrap()),
                },
            }
        }
    }

    #[test]
    fn trailer_fields_are_kept_but_those_about_the_connection_or_framing() {
        let (data, trailers, error) = decode(
            b"3\r\nabc\r\n0\r\nX-Digest: sha256:ab\r\nconnection: close\r\ncontent-length: 9\r\n\
              not a field\r\ngrpc-status:  0 \r\n\r\n",
        );
        assert_eq!((data.as_slice(), error), (&b"abc"[..], None));
        let trailers = trailers.expect("a trailers frame");
        let kept: Vec<_> = trailers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(kept, [("x-digest", "sha256:ab"), ("grpc-status", "0")]);
        let mut out = Vec::new();
        end_chunked(&mut out, Some(&trailers));
        assert_eq!(out, b"0\r\nx-digest: sha256:ab\r\ngrpc-status: 0\r\n\r\n");
        // None: no frame, and the plain last chunk.
        let (_, trailers, error) = decode(b"3\r\nabc\r\n0\r\n\r\n");
        assert!(trailers.is_none() && error.is_none());
    }

    #[test]
    fn trailers_are_bounded_in_all_not_line_by_line() {
        let too_long = |wire: String| {
            let (_, trailers, error) = decode(wire.as_bytes());
            trailers.is_none() && error.is_some_and(|e| e.contains("trailers too long"))
        };
        let line = format!("x-pad: {}\r\n", "p".repeat(200));
        let fit = MAX_TRAILERS / line.len();
        assert!(too_long(format!("0\r\n{}\r\n", line.repeat(fit + 1))));
        // A line not ended yet counts too (the reader would otherwise wait for its end).
        let unended = "p".repeat(line.len());
        assert!(too_long(format!("0\r\n{}{unended}", line.repeat(fit))));
        // Many short lines: a hundred fields at most, as in hyper.
        let short = |n| format!("0\r\n{}\r\n", "a: b\r\n".repeat(n));
        assert!(too_long(short(MAX_TRAILER_LINES as usize + 1)));
        let (_, trailers, error) = decode(short(MAX_TRAILER_LINES as usize).as_bytes());
        assert!(error.is_none() && trailers.is_some_and(|t| t.get_all("a").iter().count() == 100));
        let some = format!("0\r\n{}\r\n", line.repeat(fit - 1));
        let (_, trailers, error) = decode(some.as_bytes());
        assert_eq!((trailers.map(|t| t.len()), error), (Some(fit - 1), None));
    }
}
