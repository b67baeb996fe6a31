//! `etcd_value`: etcd keys and values as discovery reads them. Never
//! panics; an accepted put names the service and id its key does, and a
//! rejection carries the key it was about.
//!
//! Input: `key \n value` (the key is everything before the first newline;
//! the seeds use the default prefix so the value parser is reached).
#![no_main]

use datapunk_lb::discovery::{parse_key, parse_put, Change};
use libfuzzer_sys::fuzz_target;

const PREFIX: &str = "/datapunk/services/";

fuzz_target!(|data: &[u8]| {
    let (key, value) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let parsed_key = parse_key(PREFIX, key);
    match parse_put(PREFIX, key, value) {
        Ok(Change::Put { service, id, .. }) => {
            assert_eq!(parsed_key, Ok((service, id)));
        }
        Ok(other) => panic!("a put parsed as {other:?}"),
        Err(e) => {
            assert_eq!(e.key(), String::from_utf8_lossy(key));
            let _ = e.to_string();
        }
    }
});
