//! `outbox-relay`: parse the command line, set up logging, run, map the result
//! to an exit code. Everything else lives in the library (see `lib.rs`).

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use outbox_relay::cli::{self, Cli, Command};
use outbox_relay::config::{Config, LogFormat};
use outbox_relay::demo::{self, DemoOptions};
use outbox_relay::relay::Relay;
use outbox_relay::setup;

/// Exit codes: 0 success, 1 runtime failure (or `check` found problems),
/// 2 invalid configuration or command line.
const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match cli::load(&cli) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(&cfg);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    runtime.block_on(async move {
        match cli.command {
            Command::Run(_) => run(cfg).await,
            Command::Check(_) => check(cfg).await,
            Command::Demo(args) => {
                let opts = DemoOptions {
                    rate: args.rate,
                    count: args.count,
                };
                match demo::run(cfg, opts, shutdown_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{e}");
                        ExitCode::from(EXIT_FAILURE)
                    }
                }
            }
        }
    })
}

fn init_tracing(cfg: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cfg.log.filter.as_str()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Cancelled on the first SIGINT or SIGTERM.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        trigger.cancel();
    });
    token
}

async fn run(cfg: Config) -> ExitCode {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        postgres = %cfg.postgres.redacted_url(),
        kafka = %cfg.kafka.brokers,
        slot = %cfg.postgres.slot,
        "outbox-relay starting"
    );
    match Relay::new(cfg, shutdown_signal()).run().await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn check(cfg: Config) -> ExitCode {
    let client = match outbox_relay::sql::connect(&cfg.postgres).await {
        Ok(c) => c,
        Err(outbox_relay::sql::SqlConnectError::Config(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(outbox_relay::sql::SqlConnectError::Postgres(e)) => {
            eprintln!(
                "error: cannot connect to PostgreSQL at {}: {}",
                cfg.postgres.redacted_url(),
                setup::describe_pg_error(&e)
            );
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match setup::diagnose(&cfg, &client).await {
        Ok(problems) => {
            if problems.is_empty() {
                println!("ok: configuration and server are ready for the relay");
                return ExitCode::SUCCESS;
            }
            println!("{}", setup::render_problems(&problems));
            if problems.iter().any(|p| p.is_error()) {
                ExitCode::from(EXIT_FAILURE)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {}", setup::describe_pg_error(&e));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
