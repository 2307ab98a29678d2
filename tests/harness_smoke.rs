//! The test harness itself works: PostgreSQL 15 and 17 start with logical decoding,
//! tansu round-trips records byte for byte, pauses, and keeps data across a crash.

mod harness;

use std::time::Duration;

use harness::{
    lsn_to_u64, pg_versions, slot_confirmed_flush_lsn, unique_name, Broker, PgCluster, PgVersion,
    RelayProcess, ShutdownMode,
};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

const DEADLINE: Duration = Duration::from_secs(30);

async fn assert_logical_cluster(version: PgVersion) {
    let pg = PgCluster::start(version, &[]);
    let client = pg.client().await;
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(wal_level, "logical", "PostgreSQL {version}");
    let num: String = client
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        num[..2],
        version.major().to_string(),
        "server_version_num {num}"
    );
    for setting in ["max_wal_senders", "max_replication_slots"] {
        let v: String = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap()
            .get(0);
        assert!(v.parse::<u32>().unwrap() >= 10, "{setting} = {v}");
    }
    let fsync: String = client.query_one("SHOW fsync", &[]).await.unwrap().get(0);
    assert_eq!(fsync, "off");

    let slot = unique_name("smoke_slot");
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .unwrap();
    let lsn = slot_confirmed_flush_lsn(&client, &slot)
        .await
        .expect("a new slot has a confirmed_flush_lsn");
    assert!(lsn_to_u64(&lsn) > 0, "{lsn}");
    assert_eq!(
        slot_confirmed_flush_lsn(&client, "no_such_slot").await,
        None
    );
}

#[tokio::test]
async fn pg15_starts_with_logical_decoding() {
    assert_logical_cluster(PgVersion::V15).await;
}

#[tokio::test]
async fn pg17_starts_with_logical_decoding() {
    assert_logical_cluster(PgVersion::V17).await;
}

#[test]
fn every_pg_version_has_binaries() {
    // Panics (naming .ci/install-deps) instead of skipping when one is missing.
    for v in pg_versions() {
        assert!(v.bindir().join("postgres").is_file());
    }
}

#[tokio::test]
async fn wal_level_can_be_overridden() {
    let pg = PgCluster::start_with_wal_level_replica(PgVersion::V15);
    let client = pg.client().await;
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(wal_level, "replica");
    let err = client
        .execute(
            "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
            &[],
        )
        .await
        .unwrap_err();
    let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
    assert!(message.contains("wal_level"), "{err:?}");
}

#[tokio::test]
async fn pg_restart_keeps_port_and_data() {
    let mut pg = PgCluster::start(PgVersion::V17, &[]);
    let port = pg.port();
    pg.client()
        .await
        .batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    for mode in [ShutdownMode::Fast, ShutdownMode::Immediate] {
        pg.restart(mode);
        assert_eq!(pg.port(), port);
        let n: i64 = pg
            .client()
            .await
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "after {mode:?} restart");
    }

    pg.stop();
    assert!(
        pg.try_client().await.is_err(),
        "stopped server accepts connections"
    );
    pg.start_again();
    pg.client().await;
    assert!(
        pg.log().contains("database system is ready"),
        "{}",
        pg.log()
    );
}

fn record_headers(i: usize) -> Vec<(String, Vec<u8>)> {
    vec![
        ("id".to_string(), format!("id-{i}").into_bytes()),
        ("binary".to_string(), vec![0, 255, i as u8, b'\n']),
        ("empty".to_string(), Vec::new()),
    ]
}

#[tokio::test]
async fn broker_round_trips_records_byte_for_byte() {
    let broker = Broker::start_memory();
    broker.warm_up().await;
    let topic = unique_name("smoke_topic");
    broker.create_topic(&topic, 3).await;
    assert_eq!(broker.partitions(&topic).len(), 3);

    let producer = broker.producer();
    let mut sent = Vec::new();
    for i in 0..10usize {
        let key = format!("key-{}", i % 4).into_bytes();
        let payload = format!("{{\"n\": {i}, \"utf8\": \"é€\"}}\0\u{1}").into_bytes();
        let headers = record_headers(i);
        let mut owned = OwnedHeaders::new();
        for (k, v) in &headers {
            owned = owned.insert(Header {
                key: k.as_str(),
                value: Some(v.as_slice()),
            });
        }
        let delivery = producer
            .send(
                FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&payload)
                    .headers(owned),
                DEADLINE,
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce {i}: {e}"));
        sent.push((delivery.partition, delivery.offset, key, payload, headers));
    }

    let got = broker.consume(&topic, 10, DEADLINE).await;
    assert_eq!(got.len(), 10, "{got:#?}");
    for (partition, offset, key, payload, headers) in &sent {
        let r = got
            .iter()
            .find(|r| r.partition == *partition && r.offset == *offset)
            .unwrap_or_else(|| panic!("record at {partition}/{offset} not consumed: {got:#?}"));
        assert_eq!(r.topic, topic);
        assert_eq!(r.key.as_ref(), Some(key));
        assert_eq!(r.payload.as_ref(), Some(payload));
        assert_eq!(&r.headers, headers);
    }
    assert_eq!(
        got[0].header_str("id").map(|s| s.starts_with("id-")),
        Some(true)
    );

    // Same key, same partition, commit order preserved.
    for k in 0..4 {
        let key = format!("key-{k}").into_bytes();
        let ids: Vec<&str> = got
            .iter()
            .filter(|r| r.key.as_deref() == Some(key.as_slice()))
            .map(|r| r.header_str("id").unwrap())
            .collect();
        let mut sorted = ids.clone();
        sorted.sort_by_key(|s| s[3..].parse::<u32>().unwrap());
        assert_eq!(ids, sorted);
    }

    let all = broker.consume_for(&topic, Duration::from_secs(1)).await;
    assert_eq!(all.len(), 10, "nothing beyond the 10 records");
}

#[tokio::test]
async fn consume_waits_for_a_topic_and_gives_up_at_the_deadline() {
    let broker = Broker::start_memory();
    let got = broker
        .consume(&unique_name("never_created"), 1, Duration::from_millis(500))
        .await;
    assert!(got.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_broker_holds_produce_until_resumed() {
    let mut broker = Broker::start_memory();
    broker.warm_up().await;
    let topic = unique_name("smoke_pause");
    broker.create_topic(&topic, 1).await;
    let producer = broker.producer();
    producer
        .send(
            FutureRecord::to(&topic).key("k").payload("before"),
            DEADLINE,
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("produce before pause: {e}"));

    broker.pause();
    let send = {
        let producer = producer.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            producer
                .send(
                    FutureRecord::to(&topic).key("k").payload("during"),
                    DEADLINE,
                )
                .await
                .map(|d| (d.partition, d.offset))
                .map_err(|(e, _)| e.to_string())
        })
    };
    let mut send = send;
    // The delivery must NOT complete while the broker is stopped: wait for it with a
    // bound and expect the bound to win.
    let early = tokio::time::timeout(Duration::from_millis(1500), &mut send).await;
    assert!(
        early.is_err(),
        "produce completed while the broker was paused: {early:?}"
    );

    broker.resume();
    let delivered = tokio::time::timeout(DEADLINE, send)
        .await
        .expect("produce completes after resume")
        .unwrap();
    delivered.expect("produce after resume succeeds");

    let got = broker.consume(&topic, 2, DEADLINE).await;
    let payloads: Vec<&[u8]> = got.iter().filter_map(|r| r.payload.as_deref()).collect();
    assert_eq!(payloads, [b"before".as_slice(), b"during".as_slice()]);
}

#[tokio::test]
async fn sqlite_broker_keeps_records_across_kill9_and_restart() {
    let mut broker = Broker::start_sqlite();
    let port = broker.port();
    let topic = unique_name("smoke_durable");
    broker.create_topic(&topic, 1).await;
    broker
        .producer()
        .send(
            FutureRecord::to(&topic).key("k").payload("survivor"),
            DEADLINE,
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("produce: {e}"));

    broker.kill9();
    broker.restart();
    assert_eq!(broker.port(), port);

    let got = broker.consume(&topic, 1, DEADLINE).await;
    assert_eq!(got.len(), 1, "record lost across kill -9");
    assert_eq!(got[0].payload.as_deref(), Some(b"survivor".as_slice()));

    // And the restarted broker takes new records after the old ones.
    broker
        .producer()
        .send(FutureRecord::to(&topic).key("k").payload("after"), DEADLINE)
        .await
        .unwrap_or_else(|(e, _)| panic!("produce after restart: {e}"));
    let got = broker.consume(&topic, 2, DEADLINE).await;
    let payloads: Vec<&[u8]> = got.iter().filter_map(|r| r.payload.as_deref()).collect();
    assert_eq!(payloads, [b"survivor".as_slice(), b"after".as_slice()]);
}

#[test]
fn relay_process_runs_the_package_binary() {
    let mut relay = RelayProcess::spawn(&["--help"], &[("RUST_LOG", "info")]);
    let status = relay.wait_timeout(DEADLINE);
    assert!(status.is_some(), "`outbox-relay --help` did not exit");
    relay.kill9(); // idempotent once exited
}

#[test]
fn unique_names_are_valid_identifiers() {
    let a = unique_name("Slot-Name With Spaces");
    let b = unique_name("Slot-Name With Spaces");
    assert_ne!(a, b);
    assert!(a.len() <= 63);
    assert!(a
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
    assert!(unique_name(&"x".repeat(200)).len() <= 63);
}
