//! A throwaway PostgreSQL cluster: initdb + postgres in a temp dir, on a free port
//! of 127.0.0.1, as the `postgres` user when the caller is root (initdb refuses
//! root).

pub mod standby;

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Instant;

use crate::process::{
    self, dispose_temp_dir, dump_log_if_panicking, free_port, kill9_and_reap, open_log,
    port_accepts, read_lossy, signal, tail, temp_dir, wait_child,
};
use crate::{POLL_INTERVAL, START_TIMEOUT, STOP_TIMEOUT};

/// Default location of the PostgreSQL 17 bindir, where `.ci/install-deps` puts it.
pub const PG17_DEFAULT_BINDIR: &str = "/opt/outbox-relay-deps/pg17/bin";
/// Debian's PostgreSQL 15 bindir.
pub const PG15_DEFAULT_BINDIR: &str = "/usr/lib/postgresql/15/bin";

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

/// Run a PostgreSQL tool to its end; panic with its output when it fails.
pub(crate) fn run_tool(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed with {}:\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Why a server process that was starting exited: its port was taken when
/// this run's part of its log (from byte `log_start`) says so in one of
/// `port_taken`'s words, else the exit status.
pub(crate) fn start_exit(
    log_path: &Path,
    log_start: u64,
    status: ExitStatus,
    port_taken: &[&str],
) -> StartError {
    let log = read_lossy(log_path);
    let this_run = log.get(log_start as usize..).unwrap_or(&log);
    if port_taken.iter().any(|w| this_run.contains(w)) {
        StartError::PortTaken
    } else {
        StartError::Exited(status)
    }
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
        PgCluster::start_in(version, version.bindir(), extra)
    }

    /// [`start`](Self::start) with the binaries of `bindir` (what `postgres --version`
    /// says there decides the [`PgVersion`]; a version the tests do not cover is a
    /// panic naming the supported ones).
    pub fn start_at(bindir: &Path, extra: &[(&str, &str)]) -> PgCluster {
        let postgres = bindir.join("postgres");
        let out = Command::new(&postgres)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("run {} --version: {e}", postgres.display()));
        let text = String::from_utf8_lossy(&out.stdout);
        // "postgres (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)"
        let major = text
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse::<u32>().ok());
        let version = match major {
            Some(15) => PgVersion::V15,
            Some(17) => PgVersion::V17,
            _ => panic!(
                "{} is {:?}; this kit runs PostgreSQL 15 or 17 \
                 ({PG15_DEFAULT_BINDIR}, {PG17_DEFAULT_BINDIR})",
                postgres.display(),
                text.trim()
            ),
        };
        PgCluster::start_in(version, bindir.to_path_buf(), extra)
    }

    fn start_in(version: PgVersion, bindir: PathBuf, extra: &[(&str, &str)]) -> PgCluster {
        let run_as = pg_run_as();
        let dir = temp_dir(&format!("outbox-relay-pg{version}-"));
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

        run_tool(
            command_as(&bindir.join("initdb"), run_as)
                .current_dir(&root)
                .arg("-D")
                .arg(root.join("data"))
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
                .args(["--no-sync", "--no-instructions"])
                .env("LC_ALL", "C"),
            &format!("initdb (PostgreSQL {version})"),
        );

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
        let mut cmd = command_as(&self.bindir.join("postgres"), self.run_as);
        cmd.current_dir(self.root())
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .stdout(out)
            .stderr(err);
        // SIGQUIT (immediate shutdown) is what an interrupted program sends.
        let child = process::spawn(&mut cmd, libc::SIGQUIT)
            .unwrap_or_else(|e| panic!("spawn {}/postgres: {e}", self.bindir.display()));
        let pid = child.id();
        self.child = Some(child);

        let pid_file = self.data_dir().join("postmaster.pid");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("just spawned");
            if let Some(status) = process::try_reap(child) {
                self.child = None;
                return Err(start_exit(
                    &log_path,
                    log_start,
                    status,
                    &["could not bind", "already in use"],
                ));
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

    /// The postmaster's pid (the root of the backends' process tree); `None` while
    /// stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The uid/gid the server runs as (`postgres` when the caller is root).
    pub fn run_as(&self) -> Option<(u32, u32)> {
        self.run_as
    }

    /// [`url`](Self::url) as a libpq keyword/value string (for `pg_recvlogical`).
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
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
        if process::try_reap(&mut child).is_some() {
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
pub(crate) enum StartError {
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
