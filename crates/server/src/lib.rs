//! # datapunk-lb
//!
//! The `datapunk-lb` binary as a library, so integration tests and the demo
//! can start a server in-process. The balancing rules live in
//! `datapunk-lb-core`; this crate moves bytes and reports outcomes.
//!
//! | module | owns |
//! | --- | --- |
//! | `admin` | the admin API, `/metrics`, the status page, health endpoints |
//! | [`cli`] | the command line |
//! | [`config`] | the TOML file: strict parsing, validation with key and line |
//! | `control` | the desired state (config < admin API < etcd), its one precedence rule, and the task that applies every change |
//! | [`history`] | the status page's history: per-second samples in bounded rings, recent state changes |
//! | [`discovery`] | etcd discovery: list, watch, resync, sent to `control`; the `register` sidecar |
//! | `fuzzing` | hidden entry points for the fuzz targets in `fuzz/` (crate-private parsers) |
//! | [`server`] | lifecycle: listeners, start, reload (SIGHUP), drain (SIGTERM), readiness |
//! | [`workers`] | thread per core: worker runtimes and their `SO_REUSEPORT` sockets |
//! | `proxy` | HTTP/1.1 + h2c and TCP listeners, routing, retries, errors |
//! | `health_check` | active HTTP/TCP checks with spread, backoff and a bound |
//! | [`metrics`] | every Prometheus metric of the SPEC |
//! | [`scan`] | large services read in one bounded pass: state counts, worst instances, admin pages |
//! | [`state`] | the state file: admin API changes that survive restarts |
//! | [`telemetry`] | tracing setup; core events as structured log lines |
//! | [`demo`] | `datapunk-lb demo` |

// `admin`, `control`, `health_check` and `proxy` are crate-private so the
// compiler reports their dead code.
pub(crate) mod admin;
pub mod cli;
pub mod config;
pub(crate) mod control;
pub mod demo;
pub mod discovery;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod health_check;
pub mod history;
pub mod metrics;
pub(crate) mod proxy;
pub mod scan;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod workers;
