//! A broker outage never holds PostgreSQL's shutdown hostage: with records in
//! flight and the broker hung, a fast shutdown completes in seconds, and every
//! event arrives once both are back. A long broker hang with no shutdown keeps
//! the same stream.

mod harness;

use std::time::{Duration, Instant};

use harness::outbox::{insert_rows, Env, Expected, DEADLINE};
use harness::{pg_versions, slot_holder_pid, wait_until, PgVersion, RelayProcess, ShutdownMode};

/// A shutdown that waits on nothing takes a second or two here; a hostage one
/// never ends (pg_ctl gives up after 60 s). Generous for a busy machine.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(20);

/// Relay arguments: quick reconnects (the server comes back soon), a message
/// timeout far longer than the test (records stay in flight while the broker
/// hangs), and the window given.
fn relay_args(env: &Env, window: &str) -> Vec<String> {
    env.args(&[
        "--reconnect-backoff-min",
        "200ms",
        "--reconnect-backoff-max",
        "1s",
        "--max-in-flight-records",
        window,
        "--kafka-property",
        "message.timeout.ms=300000",
    ])
}

/// Broker hung with records in flight, then a shutdown in `mode`: it completes
/// within [`SHUTDOWN_BOUND`]; after the server and the broker are back every
/// event is delivered.
async fn shutdown_while_the_broker_hangs(version: PgVersion, mode: ShutdownMode, window: &str) {
    let mut env = Env::new(version).await;
    let client = env.client().await;
    let mut relay = RelayProcess::spawn(&relay_args(&env, window), &[]);
    env.wait_streaming(&mut relay).await;
    let n = insert_rows(&client, 0, 3, 2).await;
    let expected = Expected::read(&client).await;
    expected.check(&expected.consume(&env.broker).await);

    env.broker.pause();
    let n = insert_rows(&client, n, 20, 3).await;
    // Let the relay read them and hand them to the (hung) producer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(client);

    let began = Instant::now();
    env.pg.stop_with(mode);
    let took = began.elapsed();
    assert!(
        took < SHUTDOWN_BOUND,
        "PostgreSQL {version} took {took:?} to stop ({mode:?}) with the broker hung\n{}",
        relay.log()
    );
    assert!(
        relay.log().contains("letting go of the stream"),
        "{}",
        relay.log()
    );

    env.pg.start_again();
    env.broker.resume();
    let client = env.client().await;
    let expected = Expected::read(&client).await;
    assert_eq!(expected.rows.len() as u64, n);
    let duplicates = expected.check(&expected.consume(&env.broker).await);
    assert!(relay.is_running(), "{}", relay.log());
    eprintln!(
        "PostgreSQL {version}, {mode:?}, window {window}: stopped in {took:?} with the broker hung; {n} rows, 0 missing, {duplicates} duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_shutdown_is_not_held_by_a_hung_broker() {
    for version in pg_versions() {
        shutdown_while_the_broker_hangs(version, ShutdownMode::Fast, "20000").await;
    }
}

/// The window full: the relay stops reading the stream, so it cannot see the
/// walsender's pings; the server ending its SQL session tells it instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_shutdown_is_not_held_with_the_window_full() {
    shutdown_while_the_broker_hangs(PgVersion::V17, ShutdownMode::Fast, "5").await;
}

/// Smart shutdown waits for client sessions first; once they are gone the
/// walsender waits on the relay as in a fast shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smart_shutdown_is_not_held_by_a_hung_broker() {
    shutdown_while_the_broker_hangs(PgVersion::V15, ShutdownMode::Smart, "20000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_broker_hang_without_shutdown_keeps_the_stream() {
    let mut env = Env::new(PgVersion::V17).await;
    let client = env.client().await;
    let mut relay = RelayProcess::spawn(&relay_args(&env, "20000"), &[]);
    env.wait_streaming(&mut relay).await;
    let n = insert_rows(&client, 0, 3, 2).await;
    let expected = Expected::read(&client).await;
    expected.check(&expected.consume(&env.broker).await);
    let pid = slot_holder_pid(&client, &env.slot).await.expect("held");

    // Records in flight that cannot be confirmed for a long while: the relay
    // keeps replying with the position it holds, the server keeps streaming.
    env.broker.pause();
    let n = insert_rows(&client, n, 20, 3).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(slot_holder_pid(&client, &env.slot).await, Some(pid));
    env.broker.resume();
    let expected = Expected::read(&client).await;
    assert_eq!(expected.rows.len() as u64, n);
    expected.check(&expected.consume(&env.broker).await);
    wait_until(DEADLINE, "slot confirmed past the rows", || async {
        env.confirmed(&client).await > 0
    })
    .await;
    assert_eq!(
        slot_holder_pid(&client, &env.slot).await,
        Some(pid),
        "the stream was dropped during the hang:\n{}",
        relay.log()
    );
    assert!(!relay.log().contains("letting go"), "{}", relay.log());
}
