//! The `loadtape` binary as a user runs it: outputs, exit codes, and messages for bad input.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::*;

fn loadtape(args: &[&str]) -> Output {
    Command::new(loadtape_bin())
        .args(args)
        .env("LOADTAPE_LOG", "warn")
        .output()
        .expect("run loadtape")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn v1_tape() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("captures/v1/quay-session-v1.tape")
}

fn inspect_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["inspect", "--json"];
    all.extend_from_slice(args);
    let out = loadtape(&all);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn inspect_json_has_the_documented_keys() {
    let v1 = v1_tape();
    let j = inspect_json(&[v1.to_str().unwrap()]);
    for key in [
        "records",
        "record_kinds",
        "dropped",
        "first_ts",
        "last_ts",
        "duration_s",
        "status_counts",
        "methods",
        "endpoints",
        "bytes_on_disk",
    ] {
        assert!(j.get(key).is_some(), "missing key {key}: {j}");
    }
    assert_eq!(j["records"], 63);
    assert_eq!(j["record_kinds"]["exchange"], 63);
    // A repository created, four blobs and two manifests pushed.
    assert_eq!(j["status_counts"]["201"], 7);
    assert_eq!(j["bytes_on_disk"], std::fs::metadata(&v1).unwrap().len());
    let top = &j["endpoints"][0];
    assert!(
        top["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("HEAD /v2/{repo}/blobs/{digest}"),
        "{top}"
    );
}

#[test]
fn inspect_filters_by_status_and_endpoint() {
    let v1 = v1_tape();
    let p = v1.to_str().unwrap();
    let all = inspect_json(&[p]);
    let four: u64 = all["status_counts"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with('4'))
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();
    assert_eq!(inspect_json(&[p, "--status", "4xx"])["records"], four);
    let blobs = inspect_json(&[p, "--endpoint", "blobs/{digest}"]);
    assert_eq!(
        blobs["endpoints"].as_array().unwrap().len(),
        2,
        "HEAD and GET: {blobs}"
    );
}

#[test]
fn a_corrupt_tape_exits_2_naming_file_and_offset_and_lenient_reads_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.tape");
    write(&path, &exchanges(200, 20), small_frames(), true);
    let mut bytes = std::fs::read(&path).unwrap();
    let ends = frame_ends(&bytes);
    bytes[ends[1] + 100] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let out = loadtape(&["inspect", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("bad.tape"), "{err}");
    assert!(err.contains(&format!("at byte {}", ends[1])), "{err}");
    assert!(err.contains("--lenient"), "{err}");

    let j = inspect_json(&["--lenient", path.to_str().unwrap()]);
    assert!(j["lost"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(
        j["records"].as_u64().unwrap() + j["lost"].as_u64().unwrap(),
        200
    );
}

#[test]
fn a_missing_tape_is_named_with_its_reason_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.tape");
    let out = loadtape(&["inspect", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "the OS error once: {stderr}"
    );
}

#[test]
fn a_truncated_tape_reads_and_says_where_it_was_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.tape");
    write(&path, &exchanges(100, 21), small_frames(), true);
    let bytes = std::fs::read(&path).unwrap();
    let ends = frame_ends(&bytes);
    std::fs::write(&path, &bytes[..ends[3] + 30]).unwrap();
    let out = loadtape(&["inspect", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("TRUNCATED, cut at byte {}", ends[3])),
        "{stdout}"
    );
}

#[test]
fn bad_flags_say_what_would_be_right() {
    let v1 = v1_tape();
    let p = v1.to_str().unwrap();
    let out = loadtape(&["inspect", p, "--status", "9xx"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("a class (5xx)"),
        "{}",
        text(&out.stderr)
    );
    let out = loadtape(&["inspect", p, "--from", "yesterday"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`90s`"), "{}", text(&out.stderr));
    let out = loadtape(&["export", p, "--format", "pcap"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("har"), "{}", text(&out.stderr));
    let out = loadtape(&[
        "record",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://127.0.0.1:1",
        "--out",
        "/nonexistent/tapes",
        "--header-read-timeout",
        "0s",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("(try 30s)"),
        "{}",
        text(&out.stderr)
    );
    for (level, ok) in [("30", false), ("-8", false), ("-1", true)] {
        let out = loadtape(&[
            "record",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "ftp://127.0.0.1:1",
            "--out",
            "/nonexistent/tapes",
            "--zstd-level",
            level,
        ]);
        assert_eq!(out.status.code(), Some(2));
        // A level out of range is refused with the range; one in it gets as far as the
        // upstream, which is refused before anything is opened.
        let said = text(&out.stderr);
        assert_eq!(said.contains("-7..=19"), !ok, "{level}: {said}");
        assert_eq!(said.contains("not an http://"), ok, "{level}: {said}");
    }
    // A path on the upstream would be dropped: refused, with what would do.
    let out = loadtape(&[
        "record",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "http://quay.internal:8080/quay",
        "--out",
        "/nonexistent/tapes",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let said = text(&out.stderr);
    assert!(said.contains("(try http://quay.internal:8080)"), "{said}");
    let out = loadtape(&["inspect", "/nonexistent/tape"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("/nonexistent/tape"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn export_writes_private_har_and_jsonl_and_import_takes_the_har_back() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = v1_tape();
    let har = dir.path().join("out.har");
    let out = loadtape(&[
        "export",
        v1.to_str().unwrap(),
        "--format",
        "har",
        "--out",
        har.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::metadata(&har).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let parsed: serde_json::Value = serde_json::from_slice(&std::fs::read(&har).unwrap()).unwrap();
    assert_eq!(parsed["log"]["entries"].as_array().unwrap().len(), 63);

    let jsonl = dir.path().join("out.jsonl");
    let out = loadtape(&[
        "export",
        v1.to_str().unwrap(),
        "--format",
        "jsonl",
        "--status",
        "404",
        "--out",
        jsonl.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let exchanges: Vec<_> = lines.iter().filter(|l| l["kind"] == "exchange").collect();
    assert!(!exchanges.is_empty());
    assert!(exchanges
        .iter()
        .all(|e| e["response"]["Ok"]["status"] == 404));

    let again = dir.path().join("again");
    let out = loadtape(&[
        "import",
        har.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(inspect_json(&[again.to_str().unwrap()])["records"], 63);
}

#[test]
fn demo_runs_with_nothing_installed() {
    let dir = tempfile::tempdir().unwrap();
    let out = loadtape(&[
        "demo",
        "--out",
        dir.path().to_str().unwrap(),
        "--seconds",
        "12",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // The x1 replay against the candidate whose Clair index is slower: exactly that class.
    let x1 = dir.path().join("replay-x1.tape");
    let diff = loadtape(&["diff", x1.to_str().unwrap(), "--format", "json"]);
    assert_eq!(diff.status.code(), Some(1), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&diff.stdout).unwrap();
    let regressed: Vec<&str> = v["classes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "regression")
        .map(|c| c["class"].as_str().unwrap())
        .collect();
    assert_eq!(regressed, ["POST /indexer/api/v1/index_report"], "{stdout}");
    assert!(stdout.contains("verdict: REGRESSION (1 of"), "{stdout}");
    // Every request the driver sent through the proxy was replayed, with its recorded status.
    let recorded = inspect_json(&[dir.path().join("recorded").to_str().unwrap()]);
    let replayed = inspect_json(&[x1.to_str().unwrap()]);
    assert_eq!(
        recorded["status_counts"], replayed["status_counts"],
        "{stdout}"
    );
    assert!(dir.path().join("diff-x1.html").exists());
    assert!(dir.path().join("replay-x4.tape").exists());
    // Run again into the same directory: refused, saying what to do, nothing overwritten.
    let again = loadtape(&["demo", "--out", dir.path().to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        text(&again.stderr).contains("new or empty directory"),
        "{}",
        text(&again.stderr)
    );
}
