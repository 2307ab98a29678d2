//! Letting go of the stream when PostgreSQL waits on us to shut down
//! (design: guarantee 9, "a good neighbour").
//!
//! At shutdown a walsender exits only once its client has confirmed everything
//! it was sent (`WalSndDone` compares the reported flush position with its
//! `sentPtr`). Until then it sends a keepalive asking for a reply, and another
//! one right after each reply. While Kafka does not acknowledge, the relay
//! cannot confirm, so it would answer honestly forever and the database would
//! never stop. The pattern is unmistakable: keepalives with `reply_requested`
//! back to back, at a position the relay has received in full, while what it
//! reports stays below it. A live server asks for a reply only when half of
//! `wal_sender_timeout` passed without one, and the relay replies every status
//! interval, so in normal operation (back-pressure, a slow broker) such pings
//! are rare and far apart.
//!
//! Letting go confirms nothing new: the relay sends its honest position, ends
//! the stream, and resumes from the slot once the server is back (duplicates
//! only, each with its original id).
//!
//! Pure: the session feeds it keepalives and clock readings.

use std::time::{Duration, Instant};

use crate::lsn::Lsn;

/// Reply-requesting keepalives in a row that mean "shutting down".
pub const SHUTDOWN_PINGS: u32 = 5;
/// Longest gap between two of them: a shutting-down walsender pings again as
/// soon as it reads the reply (a round trip); a live one waits half of
/// `wal_sender_timeout` (seconds at least).
pub const SHUTDOWN_PING_GAP: Duration = Duration::from_millis(500);

/// See the module documentation.
#[derive(Debug, Default)]
pub struct ShutdownDetector {
    streak: u32,
    last: Option<(Instant, Lsn)>,
}

impl ShutdownDetector {
    /// A keepalive arrived at `now`. `received` is the highest position
    /// received from the server, `reported` the flush position the relay
    /// reports. True when the server is waiting on the relay to shut down.
    pub fn on_keepalive(
        &mut self,
        now: Instant,
        wal_end: Lsn,
        reply_requested: bool,
        received: Lsn,
        reported: Lsn,
    ) -> bool {
        if !reply_requested {
            // Answers to our own status updates come in between: neutral.
            return false;
        }
        if wal_end < received || reported >= wal_end {
            // More is coming, or our reply satisfies the server.
            self.reset();
            return false;
        }
        let follows = self
            .last
            .is_some_and(|(at, lsn)| lsn == wal_end && now.duration_since(at) <= SHUTDOWN_PING_GAP);
        self.streak = if follows { self.streak + 1 } else { 1 };
        self.last = Some((now, wal_end));
        self.streak >= SHUTDOWN_PINGS
    }

    /// Data arrived: the server is streaming, not waiting.
    pub fn reset(&mut self) {
        self.streak = 0;
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: Lsn = Lsn(0x100);
    const BELOW: Lsn = Lsn(0x80);

    #[test]
    fn back_to_back_pings_at_a_position_we_cannot_confirm_mean_shutdown() {
        let mut d = ShutdownDetector::default();
        let t = Instant::now();
        let ms = Duration::from_millis;
        for i in 0..SHUTDOWN_PINGS - 1 {
            assert!(!d.on_keepalive(t + ms(2 * i as u64), AT, true, AT, BELOW));
            // Answers to our status updates in between change nothing.
            assert!(!d.on_keepalive(t + ms(2 * i as u64 + 1), AT, false, AT, BELOW));
        }
        assert!(d.on_keepalive(t + ms(20), AT, true, AT, BELOW));
    }

    #[test]
    fn pings_of_a_live_server_are_far_apart() {
        // Half of a 60 s wal_sender_timeout between pings, broker hung.
        let mut d = ShutdownDetector::default();
        let t = Instant::now();
        for i in 0..20u64 {
            assert!(!d.on_keepalive(t + Duration::from_secs(30 * i), AT, true, AT, BELOW));
        }
    }

    #[test]
    fn pings_we_can_answer_or_with_more_to_come_are_not_shutdown() {
        let mut d = ShutdownDetector::default();
        let t = Instant::now();
        for _ in 0..20 {
            // Everything confirmed: our reply lets the server go.
            assert!(!d.on_keepalive(t, AT, true, AT, AT));
            // The server has sent more than the keepalive says: streaming.
            assert!(!d.on_keepalive(t, BELOW, true, AT, Lsn(0)));
        }
        // Data in between breaks a streak.
        for _ in 0..SHUTDOWN_PINGS - 1 {
            assert!(!d.on_keepalive(t, AT, true, AT, BELOW));
        }
        d.reset();
        assert!(!d.on_keepalive(t, AT, true, AT, BELOW));
    }
}
