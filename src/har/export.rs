//! Tape -> HAR, streamed: entries are written as records are read, so exporting a large tape
//! holds one entry in memory at a time (plus the stored blobs it may still refer to, up to a
//! bound).

use std::collections::HashMap;
use std::io::Write;

use base64::Engine;

use super::{Content, Entry, NameValue, PostData, Request, Response, Timings};
use crate::tape::{Body, Exchange, Headers, Record, Stored};

/// Bytes of blobs kept for later references while exporting.
const BLOB_CACHE_BYTES: usize = 256 << 20;

/// Writes HAR 1.2 to `out` entry by entry.
pub struct HarExporter<W: Write> {
    out: W,
    epoch_unix_ns: i64,
    entries: u64,
    blobs: HashMap<[u8; 32], Vec<u8>>,
    blob_bytes: usize,
}

impl<W: Write> HarExporter<W> {
    pub fn new(mut out: W, epoch_unix_ns: i64) -> std::io::Result<Self> {
        write!(
            out,
            "{{\"log\":{{\"version\":\"1.2\",\"creator\":{{\"name\":\"loadtape\",\"version\":\"{}\"}},\"entries\":[",
            env!("CARGO_PKG_VERSION")
        )?;
        Ok(HarExporter {
            out,
            epoch_unix_ns,
            entries: 0,
            blobs: HashMap::new(),
            blob_bytes: 0,
        })
    }

    /// Adds a record: exchanges become entries, blobs are kept for the bodies that refer to
    /// them, the rest is not part of HAR.
    pub fn add(&mut self, record: &Record) -> std::io::Result<()> {
        match record {
            Record::Exchange(e) => self.add_exchange(e),
            Record::Blob(b) if self.blob_bytes + b.data.len() <= BLOB_CACHE_BYTES => {
                self.blob_bytes += b.data.len();
                self.blobs.insert(b.sha256, b.data.clone());
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn add_exchange(&mut self, e: &Exchange) -> std::io::Result<()> {
        let entry = self.entry(e);
        if self.entries > 0 {
            self.out.write_all(b",")?;
        }
        self.entries += 1;
        serde_json::to_writer(&mut self.out, &entry)?;
        Ok(())
    }

    /// Closes the JSON; returns the entries written.
    pub fn finish(mut self) -> std::io::Result<u64> {
        self.out.write_all(b"]}}\n")?;
        self.out.flush()?;
        Ok(self.entries)
    }

    fn entry(&self, e: &Exchange) -> Entry {
        let t = &e.timing;
        let started = chrono::DateTime::from_timestamp_nanos(self.epoch_unix_ns + t.start as i64);
        let ms = |ns: u64| ns as f64 / 1e6;
        let head = t.response_head.unwrap_or(t.response_done);
        let url = format!(
            "{}://{}{}",
            e.request.scheme.as_str(),
            e.request.authority,
            e.request.target
        );
        let query_string = e
            .request
            .target
            .split_once('?')
            .map(|(_, q)| {
                q.split('&')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (n, v) = p.split_once('=').unwrap_or((p, ""));
                        NameValue {
                            name: n.to_string(),
                            value: v.to_string(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (text, encoding, comment) = self.body_text(&e.request.body);
        let post_data = (e.request.body.len > 0).then(|| PostData {
            mime_type: e
                .request
                .headers
                .get_str("content-type")
                .unwrap_or("")
                .to_string(),
            text,
            encoding,
            comment,
        });
        let (response, error) = match &e.response {
            Ok(r) => {
                let (text, encoding, comment) = self.body_text(&r.body);
                (
                    Response {
                        status: r.status as i64,
                        status_text: String::new(),
                        http_version: r.version.as_str().to_string(),
                        headers: name_values(&r.headers),
                        cookies: Vec::new(),
                        content: Content {
                            size: r.body.len as i64,
                            mime_type: r.headers.get_str("content-type").unwrap_or("").to_string(),
                            text,
                            encoding,
                            comment,
                        },
                        redirect_url: r.headers.get_str("location").unwrap_or("").to_string(),
                        headers_size: -1,
                        body_size: r.body.len as i64,
                    },
                    None,
                )
            }
            Err(f) => (
                Response {
                    status: 0,
                    status_text: String::new(),
                    http_version: String::new(),
                    headers: Vec::new(),
                    cookies: Vec::new(),
                    content: Content::default(),
                    redirect_url: String::new(),
                    headers_size: -1,
                    body_size: -1,
                },
                Some(format!("{}: {}", f.kind.as_str(), f.detail)),
            ),
        };
        Entry {
            started: started.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            time: ms(t.response_done),
            request: Request {
                method: e.request.method.to_string(),
                url,
                http_version: e.request.version.as_str().to_string(),
                headers: name_values(&e.request.headers),
                query_string,
                cookies: Vec::new(),
                headers_size: -1,
                body_size: e.request.body.len as i64,
                post_data,
            },
            response,
            timings: Some(Timings {
                blocked: -1.0,
                dns: -1.0,
                connect: -1.0,
                ssl: -1.0,
                send: ms(t.request_done),
                wait: ms(head.saturating_sub(t.request_done)),
                receive: ms(t.response_done.saturating_sub(head)),
            }),
            connection: Some(serde_json::Value::String(e.connection.to_string())),
            server_ip: None,
            cache: serde_json::json!({}),
            error,
            comment: Some(format!("loadtape exchange {}", e.id)),
        }
    }

    /// HAR text, encoding and comment of a body: whole bodies as text (base64 when binary),
    /// prefixes and bodies not kept said so in the comment.
    fn body_text(&self, body: &Body) -> (Option<String>, Option<String>, Option<String>) {
        let bytes: Option<&[u8]> = match &body.stored {
            Stored::Prefix(p) => Some(p),
            Stored::Full(sha) => self.blobs.get(sha).map(|v| v.as_slice()),
            Stored::None => None,
        };
        let comment = match &body.stored {
            Stored::None if body.len > 0 => {
                Some(format!("body of {} bytes not kept on the tape", body.len))
            }
            Stored::Prefix(p) if (p.len() as u64) < body.len => Some(format!(
                "first {} of {} bytes kept on the tape",
                p.len(),
                body.len
            )),
            Stored::Full(_) if bytes.is_none() => {
                Some(format!("body of {} bytes in a blob not exported", body.len))
            }
            _ => None,
        };
        match bytes {
            None => (None, None, comment),
            Some(b) => match std::str::from_utf8(b) {
                Ok(s) => (Some(s.to_string()), None, comment),
                Err(_) => (
                    Some(base64::engine::general_purpose::STANDARD.encode(b)),
                    Some("base64".into()),
                    comment,
                ),
            },
        }
    }
}

fn name_values(headers: &Headers) -> Vec<NameValue> {
    headers
        .iter()
        .map(|(n, v)| NameValue {
            name: n.to_string(),
            value: v.to_text().into_owned(),
        })
        .collect()
}
