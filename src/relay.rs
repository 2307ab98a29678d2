//! The relay loop: one task owns the replication session, the mapper, the
//! producer handle and the ack tracker. No locks on the hot path.
//!
//! ```text
//! run ─► session ─► loop { select! biased:
//!          1. shutdown        stop intake, drain in-flight records (bounded)
//!          2. delivery report ack the record in the tracker, free the window
//!                             (and every report already waiting: a burst)
//!          3. status timer    send written/flushed to PostgreSQL (+ ask for a keepalive)
//!          4. queue-full retry
//!          5. intake          next replication message, only while the window has room
//!                             (and the frames the same read already buffered)
//!        }
//!      ◄─ on error: disposition → retry from the slot with jittered backoff, or stop
//! ```
//!
//! The branch order is the priority: shutdown first so a SIGTERM is never
//! starved; delivery reports before intake so acknowledgements (which free the
//! window and move the flush LSN) always win over reading more, which is what
//! keeps memory bounded; the timer before intake so status updates keep going
//! while the window is full or the broker is slow (otherwise the walsender
//! times out after `wal_sender_timeout`). A burst is capped at [`BURST`]
//! messages so the branches above it are looked at again soon; metrics that
//! take a lock are tallied per burst, not per record.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::ack::{AckError, AckTracker};
use crate::config::Config;
use crate::kafka::{KafkaSink, KafkaSinkError, SinkSettings};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::outbox::{MappingError, OutboxMapper};
use crate::pgoutput::{DecodeError, Decoder};
use crate::replication::{ReplicationClient, ReplicationError};
use crate::setup::{self, Problem};

mod cleanup;
mod coalesce;
mod delivery;
mod facts;
mod holder;
mod identity;
mod lag;
mod letgo;
mod message;
mod pace;
mod poison;
mod progress;
mod session;
mod stages;

use holder::terminate_stale_holder;
use lag::sample_lag;
use session::Session;

/// Sessions in a row that may fail to decode the same position before the
/// relay stops (the first failures may be a torn connection's doing).
const DECODE_RETRIES: u32 = 3;
/// Shortest time between a status update and a prompt one sent because
/// acknowledgements moved the flush position.
const PROMPT_INTERVAL: Duration = Duration::from_millis(10);
/// How long ending the copy may take when letting go for a server shutdown.
const LET_GO_FINISH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the final CopyDone handshake may take at shutdown.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed session, how long to keep taking the broker's
/// acknowledgements of records still in flight (usually milliseconds), so the
/// next session skips them instead of sending them again.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// A session that streamed this long resets the reconnect backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// How often the slot's lag and retained WAL are sampled over SQL.
const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// How often the one-line progress log is written.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// Pause before retrying a record librdkafka's queue refused.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(5);
/// Most replication messages (or delivery reports) handled in one wake-up of
/// the loop before the higher-priority branches are looked at again. Large
/// enough to take a whole socket read (or produce batch) at once, small enough
/// that status updates and shutdown never wait long behind a burst.
const BURST: usize = 512;

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Reconnect from the slot after a backoff (at-least-once, never skip).
    Retry,
    /// Stop: a human must act (the message says what to do).
    Fatal,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("PostgreSQL is not ready for the relay:\n{}", render(.0))]
    Preflight(Vec<Problem>),
    #[error(transparent)]
    Setup(#[from] setup::SetupError),
    #[error("SQL connection: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(
        "cannot decode the replication stream: {0}; please report this with the PostgreSQL version"
    )]
    Decode(#[from] DecodeError),
    #[error("{0}")]
    Mapping(#[from] MappingError),
    #[error("the replication stream broke the transaction framing: {0}")]
    Framing(#[from] AckError),
    #[error(transparent)]
    Kafka(#[from] KafkaSinkError),
    #[error("Kafka did not acknowledge a record for topic {topic}: {error}")]
    Delivery { topic: String, error: String },
    #[error(
        "the Kafka producer hit a fatal error ({0}); rebuilding it and resuming from the slot"
    )]
    ProducerFatal(String),
    #[error("replication slot {slot:?} does not exist and slot creation is off; create it (SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')) or enable postgres.create_slot")]
    SlotMissing { slot: String },
    #[error("replication slot {slot:?} is invalidated ({reason}): PostgreSQL removed WAL it still needed, so events may be missing; drop it (SELECT pg_drop_replication_slot('{slot}')), let the relay create a new one, and backfill from the outbox table")]
    SlotInvalidated { slot: String, reason: String },
    #[error("replication slot {slot:?} uses plugin {plugin:?}, not pgoutput; use another slot name or drop it")]
    SlotPlugin { slot: String, plugin: String },
    #[error("unexpected pgoutput message {0}: the relay does not enable streaming or two-phase decoding")]
    Unexpected(&'static str),
    #[error("PostgreSQL ended the replication stream")]
    StreamEnded,
    #[error("poison row ({class}): {reason}. The relay stops rather than skip it; fix the row or the mapping, or {divert}")]
    Poison {
        class: &'static str,
        reason: String,
        /// How to divert such rows instead, given what is configured.
        divert: String,
    },
    #[error("--start-lsn {start} is below slot {slot:?}'s confirmed position {confirmed}: PostgreSQL cannot rewind a logical slot, and everything below {confirmed} was already delivered. To re-publish older events use a bookmark (outbox-relay bookmark create, then replay --from-bookmark) or table replay (replay --from-id/--from-time)")]
    StartBelowConfirmed {
        start: Lsn,
        confirmed: Lsn,
        slot: String,
    },
    #[error("PostgreSQL is shutting down and waited on {pending} records Kafka has not acknowledged; the relay let go of the stream so the server can stop, and resumes from the slot when it is back")]
    ServerShuttingDown { pending: u64 },
    #[error("another process created replication slot {0:?} at the same moment; standing by")]
    SlotCreationRace(String),
    #[error("PostgreSQL sent nothing for {0:?} although asked for keepalives, longer than its wal_sender_timeout allows a live walsender; the connection is presumed dead")]
    ServerSilent(Duration),
    #[error("no usable PostgreSQL server: {0}; retrying (during a failover, until a standby is promoted)")]
    NoServer(String),
    #[error("{gap}. {loss}. The relay stops rather than create a new slot and stream past the gap. After the backfill, drop the stale slot if one is left and start the relay again: a new process creates the slot and starts from the current WAL position")]
    SlotGap {
        /// What changed ([`identity::Gap::describe`]).
        gap: String,
        /// What was delivered and how to backfill ([`identity::Memory::describe_loss`]).
        loss: String,
    },
    #[error("cannot decode the replication stream at {lsn}, {times} times in a row: {error}. Retrying cannot help; please report this with the PostgreSQL version (the bytes are in the WAL at {lsn}: pg_logical_slot_peek_binary_changes shows them)")]
    DecodeRepeated {
        lsn: Lsn,
        times: u32,
        error: DecodeError,
    },
    #[error("Kafka refused {position} for topic {topic:?} with {code}, {failures} times in a row with the record alone in flight: {fix}. The relay stops rather than retry while WAL piles up; the slot stays before this record, so nothing is lost once this is fixed and the relay restarted")]
    BrokerRefused {
        code: String,
        topic: String,
        position: String,
        failures: u32,
        fix: String,
    },
}

fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl RelayError {
    /// The one place that decides what an error means for the process.
    pub fn disposition(&self) -> Disposition {
        use Disposition::*;
        match self {
            RelayError::Config(_)
            | RelayError::Preflight(_)
            | RelayError::SlotMissing { .. }
            | RelayError::SlotInvalidated { .. }
            | RelayError::SlotPlugin { .. }
            | RelayError::StartBelowConfirmed { .. }
            | RelayError::Poison { .. }
            | RelayError::SlotGap { .. }
            | RelayError::DecodeRepeated { .. }
            | RelayError::BrokerRefused { .. }
            | RelayError::Unexpected(_) => Fatal,
            RelayError::Mapping(_) => Fatal,
            RelayError::Setup(e) => {
                if e.is_transient() {
                    Retry
                } else {
                    Fatal
                }
            }
            RelayError::Sql(e) if crate::sql::is_tls_refusal(e) => Fatal,
            RelayError::Sql(e) => match e.code() {
                Some(code) => sqlstate_disposition(code.code()),
                None => Retry,
            },
            RelayError::Replication(e) => match e {
                ReplicationError::Server(s) => {
                    if s.code == "55000" && s.message.contains("can no longer get changes") {
                        Fatal
                    } else {
                        sqlstate_disposition(&s.code)
                    }
                }
                ReplicationError::Auth(_)
                | ReplicationError::Tls(_)
                | ReplicationError::FrameTooLarge { .. }
                | ReplicationError::InvalidSlotName(_) => Fatal,
                _ => Retry,
            },
            RelayError::Kafka(e) => {
                if e.is_transient() {
                    Retry
                } else {
                    Fatal
                }
            }
            RelayError::Decode(_)
            | RelayError::Framing(_)
            | RelayError::Delivery { .. }
            | RelayError::ProducerFatal(_)
            | RelayError::StreamEnded
            | RelayError::SlotCreationRace(_)
            | RelayError::ServerShuttingDown { .. }
            | RelayError::ServerSilent(_)
            | RelayError::NoServer(_) => Retry,
        }
    }

    /// Another process streams from the slot (SQLSTATE 55006, "active for PID"),
    /// or created it a moment before us (42710, the creation race): stand by.
    pub fn is_slot_busy(&self) -> bool {
        matches!(self, RelayError::Replication(ReplicationError::Server(s)) if s.code == "55006")
            || matches!(self, RelayError::SlotCreationRace(_))
    }

    /// Errors after which the producer is rebuilt.
    fn rebuild_producer(&self) -> bool {
        matches!(
            self,
            RelayError::ProducerFatal(_) | RelayError::Delivery { .. }
        )
    }
}

/// SQLSTATE classes: connection trouble and "object in use" are transient;
/// authentication, privileges, missing objects and bad requests need a human.
fn sqlstate_disposition(code: &str) -> Disposition {
    match code.get(..2) {
        Some("28") | Some("42") | Some("3D") | Some("22") | Some("0A") => Disposition::Fatal,
        _ => Disposition::Retry,
    }
}

/// How a session ended without error.
enum SessionEnd {
    /// Stopped by the shutdown signal.
    Shutdown,
    /// Reached [`StreamOptions::end_lsn`].
    Finished,
}

/// Header marking records re-published by `replay`.
pub const HEADER_REPLAY: &str = "replay";
/// Dead-letter headers: the poison class, the reason, the topic the row was for.
pub const HEADER_ERROR_CLASS: &str = "outbox-relay-error-class";
pub const HEADER_ERROR_REASON: &str = "outbox-relay-error-reason";
pub const HEADER_ORIGINAL_TOPIC: &str = "outbox-relay-original-topic";

/// Where a stream starts and ends, and what it confirms. The defaults are the
/// live relay: from the slot's confirmed position, forever, confirming.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Start here instead of at the slot's confirmed position. Must not be
    /// below it (PostgreSQL cannot rewind a logical slot); above it, every
    /// transaction committing in between is skipped for good.
    pub start_lsn: Option<Lsn>,
    /// Stop once every transaction committing below this position is
    /// acknowledged (replay).
    pub end_lsn: Option<Lsn>,
    /// Confirm progress to PostgreSQL. `false` leaves the slot where it is
    /// (a kept bookmark can be replayed again).
    pub confirm: bool,
    /// Value of the `replay` header on every record (replay).
    pub replay_header: Option<String>,
    /// Send every record to this topic instead of the mapped one (replay).
    pub topic_override: Option<String>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            start_lsn: None,
            end_lsn: None,
            confirm: true,
            replay_header: None,
            topic_override: None,
        }
    }
}

/// Which pgoutput options to send, from the server version. Streaming stays
/// off on purpose: streamed in-progress transactions would have to be
/// buffered until commit (unbounded) or published before commit (a rolled
/// back transaction's rows would reach Kafka). Without it the server spills
/// big transactions to disk and sends them after commit, which the bounded
/// window streams through.
///
/// With `messages`, pgoutput also sends logical decoding messages
/// (`pg_logical_emit_message`); transactional ones inside their transaction.
pub fn pgoutput_options(
    server_version_num: u32,
    publication: &str,
    messages: bool,
) -> Vec<(String, String)> {
    let mut opts = vec![
        ("proto_version".to_string(), "1".to_string()),
        (
            "publication_names".to_string(),
            format!("\"{}\"", publication.replace('"', "\"\"")),
        ),
    ];
    if messages {
        opts.push(("messages".to_string(), "true".to_string()));
    }
    if server_version_num >= 160000 {
        // Relay rows whatever their replication origin (the default, said out loud).
        opts.push(("origin".to_string(), "any".to_string()));
    }
    opts
}

/// Records and bytes handed to the producer and not yet acknowledged.
#[derive(Debug, Default)]
struct Window {
    records: usize,
    bytes: usize,
}

/// The relay: configuration, the producer, and the shutdown signal.
pub struct Relay {
    cfg: Config,
    shutdown: CancellationToken,
    metrics: Metrics,
    opts: StreamOptions,
    generation: u64,
    sink: Option<KafkaSink>,
    /// A session of this process started streaming (preflight and
    /// `--start-lsn`'s checks are for the first one).
    started: bool,
    /// The server and slot this process streams from, across sessions.
    memory: identity::Memory,
    /// The last decode failure's position and how many sessions in a row hit it.
    decode_failures: Option<(Lsn, u32)>,
    /// The progress table could not be used (said once until it works).
    progress_warned: bool,
    /// What the broker acknowledged by the end of the last session, on which
    /// server: the next session on the same server and timeline skips it
    /// like the durable progress record (which may lag it, or be unwritable
    /// while PostgreSQL restarts).
    acked: Option<(identity::ServerIdentity, Lsn)>,
    delivery: delivery::DeliveryMemory,
}

impl Relay {
    pub fn new(cfg: Config, shutdown: CancellationToken) -> Self {
        Self::with_metrics(cfg, shutdown, Metrics::new())
    }

    /// A relay reporting into `metrics` (shared with the HTTP endpoints).
    pub fn with_metrics(cfg: Config, shutdown: CancellationToken, metrics: Metrics) -> Self {
        Relay {
            cfg,
            shutdown,
            metrics,
            opts: StreamOptions::default(),
            generation: 0,
            sink: None,
            started: false,
            memory: identity::Memory::default(),
            decode_failures: None,
            progress_warned: false,
            acked: None,
            delivery: Default::default(),
        }
    }

    /// Start, end and confirmation behaviour (see [`StreamOptions`]).
    pub fn stream_options(mut self, opts: StreamOptions) -> Self {
        self.opts = opts;
        self
    }

    fn sink_settings(&self) -> SinkSettings {
        SinkSettings::from_config(&self.cfg)
    }

    /// Stream until shut down or a fatal error.
    pub async fn run(self) -> Result<(), RelayError> {
        self.run_to_end().await.map(|_| ())
    }

    /// Like [`Relay::run`]; `Ok(true)` when [`StreamOptions::end_lsn`] was
    /// reached with everything acknowledged, `Ok(false)` when stopped before.
    pub async fn run_to_end(mut self) -> Result<bool, RelayError> {
        let min = self.cfg.relay.reconnect_backoff_min;
        let max = self.cfg.relay.reconnect_backoff_max;
        let mut backoff = min;
        loop {
            let began = Instant::now();
            let result = self.session().await;
            self.metrics.streaming(false);
            self.metrics.slot_held(false);
            let err = match result {
                Ok(end) => {
                    if let Some(sink) = self.sink.take() {
                        sink.close(Duration::from_secs(1)).await;
                    }
                    return Ok(matches!(end, SessionEnd::Finished));
                }
                Err(e) => e,
            };
            if err.disposition() == Disposition::Fatal {
                if let Some(sink) = self.sink.take() {
                    sink.close(Duration::from_secs(1)).await;
                }
                return Err(err);
            }
            self.metrics.reconnect();
            if err.rebuild_producer() {
                if let Some(sink) = self.sink.take() {
                    tracing::warn!("rebuilding the kafka producer");
                    self.metrics.producer_rebuild();
                    sink.close_for_rebuild(&self.shutdown).await;
                }
            }
            if began.elapsed() >= HEALTHY_SESSION {
                backoff = min;
            }
            let delay = if err.is_slot_busy() {
                // Standby: another relay streams from the slot (PostgreSQL allows
                // one consumer). Poll at a steady pace to take over within seconds.
                if self.cfg.relay.terminate_stale_holder {
                    terminate_stale_holder(&self.cfg).await;
                }
                tracing::info!(error = %err, "the slot is held by another process; standing by");
                self.cfg.relay.slot_busy_retry
            } else {
                // Full jitter between min and the current ceiling.
                let delay = rand::thread_rng().gen_range(min..=backoff.max(min));
                if matches!(err, RelayError::ServerShuttingDown { .. }) {
                    // Not a failure: the database restarts (logged when we let go).
                    tracing::info!(retry_in = ?delay, "resuming from the slot once PostgreSQL is back");
                } else {
                    tracing::warn!(error = %err, retry_in = ?delay, "replication session failed; resuming from the slot");
                }
                backoff = (backoff * 2).min(max);
                delay
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn session(&mut self) -> Result<SessionEnd, RelayError> {
        self.generation += 1;
        let generation = self.generation;
        let mut cfg = self.cfg.clone();

        // Ordinary SQL: checks, publication, slot state. With several hosts in
        // the URL this chooses the server (target_session_attrs); every other
        // connection of the session is pinned to it.
        let client = crate::sql::connect(&cfg.postgres)
            .await
            .map_err(|e| match e {
                crate::sql::SqlConnectError::Config(e) => RelayError::Config(e.to_string()),
                crate::sql::SqlConnectError::Postgres(e) => RelayError::Sql(e),
                crate::sql::SqlConnectError::NoServer(e) => RelayError::NoServer(e),
            })?;
        cfg.postgres = cfg.postgres.pinned_to(client.host);
        let pg = &cfg.postgres;
        if !self.started {
            let problems = setup::preflight(&cfg, &client).await?;
            if !problems.is_empty() {
                return Err(RelayError::Preflight(problems));
            }
        }
        setup::ensure_publication(&cfg, &client).await?;
        let slot = setup::slot_state(&cfg, &client).await?;

        // The replication connection.
        let connect = pg
            .replication_connect_config()
            .map_err(|e| RelayError::Config(e.to_string()))?;
        let mut repl = ReplicationClient::connect(&connect).await?;
        let version = repl.server_version_num();
        let (_, attrs) = pg
            .replication_targets()
            .map_err(|e| RelayError::Config(e.to_string()))?;
        if attrs != crate::config::SessionAttrs::Any {
            // The server may have changed role since the SQL connection chose it.
            let role = crate::failover::replication_role(&mut repl).await?;
            if !role.satisfies(attrs) {
                return Err(RelayError::NoServer(format!(
                    "{}:{} became {role} after it was chosen as {attrs}",
                    connect.host, connect.port
                )));
            }
        }

        // Is this the server, and the slot, this process streamed from before?
        let system = repl.identify_system().await?;
        let repl_db = system.dbname.clone().unwrap_or_default();
        let server = identity::ServerIdentity {
            system_id: system.system_id.clone(),
            timeline: system.timeline,
        };
        let failover = facts::slot_failover(&client, &pg.slot, version).await?;
        self.metrics
            .server_identity(&server.system_id, server.timeline);
        let was = self.memory.server.clone();
        if let Err(gap) = self.memory.check_server(&server, failover) {
            return Err(self.gap(gap));
        }
        if let Some(was) = was.filter(|w| w.timeline != server.timeline) {
            // Followed a promotion with a failover slot: only if the new
            // timeline's history holds everything this process confirmed.
            let history = repl.timeline_history(server.timeline).await?;
            if let Err(gap) = self
                .memory
                .check_fork(was.timeline, server.timeline, &history)
            {
                self.memory.server = Some(was);
                return Err(self.gap(gap));
            }
            tracing::warn!(
                from_timeline = was.timeline,
                to_timeline = server.timeline,
                host = %connect.host,
                port = connect.port,
                "followed a failover: the failover slot carried over to the promoted server; transactions after its confirmed position come again (duplicates, same ids)"
            );
        }
        if self.memory.slot_seen || self.started {
            // This process knows the slot; the checks above judged it.
        } else if let Some(gap) = self
            .lost_in_failover(&client, &server, &repl_db, slot.is_some() && failover)
            .await
        {
            return Err(gap);
        }
        let confirmed = match slot {
            Some(s) => {
                self.memory.slot_seen = true;
                if s.invalidated {
                    return Err(RelayError::SlotInvalidated {
                        slot: pg.slot.clone(),
                        reason: s.wal_status.clone().unwrap_or_else(|| "lost".into()),
                    });
                }
                if s.plugin != "pgoutput" {
                    return Err(RelayError::SlotPlugin {
                        slot: pg.slot.clone(),
                        plugin: s.plugin.clone(),
                    });
                }
                s.confirmed_flush_lsn.unwrap_or(Lsn::ZERO)
            }
            None if pg.create_slot => {
                if let Err(gap) = self.memory.may_create_slot() {
                    return Err(self.gap(gap));
                }
                let created = repl
                    .create_logical_slot_with(&pg.slot, pg.failover_slot)
                    .await
                    .map_err(|e| slot_creation_error(e, &pg.slot))?;
                self.memory.slot_seen = true;
                tracing::warn!(
                    slot = %pg.slot,
                    consistent_point = %created.consistent_point,
                    failover_slot = version >= 170000 && pg.failover_slot,
                    "created replication slot: events are relayed from transactions committing after this position; anything committed before it is not (use table replay for older rows)"
                );
                created.consistent_point
            }
            None => {
                if self.memory.slot_seen {
                    return Err(self.gap(identity::Gap::SlotGone));
                }
                return Err(RelayError::SlotMissing {
                    slot: pg.slot.clone(),
                });
            }
        };
        let options = pgoutput_options(
            version,
            &pg.publication,
            cfg.mapping.message_prefix.is_some(),
        );
        let start = match self.opts.start_lsn {
            // The operator's check is for the position they gave at start;
            // later sessions resume from the slot (still never below `start`).
            Some(start) if start < confirmed && !self.started => {
                return Err(RelayError::StartBelowConfirmed {
                    start,
                    confirmed,
                    slot: pg.slot.clone(),
                })
            }
            Some(start) if start > confirmed => {
                if !self.started {
                    warn_skipped(&client, pg, confirmed, start).await;
                }
                start
            }
            _ => Lsn::ZERO,
        };
        let wal_sender_timeout = match repl.simple_query("SHOW wal_sender_timeout").await {
            Ok(rows) => rows
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .and_then(|t| facts::parse_wal_sender_timeout(&t)),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read wal_sender_timeout; assuming the default 60s");
                Some(Duration::from_secs(60))
            }
        };
        let silence_limit = facts::silence_limit(wal_sender_timeout);
        let table_oid = facts::table_oid(&client, &pg.table).await?;
        let domains = facts::domain_base_types(&client).await?;
        let mut stream = repl
            .start_logical_replication(&pg.slot, start, &options)
            .await?;
        let from = if start.is_zero() { confirmed } else { start };
        tracing::info!(slot = %pg.slot, from = %from, server_version = version, "streaming");

        if self.sink.is_none() {
            self.sink = Some(KafkaSink::new(&self.sink_settings())?);
        }
        self.metrics.streaming(true);
        self.metrics.slot_held(true);
        // The sampler (its own connection per sample) says when the server
        // refuses connections because it is shutting down.
        let (stopping_tx, server_stopping) = tokio::sync::watch::channel(false);
        // Durable progress: for the live relay (replay neither skips nor records).
        let (skip_below, progress_tx, _writer) = if self.opts.confirm && self.opts.end_lsn.is_none()
        {
            self.durable_progress(pg, &client, &server, repl_db, confirmed)
                .await
        } else {
            (Lsn::ZERO, None, None)
        };
        // The SQL connection now samples lag for the metrics and the progress log.
        drop(client);
        let sampler = tokio::spawn(sample_lag(
            pg.clone(),
            stream.backend_pid(),
            self.metrics.clone(),
            stopping_tx,
        ));
        let _sampler = AbortOnDrop(sampler);
        let sink = self.sink.as_mut().expect("sink was just ensured");
        self.started = true;

        let mut session = Session {
            cfg: &cfg,
            opts: &self.opts,
            hold_at: confirmed,
            finished: false,
            metrics: &self.metrics,
            generation,
            tracker: AckTracker::new(confirmed),
            mapper: OutboxMapper::new(cfg.mapping.clone(), pg.table.clone())
                .with_envelope(crate::envelope::Envelope::for_config(&cfg))
                .with_table_oid(table_oid)
                .with_domains(domains),
            silence_limit,
            last_wal_start: Lsn::ZERO,
            shutdown_detector: letgo::ShutdownDetector::default(),
            server_stopping,
            skip_below,
            skipped: Some((0, 0)),
            skipping: false,
            progress: progress_tx,
            acked_since_progress: false,
            last_sent_flush: confirmed,
            prompt_at: None,
            decoder: Decoder::new(),
            window: Window::default(),
            txn: None,
            queued: None,
            known_topics: HashSet::new(),
            warned_tables: HashSet::new(),
            last_status: Instant::now(),
            received: stages::Received::now(),
            burst_produced: None,
            coalesce: coalesce::Coalesce::default(),
            delivery: self.delivery.for_session(confirmed),
            cleanup: (cfg.relay.delete_delivered
                && self.opts.confirm
                && self.opts.end_lsn.is_none())
            .then(|| {
                cleanup::Cleanup::new(Some(cleanup::spawn(
                    pg.clone(),
                    pg.table.clone(),
                    cfg.mapping.id_column.clone(),
                )))
            }),
        };
        let result = session.run(&mut stream, sink, &self.shutdown).await;
        session.report_skipped();
        let stream = if matches!(result, Err(RelayError::ServerShuttingDown { .. })) {
            // End the copy so the walsender exits now (it has nothing more to
            // send; a window-full stream still has data in the socket, which
            // `finish` reads past, bounded by its timeout).
            if let Err(e) = stream.finish(LET_GO_FINISH_TIMEOUT).await {
                tracing::debug!(error = %e, "replication stream did not finish cleanly");
            }
            None
        } else {
            Some(stream)
        };
        // The PostgreSQL side failed (connection lost, server stopping or
        // silent) with records in flight: a broker that is fine acknowledges
        // them now. Not after the broker's own failures: nothing would come.
        let postgres_side = matches!(
            result,
            Err(RelayError::Replication(_)
                | RelayError::Sql(_)
                | RelayError::StreamEnded
                | RelayError::ServerShuttingDown { .. }
                | RelayError::ServerSilent(_))
        );
        if postgres_side && self.opts.confirm && self.opts.end_lsn.is_none() {
            session.settle(sink, SETTLE_TIMEOUT).await;
        }
        let confirmed = if self.opts.confirm {
            session.tracker.flushed()
        } else {
            session.hold_at
        };
        self.memory
            .note_confirmed(confirmed, session.tracker.flushed_commit_time());
        if self.opts.confirm && self.opts.end_lsn.is_none() {
            self.acked = Some((server.clone(), session.tracker.flushed()));
        }
        let last_wal_start = session.last_wal_start;
        let finished = session.finished;
        if let Err(e @ RelayError::ServerShuttingDown { .. }) = result {
            return Err(e);
        }
        if let Err(e) = result {
            return Err(self.judge_decode_failure(e, last_wal_start));
        }
        self.decode_failures = None;
        if let Some(stream) = stream {
            if let Err(e) = stream.finish(FINISH_TIMEOUT).await {
                tracing::debug!(error = %e, "replication stream did not finish cleanly");
            }
        }
        Ok(if finished {
            SessionEnd::Finished
        } else {
            SessionEnd::Shutdown
        })
    }
}

impl Relay {
    /// Read the progress record (if it belongs to this slot on this server)
    /// and start its writer. Without the table (no privilege to create it),
    /// say so once and run without: duplicates are then bounded by the slot.
    async fn durable_progress(
        &mut self,
        pg: &crate::config::PostgresConfig,
        client: &crate::sql::SqlConnection,
        server: &identity::ServerIdentity,
        database: String,
        confirmed: Lsn,
    ) -> (
        Lsn,
        Option<tokio::sync::watch::Sender<Lsn>>,
        Option<AbortOnDrop>,
    ) {
        let owner = progress::Owner {
            slot: pg.slot.clone(),
            database,
            system_id: server.system_id.clone(),
            timeline: server.timeline,
        };
        let recorded = match progress::prepare(client, &pg.table).await {
            Ok(()) => progress::read(client, &pg.table, &owner).await,
            Err(e) => Err(e),
        };
        let recorded = match recorded {
            Ok(r) => {
                self.progress_warned = false;
                r
            }
            Err(e) => {
                if !self.progress_warned {
                    tracing::warn!(
                        error = %e,
                        table = %progress::table_name(&pg.table),
                        "cannot use the progress table: after a PostgreSQL crash the relay re-sends what the slot forgot (create it with sql/04_progress.sql, or grant the relay CREATE on the schema)"
                    );
                    self.progress_warned = true;
                }
                return (Lsn::ZERO, None, None);
            }
        };
        // What the last session of this process saw acknowledged on this very
        // server and timeline counts too: it may be ahead of the record.
        let remembered = self
            .acked
            .as_ref()
            .filter(|(on, _)| on == server)
            .map(|&(_, lsn)| lsn);
        let known = recorded.max(remembered);
        let skip_below = known.filter(|&r| r > confirmed).unwrap_or(Lsn::ZERO);
        let (tx, rx) = tokio::sync::watch::channel(recorded.unwrap_or(Lsn::ZERO).max(confirmed));
        if let Some(r) = remembered {
            // Record it now: the writer writes what changes.
            tx.send_if_modified(|v| {
                let moved = r > *v;
                *v = (*v).max(r);
                moved
            });
        }
        let writer = tokio::spawn(progress::writer(pg.clone(), pg.table.clone(), owner, rx));
        (skip_below, Some(tx), Some(AbortOnDrop(writer)))
    }

    /// A process that never saw its slot, on a server promoted since the
    /// progress table last recorded the slot on this cluster: the slot did not
    /// come through the promotion unless it is a failover slot (`carried`).
    async fn lost_in_failover(
        &self,
        client: &crate::sql::SqlConnection,
        server: &identity::ServerIdentity,
        database: &str,
        carried: bool,
    ) -> Option<RelayError> {
        let pg = &self.cfg.postgres;
        let (system_id, timeline, recorded, at) =
            progress::read_any(client, &pg.table, &pg.slot, database).await?;
        if carried || system_id != server.system_id || timeline >= server.timeline {
            return None;
        }
        let forget = format!(
            "DELETE FROM {} WHERE slot_name = {}",
            progress::table_name(&pg.table),
            crate::config::quote_literal(&pg.slot)
        );
        let from = at.checked_sub(Duration::from_secs(60)).unwrap_or(at);
        Some(RelayError::SlotGap {
            gap: identity::Gap::LostInFailover {
                recorded_timeline: timeline,
                now: server.timeline,
                recorded,
                forget,
            }
            .describe(&pg.slot),
            loss: format!(
                "The relay had acknowledged everything up to {recorded} by {}; events committed after that may be missing from Kafka: backfill them from the outbox table with `outbox-relay replay --from-time {}` (a minute of margin; consumers deduplicate by id)",
                humantime::format_rfc3339_seconds(at),
                humantime::format_rfc3339_seconds(from),
            ),
        })
    }

    /// The fatal error for a gap, naming what was delivered and the backfill.
    fn gap(&self, gap: identity::Gap) -> RelayError {
        RelayError::SlotGap {
            gap: gap.describe(&self.cfg.postgres.slot),
            loss: self.memory.describe_loss(),
        }
    }

    /// A decode error is retried (a reconnect may have been all it needed),
    /// but the same error at the same position session after session is the
    /// bytes themselves: stop after [`DECODE_RETRIES`] instead of looping.
    fn judge_decode_failure(&mut self, e: RelayError, at: Lsn) -> RelayError {
        let RelayError::Decode(error) = e else {
            return e;
        };
        let times = match self.decode_failures {
            Some((lsn, n)) if lsn == at => n + 1,
            _ => 1,
        };
        self.decode_failures = Some((at, times));
        if times >= DECODE_RETRIES {
            RelayError::DecodeRepeated {
                lsn: at,
                times,
                error,
            }
        } else {
            RelayError::Decode(error)
        }
    }
}

/// Losing the creation race (SQLSTATE 42710, "already exists": another relay
/// created the slot between our look and our CREATE) means standing by.
fn slot_creation_error(e: ReplicationError, slot: &str) -> RelayError {
    match e {
        ReplicationError::Server(s) if s.code == "42710" => {
            RelayError::SlotCreationRace(slot.to_string())
        }
        e => e.into(),
    }
}

/// `--start-lsn` above the confirmed position: say what will be skipped,
/// counting the outbox rows in between with a (non-consuming) peek.
async fn warn_skipped(
    client: &tokio_postgres::Client,
    pg: &crate::config::PostgresConfig,
    confirmed: Lsn,
    start: Lsn,
) {
    let count = client
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, NULL, \
             'proto_version', '1', 'publication_names', $3) WHERE get_byte(data, 0) = 73",
            // pgoutput parses publication_names as a list of identifiers.
            &[
                &pg.slot,
                &start.to_string(),
                &format!("\"{}\"", pg.publication.replace('"', "\"\"")),
            ],
        )
        .await
        .map(|row| row.get::<_, i64>(0));
    match count {
        Ok(n) => tracing::warn!(
            from = %confirmed, to = %start, skipped_rows = n,
            "--start-lsn skips every transaction committing between the slot's confirmed position and the start position, for good"
        ),
        Err(e) => tracing::warn!(
            from = %confirmed, to = %start, error = %crate::setup::describe_pg_error(&e),
            "--start-lsn skips every transaction committing between the slot's confirmed position and the start position, for good (could not count them)"
        ),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::ServerError;

    fn server_error(code: &str, message: &str) -> ReplicationError {
        ReplicationError::Server(ServerError {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        })
    }

    #[test]
    fn losing_the_slot_creation_race_means_standing_by() {
        let e = slot_creation_error(
            server_error("42710", "replication slot \"s\" already exists"),
            "s",
        );
        assert!(e.is_slot_busy(), "{e}");
        assert_eq!(e.disposition(), Disposition::Retry);
        // Other creation errors keep their own disposition.
        let e = slot_creation_error(server_error("42501", "permission denied"), "s");
        assert!(!e.is_slot_busy());
        assert_eq!(e.disposition(), Disposition::Fatal);
    }

    #[test]
    fn gaps_and_repeated_decode_failures_are_fatal() {
        let gap = RelayError::SlotGap {
            gap: "gone".into(),
            loss: "lost".into(),
        };
        assert_eq!(gap.disposition(), Disposition::Fatal);
        let cfg = Config::default();
        let mut relay = Relay::new(cfg, CancellationToken::new());
        let decode = || RelayError::Decode(DecodeError::Empty);
        let at = Lsn(0x10);
        for _ in 1..DECODE_RETRIES {
            let e = relay.judge_decode_failure(decode(), at);
            assert_eq!(e.disposition(), Disposition::Retry, "{e}");
        }
        let e = relay.judge_decode_failure(decode(), at);
        assert!(matches!(e, RelayError::DecodeRepeated { .. }), "{e}");
        assert_eq!(e.disposition(), Disposition::Fatal);
        assert!(e.to_string().contains("0/10"), "{e}");
        // Another position starts the count again.
        let e = relay.judge_decode_failure(decode(), Lsn(0x20));
        assert_eq!(e.disposition(), Disposition::Retry);
    }
}
