//! Events without a table: a transactional logical decoding message
//! (`pg_logical_emit_message(true, 'outbox', '{...}')`) becomes one record.
//!
//! The message's content is one UTF-8 JSON object:
//!
//! ```json
//! {"id": "…", "aggregatetype": "Order", "aggregateid": "42", "type": "OrderCreated",
//!  "payload": <any JSON>, "headers": {"name": "value"}}
//! ```
//!
//! It is mapped by the row mapper itself, not by a copy of it: the members are
//! laid out as a row of a synthetic relation (oid 0, which no table has) whose
//! columns carry the mapping's names (`id_column`, `key_column`, ...), and that
//! row goes through [`OutboxMapper::map_insert`]. So a message gets exactly a
//! row's topic (template, fixed topic, routing cache, topic checks), key, `id`
//! and `type` headers and provenance headers. The `headers` member's entries are
//! appended after those, in the order written.
//!
//! The record value is the `payload` member's JSON text exactly as written
//! (`serde_json::value::RawValue`: never re-serialised), sliced out of the
//! replication frame without a copy.
//!
//! Without an `id` the message gets a derived one ([`derived_id`]): the same on
//! every replay of that message, so consumers can deduplicate.
//!
//! Pure: no IO.

use std::fmt;

use bytes::Bytes;
use serde::de::{MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Mapped, MappingError, OutboxMapper, OutboxRecord, RelationKind, TxnInfo, JSONB_OID};
use crate::lsn::Lsn;
use crate::pgoutput::{Column, Insert, LogicalMessage, Relation, RelationColumn, TupleData};

/// The relation oid of the synthetic relation messages are mapped through.
/// PostgreSQL never gives a table oid 0 (`InvalidOid`).
const MESSAGE_RELATION_OID: u32 = 0;
/// `text`'s type oid.
const TEXT_OID: u32 = 25;

/// What the relay does with one logical decoding message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A transactional message with our prefix: an event.
    Event,
    /// A non-transactional message with our prefix: it is written to WAL at
    /// once, whether or not its transaction commits, so it cannot be relayed
    /// with the outbox's guarantee; warned about, never published.
    NonTransactional,
    /// Another prefix (or messages are off): not ours.
    Foreign,
}

/// Sort a message by its prefix and flag; `prefix` is `None` when messages are off.
pub fn classify(msg: &LogicalMessage, prefix: Option<&str>) -> MessageKind {
    match prefix {
        Some(p) if p == msg.prefix => {
            if msg.transactional {
                MessageKind::Event
            } else {
                MessageKind::NonTransactional
            }
        }
        _ => MessageKind::Foreign,
    }
}

/// Why a message with our prefix cannot become a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Not an outbox event object (poison class `invalid_message`).
    #[error("logical decoding message at {lsn} with prefix {prefix:?} is not an outbox event ({reason}); it must be one UTF-8 JSON object with string members aggregatetype, aggregateid and type, a payload member, and optionally id (string) and headers (object of strings): fix the code that emits it (sql/05_emit.sql's outbox_emit builds it)")]
    Invalid {
        lsn: Lsn,
        prefix: String,
        reason: String,
    },
    /// A well-formed event the row mapping refuses (e.g. an illegal topic).
    #[error(transparent)]
    Mapping(#[from] MappingError),
}

impl MessageError {
    /// The poison class (see `config::POISON_CLASSES`), or `None` for protocol errors.
    pub fn poison_class(&self) -> Option<&'static str> {
        match self {
            MessageError::Invalid { .. } => Some("invalid_message"),
            MessageError::Mapping(e) => e.poison_class(),
        }
    }

    /// The topic the event would have gone to, when known.
    pub fn original_topic(&self) -> Option<&str> {
        match self {
            MessageError::Invalid { .. } => None,
            MessageError::Mapping(e) => e.original_topic(),
        }
    }
}

/// The event object, borrowed from the message's text.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Event<'a> {
    #[serde(default)]
    id: Option<String>,
    aggregatetype: String,
    aggregateid: String,
    #[serde(rename = "type")]
    type_: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default)]
    headers: Option<Headers>,
}

/// Header entries in the order written (a JSON object of strings).
struct Headers(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Headers;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of string header values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Headers, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    out.push((k, v));
                }
                Ok(Headers(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The id of a message that carries none: a UUID-shaped string (RFC 9562
/// version 8, "custom") made of the transaction's commit LSN and the message's
/// own LSN, both fixed in the WAL, so every replay of the message (after a
/// crash, from a bookmark, on a promoted physical standby) gets the same id.
///
/// Layout: the first 8 bytes are the commit LSN (bits 12-15 of its low word
/// give way to the version nibble), the last 8 the message LSN (its top two
/// bits, zero below 4 EiB of WAL, give way to the variant). The message LSN
/// alone is unique within a cluster's WAL, so two messages never share an id.
/// For `commit_lsn = 0/16B3748`, `lsn = 0/16B3700` the id is
/// `00000000-016b-8748-8000-0000016b3700`.
pub fn derived_id(commit_lsn: Lsn, lsn: Lsn) -> String {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&commit_lsn.0.to_be_bytes());
    b[8..].copy_from_slice(&lsn.0.to_be_bytes());
    b[6] = (b[6] & 0x0f) | 0x80; // version 8
    b[8] = (b[8] & 0x3f) | 0x80; // variant 10
    let h =
        |r: std::ops::Range<usize>| -> String { b[r].iter().map(|x| format!("{x:02x}")).collect() };
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

/// Parse the event object; the error text says what is wrong with it.
fn parse(content: &[u8]) -> Result<Event<'_>, String> {
    let text = std::str::from_utf8(content).map_err(|e| format!("not UTF-8: {e}"))?;
    serde_json::from_str::<Event>(text).map_err(|e| e.to_string())
}

impl OutboxMapper {
    /// Turn one event message (see [`classify`]) of the transaction `txn` into a record.
    pub fn map_message(
        &mut self,
        msg: &LogicalMessage,
        txn: &TxnInfo,
    ) -> Result<OutboxRecord, MessageError> {
        let invalid = |reason: String| MessageError::Invalid {
            lsn: msg.lsn,
            prefix: msg.prefix.clone(),
            reason,
        };
        let event = parse(&msg.content).map_err(invalid)?;
        if !self.relations.contains_key(&MESSAGE_RELATION_OID) {
            let rel = self.message_relation();
            let resolved = self
                .resolve(&rel)
                .expect("the message relation has every column the mapping names");
            self.relations
                .insert(MESSAGE_RELATION_OID, RelationKind::Outbox(resolved));
        }
        let id = event
            .id
            .clone()
            .unwrap_or_else(|| derived_id(txn.commit_lsn, msg.lsn));
        // The payload's text is a slice of the content: no copy.
        let payload = msg.content.slice_ref(event.payload.get().as_bytes());
        let cfg = &self.cfg;
        let value_of = |column: &str| -> Column {
            let text = if column == cfg.id_column {
                Bytes::from(id.clone())
            } else if column == cfg.key_column {
                Bytes::from(event.aggregateid.clone())
            } else if column == cfg.route_column {
                Bytes::from(event.aggregatetype.clone())
            } else if column == cfg.payload_column {
                payload.clone()
            } else if cfg.type_column.as_deref() == Some(column) {
                Bytes::from(event.type_.clone())
            } else {
                return Column::Null; // a header column: rows only
            };
            Column::Text(text)
        };
        let tuple = TupleData {
            columns: message_columns(cfg)
                .iter()
                .map(|(c, _)| value_of(c))
                .collect(),
        };
        let insert = Insert {
            xid: None,
            relation_oid: MESSAGE_RELATION_OID,
            tuple,
        };
        let extra = event
            .headers
            .map(|Headers(extra)| {
                extra
                    .into_iter()
                    .map(|(k, v)| (std::sync::Arc::from(k.as_str()), Bytes::from(v)))
                    .collect()
            })
            .unwrap_or_default();
        match self.map_with_headers(&insert, txn, extra)? {
            Mapped::Record(r) => Ok(r),
            Mapped::OtherTable { .. } => unreachable!("the message relation is an outbox relation"),
        }
    }

    /// The synthetic relation messages are mapped through: the mapping's
    /// columns, the payload typed jsonb (valid JSON by construction: checked
    /// while parsing the message, never re-checked or decoded).
    fn message_relation(&self) -> Relation {
        Relation {
            xid: None,
            oid: MESSAGE_RELATION_OID,
            namespace: "pg_logical_emit_message".into(),
            name: "outbox message".into(),
            replica_identity: b'n',
            columns: message_columns(&self.cfg)
                .into_iter()
                .map(|(name, type_oid)| RelationColumn {
                    flags: 0,
                    name,
                    type_oid,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    /// The dead-letter content of a message: its raw content when it is
    /// UTF-8 text, else a JSON object with the bytes in hex (nothing is lost).
    pub fn message_content(msg: &LogicalMessage) -> Bytes {
        match std::str::from_utf8(&msg.content) {
            Ok(_) => msg.content.clone(),
            Err(_) => Bytes::from(
                serde_json::json!({
                    "prefix": msg.prefix,
                    "content_hex": super::hex(&msg.content),
                })
                .to_string(),
            ),
        }
    }

    /// The `id` member of a message, when it has one that can be read.
    pub fn message_id(msg: &LogicalMessage) -> Option<Bytes> {
        #[derive(Deserialize)]
        struct IdOnly {
            id: Option<String>,
        }
        let text = std::str::from_utf8(&msg.content).ok()?;
        serde_json::from_str::<IdOnly>(text)
            .ok()?
            .id
            .map(Bytes::from)
    }
}

/// The columns of the message relation, each name once, in the mapping's order.
fn message_columns(cfg: &crate::config::MappingConfig) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = Vec::new();
    let mut add = |name: &str, type_oid: u32| {
        if !out.iter().any(|(n, _)| n == name) {
            out.push((name.to_string(), type_oid));
        }
    };
    add(&cfg.id_column, TEXT_OID);
    add(&cfg.key_column, TEXT_OID);
    add(&cfg.route_column, TEXT_OID);
    add(&cfg.payload_column, JSONB_OID);
    if let Some(t) = &cfg.type_column {
        add(t, TEXT_OID);
    }
    for h in &cfg.header_columns {
        add(h, TEXT_OID);
    }
    out
}

#[cfg(test)]
mod tests;
