//! Logging through `tracing`: human-readable by default, JSON with
//! `--log-format json`. Every state change the core reports becomes one event
//! with `service`, `instance`, `from`, `to` and `reason` fields.

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

/// Installs the global subscriber. `RUST_LOG` overrides the default level
/// (`info`). Safe to call more than once (later calls are ignored).
pub fn init(format: LogFormat) {
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

/// Logs one core event as a structured line.
pub fn event(e: &Event) {
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
                from = t.from.as_str(),
                to = t.to.as_str(),
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
            let (from, to) = if *eligible {
                ("ejected", "eligible")
            } else {
                ("eligible", "ejected")
            };
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
            let (from, to) = if *entered {
                ("normal", "panic")
            } else {
                ("panic", "normal")
            };
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
            service,
            from,
            to,
            reason,
        } => info!(
            service = &**service,
            from = from.as_str(),
            to = to.as_str(),
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
            from = "draining",
            to = "removed",
            reason,
            "instance removed"
        ),
    }
}
