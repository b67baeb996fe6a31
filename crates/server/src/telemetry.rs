//! Logging through `tracing`: human-readable by default, JSON with
//! `--log-format json`. Every state change the core reports becomes one event
//! with `service`, `instance`, `from`, `to` and `reason` fields. The access
//! log (`proxy::access_log`) writes its own lines, in the same format.

use std::sync::OnceLock;

use datapunk_lb_core::Event;
use tracing::{info, warn};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per line.
    Json,
}

/// The format given to the first [`init`].
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The log format of this process: the one given to [`init`], human when
/// `init` was not called (tests embedding the server).
pub fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or(LogFormat::Human)
}

/// Installs the global subscriber. `RUST_LOG` overrides the default level
/// (`info`). Safe to call more than once (later calls are ignored).
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Logs the events the core reported.
pub fn events(events: Vec<Event>) {
    for e in events {
        event(&e);
    }
}

/// The `from` and `to` states of a core event, as the log lines and the
/// status page's timeline both say them.
pub fn from_to(e: &Event) -> (&'static str, &'static str) {
    match e {
        Event::Breaker { transition: t, .. } => (t.from.as_str(), t.to.as_str()),
        Event::Eligibility { eligible: true, .. } => ("ejected", "eligible"),
        Event::Eligibility {
            eligible: false, ..
        } => ("eligible", "ejected"),
        Event::Panic { entered: true, .. } => ("normal", "panic"),
        Event::Panic { entered: false, .. } => ("panic", "normal"),
        Event::StrategySwitch { from, to, .. } => (from.as_str(), to.as_str()),
        Event::Removed { .. } => ("draining", "removed"),
    }
}

/// Logs one core event as a structured line.
pub fn event(e: &Event) {
    let (from, to) = from_to(e);
    match e {
        Event::Breaker {
            service,
            instance,
            transition: t,
        } => {
            let open_for = t.open_for.map(|d| format!("{d:?}"));
            warn!(
                service = &**service,
                instance = instance.as_str(),
                from,
                to,
                reason = %t.reason,
                open_for = open_for.as_deref(),
                "circuit breaker transition"
            );
        }
        Event::Eligibility {
            service,
            instance,
            eligible,
            reason,
        } => {
            info!(
                service = &**service,
                instance = instance.as_str(),
                from,
                to,
                reason,
                "instance {}",
                if *eligible { "restored" } else { "ejected" }
            );
        }
        Event::Panic {
            service,
            entered,
            eligible,
            total,
        } => {
            warn!(
                service = &**service,
                from,
                to,
                eligible,
                total,
                reason = "eligible share vs min_healthy_percent",
                "panic mode {}",
                if *entered { "entered" } else { "left" }
            );
        }
        Event::StrategySwitch {
            service, reason, ..
        } => info!(
            service = &**service,
            from,
            to,
            reason = reason.as_str(),
            "adaptive strategy switch"
        ),
        Event::Removed {
            service,
            instance,
            reason,
        } => info!(
            service = &**service,
            instance = instance.as_str(),
            from,
            to,
            reason,
            "instance removed"
        ),
    }
}
