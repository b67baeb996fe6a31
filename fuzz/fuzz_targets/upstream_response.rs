//! `upstream_response`: see `datapunk_lb::fuzzing::upstream_response` for
//! the input format and the invariants checked. Never panics on any input;
//! an error is a failed exchange the proxy would answer with 502.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = datapunk_lb::fuzzing::upstream_response(data) {
        assert!(!e.is_empty(), "an error without a reason");
    }
});
