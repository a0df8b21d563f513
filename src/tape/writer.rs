//! Writes records into tape files: batches them into frames, compresses, rotates.
//!
//! The writer is synchronous and owns its file; it is either driven directly by an offline
//! producer (import, replay results), which simply waits on it, or by the capture thread of
//! [`super::capture`], which stands between it and the proxy so that the proxy never waits.
//!
//! Durability: a frame is flushed when it is full or at least every `flush_interval`, so a
//! crash loses at most that much. A failed write (disk full) truncates the file back to its last
//! whole frame, so the file stays readable, and reports how many records were lost.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::codec::FrameEncoder;
use super::error::TapeError;
use super::format::{
    bincode_config, encode_file_header, FrameHeader, IndexEntry, TapeHeader, TapeIndex, END_MAGIC,
    FRAME_ORDERED, INDEX_MAGIC,
};
use super::record::{Dropped, Nanos, Record};

/// How a writer batches, compresses and rotates.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// A frame is flushed at least this often while records arrive.
    pub flush_interval: Duration,
    /// A frame is flushed once its uncompressed records reach this size.
    pub frame_bytes: usize,
    /// Start a new file once the current one reaches this size (directory targets only).
    pub rotate_size: Option<u64>,
    /// Start a new file once the current one is this old (directory targets only).
    pub rotate_every: Option<Duration>,
    /// zstd compression level, 1 by default. What it costs depends on what is kept: on records
    /// of metadata (`cargo bench --bench tape`) level -1 writes 5-8% faster and 27-33% more
    /// bytes, level 3 8-20% slower and 3-8% fewer; on the prefixes of compressed layers a
    /// recorder keeps by default, where zstd 1's Huffman coding of literals gains nothing,
    /// level -1 compresses 2.2-3.5x faster to the same size (the frames of
    /// `captures/testbed/`). `loadtape record --zstd-level` chooses.
    pub level: i32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            flush_interval: Duration::from_secs(1),
            frame_bytes: 1 << 20,
            rotate_size: None,
            rotate_every: None,
            level: 1,
        }
    }
}

/// What a writer wrote.
#[derive(Debug, Clone, Default)]
pub struct WriteSummary {
    pub files: Vec<PathBuf>,
    pub records: u64,
    pub frames: u64,
    /// Bytes written to disk.
    pub bytes: u64,
    /// Records dropped before they reached the writer, or lost to failed writes.
    pub dropped: u64,
    /// Blob records not written again because the directory already holds them.
    pub blobs_deduplicated: u64,
    /// Files closed for a new one (`rotate_size`, `rotate_every`).
    pub rotations: u64,
}

enum Target {
    File(PathBuf),
    /// Rotated files `<prefix>-<seq>.tape` in a directory.
    Dir {
        dir: PathBuf,
        prefix: String,
    },
}

struct OpenFile {
    path: PathBuf,
    file: File,
    /// Bytes known good: the file is truncated back to this on a failed write.
    len: u64,
    opened: Instant,
    index: Vec<IndexEntry>,
    records: u64,
    dropped: u64,
}

/// A tape writer. See the module docs.
pub struct TapeWriter {
    target: Target,
    options: WriterOptions,
    header: TapeHeader,
    current: Option<OpenFile>,
    /// The frame under construction: encoded records, uncompressed.
    frame: Vec<u8>,
    frame_records: u32,
    frame_first: Nanos,
    frame_last: Nanos,
    /// Whether the frame's records came in start order so far.
    frame_ordered: bool,
    frame_started: Option<Instant>,
    watermark: Nanos,
    compressor: zstd::bulk::Compressor<'static>,
    /// The last frame compressed (kept to reuse its memory).
    compressed: Vec<u8>,
    /// Remembers header values within the frame under construction.
    encoder: FrameEncoder,
    blobs: HashSet<[u8; 32]>,
    summary: WriteSummary,
}

impl TapeWriter {
    /// Creates a writer. A `path` ending in `.tape` is one file (created, never overwritten);
    /// anything else is a directory of rotated files, created 0700 when missing.
    pub fn create(
        path: impl AsRef<Path>,
        header: TapeHeader,
        options: WriterOptions,
    ) -> Result<Self, TapeError> {
        let path = path.as_ref();
        let target = if path.extension().is_some_and(|e| e == "tape") {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                create_private_dir(parent)?;
            }
            Target::File(path.to_path_buf())
        } else {
            create_private_dir(path)?;
            let start = chrono::DateTime::from_timestamp_nanos(header.epoch_unix_ns);
            Target::Dir {
                dir: path.to_path_buf(),
                prefix: start.format("%Y%m%dT%H%M%S%.3fZ").to_string(),
            }
        };
        let compressor = zstd::bulk::Compressor::new(options.level)
            .map_err(TapeError::io("set up compression for", path))?;
        let mut writer = TapeWriter {
            target,
            options,
            header,
            current: None,
            frame: Vec::new(),
            frame_records: 0,
            frame_first: Nanos::MAX,
            frame_last: 0,
            frame_ordered: true,
            frame_started: None,
            watermark: 0,
            compressor,
            compressed: Vec::new(),
            encoder: FrameEncoder::new(),
            blobs: HashSet::new(),
            summary: WriteSummary::default(),
        };
        writer.open_next()?;
        Ok(writer)
    }

    /// What it has written so far.
    pub fn summary(&self) -> &WriteSummary {
        &self.summary
    }

    /// The file being written.
    pub fn current_path(&self) -> Option<&Path> {
        self.current.as_ref().map(|f| f.path.as_path())
    }

    pub fn header(&self) -> &TapeHeader {
        &self.header
    }

    /// Appends a record. Blobs already written to this directory are skipped.
    pub fn write(&mut self, record: &Record) -> Result<(), TapeError> {
        if let Record::Blob(b) = record {
            if !self.blobs.insert(b.sha256) {
                self.summary.blobs_deduplicated += 1;
                return Ok(());
            }
        }
        if self.frame_started.is_none() {
            self.frame_started = Some(Instant::now());
        }
        self.encoder.encode(record, &mut self.frame);
        self.frame_records += 1;
        let ts = record.start();
        // Records of unknown kinds carry no time a reader can see: they do not break the order.
        if !matches!(record, Record::Unknown { .. }) {
            self.frame_ordered &= ts >= self.frame_last;
        }
        self.frame_first = self.frame_first.min(ts);
        self.frame_last = self.frame_last.max(ts);
        if self.frame.len() >= self.options.frame_bytes {
            self.flush()?;
        }
        Ok(())
    }

    /// Notes records dropped before they reached the writer, as a [`Dropped`] record.
    pub fn note_dropped(&mut self, records: u64, bytes: u64, at: Nanos) -> Result<(), TapeError> {
        self.summary.dropped += records;
        if let Some(f) = self.current.as_mut() {
            f.dropped += records;
        }
        self.write(&Record::Dropped(Dropped { at, records, bytes }))
    }

    /// Declares that every exchange starting before `ts` has been written (see the frame
    /// header's watermark). Offline writers that write in start order call it as they go.
    pub fn set_watermark(&mut self, ts: Nanos) {
        self.watermark = self.watermark.max(ts);
    }

    /// Flushes the frame if it is older than the flush interval, and rotates by age. Call it
    /// periodically when records may stop arriving.
    pub fn tick(&mut self) -> Result<(), TapeError> {
        if self
            .frame_started
            .is_some_and(|t| t.elapsed() >= self.options.flush_interval)
        {
            self.flush()?;
        }
        if let (Some(every), Some(f)) = (self.options.rotate_every, self.current.as_ref()) {
            if f.opened.elapsed() >= every && matches!(self.target, Target::Dir { .. }) {
                self.flush()?;
                self.rotate()?;
            }
        }
        Ok(())
    }

    /// Compresses and writes the frame under construction.
    pub fn flush(&mut self) -> Result<(), TapeError> {
        if self.frame_records == 0 {
            return Ok(());
        }
        let records = self.frame_records;
        let result = self.write_frame();
        self.frame.clear();
        self.encoder.reset();
        self.frame_records = 0;
        self.frame_first = Nanos::MAX;
        self.frame_last = 0;
        self.frame_ordered = true;
        self.frame_started = None;
        if let Err(source) = result {
            self.summary.dropped += records as u64;
            let path = match self.current.as_mut() {
                Some(f) => {
                    // Cut back to the last whole frame so the file stays readable.
                    let _ = f.file.set_len(f.len);
                    let _ = f.file.seek(SeekFrom::Start(f.len));
                    f.dropped += records as u64;
                    f.path.clone()
                }
                None => self.target_path().to_path_buf(),
            };
            return Err(TapeError::Write {
                path,
                records_lost: records as u64,
                source,
            });
        }
        self.summary.records += records as u64;
        self.summary.frames += 1;
        let rotate = match (self.options.rotate_size, self.current.as_ref()) {
            (Some(limit), Some(f)) => f.len >= limit && matches!(self.target, Target::Dir { .. }),
            _ => false,
        };
        if rotate {
            self.rotate()?;
        }
        Ok(())
    }

    fn write_frame(&mut self) -> std::io::Result<()> {
        let mut payload = std::mem::take(&mut self.compressed);
        payload.clear();
        payload.reserve(zstd::zstd_safe::compress_bound(self.frame.len()));
        self.compressor
            .compress_to_buffer(&self.frame, &mut payload)?;
        let result = self.write_compressed(&payload);
        self.compressed = payload;
        result
    }

    fn write_compressed(&mut self, payload: &[u8]) -> std::io::Result<()> {
        let header = FrameHeader {
            payload_len: payload.len() as u32,
            raw_len: self.frame.len() as u32,
            records: self.frame_records,
            flags: if self.frame_ordered { FRAME_ORDERED } else { 0 },
            first_ts: self.frame_first,
            last_ts: self.frame_last,
            watermark: self.watermark,
            payload_crc: crc32c::crc32c(payload),
        };
        if self.current.is_none() {
            // An earlier rotation could not open its file (a full disk): try again now.
            self.open_next().map_err(std::io::Error::other)?;
        }
        let f = self.current.as_mut().expect("opened above");
        let offset = f.len;
        let head = header.encode();
        f.file.write_all(&head)?;
        f.file.write_all(payload)?;
        let written = (head.len() + payload.len()) as u64;
        f.len += written;
        f.records += self.frame_records as u64;
        f.index.push(IndexEntry {
            offset,
            first_ts: header.first_ts,
            last_ts: header.last_ts,
            records: header.records,
        });
        self.summary.bytes += written;
        Ok(())
    }

    /// Flushes, writes the footer index and closes the tape.
    pub fn finish(mut self) -> Result<WriteSummary, TapeError> {
        self.flush()?;
        self.close_current()?;
        Ok(self.summary)
    }

    /// Like [`TapeWriter::finish`], for a writer that must not fail its caller: what cannot be
    /// written (a full disk) is counted as dropped, and the file is left readable up to its last
    /// whole frame. Returns the summary and the error met, if any.
    pub fn finish_best_effort(mut self) -> (WriteSummary, Option<TapeError>) {
        let flushed = self.flush();
        let closed = match &flushed {
            Ok(()) => self.close_current(),
            Err(_) => {
                // Leave the file as it is: readable up to its last frame, without an index.
                self.current = None;
                Ok(())
            }
        };
        (self.summary, flushed.err().or(closed.err()))
    }

    fn rotate(&mut self) -> Result<(), TapeError> {
        // A file whose index cannot be written still reads up to its last frame: go on.
        let closed = self.close_current();
        self.summary.rotations += 1;
        self.header.seq += 1;
        self.open_next()?;
        closed
    }

    fn target_path(&self) -> &Path {
        match &self.target {
            Target::File(p) => p,
            Target::Dir { dir, .. } => dir,
        }
    }

    fn close_current(&mut self) -> Result<(), TapeError> {
        let Some(mut f) = self.current.take() else {
            return Ok(());
        };
        let index = TapeIndex {
            frames: std::mem::take(&mut f.index),
            records: f.records,
            dropped: f.dropped,
        };
        let payload =
            bincode::encode_to_vec(&index, bincode_config()).expect("an index always encodes");
        let mut tail = Vec::with_capacity(payload.len() + 28);
        tail.extend_from_slice(INDEX_MAGIC);
        tail.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        tail.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        let head_crc = crc32c::crc32c(&tail);
        tail.extend_from_slice(&head_crc.to_le_bytes());
        tail.extend_from_slice(&payload);
        tail.extend_from_slice(&f.len.to_le_bytes());
        tail.extend_from_slice(END_MAGIC);
        let path = f.path.clone();
        f.file
            .write_all(&tail)
            .and_then(|_| f.file.sync_all())
            .map_err(TapeError::io("finish", &path))?;
        self.summary.bytes += tail.len() as u64;
        Ok(())
    }

    fn open_next(&mut self) -> Result<(), TapeError> {
        let path = match &self.target {
            Target::File(p) => p.clone(),
            Target::Dir { dir, prefix } => {
                dir.join(format!("{prefix}-{:06}.tape", self.header.seq))
            }
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(TapeError::io("create", &path))?;
        let head = encode_file_header(&self.header);
        file.write_all(&head)
            .map_err(TapeError::io("write", &path))?;
        self.summary.bytes += head.len() as u64;
        self.summary.files.push(path.clone());
        self.current = Some(OpenFile {
            path,
            file,
            len: head.len() as u64,
            opened: Instant::now(),
            index: Vec::new(),
            records: 0,
            dropped: 0,
        });
        Ok(())
    }
}

/// Creates `dir` (and its parents) with mode 0700 when missing; an existing one is left as is.
fn create_private_dir(dir: &Path) -> Result<(), TapeError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(TapeError::io("create directory", dir))
}
