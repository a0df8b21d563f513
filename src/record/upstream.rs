//! The way to the upstream.
//!
//! An HTTP/1.1 client connection sends one request at a time, so it gets an upstream connection
//! of its own ([`Dedicated`]): opened on its first request, kept while both stay open, closed
//! with it. The upstream then sees the connections the clients made, one for one, and a request
//! costs no pool checkout, no pool key and no absolute URI. A request that the upstream
//! connection never took (the upstream closed it while idle) is sent again on a fresh one, as a
//! pooled client does.
//!
//! HTTP/2 client connections (many streams at once), https upstreams and `--upstream-h2c` go
//! through hyper's pooled client instead, which speaks TLS, ALPN and HTTP/2.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, Sleep};

use super::forward::ProxyBody;

/// How long opening an upstream connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An upstream connection idle this long may be closed by the upstream (gunicorn, in front of
/// Quay, keeps idle connections 2 s) just as the next request goes out on it.
const MAY_BE_CLOSING: Duration = Duration::from_millis(500);

/// The upstream connection of one HTTP/1.1 client connection, and the timer of its requests'
/// `--upstream-timeout`, while it is not sending. One timer serves every request: pushing a
/// registered timer's deadline later costs an atomic store, where a timer per request costs a
/// registration and a removal in the runtime's timer wheel.
#[derive(Default)]
pub struct Dedicated(Mutex<Held>);

#[derive(Default)]
struct Held {
    sender: Option<SendRequest<ProxyBody>>,
    timer: Option<Pin<Box<Sleep>>>,
    /// When the last request's response head came (its body may have streamed for a while).
    last_used: Option<Instant>,
}

impl Dedicated {
    fn take(&self) -> Held {
        self.0
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default()
    }

    fn put(&self, held: Held) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = held;
        }
    }
}

/// Why a request got no response from the upstream.
#[derive(Debug)]
pub enum SendError {
    Connect(std::io::Error),
    Http(hyper::Error),
    /// From the pooled client.
    Pooled(hyper_util::client::legacy::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "cannot connect: {e}"),
            SendError::Http(e) => e.fmt(f),
            SendError::Pooled(e) => e.fmt(f),
        }
    }
}

impl StdError for SendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            SendError::Connect(e) => Some(e),
            SendError::Http(e) => Some(e),
            SendError::Pooled(e) => e.source(),
        }
    }
}

/// Sends `request` on `dedicated`'s connection to `upstream` (`host:port`), opening one if it
/// has none or the one it had closed. `None` when no response head came within `timeout`.
pub async fn send(
    dedicated: &Dedicated,
    upstream: &str,
    request: http::Request<ProxyBody>,
    timeout: Duration,
) -> Option<Result<http::Response<Incoming>, SendError>> {
    let Held {
        mut sender,
        timer,
        last_used,
    } = dedicated.take();
    let now = Instant::now();
    let may_be_closing = last_used.is_some_and(|t| now.duration_since(t) >= MAY_BE_CLOSING);
    // A timeout too large to add (someone meaning "never"): a deadline decades away.
    let deadline = now
        .checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400));
    let mut timer = match timer {
        Some(mut t) => {
            t.as_mut().reset(deadline);
            t
        }
        None => Box::pin(tokio::time::sleep_until(deadline)),
    };
    let sent = tokio::select! {
        biased;
        sent = exchange(&mut sender, upstream, request, may_be_closing) => Some(sent),
        _ = timer.as_mut() => None,
    };
    dedicated.put(Held {
        sender,
        timer: Some(timer),
        last_used: Some(Instant::now()),
    });
    sent
}

/// What it takes to send a request again: its head (a request that may be resent has no body).
struct Spare {
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
}

impl Spare {
    /// A copy of `request` if it could be sent twice: idempotent (RFC 9110, 9.2.2) and bodiless.
    fn of(request: &http::Request<ProxyBody>) -> Option<Spare> {
        use hyper::body::Body as _;
        let idempotent = matches!(
            *request.method(),
            http::Method::GET
                | http::Method::HEAD
                | http::Method::OPTIONS
                | http::Method::PUT
                | http::Method::DELETE
        );
        (idempotent && request.body().is_end_stream()).then(|| Spare {
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
        })
    }

    fn request(self) -> http::Request<ProxyBody> {
        let mut request = http::Request::new(ProxyBody::Local(None));
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.headers_mut() = self.headers;
        request
    }
}

/// Whether the connection was lost before any of the response came: the upstream had closed it
/// (a reset, or the end of the stream where a response head should be).
fn lost_before_answer(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = StdError::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted);
        }
        source = s.source();
    }
    false
}

/// Sends `request` on `sender`, or on a fresh connection left in `sender`. On a connection that
/// `may_be_closing`, an idempotent bodiless request lost with it before any answer is sent again
/// on a fresh one, as nginx does (`proxy_next_upstream error`): the client never sees the race.
async fn exchange(
    sender: &mut Option<SendRequest<ProxyBody>>,
    upstream: &str,
    request: http::Request<ProxyBody>,
    may_be_closing: bool,
) -> Result<http::Response<Incoming>, SendError> {
    let mut request = request;
    let mut reused = sender.take().filter(|s| !s.is_closed());
    loop {
        let was_reused = reused.is_some();
        let spare = (was_reused && may_be_closing)
            .then(|| Spare::of(&request))
            .flatten();
        let mut fresh = match reused.take() {
            Some(s) => s,
            None => connect(upstream).await?,
        };
        if let Err(e) = fresh.ready().await {
            if was_reused {
                continue;
            }
            return Err(SendError::Http(e));
        }
        match fresh.try_send_request(request).await {
            Ok(response) => {
                // The response's body may still be coming; the next request waits for it in
                // `ready`.
                *sender = Some(fresh);
                return Ok(response);
            }
            Err(mut e) => match (e.take_message(), spare) {
                // Never taken by a connection that had served before: the upstream closed it
                // while idle. Once more on a fresh one.
                (Some(unsent), _) if was_reused => request = unsent,
                (None, Some(spare)) if lost_before_answer(e.error()) => {
                    tracing::debug!(
                        "upstream closed an idle connection under a request; resending it"
                    );
                    request = spare.request();
                }
                _ => return Err(SendError::Http(e.into_error())),
            },
        }
    }
}

async fn connect(upstream: &str) -> Result<SendRequest<ProxyBody>, SendError> {
    let stream =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(upstream)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SendError::Connect(e)),
            Err(_) => {
                return Err(SendError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {CONNECT_TIMEOUT:?}"),
                )))
            }
        };
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(SendError::Http)?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!("upstream connection ended: {e}");
        }
    });
    Ok(sender)
}
