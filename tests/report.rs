//! Reports and diffs as users open them: the HTML in a real browser (Debian's Chromium,
//! headless), the other formats read back by what reads them.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::net::require;
use common::sink::{sink, Behaviour};
use common::*;
use loadtape::replay::{self, Live, ReplayConfig, Schedule};
use tokio_util::sync::CancellationToken;

fn loadtape(args: &[&str]) -> (i32, String, String) {
    let o = std::process::Command::new(loadtape_bin())
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// The shared Quay fixture as a tape, and a replay of it at x20 into a sink: a capture and a
/// results tape to report on.
async fn capture_and_results(dir: &Path) -> (PathBuf, PathBuf) {
    let tape = dir.join("quay");
    let har = Path::new(env!("CARGO_MANIFEST_DIR")).join("captures/har/quay-session.har");
    let (code, _, err) = loadtape(&[
        "import",
        har.to_str().unwrap(),
        "--out",
        tape.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let target = sink(Behaviour::default(), None).await;
    let results = dir.join("results.tape");
    let mut config = ReplayConfig::new(
        vec![tape.clone()],
        format!("http://{}", target.addr).parse().unwrap(),
    );
    config.plan.schedule = Schedule::Speed(20.0);
    config.out = Some(results.clone());
    tokio::task::spawn_blocking(move || {
        replay::run(&config, CancellationToken::new(), Arc::new(Live::default()))
    })
    .await
    .unwrap()
    .unwrap();
    (tape, results)
}

/// Runs headless Chromium on a local file with `flags`; its standard output and error.
fn chromium(page: &Path, flags: &[&str]) -> (String, String) {
    require("chromium", "chromium");
    let profile = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(flags)
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "chromium failed on {}: {}",
        page.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// Checks a page as Chromium built it: no console errors, and `charts` SVG charts of the
/// expected size with lines drawn in them; then that its screenshot (`height` pixels tall,
/// enough to reach the charts) has those lines' colour.
fn assert_renders(page: &Path, charts: usize, height: u32) {
    let (dom, log) = chromium(page, &["--dump-dom"]);
    assert!(
        !log.contains(":CONSOLE"),
        "the page logged to the console:\n{log}"
    );
    let svgs: Vec<&str> = dom.split("<svg").skip(1).collect();
    assert!(
        svgs.len() >= charts,
        "{} charts in {}, expected {charts}",
        svgs.len(),
        page.display()
    );
    for svg in &svgs {
        let svg = &svg[..svg.find("</svg>").expect("a closed svg")];
        let sized = (svg.contains("width=\"560\"") && svg.contains("height=\"320\""))
            || (svg.contains("width=\"560\"") && svg.contains("height=\"260\""));
        assert!(
            sized,
            "a chart of an unexpected size: {}",
            &svg[..200.min(svg.len())]
        );
        // The data lines: polylines with more than two points.
        let lines = svg
            .split("<polyline")
            .skip(1)
            .filter(|p| {
                p.split("points=\"")
                    .nth(1)
                    .is_some_and(|pts| pts.split(' ').count() > 2)
            })
            .count();
        assert!(lines >= 1, "a chart without a data line");
    }
    // The screenshot: the candidate's orange (214, 96, 28) is on screen, in quantity.
    let shot = tempfile::tempdir().unwrap();
    let png = shot.path().join("page.png");
    chromium(
        page,
        &[
            &format!("--window-size=1280,{height}"),
            &format!("--screenshot={}", png.display()),
        ],
    );
    let mut decoder = png::Decoder::new(std::fs::File::open(&png).unwrap());
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1280, height));
    let channels = info.line_size / info.width as usize;
    let orange = buf[..info.buffer_size()]
        .chunks(channels)
        .filter(|p| {
            (p[0] as i32 - 214).abs() < 40
                && (p[1] as i32 - 96).abs() < 40
                && (p[2] as i32 - 28).abs() < 40
        })
        .count();
    assert!(
        orange > 500,
        "only {orange} pixels of the data lines' colour on screen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_reports_render_their_charts_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let (tape, results) = capture_and_results(dir.path()).await;
    let report = dir.path().join("report.html");
    let (code, _, err) = loadtape(&[
        "report",
        tape.to_str().unwrap(),
        "--format",
        "html",
        "--out",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    // Twelve busiest classes' CDFs, throughput and p99 over time.
    assert_renders(&report, 14, 2400);

    let diff = dir.path().join("diff.html");
    let (code, _, err) = loadtape(&[
        "diff",
        tape.to_str().unwrap(),
        results.to_str().unwrap(),
        "--format",
        "html",
        "--out",
        diff.to_str().unwrap(),
    ]);
    // The sink answers 200 where Quay answered 401 or 404: a regression, said so.
    assert_eq!(code, 1, "{err}");
    let html = std::fs::read_to_string(&diff).unwrap();
    let verdict = html.find("Verdict per endpoint class").unwrap();
    let charts = html.find("<svg").unwrap();
    assert!(verdict < charts, "the verdict table comes first");
    assert!(html.contains("new 2xx"));
    // Self-contained: nothing fetched at view time.
    for external in ["src=\"http", "href=\"http", "<script", "@import"] {
        assert!(!html.contains(external), "the page refers out: {external}");
    }
    // Below the verdict table and the examples of diverging answers.
    assert_renders(&diff, 14, 8000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_read_back_as_json_markdown_junit_and_hdr_logs() {
    let dir = tempfile::tempdir().unwrap();
    let (tape, results) = capture_and_results(dir.path()).await;
    let (code, json, err) = loadtape(&["report", tape.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["schema"], "loadtape.report/1");
    assert_eq!(v["all"]["count"], 63);
    assert_eq!(v["classes"]["GET /v2/auth"]["statuses"]["401"], 1);
    // The fixture's token requests cost ~200 ms each (bcrypt): the quantiles say so.
    let p50 = v["classes"]["GET /v2/auth"]["first_byte"]["p50_us"]
        .as_u64()
        .unwrap();
    assert!((150_000..300_000).contains(&p50), "{p50}");

    let (code, md, _) = loadtape(&["report", results.to_str().unwrap(), "--format", "markdown"]);
    assert_eq!(code, 0);
    assert!(md.contains("| `GET /v2/auth` | 8 |"), "{md}");

    // The shipped release gate's thresholds are the ones compared.
    let gate = Path::new(env!("CARGO_MANIFEST_DIR")).join("replay-profiles/ci-gate.toml");
    let (code, json, err) = loadtape(&[
        "diff",
        results.to_str().unwrap(),
        "--profile",
        gate.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(code == 0 || code == 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["gate"]["latency"].as_array().unwrap().len(), 3);
    assert_eq!(v["baseline_kind"], "recorded-baseline");
    assert!(v["classes"].as_array().unwrap().iter().any(|c| c["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["what"] == "p99.9")));

    // The interval log HdrHistogram's own tools read: one tagged histogram per class.
    let log = dir.path().join("latency.hlog");
    let (code, _, err) = loadtape(&[
        "report",
        tape.to_str().unwrap(),
        "--format",
        "hdr-log",
        "--out",
        log.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::read(&log).unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for entry in hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&bytes) {
        if let Ok(hdrhistogram::serialization::interval_log::LogEntry::Interval(h)) = entry {
            let tag = h.tag().map(|t| t.as_str().to_string()).unwrap_or_default();
            let histogram: hdrhistogram::Histogram<u64> =
                hdrhistogram::serialization::Deserializer::new()
                    .deserialize(&mut base64_decode(h.encoded_histogram()).as_slice())
                    .unwrap();
            counts.insert(tag, histogram.len());
        }
    }
    assert_eq!(counts.get("GET_/v2/auth"), Some(&8), "{counts:?}");
    assert_eq!(counts.get("all"), Some(&63), "{counts:?}");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
