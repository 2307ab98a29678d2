//! Logical decoding messages in the session: a transactional message with our
//! prefix is an event, relayed like a row of its transaction (same window,
//! same ack tracker entry, same slot position); see `outbox::message`.

use crate::ack::AckError;
use crate::kafka::KafkaSink;
use crate::outbox::message::{classify, MessageKind};
use crate::pgoutput::LogicalMessage;

use super::poison::Source;
use super::session::Session;
use super::RelayError;

impl Session<'_> {
    /// One `M` message from the stream.
    pub(super) async fn on_logical_message(
        &mut self,
        msg: LogicalMessage,
        sink: &mut KafkaSink,
    ) -> Result<(), RelayError> {
        match classify(&msg, self.cfg.mapping.message_prefix.as_deref()) {
            MessageKind::Foreign => return Ok(()),
            MessageKind::NonTransactional => {
                let key = format!("(non-transactional message {:?})", msg.prefix);
                if self.warned_tables.insert(key) {
                    tracing::warn!(
                        prefix = %msg.prefix,
                        lsn = %msg.lsn,
                        "non-transactional logical decoding messages with the outbox prefix are never published: they are written to WAL whether or not their transaction commits, so they cannot be relayed safely; emit them with pg_logical_emit_message(true, ...) (or sql/05_emit.sql's outbox_emit)"
                    );
                }
                return Ok(());
            }
            MessageKind::Event => {}
        }
        if self.skipping {
            if let Some((_, records)) = &mut self.skipped {
                *records += 1;
            }
            return Ok(());
        }
        let txn = self.txn.ok_or(AckError::NoOpenTransaction("Message"))?;
        match self.mapper.map_message(&msg, &txn) {
            Ok(record) => {
                self.forward(record, Source::Message(&msg), &txn, sink)
                    .await
            }
            Err(e) => match e.poison_class() {
                Some(class) => {
                    let topic = e.original_topic().map(str::to_string);
                    self.poison(
                        class,
                        e.to_string(),
                        topic,
                        Source::Message(&msg),
                        &txn,
                        sink,
                    )
                    .await
                }
                None => Err(RelayError::Mapping(match e {
                    crate::outbox::message::MessageError::Mapping(m) => m,
                    crate::outbox::message::MessageError::Invalid { .. } => {
                        unreachable!("an invalid message has a poison class")
                    }
                })),
            },
        }
    }
}
