//! For users who keep the table: `--delete-delivered` deletes a row only after
//! its record was acknowledged and the slot confirmed past it; a partitioned
//! outbox table works (rows of every partition relayed) and `check` says it is
//! published via the partition root.

mod harness;

use std::collections::HashSet;
use std::time::Duration;

use harness::outbox::{Env, DEADLINE};
use harness::{current_wal_lsn, lsn_to_u64, pg_versions, wait_until, PgCluster, RelayProcess};

const TOPIC: &str = "outbox.event.Order";

/// `txns` transactions of `per_txn` rows (created at `created_at`, SQL), seq
/// from `first`; returns the ids.
async fn insert(
    client: &tokio_postgres::Client,
    first: i64,
    txns: i64,
    per_txn: i64,
    created_at: &str,
) -> Vec<String> {
    let mut ids = Vec::new();
    for t in 0..txns {
        let from = first + t * per_txn;
        let rows = client
            .query(
                &format!(
                    "INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload, created_at) \
                     SELECT 'Order', 'order-' || (g % 3), 'OrderHappened', jsonb_build_object('seq', g), {created_at} \
                     FROM generate_series($1::bigint, $2::bigint) g RETURNING id::text"
                ),
                &[&from, &(from + per_txn - 1)],
            )
            .await
            .unwrap();
        ids.extend(rows.iter().map(|r| r.get::<_, String>(0)));
    }
    ids
}

async fn still_there(client: &tokio_postgres::Client, ids: &[String]) -> usize {
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox_events WHERE id::text = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0);
    n as usize
}

/// Consume until every id arrived (at least once).
async fn delivered(env: &Env, ids: &[String]) {
    let want: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut n = ids.len();
    loop {
        let got = env.broker.consume(TOPIC, n, DEADLINE).await;
        let seen: HashSet<&str> = got.iter().filter_map(|c| c.header_str("id")).collect();
        let missing = want.difference(&seen).count();
        if missing == 0 {
            return;
        }
        assert!(
            got.len() >= n,
            "{missing} of {} ids never arrived",
            want.len()
        );
        n = got.len() + missing;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_delivered_never_deletes_a_row_before_its_record_is_acknowledged() {
    for version in pg_versions() {
        let mut env = Env::new(version).await;
        let client = env.client().await;
        // Rows from before the slot: never streamed, so never deleted.
        let old = insert(&client, -100, 1, 5, "now()").await;
        let mut relay = RelayProcess::spawn(&env.args(&["--delete-delivered"]), &[]);
        env.wait_streaming(&mut relay).await;

        let a = insert(&client, 0, 5, 10, "now()").await;
        delivered(&env, &a).await;
        wait_until(DEADLINE, "delivered rows are deleted", || async {
            still_there(&client, &a).await == 0
        })
        .await;

        // The broker hangs: nothing of the next batch may be deleted.
        env.broker.pause();
        let start_of_b = lsn_to_u64(&current_wal_lsn(&client).await);
        let b = insert(&client, 1000, 5, 10, "now()").await;
        let sample_until = tokio::time::Instant::now() + Duration::from_secs(6);
        while tokio::time::Instant::now() < sample_until {
            assert_eq!(
                still_there(&client, &b).await,
                b.len(),
                "PostgreSQL {version}: a row was deleted before Kafka acknowledged it\n{}",
                relay.log()
            );
            assert!(env.confirmed(&client).await <= start_of_b);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        env.broker.resume();
        delivered(&env, &b).await;
        wait_until(DEADLINE, "the rows go once acknowledged", || async {
            still_there(&client, &b).await == 0
        })
        .await;
        assert_eq!(still_there(&client, &old).await, old.len());
        assert!(relay.is_running(), "{}", relay.log());
        // Other tables and the deletes themselves are never relayed.
        let all = env.broker.consume_for(TOPIC, Duration::from_secs(3)).await;
        let ids: HashSet<&str> = all.iter().filter_map(|c| c.header_str("id")).collect();
        assert_eq!(ids.len(), a.len() + b.len());
    }
}

/// The outbox table partitioned by `created_at`, primary key (id, created_at).
const PARTITIONED: &str = "
    CREATE TABLE public.outbox_events (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL,
        payload jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (id, created_at)
    ) PARTITION BY RANGE (created_at);
    CREATE TABLE public.outbox_events_2025 PARTITION OF public.outbox_events
        FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
    CREATE TABLE public.outbox_events_2026 PARTITION OF public.outbox_events
        FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
    CREATE TABLE public.outbox_events_later PARTITION OF public.outbox_events DEFAULT;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_outbox_is_relayed_from_every_partition_and_cleaned() {
    for version in pg_versions() {
        let pg = PgCluster::start(version, &[]);
        pg.client().await.batch_execute(PARTITIONED).await.unwrap();
        // Env applies sql/01_outbox_table.sql, a no-op on an existing table.
        let env = Env::with_pg(pg).await;
        let client = env.client().await;
        let mut relay = RelayProcess::spawn(&env.args(&["--delete-delivered"]), &[]);
        env.wait_streaming(&mut relay).await;
        let mut ids = Vec::new();
        for (i, at) in ["'2025-06-01'", "'2026-06-01'", "'2031-01-01'"]
            .iter()
            .enumerate()
        {
            ids.extend(insert(&client, i as i64 * 100, 3, 4, at).await);
        }
        // One transaction across all three partitions.
        let mixed = client
            .query(
                "INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload, created_at) \
                 VALUES ('Order', 'order-9', 'T', '{\"seq\": 900}', '2025-02-01'), \
                        ('Order', 'order-9', 'T', '{\"seq\": 901}', '2026-02-01'), \
                        ('Order', 'order-9', 'T', '{\"seq\": 902}', '2040-02-01') \
                 RETURNING id::text, tableoid::regclass::text",
                &[],
            )
            .await
            .unwrap();
        ids.extend(mixed.iter().map(|r| r.get::<_, String>(0)));
        let partitions: HashSet<String> = mixed.iter().map(|r| r.get(1)).collect();
        assert_eq!(
            partitions.len(),
            3,
            "rows in every partition: {partitions:?}"
        );
        delivered(&env, &ids).await;
        // In commit order for key order-9 (one transaction, insert order).
        let all = env.broker.consume_for(TOPIC, Duration::from_secs(2)).await;
        let seqs: Vec<i64> = all
            .iter()
            .filter(|c| c.key.as_deref() == Some(&b"order-9"[..]))
            .map(|c| {
                let v: serde_json::Value =
                    serde_json::from_slice(c.payload.as_deref().unwrap()).unwrap();
                v["seq"].as_i64().unwrap()
            })
            .collect();
        assert_eq!(seqs, [900, 901, 902]);
        wait_until(
            DEADLINE,
            "delivered rows are deleted from every partition",
            || async { still_there(&client, &ids).await == 0 },
        )
        .await;

        let out = std::process::Command::new(RelayProcess::binary())
            .args([
                "check",
                "--postgres-url",
                &env.pg.url(),
                "--kafka-brokers",
                &env.broker.bootstrap(),
                "--slot",
                &env.slot,
                "--publication",
                &env.publication,
                "--delete-delivered",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("publishes via the partition root"),
            "PostgreSQL {version}: {text}"
        );
        assert!(!text.contains("cannot DELETE"), "{text}");
        assert!(relay.is_running(), "{}", relay.log());
    }
}
