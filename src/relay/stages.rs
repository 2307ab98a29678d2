//! The session's clock readings for the stage latencies (see
//! [`crate::metrics`]'s `outbox_relay_stage_latency_seconds`): when a burst of
//! frames was read, when each record was handed to the producer, when its
//! acknowledgement came back.

use std::time::{Instant, SystemTime};

use crate::kafka::DeliveryToken;
use crate::metrics::latency_since_commit;

use super::session::Session;

/// When the loop read the frames it is handling (one reading per burst).
#[derive(Debug, Clone, Copy)]
pub(super) struct Received {
    pub(super) at: Instant,
    pub(super) wall: SystemTime,
}

impl Received {
    pub(super) fn now() -> Received {
        Received {
            at: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

impl Session<'_> {
    /// A row of a transaction committed at `commit_time` (PostgreSQL µs) is to
    /// become a record: the `server` stage ended when its frame was read.
    pub(super) fn row_received(&self, commit_time: i64) {
        self.metrics
            .stage_server(latency_since_commit(commit_time, self.received.wall));
    }

    /// The record is handed to the producer now (stamped just before, so the
    /// `broker` stage includes the producer's own queueing).
    pub(super) fn handing(token: &mut DeliveryToken) {
        token.handed = Some(Instant::now());
    }

    /// The producer took the record: the `relay` stage ends (from the read).
    /// A record parked on a full queue counts once, when it is taken; no frame
    /// is read while one is parked, so the read time is still its own.
    pub(super) fn handed(&self, token: &DeliveryToken) {
        if let Some(handed) = token.handed {
            self.metrics
                .stage_relay(handed.saturating_duration_since(self.received.at));
        }
    }

    /// The broker acknowledged the record at `now`: the `broker` stage ends.
    pub(super) fn acknowledged(&self, token: &DeliveryToken, now: Instant) {
        if let Some(handed) = token.handed {
            self.metrics
                .stage_broker(now.saturating_duration_since(handed));
        }
    }
}
