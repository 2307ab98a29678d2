//! Readiness: is the relay doing its job right now? Pure: every method takes
//! the current instant, so the rules are tested with injected instants.
//!
//! Rules, checked in this order (the first that fails is the reason):
//!
//! 1. **Streaming, or a healthy standby.** Not ready while the replication
//!    stream is down (starting, reconnecting, or stopped), unless the relay is
//!    a standby: a recent SQL sample (see [`Readiness::on_standby_sample`])
//!    saw another process streaming from the slot. PostgreSQL lets one
//!    consumer stream from a slot, so the second relay of a pair waits; that
//!    is its job, and a rolling update or a Service must be able to count it
//!    as ready ([`Ready::Standby`]).
//! 2. **Acknowledgements progressing.** Not ready when records are in flight
//!    and the broker acknowledged none of them for longer than the stall
//!    timeout (counted from the later of the last acknowledgement and the
//!    moment records went in flight, so a first record after an idle hour is
//!    not "stuck for an hour").
//! 3. **Not stuck while lag grows.** Not ready when the confirmed position has
//!    not moved for longer than the stall timeout while the slot's lag (server
//!    WAL position minus confirmed position, sampled over SQL) grew meanwhile.
//!    An idle database does not trip this: its lag does not grow. A busy
//!    database with an idle outbox does not either, because keepalive markers
//!    keep the confirmed position moving.
//!
//! Ready otherwise.

use std::time::{Duration, Instant};

use crate::lsn::Lsn;

/// Default for how long acknowledgements or the confirmed position may stand
/// still (under the conditions above) before the relay reports not ready.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What a ready relay is doing (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// It streams from the slot.
    Streaming,
    /// Another process streams from the slot; this relay takes over when the
    /// slot is free. `holder_pid` is that process's backend pid.
    Standby { holder_pid: Option<i32> },
}

/// The role a relay plays, for the `outbox_relay_role` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Streaming,
    Standby,
    /// Neither: starting, reconnecting, or failing.
    Down,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Streaming, Role::Standby, Role::Down];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Streaming => "streaming",
            Role::Standby => "standby",
            Role::Down => "down",
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Readiness {
    stall_timeout: Duration,
    /// Until when the last standby sample counts, and the holder it saw.
    standby_until: Option<(Instant, Option<i32>)>,
    /// The relay stopped for good, and why (it is about to exit).
    fatal: Option<String>,
    /// Why the stream is down, when a sample found out (e.g. every WAL
    /// sender is busy); added to the not-ready reason.
    down_because: Option<String>,
    streaming: bool,
    /// When `streaming` last changed (or when this value was built).
    streaming_changed: Instant,
    ever_streamed: bool,
    in_flight_records: u64,
    /// When the in-flight count last went from 0 to more.
    in_flight_since: Option<Instant>,
    last_ack: Option<Instant>,
    confirmed: Lsn,
    /// When the confirmed position last moved (or streaming started).
    confirmed_moved: Instant,
    /// First lag sample taken since the confirmed position last moved.
    lag_baseline: Option<u64>,
    /// Most recent lag sample.
    lag_latest: Option<u64>,
}

impl Readiness {
    pub fn new(stall_timeout: Duration, now: Instant) -> Self {
        Readiness {
            stall_timeout,
            standby_until: None,
            fatal: None,
            down_because: None,
            streaming: false,
            streaming_changed: now,
            ever_streamed: false,
            in_flight_records: 0,
            in_flight_since: None,
            last_ack: None,
            confirmed: Lsn::ZERO,
            confirmed_moved: now,
            lag_baseline: None,
            lag_latest: None,
        }
    }

    pub fn stall_timeout(&self) -> Duration {
        self.stall_timeout
    }

    pub fn is_streaming(&self) -> bool {
        self.streaming
    }

    pub fn in_flight_records(&self) -> u64 {
        self.in_flight_records
    }

    /// The replication stream went up or down. Going up starts a fresh
    /// observation period for rules 2 and 3.
    pub fn set_streaming(&mut self, streaming: bool, now: Instant) {
        if streaming == self.streaming {
            return;
        }
        self.streaming = streaming;
        self.streaming_changed = now;
        // A standby sample taken before the stream came up saw ourselves or
        // the holder we replaced: either way it says nothing after this.
        self.standby_until = None;
        if streaming {
            self.down_because = None;
            self.ever_streamed = true;
            self.confirmed_moved = now;
            self.lag_baseline = None;
            self.lag_latest = None;
            if self.in_flight_records > 0 {
                self.in_flight_since = Some(now);
            }
        }
    }

    /// The broker acknowledged a record.
    pub fn on_ack(&mut self, now: Instant) {
        self.last_ack = Some(now);
    }

    /// The number of records handed to the producer and not yet acknowledged.
    pub fn on_in_flight(&mut self, records: u64, now: Instant) {
        if records == 0 {
            self.in_flight_since = None;
        } else if self.in_flight_records == 0 || self.in_flight_since.is_none() {
            self.in_flight_since = Some(now);
        }
        self.in_flight_records = records;
    }

    /// The flush LSN sent to PostgreSQL.
    pub fn on_confirmed(&mut self, lsn: Lsn, now: Instant) {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            self.confirmed_moved = now;
            self.lag_baseline = None;
        }
    }

    /// A lag sample (server WAL position minus the slot's confirmed position).
    pub fn on_lag_sample(&mut self, lag_bytes: u64, _now: Instant) {
        if self.lag_baseline.is_none() {
            self.lag_baseline = Some(lag_bytes);
        }
        self.lag_latest = Some(lag_bytes);
    }

    /// An SQL sample of the slot taken while this relay was not streaming:
    /// `Some(pid)` when another backend streams from it (we are a standby),
    /// `None` when nobody does or the slot could not be read. A sample counts
    /// for `valid_for` (a few sampling periods); a standby whose samples stop
    /// (the server is unreachable) stops being ready after that.
    pub fn on_standby_sample(&mut self, holder: Option<i32>, valid_for: Duration, now: Instant) {
        self.standby_until = if self.streaming {
            None
        } else {
            holder.map(|pid| (now + valid_for, Some(pid)))
        };
    }

    /// Why the stream is down, as far as a sample can tell (`None`: unknown).
    pub fn set_down_because(&mut self, why: Option<String>) {
        self.down_because = why;
    }

    /// The relay stopped for good: never ready again, for this reason.
    pub fn set_fatal(&mut self, reason: String) {
        self.fatal = Some(reason);
    }

    /// The role right now (for the role gauge).
    pub fn role(&self, now: Instant) -> Role {
        match self.state(now) {
            Ok(Ready::Standby { .. }) => Role::Standby,
            _ if self.streaming => Role::Streaming,
            _ => Role::Down,
        }
    }

    /// `Ok` when ready, else why not (one sentence, for `/readyz`).
    pub fn is_ready(&self, now: Instant) -> Result<(), String> {
        self.state(now).map(|_| ())
    }

    /// Like [`Readiness::is_ready`], saying what the ready relay does.
    pub fn state(&self, now: Instant) -> Result<Ready, String> {
        if let Some(reason) = &self.fatal {
            return Err(reason.clone());
        }
        if !self.streaming {
            if let Some((until, holder_pid)) = self.standby_until {
                if now <= until {
                    return Ok(Ready::Standby { holder_pid });
                }
            }
            let since = secs(now.saturating_duration_since(self.streaming_changed));
            let mut reason = if self.ever_streamed {
                format!("the replication stream is down (for {since}s); the relay is reconnecting")
            } else {
                format!("the replication stream has not started yet (waiting {since}s)")
            };
            if let Some(why) = &self.down_because {
                reason.push_str(": ");
                reason.push_str(why);
            }
            return Err(reason);
        }
        if self.in_flight_records > 0 {
            let waiting_since = match (self.last_ack, self.in_flight_since) {
                (Some(a), Some(f)) => a.max(f),
                (a, f) => a.or(f).unwrap_or(self.streaming_changed),
            };
            let waited = now.saturating_duration_since(waiting_since);
            if waited > self.stall_timeout {
                return Err(format!(
                    "{} records in flight and no broker acknowledgement for {}s (limit {}s); is Kafka reachable?",
                    self.in_flight_records,
                    secs(waited),
                    secs(self.stall_timeout)
                ));
            }
        }
        let still = now.saturating_duration_since(self.confirmed_moved);
        if still > self.stall_timeout {
            if let (Some(from), Some(to)) = (self.lag_baseline, self.lag_latest) {
                if to > from {
                    return Err(format!(
                        "the confirmed position {} has not moved for {}s while the slot lag grew from {from} to {to} bytes",
                        self.confirmed,
                        secs(still)
                    ));
                }
            }
        }
        Ok(Ready::Streaming)
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(30);

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn streaming_at(t0: Instant) -> Readiness {
        let mut r = Readiness::new(T, t0);
        r.set_streaming(true, t0);
        r
    }

    #[test]
    fn not_ready_before_the_stream_starts() {
        let t0 = Instant::now();
        let r = Readiness::new(T, t0);
        let err = r.is_ready(t0 + s(3)).unwrap_err();
        assert!(err.contains("has not started"), "{err}");
    }

    #[test]
    fn ready_while_streaming_and_idle_for_long() {
        let t0 = Instant::now();
        let r = streaming_at(t0);
        assert_eq!(r.is_ready(t0 + s(3600)), Ok(()));
    }

    #[test]
    fn not_ready_while_the_stream_is_down() {
        let t0 = Instant::now();
        let mut r = streaming_at(t0);
        r.set_streaming(false, t0 + s(10));
        let err = r.is_ready(t0 + s(15)).unwrap_err();
        assert!(err.contains("down (for 5s)"), "{err}");
        r.set_streaming(true, t0 + s(20));
        assert_eq!(r.is_ready(t0 + s(21)), Ok(()));
    }

    #[test]
    fn in_flight_without_acks_becomes_not_ready_after_the_timeout() {
        let t0 = Instant::now();
        let mut r = streaming_at(t0);
        r.on_in_flight(5, t0 + s(1));
        assert_eq!(
            r.is_ready(t0 + s(31)),
            Ok(()),
            "exactly at the limit is still ready"
        );
        let err = r.is_ready(t0 + s(32)).unwrap_err();
        assert!(err.contains("5 records in flight"), "{err}");
        assert!(err.contains("for 31s"), "{err}");
        // An acknowledgement makes it ready again.
        r.on_ack(t0 + s(33));
        assert_eq!(r.is_ready(t0 + s(40)), Ok(()));
        let err = r.is_ready(t0 + s(64)).unwrap_err();
        assert!(err.contains("for 31s"), "{err}");
    }

    #[test]
    fn an_old_ack_does_not_count_against_records_just_sent() {
        let t0 = Instant::now();
        let mut r = streaming_at(t0);
        r.on_in_flight(1, t0);
        r.on_ack(t0 + s(1));
        r.on_in_flight(0, t0 + s(1));
        // An hour of idleness, then a new record.
        r.on_in_flight(1, t0 + s(3600));
        assert_eq!(r.is_ready(t0 + s(3610)), Ok(()));
        assert!(r.is_ready(t0 + s(3631)).is_err());
    }

    #[test]
    fn acks_keep_it_ready_with_a_steady_window() {
        let t0 = Instant::now();
        let mut r = streaming_at(t0);
        r.on_in_flight(100, t0);
        for i in 1..=100 {
            r.on_ack(t0 + s(i * 10));
            r.on_in_flight(100, t0 + s(i * 10));
            assert_eq!(r.is_ready(t0 + s(i * 10 + 5)), Ok(()));
        }
    }

    #[test]
    fn nothing_in_flight_is_never_an_ack_stall() {
        let t0 = Instant::now();
        let mut r = streaming_at(t0);
        r.on_in_flight(3, t0);
        r.on_in_flight(0, t0 + s(1));
        assert_eq!(r.is_ready(t0 + s(500)), Ok(()));
    }

    #[test]
    fn reconnect_restarts_the_ack_clock() {
        let t0 = Instant::now();
        let mut r = streaming_at(t0);
        r.on_in_flight(2, t0);
        r.set_streaming(false, t0 + s(5));
        r.set_streaming(true, t0 + s(100));
        assert_eq!(r.is_ready(t0 + s(110)), Ok(()));
        assert!(r.is_ready(t0 + s(131)).is_err());
    }

    #[test]
    fn stuck_confirmed_position_with_growing_lag_is_not_ready() {
        let t0 = Instant::now();
        let mut r = streaming_at(t0);
        r.on_confirmed(Lsn(0x100), t0);
        r.on_lag_sample(1_000, t0 + s(5));
        r.on_lag_sample(5_000, t0 + s(25));
        assert_eq!(r.is_ready(t0 + s(29)), Ok(()), "not stuck for long enough");
        let err = r.is_ready(t0 + s(31)).unwrap_err();
        assert!(err.contains("0/100"), "{err}");
        assert!(err.contains("from 1000 to 5000 bytes"), "{err}");
        // The confirmed position moves: ready again, baseline reset.
        r.on_confirmed(Lsn(0x200), t0 + s(32));
        assert_eq!(r.is_ready(t0 + s(33)), Ok(()));
        r.on_lag_sample(9_000, t0 + s(40));
        assert_eq!(
            r.is_ready(t0 + s(70)),
            Ok(()),
            "one sample since the move: no trend yet"
        );
        r.on_lag_sample(9_500, t0 + s(70));
        assert!(r.is_ready(t0 + s(70)).is_err());
    }

    #[test]
    fn stuck_confirmed_position_on_an_idle_database_is_ready() {
        let t0 = Instant::now();
        let mut r = streaming_at(t0);
        r.on_confirmed(Lsn(0x100), t0);
        r.on_lag_sample(0, t0 + s(5));
        r.on_lag_sample(0, t0 + s(500));
        assert_eq!(r.is_ready(t0 + s(600)), Ok(()));
    }

    #[test]
    fn confirmed_position_never_moves_backwards() {
        let t0 = Instant::now();
        let mut r = streaming_at(t0);
        r.on_confirmed(Lsn(0x200), t0);
        r.on_lag_sample(10, t0);
        r.on_confirmed(Lsn(0x100), t0 + s(40));
        r.on_lag_sample(20, t0 + s(40));
        assert!(r.is_ready(t0 + s(41)).is_err());
    }

    #[test]
    fn ack_stall_is_reported_before_lag_trend() {
        let t0 = Instant::now();
        let mut r = streaming_at(t0);
        r.on_in_flight(7, t0);
        r.on_lag_sample(1, t0);
        r.on_lag_sample(2, t0 + s(40));
        let err = r.is_ready(t0 + s(41)).unwrap_err();
        assert!(err.contains("7 records in flight"), "{err}");
    }

    #[test]
    fn a_standby_is_ready_while_its_samples_are_fresh() {
        let t0 = Instant::now();
        let mut r = Readiness::new(T, t0);
        assert_eq!(r.role(t0), Role::Down);
        r.on_standby_sample(Some(4242), s(10), t0 + s(2));
        assert_eq!(
            r.state(t0 + s(3)),
            Ok(Ready::Standby {
                holder_pid: Some(4242)
            })
        );
        assert_eq!(r.role(t0 + s(3)), Role::Standby);
        // Samples stopped (server unreachable): not ready once they are stale.
        let err = r.state(t0 + s(13)).unwrap_err();
        assert!(err.contains("has not started"), "{err}");
        assert_eq!(r.role(t0 + s(13)), Role::Down);
        // Nobody holds the slot any more: not a standby, and not streaming yet.
        r.on_standby_sample(Some(4242), s(10), t0 + s(20));
        r.on_standby_sample(None, s(10), t0 + s(22));
        assert!(r.state(t0 + s(23)).is_err());
    }

    #[test]
    fn streaming_forgets_the_standby_sample() {
        let t0 = Instant::now();
        let mut r = Readiness::new(T, t0);
        r.on_standby_sample(Some(1), s(10), t0);
        r.set_streaming(true, t0 + s(1));
        assert_eq!(r.state(t0 + s(2)), Ok(Ready::Streaming));
        assert_eq!(r.role(t0 + s(2)), Role::Streaming);
        // A sample that raced with the stream coming up does not count.
        r.on_standby_sample(Some(1), s(10), t0 + s(2));
        r.set_streaming(false, t0 + s(3));
        let err = r.state(t0 + s(4)).unwrap_err();
        assert!(err.contains("stream is down"), "{err}");
        assert_eq!(r.role(t0 + s(4)), Role::Down);
    }
}
