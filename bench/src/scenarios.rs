//! What the scenarios share: the running servers, the settings, resource
//! snapshots, and the processes under test (the relay binary, the benchmark's
//! own `poll-relay` and `raw-produce` subcommands).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::{free_port, PgCluster};

use crate::broker::Broker;
use crate::process::{self, Guarded, TempDir};
use crate::resources;
use crate::results::{MachineUsage, Usage};

/// Settings appended to the test kit's postgresql.conf. `fsync = off` (the kit's
/// default too): the benchmark measures the relay, not this machine's disk
/// (commits still flush WAL to the OS, so logical decoding sees them exactly when
/// it would with fsync on).
pub const PG_SETTINGS: &[(&str, &str)] = &[
    ("max_wal_senders", "10"),
    ("max_replication_slots", "10"),
    ("max_connections", "100"),
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("synchronous_commit", "on"),
    ("shared_buffers", "512MB"),
    ("max_wal_size", "8GB"),
    ("checkpoint_timeout", "30min"),
    // The polling baseline reads each row's commit time with pg_xact_commit_timestamp.
    ("track_commit_timestamp", "on"),
    ("log_replication_commands", "off"),
];

/// The outbox table the relay streams, its publication and slots.
pub const RELAY_TABLE: &str = "public.outbox_events";
pub const POLL_TABLE: &str = "public.outbox_poll";
pub const PUBLICATION: &str = "bench_pub";
pub const RELAY_SLOT: &str = "bench_relay";
pub const CEILING_SLOT: &str = "bench_ceiling";

/// Settings of one benchmark run (from the command line).
#[derive(Debug, Clone)]
pub struct Settings {
    pub events: u64,
    pub payload_bytes: usize,
    /// Catch-up backlog shapes: rows per transaction, one catch-up each.
    pub backlog_txn_rows: Vec<usize>,
    /// Catch-up backlog sources (table rows, logical decoding messages).
    pub backlog_sources: Vec<crate::catchup::Source>,
    /// What the relay's steady windows write.
    pub steady_sources: Vec<crate::catchup::Source>,
    /// Brokers to run on, in order (the polling baseline runs on the first).
    pub brokers: Vec<crate::broker::Kind>,
    pub rates: Vec<u64>,
    pub warmup: Duration,
    pub window: Duration,
    pub slow_poll_window: Duration,
    pub writers: usize,
    pub txn_writers: usize,
    pub txn_rows: usize,
    pub poll_intervals: Vec<Duration>,
    pub poll_modes: Vec<usize>,
    pub poll_batch: i64,
    pub fetch_wait_ms: u32,
    /// Record a `perf` profile of the relay during catch-up into this file.
    pub perf_relay: Option<PathBuf>,
    /// Extra librdkafka properties for the relay and the raw producer.
    pub producer_properties: Vec<(String, String)>,
    /// Write every window's (commit, receive) stamps as CSV into this dir.
    pub dump_stamps: Option<PathBuf>,
}

/// The servers and binaries every scenario uses.
pub struct Ctx {
    pub pg: PgCluster,
    pub broker: Broker,
    pub relay_bin: PathBuf,
    pub self_exe: PathBuf,
    /// Logs of the processes under test, summaries of the subcommands.
    pub scratch: TempDir,
    pub settings: Settings,
    /// Relay processes started so far (each logs to its own file).
    pub relays_started: std::cell::Cell<usize>,
    /// HTTP port of the relay started last (its /metrics).
    pub relay_http_port: std::cell::Cell<u16>,
}

/// Everything sampled at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub at: Instant,
    pub subject: Option<resources::ProcSample>,
    pub pg_cpu_s: f64,
    pub broker_cpu_s: f64,
    pub bench_cpu_s: f64,
    pub machine_busy_s: f64,
    pub machine_total_s: f64,
}

impl Ctx {
    pub fn snapshot(&self, subject: Option<u32>) -> Snapshot {
        let (busy, total) = resources::machine_cpu_s();
        Snapshot {
            at: Instant::now(),
            subject: subject.and_then(resources::sample),
            pg_cpu_s: self.pg.pid().map(resources::tree_cpu_s).unwrap_or(0.0),
            broker_cpu_s: self
                .broker
                .pid()
                .and_then(resources::sample)
                .map(|s| s.cpu_s)
                .unwrap_or(0.0),
            bench_cpu_s: resources::self_sample().cpu_s,
            machine_busy_s: busy,
            machine_total_s: total,
        }
    }

    pub fn log_file(&self, name: &str) -> Result<(std::fs::File, std::fs::File), String> {
        let path = self.scratch.path().join(name);
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        let g = f.try_clone().map_err(|e| e.to_string())?;
        Ok((f, g))
    }

    /// The relay's command line (after the binary).
    pub fn relay_args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--postgres-url".into(),
            self.pg.url(),
            "--kafka-brokers".into(),
            self.broker.bootstrap(),
            "--slot".into(),
            RELAY_SLOT.into(),
            "--publication".into(),
            PUBLICATION.into(),
            // Frequent status updates so the catch-up end (slot confirmed past
            // the backlog) is seen within ~0.1 s.
            "--status-interval".into(),
            "100ms".into(),
        ];
        if self.broker.kind() == crate::broker::Kind::Mock {
            // The mock cluster does not answer CreateTopics; the benchmark
            // creates every topic before the relay needs it.
            args.push("--no-create-topics".into());
        }
        for (k, v) in &self.settings.producer_properties {
            args.push("--kafka-property".into());
            args.push(format!("{k}={v}"));
        }
        args
    }

    /// Starts the relay binary under test (log in the scratch dir).
    pub fn spawn_relay(&self) -> Result<Guarded, String> {
        self.relays_started.set(self.relays_started.get() + 1);
        let (out, err) = self.log_file(&self.relay_log_name())?;
        let http = free_port();
        self.relay_http_port.set(http);
        let mut cmd = Command::new(&self.relay_bin);
        cmd.args(self.relay_args())
            .env_remove("OUTBOX_RELAY_CONFIG")
            // Its metrics listener on a free port (the default 9187 may be taken).
            .env("OUTBOX_RELAY_HTTP_LISTEN", format!("127.0.0.1:{http}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        process::spawn("outbox-relay", &mut cmd, libc::SIGTERM)
            .map_err(|e| format!("spawn {}: {e}", self.relay_bin.display()))
    }

    fn relay_log_name(&self) -> String {
        format!("relay-{}.log", self.relays_started.get())
    }

    /// The log of the relay started last.
    pub fn relay_log(&self) -> String {
        String::from_utf8_lossy(
            &std::fs::read(self.scratch.path().join(self.relay_log_name())).unwrap_or_default(),
        )
        .into_owned()
    }

    /// Runs one of the benchmark's own subcommands as a child process.
    /// The raw producer (`outbox-bench raw-produce ARGS`), with the run's
    /// `--producer-property` settings, as the relay gets them.
    pub fn spawn_raw_producer(&self, mut args: Vec<String>) -> Result<Guarded, String> {
        for (k, v) in &self.settings.producer_properties {
            args.push("--property".into());
            args.push(format!("{k}={v}"));
        }
        self.spawn_self("raw-produce", &args)
    }

    pub fn spawn_self(&self, name: &str, args: &[String]) -> Result<Guarded, String> {
        let (out, err) = self.log_file(&format!("{name}.log"))?;
        let mut cmd = Command::new(&self.self_exe);
        cmd.arg(name)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        process::spawn(name, &mut cmd, libc::SIGTERM)
            .map_err(|e| format!("spawn {} {name}: {e}", self.self_exe.display()))
    }

    /// Replaces the broker with a fresh one (new process, empty memory
    /// storage) and warms it up. tansu slows down as its memory storage fills
    /// (its CPU per record grows), so every measurement starts on an empty one.
    pub async fn fresh_broker(&mut self) -> Result<(), String> {
        let new = Broker::start(self.broker.kind())?;
        drop(std::mem::replace(&mut self.broker, new));
        self.broker.warm_up().await
    }

    /// Starts the relay and waits for it to stream.
    pub async fn start_relay(&self) -> Result<Guarded, String> {
        let mut relay = self.spawn_relay()?;
        if wait_log(self, &mut relay, "streaming", Duration::from_secs(60))
            .await
            .is_none()
        {
            return Err(format!(
                "the relay did not start streaming:\n{}",
                crate::catchup::tail_str(&self.relay_log(), 30)
            ));
        }
        Ok(relay)
    }

    pub fn scratch_path(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }
}

/// The figures between two snapshots.
pub struct Between {
    pub wall_s: f64,
    pub subject_cpu_s: f64,
    pub pg_cpu_s: f64,
    pub broker_cpu_s: f64,
    pub bench_cpu_s: f64,
    pub machine: MachineUsage,
}

pub fn between(a: &Snapshot, b: &Snapshot) -> Between {
    let subject_cpu_s = match (&a.subject, &b.subject) {
        (Some(x), Some(y)) => y.cpu_s - x.cpu_s,
        (None, Some(y)) => y.cpu_s,
        _ => 0.0,
    };
    let pg = b.pg_cpu_s - a.pg_cpu_s;
    let broker = b.broker_cpu_s - a.broker_cpu_s;
    let bench = b.bench_cpu_s - a.bench_cpu_s;
    let busy = b.machine_busy_s - a.machine_busy_s;
    let total = b.machine_total_s - a.machine_total_s;
    Between {
        wall_s: b.at.duration_since(a.at).as_secs_f64(),
        subject_cpu_s,
        pg_cpu_s: pg,
        broker_cpu_s: broker,
        bench_cpu_s: bench,
        machine: MachineUsage {
            busy_pct: if total > 0.0 {
                100.0 * busy / total
            } else {
                0.0
            },
            others_cpu_s: (busy - subject_cpu_s - pg - broker - bench).max(0.0),
        },
    }
}

impl Between {
    pub fn usages(&self, events: u64, subject_hwm_kb: Option<u64>) -> (Usage, Usage, Usage, Usage) {
        (
            Usage::new(self.subject_cpu_s, self.wall_s, events, subject_hwm_kb),
            Usage::new(self.pg_cpu_s, self.wall_s, events, None),
            Usage::new(self.broker_cpu_s, self.wall_s, events, None),
            Usage::new(self.bench_cpu_s, self.wall_s, events, None),
        )
    }
}

/// A SQL client, or an error string.
pub async fn sql(ctx: &Ctx) -> Result<tokio_postgres::Client, String> {
    ctx.pg
        .try_client()
        .await
        .map_err(|e| format!("connect to {}: {e}", ctx.pg.url()))
}

/// `confirmed_flush_lsn` of a slot as a number.
pub async fn slot_confirmed(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<u64>, String> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| format!("read slot {slot}: {e}"))?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|t| parse_lsn(&t)))
}

pub async fn current_lsn(client: &tokio_postgres::Client) -> Result<u64, String> {
    let t: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| format!("pg_current_wal_lsn: {e}"))?
        .get(0);
    parse_lsn(&t).ok_or_else(|| format!("bad LSN {t}"))
}

/// Waits for the relay to log `needle`; `None` after `timeout` or if it exited.
pub async fn wait_log(
    ctx: &Ctx,
    relay: &mut Guarded,
    needle: &str,
    timeout: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if ctx.relay_log().contains(needle) {
            return Some(Instant::now());
        }
        if relay.try_status().is_some() || Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Cumulative buckets (upper bound in seconds, count) of one histogram series.
pub type Buckets = Vec<(f64, f64)>;

/// The relay's latency histograms from its /metrics: commit → broker
/// acknowledgement (`""`), and its stages (`server`, `relay`, `broker`).
pub fn relay_histograms(port: u16) -> Result<Vec<(String, Buckets)>, String> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let body = ureq::get(&url)
        .timeout(Duration::from_secs(5))
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?
        .into_string()
        .map_err(|e| format!("read {url}: {e}"))?;
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| format!("parse {url}: {e}"))?;
    use outbox_relay::metrics::names::{END_TO_END_LATENCY_SECONDS, STAGE_LATENCY_SECONDS};
    let out: Vec<(String, Buckets)> = scrape
        .samples
        .iter()
        .filter_map(|s| match &s.value {
            prometheus_parse::Value::Histogram(h)
                if s.metric == END_TO_END_LATENCY_SECONDS || s.metric == STAGE_LATENCY_SECONDS =>
            {
                let key = s.labels.get("stage").unwrap_or("").to_string();
                Some((key, h.iter().map(|b| (b.less_than, b.count)).collect()))
            }
            _ => None,
        })
        .collect();
    if !out.iter().any(|(k, _)| k.is_empty()) {
        return Err(format!(
            "{url} has no {END_TO_END_LATENCY_SECONDS} histogram"
        ));
    }
    Ok(out)
}

/// `0/16B3748` → its position.
pub fn parse_lsn(lsn: &str) -> Option<u64> {
    let (hi, lo) = lsn.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}
