//! `outbox-bench`: the benchmark harness (issue 5).
//!
//! On this machine it starts PostgreSQL and a Kafka-protocol broker (tansu),
//! builds and runs the relay as a separate process, and measures:
//!
//! 1. catch-up of a committed backlog, against the `pg_recvlogical` ceiling and
//!    raw rdkafka ([`catchup`]);
//! 2. commit → consumer latency at fixed insert rates ([`steady`]);
//! 3. the same for a polling relay (`SELECT … FOR UPDATE SKIP LOCKED`), which
//!    exists only here ([`polling`]);
//! 4. CPU and peak memory of every party ([`resources`]).
//!
//! Output: `report.md`, `results.json` and `latency.png` in `--out`
//! (default `target/bench/`).
//!
//! ```text
//! cargo run --release -p outbox-bench -- [--quick] [--broker mock]
//! ```
//!
//! Every process it starts is stopped on every way out: normal end, error,
//! panic (drop guards), Ctrl-C/SIGTERM (a handler stops all registered
//! children), even SIGKILL of the benchmark (parent-death signal).

/// Progress lines on stderr, with the seconds since the benchmark started.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say_line(&format!($($arg)*))
    };
}

mod broker;
mod catchup;
mod load;
mod plot;
mod polling;
mod process;
mod rawproduce;
mod rawstream;
mod report;
mod resources;
mod results;
mod scenarios;
mod steady;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use crate::process::TempDir;
use crate::results::{Meta, Results};
use crate::scenarios::{sql, Ctx, Settings, PG_SETTINGS, RELAY_TABLE};
use crate::steady::Subject;

/// Benchmark outbox-relay against pg_recvlogical, raw rdkafka and a polling relay.
#[derive(Debug, Parser)]
#[command(name = "outbox-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    sub: Option<Sub>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// (internal) the polling baseline relay
    #[command(hide = true)]
    PollRelay(polling::PollArgs),
    /// (internal) the raw rdkafka producer of the catch-up comparison
    #[command(hide = true)]
    RawProduce(rawproduce::RawArgs),
    /// (internal) the Rust replication client of the catch-up ceiling
    #[command(hide = true)]
    RawStream(rawstream::StreamArgs),
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Smoke run (~1-2 min): 20k events, 3 s windows, fewer polling windows
    #[arg(long)]
    quick: bool,
    /// Catch-up backlog size [default: 200000; quick: 20000]
    #[arg(long)]
    events: Option<u64>,
    /// Approximate payload size of every event, bytes
    #[arg(long, default_value_t = 1000)]
    payload_bytes: usize,
    /// Rows per transaction of the catch-up backlogs, one catch-up each
    #[arg(long, value_delimiter = ',', default_value = "1,1000")]
    backlog_txn_rows: Vec<usize>,
    /// What the catch-up backlogs are made of: outbox table `rows` and/or
    /// logical decoding `messages` (pg_logical_emit_message), one catch-up each
    #[arg(long, value_delimiter = ',', default_value = "rows")]
    backlog_sources: Vec<catchup::Source>,
    /// What the relay's steady windows write: outbox table `rows` and/or
    /// logical decoding `messages`, every shape and rate each
    #[arg(long, value_delimiter = ',', default_value = "rows")]
    steady_sources: Vec<catchup::Source>,
    /// Steady insert rates, events/s
    #[arg(long, value_delimiter = ',', default_value = "2000,5000,20000")]
    rates: Vec<u64>,
    /// Warm-up before each steady window [default: 2s; quick: 1s]
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Steady measurement window [default: 10s; quick: 3s]
    #[arg(long, value_parser = humantime::parse_duration)]
    window: Option<Duration>,
    /// Window for pollers with an interval of 1 s or more [default: 15s; quick: 6s]
    #[arg(long, value_parser = humantime::parse_duration)]
    slow_poll_window: Option<Duration>,
    /// Writer connections for 1-row transactions
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Writer connections for multi-row transactions
    #[arg(long, default_value_t = 2)]
    txn_writers: usize,
    /// Rows per transaction of the multi-row shape
    #[arg(long, default_value_t = 100)]
    txn_rows: usize,
    /// Polling intervals of the baseline
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration, default_value = "100ms,5s")]
    poll_intervals: Vec<Duration>,
    /// Rows per poll
    #[arg(long, default_value_t = 1000)]
    poll_batch: i64,
    /// Consumer's fetch.wait.max.ms. tansu answers a fetch only when this
    /// expires, even if records arrived meanwhile (Kafka answers at once), so
    /// it adds ~1.5× itself to every latency: keep it small
    #[arg(long, default_value_t = 1)]
    fetch_wait_ms: u32,
    /// Scenarios to run: catchup, steady (relay), floor (producer → broker →
    /// consumer without a database), polling
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "catchup,steady,floor,polling"
    )]
    scenarios: Vec<String>,
    /// PostgreSQL bindir (17: /opt/outbox-relay-deps/pg17/bin)
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pg_bindir: PathBuf,
    /// Brokers, in order: tansu (a separate process) and/or librdkafka's mock
    /// cluster in this process (an ideal broker, to measure the relay apart
    /// from tansu). Catch-up, relay windows and the broker floor run on each;
    /// the polling baseline on the first
    #[arg(
        long = "broker",
        value_enum,
        value_delimiter = ',',
        default_value = "tansu,mock"
    )]
    brokers: Vec<broker::Kind>,
    /// The tansu binary [default: $OUTBOX_RELAY_TANSU, ~/.cargo/bin/tansu, PATH]
    #[arg(long)]
    tansu: Option<PathBuf>,
    /// The relay binary to benchmark [default: outbox-relay next to this program,
    /// built first with cargo]
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Where report.md, results.json and latency.png go [default: <target>/bench]
    #[arg(long)]
    out: Option<PathBuf>,
    /// Parent of the temp dirs (must be traversable by the postgres user)
    #[arg(long, default_value = "/tmp")]
    work_dir: PathBuf,
    /// Keep the temp dirs (data, logs) afterwards
    #[arg(long)]
    keep_temp: bool,
    /// librdkafka producer property for the relay and the raw producer alike
    /// (repeatable), to compare producer tunings in one harness
    #[arg(long = "producer-property", value_name = "KEY=VALUE", value_parser = outbox_relay::cli::parse_kafka_property)]
    producer_properties: Vec<(String, String)>,
    /// Profile the relay during catch-up: `perf record -g` into this file
    /// (then `perf report -i FILE`)
    #[arg(long, value_name = "FILE")]
    perf_relay: Option<PathBuf>,
    /// Write each steady window's (commit µs, receive µs) pairs as CSV here
    #[arg(long, value_name = "DIR")]
    dump_stamps: Option<PathBuf>,
}

static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

pub fn say_line(line: &str) {
    let t = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[bench {t:6.1}s] {line}");
}

fn main() -> ExitCode {
    STARTED.get_or_init(Instant::now);
    let cli = Cli::parse();
    let result = match cli.sub {
        Some(Sub::PollRelay(a)) => polling::main(a),
        Some(Sub::RawProduce(a)) => rawproduce::main(a),
        Some(Sub::RawStream(a)) => rawstream::main(a),
        None => bench(cli.bench),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn settings(a: &BenchArgs) -> Settings {
    let q = a.quick;
    Settings {
        events: a.events.unwrap_or(if q { 20_000 } else { 200_000 }),
        payload_bytes: a.payload_bytes,
        backlog_txn_rows: a.backlog_txn_rows.iter().map(|&r| r.max(1)).collect(),
        backlog_sources: a.backlog_sources.clone(),
        steady_sources: a.steady_sources.clone(),
        brokers: a.brokers.clone(),
        rates: a.rates.clone(),
        warmup: a
            .warmup
            .unwrap_or(Duration::from_secs(if q { 1 } else { 2 })),
        window: a
            .window
            .unwrap_or(Duration::from_secs(if q { 3 } else { 10 })),
        slow_poll_window: a
            .slow_poll_window
            .unwrap_or(Duration::from_secs(if q { 6 } else { 15 })),
        writers: a.writers.max(1),
        txn_writers: a.txn_writers.max(1),
        txn_rows: a.txn_rows.max(2),
        poll_intervals: a.poll_intervals.clone(),
        // Quick: the polling baseline on 1-row transactions only.
        poll_modes: if q {
            vec![1]
        } else {
            vec![1, a.txn_rows.max(2)]
        },
        poll_batch: a.poll_batch,
        fetch_wait_ms: a.fetch_wait_ms,
        perf_relay: a.perf_relay.clone(),
        producer_properties: a.producer_properties.clone(),
        dump_stamps: a.dump_stamps.clone(),
    }
}

/// `<target>/<profile>/outbox-bench` → `<target>`.
fn target_dir(exe: &Path) -> PathBuf {
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// The relay binary: `--relay-bin`, or `outbox-relay` beside this program,
/// built first (same profile) so the benchmark never measures a stale build.
fn relay_binary(a: &BenchArgs, exe: &Path) -> Result<PathBuf, String> {
    if let Some(p) = &a.relay_bin {
        return if p.is_file() {
            Ok(p.clone())
        } else {
            Err(format!("--relay-bin {} does not exist", p.display()))
        };
    }
    let dir = exe
        .parent()
        .ok_or("cannot locate this program's directory")?;
    let release = dir.file_name().is_some_and(|n| n == "release");
    // The product is the workspace's root package, one level above this crate.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    say!(
        "building the relay: cargo build{} --workspace --bins",
        if release { " --release" } else { "" }
    );
    // `--workspace`: the dependencies' features as when this program was
    // built, so cargo reuses them (building the relay package alone selects
    // other features and rebuilds a good part of them).
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "--workspace", "--bins", "--manifest-path"])
        .arg(&manifest);
    if release {
        cmd.arg("--release");
    } else {
        say!("warning: this is a debug build; run with --release for real figures");
    }
    let status = cmd
        .status()
        .map_err(|e| format!("run cargo to build the relay: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build of the relay failed ({status})"));
    }
    let bin = dir.join("outbox-relay");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("{} is missing after the build", bin.display()))
    }
}

/// Ctrl-C / SIGTERM: stop every child, remove temp dirs, exit 130.
/// What `postgres --version` prints.
fn pg_version(bindir: &Path) -> String {
    Command::new(bindir.join("postgres"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn install_interrupt_handler(runtime: &tokio::runtime::Runtime) {
    runtime.spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        say!("interrupted: stopping every process the benchmark started");
        tokio::task::spawn_blocking(|| {
            process::stop_all_registered();
            testkit::process::stop_all();
        })
        .await
        .ok();
        std::process::exit(130);
    });
}

fn bench(a: BenchArgs) -> Result<(), String> {
    let began = Instant::now();
    let exe = std::env::current_exe().map_err(|e| format!("locate this program: {e}"))?;
    let out_dir = a
        .out
        .clone()
        .unwrap_or_else(|| target_dir(&exe).join("bench"));
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("create {}: {e}", out_dir.display()))?;
    let s = settings(&a);
    let want = |name: &str| a.scenarios.iter().any(|x| x == name);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("start the async runtime: {e}"))?;
    install_interrupt_handler(&runtime);

    let build_began = Instant::now();
    let relay_bin = relay_binary(&a, &exe)?;
    let relay_build_s = build_began.elapsed().as_secs_f64();
    // The test kit's servers take these from the environment; set before any
    // thread that reads it is started.
    std::env::set_var("OUTBOX_RELAY_TEST_TMPDIR", &a.work_dir);
    if a.keep_temp {
        std::env::set_var("OUTBOX_RELAY_KEEP_TEMP", "1");
    }
    if let Some(tansu) = &a.tansu {
        std::env::set_var("OUTBOX_RELAY_TANSU", tansu);
    }
    let first = *a.brokers.first().ok_or("--broker names no broker")?;
    say!(
        "starting PostgreSQL ({}) and {first}",
        a.pg_bindir.display()
    );
    let pg = testkit::PgCluster::start_at(&a.pg_bindir, PG_SETTINGS);
    let broker = broker::Broker::start(first)?;
    let scratch = TempDir::new(&a.work_dir, "outbox-bench-run-", a.keep_temp)
        .map_err(|e| format!("create a temp dir: {e}"))?;
    let mut ctx = Ctx {
        pg,
        broker,
        relay_bin,
        self_exe: exe.clone(),
        scratch,
        settings: s.clone(),
        relays_started: Default::default(),
        relay_http_port: Default::default(),
    };

    let mut results = Results {
        meta: Meta {
            started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            command_line: std::env::args().collect::<Vec<_>>().join(" "),
            quick: a.quick,
            cores: resources::cores(),
            load_average_at_start: std::fs::read_to_string("/proc/loadavg")
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
            postgres_version: pg_version(ctx.pg.bindir()),
            postgres_settings: PG_SETTINGS
                .iter()
                .filter(|(k, _)| !k.starts_with("log") && *k != "listen_addresses")
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            broker: a
                .brokers
                .iter()
                .map(|&k| broker::describe(k))
                .collect::<Vec<_>>()
                .join("; "),
            relay_binary: ctx.relay_bin.display().to_string(),
            relay_build_s,
            relay_args: ctx
                .relay_args()
                .into_iter()
                .map(|x| {
                    if x.starts_with("postgres://") || x.starts_with("127.") {
                        "…".into()
                    } else {
                        x
                    }
                })
                .collect(),
            events: s.events,
            payload_bytes: s.payload_bytes,
            backlog_txn_rows: s.backlog_txn_rows.clone(),
            rates: s.rates.clone(),
            warmup_s: s.warmup.as_secs_f64(),
            window_s: s.window.as_secs_f64(),
            slow_poll_window_s: s.slow_poll_window.as_secs_f64(),
            writers: s.writers,
            txn_writers: s.txn_writers,
            txn_rows: s.txn_rows,
            consumer_fetch_wait_ms: s.fetch_wait_ms,
            total_elapsed_s: 0.0,
        },
        ..Results::default()
    };

    let outcome = runtime.block_on(run_scenarios(&mut ctx, &s, &want, &mut results));
    results.meta.total_elapsed_s = began.elapsed().as_secs_f64();
    add_notes(&mut results);
    results.targets = report::targets(&results);

    // Write whatever was measured, even after a failure.
    let json = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?;
    let write = |name: &str, data: &[u8]| {
        std::fs::write(out_dir.join(name), data)
            .map_err(|e| format!("write {}: {e}", out_dir.join(name).display()))
    };
    write("results.json", json.as_bytes())?;
    write("report.md", report::markdown(&results).as_bytes())?;
    if !results.steady.is_empty() {
        plot::draw(&results.steady, &out_dir.join("latency.png"))?;
    }
    if let Err(e) = &outcome {
        say!("failed: {e}");
        for (what, path) in [
            ("PostgreSQL", Some(ctx.pg.log_path())),
            ("tansu", ctx.broker.log_path()),
        ] {
            if let Some(path) = path {
                let text =
                    String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
                eprintln!(
                    "----- last lines of the {what} log -----\n{}",
                    testkit::process::tail(&text, 20)
                );
            }
        }
    }
    drop(ctx);
    outcome?;
    say!(
        "done in {:.0} s: {}/report.md, results.json, latency.png",
        results.meta.total_elapsed_s,
        out_dir.display()
    );
    print!("{}", report::markdown(&results));
    Ok(())
}

async fn run_scenarios(
    ctx: &mut Ctx,
    s: &Settings,
    want: &dyn Fn(&str) -> bool,
    results: &mut Results,
) -> Result<(), String> {
    ctx.broker.warm_up().await?;
    catchup::prepare(ctx).await?;
    for (i, &kind) in s.brokers.iter().enumerate() {
        if ctx.broker.kind() != kind {
            ctx.broker = broker::Broker::start(kind)?;
            ctx.broker.warm_up().await?;
        }
        if want("catchup") {
            for (&source, &rows) in s
                .backlog_sources
                .iter()
                .flat_map(|src| s.backlog_txn_rows.iter().map(move |r| (src, r)))
            {
                let (c, mut relay) = catchup::run(ctx, rows, source).await?;
                results.catch_up.push(c);
                relay.stop(Duration::from_secs(30));
                // Let PostgreSQL settle before what follows: without this the
                // latency windows measured autovacuum of the backlog and the
                // checkpoint of its WAL (the relay's 1-row p99 at 1k/s read
                // 19-23 ms right after catch-up, 7-9 ms on a settled
                // database). The rows were delivered and counted.
                say!("catch-up: truncating the backlog and checkpointing");
                sql(ctx)
                    .await?
                    .batch_execute(&format!("TRUNCATE {RELAY_TABLE}; CHECKPOINT"))
                    .await
                    .map_err(|e| format!("settle after catch-up: {e}"))?;
            }
        }
        // Every window starts on a fresh broker and a fresh process under
        // test, so neither earlier data in tansu nor an earlier window's
        // memory counts.
        if want("steady") {
            for (&source, rows) in s
                .steady_sources
                .iter()
                .flat_map(|src| [1, s.txn_rows].map(move |r| (src, r)))
            {
                for &rate in &s.rates {
                    ctx.fresh_broker().await?;
                    let mut relay = ctx.start_relay().await?;
                    let w =
                        steady::window(ctx, &mut Subject::Relay(&mut relay, source), rows, rate)
                            .await?;
                    // SIGTERM drains and confirms: the next relay starts after this one.
                    relay.stop(Duration::from_secs(30));
                    results.steady.push(w);
                }
            }
        }
        if want("floor") {
            for &rate in &s.rates {
                ctx.fresh_broker().await?;
                let w = steady::window(ctx, &mut Subject::BrokerFloor, 1, rate).await?;
                results.steady.push(w);
            }
        }
        if want("polling") && i == 0 {
            for &interval in &s.poll_intervals {
                for &rows in &s.poll_modes {
                    for &rate in &s.rates {
                        ctx.fresh_broker().await?;
                        let w = steady::window(ctx, &mut Subject::Polling { interval }, rows, rate)
                            .await?;
                        results.steady.push(w);
                    }
                }
            }
        }
    }
    Ok(())
}

fn add_notes(r: &mut Results) {
    let mut notes = Vec::new();
    for w in &r.steady {
        if !w.sustained {
            notes.push(format!(
                "{} at {}/s with {} row(s)/txn: the writers reached only {:.0}/s on this machine \
                 (max {:.0} ms behind schedule); its latency is for that rate, not the target.",
                w.subject, w.target_rate, w.rows_per_txn, w.achieved_rate, w.max_writer_delay_ms
            ));
        }
        if w.missing > 0 {
            notes.push(format!(
                "{} at {}/s with {} row(s)/txn: {} of {} records did not reach the consumer \
                 before the drain timeout.",
                w.subject, w.target_rate, w.rows_per_txn, w.missing, w.rows_total
            ));
        }
    }
    for c in &r.catch_up {
        if c.relay_records_verified.is_some_and(|n| n != c.events) {
            notes.push(format!(
                "catch-up ({}, {}): the relay's topic holds {} records by consuming, \
                 expected {}.",
                c.broker,
                c.shape(),
                c.relay_records_verified.unwrap_or(0),
                c.events
            ));
        }
    }
    notes.push(
        "`@mock` rows and the mock catch-ups ran on librdkafka's mock cluster, hosted in the \
         benchmark's process: it acknowledges at once, so they measure the relay apart from \
         tansu; its CPU is counted in the bench's, not as broker CPU."
            .into(),
    );
    notes.push(
        "The broker is tansu (memory storage), not Apache Kafka: broker-side figures \
         (raw producer, broker CPU, the broker floor) are tansu's. tansu answers a fetch only \
         when fetch.wait.max.ms expires, even when records arrived meanwhile, so the consumer \
         uses 1 ms (Kafka would answer at once); the broker-floor rows show what producer → \
         tansu → consumer costs without any database."
            .into(),
    );
    notes.push(
        "Every steady window runs on a fresh tansu (tansu's CPU per record grows as its memory \
         storage fills) and a fresh relay, polling or producer process: its peak RSS is that \
         process's lifetime peak (start, warm-up, window, drain)."
            .into(),
    );
    r.notes.extend(notes);
}
