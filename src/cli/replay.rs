//! `loadtape replay` and `loadtape merge`: flags and profile in, a [`ReplayConfig`] out; the
//! progress line, Ctrl-C, and the summary.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use http::header::{HeaderName, HeaderValue};
use tokio_util::sync::CancellationToken;

use super::{parse_time, resolve_time, ConnectionsArg, MergeArgs, ReplayArgs, TimeArg};
use crate::replay::profile::Profile;
use crate::replay::{self, ConnectionMode, Live, Protocol, ReplayConfig, Schedule};
use crate::tape::reader::discover;
use crate::units::parse_duration;

pub(super) fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let (profile, profile_hash) = match &args.profile {
        Some(p) => {
            let (profile, hash) = Profile::load(p)?;
            (profile, Some(hash))
        }
        None => (Profile::default(), None),
    };
    let config = configure(&args, &profile, profile_hash)?;
    // The gate's thresholds are checked before a long run, not after it.
    let (gate, _) = super::report::profile_of(args.profile.as_deref())?;
    if args.dry_run {
        let summary = replay::dry_run(&config)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            print!("{}", summary.to_text());
        }
        return Ok(ExitCode::SUCCESS);
    }

    let stop = CancellationToken::new();
    watch_signals(stop.clone());
    let live = Arc::new(Live::default());
    let progress = show_progress(live.clone(), config.plan.duration);
    let result = replay::run(&config, stop, live);
    progress.finish();
    let report = result?;
    // The closing comparison: the replay against the recording its results carry.
    let comparison = Some(crate::report::diff::compare(
        &report.summary.recorded,
        &report.summary.replayed,
        &gate,
        crate::report::dataset::Phase::FirstByte,
    ));
    if args.json {
        let mut json = serde_json::to_value(report.to_json())?;
        if let (Some(c), Some(map)) = (&comparison, json.as_object_mut()) {
            map.insert("diff".into(), serde_json::to_value(c)?);
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", report.to_text());
        if let Some(c) = &comparison {
            print!("\n{}", c.to_text(20));
        }
    }
    match (&comparison, args.gate) {
        (Some(c), true) => Ok(ExitCode::from(c.exit_code())),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Flags over profile over defaults.
fn configure(
    args: &ReplayArgs,
    profile: &Profile,
    profile_hash: Option<String>,
) -> anyhow::Result<ReplayConfig> {
    let target = match (&args.target, &profile.target) {
        (Some(t), _) => t.clone(),
        (None, Some(t)) => t
            .parse()
            .with_context(|| format!("the profile's target {t:?} is not a URL"))?,
        (None, None) => bail!(
            "--target is required (or `target` in the profile): the URL of the test cluster, e.g. --target http://quay-test:8080"
        ),
    };
    let mut config = ReplayConfig::new(args.paths.clone(), target);

    let ramp = args.ramp.as_deref().or(profile.ramp.as_deref());
    config.plan.schedule = if let Some(x) = args.speed {
        speed(x)?
    } else if let Some(r) = args.rate {
        rate(r)?
    } else if let Some(r) = ramp {
        parse_ramp(r)?
    } else if let Some(x) = profile.speed {
        speed(x)?
    } else if let Some(r) = profile.rate {
        rate(r)?
    } else {
        Schedule::Speed(1.0)
    };

    let sources = discover(&args.paths)?;
    let profile_time = |s: &Option<String>, what: &str| -> anyhow::Result<Option<TimeArg>> {
        s.as_deref()
            .map(|t| parse_time(t).map_err(|e| anyhow::anyhow!("the profile's {what}: {e}")))
            .transpose()
    };
    let from = args.from.clone().or(profile_time(&profile.from, "from")?);
    let to = args.to.clone().or(profile_time(&profile.to, "to")?);
    config.plan.read.from = resolve_time(&sources, from.as_ref());
    config.plan.read.to = resolve_time(&sources, to.as_ref());
    config.plan.read.lenient = args.lenient;
    config.plan.duration = match args.duration {
        Some(d) => Some(d),
        None => profile
            .duration
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(anyhow::Error::msg)?,
    };
    config.plan.limit = args.limit.or(profile.limit);
    config.plan.looped = args.looped || profile.looped.unwrap_or(false);
    config.plan.shard = args.shard;
    config.plan.connections = match (args.connections, profile.connections.as_deref()) {
        (Some(ConnectionsArg::Pooled), _) | (None, Some("pooled")) => ConnectionMode::Pooled,
        (Some(ConnectionsArg::Preserve), _) | (None, Some("preserve")) | (None, None) => {
            ConnectionMode::Preserve
        }
        (None, Some(other)) => {
            bail!("the profile's connections = {other:?}: write \"preserve\" or \"pooled\"")
        }
    };
    let regexes = |v: &[String], what: &str| -> anyhow::Result<Vec<regex::Regex>> {
        v.iter()
            .map(|r| {
                regex::Regex::new(r).with_context(|| {
                    format!("the profile's filter.{what} {r:?} is not a regular expression")
                })
            })
            .collect()
    };
    config.plan.filter.include = regexes(&profile.filter.include, "include")?;
    config.plan.filter.exclude = regexes(&profile.filter.exclude, "exclude")?;
    config.plan.filter.fraction = args.fraction.or(profile.filter.fraction);
    if let Some(f) = config.plan.filter.fraction {
        if !(f > 0.0 && f <= 1.0) {
            bail!("--fraction {f} must be in (0, 1], e.g. 0.25 for a quarter of the connections");
        }
    }
    config.plan.filter.methods = profile
        .filter
        .methods
        .iter()
        .map(|m| m.to_ascii_uppercase())
        .collect();

    config.out = args.out.clone();
    if args.threads == 0 {
        bail!("--threads 0 would send nothing: give at least 1");
    }
    config.threads = args.threads;
    config.max_in_flight = args.max_in_flight.or(profile.max_in_flight);
    if config.max_in_flight == Some(0) {
        bail!("--max-in-flight 0 would send nothing: give at least 1, or leave it out for no cap");
    }
    for h in profile.headers.iter().chain(args.headers.iter()) {
        config.headers.push(parse_header(h)?);
    }
    config.auth = crate::replay::auth::Auth::from_rules(&profile.auth)?;
    config.rewrites =
        crate::replay::rewrite::Rewrites::new(&profile.rewrite, &profile.remove_headers)?;
    config.state = profile.state.clone();
    config.classes =
        crate::endpoint::Classifier::new(&profile.endpoint).map_err(anyhow::Error::msg)?;
    config.insecure = args.insecure || profile.insecure.unwrap_or(false);
    config.ca = args.ca.clone().or(profile.ca.clone());
    config.force = if args.http1 {
        Some(Protocol::Http1)
    } else if args.http2 {
        Some(Protocol::Http2)
    } else {
        match profile.http {
            None => None,
            Some(1) => Some(Protocol::Http1),
            Some(2) => Some(Protocol::Http2),
            Some(n) => bail!("the profile's http = {n}: write 1 or 2"),
        }
    };
    if let Some(t) = &args.start_at {
        let at = chrono::DateTime::parse_from_rfc3339(t)
            .ok()
            .and_then(|t| t.timestamp_nanos_opt())
            .with_context(|| {
                format!("--start-at {t:?} is not an RFC 3339 date-time (e.g. 2026-11-26T10:00:00Z)")
            })?;
        config.start_at = Some(at);
    }
    let profile_duration = |v: &Option<String>| -> anyhow::Result<Option<Duration>> {
        v.as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(anyhow::Error::msg)
    };
    if let Some(t) = args.timeout.or(profile_duration(&profile.timeout)?) {
        config.timeout = t;
    }
    if let Some(l) = args.lag_limit.or(profile_duration(&profile.lag_limit)?) {
        config.lag_limit = l;
    }
    if config.plan.looped && config.plan.duration.is_none() && config.plan.limit.is_none() {
        tracing::warn!("--loop without --duration or --limit runs until Ctrl-C");
    }

    config.provenance = vec![
        (
            "command".into(),
            std::env::args().collect::<Vec<_>>().join(" "),
        ),
        ("loadtape".into(), env!("CARGO_PKG_VERSION").into()),
        ("schedule".into(), format!("{:?}", config.plan.schedule)),
        (
            "lag_limit_us".into(),
            config.lag_limit.as_micros().to_string(),
        ),
    ];
    if let Some(h) = profile_hash {
        config.provenance.push(("profile_sha256".into(), h));
    }
    if let Some(s) = &config.plan.shard {
        config
            .provenance
            .push(("shard".into(), format!("{}/{}", s.index, s.count)));
    }
    Ok(config)
}

fn speed(x: f64) -> anyhow::Result<Schedule> {
    if !(x.is_finite() && x > 0.0) {
        bail!("--speed {x} must be a positive multiple of the recorded speed, e.g. 1, 0.5, 10");
    }
    Ok(Schedule::Speed(x))
}

fn rate(r: f64) -> anyhow::Result<Schedule> {
    if !(r.is_finite() && r > 0.0) {
        bail!("--rate {r} must be a positive number of requests per second, e.g. 200");
    }
    Ok(Schedule::Rate(r))
}

fn parse_ramp(s: &str) -> anyhow::Result<Schedule> {
    let bad = || {
        anyhow::anyhow!(
            "--ramp {s:?} is not FROM:TO:DURATION with rates in requests per second, e.g. 10:500:5m"
        )
    };
    let mut parts = s.splitn(3, ':');
    let from: f64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let to: f64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let over = parts
        .next()
        .and_then(|p| parse_duration(p).ok())
        .ok_or_else(bad)?;
    if !(from >= 0.0 && to > 0.0 && over > Duration::ZERO) || (from == 0.0 && to == 0.0) {
        return Err(bad());
    }
    Ok(Schedule::Ramp { from, to, over })
}

fn parse_header(s: &str) -> anyhow::Result<(HeaderName, HeaderValue)> {
    let bad = || {
        anyhow::anyhow!("--header {s:?} is not 'Name: value' (e.g. 'Authorization: Bearer abc')")
    };
    let (name, value) = s.split_once(':').ok_or_else(bad)?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
    let value = HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
    Ok((name, value))
}

/// Ctrl-C or SIGTERM stops sending and lets in-flight requests finish; a second one exits.
fn watch_signals(stop: CancellationToken) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("\nstopping: no new requests; waiting for those in flight (Ctrl-C again to quit now)");
            stop.cancel();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            std::process::exit(130);
        });
    });
}

/// The progress line: quiet when standard error is not a terminal.
struct Progress {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn show_progress(live: Arc<Live>, duration: Option<Duration>) -> Progress {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if !std::io::stderr().is_terminal() {
        return Progress { stop, handle: None };
    }
    let stopped = stop.clone();
    let handle = std::thread::spawn(move || {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .expect("a valid template"),
        );
        let mut last = (Instant::now(), 0u64);
        while !stopped.load(Ordering::Relaxed) {
            let sent = live.sent.load(Ordering::Relaxed);
            let dt = last.0.elapsed().as_secs_f64().max(1e-3);
            let rate = (sent - last.1) as f64 / dt;
            if last.0.elapsed() >= Duration::from_secs(1) {
                last = (Instant::now(), sent);
            }
            let tape = Duration::from_nanos(live.clock.load(Ordering::Relaxed));
            let remaining = duration
                .map(|d| {
                    format!(
                        ", {} left",
                        humantime::format_duration(round(d.saturating_sub(tape)))
                    )
                })
                .unwrap_or_default();
            bar.set_message(format!(
                "tape {}{remaining}  sent {sent}  in flight {}  {rate:.0}/s  errors {}  p99 {}",
                humantime::format_duration(round(tape)),
                live.in_flight(),
                live.failed.load(Ordering::Relaxed),
                crate::report::micros(live.recent_p99_us.load(Ordering::Relaxed)),
            ));
            bar.tick();
            std::thread::sleep(Duration::from_millis(200));
        }
        bar.finish_and_clear();
    });
    Progress {
        stop,
        handle: Some(handle),
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

pub(super) fn merge(args: MergeArgs) -> anyhow::Result<ExitCode> {
    let merged = crate::report::merge::merge(&args.paths, &args.out)?;
    eprintln!(
        "merged {} records from {} results tapes into {}",
        merged.records,
        merged.inputs,
        args.out.display()
    );
    print!("{}", merged.summary.to_text(20));
    Ok(ExitCode::SUCCESS)
}
