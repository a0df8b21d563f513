//! Ordered HTTP headers, stored so that reading millions of them stays cheap.
//!
//! A recorded exchange carries twenty-odd headers. Stored as a `Vec` of owned strings, decoding
//! one record would cost forty allocations, and the reader's budget is a few hundred nanoseconds
//! per record. So a [`Headers`] keeps every name and value back to back in one byte buffer, with a
//! small table of spans beside it: two allocations per header block, whatever its size. Names of
//! well-known headers are not stored at all: they are an index into [`KNOWN_NAMES`], one byte on
//! the wire.
//!
//! Names are lowercase (as HTTP/2 sends them and as hyper hands them over); values are bytes, as
//! HTTP allows. A credential never stands here in clear: it is a [`Redaction`], which keeps what a
//! replay needs to put a fresh one in its place.

use bincode::de::{BorrowDecoder, Decoder};
use bincode::enc::Encoder;
use bincode::error::{DecodeError, EncodeError};
use bincode::{BorrowDecode, Decode, Encode};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::Serialize;

/// Header names that cost one byte on the wire. Append only: a name's index is part of the
/// format (code = index + 1; code 0 means the name follows as a string).
pub const KNOWN_NAMES: &[&str] = &[
    "host",
    "user-agent",
    "accept",
    "accept-encoding",
    "authorization",
    "content-type",
    "content-length",
    "connection",
    "date",
    "server",
    "docker-distribution-api-version",
    "docker-content-digest",
    "docker-upload-uuid",
    "location",
    "range",
    "www-authenticate",
    "etag",
    "if-none-match",
    "cache-control",
    "transfer-encoding",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "cookie",
    "set-cookie",
    "access-control-allow-origin",
    "access-control-allow-methods",
    "access-control-max-age",
    "access-control-allow-headers",
    "access-control-expose-headers",
    "x-content-type-options",
    "strict-transport-security",
    "vary",
    "last-modified",
    "content-encoding",
    "keep-alive",
    "trailer",
    "clair-error",
    "accept-ranges",
    "x-registry-auth",
    "proxy-authorization",
    "link",
    "expect",
    "content-range",
    "x-frame-options",
    "referer",
    "origin",
    "te",
    "upgrade",
    "pragma",
    "expires",
    "if-modified-since",
    "x-request-id",
    "content-security-policy",
    "accept-language",
    "x-requested-with",
    "oci-subject",
    "oci-filters-applied",
    "docker-ratelimit-source",
    "ratelimit-limit",
    "ratelimit-remaining",
];

fn known_index(name: &str) -> Option<u8> {
    KNOWN_NAMES.iter().position(|k| *k == name).map(|i| i as u8)
}

/// What kind of credential a [`Redaction`] stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretKind {
    /// `Authorization: Basic ...`
    Basic,
    /// `Authorization: Bearer ...` with an opaque token.
    Bearer,
    /// `Authorization: Bearer ...` whose token is a JWT (see [`Redaction::jwt`]).
    BearerJwt,
    /// A `Cookie` or `Set-Cookie` value.
    Cookie,
    /// A secret-looking query parameter's value.
    QueryParam,
    /// A token issued in a response body (token endpoints).
    IssuedToken,
    /// Any other redacted value.
    Other,
}

/// A credential, replaced by what a replay needs to know of it: its kind and length, and a
/// fingerprint (a keyed hash, under a key that is never stored) by which equal secrets within one
/// recording are recognisably equal.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct Redaction {
    pub kind: SecretKind,
    /// Length of the value that was removed, in bytes.
    pub len: u32,
    /// The first 8 bytes of HMAC-SHA256(process key, secret), as a number.
    #[serde(serialize_with = "serialize_fingerprint")]
    pub fingerprint: u64,
    /// What could be read of a JWT without its signing key.
    pub jwt: Option<JwtInfo>,
}

/// The readable claims of a JWT: enough to tell who issued it and for how long it lives.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct JwtInfo {
    pub issuer: Option<String>,
    pub issued_at: Option<i64>,
    pub expires_at: Option<i64>,
}

fn serialize_fingerprint<S: serde::Serializer>(f: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{f:016x}"))
}

/// A header's value, as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderValue<'a> {
    Plain(&'a [u8]),
    Redacted(&'a Redaction),
}

impl<'a> HeaderValue<'a> {
    /// The value as text (invalid UTF-8 replaced); a redacted value shows as its marker.
    pub fn to_text(&self) -> std::borrow::Cow<'a, str> {
        match self {
            HeaderValue::Plain(b) => String::from_utf8_lossy(b),
            HeaderValue::Redacted(r) => std::borrow::Cow::Owned(r.marker()),
        }
    }

    pub fn plain(&self) -> Option<&'a [u8]> {
        match self {
            HeaderValue::Plain(b) => Some(b),
            HeaderValue::Redacted(_) => None,
        }
    }
}

impl Redaction {
    /// How a redacted value shows in exports: `[redacted bearer_jwt len=812 fp=1a2b...]`.
    pub fn marker(&self) -> String {
        let kind = match self.kind {
            SecretKind::Basic => "basic",
            SecretKind::Bearer => "bearer",
            SecretKind::BearerJwt => "bearer_jwt",
            SecretKind::Cookie => "cookie",
            SecretKind::QueryParam => "query_param",
            SecretKind::IssuedToken => "issued_token",
            SecretKind::Other => "other",
        };
        format!(
            "[redacted {kind} len={} fp={:016x}]",
            self.len, self.fingerprint
        )
    }
}

#[derive(Debug, Clone, Copy)]
enum NameRef {
    Known(u8),
    Literal { start: u32, len: u32 },
}

#[derive(Debug, Clone, Copy)]
enum ValueRef {
    Plain { start: u32, len: u32 },
    Redacted(u32),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    name: NameRef,
    value: ValueRef,
}

/// Ordered headers: names lowercase, values bytes or redactions. See the module docs for why
/// they are laid out as they are.
#[derive(Clone, Default)]
pub struct Headers {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
    redactions: Vec<Redaction>,
}

impl Headers {
    pub fn new() -> Headers {
        Headers::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a header; the name is lowercased.
    pub fn push(&mut self, name: &str, value: impl AsRef<[u8]>) {
        let name = self.intern_name(name);
        let value = self.store(value.as_ref());
        self.entries.push(Entry {
            name,
            value: ValueRef::Plain {
                start: value.0,
                len: value.1,
            },
        });
    }

    /// Appends a header whose value was redacted.
    pub fn push_redacted(&mut self, name: &str, redaction: Redaction) {
        let name = self.intern_name(name);
        self.redactions.push(redaction);
        self.entries.push(Entry {
            name,
            value: ValueRef::Redacted(self.redactions.len() as u32 - 1),
        });
    }

    /// The headers in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, HeaderValue<'_>)> + '_ {
        self.entries
            .iter()
            .map(|e| (self.name(e.name), self.value(e.value)))
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<HeaderValue<'_>> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The first value of `name` as text, when it is plain UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        match self.get(name)? {
            HeaderValue::Plain(b) => std::str::from_utf8(b).ok(),
            HeaderValue::Redacted(_) => None,
        }
    }

    pub fn redactions(&self) -> &[Redaction] {
        &self.redactions
    }

    pub(crate) fn approx_size(&self) -> usize {
        self.bytes.len()
            + self.entries.len() * std::mem::size_of::<Entry>()
            + self.redactions.len() * 64
    }

    fn intern_name(&mut self, name: &str) -> NameRef {
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        match known_index(name) {
            Some(i) => NameRef::Known(i),
            None => {
                let (start, len) = self.store(name.as_bytes());
                NameRef::Literal { start, len }
            }
        }
    }

    fn store(&mut self, bytes: &[u8]) -> (u32, u32) {
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_slice(bytes);
        (start, bytes.len() as u32)
    }

    fn name(&self, name: NameRef) -> &str {
        match name {
            NameRef::Known(i) => KNOWN_NAMES[i as usize],
            NameRef::Literal { start, len } => {
                let b = &self.bytes[start as usize..(start + len) as usize];
                // Names are stored from &str (push) or checked on decode.
                std::str::from_utf8(b).unwrap_or("")
            }
        }
    }

    fn value(&self, value: ValueRef) -> HeaderValue<'_> {
        match value {
            ValueRef::Plain { start, len } => {
                HeaderValue::Plain(&self.bytes[start as usize..(start + len) as usize])
            }
            ValueRef::Redacted(i) => HeaderValue::Redacted(&self.redactions[i as usize]),
        }
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Headers) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Headers {}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(n, v)| (n, v.to_text())))
            .finish()
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Headers {
        let mut h = Headers::new();
        for (n, v) in iter {
            h.push(n.as_ref(), v);
        }
        h
    }
}

// Wire form: varint count, then per header a varint name code (0: a string follows; n: the
// known name n-1), a tag byte (0: plain bytes follow; 1: a Redaction follows) and the value.
impl Encode for Headers {
    fn encode<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        (self.entries.len() as u64).encode(e)?;
        for entry in &self.entries {
            match entry.name {
                NameRef::Known(i) => (i as u32 + 1).encode(e)?,
                NameRef::Literal { .. } => {
                    0u32.encode(e)?;
                    self.name(entry.name).encode(e)?;
                }
            }
            match self.value(entry.value) {
                HeaderValue::Plain(b) => {
                    0u8.encode(e)?;
                    b.encode(e)?;
                }
                HeaderValue::Redacted(r) => {
                    1u8.encode(e)?;
                    r.encode(e)?;
                }
            }
        }
        Ok(())
    }
}

impl<Context> Decode<Context> for Headers {
    fn decode<D: Decoder<Context = Context>>(d: &mut D) -> Result<Self, DecodeError> {
        let count = u64::decode(d)?;
        // Each header takes at least three bytes: refuse counts the input cannot hold before
        // reserving memory for them.
        d.claim_bytes_read((count as usize).saturating_mul(3))?;
        let mut h = Headers {
            bytes: Vec::new(),
            entries: Vec::with_capacity((count as usize).min(64)),
            redactions: Vec::new(),
        };
        for _ in 0..count {
            let code = u32::decode(d)?;
            let name = if code == 0 {
                let len = u64::decode(d)? as usize;
                let start = h.read_into_buffer(d, len)?;
                let text = std::str::from_utf8(&h.bytes[start as usize..])
                    .map_err(|inner| DecodeError::Utf8 { inner })?;
                match known_index(text) {
                    Some(i) => {
                        h.bytes.truncate(start as usize);
                        NameRef::Known(i)
                    }
                    None => NameRef::Literal {
                        start,
                        len: len as u32,
                    },
                }
            } else {
                let i = code - 1;
                if i as usize >= KNOWN_NAMES.len() {
                    // A newer writer's table: keep the header under a name that says so.
                    let (start, len) =
                        h.store(format!("x-loadtape-unknown-name-{code}").as_bytes());
                    NameRef::Literal { start, len }
                } else {
                    NameRef::Known(i as u8)
                }
            };
            let value = match u8::decode(d)? {
                0 => {
                    let len = u64::decode(d)? as usize;
                    let start = h.read_into_buffer(d, len)?;
                    ValueRef::Plain {
                        start,
                        len: len as u32,
                    }
                }
                1 => {
                    h.redactions.push(Redaction::decode(d)?);
                    ValueRef::Redacted(h.redactions.len() as u32 - 1)
                }
                found => {
                    return Err(DecodeError::UnexpectedVariant {
                        type_name: "HeaderValue",
                        allowed: &bincode::error::AllowedEnumVariants::Range { min: 0, max: 1 },
                        found: found as u32,
                    })
                }
            };
            h.entries.push(Entry { name, value });
        }
        Ok(h)
    }
}

impl Headers {
    fn read_into_buffer<D: Decoder>(&mut self, d: &mut D, len: usize) -> Result<u32, DecodeError> {
        use bincode::de::read::Reader;
        d.claim_bytes_read(len)?;
        let start = self.bytes.len();
        self.bytes.resize(start + len, 0);
        d.reader().read(&mut self.bytes[start..])?;
        Ok(start as u32)
    }
}

impl<'de, Context> BorrowDecode<'de, Context> for Headers {
    fn borrow_decode<D: BorrowDecoder<'de, Context = Context>>(
        d: &mut D,
    ) -> Result<Self, DecodeError> {
        Headers::decode(d)
    }
}

impl Serialize for Headers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct One<'a>(&'a str, HeaderValue<'a>);
        impl Serialize for One<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("name", self.0)?;
                match self.1 {
                    HeaderValue::Plain(b) => {
                        m.serialize_entry("value", &String::from_utf8_lossy(b))?
                    }
                    HeaderValue::Redacted(r) => m.serialize_entry("redacted", r)?,
                }
                m.end()
            }
        }
        let mut seq = s.serialize_seq(Some(self.len()))?;
        for (n, v) in self.iter() {
            seq.serialize_element(&One(n, v))?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(h: &Headers) -> Headers {
        let bytes = bincode::encode_to_vec(h, bincode::config::standard()).unwrap();
        let (back, used): (Headers, usize) =
            bincode::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(used, bytes.len());
        back
    }

    #[test]
    fn names_are_lowercased_and_order_kept() {
        let h: Headers = [
            ("Content-Type", "a"),
            ("X-Custom", "b"),
            ("content-type", "c"),
        ]
        .into_iter()
        .collect();
        let names: Vec<_> = h.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, ["content-type", "x-custom", "content-type"]);
        assert_eq!(h.get_str("CONTENT-TYPE"), Some("a"));
        assert_eq!(round_trip(&h), h);
    }

    #[test]
    fn known_names_cost_one_byte() {
        let mut h = Headers::new();
        h.push("docker-content-digest", "");
        let bytes = bincode::encode_to_vec(&h, bincode::config::standard()).unwrap();
        // count, name code, value tag, value length
        assert_eq!(bytes.len(), 4);
    }

    #[test]
    fn redacted_values_round_trip() {
        let mut h = Headers::new();
        h.push("accept", "*/*");
        h.push_redacted(
            "authorization",
            Redaction {
                kind: SecretKind::BearerJwt,
                len: 812,
                fingerprint: 0xdead_beef,
                jwt: Some(JwtInfo {
                    issuer: Some("quay".into()),
                    issued_at: Some(1),
                    expires_at: Some(3601),
                }),
            },
        );
        let back = round_trip(&h);
        assert_eq!(back, h);
        assert!(
            matches!(back.get("Authorization"), Some(HeaderValue::Redacted(r)) if r.len == 812)
        );
    }

    #[test]
    fn absurd_counts_are_refused_not_allocated() {
        let mut bytes = Vec::new();
        bincode::encode_into_std_write(u64::MAX / 2, &mut bytes, bincode::config::standard())
            .unwrap();
        let r: Result<(Headers, usize), _> = bincode::decode_from_slice_with_context(
            &bytes,
            bincode::config::standard().with_limit::<{ 1 << 20 }>(),
            (),
        );
        assert!(r.is_err());
    }
}
