//! The command line: flags in, calls into the library, text and exit codes out.
//!
//! Exit codes: 0 success, 2 an error (bad input, a corrupt tape, I/O). Later commands that
//! give verdicts (`diff`) add 1 for "regression".

mod replay;
mod report;
mod testbed;

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::har::{self, HarExporter, ImportOptions};
use crate::inspect::summarise;
use crate::redact::Redactor;
use crate::select::{Selection, StatusPattern};
use crate::tape::reader::discover;
use crate::tape::{Nanos, ReadOptions, TapeReader};
use crate::units::{parse_duration, parse_size};

#[derive(Parser, Debug)]
#[command(
    name = "loadtape",
    version,
    about = "Record production-shaped HTTP traffic in front of Quay/Clair, replay it, compare.",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the capture proxy: forward every request to --upstream untouched, record what passed.
    Record(Box<RecordArgs>),
    /// Show what tapes hold: records, time span, rates, statuses, endpoints, damage.
    Inspect(InspectArgs),
    /// Write tape records out as HAR 1.2 or JSON lines.
    Export(ExportArgs),
    /// Turn a HAR file (browsers, mitmproxy, Charles) into a tape, credentials redacted.
    Import(ImportArgs),
    /// Re-issue tapes against a test target on schedule, and record what came back.
    Replay(Box<ReplayArgs>),
    /// Join the results tapes of a replay's shards into one.
    Merge(MergeArgs),
    /// Latency and status distributions per endpoint class of a tape or a replay's results.
    Report(report::ReportArgs),
    /// Compare a replay with its recording (or two runs) per endpoint class; exit 1 on a
    /// regression, 2 on an invalid run.
    Diff(report::DiffArgs),
    /// Serve the Quay/Clair testbed (registry v2, Quay API v1, Clair v4, in memory) until Ctrl-C.
    Testbed(testbed::TestbedArgs),
    /// Drive production-shaped Quay/Clair sessions at a testbed (or the proxy in front of one).
    Drive(testbed::DriveArgs),
    /// Run the built-in Quay/Clair session end to end; needs nothing installed.
    Demo(DemoArgs),
}

/// Flags of every command that reads tapes.
#[derive(Args, Debug)]
struct ReadArgs {
    /// Tape files, or directories of rotated tape files.
    #[arg(required = true, value_name = "TAPE_OR_DIR")]
    paths: Vec<PathBuf>,
    /// Skip frames that fail their checksums (and count their records as lost) instead of
    /// stopping at the first.
    #[arg(long)]
    lenient: bool,
    /// Only records from this time: an offset from the tape's start (`90s`, `5m`) or an RFC 3339
    /// date-time.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    from: Option<TimeArg>,
    /// Only records before this time (same forms as --from).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    to: Option<TimeArg>,
    /// How long after later requests a slow exchange may still come and be put in order.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    reorder_window: Duration,
    /// Only exchanges with this status: a code (404), a class (5xx) or `error`. Repeatable.
    #[arg(long = "status", value_name = "STATUS")]
    statuses: Vec<StatusPattern>,
    /// Only exchanges whose endpoint class contains this text (`blobs/{digest}`, `index_report`).
    #[arg(long, value_name = "TEXT")]
    endpoint: Option<String>,
}

#[derive(Args, Debug)]
struct InspectArgs {
    #[command(flatten)]
    read: ReadArgs,
    /// Print one JSON object (stable keys, see `loadtape::inspect`).
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ExportFormat {
    Har,
    Jsonl,
}

#[derive(Args, Debug)]
struct ExportArgs {
    #[command(flatten)]
    read: ReadArgs,
    #[arg(long, value_enum)]
    format: ExportFormat,
    /// Where to write (standard output when absent).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ImportArgs {
    /// The HAR file.
    har: PathBuf,
    /// The tape to write: a `.tape` file or a directory (default: beside the HAR, NAME.tape).
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
    /// Also redact this header. Repeatable.
    #[arg(long, value_name = "NAME")]
    redact_header: Vec<String>,
    /// Keep this header in clear although it is redacted by default. Repeatable.
    #[arg(long, value_name = "NAME")]
    keep_header: Vec<String>,
    /// Keep at most this much of each body (`64KiB`, `1MiB`, `0`).
    #[arg(long, value_name = "SIZE", default_value = "64KiB", value_parser = parse_size)]
    body_prefix: u64,
}

#[derive(Args, Debug)]
struct RecordArgs {
    /// Address to listen on, e.g. 0.0.0.0:8443.
    #[arg(long, value_name = "ADDR")]
    listen: std::net::SocketAddr,
    /// Where to forward: http://HOST:PORT or https://HOST:PORT.
    #[arg(long, value_name = "URL")]
    upstream: http::Uri,
    /// Tape directory (rotated files, created 0700) or a .tape file.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Terminate TLS on the listener with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Trust this CA (PEM) for an https upstream, besides the system's.
    #[arg(long, value_name = "PEM")]
    upstream_ca: Option<PathBuf>,
    /// Do not verify an https upstream's certificate.
    #[arg(long, conflicts_with = "upstream_ca")]
    upstream_insecure: bool,
    /// Speak HTTP/2 to a plain-text upstream (prior knowledge).
    #[arg(long)]
    upstream_h2c: bool,
    /// The Host the upstream sees, instead of the client's.
    #[arg(long, value_name = "NAME")]
    upstream_host: Option<String>,
    /// How much of each body to keep: `none`, `prefix:SIZE` or `full` (whole bodies up to
    /// --max-body, stored once per tape directory). JSON and manifests up to 64 KiB are kept
    /// whole unless `none`.
    #[arg(long, value_name = "MODE", default_value = "prefix:64KiB")]
    bodies: crate::record::BodyCapture,
    /// With --bodies full: larger bodies keep length and sha256 only.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    max_body: u64,
    /// Also redact this header. Repeatable.
    #[arg(long, value_name = "NAME")]
    redact_header: Vec<String>,
    /// Keep this header in clear although it is redacted by default. Repeatable.
    #[arg(long, value_name = "NAME")]
    keep_header: Vec<String>,
    /// Record this fraction of exchanges (all are forwarded).
    #[arg(long, value_name = "FRACTION", default_value_t = 1.0)]
    sample: f64,
    /// Record only paths matching this regular expression. Repeatable.
    #[arg(long, value_name = "REGEX")]
    include: Vec<regex::Regex>,
    /// Do not record paths matching this regular expression. Repeatable.
    #[arg(long, value_name = "REGEX")]
    exclude: Vec<regex::Regex>,
    /// Start a new tape file at this size (`512MiB`).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    rotate_size: Option<u64>,
    /// Start a new tape file this often (`1h`).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    rotate_every: Option<Duration>,
    /// The tapes' zstd level, -7 to 19: -1 spends less CPU on stored layer prefixes at the same
    /// size but stores metadata ~30% larger; 3 stores ~5% less for ~15% more CPU.
    #[arg(long, value_name = "LEVEL", default_value_t = 1, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-7..=19))]
    zstd_level: i32,
    /// Serve /metrics, /healthz and /readyz here (off unless given).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<std::net::SocketAddr>,
    /// Do not add X-Forwarded-For, -Proto and -Host.
    #[arg(long)]
    no_forwarded_headers: bool,
    /// On SIGTERM/SIGINT, how long in-flight exchanges may take to finish.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// How long a client may take to send a whole request head (on a kept connection, from the
    /// end of the last response) before it is cut off, with a 408 if part of a head came. An
    /// HTTP/2 client silent that long is pinged, and cut off if it does not answer as long.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    header_read_timeout: Duration,
    /// How long the upstream may take to send a response head after the request's last byte,
    /// and, while a request body goes, to take more of it, before the client gets 504.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    upstream_timeout: Duration,
    /// Proxy threads, each serving its share of the connections (default: one per core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnectionsArg {
    Preserve,
    Pooled,
}

#[derive(Args, Debug)]
pub(crate) struct ReplayArgs {
    /// Tape files, or directories of rotated tape files.
    #[arg(required = true, value_name = "TAPE_OR_DIR")]
    paths: Vec<PathBuf>,
    /// Where to send: http://HOST[:PORT] or https://HOST[:PORT]. Nothing is sent elsewhere.
    #[arg(long, value_name = "URL")]
    target: Option<http::Uri>,
    /// Replay at this multiple of the recorded speed (inter-arrival times divided by X).
    #[arg(long, value_name = "X", conflicts_with_all = ["rate", "ramp"])]
    speed: Option<f64>,
    /// Send at this constant rate (requests per second), in the tape's order.
    #[arg(long, value_name = "RPS", conflicts_with = "ramp")]
    rate: Option<f64>,
    /// Raise the rate linearly, e.g. `10:500:5m`, then hold it.
    #[arg(long, value_name = "FROM:TO:DURATION")]
    ramp: Option<String>,
    /// Only the tape from this time: an offset from its start (`90s`) or an RFC 3339 date-time.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    from: Option<TimeArg>,
    /// Only the tape before this time (same forms as --from).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    to: Option<TimeArg>,
    /// Stop planning requests this long after the start.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Send at most this many requests (over all shards).
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Start the tape over when it ends (until --duration, --limit or Ctrl-C).
    #[arg(long = "loop")]
    looped: bool,
    /// A replay profile (TOML; see replay-profiles/): these flags and filters in a file.
    /// Flags given here win.
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Write a results tape (one record per request) here.
    #[arg(long, value_name = "RESULTS")]
    out: Option<PathBuf>,
    /// At most this many requests in flight; the rest wait and count as late.
    #[arg(long, value_name = "N")]
    max_in_flight: Option<usize>,
    /// `preserve`: one live connection per recorded one, as the tape opened and closed them;
    /// `pooled`: requests spread over a pool.
    #[arg(long, value_enum)]
    connections: Option<ConnectionsArg>,
    /// Replay only this fraction of the recorded connections (whole connections), e.g. 0.25.
    #[arg(long, value_name = "FRACTION")]
    fraction: Option<f64>,
    /// Replay shard K of N (0 <= K < N): whole recorded connections, timing kept.
    #[arg(long, value_name = "K/N")]
    shard: Option<crate::replay::Shard>,
    /// Start the schedule at this wall-clock time (RFC 3339), so that shards keep one timeline.
    #[arg(long, value_name = "TIME")]
    start_at: Option<String>,
    /// Set this header on every request, e.g. 'Authorization: Bearer ...'. Repeatable.
    #[arg(long = "header", value_name = "'NAME: VALUE'")]
    headers: Vec<String>,
    /// Do not verify an https target's certificate.
    #[arg(long, conflicts_with = "ca")]
    insecure: bool,
    /// Trust this CA (PEM) for an https target, besides the system's.
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Clock threads: each keeps the schedule of its share of the connections and runs them.
    /// One drives tens of thousands of requests a second; add more when a core is not enough.
    #[arg(long, value_name = "N", default_value_t = 1)]
    threads: usize,
    /// Speak HTTP/1.1 to the target whatever the tape recorded.
    #[arg(long, conflicts_with = "http2")]
    http1: bool,
    /// Speak HTTP/2 to the target whatever the tape recorded (h2c on http://).
    #[arg(long)]
    http2: bool,
    /// A request's limit, from sending to its last byte.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Mark the run invalid when loadtape's own schedule lag p99 exceeds this.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    lag_limit: Option<Duration>,
    /// Send nothing: print what would be sent (requests per endpoint, writes, rewrites,
    /// credentials, duration, peak rate).
    #[arg(long)]
    dry_run: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Exit as `loadtape diff` does against the recording: 1 on a regression, 2 when the run
    /// is invalid (thresholds from the profile's `[gate]`).
    #[arg(long)]
    gate: bool,
    /// Skip damaged frames instead of stopping.
    #[arg(long)]
    lenient: bool,
}

#[derive(Args, Debug)]
pub(crate) struct MergeArgs {
    /// Results tapes (the --out of each shard's `loadtape replay`).
    #[arg(required = true, value_name = "RESULTS")]
    paths: Vec<PathBuf>,
    /// The merged results tape.
    #[arg(long, value_name = "RESULTS")]
    out: PathBuf,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where to write the demo's tapes and reports (default: a new temporary directory).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// How long the traffic driver runs, in seconds (a shorter demo for tests).
    #[arg(long, value_name = "SECONDS", default_value_t = 15.0)]
    pub seconds: f64,
}

/// Runs the command line; the binary's `main` is only this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes on one line, a cause left out when the message before already says
/// it (errors that name their source in their own text, as `cannot open X: <the OS error>`).
fn one_line(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOADTAPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Record(args) => record(*args),
        Command::Inspect(args) => inspect(args),
        Command::Export(args) => export(args),
        Command::Import(args) => import(args),
        Command::Replay(args) => replay::replay(*args),
        Command::Merge(args) => replay::merge(args),
        Command::Report(args) => report::report(args),
        Command::Testbed(args) => testbed::testbed(args),
        Command::Drive(args) => testbed::drive_command(args),
        Command::Diff(args) => report::diff(args),
        Command::Demo(args) => crate::demo::run(&args.out, args.seconds).map(|_| ExitCode::SUCCESS),
    }
}

fn record(args: RecordArgs) -> anyhow::Result<ExitCode> {
    use crate::record::{RecordConfig, Recorder};
    let mut config = RecordConfig::new(args.listen, args.upstream, args.out);
    config.tls = args.tls_cert.zip(args.tls_key);
    config.upstream_ca = args.upstream_ca;
    config.upstream_insecure = args.upstream_insecure;
    config.upstream_h2c = args.upstream_h2c;
    config.upstream_host = args.upstream_host;
    config.bodies = args.bodies;
    config.max_body = args.max_body;
    config.redact_headers = args.redact_header;
    config.keep_headers = args.keep_header;
    config.sample = args.sample;
    config.include = args.include;
    config.exclude = args.exclude;
    config.rotate_size = args.rotate_size;
    config.rotate_every = args.rotate_every;
    config.zstd_level = args.zstd_level;
    config.admin_listen = args.admin_listen;
    config.forwarded_headers = !args.no_forwarded_headers;
    config.drain_timeout = args.drain_timeout;
    config.upstream_timeout = args.upstream_timeout;
    config.header_read_timeout = args.header_read_timeout;
    if let Some(n) = args.threads {
        config.threads = n.into();
    }
    // The proxy runs on threads of its own (one runtime per core); this runtime only waits for
    // signals and serves the admin endpoint.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let banner = format!(
            "loadtape record: {} {} -> {}, tapes in {}, bodies {}, redacting {}, secret query values, URLs' in Location and the like, and secret JSON and form fields in bodies; token endpoints' bodies not kept",
            if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            config.listen,
            config.upstream,
            config.out.display(),
            config.bodies,
            crate::redact::Redactor::new(&config.redact_headers, &config.keep_headers)
                .redacted_headers()
                .join(", "),
        );
        let bodiless = config.bodies == crate::record::BodyCapture::None;
        let recorder = Recorder::bind(config).await?;
        let admin = recorder
            .admin_addr()
            .map_or(String::new(), |a| format!(", admin on {a}"));
        tracing::info!("{banner} (listening on {}{admin})", recorder.local_addr());
        if bodiless {
            tracing::warn!(
                "--bodies none: no body is kept, manifests and JSON included, so pushes and API writes recorded now cannot be replayed (the default, prefix:64KiB, keeps them)"
            );
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let signalled = stop.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM can be handled");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("stopping: no new connections; in-flight exchanges may finish");
            signalled.cancel();
        });
        let summary = recorder.run(stop).await?;
        tracing::info!(
            "recorded {} exchanges into {} file(s), {} records dropped",
            summary.exchanges,
            summary.tape.files.len(),
            summary.tape.dropped
        );
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let (reader, selection) = open(&args.read)?;
    let summary = summarise(reader, &selection)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", summary.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let (mut reader, selection) = open(&args.read)?;
    let out: Box<dyn Write> = match &args.out {
        Some(p) => Box::new(create_private(p)?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = BufWriter::new(out);
    let mut written = 0u64;
    match args.format {
        ExportFormat::Har => {
            let mut har = HarExporter::new(out, reader.epoch_unix_ns())?;
            for record in reader.by_ref() {
                let record = record?;
                if selection.matches(&record) {
                    har.add(&record)?;
                }
            }
            written = har.finish()?;
        }
        ExportFormat::Jsonl => {
            for record in reader.by_ref() {
                let record = record?;
                if selection.matches(&record) {
                    serde_json::to_writer(&mut out, &record)?;
                    out.write_all(b"\n")?;
                    written += 1;
                }
            }
            out.flush()?;
        }
    }
    if let Some(p) = &args.out {
        eprintln!("wrote {written} entries to {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| har::default_out(&args.har));
    let redactor = Redactor::new(&args.redact_header, &args.keep_header);
    let options = ImportOptions {
        body_prefix: args.body_prefix as usize,
    };
    let s = har::import(&args.har, &out, &redactor, &options)?;
    eprintln!(
        "imported {} entries on {} connections into {} ({} credential values redacted)",
        s.entries,
        s.connections,
        out.display(),
        s.redacted
    );
    Ok(ExitCode::SUCCESS)
}

/// Opens the tapes of `args` with their time range resolved against the first tape's epoch.
fn open(args: &ReadArgs) -> anyhow::Result<(TapeReader, Selection)> {
    let sources = discover(&args.paths)?;
    let options = ReadOptions {
        lenient: args.lenient,
        from: resolve_time(&sources, args.from.as_ref()),
        to: resolve_time(&sources, args.to.as_ref()),
        reorder_window: args.reorder_window.as_nanos() as Nanos,
    };
    let selection = Selection {
        statuses: args.statuses.clone(),
        endpoint: args.endpoint.clone(),
    };
    Ok((TapeReader::from_sources(sources, &options), selection))
}

/// A `--from`/`--to` as tape time: ns since the earliest of the tapes' epochs.
fn resolve_time(sources: &[crate::tape::reader::SourceFile], t: Option<&TimeArg>) -> Option<Nanos> {
    let epoch = sources
        .iter()
        .map(|s| s.header.epoch_unix_ns)
        .min()
        .unwrap_or(0);
    t.map(|t| match t {
        TimeArg::Offset(d) => d.as_nanos() as Nanos,
        TimeArg::At(unix_ns) => (unix_ns - epoch).max(0) as Nanos,
    })
}

/// Creates an output file readable by its owner only (exports hold traffic too).
fn create_private(path: &Path) -> anyhow::Result<std::fs::File> {
    crate::files::create_private(path).with_context(|| format!("cannot create {}", path.display()))
}

/// A point in a tape: an offset from its start, or a wall-clock instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeArg {
    Offset(Duration),
    /// ns since the Unix epoch.
    At(i64),
}

fn parse_time(s: &str) -> Result<TimeArg, String> {
    if let Ok(d) = parse_duration(s) {
        return Ok(TimeArg::Offset(d));
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .map(TimeArg::At)
        .ok_or_else(|| {
            format!("{s:?} is neither an offset from the tape's start (`90s`, `5m`, `1h30m`) nor an RFC 3339 date-time (`2026-11-25T22:26:08Z`)")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times_parse_or_say_the_accepted_form() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("64 parsecs").unwrap_err().contains("KiB"));
        assert_eq!(
            parse_time("90s"),
            Ok(TimeArg::Offset(Duration::from_secs(90)))
        );
        assert!(matches!(
            parse_time("2026-11-25T22:26:08Z"),
            Ok(TimeArg::At(_))
        ));
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
