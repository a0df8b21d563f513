//! Records to frame payload bytes and back.
//!
//! Inside a decompressed frame every record is `kind:u8 len:u32le payload`. The length lets a
//! reader skip a kind it does not know and ignore fields appended after the ones it knows: that
//! is how the format grows without a break.
//!
//! Most kinds are the plain bincode encoding of their struct. Exchanges, nearly all of a tape,
//! are written field by field with bincode's primitive encodings and savings that matter at
//! millions of records (see `captures/README.md`, "Exchanges"):
//!
//! * header values repeat from one exchange to the next (`user-agent`, `accept`, `server`, the
//!   registry's API version), so each header name keeps, per frame, its last few values, and a
//!   repeated value is one byte. The cache starts empty in every frame, so frames stay
//!   independently readable;
//! * a registry body's sha256 is usually the digest already in the path or in
//!   `Docker-Content-Digest`, so it is written as a reference to it rather than 32 more bytes;
//! * bodies repeat too (a manifest pulled again and again, the same first bytes of a popular
//!   layer, a registry's 401 error), so a frame keeps its last few stored bodies and a repeated
//!   one is a reference to where it already lies in the frame (format version 2). The writer's
//!   work, zstd's first of all, goes with the bytes it no longer writes;
//! * whole heads repeat (a client's agent and bearer token on every request of its
//!   connection, a server's answer until its `Date` ticks), so a frame keeps its last few
//!   header blocks and a repeated one is a reference to a slot (format version 3). The writer
//!   knows a repeat by the number the recorder gave the head it shares between records
//!   ([`Headers::shared`]), not by reading it: the block is written once a frame, and its
//!   fields are not run through the value cache again (a tenth of capturing an exchange).

use std::net::SocketAddr;

use super::format::{bincode_config, bincode_config_small};
use super::headers::{HeaderName, KNOWN_NAMES};
use super::record::{
    kind, Blob, Body, ConnectionClosed, ConnectionOpened, Dropped, Exchange, Headers, HttpVersion,
    Method, Record, Redaction, Replayed, Request, Response, Scheme, Stored, Timing,
    UpstreamFailure,
};

/// Bytes in front of every record's payload.
pub const RECORD_PREFIX_LEN: usize = 5;
/// Values remembered per header name within a frame.
pub const VALUE_SLOTS: usize = 4;
/// Stored bodies remembered within a frame.
pub const BODY_SLOTS: usize = 8;
/// Stored bodies shorter than this are written out again rather than referred to (and not
/// remembered): a reference would save nothing.
pub const BODY_REFERENCE_MIN: usize = 16;
/// Header blocks remembered within a frame (the head cache, format version 3).
pub const HEAD_SLOTS: usize = 32;
/// A header block's first byte when it is the block in a slot of the head cache (a slot
/// number follows), and when it is written out and remembered (the block follows). Neither
/// begins a count's varint: 254 and 255 are bincode's tags of 16-byte integers.
const HEAD_AGAIN: u8 = 254;
const HEAD_REMEMBERED: u8 = 255;
/// Header name numbers 1..FIRST_LITERAL_NAME are the well-known names (room for the table to
/// grow); literal names a frame defines are numbered from here.
pub const FIRST_LITERAL_NAME: usize = 128;
const _: () = assert!(KNOWN_NAMES.len() < FIRST_LITERAL_NAME);

/// Encodes records into one frame's payload, remembering header values as it goes. Call
/// [`FrameEncoder::reset`] at every frame boundary.
#[derive(Default)]
pub struct FrameEncoder {
    cache: FrameState,
}

impl FrameEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the frame's header values: the next record starts a new frame.
    pub fn reset(&mut self) {
        self.cache.clear();
    }

    /// Appends `record` to the frame payload `out`: the frame's payload so far, only ever
    /// appended to until [`FrameEncoder::reset`] (a repeated body refers to where it lies in it).
    pub fn encode(&mut self, record: &Record, out: &mut Vec<u8>) {
        let start = out.len();
        out.push(record.kind_code());
        out.extend_from_slice(&[0; 4]);
        let cfg = bincode_config();
        let encoded = match record {
            Record::Exchange(e) => {
                encode_exchange(e, &mut self.cache, out);
                Ok(0)
            }
            Record::ConnectionOpened(c) => bincode::encode_into_std_write(c.as_ref(), out, cfg),
            Record::ConnectionClosed(c) => bincode::encode_into_std_write(c.as_ref(), out, cfg),
            Record::Blob(b) => bincode::encode_into_std_write(b.as_ref(), out, cfg),
            Record::Dropped(d) => bincode::encode_into_std_write(d, out, cfg),
            Record::Replayed(r) => bincode::encode_into_std_write(r.as_ref(), out, cfg),
            Record::Unknown { code, payload } => {
                let at = out.len();
                out.extend_from_slice(payload);
                if *code == kind::EXCHANGE {
                    // An exchange from a newer writer, copied as is: the reader will run its
                    // headers and bodies through the frame's caches, so ours must see them too.
                    let _ = decode_exchange(&mut Input::within(out, at), &mut self.cache);
                }
                Ok(0)
            }
        };
        // Encoding into a Vec fails only on a size limit no record of ours reaches.
        encoded.expect("records encode into memory");
        let len = (out.len() - start - RECORD_PREFIX_LEN) as u32;
        out[start + 1..start + RECORD_PREFIX_LEN].copy_from_slice(&len.to_le_bytes());
    }
}

/// Why a frame's payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeFailure {
    /// Offset within the decompressed payload.
    pub at: usize,
    pub reason: String,
}

/// Decodes the records of one frame payload, one at a time. It owns its state, not the
/// payload, so a reader can keep it beside the frame buffer it fills.
#[derive(Default)]
pub struct FrameDecoder {
    at: usize,
    state: FrameState,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next record of `payload` (always the same payload, from the start).
    pub fn next(&mut self, payload: &[u8]) -> Option<Result<Record, DecodeFailure>> {
        let rest = payload.get(self.at..)?;
        if rest.is_empty() {
            return None;
        }
        let at = self.at;
        let fail = |reason: String| Some(Err(DecodeFailure { at, reason }));
        // On failure the frame passed its checksum, so this is a writer bug or an incompatible
        // writer: stop here rather than guess where the next record starts.
        if rest.len() < RECORD_PREFIX_LEN {
            self.at = payload.len();
            return fail("record prefix cut short".into());
        }
        let code = rest[0];
        let len = u32::from_le_bytes(rest[1..5].try_into().expect("4 bytes")) as usize;
        if rest.len() - RECORD_PREFIX_LEN < len {
            self.at = payload.len();
            return fail(format!("record of {len} bytes overruns its frame"));
        }
        self.at += RECORD_PREFIX_LEN + len;
        let within = &payload[..self.at];
        match decode_body(code, within, at + RECORD_PREFIX_LEN, &mut self.state) {
            Ok(r) => Some(Ok(r)),
            Err(e) => {
                self.at = payload.len();
                fail(format!("record of kind {code} does not decode: {e}"))
            }
        }
    }
}

/// Iterates over the records of one decompressed frame payload.
pub struct RecordDecoder<'a> {
    payload: &'a [u8],
    decoder: FrameDecoder,
}

impl<'a> RecordDecoder<'a> {
    pub fn new(payload: &'a [u8]) -> Self {
        RecordDecoder {
            payload,
            decoder: FrameDecoder::new(),
        }
    }
}

impl Iterator for RecordDecoder<'_> {
    type Item = Result<Record, DecodeFailure>;

    fn next(&mut self) -> Option<Self::Item> {
        self.decoder.next(self.payload)
    }
}

/// The record of kind `code` whose payload starts at `at` in `payload` and ends with it.
fn decode_body(
    code: u8,
    payload: &[u8],
    at: usize,
    cache: &mut FrameState,
) -> Result<Record, String> {
    let body = &payload[at..];
    fn one<T: bincode::Decode<()>>(body: &[u8]) -> Result<T, String> {
        bincode::decode_from_slice(body, bincode_config_small())
            .map(|(v, _)| v)
            .map_err(|e| e.to_string())
    }
    Ok(match code {
        kind::EXCHANGE => Record::Exchange(Box::new(decode_exchange(
            &mut Input::within(payload, at),
            cache,
        )?)),
        kind::CONNECTION_OPENED => {
            Record::ConnectionOpened(Box::new(one::<ConnectionOpened>(body)?))
        }
        kind::CONNECTION_CLOSED => {
            Record::ConnectionClosed(Box::new(one::<ConnectionClosed>(body)?))
        }
        kind::BLOB => Record::Blob(Box::new(
            bincode::decode_from_slice::<Blob, _>(body, bincode_config())
                .map(|(v, _)| v)
                .map_err(|e| e.to_string())?,
        )),
        kind::DROPPED => Record::Dropped(one::<Dropped>(body)?),
        kind::REPLAYED => Record::Replayed(Box::new(match one::<Replayed>(body) {
            Ok(r) => r,
            // Written before `divergence` was appended: the same record with `None` (a zero).
            Err(e) => one::<Replayed>(&[body, &[0]].concat()).map_err(|_| e)?,
        })),
        code => Record::Unknown {
            code,
            payload: body.to_vec(),
        },
    })
}

// ---- bincode's primitive encodings (standard configuration), by hand ----

#[inline]
fn put_varint(out: &mut Vec<u8>, v: u64) {
    if v < 251 {
        out.push(v as u8);
    } else {
        put_long_varint(out, v);
    }
}

/// A varint of 3, 5 or 9 bytes: a tag, then the value's low 2, 4 or 8 bytes, little-endian.
/// Written as nine bytes and cut back, so that the copy is one of a fixed size (a call to
/// `memcpy` for a few bytes cost more than the rest: ten varints go into every exchange).
fn put_long_varint(out: &mut Vec<u8>, v: u64) {
    let (tag, len) = if v <= u16::MAX as u64 {
        (251, 2)
    } else if v <= u32::MAX as u64 {
        (252, 4)
    } else {
        (253, 8)
    };
    let mut bytes = [tag; 9];
    bytes[1..].copy_from_slice(&v.to_le_bytes());
    let end = out.len() + 1 + len;
    out.extend_from_slice(&bytes);
    out.truncate(end);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

// Bincode's encodings of an exchange's small fields, written by hand: a call into bincode's
// encoder cost more than the byte or few it writes (an enum is its variant's index as a varint,
// then its fields). A test holds each to bincode's own.

/// A method: its variant's index, and the name of any other.
fn put_method(out: &mut Vec<u8>, method: &Method) {
    let index = match method {
        Method::Get => 0,
        Method::Head => 1,
        Method::Post => 2,
        Method::Put => 3,
        Method::Patch => 4,
        Method::Delete => 5,
        Method::Options => 6,
        Method::Connect => 7,
        Method::Trace => 8,
        Method::Other(name) => {
            out.push(9);
            put_bytes(out, name.as_bytes());
            return;
        }
    };
    out.push(index);
}

/// A client's address: 1 (`Some`), 0 (the IPv4 variant), its four bytes and the port (an IPv6
/// one, or none, through bincode).
fn put_client(out: &mut Vec<u8>, client: &Option<SocketAddr>) {
    match client {
        Some(SocketAddr::V4(a)) => {
            out.extend_from_slice(&[1, 0]);
            out.extend_from_slice(&a.ip().octets());
            put_varint(out, a.port() as u64);
        }
        other => put(out, other),
    }
}

fn put<T: bincode::Encode>(out: &mut Vec<u8>, v: &T) {
    bincode::encode_into_std_write(v, out, bincode_config()).expect("encodes into memory");
}

/// A cursor over one record's bytes: those of its frame up to the record's end, from where the
/// record starts (a repeated body is read where it lies earlier in the frame).
struct Input<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    #[cfg(test)]
    fn new(bytes: &'a [u8]) -> Self {
        Input { bytes, at: 0 }
    }

    fn within(frame: &'a [u8], at: usize) -> Self {
        Input { bytes: frame, at }
    }

    #[inline]
    fn u8(&mut self) -> Result<u8, String> {
        let b = *self.bytes.get(self.at).ok_or("record ends early")?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).ok_or("length overflows")?;
        let b = self.bytes.get(self.at..end).ok_or("record ends early")?;
        self.at = end;
        Ok(b)
    }

    #[inline]
    fn varint(&mut self) -> Result<u64, String> {
        Ok(match self.u8()? {
            251 => u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as u64,
            252 => u32::from_le_bytes(self.take(4)?.try_into().expect("4")) as u64,
            253 => u64::from_le_bytes(self.take(8)?.try_into().expect("8")),
            b @ 0..=250 => b as u64,
            b => return Err(format!("bad varint tag {b}")),
        })
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.varint()?;
        self.take(usize::try_from(n).map_err(|_| "length overflows")?)
    }

    fn string(&mut self) -> Result<String, String> {
        std::str::from_utf8(self.bytes()?)
            .map(str::to_string)
            .map_err(|e| format!("invalid UTF-8: {e}"))
    }

    fn digest(&mut self) -> Result<[u8; 32], String> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }

    fn bool(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("bad bool {b}")),
        }
    }

    /// A bincode-derived value.
    fn get<T: bincode::Decode<()>>(&mut self) -> Result<T, String> {
        let (v, used) = bincode::decode_from_slice(&self.bytes[self.at..], bincode_config_small())
            .map_err(|e| e.to_string())?;
        self.at += used;
        Ok(v)
    }
}

// ---- exchanges ----

/// `value - previous` as a zigzag number: small differences either way are small.
fn zigzag(value: u64, previous: u64) -> u64 {
    let d = value.wrapping_sub(previous) as i64;
    ((d << 1) ^ (d >> 63)) as u64
}

fn unzigzag(z: u64, previous: u64) -> u64 {
    let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
    previous.wrapping_add(d as u64)
}

fn encode_exchange(e: &Exchange, cache: &mut FrameState, out: &mut Vec<u8>) {
    let t = &e.timing;
    let [id, connection, start] = cache.previous;
    put_varint(out, zigzag(e.id, id));
    put_varint(out, zigzag(e.connection, connection));
    cache.previous = [e.id, e.connection, t.start];
    put_varint(out, e.stream as u64);
    put_client(out, &e.client);
    put_varint(out, zigzag(t.start, start));
    put_varint(out, t.request_done);
    match t.response_head {
        Some(h) => {
            out.push(1);
            put_varint(out, h);
        }
        None => out.push(0),
    }
    put_varint(out, t.response_done);

    let r = &e.request;
    put_method(out, &r.method);
    out.push(r.scheme as u8);
    put_bytes(out, r.authority.as_bytes());
    put_bytes(out, r.target.as_bytes());
    out.push(r.version as u8);
    encode_headers(&r.headers, cache, out);
    encode_body(&r.body, &r.target, &r.headers, cache, out);

    match &e.response {
        Ok(resp) => {
            out.push(0);
            put_varint(out, resp.status as u64);
            out.push(resp.version as u8);
            encode_headers(&resp.headers, cache, out);
            encode_body(&resp.body, &r.target, &resp.headers, cache, out);
        }
        Err(f) => {
            out.push(1);
            put(out, f);
        }
    }
    if e.issued_secrets.is_empty() {
        out.push(0);
    } else {
        put(out, &e.issued_secrets);
    }
    out.push(e.upgraded as u8);
}

fn decode_exchange(i: &mut Input, cache: &mut FrameState) -> Result<Exchange, String> {
    let [prev_id, prev_connection, prev_start] = cache.previous;
    let id = unzigzag(i.varint()?, prev_id);
    let connection = unzigzag(i.varint()?, prev_connection);
    let stream = i.varint()? as u32;
    let client: Option<SocketAddr> = i.get()?;
    let start = unzigzag(i.varint()?, prev_start);
    cache.previous = [id, connection, start];
    let request_done = i.varint()?;
    let response_head = if i.bool()? { Some(i.varint()?) } else { None };
    let response_done = i.varint()?;

    let method: Method = i.get()?;
    let scheme: Scheme = i.get()?;
    let authority = i.string()?;
    let target = i.string()?;
    let version: HttpVersion = i.get()?;
    let headers = decode_headers(i, cache)?;
    let body = decode_body_field(i, &target, &headers, cache)?;
    let request = Request {
        method,
        scheme,
        authority,
        target,
        version,
        headers,
        body,
    };

    let response = match i.u8()? {
        0 => {
            let status = u16::try_from(i.varint()?).map_err(|_| "status out of range")?;
            let version: HttpVersion = i.get()?;
            let headers = decode_headers(i, cache)?;
            let body = decode_body_field(i, &request.target, &headers, cache)?;
            Ok(Response {
                status,
                version,
                headers,
                body,
            })
        }
        1 => Err(i.get::<UpstreamFailure>()?),
        b => return Err(format!("bad response tag {b}")),
    };
    let issued_secrets: Vec<Redaction> = i.get()?;
    let upgraded = i.bool()?;
    // Anything after this is a field appended by a newer writer: ignored.
    Ok(Exchange {
        id,
        connection,
        stream,
        client,
        timing: Timing {
            start,
            request_done,
            response_head,
            response_done,
        },
        request,
        response,
        issued_secrets,
        upgraded,
    })
}

// Body flags: bits 0-1 where the sha256 is, bit 2 complete, bits 3-4 what is stored.
// SHA_NONE with a whole stored prefix: the digest is the prefix's, derived on reading.
const SHA_NONE: u8 = 0;
const SHA_INLINE: u8 = 1;
const SHA_IN_TARGET: u8 = 2;
const SHA_IN_DIGEST_HEADER: u8 = 3;
const COMPLETE: u8 = 1 << 2;
const STORED_PREFIX: u8 = 1 << 3;
const STORED_FULL: u8 = 2 << 3;
/// Format version 2: the stored prefix is the body in a slot of the frame's body cache.
const STORED_AGAIN: u8 = 3 << 3;

fn encode_body(
    body: &Body,
    target: &str,
    headers: &Headers,
    cache: &mut FrameState,
    out: &mut Vec<u8>,
) {
    let in_target = body.sha256.and_then(|_| digest_position(target));
    let sha = match &body.sha256 {
        None => SHA_NONE,
        Some(d) if in_target.map(|(_, t)| t).as_ref() == Some(d) => SHA_IN_TARGET,
        Some(d) if digest_header(headers).as_ref() == Some(d) => SHA_IN_DIGEST_HEADER,
        Some(_) => SHA_INLINE,
    };
    let again = match &body.stored {
        Stored::Prefix(p) => cache.find_body(p, out),
        _ => None,
    };
    let stored = match body.stored {
        Stored::None => 0,
        Stored::Prefix(_) if again.is_some() => STORED_AGAIN,
        Stored::Prefix(_) => STORED_PREFIX,
        Stored::Full(_) => STORED_FULL,
    };
    out.push(sha | stored | if body.complete { COMPLETE } else { 0 });
    put_varint(out, body.len);
    if sha == SHA_INLINE {
        out.extend_from_slice(body.sha256.as_ref().expect("inline sha"));
    }
    if sha == SHA_IN_TARGET {
        put_varint(out, in_target.expect("found above").0 as u64);
    }
    match (&body.stored, again) {
        (Stored::Prefix(_), Some(slot)) => {
            out.push(slot as u8);
            cache.body_used(slot);
        }
        (Stored::Prefix(p), None) => {
            put_bytes(out, p);
            cache.body_stored(out.len() - p.len(), p.len());
        }
        (Stored::Full(d), _) => out.extend_from_slice(d),
        (Stored::None, _) => {}
    }
}

fn decode_body_field(
    i: &mut Input,
    target: &str,
    headers: &Headers,
    cache: &mut FrameState,
) -> Result<Body, String> {
    let flags = i.u8()?;
    let len = i.varint()?;
    let sha256 = match flags & 3 {
        SHA_NONE => None,
        SHA_INLINE => Some(i.digest()?),
        SHA_IN_TARGET => {
            let at = usize::try_from(i.varint()?).unwrap_or(usize::MAX);
            let hex = target.as_bytes().get(at..at.saturating_add(64));
            Some(
                hex.and_then(parse_hex32)
                    .ok_or("body digest refers to no digest in the target")?,
            )
        }
        _ => Some(
            digest_header(headers)
                .ok_or("body digest refers to a missing Docker-Content-Digest")?,
        ),
    };
    // Whether the stored bytes are (now) in the first slot of the frame's body cache.
    let mut cached = false;
    let stored = match flags & (3 << 3) {
        0 => Stored::None,
        STORED_PREFIX => {
            let p = i.bytes()?;
            cached = cache.body_stored(i.at - p.len(), p.len());
            Stored::Prefix(p.to_vec())
        }
        STORED_FULL => Stored::Full(i.digest()?),
        _ => {
            let slot = i.u8()? as usize;
            let b = (cache.bodies.get(slot).copied().flatten())
                .ok_or_else(|| format!("stored body slot {slot} is empty"))?;
            cache.body_used(slot);
            cached = true;
            let bytes = (i.bytes.get(b.start as usize..(b.start + b.len) as usize))
                .ok_or_else(|| format!("stored body slot {slot} lies past its frame"))?;
            Stored::Prefix(bytes.to_vec())
        }
    };
    // No digest written for a body stored whole: it is the stored bytes' (the recorder does
    // not hash what it keeps whole), worked out once per body the frame keeps.
    let sha256 = match (sha256, &stored) {
        (None, Stored::Prefix(p)) if len > 0 && p.len() as u64 == len => {
            let digest = || <sha2::Sha256 as sha2::Digest>::digest(p).into();
            Some(match cache.bodies[0].as_mut().filter(|_| cached) {
                Some(slot) => *slot.sha256.get_or_insert_with(digest),
                None => digest(),
            })
        }
        (sha256, _) => sha256,
    };
    Ok(Body {
        len,
        sha256,
        stored,
        complete: flags & COMPLETE != 0,
    })
}

/// The first `sha256:<64 hex>` in a path or query (also `sha256%3A`, as clients escape it).
pub fn digest_in_text(text: &str) -> Option<[u8; 32]> {
    digest_position(text).map(|(_, d)| d)
}

/// [`digest_in_text`], with the offset of its 64 hex digits.
pub fn digest_position(text: &str) -> Option<(usize, [u8; 32])> {
    let b = text.as_bytes();
    let mut from = 0;
    while let Some(pos) = text[from..].find("sha256") {
        let at = from + pos + 6;
        let hex_start = if b.get(at) == Some(&b':') {
            at + 1
        } else if b.len() >= at + 3
            && b[at] == b'%'
            && b[at + 1] == b'3'
            && (b[at + 2] | 0x20) == b'a'
        {
            at + 3
        } else {
            from = at;
            continue;
        };
        if let Some(d) = b.get(hex_start..hex_start + 64).and_then(parse_hex32) {
            return Some((hex_start, d));
        }
        from = at;
    }
    None
}

fn digest_header(headers: &Headers) -> Option<[u8; 32]> {
    let v = headers.get_str("docker-content-digest")?;
    let hex = v.strip_prefix("sha256:")?;
    (hex.len() == 64)
        .then(|| parse_hex32(hex.as_bytes()))
        .flatten()
}

/// Lowercase hex digit values; 0xff for anything else. Upper case would not round-trip through
/// `digest_string`, so it is not a digest we reuse.
const HEX: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut c = 0;
    while c < 10 {
        t[b'0' as usize + c] = c as u8;
        c += 1;
    }
    let mut c = 0;
    while c < 6 {
        t[b'a' as usize + c] = 10 + c as u8;
        c += 1;
    }
    t
};

fn parse_hex32(hex: &[u8]) -> Option<[u8; 32]> {
    let hex: &[u8; 64] = hex.try_into().ok()?;
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (hi, lo) = (HEX[pair[0] as usize], HEX[pair[1] as usize]);
        bad |= (hi | lo) & 0xf0;
        *o = hi << 4 | lo;
    }
    (bad == 0).then_some(out)
}

// ---- headers and the per-frame value cache ----

/// Per frame: for each header name, its last [`VALUE_SLOTS`] values, most recent first. Names
/// are numbered as on the wire: 1..FIRST_LITERAL_NAME for the well-known ones, then literal
/// names in the order the frame first used them.
#[derive(Default)]
struct FrameState {
    /// id, connection and start of the frame's previous exchange: each exchange writes its own
    /// as the difference (zigzag varint), small and regular where the values are not.
    previous: [u64; 3],
    /// Literal names seen in this frame; id = FIRST_LITERAL_NAME + index.
    literal_names: Vec<String>,
    /// Slots per name id (index 0 unused).
    slots: Vec<[Option<CachedValue>; VALUE_SLOTS]>,
    /// Bytes of plain values.
    arena: Vec<u8>,
    /// The frame's last [`BODY_SLOTS`] stored bodies of [`BODY_REFERENCE_MIN`] bytes or more,
    /// the most recently written or referred to first.
    bodies: [Option<StoredBody>; BODY_SLOTS],
    heads: HeadCache,
}

/// The frame's last [`HEAD_SLOTS`] header blocks written out to be remembered, the most
/// recently written or referred to first: a writer knows them by their [`Headers::shared`]
/// number, a reader keeps them decoded. Slots hold indexes into the blocks, so that moving a
/// block to the front moves a byte, not the block.
struct HeadCache {
    /// `order[s]`: which block is in slot s, for s below `len`.
    order: [u8; HEAD_SLOTS],
    len: usize,
    /// Per block: its [`Headers::shared`] number (writing), or 0 (reading).
    shared: [u64; HEAD_SLOTS],
    /// Per block: the headers decoded (reading).
    decoded: Vec<Headers>,
}

/// The blocks in a new frame's head cache, slot by slot: each taken in turn as the frame
/// remembers its first blocks.
const FIRST_ORDER: [u8; HEAD_SLOTS] = {
    let mut order = [0; HEAD_SLOTS];
    let mut i = 0;
    while i < HEAD_SLOTS {
        order[i] = i as u8;
        i += 1;
    }
    order
};

impl Default for HeadCache {
    fn default() -> Self {
        HeadCache {
            order: FIRST_ORDER,
            len: 0,
            shared: [0; HEAD_SLOTS],
            decoded: Vec::new(),
        }
    }
}

impl HeadCache {
    /// As new for the next frame ([`HeadCache::default`]: the one place that says what new
    /// is), keeping the decoded blocks' allocation.
    fn clear(&mut self) {
        let mut decoded = std::mem::take(&mut self.decoded);
        decoded.clear();
        *self = HeadCache {
            decoded,
            ..HeadCache::default()
        };
    }

    /// The slot of the block numbered `shared` (not 0).
    fn find(&self, shared: u64) -> Option<usize> {
        let block = self.shared.iter().position(|&s| s == shared)?;
        self.order[..self.len]
            .iter()
            .position(|&b| b as usize == block)
    }

    /// The block in `slot` is used again: it moves to the front. Its index.
    fn used(&mut self, slot: usize) -> usize {
        // By hand: `rotate_right` calls `memmove`, which costs more than these few bytes.
        let block = self.order[slot];
        for s in (0..slot).rev() {
            self.order[s + 1] = self.order[s];
        }
        self.order[0] = block;
        block as usize
    }

    /// A block is written out to be remembered: it takes slot 0, in the place of the least
    /// recently used when all are taken. Its index.
    fn remembered(&mut self) -> usize {
        if self.len < HEAD_SLOTS {
            self.len += 1;
        }
        self.used(self.len - 1)
    }
}

/// Where a stored body lies in its frame's payload; and, once a reader worked it out, the
/// sha256 of the bytes (when they are the whole body and the tape does not say it).
#[derive(Clone, Copy)]
struct StoredBody {
    start: u32,
    len: u32,
    sha256: Option<[u8; 32]>,
}

#[derive(Clone)]
enum CachedValue {
    Plain { start: u32, len: u32 },
    Redacted(Box<Redaction>),
}

impl FrameState {
    fn clear(&mut self) {
        self.previous = [0; 3];
        self.literal_names.clear();
        self.slots.clear();
        self.arena.clear();
        self.bodies = [None; BODY_SLOTS];
        self.heads.clear();
    }

    /// The slot of a body stored earlier in the frame `payload` with the same bytes as `p`.
    fn find_body(&self, p: &[u8], payload: &[u8]) -> Option<usize> {
        if p.len() < BODY_REFERENCE_MIN {
            return None;
        }
        self.bodies.iter().position(|b| {
            b.is_some_and(|b| {
                let start = b.start as usize;
                b.len as usize == p.len() && payload.get(start..start + p.len()) == Some(p)
            })
        })
    }

    /// The body in `slot` is used again: it moves to the front.
    fn body_used(&mut self, slot: usize) {
        self.bodies[..=slot].rotate_right(1);
    }

    /// A body of `len` bytes was written at `start`: remembered at the front if it is long
    /// enough to be referred to (returned), the least recently used forgotten.
    fn body_stored(&mut self, start: usize, len: usize) -> bool {
        if len < BODY_REFERENCE_MIN {
            return false;
        }
        self.bodies.rotate_right(1);
        self.bodies[0] = Some(StoredBody {
            start: start as u32,
            len: len as u32,
            sha256: None,
        });
        true
    }

    fn name_id(&mut self, name: HeaderName<'_>) -> (usize, bool) {
        match name {
            HeaderName::Known(i) => (i as usize + 1, false),
            HeaderName::Literal(n) => match self.literal_names.iter().position(|l| l == n) {
                Some(p) => (FIRST_LITERAL_NAME + p, false),
                None => {
                    self.literal_names.push(n.to_string());
                    (FIRST_LITERAL_NAME + self.literal_names.len() - 1, true)
                }
            },
        }
    }

    fn slots_of(&mut self, id: usize) -> &mut [Option<CachedValue>; VALUE_SLOTS] {
        if self.slots.len() <= id {
            self.slots.resize(id + 1, Default::default());
        }
        &mut self.slots[id]
    }

    fn find(&self, id: usize, value: &super::headers::HeaderValue<'_>) -> Option<usize> {
        use super::headers::HeaderValue as V;
        let slots = self.slots.get(id)?;
        slots.iter().position(|s| match (s, value) {
            (Some(CachedValue::Plain { start, len }), V::Plain(b)) => {
                &self.arena[*start as usize..(*start + *len) as usize] == *b
            }
            (Some(CachedValue::Redacted(r)), V::Redacted(x)) => r.as_ref() == *x,
            _ => false,
        })
    }

    /// Remembers a new value of `id` as its most recent.
    fn remember(&mut self, id: usize, value: CachedValue) {
        let slots = self.slots_of(id);
        slots.rotate_right(1);
        slots[0] = Some(value);
    }

    fn remember_plain(&mut self, id: usize, bytes: &[u8]) {
        let start = self.arena.len() as u32;
        self.arena.extend_from_slice(bytes);
        self.remember(
            id,
            CachedValue::Plain {
                start,
                len: bytes.len() as u32,
            },
        );
    }
}

// A block: HEAD_AGAIN and a slot of the head cache; or HEAD_REMEMBERED and the block written
// out, which takes a slot; or the block written out: the count, then per header its name
// (varint: 0 = a new literal name follows as a string; n = name id n) and value (u8: 0 = plain
// bytes follow; 1 = a bincode Redaction follows; 2 + s = the value in slot s of this name).
fn encode_headers(headers: &Headers, cache: &mut FrameState, out: &mut Vec<u8>) {
    let shared = headers.shared();
    if shared != 0 {
        if let Some(slot) = cache.heads.find(shared) {
            cache.heads.used(slot);
            out.extend_from_slice(&[HEAD_AGAIN, slot as u8]);
            return;
        }
        let block = cache.heads.remembered();
        cache.heads.shared[block] = shared;
        out.push(HEAD_REMEMBERED);
    }
    encode_fields(headers, cache, out);
}

#[inline(never)]
fn encode_fields(headers: &Headers, cache: &mut FrameState, out: &mut Vec<u8>) {
    put_varint(out, headers.len() as u64);
    for (name, value) in headers.iter_names() {
        let (id, new_name) = cache.name_id(name);
        if new_name {
            out.push(0);
            put_bytes(out, name.as_str().as_bytes());
        } else {
            put_varint(out, id as u64);
        }
        if let Some(slot) = cache.find(id, &value) {
            out.push(2 + slot as u8);
            continue;
        }
        match value {
            super::headers::HeaderValue::Plain(b) => {
                out.push(0);
                put_bytes(out, b);
                cache.remember_plain(id, b);
            }
            super::headers::HeaderValue::Redacted(r) => {
                out.push(1);
                put(out, r);
                cache.remember(id, CachedValue::Redacted(Box::new(r.clone())));
            }
        }
    }
}

fn decode_headers(i: &mut Input, cache: &mut FrameState) -> Result<Headers, String> {
    match i.bytes.get(i.at) {
        Some(&HEAD_AGAIN) => {
            i.at += 1;
            let slot = i.u8()? as usize;
            if slot >= cache.heads.len {
                return Err(format!("header block slot {slot} is empty"));
            }
            let block = cache.heads.used(slot);
            // Always there when reading; an encoder keeping in step with a newer writer's
            // record (`Record::Unknown`) holds no decoded blocks of its own.
            let kept = cache.heads.decoded.get(block);
            kept.cloned()
                .ok_or_else(|| format!("header block slot {slot} is not decoded"))
        }
        Some(&HEAD_REMEMBERED) => {
            i.at += 1;
            let headers = decode_fields(i, cache)?;
            let block = cache.heads.remembered();
            // What an encoder decoding a newer writer's record keeps: a block it cannot name.
            cache.heads.shared[block] = 0;
            let decoded = &mut cache.heads.decoded;
            if decoded.len() <= block {
                decoded.resize_with(block + 1, Headers::new);
            }
            decoded[block].clone_from(&headers);
            Ok(headers)
        }
        _ => decode_fields(i, cache),
    }
}

fn decode_fields(i: &mut Input, cache: &mut FrameState) -> Result<Headers, String> {
    let count = i.varint()?;
    // Every header takes at least two bytes: refuse counts the record cannot hold.
    if count > (i.bytes.len() - i.at) as u64 / 2 {
        return Err(format!("{count} headers cannot fit in the record"));
    }
    let mut h = Headers::with_capacity(count as usize, 384);
    for _ in 0..count {
        let unknown;
        let (id, name) = match i.varint()? {
            0 => {
                let name =
                    std::str::from_utf8(i.bytes()?).map_err(|e| format!("header name: {e}"))?;
                // Mirror the writer: a literal name takes the next number, even if this build
                // knows it as well-known.
                cache.literal_names.push(name.to_string());
                (FIRST_LITERAL_NAME + cache.literal_names.len() - 1, None)
            }
            id if (id as usize) <= KNOWN_NAMES.len() => {
                (id as usize, Some(HeaderName::Known((id - 1) as u8)))
            }
            id if (id as usize) < FIRST_LITERAL_NAME => {
                // A well-known name of a newer writer's table.
                unknown = format!("x-loadtape-unknown-name-{id}");
                (id as usize, Some(HeaderName::Literal(&unknown)))
            }
            id => {
                let index = usize::try_from(id).unwrap_or(usize::MAX) - FIRST_LITERAL_NAME;
                if index >= cache.literal_names.len() {
                    return Err(format!("header name {id} was never defined in this frame"));
                }
                (index + FIRST_LITERAL_NAME, None)
            }
        };
        let name = match name {
            Some(n) => n,
            None => super::headers::classify(&cache.literal_names[id - FIRST_LITERAL_NAME]),
        };
        match i.u8()? {
            0 => {
                let value = i.bytes()?;
                h.push_name(name, value);
                cache.remember_plain(id, value);
            }
            1 => {
                let r: Redaction = i.get()?;
                h.push_name_redacted(name, r.clone());
                cache.remember(id, CachedValue::Redacted(Box::new(r)));
            }
            tag => {
                let slot = (tag - 2) as usize;
                let cached = cache
                    .slots
                    .get(id)
                    .and_then(|s| s.get(slot))
                    .and_then(Option::as_ref)
                    .ok_or_else(|| format!("header value slot {slot} of name id {id} is empty"))?;
                match cached {
                    CachedValue::Plain { start, len } => h.push_name(
                        name,
                        &cache.arena[*start as usize..(*start + *len) as usize],
                    ),
                    CachedValue::Redacted(r) => h.push_name_redacted(name, r.as_ref().clone()),
                }
            }
        }
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_fields_written_by_hand_are_bincodes() {
        let written = |v: &dyn Fn(&mut Vec<u8>)| {
            let mut out = Vec::new();
            v(&mut out);
            out
        };
        let methods = [
            Method::Get,
            Method::Head,
            Method::Post,
            Method::Put,
            Method::Patch,
            Method::Delete,
            Method::Options,
            Method::Connect,
            Method::Trace,
            Method::Other("PROPFIND".into()),
        ];
        for m in &methods {
            assert_eq!(
                written(&|o| put_method(o, m)),
                written(&|o| put(o, m)),
                "{m:?}"
            );
        }
        for s in [Scheme::Http, Scheme::Https] {
            assert_eq!(vec![s as u8], written(&|o| put(o, &s)));
        }
        for v in [
            HttpVersion::Http10,
            HttpVersion::Http11,
            HttpVersion::H2,
            HttpVersion::H3,
        ] {
            assert_eq!(vec![v as u8], written(&|o| put(o, &v)));
        }
        let clients = [
            None,
            Some("127.0.0.1:1".parse().unwrap()),
            Some("10.1.2.3:250".parse().unwrap()),
            Some("10.1.2.3:251".parse().unwrap()),
            Some("192.168.0.9:65535".parse().unwrap()),
            Some("[::1]:8080".parse().unwrap()),
        ];
        for c in &clients {
            assert_eq!(
                written(&|o| put_client(o, c)),
                written(&|o| put(o, c)),
                "{c:?}"
            );
        }
        assert_eq!(vec![0], written(&|o| put(o, &Vec::<Redaction>::new())));
    }

    #[test]
    fn varints_are_bincodes_and_read_back_at_every_boundary() {
        let mut values = vec![0, 1, 250, 251, 252, 253, 254, 255, 256, u64::MAX];
        for bits in [16, 32] {
            let edge = (1u64 << bits) - 1;
            values.extend([edge - 1, edge, edge + 1]);
        }
        let mut out = vec![7u8];
        for &v in &values {
            let before = out.len();
            put_varint(&mut out, v);
            let bincode = bincode::encode_to_vec(v, bincode_config()).unwrap();
            assert_eq!(out[before..], bincode[..], "{v}");
        }
        let mut input = Input::new(&out[1..]);
        for &v in &values {
            assert_eq!(input.varint().unwrap(), v);
        }
        assert_eq!(input.at, out.len() - 1, "nothing left over");
    }

    #[test]
    fn zigzag_differences_round_trip_at_the_edges() {
        for (v, p) in [
            (0, 0),
            (5, 9),
            (9, 5),
            (u64::MAX, 0),
            (0, u64::MAX),
            (1 << 63, 3),
        ] {
            assert_eq!(unzigzag(zigzag(v, p), p), v);
        }
        assert_eq!(zigzag(101, 100), 2);
        assert_eq!(zigzag(99, 100), 1);
    }

    #[test]
    fn a_body_stored_whole_without_its_digest_reads_back_with_it() {
        use sha2::Digest;
        let bytes = b"{\"schemaVersion\": 2}".to_vec();
        let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
        let headers = Headers::new();
        let round_trip = |body: &Body| {
            let mut out = Vec::new();
            let (mut writing, mut reading) = (FrameState::default(), FrameState::default());
            encode_body(body, "/v2/a/manifests/v1", &headers, &mut writing, &mut out);
            let target = "/v2/a/manifests/v1";
            let read = decode_body_field(&mut Input::new(&out), target, &headers, &mut reading);
            (read.unwrap(), out.len())
        };
        // As the recorder writes a body it kept whole: no digest, and none on the tape.
        let unhashed = Body {
            len: bytes.len() as u64,
            sha256: None,
            stored: Stored::Prefix(bytes.clone()),
            complete: true,
        };
        let (read, unhashed_size) = round_trip(&unhashed);
        assert_eq!(read.sha256, Some(digest));
        assert_eq!(read.stored, unhashed.stored);
        // One given with its digest reads back the same, 32 bytes longer.
        let (read, hashed_size) = round_trip(&Body::inline(bytes.clone()));
        assert_eq!(read, Body::inline(bytes.clone()));
        assert_eq!(hashed_size, unhashed_size + 32);
        // Only a prefix, or nothing, stored: no digest to derive.
        for stored in [Stored::Prefix(bytes[..4].to_vec()), Stored::None] {
            let body = Body {
                stored,
                ..unhashed.clone()
            };
            assert_eq!(round_trip(&body).0.sha256, None);
        }
    }

    #[test]
    fn digests_are_found_plain_and_escaped() {
        let d = "sha256:c8e4875d88954010f5dba59d4e0e878bf5f1622d50f91b9c7631d427ecdb6e47";
        let want = digest_in_text(d).unwrap();
        assert_eq!(super::super::record::digest_string(&want), d);
        let escaped = format!("/v2/a/blobs/uploads/x?digest={}", d.replace(':', "%3A"));
        assert_eq!(digest_in_text(&escaped), Some(want));
        assert_eq!(digest_in_text("/v2/sha256/blobs/sha256:abc"), None);
        assert_eq!(
            digest_in_text(&d.to_uppercase().replace("SHA256", "sha256")),
            None
        );
    }
}
