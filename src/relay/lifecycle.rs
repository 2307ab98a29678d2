//! One session's life: connect (choosing the server and pinning every
//! connection of the session to it), check the server and the slot, start
//! streaming with the producer and the helper tasks (lag sampler, progress
//! writer, cleanup), run the loop ([`super::session`]) and, after it, let go
//! of a stopping server, settle what the broker still acknowledges and record
//! what was confirmed.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio_util::task::AbortOnDropHandle;

use crate::ack::AckTracker;
use crate::kafka::KafkaSink;
use crate::lsn::Lsn;
use crate::outbox::OutboxMapper;
use crate::pgoutput::Decoder;
use crate::replication::ReplicationClient;
use crate::setup;

use super::lag::sample_lag;
use super::limits::Window;
use super::session::Session;
use super::{cleanup, facts, letgo, pgoutput_options, stages, Relay, RelayError, LOG_TARGET};

/// How long ending the copy may take when letting go for a server shutdown.
const LET_GO_FINISH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the final CopyDone handshake may take at shutdown.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed session, how long to keep taking the broker's
/// acknowledgements of records still in flight (usually milliseconds), so the
/// next session skips them instead of sending them again.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a session ended without error.
pub(super) enum SessionEnd {
    /// Stopped by the shutdown signal.
    Shutdown,
    /// Reached [`super::StreamOptions::end_lsn`].
    Finished,
}

impl Relay {
    /// One session, from connecting to what it confirmed; an error says what
    /// ended it ([`RelayError::disposition`] decides what follows).
    pub(super) async fn session(&mut self) -> Result<SessionEnd, RelayError> {
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

        let (server, repl_db) = self
            .check_server(&mut repl, &client, pg, &connect, version, slot.is_some())
            .await?;
        let confirmed = self
            .confirmed_position(&mut repl, pg, slot, version)
            .await?;
        let options = pgoutput_options(
            version,
            &pg.publication,
            cfg.mapping.message_prefix.is_some(),
        );
        let start = self.start_position(&client, pg, confirmed).await?;
        let wal_sender_timeout = match repl.simple_query("SHOW wal_sender_timeout").await {
            Ok(rows) => rows
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .and_then(|t| facts::parse_wal_sender_timeout(&t)),
            Err(e) => {
                tracing::debug!(target: LOG_TARGET, error = %e, "cannot read wal_sender_timeout; assuming the default 60s");
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
        tracing::info!(target: LOG_TARGET, slot = %pg.slot, from = %from, server_version = version, "streaming");

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
        let _sampler = AbortOnDropHandle::new(sampler);
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
            coalesce: super::coalesce::Coalesce::default(),
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
                tracing::debug!(target: LOG_TARGET, error = %e, "replication stream did not finish cleanly");
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
                tracing::debug!(target: LOG_TARGET, error = %e, "replication stream did not finish cleanly");
            }
        }
        Ok(if finished {
            SessionEnd::Finished
        } else {
            SessionEnd::Shutdown
        })
    }
}
