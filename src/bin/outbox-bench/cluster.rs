//! A throwaway PostgreSQL cluster for the benchmark: initdb + postgres in a temp
//! dir, on a free port of 127.0.0.1, as the `postgres` user when we are root
//! (initdb refuses root). The same approach as `tests/harness`, with settings
//! for a benchmark (larger buffers, no checkpoints mid-run, commit timestamps
//! for the polling baseline).

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{self, Guarded, TempDir};

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings appended to postgresql.conf. `fsync = off`: the benchmark measures
/// the relay, not this machine's disk (commits still flush WAL to the OS, so
/// logical decoding sees them exactly when it would with fsync on).
pub const SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("wal_level", "logical"),
    ("max_wal_senders", "10"),
    ("max_replication_slots", "10"),
    ("max_connections", "100"),
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("synchronous_commit", "on"),
    ("shared_buffers", "512MB"),
    ("max_wal_size", "8GB"),
    ("checkpoint_timeout", "30min"),
    // The polling baseline reads each row's commit time with pg_xact_commit_timestamp.
    ("track_commit_timestamp", "on"),
    ("logging_collector", "off"),
    ("log_destination", "stderr"),
    ("log_line_prefix", "%m [%p] %q%a "),
    ("log_min_messages", "warning"),
];

pub fn free_port() -> std::io::Result<u16> {
    TcpListener::bind("127.0.0.1:0")?
        .local_addr()
        .map(|a| a.port())
}

pub fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The uid/gid PostgreSQL must run as: `postgres` when we are root, else ourselves.
fn pg_run_as() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    // SAFETY: a NUL-terminated name; the record is read at once, from the main thread.
    let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
    if pw.is_null() {
        return Err(
            "running as root, but there is no `postgres` user to run PostgreSQL as; \
             run `.ci/install-deps` (installing postgresql-15 creates it)"
                .into(),
        );
    }
    // SAFETY: non-null pointer from getpwnam.
    Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
}

fn command_as(program: &Path, run_as: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A running cluster. Dropping it stops PostgreSQL (immediate) and removes its dir.
pub struct PgCluster {
    pub bindir: PathBuf,
    pub port: u16,
    pub version: String,
    // Field order matters: the server stops before its directory goes.
    server: Guarded,
    dir: TempDir,
}

impl PgCluster {
    pub fn start(bindir: &Path, work_dir: &Path, keep: bool) -> Result<PgCluster, String> {
        for bin in ["postgres", "initdb", "pg_recvlogical"] {
            if !bindir.join(bin).is_file() {
                return Err(format!(
                    "{} is missing; pass --pg-bindir (PostgreSQL 15: /usr/lib/postgresql/15/bin, \
                     17: /opt/outbox-relay-deps/pg17/bin) or run `.ci/install-deps`",
                    bindir.join(bin).display()
                ));
            }
        }
        let run_as = pg_run_as()?;
        let dir = TempDir::new(work_dir, "outbox-bench-pg-", keep)
            .map_err(|e| format!("create a temp dir in {}: {e}", work_dir.display()))?;
        let root = dir.path().to_path_buf();
        fs::create_dir(root.join("sock")).map_err(|e| format!("create socket dir: {e}"))?;
        if let Some((uid, gid)) = run_as {
            for p in [root.clone(), root.join("sock")] {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                    .map_err(|e| format!("chown {} to postgres: {e}", p.display()))?;
            }
            let mut a = root.parent();
            while let Some(p) = a {
                let mode = fs::metadata(p).map(|m| m.permissions().mode()).unwrap_or(0);
                if mode & 0o001 == 0 {
                    return Err(format!(
                        "{} is not traversable by the postgres user; pass --work-dir /tmp",
                        p.display()
                    ));
                }
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
            .map_err(|e| format!("run {}/initdb: {e}", bindir.display()))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed with {}:\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut conf = String::from("\n# --- outbox-bench ---\n");
        let sock = root.join("sock");
        let sock = sock.to_str().ok_or("the temp dir path is not UTF-8")?;
        for (k, v) in SETTINGS
            .iter()
            .copied()
            .chain([("unix_socket_directories", sock)])
        {
            conf.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
        }
        let conf_path = root.join("data/postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(|e| format!("append to {}: {e}", conf_path.display()))?;
        let version = String::from_utf8_lossy(
            &Command::new(bindir.join("postgres"))
                .arg("--version")
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default(),
        )
        .trim()
        .to_string();

        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port().map_err(|e| format!("find a free port: {e}"))?;
            match spawn_and_wait(bindir, &root, port, run_as) {
                Ok(server) => {
                    return Ok(PgCluster {
                        bindir: bindir.to_path_buf(),
                        port,
                        version,
                        server,
                        dir,
                    })
                }
                Err(e) => last_err = e,
            }
        }
        Err(format!(
            "PostgreSQL did not start: {last_err}\n--- log ---\n{}",
            tail(&root.join("postgres.log"), 40)
        ))
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The same as a libpq keyword/value string (for pg_recvlogical).
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// The postmaster's pid (root of the backends' process tree).
    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A connected client; its connection task runs on the current runtime.
    pub async fn client(&self) -> Result<tokio_postgres::Client, String> {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("connect to {}: {e}", self.url()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }
}

fn spawn_and_wait(
    bindir: &Path,
    root: &Path,
    port: u16,
    run_as: Option<(u32, u32)>,
) -> Result<Guarded, String> {
    let log_path = root.join("postgres.log");
    let log_start = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("open {}: {e}", log_path.display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = command_as(&bindir.join("postgres"), run_as);
    cmd.current_dir(root)
        .arg("-D")
        .arg(root.join("data"))
        .arg("-p")
        .arg(port.to_string())
        .stdout(log)
        .stderr(log2);
    // SIGQUIT = immediate shutdown: what the interrupt handler and Drop send.
    let mut server = process::spawn("postgres", &mut cmd, libc::SIGQUIT)
        .map_err(|e| format!("spawn {}/postgres: {e}", bindir.display()))?;
    let pid = server.pid();
    let pid_file = root.join("data/postmaster.pid");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = server.try_status() {
            let log = fs::read(&log_path).unwrap_or_default();
            let this_run = String::from_utf8_lossy(log.get(log_start as usize..).unwrap_or(&[]));
            return Err(format!(
                "postgres exited with {status}: {}",
                this_run.trim()
            ));
        }
        // postmaster.pid: line 1 the pid, line 8 "ready" once it accepts connections.
        let text = fs::read_to_string(&pid_file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let ours = lines.first().map(|l| l.trim()) == Some(pid.to_string().as_str());
        if ours && lines.get(7).map(|l| l.trim()) == Some("ready") && port_accepts(port) {
            return Ok(server);
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready within {START_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `X/Y` LSN text to a number.
pub fn parse_lsn(lsn: &str) -> Option<u64> {
    let (hi, lo) = lsn.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}
