//! End-to-end tests: the real `datapunk-lb` binary on real sockets
//! (127.0.0.1:0), real backends, one test binary, helpers in `support`.

// Test helpers outside #[test] functions: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod access_log;
mod admin;
mod attempts;
mod config;
#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "etcd")]
mod etcd_tls;
mod exhaustion;
mod failover;
mod forwarding;
mod h1_fast_path;
mod hashing;
mod hygiene;
mod lifecycle;
mod monitoring;
mod per_try;
#[cfg(feature = "etcd")]
mod precedence;
mod probes;
mod protocols;
mod proxy;
mod reference;
mod scale;
mod slow_start;
mod slowloris;
mod sni;
mod status_page;
mod support;
mod threads;
mod tls;
mod tls_upstream;
mod websocket;
