//! Outbox-level helpers shared by the end-to-end tests: a PostgreSQL cluster
//! with the outbox table plus a broker, row generation, and the delivery checker.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use super::{
    lsn_to_u64, slot_confirmed_flush_lsn, unique_name, Broker, Consumed, PgCluster, PgVersion,
    RelayProcess,
};

pub const DEADLINE: Duration = Duration::from_secs(60);
pub const TABLE_SQL: &str = include_str!("../../sql/01_outbox_table.sql");
pub const AGGREGATES: [&str; 3] = ["Order", "Customer", "Payment"];

/// A PostgreSQL cluster with the outbox table, a broker, and names for one relay.
pub struct Env {
    pub pg: PgCluster,
    pub broker: Broker,
    pub slot: String,
    pub publication: String,
}

impl Env {
    pub async fn new(version: PgVersion) -> Env {
        Env::with_pg(PgCluster::start(version, &[])).await
    }

    pub async fn with_pg(pg: PgCluster) -> Env {
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

    pub fn args(&self, extra: &[&str]) -> Vec<String> {
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

    pub fn relay(&self) -> RelayProcess {
        RelayProcess::spawn(&self.args(&[]), &[("RUST_LOG", "info,outbox_relay=debug")])
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        self.pg.client().await
    }

    pub async fn confirmed(&self, client: &tokio_postgres::Client) -> u64 {
        slot_confirmed_flush_lsn(client, &self.slot)
            .await
            .map(|l| lsn_to_u64(&l))
            .unwrap_or(0)
    }

    /// A streaming relay, and a table `busy` the publication does not carry
    /// (for the idle-outbox, busy-database runs).
    pub async fn streaming_beside_busy_table(&self) -> (tokio_postgres::Client, RelayProcess) {
        let client = self.client().await;
        let mut relay = self.relay();
        self.wait_streaming(&mut relay).await;
        client
            .batch_execute("CREATE TABLE busy(id bigserial primary key, v text)")
            .await
            .unwrap();
        (client, relay)
    }

    /// Wait until the relay created its slot and is streaming.
    pub async fn wait_streaming(&self, relay: &mut RelayProcess) {
        relay.wait_for_log("streaming", DEADLINE).await;
    }

    /// Run a relay until it streams, then stop it: the slot exists and
    /// nothing reads it, so what is inserted next is a backlog.
    pub async fn create_slot(&self) {
        let mut relay = self.relay();
        self.wait_streaming(&mut relay).await;
        relay.sigterm();
        relay.wait_exit(DEADLINE).await.expect("relay stops");
    }
}

/// One inserted row as PostgreSQL renders it.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: String,
    pub aggregatetype: String,
    pub aggregateid: String,
    pub event_type: String,
    pub payload: String,
    pub seq: u64,
}

/// What the outbox holds, read back from PostgreSQL.
pub struct Expected {
    pub rows: Vec<Row>,
}

impl Expected {
    /// The good rows (poison-row tests give theirs ids starting `00000000-0000-0000-0000-`).
    pub async fn read(client: &tokio_postgres::Client) -> Expected {
        let rows = client
            .query(
                // `payload::jsonb`: tests may make the column text.
                "SELECT id::text, aggregatetype, aggregateid, type, payload::text, (payload::jsonb->>'seq')::bigint \
                 FROM outbox_events \
                 WHERE id::text NOT LIKE '00000000-0000-0000-0000-%' \
                 ORDER BY (payload::jsonb->>'seq')::bigint",
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

    pub fn per_topic(&self) -> BTreeMap<String, usize> {
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
    pub async fn consume(&self, broker: &Broker) -> Vec<Consumed> {
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
    pub fn check(&self, consumed: &[Consumed]) -> usize {
        let by_id: HashMap<&str, &Row> = self.rows.iter().map(|r| (r.id.as_str(), r)).collect();
        let mut seen: HashSet<String> = HashSet::new();
        let mut duplicates = 0;
        // Order of first deliveries per key, by (topic, partition, offset).
        let mut sorted: Vec<&Consumed> = consumed.iter().collect();
        sorted.sort_by_key(|c| (c.topic.clone(), c.partition, c.offset));
        let mut last_seq_per_key: HashMap<(String, Vec<u8>), (u64, u64)> = HashMap::new();
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
            // Commit order: the transaction's commit LSN, then insert order
            // (seq) inside the transaction.
            let commit_lsn = lsn_to_u64(c.header_str("outbox-relay-commit-lsn").unwrap());
            let order = (commit_lsn, row.seq);
            let key = (c.topic.clone(), c.key.clone().unwrap_or_default());
            if let Some(prev) = last_seq_per_key.insert(key.clone(), order) {
                assert!(
                    prev < order,
                    "per-key order broken for {key:?}: (commit, seq) {order:?} after {prev:?}"
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
pub async fn insert_rows(
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
