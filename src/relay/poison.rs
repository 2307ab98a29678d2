//! Poison rows: a row that can never become its record stops the relay or goes to
//! the dead-letter topic with the reason, as the policy for its class says.

use std::sync::Arc;

use bytes::Bytes;

use crate::config::PoisonPolicy;
use crate::kafka::KafkaSink;
use crate::outbox::{OutboxMapper, OutboxRecord, TxnInfo};
use crate::pgoutput::{Insert, LogicalMessage};

use super::session::Session;
use super::{RelayError, HEADER_ERROR_CLASS, HEADER_ERROR_REASON, HEADER_ORIGINAL_TOPIC};

/// Where a poison record came from: a table row or a logical decoding message.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source<'a> {
    Row(&'a Insert),
    Message(&'a LogicalMessage),
}

impl Session<'_> {
    /// A row that can never become its record: stop, or dead-letter it with
    /// the reason, as the policy for its class says. Never skipped silently.
    pub(super) async fn poison(
        &mut self,
        class: &'static str,
        reason: String,
        original_topic: Option<String>,
        source: Source<'_>,
        txn: &TxnInfo,
        sink: &mut KafkaSink,
    ) -> Result<(), RelayError> {
        let policy = self.cfg.relay.poison_policy(class);
        let Some(dead_letter) = self
            .cfg
            .relay
            .dead_letter_topic
            .as_deref()
            .filter(|_| policy == PoisonPolicy::DeadLetter)
        else {
            let divert = match self.cfg.relay.dead_letter_topic.as_deref() {
                // A dead-letter topic is set, but this class's policy is stop.
                Some(topic) => format!(
                    "set --poison-policy {class}=dead-letter to send such rows to {topic:?}"
                ),
                None => "set --dead-letter-topic to divert such rows (policy dead-letter)".into(),
            };
            return Err(RelayError::Poison {
                class,
                reason,
                divert,
            });
        };
        let id = match source {
            Source::Row(ins) => self.mapper.row_id(ins),
            // Its own id, else the one it would have been given.
            Source::Message(m) => OutboxMapper::message_id(m).or_else(|| {
                Some(Bytes::from(crate::outbox::message::derived_id(
                    txn.commit_lsn,
                    m.lsn,
                )))
            }),
        };
        // A too-large row would be too large in the dead-letter topic as well:
        // send its identity and the reason; the row itself stays in the WAL/table.
        let payload = if class == "too_large" {
            Bytes::from(
                serde_json::json!({
                    "id": id.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
                    "reason": reason,
                })
                .to_string(),
            )
        } else {
            match source {
                Source::Row(ins) => self.mapper.row_json(ins),
                // The raw content, as emitted.
                Source::Message(m) => OutboxMapper::message_content(m),
            }
        };
        let mut headers: Vec<(Arc<str>, Bytes)> = vec![
            (
                Arc::from(HEADER_ERROR_CLASS),
                Bytes::from_static(class.as_bytes()),
            ),
            (Arc::from(HEADER_ERROR_REASON), Bytes::from(reason.clone())),
            (
                Arc::from(crate::outbox::HEADER_LSN),
                Bytes::from(txn.commit_lsn.to_string()),
            ),
        ];
        if let Some(id) = &id {
            headers.push((Arc::from("id"), id.clone()));
        }
        if let Some(t) = &original_topic {
            headers.push((Arc::from(HEADER_ORIGINAL_TOPIC), Bytes::from(t.clone())));
        }
        let record = OutboxRecord {
            topic: Arc::from(dead_letter),
            key: id.clone(),
            payload: Some(payload),
            headers,
            id,
        };
        tracing::warn!(class, reason = %reason, topic = dead_letter, "poison row dead-lettered");
        self.metrics
            .dead_lettered(original_topic.as_deref().unwrap_or(dead_letter));
        self.produce(record, txn, sink).await
    }
}
