//! The Kafka side: an idempotent, pipelined producer whose delivery reports
//! come back to the relay loop as [`SinkEvent`]s, plus topic preparation.
//!
//! librdkafka's `ThreadedProducer` polls on its own thread; its delivery
//! callback forwards each report over a channel, so the relay loop never
//! waits for one acknowledgement before sending the next record. The channel
//! is unbounded, but it never holds more than the relay's in-flight window
//! (every event answers one record the window admitted) plus rare error events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, PurgeConfig, ThreadedProducer};
use rdkafka::ClientContext;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ack::TxnToken;
use crate::lsn::Lsn;
use crate::outbox::OutboxRecord;

/// Producer settings the relay sets before the operator's own properties,
/// which override them. Each is a deliberate choice:
pub const DEFAULT_PRODUCER_PROPERTIES: &[(&str, &str)] = &[
    // Guarantee 2 (ack after broker) and no duplicates from producer retries.
    ("enable.idempotence", "true"),
    ("acks", "all"),
    // Latency first: batch for at most 1 ms (librdkafka's default is 5 ms).
    ("linger.ms", "1"),
    // Same key → same partition as the Java client (and Debezium) would pick.
    ("partitioner", "murmur2_random"),
    ("client.id", "outbox-relay"),
];

/// librdkafka's defaults for the two timeouts that bound a record's life in
/// the producer (`message.timeout.ms`, `request.timeout.ms`).
const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_millis(300_000);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_millis(30_000);

/// Where a record sits in the stream, the same in every session that replays
/// it: its transaction's commit LSN and its place among the records produced
/// from that transaction (dead-letter records included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordPosition {
    pub commit_lsn: Lsn,
    pub ordinal: u32,
}

impl std::fmt::Display for RecordPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "record #{} of the transaction committing at {}",
            self.ordinal + 1,
            self.commit_lsn
        )
    }
}

/// Everything the relay needs to finish a record when its report comes back.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryToken {
    /// Session generation: reports from an earlier session are ignored.
    pub generation: u64,
    pub txn: TxnToken,
    pub bytes: usize,
    /// Commit time of the row's transaction (µs since 2000-01-01), for latency.
    pub commit_time: i64,
    pub position: RecordPosition,
    /// The record's valid W3C trace parent, when spans are on ([`crate::trace`]).
    pub trace: Option<crate::trace::TraceParent>,
    /// When the producer took the record (the broker stage's start); `None`
    /// where not measured (replay).
    pub handed: Option<std::time::Instant>,
}

/// A record the producer gave up on.
#[derive(Debug)]
pub struct DeliveryFailure {
    pub token: DeliveryToken,
    pub error: KafkaError,
    /// The record's topic, from the report.
    pub topic: String,
}

/// What the producer tells the relay loop.
#[derive(Debug)]
pub enum SinkEvent {
    Delivered(DeliveryToken),
    Failed(DeliveryFailure),
    /// librdkafka raised a fatal error: the producer must be rebuilt.
    Fatal(String),
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    #[error("cannot create the Kafka producer: {0}; check kafka brokers and properties")]
    Create(KafkaError),
    #[error("cannot create topic {topic:?}: {reason}")]
    CreateTopic {
        topic: String,
        reason: String,
        /// Broker unreachable, timed out...: worth retrying. Otherwise the
        /// broker refused (invalid name, policy, authorization, replication).
        transient: bool,
    },
    #[error("topic {topic:?} does not exist and topic creation is off; create it, or enable kafka.create_topics")]
    TopicMissing { topic: String },
    #[error("cannot read Kafka metadata for topic {topic:?}: {source}; is the broker reachable?")]
    Metadata { topic: String, source: KafkaError },
    #[error("the Kafka producer's queue is full")]
    QueueFull,
    #[error("cannot hand a record to the Kafka producer: {0}")]
    Produce(KafkaError),
}

impl KafkaSinkError {
    /// Worth retrying after a reconnect (as opposed to needing an operator).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            KafkaSinkError::Metadata { .. }
                | KafkaSinkError::QueueFull
                | KafkaSinkError::Produce(_)
        ) || matches!(
            self,
            KafkaSinkError::CreateTopic {
                transient: true,
                ..
            }
        )
    }
}

/// Forwards librdkafka callbacks to the relay loop.
pub struct SinkContext {
    events: mpsc::UnboundedSender<SinkEvent>,
}

/// librdkafka's own log lines at our levels. Its `err` level is mostly about
/// connections (refused, reset, timed out) that it retries by itself, and
/// what that costs reaches the relay as delivery reports, so it logs at WARN:
/// ERROR is for what needs a human.
fn log_librdkafka(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
            tracing::error!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", facility = fac, "{message}")
        }
    }
}

/// The admin client's context: only its log levels differ from the default.
pub struct AdminContext;

impl ClientContext for AdminContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_librdkafka(level, fac, message);
    }
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_librdkafka(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
            let _ = self
                .events
                .send(SinkEvent::Fatal(format!("{error}: {reason}")));
        } else {
            // Transient (broker down, connection refused...): librdkafka retries
            // by itself; the delivery reports say whether it worked in time.
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Box<DeliveryToken>;

    fn delivery(&self, result: &DeliveryResult<'_>, token: Self::DeliveryOpaque) {
        let event = match result {
            Ok(_) => SinkEvent::Delivered(*token),
            Err((error, message)) => SinkEvent::Failed(DeliveryFailure {
                token: *token,
                error: error.clone(),
                topic: rdkafka::Message::topic(message).to_string(),
            }),
        };
        // The receiver is gone only while the relay shuts down.
        let _ = self.events.send(event);
    }
}

/// The producer plus the receiving end of its reports.
pub struct KafkaSink {
    producer: ThreadedProducer<SinkContext>,
    admin: AdminClient<AdminContext>,
    events: mpsc::UnboundedReceiver<SinkEvent>,
    create_topics: bool,
    partitions: i32,
    replication_factor: i32,
    /// How long a record may live in librdkafka (see [`KafkaSink::close_for_rebuild`]).
    record_lifetime: Duration,
}

/// How to build a [`KafkaSink`]. `properties` may hold secrets (`sasl.password`,
/// rendered from the typed `kafka.sasl_*` settings): `Debug` redacts them.
#[derive(Clone)]
pub struct SinkSettings {
    pub brokers: String,
    pub properties: BTreeMap<String, String>,
    pub create_topics: bool,
    pub topic_partitions: i32,
    pub topic_replication_factor: i32,
    /// The relay's in-flight record window; the producer queue is sized to hold it.
    pub max_in_flight_records: usize,
}

impl SinkSettings {
    /// The producer settings of a configuration (run, replay and `check` alike).
    pub fn from_config(cfg: &crate::config::Config) -> SinkSettings {
        SinkSettings {
            brokers: cfg.kafka.brokers.clone(),
            properties: cfg.kafka.properties.clone(),
            create_topics: cfg.kafka.create_topics,
            topic_partitions: cfg.kafka.topic_partitions,
            topic_replication_factor: cfg.kafka.topic_replication_factor,
            max_in_flight_records: cfg.relay.max_in_flight_records,
        }
    }
}

impl std::fmt::Debug for SinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let props = crate::config::redacted_properties(
            self.properties
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        f.debug_struct("SinkSettings")
            .field("brokers", &self.brokers)
            .field("properties", &props)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .field("max_in_flight_records", &self.max_in_flight_records)
            .finish()
    }
}

impl SinkSettings {
    /// The librdkafka configuration: our defaults, then the operator's properties.
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers);
        for (k, v) in DEFAULT_PRODUCER_PROPERTIES {
            cfg.set(*k, *v);
        }
        // Room for the whole window, so QueueFull stays the exception.
        let queue = self.max_in_flight_records.clamp(1000, 10_000_000);
        cfg.set("queue.buffering.max.messages", queue.to_string());
        for (k, v) in &self.properties {
            cfg.set(k, v);
        }
        cfg
    }

    /// The longest a record can stay in librdkafka: `message.timeout.ms`
    /// (alias `delivery.timeout.ms`) until it is failed locally, plus one
    /// `request.timeout.ms` because a record already sent is only failed when
    /// its request times out. `0` (infinite) counts as the default.
    pub fn record_lifetime(&self) -> Duration {
        let ms = |keys: &[&str], default: Duration| {
            keys.iter()
                .find_map(|k| self.properties.get(*k))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
                .unwrap_or(default)
        };
        ms(
            &["message.timeout.ms", "delivery.timeout.ms"],
            DEFAULT_MESSAGE_TIMEOUT,
        ) + ms(&["request.timeout.ms"], DEFAULT_REQUEST_TIMEOUT)
    }
}

impl KafkaSink {
    pub fn new(settings: &SinkSettings) -> Result<Self, KafkaSinkError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let cfg = settings.client_config();
        let producer: ThreadedProducer<SinkContext> = cfg
            .create_with_context(SinkContext { events: tx })
            .map_err(KafkaSinkError::Create)?;
        let admin: AdminClient<AdminContext> = cfg
            .create_with_context(AdminContext)
            .map_err(KafkaSinkError::Create)?;
        Ok(KafkaSink {
            producer,
            admin,
            events: rx,
            create_topics: settings.create_topics,
            partitions: settings.topic_partitions,
            replication_factor: settings.topic_replication_factor,
            record_lifetime: settings.record_lifetime(),
        })
    }

    /// Hand one record to librdkafka. `Err(QueueFull)` means "wait for
    /// deliveries and try again", never "drop".
    pub fn send(&self, record: &OutboxRecord, token: DeliveryToken) -> Result<(), KafkaSinkError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (name, value) in &record.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_ref()),
            });
        }
        let mut rec: BaseRecord<'_, [u8], [u8], Box<DeliveryToken>> =
            BaseRecord::with_opaque_to(&record.topic, Box::new(token)).headers(headers);
        if let Some(k) = &record.key {
            rec = rec.key(k.as_ref());
        }
        if let Some(p) = &record.payload {
            rec = rec.payload(p.as_ref());
        }
        match self.producer.send(rec) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(KafkaSinkError::QueueFull)
            }
            Err((e, _)) => Err(KafkaSinkError::Produce(e)),
        }
    }

    /// Next delivery report or producer event. Cancellation-safe.
    pub async fn next_event(&mut self) -> Option<SinkEvent> {
        self.events.recv().await
    }

    /// The next report if one is already waiting; never waits.
    pub fn try_next_event(&mut self) -> Option<SinkEvent> {
        self.events.try_recv().ok()
    }

    /// A fatal producer error, if librdkafka has raised one.
    pub fn fatal_error(&self) -> Option<String> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }

    /// Make sure `topic` exists before its first record: create it (when
    /// allowed; an existing topic is fine), or check the metadata.
    pub async fn prepare_topic(&self, topic: &str) -> Result<(), KafkaSinkError> {
        if self.create_topics {
            let replication = TopicReplication::Fixed(self.replication_factor);
            let new = NewTopic::new(topic, self.partitions, replication);
            let opts = AdminOptions::new()
                .operation_timeout(Some(Duration::from_secs(10)))
                .request_timeout(Some(Duration::from_secs(15)));
            let results = self.admin.create_topics([&new], &opts).await.map_err(|e| {
                KafkaSinkError::CreateTopic {
                    topic: topic.to_string(),
                    reason: e.to_string(),
                    transient: true,
                }
            })?;
            for r in results {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => {
                        use RDKafkaErrorCode::*;
                        let refused = matches!(
                            code,
                            InvalidTopic
                                | PolicyViolation
                                | TopicAuthorizationFailed
                                | ClusterAuthorizationFailed
                                | InvalidReplicationFactor
                                | InvalidPartitions
                                | InvalidReplicaAssignment
                                | InvalidConfig
                                | InvalidRequest
                                | UnsupportedVersion
                        );
                        return Err(KafkaSinkError::CreateTopic {
                            topic: topic.to_string(),
                            reason: format!("{code:?} ({code})"),
                            transient: !refused,
                        });
                    }
                }
            }
            tracing::info!(topic, "kafka topic ready");
            return Ok(());
        }
        // A blocking librdkafka call, once per topic: keep the runtime's other
        // tasks running while it waits (needs the multi-thread runtime).
        let metadata = tokio::task::block_in_place(|| {
            self.producer
                .client()
                .fetch_metadata(Some(topic), Duration::from_secs(10))
        })
        .map_err(|source| KafkaSinkError::Metadata {
            topic: topic.to_string(),
            source,
        })?;
        let known = metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if known {
            Ok(())
        } else {
            Err(KafkaSinkError::TopicMissing {
                topic: topic.to_string(),
            })
        }
    }

    /// Close a producer that is being replaced, so that none of its records
    /// can land after the copies its replacement sends (per-key order).
    ///
    /// We flush rather than fence: fencing needs a `transactional.id` and
    /// transactions, which cost a round trip per commit. Flushing waits until
    /// librdkafka holds none of the producer's records, each delivered or failed;
    /// that takes at most [`SinkSettings::record_lifetime`] (by then librdkafka
    /// has failed every record locally or its request timed out). Dropping
    /// earlier would purge records whose requests are already on the wire, and
    /// the broker may still append them after the new producer's copies.
    /// Shutdown cuts the wait short: no new producer follows then. Returns
    /// whether the producer was empty when it was dropped.
    ///
    /// Records still in librdkafka's queues are purged first: they are not on
    /// the wire, so they cannot land later, and the next session sends them
    /// again from the slot anyway. Only requests on the wire are waited for.
    /// That keeps the wait short, and keeps the old producer from sending its
    /// queue under an epoch it bumped on its own after timeouts (tansu 0.6
    /// panics on such a produce).
    pub async fn close_for_rebuild(self, shutdown: &CancellationToken) -> bool {
        let bound = self.record_lifetime;
        self.producer.purge(PurgeConfig::default().queue());
        let pending = self.producer.in_flight_count();
        if pending > 0 {
            tracing::warn!(
                pending,
                bound = ?bound,
                "waiting for the discarded kafka producer's records to be delivered or failed before its replacement sends"
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let producer = self.producer;
        let admin = self.admin;
        let drained = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            while producer.in_flight_count() > 0
                && start.elapsed() < bound
                && !stop_flag.load(Ordering::Relaxed)
            {
                let _ = producer.flush(Duration::from_millis(100));
            }
            let left = producer.in_flight_count();
            drop(producer);
            drop(admin);
            left
        });
        tokio::pin!(drained);
        let left = tokio::select! {
            left = &mut drained => left,
            _ = shutdown.cancelled() => {
                stop.store(true, Ordering::Relaxed);
                drained.await
            }
        };
        match left {
            Ok(0) => true,
            Ok(left) if !shutdown.is_cancelled() => {
                tracing::error!(
                    left,
                    bound = ?bound,
                    "the discarded kafka producer still held records after message.timeout.ms + request.timeout.ms; if the broker appends them later, they land after their copies (per-key order)"
                );
                false
            }
            _ => false,
        }
    }

    /// Wait (bounded) for librdkafka to finish what it holds, then drop the
    /// producer off the async runtime (dropping purges and joins a thread).
    pub async fn close(self, timeout: Duration) {
        let producer = self.producer;
        let admin = self.admin;
        let _ = tokio::task::spawn_blocking(move || {
            let _ = producer.flush(timeout);
            drop(producer);
            drop(admin);
        })
        .await;
    }
}
