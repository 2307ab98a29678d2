//! Prometheus metrics, readiness, and the periodic progress line.
//!
//! All metric names live in [`names`], each documented with what it means and
//! what to alert on. [`Metrics`] is a cheap clonable handle (an `Arc`) around a
//! `prometheus-client` registry; the relay loop calls its methods, the HTTP
//! listener calls [`Metrics::encode`] and [`Metrics::readiness`].
//!
//! Hot path: [`Metrics::record_produced`] and [`Metrics::record_acked`] never
//! allocate once a topic's label exists. Per-topic counters are cached by
//! topic name in a map that only the relay task touches (its mutex is never
//! contended: scrapes read the registry's own atomics, not the map). The
//! latency histogram takes `prometheus-client`'s per-histogram lock, held for
//! a bucket search.
//!
//! Label cardinality is bounded: the first [`MetricsOptions::max_topic_labels`]
//! distinct topics get their own `topic` label value, later ones are counted
//! under `topic="_other"`; the same holds for delivery error classes.
//!
//! Values computed at scrape time: `outbox_relay_lag_seconds` and
//! `outbox_relay_ready`.

mod readiness;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::lsn::{pg_micros_to_system_time, Lsn};

pub use readiness::{Readiness, DEFAULT_STALL_TIMEOUT};

/// Metric names as they appear in a scrape (counters with their `_total`
/// suffix; histograms without `_bucket`/`_sum`/`_count`). Dashboards and
/// alert rules in `deploy/` use exactly these (a unit test checks it).
pub mod names {
    /// Gauge. Highest WAL position received from the walsender (XLogData or
    /// keepalive), as a number. Alert: not by itself; compare with the others.
    pub const RECEIVED_LSN: &str = "outbox_relay_received_lsn";
    /// Gauge. Commit LSN of the newest transaction whose records were all
    /// handed to the Kafka producer.
    pub const SENT_LSN: &str = "outbox_relay_sent_lsn";
    /// Gauge. End LSN of the newest transaction whose records the broker all
    /// acknowledged (the ack tracker's head).
    pub const ACKNOWLEDGED_LSN: &str = "outbox_relay_acknowledged_lsn";
    /// Gauge. Flush LSN last sent to PostgreSQL in a status update: the slot
    /// moves to it. Alert: when it stops increasing while the server's WAL
    /// grows (see `outbox_relay_ready`).
    pub const CONFIRMED_LSN: &str = "outbox_relay_confirmed_lsn";
    /// Gauge. Server WAL position at the last lag sample
    /// (`pg_current_wal_lsn()`, or the replay position on a standby).
    pub const SERVER_WAL_LSN: &str = "outbox_relay_server_wal_lsn";
    /// Gauge. Server WAL position minus the slot's `confirmed_flush_lsn`,
    /// sampled over SQL. Alert: growing for many minutes.
    pub const SLOT_LAG_BYTES: &str = "outbox_relay_slot_lag_bytes";
    /// Gauge. WAL the slot keeps on the server's disk (server WAL position
    /// minus `restart_lsn`). Alert: above a fraction of the WAL volume's free
    /// space (example rule: 10 GiB).
    pub const SLOT_RETAINED_WAL_BYTES: &str = "outbox_relay_slot_retained_wal_bytes";
    /// Gauge. `safe_wal_size` of the slot: bytes of WAL that can still be
    /// written before the slot risks invalidation by `max_slot_wal_keep_size`;
    /// -1 when unlimited. Alert: `>= 0` and below a few GiB.
    pub const SLOT_SAFE_WAL_SIZE_BYTES: &str = "outbox_relay_slot_safe_wal_size_bytes";
    /// Gauge, label `status` (`reserved`, `extended`, `unreserved`, `lost`,
    /// `unknown`): 1 for the slot's current `wal_status`, 0 for the others.
    /// Alert: `unreserved` (WAL about to be removed) or `lost` (invalidated).
    pub const SLOT_WAL_STATUS: &str = "outbox_relay_slot_wal_status";
    /// Gauge. 1 while this relay's replication session holds the slot.
    /// Alert: 0 for minutes while the relay runs (another consumer took it).
    pub const SLOT_HELD: &str = "outbox_relay_slot_held";
    /// Gauge. 1 while the replication stream is up.
    pub const STREAMING: &str = "outbox_relay_streaming";
    /// Gauge, computed at scrape: 1 when `/readyz` answers 200.
    /// Alert: 0 for 5 minutes.
    pub const READY: &str = "outbox_relay_ready";
    /// Gauge, computed at scrape: how far behind real time the relay is, in
    /// seconds: now minus the later of the newest confirmed commit time and
    /// the last moment nothing was in flight; 0 while streaming with nothing
    /// in flight. Grows while the stream is down or stuck. Alert: above 60 s
    /// for 5 minutes.
    pub const LAG_SECONDS: &str = "outbox_relay_lag_seconds";
    /// Gauge. Commit time (Unix seconds) of the newest transaction whose
    /// position was confirmed to PostgreSQL.
    pub const CONFIRMED_COMMIT_TIMESTAMP_SECONDS: &str =
        "outbox_relay_confirmed_commit_timestamp_seconds";
    /// Histogram. Seconds from a row's commit in PostgreSQL to the broker's
    /// acknowledgement of its record (0.5 ms … 60 s buckets). Its `_count` is
    /// the number of acknowledged records. Alert: p99 above your SLO.
    pub const END_TO_END_LATENCY_SECONDS: &str = "outbox_relay_end_to_end_latency_seconds";
    /// Counter, label `topic` (bounded). Records handed to the producer.
    pub const PRODUCED_RECORDS_TOTAL: &str = "outbox_relay_produced_records_total";
    /// Counter, label `topic` (bounded). Bytes (key + value + headers) of
    /// records handed to the producer.
    pub const PRODUCED_BYTES_TOTAL: &str = "outbox_relay_produced_bytes_total";
    /// Counter, label `class` (bounded). Records the broker did not
    /// acknowledge, by error class (e.g. `msg_timed_out`). Each one makes the
    /// relay resume from the slot. Alert: any increase.
    pub const DELIVERY_ERRORS_TOTAL: &str = "outbox_relay_delivery_errors_total";
    /// Counter, label `topic` (bounded). Rows that could not become a record
    /// and went to the dead-letter topic. Alert: any increase.
    pub const DEAD_LETTERED_RECORDS_TOTAL: &str = "outbox_relay_dead_lettered_records_total";
    /// Gauge. Records handed to the producer and not yet acknowledged.
    /// At the window limit means back-pressure from Kafka.
    pub const IN_FLIGHT_RECORDS: &str = "outbox_relay_in_flight_records";
    /// Gauge. Bytes of the in-flight records.
    pub const IN_FLIGHT_BYTES: &str = "outbox_relay_in_flight_bytes";
    /// Counter. Replication sessions resumed from the slot after an error.
    /// Alert: a sustained rate (a reconnect loop).
    pub const RECONNECTS_TOTAL: &str = "outbox_relay_reconnects_total";
    /// Counter. Kafka producers rebuilt after a fatal producer error.
    pub const PRODUCER_REBUILDS_TOTAL: &str = "outbox_relay_producer_rebuilds_total";
    /// Counter. Status updates (flush LSN) sent to PostgreSQL.
    /// Alert: rate 0 while streaming (walsender timeout ahead).
    pub const STATUS_UPDATES_TOTAL: &str = "outbox_relay_status_updates_total";
    /// Gauge, label `version`: always 1. Its absence means the relay is not
    /// scraped.
    pub const BUILD_INFO: &str = "outbox_relay_build_info";

    /// Every name above.
    pub const ALL: &[&str] = &[
        RECEIVED_LSN,
        SENT_LSN,
        ACKNOWLEDGED_LSN,
        CONFIRMED_LSN,
        SERVER_WAL_LSN,
        SLOT_LAG_BYTES,
        SLOT_RETAINED_WAL_BYTES,
        SLOT_SAFE_WAL_SIZE_BYTES,
        SLOT_WAL_STATUS,
        SLOT_HELD,
        STREAMING,
        READY,
        LAG_SECONDS,
        CONFIRMED_COMMIT_TIMESTAMP_SECONDS,
        END_TO_END_LATENCY_SECONDS,
        PRODUCED_RECORDS_TOTAL,
        PRODUCED_BYTES_TOTAL,
        DELIVERY_ERRORS_TOTAL,
        DEAD_LETTERED_RECORDS_TOTAL,
        IN_FLIGHT_RECORDS,
        IN_FLIGHT_BYTES,
        RECONNECTS_TOTAL,
        PRODUCER_REBUILDS_TOTAL,
        STATUS_UPDATES_TOTAL,
        BUILD_INFO,
    ];

    /// Histograms among [`ALL`]: a scrape shows them as `_bucket`, `_sum`
    /// and `_count` series.
    pub const HISTOGRAMS: &[&str] = &[END_TO_END_LATENCY_SECONDS];
}

/// The `Content-Type` of [`Metrics::encode`]'s output (OpenMetrics text, which
/// Prometheus negotiates and parses).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the end-to-end latency buckets: 0.5 ms … 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Label value for topics (and error classes) past the cardinality bound.
pub const OTHER_LABEL: &str = "_other";

/// The `wal_status` values PostgreSQL reports, plus `unknown` for anything
/// else (no slot, a future value).
pub const WAL_STATUSES: &[&str] = &["reserved", "extended", "unreserved", "lost", "unknown"];

/// Knobs of [`Metrics`].
#[derive(Debug, Clone)]
pub struct MetricsOptions {
    /// Distinct topics with their own label value; later ones count as `_other`.
    pub max_topic_labels: usize,
    /// Distinct delivery error classes with their own label value.
    pub max_error_class_labels: usize,
    /// See [`Readiness`].
    pub stall_timeout: Duration,
}

impl Default for MetricsOptions {
    fn default() -> Self {
        MetricsOptions {
            max_topic_labels: 100,
            max_error_class_labels: 32,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabel {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// The counters of one topic label value.
#[derive(Clone, Debug)]
struct TopicCounters {
    records: Counter,
    bytes: Counter,
    dead_lettered: Counter,
}

/// Handles by label value, at most `limit` of them, then one shared overflow
/// handle. Lookups by `&str` do not allocate.
#[derive(Debug)]
struct BoundedLabels<H> {
    limit: usize,
    by_value: HashMap<Box<str>, H>,
    other: Option<H>,
}

impl<H> BoundedLabels<H> {
    fn new(limit: usize) -> Self {
        BoundedLabels {
            limit,
            by_value: HashMap::new(),
            other: None,
        }
    }

    /// Runs `f` on the handle of `value`, creating it with `make` (given the
    /// label value to use) the first time.
    fn with<R>(&mut self, value: &str, make: impl FnOnce(&str) -> H, f: impl FnOnce(&H) -> R) -> R {
        if let Some(h) = self.by_value.get(value) {
            return f(h);
        }
        if self.by_value.len() < self.limit {
            let h = make(value);
            let r = f(&h);
            self.by_value.insert(value.into(), h);
            return r;
        }
        f(self.other.get_or_insert_with(|| make(OTHER_LABEL)))
    }
}

/// State behind one lock: readiness and the inputs of the time lag.
#[derive(Debug)]
struct Progress {
    readiness: Readiness,
    /// Newest confirmed commit time (µs since 2000-01-01).
    newest_confirmed_commit: Option<i64>,
    /// Last moment the relay was streaming with nothing in flight.
    caught_up_at: Option<SystemTime>,
}

impl Progress {
    fn caught_up(&self) -> bool {
        self.readiness.is_streaming() && self.readiness.in_flight_records() == 0
    }

    fn note_if_caught_up(&mut self, now: SystemTime) {
        if self.caught_up() {
            self.caught_up_at = Some(now);
        }
    }
}

struct Inner {
    registry: Registry,
    received_lsn: Gauge,
    sent_lsn: Gauge,
    acked_lsn: Gauge,
    confirmed_lsn: Gauge,
    server_wal_lsn: Gauge,
    slot_lag_bytes: Gauge,
    slot_retained_bytes: Gauge,
    slot_safe_wal_size: Gauge,
    slot_wal_status: [Gauge; WAL_STATUSES.len()],
    slot_held: Gauge,
    streaming: Gauge,
    ready: Gauge,
    lag_seconds: Gauge<f64, AtomicU64>,
    confirmed_commit_ts: Gauge<f64, AtomicU64>,
    latency: Histogram,
    produced_records: Family<TopicLabel, Counter>,
    produced_bytes: Family<TopicLabel, Counter>,
    dead_lettered: Family<TopicLabel, Counter>,
    delivery_errors: Family<ClassLabel, Counter>,
    in_flight_records: Gauge,
    in_flight_bytes: Gauge,
    reconnects: Counter,
    producer_rebuilds: Counter,
    status_updates: Counter,
    topics: Mutex<BoundedLabels<TopicCounters>>,
    classes: Mutex<BoundedLabels<Counter>>,
    progress: Mutex<Progress>,
    /// Records acknowledged, for the progress line.
    acked_records: AtomicU64,
    /// Last lag sample, for the progress line (-1: none yet).
    last_lag_bytes: AtomicI64,
}

/// The relay's metrics; clone freely (one `Arc`).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Registers `metric` under `name`; counters lose the `_total` suffix here
/// because the encoder appends it.
fn register(registry: &mut Registry, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
    registry.register(name, help, metric);
}

fn register_counter(registry: &mut Registry, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
    let base = name
        .strip_suffix("_total")
        .expect("counter names in `names` end with _total");
    registry.register(base, help, metric);
}

fn lsn_value(lsn: Lsn) -> i64 {
    i64::try_from(lsn.0).unwrap_or(i64::MAX)
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Time lag (see [`names::LAG_SECONDS`]): 0 when caught up; otherwise now
/// minus the later of the newest confirmed commit and the last caught-up
/// moment; 0 when neither is known yet.
pub fn time_lag(
    now: SystemTime,
    caught_up: bool,
    newest_confirmed_commit: Option<SystemTime>,
    caught_up_at: Option<SystemTime>,
) -> Duration {
    if caught_up {
        return Duration::ZERO;
    }
    let reference = match (newest_confirmed_commit, caught_up_at) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => match a.or(b) {
            Some(t) => t,
            None => return Duration::ZERO,
        },
    };
    now.duration_since(reference).unwrap_or(Duration::ZERO)
}

/// End-to-end latency of a record: `now` minus its transaction's commit time
/// (µs since 2000-01-01, as in pgoutput's Begin); zero if the clocks disagree.
pub fn latency_since_commit(commit_time_pg_micros: i64, now: SystemTime) -> Duration {
    now.duration_since(pg_micros_to_system_time(commit_time_pg_micros))
        .unwrap_or(Duration::ZERO)
}

impl Metrics {
    /// Metrics with default options (100 topic labels, 30 s stall timeout).
    pub fn new() -> Self {
        Metrics::with_options(MetricsOptions::default())
    }

    pub fn with_options(options: MetricsOptions) -> Self {
        use names::*;
        let mut r = Registry::default();
        let g = Gauge::<i64>::default;

        let received_lsn = g();
        register(&mut r, RECEIVED_LSN, "Highest WAL position received from PostgreSQL", received_lsn.clone());
        let sent_lsn = g();
        register(&mut r, SENT_LSN, "Commit LSN of the newest transaction whose records were all handed to the Kafka producer", sent_lsn.clone());
        let acked_lsn = g();
        register(&mut r, ACKNOWLEDGED_LSN, "End LSN of the newest transaction whose records Kafka all acknowledged", acked_lsn.clone());
        let confirmed_lsn = g();
        register(&mut r, CONFIRMED_LSN, "Flush LSN last confirmed to PostgreSQL in a status update", confirmed_lsn.clone());
        let server_wal_lsn = g();
        register(&mut r, SERVER_WAL_LSN, "Server WAL position at the last lag sample", server_wal_lsn.clone());
        let slot_lag_bytes = g();
        register(&mut r, SLOT_LAG_BYTES, "Server WAL position minus the slot's confirmed_flush_lsn, in bytes", slot_lag_bytes.clone());
        let slot_retained_bytes = g();
        register(&mut r, SLOT_RETAINED_WAL_BYTES, "WAL retained on the server by the slot (server WAL position minus restart_lsn), in bytes", slot_retained_bytes.clone());
        let slot_safe_wal_size = g();
        slot_safe_wal_size.set(-1);
        register(&mut r, SLOT_SAFE_WAL_SIZE_BYTES, "WAL that can still be written before the slot risks invalidation (safe_wal_size); -1 when unlimited", slot_safe_wal_size.clone());
        let status_family = Family::<StatusLabel, Gauge>::default();
        let slot_wal_status: [Gauge; WAL_STATUSES.len()] = std::array::from_fn(|i| {
            status_family
                .get_or_create(&StatusLabel { status: WAL_STATUSES[i] })
                .clone()
        });
        slot_wal_status[WAL_STATUSES.len() - 1].set(1);
        register(&mut r, SLOT_WAL_STATUS, "1 for the slot's current wal_status, 0 for the others", status_family);
        let slot_held = g();
        register(&mut r, SLOT_HELD, "1 while this relay holds the replication slot", slot_held.clone());
        let streaming = g();
        register(&mut r, STREAMING, "1 while the replication stream is up", streaming.clone());
        let ready = g();
        register(&mut r, READY, "1 when the relay is ready (streaming and acknowledgements progressing)", ready.clone());
        let lag_seconds = Gauge::<f64, AtomicU64>::default();
        register(&mut r, LAG_SECONDS, "Seconds the relay is behind: now minus the newest confirmed commit time; 0 when caught up", lag_seconds.clone());
        let confirmed_commit_ts = Gauge::<f64, AtomicU64>::default();
        register(&mut r, CONFIRMED_COMMIT_TIMESTAMP_SECONDS, "Commit time (Unix seconds) of the newest transaction confirmed to PostgreSQL", confirmed_commit_ts.clone());
        let latency = Histogram::new(LATENCY_BUCKETS.iter().copied());
        register(&mut r, END_TO_END_LATENCY_SECONDS, "Seconds from a row's commit in PostgreSQL to the broker's acknowledgement of its record", latency.clone());
        let produced_records = Family::<TopicLabel, Counter>::default();
        register_counter(&mut r, PRODUCED_RECORDS_TOTAL, "Records handed to the Kafka producer, by topic", produced_records.clone());
        let produced_bytes = Family::<TopicLabel, Counter>::default();
        register_counter(&mut r, PRODUCED_BYTES_TOTAL, "Bytes of records handed to the Kafka producer, by topic", produced_bytes.clone());
        let delivery_errors = Family::<ClassLabel, Counter>::default();
        register_counter(&mut r, DELIVERY_ERRORS_TOTAL, "Records Kafka did not acknowledge, by error class", delivery_errors.clone());
        let dead_lettered = Family::<TopicLabel, Counter>::default();
        register_counter(&mut r, DEAD_LETTERED_RECORDS_TOTAL, "Rows sent to the dead-letter topic, by original topic", dead_lettered.clone());
        let in_flight_records = g();
        register(&mut r, IN_FLIGHT_RECORDS, "Records handed to the producer and not yet acknowledged", in_flight_records.clone());
        let in_flight_bytes = g();
        register(&mut r, IN_FLIGHT_BYTES, "Bytes of records handed to the producer and not yet acknowledged", in_flight_bytes.clone());
        let reconnects = Counter::default();
        register_counter(&mut r, RECONNECTS_TOTAL, "Replication sessions resumed from the slot after an error", reconnects.clone());
        let producer_rebuilds = Counter::default();
        register_counter(&mut r, PRODUCER_REBUILDS_TOTAL, "Kafka producers rebuilt after a fatal producer error", producer_rebuilds.clone());
        let status_updates = Counter::default();
        register_counter(&mut r, STATUS_UPDATES_TOTAL, "Status updates (flush LSN) sent to PostgreSQL", status_updates.clone());
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel { version: env!("CARGO_PKG_VERSION") })
            .set(1);
        register(&mut r, BUILD_INFO, "Always 1; the version label is the relay's version", build_info);

        Metrics {
            inner: Arc::new(Inner {
                registry: r,
                received_lsn,
                sent_lsn,
                acked_lsn,
                confirmed_lsn,
                server_wal_lsn,
                slot_lag_bytes,
                slot_retained_bytes,
                slot_safe_wal_size,
                slot_wal_status,
                slot_held,
                streaming,
                ready,
                lag_seconds,
                confirmed_commit_ts,
                latency,
                produced_records,
                produced_bytes,
                dead_lettered,
                delivery_errors,
                in_flight_records,
                in_flight_bytes,
                reconnects,
                producer_rebuilds,
                status_updates,
                topics: Mutex::new(BoundedLabels::new(options.max_topic_labels)),
                classes: Mutex::new(BoundedLabels::new(options.max_error_class_labels)),
                progress: Mutex::new(Progress {
                    readiness: Readiness::new(options.stall_timeout, Instant::now()),
                    newest_confirmed_commit: None,
                    caught_up_at: None,
                }),
                acked_records: AtomicU64::new(0),
                last_lag_bytes: AtomicI64::new(-1),
            }),
        }
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner
            .progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // --- positions --------------------------------------------------------

    /// Highest WAL position received from the server.
    pub fn received_lsn(&self, lsn: Lsn) {
        self.inner.received_lsn.set(lsn_value(lsn));
    }

    /// Commit LSN of the newest transaction fully handed to the producer.
    pub fn sent_lsn(&self, lsn: Lsn) {
        self.inner.sent_lsn.set(lsn_value(lsn));
    }

    /// End LSN of the newest fully acknowledged transaction.
    pub fn acked_lsn(&self, lsn: Lsn) {
        self.inner.acked_lsn.set(lsn_value(lsn));
    }

    /// Flush LSN sent to PostgreSQL (call it with each status update).
    pub fn confirmed_lsn(&self, lsn: Lsn) {
        self.inner.confirmed_lsn.set(lsn_value(lsn));
        self.progress().readiness.on_confirmed(lsn, Instant::now());
    }

    /// Commit time (µs since 2000-01-01) of the newest transaction whose
    /// position was confirmed to PostgreSQL. Never moves backwards.
    pub fn confirmed_commit_time(&self, pg_micros: i64) {
        let mut p = self.progress();
        if p.newest_confirmed_commit.is_some_and(|t| t >= pg_micros) {
            return;
        }
        p.newest_confirmed_commit = Some(pg_micros);
        drop(p);
        self.inner
            .confirmed_commit_ts
            .set(unix_seconds(pg_micros_to_system_time(pg_micros)));
    }

    // --- records ------------------------------------------------------------

    /// A record of `bytes` bytes was handed to the producer for `topic`.
    /// Allocation-free once `topic` was seen.
    pub fn record_produced(&self, topic: &str, bytes: usize) {
        self.with_topic(topic, |c| {
            c.records.inc();
            c.bytes.inc_by(bytes as u64);
        });
    }

    /// The broker acknowledged a record; `latency` runs from its commit (see
    /// [`latency_since_commit`]).
    pub fn record_acked(&self, latency: Duration) {
        self.inner.latency.observe(latency.as_secs_f64());
        self.inner.acked_records.fetch_add(1, Ordering::Relaxed);
        self.progress().readiness.on_ack(Instant::now());
    }

    /// A row went to the dead-letter topic instead of `topic`.
    pub fn dead_lettered(&self, topic: &str) {
        self.with_topic(topic, |c| {
            c.dead_lettered.inc();
        });
    }

    /// The broker refused or timed out a record. `class` should come from a
    /// small fixed set (e.g. librdkafka's error code name in snake case);
    /// past the bound it is counted as `_other`.
    pub fn delivery_error(&self, class: &str) {
        let family = &self.inner.delivery_errors;
        let mut classes = self
            .inner
            .classes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        classes.with(
            class,
            |v| {
                family
                    .get_or_create(&ClassLabel { class: v.to_string() })
                    .clone()
            },
            |c| c.inc(),
        );
    }

    /// The in-flight window: records handed to the producer and not yet
    /// acknowledged, and their bytes.
    pub fn in_flight(&self, records: usize, bytes: usize) {
        self.inner.in_flight_records.set(saturating_i64(records as u64));
        self.inner.in_flight_bytes.set(saturating_i64(bytes as u64));
        let mut p = self.progress();
        p.readiness.on_in_flight(records as u64, Instant::now());
        if records == 0 {
            p.note_if_caught_up(SystemTime::now());
        }
    }

    fn with_topic(&self, topic: &str, f: impl FnOnce(&TopicCounters)) {
        let inner = &*self.inner;
        let mut topics = inner
            .topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        topics.with(
            topic,
            |v| {
                let label = TopicLabel {
                    topic: v.to_string(),
                };
                TopicCounters {
                    records: inner.produced_records.get_or_create(&label).clone(),
                    bytes: inner.produced_bytes.get_or_create(&label).clone(),
                    dead_lettered: inner.dead_lettered.get_or_create(&label).clone(),
                }
            },
            f,
        );
    }

    // --- session events -----------------------------------------------------

    /// A replication session failed and the relay resumes from the slot.
    pub fn reconnect(&self) {
        self.inner.reconnects.inc();
    }

    /// The Kafka producer was rebuilt.
    pub fn producer_rebuild(&self) {
        self.inner.producer_rebuilds.inc();
    }

    /// A status update was sent to PostgreSQL.
    pub fn status_update_sent(&self) {
        self.inner.status_updates.inc();
    }

    /// Whether this relay's session holds the slot.
    pub fn slot_held(&self, held: bool) {
        self.inner.slot_held.set(i64::from(held));
    }

    /// The replication stream went up (`true`) or down (`false`).
    pub fn streaming(&self, up: bool) {
        self.inner.streaming.set(i64::from(up));
        let mut p = self.progress();
        if !up {
            // Everything up to now was caught up if nothing was in flight.
            p.note_if_caught_up(SystemTime::now());
        }
        p.readiness.set_streaming(up, Instant::now());
        if up {
            p.note_if_caught_up(SystemTime::now());
        }
    }

    // --- slot samples (ordinary SQL connection) ----------------------------

    /// A lag sample: server WAL position minus the slot's confirmed position,
    /// WAL retained by the slot, and its `wal_status` (`None`: unknown).
    pub fn lag(&self, lag_bytes: u64, retained_bytes: u64, wal_status: Option<&str>) {
        self.inner.slot_lag_bytes.set(saturating_i64(lag_bytes));
        self.inner.slot_retained_bytes.set(saturating_i64(retained_bytes));
        let current = wal_status
            .and_then(|s| WAL_STATUSES.iter().position(|known| *known == s))
            .unwrap_or(WAL_STATUSES.len() - 1);
        for (i, gauge) in self.inner.slot_wal_status.iter().enumerate() {
            gauge.set(i64::from(i == current));
        }
        self.inner
            .last_lag_bytes
            .store(saturating_i64(lag_bytes), Ordering::Relaxed);
        self.progress()
            .readiness
            .on_lag_sample(lag_bytes, Instant::now());
    }

    /// `safe_wal_size` of the slot; `None` when unlimited (reported as -1).
    pub fn safe_wal_size(&self, bytes: Option<i64>) {
        self.inner.slot_safe_wal_size.set(bytes.unwrap_or(-1));
    }

    /// The server's WAL position at the last sample.
    pub fn server_wal_lsn(&self, lsn: Lsn) {
        self.inner.server_wal_lsn.set(lsn_value(lsn));
    }

    /// All of a [`crate::status::LagSample`] at once.
    pub fn slot_sample(&self, sample: &crate::status::LagSample) {
        self.server_wal_lsn(sample.server_wal_lsn);
        self.lag(
            sample.lag_bytes,
            sample.retained_bytes,
            sample.wal_status.as_deref(),
        );
        self.safe_wal_size(sample.safe_wal_size_bytes);
    }

    // --- reading ------------------------------------------------------------

    /// `Ok` when ready, else the reason (for `/readyz`).
    pub fn readiness(&self) -> Result<(), String> {
        self.progress().readiness.is_ready(Instant::now())
    }

    /// The exposition text (OpenMetrics; serve it with [`CONTENT_TYPE`]).
    /// Computes the scrape-time gauges first.
    pub fn encode(&self) -> String {
        let now = SystemTime::now();
        let (ready, lag) = {
            let mut p = self.progress();
            p.note_if_caught_up(now);
            let ready = p.readiness.is_ready(Instant::now()).is_ok();
            let lag = time_lag(
                now,
                p.caught_up(),
                p.newest_confirmed_commit.map(pg_micros_to_system_time),
                p.caught_up_at,
            );
            (ready, lag)
        };
        self.inner.ready.set(i64::from(ready));
        self.inner.lag_seconds.set(lag.as_secs_f64());
        let mut out = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
            .expect("encoding into a String cannot fail for classic metrics");
        out
    }

    /// A snapshot for the progress line.
    pub fn snapshot(&self) -> Snapshot {
        let now = SystemTime::now();
        let p = self.progress();
        let lag = time_lag(
            now,
            p.caught_up(),
            p.newest_confirmed_commit.map(pg_micros_to_system_time),
            p.caught_up_at,
        );
        let in_flight_records = p.readiness.in_flight_records();
        let streaming = p.readiness.is_streaming();
        drop(p);
        let last_lag = self.inner.last_lag_bytes.load(Ordering::Relaxed);
        Snapshot {
            acked_records: self.inner.acked_records.load(Ordering::Relaxed),
            in_flight_records,
            confirmed_lsn: Lsn(u64::try_from(self.inner.confirmed_lsn.get()).unwrap_or(0)),
            lag_bytes: u64::try_from(last_lag).ok(),
            lag_seconds: lag.as_secs_f64(),
            streaming,
        }
    }
}

/// What the progress line reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub acked_records: u64,
    pub in_flight_records: u64,
    pub confirmed_lsn: Lsn,
    /// Last sampled slot lag; `None` before the first sample.
    pub lag_bytes: Option<u64>,
    pub lag_seconds: f64,
    pub streaming: bool,
}

/// The periodic one-line progress log (info level): call [`ProgressLog::log`]
/// from a timer (e.g. every 30 s).
#[derive(Debug, Default)]
pub struct ProgressLog {
    last: Option<(Instant, u64)>,
}

impl ProgressLog {
    pub fn new() -> Self {
        ProgressLog::default()
    }

    /// Records per second acknowledged since the previous call (0 the first time).
    pub fn rate(&mut self, snapshot: &Snapshot, now: Instant) -> f64 {
        let rate = match self.last {
            Some((then, acked)) => {
                let secs = now.saturating_duration_since(then).as_secs_f64();
                if secs > 0.0 {
                    snapshot.acked_records.saturating_sub(acked) as f64 / secs
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.last = Some((now, snapshot.acked_records));
        rate
    }

    /// Emits one `progress` line at info level.
    pub fn log(&mut self, metrics: &Metrics) {
        let s = metrics.snapshot();
        let rate = self.rate(&s, Instant::now());
        tracing::info!(
            records_per_sec = format_args!("{rate:.1}"),
            acked_total = s.acked_records,
            in_flight = s.in_flight_records,
            lag_bytes = s.lag_bytes.map(|b| b as i64).unwrap_or(-1),
            lag_seconds = format_args!("{:.3}", s.lag_seconds),
            confirmed_lsn = %s.confirmed_lsn,
            streaming = s.streaming,
            "progress"
        );
    }
}

#[cfg(test)]
mod tests;
