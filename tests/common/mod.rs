//! Set-up shared by the integration tests: tapes made of realistic records, and reading them
//! back whole.
#![allow(dead_code)]

pub mod net;
pub mod registry;
pub mod sink;

use std::path::{Path, PathBuf};

use loadtape::synth::{builtin_templates, Synth};
use loadtape::tape::{
    ReadOptions, ReadStats, Record, TapeError, TapeHeader, TapeKind, TapeReader, TapeWriter,
    WriteSummary, WriterOptions,
};

pub fn header() -> TapeHeader {
    TapeHeader::new(TapeKind::Capture, "loadtape test")
}

/// `n` exchanges shaped like the built-in Quay/Clair session, in start order.
pub fn exchanges(n: usize, seed: u64) -> Vec<Record> {
    Synth::new(builtin_templates(), 500.0, seed, true)
        .take(n)
        .map(|e| Record::Exchange(Box::new(e)))
        .collect()
}

/// Writes `records` in the given order, declaring them ordered (watermark) when `ordered`.
pub fn write(
    path: &Path,
    records: &[Record],
    options: WriterOptions,
    ordered: bool,
) -> WriteSummary {
    let mut w = TapeWriter::create(path, header(), options).expect("create tape");
    for r in records {
        if ordered {
            w.set_watermark(r.start());
        }
        w.write(r).expect("write record");
    }
    w.finish().expect("finish tape")
}

/// Small frames, so that a small tape has many.
pub fn small_frames() -> WriterOptions {
    WriterOptions {
        frame_bytes: 2048,
        ..WriterOptions::default()
    }
}

pub fn read(
    paths: &[PathBuf],
    options: &ReadOptions,
) -> Result<(Vec<Record>, ReadStats), TapeError> {
    let mut reader = TapeReader::open(paths, options)?;
    let records = reader.by_ref().collect::<Result<Vec<_>, _>>()?;
    Ok((records, reader.stats().clone()))
}

pub fn read_one(path: &Path) -> Result<(Vec<Record>, ReadStats), TapeError> {
    read(&[path.to_path_buf()], &ReadOptions::default())
}

/// The path of the loadtape binary built for these tests.
pub fn loadtape_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_loadtape"))
}

/// The offsets at which each frame of a tape file ends, from its own bytes.
pub fn frame_ends(bytes: &[u8]) -> Vec<usize> {
    use loadtape::tape::format::{FILE_PREFIX_LEN, FRAME_HEADER_LEN, FRAME_MAGIC};
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let mut at = FILE_PREFIX_LEN + header_len + 4;
    let mut ends = Vec::new();
    while at + FRAME_HEADER_LEN <= bytes.len() && &bytes[at..at + 4] == FRAME_MAGIC {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        at += FRAME_HEADER_LEN + len;
        ends.push(at);
    }
    ends
}

/// Where each frame's header starts.
fn frame_starts(bytes: &[u8]) -> Vec<usize> {
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let mut starts = vec![loadtape::tape::format::FILE_PREFIX_LEN + header_len + 4];
    let ends = frame_ends(bytes);
    starts.extend(ends.iter().take(ends.len().saturating_sub(1)).copied());
    starts
}

/// Records per frame, in order.
pub fn frame_records(bytes: &[u8]) -> Vec<usize> {
    frame_starts(bytes)
        .iter()
        .map(|&s| u32::from_le_bytes(bytes[s + 12..s + 16].try_into().unwrap()) as usize)
        .collect()
}

/// The watermark of each frame, in order.
pub fn frame_watermarks(bytes: &[u8]) -> Vec<u64> {
    frame_starts(bytes)
        .iter()
        .map(|&s| u64::from_le_bytes(bytes[s + 36..s + 44].try_into().unwrap()))
        .collect()
}

/// The smallest record start of each frame, in order.
pub fn frame_first_starts(bytes: &[u8]) -> Vec<u64> {
    frame_starts(bytes)
        .iter()
        .map(|&s| u64::from_le_bytes(bytes[s + 20..s + 28].try_into().unwrap()))
        .collect()
}

/// Checks the writer's promise: nothing in a later frame started before an earlier frame's
/// watermark. Returns how many frames carry one.
pub fn assert_watermarks_hold(bytes: &[u8]) -> usize {
    let watermarks = frame_watermarks(bytes);
    let first = frame_first_starts(bytes);
    for (i, w) in watermarks.iter().enumerate() {
        for (j, f) in first.iter().enumerate().skip(i + 1) {
            assert!(
                f >= w,
                "frame {j} starts at {f}, before frame {i}'s watermark {w}"
            );
        }
    }
    watermarks.iter().filter(|&&w| w > 0).count()
}

/// The exchanges among `records`.
pub fn exchanges_in(records: &[Record]) -> Vec<&loadtape::tape::Exchange> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Exchange(e) => Some(e.as_ref()),
            _ => None,
        })
        .collect()
}

/// Where `needle` occurs in `haystack`.
pub fn occurrences(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// The decompressed payloads of the frames of the tape file `bytes` (see captures/README.md).
pub fn frame_payloads(bytes: &[u8]) -> Vec<Vec<u8>> {
    use loadtape::tape::format::{FILE_PREFIX_LEN, FRAME_HEADER_LEN, FRAME_MAGIC};
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let mut at = FILE_PREFIX_LEN + u32_at(12) + 4;
    let mut payloads = Vec::new();
    while bytes.get(at..at + 4) == Some(&FRAME_MAGIC[..]) {
        let payload = &bytes[at + FRAME_HEADER_LEN..][..u32_at(at + 4)];
        payloads.push(zstd::decode_all(payload).unwrap());
        at += FRAME_HEADER_LEN + payload.len();
    }
    payloads
}
