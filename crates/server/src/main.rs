//! `datapunk-lb`: parse the command line, set up logging, run.

// `check` prints its report on stdout: that is the command's output.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use datapunk_lb::cli::{Cli, Command};
use datapunk_lb::config::Config;
use datapunk_lb::server::Server;
use datapunk_lb::telemetry;
use datapunk_lb::workers::Workers;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// With the `mimalloc` feature (default), mimalloc serves every allocation
/// of the binary: less CPU per request than the system allocator (see
/// docs/benchmarks.md, "Fast path (issue 12)").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            error!(error = format!("{e:#}"), "fatal");
            eprintln!("datapunk-lb: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A runtime for everything but `run`'s thread-per-core mode: `Some(1)`
/// gets a single-threaded scheduler; otherwise a multi-threaded one, one
/// worker per core by default.
fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all().build().context("starting the tokio runtime")
}

/// Threads of the control plane's runtime under thread per core.
///
/// Two, measured (docs/benchmarks.md, "Threads, second pass"): on one
/// thread (the main thread's single-threaded runtime, as before) a reload
/// of a 50,000-instance service under full proxy load held every admin
/// answer for up to its apply time (p99 130-220 ms) and delayed the health
/// checks (66-73 of 80 probes ran in 8 s); on two, admin p99 was 17-61 ms
/// and 78-80 probes ran, at the same proxy throughput (the threads sleep
/// when there is no control work, so they take nothing from the workers).
const CONTROL_THREADS: usize = 2;

/// The control plane's runtime under thread per core: multi-threaded, so
/// one long control operation (a reload's apply, a large listing) does not
/// hold the health checks and the admin endpoint behind it.
fn control_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CONTROL_THREADS)
        .thread_name("datapunk-control")
        .enable_all()
        .build()
        .context("starting the control runtime")
}

/// Raises the soft limit on open descriptors to the hard one before any
/// listener opens, as HAProxy (from its `maxconn`), NGINX
/// (`worker_rlimit_nofile`) and Go's runtime do: shells and containers
/// often start a process at a soft 1,024, and each proxied connection
/// holds two descriptors (the client's and an upstream one), so a default
/// soft limit refuses connections at about 500. Logs the limit in effect;
/// warns when it is below two per connection the listeners'
/// `max_connections` admit (only the hard limit, `LimitNOFILE=` or
/// `ulimit -Hn`, can lift it further). A failure to raise is a warning:
/// the process runs on the limit it has.
fn raise_open_file_limit(cfg: &Config) {
    let before = rlimit::Resource::NOFILE.get().map_or(0, |(soft, _)| soft);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            let may_need: u64 = cfg
                .listeners
                .iter()
                .map(|l| 2 * u64::from(l.limits.max_connections))
                .sum();
            info!(limit, raised_from = before, "open file limit");
            if limit < may_need {
                warn!(
                    limit,
                    listeners_may_need = may_need,
                    "open file limit below two descriptors per connection the listeners' \
                     max_connections admit: raise the hard limit (LimitNOFILE=, ulimit -Hn) \
                     or lower max_connections"
                );
            }
        }
        Err(e) => warn!(error = %e, limit = before, "could not raise the open file limit"),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                print!("{}", c.summary());
                println!("config OK");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{}: invalid config:\n{e}", config.display());
                Ok(ExitCode::from(1))
            }
        },
        Command::Run {
            config,
            threads,
            thread_per_core,
            shared_runtime,
        } => {
            let path = config;
            let cfg = Config::load(&path)
                .map_err(|e| anyhow::anyhow!("{}: invalid config:\n{e}", path.display()))?;
            raise_open_file_limit(&cfg);
            let threads = threads.map(usize::from).unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            });
            // One thread: one single-threaded runtime for everything (the
            // two models coincide). More: thread per core unless
            // `--shared-runtime`; measured faster and cheaper per request
            // since the upstream pools are per worker (docs/benchmarks.md,
            // "Threads (issue 12)").
            if shared_runtime || (threads == 1 && !thread_per_core) {
                return runtime(Some(threads))?.block_on(serve(path, cfg, None));
            }
            // Thread per core (`datapunk_lb::workers`): `threads` workers
            // serve the listeners; the control plane runs on a runtime of
            // its own with CONTROL_THREADS threads (this thread waits for
            // signals and runs reloads on it).
            let workers = Workers::start(threads).context("starting the worker threads")?;
            control_runtime()?.block_on(serve(path, cfg, Some(Arc::new(workers))))
        }
        Command::Demo { seconds } => runtime(None)?.block_on(datapunk_lb::demo::run(seconds)),
        Command::Register(args) => register(*args),
    }
}

#[cfg(not(feature = "etcd"))]
fn register(_: datapunk_lb::cli::RegisterArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("register: this build of datapunk-lb lacks etcd support (built without the `etcd` cargo feature)")
}

#[cfg(feature = "etcd")]
fn register(args: datapunk_lb::cli::RegisterArgs) -> anyhow::Result<ExitCode> {
    use datapunk_lb::config::{check_etcd, EtcdField, EtcdSettings};
    use datapunk_lb::discovery::etcd::{register, Registration};
    use datapunk_lb::state::InstanceSpec;

    let mut problems = Vec::new();
    let written: Vec<&str> = args.etcd.iter().map(String::as_str).collect();
    let settings = EtcdSettings {
        endpoints: &written,
        ca_file: args.ca_file.as_deref(),
        cert_file: args.cert_file.as_deref(),
        key_file: args.key_file.as_deref(),
    };
    let (endpoints, tls) = match check_etcd(&settings) {
        Ok(ok) => ok,
        Err(issues) => {
            for i in issues {
                let flag = match i.field {
                    EtcdField::Endpoint(_) => "--etcd",
                    EtcdField::CaFile => "--ca-file",
                    EtcdField::CertFile => "--cert-file",
                    EtcdField::KeyFile => "--key-file",
                };
                problems.push(format!("{flag}: {}", i.message));
            }
            (Vec::new(), None)
        }
    };
    if !args.prefix.ends_with('/') {
        problems.push(format!("--prefix {:?}: must end with '/'", args.prefix));
    }
    for (flag, v) in [("--service", &args.service), ("--id", &args.id)] {
        if v.is_empty() || v.contains('/') {
            problems.push(format!("{flag} {v:?}: must be non-empty, without '/'"));
        }
    }
    let spec = InstanceSpec {
        address: args.address.clone(),
        port: args.port,
        weight: args.weight,
        zone: args.zone.clone(),
        tags: args.tags.clone(),
    };
    if let Err(e) = spec.to_instance(&args.id) {
        problems.push(e.to_string());
    }
    if args.ttl < std::time::Duration::from_secs(1) {
        problems.push(format!("--ttl {:?}: must be at least 1s", args.ttl));
    }
    if !problems.is_empty() {
        anyhow::bail!("register: {}", problems.join("; "));
    }
    let reg = Registration {
        endpoints,
        prefix: args.prefix,
        service: args.service,
        id: args.id,
        spec,
        ttl: args.ttl,
        tls,
    };
    runtime(Some(1))?.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        };
        register(reg, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

async fn serve(
    path: std::path::PathBuf,
    cfg: Config,
    workers: Option<Arc<Workers>>,
) -> anyhow::Result<ExitCode> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let threads = workers.as_ref().map(|w| w.len());
    let server = match workers {
        Some(workers) => Server::start_on(cfg, workers).await?,
        None => Server::start(cfg).await?,
    };
    info!(config = %path.display(), worker_threads = ?threads, "datapunk-lb running");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // Parse and apply timed apart (issue 11: a reload is O(changes) plus the parse).
                // Off the runtime: a 100,000-instance file parses for ~0.5 s.
                let parsing = std::time::Instant::now();
                let file = path.clone();
                let loaded = tokio::task::spawn_blocking(move || Config::load(&file).map_err(|e| e.to_string()))
                    .await
                    .unwrap_or_else(|e| Err(format!("parsing the config failed: {e}")));
                match loaded {
                    Ok(new) => {
                        let parse_ms = parsing.elapsed().as_secs_f64() * 1e3;
                        let applying = std::time::Instant::now();
                        let r = server.reload(new).await;
                        let apply_ms = applying.elapsed().as_secs_f64() * 1e3;
                        match r {
                        Ok(()) => info!(config = %path.display(), result = "success", from = "previous config", to = "new config", reason = "SIGHUP", parse_ms, apply_ms, "reload"),
                        Err(e) => error!(config = %path.display(), result = "failure", from = "previous config", to = "previous config", reason = %e, "reload rejected; the old config keeps serving"),
                        }
                    }
                    Err(e) => {
                        server.metrics().reload(false);
                        error!(config = %path.display(), result = "failure", from = "previous config", to = "previous config", reason = %e, "reload rejected; the old config keeps serving");
                    }
                }
            }
        }
    }
    info!("draining");
    server.drain().await;
    Ok(ExitCode::SUCCESS)
}
