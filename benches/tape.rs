//! Tape write and read throughput, and size on disk, beside the obvious alternative: the same
//! records as JSON lines compressed with zstd.
//!
//! The records are the built-in Quay/Clair session scaled up with fresh digests, upload ids and
//! timings (`loadtape::synth`), bodies as metadata only (length and sha256), which is what the
//! recording proxy writes for the bulk of registry traffic. Run with `cargo bench --bench tape`;
//! the sizes are printed before the timings.
//!
//! Two mixes: `zipf`, digests drawn from a catalogue of 10,000 blobs with Zipf popularity (pulls
//! of popular layers repeat, as in production), and `unique`, every request naming a digest
//! never seen before (the worst case for compression). The allocator is the binary's.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use loadtape::synth::{builtin_templates, Synth};
use loadtape::tape::{Record, TapeHeader, TapeKind, TapeReader, TapeWriter, WriterOptions};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RECORDS: usize = 200_000;
/// The JSON-lines alternative at the same zstd level as the tape.
const JSONL_LEVEL: i32 = 3;

/// The benchmark mix: `catalogue` distinct blobs, or a new digest per request when `None`.
fn records(catalogue: Option<usize>) -> Vec<Record> {
    let synth = Synth::new(builtin_templates(), 2_000.0, 42, false);
    let synth = match catalogue {
        Some(n) => synth.with_catalogue(n),
        None => synth,
    };
    synth
        .take(RECORDS)
        .map(|e| Record::Exchange(Box::new(e)))
        .collect()
}

fn write_tape(path: &Path, records: &[Record], level: i32) {
    let _ = std::fs::remove_file(path);
    let header = TapeHeader::new(TapeKind::Capture, "bench");
    let options = WriterOptions {
        level,
        ..WriterOptions::default()
    };
    let mut w = TapeWriter::create(path, header, options).unwrap();
    for r in records {
        w.set_watermark(r.start());
        w.write(r).unwrap();
    }
    w.finish().unwrap();
}

fn read_tape(path: &Path) -> usize {
    let mut n = 0;
    for record in TapeReader::open_one(path).unwrap() {
        record.unwrap();
        n += 1;
    }
    n
}

fn write_jsonl(path: &Path, records: &[Record]) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = zstd::Encoder::new(std::io::BufWriter::new(file), JSONL_LEVEL).unwrap();
    for r in records {
        serde_json::to_writer(&mut enc, r).unwrap();
        enc.write_all(b"\n").unwrap();
    }
    enc.finish().unwrap().flush().unwrap();
}

fn read_jsonl(path: &Path) -> usize {
    let dec = zstd::Decoder::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut n = 0;
    for line in BufReader::new(dec).lines() {
        serde_json::from_str::<serde_json::Value>(&line.unwrap()).unwrap();
        n += 1;
    }
    n
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let tape = dir.path().join("bench.tape");
    let jsonl = dir.path().join("bench.jsonl.zst");
    for (mix, catalogue) in [("zipf", Some(10_000)), ("unique", None)] {
        let records = records(catalogue);
        for level in [-1, 1, 3] {
            write_tape(&tape, &records, level);
            let size = std::fs::metadata(&tape).unwrap().len();
            eprintln!(
                "{mix}: tape (zstd {level}): {size} bytes, {:.1} bytes/record",
                size as f64 / RECORDS as f64
            );
        }
        write_jsonl(&jsonl, &records);
        let size = std::fs::metadata(&jsonl).unwrap().len();
        eprintln!(
            "{mix}: JSON lines + zstd {JSONL_LEVEL}: {size} bytes, {:.1} bytes/record",
            size as f64 / RECORDS as f64
        );

        let mut g = c.benchmark_group(mix);
        g.throughput(Throughput::Elements(RECORDS as u64));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(6));
        for level in [-1, 1, 3] {
            g.bench_function(format!("write/tape-zstd{level}"), |b| {
                b.iter_batched(
                    || (),
                    |_| write_tape(&tape, &records, level),
                    BatchSize::PerIteration,
                )
            });
        }
        write_tape(&tape, &records, 3);
        g.bench_function("read/tape", |b| {
            b.iter(|| assert_eq!(read_tape(&tape), RECORDS))
        });
        if mix == "zipf" {
            g.sample_size(10);
            g.measurement_time(Duration::from_secs(30));
            g.bench_function("write/jsonl-zstd", |b| {
                b.iter(|| write_jsonl(&jsonl, &records))
            });
            g.bench_function("read/jsonl-zstd", |b| {
                b.iter(|| assert_eq!(read_jsonl(&jsonl), RECORDS))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
