//! Pace: how many records may be in flight after the broker was too slow.
//!
//! The window (`max_in_flight_records`, `max_in_flight_bytes`) bounds memory.
//! It is not a speed: after an outage the relay fills it at once with the
//! backlog, and a broker that needs longer than `message.timeout.ms` to
//! acknowledge a full window fails records with "Message timed out". The
//! session then restarts from the slot and sends the same full window again:
//! every round times out, the slot never moves, and every round's records
//! that did land are duplicates (seen with tansu on sqlite catching up 14,000
//! records under a 3.5 s timeout).
//!
//! So a time-out halves the records allowed in flight (never below
//! [`MIN_CAP`]), and acknowledgements give it back slowly (one record per
//! [`ACKS_PER_STEP`] acknowledgements) until it reaches the window again and
//! the cap is lifted. It is remembered across sessions, since a time-out ends
//! the session. Pure: the session feeds it facts.

/// The fewest records a time-out leaves in flight.
pub(super) const MIN_CAP: usize = 64;
/// Acknowledgements that add one record to the cap.
pub(super) const ACKS_PER_STEP: u32 = 4;

#[derive(Debug, Default)]
pub(super) struct Pace {
    /// Records allowed in flight; `None`: the window alone decides.
    cap: Option<usize>,
    /// Acknowledgements since the cap last grew.
    credit: u32,
}

impl Pace {
    /// May another record go out with `in_flight` records unacknowledged?
    pub(super) fn has_room(&self, in_flight: usize) -> bool {
        self.cap.map_or(true, |cap| in_flight < cap)
    }

    /// The current cap, if any.
    #[cfg(test)]
    pub(super) fn cap(&self) -> Option<usize> {
        self.cap
    }

    /// A record timed out with `in_flight` records unacknowledged: allow
    /// half of what was out (or half the cap, if lower). Returns the new cap.
    pub(super) fn timed_out(&mut self, in_flight: usize) -> usize {
        let out = self.cap.map_or(in_flight, |cap| cap.min(in_flight));
        let cap = (out / 2).max(MIN_CAP);
        self.cap = Some(cap);
        self.credit = 0;
        cap
    }

    /// One record acknowledged; `window` is the configured record window.
    /// Returns true when the cap was lifted.
    pub(super) fn acked(&mut self, window: usize) -> bool {
        let Some(cap) = self.cap else { return false };
        self.credit += 1;
        if self.credit < ACKS_PER_STEP {
            return false;
        }
        self.credit = 0;
        if cap + 1 >= window {
            self.cap = None;
            true
        } else {
            self.cap = Some(cap + 1);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_cap_until_a_time_out() {
        let mut p = Pace::default();
        assert!(p.has_room(1_000_000));
        assert!(!p.acked(100));
        assert_eq!(p.cap(), None);
    }

    #[test]
    fn a_time_out_halves_what_was_out_and_never_goes_below_the_floor() {
        let mut p = Pace::default();
        assert_eq!(p.timed_out(14_000), 7_000);
        assert!(p.has_room(6_999));
        assert!(!p.has_room(7_000));
        // Again, with more out than the cap (records of the old session):
        // half the cap.
        assert_eq!(p.timed_out(20_000), 3_500);
        assert_eq!(p.timed_out(10), MIN_CAP);
        assert_eq!(p.timed_out(0), MIN_CAP);
    }

    #[test]
    fn acknowledgements_give_it_back_slowly_then_lift_it() {
        let mut p = Pace::default();
        p.timed_out(200); // cap 100
        for _ in 0..ACKS_PER_STEP * 10 {
            assert!(!p.acked(1_000));
        }
        assert_eq!(p.cap(), Some(110));
        let mut lifted = false;
        for _ in 0..ACKS_PER_STEP * 1_000 {
            if p.acked(1_000) {
                lifted = true;
                break;
            }
        }
        assert!(lifted);
        assert_eq!(p.cap(), None);
        assert!(p.has_room(usize::MAX - 1));
    }
}
