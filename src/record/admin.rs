//! The admin endpoint (off unless `--admin-listen` is given): `/metrics` in Prometheus text
//! format, `/healthz` and `/readyz`. The counters are atomics the proxy path bumps without
//! locking, each proxy thread its own ([`Counts`]); rendering sums them, here, off that path.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::tape::capture::CaptureCounters;

/// Prometheus' text exposition format, which every answer here is written in.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the upstream latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A Prometheus histogram over fixed buckets, lock-free.
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, ns: u64) {
        let s = ns as f64 / 1e9;
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// What the recorder counts: each proxy thread in its own [`Counts`].
pub struct Metrics {
    shards: Box<[Counts]>,
    tape: Arc<CaptureCounters>,
}

/// What one proxy thread counts, on cache lines of its own. Counters the threads shared would
/// pass their line from core to core on every request, each add waiting for it: on two cores
/// that cost more than the counting.
#[repr(align(128))]
pub struct Counts {
    pub requests: AtomicU64,
    /// Added to and taken from by the same thread; the gauge is the sum over threads.
    pub in_flight: AtomicU64,
    /// Responses by status class (1xx..5xx).
    pub statuses: [AtomicU64; 5],
    pub upstream_failures: AtomicU64,
    /// Exchanges handed to the tape writer (before any drop).
    pub recorded: AtomicU64,
    /// Bytes of request bodies passed upstream, and of response bodies passed back.
    pub request_body_bytes: AtomicU64,
    pub response_body_bytes: AtomicU64,
    /// Client connections the thread took, to show how evenly they are dealt.
    pub connections: AtomicU64,
    pub upstream_latency: Histogram,
}

impl Counts {
    fn new() -> Counts {
        Counts {
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            statuses: std::array::from_fn(|_| AtomicU64::new(0)),
            upstream_failures: AtomicU64::new(0),
            recorded: AtomicU64::new(0),
            request_body_bytes: AtomicU64::new(0),
            response_body_bytes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            upstream_latency: Histogram::new(),
        }
    }

    pub fn count_status(&self, status: u16) {
        if let Some(c) = self.statuses.get((status / 100).wrapping_sub(1) as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Metrics {
    pub fn new(tape: Arc<CaptureCounters>, threads: usize) -> Metrics {
        Metrics {
            shards: (0..threads.max(1)).map(|_| Counts::new()).collect(),
            tape,
        }
    }

    /// The counters of proxy thread `thread`.
    pub fn of_thread(&self, thread: usize) -> &Counts {
        &self.shards[thread % self.shards.len()]
    }

    /// A counter summed over the threads.
    fn total(&self, counter: impl Fn(&Counts) -> &AtomicU64) -> u64 {
        (self.shards.iter())
            .map(|c| counter(c).load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// Exchanges handed to the tape writer so far.
    pub fn recorded(&self) -> u64 {
        self.total(|c| &c.recorded)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let total = |counter: &dyn Fn(&Counts) -> &AtomicU64| self.total(counter);
        let mut o = String::with_capacity(2048);
        let mut counter = |name: &str, help: &str, kind: &str, value: u64| {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        counter(
            "loadtape_requests_total",
            "Requests received from clients.",
            "counter",
            total(&|c| &c.requests),
        );
        counter(
            "loadtape_requests_in_flight",
            "Requests being proxied now.",
            "gauge",
            total(&|c| &c.in_flight),
        );
        counter(
            "loadtape_upstream_failures_total",
            "Requests the upstream refused, reset or timed out.",
            "counter",
            total(&|c| &c.upstream_failures),
        );
        counter(
            "loadtape_exchanges_recorded_total",
            "Exchanges handed to the tape writer.",
            "counter",
            total(&|c| &c.recorded),
        );
        counter(
            "loadtape_tape_records_written_total",
            "Records the tape writer took.",
            "counter",
            get(&self.tape.written),
        );
        counter(
            "loadtape_tape_records_dropped_total",
            "Records dropped (queue full or disk refusing writes); traffic was not affected.",
            "counter",
            get(&self.tape.dropped),
        );
        counter(
            "loadtape_tape_queue_bytes",
            "Bytes of records waiting for the tape writer; records are dropped when the queue's byte budget is spent.",
            "gauge",
            self.tape.queued_bytes() as u64,
        );
        counter(
            "loadtape_tape_bytes_total",
            "Bytes written to tape files (compressed).",
            "counter",
            get(&self.tape.tape_bytes),
        );
        counter(
            "loadtape_tape_rotations_total",
            "Tape files closed for a new one (--rotate-size, --rotate-every).",
            "counter",
            get(&self.tape.rotations),
        );
        counter(
            "loadtape_tape_write_errors_total",
            "Failed tape writes.",
            "counter",
            get(&self.tape.write_errors),
        );
        let _ = writeln!(
            o,
            "# HELP loadtape_body_bytes_total Bytes of bodies passed through, by direction.\n# TYPE loadtape_body_bytes_total counter\nloadtape_body_bytes_total{{direction=\"request\"}} {}\nloadtape_body_bytes_total{{direction=\"response\"}} {}",
            total(&|c| &c.request_body_bytes),
            total(&|c| &c.response_body_bytes),
        );
        let _ = writeln!(
            o,
            "# HELP loadtape_responses_total Responses to clients by status class.\n# TYPE loadtape_responses_total counter"
        );
        for i in 0..5 {
            let _ = writeln!(
                o,
                "loadtape_responses_total{{class=\"{}xx\"}} {}",
                i + 1,
                total(&|c| &c.statuses[i])
            );
        }
        let _ = writeln!(
            o,
            "# HELP loadtape_connections_total Client connections by the proxy thread serving them.\n# TYPE loadtape_connections_total counter"
        );
        for (i, c) in self.shards.iter().enumerate() {
            let _ = writeln!(
                o,
                "loadtape_connections_total{{thread=\"{i}\"}} {}",
                get(&c.connections)
            );
        }
        let _ = writeln!(
            o,
            "# HELP loadtape_upstream_latency_seconds Time from request head to the upstream's response head.\n# TYPE loadtape_upstream_latency_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += total(&|c| &c.upstream_latency.counts[i]);
            let _ = writeln!(
                o,
                "loadtape_upstream_latency_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += total(&|c| &c.upstream_latency.counts[LATENCY_BUCKETS.len()]);
        let _ = writeln!(
            o,
            "loadtape_upstream_latency_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            o,
            "loadtape_upstream_latency_seconds_sum {}\nloadtape_upstream_latency_seconds_count {cumulative}",
            total(&|c| &c.upstream_latency.sum_ns) as f64 / 1e9
        );
        o
    }
}

/// Serves the admin endpoint until the task is aborted: through the drain after `stop` too,
/// when `/readyz` says 503 (a load balancer takes the proxy out) while `/metrics` still shows
/// the exchanges in flight.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: pause rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        let stopping = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let stopping = stopping.is_cancelled();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (200, metrics.render()),
                        "/healthz" => (200, "ok\n".to_string()),
                        "/readyz" if stopping => (503, "shutting down\n".to_string()),
                        "/readyz" => (200, "ready\n".to_string()),
                        _ => (404, "try /metrics, /healthz or /readyz\n".to_string()),
                    };
                    let mut r = http::Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = http::StatusCode::from_u16(status).expect("valid status");
                    // Prometheus 3 refuses a scrape without its content type.
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(TEXT_FORMAT),
                    );
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
