//! `loadtape demo`: the whole story on a built-in session, with nothing installed.
//!
//! Real Quay and Clair traffic (captured through mitmproxy from Quay v3.18 and Clair v4.9.0,
//! shipped in `captures/har/`) is imported into a tape directory with its credentials redacted,
//! inspected, exported back to HAR, then replayed at ten times its speed against a stand-in
//! target started in-process on loopback (it answers every request 200: the realistic Quay and
//! Clair testbed is an open issue), with the per-endpoint summary a real replay prints.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::har::{import_bytes, HarExporter, ImportOptions, BUILTIN_SESSIONS};
use crate::inspect::summarise;
use crate::redact::Redactor;
use crate::select::Selection;
use crate::tape::{HeaderValue, Record, TapeReader};

/// What the demo made, for tests.
pub struct DemoOutput {
    pub tape_dir: PathBuf,
    pub har: PathBuf,
    pub exchanges: u64,
}

pub fn run(out: &Option<PathBuf>) -> anyhow::Result<DemoOutput> {
    let dir = match out {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "loadtape-demo-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3f")
        )),
    };
    let tape_dir = dir.join("session");
    if tape_dir.exists() || dir.join("results.tape").exists() {
        anyhow::bail!(
            "{} already holds a demo's tapes (tapes are never overwritten): give --out a new or empty directory, or leave it out for a fresh temporary one",
            dir.display()
        );
    }
    println!("loadtape demo: a real Quay v3.18 and Clair v4.9.0 session, built in\n");

    println!(
        "1. import: HAR -> tape directory {} (credentials redacted)",
        tape_dir.display()
    );
    let redactor = Redactor::default();
    for (name, bytes) in BUILTIN_SESSIONS {
        let s = import_bytes(bytes, name, &tape_dir, &redactor, &ImportOptions::default())?;
        println!(
            "   {name}: {} exchanges on {} connections, {} credential values redacted, {} on disk",
            s.entries,
            s.connections,
            s.redacted,
            crate::inspect::human_bytes(s.tape.bytes)
        );
    }

    println!("\n2. inspect {}\n", tape_dir.display());
    let summary = summarise(TapeReader::open_one(&tape_dir)?, &Selection::default())?;
    for line in summary.to_text().lines() {
        println!("   {line}");
    }

    let har = dir.join("session.har");
    println!(
        "\n3. export: tape -> {} (HAR 1.2, opens in browser dev tools)",
        har.display()
    );
    let mut reader = TapeReader::open_one(&tape_dir)?;
    let file = crate::files::create_private(&har)
        .with_context(|| format!("cannot create {}", har.display()))?;
    let mut exporter = HarExporter::new(std::io::BufWriter::new(file), reader.epoch_unix_ns())?;
    let mut example = None;
    for record in reader.by_ref() {
        let record = record?;
        if let Record::Exchange(e) = &record {
            if example.is_none() {
                if let Some(HeaderValue::Redacted(r)) = e.request.headers.get("authorization") {
                    example = Some(format!(
                        "{} {}: authorization = {}",
                        e.request.method,
                        e.request.path(),
                        r.marker()
                    ));
                }
            }
        }
        exporter.add(&record)?;
    }
    let entries = exporter.finish()?;
    println!("   {entries} entries written");
    if let Some(example) = example {
        println!("   a credential as the tape keeps it: {example}");
    }

    println!(
        "\n4. replay at x10 against a stand-in target on loopback (answers 200 to everything)\n"
    );
    let report = replay_demo(&tape_dir, &dir.join("results.tape"))?;
    for line in report.to_text().lines() {
        println!("   {line}");
    }

    println!("\n5. the diff of that replay against the recording (what a CI job gates on)\n");
    if let Some((replayed, recorded)) = &report.datasets {
        let gate = crate::report::verdict::Gate::default();
        let phase = crate::report::dataset::Phase::FirstByte;
        let comparison = crate::report::diff::compare(recorded, replayed, &gate, phase);
        for line in comparison.to_text(8).lines() {
            println!("   {line}");
        }
        let html = dir.join("diff.html");
        let page = crate::report::html::diff(&comparison, recorded, replayed)?;
        crate::files::create_private(&html)
            .and_then(|mut f| std::io::Write::write_all(&mut f, page.as_bytes()))
            .with_context(|| format!("cannot write {}", html.display()))?;
        println!(
            "\n   The stand-in answers 200 to everything, so every class the recording answered"
        );
        println!(
            "   otherwise regresses: the gate at work. HTML report: {}",
            display(&html)
        );
    }
    println!(
        "\n`loadtape record` records such tapes in front of a staging Quay, `loadtape replay`"
    );
    println!("replays them against a test cluster, `loadtape diff` gates on the result (see the");
    println!("README). Still to come (open issues): the demo against the Quay/Clair testbed.");
    println!("\nEverything is in {}", display(&dir));
    Ok(DemoOutput {
        tape_dir,
        har,
        exchanges: summary.records,
    })
}

/// Replays `tape` at x10 against a target that answers 200 to everything, on loopback.
fn replay_demo(tape: &Path, results: &Path) -> anyhow::Result<crate::replay::ReplayReport> {
    use http_body_util::Full;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        bytes::Bytes::from_static(b"ok\n"),
                    )))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    let mut config = crate::replay::ReplayConfig::new(
        vec![tape.to_path_buf()],
        format!("http://{addr}").parse()?,
    );
    config.plan.schedule = crate::replay::Schedule::Speed(10.0);
    config.out = Some(results.to_path_buf());
    let report = crate::replay::run(
        &config,
        tokio_util::sync::CancellationToken::new(),
        std::sync::Arc::new(crate::replay::Live::default()),
    )?;
    runtime.shutdown_background();
    Ok(report)
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
