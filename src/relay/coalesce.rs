//! Read coalescing while catching up.
//!
//! The walsender flushes every logical decoding message on its own (a 1-row
//! transaction is three sends: Begin, Insert, Commit), and with PostgreSQL
//! and the relay on the same cores the loop's thread woke up for nearly each
//! of them: 1.6-1.9 voluntary context switches per event were measured over a
//! backlog of 1-row transactions, the relay's CPU going mostly to sleeping
//! and being woken, and the walsender's growing with it.
//!
//! So when the stream is **behind** (the newest transaction read committed
//! more than [`CATCH_UP_LAG`] ago) and a read brought only a few frames, the
//! loop waits [`PAUSE`] before it reads again, letting the server fill the
//! socket, and then takes the whole lot in one wake-up. Pausing the read alone
//! is not enough: the runtime's poller still wakes the thread for every
//! segment that arrives. During the pause the socket's receive low-water mark
//! (`SO_RCVLOWAT`) is raised to [`LOW_WATER`], so the kernel does not report
//! the socket until a full read buffer is queued; it goes back to 1 when the
//! pause ends, and Linux then reports at once whatever is queued. Delivery
//! reports wait out the pause too (librdkafka hands them over a few at a
//! time, each a wake-up; the window bounds how many can queue), while status
//! updates and shutdown are served during it as always.
//!
//! Latency is untouched when the relay keeps up: a stream within
//! [`CATCH_UP_LAG`] of its commits never pauses, and a stream behind it is
//! delayed by at most one pause per small read (a millisecond or two, the
//! timer's tick included, against events already 50 ms old). A clock of the
//! relay's host running ahead of the server's by more than [`CATCH_UP_LAG`]
//! makes small reads pause even when caught up: still at most that much
//! added. Over a Unix socket there is no low-water mark to set; the pause
//! alone applies.

use std::time::{Duration, SystemTime};

use crate::metrics::latency_since_commit;
use crate::replication::ReplicationStream;

/// How far behind its commits the stream must be for reads to be coalesced.
pub(super) const CATCH_UP_LAG: Duration = Duration::from_millis(50);

/// The wait after a small read while behind.
pub(super) const PAUSE: Duration = Duration::from_millis(1);

/// A burst of fewer frames than this is a small read. A full 64 KiB read
/// buffer holds ~50 1-KiB rows: such bursts go on at once.
pub(super) const SMALL_BURST: usize = 32;

/// The socket's receive low-water mark during a pause: the replication
/// connection's read buffer (64 KiB), since waking for less gains nothing.
pub(super) const LOW_WATER: usize = 64 * 1024;

#[derive(Debug, Default)]
pub(super) struct Coalesce {
    /// Commit time (PostgreSQL µs) of the newest transaction read.
    newest_commit: Option<i64>,
    /// No read before this instant.
    pause_until: Option<tokio::time::Instant>,
    /// Setting the low-water mark failed once (logged): only pause.
    no_low_water: bool,
    /// The first pause of the session was logged.
    logged: bool,
}

impl Coalesce {
    /// A transaction committed at `commit_time` begins in the stream.
    pub(super) fn on_begin(&mut self, commit_time: i64) {
        self.newest_commit = Some(commit_time);
    }

    /// A burst of `frames` frames, read at `read_at`, was handled: pause the
    /// next read when it was small and the stream is behind.
    pub(super) fn after_burst(
        &mut self,
        frames: usize,
        read_at: SystemTime,
        stream: &ReplicationStream,
    ) {
        if self.should_pause(frames, read_at) {
            if !self.logged {
                self.logged = true;
                let behind = self
                    .newest_commit
                    .map(|t| latency_since_commit(t, read_at))
                    .unwrap_or_default();
                tracing::debug!(
                    behind = ?behind,
                    "the stream is behind its commits: coalescing small reads until it catches up"
                );
            }
            self.pause_until = Some(tokio::time::Instant::now() + PAUSE);
            self.low_water(stream, LOW_WATER);
        }
    }

    fn should_pause(&self, frames: usize, read_at: SystemTime) -> bool {
        frames < SMALL_BURST
            && self
                .newest_commit
                .is_some_and(|t| latency_since_commit(t, read_at) > CATCH_UP_LAG)
    }

    /// When the next read may happen, while paused.
    pub(super) fn paused_until(&self) -> Option<tokio::time::Instant> {
        self.pause_until
    }

    /// The pause is over: read again, whatever is queued. A mark that could
    /// not be lowered would keep small messages (a keepalive, a lone
    /// transaction) from ever being reported: that ends the session, and the
    /// next one has a new socket.
    pub(super) fn resume(&mut self, stream: &ReplicationStream) -> std::io::Result<()> {
        self.pause_until = None;
        if self.no_low_water {
            return Ok(());
        }
        stream.set_read_low_water(1)
    }

    fn low_water(&mut self, stream: &ReplicationStream, bytes: usize) {
        if self.no_low_water {
            return;
        }
        if let Err(e) = stream.set_read_low_water(bytes) {
            tracing::debug!(error = %e, "cannot set SO_RCVLOWAT on the replication socket: coalescing reads with the pause alone");
            self.no_low_water = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::pg_micros_to_system_time;

    fn pg_micros(t: SystemTime) -> i64 {
        let epoch = pg_micros_to_system_time(0);
        t.duration_since(epoch).unwrap().as_micros() as i64
    }

    #[test]
    fn pauses_only_small_reads_of_a_stream_that_is_behind() {
        let now = SystemTime::now();
        let mut c = Coalesce::default();
        // Nothing read yet: no commit time to judge by.
        assert!(!c.should_pause(1, now));
        // Fresh transactions: never paused.
        c.on_begin(pg_micros(now - Duration::from_millis(5)));
        assert!(!c.should_pause(1, now));
        // Behind, but a big burst: go on reading.
        c.on_begin(pg_micros(now - Duration::from_secs(2)));
        assert!(!c.should_pause(SMALL_BURST, now));
        // Behind and a small burst: pause.
        assert!(c.should_pause(SMALL_BURST - 1, now));
        // Caught up again: no more pauses.
        c.on_begin(pg_micros(now));
        assert!(!c.should_pause(1, now));
    }
}
