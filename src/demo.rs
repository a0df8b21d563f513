//! `loadtape demo`: the whole story in under a minute, with nothing installed.
//!
//! 1. A Quay/Clair testbed (`testbed/`, shaped as the real ones: bcrypt-priced token and API
//!    calls, a heavy-tailed Clair index, a periodic index stall, 502 bursts on API writes)
//!    serves production-shaped load from the traffic driver, through `loadtape record`.
//! 2. The tape is inspected.
//! 3. It is replayed at x1 against a second testbed, identical (same seed, same shapes) but for
//!    a Clair index four times slower: the candidate release. The diff against the recording
//!    must flag `POST /indexer/api/v1/index_report` and nothing else.
//! 4. It is replayed again at x4 against a fresh copy of the candidate: where does it start to
//!    break? Reported, not gated.
//! 5. The HTML report of step 3 is written; the commands to do the same by hand are printed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::inspect::summarise;
use crate::replay::auth::{Auth, Credential, Rule};
use crate::report::dataset::Phase;
use crate::report::diff::{compare, Comparison};
use crate::report::verdict::{Gate, Verdict};
use crate::select::Selection;
use crate::tape::TapeReader;
use crate::testbed::driver::{drive, Credentials, DriveOptions, TrafficModel};
use crate::testbed::shape::Shape;
use crate::testbed::{Config, Testbed, API_TOKEN, PASSWORD, PSK, USER};

/// The class the candidate made slower.
pub const SLOWER_CLASS: &str = "POST /indexer/api/v1/index_report";
const SLOWER_BY: f64 = 4.0;
const SEED: u64 = 2026;

/// What the demo made, for tests.
pub struct DemoOutput {
    pub dir: PathBuf,
    pub tape_dir: PathBuf,
    pub requests: u64,
    /// The x1 comparison's regressed classes.
    pub regressed: Vec<String>,
    pub verdict: Verdict,
}

/// Fresh credentials for the replay, as a profile's `[[auth]]` would give them.
fn auth() -> anyhow::Result<Auth> {
    Ok(Auth::new(vec![
        Rule {
            prefix: "/v2/".into(),
            fingerprint: None,
            account: None,
            credential: Credential::RegistryToken(Credential::basic(USER, PASSWORD)?),
        },
        Rule {
            prefix: "/api/v1/".into(),
            fingerprint: None,
            account: None,
            credential: Credential::Bearer(
                http::HeaderValue::from_str(&format!("Bearer {API_TOKEN}"))
                    .context("a header value")?,
            ),
        },
        Rule {
            prefix: "/".into(),
            fingerprint: None,
            account: None,
            credential: Credential::Jwt {
                key: PSK.to_vec(),
                issuer: "quay".into(),
            },
        },
    ]))
}

pub fn run(out: &Option<PathBuf>, seconds: f64) -> anyhow::Result<DemoOutput> {
    let dir = match out {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "loadtape-demo-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3f")
        )),
    };
    let tape_dir = dir.join("recorded");
    if tape_dir.exists() || dir.join("replay-x1.tape").exists() {
        anyhow::bail!(
            "{} already holds a demo's tapes (tapes are never overwritten): give --out a new or empty directory, or leave it out for a fresh temporary one",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    println!("loadtape demo: record production-shaped Quay/Clair traffic, replay it against a");
    println!("candidate whose Clair index is {SLOWER_BY}x slower, and gate on the diff.\n");

    // 1. Record.
    let recorded = runtime.block_on(Testbed::start(Config::standard(Shape::quay_clair(SEED))))?;
    println!(
        "1. record: a Quay/Clair testbed on {} (bcrypt-priced tokens and API calls, a heavy-tailed",
        recorded.addr
    );
    println!(
        "   Clair index that stalls every 8 s, 502 bursts on API writes), `loadtape record` in"
    );
    println!(
        "   front of it, and the traffic driver's pulls, pushes, API calls and Clair reports for {seconds:.0} s"
    );
    let mut record = crate::record::RecordConfig::new(
        "127.0.0.1:0".parse()?,
        format!("http://{}", recorded.addr).parse()?,
        tape_dir.clone(),
    );
    record.bodies = crate::record::BodyCapture::Prefix(64 << 10);
    let recorder = runtime.block_on(crate::record::Recorder::bind(record))?;
    let proxy = recorder.local_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let recording = runtime.spawn(recorder.run(stop.clone()));
    let progress = Arc::new(AtomicU64::new(0));
    let driving = {
        let progress = progress.clone();
        let options = DriveOptions {
            target: proxy,
            host: proxy.to_string(),
            storage: format!("http://{}/_storage/", recorded.addr),
            duration: Duration::from_secs_f64(seconds),
            seed: SEED,
            model: TrafficModel::default(),
            credentials: Credentials::standard(),
        };
        runtime.spawn(async move { drive(options, Some(&progress)).await })
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    while !driving.is_finished() {
        std::thread::sleep(Duration::from_millis(250));
        if terminal {
            print!(
                "\r   {} requests recorded",
                progress.load(Ordering::Relaxed)
            );
            let _ = std::io::Write::flush(&mut std::io::stdout());
        }
    }
    let driven = runtime.block_on(driving)??;
    stop.cancel();
    runtime.block_on(recording)??;
    println!(
        "{}   {}, written to {}",
        if terminal { "\r" } else { "" },
        driven.describe(),
        tape_dir.display()
    );

    println!("\n2. inspect the tape\n");
    let inspected = summarise(TapeReader::open_one(&tape_dir)?, &Selection::default())?;
    for line in inspected.to_text().lines().take(14) {
        println!("   {line}");
    }

    // 2. Replay at x1 against the candidate.
    let candidate = |runtime: &tokio::runtime::Runtime| {
        runtime.block_on(Testbed::start(Config::standard(
            Shape::quay_clair(SEED).slower(SLOWER_CLASS, SLOWER_BY),
        )))
    };
    let x1 = candidate(&runtime)?;
    println!(
        "\n3. replay at x1 against the candidate on {} (the same testbed, its Clair index {SLOWER_BY}x slower)\n",
        x1.addr
    );
    let (comparison, replayed, baseline) =
        replay(&tape_dir, &dir.join("replay-x1.tape"), &recorded, &x1, 1.0)?;
    for line in comparison.to_text(12).lines() {
        println!("   {line}");
    }
    let html = dir.join("diff-x1.html");
    let page = crate::report::html::diff(&comparison, &baseline, &replayed)?;
    crate::files::create_private(&html)
        .and_then(|mut f| std::io::Write::write_all(&mut f, page.as_bytes()))
        .with_context(|| format!("cannot write {}", html.display()))?;

    // 3. Replay at x4: where does it break?
    let x4 = candidate(&runtime)?;
    println!(
        "\n4. replay at x4 against a fresh candidate: where does it start to break? (not gated)\n"
    );
    let (at_x4, _, _) = replay(&tape_dir, &dir.join("replay-x4.tape"), &recorded, &x4, 4.0)?;
    println!("   {}", at_x4.headline());
    for d in at_x4
        .classes
        .iter()
        .filter(|d| d.verdict == Verdict::Regression)
        .take(8)
    {
        println!("   {}: {}", d.class, crate::report::render::regressions(d));
    }

    let regressed: Vec<String> = comparison
        .classes
        .iter()
        .filter(|d| d.verdict == Verdict::Regression)
        .map(|d| d.class.clone())
        .collect();
    println!("\n5. the HTML report of the x1 diff: {}", html.display());
    println!("\nBy hand, against your own staging and test clusters:");
    println!(
        "   loadtape record --listen 0.0.0.0:8443 --upstream https://quay-staging --out tapes/"
    );
    println!("   loadtape replay tapes/ --target https://quay-test --profile replay-profiles/ci-gate.toml --out results.tape --gate");
    println!("   loadtape diff results.tape --format html --out report.html");
    println!("\nEverything is in {}", dir.display());
    drop((recorded, x1, x4));
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(DemoOutput {
        dir,
        tape_dir,
        requests: driven.requests,
        regressed,
        verdict: comparison.verdict,
    })
}

/// Replays the tape into `target` at `speed` (fresh credentials; the recorded testbed's
/// storage URLs mapped onto the target's) and compares it with the recording.
fn replay(
    tape: &Path,
    results: &Path,
    recorded: &Testbed,
    target: &Testbed,
    speed: f64,
) -> anyhow::Result<(
    Comparison,
    crate::report::dataset::Dataset,
    crate::report::dataset::Dataset,
)> {
    let mut config = crate::replay::ReplayConfig::new(
        vec![tape.to_path_buf()],
        format!("http://{}", target.addr).parse()?,
    );
    config.plan.schedule = crate::replay::Schedule::Speed(speed);
    config.out = Some(results.to_path_buf());
    config.auth = auth()?;
    config.rewrites = crate::replay::rewrite::Rewrites::new(
        &[crate::replay::rewrite::RewriteRule {
            from: Some(format!("http://{}/_storage/", recorded.addr)),
            path_prefix: None,
            to: format!("http://{}/_storage/", target.addr),
        }],
        &[],
    )?;
    let live = Arc::new(crate::replay::Live::default());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Progress on a terminal: requests answered so far.
    let shown = std::io::IsTerminal::is_terminal(&std::io::stdout()).then(|| {
        let (live, done) = (live.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                print!(
                    "\r   {} requests replayed, {} in flight",
                    live.completed.load(Ordering::Relaxed),
                    live.in_flight()
                );
                let _ = std::io::Write::flush(&mut std::io::stdout());
            }
            print!("\r{:60}\r", "");
        })
    });
    let report = crate::replay::run(&config, tokio_util::sync::CancellationToken::new(), live);
    done.store(true, Ordering::Relaxed);
    if let Some(t) = shown {
        let _ = t.join();
    }
    let report = report?;
    let crate::report::Summary {
        replayed,
        recorded: baseline,
        ..
    } = report.summary;
    let comparison = compare(&baseline, &replayed, &Gate::default(), Phase::FirstByte);
    Ok((comparison, replayed, baseline))
}
