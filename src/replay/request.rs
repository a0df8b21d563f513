//! A recorded request made ready to send: method, path, headers and body, built on the plan's
//! thread so that the connection tasks only send.
//!
//! What changes from the recording, and why:
//! * hop-by-hop fields (RFC 9110: `Connection` and what it names, `Keep-Alive`, `TE`,
//!   `Transfer-Encoding`, `Upgrade`, `Proxy-Connection`) belong to the recorded connection, not
//!   to the request; `Content-Length` is set from the body sent, `Host` from the target (a
//!   `--header 'Host: ...'` overrides it), and `Expect` is dropped (the body goes at once);
//! * redacted credentials cannot be sent: the header is left out (and counted) unless
//!   `--header` sets a fresh value;
//! * a body the tape did not store whole is generated with its recorded length: the stored
//!   prefix, then a fixed pattern. Two replays of one tape send the same bytes.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Frame, SizeHint};

use super::plan::Blobs;
use crate::tape::{replayed_flags, Exchange, HeaderValue as TapeValue, Stored};

/// What every request gets from the run's configuration.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    /// The target's `host:port`, sent as `Host` (HTTP/1) or `:authority` (HTTP/2).
    pub host: HeaderValue,
    /// `--header` values: replace the recorded ones of the same name.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Fresh credentials by path prefix (the profile's `[[auth]]`).
    pub auth: super::auth::Auth,
    /// The profile's `[[rewrite]]`s and `remove-headers`.
    pub rewrites: super::rewrite::Rewrites,
    /// The profile's `[state]`.
    pub state: super::state::StateOptions,
    /// Endpoint classes (the profile's `[[endpoint]]`, then the built-in templates).
    pub classes: crate::endpoint::Classifier,
}

/// A request ready to go.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub method: http::Method,
    pub path: http::uri::PathAndQuery,
    pub headers: HeaderMap,
    pub body: BodySource,
    /// Kinds of the redacted credentials left out (for `--dry-run`).
    pub dropped_credentials: Vec<String>,
    /// The redacted `Authorization` the recording had, if any (stateful replay fills it).
    pub authorization: Option<crate::tape::Redaction>,
}

/// Where a request's body comes from.
#[derive(Debug, Clone)]
pub enum BodySource {
    Empty,
    Bytes(Bytes),
    /// `prefix`, then the fixed pattern up to `len` bytes in all.
    Synthetic {
        prefix: Bytes,
        len: u64,
    },
}

impl BodySource {
    pub fn len(&self) -> u64 {
        match self {
            BodySource::Empty => 0,
            BodySource::Bytes(b) => b.len() as u64,
            BodySource::Synthetic { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with the bytes this body sends, in the chunks [`ReplayBody`] sends them.
    pub fn for_each_chunk(&self, mut f: impl FnMut(&[u8])) {
        match self {
            BodySource::Empty => {}
            BodySource::Bytes(b) => f(b),
            BodySource::Synthetic { prefix, len } => {
                if !prefix.is_empty() {
                    f(prefix);
                }
                let mut remaining = len - prefix.len() as u64;
                while remaining > 0 {
                    let n = remaining.min(PATTERN.len() as u64) as usize;
                    f(&PATTERN[..n]);
                    remaining -= n as u64;
                }
            }
        }
    }

    pub fn into_body(self) -> ReplayBody {
        match self {
            BodySource::Empty => ReplayBody {
                head: None,
                remaining: 0,
            },
            BodySource::Bytes(b) => ReplayBody {
                remaining: 0,
                head: Some(b),
            },
            BodySource::Synthetic { prefix, len } => ReplayBody {
                remaining: len - prefix.len() as u64,
                head: (!prefix.is_empty()).then_some(prefix),
            },
        }
    }
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "expect",
];

/// Builds the request of `e`; `None` when it cannot be sent (a method or target that does not
/// parse). The flags say whether it was rewritten or its body synthesised; the bool, whether a
/// redacted credential was left out.
pub fn prepare(
    e: &Exchange,
    template: &RequestTemplate,
    blobs: &Blobs,
) -> Option<(Prepared, u32, bool)> {
    let method = http::Method::from_bytes(e.request.method.as_str().as_bytes()).ok()?;
    let mut flags = 0;
    let rewritten = template.rewrites.target(&e.request.target);
    if rewritten.is_some() {
        flags |= replayed_flags::REWRITTEN;
    }
    let target = rewritten.as_deref().unwrap_or(&e.request.target);
    let path = if target.starts_with('/') {
        http::uri::PathAndQuery::try_from(target).ok()?
    } else {
        // Absolute-form or `*`: only path and query go to the target.
        let uri: http::Uri = target.parse().ok()?;
        uri.path_and_query()?.clone()
    };
    let mut headers = HeaderMap::with_capacity(e.request.headers.len() + 2);
    // Names listed in `Connection` are hop-by-hop too.
    let listed: Vec<String> = e
        .request
        .headers
        .get_str("connection")
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let mut dropped_credentials = Vec::new();
    let mut authorization = None;
    for (name, value) in e.request.headers.iter() {
        if HOP_BY_HOP.contains(&name) || listed.iter().any(|l| l == name) {
            continue;
        }
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        if template.rewrites.remove_headers.contains(&name) {
            flags |= replayed_flags::REWRITTEN;
            continue;
        }
        match value {
            TapeValue::Plain(v) => {
                let replaced = std::str::from_utf8(v)
                    .ok()
                    .and_then(|text| template.rewrites.text(text));
                if replaced.is_some() {
                    flags |= replayed_flags::REWRITTEN;
                }
                let v = match &replaced {
                    Some(text) => HeaderValue::from_str(text),
                    None => HeaderValue::from_bytes(v),
                };
                if let Ok(v) = v {
                    headers.append(name, v);
                }
            }
            TapeValue::Redacted(r) => {
                if name == http::header::AUTHORIZATION {
                    authorization = Some(r.clone());
                }
                if !template.headers.iter().any(|(n, _)| *n == name) {
                    dropped_credentials.push(r.kind.as_str().to_string());
                }
            }
        }
    }
    for (name, value) in &template.headers {
        headers.insert(name.clone(), value.clone());
        flags |= replayed_flags::REWRITTEN;
    }
    if !headers.contains_key(http::header::HOST) {
        headers.insert(http::header::HOST, template.host.clone());
    }
    let body = body_of(e, blobs);
    if matches!(body, BodySource::Synthetic { .. }) {
        flags |= replayed_flags::SYNTHESISED;
    }
    if !body.is_empty() || method_has_body(&method) {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let dropped = !dropped_credentials.is_empty();
    Some((
        Prepared {
            method,
            path,
            headers,
            body,
            dropped_credentials,
            authorization,
        },
        flags,
        dropped,
    ))
}

fn method_has_body(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    )
}

fn body_of(e: &Exchange, blobs: &Blobs) -> BodySource {
    let body = &e.request.body;
    if body.len == 0 {
        return BodySource::Empty;
    }
    if let Some(whole) = body.whole_inline() {
        return BodySource::Bytes(Bytes::copy_from_slice(whole));
    }
    let prefix = match &body.stored {
        Stored::Full(sha) => match blobs.get(sha) {
            Some(b) if b.len() as u64 == body.len => return BodySource::Bytes(b),
            _ => Bytes::new(),
        },
        Stored::Prefix(p) => Bytes::copy_from_slice(&p[..p.len().min(body.len as usize)]),
        Stored::None => Bytes::new(),
    };
    BodySource::Synthetic {
        prefix,
        len: body.len,
    }
}

/// The fixed pattern synthetic bodies are made of: static, so sending a 1 GiB body allocates
/// nothing.
static PATTERN: [u8; 1 << 16] = pattern();

const fn pattern() -> [u8; 1 << 16] {
    let mut a = [0u8; 1 << 16];
    let mut i = 0;
    while i < a.len() {
        a[i] = (i % 251) as u8;
        i += 1;
    }
    a
}

/// A request body as hyper sends it: an optional head of real bytes, then `remaining` bytes of
/// the pattern, 64 KiB a frame.
pub struct ReplayBody {
    head: Option<Bytes>,
    remaining: u64,
}

impl hyper::body::Body for ReplayBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(PATTERN.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&PATTERN[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.head.as_ref().map_or(0, |h| h.len() as u64) + self.remaining)
    }
}
