//! # datapunk-lb-core
//!
//! The health-aware balancing model of datapunk-lb: which instance of a
//! service gets the next request, and how failures and recoveries change
//! that. No sockets, no async runtime, no wall clock: time comes from a
//! [`Clock`], randomness from a seed, and every state change comes back to the
//! caller as an [`Event`].
//!
//! ## The model in one paragraph
//!
//! A [`Registry`] holds services; a service holds [`ServiceInstance`]s. To
//! send a request, call [`Registry::get_instance`]: a [`Strategy`] picks an
//! eligible instance and you get a [`Selection`], a guard that counts the
//! connection until it is dropped. Report how the request went with
//! [`Selection::success`] or [`Selection::failure`]: that feeds the
//! instance's [`HealthTracker`] (asymmetric, time-based), its
//! [`CircuitBreaker`] (closed → open → half-open) and its latency EWMA.
//! Effective weight = weight × health score × slow-start factor. When too
//! few instances are eligible the service enters panic mode and spreads load
//! over all of them.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use datapunk_lb_core::{FailureKind, ManualClock, Registry, ServiceInstance, StrategyKind};
//!
//! let clock = Arc::new(ManualClock::new());
//! let registry = Registry::builder().clock(clock.clone()).seed(7).build()?;
//! registry.register_instance("api", ServiceInstance::try_new("api-1", "10.0.0.1", 8080)?)?;
//! registry.register_instance("api", ServiceInstance::try_new("api-2", "10.0.0.2", 8080)?)?;
//! registry.set_strategy("api", StrategyKind::RoundRobin)?;
//!
//! // Three failures in a row open api-1's breaker...
//! for _ in 0..3 {
//!     let s = loop {
//!         let s = registry.get_instance("api").unwrap();
//!         if s.instance().id().as_str() == "api-1" { break s; }
//!     };
//!     s.failure(FailureKind::Connect);
//!     clock.advance(Duration::from_millis(10));
//! }
//! // ...so every request now goes to api-2.
//! for _ in 0..10 {
//!     let s = registry.get_instance("api").unwrap();
//!     assert_eq!(s.instance().id().as_str(), "api-2");
//!     s.success(Duration::from_millis(2));
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Modules
//!
//! Modules only point down this list (checked: no import cycle), so each
//! can be read knowing only the ones below it.
//!
//! | module | owns |
//! | --- | --- |
//! | [`registry`] | `Registry`: the name → `Service` map; `RegistryError` |
//! | [`service`] | `Service`: snapshot, writer, `select`/`select_with`, recording outcomes, draining, panic mode |
//! | [`selection`] | the `Selection` guard (re-exports `Outcome`, `FailureKind`) |
//! | [`strategy`] | the `Strategy` trait, `PickContext`, and the nine strategies, one file each |
//! | [`recorder`] | `Recorder`: a service's outcome recording (health, breaker, EWMA, counters, panic), `Outcome`, `FailureKind` |
//! | [`config`] | `LoadBalancerConfig` and its defaults |
//! | [`event`] | `Event`, the state changes reported to the caller |
//! | [`filter`] | the caller's limit and filter in a pick (`Service::select_within`), `NoSelection` |
//! | `draw_ahead` | `DrawAhead`: a thread's random draws for its next picks of a service, in batches whose lines are loaded together |
//! | [`members`] | the chunked copy-on-write member list |
//! | [`instance`] | `InstanceId`, `Weight`, `ServiceInstance`, live `InstanceLive`, `Member`, `InstanceStatus`, `InstanceError` |
//! | [`stats`] | `ServiceStats`: a service's counters and their one transition function |
//! | [`breaker`] | `CircuitBreaker`, `BreakerConfig`, `CircuitState`, `Transition` |
//! | [`health`] | `HealthScore`, `HealthTracker` |
//! | [`ewma`] | `LatencyEwma`, the peak-EWMA latency estimate |
//! | [`slow_start`] | the linear ramp |
//! | [`error`] | the leaf errors `ConfigError`, `HealthScoreError` |
//! | [`clock`] | `Clock`, `SystemClock`, `ManualClock`, `CountingClock`, `Timestamp` |
//! | `member_index` | `MemberIndex`: a service's id → position map, positions only |
//! | `per_thread` | `PerThread`: state striped by thread (request counters, pick RNG and recorder handle, `round_robin`'s rotations) |

#![warn(missing_docs)]

pub mod breaker;
pub mod clock;
pub mod config;
pub(crate) mod draw_ahead;
pub mod error;
pub mod event;
pub mod ewma;
pub mod filter;
pub mod health;
pub(crate) mod hot;
pub mod instance;
pub(crate) mod member_index;
pub mod members;
pub(crate) mod per_thread;
pub(crate) mod pick_view;
pub mod recorder;
pub mod registry;
pub mod selection;
pub mod service;
pub mod slow_start;
pub mod snapshot;
pub mod stats;
pub mod strategy;

pub use breaker::BreakerConfig;
pub use breaker::{CircuitBreaker, CircuitState, Transition, TransitionReason};
pub use clock::{Clock, CountingClock, ManualClock, SystemClock, Timestamp};
pub use config::LoadBalancerConfig;
pub use error::{ConfigError, HealthScoreError};
pub use event::Event;
pub use filter::NoSelection;
pub use health::{HealthScore, HealthTracker};
pub use instance::{InstanceError, InstanceId, InstanceStatus, Member, ServiceInstance, Weight};
pub use members::Members;
pub use registry::{Registry, RegistryBuilder, RegistryError};
pub use selection::{FailureKind, Outcome, Selection};
pub use service::{Registered, Service, ServiceStatus};
pub use stats::ServiceStats;
pub use strategy::{AdaptiveConfig, AdaptiveStatus, Strategy, StrategyKind};
