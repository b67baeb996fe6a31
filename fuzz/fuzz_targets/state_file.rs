//! `state_file`: any bytes as the state file read at start-up. Never
//! panics; an accepted state survives a save and load unchanged (checked in
//! `datapunk_lb::fuzzing::state_file`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `load` reads the file as UTF-8 and reports anything else as unreadable.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = datapunk_lb::fuzzing::state_file(text);
    }
});
