//! Permanent broker errors on delivery, against real PostgreSQL and
//! librdkafka's mock cluster (the only broker that lets a test choose the
//! error code a Produce request gets back). The relay runs in-process.
//!
//! The mock cluster answers the next Produce requests with the codes pushed
//! by `request_errors`, whatever records they hold: a test controls which
//! *request* fails, and the relay must work out which *record* is at fault.

mod harness;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use harness::outbox::TABLE_SQL;
use harness::{
    lsn_to_u64, slot_active, slot_confirmed_flush_lsn, unique_name, PgCluster, PgVersion,
};
use outbox_relay::config::Config;
use outbox_relay::kafka::{DeliveryToken, KafkaSink, RecordPosition, SinkSettings};
use outbox_relay::relay::{Relay, RelayError};

const DEADLINE: Duration = Duration::from_secs(60);
const TOPIC: &str = "outbox.event.Order";
const DLT: &str = "outbox.dead-letter";

struct Env {
    pg: PgCluster,
    cluster: MockCluster<'static, DefaultProducerContext>,
    slot: String,
    publication: String,
}

impl Env {
    async fn new() -> Env {
        let pg = PgCluster::start(PgVersion::V17, &[]);
        pg.client().await.batch_execute(TABLE_SQL).await.unwrap();
        let cluster = MockCluster::new(1).unwrap();
        for topic in [TOPIC, DLT] {
            cluster.create_topic(topic, 1, 1).unwrap();
        }
        Env {
            pg,
            cluster,
            slot: unique_name("slot"),
            publication: unique_name("pub"),
        }
    }

    fn config(&self, dead_letter: bool) -> Config {
        let mut cfg = Config::default();
        cfg.postgres.url = self.pg.url();
        cfg.postgres.slot = self.slot.clone();
        cfg.postgres.publication = self.publication.clone();
        cfg.postgres.status_interval = Duration::from_millis(200);
        cfg.kafka.brokers = self.cluster.bootstrap_servers();
        // The mock cluster does not serve CreateTopics: the topics exist.
        cfg.kafka.create_topics = false;
        // One produce request for the rows of one transaction.
        cfg.kafka
            .properties
            .insert("linger.ms".into(), "100".into());
        cfg.relay.reconnect_backoff_min = Duration::from_millis(50);
        cfg.relay.reconnect_backoff_max = Duration::from_millis(200);
        cfg.relay.http_listen = "off".into();
        cfg.relay.dead_letter_topic = dead_letter.then(|| DLT.to_string());
        cfg
    }

    /// Start the relay and wait until it streams from its slot.
    async fn relay(
        &self,
        cfg: Config,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<Result<(), RelayError>>,
    ) {
        let stop = CancellationToken::new();
        let task = tokio::spawn(Relay::new(cfg, stop.clone()).run());
        let client = self.pg.client().await;
        harness::wait_until(DEADLINE, "the relay streams", || {
            let client = &client;
            async move { slot_active(client, &self.slot).await == Some(true) }
        })
        .await;
        (stop, task)
    }

    /// Five rows with keys k1..k5 in one transaction; their ids, in order,
    /// and the transaction's commit LSN.
    async fn insert_five(&self) -> (Vec<String>, u64) {
        let mut client = self.pg.client().await;
        let tx = client.transaction().await.unwrap();
        let mut ids = Vec::new();
        for i in 1..=5 {
            let row = tx
                .query_one(
                    "INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload) \
                     VALUES ('Order', $1, 'Created', jsonb_build_object('seq', $2::int)) RETURNING id::text",
                    &[&format!("k{i}"), &i],
                )
                .await
                .unwrap();
            ids.push(row.get::<_, String>(0));
        }
        tx.commit().await.unwrap();
        let lsn: String = client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        (ids, lsn_to_u64(&lsn))
    }

    async fn confirmed(&self) -> u64 {
        let client = self.pg.client().await;
        slot_confirmed_flush_lsn(&client, &self.slot)
            .await
            .map(|l| lsn_to_u64(&l))
            .unwrap_or(0)
    }

    fn fail_produce(&self, errors: &[RDKafkaRespErr]) {
        self.cluster.request_errors(RDKafkaApiKey::Produce, errors);
    }
}

/// A consumed record: its `id` header and the headers we check.
#[derive(Debug)]
struct Got {
    id: String,
    class: Option<String>,
    reason: Option<String>,
}

/// Everything on `topic` (one partition) that arrives within `quiet` of the last record.
async fn consume(
    cluster: &MockCluster<'_, DefaultProducerContext>,
    topic: &str,
    quiet: Duration,
) -> Vec<Got> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", unique_name("g"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let header = |m: &rdkafka::message::BorrowedMessage<'_>, name: &str| {
        m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
    };
    let mut out = Vec::new();
    while let Ok(m) = tokio::time::timeout(quiet, consumer.recv()).await {
        let m = m.unwrap();
        out.push(Got {
            id: header(&m, "id").unwrap_or_default(),
            class: header(&m, "outbox-relay-error-class"),
            reason: header(&m, "outbox-relay-error-reason"),
        });
    }
    out
}

async fn wait_confirmed_past(env: &Env, lsn: u64) {
    harness::wait_until(
        DEADLINE,
        "the slot is confirmed past the transaction",
        || async { env.confirmed().await >= lsn },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn innocent_records_of_a_refused_batch_are_retried_not_dead_lettered() {
    let env = Env::new().await;
    let (stop, task) = env.relay(env.config(true)).await;
    // The one produce request carrying the whole transaction is refused.
    env.fail_produce(&[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD]);
    let (ids, end) = env.insert_five().await;
    wait_confirmed_past(&env, end).await;

    let got: Vec<String> = consume(&env.cluster, TOPIC, Duration::from_secs(3))
        .await
        .into_iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(got, ids, "each row once, in commit order");
    let dead = consume(&env.cluster, DLT, Duration::from_secs(1)).await;
    assert!(dead.is_empty(), "nothing was at fault: {dead:?}");
    assert!(!task.is_finished());
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_alone_is_dead_lettered_and_the_rest_delivered() {
    let env = Env::new().await;
    let (stop, task) = env.relay(env.config(true)).await;
    // The batch is refused, then the first record sent alone is refused too.
    env.fail_produce(&[
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
    ]);
    let (ids, end) = env.insert_five().await;
    wait_confirmed_past(&env, end).await;

    let dead = consume(&env.cluster, DLT, Duration::from_secs(3)).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].id, ids[0]);
    assert_eq!(dead[0].class.as_deref(), Some("rejected_by_broker"));
    let reason = dead[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("INVALID_RECORD"), "{reason}");
    let got: Vec<String> = consume(&env.cluster, TOPIC, Duration::from_secs(1))
        .await
        .into_iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(
        got,
        ids[1..],
        "the innocent rows once each, in commit order"
    );
    assert!(!task.is_finished());
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_topic_refuses_as_too_large_stops_the_relay_without_a_dead_letter_topic() {
    let env = Env::new().await;
    let (_stop, task) = env.relay(env.config(false)).await;
    env.fail_produce(&[
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
    ]);
    let (_ids, end) = env.insert_five().await;
    let err = tokio::time::timeout(DEADLINE, task)
        .await
        .expect("the relay stops instead of retrying forever")
        .unwrap()
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            RelayError::Poison {
                class: "too_large",
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("MSG_SIZE_TOO_LARGE") && msg.contains("max.message.bytes"),
        "{msg}"
    );
    assert!(env.confirmed().await < end, "the slot stays before the row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_the_record_cannot_be_blamed_for_stops_after_repeats_naming_the_code() {
    let env = Env::new().await;
    let (_stop, task) = env.relay(env.config(true)).await;
    env.fail_produce(&[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 20]);
    let (_ids, end) = env.insert_five().await;
    let err = tokio::time::timeout(DEADLINE, task)
        .await
        .expect("the relay stops instead of retrying forever")
        .unwrap()
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RelayError::BrokerRefused { .. }), "{msg}");
    assert!(
        msg.contains("TOPIC_AUTHORIZATION_FAILED")
            && msg.contains("kafka-acls")
            && msg.contains(TOPIC),
        "{msg}"
    );
    assert!(env.confirmed().await < end, "the slot stays before the row");
    let dead = consume(&env.cluster, DLT, Duration::from_secs(1)).await;
    assert!(
        dead.is_empty(),
        "authorization is not the record's fault: {dead:?}"
    );
}

/// A sink on `cluster` (topic [`TOPIC`] ready) with extra producer
/// `properties`, a record, and a delivery token from a throwaway tracker (the
/// sink only carries it).
async fn sink_record_token(
    cluster: &MockCluster<'_, DefaultProducerContext>,
    properties: &[(&str, &str)],
) -> (KafkaSink, outbox_relay::outbox::OutboxRecord, DeliveryToken) {
    let settings = SinkSettings {
        brokers: cluster.bootstrap_servers(),
        properties: properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        create_topics: false,
        topic_partitions: 1,
        topic_replication_factor: 1,
        max_in_flight_records: 1000,
    };
    let sink = KafkaSink::new(&settings).unwrap();
    sink.prepare_topic(TOPIC).await.unwrap();
    let mut tracker = outbox_relay::ack::AckTracker::new(Default::default());
    let txn = tracker.begin(0).unwrap();
    let record = outbox_relay::outbox::OutboxRecord {
        topic: Arc::from(TOPIC),
        key: Some("k".into()),
        payload: Some("{}".into()),
        headers: Vec::new(),
        id: None,
    };
    let token = DeliveryToken {
        generation: 1,
        txn,
        bytes: 2,
        commit_time: 0,
        position: RecordPosition::default(),
        trace: None,
        handed: None,
    };
    (sink, record, token)
}

/// A producer being replaced keeps its records until they are delivered (or
/// failed), instead of purging requests already on the wire that the broker
/// could append after the new producer's copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_producer_finishes_its_records_before_it_is_dropped() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    let (mut sink, record, token) = sink_record_token(&cluster, &[]).await;
    // A first record, acknowledged: the idempotent producer has its id, so
    // the next record's request goes on the wire at once.
    sink.send(&record, token).unwrap();
    tokio::time::timeout(Duration::from_secs(10), sink.next_event())
        .await
        .expect("the first record is acknowledged")
        .expect("sink events");
    cluster
        .broker_round_trip_time(1, Duration::from_millis(1500))
        .unwrap();
    // Let the request reach the (slow) broker, then replace the producer.
    sink.send(&record, token).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sink.try_next_event().is_none(), "not acknowledged yet");
    let began = std::time::Instant::now();
    let drained = sink.close_for_rebuild(&CancellationToken::new()).await;
    assert!(drained, "the producer was dropped holding records");
    assert!(
        began.elapsed() >= Duration::from_millis(1000),
        "close returned after {:?}, before the broker answered",
        began.elapsed()
    );
    cluster.broker_round_trip_time(1, Duration::ZERO).unwrap();
    let got = consume(&cluster, TOPIC, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 2, "{got:?}");
}

/// A producer being replaced drops at once the records that never left its
/// queues (the broker is down): they cannot land later, and the next session
/// sends them again from the slot. Only requests on the wire are waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_producer_purges_records_that_never_left_its_queue() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    let (sink, record, token) =
        sink_record_token(&cluster, &[("message.timeout.ms", "8000")]).await;
    cluster.broker_down(1).unwrap();
    for _ in 0..10 {
        sink.send(&record, token).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let began = std::time::Instant::now();
    let drained = sink.close_for_rebuild(&CancellationToken::new()).await;
    let took = began.elapsed();
    assert!(drained, "the producer was dropped holding records");
    assert!(
        took < Duration::from_secs(4),
        "close waited {took:?} for records that were never sent (message.timeout.ms is 8 s)"
    );
    cluster.broker_up(1).unwrap();
    let got = consume(&cluster, TOPIC, Duration::from_secs(3)).await;
    assert!(got.is_empty(), "purged records reached the broker: {got:?}");
}
