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

use bincode::{Decode, Encode};
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

/// A lowercase name as the tape writes it: a well-known one's index, or the name itself.
pub(crate) fn classify(name: &str) -> HeaderName<'_> {
    match known_index(name) {
        Some(i) => HeaderName::Known(i),
        None => HeaderName::Literal(name),
    }
}

/// The index of a well-known name, exactly as written (lowercase).
fn known_index(name: &str) -> Option<u8> {
    well_known_index(name.as_bytes()).filter(|&i| KNOWN_NAMES[i as usize] == name)
}

/// The index in [`KNOWN_NAMES`] of a name in any case (`Content-Type`, as servers send them).
///
/// Every header of every exchange is looked up here as it is captured, a dozen per request on
/// the proxy's path, so this is a hash table rather than a scan: the name is lowercased eight
/// bytes at a time into words, the words are hashed into a table of [`NAME_SLOTS`], and the one
/// or two candidates are compared word by word. Comparing bytes one at a time, case folded, cost
/// ~250 instructions a name; this costs a few dozen.
pub fn well_known_index(name: &[u8]) -> Option<u8> {
    let words = NameWords::lowercase(name)?;
    let table = known_table();
    let mut slot = words.hash();
    loop {
        let candidate = table.slots[slot];
        if candidate == 0 {
            return None;
        }
        let i = candidate - 1;
        if table.words[i as usize].same(&words) {
            return Some(i);
        }
        slot = (slot + 1) % NAME_SLOTS;
    }
}

/// The longest name [`well_known_index`] can find (longer than any well-known one).
const LONGEST_KNOWN: usize = 40;
/// Slots of the well-known names' hash table: a power of two, about twice their number, so
/// that probes stay short.
const NAME_SLOTS: usize = 128;
const _: () = assert!(KNOWN_NAMES.len() * 2 <= NAME_SLOTS, "raise NAME_SLOTS");

/// A name of up to [`LONGEST_KNOWN`] bytes, lowercased, as words (zero past its end), and its
/// length.
#[derive(Clone, Copy)]
struct NameWords {
    words: [u64; LONGEST_KNOWN / 8],
    len: usize,
}

impl NameWords {
    #[inline(always)]
    fn lowercase(name: &[u8]) -> Option<NameWords> {
        let len = name.len();
        if len == 0 || len > LONGEST_KNOWN {
            return None;
        }
        let mut words = [0u64; LONGEST_KNOWN / 8];
        let whole = len / 8;
        for (i, word) in words.iter_mut().enumerate().take(whole) {
            *word = ascii_lowercase(word_at(name, i * 8));
        }
        let rest = len % 8;
        if rest > 0 {
            words[whole] = ascii_lowercase(tail_word(name));
        }
        Some(NameWords { words, len })
    }

    /// Equal words (compared without a branch per word, or a call to `bcmp`).
    fn same(&self, other: &NameWords) -> bool {
        let differ = (self.words.iter().zip(&other.words)).fold(0, |d, (a, b)| d | (a ^ b));
        differ == 0 && self.len == other.len
    }

    fn hash(&self) -> usize {
        let last = self.words[(self.len - 1) / 8];
        let mixed = (self.words[0] ^ last.rotate_left(29) ^ self.len as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (mixed >> (64 - NAME_SLOTS.trailing_zeros())) as usize
    }
}

/// The eight bytes of `name` from `at`, as a little-endian word.
fn word_at(name: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(name[at..at + 8].try_into().expect("eight bytes"))
}

/// The last `name.len() % 8` bytes of `name` (one to seven) as a little-endian word, zero
/// above them. Read with whole loads that overlap rather than byte by byte: a byte loop was most
/// of a lookup's cost.
fn tail_word(name: &[u8]) -> u64 {
    let len = name.len();
    let rest = len % 8;
    debug_assert!(rest > 0);
    if len >= 8 {
        // The word ending where the name ends, less the bytes already in the words before.
        return word_at(name, len - 8) >> ((8 - rest) * 8);
    }
    let byte = |i: usize| (name[i] as u64) << (i * 8);
    if len >= 4 {
        let low = u32::from_le_bytes(name[..4].try_into().expect("four bytes")) as u64;
        let high = u32::from_le_bytes(name[len - 4..].try_into().expect("four bytes")) as u64;
        // The two halves overlap on equal bytes, which OR leaves as they are.
        return low | high << ((len - 4) * 8);
    }
    byte(0) | byte(len / 2) | byte(len - 1)
}

/// Eight bytes with the ASCII capitals among them made small letters, every other byte (UTF-8
/// included) left as it is.
fn ascii_lowercase(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    // The low seven bits of each byte, plus a constant that carries into the byte's high bit
    // when they reach 'A' (or pass 'Z'); no carry crosses into the next byte.
    let low = x & !HIGH;
    let from_a = low + ONES * (0x80 - b'A' as u64);
    let past_z = low + ONES * (0x80 - b'Z' as u64 - 1);
    let capital = from_a & !past_z & !x & HIGH;
    x | (capital >> 2)
}

struct KnownTable {
    /// Index + 1 of the name in each slot, 0 for none.
    slots: [u8; NAME_SLOTS],
    words: Vec<NameWords>,
}

fn known_table() -> &'static KnownTable {
    static TABLE: std::sync::OnceLock<KnownTable> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let words: Vec<NameWords> = KNOWN_NAMES
            .iter()
            .map(|k| NameWords::lowercase(k.as_bytes()).expect("a well-known name is short"))
            .collect();
        let mut slots = [0u8; NAME_SLOTS];
        for (i, w) in words.iter().enumerate() {
            let mut slot = w.hash();
            while slots[slot] != 0 {
                slot = (slot + 1) % NAME_SLOTS;
            }
            slots[slot] = i as u8 + 1;
        }
        KnownTable { slots, words }
    })
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

impl SecretKind {
    /// As markers and summaries write it: `bearer_jwt`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SecretKind::Basic => "basic",
            SecretKind::Bearer => "bearer",
            SecretKind::BearerJwt => "bearer_jwt",
            SecretKind::Cookie => "cookie",
            SecretKind::QueryParam => "query_param",
            SecretKind::IssuedToken => "issued_token",
            SecretKind::Other => "other",
        }
    }
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
        let kind = self.kind.as_str();
        format!(
            "[redacted {kind} len={} fp={:016x}]",
            self.len, self.fingerprint
        )
    }
}

/// A header name as the codec sees it: a well-known name's index, or the name itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderName<'a> {
    Known(u8),
    Literal(&'a str),
}

impl HeaderName<'_> {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            HeaderName::Known(i) => KNOWN_NAMES[*i as usize],
            HeaderName::Literal(s) => s,
        }
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
    /// What [`Headers::shared`] returns: 0, or a number that no headers of other contents carry
    /// in this process. Not part of the headers' value (equality, serialization); any change
    /// to them sets it back to 0.
    shared: u64,
}

impl Headers {
    pub fn new() -> Headers {
        Headers::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Room for `entries` headers and `bytes` bytes of names and values.
    pub fn with_capacity(entries: usize, bytes: usize) -> Headers {
        Headers {
            bytes: Vec::with_capacity(bytes),
            entries: Vec::with_capacity(entries),
            redactions: Vec::new(),
            shared: 0,
        }
    }

    /// Marks these headers as ones whose copies will be written again and again (a
    /// connection's heads, which the recorder shares between its records), under a number of
    /// their own: the tape writer then writes a copy met again within a frame as a reference
    /// to the first (`tape::codec`, "head cache"), without reading it field by field. Clones
    /// keep the number; a change to the headers drops it.
    pub fn mark_shared(&mut self) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        self.shared = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The number [`Headers::mark_shared`] gave these headers, or 0: headers with the same
    /// nonzero number are equal, in contents and order.
    pub fn shared(&self) -> u64 {
        self.shared
    }

    /// The headers in order, names as the codec numbers them.
    pub(crate) fn iter_names(
        &self,
    ) -> impl Iterator<Item = (HeaderName<'_>, HeaderValue<'_>)> + '_ {
        self.entries.iter().map(|e| {
            let name = match e.name {
                NameRef::Known(i) => HeaderName::Known(i),
                NameRef::Literal { .. } => HeaderName::Literal(self.name(e.name)),
            };
            (name, self.value(e.value))
        })
    }

    /// Appends a header whose name is already lowercase and classified (decoding).
    pub(crate) fn push_name(&mut self, name: HeaderName<'_>, value: &[u8]) {
        let name = self.store_name(name);
        self.push_plain(name, value);
    }

    pub(crate) fn push_name_redacted(&mut self, name: HeaderName<'_>, redaction: Redaction) {
        self.shared = 0;
        let name = self.store_name(name);
        self.redactions.push(redaction);
        self.entries.push(Entry {
            name,
            value: ValueRef::Redacted(self.redactions.len() as u32 - 1),
        });
    }

    fn store_name(&mut self, name: HeaderName<'_>) -> NameRef {
        match name {
            HeaderName::Known(i) => NameRef::Known(i),
            HeaderName::Literal(n) => {
                let (start, len) = self.store(n.as_bytes());
                NameRef::Literal { start, len }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a header; the name is lowercased.
    pub fn push(&mut self, name: &str, value: impl AsRef<[u8]>) {
        let name = self.intern_name(name.as_bytes());
        self.push_plain(name, value.as_ref());
    }

    /// Appends a header whose name is an HTTP token in any case, as a parser read it off the
    /// wire (ASCII, so no UTF-8 check is needed); the name is lowercased.
    pub fn push_token(&mut self, name: &[u8], value: &[u8]) {
        self.push_classified(well_known_index(name), name, value);
    }

    /// [`Headers::push_token`] for a name already looked up with [`well_known_index`].
    pub fn push_classified(&mut self, known: Option<u8>, name: &[u8], value: &[u8]) {
        let name = self.classified_name(known, name);
        self.push_plain(name, value);
    }

    /// Appends a header whose value was redacted.
    pub fn push_redacted(&mut self, name: &str, redaction: Redaction) {
        let known = well_known_index(name.as_bytes());
        self.push_classified_redacted(known, name.as_bytes(), redaction);
    }

    /// [`Headers::push_redacted`] for a name already looked up with [`well_known_index`].
    pub fn push_classified_redacted(&mut self, known: Option<u8>, name: &[u8], r: Redaction) {
        self.shared = 0;
        let name = self.classified_name(known, name);
        self.redactions.push(r);
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

    /// The first value of `name` (case-insensitive). A well-known name is looked up once and
    /// compared as its index (the tape writer asks each kept body's `content-encoding`); a
    /// name stored as a literal (a tape written before the name was well-known) by its text.
    pub fn get(&self, name: &str) -> Option<HeaderValue<'_>> {
        let known = well_known_index(name.as_bytes());
        (self.entries.iter())
            .find(|e| match e.name {
                NameRef::Known(i) => known == Some(i),
                literal => self.name(literal).eq_ignore_ascii_case(name),
            })
            .map(|e| self.value(e.value))
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

    /// A name in any case: a well-known one's index, another stored lowercased. Servers send
    /// names capitalized (`Content-Type`): no lowercase copy is made first.
    fn intern_name(&mut self, name: &[u8]) -> NameRef {
        self.classified_name(well_known_index(name), name)
    }

    /// [`Headers::intern_name`] for a name already looked up (`known`).
    #[inline]
    fn classified_name(&mut self, known: Option<u8>, name: &[u8]) -> NameRef {
        match known {
            Some(i) => NameRef::Known(i),
            None => self.literal_name(name),
        }
    }

    /// A name that is not well-known, stored. Apart, so that the well-known path (nearly every
    /// field) is a few instructions inlined into its caller.
    #[cold]
    fn literal_name(&mut self, name: &[u8]) -> NameRef {
        // Names are read back as text: bytes that are not UTF-8 are replaced.
        self.store_lowercase(&String::from_utf8_lossy(name))
    }

    /// Stores a name that is not well-known, lowercased.
    fn store_lowercase(&mut self, name: &str) -> NameRef {
        let (start, len) = self.store(name.as_bytes());
        // Lowercasing ASCII letters leaves UTF-8 UTF-8.
        self.bytes[start as usize..].make_ascii_lowercase();
        NameRef::Literal { start, len }
    }

    fn push_plain(&mut self, name: NameRef, value: &[u8]) {
        self.shared = 0;
        let (start, len) = self.store(value);
        self.entries.push(Entry {
            name,
            value: ValueRef::Plain { start, len },
        });
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

/// Gives equal headers one [`Headers::shared`] number, for a writer that makes its records'
/// heads one by one rather than sharing them as the recorder does (an import): it remembers
/// the last [`SHARING_RECENT`] different heads it was given.
#[derive(Default)]
pub struct Sharing {
    recent: Vec<Headers>,
}

/// How many heads a [`Sharing`] remembers.
pub const SHARING_RECENT: usize = 16;

impl Sharing {
    /// Gives `headers` the number of equal headers met recently, else a number of their own.
    pub fn share(&mut self, headers: &mut Headers) {
        if let Some(i) = self.recent.iter().position(|h| h == &*headers) {
            self.recent[..=i].rotate_right(1);
            headers.shared = self.recent[0].shared;
            return;
        }
        headers.mark_shared();
        self.recent.truncate(SHARING_RECENT - 1);
        self.recent.insert(0, headers.clone());
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

    #[test]
    fn a_field_is_found_by_its_name_in_any_case_however_its_name_was_stored() {
        let mut h = Headers::new();
        h.push("X-Custom", "1");
        h.push_token(b"Content-Type", b"application/json");
        // As a tape from before a name was well-known stores it.
        h.push_name(HeaderName::Literal("content-encoding"), b"gzip");
        assert!(matches!(
            h.get("content-type"),
            Some(HeaderValue::Plain(b"application/json"))
        ));
        assert!(matches!(
            h.get("CONTENT-ENCODING"),
            Some(HeaderValue::Plain(b"gzip"))
        ));
        assert_eq!(h.get_str("x-custom"), Some("1"));
        assert!(h.get("content-length").is_none());
        assert!(h.get("x-other").is_none());
    }

    #[test]
    fn every_known_name_and_only_those_is_found_at_its_index() {
        for (i, k) in KNOWN_NAMES.iter().enumerate() {
            assert_eq!(known_index(k), Some(i as u8), "{k}");
            let upper = k.to_ascii_uppercase();
            assert_eq!(well_known_index(upper.as_bytes()), Some(i as u8), "{k}");
        }
        for other in [
            "",
            "hosts",
            "x-forwarded-fo",
            "docker-distribution-api-versions",
            "HOST",
            "x-request-ids",
            "content-typf",
            // CR is '-' without its 0x20 bit: not folded into it.
            "content\x0dtype",
            "cont\u{e9}nt-type",
        ] {
            assert_eq!(known_index(other), None, "{other}");
            if other != "HOST" {
                assert_eq!(well_known_index(other.as_bytes()), None, "{other}");
            }
        }
        assert_eq!(
            well_known_index(b"CoNtEnT-TyPe"),
            known_index("content-type")
        );
        assert_eq!(well_known_index(&[b'a'; 41]), None);
    }

    #[test]
    fn a_name_of_any_length_is_read_into_its_words() {
        let text = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNO";
        for len in 1..=LONGEST_KNOWN {
            let words = NameWords::lowercase(&text[..len]).unwrap();
            let mut expected = [0u8; LONGEST_KNOWN];
            expected[..len].copy_from_slice(&text[..len].to_ascii_lowercase());
            let bytes: Vec<u8> = words.words.iter().flat_map(|w| w.to_le_bytes()).collect();
            assert_eq!(bytes, expected, "{len}");
        }
        assert!(NameWords::lowercase(&text[..LONGEST_KNOWN + 1]).is_none());
    }

    #[test]
    fn words_are_lowercased_as_bytes_are() {
        for b in 0..=255u8 {
            for at in 0..8 {
                let mut bytes = *b"Ab-9\xc3\xa9Z@";
                bytes[at] = b;
                let word = ascii_lowercase(u64::from_le_bytes(bytes));
                assert_eq!(
                    word.to_le_bytes().to_vec(),
                    bytes.to_ascii_lowercase(),
                    "{b:#x} at {at}"
                );
            }
        }
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
        let kinds: Vec<_> = h
            .iter_names()
            .map(|(n, _)| matches!(n, HeaderName::Known(_)))
            .collect();
        assert_eq!(kinds, [true, false, true]);
    }

    #[test]
    fn names_read_off_the_wire_are_stored_as_the_others() {
        let mut wire = Headers::new();
        let mut text = Headers::new();
        for (name, value) in [("Content-Type", "a"), ("X-Custom", "b"), ("etag", "c")] {
            wire.push_token(name.as_bytes(), value.as_bytes());
            text.push(name, value);
        }
        let names = |h: &Headers| {
            h.iter_names()
                .map(|(n, _)| format!("{n:?}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&wire), names(&text));
        assert_eq!(wire.get_str("x-custom"), Some("b"));
    }

    #[test]
    fn redacted_values_read_back() {
        let mut h = Headers::new();
        h.push("accept", "*/*");
        h.push_redacted(
            "authorization",
            Redaction {
                kind: SecretKind::BearerJwt,
                len: 812,
                fingerprint: 0xdead_beef,
                jwt: None,
            },
        );
        assert!(matches!(h.get("Authorization"), Some(HeaderValue::Redacted(r)) if r.len == 812));
        assert!(format!("{h:?}").contains("[redacted bearer_jwt len=812 fp=00000000deadbeef]"));
    }
}
