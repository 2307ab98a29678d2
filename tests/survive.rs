//! Poison rows end where the policy says and the stream goes on; a standby relay
//! takes over a slot within seconds; a stale holder is terminated when asked.

mod harness;

use std::time::{Duration, Instant};

use harness::outbox::{insert_rows, Env, Expected, DEADLINE};
use harness::{current_wal_lsn, lsn_to_u64, wait_until, PgVersion, RelayProcess};

/// The table without the NOT NULL constraints, so poison rows can be inserted.
const LOOSEN: &str = "ALTER TABLE outbox_events ALTER COLUMN aggregateid DROP NOT NULL, \
                      ALTER COLUMN aggregatetype DROP NOT NULL";
/// A text payload column: PostgreSQL no longer checks it is JSON, so a row can
/// carry a payload that is not (with `--payload-format json`, poison
/// `invalid_payload`).
const TEXT_PAYLOAD: &str = "ALTER TABLE outbox_events ALTER COLUMN payload TYPE text";
/// Not JSON: an unterminated object.
const NOT_JSON: &str = "{\"seq\": -6, oops";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_rows_go_to_the_dead_letter_topic_and_the_stream_goes_on() {
    let env = Env::new(PgVersion::V17).await;
    let client = env.client().await;
    client.batch_execute(LOOSEN).await.unwrap();
    client.batch_execute(TEXT_PAYLOAD).await.unwrap();
    let mut relay = RelayProcess::spawn(
        &env.args(&[
            "--dead-letter-topic",
            "outbox.dead_letter",
            "--kafka-property",
            "message.max.bytes=100000",
            "--payload-format",
            "json",
        ]),
        &[],
    );
    env.wait_streaming(&mut relay).await;
    let before = insert_rows(&client, 0, 5, 2).await;
    // The corpus: one row per poison class, each in its own transaction.
    let big = "y".repeat(200_000);
    client
        .batch_execute(&format!(
            "INSERT INTO outbox_events (id, aggregatetype, aggregateid, type, payload) VALUES \
               ('00000000-0000-0000-0000-000000000001', 'Order', NULL, 'T', '{{\"seq\": -1}}');
             INSERT INTO outbox_events (id, aggregatetype, aggregateid, type, payload) VALUES \
               ('00000000-0000-0000-0000-000000000002', NULL, 'k', 'T', '{{\"seq\": -2}}');
             INSERT INTO outbox_events (id, aggregatetype, aggregateid, type, payload) VALUES \
               ('00000000-0000-0000-0000-000000000003', 'Bad Topic!', 'k', 'T', '{{\"seq\": -3}}');
             INSERT INTO outbox_events (id, aggregatetype, aggregateid, type, payload) VALUES \
               ('00000000-0000-0000-0000-000000000004', 'Order', 'k', 'T', '{{\"seq\": -4, \"big\": \"{big}\"}}');
             INSERT INTO outbox_events (id, aggregatetype, aggregateid, type, payload) VALUES \
               ('00000000-0000-0000-0000-000000000006', 'Order', 'k', 'T', '{NOT_JSON}');"
        ))
        .await
        .unwrap();
    let after = insert_rows(&client, before, 5, 2).await;
    // Every good row before and after the poison arrives.
    let mut good = Expected::read(&client).await;
    good.rows
        .retain(|r| !r.id.starts_with("00000000-0000-0000-0000-00000000000"));
    assert_eq!(good.rows.len() as u64, after);
    good.check(&good.consume(&env.broker).await);
    // Then the table loses a column the mapping needs: its rows are poison too.
    client
        .batch_execute(
            "ALTER TABLE outbox_events DROP COLUMN type; \
             INSERT INTO outbox_events (id, aggregatetype, aggregateid, payload) VALUES \
               ('00000000-0000-0000-0000-000000000005', 'Order', 'k', '{\"seq\": -5}');",
        )
        .await
        .unwrap();

    let dead = env.broker.consume("outbox.dead_letter", 6, DEADLINE).await;
    let class_of = |id: &str| {
        dead.iter()
            .find(|c| c.header_str("id") == Some(id))
            .and_then(|c| c.header_str("outbox-relay-error-class"))
            .map(str::to_string)
    };
    assert_eq!(
        class_of("00000000-0000-0000-0000-000000000001").as_deref(),
        Some("null_column")
    );
    assert_eq!(
        class_of("00000000-0000-0000-0000-000000000002").as_deref(),
        Some("null_column")
    );
    assert_eq!(
        class_of("00000000-0000-0000-0000-000000000003").as_deref(),
        Some("invalid_topic")
    );
    assert_eq!(
        class_of("00000000-0000-0000-0000-000000000004").as_deref(),
        Some("too_large")
    );
    assert_eq!(
        class_of("00000000-0000-0000-0000-000000000005").as_deref(),
        Some("missing_column")
    );
    assert_eq!(
        class_of("00000000-0000-0000-0000-000000000006").as_deref(),
        Some("invalid_payload")
    );
    for c in &dead {
        assert!(c.header("outbox-relay-error-reason").is_some());
        assert!(c.header("outbox-relay-commit-lsn").is_some());
    }
    let bad_topic = dead
        .iter()
        .find(|c| c.header_str("id") == Some("00000000-0000-0000-0000-000000000003"))
        .unwrap();
    assert_eq!(
        bad_topic.header_str("outbox-relay-original-topic"),
        Some("outbox.event.Bad Topic!")
    );
    // The dead-lettered row keeps its content (here: the NULL key as JSON null).
    let null_key = dead
        .iter()
        .find(|c| c.header_str("id") == Some("00000000-0000-0000-0000-000000000001"))
        .unwrap();
    let row: serde_json::Value =
        serde_json::from_slice(null_key.payload.as_deref().unwrap()).unwrap();
    assert_eq!(row["aggregateid"], serde_json::Value::Null);
    assert_eq!(row["aggregatetype"], "Order");
    // The invalid payload: its topic, the parser's reason, and the text as it was.
    let bad_json = dead
        .iter()
        .find(|c| c.header_str("id") == Some("00000000-0000-0000-0000-000000000006"))
        .unwrap();
    assert_eq!(
        bad_json.header_str("outbox-relay-original-topic"),
        Some("outbox.event.Order")
    );
    let reason = bad_json.header_str("outbox-relay-error-reason").unwrap();
    assert!(reason.contains("not valid JSON"), "{reason}");
    let row: serde_json::Value =
        serde_json::from_slice(bad_json.payload.as_deref().unwrap()).unwrap();
    assert_eq!(row["payload"], NOT_JSON);

    // And the relay runs on.
    assert!(relay.is_running(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_row_stops_the_relay_by_default_and_is_not_skipped() {
    let env = Env::new(PgVersion::V15).await;
    let client = env.client().await;
    client.batch_execute(LOOSEN).await.unwrap();
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    insert_rows(&client, 0, 3, 2).await;
    let before_poison = lsn_to_u64(&current_wal_lsn(&client).await);
    client
        .batch_execute(
            "INSERT INTO outbox_events (id, aggregatetype, aggregateid, type, payload) VALUES \
             ('00000000-0000-0000-0000-0000000000aa', 'Order', NULL, 'T', '{\"seq\": 1000}')",
        )
        .await
        .unwrap();
    let status = relay.wait_exit(DEADLINE).await.expect("the relay stops");
    assert!(!status.success());
    let log = relay.log();
    assert!(log.contains("poison row (null_column)"), "{log}");
    assert!(
        log.contains("00000000-0000-0000-0000-0000000000aa"),
        "names the row: {log}"
    );
    assert!(log.contains("--dead-letter-topic"), "names the fix: {log}");
    // The slot did not move past the poison row: it is still there to fix.
    let confirmed = env.confirmed(&client).await;
    assert!(
        confirmed <= before_poison + 1024,
        "slot moved past the poison row"
    );
    let again = RelayProcess::spawn(&env.args(&[]), &[]).wait_timeout(DEADLINE);
    assert!(
        again.is_some_and(|s| !s.success()),
        "a restart meets the same row again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_payload_stops_the_relay_under_its_stop_policy_until_the_policy_changes() {
    let env = Env::new(PgVersion::V15).await;
    let client = env.client().await;
    client.batch_execute(TEXT_PAYLOAD).await.unwrap();
    // A dead-letter topic is set, but this class stops: policies are per class.
    let args = |policy: &str| {
        env.args(&[
            "--payload-format",
            "json",
            "--dead-letter-topic",
            "outbox.dead_letter",
            "--poison-policy",
            policy,
        ])
    };
    let mut relay = RelayProcess::spawn(&args("invalid_payload=stop"), &[]);
    env.wait_streaming(&mut relay).await;
    let n = insert_rows(&client, 0, 4, 2).await;
    let before_poison = lsn_to_u64(&current_wal_lsn(&client).await);
    client
        .batch_execute(&format!(
            "INSERT INTO outbox_events (id, aggregatetype, aggregateid, type, payload) VALUES \
             ('00000000-0000-0000-0000-0000000000bb', 'Order', 'k', 'T', '{NOT_JSON}')"
        ))
        .await
        .unwrap();
    let end = insert_rows(&client, n, 4, 2).await;
    let status = relay.wait_exit(DEADLINE).await.expect("the relay stops");
    assert!(!status.success());
    let log = relay.log();
    assert!(log.contains("poison row (invalid_payload)"), "{log}");
    assert!(
        log.contains("00000000-0000-0000-0000-0000000000bb"),
        "names the row: {log}"
    );
    assert!(log.contains("payload_format"), "names the fix: {log}");
    assert!(
        log.contains("--poison-policy invalid_payload=dead-letter"),
        "names the policy that diverts it, the dead-letter topic being set: {log}"
    );
    let confirmed = env.confirmed(&client).await;
    assert!(
        confirmed <= before_poison + 1024,
        "slot moved past the poison row"
    );
    // The operator switches the class to dead-letter: the row goes there, and
    // every good row before and after it arrives.
    let mut relay = RelayProcess::spawn(&args("invalid_payload=dead-letter"), &[]);
    let dead = env.broker.consume("outbox.dead_letter", 1, DEADLINE).await;
    assert_eq!(dead.len(), 1, "{}", relay.log());
    assert_eq!(
        dead[0].header_str("id"),
        Some("00000000-0000-0000-0000-0000000000bb")
    );
    assert_eq!(
        dead[0].header_str("outbox-relay-error-class"),
        Some("invalid_payload")
    );
    let expected = Expected::read(&client).await;
    assert_eq!(expected.rows.len() as u64, end);
    expected.check(&expected.consume(&env.broker).await);
    assert!(relay.is_running(), "{}", relay.log());
}

/// A broker down longer than the producer's `message.timeout.ms`: librdkafka
/// gives up on the records it holds, the relay must not take that as delivery
/// (nor skip them) but reconnect from the slot and send them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_past_the_message_timeout_means_reconnect_and_resume_not_loss() {
    const MESSAGE_TIMEOUT: Duration = Duration::from_secs(3);
    let mut env = Env::new(PgVersion::V17).await;
    let client = env.client().await;
    let mut relay = RelayProcess::spawn(
        &env.args(&[
            "--kafka-property",
            &format!("message.timeout.ms={}", MESSAGE_TIMEOUT.as_millis()),
            "--reconnect-backoff-min",
            "200ms",
            "--reconnect-backoff-max",
            "2s",
        ]),
        &[],
    );
    env.wait_streaming(&mut relay).await;
    let n = insert_rows(&client, 0, 5, 3).await;
    let first = Expected::read(&client).await;
    first.check(&first.consume(&env.broker).await);
    let delivered = lsn_to_u64(&current_wal_lsn(&client).await);

    env.broker.pause();
    // From a multiple of 10: the first row held back carries 6 KB, so its
    // commit lies well beyond `delivered` + the slack below.
    let first_held = n.next_multiple_of(10);
    let during = insert_rows(&client, first_held, 10, 3).await;
    // Three message timeouts: every record sent to the hung broker expires.
    tokio::time::sleep(MESSAGE_TIMEOUT * 3).await;
    let confirmed = env.confirmed(&client).await;
    assert!(
        confirmed <= delivered + 1024,
        "the slot passed records the hung broker never acknowledged \
         ({confirmed:X} > {delivered:X})"
    );
    let log = relay.log();
    assert!(
        log.contains("did not acknowledge") && log.contains("resuming from the slot"),
        "the expired records end the session, to be sent again:\n{log}"
    );
    env.broker.resume();

    let end = insert_rows(&client, during, 5, 3).await;
    let expected = Expected::read(&client).await;
    assert_eq!(expected.rows.len() as u64, end - (first_held - n));
    let duplicates = expected.check(&expected.consume(&env.broker).await);
    assert!(relay.is_running(), "{}", relay.log());
    eprintln!(
        "broker hung {:?} past a {MESSAGE_TIMEOUT:?} message timeout: {} rows, 0 missing, {duplicates} duplicates",
        MESSAGE_TIMEOUT * 3,
        expected.rows.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_within_seconds_without_loss() {
    let env = Env::new(PgVersion::V17).await;
    let client = env.client().await;
    let mut first = env.relay();
    env.wait_streaming(&mut first).await;
    let mut standby = RelayProcess::spawn(&env.args(&["--slot-busy-retry", "500ms"]), &[]);
    standby.wait_for_log("standing by", DEADLINE).await;
    let n = insert_rows(&client, 0, 10, 3).await;
    let killed = Instant::now();
    first.kill9();
    standby.wait_for_log("streaming", DEADLINE).await;
    let takeover = killed.elapsed();
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
    let end = insert_rows(&client, n, 10, 3).await;
    let expected = Expected::read(&client).await;
    assert_eq!(expected.rows.len() as u64, end);
    expected.check(&expected.consume(&env.broker).await);
    eprintln!("standby took over in {takeover:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_holder_is_terminated_when_asked() {
    let env = Env::new(PgVersion::V15).await;
    let client = env.client().await;
    // Without wal_sender_timeout the server never drops a silent client, so
    // only the relay can free the slot. (With it, the relay waits past the
    // server's own timeout, which then frees the slot first: a busy
    // walsender reads no replies for that long while its peer is alive.)
    harness::set_and_reload(&client, "wal_sender_timeout", "0").await;
    // A hung relay (SIGSTOP) keeps its connection open but sends no status
    // replies: its walsender holds the slot while nothing is delivered.
    let mut first = env.relay();
    env.wait_streaming(&mut first).await;
    unsafe { libc::kill(first.pid() as i32, libc::SIGSTOP) };
    let mut second = RelayProcess::spawn(
        &env.args(&[
            "--slot-busy-retry",
            "500ms",
            "--terminate-stale-holder",
            "--stale-holder-timeout",
            "3s",
        ]),
        &[],
    );
    second
        .wait_for_log("terminated a stale walsender", DEADLINE)
        .await;
    second.wait_for_log("streaming", DEADLINE).await;
    let n = insert_rows(&client, 0, 5, 2).await;
    let expected = Expected::read(&client).await;
    assert_eq!(expected.rows.len() as u64, n);
    expected.check(&expected.consume(&env.broker).await);
    wait_until(DEADLINE, "slot advances under the new holder", || async {
        env.confirmed(&client).await > 0
    })
    .await;
    unsafe { libc::kill(first.pid() as i32, libc::SIGCONT) };
    first.kill9();
}

/// How long the busy-database run lasts.
const BUSY_RUN: Duration = Duration::from_secs(120);

/// Idle outbox, busy database, for minutes (issue #4): the WAL the slot retains
/// stays flat. Retained WAL is what PostgreSQL keeps for the slot, measured
/// from its `restart_lsn` (which moves only when the relay's confirmations pass
/// the decoder's restart points), not only from `confirmed_flush_lsn`.
async fn idle_outbox_busy_database_retains_flat_wal(version: PgVersion) {
    let env = Env::new(version).await;
    let (client, mut relay) = env.streaming_beside_busy_table().await;
    let start = lsn_to_u64(&current_wal_lsn(&client).await);
    let began = Instant::now();
    let mut last_sample = Instant::now() - Duration::from_secs(10);
    // (seconds, WAL written so far, retained from restart_lsn, from confirmed_flush), bytes.
    let mut samples: Vec<(u64, u64, u64, u64)> = Vec::new();
    while began.elapsed() < BUSY_RUN {
        // About 1 MB of WAL per second on a table the publication does not carry.
        client
            .batch_execute(
                "INSERT INTO busy(v) SELECT repeat('w', 200) FROM generate_series(1, 400)",
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if last_sample.elapsed() >= Duration::from_secs(5) {
            last_sample = Instant::now();
            let row = client
                .query_one(
                    "SELECT pg_current_wal_lsn()::text, restart_lsn::text, confirmed_flush_lsn::text \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&env.slot],
                )
                .await
                .unwrap();
            let now = lsn_to_u64(row.get(0));
            let restart = lsn_to_u64(row.get(1));
            let confirmed = lsn_to_u64(row.get(2));
            samples.push((
                began.elapsed().as_secs(),
                now - start,
                now - restart,
                now - confirmed,
            ));
        }
    }
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    for (t, written, by_restart, by_confirmed) in &samples {
        eprintln!(
            "[busy PG{}] {t:>4} s: written {:>6.1} MiB, retained {:>5.1} MiB (restart_lsn), {:>5.2} MiB (confirmed)",
            version.major(),
            mib(*written),
            mib(*by_restart),
            mib(*by_confirmed)
        );
    }
    let written = samples.last().unwrap().1;
    assert!(
        written > 64 << 20,
        "the load wrote enough WAL: {:.1} MiB",
        mib(written)
    );
    // Flat: what the slot holds back stays bounded while the database writes on;
    // it does not follow what was written. PostgreSQL moves restart_lsn at its
    // running-transactions records (every 15 s on a busy server), so allow a
    // few such periods of WAL, far below what was written.
    let worst_restart = samples.iter().map(|s| s.2).max().unwrap();
    let worst_confirmed = samples.iter().map(|s| s.3).max().unwrap();
    assert!(
        worst_restart < 48 << 20 && worst_restart < written / 2,
        "retained WAL grew to {:.1} MiB of {:.1} MiB written",
        mib(worst_restart),
        mib(written)
    );
    assert!(
        worst_confirmed < 4 << 20,
        "the confirmed position lagged {:.1} MiB",
        mib(worst_confirmed)
    );
    // And no upward trend: the last third holds back no more than the first
    // two thirds' worst plus one period's worth.
    let cut = samples.len() * 2 / 3;
    let early = samples[..cut].iter().map(|s| s.2).max().unwrap();
    let late = samples[cut..].iter().map(|s| s.2).max().unwrap();
    assert!(
        late <= early + (16 << 20),
        "retained WAL trends up: {:.1} MiB late vs {:.1} MiB early",
        mib(late),
        mib(early)
    );
    assert!(relay.is_running(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "2 minutes: cargo test --test survive -- --ignored --nocapture idle_outbox"]
async fn idle_outbox_busy_database_for_minutes_pg15() {
    idle_outbox_busy_database_retains_flat_wal(PgVersion::V15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "2 minutes: cargo test --test survive -- --ignored --nocapture idle_outbox"]
async fn idle_outbox_busy_database_for_minutes_pg17() {
    idle_outbox_busy_database_retains_flat_wal(PgVersion::V17).await;
}
