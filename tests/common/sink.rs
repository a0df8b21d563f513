//! A replay target for tests: stamps every request's arrival in microseconds, answers at once
//! unless told to stall, and redirects where asked. Shapes no real server here gives (a stall
//! at a chosen moment, arrival stamps), beside the real registry the other tests use.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;

/// One request as the sink saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub version: http::Version,
    /// Which accepted connection it came on (from 1).
    pub connection: u64,
    pub headers: http::HeaderMap,
    pub body_len: usize,
    pub body_sha256: [u8; 32],
}

/// What the sink does besides answering 200 at once.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Requests for `/r/N` with N in this range are held until `hold` after the first of them
    /// arrived: a target that stalls for a while.
    pub stall: Option<(std::ops::Range<u64>, Duration)>,
    /// `/redirect` answers 307 to this URL.
    pub redirect_to: Option<String>,
    /// `/state` answers with this ETag, or 304 to an `If-None-Match` carrying it (as Clair's
    /// index state does).
    pub etag: Option<String>,
    /// Requests whose path contains this text answer this much later: one endpoint class of
    /// the target slower than the others.
    pub delay: Option<(String, Duration)>,
}

pub struct Sink {
    pub addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    pub connections: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Sink {
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }
}

/// `/r/N` -> N.
pub fn id_of(path: &str) -> Option<u64> {
    path.strip_prefix("/r/")?.parse().ok()
}

struct State {
    behaviour: Behaviour,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stall_until: Mutex<Option<Instant>>,
}

async fn answer(
    state: Arc<State>,
    connection: u64,
    req: http::Request<Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body_len = body.len();
    let body_sha256: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&body).into();
    let path = parts.uri.path().to_string();
    state.arrivals.lock().unwrap().push(Arrival {
        at,
        method: parts.method.to_string(),
        path: path.clone(),
        version: parts.version,
        connection,
        headers: parts.headers.clone(),
        body_len,
        body_sha256,
    });
    if let (Some((range, hold)), Some(id)) = (&state.behaviour.stall, id_of(&path)) {
        if range.contains(&id) {
            let until = *state.stall_until.lock().unwrap().get_or_insert(at + *hold);
            tokio::time::sleep_until(until.into()).await;
        }
    }
    if let Some((part, delay)) = &state.behaviour.delay {
        if path.contains(part.as_str()) {
            tokio::time::sleep(*delay).await;
        }
    }
    if let (Some(etag), "/state") = (&state.behaviour.etag, path.as_str()) {
        let matches = parts
            .headers
            .get("if-none-match")
            .is_some_and(|v| v.as_bytes() == etag.as_bytes());
        return Ok(http::Response::builder()
            .status(if matches { 304 } else { 200 })
            .header("etag", etag.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    if path == "/redirect" {
        if let Some(to) = &state.behaviour.redirect_to {
            return Ok(http::Response::builder()
                .status(307)
                .header("location", to)
                .body(Full::new(Bytes::new()))
                .unwrap());
        }
    }
    Ok(http::Response::new(Full::new(Bytes::from_static(b"ok\n"))))
}

/// A sink on a free loopback port, speaking HTTP/1.1 and h2c (prior knowledge); with `tls`
/// (certificate and key PEM), HTTPS with ALPN instead.
pub async fn sink(behaviour: Behaviour, tls: Option<(&[u8], &[u8])>) -> Sink {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let state = Arc::new(State {
        behaviour,
        arrivals: arrivals.clone(),
        stall_until: Mutex::new(None),
    });
    let acceptor = tls.map(|(cert, key)| {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let (stopped, counted) = (stop.clone(), connections.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => a.unwrap(),
                _ = stopped.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            let connection = counted.fetch_add(1, Ordering::SeqCst) + 1;
            let state = state.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(state.clone(), connection, req));
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match acceptor {
                    Some(a) => {
                        if let Ok(tls) = a.accept(stream).await {
                            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    Sink {
        addr,
        arrivals,
        connections,
        stop,
    }
}

/// Counts connections accepted on a port, answering nothing: where a redirect points, to
/// prove nothing is sent there.
pub struct Witness {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn witness() -> Witness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let (counted, stopped) = (accepted.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                a = listener.accept() => { if a.is_ok() { counted.fetch_add(1, Ordering::SeqCst); } }
                _ = stopped.cancelled() => return,
            }
        }
    });
    Witness {
        addr,
        accepted,
        stop,
    }
}
