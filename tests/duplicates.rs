//! Bounded duplicates: a PostgreSQL crash or a relay `kill -9` re-sends a moment
//! of traffic, not everything since the last checkpoint; a progress record that
//! belongs to another slot or another server is ignored (it must never skip).

mod harness;

use std::time::{Duration, Instant};

use harness::outbox::{insert_rows, Env, Expected, DEADLINE};
use harness::{pg_versions, wait_until, PgVersion, RelayProcess, ShutdownMode};

/// 2,000 events in 200 transactions of 10 rows, one every 50 ms (10 s);
/// returns the next sequence number.
async fn steady_load(client: &tokio_postgres::Client, first_seq: u64) -> u64 {
    let mut seq = first_seq;
    for _ in 0..200 {
        seq = insert_txn(client, seq, 10).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seq
}

/// One transaction of `n` rows over five keys, sequence numbers from `seq`;
/// returns the next sequence number.
async fn insert_txn(client: &tokio_postgres::Client, seq: u64, n: u64) -> u64 {
    client
        .batch_execute(&format!(
            "INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload) \
             SELECT 'Order', 'order-' || (g % 5), 'OrderHappened', jsonb_build_object('seq', g) \
             FROM generate_series({seq}, {}) g",
            seq + n - 1
        ))
        .await
        .expect("insert");
    seq + n
}

/// Streaming sessions the relay started so far.
fn sessions(relay: &RelayProcess) -> usize {
    relay.log().matches("relay: streaming ").count()
}

fn relay_args(env: &Env) -> Vec<String> {
    env.args(&[
        "--reconnect-backoff-min",
        "100ms",
        "--reconnect-backoff-max",
        "500ms",
    ])
}

/// Every row arrived; returns the duplicates: every record the topics hold
/// (read for a while, since the broker's offsets cannot be trusted) beyond
/// one per row.
async fn delivered(env: &Env, client: &tokio_postgres::Client, n: u64) -> usize {
    let expected = Expected::read(client).await;
    assert_eq!(expected.rows.len() as u64, n);
    expected.check(&expected.consume(&env.broker).await);
    let mut records = 0;
    for topic in expected.per_topic().keys() {
        records += env
            .broker
            .consume_for(topic, Duration::from_secs(3))
            .await
            .len();
    }
    records - expected.rows.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_resends_a_moment_not_minutes() {
    for version in pg_versions() {
        let mut env = Env::new(version).await;
        let client = env.client().await;
        let mut relay = RelayProcess::spawn(&relay_args(&env), &[]);
        env.wait_streaming(&mut relay).await;
        // A transaction open through the load, as on any busy server: the
        // slot's restart position cannot move, so PostgreSQL never writes the
        // slot to disk between checkpoints and the crash takes its confirmed
        // position back to where it was before the load.
        let long = env.client().await;
        long.batch_execute("CREATE TABLE hold(x int)")
            .await
            .unwrap();
        // A write, so the open transaction is in the WAL the slot decodes.
        long.batch_execute("BEGIN; INSERT INTO hold VALUES (1)")
            .await
            .unwrap();
        let n = steady_load(&client, 0).await;
        let before = delivered(&env, &client, n).await;
        assert_eq!(before, 0);
        // The slot's confirmed position is on disk only as of the last
        // checkpoint; the crash takes it back there.
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(client);
        env.pg.restart(ShutdownMode::Immediate);
        drop(long);
        let client = env.client().await;
        wait_until(DEADLINE, "the relay streams again", || async {
            sessions(&relay) >= 2
        })
        .await;
        let end = insert_rows(&client, n, 1, 1).await;
        let duplicates = delivered(&env, &client, end).await;
        eprintln!("PostgreSQL {version} crash after {n} events over 10 s: {duplicates} sent again");
        assert!(
            duplicates <= 200,
            "PostgreSQL {version}: {duplicates} of {n} events sent again after a crash\n{}",
            relay.log()
        );
        assert!(
            relay.log().contains("skipped transactions"),
            "{}",
            relay.log()
        );
    }
}

/// Records in flight when PostgreSQL crashes: the broker is stopped while 100
/// rows are produced, PostgreSQL crashes, the broker comes back. The relay
/// takes the late acknowledgements after its session died and the next
/// session skips those rows instead of re-sending them (they were never
/// confirmed to the slot, and the progress table could not be written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_with_records_in_flight_resends_none_of_them() {
    for version in pg_versions() {
        let mut env = Env::new(version).await;
        let client = env.client().await;
        let relay = RelayProcess::spawn(&relay_args(&env), &[]);
        let mut relay = relay;
        env.wait_streaming(&mut relay).await;
        let n = insert_rows(&client, 0, 20, 5).await;
        assert_eq!(delivered(&env, &client, n).await, 0);

        env.broker.pause();
        let mut end = n;
        for _ in 0..10 {
            end = insert_rows(&client, end, 1, 1).await;
            end = insert_txn(&client, end, 9).await;
        }
        // The relay reads them within milliseconds and hands them to the
        // producer, which cannot reach the stopped broker.
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(client);
        env.pg.restart(ShutdownMode::Immediate);
        env.broker.resume();
        let client = env.client().await;
        wait_until(DEADLINE, "the relay streams again", || async {
            sessions(&relay) >= 2
        })
        .await;
        let end = insert_rows(&client, end, 1, 1).await;
        let duplicates = delivered(&env, &client, end).await;
        eprintln!(
            "PostgreSQL {version} crash with {} records in flight: {duplicates} sent again",
            end - n - 1
        );
        assert!(
            relay.log().contains("took the broker's acknowledgements"),
            "{}",
            relay.log()
        );
        assert_eq!(
            duplicates,
            0,
            "PostgreSQL {version}: records in flight at the crash were sent again\n{}",
            relay.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_kill_resends_a_moment_not_a_second() {
    let env = Env::new(PgVersion::V17).await;
    let client = env.client().await;
    let args = relay_args(&env);
    let mut relay = RelayProcess::spawn(&args, &[]);
    env.wait_streaming(&mut relay).await;
    // Load in the background; the relay is killed in the middle of it.
    let writer = {
        let client = env.client().await;
        tokio::spawn(async move { steady_load(&client, 0).await })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let killed = Instant::now();
    relay.kill9();
    let mut relay = RelayProcess::spawn(&args, &[]);
    env.wait_streaming(&mut relay).await;
    let n = writer.await.unwrap();
    let duplicates = delivered(&env, &client, n).await;
    eprintln!(
        "relay kill -9 mid-load ({n} events over 10 s), back in {:?}: {duplicates} sent again",
        killed.elapsed()
    );
    assert!(
        duplicates <= 200,
        "{duplicates} of {n} events sent again after a relay kill\n{}",
        relay.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_record_of_another_slot_or_server_is_ignored() {
    let env = Env::new(PgVersion::V15).await;
    let client = env.client().await;
    client
        .batch_execute(
            include_str!("../sql/04_progress.sql")
                .split("GRANT")
                .next()
                .unwrap(),
        )
        .await
        .unwrap();
    let sysid: String = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Records far ahead: if either were taken for ours, every event would be
    // skipped. One names another cluster, one another slot.
    client
        .execute(
            "INSERT INTO outbox_relay_progress \
               (slot_name, database, system_identifier, timeline, acknowledged_lsn) VALUES \
               ($1, 'postgres', '1234', 1, 'FF/0'), ('another_slot', 'postgres', $2, 1, 'FF/0')",
            &[&env.slot, &sysid],
        )
        .await
        .unwrap();
    let mut relay = RelayProcess::spawn(&relay_args(&env), &[]);
    env.wait_streaming(&mut relay).await;
    let n = insert_rows(&client, 0, 5, 3).await;
    delivered(&env, &client, n).await;
    // Its own record is written once records are acknowledged, and the
    // other slot's is untouched.
    wait_until(DEADLINE, "the relay records its progress", || async {
        client
            .query_one(
                "SELECT count(*) FROM outbox_relay_progress \
                 WHERE slot_name = $1 AND system_identifier = $2 AND acknowledged_lsn < 'FF/0'",
                &[&env.slot, &sysid],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    assert!(
        !relay.log().contains("skipped transactions"),
        "{}",
        relay.log()
    );
}
