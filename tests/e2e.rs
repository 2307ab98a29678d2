//! End-to-end: the relay binary against a real PostgreSQL (15 and 17) and a
//! real Kafka-protocol broker (tansu). Every test kills or stops something.

mod harness;

use std::time::Duration;

use harness::outbox::{insert_rows, Env, Expected, DEADLINE};
use harness::{current_wal_lsn, lsn_to_u64, wait_until, PgCluster, PgVersion, RelayProcess};

macro_rules! for_each_pg {
    ($($name:ident),* $(,)?) => {
        mod pg15 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::PgVersion::V15).await;
                }
            )*
        }
        mod pg17 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::PgVersion::V17).await;
                }
            )*
        }
    };
}

for_each_pg!(
    clean_run_delivers_every_row_once_in_order,
    slot_never_passes_unacknowledged_records,
    kill_9_mid_stream_loses_nothing,
    idle_outbox_busy_database_keeps_slot_advancing,
    alter_table_while_running,
    sigterm_drains_and_confirms,
    wal_level_replica_is_a_clear_error,
);

async fn clean_run_delivers_every_row_once_in_order(version: PgVersion) {
    let env = Env::new(version).await;
    let client = env.client().await;
    // Rows committed before the slot exists are not part of the stream.
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    let next = insert_rows(&client, 0, 60, 6).await;
    let expected = Expected::read(&client).await;
    assert_eq!(expected.rows.len() as u64, next);
    let consumed = expected.consume(&env.broker).await;
    let dups = expected.check(&consumed);
    assert_eq!(dups, 0, "a clean run delivers exactly once");
    // Nothing extra arrives afterwards.
    let mut total = 0;
    for topic in expected.per_topic().keys() {
        total += env
            .broker
            .consume_for(topic, Duration::from_secs(2))
            .await
            .len();
    }
    assert_eq!(total, expected.rows.len(), "no extra records");
    // The slot catches up with the last transaction.
    let end = lsn_to_u64(&current_wal_lsn(&client).await);
    wait_until(
        DEADLINE,
        "the slot confirms the last transaction",
        || async { env.confirmed(&client).await >= end },
    )
    .await;
    assert!(relay.is_running(), "relay log:\n{}", relay.log());
}

async fn slot_never_passes_unacknowledged_records(version: PgVersion) {
    let mut env = Env::new(version).await;
    let client = env.client().await;
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    let next = insert_rows(&client, 0, 10, 3).await;
    let before_pause = lsn_to_u64(&current_wal_lsn(&client).await);
    wait_until(DEADLINE, "slot confirms the first batch", || async {
        env.confirmed(&client).await >= before_pause
    })
    .await;

    env.broker.pause();
    // A batch the broker cannot acknowledge.
    let start_of_b = lsn_to_u64(&current_wal_lsn(&client).await);
    let end = insert_rows(&client, next, 10, 3).await;
    // Other WAL traffic too, so keepalives carry positions past the batch.
    client
        .batch_execute(
            "CREATE TABLE noise(x int); INSERT INTO noise SELECT generate_series(1, 1000);",
        )
        .await
        .unwrap();
    // Several status intervals pass; sample the slot all along.
    let sample_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < sample_until {
        let confirmed = env.confirmed(&client).await;
        assert!(
            confirmed <= start_of_b,
            "slot confirmed {confirmed:X} past the unacknowledged batch starting at {start_of_b:X}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.broker.resume();
    let expected = Expected::read(&client).await;
    assert_eq!(expected.rows.len() as u64, end);
    let consumed = expected.consume(&env.broker).await;
    expected.check(&consumed);
    let now = lsn_to_u64(&current_wal_lsn(&client).await);
    wait_until(
        DEADLINE,
        "slot advances after the broker resumes",
        || async { env.confirmed(&client).await >= now },
    )
    .await;
    assert!(relay.is_running(), "relay log:\n{}", relay.log());
}

async fn kill_9_mid_stream_loses_nothing(version: PgVersion) {
    let mut env = Env::new(version).await;
    let client = env.client().await;
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    // A writer keeps committing while the relay is killed and restarted.
    let url = env.pg.url();
    let writer = tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut seq = 0;
        for _ in 0..20 {
            seq = insert_rows(&client, seq, 25, 8).await;
        }
        seq
    });
    let topic = "outbox.event.Order";
    wait_until(DEADLINE, "some records arrived", || async {
        !env.broker
            .consume_for(topic, Duration::from_millis(300))
            .await
            .is_empty()
    })
    .await;
    relay.kill9();
    let mut relay = env.relay();
    // Second kill while the broker holds records unacknowledged: whatever the
    // relay had in flight must come again after the restart.
    relay.wait_for_log("streaming", DEADLINE).await;
    env.broker.pause();
    let paused_batch = {
        let (c, conn) = tokio_postgres::connect(&env.pg.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        insert_rows(&c, 1_000_000, 20, 4).await - 1_000_000
    };
    tokio::time::sleep(Duration::from_secs(3)).await; // several status intervals
    relay.kill9();
    env.broker.resume();
    let mut relay = env.relay();
    let total = writer.await.unwrap() + paused_batch;
    let expected = Expected::read(&client).await;
    assert_eq!(expected.rows.len() as u64, total);
    let consumed = expected.consume(&env.broker).await;
    let dups = expected.check(&consumed);
    eprintln!("kill -9: {} rows, {dups} duplicates", expected.rows.len());
    assert!(relay.is_running(), "relay log:\n{}", relay.log());
}

async fn idle_outbox_busy_database_keeps_slot_advancing(version: PgVersion) {
    let env = Env::new(version).await;
    let (client, _relay) = env.streaming_beside_busy_table().await;
    let first = env.confirmed(&client).await;
    // Several MB of WAL on a table the publication does not carry.
    for _ in 0..20 {
        client
            .batch_execute(
                "INSERT INTO busy(v) SELECT repeat('w', 200) FROM generate_series(1, 2000)",
            )
            .await
            .unwrap();
    }
    let written = lsn_to_u64(&current_wal_lsn(&client).await);
    assert!(written - first > 4 << 20, "the load wrote enough WAL");
    wait_until(DEADLINE, "slot follows WAL of other tables", || async {
        env.confirmed(&client).await >= written
    })
    .await;
    // Retained WAL behind the slot stays small.
    let retained: i64 = client
        .query_one(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&env.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        retained < 1 << 20,
        "retained {retained} bytes behind the slot"
    );
}

async fn alter_table_while_running(version: PgVersion) {
    let env = Env::new(version).await;
    let client = env.client().await;
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    let next = insert_rows(&client, 0, 5, 3).await;
    client
        .batch_execute(
            "ALTER TABLE outbox_events ADD COLUMN tenant text DEFAULT 'acme'; \
             ALTER TABLE outbox_events ADD COLUMN extra int;",
        )
        .await
        .unwrap();
    let next = insert_rows(&client, next, 5, 3).await;
    client
        .batch_execute("ALTER TABLE outbox_events DROP COLUMN extra")
        .await
        .unwrap();
    let end = insert_rows(&client, next, 5, 3).await;
    let expected = Expected::read(&client).await;
    assert_eq!(expected.rows.len() as u64, end);
    let consumed = expected.consume(&env.broker).await;
    assert_eq!(expected.check(&consumed), 0);
    assert!(relay.is_running());
    let log = relay.log();
    assert!(
        !log.contains("session failed"),
        "ALTER TABLE must not interrupt the stream:\n{log}"
    );
}

async fn sigterm_drains_and_confirms(version: PgVersion) {
    let env = Env::new(version).await;
    let client = env.client().await;
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    let end = insert_rows(&client, 0, 30, 5).await;
    let expected = Expected::read(&client).await;
    assert_eq!(expected.rows.len() as u64, end);
    // Wait for the last row to reach Kafka, then stop: the final status update
    // must confirm everything that was acknowledged.
    let consumed = expected.consume(&env.broker).await;
    expected.check(&consumed);
    let last_commit = lsn_to_u64(&current_wal_lsn(&client).await);
    relay.sigterm();
    let status = relay
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("relay exits on SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        relay.log()
    );
    let confirmed = env.confirmed(&client).await;
    assert!(
        confirmed >= last_commit,
        "after a clean stop the slot confirms everything delivered ({confirmed:X} < {last_commit:X})"
    );
    // A restart re-sends nothing.
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    let mut total = 0;
    for topic in expected.per_topic().keys() {
        total += env
            .broker
            .consume_for(topic, Duration::from_secs(2))
            .await
            .len();
    }
    assert_eq!(
        total,
        expected.rows.len(),
        "a clean restart duplicates nothing"
    );
}

async fn wal_level_replica_is_a_clear_error(version: PgVersion) {
    let pg = PgCluster::start_with_wal_level_replica(version);
    let env = Env::with_pg(pg).await;
    let mut relay = env.relay();
    let status = relay
        .wait_exit(DEADLINE)
        .await
        .expect("the relay stops on a server it cannot use");
    assert!(!status.success());
    let log = relay.log();
    assert!(
        log.contains("wal_level") && log.contains("set wal_level = logical"),
        "the error names the fix:\n{log}"
    );
}

#[tokio::test]
async fn bad_configuration_is_reported_with_the_fix() {
    // Unknown TOML key, malformed property, unknown env var: exit non-zero,
    // nothing started, every problem named.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        "[postgres]\nurl = \"postgres://x@127.0.0.1:1/db\"\nslott = \"typo\"\n",
    )
    .unwrap();
    let mut relay = RelayProcess::spawn(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "run",
            "--kafka-brokers",
            "127.0.0.1:1",
        ],
        &[],
    );
    let status = relay.wait_exit(DEADLINE).await.expect("exits");
    assert!(!status.success());
    assert!(
        relay.log().contains("slott"),
        "names the unknown key:\n{}",
        relay.log()
    );

    let mut relay = RelayProcess::spawn(
        &[
            "run",
            "--postgres-url",
            "postgres://x@127.0.0.1:1/db",
            "--kafka-brokers",
            "127.0.0.1:1",
            "--kafka-property",
            "no-equals-sign",
        ],
        &[],
    );
    let status = relay.wait_exit(DEADLINE).await.expect("exits");
    assert!(!status.success());
    assert!(relay.log().contains("no-equals-sign"), "{}", relay.log());

    let mut relay = RelayProcess::spawn(
        &[
            "run",
            "--postgres-url",
            "postgres://x@127.0.0.1:1/db",
            "--kafka-brokers",
            "b:9092",
        ],
        &[("OUTBOX_RELAY_SLTO", "x")],
    );
    let status = relay.wait_exit(DEADLINE).await.expect("exits");
    assert!(!status.success());
    assert!(relay.log().contains("OUTBOX_RELAY_SLTO"), "{}", relay.log());
}
