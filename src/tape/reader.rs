//! Reads tapes back: files, directories of rotated files, several recordings at once.
//!
//! The reader streams: it holds one frame of each file being read and a bounded reorder buffer,
//! whatever the tape's size. Records are written when exchanges complete, so a long upload lands
//! after requests that started later; the reader hands records out in request-start order by
//! holding them until either the writer's watermark (see the frame header) or the reorder window
//! (default 60 s of tape time) says nothing earlier can still come. A record that comes later
//! than that is handed out at once, flagged ([`TapeReader::last_out_of_order`]) and counted.
//!
//! Damage is told apart from a cut: a file that ends inside a frame (the recorder was killed, or
//! is still writing) reads up to its last whole frame and says how much was cut; a frame that
//! fails a checksum is corruption, reported with file and byte offset, unless the reader is
//! lenient, in which case the frame is skipped and its records counted as lost.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::codec::{DecodeFailure, FrameDecoder};
use super::error::TapeError;
use super::format::FRAME_ORDERED;
use super::format::{
    bincode_config, FrameHeader, TapeHeader, TapeIndex, END_MAGIC, FILE_PREFIX_LEN, FORMAT_VERSION,
    FRAME_HEADER_LEN, FRAME_MAGIC, INDEX_HEADER_LEN, INDEX_MAGIC, MAGIC, MAX_FRAME_LEN,
    MAX_HEADER_LEN, TRAILER_LEN,
};
use super::record::{Nanos, Record};

/// How to read.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Skip frames that fail their checksums instead of stopping.
    pub lenient: bool,
    /// Only records starting at or after this instant (ns since the first tape's epoch).
    pub from: Option<Nanos>,
    /// Only records starting before this instant.
    pub to: Option<Nanos>,
    /// How long, in tape time, a record may come after records that started later.
    pub reorder_window: Nanos,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            lenient: false,
            from: None,
            to: None,
            reorder_window: 60_000_000_000,
        }
    }
}

/// What reading found, beyond the records.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReadStats {
    pub files: Vec<FileStats>,
    /// Frames skipped for damage (lenient reading only).
    pub corrupt: Vec<Corruption>,
    /// Records that came after the reorder window had passed them.
    pub out_of_order: u64,
    /// Frames skipped without decompressing because they lie outside `--from`/`--to`.
    pub frames_skipped: u64,
}

/// One file as read.
#[derive(Debug, Clone, Serialize)]
pub struct FileStats {
    pub path: PathBuf,
    pub version: u16,
    pub header: TapeHeader,
    pub bytes: u64,
    pub frames: u64,
    pub records: u64,
    /// The file was closed cleanly (it ends with its index).
    pub closed: bool,
    /// The file ends inside a frame.
    pub truncated: Option<Truncation>,
}

/// Where and how much a file was cut.
#[derive(Debug, Clone, Serialize)]
pub struct Truncation {
    /// Offset of the incomplete frame (or index).
    pub offset: u64,
    /// Bytes present of it.
    pub present: u64,
    /// Records it held, when its header was whole.
    pub records: Option<u32>,
}

/// A frame skipped for damage.
#[derive(Debug, Clone, Serialize)]
pub struct Corruption {
    pub path: PathBuf,
    pub offset: u64,
    pub reason: String,
    /// Records lost, when the frame header could still be read.
    pub records: Option<u32>,
}

/// A tape file found on the command line or in a directory, with its header.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    /// The file's bytes, for a tape held in memory rather than on disk.
    pub data: Option<std::sync::Arc<[u8]>>,
    pub version: u16,
    pub header: TapeHeader,
    pub header_len: u64,
}

/// Finds the tape files named by `paths` (files, or directories whose `*.tape` files are taken
/// in name order) and reads their headers.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<SourceFile>, TapeError> {
    let mut out = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(TapeError::io("open", path))?;
        if meta.is_dir() {
            let mut names: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(TapeError::io("list", path))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "tape"))
                .collect();
            if names.is_empty() {
                return Err(TapeError::NoTapes { path: path.clone() });
            }
            names.sort();
            for p in names {
                out.push(read_source(&p)?);
            }
        } else {
            out.push(read_source(path)?);
        }
    }
    Ok(out)
}

fn read_source(path: &Path) -> Result<SourceFile, TapeError> {
    let mut f = BufReader::new(File::open(path).map_err(TapeError::io("open", path))?);
    read_file_header(path, &mut f)
}

fn read_file_header(path: &Path, f: &mut impl Read) -> Result<SourceFile, TapeError> {
    let corrupt = |offset: u64, reason: &str| TapeError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.to_string(),
    };
    let mut prefix = [0u8; FILE_PREFIX_LEN];
    let n = read_full(f, &mut prefix).map_err(TapeError::io("read", path))?;
    if prefix[..n.min(8)] != MAGIC[..n.min(8)] || n == 0 {
        return Err(TapeError::NotATape {
            path: path.to_path_buf(),
        });
    }
    if n < FILE_PREFIX_LEN {
        return Err(corrupt(n as u64, "file ends inside its header"));
    }
    let version = u16::from_le_bytes([prefix[8], prefix[9]]);
    if version > FORMAT_VERSION {
        return Err(TapeError::NewerVersion {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let header_len = u32::from_le_bytes(prefix[12..16].try_into().expect("4 bytes"));
    if header_len > MAX_HEADER_LEN {
        return Err(corrupt(12, "tape header claims an impossible length"));
    }
    let mut body = vec![0u8; header_len as usize + 4];
    let n = read_full(f, &mut body).map_err(TapeError::io("read", path))?;
    if n < body.len() {
        return Err(corrupt(
            (FILE_PREFIX_LEN + n) as u64,
            "file ends inside its header",
        ));
    }
    let (bytes, crc) = body.split_at(header_len as usize);
    let mut check = crc32c::crc32c(&prefix[8..]);
    check = crc32c::crc32c_append(check, bytes);
    if check != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(corrupt(0, "tape header fails its checksum"));
    }
    let (header, _): (TapeHeader, usize) = bincode::decode_from_slice(bytes, bincode_config())
        .map_err(|e| {
            corrupt(
                FILE_PREFIX_LEN as u64,
                &format!("tape header does not decode: {e}"),
            )
        })?;
    Ok(SourceFile {
        path: path.to_path_buf(),
        data: None,
        version,
        header,
        header_len: (FILE_PREFIX_LEN + body.len()) as u64,
    })
}

/// A tape held in memory, as a [`SourceFile`] a [`TapeReader`] reads like a file; `name` stands
/// for its path in messages.
pub fn memory_source(
    name: &str,
    bytes: impl Into<std::sync::Arc<[u8]>>,
) -> Result<SourceFile, TapeError> {
    let bytes: std::sync::Arc<[u8]> = bytes.into();
    let mut cursor = std::io::Cursor::new(&bytes[..]);
    let mut source = read_file_header(Path::new(name), &mut cursor)?;
    source.data = Some(bytes);
    Ok(source)
}

/// Where a [`FileReader`] reads from.
enum Input {
    File(BufReader<File>),
    Memory(std::io::Cursor<std::sync::Arc<[u8]>>),
}

impl Input {
    /// The input's current length (a file may still be growing).
    fn len(&self) -> u64 {
        match self {
            Input::File(f) => f.get_ref().metadata().map(|m| m.len()).unwrap_or(u64::MAX),
            Input::Memory(c) => c.get_ref().len() as u64,
        }
    }

    fn skip(&mut self, n: i64) -> std::io::Result<()> {
        match self {
            Input::File(f) => f.seek_relative(n),
            Input::Memory(c) => c.seek(SeekFrom::Current(n)).map(|_| ()),
        }
    }
}

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Input::File(f) => f.read(buf),
            Input::Memory(c) => c.read(buf),
        }
    }
}

impl Seek for Input {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match self {
            Input::File(f) => f.seek(pos),
            Input::Memory(c) => c.seek(pos),
        }
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Streams the frames of one file.
pub struct FileReader {
    input: Input,
    offset: u64,
    stats: FileStats,
    lenient: bool,
    /// Frame-skipping range, in this file's own tape time.
    range: (Nanos, Nanos),
    decompressor: zstd::bulk::Decompressor<'static>,
    compressed: Vec<u8>,
    /// The last frame's decompressed records.
    pub raw: Vec<u8>,
    /// Where the last frame returned starts.
    pub frame_offset: u64,
    done: bool,
}

impl FileReader {
    /// Opens `source` for streaming; frames wholly outside `range` are skipped unread.
    pub fn open(
        source: &SourceFile,
        lenient: bool,
        range: (Nanos, Nanos),
    ) -> Result<FileReader, TapeError> {
        let path = &source.path;
        let mut input = match &source.data {
            Some(bytes) => Input::Memory(std::io::Cursor::new(bytes.clone())),
            None => Input::File(BufReader::with_capacity(
                1 << 16,
                File::open(path).map_err(TapeError::io("open", path))?,
            )),
        };
        input
            .seek(SeekFrom::Start(source.header_len))
            .map_err(TapeError::io("read", path))?;
        Ok(FileReader {
            input,
            offset: source.header_len,
            stats: FileStats {
                path: path.clone(),
                version: source.version,
                header: source.header.clone(),
                bytes: source.header_len,
                frames: 0,
                records: 0,
                closed: false,
                truncated: None,
            },
            lenient,
            range,
            decompressor: zstd::bulk::Decompressor::new()
                .map_err(TapeError::io("set up decompression for", path))?,
            compressed: Vec::new(),
            raw: Vec::new(),
            frame_offset: 0,
            done: false,
        })
    }

    pub fn stats(&self) -> &FileStats {
        &self.stats
    }

    fn corrupt(&self, offset: u64, reason: impl Into<String>) -> TapeError {
        TapeError::Corrupt {
            path: self.stats.path.clone(),
            offset,
            reason: reason.into(),
        }
    }

    /// Reads the next frame into [`FileReader::raw`]; `Ok(None)` at the end of the file. Damage
    /// met in lenient mode is pushed to `corrupt` and skipped.
    pub fn next_frame(
        &mut self,
        corrupt: &mut Vec<Corruption>,
    ) -> Result<Option<FrameHeader>, TapeError> {
        while !self.done {
            let offset = self.offset;
            let path = self.stats.path.clone();
            let mut head = [0u8; FRAME_HEADER_LEN];
            let n = read_full(&mut self.input, &mut head).map_err(TapeError::io("read", &path))?;
            if n == 0 {
                self.done = true;
                break;
            }
            if n >= 4 && &head[..4] == INDEX_MAGIC {
                self.read_index(&head[..n])?;
                self.done = true;
                break;
            }
            if n < FRAME_HEADER_LEN {
                if head[..n.min(4)] == FRAME_MAGIC[..n.min(4)]
                    || head[..n.min(4)] == INDEX_MAGIC[..n.min(4)]
                {
                    self.truncated(offset, n as u64, None);
                    break;
                }
                return self.damaged(
                    corrupt,
                    offset,
                    "bytes after the last frame are not a frame",
                    None,
                );
            }
            let header = match FrameHeader::decode(&head) {
                Ok(h) => h,
                Err(reason) => match self.damaged(corrupt, offset, reason, None) {
                    Ok(_) => continue,
                    Err(e) => return Err(e),
                },
            };
            let len = header.payload_len as usize;
            let skip = header.last_ts < self.range.0 || header.first_ts >= self.range.1;
            if skip {
                // Out of range: step over the payload without reading it. A payload cut short
                // shows up as a seek past the end, which the next read then finds empty.
                let file_len = self.input.len();
                let end = offset + FRAME_HEADER_LEN as u64 + len as u64;
                if end > file_len {
                    self.truncated(offset, file_len - offset, Some(header.records));
                    break;
                }
                self.input
                    .skip(len as i64)
                    .map_err(TapeError::io("read", &path))?;
                self.offset = end;
                self.stats.bytes += (FRAME_HEADER_LEN + len) as u64;
                return Ok(Some(FrameHeader {
                    records: 0,
                    ..header
                }));
            }
            self.compressed.resize(len, 0);
            let got = read_full(&mut self.input, &mut self.compressed)
                .map_err(TapeError::io("read", &path))?;
            if got < len {
                self.truncated(
                    offset,
                    (FRAME_HEADER_LEN + got) as u64,
                    Some(header.records),
                );
                break;
            }
            self.offset = offset + (FRAME_HEADER_LEN + len) as u64;
            self.stats.bytes += (FRAME_HEADER_LEN + len) as u64;
            if crc32c::crc32c(&self.compressed) != header.payload_crc {
                self.damaged(
                    corrupt,
                    offset,
                    "frame payload fails its checksum",
                    Some(header.records),
                )?;
                continue;
            }
            self.raw.clear();
            self.raw.reserve(header.raw_len as usize);
            match self
                .decompressor
                .decompress_to_buffer(&self.compressed, &mut self.raw)
            {
                Ok(n) if n == header.raw_len as usize => {}
                Ok(_) | Err(_) => {
                    self.damaged(
                        corrupt,
                        offset,
                        "frame payload does not decompress",
                        Some(header.records),
                    )?;
                    continue;
                }
            }
            self.stats.frames += 1;
            self.stats.records += header.records as u64;
            self.frame_offset = offset;
            return Ok(Some(header));
        }
        Ok(None)
    }

    fn truncated(&mut self, offset: u64, present: u64, records: Option<u32>) {
        self.stats.truncated = Some(Truncation {
            offset,
            present,
            records,
        });
        self.stats.bytes += present;
        self.done = true;
    }

    /// Damage at `offset`: an error, or (lenient) a note and a jump to the next frame.
    fn damaged(
        &mut self,
        corrupt: &mut Vec<Corruption>,
        offset: u64,
        reason: &str,
        records: Option<u32>,
    ) -> Result<Option<FrameHeader>, TapeError> {
        if !self.lenient {
            self.done = true;
            return Err(self.corrupt(offset, reason));
        }
        corrupt.push(Corruption {
            path: self.stats.path.clone(),
            offset,
            reason: reason.to_string(),
            records,
        });
        if records.is_none() {
            // The header itself is unreadable: look for the next one.
            self.resync(offset + 1)?;
        }
        Ok(None)
    }

    /// Moves to the first offset at or after `from` where a frame header with a valid checksum
    /// (or the index) starts; to the end of the file when there is none.
    fn resync(&mut self, from: u64) -> Result<(), TapeError> {
        let path = self.stats.path.clone();
        let mut pos = from;
        let mut window = vec![0u8; (1 << 16) + FRAME_HEADER_LEN];
        loop {
            self.input
                .seek(SeekFrom::Start(pos))
                .map_err(|e| io_err(&path, e))?;
            let n = read_full(&mut self.input, &mut window).map_err(|e| io_err(&path, e))?;
            if n < 4 {
                self.done = true;
                self.offset = pos + n as u64;
                return Ok(());
            }
            for i in 0..n.saturating_sub(3) {
                let at = &window[i..n];
                let is_frame = at.len() >= FRAME_HEADER_LEN
                    && &at[..4] == FRAME_MAGIC
                    && FrameHeader::decode(at[..FRAME_HEADER_LEN].try_into().expect("48 bytes"))
                        .is_ok();
                if is_frame || &at[..4] == INDEX_MAGIC {
                    self.offset = pos + i as u64;
                    self.input
                        .seek(SeekFrom::Start(self.offset))
                        .map_err(|e| io_err(&path, e))?;
                    return Ok(());
                }
            }
            if n < window.len() {
                self.done = true;
                self.offset = pos + n as u64;
                return Ok(());
            }
            pos += (n - FRAME_HEADER_LEN) as u64;
        }
    }

    fn read_index(&mut self, head: &[u8]) -> Result<(), TapeError> {
        let offset = self.offset;
        let path = self.stats.path.clone();
        if head.len() < INDEX_HEADER_LEN {
            self.truncated(offset, head.len() as u64, None);
            return Ok(());
        }
        let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        let head_crc = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
        if crc32c::crc32c(&head[..12]) != head_crc {
            return self.bad_index(offset, "index header fails its checksum");
        }
        if len > MAX_FRAME_LEN {
            return self.bad_index(offset, "index claims an impossible length");
        }
        // The header buffer already holds the first bytes of the index payload.
        let mut payload = head[INDEX_HEADER_LEN..].to_vec();
        let total = len as usize + TRAILER_LEN;
        if payload.len() < total {
            let have = payload.len();
            payload.resize(total, 0);
            let n = read_full(&mut self.input, &mut payload[have..])
                .map_err(TapeError::io("read", &path))?;
            payload.truncate(have + n);
        }
        payload.truncate(total);
        if payload.len() < total {
            self.truncated(offset, (INDEX_HEADER_LEN + payload.len()) as u64, None);
            return Ok(());
        }
        let (index, trailer) = payload.split_at(len as usize);
        let index_offset = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
        if crc32c::crc32c(index) != crc || &trailer[8..16] != END_MAGIC || index_offset != offset {
            return self.bad_index(offset, "index fails its checksum");
        }
        if bincode::decode_from_slice::<TapeIndex, _>(index, bincode_config()).is_err() {
            return self.bad_index(offset, "index does not decode");
        }
        self.stats.bytes += (INDEX_HEADER_LEN + total) as u64;
        self.stats.closed = true;
        Ok(())
    }
}

impl FileReader {
    /// A damaged index loses no records: lenient reading ends the file there.
    fn bad_index(&mut self, offset: u64, reason: &str) -> Result<(), TapeError> {
        if self.lenient {
            return Ok(());
        }
        Err(self.corrupt(offset, reason))
    }
}

fn io_err(path: &Path, source: std::io::Error) -> TapeError {
    TapeError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    }
}

/// Holds records until nothing that started earlier can still come. See the module docs.
struct Reorder {
    /// Records that can go out as they are: a whole frame that was in order and releasable.
    ready: VecDeque<Record>,
    heap: BinaryHeap<Reverse<Pending>>,
    seq: u64,
    /// Latest instant any record spoke of.
    high: Nanos,
    watermark: Nanos,
    window: Nanos,
    released: Nanos,
}

struct Pending {
    start: Nanos,
    seq: u64,
    record: Record,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.start, self.seq) == (o.start, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.start, self.seq).cmp(&(o.start, o.seq))
    }
}

impl Reorder {
    fn new(window: Nanos) -> Reorder {
        Reorder {
            ready: VecDeque::new(),
            heap: BinaryHeap::new(),
            seq: 0,
            high: 0,
            watermark: 0,
            window,
            released: 0,
        }
    }

    fn push(&mut self, record: Record) {
        let start = match record {
            // Unknown kinds carry no time we can read: keep them where they stood.
            Record::Unknown { .. } => self.high,
            ref r => r.start(),
        };
        self.high = self.high.max(record.end());
        self.seq += 1;
        self.heap.push(Reverse(Pending {
            start,
            seq: self.seq,
            record,
        }));
    }

    /// Nothing is held back: a frame may go out as it is decoded.
    fn is_idle(&self) -> bool {
        self.heap.is_empty() && self.ready.is_empty()
    }

    /// Takes a frame's records. The common case, a frame in order that nothing held back
    /// precedes, goes straight to the ready queue without touching the heap.
    fn take(&mut self, batch: &mut Vec<Record>) {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return;
        };
        let in_order = self.is_idle()
            && !batch.iter().any(|r| matches!(r, Record::Unknown { .. }))
            && first.start() >= self.released
            && batch.windows(2).all(|w| w[0].start() <= w[1].start());
        if in_order {
            let high = batch
                .iter()
                .map(Record::end)
                .max()
                .unwrap_or(0)
                .max(self.high);
            let horizon = self.watermark.max(high.saturating_sub(self.window));
            if last.start() <= horizon {
                self.high = high;
                self.released = last.start();
                self.ready.extend(batch.drain(..));
                return;
            }
        }
        for record in batch.drain(..) {
            self.push(record);
        }
    }

    /// The next record that can go, and whether it came after its turn.
    fn pop(&mut self, draining: bool) -> Option<(Record, bool)> {
        if let Some(r) = self.ready.pop_front() {
            return Some((r, false));
        }
        let horizon = self.watermark.max(self.high.saturating_sub(self.window));
        let top = self.heap.peek()?;
        if !draining && top.0.start > horizon {
            return None;
        }
        let Reverse(p) = self.heap.pop()?;
        let late = p.start < self.released;
        self.released = self.released.max(p.start);
        Some((p.record, late))
    }
}

/// The files of one recording (one tape id), read in rotation order into one ordered stream.
struct Recording {
    tape_id: [u8; 16],
    /// A frame whose records go out as they are decoded (see [`Recording::fill`]).
    streaming: Option<Streaming>,
    /// A frame's records on their way to the reorder buffer (kept to reuse its memory).
    batch: Vec<Record>,
    files: VecDeque<SourceFile>,
    current: Option<FileReader>,
    reorder: Reorder,
    /// Added to this recording's timestamps to put them on the reader's common time base.
    shift: Nanos,
    range: (Nanos, Nanos),
    lenient: bool,
    exhausted: bool,
}

/// A frame being handed out record by record, decoded only when asked for: the records of a
/// whole frame are never all in memory at once, which keeps the reader in cache.
struct Streaming {
    payload: Vec<u8>,
    decoder: FrameDecoder,
    path: PathBuf,
    offset: u64,
}

impl Recording {
    /// The next record in start order, or `None` at the end.
    fn next(&mut self, stats: &mut ReadStats) -> Result<Option<(Record, bool)>, TapeError> {
        loop {
            if let Some(s) = self.streaming.as_mut() {
                match s.decoder.next(&s.payload) {
                    Some(Ok(mut record)) => {
                        shift_record(&mut record, self.shift);
                        let start = record.start();
                        if start >= self.range.0 && start < self.range.1 {
                            self.reorder.high = self.reorder.high.max(record.end());
                            self.reorder.released = self.reorder.released.max(start);
                            return Ok(Some((record, false)));
                        }
                        continue;
                    }
                    Some(Err(e)) => {
                        let s = self.streaming.take().expect("streaming");
                        return Err(bad_record(&s.path, s.offset, e));
                    }
                    None => {
                        // Hand the buffer back to the file reader for its next frame.
                        let s = self.streaming.take().expect("streaming");
                        if let Some(reader) = self.current.as_mut() {
                            reader.raw = s.payload;
                        }
                        continue;
                    }
                }
            }
            if let Some(r) = self.reorder.pop(self.exhausted) {
                return Ok(Some(r));
            }
            if self.exhausted {
                return Ok(None);
            }
            self.fill(stats)?;
        }
    }

    /// Decodes one more frame into the reorder buffer, or marks the recording exhausted.
    fn fill(&mut self, stats: &mut ReadStats) -> Result<(), TapeError> {
        loop {
            if self.current.is_none() {
                let Some(source) = self.files.pop_front() else {
                    self.exhausted = true;
                    return Ok(());
                };
                let local = (
                    self.range.0.saturating_sub(self.shift),
                    self.range.1.saturating_sub(self.shift),
                );
                self.current = Some(FileReader::open(&source, self.lenient, local)?);
            }
            let reader = self.current.as_mut().expect("opened above");
            let frame = match reader.next_frame(&mut stats.corrupt) {
                Ok(f) => f,
                Err(e) => {
                    stats.files.push(reader.stats().clone());
                    self.current = None;
                    self.exhausted = true;
                    return Err(e);
                }
            };
            let Some(frame) = frame else {
                stats.files.push(reader.stats().clone());
                self.current = None;
                continue;
            };
            if frame.watermark > 0 {
                self.reorder.watermark = self.reorder.watermark.max(frame.watermark + self.shift);
            }
            if frame.records == 0 {
                stats.frames_skipped += 1;
                continue;
            }
            // The common case: a frame written in start order, with nothing held back before
            // it and nothing in it that later frames could still precede. It goes out as it is
            // decoded.
            let (first, last) = (frame.first_ts + self.shift, frame.last_ts + self.shift);
            if frame.flags & FRAME_ORDERED != 0
                && self.reorder.is_idle()
                && first >= self.reorder.released
            {
                let high = self.reorder.high.max(last);
                let horizon = self
                    .reorder
                    .watermark
                    .max(high.saturating_sub(self.reorder.window));
                if last <= horizon {
                    self.streaming = Some(Streaming {
                        payload: std::mem::take(&mut reader.raw),
                        decoder: FrameDecoder::new(),
                        path: reader.stats().path.clone(),
                        offset: reader.frame_offset,
                    });
                    return Ok(());
                }
            }
            let batch = &mut self.batch;
            let mut decoder = FrameDecoder::new();
            while let Some(decoded) = decoder.next(&reader.raw) {
                match decoded {
                    Ok(mut record) => {
                        shift_record(&mut record, self.shift);
                        let start = record.start();
                        if start >= self.range.0 && start < self.range.1 {
                            batch.push(record);
                        }
                    }
                    Err(e) => return Err(bad_record(&reader.stats().path, reader.frame_offset, e)),
                }
            }
            self.reorder.take(batch);
            return Ok(());
        }
    }
}

fn bad_record(path: &Path, offset: u64, e: DecodeFailure) -> TapeError {
    TapeError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: format!(
            "frame holds a bad record at byte {} of its payload: {}",
            e.at, e.reason
        ),
    }
}

fn shift_record(record: &mut Record, by: Nanos) {
    if by == 0 {
        return;
    }
    match record {
        Record::Exchange(e) => e.timing.start += by,
        Record::ConnectionOpened(c) => c.at += by,
        Record::ConnectionClosed(c) => c.at += by,
        Record::Blob(b) => b.at += by,
        Record::Dropped(d) => d.at += by,
        Record::Replayed(r) => r.intended += by,
        Record::Unknown { .. } => {}
    }
}

/// Streams the records of one or more tapes in request-start order. See the module docs.
pub struct TapeReader {
    recordings: Vec<Recording>,
    heads: Vec<Option<(Record, bool)>>,
    primed: bool,
    base_epoch_unix_ns: i64,
    stats: ReadStats,
    last_out_of_order: bool,
    last_source: usize,
    failed: bool,
}

impl TapeReader {
    /// Opens the tapes named by `paths` (files or directories).
    pub fn open(paths: &[PathBuf], options: &ReadOptions) -> Result<TapeReader, TapeError> {
        Ok(TapeReader::from_sources(discover(paths)?, options))
    }

    pub fn open_one(path: impl AsRef<Path>) -> Result<TapeReader, TapeError> {
        TapeReader::open(&[path.as_ref().to_path_buf()], &ReadOptions::default())
    }

    pub fn from_sources(sources: Vec<SourceFile>, options: &ReadOptions) -> TapeReader {
        // One recording per tape id, files in rotation order; the earliest epoch is time zero.
        let mut groups: Vec<Vec<SourceFile>> = Vec::new();
        for s in sources {
            match groups
                .iter_mut()
                .find(|g| g[0].header.tape_id == s.header.tape_id)
            {
                Some(g) => g.push(s),
                None => groups.push(vec![s]),
            }
        }
        let base = groups
            .iter()
            .map(|g| g[0].header.epoch_unix_ns)
            .min()
            .unwrap_or(0);
        let range = (options.from.unwrap_or(0), options.to.unwrap_or(Nanos::MAX));
        let recordings: Vec<Recording> = groups
            .into_iter()
            .map(|mut g| {
                g.sort_by_key(|s| s.header.seq);
                Recording {
                    tape_id: g[0].header.tape_id,
                    streaming: None,
                    batch: Vec::new(),
                    shift: (g[0].header.epoch_unix_ns - base) as Nanos,
                    files: g.into(),
                    current: None,
                    reorder: Reorder::new(options.reorder_window),
                    range,
                    lenient: options.lenient,
                    exhausted: false,
                }
            })
            .collect();
        TapeReader {
            heads: (0..recordings.len()).map(|_| None).collect(),
            recordings,
            primed: false,
            base_epoch_unix_ns: base,
            stats: ReadStats::default(),
            last_out_of_order: false,
            last_source: 0,
            failed: false,
        }
    }

    /// Wall-clock time of timestamp 0, ns since the Unix epoch.
    pub fn epoch_unix_ns(&self) -> i64 {
        self.base_epoch_unix_ns
    }

    /// The headers of the files being read, in reading order.
    pub fn headers(&self) -> impl Iterator<Item = &TapeHeader> {
        self.recordings.iter().flat_map(|r| {
            r.current
                .iter()
                .map(|c| &c.stats.header)
                .chain(r.files.iter().map(|f| &f.header))
        })
    }

    /// What reading has found so far; complete once the iterator has ended.
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    /// The tape ids of the recordings being read; [`TapeReader::last_source`] indexes it.
    pub fn source_ids(&self) -> Vec<[u8; 16]> {
        self.recordings.iter().map(|r| r.tape_id).collect()
    }

    /// Which recording the record last returned came from (ids are unique within one).
    pub fn last_source(&self) -> usize {
        self.last_source
    }

    /// Whether the record last returned came after its reorder window had passed.
    pub fn last_out_of_order(&self) -> bool {
        self.last_out_of_order
    }

    fn advance(&mut self, i: usize) -> Result<(), TapeError> {
        self.heads[i] = self.recordings[i].next(&mut self.stats)?;
        Ok(())
    }
}

impl Iterator for TapeReader {
    type Item = Result<Record, TapeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let result = (|| {
            if self.recordings.len() == 1 {
                // One recording (the common case): nothing to merge.
                return self.recordings[0].next(&mut self.stats);
            }
            if !self.primed {
                self.primed = true;
                for i in 0..self.recordings.len() {
                    self.advance(i)?;
                }
            }
            let next = self
                .heads
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.as_ref().map(|(r, _)| (r.start(), i)))
                .min();
            let Some((_, i)) = next else {
                return Ok(None);
            };
            let (record, late) = self.heads[i].take().expect("chosen above");
            self.last_source = i;
            self.advance(i)?;
            Ok(Some((record, late)))
        })();
        match result {
            Ok(Some((record, late))) => {
                self.last_out_of_order = late;
                if late {
                    self.stats.out_of_order += 1;
                }
                Some(Ok(record))
            }
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl ReadStats {
    /// Records lost in frames skipped for damage (counted where their headers were readable).
    pub fn lost(&self) -> u64 {
        self.corrupt
            .iter()
            .filter_map(|c| c.records)
            .map(u64::from)
            .sum()
    }
}
