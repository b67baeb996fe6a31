//! Command line: `datapunk-lb run | check | demo`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

/// datapunk-lb: the health-aware load balancer of the Datapunk service mesh.
#[derive(Debug, Parser)]
#[command(name = "datapunk-lb", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value = "human", global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a config: SIGTERM/SIGINT drain, SIGHUP reloads.
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Validate a config, print what would run; exit 0, or 1 with the reasons.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Self-contained demo: sample backends, the balancer, traffic and a live
    /// view of health awareness at work. Ctrl-C stops it.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
    },
}
