//! `loadtape testbed` and `loadtape drive`: the demo's parts as commands, for benchmarks, for
//! trying loadtape without a Quay, and for remaking the sample tapes (`captures/README.md`).
//! Their defaults fit each other: `loadtape drive` logs in with the account, token and key a
//! default `loadtape testbed` accepts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use crate::testbed::driver::{drive, Credentials, DriveOptions, TrafficModel};
use crate::testbed::shape::Shape;
use crate::testbed::{Config, Testbed, API_TOKEN, PASSWORD, PSK, USER};
use crate::units::parse_duration;

#[derive(Args, Debug)]
pub struct TestbedArgs {
    /// Where to listen.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    /// Latency, stalls and 502 bursts: `quay-clair` (as observed on real ones), `none`, or a
    /// TOML file (`seed`, `[[latency]]`, `[[stall]]`, `[[errors]]`; see `testbed/shape.rs`).
    #[arg(
        long,
        value_name = "quay-clair|none|FILE",
        default_value = "quay-clair"
    )]
    shape: String,
    /// Make the classes containing CLASS FACTOR times slower (a candidate release), e.g.
    /// `'POST /indexer/api/v1/index_report=4'`.
    #[arg(long, value_name = "CLASS=FACTOR")]
    slower: Vec<String>,
    /// The seed of the shape's dice.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
}

#[derive(Args, Debug)]
pub struct DriveArgs {
    /// Where requests go: the recording proxy in front of a testbed, or a testbed.
    #[arg(long, value_name = "HOST:PORT")]
    target: SocketAddr,
    /// The testbed itself: Clair fetches the layers it indexes from its storage.
    #[arg(long, value_name = "HOST:PORT")]
    testbed: SocketAddr,
    /// How long sessions keep arriving.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "30s")]
    duration: Duration,
    /// A traffic model (TOML: `sessions-per-second`, `[mix]`, `think-ms`, `diurnal`, `[burst]`,
    /// `images`, `layers`, `layer-kib`, `namespace`); the default otherwise.
    #[arg(long, value_name = "FILE")]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 2026)]
    seed: u64,
}

fn shape_of(args: &TestbedArgs) -> anyhow::Result<Shape> {
    let mut shape = match args.shape.as_str() {
        "quay-clair" => Shape::quay_clair(args.seed),
        "none" => Shape::default(),
        path => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("cannot read the shape {path} (or write quay-clair, none)")
            })?;
            toml::from_str(&text).with_context(|| format!("the shape {path} is not valid"))?
        }
    };
    for s in &args.slower {
        let Some((class, factor)) = s.rsplit_once('=') else {
            bail!("--slower {s:?}: write CLASS=FACTOR, e.g. 'POST /indexer/api/v1/index_report=4'");
        };
        let factor: f64 = factor
            .trim()
            .parse()
            .ok()
            .filter(|f: &f64| *f > 0.0)
            .with_context(|| {
                format!("--slower {s:?}: the factor must be a positive number, e.g. 4 or 1.5")
            })?;
        shape = shape.slower(class.trim(), factor);
    }
    shape.validate().map_err(anyhow::Error::msg)?;
    Ok(shape)
}

pub fn testbed(args: TestbedArgs) -> anyhow::Result<ExitCode> {
    let shape = shape_of(&args)?;
    if !args.listen.ip().is_loopback() {
        // A publicly known account, and a Clair that fetches any URL it is given.
        tracing::warn!(
            "the testbed listens on {}, beyond this machine: its account and key are public, and its Clair fetches whatever URL an index request names",
            args.listen
        );
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let config = Config::standard(shape);
        let t = Testbed::start_on(args.listen, config)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        eprintln!(
            "testbed on http://{}: registry v2 (token auth, account {USER}:{PASSWORD}), Quay API v1 (bearer {API_TOKEN}), Clair v4 (PSK {:?}, issuer quay), storage at /_storage/; Ctrl-C stops",
            t.addr,
            String::from_utf8_lossy(PSK)
        );
        tokio::signal::ctrl_c().await?;
        eprintln!("served: {:?}", t.served());
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn drive_command(args: DriveArgs) -> anyhow::Result<ExitCode> {
    let model = match &args.model {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the traffic model {}", path.display()))?;
            TrafficModel::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("the traffic model {}: {e}", path.display()))?
        }
        None => TrafficModel::default(),
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let options = DriveOptions {
        target: args.target,
        host: args.target.to_string(),
        storage: format!("http://{}/_storage/", args.testbed),
        duration: args.duration,
        seed: args.seed,
        model,
        credentials: Credentials::standard(),
    };
    let driven = runtime.block_on(drive(options, None))?;
    println!(
        "{}; statuses {:?}; {} failed",
        driven.describe(),
        driven.statuses,
        driven.failed
    );
    if !driven.unexpected.is_empty() {
        eprintln!("unexpected answers:\n  {}", driven.unexpected.join("\n  "));
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
