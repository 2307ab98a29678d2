//! Where a record's time goes: the end-to-end latency split in three stages,
//! one histogram family labelled `stage`.
//!
//! ```text
//! commit in PostgreSQL ─server─► XLogData read by the relay's loop ─relay─►
//!   handed to the producer ─broker─► acknowledged by the broker
//! ```
//!
//! `server` runs on the wall clock (the commit time is PostgreSQL's, so on
//! another host it includes the clock offset); `relay` and `broker` run on the
//! monotonic clock of this process. The three add up to the end-to-end
//! histogram's figure for the same record (to within the clock readings, which
//! are taken once per burst of frames or reports).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// Upper bounds (seconds) of the stage buckets: 50 µs … 60 s (the relay's own
/// stage is well under a millisecond when it keeps up).
pub const STAGE_LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The values of the `stage` label.
pub const STAGES: [&str; 3] = ["server", "relay", "broker"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StageLabel {
    stage: &'static str,
}

/// The family to register, and a handle per stage (no label lookup on the hot
/// path).
pub(super) struct Stages {
    server: Histogram,
    relay: Histogram,
    broker: Histogram,
}

pub(super) type StageFamily = Family<StageLabel, Histogram, fn() -> Histogram>;

pub(super) fn family() -> StageFamily {
    Family::new_with_constructor(|| Histogram::new(STAGE_LATENCY_BUCKETS.iter().copied()))
}

impl Stages {
    /// The three series exist (at zero) from the start, so a scrape shows them
    /// before the first record.
    pub(super) fn new(family: &StageFamily) -> Stages {
        let get = |stage| family.get_or_create(&StageLabel { stage }).clone();
        Stages {
            server: get(STAGES[0]),
            relay: get(STAGES[1]),
            broker: get(STAGES[2]),
        }
    }

    pub(super) fn server(&self, d: Duration) {
        self.server.observe(d.as_secs_f64());
    }

    pub(super) fn relay(&self, d: Duration) {
        self.relay.observe(d.as_secs_f64());
    }

    pub(super) fn broker(&self, d: Duration) {
        self.broker.observe(d.as_secs_f64());
    }
}
