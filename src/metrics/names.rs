//! Metric names as they appear in a scrape (counters with their `_total`
//! suffix; histograms without `_bucket`/`_sum`/`_count`). Dashboards and
//! alert rules in `deploy/` use exactly these (a unit test checks it).

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
/// Gauge, label `role` (`streaming`, `standby`, `down`), computed at scrape:
/// 1 for the relay's current role. `standby`: another process streams from
/// the slot and this relay is ready to take over. Alert over the pair: no
/// relay with `role="streaming"` for minutes.
pub const ROLE: &str = "outbox_relay_role";
/// Gauge, computed at scrape. Seconds since the last successful SQL sample
/// of the slot (lag, retained WAL, `wal_status`); -1 before the first. The
/// slot gauges are only as fresh as this. Alert: above a minute.
pub const SLOT_SAMPLE_AGE_SECONDS: &str = "outbox_relay_slot_sample_age_seconds";
/// Counter. SQL samples of the slot that failed (the sampler retries).
pub const SLOT_SAMPLE_ERRORS_TOTAL: &str = "outbox_relay_slot_sample_errors_total";
/// Gauge, label `bookmark` (at most 10, then `_other`). WAL a bookmark slot
/// (`<slot>_bookmark_<name>`) keeps on the server. Alert: a bookmark left
/// behind (killed replay, `--keep-bookmark`) keeps WAL and `catalog_xmin`.
pub const BOOKMARK_RETAINED_WAL_BYTES: &str = "outbox_relay_bookmark_retained_wal_bytes";
/// Gauge, label `bookmark`. Seconds the bookmark has been unused
/// (PostgreSQL 17+: `now() - inactive_since`; older: since this relay first
/// saw it). Alert: older than a day.
pub const BOOKMARK_AGE_SECONDS: &str = "outbox_relay_bookmark_age_seconds";
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
/// Histogram, label `stage` = `server` (commit → XLogData read by the relay),
/// `relay` (read → handed to the producer), `broker` (handed → acknowledged);
/// 50 µs … 60 s buckets. Tells whether PostgreSQL, the relay or Kafka is slow.
pub const STAGE_LATENCY_SECONDS: &str = "outbox_relay_stage_latency_seconds";
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
/// Gauge. Records allowed in flight since Kafka let records time out
/// (halved per time-out, given back as acknowledgements keep up); 0: no cap,
/// the window alone. Non-zero for long: the broker is too slow for the load.
pub const IN_FLIGHT_CAP_RECORDS: &str = "outbox_relay_in_flight_cap_records";
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
/// Gauge, label `system_identifier`: 1 for the PostgreSQL cluster the relay
/// streams from (`IDENTIFY_SYSTEM`). The relay stops if it changes.
pub const SERVER_SYSTEM_INFO: &str = "outbox_relay_server_system_info";
/// Gauge. Timeline of the server the relay streams from; a change is a
/// promotion (followed only with a PostgreSQL 17 failover slot).
pub const SERVER_TIMELINE: &str = "outbox_relay_server_timeline";
/// Counter. Times the relay let go of its replication stream because
/// PostgreSQL was shutting down and waited on records Kafka had not yet
/// acknowledged (the stream resumes from the slot when the server is back).
pub const SHUTDOWN_RELEASES_TOTAL: &str = "outbox_relay_shutdown_releases_total";
/// Counter. Records not sent again after a restart because the progress
/// table showed the broker had acknowledged them (the slot had forgotten).
pub const PROGRESS_SKIPPED_RECORDS_TOTAL: &str = "outbox_relay_progress_skipped_records_total";

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
    STAGE_LATENCY_SECONDS,
    PRODUCED_RECORDS_TOTAL,
    PRODUCED_BYTES_TOTAL,
    DELIVERY_ERRORS_TOTAL,
    DEAD_LETTERED_RECORDS_TOTAL,
    IN_FLIGHT_RECORDS,
    IN_FLIGHT_BYTES,
    IN_FLIGHT_CAP_RECORDS,
    RECONNECTS_TOTAL,
    PRODUCER_REBUILDS_TOTAL,
    STATUS_UPDATES_TOTAL,
    BUILD_INFO,
    SERVER_SYSTEM_INFO,
    SERVER_TIMELINE,
    SHUTDOWN_RELEASES_TOTAL,
    PROGRESS_SKIPPED_RECORDS_TOTAL,
    ROLE,
    SLOT_SAMPLE_AGE_SECONDS,
    SLOT_SAMPLE_ERRORS_TOTAL,
    BOOKMARK_RETAINED_WAL_BYTES,
    BOOKMARK_AGE_SECONDS,
];

/// Histograms among [`ALL`]: a scrape shows them as `_bucket`, `_sum`
/// and `_count` series.
pub const HISTOGRAMS: &[&str] = &[END_TO_END_LATENCY_SECONDS, STAGE_LATENCY_SECONDS];
