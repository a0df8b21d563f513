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
use std::sync::Mutex;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::forward::ProxyBody;

/// How long opening an upstream connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The upstream connection of one HTTP/1.1 client connection, while it is not sending.
#[derive(Default)]
pub struct Dedicated(Mutex<Option<SendRequest<ProxyBody>>>);

impl Dedicated {
    fn take(&self) -> Option<SendRequest<ProxyBody>> {
        self.0.lock().ok()?.take()
    }

    fn put(&self, sender: SendRequest<ProxyBody>) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(sender);
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
/// has none or the one it had closed.
pub async fn send(
    dedicated: &Dedicated,
    upstream: &str,
    request: http::Request<ProxyBody>,
) -> Result<http::Response<Incoming>, SendError> {
    let mut request = request;
    let mut reused = dedicated.take().filter(|s| !s.is_closed());
    loop {
        let was_reused = reused.is_some();
        let mut sender = match reused.take() {
            Some(s) => s,
            None => connect(upstream).await?,
        };
        if let Err(e) = sender.ready().await {
            if was_reused {
                continue;
            }
            return Err(SendError::Http(e));
        }
        match sender.try_send_request(request).await {
            Ok(response) => {
                // The response's body may still be coming; the next request waits for it in
                // `ready`.
                dedicated.put(sender);
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
