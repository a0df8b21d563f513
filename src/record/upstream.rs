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
    let Held { sender, timer } = dedicated.take();
    let now = Instant::now();
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
    let mut sender = sender;
    let sent = tokio::select! {
        biased;
        sent = exchange(&mut sender, upstream, request) => Some(sent),
        _ = timer.as_mut() => None,
    };
    dedicated.put(Held {
        sender,
        timer: Some(timer),
    });
    sent
}

/// Sends `request` on `sender`, or on a fresh connection left in `sender`.
async fn exchange(
    sender: &mut Option<SendRequest<ProxyBody>>,
    upstream: &str,
    request: http::Request<ProxyBody>,
) -> Result<http::Response<Incoming>, SendError> {
    let mut request = request;
    let mut reused = sender.take().filter(|s| !s.is_closed());
    loop {
        let was_reused = reused.is_some();
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
            Err(mut e) => match e.take_message() {
                // Never taken by a connection that had served before: the upstream closed it
                // while idle. Once more on a fresh one.
                Some(unsent) if was_reused => request = unsent,
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
