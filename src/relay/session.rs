//! One streaming session: the loop that owns the stream, the producer handle and the ack tracker.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::ack::{AckError, AckTracker};
use crate::config::{Config, PoisonPolicy};
use crate::kafka::{DeliveryToken, KafkaSink, KafkaSinkError, SinkEvent};
use crate::lsn::Lsn;
use crate::metrics::{latency_since_commit, Metrics};
use crate::outbox::{Mapped, OutboxMapper, OutboxRecord, TxnInfo};
use crate::pgoutput::{Decoder, Message};
use crate::replication::{ReplicationMessage, ReplicationStream};

use super::letgo::ShutdownDetector;
use super::poison::Source;
use super::{
    RelayError, StreamOptions, Window, BURST, HEADER_REPLAY, PROMPT_INTERVAL, QUEUE_FULL_RETRY,
};

/// State of one streaming session.
pub(super) struct Session<'a> {
    pub(super) cfg: &'a Config,
    pub(super) opts: &'a StreamOptions,
    /// With `confirm` off, the position status updates keep reporting.
    pub(super) hold_at: Lsn,
    /// The end position was reached: drain and stop.
    pub(super) finished: bool,
    pub(super) metrics: &'a Metrics,
    pub(super) generation: u64,
    pub(super) tracker: AckTracker,
    pub(super) mapper: OutboxMapper,
    pub(super) decoder: Decoder,
    pub(super) window: Window,
    pub(super) txn: Option<TxnInfo>,
    /// A record librdkafka's queue refused, retried before reading more.
    pub(super) queued: Option<(OutboxRecord, DeliveryToken)>,
    pub(super) known_topics: HashSet<Arc<str>>,
    pub(super) warned_tables: HashSet<String>,
    pub(super) last_status: Instant,
    /// When the frames being handled were read ([`super::stages`]).
    pub(super) received: super::stages::Received,
    /// Records handed to the producer in the current burst, for the metrics
    /// (see `after_intake`): topic, records, bytes.
    pub(super) burst_produced: Option<(Arc<str>, u64, u64)>,
    /// Silence after which the server is presumed gone, from its
    /// `wal_sender_timeout` ([`super::facts::silence_limit`]); `None`: never.
    pub(super) silence_limit: Option<std::time::Duration>,
    /// `wal_start` of the last XLogData received (names a decode failure).
    pub(super) last_wal_start: Lsn,
    /// Notices that the server waits on us to shut down ([`super::letgo`]).
    pub(super) shutdown_detector: ShutdownDetector,
    /// `true` once the server refused the lag sampler's connection because
    /// it is shutting down: the stream may not be read (window full) to see
    /// the walsender's pings.
    pub(super) server_stopping: tokio::sync::watch::Receiver<bool>,
    /// Durable progress ([`super::progress`]): transactions committing below
    /// this position were acknowledged before; they are skipped, not re-sent.
    pub(super) skip_below: Lsn,
    /// Transactions and records skipped so far; `None` once reported.
    pub(super) skipped: Option<(u64, u64)>,
    /// The open transaction is one of those.
    pub(super) skipping: bool,
    /// Where acknowledged positions go to be recorded (live relay only).
    pub(super) progress: Option<tokio::sync::watch::Sender<Lsn>>,
    /// Records were acknowledged since the record was last updated.
    pub(super) acked_since_progress: bool,
    /// The flush position of the last status update sent.
    pub(super) last_sent_flush: Lsn,
    /// When to send a prompt status update (the flush position moved).
    pub(super) prompt_at: Option<tokio::time::Instant>,
    /// Delivery failures remembered across sessions (see `delivery.rs`).
    pub(super) delivery: &'a mut super::delivery::DeliveryMemory,
    /// `--delete-delivered` (live relay only, see `cleanup.rs`).
    pub(super) cleanup: Option<super::cleanup::Cleanup>,
    /// Read coalescing while behind ([`super::coalesce`]).
    pub(super) coalesce: super::coalesce::Coalesce,
}

impl Session<'_> {
    pub(super) async fn run(
        &mut self,
        stream: &mut ReplicationStream,
        sink: &mut KafkaSink,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        let relay_cfg = &self.cfg.relay;
        let mut status = tokio::time::interval(self.cfg.postgres.status_interval);
        status.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut draining: Option<tokio::time::Instant> = None;
        let mut last_heard = Instant::now();
        let mut stopping_watch = true;

        loop {
            if self.finished && draining.is_none() {
                tracing::info!(end = ?self.opts.end_lsn, "end position reached: draining");
                self.queued = None;
                draining = Some(tokio::time::Instant::now() + relay_cfg.shutdown_timeout);
            }
            if let Some(deadline) = draining {
                if self.tracker.pending_records() == 0 {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    if self.finished {
                        // A replay must not report success with records unacknowledged.
                        return Err(RelayError::Delivery {
                            topic: "(replay)".into(),
                            error: format!(
                                "{} records still unacknowledged at the end position",
                                self.tracker.pending_records()
                            ),
                        });
                    }
                    tracing::warn!(
                        pending = self.tracker.pending_records(),
                        "shutdown deadline reached with records unacknowledged; they will be sent again on the next start"
                    );
                    break;
                }
            }
            let paused_until = self.coalesce.paused_until();
            let intake = draining.is_none()
                && self.queued.is_none()
                && paused_until.is_none()
                && self.window_has_room();
            if !intake {
                // Not reading: the server's silence is ours, not its.
                last_heard = Instant::now();
            }
            let drain_deadline = draining.unwrap_or_else(tokio::time::Instant::now);

            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if draining.is_none() => {
                    tracing::info!(pending = self.tracker.pending_records(), "shutting down: draining in-flight records");
                    self.queued = None;
                    draining = Some(tokio::time::Instant::now() + relay_cfg.shutdown_timeout);
                }
                // Reports wait out a coalescing pause too: one wake-up for both.
                event = sink.next_event(), if paused_until.is_none() => {
                    let event = event.expect("the sink's sender lives as long as the sink");
                    // Reports come in bursts (one per record of a produce
                    // batch): take what is already there in this wake-up,
                    // with one clock reading for all of them.
                    let now = (SystemTime::now(), Instant::now());
                    let mut acked = u64::from(self.on_sink_event(event, now)?);
                    for _ in 1..BURST {
                        let Some(event) = sink.try_next_event() else { break };
                        acked += u64::from(self.on_sink_event(event, now)?);
                    }
                    self.after_acks(acked);
                }
                _ = tokio::time::sleep_until(self.prompt_at.unwrap_or_else(tokio::time::Instant::now)), if self.prompt_at.is_some() => {
                    // Acknowledgements moved the flush position: confirm it now,
                    // not at the next tick, so a relay crash re-sends milliseconds.
                    self.prompt_at = None;
                    self.send_status(stream, false).await?;
                }
                _ = status.tick() => {
                    if self.silence_limit.is_some_and(|limit| last_heard.elapsed() > limit) {
                        return Err(RelayError::ServerSilent(last_heard.elapsed()));
                    }
                    self.send_status(stream, true).await?;
                }
                _ = tokio::time::sleep(QUEUE_FULL_RETRY), if self.queued.is_some() && draining.is_none() => {
                    let (record, token) = self.queued.take().expect("guarded by the branch condition");
                    self.send_record(sink, record, token)?;
                    self.flush_produced();
                }
                _ = tokio::time::sleep_until(drain_deadline), if draining.is_some() => {}
                _ = tokio::time::sleep_until(paused_until.unwrap_or_else(tokio::time::Instant::now)), if paused_until.is_some() => {
                    self.coalesce.resume(stream).map_err(crate::replication::ReplicationError::from)?;
                }
                changed = self.server_stopping.changed(), if stopping_watch => {
                    if changed.is_err() {
                        stopping_watch = false;
                    }
                    if *self.server_stopping.borrow() && self.tracker.pending_records() > 0 {
                        // PostgreSQL refuses connections for a shutdown and we
                        // hold unconfirmed records: its walsender would wait on
                        // them (we may not even be reading its pings).
                        return self.let_go(stream, "the server refuses new connections: it is shutting down").await;
                    }
                }
                msg = stream.next_message(), if intake => {
                    self.received = super::stages::Received::now();
                    match msg? {
                        Some(msg) => self.on_replication_message(msg, stream, sink).await?,
                        None => return Err(RelayError::StreamEnded),
                    }
                    // One socket read holds many frames during catch-up: handle
                    // the buffered ones now, while the window has room, instead
                    // of one select! round (and its timers) per frame.
                    let mut frames = 1;
                    while frames < BURST {
                        if self.finished || self.queued.is_some() || !self.window_has_room() {
                            break;
                        }
                        let Some(msg) = stream.try_next_buffered()? else { break };
                        self.on_replication_message(msg, stream, sink).await?;
                        frames += 1;
                    }
                    self.coalesce.after_burst(frames, self.received.wall, stream);
                    self.after_intake();
                    // Time spent on the burst (preparing a topic on the broker
                    // can take seconds) was ours, not the server's silence.
                    last_heard = Instant::now();
                }
            }
        }
        // Final status update: everything acknowledged so far is confirmed.
        self.send_status(stream, false).await?;
        tracing::info!(flushed = %self.tracker.flushed(), "final status update sent");
        Ok(())
    }

    fn window_has_room(&self) -> bool {
        // The tracker's queue counts too: it holds an entry per transaction
        // with records in flight (and folded markers between them), so it is
        // bounded by the window, but a bound is only a bound when checked.
        self.window.records < self.cfg.relay.max_in_flight_records
            && self.window.bytes < self.cfg.relay.max_in_flight_bytes
            && self.tracker.queued() < self.cfg.relay.max_in_flight_records
            && self.delivery.pace.has_room(self.window.records)
            && self.may_send_more()
    }

    /// Metrics of a burst of delivery reports, once per burst.
    fn after_acks(&mut self, acked: u64) {
        if acked > 0 {
            self.metrics.records_acked(acked);
            self.metrics.acked_lsn(self.tracker.flushed());
            self.acked_since_progress = true;
        }
        self.metrics
            .in_flight(self.window.records, self.window.bytes);
        self.after_progress();
    }

    /// The flush position may have moved: schedule a prompt status update
    /// (at most one per [`PROMPT_INTERVAL`]) and, when records were
    /// acknowledged, hand the position to the progress writer.
    fn after_progress(&mut self) {
        let flushed = self.reported();
        if flushed > self.last_sent_flush && self.prompt_at.is_none() {
            let earliest = tokio::time::Instant::from_std(self.last_status + PROMPT_INTERVAL);
            self.prompt_at = Some(earliest.max(tokio::time::Instant::now()));
        }
        if self.acked_since_progress && self.opts.confirm {
            if let Some(progress) = &self.progress {
                let moved = progress.send_if_modified(|recorded| {
                    let moved = flushed > *recorded;
                    if moved {
                        *recorded = flushed;
                    }
                    moved
                });
                if moved {
                    self.acked_since_progress = false;
                }
            }
        }
    }

    /// Metrics of a burst of replication messages, once per burst.
    fn after_intake(&mut self) {
        self.after_progress();
        self.flush_produced();
        self.metrics.received_lsn(self.tracker.received());
        self.metrics
            .in_flight(self.window.records, self.window.bytes);
    }

    fn flush_produced(&mut self) {
        if let Some((topic, records, bytes)) = self.burst_produced.take() {
            self.metrics.records_produced(&topic, records, bytes);
        }
    }

    /// One producer report, received at `now`; `Ok(true)` when it acknowledged
    /// a record of this session.
    fn on_sink_event(
        &mut self,
        event: SinkEvent,
        now: (SystemTime, Instant),
    ) -> Result<bool, RelayError> {
        match event {
            SinkEvent::Delivered(token) => {
                if token.generation != self.generation {
                    return Ok(false); // a report from before the last reconnect
                }
                self.window.records -= 1;
                self.window.bytes -= token.bytes;
                self.tracker.ack(token.txn)?;
                if self
                    .delivery
                    .pace
                    .acked(self.cfg.relay.max_in_flight_records)
                {
                    tracing::info!("acknowledgements keep up again: the in-flight cap is lifted");
                    self.metrics.in_flight_cap(None);
                }
                self.metrics
                    .ack_latency(latency_since_commit(token.commit_time, now.0));
                self.acknowledged(&token, now.1);
                if let Some(spans) = crate::trace::spans() {
                    spans.acknowledged(&token, now.0);
                }
                Ok(true)
            }
            SinkEvent::Failed(failure) => self.on_delivery_failed(failure),
            SinkEvent::Fatal(reason) => Err(RelayError::ProducerFatal(reason)),
        }
    }

    /// The session failed with records in flight. A healthy broker
    /// acknowledges them within milliseconds: take those acknowledgements
    /// (until the first failure, or `within`) so the flush position covers
    /// them and the next session skips them rather than re-sending them. A
    /// report of an earlier session, or any failure, ends it: whatever is still
    /// in flight then is sent again, as before.
    pub(super) async fn settle(&mut self, sink: &mut KafkaSink, within: Duration) {
        let pending = self.tracker.pending_records();
        if pending == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + within;
        let mut acked = 0u64;
        while self.tracker.pending_records() > 0 {
            let Ok(Some(event)) = tokio::time::timeout_at(deadline, sink.next_event()).await else {
                break;
            };
            if !matches!(event, SinkEvent::Delivered(_)) {
                break;
            }
            match self.on_sink_event(event, (SystemTime::now(), Instant::now())) {
                Ok(true) => acked += 1,
                Ok(false) => {}
                Err(_) => break,
            }
        }
        self.after_acks(acked);
        tracing::info!(
            in_flight = pending,
            acknowledged = acked,
            flushed = %self.tracker.flushed(),
            "session ended with records in flight: took the broker's acknowledgements so the next session skips them"
        );
    }

    /// Say once how much the progress record spared (the first transaction
    /// past it, or the end of the session).
    pub(super) fn report_skipped(&mut self) {
        if let Some((txns, records)) = self.skipped.take() {
            if txns > 0 {
                tracing::info!(
                    transactions = txns,
                    records,
                    recorded = %self.skip_below,
                    "skipped transactions the broker acknowledged before the restart (the progress record is ahead of the slot)"
                );
                self.metrics.progress_skipped(records);
            }
        }
    }

    /// The flush position status updates report.
    fn reported(&self) -> Lsn {
        if self.opts.confirm {
            self.tracker.flushed()
        } else {
            self.hold_at
        }
    }

    /// PostgreSQL is shutting down and waits on confirmations Kafka has not
    /// given: report what is acknowledged (nothing more) and end the session,
    /// so the walsender can exit. The records already handed to the producer
    /// stay there; the next session resumes from the slot.
    async fn let_go(
        &mut self,
        stream: &mut ReplicationStream,
        why: &'static str,
    ) -> Result<(), RelayError> {
        self.send_status(stream, false).await?;
        let pending = self.tracker.pending_records();
        tracing::info!(
            confirmed = %self.reported(),
            received = %self.tracker.received(),
            pending,
            why,
            "PostgreSQL is shutting down while Kafka has not acknowledged everything: letting go of the stream so the server can stop; resuming from the slot when it is back"
        );
        self.metrics.shutdown_release();
        Err(RelayError::ServerShuttingDown { pending })
    }

    async fn send_status(
        &mut self,
        stream: &mut ReplicationStream,
        reply_requested: bool,
    ) -> Result<(), RelayError> {
        let flushed = self.reported();
        stream
            .send_status_update(self.tracker.received(), flushed, flushed, reply_requested)
            .await?;
        self.last_status = Instant::now();
        self.last_sent_flush = flushed;
        if let Some(cleanup) = &mut self.cleanup {
            cleanup.confirmed(flushed);
        }
        self.metrics.status_update_sent();
        self.metrics.confirmed_lsn(flushed);
        if let Some(t) = self.tracker.flushed_commit_time() {
            self.metrics.confirmed_commit_time(t);
        }
        Ok(())
    }

    async fn on_replication_message(
        &mut self,
        msg: ReplicationMessage,
        stream: &mut ReplicationStream,
        sink: &mut KafkaSink,
    ) -> Result<(), RelayError> {
        match msg {
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.tracker.keepalive(wal_end);
                if self.opts.end_lsn.is_some_and(|end| wal_end >= end) && self.txn.is_none() {
                    self.finished = true;
                }
                if reply_requested {
                    self.send_status(stream, false).await?;
                }
                if self.shutdown_detector.on_keepalive(
                    Instant::now(),
                    wal_end,
                    reply_requested,
                    self.tracker.received(),
                    self.reported(),
                ) {
                    return self.let_go(stream, "the walsender asks for replies back to back at a position the relay cannot confirm yet (it waits on Kafka to shut down)").await;
                }
            }
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data,
                ..
            } => {
                self.tracker.note_received(wal_end);
                self.last_wal_start = wal_start;
                self.shutdown_detector.reset();
                match self.decoder.decode(data)? {
                    Message::Begin(b) => {
                        if self.opts.end_lsn.is_some_and(|end| b.final_lsn >= end) {
                            self.finished = true;
                            return Ok(());
                        }
                        self.skipping = b.final_lsn < self.skip_below;
                        if self.skipping {
                            if let Some((txns, _)) = &mut self.skipped {
                                *txns += 1;
                            }
                        } else {
                            self.report_skipped();
                        }
                        self.tracker.begin(b.commit_time)?;
                        self.coalesce.on_begin(b.commit_time);
                        self.txn = Some(TxnInfo {
                            xid: b.xid,
                            commit_lsn: b.final_lsn,
                            commit_time: b.commit_time,
                        });
                    }
                    Message::Commit(c) => {
                        self.tracker.commit(c.end_lsn)?;
                        if let Some(cleanup) = &mut self.cleanup {
                            cleanup.commit(c.end_lsn);
                        }
                        self.txn = None;
                        self.metrics.sent_lsn(c.end_lsn);
                    }
                    Message::Relation(r) => {
                        if let Err(e) = self.mapper.on_relation(&r) {
                            // The mapping cannot apply to the table's new shape.
                            if self.cfg.relay.poison_policy("missing_column") == PoisonPolicy::Stop
                            {
                                return Err(e.into());
                            }
                            tracing::error!(error = %e, "every row of this table shape goes to the dead-letter topic until the mapping or the table is fixed");
                        }
                    }
                    Message::Insert(_) if self.skipping => {
                        if let Some((_, records)) = &mut self.skipped {
                            *records += 1;
                        }
                    }
                    Message::Insert(ins) => {
                        let txn = self.txn.ok_or(AckError::NoOpenTransaction("Insert"))?;
                        match self.mapper.map_insert(&ins, &txn) {
                            Ok(Mapped::Record(record)) => {
                                self.forward(record, Source::Row(&ins), &txn, sink).await?
                            }
                            Ok(Mapped::OtherTable { table }) => self.warn_once(table, "insert"),
                            Err(e) => match e.poison_class() {
                                Some(class) => {
                                    let topic = e.original_topic().map(str::to_string);
                                    self.poison(
                                        class,
                                        e.to_string(),
                                        topic,
                                        Source::Row(&ins),
                                        &txn,
                                        sink,
                                    )
                                    .await?
                                }
                                None => return Err(e.into()),
                            },
                        }
                    }
                    Message::Update(_) => self.warn_once("(update)".into(), "update"),
                    Message::Delete(_) => self.warn_once("(delete)".into(), "delete"),
                    Message::Truncate(_) => self.warn_once("(truncate)".into(), "truncate"),
                    Message::Message(m) => self.on_logical_message(m, sink).await?,
                    Message::Origin(_) | Message::Type(_) => {}
                    Message::StreamStart(_)
                    | Message::StreamStop
                    | Message::StreamCommit(_)
                    | Message::StreamAbort(_) => return Err(RelayError::Unexpected("stream")),
                    Message::BeginPrepare(_)
                    | Message::Prepare(_)
                    | Message::CommitPrepared(_)
                    | Message::RollbackPrepared(_)
                    | Message::StreamPrepare(_) => return Err(RelayError::Unexpected("prepare")),
                }
            }
        }
        Ok(())
    }

    /// Send one mapped record (live or replay) to its topic.
    pub(super) async fn forward(
        &mut self,
        mut record: OutboxRecord,
        source: Source<'_>,
        txn: &TxnInfo,
        sink: &mut KafkaSink,
    ) -> Result<(), RelayError> {
        if let Some(topic) = &self.opts.topic_override {
            record.topic = Arc::from(topic.as_str());
        }
        if let Some(replay) = &self.opts.replay_header {
            record
                .headers
                .push((Arc::from(HEADER_REPLAY), Bytes::from(replay.clone())));
        }
        if let Some(r) = self.rejected_here(txn) {
            return self
                .poison(r.class, r.reason, Some(r.topic), source, txn, sink)
                .await;
        }
        let size = record.size();
        let topic = record.topic.to_string();
        // A row relayed to its own topic may be deleted once confirmed.
        let delete_id = match source {
            Source::Row(_) if self.cleanup.is_some() => record.id.clone(),
            _ => None,
        };
        match self.produce(record, txn, sink).await {
            Ok(()) => {
                if let (Some(cleanup), Some(id)) = (&mut self.cleanup, delete_id) {
                    cleanup.note(&id);
                }
                Ok(())
            }
            Err(RelayError::Kafka(KafkaSinkError::Produce(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge,
            )))) => {
                let reason = format!(
                    "the record is {size} bytes, above the producer's message.max.bytes; raise it on the broker (max.message.bytes) and the relay (--kafka-property message.max.bytes=N), or make the row smaller"
                );
                self.poison("too_large", reason, Some(topic), source, txn, sink)
                    .await
            }
            other => other,
        }
    }

    /// Prepare the topic, then hand the record to the producer.
    pub(super) async fn produce(
        &mut self,
        record: OutboxRecord,
        txn: &TxnInfo,
        sink: &mut KafkaSink,
    ) -> Result<(), RelayError> {
        if !self.known_topics.contains(&record.topic) {
            sink.prepare_topic(&record.topic).await?;
            self.known_topics.insert(record.topic.clone());
        }
        self.row_received(txn.commit_time);
        let token = DeliveryToken {
            generation: self.generation,
            txn: self
                .tracker
                .open_token()
                .ok_or(AckError::NoOpenTransaction("a row"))?,
            bytes: record.size(),
            commit_time: txn.commit_time,
            position: self.next_position(txn),
            trace: crate::trace::parent_of(&record),
            handed: None,
        };
        self.send_record(sink, record, token)
    }

    /// Hand a record to the producer; a full librdkafka queue parks it.
    fn send_record(
        &mut self,
        sink: &KafkaSink,
        record: OutboxRecord,
        mut token: DeliveryToken,
    ) -> Result<(), RelayError> {
        Self::handing(&mut token);
        match sink.send(&record, token) {
            Ok(()) => {
                self.handed(&token);
                // Counted only once librdkafka holds it, so a refused record
                // never leaves its transaction waiting for an acknowledgement.
                self.tracker.record_sent()?;
                self.window.records += 1;
                self.window.bytes += token.bytes;
                // Counted per burst and topic (the metric takes a lock).
                match &mut self.burst_produced {
                    Some((topic, records, bytes)) if *topic == record.topic => {
                        *records += 1;
                        *bytes += token.bytes as u64;
                    }
                    _ => {
                        self.flush_produced();
                        self.burst_produced = Some((record.topic.clone(), 1, token.bytes as u64));
                    }
                }
                Ok(())
            }
            Err(KafkaSinkError::QueueFull) => {
                self.queued = Some((record, token));
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn warn_once(&mut self, what: String, kind: &str) {
        if self.warned_tables.insert(what.clone()) {
            tracing::warn!(
                what = %what,
                kind,
                "the publication sends changes the relay does not forward; limit it to inserts on the outbox table: ALTER PUBLICATION ... SET TABLE <outbox table> WITH (publish = 'insert')"
            );
        }
    }
}
