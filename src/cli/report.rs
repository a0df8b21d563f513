//! `loadtape report` and `loadtape diff`: flags, reading, writing, exit codes.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::endpoint::Classifier;
use crate::report::dataset::{load, Dataset, Phase, Window};
use crate::report::diff::{compare, default_phase, Comparison};
use crate::report::verdict::Gate;
use crate::tape::ReadOptions;
use crate::units::parse_duration;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Text,
    Json,
    Markdown,
    Html,
    Junit,
    /// HdrHistogram's interval log (`.hlog`): one tagged histogram per class.
    HdrLog,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PhaseArg {
    /// From the request's send to the response head.
    FirstByte,
    /// From the intended instant to the last byte.
    Total,
}

impl From<PhaseArg> for Phase {
    fn from(p: PhaseArg) -> Phase {
        match p {
            PhaseArg::FirstByte => Phase::FirstByte,
            PhaseArg::Total => Phase::Total,
        }
    }
}

/// Which requests count.
#[derive(Args, Debug, Clone)]
pub struct WindowArgs {
    /// Leave the first DURATION of each input out (a cold start, caches warming).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    warmup: Option<Duration>,
    /// Only requests from this offset into each input (`30s`, `5m`).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    from: Option<Duration>,
    /// Only requests before this offset into each input.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    to: Option<Duration>,
    /// Skip damaged frames (counted) instead of stopping at the first.
    #[arg(long)]
    lenient: bool,
}

impl WindowArgs {
    fn window(&self) -> Window {
        Window {
            warmup: self.warmup.map_or(0, |d| d.as_nanos() as u64),
            from: self.from.map_or(0, |d| d.as_nanos() as u64),
            to: self.to.map(|d| d.as_nanos() as u64),
        }
    }

    fn read(&self) -> ReadOptions {
        ReadOptions {
            lenient: self.lenient,
            ..ReadOptions::default()
        }
    }
}

/// What to write, and where.
#[derive(Args, Debug)]
pub struct OutputArgs {
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Write here instead of standard output (created 0600).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A capture tape (the recorded baseline) or a replay's results, files or directories.
    #[arg(required = true, value_name = "TAPE_OR_RESULTS")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
    /// The latency shown (default: first byte for a capture, total for a replay).
    #[arg(long, value_enum)]
    phase: Option<PhaseArg>,
    /// A profile whose `[[endpoint]]` rules name classes the built-in ones do not know.
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    #[command(flatten)]
    window: WindowArgs,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The baseline: a capture tape or a replay's results. Given alone, a results tape is
    /// compared with the recording it carries.
    #[arg(value_name = "BASELINE")]
    baseline: PathBuf,
    /// The candidate: a replay's results (or another capture).
    #[arg(value_name = "CANDIDATE")]
    candidate: Option<PathBuf>,
    /// A profile whose `[gate]` sets the thresholds (the replay's own profile will do).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
    /// The latency compared (default: first byte against a recording, total between replays).
    #[arg(long, value_enum)]
    phase: Option<PhaseArg>,
    #[command(flatten)]
    window: WindowArgs,
}

/// Writes `text` to `out` (0600) or standard output.
fn emit(out: Option<&Path>, text: &str) -> anyhow::Result<()> {
    match out {
        Some(path) => {
            let mut f = crate::files::create_private(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            f.write_all(text.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

pub fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let (_, classes) = profile_of(args.profile.as_deref())?;
    let (data, _) = load(
        &args.paths,
        args.window.window(),
        &args.window.read(),
        &classes,
    )?;
    let phase = args.phase.map(Phase::from).unwrap_or(match data.kind {
        crate::report::dataset::Kind::Replay => Phase::Total,
        _ => Phase::FirstByte,
    });
    let text = match args.output.format {
        Format::Text => data.to_text(phase),
        Format::Json => serde_json::to_string_pretty(&data.to_json())? + "\n",
        Format::Markdown => data.to_markdown(phase),
        Format::Junit => data.to_junit(),
        Format::Html => crate::report::html::report(&data, phase)?,
        Format::HdrLog => String::from_utf8(crate::report::hdrlog::write(&[("", &data)], phase)?)?,
    };
    emit(args.output.out.as_deref(), &text)?;
    Ok(ExitCode::SUCCESS)
}

/// The gate and endpoint classes of a profile, or the defaults.
pub fn profile_of(profile: Option<&Path>) -> anyhow::Result<(Gate, Classifier)> {
    let Some(path) = profile else {
        return Ok((Gate::default(), Classifier::default()));
    };
    let (profile, _) = crate::replay::profile::Profile::load(path)?;
    let gate = profile.gate.unwrap_or_default();
    let problem = |e: String| anyhow::anyhow!("{}: {e}", path.display());
    gate.validate().map_err(problem)?;
    let classes = Classifier::new(&profile.endpoint).map_err(problem)?;
    Ok((gate, classes))
}

pub fn diff(args: DiffArgs) -> anyhow::Result<ExitCode> {
    let (gate, classes) = profile_of(args.profile.as_deref())?;
    let window = args.window.window();
    let read = args.window.read();
    let (first, recorded) = load(
        std::slice::from_ref(&args.baseline),
        window,
        &read,
        &classes,
    )?;
    let (base, cand) = match &args.candidate {
        Some(c) => {
            let (cand, _) = load(std::slice::from_ref(c), window, &read, &classes)?;
            (first, cand)
        }
        None => match recorded {
            Some(recorded) => (recorded, first),
            None => anyhow::bail!(
                "{} is a capture tape: compare it with a replay's results (`loadtape diff {} RESULTS`), or give a results tape alone to compare it with its recording",
                args.baseline.display(),
                args.baseline.display()
            ),
        },
    };
    let phase = args
        .phase
        .map(Phase::from)
        .unwrap_or_else(|| default_phase(base.kind, cand.kind));
    if phase != default_phase(base.kind, cand.kind) {
        tracing::warn!(
            "--phase {} compares what the two sides measure differently ({} and {}): the default phase is the like-for-like one",
            phase.name(),
            crate::report::render::kind_name(base.kind),
            crate::report::render::kind_name(cand.kind)
        );
    }
    let comparison = compare(&base, &cand, &gate, phase);
    write_comparison(
        &comparison,
        &base,
        &cand,
        args.output.format,
        args.output.out.as_deref(),
    )?;
    Ok(ExitCode::from(comparison.exit_code()))
}

pub fn write_comparison(
    c: &Comparison,
    base: &Dataset,
    cand: &Dataset,
    format: Format,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let text = match format {
        Format::Text => c.to_text(40),
        Format::Json => serde_json::to_string_pretty(c)? + "\n",
        Format::Markdown => c.to_markdown(),
        Format::Junit => c.to_junit(),
        Format::Html => crate::report::html::diff(c, base, cand)?,
        Format::HdrLog => String::from_utf8(crate::report::hdrlog::write(
            &[("baseline", base), ("candidate", cand)],
            c.phase,
        )?)?,
    };
    emit(out, &text)
}
