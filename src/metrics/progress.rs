//! Progress: the time lag, and the periodic one-line progress log (rate,
//! lag, confirmed LSN).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Metrics, Readiness};
use crate::lsn::{pg_micros_to_system_time, Lsn};

/// State behind one lock: readiness and the inputs of the time lag.
#[derive(Debug)]
pub(super) struct Progress {
    pub(super) readiness: Readiness,
    /// Newest confirmed commit time (µs since 2000-01-01).
    pub(super) newest_confirmed_commit: Option<i64>,
    /// Last moment the relay was streaming with nothing in flight.
    pub(super) caught_up_at: Option<SystemTime>,
}

impl Progress {
    pub(super) fn caught_up(&self) -> bool {
        self.readiness.is_streaming() && self.readiness.in_flight_records() == 0
    }

    pub(super) fn note_if_caught_up(&mut self, now: SystemTime) {
        if self.caught_up() {
            self.caught_up_at = Some(now);
        }
    }
}

/// Time lag (see [`super::names::LAG_SECONDS`]): 0 when caught up; otherwise now
/// minus the later of the newest confirmed commit and the last caught-up
/// moment; 0 when neither is known yet.
pub fn time_lag(
    now: SystemTime,
    caught_up: bool,
    newest_confirmed_commit: Option<SystemTime>,
    caught_up_at: Option<SystemTime>,
) -> Duration {
    if caught_up {
        return Duration::ZERO;
    }
    let reference = match (newest_confirmed_commit, caught_up_at) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => match a.or(b) {
            Some(t) => t,
            None => return Duration::ZERO,
        },
    };
    now.duration_since(reference).unwrap_or(Duration::ZERO)
}

/// End-to-end latency of a record: `now` minus its transaction's commit time
/// (µs since 2000-01-01, as in pgoutput's Begin); zero if the clocks disagree.
pub fn latency_since_commit(commit_time_pg_micros: i64, now: SystemTime) -> Duration {
    now.duration_since(pg_micros_to_system_time(commit_time_pg_micros))
        .unwrap_or(Duration::ZERO)
}

pub(super) fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// What the progress line reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub acked_records: u64,
    pub in_flight_records: u64,
    pub confirmed_lsn: Lsn,
    /// Last sampled slot lag; `None` before the first sample.
    pub lag_bytes: Option<u64>,
    pub lag_seconds: f64,
    pub streaming: bool,
}

/// The periodic one-line progress log (info level): call [`ProgressLog::log`]
/// from a timer (e.g. every 30 s).
#[derive(Debug, Default)]
pub struct ProgressLog {
    last: Option<(Instant, u64)>,
}

impl ProgressLog {
    pub fn new() -> Self {
        ProgressLog::default()
    }

    /// Records per second acknowledged since the previous call (0 the first time).
    pub fn rate(&mut self, snapshot: &Snapshot, now: Instant) -> f64 {
        let rate = match self.last {
            Some((then, acked)) => {
                let secs = now.saturating_duration_since(then).as_secs_f64();
                if secs > 0.0 {
                    snapshot.acked_records.saturating_sub(acked) as f64 / secs
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.last = Some((now, snapshot.acked_records));
        rate
    }

    /// Emits one `progress` line at info level.
    pub fn log(&mut self, metrics: &Metrics) {
        let s = metrics.snapshot();
        let rate = self.rate(&s, Instant::now());
        tracing::info!(
            records_per_sec = format_args!("{rate:.1}"),
            acked_total = s.acked_records,
            in_flight = s.in_flight_records,
            lag_bytes = s.lag_bytes.map(|b| b as i64).unwrap_or(-1),
            lag_seconds = format_args!("{:.3}", s.lag_seconds),
            confirmed_lsn = %s.confirmed_lsn,
            streaming = s.streaming,
            "progress"
        );
    }
}
