//! End-to-end: the relay binary against a real PostgreSQL (15 and 17) and a
//! real Kafka-protocol broker (tansu). Every test kills or stops something.

mod harness;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use harness::{
    current_wal_lsn, lsn_to_u64, slot_confirmed_flush_lsn, unique_name, wait_until, Broker,
    Consumed, PgCluster, PgVersion, RelayProcess,
};

const DEADLINE: Duration = Duration::from_secs(60);
const TABLE_SQL: &str = include_str!("../sql/01_outbox_table.sql");
const AGGREGATES: [&str; 3] = ["Order", "Customer", "Payment"];

/// A PostgreSQL cluster with the outbox table, a broker, and names for one relay.
struct Env {
    pg: PgCluster,
    broker: Broker,
    slot: String,
    publication: String,
}

impl Env {
    async fn new(version: PgVersion) -> Env {
        Env::with_pg(PgCluster::start(version, &[])).await
    }

    async fn with_pg(pg: PgCluster) -> Env {
        let broker = Broker::start_memory();
        let client = pg.client().await;
        client.batch_execute(TABLE_SQL).await.expect("outbox table");
        broker.warm_up().await;
        Env {
            pg,
            broker,
            slot: unique_name("slot"),
            publication: unique_name("pub"),
        }
    }

    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            "--postgres-url",
            &self.pg.url(),
            "--kafka-brokers",
            &self.broker.bootstrap(),
            "--slot",
            &self.slot,
            "--publication",
            &self.publication,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn relay(&self) -> RelayProcess {
        RelayProcess::spawn(&self.args(&[]), &[("RUST_LOG", "info,outbox_relay=debug")])
    }

    async fn client(&self) -> tokio_postgres::Client {
        self.pg.client().await
    }

    async fn confirmed(&self, client: &tokio_postgres::Client) -> u64 {
        slot_confirmed_flush_lsn(client, &self.slot)
            .await
            .map(|l| lsn_to_u64(&l))
            .unwrap_or(0)
    }

    /// Wait until the relay created its slot and is streaming.
    async fn wait_streaming(&self, relay: &mut RelayProcess) {
        relay.wait_for_log("streaming", DEADLINE).await;
    }
}

/// One inserted row as PostgreSQL renders it.
#[derive(Debug, Clone)]
struct Row {
    id: String,
    aggregatetype: String,
    aggregateid: String,
    event_type: String,
    payload: String,
    seq: u64,
}

/// What the outbox holds, read back from PostgreSQL.
struct Expected {
    rows: Vec<Row>,
}

impl Expected {
    async fn read(client: &tokio_postgres::Client) -> Expected {
        let rows = client
            .query(
                "SELECT id::text, aggregatetype, aggregateid, type, payload::text, (payload->>'seq')::bigint \
                 FROM outbox_events ORDER BY (payload->>'seq')::bigint",
                &[],
            )
            .await
            .unwrap()
            .into_iter()
            .map(|r| Row {
                id: r.get(0),
                aggregatetype: r.get(1),
                aggregateid: r.get(2),
                event_type: r.get(3),
                payload: r.get(4),
                seq: r.get::<_, i64>(5) as u64,
            })
            .collect();
        Expected { rows }
    }

    fn per_topic(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in &self.rows {
            *m.entry(format!("outbox.event.{}", r.aggregatetype))
                .or_insert(0) += 1;
        }
        m
    }

    /// Consume until every row arrived at least once (or the deadline passed).
    /// Duplicates count towards the broker's record count, so read again,
    /// asking for more, until every distinct id is there.
    async fn consume(&self, broker: &Broker) -> Vec<Consumed> {
        let mut all = Vec::new();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        for (topic, n) in self.per_topic() {
            let mut want = n;
            loop {
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                let got = broker.consume(&topic, want, remaining).await;
                let distinct: HashSet<&[u8]> = got.iter().filter_map(|c| c.header("id")).collect();
                if distinct.len() >= n || remaining.is_zero() || got.len() < want {
                    all.extend(got);
                    break;
                }
                want = got.len() + (n - distinct.len());
            }
        }
        all
    }

    /// Every row arrived at least once with the right topic, key, headers and
    /// byte-identical payload; per-key order of first deliveries is commit order.
    /// Returns the number of duplicates.
    fn check(&self, consumed: &[Consumed]) -> usize {
        let by_id: HashMap<&str, &Row> = self.rows.iter().map(|r| (r.id.as_str(), r)).collect();
        let mut seen: HashSet<String> = HashSet::new();
        let mut duplicates = 0;
        // Order of first deliveries per key, by (topic, partition, offset).
        let mut sorted: Vec<&Consumed> = consumed.iter().collect();
        sorted.sort_by_key(|c| (c.topic.clone(), c.partition, c.offset));
        let mut last_seq_per_key: HashMap<(String, Vec<u8>), u64> = HashMap::new();
        for c in sorted {
            let id = c
                .header_str("id")
                .expect("every record has an id header")
                .to_string();
            let row = by_id
                .get(id.as_str())
                .unwrap_or_else(|| panic!("record with unknown id {id}"));
            assert_eq!(c.topic, format!("outbox.event.{}", row.aggregatetype));
            assert_eq!(
                c.key.as_deref(),
                Some(row.aggregateid.as_bytes()),
                "key of {id}"
            );
            assert_eq!(
                c.payload.as_deref(),
                Some(row.payload.as_bytes()),
                "payload of {id} must be byte-identical"
            );
            assert_eq!(c.header_str("type"), Some(row.event_type.as_str()));
            assert!(c.header("outbox-relay-commit-lsn").is_some());
            assert!(c.header("outbox-relay-xid").is_some());
            assert!(c.header("outbox-relay-commit-time").is_some());
            if !seen.insert(id.clone()) {
                duplicates += 1;
                continue;
            }
            let key = (c.topic.clone(), c.key.clone().unwrap_or_default());
            if let Some(prev) = last_seq_per_key.insert(key.clone(), row.seq) {
                assert!(
                    prev < row.seq,
                    "per-key order broken for {key:?}: seq {} after {prev}",
                    row.seq
                );
            }
        }
        let missing: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| !seen.contains(&r.id))
            .map(|r| r.id.as_str())
            .collect();
        assert!(
            missing.is_empty(),
            "{} of {} rows missing, e.g. {:?}",
            missing.len(),
            self.rows.len(),
            &missing[..missing.len().min(5)]
        );
        duplicates
    }
}

/// Insert `txns` transactions of 1..=`max_rows` rows each, sequence numbers
/// starting at `first_seq`; returns the next sequence number.
async fn insert_rows(
    client: &tokio_postgres::Client,
    first_seq: u64,
    txns: usize,
    max_rows: usize,
) -> u64 {
    let mut seq = first_seq;
    for t in 0..txns {
        let rows = 1 + (t * 7 + seq as usize) % max_rows;
        let mut sql = String::from("BEGIN;");
        for _ in 0..rows {
            let agg = AGGREGATES[(seq % 3) as usize];
            let key = format!("{}-{}", agg.to_lowercase(), seq % 5);
            // Mixed sizes, unicode and characters JSON has to escape.
            let filler = if seq % 10 == 0 {
                "x".repeat(6000)
            } else {
                "naïve café ☕ \\\"quoted\\\" 日本".to_string()
            };
            sql.push_str(&format!(
                "INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload) VALUES \
                 ('{agg}', '{key}', '{agg}Happened', '{{\"seq\": {seq}, \"text\": \"{filler}\", \"n\": 1.50}}');"
            ));
            seq += 1;
        }
        sql.push_str("COMMIT;");
        client
            .batch_execute(&sql)
            .await
            .expect("insert outbox rows");
    }
    seq
}

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
    let client = env.client().await;
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    client
        .batch_execute("CREATE TABLE busy(id bigserial primary key, v text)")
        .await
        .unwrap();
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
