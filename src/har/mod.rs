//! HAR 1.2, the traffic format of browsers, mitmproxy and Charles: import into tapes, export
//! out of them, so users bring what they already have and inspect tapes with what they already
//! use.
//!
//! The model is lenient on input, since real producers leave out fields the spec calls
//! required (timings, sizes, `postData.mimeType`) or add their own (`connection`, `_error`).

mod export;
mod import;

pub use export::HarExporter;
pub use import::{
    default_out, har_to_records, import, import_bytes, Converted, ImportOptions, ImportSummary,
};

use serde::{Deserialize, Serialize};

/// The built-in session: real Quay v3.18 and Clair v4.9.0 traffic captured through mitmproxy
/// (see `captures/har/`), used by the demo, the benchmarks and the tests.
pub const BUILTIN_SESSIONS: &[(&str, &[u8])] = &[
    (
        "quay-session.har",
        include_bytes!("../../captures/har/quay-session.har"),
    ),
    (
        "clair-session.har",
        include_bytes!("../../captures/har/clair-session.har"),
    ),
];

#[derive(Debug, Serialize, Deserialize)]
pub struct Har {
    pub log: Log,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Log {
    #[serde(default = "default_version")]
    pub version: String,
    #[serde(default)]
    pub creator: Creator,
    #[serde(default)]
    pub entries: Vec<Entry>,
}

fn default_version() -> String {
    "1.2".into()
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Creator {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub version: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Entry {
    #[serde(rename = "startedDateTime")]
    pub started: String,
    /// Total time in ms.
    #[serde(default)]
    pub time: f64,
    pub request: Request,
    pub response: Response,
    #[serde(default)]
    pub timings: Option<Timings>,
    /// Connection id (non-standard, written by browsers and mitmproxy; string or number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<serde_json::Value>,
    #[serde(
        rename = "serverIPAddress",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub server_ip: Option<String>,
    #[serde(default)]
    pub cache: serde_json::Value,
    /// Chrome's reason for a failed request.
    #[serde(rename = "_error", default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub method: String,
    pub url: String,
    #[serde(rename = "httpVersion", default)]
    pub http_version: String,
    #[serde(default)]
    pub headers: Vec<NameValue>,
    #[serde(rename = "queryString", default)]
    pub query_string: Vec<NameValue>,
    #[serde(default)]
    pub cookies: Vec<serde_json::Value>,
    #[serde(rename = "headersSize", default = "minus_one")]
    pub headers_size: i64,
    #[serde(rename = "bodySize", default = "minus_one")]
    pub body_size: i64,
    #[serde(rename = "postData", default, skip_serializing_if = "Option::is_none")]
    pub post_data: Option<PostData>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PostData {
    #[serde(rename = "mimeType", default)]
    pub mime_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Not in HAR 1.2, but written by some producers for binary bodies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    #[serde(default)]
    pub status: i64,
    #[serde(rename = "statusText", default)]
    pub status_text: String,
    #[serde(rename = "httpVersion", default)]
    pub http_version: String,
    #[serde(default)]
    pub headers: Vec<NameValue>,
    #[serde(default)]
    pub cookies: Vec<serde_json::Value>,
    #[serde(default)]
    pub content: Content,
    #[serde(rename = "redirectURL", default)]
    pub redirect_url: String,
    #[serde(rename = "headersSize", default = "minus_one")]
    pub headers_size: i64,
    #[serde(rename = "bodySize", default = "minus_one")]
    pub body_size: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Content {
    #[serde(default = "minus_one")]
    pub size: i64,
    #[serde(rename = "mimeType", default)]
    pub mime_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NameValue {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

/// Phase durations in ms; -1 (or absent) where not applicable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timings {
    #[serde(default = "minus_one_f")]
    pub blocked: f64,
    #[serde(default = "minus_one_f")]
    pub dns: f64,
    #[serde(default = "minus_one_f")]
    pub connect: f64,
    #[serde(default = "minus_one_f")]
    pub ssl: f64,
    #[serde(default)]
    pub send: f64,
    #[serde(default)]
    pub wait: f64,
    #[serde(default)]
    pub receive: f64,
}

fn minus_one() -> i64 {
    -1
}

fn minus_one_f() -> f64 {
    -1.0
}
