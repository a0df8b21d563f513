//! Frame payloads past their checksums: any bytes decode to records or a clear error, never a
//! panic or an allocation the input cannot justify. (The tape_reader target rarely gets here,
//! since a fuzzer cannot forge CRCs.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use loadtape::tape::codec::RecordDecoder;

fuzz_target!(|data: &[u8]| {
    for record in RecordDecoder::new(data) {
        if record.is_err() {
            break;
        }
    }
});
