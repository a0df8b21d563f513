//! Stateful replay: values the recorded server issued or checked, mapped onto the live target's.
//!
//! A tape of registry traffic is full of them, and they become known at two different times:
//!
//! * **Digests of bodies the tape did not keep whole.** Such a body is sent as synthetic bytes of
//!   its recorded length (`request.rs`), so a registry would reject the recorded digest of an
//!   upload. The plan hashes the bytes it will send for each upload session and maps the
//!   recorded digest to the synthetic one ([`Digests`]); every later reference follows: targets
//!   (`/blobs/{digest}`, `?digest=`, `?mount=`), JSON bodies (manifests, Clair index requests),
//!   and the digest of a manifest whose body changed. All of it is decided on the plan's thread,
//!   deterministically: two replays of one tape send the same bytes.
//! * **Upload locations** (`Location` with the registry's signed `_state`, and the upload UUID in
//!   it) exist only in the live target's answer. The plan notes which recorded exchange issued a
//!   recorded location ([`Issued`]); a later request that used it waits for that exchange and
//!   takes the live location at send time (`conn.rs`), only its path and query, always sent to
//!   the target.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::plan::Done;
use super::request::BodySource;
use crate::tape::codec::{digest_in_text, digest_position};
use crate::tape::hex;

/// The profile's `[state]`: what the stateful replay maps beyond locations, ETags, digests and
/// tokens, and what it does when a live value never comes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StateOptions {
    /// Fields of recorded JSON answers whose values later requests carry (a Quay build's
    /// `id`, a robot's `token`...): each recorded value is replaced, in later targets, header
    /// values and bodies, by the value of the same field in the live answer.
    #[serde(default)]
    pub json_fields: Vec<String>,
    /// A request whose recorded value no live answer gave: `send` it as recorded (the
    /// default; counted as unmapped) or `skip` it (counted, not sent).
    #[serde(default)]
    pub unmappable: Unmappable,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unmappable {
    #[default]
    Send,
    Skip,
}

/// Values of the named JSON fields in a recorded answer, with where they sit (a JSON pointer,
/// where the live answer's value is read). Values shorter than 4 characters are left alone:
/// too likely to stand for something else elsewhere.
pub fn json_values(body: &[u8], fields: &[String]) -> Vec<(String, String)> {
    fn walk(v: &serde_json::Value, at: &str, fields: &[String], out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let pointer = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                    if fields.iter().any(|f| f == k) {
                        if let Some(value) = scalar(v).filter(|s| s.len() >= 4) {
                            out.push((value, pointer.clone()));
                        }
                    }
                    walk(v, &pointer, fields, out);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(v, &format!("{at}/{i}"), fields, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        walk(&v, "", fields, &mut out);
    }
    out
}

/// A JSON scalar as text (strings and numbers).
pub fn scalar(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Calls `f` with every token of `text`: runs of characters that can make an id
/// (alphanumerics, `-`, `_`, `.`).
pub fn for_each_token(text: &str, mut f: impl FnMut(&str)) {
    for t in text.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        if t.len() >= 4 {
            f(t);
        }
    }
}

/// `text` with whole tokens equal to a recorded value replaced by the live one; `None` when
/// nothing changed.
pub fn replace_tokens(text: &str, pairs: &[(&str, &str)]) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut start = None;
    let is_token = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    for (i, c) in text
        .char_indices()
        .chain(std::iter::once((text.len(), ' ')))
    {
        match (is_token(c) && i < text.len(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                if let Some((_, live)) = pairs.iter().find(|(rec, _)| *rec == &text[s..i]) {
                    out.push_str(&text[copied..s]);
                    out.push_str(live);
                    copied = i;
                }
                start = None;
            }
            _ => {}
        }
    }
    if copied == 0 {
        return None;
    }
    out.push_str(&text[copied..]);
    Some(out)
}

/// A live value a recorded exchange's response will give, and the exchange's completion.
#[derive(Default)]
pub struct Issued {
    value: OnceLock<String>,
    pub done: Arc<Done>,
    /// The issuing request itself could not be mapped: no live value will come, which the
    /// plan knows before anything is sent.
    doomed: std::sync::atomic::AtomicBool,
    /// When the issuing exchange ended on the tape (0: unknown). A request that started
    /// before it could not have used its value.
    pub recorded_end: u64,
}

impl Issued {
    pub fn new(done: Arc<Done>) -> Issued {
        Issued::ending(done, 0)
    }

    pub fn ending(done: Arc<Done>, recorded_end: u64) -> Issued {
        Issued {
            value: OnceLock::new(),
            done,
            doomed: Default::default(),
            recorded_end,
        }
    }

    pub fn doom(&self) {
        self.doomed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn doomed(&self) -> bool {
        self.doomed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the live value (a `Location`'s path and query); the first one stays.
    pub fn set(&self, value: String) {
        let _ = self.value.set(value);
    }

    pub fn get(&self) -> Option<&str> {
        self.value.get().map(String::as_str)
    }
}

/// A request target whose start is a recorded location: at send time the live location
/// replaces the first `len` bytes.
#[derive(Clone)]
pub struct LiveTarget {
    pub issued: Arc<Issued>,
    pub len: usize,
}

impl LiveTarget {
    /// The target to send, or `None` when the issuing exchange gave no live value.
    pub fn resolve(&self, recorded: &str) -> Option<String> {
        let live = self.issued.get()?;
        let rest = recorded.get(self.len..).unwrap_or("");
        // The recorded query's rest joins the live one: `?_state=...&digest=` onto a live
        // location without a query, `?digest=` (Quay's locations carry no `_state`) onto
        // one with.
        let joined = match (rest.strip_prefix(['&', '?']), live.contains('?')) {
            (Some(params), true) => format!("{live}&{params}"),
            (Some(params), false) => format!("{live}?{params}"),
            (None, _) => format!("{live}{rest}"),
        };
        Some(joined)
    }
}

/// The path and query of a `Location` value (absolute or not).
pub fn location_path(value: &str) -> Option<String> {
    if value.starts_with('/') {
        return Some(value.to_string());
    }
    let after_scheme = value.split_once("://")?.1;
    let path = &after_scheme[after_scheme.find('/')?..];
    Some(path.to_string())
}

/// Recorded values (upload locations, ETags) and the exchanges whose live answers replace them.
/// Old entries retire first-in first-out beyond a bound: clients use such a value within moments
/// of getting it.
#[derive(Default)]
pub struct Recent {
    map: HashMap<String, Arc<Issued>>,
    order: VecDeque<String>,
}

const MAX_RECENT: usize = 16_384;

impl Recent {
    pub fn insert(&mut self, recorded: String, issued: Arc<Issued>) {
        if self.map.insert(recorded.clone(), issued).is_none() {
            self.order.push_back(recorded);
        }
        while self.order.len() > MAX_RECENT {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    pub fn get(&self, recorded: &str) -> Option<Arc<Issued>> {
        self.map.get(recorded.trim()).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Recorded upload locations, for the plan.
#[derive(Default)]
pub struct Locations(Recent);

impl Locations {
    pub fn insert(&mut self, recorded: String, issued: Arc<Issued>) {
        self.0.insert(recorded, issued);
    }

    /// The recorded location `target` starts with: the whole target, or the target without a
    /// `digest=` parameter appended (the PUT that closes an upload).
    pub fn find(&self, target: &str) -> Option<LiveTarget> {
        if let Some(issued) = self.0.get(target) {
            return Some(LiveTarget {
                issued,
                len: target.len(),
            });
        }
        let cut = target
            .rfind("&digest=")
            .or_else(|| target.rfind("?digest="))?;
        let prefix = &target[..cut];
        self.0.get(prefix).map(|issued| LiveTarget {
            issued,
            len: prefix.len(),
        })
    }
}

/// Recorded `ETag`s: a later `If-None-Match` or `If-Match` carrying one carries the live one of
/// the answer that gave it instead (Clair answers 304 or 412 by its index state's ETag).
pub type Etags = Recent;

/// An upload in progress: the bytes the replay sends for it, hashed as planned.
struct Session {
    hasher: Sha256,
    /// Whether any of its bytes are synthetic (otherwise the recorded digest stands).
    synthetic: bool,
}

/// Recorded digests mapped to those of the bytes the replay sends. See the module docs.
#[derive(Default)]
pub struct Digests {
    map: HashMap<[u8; 32], [u8; 32]>,
    sessions: HashMap<String, Session>,
    /// The exchange that completed each upload (by its recorded digest), and when it ended on
    /// the tape: a later request naming the digest waits for it.
    uploaded: HashMap<[u8; 32], (Arc<Done>, u64)>,
}

const MAX_SESSIONS: usize = MAX_RECENT;

/// Where an upload's data goes: `/v2/<name>/blobs/uploads/...`.
pub fn is_upload(path: &str) -> bool {
    path.starts_with("/v2/") && path.contains("/blobs/uploads")
}

/// A target inside an upload session (`/v2/<name>/blobs/uploads/<uuid>`), which only a live
/// answer can name.
pub fn is_upload_session(path: &str) -> bool {
    is_upload(path)
        && path
            .split_once("/blobs/uploads/")
            .is_some_and(|(_, rest)| !rest.is_empty())
}

impl Digests {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Recorded digests mapped so far.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Notes the body of a request to an upload path, and closes the session when the target
    /// names the upload's digest (`?digest=`): the recorded digest is then mapped to that of the
    /// bytes sent, when they differ.
    /// `completion` is the closing exchange's, with its recorded end: requests that name the
    /// digest later on the tape wait for it.
    pub fn upload(
        &mut self,
        path: &str,
        target: &str,
        body: &BodySource,
        completion: Option<(Arc<Done>, u64)>,
    ) {
        let closing = query_digest(target);
        if body.is_empty() && closing.is_none() && !self.sessions.contains_key(path) {
            // `POST .../uploads/` opening a session: nothing to hash yet.
            return;
        }
        if self.sessions.len() >= MAX_SESSIONS {
            // Uploads never closed (aborted clients) must not grow the map for ever.
            self.sessions.clear();
        }
        let session = self
            .sessions
            .entry(path.to_string())
            .or_insert_with(|| Session {
                hasher: Sha256::new(),
                synthetic: false,
            });
        body.for_each_chunk(|chunk| session.hasher.update(chunk));
        session.synthetic |= matches!(body, BodySource::Synthetic { .. });
        let Some(recorded) = closing else {
            return;
        };
        if let Some(c) = completion {
            if self.uploaded.len() >= MAX_SESSIONS {
                self.uploaded.retain(|_, (d, _)| !d.is_set());
            }
            self.uploaded.insert(recorded, c);
        }
        let session = self.sessions.remove(path).expect("just used");
        if !session.synthetic {
            return;
        }
        let sent: [u8; 32] = session.hasher.finalize().into();
        if sent != recorded {
            self.map.insert(recorded, sent);
        }
    }

    /// Notes that `done` (a write that ended at `end` on the tape) made the resources whose
    /// digests `text` names: its target, or the `Location` it answered (a manifest, a Clair
    /// index report). A later request naming one waits for it, as an upload's do.
    pub fn wrote(&mut self, text: &str, done: &Arc<Done>, end: u64) {
        for_each_digest(text, |_, d| {
            if self.uploaded.len() >= MAX_SESSIONS {
                self.uploaded.retain(|_, (d, _)| !d.is_set());
            }
            self.uploaded.insert(d, (done.clone(), end));
        });
    }

    /// The writes still in flight that `text` names digests of (uploads, and what `wrote`
    /// noted), among those that ended on the tape before `start`.
    pub fn depends(&self, text: &str, start: u64) -> Vec<Arc<Done>> {
        let mut out = Vec::new();
        if self.uploaded.is_empty() {
            return out;
        }
        for_each_digest(text, |_, d| {
            if let Some((done, end)) = self.uploaded.get(&d) {
                if *end <= start && !done.is_set() {
                    out.push(done.clone());
                }
            }
        });
        out
    }

    /// Maps `recorded` (a manifest's digest) to `replayed` (that of its rewritten body).
    pub fn insert(&mut self, recorded: [u8; 32], replayed: [u8; 32]) {
        if recorded != replayed {
            self.map.insert(recorded, replayed);
        }
    }

    /// `text` with every mapped digest replaced (`sha256:<hex>`, or `sha256%3A<hex>` in a
    /// query); `None` when nothing changed.
    pub fn rewrite(&self, text: &str) -> Option<String> {
        if self.map.is_empty() {
            return None;
        }
        let mut out = String::new();
        let mut copied = 0;
        for_each_digest(text, |hex_start, digest| {
            if let Some(mapped) = self.map.get(&digest) {
                out.push_str(&text[copied..hex_start]);
                out.push_str(&hex(mapped));
                copied = hex_start + 64;
            }
        });
        if copied == 0 {
            return None;
        }
        out.push_str(&text[copied..]);
        Some(out)
    }
}

/// Calls `f` with the offset of the hex digits and the value of every digest in `text`
/// (`sha256:<hex>` or `sha256%3A<hex>`, as the tape codec finds them).
fn for_each_digest(text: &str, mut f: impl FnMut(usize, [u8; 32])) {
    let mut from = 0;
    while let Some((at, digest)) = digest_position(&text[from..]) {
        f(from + at, digest);
        from += at + 64;
    }
}

/// The value of a target's query parameter `key`, percent-decoded.
pub fn query_value(target: &str, key: &str) -> Option<String> {
    let (_, query) = target.split_once('?')?;
    let raw = query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })?;
    Some(crate::percent::decode(&raw.replace('+', " ")))
}

/// The digest a target's `digest=` query parameter names.
fn query_digest(target: &str) -> Option<[u8; 32]> {
    let (_, query) = target.split_once('?')?;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("digest="))
        .and_then(digest_in_text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_synthetic_upload_maps_its_digest_and_later_references_follow() {
        let recorded = [0xabu8; 32];
        let mut d = Digests::default();
        let body = BodySource::Synthetic {
            prefix: Bytes::from_static(b"head"),
            len: 200_000,
        };
        let path = "/v2/app/blobs/uploads/1234";
        d.upload(path, path, &body, None);
        let closing = Arc::new(Done::default());
        d.upload(
            path,
            &format!("{path}?_state=x&digest=sha256:{}", hex(&recorded)),
            &BodySource::Empty,
            Some((closing.clone(), 1000)),
        );
        // Named later on the tape: waits for the upload; named while it was going: does not.
        let named = format!("/v2/app/blobs/sha256:{}", hex(&recorded));
        assert_eq!(d.depends(&named, 2000).len(), 1);
        assert!(d.depends(&named, 500).is_empty());
        closing.set();
        assert!(d.depends(&named, 2000).is_empty());
        let mut h = Sha256::new();
        body.for_each_chunk(|c| h.update(c));
        let sent: [u8; 32] = h.finalize().into();
        let target = format!("/v2/app/blobs/sha256:{}", hex(&recorded));
        assert_eq!(
            d.rewrite(&target).unwrap(),
            format!("/v2/app/blobs/sha256:{}", hex(&sent))
        );
        let json = format!(r#"{{"layers":[{{"digest":"sha256:{}"}}]}}"#, hex(&recorded));
        assert!(d.rewrite(&json).unwrap().contains(&hex(&sent)));
        let escaped = format!("/v2/app/blobs/uploads/?mount=sha256%3A{}", hex(&recorded));
        assert!(d.rewrite(&escaped).unwrap().ends_with(&hex(&sent)));
        assert_eq!(d.rewrite("/v2/app/manifests/v1"), None);
    }

    #[test]
    fn named_json_fields_are_found_and_replaced_as_whole_tokens() {
        let body =
            br#"{"id": "6d1c-77aa", "phase": "waiting", "builds": [{"id": 123456}], "n": 7}"#;
        let fields = vec!["id".to_string(), "n".to_string()];
        let found = json_values(body, &fields);
        assert_eq!(
            found,
            vec![
                ("123456".to_string(), "/builds/0/id".to_string()),
                ("6d1c-77aa".to_string(), "/id".to_string()),
            ]
        );
        let pairs = [("6d1c-77aa", "LIVE-1"), ("123456", "9")];
        assert_eq!(
            replace_tokens("/api/v1/build/6d1c-77aa?x=123456&y=1234567", &pairs).unwrap(),
            "/api/v1/build/LIVE-1?x=9&y=1234567"
        );
        assert_eq!(replace_tokens("/nothing/6d1c-77aab", &pairs), None);
        let mut tokens = Vec::new();
        for_each_token("/api/v1/build/6d1c-77aa?x=1", |t| {
            tokens.push(t.to_string())
        });
        assert_eq!(tokens, ["build", "6d1c-77aa"]);
        assert_eq!(
            query_value("/v2/auth?account=bob%40corp&scope=x", "account").unwrap(),
            "bob@corp"
        );
    }

    #[test]
    fn real_bytes_keep_their_digest() {
        let bytes = Bytes::from_static(b"{\"config\": true}");
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let mut d = Digests::default();
        let target = format!("/v2/app/blobs/uploads/9?digest=sha256:{}", hex(&digest));
        d.upload(
            "/v2/app/blobs/uploads/9",
            &target,
            &BodySource::Bytes(bytes),
            None,
        );
        assert!(d.is_empty());
    }

    #[test]
    fn live_locations_replace_the_recorded_ones_and_keep_the_rest() {
        let mut l = Locations::default();
        let issued = Arc::new(Issued::default());
        l.insert(
            "/v2/app/blobs/uploads/abc?_state=REC".into(),
            issued.clone(),
        );
        let t = l
            .find("/v2/app/blobs/uploads/abc?_state=REC&digest=sha256:00")
            .unwrap();
        assert_eq!(
            t.resolve("/v2/app/blobs/uploads/abc?_state=REC&digest=sha256:00"),
            None
        );
        issued.set("/v2/app/blobs/uploads/LIVE?_state=L".into());
        assert_eq!(
            t.resolve("/v2/app/blobs/uploads/abc?_state=REC&digest=sha256:00")
                .unwrap(),
            "/v2/app/blobs/uploads/LIVE?_state=L&digest=sha256:00"
        );
        assert!(l.find("/v2/app/blobs/uploads/other").is_none());
        // Quay's recorded locations carry no `_state`: the PUT's `?digest=` joins the live
        // location's query.
        let quay = Arc::new(Issued::default());
        l.insert("/v2/app/blobs/uploads/q".into(), quay.clone());
        quay.set("/v2/app/blobs/uploads/LIVE?_state=L".into());
        let t = l
            .find("/v2/app/blobs/uploads/q?digest=sha256%3A00")
            .unwrap();
        assert_eq!(
            t.resolve("/v2/app/blobs/uploads/q?digest=sha256%3A00")
                .unwrap(),
            "/v2/app/blobs/uploads/LIVE?_state=L&digest=sha256%3A00"
        );
        assert_eq!(
            location_path("http://registry:5000/v2/a/blobs/uploads/u?x=1").unwrap(),
            "/v2/a/blobs/uploads/u?x=1"
        );
    }
}
