//! `client_request`: see `datapunk_lb::fuzzing::client_request` for the
//! input format and the invariants checked. Never panics on any input;
//! whatever the fast path does not take goes to hyper untouched.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = datapunk_lb::fuzzing::client_request(data);
});
