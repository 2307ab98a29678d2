//! The relay's errors and the one place that decides what each means for the
//! process: retry from the slot after a backoff, or stop for a human
//! ([`Disposition`]).

use std::time::Duration;

use crate::ack::AckError;
use crate::kafka::KafkaSinkError;
use crate::lsn::Lsn;
use crate::outbox::MappingError;
use crate::pgoutput::DecodeError;
use crate::replication::ReplicationError;
use crate::setup::{self, Problem};

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Reconnect from the slot after a backoff (at-least-once, never skip).
    Retry,
    /// Stop: a human must act (the message says what to do).
    Fatal,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("PostgreSQL is not ready for the relay:\n{}", render(.0))]
    Preflight(Vec<Problem>),
    #[error(transparent)]
    Setup(#[from] setup::SetupError),
    #[error("SQL connection: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(
        "cannot decode the replication stream: {0}; please report this with the PostgreSQL version"
    )]
    Decode(#[from] DecodeError),
    #[error("{0}")]
    Mapping(#[from] MappingError),
    #[error("the replication stream broke the transaction framing: {0}")]
    Framing(#[from] AckError),
    #[error(transparent)]
    Kafka(#[from] KafkaSinkError),
    #[error("Kafka did not acknowledge a record for topic {topic}: {error}")]
    Delivery { topic: String, error: String },
    #[error(
        "the Kafka producer hit a fatal error ({0}); rebuilding it and resuming from the slot"
    )]
    ProducerFatal(String),
    #[error("replication slot {slot:?} does not exist and slot creation is off; create it (SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')) or enable postgres.create_slot")]
    SlotMissing { slot: String },
    #[error("replication slot {slot:?} is invalidated ({reason}): PostgreSQL removed WAL it still needed, so events may be missing; drop it (SELECT pg_drop_replication_slot('{slot}')), let the relay create a new one, and backfill from the outbox table")]
    SlotInvalidated { slot: String, reason: String },
    #[error("replication slot {slot:?} uses plugin {plugin:?}, not pgoutput; use another slot name or drop it")]
    SlotPlugin { slot: String, plugin: String },
    #[error("unexpected pgoutput message {0}: the relay does not enable streaming or two-phase decoding")]
    Unexpected(&'static str),
    #[error("PostgreSQL ended the replication stream")]
    StreamEnded,
    #[error("poison row ({class}): {reason}. The relay stops rather than skip it; fix the row or the mapping, or {divert}")]
    Poison {
        class: &'static str,
        reason: String,
        /// How to divert such rows instead, given what is configured.
        divert: String,
    },
    #[error("--start-lsn {start} is below slot {slot:?}'s confirmed position {confirmed}: PostgreSQL cannot rewind a logical slot, and everything below {confirmed} was already delivered. To re-publish older events use a bookmark (outbox-relay bookmark create, then replay --from-bookmark) or table replay (replay --from-id/--from-time)")]
    StartBelowConfirmed {
        start: Lsn,
        confirmed: Lsn,
        slot: String,
    },
    #[error("PostgreSQL is shutting down and waited on {pending} records Kafka has not acknowledged; the relay let go of the stream so the server can stop, and resumes from the slot when it is back")]
    ServerShuttingDown { pending: u64 },
    #[error("another process created replication slot {0:?} at the same moment; standing by")]
    SlotCreationRace(String),
    #[error("PostgreSQL sent nothing for {0:?} although asked for keepalives, longer than its wal_sender_timeout allows a live walsender; the connection is presumed dead")]
    ServerSilent(Duration),
    #[error("no usable PostgreSQL server: {0}; retrying (during a failover, until a standby is promoted)")]
    NoServer(String),
    #[error("{gap}. {loss}. The relay stops rather than create a new slot and stream past the gap. After the backfill, drop the stale slot if one is left and start the relay again: a new process creates the slot and starts from the current WAL position")]
    SlotGap {
        /// What changed ([`super::identity::Gap::describe`]).
        gap: String,
        /// What was delivered and how to backfill ([`super::identity::Memory::describe_loss`]).
        loss: String,
    },
    #[error("cannot decode the replication stream at {lsn}, {times} times in a row: {error}. Retrying cannot help; please report this with the PostgreSQL version (the bytes are in the WAL at {lsn}: pg_logical_slot_peek_binary_changes shows them)")]
    DecodeRepeated {
        lsn: Lsn,
        times: u32,
        error: DecodeError,
    },
    #[error("Kafka refused {position} for topic {topic:?} with {code}, {failures} times in a row with the record alone in flight: {fix}. The relay stops rather than retry while WAL piles up; the slot stays before this record, so nothing is lost once this is fixed and the relay restarted")]
    BrokerRefused {
        code: String,
        topic: String,
        position: String,
        failures: u32,
        fix: String,
    },
}

fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl RelayError {
    /// The one place that decides what an error means for the process.
    pub fn disposition(&self) -> Disposition {
        use Disposition::*;
        match self {
            RelayError::Config(_)
            | RelayError::Preflight(_)
            | RelayError::SlotMissing { .. }
            | RelayError::SlotInvalidated { .. }
            | RelayError::SlotPlugin { .. }
            | RelayError::StartBelowConfirmed { .. }
            | RelayError::Poison { .. }
            | RelayError::SlotGap { .. }
            | RelayError::DecodeRepeated { .. }
            | RelayError::BrokerRefused { .. }
            | RelayError::Unexpected(_) => Fatal,
            RelayError::Mapping(_) => Fatal,
            RelayError::Setup(e) => {
                if e.is_transient() {
                    Retry
                } else {
                    Fatal
                }
            }
            RelayError::Sql(e) if crate::sql::is_tls_refusal(e) => Fatal,
            RelayError::Sql(e) => match e.code() {
                Some(code) => sqlstate_disposition(code.code()),
                None => Retry,
            },
            RelayError::Replication(e) => match e {
                ReplicationError::Server(s) => {
                    if s.code == "55000" && s.message.contains("can no longer get changes") {
                        Fatal
                    } else {
                        sqlstate_disposition(&s.code)
                    }
                }
                ReplicationError::Auth(_)
                | ReplicationError::Tls(_)
                | ReplicationError::FrameTooLarge { .. }
                | ReplicationError::InvalidSlotName(_) => Fatal,
                _ => Retry,
            },
            RelayError::Kafka(e) => {
                if e.is_transient() {
                    Retry
                } else {
                    Fatal
                }
            }
            RelayError::Decode(_)
            | RelayError::Framing(_)
            | RelayError::Delivery { .. }
            | RelayError::ProducerFatal(_)
            | RelayError::StreamEnded
            | RelayError::SlotCreationRace(_)
            | RelayError::ServerShuttingDown { .. }
            | RelayError::ServerSilent(_)
            | RelayError::NoServer(_) => Retry,
        }
    }

    /// Another process streams from the slot (SQLSTATE 55006, "active for PID"),
    /// or created it a moment before us (42710, the creation race): stand by.
    pub fn is_slot_busy(&self) -> bool {
        matches!(self, RelayError::Replication(ReplicationError::Server(s)) if s.code == "55006")
            || matches!(self, RelayError::SlotCreationRace(_))
    }

    /// Errors after which the producer is rebuilt.
    pub(super) fn rebuild_producer(&self) -> bool {
        matches!(
            self,
            RelayError::ProducerFatal(_) | RelayError::Delivery { .. }
        )
    }
}

/// SQLSTATE classes: connection trouble and "object in use" are transient;
/// authentication, privileges, missing objects and bad requests need a human.
fn sqlstate_disposition(code: &str) -> Disposition {
    match code.get(..2) {
        Some("28") | Some("42") | Some("3D") | Some("22") | Some("0A") => Disposition::Fatal,
        _ => Disposition::Retry,
    }
}

/// Losing the creation race (SQLSTATE 42710, "already exists": another relay
/// created the slot between our look and our CREATE) means standing by.
pub(super) fn slot_creation_error(e: ReplicationError, slot: &str) -> RelayError {
    match e {
        ReplicationError::Server(s) if s.code == "42710" => {
            RelayError::SlotCreationRace(slot.to_string())
        }
        e => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::ServerError;

    fn server_error(code: &str, message: &str) -> ReplicationError {
        ReplicationError::Server(ServerError {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        })
    }

    #[test]
    fn losing_the_slot_creation_race_means_standing_by() {
        let e = slot_creation_error(
            server_error("42710", "replication slot \"s\" already exists"),
            "s",
        );
        assert!(e.is_slot_busy(), "{e}");
        assert_eq!(e.disposition(), Disposition::Retry);
        // Other creation errors keep their own disposition.
        let e = slot_creation_error(server_error("42501", "permission denied"), "s");
        assert!(!e.is_slot_busy());
        assert_eq!(e.disposition(), Disposition::Fatal);
    }
}
