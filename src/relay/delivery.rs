//! Failed delivery reports: whose fault a broker's refusal is, and what follows.
//!
//! librdkafka sends records in batches (one MessageSet per partition) and the
//! broker accepts or refuses a batch as a whole, so a failed report does not
//! say which record the broker objected to. The rule:
//!
//! * A report blames its record only when **nothing else was in flight**
//!   (the window holds that record alone): then the batch was that record.
//! * Otherwise the failure makes the record a *suspect*: the session ends, the
//!   producer is rebuilt (the old one drained, see `KafkaSink::close_for_rebuild`),
//!   and the next session resumes from the slot sending **one record at a
//!   time** until the suspect's transaction is acknowledged. Every record of
//!   the failed batch is thus tried again alone before any is blamed: the
//!   innocent ones go through, the guilty one fails alone.
//! * Blamed for what it is (`INVALID_RECORD`, `POLICY_VIOLATION`,
//!   `INVALID_TIMESTAMP`: class `rejected_by_broker`; the topic's
//!   `MSG_SIZE_TOO_LARGE` / `RECORD_LIST_TOO_LARGE`: class `too_large`), the
//!   record is a poison row: the session ends, and when the stream reaches
//!   its position again it goes the poison way (dead-letter topic or stop, as
//!   the class's policy says) instead of to its topic.
//! * Refused for what is not the record's fault (authorization, a missing
//!   topic, or any refusal of a dead-letter record): the relay stops after
//!   [`SAME_FAILURE_LIMIT`] identical refusals of the record alone at the same
//!   position, naming the code and the fix, instead of retrying forever
//!   while WAL piles up.
//! * Anything else (broker down, timeouts, leader moves) is retried from the
//!   slot, as before: the broker will be back.
//!
//! Order and the ack rule hold because a refused record never completes its
//! transaction: the session ends and every record from the slot's confirmed
//! position on is sent again, in commit order, by a producer that starts only
//! once the old one holds nothing. A dead-letter record stands in for its row
//! under the same transaction, so the slot passes the row only once the
//! dead-letter topic acknowledged it.

use std::collections::BTreeMap;

use rdkafka::error::RDKafkaErrorCode;

use crate::kafka::{DeliveryFailure, RecordPosition};
use crate::lsn::Lsn;
use crate::outbox::TxnInfo;

use super::session::Session;
use super::RelayError;

/// Identical refusals (same code, same position, the record alone in flight)
/// after which an error that is not the record's fault stops the relay.
pub(super) const SAME_FAILURE_LIMIT: u32 = 3;

/// What a broker error code says about the record it came back for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blame {
    /// Refused for what the record is: every broker will refuse it every
    /// time. A poison row of this class.
    Record(&'static str),
    /// Refused for good, but not because of the record (authorization, a
    /// missing topic): an operator must act.
    Setup,
    /// Worth retrying: the broker or the network will recover.
    Transient,
}

fn blame(code: RDKafkaErrorCode) -> Blame {
    use RDKafkaErrorCode::*;
    match code {
        MessageSizeTooLarge | MessageBatchTooLarge => Blame::Record("too_large"),
        InvalidRecord | PolicyViolation | InvalidTimestamp => Blame::Record("rejected_by_broker"),
        TopicAuthorizationFailed
        | ClusterAuthorizationFailed
        | UnknownTopicOrPartition
        | UnknownTopic
        | UnknownPartition => Blame::Setup,
        _ => Blame::Transient,
    }
}

/// Kafka's name for the codes we classify (librdkafka's Rust names differ).
pub(super) fn code_name(code: RDKafkaErrorCode) -> String {
    use RDKafkaErrorCode::*;
    match code {
        MessageSizeTooLarge => "MSG_SIZE_TOO_LARGE".into(),
        MessageBatchTooLarge => "RECORD_LIST_TOO_LARGE".into(),
        InvalidRecord => "INVALID_RECORD".into(),
        PolicyViolation => "POLICY_VIOLATION".into(),
        InvalidTimestamp => "INVALID_TIMESTAMP".into(),
        TopicAuthorizationFailed => "TOPIC_AUTHORIZATION_FAILED".into(),
        ClusterAuthorizationFailed => "CLUSTER_AUTHORIZATION_FAILED".into(),
        UnknownTopicOrPartition => "UNKNOWN_TOPIC_OR_PART".into(),
        UnknownTopic => "_UNKNOWN_TOPIC".into(),
        UnknownPartition => "_UNKNOWN_PARTITION".into(),
        other => format!("{other:?}"),
    }
}

/// Why a record the broker refused for what it is became a poison row.
fn record_reason(code: RDKafkaErrorCode, topic: &str) -> String {
    let name = code_name(code);
    match blame(code) {
        Blame::Record("too_large") => format!(
            "the broker refused the record for topic {topic:?} as too large ({name}) although the producer accepted it: the topic's max.message.bytes is below the relay's message.max.bytes; raise the topic's max.message.bytes (kafka-configs --alter --entity-type topics --entity-name {topic} --add-config max.message.bytes=N), lower --kafka-property message.max.bytes to the topic's limit, or make the row smaller"
        ),
        _ => format!(
            "the broker refused the record for topic {topic:?} with {name} ({code}): the record breaks a rule of the topic or broker (e.g. a compacted topic needs a key, broker-side validation, a timestamp policy); fix the row or the topic's configuration"
        ),
    }
}

/// What to do about a refusal that is not the record's fault.
fn setup_fix(code: RDKafkaErrorCode, topic: &str, dead_letter: bool) -> String {
    use RDKafkaErrorCode::*;
    let what = if dead_letter {
        format!("the dead-letter topic {topic:?}")
    } else {
        format!("topic {topic:?}")
    };
    match code {
        TopicAuthorizationFailed => format!(
            "the relay's principal may not write to {what}; grant it WRITE and DESCRIBE on it (kafka-acls --add --allow-principal User:<relay> --operation Write --operation Describe --topic {topic})"
        ),
        ClusterAuthorizationFailed => "the relay's principal lacks IDEMPOTENT_WRITE on the cluster (the relay's producer is idempotent); grant it (kafka-acls --add --allow-principal User:<relay> --operation IdempotentWrite --cluster)".into(),
        UnknownTopicOrPartition | UnknownTopic | UnknownPartition => format!(
            "{what} does not exist (or lost partitions) although the relay prepared it; create it, or enable kafka.create_topics and check that the broker accepts CreateTopics from the relay"
        ),
        _ => format!(
            "the broker refuses even the dead-letter record for {what}; fix the dead-letter topic (size limit, policy, ACLs) or set the class's poison policy to stop"
        ),
    }
}

/// A position whose record failed in a batch (not alone) or alone fewer than
/// [`SAME_FAILURE_LIMIT`] times.
#[derive(Debug)]
struct Suspect {
    position: RecordPosition,
    code: RDKafkaErrorCode,
    /// Times it failed with this code while alone in flight.
    alone: u32,
}

/// A record proven to be refused for what it is.
#[derive(Debug, Clone)]
pub(super) struct Rejected {
    pub(super) class: &'static str,
    pub(super) reason: String,
    pub(super) topic: String,
}

/// Delivery failures remembered across the sessions of one relay (each
/// session restarts from the slot, so positions come round again).
#[derive(Debug, Default)]
pub(super) struct DeliveryMemory {
    suspect: Option<Suspect>,
    /// Records proven to be refused for what they are: they go the poison way
    /// when the stream reaches them again.
    rejected: BTreeMap<RecordPosition, Rejected>,
    /// This session's position counter: the open transaction's commit LSN
    /// and how many records were produced from it so far.
    next: (Lsn, u32),
    /// Records allowed in flight after time-outs (see [`super::pace`]).
    pub(super) pace: super::pace::Pace,
}

impl DeliveryMemory {
    /// Start a session from the slot's `confirmed` position: forget what lies
    /// below it (delivered for good) and restart the position counter.
    pub(super) fn for_session(&mut self, confirmed: Lsn) -> &mut Self {
        self.next = (Lsn::ZERO, 0);
        self.rejected.retain(|p, _| p.commit_lsn >= confirmed);
        if self
            .suspect
            .as_ref()
            .is_some_and(|s| s.position.commit_lsn < confirmed)
        {
            self.suspect = None;
        }
        if let Some(s) = &self.suspect {
            tracing::info!(
                up_to = %s.position,
                code = %code_name(s.code),
                "kafka refused a batch: sending one record at a time up to the first refused record, to find which record is at fault"
            );
        }
        self
    }
}

impl Session<'_> {
    /// The position of the next record produced from `txn`, counted.
    pub(super) fn next_position(&mut self, txn: &TxnInfo) -> RecordPosition {
        let position = self.peek_position(txn);
        self.delivery.next = (position.commit_lsn, position.ordinal + 1);
        position
    }

    fn peek_position(&self, txn: &TxnInfo) -> RecordPosition {
        let (lsn, count) = self.delivery.next;
        RecordPosition {
            commit_lsn: txn.commit_lsn,
            ordinal: if lsn == txn.commit_lsn { count } else { 0 },
        }
    }

    /// One record in flight at a time: until the suspect's transaction is
    /// acknowledged, so that a failure blames exactly one record.
    pub(super) fn may_send_more(&self) -> bool {
        let careful = self
            .delivery
            .suspect
            .as_ref()
            .is_some_and(|s| self.tracker.flushed() <= s.position.commit_lsn);
        !careful || self.window.records == 0
    }

    /// The next record of `txn` was proven to be refused by the broker: the
    /// poison class, reason and topic it goes the poison way with.
    pub(super) fn rejected_here(&self, txn: &TxnInfo) -> Option<Rejected> {
        self.delivery
            .rejected
            .get(&self.peek_position(txn))
            .cloned()
    }

    /// A failed delivery report (see the module doc for the rule); never
    /// `Ok(true)`: a failed record acknowledges nothing.
    pub(super) fn on_delivery_failed(
        &mut self,
        failure: DeliveryFailure,
    ) -> Result<bool, RelayError> {
        let DeliveryFailure {
            token,
            error,
            topic,
        } = failure;
        if token.generation != self.generation {
            return Ok(false); // a report from before the last reconnect
        }
        let code = error.rdkafka_error_code();
        let label = code
            .map(|c| format!("{c:?}"))
            .unwrap_or_else(|| "other".to_string());
        self.metrics.delivery_error(&label);
        let retry = RelayError::Delivery {
            topic: topic.clone(),
            error: error.to_string(),
        };
        let Some(code) = code else { return Err(retry) };
        let dead_letter = self.cfg.relay.dead_letter_topic.as_deref() == Some(topic.as_str());
        let blame = match blame(code) {
            // A dead-letter record cannot be dead-lettered in turn.
            Blame::Record(_) if dead_letter => Blame::Setup,
            other => other,
        };
        if blame == Blame::Transient {
            if code == RDKafkaErrorCode::MessageTimedOut {
                let in_flight = self.window.records;
                let cap = self.delivery.pace.timed_out(in_flight);
                tracing::warn!(
                    in_flight,
                    cap,
                    "kafka did not acknowledge records within message.timeout.ms: at most {cap} records in flight until acknowledgements keep up"
                );
                self.metrics.in_flight_cap(Some(cap));
            }
            return Err(retry);
        }
        let position = token.position;
        // The window still counts the failed record: 1 means it was alone.
        let alone = self.window.records == 1;
        let memory = &mut *self.delivery;
        let same = memory
            .suspect
            .as_ref()
            .is_some_and(|s| s.position == position && s.code == code);
        if !same {
            memory.suspect = Some(Suspect {
                position,
                code,
                alone: 0,
            });
        }
        let suspect = memory.suspect.as_mut().expect("set just above");
        if !alone {
            tracing::warn!(
                %position, topic, code = %code_name(code), in_flight = self.window.records,
                "kafka refused a batch; its records will be retried one at a time before any is blamed"
            );
            return Err(retry);
        }
        suspect.alone += 1;
        match blame {
            Blame::Record(class) => {
                tracing::warn!(
                    %position, topic, code = %code_name(code), class,
                    "kafka refused this record alone: it is a poison row"
                );
                memory.suspect = None;
                memory.rejected.insert(
                    position,
                    Rejected {
                        class,
                        reason: record_reason(code, &topic),
                        topic,
                    },
                );
                Err(retry)
            }
            _ if suspect.alone >= SAME_FAILURE_LIMIT => Err(RelayError::BrokerRefused {
                code: code_name(code),
                fix: setup_fix(code, &topic, dead_letter),
                topic,
                position: position.to_string(),
                failures: suspect.alone,
            }),
            _ => {
                tracing::warn!(
                    %position, topic, code = %code_name(code), failures = suspect.alone,
                    limit = SAME_FAILURE_LIMIT,
                    "kafka refused this record alone; retrying from the slot"
                );
                Err(retry)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_blamed_as_documented() {
        use RDKafkaErrorCode::*;
        for code in [MessageSizeTooLarge, MessageBatchTooLarge] {
            assert_eq!(blame(code), Blame::Record("too_large"), "{code:?}");
        }
        for code in [InvalidRecord, PolicyViolation, InvalidTimestamp] {
            assert_eq!(blame(code), Blame::Record("rejected_by_broker"), "{code:?}");
        }
        for code in [
            TopicAuthorizationFailed,
            ClusterAuthorizationFailed,
            UnknownTopicOrPartition,
            UnknownTopic,
        ] {
            assert_eq!(blame(code), Blame::Setup, "{code:?}");
        }
        for code in [
            MessageTimedOut,
            NotLeaderForPartition,
            RequestTimedOut,
            BrokerTransportFailure,
            NotEnoughReplicas,
            OutOfOrderSequenceNumber,
        ] {
            assert_eq!(blame(code), Blame::Transient, "{code:?}");
        }
        for class in ["too_large", "rejected_by_broker"] {
            assert!(crate::config::POISON_CLASSES.contains(&class));
        }
    }

    #[test]
    fn messages_name_the_code_and_the_fix() {
        let r = record_reason(RDKafkaErrorCode::MessageSizeTooLarge, "t");
        assert!(r.contains("MSG_SIZE_TOO_LARGE") && r.contains("max.message.bytes"));
        let f = setup_fix(RDKafkaErrorCode::TopicAuthorizationFailed, "t", false);
        assert!(f.contains("kafka-acls") && f.contains("--topic t"), "{f}");
    }
}
