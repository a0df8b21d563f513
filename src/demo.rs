//! `loadtape demo`: the whole story on a built-in session, with nothing installed.
//!
//! Until the proxy and the replayer land, the story is the tape's: real Quay and Clair traffic
//! (captured through mitmproxy from Quay v3.18 and Clair v4.9.0, shipped in `captures/har/`) is
//! imported into a tape directory with its credentials redacted, inspected, and exported back to
//! HAR and JSON lines.

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

    println!("\n`loadtape record` records such tapes in front of a staging Quay (see the README).");
    println!("Still to come (see the open issues): `replay` at x1 and x10 against a test cluster;");
    println!(
        "`diff` with a verdict a CI can gate on, and an HTML report; a demo that runs all of it."
    );
    println!("\nEverything is in {}", display(&dir));
    Ok(DemoOutput {
        tape_dir,
        har,
        exchanges: summary.records,
    })
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
