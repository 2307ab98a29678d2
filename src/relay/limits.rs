//! The session loop's fixed bounds and intervals (too internal to be settings),
//! and its count of what is in flight ([`Window`], bounded by the
//! `max_in_flight_*` settings).
//!
//! They live here rather than beside their users (`session.rs`, `lag.rs`) only
//! so that those files keep importing them from `super`.

use std::time::Duration;

/// Shortest time between a status update and a prompt one sent because
/// acknowledgements moved the flush position.
pub(super) const PROMPT_INTERVAL: Duration = Duration::from_millis(10);
/// How often the slot's lag and retained WAL are sampled over SQL.
pub(super) const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// How often the one-line progress log is written.
pub(super) const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// Pause before retrying a record librdkafka's queue refused.
pub(super) const QUEUE_FULL_RETRY: Duration = Duration::from_millis(5);
/// Most replication messages (or delivery reports) handled in one wake-up of
/// the loop before the higher-priority branches are looked at again. Large
/// enough to take a whole socket read (or produce batch) at once, small enough
/// that status updates and shutdown never wait long behind a burst.
pub(super) const BURST: usize = 512;

/// Records and bytes handed to the producer and not yet acknowledged.
#[derive(Debug, Default)]
pub(super) struct Window {
    pub(super) records: usize,
    pub(super) bytes: usize,
}
