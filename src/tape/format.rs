//! The byte layout of a tape file. `captures/README.md` is the spec; the constants here carry
//! the names it uses, and nothing else in loadtape knows where a byte goes.
//!
//! ```text
//! file    := file_header frame* [index trailer]
//! file_header := MAGIC(8) version:u16le flags:u16le header_len:u32le header:bincode(TapeHeader) crc32c:u32le
//! frame   := FRAME_MAGIC(4) payload_len:u32le raw_len:u32le records:u32le flags:u32le
//!            first_ts:u64le last_ts:u64le watermark:u64le payload_crc:u32le header_crc:u32le
//!            payload(payload_len bytes, zstd)
//! index   := INDEX_MAGIC(4) payload_len:u32le payload_crc:u32le header_crc:u32le payload:bincode(TapeIndex)
//! trailer := index_offset:u64le END_MAGIC(8)
//! ```
//!
//! Every header carries its own CRC32C, so a damaged length is told apart from a file cut short.

use bincode::{Decode, Encode};
use serde::Serialize;

/// First bytes of every tape file.
pub const MAGIC: &[u8; 8] = b"LOADTAPE";
/// The format version this build writes. Readers read every version up to their own.
pub const FORMAT_VERSION: u16 = 3;
/// First bytes of a frame.
pub const FRAME_MAGIC: &[u8; 4] = b"LTFR";
/// First bytes of the footer index.
pub const INDEX_MAGIC: &[u8; 4] = b"LTIX";
/// Last bytes of a file closed cleanly.
pub const END_MAGIC: &[u8; 8] = b"LTAPEEND";
/// Size of the fixed frame header.
pub const FRAME_HEADER_LEN: usize = 52;
/// Frame flag: the frame's records are in nondecreasing start order.
pub const FRAME_ORDERED: u32 = 1;
/// Size of the fixed part of the file header before the bincode header.
pub const FILE_PREFIX_LEN: usize = 16;
/// Size of the fixed index header.
pub const INDEX_HEADER_LEN: usize = 16;
/// Size of the trailer after the index.
pub const TRAILER_LEN: usize = 16;
/// The largest tape header a reader accepts.
pub const MAX_HEADER_LEN: u32 = 1 << 20;
/// The largest frame (compressed or not) a reader accepts. Also bounds any single record.
pub const MAX_FRAME_LEN: u32 = 256 << 20;
/// Codec of frame payloads: zstd. The only one so far; the header names it so a later one can
/// be added.
pub const CODEC_ZSTD: u8 = 1;

/// The bincode configuration of every structure in a tape. Its limit bounds what a damaged or
/// hostile length can make a reader allocate.
pub fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_FRAME_LEN as usize }>()
}

/// The same encoding, with the tighter limit used for everything but blobs: no header block,
/// redaction list or connection record comes near 1 MiB.
pub fn bincode_config_small() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 1 << 20 }>()
}

/// What a tape file says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct TapeHeader {
    /// Codec of the frame payloads ([`CODEC_ZSTD`]).
    pub codec: u8,
    /// Identifies one recording (or one replay's results); shared by its rotated files.
    #[serde(serialize_with = "serialize_id")]
    pub tape_id: [u8; 16],
    /// Position of this file in its recording's rotation, from 0.
    pub seq: u32,
    /// The tape epoch: wall-clock nanoseconds since the Unix epoch. Record timestamps count from
    /// it; every file of one recording has the same epoch.
    pub epoch_unix_ns: i64,
    pub kind: TapeKind,
    /// The program that wrote the tape, e.g. `loadtape record`.
    pub recorder: String,
    pub recorder_version: String,
    /// Options the recorder ran with (redaction, body capture, ...), as `name=value` pairs.
    pub options: Vec<(String, String)>,
    /// Where the recorded traffic went (the upstream URL), when known.
    pub upstream: Option<String>,
}

/// What a tape holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TapeKind {
    /// Traffic recorded by the proxy or imported.
    Capture,
    /// Outcomes of a replay.
    Results,
}

fn serialize_id<S: serde::Serializer>(id: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&super::record::hex(id))
}

/// The fixed header in front of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Compressed payload length.
    pub payload_len: u32,
    /// Payload length once decompressed.
    pub raw_len: u32,
    pub records: u32,
    /// [`FRAME_ORDERED`], or 0.
    pub flags: u32,
    /// Smallest and largest record start in the frame.
    pub first_ts: u64,
    pub last_ts: u64,
    /// Every exchange that started before this instant was written in this frame or an earlier
    /// one; readers release records up to it without waiting for their reorder window. 0: the
    /// writer did not know.
    pub watermark: u64,
    pub payload_crc: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..4].copy_from_slice(FRAME_MAGIC);
        b[4..8].copy_from_slice(&self.payload_len.to_le_bytes());
        b[8..12].copy_from_slice(&self.raw_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.records.to_le_bytes());
        b[16..20].copy_from_slice(&self.flags.to_le_bytes());
        b[20..28].copy_from_slice(&self.first_ts.to_le_bytes());
        b[28..36].copy_from_slice(&self.last_ts.to_le_bytes());
        b[36..44].copy_from_slice(&self.watermark.to_le_bytes());
        b[44..48].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..48]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a frame header whose magic was already matched; `Err` says what is wrong.
    pub fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, &'static str> {
        if &b[0..4] != FRAME_MAGIC {
            return Err("no frame starts here (bad magic)");
        }
        let crc = u32::from_le_bytes(b[48..52].try_into().expect("4 bytes"));
        if crc32c::crc32c(&b[..48]) != crc {
            return Err("frame header fails its checksum");
        }
        let h = FrameHeader {
            payload_len: u32_at(b, 4),
            raw_len: u32_at(b, 8),
            records: u32_at(b, 12),
            flags: u32_at(b, 16),
            first_ts: u64_at(b, 20),
            last_ts: u64_at(b, 28),
            watermark: u64_at(b, 36),
            payload_crc: u32_at(b, 44),
        };
        if h.payload_len > MAX_FRAME_LEN || h.raw_len > MAX_FRAME_LEN {
            return Err("frame claims a size beyond the format's limit");
        }
        Ok(h)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Encodes the file header: prefix, bincode header, CRC.
pub fn encode_file_header(header: &TapeHeader) -> Vec<u8> {
    let body = bincode::encode_to_vec(header, bincode_config()).expect("a header always encodes");
    let mut out = Vec::with_capacity(FILE_PREFIX_LEN + body.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32c::crc32c(&out[8..]);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// One frame's entry in the footer index.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct IndexEntry {
    /// Byte offset of the frame header in the file.
    pub offset: u64,
    pub first_ts: u64,
    pub last_ts: u64,
    pub records: u32,
}

/// The footer written when a file is closed cleanly: where every frame is, and totals. A reader
/// seeking by time uses it; a reader streaming the file never needs it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct TapeIndex {
    pub frames: Vec<IndexEntry>,
    pub records: u64,
    /// Records the writer dropped while this file was open.
    pub dropped: u64,
}
