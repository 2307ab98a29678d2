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
