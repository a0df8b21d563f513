//! The testbed: an in-memory Quay-like registry, Quay API v1 and Clair v4 on one loopback port.
//!
//! Tests, `loadtape demo` and benchmarks all need something that answers like Quay and Clair do
//! on the wire: token challenges, upload sessions whose `Location` and `_state` change per
//! request, manifests that must reference known blobs, ETags that differ from any recording's,
//! and a Clair that fetches every layer it is asked to index. One imitation lives here so that
//! they all replay against the same behaviour instead of ad-hoc fakes. It works at the protocol
//! level only: no storage, no database, no real scanning (index reports are small and synthetic).
//!
//! The path spaces do not overlap, so one server answers them all: `/v2/...` (`registry.rs`),
//! `/api/v1/...` (`quay_api.rs`), `/indexer/...` and `/matcher/...` (`clair.rs`). Everything is
//! held in one `store::Store` behind a lock that no handler holds across an await.

mod clair;
pub mod driver;
mod quay_api;
mod registry;
pub mod shape;
mod store;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hmac::Mac;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

use crate::tape::digest_string;
use store::Store;

/// How the registry (`/v2/...`) wants clients to authenticate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RegistryAuth {
    /// Quay's way: a 401 challenge names `/v2/auth`, which trades Basic credentials for a
    /// Bearer token.
    #[default]
    Token,
    /// Basic credentials on every request, as a plain `docker-registry` with htpasswd.
    Basic,
    /// No authentication at all.
    None,
}

/// What the testbed accepts. `Config::default()` is a token-mode registry with no accounts, no
/// API tokens and an open Clair.
#[derive(Debug, Clone)]
pub struct Config {
    /// Registry accounts (user, password): Basic on `/v2/auth` (token mode) or on every `/v2`
    /// request (basic mode).
    pub accounts: Vec<(String, String)>,
    pub registry_auth: RegistryAuth,
    /// Quay API v1 OAuth bearer tokens accepted on `/api/v1/*` (and as `$oauthtoken` passwords
    /// on `/v2/auth`, as Quay accepts them).
    pub api_tokens: Vec<String>,
    /// Clair PSK (raw key bytes) for HS256 JWTs; `None` = Clair paths need no auth.
    pub clair_psk: Option<Vec<u8>>,
    /// Issuers Clair accepts.
    pub clair_issuers: Vec<String>,
    /// Whether Clair checks a fetched layer's sha256 against the hash it was asked to index,
    /// as Clair's fetcher does. Off only for recordings that did not keep the layers' bytes
    /// (the shared Clair fixture): the fetch itself still has to succeed.
    pub clair_verify_layers: bool,
    /// Latency, stalls and error bursts per endpoint class (`shape.rs`); none by default.
    pub shape: shape::Shape,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            accounts: Vec::new(),
            registry_auth: RegistryAuth::Token,
            api_tokens: Vec::new(),
            clair_psk: None,
            clair_issuers: vec!["quay".to_string()],
            clair_verify_layers: true,
            shape: shape::Shape::default(),
        }
    }
}

/// The account, API token and Clair key of [`Config::standard`]: what `loadtape testbed`
/// accepts, and what `loadtape drive` and the demo send.
pub const USER: &str = "demo";
pub const PASSWORD: &str = "demo-password";
pub const API_TOKEN: &str = "demo-oauth-token";
pub const PSK: &[u8] = b"demo clair pre-shared key";

impl Config {
    /// A testbed with the standard account, API token and Clair key, and `shape`.
    pub fn standard(shape: shape::Shape) -> Config {
        Config {
            accounts: vec![(USER.into(), PASSWORD.into())],
            api_tokens: vec![API_TOKEN.into()],
            clair_psk: Some(PSK.to_vec()),
            shape,
            ..Config::default()
        }
    }
}

/// A running testbed on `addr` (127.0.0.1, a free port); it stops serving, open connections
/// included, when dropped.
pub struct Testbed {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Testbed {
    /// Binds 127.0.0.1:0 and serves HTTP/1.1 and h2c; call inside a tokio runtime.
    pub async fn start(config: Config) -> std::io::Result<Testbed> {
        Testbed::start_on("127.0.0.1:0".parse().expect("an address"), config).await
    }

    /// The same on a chosen address (`loadtape testbed --listen`).
    pub async fn start_on(listen: SocketAddr, config: Config) -> std::io::Result<Testbed> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let mut fetch = HttpConnector::new();
        fetch.set_connect_timeout(Some(clair::FETCH_TIMEOUT));
        config
            .shape
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let shared = Arc::new(Shared {
            shaping: shape::Shaping::new(config.shape.clone()),
            config,
            addr,
            key: random(),
            index_state: crate::tape::hex(&random::<16>()),
            store: Mutex::new(Store::default()),
            served: Mutex::new(BTreeMap::new()),
            fetcher: Client::builder(TokioExecutor::new()).build(fetch),
            indexing: Mutex::new(BTreeMap::new()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, shared.clone(), stop.clone()));
        Ok(Testbed { addr, shared, stop })
    }

    /// Content the "recorded server held before the recording began": serves it as a blob by
    /// its sha256 digest, from any repository. Returns `sha256:<hex>`.
    pub fn preload_blob(&self, bytes: Bytes) -> String {
        let digest = sha256(&bytes);
        self.shared.store().blobs.insert(digest.clone(), bytes);
        digest
    }

    /// Requests answered so far, by endpoint class (`crate::endpoint::template`, e.g.
    /// `PUT /v2/{repo}/blobs/uploads/{uuid}`) and status. Bounded by the number of classes,
    /// so a long benchmark does not grow it.
    pub fn served(&self) -> BTreeMap<(String, u16), u64> {
        lock(&self.shared.served).clone()
    }

    /// How many requests of `endpoint` it answered with `status`.
    pub fn served_count(&self, endpoint: &str, status: u16) -> u64 {
        lock(&self.shared.served)
            .get(&(endpoint.to_string(), status))
            .copied()
            .unwrap_or(0)
    }
}

/// What every handler shares.
struct Shared {
    config: Config,
    addr: SocketAddr,
    /// Signs registry tokens and upload `_state`s. Random per instance, so that tokens and
    /// upload locations from a recording (or another testbed) never validate here.
    key: [u8; 32],
    /// Clair's index state: random per instance, so it differs from any recording's.
    index_state: String,
    store: Mutex<Store>,
    served: Mutex<BTreeMap<(String, u16), u64>>,
    /// Clair's layer fetches (plain HTTP only, as the testbed serves).
    fetcher: Client<HttpConnector, Full<Bytes>>,
    shaping: shape::Shaping,
    /// One index of a manifest at a time, as Clair's indexer locks a manifest: a second
    /// request for it waits, then finds the report.
    indexing: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// The lock of a manifest's index (see `indexing`).
    fn index_lock(&self, manifest: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.indexing)
            .entry(manifest.to_string())
            .or_default()
            .clone()
    }

    /// `what`, signed with the instance key (base64url, no padding).
    fn sign(&self, what: &str) -> String {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key)
            .expect("HMAC takes keys of any length");
        mac.update(what.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }
}

/// A lock whose holder panicked is still consistent here (every critical section is a few map
/// operations), so poisoning is ignored rather than failing every later request.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn accept(listener: tokio::net::TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: back off rather than spin.
                    tracing::warn!("testbed cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(shared.clone(), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// A request with its body read whole: the testbed keeps everything in memory anyway.
struct Request {
    method: Method,
    path: String,
    /// The raw query string, without `?`.
    query: String,
    headers: HeaderMap,
    /// The authority the client addressed (Host header, or the URI's under HTTP/2), for the
    /// absolute URLs Quay hands out; the listening address when it sent none.
    host: String,
    body: Bytes,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Query parameter `name`, percent-decoded.
    fn query(&self, name: &str) -> Option<String> {
        self.query
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| crate::percent::decode(v))
    }

    fn bearer(&self) -> Option<&str> {
        self.header("authorization")?.strip_prefix("Bearer ")
    }
}

type Reply = http::Response<Full<Bytes>>;

async fn answer(shared: Arc<Shared>, req: http::Request<Incoming>) -> Result<Reply, Infallible> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Ok(empty(StatusCode::BAD_REQUEST));
    };
    let host = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            let host = parts.headers.get(http::header::HOST)?;
            host.to_str().ok().map(str::to_string)
        })
        .unwrap_or_else(|| shared.addr.to_string());
    let request = Request {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts.headers,
        host,
        body,
    };
    let endpoint = crate::endpoint::template(request.method.as_str(), &request.path);
    // The shape: this class's latency (and stall), or a 502 of a burst.
    let verdict = shared.shaping.judge(&endpoint);
    if let Some(status) = verdict.fail {
        let reply = with_body(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            "text/html",
            Bytes::from_static(b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"),
        );
        *lock(&shared.served).entry((endpoint, status)).or_default() += 1;
        return Ok(reply);
    }
    if !verdict.delay.is_zero() {
        tokio::time::sleep(verdict.delay).await;
    }
    let path = request.path.as_str();
    let mut reply = if let Some(digest) = path.strip_prefix("/_storage/") {
        // Object storage, as a presigned URL reaches it: no registry auth. Quay hands such URLs
        // to Clair for the layers to index.
        registry::stored_blob(&shared, digest)
    } else if path == "/v2" || path.starts_with("/v2/") {
        registry::answer(&shared, &request)
    } else if path.starts_with("/api/v1/") {
        quay_api::answer(&shared, &request)
    } else if path.starts_with("/indexer/") || path.starts_with("/matcher/") {
        clair::answer(&shared, &request).await
    } else {
        empty(StatusCode::NOT_FOUND)
    };
    if request.method == Method::HEAD {
        // Handlers answer HEAD as GET; the length stays, the body goes.
        let len = reply.body().size_hint().exact().unwrap_or(0);
        let length = reply.headers_mut().entry(http::header::CONTENT_LENGTH);
        length.or_insert_with(|| len.into());
        *reply.body_mut() = Full::default();
    }
    *lock(&shared.served)
        .entry((endpoint, reply.status().as_u16()))
        .or_default() += 1;
    Ok(reply)
}

fn empty(status: StatusCode) -> Reply {
    let mut reply = Reply::new(Full::new(Bytes::new()));
    *reply.status_mut() = status;
    reply
}

fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    with_body(status, "application/json", Bytes::from(value.to_string()))
}

fn with_body(status: StatusCode, content_type: &str, body: Bytes) -> Reply {
    let mut reply = Reply::new(Full::new(body));
    *reply.status_mut() = status;
    headed(reply, &[("content-type", content_type)])
}

/// `reply` with headers the testbed made; a value that is no valid header value is left out.
fn headed(mut reply: Reply, headers: &[(&'static str, &str)]) -> Reply {
    for (name, value) in headers {
        if let Ok(value) = http::HeaderValue::from_str(value) {
            reply.headers_mut().insert(*name, value);
        }
    }
    reply
}

fn sha256(bytes: &[u8]) -> String {
    digest_string(&sha2::Sha256::digest(bytes).into())
}

/// `sha256:` and 64 lowercase hex digits: the only digests the testbed stores.
fn is_sha256(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// A random version-4 UUID, as Quay names upload sessions and builds.
fn uuid() -> String {
    let mut b = random::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = crate::tape::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// splitmix64's finaliser: the testbed's seeded dice (`shape.rs`, `driver.rs`) stir with it.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS provides random bytes");
    bytes
}

/// Whether an `If-None-Match` header names `tag` (quoted or not, weak or strong).
fn if_none_match(req: &Request, tag: &str) -> bool {
    req.header("if-none-match").is_some_and(|v| {
        v.split(',')
            .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
            .any(|t| t == tag)
    })
}
