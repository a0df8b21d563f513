//! Replay: re-issue a tape against a test target, on schedule, and record what came back.
//!
//! ```text
//!  tapes --> plan thread --(bounded channel of Steps)--> clock thread --(per-connection queue)-->
//!            (plan.rs, request.rs:                        (clock.rs: sleeps, spins,   connection tasks
//!             which requests, when, built)                 dispatches)               (conn.rs, tokio)
//!                                                                                        |
//!                    results tape + Summary <--(channel of Replayed)-- results thread <---+
//!                                                                     (results.rs)
//! ```
//!
//! The model is open, as in wrk2 and vegeta: each request has an intended instant and is handed
//! to its connection then, whatever earlier requests are doing; latency counts from the intended
//! instant, so a stalled target shows as growing latency rather than as fewer requests. Two lags
//! are kept apart: the *dispatch* lag (the clock's own, from the intended instant to the hand-off)
//! says whether loadtape kept the schedule, and decides the run's validity; the *send* lag adds
//! the waits a real client would have had too (a busy HTTP/1.1 connection, `--max-in-flight`, an
//! earlier write to the same resource).
//!
//! Nothing is sent anywhere but `--target`: requests carry only their recorded path and query,
//! redirects are not followed.

pub mod auth;
mod clock;
pub mod conn;
pub mod plan;
pub mod profile;
pub mod request;
mod results;
pub mod rewrite;
pub mod state;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use http::header::{HeaderName, HeaderValue};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use conn::{Live, Protocol};
pub use plan::{
    ConnectionMode, Filter, Plan, PlanCounters, PlanOptions, PlanSummary, Schedule, Shard,
};

use crate::report::Summary;
use crate::tape::reader::discover;
use crate::tape::{TapeError, TapeHeader, TapeKind, TapeWriter, WriteSummary, WriterOptions};
use plan::Step;

/// The clock that owns a recorded connection (a fixed hash: every run agrees).
fn clock_of(conn: &plan::ConnKey, clocks: usize) -> usize {
    let h = conn
        .id
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(conn.source) << 32 | u64::from(conn.pass));
    ((h >> 32) % clocks as u64) as usize
}

/// Steps on their way from the plan to one clock.
#[derive(Default)]
struct Batch {
    steps: Vec<Result<Step, TapeError>>,
    first: Option<u64>,
}

impl Batch {
    /// Adds a step; true while the batch may wait for more. It closes at its size, or once it
    /// spans enough schedule time that a slow schedule does not wait for it to fill.
    fn push(&mut self, step: Result<Step, TapeError>) -> bool {
        let at = step.as_ref().map_or(0, |s| s.at());
        let failed = step.is_err();
        let first = *self.first.get_or_insert(at);
        self.steps.push(step);
        !failed && self.steps.len() < STEP_BATCH && at.saturating_sub(first) < BATCH_SPAN
    }

    /// Whether the batch has waited long enough, the plan being at `now`.
    fn due(&self, now: u64) -> bool {
        self.first
            .is_some_and(|f| now.saturating_sub(f) >= BATCH_SPAN)
    }

    /// Hands the batch to its clock; false when the clock has stopped taking steps.
    fn flush(&mut self, tx: &tokio::sync::mpsc::Sender<Vec<Result<Step, TapeError>>>) -> bool {
        self.first = None;
        if self.steps.is_empty() {
            return true;
        }
        let steps = std::mem::replace(&mut self.steps, Vec::with_capacity(STEP_BATCH));
        tx.blocking_send(steps).is_ok()
    }
}

/// Steps handed from the plan to the clock at a time.
const STEP_BATCH: usize = 256;
/// A batch closes once it spans this much schedule time (ns), however few steps it holds.
const BATCH_SPAN: u64 = 5_000_000;

/// Everything a replay needs.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub tapes: Vec<PathBuf>,
    /// `http://HOST[:PORT]` or `https://HOST[:PORT]`.
    pub target: http::Uri,
    pub plan: PlanOptions,
    /// Where to write the results tape.
    pub out: Option<PathBuf>,
    /// At most this many requests in flight; more wait (and count as late).
    pub max_in_flight: Option<usize>,
    /// `--header 'Name: value'`: set on every request.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub insecure: bool,
    pub ca: Option<PathBuf>,
    /// Speak this protocol whatever the tape recorded.
    pub force: Option<Protocol>,
    /// The schedule's zero as a wall-clock instant (ns since the Unix epoch), so that shards
    /// on several machines keep one timeline.
    pub start_at: Option<i64>,
    /// A request's limit, from sending to its last byte.
    pub timeout: Duration,
    /// A run whose dispatch lag p99 exceeds this is invalid.
    pub lag_limit: Duration,
    /// After the last request (or Ctrl-C), how long in-flight requests may take to finish.
    pub drain: Duration,
    /// Pooled mode: the most connections (HTTP/1.1), or the connections requests take in turn
    /// (HTTP/2).
    pub pool_size: usize,
    /// Clock threads, each with its own share of the connections (`--threads`).
    pub threads: usize,
    /// Provenance written into the results header.
    pub provenance: Vec<(String, String)>,
    /// Fresh credentials by path prefix (profile `[[auth]]`).
    pub auth: auth::Auth,
    /// Host, path and header rewrites (profile `[[rewrite]]`, `remove-headers`).
    pub rewrites: rewrite::Rewrites,
    /// What the stateful replay maps beyond locations, ETags and tokens, and what it does
    /// with a request whose value never came (profile `[state]`).
    pub state: state::StateOptions,
    /// Endpoint classes of the results (profile `[[endpoint]]`, then the built-in ones).
    pub classes: crate::endpoint::Classifier,
}

impl ReplayConfig {
    pub fn new(tapes: Vec<PathBuf>, target: http::Uri) -> ReplayConfig {
        ReplayConfig {
            tapes,
            target,
            plan: PlanOptions {
                schedule: Schedule::Speed(1.0),
                read: crate::tape::ReadOptions::default(),
                duration: None,
                limit: None,
                looped: false,
                shard: None,
                filter: Filter::default(),
                connections: ConnectionMode::Preserve,
            },
            out: None,
            max_in_flight: None,
            headers: Vec::new(),
            insecure: false,
            ca: None,
            force: None,
            start_at: None,
            timeout: Duration::from_secs(60),
            lag_limit: Duration::from_millis(5),
            drain: Duration::from_secs(10),
            pool_size: 256,
            threads: 1,
            provenance: Vec::new(),
            auth: auth::Auth::default(),
            rewrites: rewrite::Rewrites::default(),
            state: state::StateOptions::default(),
            classes: crate::endpoint::Classifier::default(),
        }
    }
}

/// How a run went.
#[derive(Debug)]
pub struct ReplayReport {
    /// The replay's figures and its recording's (`report::Summary`): the closing summary and
    /// the verdict against the recording.
    pub summary: Summary,
    pub plan: PlanCounters,
    pub dispatched: u64,
    pub completed: u64,
    /// Dispatched but not sent: the run was stopped, or the drain time ran out.
    pub abandoned: u64,
    pub connections_opened: u64,
    /// Tokens fetched after an unexpected 401 (registry token flow).
    pub token_fetches: u64,
    pub elapsed: Duration,
    /// Whether loadtape kept its schedule (dispatch lag p99 within the limit).
    pub valid: bool,
    pub lag_limit: Duration,
    pub stopped: bool,
    pub results: Option<WriteSummary>,
    /// The results tape could not be written whole (the replay went on).
    pub results_error: Option<String>,
}

impl ReplayReport {
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let s = &self.summary;
        let a = s.accounting();
        let (count, failed) = (s.replayed_count(), s.failed());
        let mut out = String::new();
        let lag = |q| crate::report::micros(s.dispatch_lag.value_at_quantile(q));
        let send = |q| crate::report::micros(s.send_lag.value_at_quantile(q));
        let _ = writeln!(
            out,
            "{} requests replayed in {:.1} s{}: {} answered, {} failed without a response, {} abandoned",
            count,
            self.elapsed.as_secs_f64(),
            if self.stopped { " (stopped early)" } else { "" },
            count - failed,
            failed,
            self.abandoned,
        );
        let p = &self.plan;
        let _ = writeln!(
            out,
            "accounting: {} as recorded, {} rewritten, {} with synthesised bodies, {} skipped by filters, {} upgrades not replayed, {} unmappable ({} of them not sent), {} late (sent > 1 ms after their instant), {} connections opened",
            count - a.rewritten,
            a.rewritten,
            a.synthesised,
            p.filtered,
            p.upgrades,
            p.unmappable + a.unmapped + a.skipped,
            p.unmappable + a.skipped,
            a.late,
            self.connections_opened,
        );
        if self.token_fetches > 0 {
            let _ = writeln!(
                out,
                "tokens:     {} fetched after an unexpected 401 (the recorded token was issued before the tape began, or the live one was refused)",
                self.token_fetches
            );
        }
        let _ = writeln!(
            out,
            "schedule lag (loadtape's own): p50 {}  p99 {}  max {}",
            lag(0.5),
            lag(0.99),
            crate::report::micros(s.dispatch_lag.max()),
        );
        let _ = writeln!(
            out,
            "send lag (waits included):     p50 {}  p99 {}  max {}",
            send(0.5),
            send(0.99),
            crate::report::micros(s.send_lag.max()),
        );
        if !self.valid {
            let _ = writeln!(
                out,
                "INVALID RUN: loadtape could not keep the schedule (dispatch lag p99 {} > {}); a verdict on it would be about loadtape, not the target. Lower the rate, or shard the replay over more machines.",
                lag(0.99),
                crate::report::micros(self.lag_limit.as_micros() as u64),
            );
        }
        out.push('\n');
        out.push_str(&s.to_text(20));
        if let Some(r) = &self.results {
            let _ = writeln!(
                out,
                "\nresults: {} records in {}",
                r.records,
                r.files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(e) = &self.results_error {
            let _ = writeln!(out, "results tape incomplete: {e}");
        }
        out
    }

    pub fn to_json(&self) -> ReportJson {
        ReportJson {
            valid: self.valid,
            stopped: self.stopped,
            elapsed_s: self.elapsed.as_secs_f64(),
            dispatched: self.dispatched,
            completed: self.completed,
            abandoned: self.abandoned,
            connections_opened: self.connections_opened,
            plan: self.plan.clone(),
            summary: self.summary.to_json(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ReportJson {
    pub valid: bool,
    pub stopped: bool,
    pub elapsed_s: f64,
    pub dispatched: u64,
    pub completed: u64,
    pub abandoned: u64,
    pub connections_opened: u64,
    pub plan: PlanCounters,
    pub summary: crate::report::SummaryJson,
}

/// The target, checked: only a scheme, a host and a port.
fn target(config: &ReplayConfig) -> anyhow::Result<conn::Target> {
    let uri = &config.target;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            bail!("--target {uri} must start with http:// or https:// (e.g. http://quay-test:8080)")
        }
    };
    let Some(authority) = uri.authority().cloned() else {
        bail!("--target {uri} names no host: write e.g. http://quay-test:8080");
    };
    if uri.path() != "/" && !uri.path().is_empty() {
        bail!(
            "--target {uri} has a path: requests keep their recorded paths, so give only scheme, host and port"
        );
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let (tls_h2, tls_h1, server_name) = if https {
        let base = crate::tls::client_config(config.insecure, config.ca.as_deref(), "--ca")?;
        let mut h2 = base.clone();
        h2.alpn_protocols = match config.force {
            Some(Protocol::Http1) => vec![b"http/1.1".to_vec()],
            _ => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        let mut h1 = base;
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .with_context(|| format!("--target host {host:?} is not a valid TLS server name"))?;
        (Some(Arc::new(h2)), Some(Arc::new(h1)), Some(name))
    } else {
        (None, None, None)
    };
    Ok(conn::Target {
        https,
        host: host.to_string(),
        port,
        authority,
        tls_h2,
        tls_h1,
        server_name,
        force: config.force,
    })
}

fn plan(config: &ReplayConfig) -> anyhow::Result<Plan> {
    let files = discover(&config.tapes)?;
    let host = HeaderValue::from_str(config.target.authority().map_or("", |a| a.as_str()))
        .context("--target's host is not a valid Host header")?;
    let template = request::RequestTemplate {
        host,
        headers: config.headers.clone(),
        auth: config.auth.clone(),
        rewrites: config.rewrites.clone(),
        state: config.state.clone(),
        classes: config.classes.clone(),
    };
    Ok(Plan::new(
        config.plan.clone(),
        plan::Sources {
            files,
            read: config.plan.read.clone(),
        },
        template,
    )?)
}

/// Lifts the soft limit on open files to the hard one (1024 by default on many systems, and a
/// replay holds a connection per recorded one in flight).
fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// `--dry-run`: the plan, without sending anything.
pub fn dry_run(config: &ReplayConfig) -> anyhow::Result<PlanSummary> {
    target(config)?;
    Ok(plan(config)?.summarise(config.target.to_string())?)
}

/// Runs a replay until its plan ends or `stop` is cancelled. `live` is for a progress display.
/// Blocking: it runs the clock on the calling thread and the connections on a runtime of its own.
pub fn run(
    config: &ReplayConfig,
    stop: CancellationToken,
    live: Arc<Live>,
) -> anyhow::Result<ReplayReport> {
    let target = target(config)?;
    let mut plan = plan(config)?;
    raise_open_files_limit();
    let source_ids = plan.source_ids().to_vec();
    let clocks = config.threads.max(1);

    // The plan runs ahead of the clocks by a bounded number of steps, handed over in batches so
    // that the threads do not wake each other per request. Each recorded connection belongs to
    // one clock (pooled requests go round); each clock's steps stay in time order.
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let mut senders = Vec::with_capacity(clocks);
    let mut receivers = Vec::with_capacity(clocks);
    for _ in 0..clocks {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<Result<Step, TapeError>>>(16);
        senders.push(tx);
        receivers.push(rx);
    }
    let pooled = config.plan.connections == ConnectionMode::Pooled;
    let planner = std::thread::Builder::new()
        .name("loadtape-plan".into())
        .spawn(move || {
            let mut batches: Vec<Batch> = (0..clocks).map(|_| Batch::default()).collect();
            let mut ready = Some(ready_tx);
            let mut turn = 0usize;
            let mut open = clocks;
            'plan: loop {
                let (step, end) = match plan.next_step() {
                    Ok(Some(step)) => (Some(Ok(step)), false),
                    Ok(None) => (None, true),
                    Err(e) => (Some(Err(e)), true),
                };
                if let Some(step) = step {
                    let k = match &step {
                        Ok(Step::Send(_)) if pooled => {
                            turn = (turn + 1) % clocks;
                            turn
                        }
                        Ok(Step::Send(p)) => clock_of(&p.conn, clocks),
                        Ok(Step::Open { conn, .. } | Step::Close { conn, .. }) => {
                            clock_of(conn, clocks)
                        }
                        Err(_) => 0,
                    };
                    let at = step.as_ref().map_or(0, |s| s.at());
                    let wait = batches[k].push(step);
                    // Every batch that waited long enough goes, not only this clock's: a clock
                    // with few connections must not wait for its batch to fill.
                    for (i, (b, tx)) in batches.iter_mut().zip(&senders).enumerate() {
                        let due = if i == k { !wait } else { b.due(at) };
                        if !due {
                            continue;
                        }
                        if !b.flush(tx) {
                            open -= 1;
                            if open == 0 {
                                break 'plan;
                            }
                        }
                        // The clocks may start: the first steps are on their way.
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                }
                if end {
                    for (b, tx) in batches.iter_mut().zip(&senders) {
                        b.flush(tx);
                    }
                    break;
                }
            }
            drop(ready);
            plan.counters
        })
        .expect("a thread can be started");
    // The schedule starts once the plan has its first steps: a tape whose first records wait in
    // the reorder window must not make the first requests late.
    let _ = ready_rx.recv();

    let now_unix = crate::tape::now_unix_ns();
    // A short lead lets the plan fill the clocks' channels before the first instant.
    let lead: i64 = 20_000_000;
    let epoch = config.start_at.unwrap_or(now_unix + lead);
    let now = Instant::now();
    let t0 = if epoch >= now_unix {
        now + Duration::from_nanos((epoch - now_unix) as u64)
    } else {
        // A --start-at in the past: keep its timeline (the lag will show it).
        now.checked_sub(Duration::from_nanos((now_unix - epoch) as u64))
            .unwrap_or(now)
    };

    let writer = match &config.out {
        Some(out) => {
            let mut header = TapeHeader::new(TapeKind::Results, "loadtape replay");
            header.epoch_unix_ns = epoch;
            header.upstream = Some(config.target.to_string());
            header.options = config.provenance.clone();
            for id in &source_ids {
                header.options.push(("source".into(), crate::tape::hex(id)));
            }
            Some(
                TapeWriter::create(out, header, WriterOptions::default())
                    .with_context(|| format!("cannot create the results tape {}", out.display()))?,
            )
        }
        None => None,
    };
    let (results_tx, results_rx) = tokio::sync::mpsc::unbounded_channel();
    let unwritten = Arc::new(crate::tape::capture::InFlight::new());
    let progress: Vec<Arc<AtomicU64>> = (0..clocks).map(|_| Default::default()).collect();
    let every_clock = progress.clone();
    let collector = results::spawn(
        results_rx,
        writer,
        live.clone(),
        unwritten.clone(),
        // Schedule time, but never past the slowest clock: a request a late clock has yet to
        // dispatch is not counted in `unwritten`, and the watermark must not pass it.
        move || {
            let wall = Instant::now().saturating_duration_since(t0).as_nanos() as u64;
            every_clock
                .iter()
                .map(|p| p.load(Ordering::Acquire))
                .fold(wall, u64::min)
        },
        crate::report::dataset::ResultsBuilder::new(
            config
                .out
                .as_ref()
                .map_or("this replay".into(), |p| p.display().to_string()),
            crate::report::dataset::Window::default(),
            config.provenance.clone(),
        ),
    );

    let in_flight = config
        .max_in_flight
        .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
    let pool_cap = match config.max_in_flight {
        Some(n) => n.min(config.pool_size),
        None => config.pool_size,
    }
    .div_ceil(clocks);
    let mut threads = Vec::with_capacity(clocks);
    for (k, steps) in receivers.into_iter().enumerate() {
        let shared = Arc::new(conn::Shared {
            target: target.clone(),
            t0,
            results: results_tx.clone(),
            in_flight: in_flight.clone(),
            live: live.clone(),
            timeout: config.timeout,
            stop: stop.clone(),
            outstanding: Default::default(),
            unwritten: unwritten.clone(),
            progress: progress[k].clone(),
            unmappable: config.state.unmappable,
            divergences: Default::default(),
        });
        let clock = clock::Clock::new(shared, config.plan.connections, pool_cap, stop.clone());
        let drain = config.drain;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        threads.push(
            std::thread::Builder::new()
                .name(format!("loadtape-clock-{k}"))
                .spawn(move || {
                    let result = runtime.block_on(clock.run(steps, drain));
                    // Requests still going after the drain time are abandoned here.
                    runtime.shutdown_timeout(Duration::from_millis(100));
                    result
                })
                .expect("a thread can be started"),
        );
    }
    drop(results_tx);
    let mut clock_result = Ok(());
    for t in threads {
        let r = t.join().expect("a clock thread does not panic");
        if clock_result.is_ok() {
            clock_result = r;
        }
    }
    let elapsed = t0.elapsed();
    let stopped = stop.is_cancelled();
    let plan_counters = planner.join().expect("the plan thread does not panic");
    let collected = collector.join().expect("the results thread does not panic");
    clock_result?;

    let completed = live.completed.load(Ordering::Relaxed);
    let dispatched = live.dispatched.load(Ordering::Relaxed);
    let lag_p99 = collected.summary.dispatch_lag.value_at_quantile(0.99);
    Ok(ReplayReport {
        valid: lag_p99 <= config.lag_limit.as_micros() as u64,
        lag_limit: config.lag_limit,
        plan: plan_counters,
        dispatched,
        completed,
        abandoned: dispatched - completed.min(dispatched),
        connections_opened: live.connections_opened.load(Ordering::Relaxed),
        token_fetches: live.token_fetches.load(Ordering::Relaxed),
        elapsed,
        stopped,
        summary: collected.summary,
        results: collected.tape,
        results_error: collected.error.map(|e| e.to_string()),
    })
}
