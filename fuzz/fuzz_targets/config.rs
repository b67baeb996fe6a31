//! `config`: any text as the TOML config file. Parse + validate never
//! panics, and every error names a line or a key path (the SPEC's promise
//! that a bad config is explained where it is wrong).
#![no_main]

use datapunk_lb::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(src) {
        Ok(config) => {
            let _ = config.summary();
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a rejection with no issue");
            for issue in &errors.0 {
                let text = issue.to_string();
                assert!(
                    issue.line.is_some() || !issue.key.trim().is_empty(),
                    "an error without line or key: {text:?}"
                );
                assert!(text.contains("line ") || text.contains(issue.key.as_str()));
            }
        }
    }
});
