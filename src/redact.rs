//! Keeping credentials off tapes.
//!
//! Tapes hold production traffic, and a tape file is easier to leak than a database. So every
//! way into a tape (the recording proxy, HAR import) passes headers, query strings and token
//! responses through a [`Redactor`] first, and credentials are replaced by a
//! [`Redaction`]: kind, length, readable JWT claims, and a fingerprint, an HMAC under a random
//! key that lives only in this process. Equal secrets get equal fingerprints within one
//! recording, which is what a replay needs to tell which requests shared a token; nobody can
//! test a guessed secret against a fingerprint without the key, which is never written.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::tape::{well_known_index, Headers, JwtInfo, Redaction, SecretKind, KNOWN_NAMES};

/// Headers whose values are credentials.
pub const DEFAULT_REDACTED_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-registry-auth",
    "x-amz-security-token",
];

/// Query parameters whose values are credentials (compared case-insensitively).
pub const SECRET_QUERY_PARAMS: &[&str] = &[
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "client_secret",
    "password",
    "signature",
    "sig",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    // An OAuth authorization code (Quay's `/oauth2/.../callback?code=`), and API keys.
    "code",
    "api_key",
    "apikey",
];

/// Headers whose values are URLs, whose query (and fragment) may carry credentials: a blob
/// GET on Quay with S3 storage answers with a presigned `Location` (`X-Amz-Signature`,
/// `X-Amz-Credential`), an OAuth implicit grant redirects with `#access_token=`. Their secret
/// query values are redacted as a request target's are, the rest kept.
/// (`content-location`, the one not among the tape's well-known names, is told apart by name.)
pub const URL_HEADERS: &[&str] = &["location", "content-location", "referer", "link"];

/// JSON keys whose values are credentials (compared case-insensitively): Quay's robot tokens
/// (`token`), its sign-in and user creation (`password`, `new_password`), OAuth applications
/// (`client_secret`), and the per-layer `headers` Clair's index request carries for fetching
/// layers (`Authorization`).
pub const SECRET_JSON_KEYS: &[&str] = &[
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "password",
    "new_password",
    "old_password",
    "encrypted_password",
    "client_secret",
    "secret",
    "api_key",
    "apikey",
    "private_key",
    "authorization",
    "proxy-authorization",
    "x-registry-auth",
    "cookie",
    // A Docker config's registry credentials; Quay's application token.
    "auth",
    "identitytoken",
    "registrytoken",
    "token_code",
];

/// Paths whose response bodies issue credentials; those bodies are never stored.
pub fn is_token_endpoint(path: &str) -> bool {
    let path = path.trim_end_matches('/');
    path == "/v2/auth"
        || path.ends_with("/oauth/token")
        || path.ends_with("/oauth2/token")
        || path.ends_with("/oauth/access_token")
        || path == "/token"
}

/// Credentials redacted on this thread, by their bytes, for [`Redactor::redact_value`].
///
/// A registry's client sends the same bearer token with every request of a session (Quay's
/// live for minutes), and working a redaction out (an HMAC over a token of a kilobyte or so, its
/// claims read as JSON) cost ~90k instructions: three times all the rest of recording an
/// exchange (callgrind, `benches/instructions.sh`). Per thread, so no lock is taken; the
/// recorder redacts most heads on its one tape-writer thread, which sees every client's
/// credentials, hence room for thousands of them. Bounded ([`SEEN_LIMIT`] credentials of at
/// most [`SEEN_LONGEST`] bytes, [`SEEN_BYTES`] in all), and emptied when full. The credentials
/// stay in this process's memory only, as the traffic's do.
struct Seen {
    /// [`Redactor::id`] of the redactor whose redactions these are.
    redactor: u64,
    secrets: HashMap<SeenKey, (Box<[u8]>, Redaction), BuildHasherDefault<OneWord>>,
    /// Bytes of the credentials held.
    bytes: usize,
}

const SEEN_LIMIT: usize = 4096;
const SEEN_LONGEST: usize = 8 << 10;
const SEEN_BYTES: usize = 4 << 20;

thread_local! {
    static SEEN: std::cell::RefCell<Seen> = std::cell::RefCell::new(Seen {
        redactor: 0,
        secrets: HashMap::default(),
        bytes: 0,
    });
}

/// What a credential is looked up by: its kind of field, length and last 16 bytes (a token's
/// signature), hashed in a few instructions whatever its length. The whole value is compared
/// on a hit.
#[derive(PartialEq, Eq)]
struct SeenKey {
    cookie: bool,
    len: usize,
    tail: [u8; 16],
}

impl std::hash::Hash for SeenKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (low, high) = self.tail.split_at(8);
        let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("eight bytes"));
        state.write_u64(
            word(low) ^ word(high).rotate_left(32) ^ (self.len as u64) << 1 ^ self.cookie as u64,
        );
    }
}

/// A hasher for one word already mixed ([`SeenKey`]'s): one multiply, where SipHash took ~400
/// instructions a lookup.
#[derive(Default)]
struct OneWord(u64);

impl std::hash::Hasher for OneWord {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(*b as u64);
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(23) ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ self.0 >> 31
    }
}

impl SeenKey {
    fn of(cookie: bool, value: &[u8]) -> SeenKey {
        let mut tail = [0u8; 16];
        let end = &value[value.len().saturating_sub(16)..];
        tail[..end.len()].copy_from_slice(end);
        SeenKey {
            cookie,
            len: value.len(),
            tail,
        }
    }
}

/// Replaces credentials by [`Redaction`]s. See the module docs. A clone is the same redactor
/// (the same key and id): it redacts alike, and is for a thread to hold its own reference to.
#[derive(Clone)]
pub struct Redactor {
    key: [u8; 32],
    /// This redactor among the process's (its fingerprints are its key's).
    id: u64,
    /// Lowercase names, sorted.
    redacted: Vec<String>,
    /// The same names, as the recorder asks: every header's name is looked up among the
    /// well-known ones once (it is stored as that index), and bit `i` here says whether
    /// `KNOWN_NAMES[i]` is redacted, so that the answer costs no second search.
    redacted_known: u128,
    /// Redacted names that are not well-known (lowercase); usually none.
    redacted_other: Vec<String>,
    /// Bit `i`: `KNOWN_NAMES[i]` is one of the [`URL_HEADERS`].
    url_known: u128,
}

const _: () = assert!(
    KNOWN_NAMES.len() <= 128,
    "Redactor::redacted_known has 128 bits"
);

impl Default for Redactor {
    fn default() -> Self {
        Redactor::new(&[], &[])
    }
}

impl Redactor {
    /// A redactor with a fresh random key, redacting the default headers plus `extra`, minus
    /// `keep` (names are case-insensitive).
    pub fn new(extra: &[String], keep: &[String]) -> Redactor {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the OS provides random bytes for the redaction key");
        let mut redacted: Vec<String> = DEFAULT_REDACTED_HEADERS
            .iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_ascii_lowercase()))
            .filter(|name| !keep.iter().any(|k| k.eq_ignore_ascii_case(name)))
            .collect();
        redacted.sort();
        redacted.dedup();
        let mut redacted_known = 0u128;
        let mut redacted_other = Vec::new();
        for name in &redacted {
            match well_known_index(name.as_bytes()) {
                Some(i) => redacted_known |= 1 << i,
                None => redacted_other.push(name.clone()),
            }
        }
        let url_known = (URL_HEADERS.iter())
            .filter_map(|name| well_known_index(name.as_bytes()))
            .fold(0u128, |bits, i| bits | 1 << i);
        static REDACTORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Redactor {
            key,
            id: REDACTORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            redacted,
            redacted_known,
            redacted_other,
            url_known,
        }
    }

    /// This redactor among the process's: equal ids, equal redactions of equal fields. (The
    /// recorder's, behind the `net` feature, is who asks.)
    #[cfg_attr(not(feature = "net"), allow(dead_code))]
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The names redacted, sorted (for the start banner and the tape header).
    pub fn redacted_headers(&self) -> Vec<&str> {
        self.redacted.iter().map(|s| s.as_str()).collect()
    }

    /// The keyed fingerprint of a secret.
    pub fn fingerprint(&self, secret: &[u8]) -> u64 {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(secret);
        let out = mac.finalize().into_bytes();
        u64::from_be_bytes(out[..8].try_into().expect("8 bytes"))
    }

    /// Appends a header to `headers`, redacted when its name says it holds a credential.
    pub fn push_header(&self, headers: &mut Headers, name: &str, value: &[u8]) {
        self.push_raw_header(headers, name.as_bytes(), value);
    }

    /// [`Redactor::push_header`] for a header as the proxy has it (its name already lowercase):
    /// the recorder's path, once per header of every exchange.
    #[cfg(feature = "net")]
    pub fn push_http_header(
        &self,
        headers: &mut Headers,
        name: &http::HeaderName,
        value: &http::HeaderValue,
    ) {
        self.push_raw_header(headers, name.as_str().as_bytes(), value.as_bytes());
    }

    /// [`Redactor::push_header`] for a field as a parser read it off the wire (a name in any
    /// case, a token if the parser checked it): responses the recorder reads itself.
    pub fn push_raw_header(&self, headers: &mut Headers, name: &[u8], value: &[u8]) {
        let known = well_known_index(name);
        let redacted = match known {
            Some(i) => self.redacted_known >> i & 1 == 1,
            None => self
                .redacted_other
                .iter()
                .any(|r| r.as_bytes().eq_ignore_ascii_case(name)),
        };
        if !redacted {
            let url = match known {
                Some(i) => self.url_known >> i & 1 == 1,
                None => name.eq_ignore_ascii_case(b"content-location"),
            };
            if url && value.iter().any(|&b| b == b'?' || b == b'#') {
                if let Ok(text) = std::str::from_utf8(value) {
                    let mut kept = String::with_capacity(value.len());
                    self.target_into(text, &mut kept);
                    return headers.push_classified(known, name, kept.as_bytes());
                }
            }
            return headers.push_classified(known, name, value);
        }
        headers.push_classified_redacted(known, name, self.redact_value(name, value));
    }

    fn redact_value(&self, name: &[u8], value: &[u8]) -> Redaction {
        let cookie =
            name.eq_ignore_ascii_case(b"cookie") || name.eq_ignore_ascii_case(b"set-cookie");
        if value.len() > SEEN_LONGEST {
            return self.work_out(cookie, value);
        }
        SEEN.with(|seen| {
            let mut seen = seen.borrow_mut();
            if seen.redactor != self.id {
                seen.redactor = self.id;
                seen.secrets.clear();
                seen.bytes = 0;
            }
            let key = SeenKey::of(cookie, value);
            if let Some((secret, redaction)) = seen.secrets.get(&key) {
                if **secret == *value {
                    return redaction.clone();
                }
            }
            let redaction = self.work_out(cookie, value);
            if seen.secrets.len() >= SEEN_LIMIT || seen.bytes + value.len() > SEEN_BYTES {
                seen.secrets.clear();
                seen.bytes = 0;
            }
            seen.bytes += value.len();
            seen.secrets.insert(key, (value.into(), redaction.clone()));
            redaction
        })
    }

    /// The redaction of a credential `value` (a cookie's, or a scheme and its credentials).
    fn work_out(&self, cookie: bool, value: &[u8]) -> Redaction {
        let text = std::str::from_utf8(value).unwrap_or("");
        let (kind, secret, jwt) = if cookie {
            (SecretKind::Cookie, value, None)
        } else if let Some(cred) = strip_scheme(text, "basic") {
            (SecretKind::Basic, cred.as_bytes(), None)
        } else if let Some(token) = strip_scheme(text, "bearer") {
            match read_jwt(token) {
                Some(claims) => (SecretKind::BearerJwt, token.as_bytes(), Some(claims)),
                None => (SecretKind::Bearer, token.as_bytes(), None),
            }
        } else {
            (SecretKind::Other, value, None)
        };
        Redaction {
            kind,
            len: value.len() as u32,
            fingerprint: self.fingerprint(secret),
            jwt,
        }
    }

    /// A token issued in a token endpoint's JSON response (`token`, `access_token`).
    pub fn issued_secrets(&self, body: &[u8]) -> Vec<Redaction> {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body)
        else {
            return Vec::new();
        };
        ["token", "access_token", "id_token", "refresh_token"]
            .iter()
            .filter_map(|k| map.get(*k)?.as_str())
            .map(|token| Redaction {
                kind: SecretKind::IssuedToken,
                len: token.len() as u32,
                fingerprint: self.fingerprint(token.as_bytes()),
                jwt: read_jwt(token),
            })
            .collect()
    }

    /// `target` (path and query) with secret-looking query values replaced by
    /// `loadtape-redacted-<fingerprint>-<length>`.
    pub fn target(&self, target: &str) -> String {
        let mut out = String::with_capacity(target.len());
        self.target_into(target, &mut out);
        out
    }

    /// [`Redactor::target`] appended to `out`: the capture writes it into the string of a
    /// record it reuses (`record::exchange`), rather than into one made for each exchange. A
    /// URL's fragment is read as a query too (an OAuth implicit grant's redirect, in a
    /// `Location`, carries its token there).
    pub fn target_into(&self, target: &str, out: &mut String) {
        let Some(start) = target.find(['?', '#']) else {
            out.push_str(target);
            return;
        };
        out.push_str(&target[..start]);
        let mut rest = &target[start..];
        // Each `?` or `#` starts pairs: a single-page app's route puts its query after the
        // fragment (`#/callback?code=`), and a second `?` is only a character to a server but
        // may start a query to whoever reads the URL next.
        while let Some(separator) = rest.chars().next() {
            out.push(separator);
            let after = &rest[1..];
            let end = after.find(['?', '#']).unwrap_or(after.len());
            self.pairs_into(&after[..end], out);
            rest = &after[end..];
        }
    }

    /// A query's (or fragment's) `name=value` pairs, secret values redacted.
    fn pairs_into(&self, query: &str, out: &mut String) {
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((name, value))
                    if !value.is_empty()
                        && SECRET_QUERY_PARAMS
                            .iter()
                            .any(|s| s.eq_ignore_ascii_case(name)) =>
                {
                    // A URL holds no `>`, space or quote unescaped: past one (a `Link`
                    // field's `>; rel="next"`) the value has ended.
                    let end = value.find(['>', ' ', '"']).unwrap_or(value.len());
                    let (value, after) = value.split_at(end);
                    out.push_str(name);
                    out.push('=');
                    out.push_str(&format!(
                        "loadtape-redacted-{:016x}-{}",
                        self.fingerprint(value.as_bytes()),
                        value.len()
                    ));
                    out.push_str(after);
                }
                _ => out.push_str(pair),
            }
        }
    }
}

/// Bodies: credentials in the bytes a tape keeps of a body, overwritten where they lie, so
/// that the body keeps its length, its shape and every other byte (a replay sends it as it
/// was, a report shows it): in a JSON body, the string values of [`SECRET_JSON_KEYS`] (and
/// the strings of an array under one), and the secret query values of URLs in any string
/// (Clair's index request names presigned layer URLs); in a form body, its secret fields.
/// A value becomes `redacted-<fingerprint>` padded with `*` to its length (only `*` when
/// shorter), the fingerprint of the value as it was written.
impl Redactor {
    /// Overwrites the credentials in what is kept of a body (`body`'s stored bytes), whose
    /// head's fields are `headers`. A body changed no longer claims the digest of the one that
    /// passed: it would let a guessed password be checked against the tape.
    pub fn scrub_stored(&self, headers: &Headers, body: &mut crate::tape::Body) {
        let crate::tape::Stored::Prefix(bytes) = &mut body.stored else {
            return;
        };
        let text = |name| match headers.get(name) {
            Some(crate::tape::HeaderValue::Plain(t)) => Some(t),
            _ => None,
        };
        // JSON or a form sent compressed (`Content-Encoding: gzip`, `deflate`, `br`...) cannot
        // be scrubbed where it lies: it is not kept at all. (A layer, compressed by its format
        // and not by its transfer, is.)
        let encoded = text("content-encoding");
        if encoded.is_some_and(|e| !e.eq_ignore_ascii_case(b"identity")) {
            let textual = match text("content-type") {
                Some(t) => mentions(t, b"json") || mentions(t, b"x-www-form-urlencoded"),
                None => true,
            };
            if textual {
                body.stored = crate::tape::Stored::None;
                body.sha256 = None;
            }
            return;
        }
        // Neither JSON nor a form (a layer, a page): the content type is not looked at. (A
        // form's first `=` ends its first field's name.)
        if !looks_like_json(bytes) && !bytes[..bytes.len().min(64)].contains(&b'=') {
            return;
        }
        if self.scrub_body(text("content-type"), bytes) {
            body.sha256 = None;
        }
    }

    /// Overwrites the credentials in `body` (or its first bytes), of `content_type`: whether
    /// any were found.
    pub fn scrub_body(&self, content_type: Option<&[u8]>, body: &mut [u8]) -> bool {
        match content_type {
            Some(t) if mentions(t, b"json") => self.scrub_json(body),
            Some(t) if mentions(t, b"x-www-form-urlencoded") => self.scrub_pairs(body, true),
            Some(_) => false,
            None => looks_like_json(body) && self.scrub_json(body),
        }
    }

    /// A JSON text (maybe cut short), read token by token without building it.
    fn scrub_json(&self, b: &mut [u8]) -> bool {
        let mut changed = false;
        let mut i = 0;
        let mut depth = 0usize;
        // The next value is a secret: its key is one.
        let mut secret_value = false;
        // Inside an array or object that is a secret's value, opened at this depth: every
        // string and number in it is overwritten, names included.
        let mut secret_within = None;
        while i < b.len() {
            match b[i] {
                b'"' => {
                    let start = i + 1;
                    let end = string_end(b, start);
                    let mut after = end + 1;
                    while after < b.len() && b[after].is_ascii_whitespace() {
                        after += 1;
                    }
                    let key = secret_within.is_none() && b.get(after) == Some(&b':');
                    if key {
                        secret_value = (SECRET_JSON_KEYS.iter())
                            .any(|k| k.as_bytes().eq_ignore_ascii_case(&b[start..end]));
                    } else {
                        if secret_value || secret_within.is_some() {
                            self.overwrite(&mut b[start..end]);
                            changed = true;
                        } else if b[start..end].contains(&b'?') {
                            changed |= self.scrub_pairs(&mut b[start..end], false);
                        }
                        secret_value = false;
                    }
                    i = end + 1;
                }
                b'[' | b'{' => {
                    depth += 1;
                    if secret_value && secret_within.is_none() {
                        secret_within = Some(depth);
                    }
                    secret_value = false;
                    i += 1;
                }
                b']' | b'}' => {
                    if secret_within == Some(depth) {
                        secret_within = None;
                    }
                    depth = depth.saturating_sub(1);
                    i += 1;
                }
                b':' | b',' | b' ' | b'\t' | b'\n' | b'\r' => i += 1,
                // A number (overwritten under a secret's name: a PIN, a numeric password),
                // true, false or null.
                _ => {
                    let start = i;
                    while i < b.len() && !b"\",:]} \t\n\r".contains(&b[i]) {
                        i += 1;
                    }
                    if secret_value || secret_within.is_some() {
                        changed |= overwrite_number(&mut b[start..i]);
                    }
                    secret_value = false;
                }
            }
        }
        changed
    }

    /// The `name=value` pairs of a query, fragment or form (from the start when `form`, else
    /// after the first `?`), secret values overwritten. A URL's pair ends at `&`, `#`, `?` or
    /// `\u0026` (Go's JSON writes `&` so).
    fn scrub_pairs(&self, s: &mut [u8], form: bool) -> bool {
        let mut i = if form {
            0
        } else {
            match s.iter().position(|&b| b == b'?') {
                Some(q) => q + 1,
                None => return false,
            }
        };
        let mut changed = false;
        while i < s.len() {
            // A form's pairs end at `&` only; a URL's also where a fragment or another query
            // starts, or at what a URL holds only escaped (a quote is a JSON escape's: the
            // whole escape goes with the value).
            let ends = |j: usize| match s[j] {
                b'&' => true,
                _ if form => false,
                b'#' | b'?' | b'>' | b' ' => true,
                _ => s[j..].starts_with(b"\\u0026"),
            };
            let end = (i..s.len()).find(|&j| ends(j)).unwrap_or(s.len());
            if let Some(eq) = s[i..end].iter().position(|&b| b == b'=') {
                let (name, value) = (i..i + eq, i + eq + 1..end);
                let secret = (SECRET_QUERY_PARAMS.iter())
                    .any(|p| p.as_bytes().eq_ignore_ascii_case(&s[name.clone()]));
                if secret && !value.is_empty() {
                    self.overwrite(&mut s[value]);
                    changed = true;
                }
            }
            // The next pair: past its separator, or past an escaped `&` (`\u0026`).
            i = match s.get(end) {
                Some(b'\\') => end + 6,
                _ => end + 1,
            };
        }
        changed
    }

    /// A secret's bytes replaced, keeping their length: `redacted-<fingerprint>` and `*`s.
    fn overwrite(&self, secret: &mut [u8]) {
        let marker = format!("redacted-{:016x}", self.fingerprint(secret));
        secret.fill(b'*');
        if secret.len() >= marker.len() {
            secret[..marker.len()].copy_from_slice(marker.as_bytes());
        }
    }
}

/// A JSON number's digits overwritten, keeping it a number of its length (`1000`): whether it
/// was one.
fn overwrite_number(token: &mut [u8]) -> bool {
    if !token
        .first()
        .is_some_and(|b| *b == b'-' || b.is_ascii_digit())
    {
        return false;
    }
    let mut first = true;
    for b in token.iter_mut().filter(|b| b.is_ascii_digit()) {
        *b = if std::mem::take(&mut first) {
            b'1'
        } else {
            b'0'
        };
    }
    true
}

/// Whether a content type (`application/vnd.oci.image.manifest.v1+json`) names `what`
/// (`json`), in any case.
pub fn mentions(content_type: &[u8], what: &[u8]) -> bool {
    (content_type.windows(what.len())).any(|w| w.eq_ignore_ascii_case(what))
}

/// Whether a body starts as JSON does (after a byte-order mark and white space, if any).
fn looks_like_json(body: &[u8]) -> bool {
    let text = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    let first = text.iter().find(|b| !b.is_ascii_whitespace());
    matches!(first, Some(b'{' | b'['))
}

/// Where the JSON string whose text starts at `start` ends (its closing quote, or the end of
/// what there is).
fn string_end(b: &[u8], start: usize) -> usize {
    let mut j = start;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return j,
            _ => j += 1,
        }
    }
    b.len()
}

fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (s, rest) = value.split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

/// The claims of a JWT that can be read without its key.
pub fn read_jwt(token: &str) -> Option<JwtInfo> {
    let mut parts = token.split('.');
    let (header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: serde_json::Value =
        serde_json::from_slice(&engine.decode(header.trim_end_matches('=')).ok()?).ok()?;
    header.get("alg")?;
    let claims: serde_json::Value =
        serde_json::from_slice(&engine.decode(payload.trim_end_matches('=')).ok()?).ok()?;
    Some(JwtInfo {
        issuer: claims
            .get("iss")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        issued_at: claims.get("iat").and_then(|v| v.as_i64()),
        expires_at: claims.get("exp").and_then(|v| v.as_i64()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tape::HeaderValue;

    const QUAY_JWT: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJxdWF5IiwiaWF0IjoxNzk1NjQ1NTY5LCJleHAiOjE3OTU2NDkxNjl9.c2ln";

    #[test]
    fn bearer_jwt_keeps_issuer_and_lifetime_not_the_token() {
        let r = Redactor::default();
        let mut h = Headers::new();
        let value = format!("Bearer {QUAY_JWT}");
        r.push_header(&mut h, "Authorization", value.as_bytes());
        let Some(HeaderValue::Redacted(red)) = h.get("authorization") else {
            panic!("authorization was not redacted: {h:?}");
        };
        assert_eq!(red.kind, SecretKind::BearerJwt);
        assert_eq!(red.len as usize, value.len());
        let jwt = red.jwt.as_ref().unwrap();
        assert_eq!(jwt.issuer.as_deref(), Some("quay"));
        assert_eq!(jwt.expires_at.unwrap() - jwt.issued_at.unwrap(), 3600);
        assert!(!format!("{h:?}").contains(QUAY_JWT));
    }

    #[test]
    fn a_credential_seen_before_is_redacted_as_it_was_worked_out() {
        let (a, b) = (Redactor::default(), Redactor::default());
        let token = format!("Bearer {QUAY_JWT}");
        // Same length and last 16 bytes as `token`, another credential.
        let other = format!("Bearer X{}", &QUAY_JWT[1..]);
        let redact = |r: &Redactor, name: &str, value: &str| {
            r.redact_value(name.as_bytes(), value.as_bytes())
        };
        let first = redact(&a, "authorization", &token);
        assert_eq!(first, a.work_out(false, token.as_bytes()));
        for _ in 0..3 {
            assert_eq!(redact(&a, "Authorization", &token), first);
            let o = redact(&a, "authorization", &other);
            assert_ne!(o.fingerprint, first.fingerprint);
            assert_eq!(o, a.work_out(false, other.as_bytes()));
            // The same bytes as a cookie are a cookie; another redactor has its own key.
            assert_eq!(redact(&a, "cookie", &token).kind, SecretKind::Cookie);
            assert_eq!(
                redact(&b, "authorization", &token),
                b.work_out(false, token.as_bytes())
            );
            assert_ne!(
                redact(&b, "authorization", &token).fingerprint,
                first.fingerprint
            );
        }
        // More credentials than are remembered: each still its own.
        for i in 0..SEEN_LIMIT + 10 {
            let value = format!("Bearer opaque-{i}");
            assert_eq!(
                redact(&a, "authorization", &value),
                a.work_out(false, value.as_bytes())
            );
        }
        let long = format!("Bearer {}", "x".repeat(SEEN_LONGEST));
        assert_eq!(
            redact(&a, "authorization", &long),
            a.work_out(false, long.as_bytes())
        );
    }

    #[test]
    fn equal_secrets_share_a_fingerprint_and_keys_differ_per_process() {
        let (a, b) = (Redactor::default(), Redactor::default());
        assert_eq!(a.fingerprint(b"s3cret"), a.fingerprint(b"s3cret"));
        assert_ne!(a.fingerprint(b"s3cret"), a.fingerprint(b"s3cret!"));
        assert_ne!(a.fingerprint(b"s3cret"), b.fingerprint(b"s3cret"));
    }

    #[test]
    fn basic_and_cookies_and_keep_list() {
        let r = Redactor::new(&["X-Api-Key".into()], &["cookie".into()]);
        let mut h = Headers::new();
        r.push_header(&mut h, "authorization", b"Basic YWRtaW46cGFzc3dvcmQ=");
        r.push_header(&mut h, "cookie", b"session=abc");
        r.push_header(&mut h, "x-api-key", b"k");
        assert!(
            matches!(h.get("authorization"), Some(HeaderValue::Redacted(x)) if x.kind == SecretKind::Basic)
        );
        assert_eq!(h.get_str("cookie"), Some("session=abc"));
        assert!(matches!(h.get("x-api-key"), Some(HeaderValue::Redacted(_))));
        // The proxy's path decides alike (the fingerprint aside, the same header block).
        #[cfg(feature = "net")]
        {
            let mut from_http = Headers::new();
            for (name, value) in [
                ("authorization", "Basic YWRtaW46cGFzc3dvcmQ="),
                ("cookie", "session=abc"),
                ("x-api-key", "k"),
                ("x-custom-thing", "v"),
                ("proxy-authorization", "Bearer opaque"),
            ] {
                r.push_http_header(
                    &mut from_http,
                    &http::HeaderName::from_static(name),
                    &http::HeaderValue::from_static(value),
                );
            }
            let mut by_name = Headers::new();
            r.push_header(&mut by_name, "Authorization", b"Basic YWRtaW46cGFzc3dvcmQ=");
            r.push_header(&mut by_name, "cookie", b"session=abc");
            r.push_header(&mut by_name, "X-Api-Key", b"k");
            r.push_header(&mut by_name, "x-custom-thing", b"v");
            r.push_header(&mut by_name, "proxy-authorization", b"Bearer opaque");
            assert_eq!(from_http, by_name);
            // And the fields of a response head the recorder read itself, in the server's case.
            let mut from_wire = Headers::new();
            for (name, value) in [
                ("Authorization", "Basic YWRtaW46cGFzc3dvcmQ="),
                ("Cookie", "session=abc"),
                ("X-API-KEY", "k"),
                ("X-Custom-Thing", "v"),
                ("Proxy-Authorization", "Bearer opaque"),
            ] {
                r.push_raw_header(&mut from_wire, name.as_bytes(), value.as_bytes());
            }
            assert_eq!(from_wire, by_name);
        }
    }

    #[test]
    fn secret_query_values_are_replaced() {
        let r = Redactor::default();
        let t = r.target("/v2/auth?service=quay&scope=repository:a/b:pull&access_token=abc123&X-Amz-Signature=ff");
        assert!(t.starts_with(
            "/v2/auth?service=quay&scope=repository:a/b:pull&access_token=loadtape-redacted-"
        ));
        assert!(!t.contains("abc123"));
        assert!(t.contains("X-Amz-Signature=loadtape-redacted-"));
        assert_eq!(r.target("/v2/?a=b"), "/v2/?a=b");
    }

    #[test]
    fn urls_in_headers_keep_all_but_their_secret_query_and_fragment_values() {
        let r = Redactor::default();
        let mut h = Headers::new();
        let presigned = "https://s3.example.com/b/k?X-Amz-Expires=600&X-Amz-Signature=abc123";
        r.push_raw_header(&mut h, b"Location", presigned.as_bytes());
        let implicit = "https://app.example.com/cb#access_token=tok456&token_type=Bearer";
        r.push_raw_header(&mut h, b"location", implicit.as_bytes());
        let both = "/oauth/cb?code_challenge=x&token=q789#state=s&id_token=f000";
        r.push_raw_header(&mut h, b"Referer", both.as_bytes());
        r.push_raw_header(&mut h, b"x-other", b"/path?token=kept-elsewhere");
        let values: Vec<String> = h
            .iter()
            .map(|(_, v)| match v {
                HeaderValue::Plain(t) => String::from_utf8(t.to_vec()).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(values[0].starts_with(
            "https://s3.example.com/b/k?X-Amz-Expires=600&X-Amz-Signature=loadtape-redacted-"
        ));
        assert!(values[0].ends_with("-6"), "{}", values[0]);
        assert!(values[1].starts_with("https://app.example.com/cb#access_token=loadtape-redacted-"));
        assert!(values[1].ends_with("&token_type=Bearer"), "{}", values[1]);
        assert!(values[2].starts_with("/oauth/cb?code_challenge=x&token=loadtape-redacted-"));
        assert!(values[2].contains("#state=s&id_token=loadtape-redacted-"));
        for secret in ["abc123", "tok456", "q789", "f000"] {
            assert!(!values.iter().any(|v| v.contains(secret)), "{secret}");
        }
        // Only where a URL is expected: a field named for a credential is redacted whole.
        assert_eq!(values[3], "/path?token=kept-elsewhere");
        // A target's fragment, on the wire only by mistake, is read the same way.
        let t = r.target("/a#access_token=zzz");
        assert!(t.starts_with("/a#access_token=loadtape-redacted-"), "{t}");
    }

    #[test]
    fn json_and_form_bodies_lose_their_credentials_and_keep_their_length_and_shape() {
        let r = Redactor::default();
        let scrub = |content_type: Option<&str>, text: &str| {
            let mut bytes = text.as_bytes().to_vec();
            let changed = r.scrub_body(content_type.map(str::as_bytes), &mut bytes);
            assert_eq!(bytes.len(), text.len(), "the length is kept");
            (changed, String::from_utf8(bytes).unwrap())
        };
        let json = Some("application/json; charset=utf-8");
        // Quay: a robot's token, a sign-in.
        let robot =
            r#"{"name": "org+bot", "token" : "ROBOT0TOKEN0ABCDEFGHIJKLMNOPQRSTUVWXYZ", "n": 3}"#;
        let (changed, out) = scrub(json, robot);
        assert!(changed);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["name"], "org+bot");
        assert_eq!(v["n"], 3);
        let token = v["token"].as_str().unwrap();
        let fingerprint = r.fingerprint(b"ROBOT0TOKEN0ABCDEFGHIJKLMNOPQRSTUVWXYZ");
        assert!(
            token.starts_with(&format!("redacted-{fingerprint:016x}*")),
            "{token}"
        );
        let (_, out) = scrub(json, r#"{"username":"alice","Password":"hunter\"2"}"#);
        assert_eq!(out, r#"{"username":"alice","Password":"*********"}"#);
        // Clair: a layer fetched with a bearer token from a presigned URL, as Go writes it.
        let index = r#"{"hash":"sha256:aa","layers":[{"hash":"sha256:bb","uri":"https://s3/b?X-Amz-Credential=AKIAKEY\u0026X-Amz-Signature=f00dfeed\u0026X-Amz-Expires=600","headers":{"Authorization":["Bearer eyJhbGciOi.e30.c2lnbmF0dXJl"],"Accept":["*/*"]}}]}"#;
        let (_, out) = scrub(json, index);
        for secret in ["AKIAKEY", "f00dfeed", "eyJhbGciOi"] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let layer = &v["layers"][0];
        assert_eq!(layer["hash"], "sha256:bb");
        assert_eq!(layer["headers"]["Accept"][0], "*/*");
        assert!(layer["uri"]
            .as_str()
            .unwrap()
            .ends_with("&X-Amz-Expires=600"));
        // Cut short inside a secret: what there is of it goes.
        let (_, out) = scrub(json, r#"{"a": [1, true], "client_secret": "abcdef0123"#);
        assert_eq!(out, r#"{"a": [1, true], "client_secret": "**********"#);
        // A form, and JSON without a content type; nothing else.
        let (_, out) = scrub(
            Some("application/x-www-form-urlencoded"),
            "grant_type=password&password=pw123&username=u",
        );
        assert_eq!(out, "grant_type=password&password=*****&username=u");
        assert!(scrub(None, r#" {"token": "t0k3n"}"#).0);
        assert!(!scrub(Some("application/octet-stream"), r#"{"token": "t0k3n"}"#).0);
        // A manifest has nothing to take.
        let manifest = r#"{"schemaVersion":2,"config":{"digest":"sha256:cc","size":7},"layers":[{"digest":"sha256:dd","size":9,"urls":["https://x/y?a=b"]}]}"#;
        assert_eq!(scrub(json, manifest), (false, manifest.to_string()));
    }

    #[test]
    fn secrets_in_the_shapes_a_first_scrubber_missed_are_found() {
        let r = Redactor::default();
        let json = |text: &str| {
            let mut bytes = text.as_bytes().to_vec();
            r.scrub_body(Some(b"application/json"), &mut bytes);
            let out = String::from_utf8(bytes).unwrap();
            assert_eq!(out.len(), text.len());
            out
        };
        // A secret's value an object or a number; Quay's application token; a Docker config.
        let out = json(r#"{"token": {"token_code": "abcdefgh"}, "password": 123456, "n": 7}"#);
        assert!(
            !out.contains("abcdefgh") && !out.contains("123456"),
            "{out}"
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (v["password"].as_i64(), v["n"].as_i64()),
            (Some(100000), Some(7))
        );
        let out = json(r#"{"auths": {"quay.io": {"auth": "dXNlcjpwYXNz"}}}"#);
        assert!(!out.contains("dXNlcjpwYXNz"), "{out}");
        // An escaped quote inside a URL's secret value goes with it; the JSON stays JSON.
        let out = json(r#"{"u": "https://s/x?sig=ab\"cd&z=1"}"#);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(v["u"].as_str().unwrap().ends_with("&z=1"), "{out}");
        assert!(!out.contains("ab\\\"cd"), "{out}");
        // A byte-order mark before JSON with no content type.
        let mut bom = b"\xef\xbb\xbf{\"token\": \"t0k3n\"}".to_vec();
        assert!(r.scrub_body(None, &mut bom));
        // A form's value runs to its `&`, whatever it holds.
        let mut form = b"password=p#ss?\"x&user=u".to_vec();
        r.scrub_body(Some(b"application/x-www-form-urlencoded"), &mut form);
        assert_eq!(form, b"password=*******&user=u");
        // URLs: a route's query after the fragment, a second `?`, two URLs in a `Link`.
        let t = r.target("https://app/#/callback?code=abc123&state=s");
        assert!(!t.contains("abc123") && t.ends_with("&state=s"), "{t}");
        let t = r.target("/a?x=1?token=zz9");
        assert!(!t.contains("zz9"), "{t}");
        let mut h = Headers::new();
        let link = r#"<https://a/x?n=1>; rel="a", <https://b/y?token=s3cr3t>; rel="b""#;
        r.push_raw_header(&mut h, b"Link", link.as_bytes());
        let Some(HeaderValue::Plain(kept)) = h.get("link") else {
            panic!("{h:?}");
        };
        let kept = std::str::from_utf8(kept).unwrap();
        assert!(
            kept.starts_with(
                r#"<https://a/x?n=1>; rel="a", <https://b/y?token=loadtape-redacted-"#
            ),
            "{kept}"
        );
        assert!(kept.ends_with(r#"-6>; rel="b""#), "{kept}");
        // Compressed without a telling first byte (deflate's `x`): not kept either.
        let mut headers = Headers::new();
        r.push_header(&mut headers, "Content-Type", b"application/json");
        r.push_header(&mut headers, "Content-Encoding", b"deflate");
        let mut body = crate::tape::Body::inline(b"x\x9c\xabV*\xc9\xcfN\xcdS".to_vec());
        r.scrub_stored(&headers, &mut body);
        assert_eq!(body.stored, crate::tape::Stored::None);
    }

    #[test]
    fn json_sent_compressed_is_not_kept_but_a_compressed_layer_is() {
        let r = Redactor::default();
        let gzip = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03compressed".to_vec();
        let body = || crate::tape::Body {
            len: gzip.len() as u64,
            sha256: None,
            stored: crate::tape::Stored::Prefix(gzip.clone()),
            complete: true,
        };
        let mut json = Headers::new();
        r.push_header(&mut json, "Content-Type", b"application/json");
        r.push_header(&mut json, "Content-Encoding", b"gzip");
        let mut compressed_json = body();
        r.scrub_stored(&json, &mut compressed_json);
        assert_eq!(compressed_json.stored, crate::tape::Stored::None);
        assert_eq!(compressed_json.len, gzip.len() as u64);
        let mut layer = Headers::new();
        r.push_header(
            &mut layer,
            "Content-Type",
            b"application/vnd.oci.image.layer.v1.tar+gzip",
        );
        let mut pulled = body();
        r.scrub_stored(&layer, &mut pulled);
        assert_eq!(pulled, body());
    }

    #[test]
    fn issued_tokens_are_fingerprinted() {
        let r = Redactor::default();
        let body = format!("{{\"token\": \"{QUAY_JWT}\"}}");
        let issued = r.issued_secrets(body.as_bytes());
        assert_eq!(issued.len(), 1);
        assert_eq!(issued[0].fingerprint, r.fingerprint(QUAY_JWT.as_bytes()));
        assert!(is_token_endpoint("/v2/auth"));
        assert!(!is_token_endpoint("/v2/"));
    }
}
