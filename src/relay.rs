//! The relay loop: one task owns the replication session, the mapper, the
//! producer handle and the ack tracker. No locks on the hot path.
//!
//! ```text
//! run ─► session ─► loop { select! biased:
//!          1. shutdown        stop intake, drain in-flight records (bounded)
//!          2. delivery report ack the record in the tracker, free the window
//!                             (and every report already waiting: a burst)
//!          3. status timer    send written/flushed to PostgreSQL (+ ask for a keepalive)
//!          4. queue-full retry
//!          5. intake          next replication message, only while the window has room
//!                             (and the frames the same read already buffered)
//!        }
//!      ◄─ on error: disposition → retry from the slot with jittered backoff, or stop
//! ```
//!
//! The branch order is the priority: shutdown first so a SIGTERM is never
//! starved; delivery reports before intake so acknowledgements (which free the
//! window and move the flush LSN) always win over reading more, which is what
//! keeps memory bounded; the timer before intake so status updates keep going
//! while the window is full or the broker is slow (otherwise the walsender
//! times out after `wal_sender_timeout`). A burst is capped at [`BURST`]
//! messages so the branches above it are looked at again soon; metrics that
//! take a lock are tallied per burst, not per record.
//!
//! Where each part lives:
//!
//! | file | what |
//! |---|---|
//! | `relay.rs` | the [`Relay`] (what lasts across sessions) and this map |
//! | `reconnect.rs` | [`Relay::run`]: session after session, backoff, standby, producer rebuilds |
//! | `lifecycle.rs` | one session's setup (connect, checks, start) and teardown (settle, confirm) |
//! | `slot.rs` | the server's and slot's continuity across sessions; slot creation |
//! | `identity.rs` | the pure rules `slot.rs` applies (gaps, failover, forks) |
//! | `resume.rs` | where a session starts: `--start-lsn`, the durable progress record |
//! | `session.rs` | the loop itself (above) |
//! | `coalesce.rs` | fewer wake-ups while behind: small reads paused, the socket's low-water mark raised |
//! | `message.rs`, `poison.rs` | logical decoding messages; poison rows and the dead-letter path |
//! | `delivery.rs`, `pace.rs` | failed delivery reports; the in-flight cap after time-outs |
//! | `letgo.rs` | letting go of a server that is shutting down |
//! | `progress.rs`, `cleanup.rs` | the durable progress table; `--delete-delivered` |
//! | `facts.rs`, `lag.rs`, `holder.rs` | facts read before streaming; lag sampling; stale slot holders |
//! | `stages.rs` | clock readings for the stage latencies |
//! | `error.rs` | [`RelayError`] and its [`Disposition`] (retry or stop) |
//! | `stream.rs`, `headers.rs` | [`StreamOptions`], [`pgoutput_options`]; the headers the relay adds |
//! | `limits.rs` | the loop's fixed bounds (`BURST`...) and its in-flight count |

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kafka::{KafkaSink, SinkSettings};
use crate::lsn::Lsn;
use crate::metrics::Metrics;

mod cleanup;
mod coalesce;
mod delivery;
mod error;
mod facts;
mod headers;
mod holder;
mod identity;
mod lag;
mod letgo;
mod lifecycle;
mod limits;
mod message;
mod pace;
mod poison;
mod progress;
mod reconnect;
mod resume;
mod session;
mod slot;
mod stages;
mod stream;

pub use error::{Disposition, RelayError};
pub use headers::{HEADER_ERROR_CLASS, HEADER_ERROR_REASON, HEADER_ORIGINAL_TOPIC, HEADER_REPLAY};
pub use stream::{pgoutput_options, StreamOptions};
// For the loop's files, which import them from here.
use limits::{
    Window, BURST, LAG_SAMPLE_INTERVAL, PROGRESS_LOG_INTERVAL, PROMPT_INTERVAL, QUEUE_FULL_RETRY,
};

/// The log target of the files split out of this one (`reconnect`, `lifecycle`,
/// `slot`, `resume`): their lines keep the target they had before the split,
/// which log filters and pipelines may match exactly.
const LOG_TARGET: &str = module_path!();

/// The relay: configuration, the producer, and the shutdown signal.
pub struct Relay {
    cfg: Config,
    shutdown: CancellationToken,
    metrics: Metrics,
    opts: StreamOptions,
    generation: u64,
    sink: Option<KafkaSink>,
    /// A session of this process started streaming (preflight and
    /// `--start-lsn`'s checks are for the first one).
    started: bool,
    /// The server and slot this process streams from, across sessions.
    memory: identity::Memory,
    /// The last decode failure's position and how many sessions in a row hit it.
    decode_failures: Option<(Lsn, u32)>,
    /// The progress table could not be used (said once until it works).
    progress_warned: bool,
    /// What the broker acknowledged by the end of the last session, on which
    /// server: the next session on the same server and timeline skips it
    /// like the durable progress record (which may lag it, or be unwritable
    /// while PostgreSQL restarts).
    acked: Option<(identity::ServerIdentity, Lsn)>,
    delivery: delivery::DeliveryMemory,
}

impl Relay {
    pub fn new(cfg: Config, shutdown: CancellationToken) -> Self {
        Self::with_metrics(cfg, shutdown, Metrics::new())
    }

    /// A relay reporting into `metrics` (shared with the HTTP endpoints).
    pub fn with_metrics(cfg: Config, shutdown: CancellationToken, metrics: Metrics) -> Self {
        Relay {
            cfg,
            shutdown,
            metrics,
            opts: StreamOptions::default(),
            generation: 0,
            sink: None,
            started: false,
            memory: identity::Memory::default(),
            decode_failures: None,
            progress_warned: false,
            acked: None,
            delivery: Default::default(),
        }
    }

    /// Start, end and confirmation behaviour (see [`StreamOptions`]).
    pub fn stream_options(mut self, opts: StreamOptions) -> Self {
        self.opts = opts;
        self
    }

    fn sink_settings(&self) -> SinkSettings {
        SinkSettings::from_config(&self.cfg)
    }
}
