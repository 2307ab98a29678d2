//! Child processes of the benchmark, and their cleanup on every path out.
//!
//! Every server or tool the benchmark starts goes through [`spawn`]: the child
//! is registered by pid so that a Ctrl-C (or SIGTERM) handler can stop all of
//! them at once ([`stop_all_registered`]), its [`Guarded`] handle kills it on
//! drop (error paths, panics), and on Linux it gets a parent-death signal so
//! that even a SIGKILLed benchmark leaves nothing behind.
//!
//! Temp dirs are registered the same way and removed by [`stop_all_registered`].

use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::resources::{self, ProcSample};

/// Live children: pid and the signal that stops each one cleanly.
static LIVE: Mutex<Vec<(u32, libc::c_int)>> = Mutex::new(Vec::new());
/// Temp dirs to remove when the benchmark is interrupted.
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A child process that is stopped (then killed) when dropped.
pub struct Guarded {
    name: String,
    child: Child,
    stop_signal: libc::c_int,
    status: Option<ExitStatus>,
    /// The last `/proc` sample taken while it ran (kept for after it exits).
    last: Option<ProcSample>,
}

/// Spawn `cmd`, registered for cleanup. `stop_signal` is what [`Guarded::stop`]
/// and the interrupt handler send first (SIGTERM, or SIGQUIT for PostgreSQL's
/// immediate shutdown).
pub fn spawn(name: &str, cmd: &mut Command, stop_signal: libc::c_int) -> std::io::Result<Guarded> {
    // PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only
    // children forked by the main thread (which lives as long as the process)
    // get it; the benchmark spawns everything from there.
    if std::thread::current().name() == Some("main") {
        let sig = stop_signal;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0);
                Ok(())
            });
        }
    }
    // Its own process group: a terminal's Ctrl-C reaches only the benchmark,
    // which then stops everything in order.
    cmd.process_group(0);
    let child = cmd.spawn()?;
    LIVE.lock()
        .expect("registry lock")
        .push((child.id(), stop_signal));
    Ok(Guarded {
        name: name.to_string(),
        child,
        stop_signal,
        status: None,
        last: None,
    })
}

impl Guarded {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Samples `/proc/<pid>`; remembers the sample so that figures survive the exit.
    pub fn sample(&mut self) -> Option<ProcSample> {
        if self.status.is_some() {
            return self.last.clone();
        }
        if let Some(s) = resources::sample(self.pid()) {
            // An exiting process (or a zombie) has its final CPU times but no
            // memory figures any more: keep the last ones seen.
            let s = match &self.last {
                Some(prev) if s.zombie || s.vm_hwm_kb == 0 => ProcSample {
                    vm_hwm_kb: prev.vm_hwm_kb,
                    vm_rss_kb: prev.vm_rss_kb,
                    ..s
                },
                _ => s,
            };
            self.last = Some(s);
        }
        self.last.clone()
    }

    /// Whether the process has exited (reaps it, after a final sample).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if resources::is_zombie(self.pid()) {
                self.sample();
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
                unregister(self.child.id());
            }
        }
        self.status
    }

    /// Waits for the process to exit by itself, sampling it every 20 ms (so the
    /// last sample has its final CPU times and peak memory).
    pub fn wait_sampling(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            self.sample();
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        if self.status.is_none() {
            // SAFETY: kill(2) on a child we have not reaped.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
    }

    /// Sends the stop signal, waits up to `timeout`, then SIGKILLs.
    pub fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        self.signal(self.stop_signal);
        if let Some(s) = self.wait_sampling(timeout) {
            return Some(s);
        }
        say!(
            "{} (pid {}) did not stop within {timeout:?}; killing it",
            self.name,
            self.pid()
        );
        self.kill9();
        self.status
    }

    pub fn kill9(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
            unregister(self.child.id());
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.signal(self.stop_signal);
            let _ = self.wait_sampling(Duration::from_secs(5));
            self.kill9();
        }
    }
}

fn unregister(pid: u32) {
    LIVE.lock()
        .expect("registry lock")
        .retain(|(p, _)| *p != pid);
}

/// A temp dir removed on drop (and by the interrupt handler), unless kept.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new(base: &Path, prefix: &str, keep: bool) -> std::io::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = base.join(format!("{prefix}{}-{nanos:x}", std::process::id()));
        fs::create_dir_all(&path)?;
        if !keep {
            TEMP_DIRS.lock().expect("registry lock").push(path.clone());
        }
        Ok(TempDir { path, keep })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            say!("kept {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
        TEMP_DIRS
            .lock()
            .expect("registry lock")
            .retain(|p| p != &self.path);
    }
}

/// Stops every registered child (its stop signal, then SIGKILL after a grace
/// period) and removes the registered temp dirs. For the interrupt handler.
pub fn stop_all_registered() {
    let live: Vec<(u32, libc::c_int)> = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
    for (pid, sig) in &live {
        // SAFETY: kill(2); the pids are children not yet reaped by us.
        unsafe { libc::kill(*pid as libc::pid_t, *sig) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for (pid, _) in &live {
        while resources::alive(*pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if resources::alive(*pid) {
            // SAFETY: as above.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    let dirs: Vec<PathBuf> = TEMP_DIRS.lock().map(|d| d.clone()).unwrap_or_default();
    for d in dirs {
        let _ = fs::remove_dir_all(d);
    }
}
