//! Command line: `datapunk-lb run | check | demo | register`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::telemetry::LogFormat;

/// `datapunk-lb -V`: the version and the git commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("DATAPUNK_LB_GIT_COMMIT"),
    ")"
);

/// `datapunk-lb --version`: the version, the git commit it was built from
/// (`unknown` outside a git checkout) and the enabled cargo features, one per
/// line (see `build.rs`).
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("DATAPUNK_LB_GIT_COMMIT"),
    "\nfeatures: ",
    env!("DATAPUNK_LB_FEATURES")
);

/// datapunk-lb: the health-aware load balancer of the Datapunk service mesh.
#[derive(Debug, Parser)]
#[command(name = "datapunk-lb", version = VERSION, long_version = LONG_VERSION, about)]
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
        /// Worker threads (default: one per available core). At least 1.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        threads: Option<u16>,
        /// Thread per core even at `--threads 1` (one worker thread beside
        /// the control plane's). With more than one thread it is the
        /// default: each thread runs its own single-threaded runtime,
        /// accepts on its own `SO_REUSEPORT` socket per listener and keeps
        /// its own upstream connections; see
        /// `docs/benchmarks.md`, "Threads (issue 12)". Also set by
        /// `DATAPUNK_LB_THREAD_PER_CORE=true`.
        #[arg(
            long,
            env = "DATAPUNK_LB_THREAD_PER_CORE",
            conflicts_with = "shared_runtime"
        )]
        thread_per_core: bool,
        /// One multi-threaded tokio runtime of `--threads` workers (work
        /// stealing) instead of thread per core: the default before issue
        /// 12's per-worker upstream pools. Also set by
        /// `DATAPUNK_LB_SHARED_RUNTIME=true`.
        #[arg(long, env = "DATAPUNK_LB_SHARED_RUNTIME")]
        shared_runtime: bool,
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
    /// Sidecar: register an instance in etcd under a lease and keep it
    /// alive; SIGTERM/SIGINT revoke the lease (the instance leaves every
    /// balancer node at once) and exit 0.
    Register(Box<RegisterArgs>),
}

/// `datapunk-lb register`.
#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    /// etcd client endpoints, `host:port`, `http://host:port` or
    /// `https://host:port` (a bare `host:port` is https with `--ca-file`);
    /// comma-separated or repeated.
    #[arg(long = "etcd", value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
    /// Key prefix (as the balancers' `[discovery] prefix`).
    #[arg(long, default_value = crate::config::DEFAULT_ETCD_PREFIX)]
    pub prefix: String,
    /// Service name.
    #[arg(long)]
    pub service: String,
    /// Instance id, unique within the service.
    #[arg(long)]
    pub id: String,
    /// Address the balancers connect to.
    #[arg(long)]
    pub address: String,
    /// Port.
    #[arg(long)]
    pub port: u16,
    /// Weight, 1..=1000.
    #[arg(long, default_value_t = 1)]
    pub weight: u16,
    /// Zone.
    #[arg(long)]
    pub zone: Option<String>,
    /// Tags (repeat the flag for several).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Lease TTL: how long the instance stays after the sidecar dies without
    /// revoking (SIGKILL, crash). Whole seconds, at least 1 s.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// TLS to etcd: the PEM CA bundle etcd's certificate is verified
    /// against (as `[discovery] ca_file`); needed for https endpoints.
    #[arg(long)]
    pub ca_file: Option<String>,
    /// TLS to etcd: a client certificate (PEM chain, leaf first) for etcd's
    /// `--client-cert-auth` (as `[discovery] cert_file`); needs `--key-file`.
    #[arg(long)]
    pub cert_file: Option<String>,
    /// TLS to etcd: the client certificate's PEM key (as `[discovery]
    /// key_file`).
    #[arg(long)]
    pub key_file: Option<String>,
}
