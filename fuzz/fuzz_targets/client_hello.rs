//! `client_hello`: the ClientHello reader of SNI passthrough listeners
//! (`proxy/sni.rs`) on arbitrary bytes. Never panics; every decision is
//! final (no shorter prefix decided otherwise) and a server name is a
//! lowercase host name (checked in `datapunk_lb::fuzzing::client_hello`).
//!
//! Input: the bytes a client sends first. Seeds: real ClientHellos made by
//! rustls (`fuzz/corpus/client_hello/`, written by the server crate's test
//! `proxy::sni::tests::write_fuzz_seeds`), plus plain text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = datapunk_lb::fuzzing::client_hello(data);
});
