//! `outbox-relay`: parse the command line, set up logging, run, map the result
//! to an exit code. Everything else lives in the library (see `lib.rs`).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use outbox_relay::cli::{self, Cli, Command};
use outbox_relay::cli::{BookmarkAction, PeekArgs, ReplayArgs};
use outbox_relay::config::{Config, LogFormat};
use outbox_relay::demo::{self, DemoOptions};
use outbox_relay::metrics::{Metrics, MetricsOptions};
use outbox_relay::relay::{Relay, StreamOptions};
use outbox_relay::replay::{self, BookmarkReplay, TableRange};
use outbox_relay::{http, setup, status};

/// Exit codes: 0 success, 1 runtime failure (or `check` found problems),
/// [`cli::EXIT_USAGE`] (64) invalid configuration or command line, for every
/// command (a code no `status` result uses).
const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = cli::EXIT_USAGE;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::exit_for_parse_error(&e),
    };
    let cfg = match cli::load(&cli) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(&cfg);
    // The relay is one task (the loop) plus light ones (HTTP, lag sampler);
    // librdkafka runs its own threads. A second runtime worker only adds
    // work-stealing wake-ups on the hot path (profiled during catch-up: worker
    // park/unpark was a quarter of the loop thread's CPU), so `run` and
    // `replay` get one. The multi-thread flavour stays for `block_in_place`.
    let workers = match cli.command {
        Command::Run(_) | Command::Replay(_) => 1,
        _ => 2,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run(cfg, args.start_lsn).await,
            Command::Bookmark(args) => bookmark(cfg, args.action).await,
            Command::Replay(args) => replay_cmd(cfg, args).await,
            Command::Peek(args) => peek(cfg, args).await,
            Command::Check(_) => check(cfg).await,
            Command::Status(args) => {
                status(
                    cfg,
                    args.json,
                    args.max_retained_bytes,
                    args.max_bookmark_retained_bytes,
                )
                .await
            }
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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

async fn run(cfg: Config, start_lsn: Option<outbox_relay::Lsn>) -> ExitCode {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        postgres = %cfg.postgres.redacted_url(),
        kafka = %cfg.kafka.brokers,
        slot = %cfg.postgres.slot,
        "outbox-relay starting"
    );
    let metrics = Metrics::with_options(MetricsOptions {
        stall_timeout: cfg.relay.ready_stall_timeout,
        ..MetricsOptions::default()
    });
    if let Some(endpoint) = &cfg.relay.otlp_endpoint {
        if let Err(e) = outbox_relay::trace::init(endpoint) {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        tracing::info!(endpoint = %endpoint, "exporting one span per record over OTLP/HTTP");
    }
    let http_stop = CancellationToken::new();
    if let Some(addr) = cfg.relay.http_listen_addr() {
        match http::bind(addr).await {
            Ok(listener) => {
                let (m, stop) = (metrics.clone(), http_stop.clone());
                tokio::spawn(async move {
                    if let Err(e) = http::serve_on(listener, m, stop).await {
                        tracing::error!("{e}");
                    }
                });
            }
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    // Samples the slot while the session does not: standby readiness and role,
    // fresh slot gauges when the session's sampler fails.
    if cfg.relay.http_listen_addr().is_some() {
        tokio::spawn(status::watch::watch_slot(
            cfg.postgres.clone(),
            cfg.relay
                .slot_busy_retry
                .clamp(Duration::from_secs(1), Duration::from_secs(10)),
            metrics.clone(),
            http_stop.clone(),
        ));
    }
    // The loop runs on a runtime worker, not under `block_on` on the main
    // thread: profiling showed every IO wake-up otherwise crossing threads
    // (the worker's driver waking the main thread), about half the relay's CPU.
    let serving = cfg.relay.http_listen_addr().is_some();
    let pg = cfg.postgres.clone();
    let relay = Relay::with_metrics(cfg, shutdown_signal(), metrics.clone()).stream_options(
        StreamOptions {
            start_lsn,
            ..StreamOptions::default()
        },
    );
    let result = tokio::spawn(relay.run())
        .await
        .expect("the relay task does not panic");
    let code = match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            if serving {
                // An invalidated slot stays on /metrics long enough to be scraped.
                status::watch::linger_if_slot_lost(&pg, &metrics, shutdown_signal()).await;
            }
            ExitCode::from(EXIT_FAILURE)
        }
    };
    http_stop.cancel();
    // The batch processor's thread blocks on its export: off the runtime's workers.
    let _ = tokio::task::spawn_blocking(outbox_relay::trace::shutdown).await;
    code
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_FAILURE)
}

/// Like [`fail`], with [`EXIT_CONFIG`] for configuration errors.
fn fail_replay(e: replay::ReplayError) -> ExitCode {
    eprintln!("error: {e}");
    match e {
        replay::ReplayError::Config(_) => ExitCode::from(EXIT_CONFIG),
        _ => ExitCode::from(EXIT_FAILURE),
    }
}

/// `sql::connect` failed: configuration errors get [`EXIT_CONFIG`], others `code`.
fn fail_connect(cfg: &Config, e: outbox_relay::sql::SqlConnectError, code: u8) -> ExitCode {
    match e {
        outbox_relay::sql::SqlConnectError::Config(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        outbox_relay::sql::SqlConnectError::Postgres(e) => {
            eprintln!(
                "error: cannot read the server at {}: {}",
                cfg.postgres.redacted_url(),
                setup::describe_pg_error(&e)
            );
            ExitCode::from(code)
        }
        outbox_relay::sql::SqlConnectError::NoServer(e) => {
            eprintln!("error: {e}");
            ExitCode::from(code)
        }
    }
}

async fn bookmark(cfg: Config, action: BookmarkAction) -> ExitCode {
    match action {
        BookmarkAction::Create { name, .. } => match replay::create_bookmark(&cfg, &name).await {
            Ok((slot, lsn)) => {
                println!("bookmark {name} created: slot {slot} at {lsn}; it retains WAL until dropped (outbox-relay bookmark drop {name})");
                ExitCode::SUCCESS
            }
            Err(e) => fail_replay(e),
        },
        BookmarkAction::Drop { name, .. } => match replay::drop_bookmark(&cfg, &name).await {
            Ok(()) => {
                println!("bookmark {name} dropped");
                ExitCode::SUCCESS
            }
            Err(e) => fail_replay(e),
        },
        BookmarkAction::List { .. } => {
            let client = match outbox_relay::sql::connect(&cfg.postgres).await {
                Ok(c) => c,
                Err(e) => return fail_connect(&cfg, e, EXIT_FAILURE),
            };
            match status::collect(&client, &cfg.postgres.slot, &cfg.postgres.publication).await {
                Ok(s) => {
                    if s.bookmarks.is_empty() {
                        println!("no bookmarks for slot {}", cfg.postgres.slot);
                    }
                    for b in &s.bookmarks {
                        println!("{}", serde_json::to_string(b).unwrap_or_default());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(setup::describe_pg_error(&e)),
            }
        }
    }
}

async fn replay_cmd(cfg: Config, args: ReplayArgs) -> ExitCode {
    if let Some(name) = args.from_bookmark {
        let opts = BookmarkReplay {
            name,
            to_lsn: args.to_lsn,
            topic_override: args.topic_override,
            keep: args.keep_bookmark,
        };
        return match replay::replay_bookmark(&cfg, &opts, shutdown_signal()).await {
            Ok(done) => {
                println!(
                    "replayed bookmark {}: {} records sent, commits in [{}, {})",
                    opts.name, done.records, done.from, done.to
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail_replay(e),
        };
    }
    let range = match (args.from_id, args.from_time) {
        (Some(from), None) => TableRange::Id {
            from,
            to: args.to_id,
        },
        (None, Some(from)) => TableRange::Time {
            column: args.time_column,
            from,
            to: args.to_time,
        },
        _ => {
            eprintln!("error: say what to replay: --from-bookmark NAME, --from-id ID or --from-time TIMESTAMP");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match replay::replay_table(&cfg, &range, args.topic_override, args.force).await {
        Ok(n) => {
            println!("replayed {n} rows from {}", cfg.postgres.table);
            ExitCode::SUCCESS
        }
        Err(e) => fail_replay(e),
    }
}

async fn peek(cfg: Config, args: PeekArgs) -> ExitCode {
    let slot = match &args.bookmark {
        Some(name) => match replay::bookmark_slot(&cfg.postgres.slot, name) {
            Ok(s) => s,
            Err(e) => return fail_replay(e),
        },
        None => cfg.postgres.slot.clone(),
    };
    match replay::peek(&cfg, &slot, args.limit).await {
        Ok(records) => {
            for r in &records {
                if args.json {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                } else {
                    println!(
                        "{} {} key={} id={} payload={}",
                        r.lsn,
                        r.topic,
                        r.key.as_deref().unwrap_or("-"),
                        r.id.as_deref().unwrap_or("-"),
                        r.payload.as_deref().unwrap_or("-")
                    );
                }
            }
            if records.is_empty() && !args.json {
                println!("no pending events in slot {slot}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail_replay(e),
    }
}

/// `status`: exit codes are the status module's (0 ok, 1 slot missing,
/// 2 invalidated, 3 retaining too much, 5 a bookmark retaining too much, opt-in);
/// 4 when the server cannot be read.
async fn status(
    cfg: Config,
    json: bool,
    max_retained: Option<usize>,
    max_bookmark_retained: Option<usize>,
) -> ExitCode {
    const EXIT_UNREADABLE: u8 = 4;
    let client = match outbox_relay::sql::connect(&cfg.postgres).await {
        Ok(c) => c,
        Err(e) => return fail_connect(&cfg, e, EXIT_UNREADABLE),
    };
    match status::collect(&client, &cfg.postgres.slot, &cfg.postgres.publication).await {
        Ok(mut s) => {
            s.failover = outbox_relay::failover::readiness(&cfg, &client, client.host)
                .await
                .ok();
            if json {
                println!("{}", status::render_json(&s));
            } else {
                println!("{}", status::render_text(&s));
            }
            let threshold = max_retained.map_or(u64::MAX, |b| b as u64);
            let reason = status::exit_reason(&s, threshold).or_else(|| {
                max_bookmark_retained.and_then(|b| status::bookmark_exit_reason(&s, b as u64))
            });
            match reason {
                Some((code, reason)) => {
                    eprintln!("{reason}");
                    ExitCode::from(code as u8)
                }
                None => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("error: {}", setup::describe_pg_error(&e));
            ExitCode::from(EXIT_UNREADABLE)
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
        Err(outbox_relay::sql::SqlConnectError::NoServer(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match setup::diagnose(&cfg, &client).await {
        Ok(mut problems) => {
            // Failover readiness: notes (run proceeds without it).
            match outbox_relay::failover::readiness(&cfg, &client, client.host).await {
                Ok(r) => problems.extend(r.findings),
                Err(e) => problems.push(outbox_relay::config::Problem::info(
                    format!(
                        "cannot read the failover readiness: {}",
                        setup::describe_pg_error(&e)
                    ),
                    "grant the relay's role pg_monitor (pg_stat_replication, settings)",
                )),
            }
            problems.extend(setup::diagnose_kafka(&cfg).await);
            if problems.is_empty() {
                println!("ok: configuration, PostgreSQL and Kafka are ready for the relay");
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
