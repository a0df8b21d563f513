//! The tape: loadtape's capture file format, and the only thing its stages share.
//!
//! Data moves one way, `record -> tape -> replay -> results tape -> report`, and every stage
//! speaks to the next through these types. The byte layout is specified in
//! `captures/README.md`; [`format`] holds its constants, [`codec`] turns records into frame
//! payloads, [`writer`] batches, compresses and rotates, [`capture`] puts a never-blocking queue
//! in front of a writer for the proxy, and [`reader`] streams records back in request-start order.
//!
//! This module needs no network stack, so the fuzz target and benchmarks build it alone.

pub mod capture;
pub mod codec;
mod error;
pub mod format;
mod headers;
pub mod reader;
pub mod record;
pub mod writer;

pub use error::TapeError;
pub use format::{TapeHeader, TapeKind, FORMAT_VERSION};
pub use headers::{well_known_index, JwtInfo, Sharing, KNOWN_NAMES};
pub use reader::{ReadOptions, ReadStats, TapeReader};
pub use record::*;
pub use writer::{TapeWriter, WriteSummary, WriterOptions};

impl TapeHeader {
    /// A header for a new tape: a fresh random id, the epoch now.
    pub fn new(kind: TapeKind, recorder: &str) -> TapeHeader {
        let mut tape_id = [0u8; 16];
        // Without an OS random source, a time-derived id still tells recordings apart.
        if getrandom::fill(&mut tape_id).is_err() {
            let now = now_unix_ns().to_le_bytes();
            tape_id[..8].copy_from_slice(&now);
        }
        TapeHeader {
            codec: format::CODEC_ZSTD,
            tape_id,
            seq: 0,
            epoch_unix_ns: now_unix_ns(),
            kind,
            recorder: recorder.to_string(),
            recorder_version: env!("CARGO_PKG_VERSION").to_string(),
            options: Vec::new(),
            upstream: None,
        }
    }
}

/// Wall-clock now, ns since the Unix epoch.
pub fn now_unix_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
