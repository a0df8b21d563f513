//! The command line: flags in, calls into the library, text and exit codes out.
//!
//! Exit codes: 0 success, 2 an error (bad input, a corrupt tape, I/O). Later commands that
//! give verdicts (`diff`) add 1 for "regression".

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
    /// Show what tapes hold: records, time span, rates, statuses, endpoints, damage.
    Inspect(InspectArgs),
    /// Write tape records out as HAR 1.2 or JSON lines.
    Export(ExportArgs),
    /// Turn a HAR file (browsers, mitmproxy, Charles) into a tape, credentials redacted.
    Import(ImportArgs),
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
pub struct DemoArgs {
    /// Where to write the demo's tapes and exports (default: a new temporary directory).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Runs the command line; the binary's `main` is only this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOADTAPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Inspect(args) => inspect(args),
        Command::Export(args) => export(args),
        Command::Import(args) => import(args),
        Command::Demo(args) => crate::demo::run(&args.out).map(|_| ExitCode::SUCCESS),
    }
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
    let epoch = sources
        .iter()
        .map(|s| s.header.epoch_unix_ns)
        .min()
        .unwrap_or(0);
    let resolve = |t: &TimeArg| -> Nanos {
        match t {
            TimeArg::Offset(d) => d.as_nanos() as Nanos,
            TimeArg::At(unix_ns) => (unix_ns - epoch).max(0) as Nanos,
        }
    };
    let options = ReadOptions {
        lenient: args.lenient,
        from: args.from.as_ref().map(resolve),
        to: args.to.as_ref().map(resolve),
        reorder_window: args.reorder_window.as_nanos() as Nanos,
    };
    let selection = Selection {
        statuses: args.statuses.clone(),
        endpoint: args.endpoint.clone(),
    };
    Ok((TapeReader::from_sources(sources, &options), selection))
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

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}): write e.g. `500ms`, `90s`, `5m`"))
}

/// `64KiB`, `1MiB`, `10MB`, `4096`: a size in bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: write e.g. `4096`, `64KiB`, `16MiB`, `1GiB`"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{s:?} has an unknown unit: use B, KiB, MiB, GiB (or kB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
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
