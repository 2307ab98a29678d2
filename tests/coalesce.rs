//! Read coalescing (src/relay/coalesce.rs): while the stream is behind its
//! commits, a small read pauses the next one with the socket's receive
//! low-water mark raised to 64 KiB. The guarantee under test: nothing is ever
//! stranded below the mark, neither the tail of a backlog nor the rows that
//! come after it (a mark left raised would hold them until 64 KiB arrive).

mod harness;

use std::time::Duration;

use harness::outbox::{insert_rows, Env, Expected, DEADLINE};
use harness::PgVersion;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_backlog_and_every_row_after_it_arrive_when_reads_are_coalesced() {
    let env = Env::new(PgVersion::V15).await;
    let client = env.client().await;
    env.create_slot().await;

    // A backlog far below the low-water mark (three 1-row transactions, a few
    // KB), older than the catch-up lag when the relay reads it.
    let mut next = insert_rows(&client, 0, 3, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut relay = env.relay();
    relay.wait_for_log("coalescing small reads", DEADLINE).await;
    let expected = Expected::read(&client).await;
    let dups = expected.check(&expected.consume(&env.broker).await);
    assert_eq!(dups, 0);

    // Single fresh rows afterwards, one at a time, each smaller than the mark:
    // every one must arrive.
    for _ in 0..3 {
        next = insert_rows(&client, next, 1, 1).await;
        let expected = Expected::read(&client).await;
        expected.check(&expected.consume(&env.broker).await);
    }
    assert!(relay.is_running(), "relay log:\n{}", relay.log());
}
