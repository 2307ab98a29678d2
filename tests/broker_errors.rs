//! The Kafka producer against librdkafka's mock cluster (the only broker
//! that lets a test choose the error code or delay a Produce request gets).

mod harness;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use harness::unique_name;
use outbox_relay::kafka::{DeliveryToken, KafkaSink, SinkSettings};

const TOPIC: &str = "outbox.event.Order";

/// A consumed record: its `id` header and the headers we check.
#[derive(Debug)]
#[allow(dead_code)] // the fields are read by the tests of broker errors
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

/// A producer being replaced keeps its records until they are delivered (or
/// failed), instead of purging requests already on the wire that the broker
/// could append after the new producer's copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_producer_finishes_its_records_before_it_is_dropped() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    cluster
        .broker_round_trip_time(1, Duration::from_millis(1500))
        .unwrap();
    let settings = SinkSettings {
        brokers: cluster.bootstrap_servers(),
        properties: Default::default(),
        create_topics: false,
        topic_partitions: 1,
        topic_replication_factor: 1,
        max_in_flight_records: 1000,
    };
    let mut sink = KafkaSink::new(&settings).unwrap();
    sink.prepare_topic(TOPIC).await.unwrap();
    // A token from a throwaway tracker: the sink only carries it.
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
    };
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
    assert_eq!(got.len(), 1, "{got:?}");
}
