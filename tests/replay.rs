//! Replay: the schedule kept against a sink that stamps arrivals, the open model with a stalled
//! target, real registry pulls replayed, redirects not followed, shards merged, and the flags.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::sink::{id_of, sink, witness, Behaviour};
use common::*;
use loadtape::replay::{self, ConnectionMode, Live, ReplayConfig, ReplayReport, Schedule, Shard};
use loadtape::tape::{
    Body, CloseReason, ConnectionClosed, ConnectionOpened, Exchange, Headers, HttpVersion, Method,
    Outcome, Record, Replayed, Request, Response, Scheme, Timing,
};
use tokio_util::sync::CancellationToken;

const MS: u64 = 1_000_000;

/// The tests here measure time: they run one at a time, so that one's load (a registry, TLS
/// handshakes, a loadtape process) does not show as another's lag.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A recorded GET of `/r/{id}` on connection `conn`, starting at `start` ns.
fn get(id: u64, conn: u64, start: u64, version: HttpVersion) -> Record {
    let mut headers = Headers::new();
    headers.push(
        "user-agent",
        "containers/5.23 (github.com/containers/image)",
    );
    Record::Exchange(Box::new(Exchange {
        id,
        connection: conn,
        stream: 0,
        client: None,
        timing: Timing {
            start,
            request_done: 0,
            response_head: Some(MS),
            response_done: 2 * MS,
        },
        request: Request {
            method: Method::Get,
            scheme: Scheme::Http,
            authority: "quay.staging:8080".into(),
            target: format!("/r/{id}"),
            version,
            headers,
            body: Body::empty(),
        },
        response: Ok(Response {
            status: 200,
            version,
            headers: Headers::new(),
            body: Body::empty(),
        }),
        issued_secrets: vec![],
        upgraded: false,
    }))
}

fn opened(id: u64, at: u64, version: HttpVersion) -> Record {
    Record::ConnectionOpened(Box::new(ConnectionOpened {
        id,
        at,
        client: None,
        version,
        tls: None,
    }))
}

fn closed(id: u64, at: u64, exchanges: u64) -> Record {
    Record::ConnectionClosed(Box::new(ConnectionClosed {
        id,
        at,
        reason: CloseReason::Client,
        exchanges,
    }))
}

/// A tape of one request per connection at the given instants, each connection opened 5 ms
/// before its request, as a client that connects then asks.
fn tape_at(dir: &Path, starts: &[u64]) -> PathBuf {
    let mut records = Vec::new();
    for (i, &s) in starts.iter().enumerate() {
        let id = i as u64 + 1;
        records.push(opened(id, s.saturating_sub(5 * MS), HttpVersion::Http11));
        records.push(get(id, id, s, HttpVersion::Http11));
        records.push(closed(id, s + 3 * MS, 1));
    }
    records.sort_by_key(|r| r.start());
    let path = dir.join("recorded.tape");
    write(&path, &records, Default::default(), true);
    path
}

fn config(tape: &Path, target: std::net::SocketAddr) -> ReplayConfig {
    ReplayConfig::new(
        vec![tape.to_path_buf()],
        format!("http://{target}").parse().unwrap(),
    )
}

/// Runs a replay off the test's runtime (it keeps its own) and returns its report.
async fn run(config: ReplayConfig) -> ReplayReport {
    tokio::task::spawn_blocking(move || {
        replay::run(&config, CancellationToken::new(), Arc::new(Live::default()))
    })
    .await
    .unwrap()
    .unwrap()
}

fn results(path: &Path) -> Vec<Replayed> {
    let (records, _) = read_one(path).unwrap();
    records
        .into_iter()
        .filter_map(|r| match r {
            Record::Replayed(r) => Some(*r),
            _ => None,
        })
        .collect()
}

/// Recorded instants with bursts: 5 requests 1 ms apart, then quiet, then another burst.
fn bursty() -> Vec<u64> {
    let mut starts = Vec::new();
    let mut t = 20 * MS;
    for burst in 0..6u64 {
        for k in 0..5 {
            starts.push(t + k * MS);
        }
        t += (150 + 40 * burst) * MS;
    }
    starts
}

/// Checks that arrivals keep the recorded gaps divided by `speed`: measured from the median
/// offset (so one late first arrival does not shift them all), at least 90% within
/// `tolerance`. A shared machine may stall a few of them; a wrong speed or a schedule that
/// drifts moves nearly all of them by far more.
fn assert_follows(arrivals: &[common::sink::Arrival], starts: &[u64], speed: f64, tolerance: u64) {
    assert_eq!(arrivals.len(), starts.len(), "every request arrived");
    let mut by_id: Vec<_> = arrivals
        .iter()
        .map(|a| (id_of(&a.path).unwrap(), a.at))
        .collect();
    by_id.sort();
    let first = by_id[0].1;
    // Arrival minus schedule, relative to the first arrival.
    let offsets: Vec<i64> = by_id
        .iter()
        .enumerate()
        .map(|(i, (id, at))| {
            assert_eq!(*id, i as u64 + 1);
            let expected = ((starts[i] - starts[0]) as f64 / speed) as i64;
            at.duration_since(first).as_nanos() as i64 - expected
        })
        .collect();
    let mut sorted = offsets.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    let errors: Vec<u64> = offsets
        .iter()
        .map(|o| (o - median).unsigned_abs())
        .collect();
    let off: Vec<String> = errors
        .iter()
        .enumerate()
        .filter(|(_, e)| **e > tolerance)
        .map(|(i, e)| format!("request {} off by {:.3} ms", i + 1, *e as f64 / 1e6))
        .collect();
    assert!(
        off.len() * 10 <= errors.len(),
        "x{speed}: {} of {} requests off the schedule by more than {:.1} ms: {off:?}",
        off.len(),
        errors.len(),
        tolerance as f64 / 1e6
    );
    eprintln!(
        "x{speed}: worst arrival error {:.3} ms over {} requests ({} beyond the tolerance)",
        *errors.iter().max().unwrap() as f64 / 1e6,
        by_id.len(),
        off.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrivals_follow_the_recorded_timing_at_x1_and_x10_bursts_included() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let starts = bursty();
    let tape = tape_at(dir.path(), &starts);
    for speed in [1.0, 10.0] {
        let target = sink(Behaviour::default(), None).await;
        let mut c = config(&tape, target.addr);
        c.plan.schedule = Schedule::Speed(speed);
        // Two clocks at x10: connections spread over both keep one timeline.
        c.threads = if speed > 1.0 { 2 } else { 1 };
        c.out = Some(dir.path().join(format!("x{speed}.tape")));
        // Validity is the dispatch lag's p99, over 30 requests their maximum: held to what a
        // machine that stalls a time slice still meets (the arrivals are checked below).
        c.lag_limit = Duration::from_millis(20);
        let report = run(c).await;
        assert!(report.valid, "{}", report.to_text());
        // A burst's 1 ms gaps become 0.1 ms at x10: the tolerance (a scheduler time slice on a
        // busy 2-core machine, where the target shares the cores) is well under the gaps between
        // bursts (>= 15 ms at x10), so a wrong speed fails.
        assert_follows(&target.arrivals(), &starts, speed, 4 * MS);
        // One live connection per recorded one, as the tape opened them.
        assert_eq!(report.connections_opened, starts.len() as u64);
        // The results say when each request was meant to go: the recorded instants, scaled.
        let mut res = results(&dir.path().join(format!("x{speed}.tape")));
        res.sort_by_key(|r| r.exchange);
        let zero = res[0].intended;
        for (r, s) in res.iter().zip(&starts) {
            let expected = ((s - starts[0]) as f64 / speed) as u64;
            assert!((r.intended - zero).abs_diff(expected) <= 1000, "{r:?}");
            assert_eq!(r.outcome, Outcome::Status(200));
            assert_eq!(r.recorded.status, Some(200));
            assert!(r.first_byte.is_some() && r.done >= r.first_byte.unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_target_shows_as_latency_from_the_intended_instant_not_as_fewer_requests() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // 60 requests at a constant 100 per second; the target holds /r/11 to /r/20 for 300 ms.
    let starts: Vec<u64> = (0..60).map(|i| i * 10 * MS).collect();
    let tape = tape_at(dir.path(), &starts);
    let target = sink(
        Behaviour {
            stall: Some((11..21, Duration::from_millis(300))),
            ..Behaviour::default()
        },
        None,
    )
    .await;
    let mut c = config(&tape, target.addr);
    c.plan.schedule = Schedule::Rate(100.0);
    c.plan.connections = ConnectionMode::Pooled;
    // What is asserted is the open model, not microsecond precision (the arrivals test's):
    // a generous limit keeps a busy machine's scheduling hiccup from failing it.
    c.lag_limit = Duration::from_millis(100);
    let out = dir.path().join("results.tape");
    c.out = Some(out.clone());
    let report = run(c).await;
    assert!(report.valid, "{}", report.to_text());
    let mut res = results(&out);
    res.sort_by_key(|r| r.exchange);
    assert_eq!(res.len(), 60);
    let latency_ms = |id: u64| res[id as usize - 1].latency() as f64 / 1e6;
    // Open model: requests kept going out on schedule during the stall. A closed model would
    // have sent /r/12 onwards up to 300 ms late; a stalled machine delays a few by a time slice.
    for r in &res {
        assert!(
            r.sent < 100 * MS,
            "request {} went out {:.1} ms late: the stall held the schedule back",
            r.exchange,
            r.sent as f64 / 1e6
        );
    }
    let mut sent: Vec<u64> = res.iter().map(|r| r.sent).collect();
    sent.sort();
    assert!(
        sent[30] < 2 * MS,
        "median send lag {:.1} ms",
        sent[30] as f64 / 1e6
    );
    // The first stalled request waited the whole hold; later ones less; after the stall, fast.
    assert!(latency_ms(11) >= 290.0, "{}", latency_ms(11));
    assert!(latency_ms(20) >= 190.0 && latency_ms(20) < latency_ms(11));
    for id in 35..=60 {
        assert!(
            latency_ms(id) < 100.0,
            "request {id}: {} ms",
            latency_ms(id)
        );
    }
    // The summary's p99 shows the stall.
    assert!(report.summary.replayed.all.total.value_at_quantile(0.99) >= 250_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_answers_to_measure_never_followed() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = witness().await;
    let target = sink(
        Behaviour {
            redirect_to: Some(format!("http://{}/blobs/storage", elsewhere.addr)),
            ..Behaviour::default()
        },
        None,
    )
    .await;
    let mut rec = get(1, 1, 0, HttpVersion::Http11);
    if let Record::Exchange(e) = &mut rec {
        e.request.target = "/redirect".into();
    }
    let tape = dir.path().join("redirect.tape");
    write(&tape, &[rec], Default::default(), true);
    let mut c = config(&tape, target.addr);
    c.out = Some(dir.path().join("results.tape"));
    run(c).await;
    let res = results(&dir.path().join("results.tape"));
    assert_eq!(res[0].outcome, Outcome::Status(307));
    assert_eq!(target.arrivals().len(), 1);
    assert_eq!(
        elsewhere.accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the redirect's host was contacted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_one_recorded_connection_share_one_live_connection_in_order() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // Three recorded connections of 10 requests each, interleaved in time.
    let mut records = Vec::new();
    for conn in 1..=3u64 {
        records.push(opened(conn, 0, HttpVersion::Http11));
        records.push(closed(conn, 400 * MS, 10));
    }
    for i in 0..30u64 {
        records.push(get(i + 1, i % 3 + 1, MS + i * 10 * MS, HttpVersion::Http11));
    }
    records.sort_by_key(|r| r.start());
    let tape = dir.path().join("conns.tape");
    write(&tape, &records, Default::default(), true);
    let target = sink(Behaviour::default(), None).await;
    let mut c = config(&tape, target.addr);
    c.plan.schedule = Schedule::Speed(4.0);
    c.threads = 2;
    let report = run(c).await;
    assert_eq!(report.summary.replayed.all.count, 30);
    let arrivals = target.arrivals();
    assert_eq!(
        target.connections.load(std::sync::atomic::Ordering::SeqCst),
        3
    );
    for conn in 1..=3u64 {
        // Every request of recorded connection `conn` came on one live connection, in order.
        let live: Vec<_> = arrivals
            .iter()
            .filter(|a| (id_of(&a.path).unwrap() - 1) % 3 + 1 == conn)
            .collect();
        assert_eq!(live.len(), 10);
        assert!(live.iter().all(|a| a.connection == live[0].connection));
        let ids: Vec<u64> = live.iter().map(|a| id_of(&a.path).unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_multiplex_and_https_targets_measure_tls() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = net::certificate(dir.path());
    let (cert_pem, key_pem) = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());
    let mut records = vec![opened(1, 0, HttpVersion::H2)];
    for i in 0..20u64 {
        records.push(get(i + 1, 1, MS + i * MS, HttpVersion::H2));
    }
    records.push(closed(1, 100 * MS, 20));
    let tape = dir.path().join("h2.tape");
    write(&tape, &records, Default::default(), true);

    // h2c by prior knowledge on a plain target.
    let plain = sink(Behaviour::default(), None).await;
    run(config(&tape, plain.addr)).await;
    let arrivals = plain.arrivals();
    assert_eq!(arrivals.len(), 20);
    assert!(arrivals.iter().all(|a| a.version == http::Version::HTTP_2));
    assert_eq!(
        plain.connections.load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // h2 by ALPN over real TLS, the certificate trusted by --ca.
    let tls = sink(Behaviour::default(), Some((&cert_pem, &key_pem))).await;
    let mut c = ReplayConfig::new(
        vec![tape.clone()],
        format!("https://localhost:{}", tls.addr.port())
            .parse()
            .unwrap(),
    );
    c.ca = Some(cert.clone());
    c.out = Some(dir.path().join("tls.tape"));
    let report = run(c).await;
    assert_eq!(report.summary.failed(), 0, "{}", report.to_text());
    assert!(tls
        .arrivals()
        .iter()
        .all(|a| a.version == http::Version::HTTP_2));
    let res = results(&dir.path().join("tls.tape"));
    assert_eq!(
        res.iter().filter(|r| r.tls.is_some()).count(),
        1,
        "the TLS handshake is charged once, to the connection's first request"
    );

    // Untrusted: every request fails with a TLS error, counted, nothing hangs.
    let mut c = ReplayConfig::new(
        vec![tape],
        format!("https://localhost:{}", tls.addr.port())
            .parse()
            .unwrap(),
    );
    c.timeout = Duration::from_secs(5);
    let report = run(c).await;
    assert_eq!(report.summary.failed(), 20, "{}", report.to_text());
    assert!(report.summary.replayed.all.statuses.contains_key("tls"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_shards_merged_equal_one_unsharded_replay() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // 40 recorded connections of 5 requests.
    let mut records = Vec::new();
    for conn in 1..=40u64 {
        records.push(opened(conn, conn * MS, HttpVersion::Http11));
        records.push(closed(conn, 300 * MS, 5));
    }
    for i in 0..200u64 {
        records.push(get(
            i + 1,
            i % 40 + 1,
            50 * MS + i * MS,
            HttpVersion::Http11,
        ));
    }
    records.sort_by_key(|r| r.start());
    let tape = dir.path().join("sharded.tape");
    write(&tape, &records, Default::default(), true);
    let target = sink(Behaviour::default(), None).await;

    let mut whole = config(&tape, target.addr);
    whole.plan.schedule = Schedule::Speed(4.0);
    whole.out = Some(dir.path().join("whole.tape"));
    run(whole).await;

    let start_at = loadtape::tape::now_unix_ns() + 300 * MS as i64;
    let mut shard_paths = Vec::new();
    let mut shards = Vec::new();
    for k in 0..4 {
        let mut c = config(&tape, target.addr);
        c.plan.schedule = Schedule::Speed(4.0);
        c.plan.shard = Some(Shard { index: k, count: 4 });
        c.start_at = Some(start_at);
        let p = dir.path().join(format!("shard-{k}.tape"));
        c.out = Some(p.clone());
        shard_paths.push(p);
        // All four at once, as on four machines.
        shards.push(tokio::spawn(run(c)));
    }
    let mut sizes = Vec::new();
    for s in shards {
        sizes.push(s.await.unwrap().summary.replayed.all.count);
    }
    assert!(
        sizes.iter().all(|&n| n > 0 && n % 5 == 0),
        "connections are never split: {sizes:?}"
    );

    let merged = dir.path().join("merged.tape");
    let out = std::process::Command::new(loadtape_bin())
        .arg("merge")
        .args(&shard_paths)
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let key = |r: &Replayed| (r.source, r.exchange, r.pass);
    let mut a: Vec<_> = results(&dir.path().join("whole.tape"))
        .iter()
        .map(key)
        .collect();
    let mut b: Vec<_> = results(&merged).iter().map(key).collect();
    a.sort();
    b.sort();
    assert_eq!(a.len(), 200);
    assert_eq!(
        a, b,
        "the merged shards replayed exactly the unsharded request set"
    );
    // One timeline: the shards' intended instants are the unsharded run's.
    let mut whole_at: Vec<_> = results(&dir.path().join("whole.tape"))
        .iter()
        .map(|r| (r.exchange, r.intended))
        .collect();
    let mut merged_at: Vec<_> = results(&merged)
        .iter()
        .map(|r| (r.exchange, r.intended))
        .collect();
    whole_at.sort();
    merged_at.sort();
    for (w, m) in whole_at.iter().zip(&merged_at) {
        assert_eq!(w.0, m.0);
        assert!(w.1.abs_diff(m.1) < 1000, "{w:?} vs {m:?}");
    }
    // The report of the merged results is exact: the same histograms, statuses and counts as
    // the report of the four shards read together.
    let report = |inputs: &[&Path]| {
        let mut args = vec!["report".to_string()];
        args.extend(inputs.iter().map(|p| p.display().to_string()));
        args.extend(["--format".into(), "json".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, json, err) = loadtape(&args);
        assert_eq!(code, 0, "{err}");
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v.as_object_mut().unwrap().remove("input");
        v.as_object_mut().unwrap().remove("provenance");
        v
    };
    let shards: Vec<&Path> = shard_paths.iter().map(PathBuf::as_path).collect();
    let merged_report = report(&[merged.as_path()]);
    assert_eq!(merged_report["all"]["count"], 200);
    assert_eq!(merged_report, report(&shards));
    // And `inspect --status`/`--endpoint` pick a results tape's requests by live status.
    let (code, out, _) = loadtape(&[
        "inspect",
        merged.to_str().unwrap(),
        "--status",
        "2xx",
        "--endpoint",
        "/r/",
        "--json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["methods"]["GET"], 200, "{out}");
    let (_, out, _) = loadtape(&[
        "inspect",
        merged.to_str().unwrap(),
        "--status",
        "5xx",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["methods"].get("GET").is_none(), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_registry_pull_replays_at_x4_with_every_status_as_recorded() {
    let _serial = ONE_AT_A_TIME.lock().await;
    use common::registry::*;
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    // The image is pushed straight to the registry; the pull goes through the recorder.
    let image = oci_image(&dir.path().join("image"), &[300_000, 1 << 20], 3);
    skopeo_copy(
        &format!("oci:{}:v1", image.layout.display()),
        &format!("docker://{}/loadtape/app:v1", registry.addr),
    )
    .await;
    let tape = dir.path().join("pull");
    let rec = net::start(net::config(registry.addr, &tape)).await;
    for i in 0..2 {
        skopeo_copy(
            &format!("docker://{}/loadtape/app:v1", rec.addr),
            &format!(
                "oci:{}:v1",
                dir.path().join(format!("pulled-{i}")).display()
            ),
        )
        .await;
    }
    rec.stop().await;

    let out = dir.path().join("results.tape");
    let status = std::process::Command::new(loadtape_bin())
        .arg("replay")
        .arg(&tape)
        .args(["--target", &format!("http://{}", registry.addr)])
        .args(["--speed", "4", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let summary = String::from_utf8_lossy(&status.stdout);
    assert!(
        summary.contains("GET /v2/{repo}/blobs/{digest}"),
        "{summary}"
    );
    let res = results(&out);
    assert!(res.len() >= 10, "{summary}");
    for r in &res {
        assert_eq!(
            r.status(),
            r.recorded.status,
            "{} #{}: replayed {:?}, recorded {:?}",
            r.endpoint,
            r.exchange,
            r.outcome,
            r.recorded.status
        );
    }
    // Blob bytes came back whole.
    let blobs: u64 = res
        .iter()
        .filter(|r| r.endpoint == "GET /v2/{repo}/blobs/{digest}")
        .map(|r| r.bytes_received)
        .sum();
    assert!(blobs >= 2 * (300_000 + (1 << 20)), "{blobs}");

    // `inspect` reads the results tape with the same keys.
    let out = std::process::Command::new(loadtape_bin())
        .args(["inspect", "--json"])
        .arg(dir.path().join("results.tape"))
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["records"], res.len() as u64);
    assert!(json["status_counts"]["200"].as_u64().unwrap() >= 4);
}

fn loadtape(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(loadtape_bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_say_what_would_be_right() {
    let _serial = ONE_AT_A_TIME.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let tape = tape_at(dir.path(), &[0, MS]);
    let t = tape.to_str().unwrap();
    for (args, says) in [
        (vec!["replay", t], "--target is required"),
        (
            vec!["replay", t, "--target", "ftp://x"],
            "http:// or https://",
        ),
        (
            vec!["replay", t, "--target", "http://x/prefix"],
            "has a path",
        ),
        (
            vec!["replay", t, "--target", "http://x", "--speed", "0"],
            "positive multiple",
        ),
        (
            vec!["replay", t, "--target", "http://x", "--shard", "4/4"],
            "JOB_COMPLETION_INDEX",
        ),
        (
            vec!["replay", t, "--target", "http://x", "--ramp", "10:5"],
            "FROM:TO:DURATION",
        ),
        (
            vec!["replay", t, "--target", "http://x", "--header", "nocolon"],
            "'Name: value'",
        ),
        (
            vec!["replay", t, "--target", "http://x", "--start-at", "soon"],
            "RFC 3339",
        ),
        (
            vec!["replay", t, "--target", "http://x", "--max-in-flight", "0"],
            "at least 1",
        ),
        (
            vec!["replay", t, "--target", "http://x", "--fraction", "0"],
            "in (0, 1]",
        ),
    ] {
        let (code, _, err) = loadtape(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains(says),
            "{args:?} should say {says:?}, said: {err}"
        );
    }
    // A profile with a typo is refused, naming the key.
    let profile = dir.path().join("p.toml");
    std::fs::write(&profile, "target = \"http://x\"\nsped = 2\n").unwrap();
    let (code, _, err) = loadtape(&["replay", t, "--profile", profile.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("sped"), "{err}");
    // Secrets come from the environment: a variable that is not set is named.
    std::fs::write(
        &profile,
        "target = \"http://x\"\n[[auth]]\npath-prefix = \"/v2/\"\nkind = \"basic\"\nusername-env = \"LT_UNSET_USER\"\npassword-env = \"LT_UNSET_PASSWORD\"\n",
    )
    .unwrap();
    let (code, _, err) = loadtape(&["replay", t, "--profile", profile.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("LT_UNSET_USER"), "{err}");
}

#[test]
fn dry_run_sends_nothing_and_prints_the_plan() {
    let _serial = ONE_AT_A_TIME.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let starts: Vec<u64> = (0..30).map(|i| i * 100 * MS).collect();
    let tape = tape_at(dir.path(), &starts);
    // A port nobody listens on: a dry run must not even try.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, out, err) = loadtape(&[
        "replay",
        tape.to_str().unwrap(),
        "--target",
        &format!("http://{port}"),
        "--speed",
        "2",
        "--header",
        "Authorization: Bearer fresh",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["requests"], 30);
    assert_eq!(plan["rewritten"], 30);
    assert_eq!(plan["connections"], 30);
    assert_eq!(plan["endpoints"]["GET /r/{n}"], 30);
    // 29 gaps of 100 ms at x2.
    assert!(
        (plan["duration_s"].as_f64().unwrap() - 1.45).abs() < 0.01,
        "{plan}"
    );
}

#[test]
fn the_profile_sets_what_flags_do_and_flags_win() {
    let _serial = ONE_AT_A_TIME.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let starts: Vec<u64> = (0..20).map(|i| i * 100 * MS).collect();
    let tape = tape_at(dir.path(), &starts);
    let profile = dir.path().join("p.toml");
    std::fs::write(
        &profile,
        "target = \"http://127.0.0.1:9\"\nrate = 10.0\nlimit = 12\n[filter]\nexclude = [\"^/r/1$\"]\n",
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "replay",
            tape.to_str().unwrap(),
            "--profile",
            profile.to_str().unwrap(),
            "--dry-run",
            "--json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = loadtape(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let plan = run(&[]);
    assert_eq!(plan["requests"], 12);
    assert_eq!(plan["counters"]["filtered"], 1);
    // 12 requests at 10 per second: the last at 1.1 s.
    assert!(
        (plan["duration_s"].as_f64().unwrap() - 1.1).abs() < 0.01,
        "{plan}"
    );
    let plan = run(&["--limit", "5", "--rate", "100"]);
    assert_eq!(plan["requests"], 5);
    assert!(
        (plan["duration_s"].as_f64().unwrap() - 0.04).abs() < 0.005,
        "{plan}"
    );
    // About half of the 19 admitted one-request connections (which half depends on the tape's
    // random id; the profile's limit of 12 still holds), the same half every time.
    let half = run(&["--fraction", "0.5"]);
    let n = half["requests"].as_u64().unwrap();
    assert!((2..=12).contains(&n), "{half}");
    assert!(half["counters"]["filtered"].as_u64().unwrap() >= 1);
    assert_eq!(run(&["--fraction", "0.5"])["endpoints"], half["endpoints"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_sending_and_keeps_what_was_replayed() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // 100 requests a second for 10 s: the run is interrupted long before its end.
    let starts: Vec<u64> = (0..1000).map(|i| i * 10 * MS).collect();
    let tape = tape_at(dir.path(), &starts);
    let target = sink(Behaviour::default(), None).await;
    let out = dir.path().join("results.tape");
    let child = tokio::process::Command::new(loadtape_bin())
        .arg("replay")
        .arg(&tape)
        .args(["--target", &format!("http://{}", target.addr), "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the target has seen 20 requests.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while target.arrivals().len() < 20 {
        assert!(std::time::Instant::now() < deadline, "no traffic arrived");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id().unwrap() as i32, libc::SIGINT);
    }
    let output = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("stopped early"), "{stdout}");
    let res = results(&out);
    let arrived = target.arrivals().len();
    assert!(res.len() >= 20 && res.len() < 1000, "{} results", res.len());
    assert_eq!(
        res.len(),
        arrived,
        "every request sent has its result, none more"
    );
}

#[test]
fn every_shipped_profile_plans_the_sample_tape() {
    let _serial = ONE_AT_A_TIME.blocking_lock();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for entry in std::fs::read_dir(dir.join("replay-profiles")).unwrap() {
        let profile = entry.unwrap().path();
        if profile.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        seen += 1;
        // Profiles name the environment variables holding secrets; a test gives them.
        let output = std::process::Command::new(loadtape_bin())
            .arg("replay")
            .arg(dir.join("captures/v1/quay-session-v1.tape"))
            .arg("--profile")
            .arg(&profile)
            .args(["--target", "http://127.0.0.1:9", "--dry-run", "--json"])
            .env("CLAIR_PSK", "c2hhcmVkIHNlY3JldA==")
            .env("QUAY_USER", "robot")
            .env("QUAY_PASSWORD", "secret")
            .env("QUAY_TOKEN", "oauth")
            .output()
            .unwrap();
        let (code, out, err) = (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        assert_eq!(code, 0, "{}: {err}", profile.display());
        let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(plan["requests"].as_u64().is_some(), "{}", profile.display());
    }
    assert!(seen >= 6, "{seen} profiles");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_tapes_carry_frame_watermarks_that_hold() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // 2.4 s at 200 a second; requests 100 to 109 are held 1.5 s, so their results are written
    // frames after those of requests sent later.
    let starts: Vec<u64> = (0..480).map(|i| i * 5 * MS).collect();
    let tape = tape_at(dir.path(), &starts);
    let target = sink(
        Behaviour {
            stall: Some((100..110, Duration::from_millis(1500))),
            ..Behaviour::default()
        },
        None,
    )
    .await;
    let mut c = config(&tape, target.addr);
    c.plan.schedule = Schedule::Rate(200.0);
    c.plan.connections = ConnectionMode::Pooled;
    let out = dir.path().join("results.tape");
    c.out = Some(out.clone());
    run(c).await;
    let bytes = std::fs::read(&out).unwrap();
    assert!(
        frame_ends(&bytes).len() >= 2,
        "the results span several frames"
    );
    // Results are written as requests complete; the watermarks say up to where all are in,
    // so a reader releases them without waiting out its reorder window.
    assert!(assert_watermarks_hold(&bytes) > 0);
    let (records, stats) = read_one(&out).unwrap();
    assert_eq!(stats.out_of_order, 0);
    let intended: Vec<u64> = records.iter().map(|r| r.start()).collect();
    assert!(intended.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(records.len(), 480);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_push_and_pull_replays_into_an_empty_registry_that_then_serves_the_image() {
    use common::registry::*;
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let a = Registry::start(&dir.path().join("registry-a"));
    let b = Registry::start(&dir.path().join("registry-b"));
    // Layers larger than the 64 KiB of a body the tape keeps: the replay sends synthetic bytes
    // of their length, and must follow their new digests everywhere.
    let image = oci_image(&dir.path().join("image"), &[300_000, 1 << 20, 150_000], 11);
    let tape = dir.path().join("push");
    let rec = net::start(net::config(a.addr, &tape)).await;
    let remote = format!("docker://{}/loadtape/app:v1", rec.addr);
    skopeo_copy(&format!("oci:{}:v1", image.layout.display()), &remote).await;
    skopeo_copy(
        &remote,
        &format!("oci:{}:v1", dir.path().join("pulled").display()),
    )
    .await;
    rec.stop().await;

    let out = dir.path().join("results.tape");
    let (code, summary, err) = loadtape(&[
        "replay",
        tape.to_str().unwrap(),
        "--target",
        &format!("http://{}", b.addr),
        "--speed",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let res = results(&out);
    assert!(res
        .iter()
        .any(|r| r.endpoint == "PATCH /v2/{repo}/blobs/uploads/{uuid}"));
    for r in &res {
        assert_eq!(
            r.status(),
            r.recorded.status,
            "{} #{} replayed {:?}, recorded {:?}\n{summary}",
            r.endpoint,
            r.exchange,
            r.outcome,
            r.recorded.status
        );
        assert_eq!(
            r.flags & loadtape::tape::replayed_flags::UNMAPPED,
            0,
            "{r:?}"
        );
    }
    // B now holds a complete image under the tag: skopeo pulls it, checking every digest.
    let from_b = dir.path().join("from-b");
    skopeo_copy(
        &format!("docker://{}/loadtape/app:v1", b.addr),
        &format!("oci:{}:v1", from_b.display()),
    )
    .await;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(from_b.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(&from_b, &manifest_digest)).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    for (layer, recorded) in layers.iter().zip(&image.layers) {
        let digest = layer["digest"].as_str().unwrap();
        let bytes = blob(&from_b, digest);
        assert_eq!(bytes.len() as u64, layer["size"].as_u64().unwrap());
        // Synthetic bytes of the recorded length, under their own digest.
        assert_ne!(digest, recorded);
        assert_eq!(bytes.len(), blob(&image.layout, recorded).len());
    }
    // The config was kept whole on the tape: the same bytes, the same digest.
    assert_eq!(manifest["config"]["digest"].as_str().unwrap(), image.config);

    // A second replay sends the same bytes: B already has every blob, same digests.
    let out2 = dir.path().join("results-2.tape");
    let (code, _, err) = loadtape(&[
        "replay",
        tape.to_str().unwrap(),
        "--target",
        &format!("http://{}", b.addr),
        "--speed",
        "4",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let _ = out2;
}

/// `user:bcrypt` lines for docker-registry's htpasswd (cost 4: fast to check). The recording
/// and the replay use different accounts: the replay's must be the fresh one it was given.
const RECORDER: (&str, &str, &str) = (
    "recorder",
    "rec-pass",
    "$2b$04$FeNIBejQWFKg0adG4MsS3OgNfxrL7sCCTYEJE6jN5TT52S6W1XKBq",
);
const REPLAYER: (&str, &str, &str) = (
    "replayer",
    "fresh-pass",
    "$2b$04$Xk5U2EHqmHVdRFAvhtBvO.03nVsE.GXHEf.M05Ad/Ylrf.Q2Lo9D.",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_registry_that_wants_credentials_replays_with_fresh_ones() {
    use common::registry::*;
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let a = Registry::start_with_htpasswd(
        &dir.path().join("registry-a"),
        &format!("{}:{}\n", RECORDER.0, RECORDER.2),
    );
    let b = Registry::start_with_htpasswd(
        &dir.path().join("registry-b"),
        &format!("{}:{}\n", REPLAYER.0, REPLAYER.2),
    );
    let image = oci_image(&dir.path().join("image"), &[200_000, 90_000], 23);
    let tape = dir.path().join("push");
    let rec = net::start(net::config(a.addr, &tape)).await;
    let remote = format!("docker://{}/secure/app:v1", rec.addr);
    let creds = format!("{}:{}", RECORDER.0, RECORDER.1);
    skopeo_copy_with(
        &format!("oci:{}:v1", image.layout.display()),
        &remote,
        &["--dest-creds", &creds],
    )
    .await;
    skopeo_copy_with(
        &remote,
        &format!("oci:{}:v1", dir.path().join("pulled").display()),
        &["--src-creds", &creds],
    )
    .await;
    rec.stop().await;

    let profile = dir.path().join("basic.toml");
    std::fs::write(
        &profile,
        "[[auth]]\npath-prefix = \"/v2/\"\nkind = \"basic\"\nusername-env = \"LT_REG_USER\"\npassword-env = \"LT_REG_PASSWORD\"\n",
    )
    .unwrap();
    let out = dir.path().join("results.tape");
    let o = std::process::Command::new(loadtape_bin())
        .arg("replay")
        .arg(&tape)
        .args(["--target", &format!("http://{}", b.addr), "--speed", "4"])
        .arg("--out")
        .arg(&out)
        .arg("--profile")
        .arg(&profile)
        .env("LT_REG_USER", REPLAYER.0)
        .env("LT_REG_PASSWORD", REPLAYER.1)
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{summary}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let res = results(&out);
    assert!(
        res.iter().any(|r| r.recorded.status == Some(401)),
        "skopeo's first /v2/ is a 401"
    );
    assert!(res
        .iter()
        .any(|r| r.endpoint.starts_with("PUT /v2/{repo}/manifests")));
    for r in &res {
        assert_eq!(
            r.status(),
            r.recorded.status,
            "{} #{}\n{summary}",
            r.endpoint,
            r.exchange
        );
    }
    // B holds the image, for its own account only.
    let fresh = format!("{}:{}", REPLAYER.0, REPLAYER.1);
    skopeo_copy_with(
        &format!("docker://{}/secure/app:v1", b.addr),
        &format!("oci:{}:v1", dir.path().join("from-b").display()),
        &["--src-creds", &fresh],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_tokens_are_fetched_afresh_and_follow_the_recorded_fingerprints() {
    use loadtape::testbed::{Config, Testbed};
    const USER: &str = "alice";
    const PASSWORD: &str = "secret";
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // A Quay-like registry that wants tokens: /v2/auth issues its own for Basic alice:secret.
    let testbed = || async {
        let t = Testbed::start(Config {
            accounts: vec![(USER.into(), PASSWORD.into())],
            ..Config::default()
        })
        .await
        .unwrap();
        let digest = t.preload_blob(bytes::Bytes::from_static(b"a layer"));
        (t, digest)
    };
    let (recorded, digest) = testbed().await;
    let tape = dir.path().join("tokens");
    let rec = net::start(net::config(recorded.addr, &tape)).await;
    let base = format!("http://{}", rec.addr);
    // A client session: a ping, two tokens, each used twice.
    net::curl(&["-o", "/dev/null", &format!("{base}/v2/")]).await;
    for _ in 0..2 {
        let json = net::curl(&[
            "-u",
            &format!("{USER}:{PASSWORD}"),
            &format!("{base}/v2/auth?service=x&scope=repository:app:pull"),
        ])
        .await;
        let token: serde_json::Value = serde_json::from_str(&json).unwrap();
        let bearer = format!("Authorization: Bearer {}", token["token"].as_str().unwrap());
        for _ in 0..2 {
            let blob = format!("{base}/v2/app/blobs/{digest}");
            net::curl(&["-f", "-o", "/dev/null", "-H", &bearer, &blob]).await;
        }
    }
    rec.stop().await;

    // A fresh registry issues tokens of its own.
    let (fresh, _) = testbed().await;
    let profile = dir.path().join("auth.toml");
    std::fs::write(
        &profile,
        "[[auth]]\npath-prefix = \"/v2/\"\nkind = \"registry-token\"\nusername-env = \"LT_USER\"\npassword-env = \"LT_PASSWORD\"\n",
    )
    .unwrap();
    let fresh_addr = fresh.addr;
    let (tape_, profile_) = (tape.clone(), profile.clone());
    let replay = move |with_profile: bool, out: PathBuf| {
        let (tape, profile) = (&tape_, &profile_);
        let mut cmd = std::process::Command::new(loadtape_bin());
        cmd.arg("replay")
            .arg(tape)
            .args(["--target", &format!("http://{fresh_addr}"), "--out"])
            .arg(&out)
            .env("LT_USER", USER)
            .env("LT_PASSWORD", PASSWORD);
        if with_profile {
            cmd.arg("--profile").arg(profile);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        results(&out)
    };
    let out = dir.path().join("with-auth.tape");
    let res = tokio::task::spawn_blocking({
        let replay = replay.clone();
        move || replay(true, out)
    })
    .await
    .unwrap();
    assert_eq!(res.len(), 7);
    for r in &res {
        assert_eq!(r.status(), r.recorded.status, "{r:?}");
    }
    // Without fresh credentials the recorded tokens are gone: the manifests get 401.
    let out = dir.path().join("without.tape");
    let res = tokio::task::spawn_blocking(move || replay(false, out))
        .await
        .unwrap();
    assert!(res
        .iter()
        .filter(|r| r.endpoint.contains("blobs"))
        .all(|r| r.status() == Some(401)));

    // A tape that begins after the client logged in (no token request on it): the target's
    // 401 makes the replay fetch a token as its challenge says, and send again.
    let late = dir.path().join("late.toml");
    std::fs::write(
        &late,
        format!(
            "{}\n[filter]\nexclude = [\"^/v2/auth\"]\n",
            std::fs::read_to_string(&profile).unwrap()
        ),
    )
    .unwrap();
    let out = dir.path().join("late.tape");
    let o = tokio::task::spawn_blocking({
        let (tape, out) = (tape.clone(), out.clone());
        move || {
            std::process::Command::new(loadtape_bin())
                .arg("replay")
                .arg(&tape)
                .args(["--target", &format!("http://{fresh_addr}"), "--out"])
                .arg(&out)
                .arg("--profile")
                .arg(&late)
                .env("LT_USER", USER)
                .env("LT_PASSWORD", PASSWORD)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let res = results(&out);
    assert_eq!(res.len(), 5, "{res:?}");
    for r in &res {
        assert_eq!(r.status(), r.recorded.status, "{r:?}");
    }
    let fetched: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("tokens:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no token fetches reported:\n{stdout}"));
    // One per recorded token, or a few more when requests sharing one raced to the 401.
    assert!((2..=4).contains(&fetched), "{fetched} fetches:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_not_kept_are_regenerated_with_their_length_identically_every_time() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // A 300 kB upload of which the tape kept the first 1 KiB.
    let mut rec = get(1, 1, 0, HttpVersion::Http11);
    if let Record::Exchange(e) = &mut rec {
        e.request.method = Method::Patch;
        e.request.target = "/r/1".into();
        e.request.body = Body {
            len: 300_000,
            sha256: Some([7; 32]),
            stored: loadtape::tape::Stored::Prefix(vec![b'x'; 1024]),
            complete: true,
        };
    }
    let tape = dir.path().join("upload.tape");
    write(&tape, &[rec], Default::default(), true);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let target = sink(Behaviour::default(), None).await;
        let report = run(config(&tape, target.addr)).await;
        assert_eq!(report.summary.accounting().synthesised, 1);
        let a = target.arrivals();
        assert_eq!(a[0].body_len, 300_000);
        assert_eq!(a[0].headers["content-length"], "300000");
        seen.push(a[0].body_sha256);
    }
    assert_eq!(seen[0], seen[1], "two replays sent different bytes");
    assert_ne!(seen[0], [7; 32]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_requests_carry_the_live_etag() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let recorded = sink(
        Behaviour {
            etag: Some("\"state-a1\"".into()),
            ..Behaviour::default()
        },
        None,
    )
    .await;
    let tape = dir.path().join("etags");
    let rec = net::start(net::config(recorded.addr, &tape)).await;
    let url = format!("http://{}/state", rec.addr);
    net::curl(&["-o", "/dev/null", &url]).await;
    net::curl(&["-o", "/dev/null", "-H", "If-None-Match: \"state-a1\"", &url]).await;
    rec.stop().await;

    // Another target, another state: the replay asks with its ETag, and gets 304 as recorded.
    let fresh = sink(
        Behaviour {
            etag: Some("\"state-b7\"".into()),
            ..Behaviour::default()
        },
        None,
    )
    .await;
    let mut c = config(&tape, fresh.addr);
    c.out = Some(dir.path().join("results.tape"));
    run(c).await;
    let mut res = results(&dir.path().join("results.tape"));
    res.sort_by_key(|r| r.exchange);
    let statuses: Vec<_> = res
        .iter()
        .map(|r| (r.status(), r.recorded.status))
        .collect();
    assert_eq!(
        statuses,
        vec![(Some(200), Some(200)), (Some(304), Some(304))]
    );
    let arrivals = fresh.arrivals();
    assert_eq!(arrivals[1].headers["if-none-match"], "\"state-b7\"");
}

/// Imports a shared HAR fixture into a tape with the real `loadtape import`.
fn import(har: &str, out: &Path) {
    let har = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("captures/har")
        .join(har);
    let (code, _, err) = loadtape(&[
        "import",
        har.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
}

/// Replays `tape` with `profile` against `target` at x4; the results and the summary.
fn replay_with(
    tape: &Path,
    target: std::net::SocketAddr,
    profile: &Path,
    env: &[(&str, &str)],
    out: &Path,
) -> (Vec<Replayed>, String) {
    let o = std::process::Command::new(loadtape_bin())
        .arg("replay")
        .arg(tape)
        .args(["--target", &format!("http://{target}"), "--speed", "4"])
        .arg("--out")
        .arg(out)
        .arg("--profile")
        .arg(profile)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{summary}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    (results(out), summary)
}

fn assert_statuses_as_recorded(res: &[Replayed], summary: &str) {
    let differ: Vec<String> = res
        .iter()
        .filter(|r| r.status() != r.recorded.status)
        .map(|r| {
            format!(
                "#{} {} replayed {:?}, recorded {:?}",
                r.exchange, r.endpoint, r.outcome, r.recorded.status
            )
        })
        .collect();
    assert!(differ.is_empty(), "{}\n{summary}", differ.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_quay_fixture_replays_against_the_testbed_with_every_status_as_recorded() {
    use loadtape::testbed::{Config, Testbed};
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let tape = dir.path().join("quay");
    import("quay-session.har", &tape);
    let testbed = Testbed::start(Config {
        accounts: vec![
            ("admin".into(), "admin-fresh".into()),
            ("bob".into(), "bob-fresh".into()),
        ],
        api_tokens: vec!["fresh-oauth-token".into()],
        ..Config::default()
    })
    .await
    .unwrap();
    // What the recorded Quay held before the session began: the blobs its pulls read that its
    // pushes did not write.
    let har: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("captures/har/quay-session.har"))
            .unwrap(),
    )
    .unwrap();
    use base64::Engine as _;
    for e in har["log"]["entries"].as_array().unwrap() {
        let url = e["request"]["url"].as_str().unwrap();
        let content = &e["response"]["content"];
        if e["request"]["method"] == "GET"
            && url.contains("/blobs/sha256:")
            && e["response"]["status"] == 200
        {
            let text = content["text"].as_str().unwrap();
            let bytes = match content["encoding"].as_str() {
                Some("base64") => base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .unwrap(),
                _ => text.as_bytes().to_vec(),
            };
            let digest = testbed.preload_blob(bytes.into());
            assert!(url.ends_with(&digest), "{url} holds {digest}");
        }
    }
    // Each recorded account gets a fresh one: admin's token requests, bob's, and bob's with
    // the wrong password a wrong one again, named by its recorded fingerprint (which the dry
    // run lists, and `export` shows): fingerprints are keyed per recording process.
    let (code, jsonl, err) = loadtape(&["export", tape.to_str().unwrap(), "--format", "jsonl"]);
    assert_eq!(code, 0, "{err}");
    let wrong = jsonl
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| {
            r["kind"] == "exchange"
                && r["request"]["target"]
                    .as_str()
                    .unwrap()
                    .starts_with("/v2/auth")
                && r["response"]["Ok"]["status"] == 401
        })
        .and_then(|r| {
            r["request"]["headers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h["name"] == "authorization")
                .map(|h| h["redacted"]["fingerprint"].as_str().unwrap().to_string())
        })
        .expect("the fixture has a token request refused for a wrong password");
    let profile = dir.path().join("quay.toml");
    std::fs::write(
        &profile,
        format!(
            r#"
[[auth]]
path-prefix = "/v2/"
kind = "registry-token"
username-env = "LT_ADMIN"
password-env = "LT_ADMIN_PASSWORD"

[[auth]]
path-prefix = "/v2/"
kind = "registry-token"
account = "bob"
username-env = "LT_BOB"
password-env = "LT_BOB_PASSWORD"

[[auth]]
path-prefix = "/v2/"
kind = "registry-token"
fingerprint = "{wrong}"
username-env = "LT_BOB"
password-env = "LT_WRONG_PASSWORD"

[[auth]]
path-prefix = "/api/v1/"
kind = "bearer"
token-env = "LT_QUAY_TOKEN"
"#
        ),
    )
    .unwrap();
    let env = [
        ("LT_ADMIN", "admin"),
        ("LT_ADMIN_PASSWORD", "admin-fresh"),
        ("LT_BOB", "bob"),
        ("LT_BOB_PASSWORD", "bob-fresh"),
        ("LT_WRONG_PASSWORD", "not-bobs"),
        ("LT_QUAY_TOKEN", "fresh-oauth-token"),
    ];
    let (dry, _, err) = {
        let mut args = vec!["replay", tape.to_str().unwrap(), "--dry-run"];
        let target = format!("http://{}", testbed.addr);
        args.extend(["--target", &target, "--profile", profile.to_str().unwrap()]);
        let o = std::process::Command::new(loadtape_bin())
            .args(&args)
            .envs(env)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&o.stdout).to_string(),
            (),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    assert!(
        dry.contains(&format!(
            "fingerprint {wrong}, for recorded basic {wrong} (account=bob)"
        )),
        "{dry}{err}"
    );
    let (res, summary) = replay_with(&tape, testbed.addr, &profile, &env, &dir.path().join("r"));
    assert_eq!(res.len(), 63);
    assert_statuses_as_recorded(&res, &summary);
    // The pushes went through live upload sessions, with tokens the testbed issued.
    let served = testbed.served();
    assert_eq!(
        served[&("PUT /v2/{repo}/blobs/uploads/{uuid}".to_string(), 201)],
        4
    );
    assert_eq!(served[&("GET /v2/auth".to_string(), 401)], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_clair_fixture_replays_against_the_testbed_with_layer_urls_rewritten() {
    use loadtape::testbed::{Config, Testbed};
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let tape = dir.path().join("clair");
    import("clair-session.har", &tape);
    let psk = b"a fresh pre-shared key".to_vec();
    // The fixture did not keep the layers' bytes: the storage below answers with placeholder
    // bytes, so this Clair fetches but does not check their digests.
    let clair = Testbed::start(Config {
        clair_psk: Some(psk.clone()),
        clair_verify_layers: false,
        ..Config::default()
    })
    .await
    .unwrap();
    // The test cluster's storage: Clair fetches the layers the index requests name from here.
    let storage = sink(Behaviour::default(), None).await;
    use base64::Engine as _;
    let psk_b64 = base64::engine::general_purpose::STANDARD.encode(&psk);
    let profile = |rewrite: bool| {
        let path = dir.path().join(format!("clair-{rewrite}.toml"));
        let mut text = String::from(
            "[[auth]]\npath-prefix = \"/\"\nkind = \"jwt-hs256\"\nkey-env = \"LT_CLAIR_PSK\"\n",
        );
        if rewrite {
            text.push_str(&format!(
                "\n[[rewrite]]\nfrom = \"http://127.0.0.1:15690/\"\nto = \"http://{}/\"\n",
                storage.addr
            ));
        }
        std::fs::write(&path, text).unwrap();
        path
    };
    let env = [("LT_CLAIR_PSK", psk_b64.as_str())];
    let (res, summary) = replay_with(
        &tape,
        clair.addr,
        &profile(true),
        &env,
        &dir.path().join("r"),
    );
    assert_eq!(res.len(), 28);
    assert_statuses_as_recorded(&res, &summary);
    // Every layer the recorded index requests name was fetched from the storage the profile
    // named (once: a manifest indexed again is not fetched again).
    let har: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("captures/har/clair-session.har"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut named = std::collections::BTreeSet::new();
    for e in har["log"]["entries"].as_array().unwrap() {
        let Some(text) = e["request"]["postData"]["text"].as_str() else {
            continue;
        };
        let Ok(body) = serde_json::from_str::<serde_json::Value>(text) else {
            continue;
        };
        for layer in body["layers"].as_array().into_iter().flatten() {
            let uri = layer["uri"].as_str().unwrap();
            named.insert(
                uri.strip_prefix("http://127.0.0.1:15690")
                    .unwrap()
                    .to_string(),
            );
        }
    }
    let fetched: std::collections::BTreeSet<String> =
        storage.arrivals().into_iter().map(|a| a.path).collect();
    assert_eq!(fetched, named);
    assert_eq!(named.len(), 7);

    // Without the rewrite, the layer URLs point at the recorded world: Clair cannot index.
    let fresh = Testbed::start(Config {
        clair_psk: Some(psk.clone()),
        clair_verify_layers: false,
        ..Config::default()
    })
    .await
    .unwrap();
    let (res, _) = replay_with(
        &tape,
        fresh.addr,
        &profile(false),
        &env,
        &dir.path().join("r2"),
    );
    assert!(res
        .iter()
        .filter(
            |r| r.endpoint == "POST /indexer/api/v1/index_report" && r.recorded.status == Some(201)
        )
        .all(|r| r.status() == Some(500)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_issued_json_ids_are_mapped_and_unmappable_requests_are_skipped_when_asked() {
    use common::registry::{oci_image, skopeo_copy_with};
    use loadtape::testbed::{Config, Testbed};
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = || Config {
        accounts: vec![("alice".into(), "pw".into())],
        api_tokens: vec!["api-token".into()],
        ..Config::default()
    };
    let a = Testbed::start(config()).await.unwrap();
    let tape = dir.path().join("session");
    let rec = net::start(net::config(a.addr, &tape)).await;
    let base = format!("http://{}", rec.addr);
    // A push (upload sessions), then a build whose id the server issues and the client polls.
    let image = oci_image(&dir.path().join("image"), &[120_000, 70_000], 5);
    skopeo_copy_with(
        &format!("oci:{}:v1", image.layout.display()),
        &format!("docker://{}/org/app:v1", rec.addr),
        &["--dest-creds", "alice:pw"],
    )
    .await;
    let bearer = "Authorization: Bearer api-token";
    let build = net::curl(&[
        "-f",
        "-X",
        "POST",
        "-H",
        bearer,
        &format!("{base}/api/v1/repository/org/app/build/"),
    ])
    .await;
    let id = serde_json::from_str::<serde_json::Value>(&build).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..2 {
        let url = format!("{base}/api/v1/repository/org/app/build/{id}");
        net::curl(&["-f", "-o", "/dev/null", "-H", bearer, &url]).await;
    }
    rec.stop().await;

    let profile = |extra: &str| {
        let path = dir.path().join(format!("p{}.toml", extra.len()));
        let text = format!(
            "[[auth]]\npath-prefix = \"/v2/\"\nkind = \"registry-token\"\nusername-env = \"LT_U\"\npassword-env = \"LT_P\"\n\n[[auth]]\npath-prefix = \"/api/\"\nkind = \"bearer\"\ntoken-env = \"LT_T\"\n{extra}"
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let env = [("LT_U", "alice"), ("LT_P", "pw"), ("LT_T", "api-token")];

    // The build's id is the live answer's: every status as recorded.
    let b = Testbed::start(config()).await.unwrap();
    let mapped = profile("\n[state]\njson-fields = [\"id\"]\n");
    let (res, summary) = replay_with(&tape, b.addr, &mapped, &env, &dir.path().join("r1"));
    assert_statuses_as_recorded(&res, &summary);
    let polls: Vec<_> = res
        .iter()
        .filter(|r| {
            r.endpoint
                .starts_with("GET /api/v1/repository/{namespace}/{repo}/build/")
        })
        .collect();
    assert_eq!(polls.len(), 2, "{summary}");
    // Without the mapping, the recorded id means nothing to another server.
    let c = Testbed::start(config()).await.unwrap();
    let (res, _) = replay_with(&tape, c.addr, &profile(""), &env, &dir.path().join("r2"));
    assert!(res
        .iter()
        .filter(|r| r
            .endpoint
            .starts_with("GET /api/v1/repository/{namespace}/{repo}/build/"))
        .all(|r| r.status() == Some(404)));

    // A tape that begins inside the upload sessions (their POSTs left out): the sessions'
    // requests cannot be mapped, and the profile says not to send them.
    let d = Testbed::start(config()).await.unwrap();
    let skip =
        profile("\n[state]\nunmappable = \"skip\"\n\n[filter]\nexclude = [\"/blobs/uploads/$\"]\n");
    let (res, summary) = replay_with(&tape, d.addr, &skip, &env, &dir.path().join("r3"));
    assert!(
        res.iter()
            .all(|r| !r.endpoint.contains("/blobs/uploads/{uuid}")),
        "{summary}"
    );
    // What would have waited for the skipped uploads (the manifest naming their digests) went
    // out all the same: nothing waits for a request that is never sent.
    assert!(
        res.iter()
            .any(|r| r.endpoint == "PUT /v2/{repo}/manifests/{tag}" && r.status().is_some()),
        "{summary}"
    );
    assert!(
        d.served()
            .keys()
            .all(|(endpoint, _)| !endpoint.contains("/blobs/uploads/")),
        "{:?}",
        d.served()
    );
    let sessions = 2 * 3; // two blobs and a config, each a PATCH and a PUT
    assert!(
        summary.contains(&format!("({sessions} of them not sent)")),
        "{summary}"
    );
    let (code, dry, err) = {
        let o = std::process::Command::new(loadtape_bin())
            .arg("replay")
            .arg(&tape)
            .args(["--dry-run", "--target", "http://127.0.0.1:9", "--profile"])
            .arg(profile("\n[filter]\nexclude = [\"/blobs/uploads/$\"]\n"))
            .envs(env)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    assert_eq!(code, Some(0), "{err}");
    assert!(
        dry.contains(&format!("{sessions} cannot be mapped")),
        "{dry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_flags_exactly_the_endpoint_class_a_slower_target_made_slower() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // Two endpoint classes, interleaved: manifests and tag lists, 1,000 of each (enough to
    // bound a p99 from both sides), 1 ms apart. Recorded answers came after 40 ms, far above
    // what the live sink takes even on a loaded machine, for the comparison with the recording.
    let mut records = Vec::new();
    for i in 0..2000u64 {
        let (id, at) = (i + 1, i * MS);
        records.push(opened(id, at, HttpVersion::Http11));
        let mut e = get(id, id, at + MS / 2, HttpVersion::Http11);
        if let Record::Exchange(x) = &mut e {
            x.request.target = if i % 2 == 0 {
                format!("/v2/org/app/manifests/v{id}")
            } else {
                "/v2/org/app/tags/list".to_string()
            };
            x.timing.response_head = Some(40 * MS);
            x.timing.response_done = 41 * MS;
        }
        records.push(e);
        records.push(closed(id, at + 42 * MS, 1));
    }
    records.sort_by_key(|r| r.start());
    let tape = dir.path().join("two-classes.tape");
    write(&tape, &records, Default::default(), true);

    let normal = sink(Behaviour::default(), None).await;
    let slower = sink(
        Behaviour {
            delay: Some(("/manifests/".into(), Duration::from_millis(100))),
            ..Behaviour::default()
        },
        None,
    )
    .await;
    let replay_into = |target: std::net::SocketAddr, name: &str| {
        let mut c = config(&tape, target);
        let out = dir.path().join(name);
        c.out = Some(out.clone());
        (c, out)
    };
    let (c, a) = replay_into(normal.addr, "a.tape");
    run(c).await;
    let (c, a2) = replay_into(normal.addr, "a2.tape");
    run(c).await;
    let (c, b) = replay_into(slower.addr, "b.tape");
    run(c).await;

    // Floors above this shared machine's scheduling noise (a stall of tens of ms delays a few
    // dozen requests), far below the 100 ms injected.
    let profile = dir.path().join("gate.toml");
    std::fs::write(
        &profile,
        "[gate]\nlatency = [{ quantile = 0.5, growth = 0.1, floor-us = 20000 }, { quantile = 0.99, growth = 0.1, floor-us = 40000 }]\n",
    )
    .unwrap();
    let diff = |x: &Path, y: &Path, format: &str| {
        let o = std::process::Command::new(loadtape_bin())
            .arg("diff")
            .arg(x)
            .arg(y)
            .arg("--profile")
            .arg(&profile)
            .args(["--format", format])
            .output()
            .unwrap();
        (
            o.status.code().unwrap(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (code, json, err) = diff(&a, &b, "json");
    assert_eq!(code, 1, "{json}{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["schema"], "loadtape.diff/1");
    assert_eq!(v["phase"], "total");
    let regressed: Vec<&str> = v["classes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "regression")
        .map(|c| c["class"].as_str().unwrap())
        .collect();
    assert_eq!(regressed, ["GET /v2/{repo}/manifests/{tag}"], "{json}");
    let (code, junit, _) = diff(&a, &b, "junit");
    assert_eq!(code, 1);
    assert_eq!(junit.matches("<failure").count(), 1, "{junit}");
    // The tag lists were not slowed: they pass, or, when this shared machine stalled a few of
    // the top three of a thousand (what bounds a p99 from above), are inconclusive and say
    // which check straddled; never a failure.
    let tags = junit
        .lines()
        .find(|l| l.contains("name=\"GET /v2/{repo}/tags/list\""))
        .unwrap();
    assert!(
        tags.contains("><system-out>") || tags.contains("straddles its threshold"),
        "{junit}"
    );

    // Two runs against the same target: within thresholds.
    let (code, text, err) = diff(&a, &a2, "text");
    assert_eq!(code, 0, "{text}{err}");
    assert!(text.starts_with("verdict: pass"), "{text}");

    // A results tape alone is compared with the recording it carries (first byte: 40 ms
    // recorded, well under it live).
    let o = std::process::Command::new(loadtape_bin())
        .arg("diff")
        .arg(&a)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(text.contains("time to first byte"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_testbed_sample_tape_replays_into_a_fresh_testbed_with_every_status_as_recorded() {
    use loadtape::testbed::shape::Shape;
    use loadtape::testbed::{Config, Testbed, API_TOKEN, PASSWORD, PSK, USER};
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // `captures/README.md` says how it was made: the traffic driver through `loadtape record`
    // (bodies kept to 4 KiB, so the layers replay as synthetic bytes under new digests) in
    // front of a testbed on 127.0.0.1:5077.
    let tape = Path::new(env!("CARGO_MANIFEST_DIR")).join("captures/testbed/driven-session.tape");
    let fresh = Testbed::start(Config::standard(Shape::default()))
        .await
        .unwrap();
    let profile = dir.path().join("testbed.toml");
    std::fs::write(
        &profile,
        format!(
            r#"
[[auth]]
path-prefix = "/v2/"
kind = "registry-token"
username-env = "LT_USER"
password-env = "LT_PASSWORD"

[[auth]]
path-prefix = "/api/v1/"
kind = "bearer"
token-env = "LT_TOKEN"

[[auth]]
path-prefix = "/indexer/"
kind = "jwt-hs256"
key-env = "LT_PSK"

[[auth]]
path-prefix = "/matcher/"
kind = "jwt-hs256"
key-env = "LT_PSK"

# Clair fetches the layers it indexes from the storage the index requests name.
[[rewrite]]
from = "http://127.0.0.1:5077/_storage/"
to = "http://{}/_storage/"
"#,
            fresh.addr
        ),
    )
    .unwrap();
    let psk = String::from_utf8(PSK.to_vec()).unwrap();
    let env = [
        ("LT_USER", USER),
        ("LT_PASSWORD", PASSWORD),
        ("LT_TOKEN", API_TOKEN),
        ("LT_PSK", psk.as_str()),
    ];
    let (res, summary) = replay_with(&tape, fresh.addr, &profile, &env, &dir.path().join("r"));
    assert!(res.len() > 300, "{summary}");
    assert_statuses_as_recorded(&res, &summary);
    // The layers went as synthetic bytes: their digests, remapped, reached Clair's index
    // requests, and Clair fetched them from the fresh testbed's storage.
    assert!(
        res.iter()
            .any(|r| r.flags & loadtape::tape::replayed_flags::SYNTHESISED != 0),
        "{summary}"
    );
    let served = fresh.served();
    assert!(
        served[&("GET /_storage/{digest}".to_string(), 200)] > 0,
        "{served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverging_token_request_never_puts_its_live_token_on_the_results_tape() {
    use loadtape::testbed::{Config, Testbed};
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = || Config {
        accounts: vec![("alice".into(), "secret".into())],
        ..Config::default()
    };
    let recorded = Testbed::start(config()).await.unwrap();
    let tape = dir.path().join("wrong-password");
    let rec = net::start(net::config(recorded.addr, &tape)).await;
    // A wrong password, recorded: 401 (curl without -f).
    let url = format!(
        "http://{}/v2/auth?service=x&scope=repository:app:pull&token=abcdef123456",
        rec.addr
    );
    net::curl(&["-o", "/dev/null", "-u", "alice:wrong", &url]).await;
    rec.stop().await;
    // The replay gives the right one: 200 with a live token, where the recording had 401.
    let fresh = Testbed::start(config()).await.unwrap();
    let profile = dir.path().join("auth.toml");
    std::fs::write(
        &profile,
        "[[auth]]\npath-prefix = \"/v2/\"\nkind = \"registry-token\"\nusername-env = \"LT_USER\"\npassword-env = \"LT_PASSWORD\"\n",
    )
    .unwrap();
    let env = [("LT_USER", "alice"), ("LT_PASSWORD", "secret")];
    let (res, summary) = replay_with(&tape, fresh.addr, &profile, &env, &dir.path().join("r"));
    assert_eq!(res[0].status(), Some(200), "{summary}");
    let d = res[0].divergence.as_ref().expect("the divergence is kept");
    assert!(
        !String::from_utf8_lossy(&d.body).contains("token\""),
        "{d:?}"
    );
    assert!(d.target.contains("token=loadtape-redacted-"), "{d:?}");
    assert!(!d.target.contains("abcdef123456"), "{d:?}");
}
