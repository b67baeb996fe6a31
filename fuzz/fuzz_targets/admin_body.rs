//! `admin_body`: admin API request bodies (register, health, strategy) with
//! arbitrary service and instance names, through the handlers' own parsers
//! and the registry. Never panics; an accepted change is what the registry
//! then reports (checked in `datapunk_lb::fuzzing::admin_body`).
//!
//! Input: `R|H|S service \n id \n body` (first byte picks the request;
//! readable, so the seeds are plain text files).
#![no_main]

use datapunk_lb::fuzzing::{admin_body, AdminBody};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let kind = match first {
        b'R' => AdminBody::Register,
        b'H' => AdminBody::Health,
        b'S' => AdminBody::Strategy,
        _ => return,
    };
    let mut parts = rest.splitn(3, |b| *b == b'\n');
    let (Some(service), Some(id), body) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    // Names arrive as URL path segments, decoded to UTF-8 by the router.
    let (Ok(service), Ok(id)) = (std::str::from_utf8(service), std::str::from_utf8(id)) else {
        return;
    };
    if let Err(e) = admin_body(kind, service, id, body.unwrap_or_default()) {
        assert!(!e.is_empty());
    }
});
