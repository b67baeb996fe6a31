//! `request_headers`: see `datapunk_lb::fuzzing::request_headers` for the input format and the
//! invariants checked. Never panics on any input; an error is a refusal the
//! server would report.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = datapunk_lb::fuzzing::request_headers(data) {
        assert!(!e.is_empty(), "a refusal without a reason");
    }
});
