//! CPU time and memory from `/proc`: per process, per process tree
//! (PostgreSQL's postmaster and its backends), and for the whole machine.

use std::fs;

use serde::Serialize;

/// One look at `/proc/<pid>`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcSample {
    /// user + system CPU of all its threads, in seconds.
    pub cpu_s: f64,
    /// user + system CPU of its reaped children, in seconds.
    pub children_cpu_s: f64,
    /// Peak resident set size (VmHWM), kB; 0 when unknown (zombie).
    pub vm_hwm_kb: u64,
    /// Current resident set size (VmRSS), kB.
    pub vm_rss_kb: u64,
    /// The process has exited and waits to be reaped (CPU figures are final).
    pub zombie: bool,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Fields of `/proc/<pid>/stat` after the command name: `(state, ppid, utime,
/// stime, cutime, cstime)` with times in ticks.
fn stat_fields(pid: u32) -> Option<(char, u32, u64, u64, u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field n is f[n - 3].
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some((
        f.first()?.chars().next()?,
        num(4)? as u32,
        num(14)?,
        num(15)?,
        num(16)?,
        num(17)?,
    ))
}

fn status_kb(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Samples one process; `None` when it does not exist (any more).
pub fn sample(pid: u32) -> Option<ProcSample> {
    let (state, _ppid, ut, st, cut, cst) = stat_fields(pid)?;
    let hz = clock_ticks();
    Some(ProcSample {
        cpu_s: (ut + st) as f64 / hz,
        children_cpu_s: (cut + cst) as f64 / hz,
        vm_hwm_kb: status_kb(pid, "VmHWM:"),
        vm_rss_kb: status_kb(pid, "VmRSS:"),
        zombie: state == 'Z',
    })
}

pub fn is_zombie(pid: u32) -> bool {
    matches!(stat_fields(pid), Some(('Z', ..)))
}

/// Context switches of a live process, summed over its threads from
/// `/proc/<pid>/task/*/status`: (voluntary, involuntary). A voluntary switch
/// is a thread going to sleep (waiting for a socket, a lock, a timer), so
/// their count is the process's wake-ups. Only threads alive now are
/// counted: sample before the process exits.
pub fn context_switches(pid: u32) -> (u64, u64) {
    let mut total = (0, 0);
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return total;
    };
    for entry in dir.flatten() {
        let Ok(text) = fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let n: u64 = value.parse().unwrap_or(0);
            match key {
                "voluntary_ctxt_switches:" => total.0 += n,
                "nonvoluntary_ctxt_switches:" => total.1 += n,
                _ => {}
            }
        }
    }
    total
}

/// Running (not exited, not a zombie).
pub fn alive(pid: u32) -> bool {
    matches!(stat_fields(pid), Some((s, ..)) if s != 'Z' && s != 'X')
}

/// CPU seconds of a process tree rooted at `root`: the root, its live direct
/// children, and the children it has reaped (cutime/cstime), which covers
/// PostgreSQL backends and walsenders that came and went.
pub fn tree_cpu_s(root: u32) -> f64 {
    let hz = clock_ticks();
    let Some((_, _, ut, st, cut, cst)) = stat_fields(root) else {
        return 0.0;
    };
    let mut ticks = ut + st + cut + cst;
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((_, ppid, ut, st, _, _)) = stat_fields(pid) {
                if ppid == root {
                    ticks += ut + st;
                }
            }
        }
    }
    ticks as f64 / hz
}

/// Machine-wide CPU from `/proc/stat`: (busy seconds, total seconds) summed
/// over all cores.
pub fn machine_cpu_s() -> (f64, f64) {
    let hz = clock_ticks();
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    ((total - idle) as f64 / hz, total as f64 / hz)
}

/// Number of online CPUs.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The benchmark's own process.
pub fn self_sample() -> ProcSample {
    sample(std::process::id()).unwrap_or_default()
}
