//! The load and the measuring end: writers that insert outbox rows at a fixed
//! rate, and a consumer that stamps each record's arrival.
//!
//! Writers follow an open-loop schedule: transaction `k` is due at
//! `t0 + k · rows_per_txn / rate`, taken by whichever writer is free, so a
//! slow transaction delays the next ones of that writer only, and a schedule
//! the writers cannot keep shows up as an achieved rate below the target
//! (reported, never hidden).
//!
//! Latency is `consumer receive time − commit time`, both from this machine's
//! wall clock: the commit time from the record header `outbox-relay-commit-time`
//! (PostgreSQL's commit timestamp), the receive time when `poll` hands the
//! record to the consumer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};

/// The header both relays put the commit time in.
pub const COMMIT_TIME_HEADER: &str = "outbox-relay-commit-time";

/// The outbox table (sql/01_outbox_table.sql), under any name.
pub fn create_table_sql(table: &str) -> String {
    let idx = table.replace('.', "_");
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
            aggregatetype text        NOT NULL,
            aggregateid   text        NOT NULL,
            type          text        NOT NULL,
            payload       jsonb       NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX IF NOT EXISTS {idx}_created_at_idx ON {table} (created_at);"
    )
}

/// The `pad` string that makes a row's payload (`{"pad": "…", "seq": N}` as
/// jsonb renders it) about `payload_bytes` long.
pub fn pad(payload_bytes: usize) -> String {
    "x".repeat(payload_bytes.saturating_sub(30).max(1))
}

/// What the writers are asked to do.
#[derive(Debug, Clone)]
pub struct WriterPlan {
    /// Write each event as a transactional logical decoding message with
    /// prefix `outbox` (the JSON `outbox_emit` builds), not as a table row.
    pub messages: bool,
    pub table: String,
    pub aggregatetype: String,
    /// Events (rows) per second.
    pub rate: f64,
    pub rows_per_txn: usize,
    pub writers: usize,
    pub payload_bytes: usize,
    pub warmup: Duration,
    pub measure: Duration,
}

/// What the writers did.
#[derive(Debug, Clone)]
pub struct WriterOutcome {
    /// Rows committed in all (what the consumer must eventually see).
    pub rows_total: u64,
    /// Rows committed inside the measurement window.
    pub rows_in_window: u64,
    /// `rows_in_window / measure`.
    pub achieved_rate: f64,
    /// The largest delay of a commit behind its schedule, in ms.
    pub max_behind_ms: f64,
    /// The measurement window, on the wall clock (µs since the Unix epoch).
    pub window_start_us: i64,
    pub window_end_us: i64,
}

pub fn unix_micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

pub fn now_micros() -> i64 {
    unix_micros(SystemTime::now())
}

/// Runs the plan to its end. `on_window_start` is called when the measurement
/// window opens (to sample resources).
pub async fn run_writers(
    url: &str,
    plan: &WriterPlan,
    on_window_start: impl FnOnce(),
) -> Result<WriterOutcome, String> {
    let mut clients = Vec::new();
    for _ in 0..plan.writers.max(1) {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("writer connect: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        clients.push(client);
    }
    let sql = if plan.messages {
        // $3 (1 per transaction) or $4 is the pad, as for rows.
        let (n, pad) = if plan.rows_per_txn == 1 {
            ("1", "$3")
        } else {
            ("$3::int4", "$4")
        };
        format!(
            "SELECT count(pg_logical_emit_message(true, 'outbox', jsonb_build_object( \
               'aggregatetype', $1::text, 'aggregateid', (($2::int8 + g) % 1000)::text, \
               'type', 'BenchEvent', \
               'payload', jsonb_build_object('seq', $2::int8 + g, 'pad', {pad}::text))::text)) \
             FROM generate_series(0, {n} - 1) AS g"
        )
    } else if plan.rows_per_txn == 1 {
        format!(
            "INSERT INTO {} (aggregatetype, aggregateid, type, payload) \
             VALUES ($1, ($2::int8 % 1000)::text, 'BenchEvent', \
                     jsonb_build_object('seq', $2::int8, 'pad', $3::text))",
            plan.table
        )
    } else {
        format!(
            "INSERT INTO {} (aggregatetype, aggregateid, type, payload) \
             SELECT $1, (($2::int8 + g) % 1000)::text, 'BenchEvent', \
                    jsonb_build_object('seq', $2::int8 + g, 'pad', $4::text) \
             FROM generate_series(0, $3::int4 - 1) AS g",
            plan.table
        )
    };
    let rows = plan.rows_per_txn.max(1);
    let period = Duration::from_secs_f64(rows as f64 / plan.rate);
    let pad = Arc::new(pad(plan.payload_bytes));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(50);
    let start_wall = SystemTime::now() + Duration::from_millis(50);
    let window_start = start + plan.warmup;
    let end = window_start + plan.measure;

    let mut tasks = Vec::new();
    for client in clients {
        let stmt = client
            .prepare(&sql)
            .await
            .map_err(|e| format!("prepare the insert: {e}"))?;
        let next = next.clone();
        let pad = pad.clone();
        let aggregatetype = plan.aggregatetype.clone();
        tasks.push(tokio::spawn(async move {
            let (mut total, mut in_window, mut behind) = (0u64, 0u64, Duration::ZERO);
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let due = start + period.mul_f64(k as f64);
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                if Instant::now() >= end {
                    break;
                }
                let seq = (k * rows as u64) as i64;
                let result = if rows == 1 {
                    client
                        .execute(&stmt, &[&aggregatetype, &seq, &pad.as_str()])
                        .await
                } else {
                    client
                        .execute(
                            &stmt,
                            &[&aggregatetype, &seq, &(rows as i32), &pad.as_str()],
                        )
                        .await
                };
                result.map_err(|e| format!("insert: {e}"))?;
                let done = Instant::now();
                total += rows as u64;
                if done >= window_start && done < end {
                    in_window += rows as u64;
                }
                behind = behind.max(done.saturating_duration_since(due));
            }
            Ok::<_, String>((total, in_window, behind))
        }));
    }
    tokio::time::sleep_until(window_start.into()).await;
    on_window_start();
    let mut outcome = WriterOutcome {
        rows_total: 0,
        rows_in_window: 0,
        achieved_rate: 0.0,
        max_behind_ms: 0.0,
        window_start_us: unix_micros(start_wall + plan.warmup),
        window_end_us: unix_micros(start_wall + plan.warmup + plan.measure),
    };
    for t in tasks {
        let (total, in_window, behind) = t.await.map_err(|e| format!("writer task: {e}"))??;
        outcome.rows_total += total;
        outcome.rows_in_window += in_window;
        outcome.max_behind_ms = outcome.max_behind_ms.max(behind.as_secs_f64() * 1e3);
    }
    outcome.achieved_rate = outcome.rows_in_window as f64 / plan.measure.as_secs_f64();
    Ok(outcome)
}

/// One record as the consumer saw it: commit time and receive time, µs since
/// the Unix epoch.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    pub commit_us: i64,
    pub recv_us: i64,
}

/// A consumer thread reading one topic from the beginning, stamping records.
pub struct LatencyConsumer {
    handle: Option<JoinHandle<Result<Vec<Stamp>, String>>>,
    received: Arc<AtomicU64>,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    target: Arc<AtomicU64>,
}

/// Consumer settings: fetch long-poll bounded by `fetch_wait_ms`.
pub fn consumer_config(bootstrap: &str, fetch_wait_ms: u32) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap)
        .set("group.id", format!("outbox-bench-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_uncommitted")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("fetch.min.bytes", "1")
        .set("enable.partition.eof", "false");
    cfg
}

impl LatencyConsumer {
    pub fn start(bootstrap: &str, topic: &str, fetch_wait_ms: u32) -> Result<Self, String> {
        let consumer: BaseConsumer = consumer_config(bootstrap, fetch_wait_ms)
            .create()
            .map_err(|e| format!("create a consumer: {e}"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let received = Arc::new(AtomicU64::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(AtomicU64::new(u64::MAX));
        let (r, rd, st, tg) = (
            received.clone(),
            ready.clone(),
            stop.clone(),
            target.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("bench-consumer".into())
            .spawn(move || {
                let mut out = Vec::with_capacity(1 << 16);
                let mut bad_header = 0u64;
                while !st.load(Ordering::Relaxed)
                    && r.load(Ordering::Relaxed) < tg.load(Ordering::Relaxed)
                {
                    let msg = consumer.poll(Duration::from_millis(20));
                    rd.store(true, Ordering::Relaxed);
                    let Some(msg) = msg else { continue };
                    let Ok(m) = msg else { continue };
                    let recv_us = now_micros();
                    let commit_us = m
                        .headers()
                        .and_then(|hs| {
                            hs.iter()
                                .find(|h| h.key == COMMIT_TIME_HEADER)
                                .and_then(|h| h.value)
                        })
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|s| humantime::parse_rfc3339(s).ok())
                        .map(unix_micros);
                    match commit_us {
                        Some(commit_us) => out.push(Stamp { commit_us, recv_us }),
                        None => bad_header += 1,
                    }
                    r.fetch_add(1, Ordering::Relaxed);
                }
                if bad_header > 0 {
                    return Err(format!(
                        "{bad_header} records without a readable {COMMIT_TIME_HEADER} header"
                    ));
                }
                Ok(out)
            })
            .map_err(|e| format!("spawn the consumer thread: {e}"))?;
        Ok(LatencyConsumer {
            handle: Some(handle),
            received,
            ready,
            stop,
            target,
        })
    }

    /// Waits until the consumer has polled once (its fetcher is running).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ready.load(Ordering::Relaxed) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Let the first fetch reach the broker.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits until `expected` records arrived or `timeout` passed; returns the stamps.
    pub async fn finish(mut self, expected: u64, timeout: Duration) -> Result<Vec<Stamp>, String> {
        self.target.store(expected, Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        while self.received() < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("joined once");
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "the consumer thread panicked".to_string())?
    }
}

impl Drop for LatencyConsumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Counts the records of `topic` by consuming it (tansu's watermarks are not
/// trusted), until `expected` or `timeout`.
pub fn count_records(bootstrap: &str, topic: &str, expected: u64, timeout: Duration) -> u64 {
    let Ok(consumer) = consumer_config(bootstrap, 100).create::<BaseConsumer>() else {
        return 0;
    };
    let mut tpl = TopicPartitionList::new();
    if tpl
        .add_partition_offset(topic, 0, Offset::Beginning)
        .is_err()
        || consumer.assign(&tpl).is_err()
    {
        return 0;
    }
    let deadline = Instant::now() + timeout;
    let mut n = 0;
    while n < expected && Instant::now() < deadline {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            n += 1;
        }
    }
    n
}

/// Latency figures over the stamps whose commit time lies in the window.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

pub fn latency(stamps: &[Stamp], window_start_us: i64, window_end_us: i64) -> Latency {
    let mut v: Vec<i64> = stamps
        .iter()
        .filter(|s| s.commit_us >= window_start_us && s.commit_us < window_end_us)
        .map(|s| s.recv_us - s.commit_us)
        .collect();
    if v.is_empty() {
        return Latency::default();
    }
    v.sort_unstable();
    let q = |p: f64| {
        let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1] as f64 / 1e3
    };
    Latency {
        samples: v.len(),
        p50_ms: q(0.50),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        max_ms: *v.last().expect("non-empty") as f64 / 1e3,
        mean_ms: v.iter().sum::<i64>() as f64 / v.len() as f64 / 1e3,
    }
}
