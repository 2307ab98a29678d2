//! The guarantees hold when the ground moves: the slot dropped while the relay
//! is away, another cluster behind the address, a reconnect after
//! `--start-lsn`, a long walsender silence within `wal_sender_timeout`, a table
//! renamed while streaming, role settings that change how bytea is printed.
//! Each test here failed on the relay before the hardening it pins.

mod harness;

use std::net::SocketAddr;
use std::time::Duration;

use harness::outbox::{insert_rows, Env, Expected, DEADLINE, TABLE_SQL};
use harness::proxy::Proxy;
use harness::{
    create_logical_slot, current_wal_lsn, lsn_to_u64, set_and_reload, slot_holder_pid, wait_until,
    PgCluster, PgVersion, RelayProcess,
};

/// Relay arguments reaching PostgreSQL at `pg` (a proxy), with quick reconnects.
fn args_via(env: &Env, pg: SocketAddr, extra: &[&str]) -> Vec<String> {
    let url = format!("postgres://postgres@{pg}/postgres");
    let mut args = env.args(&[
        "--reconnect-backoff-min",
        "100ms",
        "--reconnect-backoff-max",
        "500ms",
    ]);
    let i = args
        .iter()
        .position(|a| a == "--postgres-url")
        .expect("env args name the URL");
    args[i + 1] = url;
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn pg_addr(pg: &PgCluster) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], pg.port()))
}

async fn slot_exists(client: &tokio_postgres::Client, slot: &str) -> bool {
    client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .is_some()
}

/// Every row of the outbox arrives (with the right headers and payload).
async fn all_delivered(env: &Env, client: &tokio_postgres::Client, n: u64) {
    let expected = Expected::read(client).await;
    assert_eq!(expected.rows.len() as u64, n);
    expected.check(&expected.consume(&env.broker).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_the_relay_is_away_stops_it_with_the_gap() {
    let env = Env::new(PgVersion::V15).await;
    let client = env.client().await;
    let proxy = Proxy::start("pg", pg_addr(&env.pg));
    let mut relay = RelayProcess::spawn(&args_via(&env, proxy.addr(), &[]), &[]);
    env.wait_streaming(&mut relay).await;
    let n = insert_rows(&client, 0, 5, 3).await;
    all_delivered(&env, &client, n).await;
    wait_until(DEADLINE, "slot confirmed past the rows", || async {
        env.confirmed(&client).await >= lsn_to_u64(&current_wal_lsn(&client).await) - 1024
    })
    .await;

    // The relay loses its connection; meanwhile the slot is dropped and
    // events are committed.
    proxy.cut();
    wait_until(DEADLINE, "the walsender lets go of the slot", || async {
        slot_holder_pid(&client, &env.slot).await.is_none()
    })
    .await;
    client
        .query("SELECT pg_drop_replication_slot($1)", &[&env.slot])
        .await
        .unwrap();
    let lost = insert_rows(&client, n, 10, 5).await - n;
    proxy.resume();

    let status = relay
        .wait_exit(DEADLINE)
        .await
        .unwrap_or_else(|| panic!("relay streams on past the gap:\n{}", relay.log()));
    assert!(!status.success(), "{status}");
    let log = relay.log();
    assert!(log.contains("is gone"), "{log}");
    assert!(log.contains("replay --from-time"), "{log}");
    assert!(
        !slot_exists(&client, &env.slot).await,
        "the relay created a new slot, skipping {lost} events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_cluster_behind_the_address_stops_the_relay() {
    let env = Env::new(PgVersion::V17).await;
    let client = env.client().await;
    // Another cluster, ready for the relay: table, publication and a slot of
    // the same name (what a misrouted address or a restored backup looks like).
    let other = PgCluster::start(PgVersion::V17, &[]);
    let other_client = other.client().await;
    other_client.batch_execute(TABLE_SQL).await.unwrap();
    create_logical_slot(&other_client, &env.slot).await;

    let proxy = Proxy::start("pg", pg_addr(&env.pg));
    let mut relay = RelayProcess::spawn(&args_via(&env, proxy.addr(), &[]), &[]);
    env.wait_streaming(&mut relay).await;
    let n = insert_rows(&client, 0, 3, 2).await;
    all_delivered(&env, &client, n).await;

    proxy.set_upstream(pg_addr(&other));
    proxy.cut();
    insert_rows(&client, n, 3, 2).await;
    proxy.resume();
    let status = relay
        .wait_exit(DEADLINE)
        .await
        .unwrap_or_else(|| panic!("relay streams from another cluster:\n{}", relay.log()));
    assert!(!status.success(), "{status}");
    let log = relay.log();
    assert!(log.contains("another PostgreSQL cluster"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_lsn_is_for_the_first_session_only() {
    let env = Env::new(PgVersion::V17).await;
    let client = env.client().await;
    create_logical_slot(&client, &env.slot).await;
    // Rows the operator chose to skip, then the start position.
    let skipped = insert_rows(&client, 0, 2, 2).await;
    let start = current_wal_lsn(&client).await;
    let mut relay = RelayProcess::spawn(
        &env.args(&[
            "--start-lsn",
            &start,
            "--reconnect-backoff-min",
            "100ms",
            "--reconnect-backoff-max",
            "500ms",
        ]),
        &[],
    );
    env.wait_streaming(&mut relay).await;
    let n = insert_rows(&client, skipped, 4, 2).await;
    wait_until(
        DEADLINE,
        "slot confirmed past the start position",
        || async { env.confirmed(&client).await > lsn_to_u64(&start) },
    )
    .await;

    // A reconnect: the walsender is terminated.
    let pid = slot_holder_pid(&client, &env.slot).await.expect("held");
    client
        .query("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    wait_until(DEADLINE, "the relay streams again", || async {
        slot_holder_pid(&client, &env.slot)
            .await
            .is_some_and(|p| p != pid)
    })
    .await;
    assert!(relay.is_running(), "relay exited:\n{}", relay.log());
    let end = insert_rows(&client, n, 4, 2).await;
    let mut expected = Expected::read(&client).await;
    expected.rows.retain(|r| r.seq >= skipped);
    assert_eq!(expected.rows.len() as u64, end - skipped);
    expected.check(&expected.consume(&env.broker).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_silence_within_wal_sender_timeout_keeps_the_stream() {
    let env = Env::new(PgVersion::V17).await;
    let client = env.client().await;
    set_and_reload(&client, "wal_sender_timeout", "180s").await;
    let proxy = Proxy::start("pg", pg_addr(&env.pg));
    let mut relay = RelayProcess::spawn(&args_via(&env, proxy.addr(), &[]), &[]);
    env.wait_streaming(&mut relay).await;
    let n = insert_rows(&client, 0, 3, 2).await;
    all_delivered(&env, &client, n).await;
    let pid = slot_holder_pid(&client, &env.slot).await.expect("held");

    // 40 s without a byte from the server: what a walsender decoding a large
    // transaction of another table looks like (it neither sends nor reads),
    // longer than the relay's old fixed 30 s, well within the server's 180 s.
    proxy.stall();
    let n = insert_rows(&client, n, 3, 2).await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    proxy.resume();

    all_delivered(&env, &client, n).await;
    assert_eq!(
        slot_holder_pid(&client, &env.slot).await,
        Some(pid),
        "the stream was dropped and reopened:\n{}",
        relay.log()
    );
    assert!(!relay.log().contains("presumed dead"), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_outbox_table_keeps_flowing() {
    let env = Env::new(PgVersion::V17).await;
    let client = env.client().await;
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    let n = insert_rows(&client, 0, 3, 2).await;
    all_delivered(&env, &client, n).await;
    // Renamed while streaming (a migration's first step), rows inserted under
    // the new name, then renamed back so the checker finds them.
    client
        .batch_execute("ALTER TABLE outbox_events RENAME TO outbox_events_v2")
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO outbox_events_v2 (aggregatetype, aggregateid, type, payload) \
             SELECT 'Order', 'order-' || g, 'OrderHappened', jsonb_build_object('seq', 1000 + g) \
             FROM generate_series(0, 4) g",
        )
        .await
        .unwrap();
    client
        .batch_execute("ALTER TABLE outbox_events_v2 RENAME TO outbox_events")
        .await
        .unwrap();
    all_delivered(&env, &client, n + 5).await;
    assert!(!relay.log().contains("does not forward"), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytea_payloads_survive_role_settings_and_domains() {
    let env = Env::new(PgVersion::V15).await;
    let client = env.client().await;
    // A role default the relay must not inherit, and the payload column typed
    // as a domain over bytea.
    client
        .batch_execute(
            "ALTER ROLE postgres SET bytea_output = 'escape'; \
             CREATE DOMAIN payload_bytes AS bytea; \
             ALTER TABLE outbox_events ALTER COLUMN payload TYPE payload_bytes \
               USING convert_to(payload::text, 'UTF8')",
        )
        .await
        .unwrap();
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    client
        .batch_execute(
            "INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload) \
             VALUES ('Blob', 'b-1', 'BlobStored', '\\x00ff105c78'::bytea)",
        )
        .await
        .unwrap();
    let got = env.broker.consume("outbox.event.Blob", 1, DEADLINE).await;
    assert_eq!(got.len(), 1, "{}", relay.log());
    assert_eq!(
        got[0].payload.as_deref(),
        Some(&[0x00, 0xff, 0x10, 0x5c, 0x78][..]),
        "{}",
        relay.log()
    );
}
