//! A registry-shaped server that wants tokens, as Quay's registry API does: `/v2/auth` issues a
//! fresh token (its own, never the one a recording saw) for Basic `alice:secret`; every other
//! path answers 401 with a `WWW-Authenticate` realm unless a token it issued comes as Bearer.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;

pub const USER: &str = "alice";
pub const PASSWORD: &str = "secret";

pub struct TokenRegistry {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for TokenRegistry {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct State {
    addr: SocketAddr,
    issued: Mutex<HashSet<String>>,
    next: Mutex<u64>,
}

fn reply(status: u16, body: &str) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn answer(
    state: Arc<State>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    use base64::Engine as _;
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if req.uri().path() == "/v2/auth" {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
        );
        if auth != expected {
            return Ok(reply(401, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#));
        }
        let token = {
            let mut n = state.next.lock().unwrap();
            *n += 1;
            format!("tok-{}-{}", state.addr.port(), *n)
        };
        state.issued.lock().unwrap().insert(token.clone());
        return Ok(reply(200, &format!(r#"{{"token": "{token}"}}"#)));
    }
    let valid = auth
        .strip_prefix("Bearer ")
        .is_some_and(|t| state.issued.lock().unwrap().contains(t));
    if !valid {
        let mut r = reply(401, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
        r.headers_mut().insert(
            "www-authenticate",
            format!(
                r#"Bearer realm="http://{}/v2/auth",service="{}""#,
                state.addr, state.addr
            )
            .parse()
            .unwrap(),
        );
        return Ok(r);
    }
    Ok(reply(200, r#"{"schemaVersion": 2}"#))
}

pub async fn token_registry() -> TokenRegistry {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let state = Arc::new(State {
        addr,
        issued: Mutex::new(HashSet::new()),
        next: Mutex::new(0),
    });
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => a.unwrap(),
                _ = stopped.cancelled() => return,
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(state.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    TokenRegistry { addr, stop }
}
