//! Accepting clients: TCP, TLS termination (rustls, ALPN `h2` and `http/1.1`), and HTTP/1.1 or
//! HTTP/2 on each connection until told to stop; then in-flight exchanges get the drain timeout
//! to finish. HTTP/1.1 is served by the recorder's own loop ([`super::h1`]); HTTP/2 by ALPN goes
//! to hyper, and so does a connection the loop hands over (h2c by prior knowledge, a protocol
//! switch, CONNECT).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::exchange::{close_reason, Capture};
use super::forward::Proxy;
use super::h1::{self, ClientIo, InBody, Served, Serving};
use super::head_timer::{self, HeadTimer};
use super::RecordConfig;
use crate::tape::{HttpVersion, TlsInfo};

/// The bound listening socket, with its TLS settings.
pub struct Listener {
    tcp: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
}

impl Listener {
    pub async fn bind(config: &RecordConfig) -> anyhow::Result<Listener> {
        let tls = match &config.tls {
            Some((cert, key)) => Some(TlsAcceptor::from(Arc::new(server_tls(cert, key)?))),
            None => None,
        };
        let tcp = std::net::TcpListener::bind(config.listen)
            .with_context(|| format!("cannot listen on --listen {}", config.listen))?;
        tcp.set_nonblocking(true)
            .context("cannot make the listening socket non-blocking")?;
        Ok(Listener {
            tcp,
            tls,
            header_read_timeout: config.header_read_timeout,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.tcp
            .local_addr()
            .expect("a bound socket has an address")
    }

    /// Serves connections on `threads` threads, each with its own single-threaded runtime,
    /// upstream client and capture (`make_proxy` of the thread's index), until `stop`; then
    /// each waits up to `drain` for its connections to finish. A connection, its exchanges and
    /// their upstream connections stay on one thread: no wake-up crosses threads on the request
    /// path, and what they count and record is the thread's own.
    ///
    /// Every thread accepts, but connections are dealt round-robin: the n-th accepted goes to
    /// thread n mod `threads`, handed over if another thread took it from the socket. Left to
    /// the kernel, whichever thread wakes first takes a burst of connections (a load generator
    /// opening 64 at once), and one core serves them all while the other idles.
    pub fn serve(
        self,
        threads: usize,
        make_proxy: impl Fn(usize) -> anyhow::Result<Arc<Proxy>>,
        stop: CancellationToken,
        drain: Duration,
    ) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
        let threads = threads.max(1);
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..threads)
            .map(|_| tokio::sync::mpsc::unbounded_channel())
            .unzip();
        let deal = Arc::new(Deal {
            next: AtomicUsize::new(0),
            threads: senders,
        });
        let mut handles = Vec::with_capacity(threads);
        for (i, handed) in receivers.into_iter().enumerate() {
            let tcp = self
                .tcp
                .try_clone()
                .context("cannot share the listening socket")?;
            let proxy = make_proxy(i)?;
            let one = OneThread {
                index: i,
                deal: deal.clone(),
                handed,
                tls: self.tls.clone(),
                header_read_timeout: self.header_read_timeout,
                capture: proxy.capture().clone(),
                proxy,
                stop: stop.clone(),
                drain,
            };
            let handle = std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a single-threaded runtime starts");
                    runtime.block_on(async move {
                        match TcpListener::from_std(tcp) {
                            Ok(tcp) => one.serve(tcp).await,
                            Err(e) => tracing::error!("cannot listen on this thread: {e}"),
                        }
                    });
                })
                .context("cannot start a proxy thread")?;
            handles.push(handle);
        }
        Ok(handles)
    }
}

/// How accepted connections are dealt to the proxy threads: round-robin, by the count of
/// connections accepted so far.
struct Deal {
    next: AtomicUsize,
    /// Each thread's inbox of connections another thread accepted for it.
    threads: Vec<UnboundedSender<(std::net::TcpStream, SocketAddr)>>,
}

impl Deal {
    /// Deals a connection accepted on thread `me`: returns it when it is `me`'s turn (or the
    /// thread whose turn it is has gone), hands it over otherwise.
    fn deal(&self, me: usize, stream: TcpStream, client: SocketAddr) -> Option<TcpStream> {
        let to = self.next.fetch_add(1, Ordering::Relaxed) % self.threads.len();
        if to == me {
            return Some(stream);
        }
        // Off this thread's reactor, onto that one's.
        let std = match stream.into_std() {
            Ok(std) => std,
            Err(e) => {
                tracing::warn!("cannot hand over a connection from {client}: {e}");
                return None;
            }
        };
        match self.threads[to].send((std, client)) {
            Ok(()) => None,
            Err(back) => adopt(back.0 .0, client),
        }
    }
}

/// A socket handed over from another thread, on this thread's reactor.
fn adopt(std: std::net::TcpStream, client: SocketAddr) -> Option<TcpStream> {
    TcpStream::from_std(std)
        .map_err(|e| tracing::warn!("cannot serve a connection from {client}: {e}"))
        .ok()
}

/// What one proxy thread needs.
struct OneThread {
    index: usize,
    deal: Arc<Deal>,
    handed: UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
    proxy: Arc<Proxy>,
    capture: Arc<Capture>,
    stop: CancellationToken,
    drain: Duration,
}

impl OneThread {
    async fn serve(self, tcp: TcpListener) {
        let OneThread {
            index,
            deal,
            mut handed,
            tls: self_tls,
            header_read_timeout,
            proxy,
            capture,
            stop,
            drain,
        } = self;
        proxy.count_bodies_here();
        let graceful = GracefulShutdown::new();
        // Every connection of this thread, however served, for the drain.
        let open = Arc::new(Open::default());
        // The header read timeouts of this thread's connections (see `head_timer`).
        tokio::spawn(head_timer::sweep(head_timer::tick(header_read_timeout)));
        // Serves one connection on this thread, under the graceful shutdown.
        let serve_one = |stream: TcpStream, client: SocketAddr| {
            (proxy.counts().connections).fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            let proxy = proxy.clone();
            let capture = capture.clone();
            let tls = self_tls.clone();
            let watcher = graceful.watcher();
            let stop = stop.clone();
            let holding = open.hold();
            tokio::spawn(async move {
                let _holding = holding;
                let (io, version, tls_info) = match tls {
                    None => (ClientIo::Plain(stream), HttpVersion::Http11, None),
                    Some(acceptor) => {
                        let accepted =
                            tokio::time::timeout(header_read_timeout, acceptor.accept(stream))
                                .await;
                        let stream = match accepted {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!("TLS handshake with {client} failed: {e}");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!("TLS handshake with {client} timed out");
                                return;
                            }
                        };
                        let (_, session) = stream.get_ref();
                        let alpn = session
                            .alpn_protocol()
                            .map(|p| String::from_utf8_lossy(p).into_owned());
                        let info = TlsInfo {
                            protocol: session
                                .protocol_version()
                                .and_then(|v| v.as_str())
                                .unwrap_or("TLS")
                                .to_string(),
                            server_name: session.server_name().map(str::to_string),
                            alpn: alpn.clone(),
                        };
                        let version = if alpn.as_deref() == Some("h2") {
                            HttpVersion::H2
                        } else {
                            HttpVersion::Http11
                        };
                        (ClientIo::Tls(Box::new(stream)), version, Some(info))
                    }
                };
                let connection = capture.connection_opened(client, version, tls_info);
                // HTTP/1.1 is served here; HTTP/2, protocol switches and CONNECT by hyper.
                let (io, read) = match version {
                    HttpVersion::H2 => (io, Bytes::new()),
                    _ => {
                        let serving = Serving {
                            proxy: proxy.clone(),
                            connection: connection.clone(),
                            header_read_timeout,
                            stop: stop.clone(),
                        };
                        match h1::serve(io, serving).await {
                            Served::HandOff(io, read) => (io, read),
                            Served::Closed(result) => {
                                if let Err(e) = &result {
                                    tracing::debug!("connection from {client} ended: {e}");
                                }
                                let reason = close_reason(result, stop.is_cancelled());
                                capture.connection_closed(&connection, reason);
                                return;
                            }
                        }
                    }
                };
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(HeadTimer)
                    .header_read_timeout(header_read_timeout);
                // HTTP/2 has no head to time: a client silent that long is pinged, and one that
                // does not answer as long is gone (a peer that vanished without a FIN would
                // otherwise hold its connection and streams forever).
                builder
                    .http2()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .keep_alive_interval(Some(header_read_timeout))
                    .keep_alive_timeout(header_read_timeout);
                let service = service(proxy, connection.clone());
                let io = TokioIo::new(h1::Rewind::new(io, read));
                let conn = builder.serve_connection_with_upgrades(io, service);
                let result = watcher.watch(conn).await.map_err(|e| e.to_string());
                if let Err(e) = &result {
                    tracing::debug!("connection from {client} ended: {e}");
                }
                capture.connection_closed(&connection, close_reason(result, stop.is_cancelled()));
            });
        };
        loop {
            let (stream, client) = tokio::select! {
                accepted = tcp.accept() => match accepted {
                    Ok((stream, client)) => match deal.deal(index, stream, client) {
                        Some(stream) => (stream, client),
                        None => continue,
                    },
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!("cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                Some((std, client)) = handed.recv() => match adopt(std, client) {
                    Some(stream) => (stream, client),
                    None => continue,
                },
                _ = stop.cancelled() => break,
            };
            serve_one(stream, client);
        }
        // Stop accepting; serve what another thread already handed over (a thread that has not
        // seen the stop yet finds this inbox closed and serves its connection itself).
        handed.close();
        while let Ok((std, client)) = handed.try_recv() {
            if let Some(stream) = adopt(std, client) {
                serve_one(stream, client);
            }
        }
        // Stop accepting; let what is in flight finish.
        drop(tcp);
        tokio::select! {
            _ = async { tokio::join!(graceful.shutdown(), open.all_closed()) } => {}
            _ = tokio::time::sleep(drain) => {
                tracing::warn!("in-flight exchanges did not finish within the drain timeout ({drain:?}); closing");
            }
        }
    }
}

fn service(
    proxy: Arc<Proxy>,
    connection: Arc<super::exchange::Connection>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<super::forward::ProxyBody>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<
        Output = Result<http::Response<super::forward::ProxyBody>, std::convert::Infallible>,
    > + Send,
> + Clone {
    // On HTTP/1.x, the upstream connection this client connection's requests go on.
    let dedicated = Arc::new(super::upstream::Dedicated::default());
    service_fn(move |request: http::Request<hyper::body::Incoming>| {
        // Called by hyper as it accepts each request, in stream order: the place to number
        // HTTP/2 streams.
        let stream = connection.stream_of(request.version());
        let handled = proxy.clone().handle(
            request.map(InBody::Hyper),
            None,
            connection.clone(),
            stream,
            dedicated.clone(),
        );
        async move {
            let Ok(mut response) = handled.await;
            // hyper writes the head from a map (on a connection handed over to it).
            if let Some(fields) = response.body_mut().take_fields() {
                *response.headers_mut() = fields.to_map();
            }
            Ok(response)
        }
    })
}

/// The connections a proxy thread serves, counted for the drain: hyper's graceful shutdown
/// watches only those hyper serves.
#[derive(Default)]
struct Open {
    count: AtomicUsize,
    none: tokio::sync::Notify,
}

/// One connection, counted in [`Open`] while held.
struct Holding(Arc<Open>);

impl Open {
    fn hold(self: &Arc<Self>) -> Holding {
        self.count.fetch_add(1, Ordering::Relaxed);
        Holding(self.clone())
    }

    async fn all_closed(&self) {
        loop {
            let closed = self.none.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none.notify_waiters();
        }
    }
}

/// The listener's TLS: the given certificate chain and key, ALPN `h2` then `http/1.1`.
fn server_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<rustls::ServerConfig> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read --tls-cert {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!(
                "--tls-cert {} is not a PEM certificate chain",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!("--tls-cert {} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "cannot read a PEM private key from --tls-key {}",
            key.display()
        )
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS set-up")?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("--tls-cert and --tls-key do not make a usable certificate and key")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// TLS towards an https upstream: the system's roots plus `--upstream-ca`, or no verification
/// at all with `--upstream-insecure`.
pub fn upstream_tls(config: &RecordConfig) -> anyhow::Result<rustls::ClientConfig> {
    crate::tls::client_config(
        config.upstream_insecure,
        config.upstream_ca.as_deref(),
        "--upstream-ca",
    )
}
