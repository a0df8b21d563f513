//! HAR file -> tape.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::Engine;
use sha2::Digest;

use super::{Entry, Har};
use crate::redact::{is_token_endpoint, Redactor};
use crate::tape::Sharing;
use crate::tape::{
    Body, CloseReason, ConnectionClosed, ConnectionOpened, Exchange, FailureKind, Headers,
    HttpVersion, Method, Record, Request, Response, Scheme, Stored, TapeHeader, TapeKind,
    TapeWriter, Timing, UpstreamFailure, WriteSummary, WriterOptions,
};

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Bodies up to this size are kept whole; longer ones keep this many first bytes.
    pub body_prefix: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            body_prefix: 64 << 10,
        }
    }
}

#[derive(Debug)]
pub struct ImportSummary {
    pub entries: usize,
    pub connections: usize,
    pub redacted: usize,
    pub tape: WriteSummary,
}

/// Imports the HAR file at `har` into a new tape at `out` (a `.tape` file or a directory).
pub fn import(
    har: &Path,
    out: &Path,
    redactor: &Redactor,
    options: &ImportOptions,
) -> anyhow::Result<ImportSummary> {
    let text = std::fs::read(har).with_context(|| format!("cannot read {}", har.display()))?;
    import_bytes(&text, &har.display().to_string(), out, redactor, options)
}

/// Imports HAR JSON held in memory; `source` names it in errors and in the tape header.
pub fn import_bytes(
    json: &[u8],
    source: &str,
    out: &Path,
    redactor: &Redactor,
    options: &ImportOptions,
) -> anyhow::Result<ImportSummary> {
    let parsed = har_to_records(json, source, redactor, options)?;
    let mut writer = TapeWriter::create(out, parsed.header, WriterOptions::default())?;
    for r in &parsed.records {
        // Written in start order, so readers need no reordering: the watermark says so.
        writer.set_watermark(r.start());
        writer.write(r)?;
    }
    let tape = writer.finish()?;
    Ok(ImportSummary {
        entries: parsed.entries,
        connections: parsed.connections,
        redacted: parsed.redacted,
        tape,
    })
}

/// A HAR file as tape records, in start order, with the header a tape of them would carry.
pub struct Converted {
    pub header: TapeHeader,
    pub records: Vec<Record>,
    pub entries: usize,
    pub connections: usize,
    pub redacted: usize,
}

/// Converts HAR JSON to tape records without writing them.
pub fn har_to_records(
    json: &[u8],
    source: &str,
    redactor: &Redactor,
    options: &ImportOptions,
) -> anyhow::Result<Converted> {
    let har: Har = serde_json::from_slice(json)
        .with_context(|| format!("{source} is not a HAR file (expected JSON with log.entries)"))?;
    let mut entries = har.log.entries;
    if entries.is_empty() {
        bail!("{source} holds no entries: nothing to import");
    }
    let mut starts = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let t = chrono::DateTime::parse_from_rfc3339(&e.started).with_context(|| {
            format!(
                "{source}: entry {i} has startedDateTime {:?}, not an ISO 8601 date-time",
                e.started
            )
        })?;
        starts.push(t.timestamp_nanos_opt().context("date out of range")?);
    }
    let epoch = *starts.iter().min().expect("entries are not empty");
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| starts[i]);

    let mut header = TapeHeader::new(TapeKind::Capture, "loadtape import");
    header.epoch_unix_ns = epoch;
    header.options = vec![
        ("source".into(), source.to_string()),
        (
            "creator".into(),
            format!("{} {}", har.log.creator.name, har.log.creator.version),
        ),
        (
            "redacted_headers".into(),
            redactor.redacted_headers().join(","),
        ),
    ];
    header.upstream = entries
        .first()
        .and_then(|e| split_url(&e.request.url).map(|(s, a, _)| format!("{}://{a}", s.as_str())));

    let mut records = Vec::with_capacity(entries.len() * 3);
    let mut connections: HashMap<String, (u64, u64, u64, u64, HttpVersion)> = HashMap::new();
    let mut next_connection = 1u64;
    let mut redacted = 0;
    let mut sharing = Sharing::default();
    for (n, &i) in order.iter().enumerate() {
        let e = &mut entries[i];
        let start = (starts[i] - epoch) as u64;
        let exchange = exchange(e, n as u64 + 1, start, redactor, options).with_context(|| {
            format!(
                "{source}: entry {i} ({} {})",
                e.request.method, e.request.url
            )
        })?;
        redacted += exchange.request.headers.redactions().len()
            + exchange
                .response
                .as_ref()
                .map_or(0, |r| r.headers.redactions().len());
        let key = match &e.connection {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            // An entry without a connection is its own connection.
            None => format!("entry-{i}"),
        };
        let conn = connections.entry(key).or_insert_with(|| {
            next_connection += 1;
            (
                next_connection - 1,
                start,
                start,
                0,
                exchange.request.version,
            )
        });
        conn.2 = conn.2.max(exchange.timing.end());
        conn.3 += 1;
        let mut exchange = exchange;
        exchange.connection = conn.0;
        // A client's heads repeat (its agent, its token): the tape writes them once a frame.
        sharing.share(&mut exchange.request.headers);
        if let Ok(response) = &mut exchange.response {
            sharing.share(&mut response.headers);
        }
        records.push(Record::Exchange(Box::new(exchange)));
    }
    let connection_count = connections.len();
    for (id, opened, closed, exchanges, version) in connections.into_values() {
        records.push(Record::ConnectionOpened(Box::new(ConnectionOpened {
            id,
            at: opened,
            client: None,
            version,
            tls: None,
        })));
        records.push(Record::ConnectionClosed(Box::new(ConnectionClosed {
            id,
            at: closed,
            reason: CloseReason::Unknown,
            exchanges,
        })));
    }
    records.sort_by_key(|r| {
        (
            r.start(),
            r.kind_code() != crate::tape::kind::CONNECTION_OPENED,
        )
    });
    Ok(Converted {
        header,
        records,
        entries: order.len(),
        connections: connection_count,
        redacted,
    })
}

fn ms_to_ns(ms: f64) -> u64 {
    if ms.is_finite() && ms > 0.0 {
        (ms * 1e6).round() as u64
    } else {
        0
    }
}

fn exchange(
    e: &mut Entry,
    id: u64,
    start: u64,
    redactor: &Redactor,
    options: &ImportOptions,
) -> anyhow::Result<Exchange> {
    let (scheme, url_authority, target) = split_url(&e.request.url)
        .with_context(|| format!("url {:?} is not absolute", e.request.url))?;
    let version = HttpVersion::parse(&e.request.http_version).unwrap_or(HttpVersion::Http11);

    let mut req_headers = Headers::new();
    let mut host = None;
    for h in &e.request.headers {
        if h.name.starts_with(':') {
            if h.name == ":authority" {
                host = Some(h.value.clone());
            }
            continue;
        }
        if h.name.eq_ignore_ascii_case("host") {
            host.get_or_insert_with(|| h.value.clone());
        }
        redactor.push_header(&mut req_headers, &h.name, h.value.as_bytes());
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    let mut request_body = match e.request.post_data.take() {
        Some(pd) => body(
            pd.text.as_deref(),
            pd.encoding.as_deref(),
            e.request.body_size,
            options,
        )?,
        None if e.request.body_size > 0 => Body {
            len: e.request.body_size as u64,
            sha256: None,
            stored: Stored::None,
            complete: true,
        },
        None => Body::empty(),
    };

    let total = ms_to_ns(e.time);
    let (request_done, response_head) = match &e.timings {
        Some(t) => {
            let before = [t.blocked, t.dns, t.connect, t.send]
                .iter()
                .map(|v| ms_to_ns(*v))
                .sum::<u64>();
            (before, Some(before + ms_to_ns(t.wait)))
        }
        None => (0, None),
    };
    let response_done = total.max(response_head.unwrap_or(0));

    let mut issued = Vec::new();
    let mut response = if e.response.status <= 0 {
        Err(UpstreamFailure {
            kind: FailureKind::Other,
            detail: e
                .error
                .clone()
                .unwrap_or_else(|| "no response (HAR status 0)".into()),
        })
    } else {
        let mut headers = Headers::new();
        for h in &e.response.headers {
            if !h.name.starts_with(':') {
                redactor.push_header(&mut headers, &h.name, h.value.as_bytes());
            }
        }
        let c = &e.response.content;
        let size = if c.size >= 0 {
            c.size
        } else {
            e.response.body_size
        };
        let mut body = body(c.text.as_deref(), c.encoding.as_deref(), size, options)?;
        if is_token_endpoint(&path) {
            if let Some(bytes) = decoded(c.text.as_deref(), c.encoding.as_deref())? {
                issued = redactor.issued_secrets(&bytes);
            }
            body.stored = Stored::None;
        }
        Ok(Response {
            status: u16::try_from(e.response.status).context("status out of range")?,
            version: HttpVersion::parse(&e.response.http_version).unwrap_or(version),
            headers,
            body,
        })
    };

    redactor.scrub_stored(&req_headers, &mut request_body);
    if let Ok(r) = response.as_mut() {
        redactor.scrub_stored(&r.headers, &mut r.body);
    }
    Ok(Exchange {
        id,
        connection: 0,
        stream: 0,
        client: None,
        timing: Timing {
            start,
            request_done,
            response_head: response
                .is_ok()
                .then(|| response_head.unwrap_or(response_done)),
            response_done,
        },
        request: Request {
            method: Method::parse(&e.request.method),
            scheme,
            authority: host.unwrap_or(url_authority),
            target: redactor.target(&target),
            version,
            headers: req_headers,
            body: request_body,
        },
        response,
        issued_secrets: issued,
        upgraded: false,
    })
}

fn decoded(text: Option<&str>, encoding: Option<&str>) -> anyhow::Result<Option<Vec<u8>>> {
    Ok(match (text, encoding) {
        (None, _) => None,
        (Some(t), Some(enc)) if enc.eq_ignore_ascii_case("base64") => Some(
            base64::engine::general_purpose::STANDARD
                .decode(t.trim())
                .context("body says base64 but does not decode")?,
        ),
        (Some(t), _) => Some(t.as_bytes().to_vec()),
    })
}

/// A body from HAR text; `size` is the producer's byte count (-1 when unknown).
fn body(
    text: Option<&str>,
    encoding: Option<&str>,
    size: i64,
    options: &ImportOptions,
) -> anyhow::Result<Body> {
    let Some(mut bytes) = decoded(text, encoding)? else {
        return Ok(if size > 0 {
            Body {
                len: size as u64,
                sha256: None,
                stored: Stored::None,
                complete: true,
            }
        } else {
            Body::empty()
        });
    };
    if bytes.is_empty() && size > 0 {
        // Producers write an empty text for bodies they did not keep.
        return Ok(Body {
            len: size as u64,
            sha256: None,
            stored: Stored::None,
            complete: true,
        });
    }
    let len = bytes.len() as u64;
    if bytes.is_empty() {
        return Ok(Body::empty());
    }
    let sha256 = sha2::Sha256::digest(&bytes).into();
    bytes.truncate(options.body_prefix);
    Ok(Body {
        len,
        sha256: Some(sha256),
        stored: Stored::Prefix(bytes),
        complete: true,
    })
}

/// `scheme://authority/target` split in three; the target defaults to `/`.
pub(crate) fn split_url(url: &str) -> Option<(Scheme, String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => Scheme::Http,
        "https" | "wss" => Scheme::Https,
        _ => return None,
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = rest[..end].to_string();
    let mut target = rest[end..].split('#').next().unwrap_or("").to_string();
    if !target.starts_with('/') {
        target.insert(0, '/');
    }
    Some((scheme, authority, target))
}

/// The default place of an import's tape: beside the HAR, `NAME.tape`.
pub fn default_out(har: &Path) -> PathBuf {
    har.with_extension("tape")
}
