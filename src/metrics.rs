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

mod labels;
mod ops;
mod progress;
mod readiness;
mod stages;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

use crate::lsn::{pg_micros_to_system_time, Lsn};

use labels::{
    BoundedLabels, ClassLabel, StatusLabel, SystemLabel, TopicCounters, TopicLabel, VersionLabel,
};
pub use progress::{latency_since_commit, time_lag, ProgressLog, Snapshot};
use progress::{unix_seconds, Progress};
pub use readiness::{Readiness, Ready, Role, DEFAULT_STALL_TIMEOUT};
pub use stages::{STAGES, STAGE_LATENCY_BUCKETS};

pub mod names;

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
    stages: stages::Stages,
    produced_records: Family<TopicLabel, Counter>,
    produced_bytes: Family<TopicLabel, Counter>,
    dead_lettered: Family<TopicLabel, Counter>,
    delivery_errors: Family<ClassLabel, Counter>,
    in_flight_records: Gauge,
    in_flight_bytes: Gauge,
    in_flight_cap: Gauge,
    reconnects: Counter,
    producer_rebuilds: Counter,
    status_updates: Counter,
    server_system: Family<SystemLabel, Gauge>,
    server_timeline: Gauge,
    shutdown_releases: Counter,
    progress_skipped: Counter,
    topics: Mutex<BoundedLabels<TopicCounters>>,
    classes: Mutex<BoundedLabels<Counter>>,
    progress: Mutex<Progress>,
    /// Records acknowledged, for the progress line.
    acked_records: AtomicU64,
    /// Last lag sample, for the progress line (-1: none yet).
    last_lag_bytes: AtomicI64,
    /// Role and sample freshness (see `ops`).
    ops: ops::OpsMetrics,
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

/// Registers metrics under their [`names`] and hands them back.
struct Registrar(Registry);

impl Registrar {
    fn add<M: Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M {
        // The encoder appends `_total` to counters; `names` spell the scraped
        // name, so it comes off here (only counters end in `_total`).
        let base = name.strip_suffix("_total").unwrap_or(name);
        self.0.register(base, help, metric.clone());
        metric
    }
}

fn lsn_value(lsn: Lsn) -> i64 {
    i64::try_from(lsn.0).unwrap_or(i64::MAX)
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Metrics with default options (100 topic labels, 30 s stall timeout).
    pub fn new() -> Self {
        Metrics::with_options(MetricsOptions::default())
    }

    pub fn with_options(options: MetricsOptions) -> Self {
        use names::*;
        let mut r = Registrar(Registry::default());
        let gauge = Gauge::<i64>::default;
        let seconds = Gauge::<f64, AtomicU64>::default;
        let per_topic = Family::<TopicLabel, Counter>::default;

        let received_lsn = r.add(
            RECEIVED_LSN,
            "Highest WAL position received from PostgreSQL",
            gauge(),
        );
        let sent_lsn = r.add(
            SENT_LSN,
            "Commit LSN of the newest transaction fully handed to the Kafka producer",
            gauge(),
        );
        let acked_lsn = r.add(
            ACKNOWLEDGED_LSN,
            "End LSN of the newest transaction fully acknowledged by Kafka",
            gauge(),
        );
        let confirmed_lsn = r.add(
            CONFIRMED_LSN,
            "Flush LSN last confirmed to PostgreSQL in a status update",
            gauge(),
        );
        let server_wal_lsn = r.add(
            SERVER_WAL_LSN,
            "Server WAL position at the last lag sample",
            gauge(),
        );
        let slot_lag_bytes = r.add(
            SLOT_LAG_BYTES,
            "Server WAL position minus the slot's confirmed_flush_lsn",
            gauge(),
        );
        let slot_retained_bytes = r.add(
            SLOT_RETAINED_WAL_BYTES,
            "WAL the server keeps for the slot: server WAL position minus restart_lsn",
            gauge(),
        );
        let slot_safe_wal_size = r.add(
            SLOT_SAFE_WAL_SIZE_BYTES,
            "WAL that can be written before the slot risks invalidation; -1 when unlimited",
            gauge(),
        );
        slot_safe_wal_size.set(-1);
        let status_family = r.add(
            SLOT_WAL_STATUS,
            "1 for the slot's current wal_status, 0 for the others",
            Family::<StatusLabel, Gauge>::default(),
        );
        let slot_wal_status: [Gauge; WAL_STATUSES.len()] = std::array::from_fn(|i| {
            let label = StatusLabel {
                status: WAL_STATUSES[i],
            };
            status_family.get_or_create(&label).clone()
        });
        slot_wal_status[WAL_STATUSES.len() - 1].set(1);
        let slot_held = r.add(
            SLOT_HELD,
            "1 while this relay holds the replication slot",
            gauge(),
        );
        let streaming = r.add(STREAMING, "1 while the replication stream is up", gauge());
        let ready = r.add(
            READY,
            "1 when ready: streaming and acknowledgements progressing",
            gauge(),
        );
        let lag_seconds = r.add(
            LAG_SECONDS,
            "Seconds behind: now minus the newest confirmed commit time; 0 when caught up",
            seconds(),
        );
        let confirmed_commit_ts = r.add(
            CONFIRMED_COMMIT_TIMESTAMP_SECONDS,
            "Commit time (Unix seconds) of the newest confirmed transaction; 0 before the first",
            seconds(),
        );
        let latency = r.add(
            END_TO_END_LATENCY_SECONDS,
            "Seconds from a row's commit in PostgreSQL to Kafka's acknowledgement of its record",
            Histogram::new(LATENCY_BUCKETS.iter().copied()),
        );
        let stages = stages::Stages::new(&r.add(
            STAGE_LATENCY_SECONDS,
            "Seconds a record spends in each stage, by stage: server (commit to XLogData read \
             by the relay), relay (read to handed to the producer), broker (handed to \
             acknowledged)",
            stages::family(),
        ));
        let produced_records = r.add(
            PRODUCED_RECORDS_TOTAL,
            "Records handed to the Kafka producer, by topic",
            per_topic(),
        );
        let produced_bytes = r.add(
            PRODUCED_BYTES_TOTAL,
            "Bytes of records handed to the Kafka producer, by topic",
            per_topic(),
        );
        let delivery_errors = r.add(
            DELIVERY_ERRORS_TOTAL,
            "Records Kafka did not acknowledge, by error class",
            Family::<ClassLabel, Counter>::default(),
        );
        let dead_lettered = r.add(
            DEAD_LETTERED_RECORDS_TOTAL,
            "Rows sent to the dead-letter topic, by original topic",
            per_topic(),
        );
        let in_flight_records = r.add(
            IN_FLIGHT_RECORDS,
            "Records handed to the producer and not yet acknowledged",
            gauge(),
        );
        let in_flight_bytes = r.add(
            IN_FLIGHT_BYTES,
            "Bytes of records handed to the producer and not yet acknowledged",
            gauge(),
        );
        let in_flight_cap = r.add(
            IN_FLIGHT_CAP_RECORDS,
            "Records allowed in flight since Kafka let records time out (0: no cap)",
            gauge(),
        );
        let reconnects = r.add(
            RECONNECTS_TOTAL,
            "Replication sessions resumed from the slot after an error",
            Counter::default(),
        );
        let producer_rebuilds = r.add(
            PRODUCER_REBUILDS_TOTAL,
            "Kafka producers rebuilt after a fatal producer error",
            Counter::default(),
        );
        let status_updates = r.add(
            STATUS_UPDATES_TOTAL,
            "Status updates (flush LSN) sent to PostgreSQL",
            Counter::default(),
        );
        let server_system = r.add(
            SERVER_SYSTEM_INFO,
            "1 for the system identifier of the PostgreSQL cluster streamed from",
            Family::<SystemLabel, Gauge>::default(),
        );
        let server_timeline = r.add(
            SERVER_TIMELINE,
            "Timeline of the PostgreSQL server streamed from",
            gauge(),
        );
        let shutdown_releases = r.add(
            SHUTDOWN_RELEASES_TOTAL,
            "Replication streams let go because PostgreSQL was shutting down while Kafka had not acknowledged everything",
            Counter::default(),
        );
        let progress_skipped = r.add(
            PROGRESS_SKIPPED_RECORDS_TOTAL,
            "Records not sent again after a restart: the progress table showed them acknowledged",
            Counter::default(),
        );
        let build_info = r.add(
            BUILD_INFO,
            "Always 1; the version label is the relay's version",
            Family::<VersionLabel, Gauge>::default(),
        );
        let version = VersionLabel {
            version: env!("CARGO_PKG_VERSION"),
        };
        build_info.get_or_create(&version).set(1);
        let ops = ops::OpsMetrics::register(&mut r);
        let r = r.0;

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
                stages,
                produced_records,
                produced_bytes,
                dead_lettered,
                delivery_errors,
                in_flight_records,
                in_flight_bytes,
                in_flight_cap,
                reconnects,
                producer_rebuilds,
                status_updates,
                server_system,
                server_timeline,
                shutdown_releases,
                progress_skipped,
                topics: Mutex::new(BoundedLabels::new(options.max_topic_labels)),
                classes: Mutex::new(BoundedLabels::new(options.max_error_class_labels)),
                progress: Mutex::new(Progress {
                    readiness: Readiness::new(options.stall_timeout, Instant::now()),
                    newest_confirmed_commit: None,
                    caught_up_at: None,
                }),
                acked_records: AtomicU64::new(0),
                last_lag_bytes: AtomicI64::new(-1),
                ops,
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
        self.records_produced(topic, 1, bytes as u64);
    }

    /// `records` records of `bytes` bytes in all were handed to the producer
    /// for `topic` (the relay adds up a burst and reports it once).
    pub fn records_produced(&self, topic: &str, records: u64, bytes: u64) {
        self.with_topic(topic, |c| {
            c.records.inc_by(records);
            c.bytes.inc_by(bytes);
        });
    }

    /// The broker acknowledged a record; `latency` runs from its commit (see
    /// [`latency_since_commit`]).
    pub fn record_acked(&self, latency: Duration) {
        self.ack_latency(latency);
        self.records_acked(1);
    }

    /// The commit → acknowledgement latency of one record.
    pub fn ack_latency(&self, latency: Duration) {
        self.inner.latency.observe(latency.as_secs_f64());
    }

    /// Commit → XLogData read by the relay (the `server` stage), one record.
    pub fn stage_server(&self, latency: Duration) {
        self.inner.stages.server(latency);
    }

    /// XLogData read → handed to the producer (the `relay` stage), one record.
    pub fn stage_relay(&self, latency: Duration) {
        self.inner.stages.relay(latency);
    }

    /// Handed to the producer → acknowledged (the `broker` stage), one record.
    pub fn stage_broker(&self, latency: Duration) {
        self.inner.stages.broker(latency);
    }

    /// `records` acknowledgements arrived (counted and noted for readiness
    /// once per burst, not per record: this takes a lock).
    pub fn records_acked(&self, records: u64) {
        self.inner
            .acked_records
            .fetch_add(records, Ordering::Relaxed);
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
                    .get_or_create(&ClassLabel {
                        class: v.to_string(),
                    })
                    .clone()
            },
            |c| c.inc(),
        );
    }

    /// The in-flight cap after Kafka time-outs; `None`: lifted.
    pub fn in_flight_cap(&self, cap: Option<usize>) {
        self.inner
            .in_flight_cap
            .set(saturating_i64(cap.unwrap_or(0) as u64));
    }

    /// The in-flight window: records handed to the producer and not yet
    /// acknowledged, and their bytes.
    pub fn in_flight(&self, records: usize, bytes: usize) {
        self.inner
            .in_flight_records
            .set(saturating_i64(records as u64));
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

    /// The server a session reached (`IDENTIFY_SYSTEM`).
    pub fn server_identity(&self, system_identifier: &str, timeline: u32) {
        // One cluster per process (another one is fatal): no label growth.
        self.inner.server_system.clear();
        self.inner
            .server_system
            .get_or_create(&SystemLabel {
                system_identifier: system_identifier.to_string(),
            })
            .set(1);
        self.inner.server_timeline.set(i64::from(timeline));
    }

    /// Records skipped thanks to the progress record.
    pub fn progress_skipped(&self, records: u64) {
        self.inner.progress_skipped.inc_by(records);
    }

    /// The relay let go of its stream for a server shutdown.
    pub fn shutdown_release(&self) {
        self.inner.shutdown_releases.inc();
    }

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
        self.inner
            .slot_retained_bytes
            .set(saturating_i64(retained_bytes));
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
        self.ops_on_scrape();
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

#[cfg(test)]
mod tests;
