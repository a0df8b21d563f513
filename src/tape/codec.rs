//! Records to frame payload bytes and back.
//!
//! Inside a decompressed frame every record is `kind:u8 len:u32le payload`, the payload being the
//! bincode encoding of the record's struct. The length lets a reader skip a kind it does not know
//! and ignore fields appended after the ones it knows: that is how the format grows without a
//! break.

use super::format::bincode_config;
use super::record::{kind, Blob, ConnectionClosed, ConnectionOpened, Dropped, Exchange, Record};

/// Bytes in front of every record's payload.
pub const RECORD_PREFIX_LEN: usize = 5;

/// Appends `record` to a frame payload under construction.
pub fn encode_record(record: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.push(record.kind_code());
    out.extend_from_slice(&[0; 4]);
    let cfg = bincode_config();
    let written = match record {
        Record::Exchange(e) => bincode::encode_into_std_write(e.as_ref(), out, cfg),
        Record::ConnectionOpened(c) => bincode::encode_into_std_write(c, out, cfg),
        Record::ConnectionClosed(c) => bincode::encode_into_std_write(c, out, cfg),
        Record::Blob(b) => bincode::encode_into_std_write(b, out, cfg),
        Record::Dropped(d) => bincode::encode_into_std_write(d, out, cfg),
        Record::Unknown { payload, .. } => {
            out.extend_from_slice(payload);
            Ok(payload.len())
        }
    };
    // Encoding into a Vec fails only on a size limit no record of ours reaches.
    let len = written.expect("records encode into memory") as u32;
    out[start + 1..start + RECORD_PREFIX_LEN].copy_from_slice(&len.to_le_bytes());
}

/// Why a frame's payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeFailure {
    /// Offset within the decompressed payload.
    pub at: usize,
    pub reason: String,
}

/// Iterates over the records of a decompressed frame payload.
pub struct RecordDecoder<'a> {
    payload: &'a [u8],
    at: usize,
}

impl<'a> RecordDecoder<'a> {
    pub fn new(payload: &'a [u8]) -> Self {
        RecordDecoder { payload, at: 0 }
    }
}

impl Iterator for RecordDecoder<'_> {
    type Item = Result<Record, DecodeFailure>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.payload[self.at..];
        if rest.is_empty() {
            return None;
        }
        let fail = |at: usize, reason: String| Some(Err(DecodeFailure { at, reason }));
        if rest.len() < RECORD_PREFIX_LEN {
            let at = self.at;
            self.at = self.payload.len();
            return fail(at, "record prefix cut short".into());
        }
        let code = rest[0];
        let len = u32::from_le_bytes(rest[1..5].try_into().expect("4 bytes")) as usize;
        let Some(body) = rest.get(RECORD_PREFIX_LEN..RECORD_PREFIX_LEN + len) else {
            let at = self.at;
            self.at = self.payload.len();
            return fail(at, format!("record of {len} bytes overruns its frame"));
        };
        let at = self.at;
        self.at += RECORD_PREFIX_LEN + len;
        match decode_body(code, body) {
            Ok(r) => Some(Ok(r)),
            Err(e) => {
                // The frame passed its checksum, so this is a writer bug or an incompatible
                // writer: stop here rather than guess where the next record starts.
                self.at = self.payload.len();
                fail(at, format!("record of kind {code} does not decode: {e}"))
            }
        }
    }
}

fn decode_body(code: u8, body: &[u8]) -> Result<Record, bincode::error::DecodeError> {
    fn one<T: bincode::Decode<()>>(body: &[u8]) -> Result<T, bincode::error::DecodeError> {
        bincode::decode_from_slice(body, bincode_config()).map(|(v, _)| v)
    }
    Ok(match code {
        kind::EXCHANGE => Record::Exchange(Box::new(one::<Exchange>(body)?)),
        kind::CONNECTION_OPENED => Record::ConnectionOpened(one::<ConnectionOpened>(body)?),
        kind::CONNECTION_CLOSED => Record::ConnectionClosed(one::<ConnectionClosed>(body)?),
        kind::BLOB => Record::Blob(one::<Blob>(body)?),
        kind::DROPPED => Record::Dropped(one::<Dropped>(body)?),
        code => Record::Unknown {
            code,
            payload: body.to_vec(),
        },
    })
}
