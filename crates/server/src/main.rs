//! `datapunk-lb`: parse the command line, set up logging, run.

// `check` prints its report on stdout: that is the command's output.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use datapunk_lb::cli::{Cli, Command};
use datapunk_lb::config::Config;
use datapunk_lb::server::Server;
use datapunk_lb::telemetry;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

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

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n.max(1));
    }
    b.enable_all().build().context("starting the tokio runtime")
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
        Command::Run { config, threads } => {
            let path = config;
            let cfg = Config::load(&path)
                .map_err(|e| anyhow::anyhow!("{}: invalid config:\n{e}", path.display()))?;
            runtime(threads)?.block_on(serve(path, cfg))
        }
        Command::Demo { seconds } => runtime(None)?.block_on(datapunk_lb::demo::run(seconds)),
    }
}

async fn serve(path: std::path::PathBuf, cfg: Config) -> anyhow::Result<ExitCode> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let server = Server::start(cfg).await?;
    info!(config = %path.display(), "datapunk-lb running");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                match Config::load(&path) {
                    Ok(new) => match server.reload(new).await {
                        Ok(()) => info!(config = %path.display(), result = "success", from = "previous config", to = "new config", reason = "SIGHUP", "reload"),
                        Err(e) => error!(config = %path.display(), result = "failure", from = "previous config", to = "previous config", reason = %e, "reload rejected; the old config keeps serving"),
                    },
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
