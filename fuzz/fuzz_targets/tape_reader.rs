//! Any bytes given to the tape reader end in records or a clear error: never a panic, a hang
//! or an allocation the input cannot justify. Strict and lenient reading both, plus a time
//! range so that frame skipping is exercised too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loadtape::tape::reader::memory_source;
use loadtape::tape::{ReadOptions, TapeReader};

fuzz_target!(|data: &[u8]| {
    for lenient in [false, true] {
        let Ok(source) = memory_source("fuzz.tape", data.to_vec()) else {
            return;
        };
        let options = ReadOptions {
            lenient,
            from: if lenient { Some(1_000) } else { None },
            ..ReadOptions::default()
        };
        let mut reader = TapeReader::from_sources(vec![source], &options);
        for record in reader.by_ref() {
            if record.is_err() {
                break;
            }
        }
        let _ = reader.stats().lost();
    }
});
