//! Names, ports, temp dirs, logs and child processes, and the registry of the
//! servers this kit started (for [`stop_all`]).

use std::fs::{self, File, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Live children started through [`spawn`]: pid and the signal that stops each one.
static LIVE: Mutex<Vec<(u32, libc::c_int)>> = Mutex::new(Vec::new());
/// Temp dirs made by [`temp_dir`] and not yet disposed of.
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

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

pub fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A temp dir in `$OUTBOX_RELAY_TEST_TMPDIR` (default: the system's), registered for
/// [`stop_all`] until [`dispose_temp_dir`].
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let base = std::env::var_os("OUTBOX_RELAY_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .inspect(|dir| lock(&TEMP_DIRS).push(dir.path().to_path_buf()))
        .unwrap_or_else(|e| panic!("create a temp dir in {}: {e}", base.display()))
}

pub fn keep_temp() -> bool {
    std::env::var("OUTBOX_RELAY_KEEP_TEMP").is_ok_and(|v| v == "1")
}

/// Drops (removes) the temp dir, or keeps it when `OUTBOX_RELAY_KEEP_TEMP=1`.
pub fn dispose_temp_dir(dir: tempfile::TempDir, what: &str) {
    lock(&TEMP_DIRS).retain(|p| p != dir.path());
    if keep_temp() {
        let path = dir.keep();
        eprintln!("[harness] kept {what} dir {}", path.display());
    }
}

pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// On a failing test, print the end of a server's log so nextest shows it.
pub fn dump_log_if_panicking(what: &str, path: &Path) {
    if std::thread::panicking() {
        eprintln!(
            "----- [harness] last lines of {what} log {} -----\n{}\n----- end of {what} log -----",
            path.display(),
            tail(&read_lossy(path), 60)
        );
    }
}

pub fn open_log(path: &Path) -> (File, File) {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()));
    let second = file.try_clone().expect("clone log file handle");
    (file, second)
}

pub fn signal(child: &Child, sig: libc::c_int) {
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
pub fn wait_all_threads_stopped(pid: u32) {
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
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                unregister(child.id());
                return Some(status);
            }
            Ok(None) => {}
            Err(e) => panic!("wait for child {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn kill9_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
    unregister(child.id());
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Spawns `cmd`, registered for [`stop_all`] with `stop_signal`. Spawned from the
/// main thread (a program such as the benchmark, not a test thread), the child also
/// gets that signal when the parent dies, so even a SIGKILLed program leaves no
/// server behind (PR_SET_PDEATHSIG fires when the forking *thread* exits, hence only
/// the main thread, which lives as long as the process).
pub fn spawn(cmd: &mut Command, stop_signal: libc::c_int) -> std::io::Result<Child> {
    if std::thread::current().name() == Some("main") {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    stop_signal as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                Ok(())
            });
        }
    }
    let child = cmd.spawn()?;
    lock(&LIVE).push((child.id(), stop_signal));
    Ok(child)
}

/// Forgets a child that was reaped (its pid may be reused from now on).
pub fn unregister(pid: u32) {
    lock(&LIVE).retain(|(p, _)| *p != pid);
}

/// `child.try_wait()`, unregistering it once it has exited.
pub fn try_reap(child: &mut Child) -> Option<ExitStatus> {
    match child.try_wait() {
        Ok(Some(status)) => {
            unregister(child.id());
            Some(status)
        }
        _ => None,
    }
}

/// Stops every server started through [`spawn`] (its stop signal, SIGKILL after 5 s)
/// and removes every temp dir not disposed of: for a program's Ctrl-C handler, which
/// exits without running destructors.
pub fn stop_all() {
    let live: Vec<(u32, libc::c_int)> = lock(&LIVE).clone();
    for (pid, sig) in &live {
        // SAFETY: kill(2) on children that are registered, i.e. not reaped yet.
        unsafe { libc::kill(*pid as libc::pid_t, *sig) };
    }
    let alive = |pid: u32| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    for (pid, _) in &live {
        while alive(*pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(*pid) {
            // SAFETY: as above.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    if !keep_temp() {
        for dir in lock(&TEMP_DIRS).drain(..) {
            let _ = fs::remove_dir_all(dir);
        }
    }
}
