//! `loadtape record`: the transparent capture proxy.
//!
//! Deployed in front of a staging Quay or Clair, it forwards every request untouched and streams
//! what passed into a tape. The first rule is that it never slows or breaks the traffic it sees,
//! which shapes every part:
//!
//! * bodies stream through in both directions; their length, sha256 and kept prefix are computed
//!   on the side as the bytes pass ([`tap`]);
//! * a finished exchange is handed to the tape writer through a queue that never blocks
//!   ([`crate::tape::capture`]): a slow or full disk costs records, counted, never requests;
//! * credentials are redacted before anything is written ([`crate::redact`]): in hyper's heads
//!   before they are queued, in the heads the recorder read itself on the writer's thread, which
//!   takes that work off the request's path ([`exchange`]).
//!
//! The stages: [`listen`] accepts connections (TLS and ALPN, HTTP/1.1 and HTTP/2, h2c by prior
//! knowledge) and serves HTTP/1.1 itself (`h1`), [`forward`] sends each request upstream (on
//! HTTP/1.1 over a connection of the client connection's own, `upstream`) and the response
//! back, [`exchange`] turns what passed into records, [`admin`] serves metrics and health.

pub mod admin;
pub mod exchange;
mod fields;
pub mod forward;
mod framing;
mod h1;
mod head_timer;
pub mod listen;
pub mod spool;
pub mod tap;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use regex::Regex;
use tokio_util::sync::CancellationToken;

use crate::redact::Redactor;
use crate::tape::capture::{self, CaptureLimits};
use crate::tape::{Nanos, TapeHeader, TapeKind, TapeWriter, WriteSummary, WriterOptions};

/// How much of each body the tape keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyCapture {
    /// Length and sha256 only (pushes then cannot replay).
    None,
    /// The first bytes of every body; JSON and manifests up to [`WHOLE_JSON_LIMIT`] whole.
    Prefix(usize),
    /// Whole bodies up to `--max-body`: up to 64 KiB inline, larger ones as blobs ([`spool`]).
    Full,
}

/// JSON and manifest bodies up to this size are kept whole in every mode but `none`: a replay
/// needs them (manifests, Clair index requests).
pub const WHOLE_JSON_LIMIT: usize = 64 << 10;

impl std::fmt::Display for BodyCapture {
    /// As the flag is written, so that the banner and the tape header can be pasted back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyCapture::None => f.write_str("none"),
            BodyCapture::Full => f.write_str("full"),
            BodyCapture::Prefix(n) => {
                let (n, unit) = match *n {
                    n if n >= 1 << 20 && n % (1 << 20) == 0 => (n >> 20, "MiB"),
                    n if n >= 1 << 10 && n % (1 << 10) == 0 => (n >> 10, "KiB"),
                    n => (n, ""),
                };
                write!(f, "prefix:{n}{unit}")
            }
        }
    }
}

impl std::str::FromStr for BodyCapture {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "none" {
            return Ok(BodyCapture::None);
        }
        if s == "full" {
            return Ok(BodyCapture::Full);
        }
        if let Some(size) = s.strip_prefix("prefix:") {
            return crate::units::parse_size(size)
                .map(|n| BodyCapture::Prefix(n as usize))
                .map_err(|e| format!("{s:?}: {e}"));
        }
        Err(format!(
            "{s:?} is not a body capture mode: use `none`, `prefix:SIZE` (e.g. `prefix:64KiB`) or `full`"
        ))
    }
}

/// Everything `loadtape record` is told.
#[derive(Debug, Clone)]
pub struct RecordConfig {
    pub listen: SocketAddr,
    /// `http://host:port` or `https://host:port` (a path prefix is not allowed).
    pub upstream: http::Uri,
    /// A tape directory (rotated files) or a `.tape` file.
    pub out: PathBuf,
    /// Certificate chain and key (PEM) to terminate TLS on the listener.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Extra CA (PEM) trusted for an https upstream.
    pub upstream_ca: Option<PathBuf>,
    /// Do not verify an https upstream's certificate.
    pub upstream_insecure: bool,
    /// Speak HTTP/2 without TLS (prior knowledge) to the upstream.
    pub upstream_h2c: bool,
    /// The `Host` the upstream sees, instead of the client's.
    pub upstream_host: Option<String>,
    pub bodies: BodyCapture,
    /// With `--bodies full`: bodies larger than this keep length and sha256 only.
    pub max_body: u64,
    /// With `--bodies full`: bytes being spooled at once, across all bodies.
    pub spool_budget: u64,
    pub redact_headers: Vec<String>,
    pub keep_headers: Vec<String>,
    /// Fraction of exchanges recorded (all are forwarded).
    pub sample: f64,
    /// Record only paths matching one of these (all when empty).
    pub include: Vec<Regex>,
    /// Do not record paths matching one of these.
    pub exclude: Vec<Regex>,
    pub rotate_size: Option<u64>,
    pub rotate_every: Option<Duration>,
    /// The tapes' zstd level (see `WriterOptions::level`).
    pub zstd_level: i32,
    pub admin_listen: Option<SocketAddr>,
    /// Add `X-Forwarded-For`, `-Proto` and `-Host`.
    pub forwarded_headers: bool,
    /// How long in-flight exchanges may take to finish on shutdown.
    pub drain_timeout: Duration,
    /// How long the upstream may take to answer with a response head.
    pub upstream_timeout: Duration,
    /// How long a client may take to send a request head.
    pub header_read_timeout: Duration,
    pub queue: CaptureLimits,
    /// Proxy threads (each a runtime of its own); one per core by default.
    pub threads: usize,
}

impl RecordConfig {
    /// A configuration with the documented defaults.
    pub fn new(listen: SocketAddr, upstream: http::Uri, out: PathBuf) -> RecordConfig {
        RecordConfig {
            listen,
            upstream,
            out,
            tls: None,
            upstream_ca: None,
            upstream_insecure: false,
            upstream_h2c: false,
            upstream_host: None,
            bodies: BodyCapture::Prefix(64 << 10),
            max_body: 64 << 20,
            spool_budget: 256 << 20,
            redact_headers: Vec::new(),
            keep_headers: Vec::new(),
            sample: 1.0,
            include: Vec::new(),
            exclude: Vec::new(),
            rotate_size: None,
            rotate_every: None,
            zstd_level: WriterOptions::default().level,
            admin_listen: None,
            forwarded_headers: true,
            drain_timeout: Duration::from_secs(30),
            upstream_timeout: Duration::from_secs(300),
            header_read_timeout: Duration::from_secs(30),
            queue: CaptureLimits::default(),
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// Tape time: nanoseconds since the recording started, from a monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn now(&self) -> Nanos {
        self.at(Instant::now())
    }

    /// The tape time of `instant`: one reading of the clock serves the tape and a deadline.
    pub fn at(&self, instant: Instant) -> Nanos {
        instant.saturating_duration_since(self.start).as_nanos() as Nanos
    }
}

/// Where whole bodies wait before they become blobs: beside the tapes.
fn spool_dir(out: &std::path::Path) -> PathBuf {
    if out.extension().is_some_and(|e| e == "tape") {
        out.with_extension("spool")
    } else {
        out.join(".spool")
    }
}

/// What a recording did, when it ends.
#[derive(Debug)]
pub struct RecordSummary {
    pub exchanges: u64,
    pub tape: WriteSummary,
}

/// A recorder bound to its port, ready to run. Binding first lets callers (tests, the CLI
/// banner) learn the address before traffic flows.
pub struct Recorder {
    config: Arc<RecordConfig>,
    listener: listen::Listener,
    admin: Option<tokio::net::TcpListener>,
}

impl Recorder {
    /// Binds the listener (and the admin endpoint when asked) and checks the configuration.
    pub async fn bind(config: RecordConfig) -> anyhow::Result<Recorder> {
        if !matches!(config.upstream.scheme_str(), Some("http") | Some("https"))
            || config.upstream.host().is_none()
        {
            anyhow::bail!(
                "--upstream {} is not an http:// or https:// URL with a host",
                config.upstream
            );
        }
        let path = config.upstream.path_and_query().map_or("/", |p| p.as_str());
        if path != "/" {
            anyhow::bail!(
                "--upstream {} has a path ({path}): requests keep their own paths, so the upstream is scheme://host[:port] only (try {}://{})",
                config.upstream,
                config.upstream.scheme_str().unwrap_or("http"),
                config.upstream.authority().map_or("", |a| a.as_str()),
            );
        }
        if !(0.0..=1.0).contains(&config.sample) {
            anyhow::bail!(
                "--sample {} is not a fraction between 0 and 1",
                config.sample
            );
        }
        if config.header_read_timeout.is_zero() {
            anyhow::bail!("--header-read-timeout 0s would cut off every client (try 30s)");
        }
        let listener = listen::Listener::bind(&config).await?;
        let admin = match config.admin_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on --admin-listen {addr}"))?,
            ),
            None => None,
        };
        Ok(Recorder {
            config: Arc::new(config),
            listener,
            admin,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// Records until `stop` is cancelled, then drains in-flight exchanges (up to the drain
    /// timeout), flushes and closes the tape.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<RecordSummary> {
        let config = self.config;
        let redactor = Redactor::new(&config.redact_headers, &config.keep_headers);
        let mut header = TapeHeader::new(TapeKind::Capture, "loadtape record");
        header.upstream = Some(config.upstream.to_string());
        header.options = vec![
            ("bodies".into(), config.bodies.to_string()),
            (
                "redacted_headers".into(),
                redactor.redacted_headers().join(","),
            ),
            ("sample".into(), config.sample.to_string()),
        ];
        let options = WriterOptions {
            rotate_size: config.rotate_size,
            rotate_every: config.rotate_every,
            level: config.zstd_level,
            ..WriterOptions::default()
        };
        let writer = TapeWriter::create(&config.out, header, options)?;
        let clock = Clock {
            start: Instant::now(),
        };
        // The writer tracks exchanges in flight on the proxy's clock, so every frame carries a
        // watermark and readers release records without waiting out a reorder window.
        let (sink, capture_thread) =
            capture::spawn_tracking(writer, config.queue, Arc::new(move || clock.now()));
        let metrics = Arc::new(admin::Metrics::new(sink.counters().clone(), config.threads));
        let spool = match config.bodies {
            BodyCapture::Full => {
                let dir = spool_dir(&config.out);
                let (spool, thread) =
                    spool::Spool::start(dir.clone(), config.spool_budget, config.max_body)
                        .with_context(|| format!("cannot spool bodies in {}", dir.display()))?;
                Some((spool, thread))
            }
            _ => None,
        };
        let captures = exchange::Capture::per_thread(
            sink,
            redactor,
            clock,
            config.clone(),
            metrics.clone(),
            spool.as_ref().map(|(s, _)| s.clone()),
            config.threads,
        );
        let make_proxy = |thread: usize| {
            let capture = captures[thread].clone();
            forward::Proxy::new(config.clone(), capture, metrics.clone()).map(Arc::new)
        };

        let admin_task = self
            .admin
            .map(|l| tokio::spawn(admin::serve(l, metrics.clone(), stop.clone())));
        let proxies = self.listener.serve(
            config.threads,
            make_proxy,
            stop.clone(),
            config.drain_timeout,
        )?;
        tokio::task::spawn_blocking(move || {
            for p in proxies {
                let _ = p.join();
            }
        })
        .await
        .ok();
        if let Some(t) = admin_task {
            t.abort();
        }
        let exchanges = metrics.recorded();
        drop(captures);
        if let Some((_, thread)) = spool {
            tokio::task::spawn_blocking(move || thread.finish())
                .await
                .ok();
        }
        let tape = tokio::task::spawn_blocking(move || capture_thread.finish())
            .await
            .context("the tape writer did not finish")??;
        Ok(RecordSummary { exchanges, tape })
    }
}

#[cfg(test)]
mod tests {
    use super::BodyCapture;

    #[test]
    fn body_capture_modes_parse_and_print_as_written() {
        for text in ["none", "full", "prefix:64KiB", "prefix:1MiB", "prefix:100"] {
            let mode: BodyCapture = text.parse().unwrap();
            assert_eq!(mode.to_string(), text);
        }
        let err = "whole".parse::<BodyCapture>().unwrap_err();
        assert!(err.contains("`none`, `prefix:SIZE`"), "{err}");
    }
}
