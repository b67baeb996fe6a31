//! Integration tests of the core: one test binary (one link step), one
//! module per area, shared helpers in `support`.

// Test helpers outside #[test] functions: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod adaptive;
mod bad_input;
mod breaker_lifecycle;
mod clock_reads;
mod consistent_hash;
mod counts;
mod exploration;
mod health;
mod panic_mode;
mod scale;
mod select_with;
mod shares;
mod slow_start;
mod soak_pattern;
mod support;
