//! The outbox mapper: an inserted row becomes a Kafka record.
//!
//! Debezium EventRouter compatible by default: topic from `aggregatetype`
//! through `outbox.event.${routedByValue}`, key `aggregateid`, value `payload`
//! exactly as PostgreSQL renders it, headers `id` and `type`. Columns are
//! matched by name against the latest Relation message, so `ALTER TABLE`
//! while the relay runs needs nothing from the operator.
//!
//! Pure: no IO. Column values stay slices of the replication frame.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::config::{
    MappingConfig, PayloadFormat, TableName, DEFAULT_TRACESTATE_COLUMN, DEFAULT_TRACE_COLUMN,
};
use crate::envelope::{Envelope, EventFacts, JSON_CONTENT_TYPE};
use crate::lsn::{pg_micros_to_system_time, Lsn};
use crate::pgoutput::{Column, Insert, Relation, TupleData};

pub mod message;

/// Header carrying the transaction's commit LSN (`X/X`).
pub const HEADER_LSN: &str = "outbox-relay-commit-lsn";
/// Header carrying the transaction id.
pub const HEADER_XID: &str = "outbox-relay-xid";
/// Header carrying the commit time, RFC 3339 UTC with microseconds.
pub const HEADER_COMMIT_TIME: &str = "outbox-relay-commit-time";

/// The placeholder Debezium uses in `route.topic.replacement`.
pub const ROUTED_BY_VALUE: &str = "${routedByValue}";

/// Kafka's own limit on topic name length.
const MAX_TOPIC_LEN: usize = 249;
/// Distinct routing values whose topic names are cached.
const TOPIC_CACHE_CAP: usize = 4096;

/// `bytea`'s type oid: its text form is `\x` + hex, decoded to raw bytes.
const BYTEA_OID: u32 = 17;
/// `json`'s and `jsonb`'s type oids: PostgreSQL checked their text on input.
const JSON_OID: u32 = 114;
const JSONB_OID: u32 = 3802;

/// What the transaction around a row tells us (from its Begin message).
#[derive(Debug, Clone, Copy)]
pub struct TxnInfo {
    pub xid: u32,
    /// LSN of the commit record (Begin's `final_lsn`).
    pub commit_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// One Kafka record, ready for the producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    pub topic: Arc<str>,
    pub key: Option<Bytes>,
    pub payload: Option<Bytes>,
    pub headers: Vec<(Arc<str>, Bytes)>,
    /// The row's id column as text, for errors and logs.
    pub id: Option<Bytes>,
}

impl OutboxRecord {
    /// Bytes this record holds in flight (for the byte window).
    pub fn size(&self) -> usize {
        self.topic.len()
            + self.key.as_ref().map_or(0, Bytes::len)
            + self.payload.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// Why a row could not become a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("table {table} has no column {column:?} (columns: {available}); add it or set the mapping's {setting} to an existing column")]
    MissingColumn {
        table: String,
        column: String,
        setting: &'static str,
        available: String,
    },
    #[error("row {id} has NULL in {column:?}, which the mapping needs; make the column NOT NULL or fix the row")]
    NullColumn { id: String, column: String },
    #[error("row {id} column {column:?} is not valid text ({reason})")]
    BadValue {
        id: String,
        column: String,
        reason: String,
    },
    #[error("row {id} column {column:?} is not valid JSON ({reason}), and payload_format is json; fix the code that writes the row, or set payload_format = \"raw\" (--payload-format raw) to send payloads unchecked")]
    InvalidPayload {
        id: String,
        column: String,
        /// The topic the record was for.
        topic: String,
        reason: String,
    },
    #[error("row {id} routes to topic {topic:?}, which is not a legal Kafka topic name (1-249 characters of a-z A-Z 0-9 . _ -); fix the routing value or the topic template")]
    InvalidTopic { id: String, topic: String },
    #[error("row arrived for relation oid {0} before its Relation message (replication protocol violation)")]
    UnknownRelation(u32),
}

impl MappingError {
    /// The poison class of a row error (see `config::POISON_CLASSES`), or
    /// `None` for protocol errors.
    pub fn poison_class(&self) -> Option<&'static str> {
        Some(match self {
            MappingError::NullColumn { .. } => "null_column",
            MappingError::BadValue { .. } => "bad_value",
            MappingError::InvalidPayload { .. } => "invalid_payload",
            MappingError::InvalidTopic { .. } => "invalid_topic",
            MappingError::MissingColumn { .. } => "missing_column",
            MappingError::UnknownRelation(_) => return None,
        })
    }

    /// The topic the row would have gone to, when known.
    pub fn original_topic(&self) -> Option<&str> {
        match self {
            MappingError::InvalidTopic { topic, .. }
            | MappingError::InvalidPayload { topic, .. } => Some(topic),
            _ => None,
        }
    }

    /// True when the error is about one row's content (a poison row) rather
    /// than about the table's shape or the protocol.
    pub fn is_poison(&self) -> bool {
        // Every class but the table's shape (the list lives in `poison_class`).
        self.poison_class().is_some() && !matches!(self, MappingError::MissingColumn { .. })
    }
}

/// Column positions resolved from a Relation message.
#[derive(Debug)]
struct Resolved {
    id: usize,
    key: usize,
    route: Option<usize>,
    payload: usize,
    payload_is_bytea: bool,
    /// Check each payload is JSON: `payload_format = json` on a column type
    /// that does not guarantee it.
    payload_check_json: bool,
    type_: Option<usize>,
    headers: Vec<(Arc<str>, usize)>,
    /// The payload is JSON (a json/jsonb column, or checked): its CloudEvents
    /// `datacontenttype` is `application/json`.
    payload_is_json: bool,
    /// The W3C trace context columns, when the table has them.
    traceparent: Option<usize>,
    tracestate: Option<usize>,
    /// Headers a CloudEvents envelope replaces: `id`, `type`, the header columns.
    replaced: Vec<Arc<str>>,
}

#[derive(Debug)]
enum RelationKind {
    Outbox(Resolved),
    /// The outbox table, but the mapping cannot be resolved against it: each
    /// of its rows is a poison row (class `missing_column`).
    Broken(MappingError),
    /// A table the publication carries that is not the outbox table.
    Other {
        name: String,
    },
}

/// What `map_insert` makes of a row.
#[derive(Debug, PartialEq, Eq)]
pub enum Mapped {
    Record(OutboxRecord),
    /// The row belongs to another table of the publication.
    OtherTable {
        table: String,
    },
}

/// See the module documentation.
#[derive(Debug)]
pub struct OutboxMapper {
    cfg: MappingConfig,
    table: TableName,
    /// The outbox table's OID, when known: rows are recognised by it, so a
    /// rename while the relay runs changes nothing. Without it, by name.
    table_oid: Option<u32>,
    /// Domain OID → the built-in type under it (a payload column typed as a
    /// domain over bytea is bytes, like bytea itself).
    domains: HashMap<u32, u32>,
    relations: HashMap<u32, RelationKind>,
    /// Column names by relation, for [`OutboxMapper::row_json`].
    column_names: HashMap<u32, Vec<String>>,
    topics: HashMap<Bytes, Arc<str>>,
    fixed_topic: Option<Arc<str>>,
    header_id: Arc<str>,
    header_type: Arc<str>,
    header_lsn: Arc<str>,
    header_xid: Arc<str>,
    header_time: Arc<str>,
    header_traceparent: Arc<str>,
    header_tracestate: Arc<str>,
    /// CloudEvents envelope; `None`: records as they are (see [`crate::envelope`]).
    envelope: Option<Envelope>,
    /// Provenance header values of the current transaction: every row of a
    /// transaction shares them, so they are formatted once per transaction
    /// and each record takes a reference-counted copy.
    provenance: Option<Provenance>,
}

/// The provenance header values of one transaction.
#[derive(Debug)]
struct Provenance {
    xid: u32,
    commit_lsn: Lsn,
    commit_time: i64,
    lsn_text: Bytes,
    xid_text: Bytes,
    time_text: Bytes,
}

impl Provenance {
    fn of(txn: &TxnInfo) -> Provenance {
        Provenance {
            xid: txn.xid,
            commit_lsn: txn.commit_lsn,
            commit_time: txn.commit_time,
            lsn_text: Bytes::from(txn.commit_lsn.to_string()),
            xid_text: Bytes::from(txn.xid.to_string()),
            time_text: Bytes::from(format_commit_time(txn.commit_time)),
        }
    }

    fn is_for(&self, txn: &TxnInfo) -> bool {
        self.xid == txn.xid
            && self.commit_lsn == txn.commit_lsn
            && self.commit_time == txn.commit_time
    }
}

impl OutboxMapper {
    pub fn new(cfg: MappingConfig, table: TableName) -> Self {
        OutboxMapper {
            fixed_topic: cfg.topic.as_deref().map(Arc::from),
            header_id: Arc::from("id"),
            header_type: Arc::from("type"),
            header_lsn: Arc::from(HEADER_LSN),
            header_xid: Arc::from(HEADER_XID),
            header_time: Arc::from(HEADER_COMMIT_TIME),
            header_traceparent: Arc::from(crate::trace::TRACEPARENT),
            header_tracestate: Arc::from(crate::trace::TRACESTATE),
            envelope: None,
            cfg,
            table,
            table_oid: None,
            domains: HashMap::new(),
            relations: HashMap::new(),
            column_names: HashMap::new(),
            topics: HashMap::new(),
            provenance: None,
        }
    }

    /// Recognise the outbox table by its OID rather than its name.
    pub fn with_table_oid(mut self, oid: Option<u32>) -> Self {
        self.table_oid = oid;
        self
    }

    /// Put every record in `envelope` ([`Envelope::for_config`]).
    pub fn with_envelope(mut self, envelope: Option<Envelope>) -> Self {
        self.envelope = envelope;
        self
    }

    /// The base types of domains (domain OID → built-in type OID).
    pub fn with_domains(mut self, domains: HashMap<u32, u32>) -> Self {
        self.domains = domains;
        self
    }

    fn base_type(&self, type_oid: u32) -> u32 {
        self.domains.get(&type_oid).copied().unwrap_or(type_oid)
    }

    fn is_outbox_table(&self, rel: &Relation) -> bool {
        match self.table_oid {
            Some(oid) => rel.oid == oid,
            None => rel.namespace == self.table.schema && rel.name == self.table.name,
        }
    }

    /// A Relation message arrived: (re)resolve its columns by name.
    pub fn on_relation(&mut self, rel: &Relation) -> Result<(), MappingError> {
        if !self.is_outbox_table(rel) {
            self.relations.insert(
                rel.oid,
                RelationKind::Other {
                    name: format!("{}.{}", rel.namespace, rel.name),
                },
            );
            return Ok(());
        }
        self.column_names.insert(
            rel.oid,
            rel.columns.iter().map(|c| c.name.clone()).collect(),
        );
        match self.resolve(rel) {
            Ok(resolved) => {
                self.relations
                    .insert(rel.oid, RelationKind::Outbox(resolved));
                Ok(())
            }
            Err(e) => {
                self.relations
                    .insert(rel.oid, RelationKind::Broken(e.clone()));
                Err(e)
            }
        }
    }

    fn resolve(&self, rel: &Relation) -> Result<Resolved, MappingError> {
        let table = format!("{}.{}", rel.namespace, rel.name);
        let available = || {
            rel.columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let find = |column: &str, setting: &'static str| -> Result<usize, MappingError> {
            rel.columns
                .iter()
                .position(|c| c.name == column)
                .ok_or_else(|| MappingError::MissingColumn {
                    table: table.clone(),
                    column: column.to_string(),
                    setting,
                    available: available(),
                })
        };
        let cfg = &self.cfg;
        // A trace column is optional under its default name (used when the
        // table has it), required under any other.
        let trace = |column: &Option<String>, default: &str, setting: &'static str| match column
            .as_deref()
        {
            None => Ok(None),
            Some(c) if c == default => Ok(rel.columns.iter().position(|col| col.name == c)),
            Some(c) => find(c, setting).map(Some),
        };
        let payload = find(&cfg.payload_column, "payload_column")?;
        let payload_type = self.base_type(rel.columns[payload].type_oid);
        let resolved = Resolved {
            id: find(&cfg.id_column, "id_column")?,
            key: find(&cfg.key_column, "key_column")?,
            route: match cfg.topic {
                Some(_) => None,
                None => Some(find(&cfg.route_column, "route_column")?),
            },
            payload,
            payload_is_bytea: payload_type == BYTEA_OID,
            payload_check_json: cfg.payload_format == PayloadFormat::Json
                && !matches!(payload_type, JSON_OID | JSONB_OID),
            type_: match &cfg.type_column {
                Some(c) => Some(find(c, "type_column")?),
                None => None,
            },
            headers: cfg
                .header_columns
                .iter()
                .map(|c| Ok((Arc::from(c.as_str()), find(c, "header_columns")?)))
                .collect::<Result<_, MappingError>>()?,
            payload_is_json: matches!(payload_type, JSON_OID | JSONB_OID)
                || cfg.payload_format == PayloadFormat::Json,
            traceparent: trace(&cfg.trace_column, DEFAULT_TRACE_COLUMN, "trace_column")?,
            tracestate: trace(
                &cfg.tracestate_column,
                DEFAULT_TRACESTATE_COLUMN,
                "tracestate_column",
            )?,
            replaced: Vec::new(),
        };
        let mut resolved = resolved;
        // A header column of the trace header's name already carries it.
        let listed = |name: &str| cfg.header_columns.iter().any(|c| c == name);
        if listed(crate::trace::TRACEPARENT) {
            resolved.traceparent = None;
        }
        if listed(crate::trace::TRACESTATE) {
            resolved.tracestate = None;
        }
        resolved.replaced = [self.header_id.clone(), self.header_type.clone()]
            .into_iter()
            .chain(resolved.headers.iter().map(|(n, _)| n.clone()))
            .collect();
        Ok(resolved)
    }

    /// The row's id column as text, when the relation and column are known.
    pub fn row_id(&self, ins: &Insert) -> Option<Bytes> {
        let names = self.column_names.get(&ins.relation_oid)?;
        let idx = names.iter().position(|n| *n == self.cfg.id_column)?;
        text(&ins.tuple, idx)
    }

    /// The row as a JSON object of its columns' text (for a dead-letter
    /// record: nothing of the row is lost).
    pub fn row_json(&self, ins: &Insert) -> Bytes {
        let names = self.column_names.get(&ins.relation_oid);
        let mut obj = serde_json::Map::new();
        for (i, col) in ins.tuple.columns.iter().enumerate() {
            let name = names
                .and_then(|n| n.get(i))
                .cloned()
                .unwrap_or_else(|| format!("column_{i}"));
            let value = match col {
                Column::Null => serde_json::Value::Null,
                Column::UnchangedToast => serde_json::Value::String("(unchanged toast)".into()),
                Column::Text(b) => {
                    serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
                }
                Column::Binary(b) => serde_json::Value::String(format!("\\x{}", hex(b))),
            };
            obj.insert(name, value);
        }
        Bytes::from(serde_json::Value::Object(obj).to_string())
    }

    /// Turn one inserted row into a record.
    pub fn map_insert(&mut self, ins: &Insert, txn: &TxnInfo) -> Result<Mapped, MappingError> {
        self.map_with_headers(ins, txn, Vec::new())
    }

    /// [`Self::map_insert`] with `extra` headers after the relay's own (a
    /// logical decoding message's `headers` member). Under a CloudEvents
    /// envelope they become extension attributes like header columns, when
    /// their names are valid attribute names; `traceparent` and `tracestate`
    /// are the trace context, as the trace columns are; any other name stays
    /// a plain record header.
    pub(crate) fn map_with_headers(
        &mut self,
        ins: &Insert,
        txn: &TxnInfo,
        extra: Vec<(Arc<str>, Bytes)>,
    ) -> Result<Mapped, MappingError> {
        let resolved = match self.relations.get(&ins.relation_oid) {
            None => return Err(MappingError::UnknownRelation(ins.relation_oid)),
            Some(RelationKind::Broken(e)) => return Err(e.clone()),
            Some(RelationKind::Other { name }) => {
                return Ok(Mapped::OtherTable {
                    table: name.clone(),
                })
            }
            Some(RelationKind::Outbox(r)) => r,
        };
        let cfg = &self.cfg;
        let tuple = &ins.tuple;
        let id = text(tuple, resolved.id);
        let id_display = || {
            id.as_ref()
                .map(|b| format!("id={}", String::from_utf8_lossy(b)))
                .unwrap_or_else(|| "with NULL id".to_string())
        };
        let required = |idx: usize, column: &str| -> Result<Bytes, MappingError> {
            text(tuple, idx).ok_or_else(|| MappingError::NullColumn {
                id: id_display(),
                column: column.to_string(),
            })
        };
        let id_value = required(resolved.id, &cfg.id_column)?;
        let key = required(resolved.key, &cfg.key_column)?;
        let payload = match text(tuple, resolved.payload) {
            None => None,
            Some(raw) if resolved.payload_is_bytea => {
                Some(decode_bytea(&raw).map_err(|reason| MappingError::BadValue {
                    id: id_display(),
                    column: cfg.payload_column.clone(),
                    reason,
                })?)
            }
            Some(raw) => Some(raw),
        };
        let topic = match (&self.fixed_topic, resolved.route) {
            (Some(t), _) => t.clone(),
            (None, Some(route_idx)) => {
                let route = required(route_idx, &cfg.route_column)?;
                match self.topics.get(&route) {
                    Some(t) => t.clone(),
                    None => {
                        let value =
                            std::str::from_utf8(&route).map_err(|e| MappingError::BadValue {
                                id: id_display(),
                                column: cfg.route_column.clone(),
                                reason: e.to_string(),
                            })?;
                        let topic = cfg.topic_template.replace(ROUTED_BY_VALUE, value);
                        if !is_legal_topic(&topic) {
                            return Err(MappingError::InvalidTopic {
                                id: id_display(),
                                topic,
                            });
                        }
                        let topic: Arc<str> = Arc::from(topic);
                        if self.topics.len() >= TOPIC_CACHE_CAP {
                            self.topics.clear();
                        }
                        self.topics.insert(route, topic.clone());
                        topic
                    }
                }
            }
            (None, None) => unreachable!("route column is resolved whenever no fixed topic is set"),
        };
        if resolved.payload_check_json {
            if let Some(p) = &payload {
                validate_json(p).map_err(|reason| MappingError::InvalidPayload {
                    id: id_display(),
                    column: cfg.payload_column.clone(),
                    topic: topic.to_string(),
                    reason,
                })?;
            }
        }

        let mut headers = Vec::with_capacity(5 + resolved.headers.len());
        headers.push((self.header_id.clone(), id_value.clone()));
        if let Some(idx) = resolved.type_ {
            if let Some(v) = text(tuple, idx) {
                headers.push((self.header_type.clone(), v));
            }
        }
        for (name, idx) in &resolved.headers {
            if let Some(v) = text(tuple, *idx) {
                headers.push((name.clone(), v));
            }
        }
        if cfg.provenance_headers || self.envelope.is_some() {
            let p = match &self.provenance {
                Some(p) if p.is_for(txn) => p,
                _ => self.provenance.insert(Provenance::of(txn)),
            };
            if cfg.provenance_headers {
                headers.push((self.header_lsn.clone(), p.lsn_text.clone()));
                headers.push((self.header_xid.clone(), p.xid_text.clone()));
                headers.push((self.header_time.clone(), p.time_text.clone()));
            }
        }
        for (idx, name) in [
            (resolved.traceparent, &self.header_traceparent),
            (resolved.tracestate, &self.header_tracestate),
        ] {
            if let Some(v) = idx.and_then(|i| text(tuple, i)) {
                headers.push((name.clone(), v));
            }
        }
        // Extension attributes a message's headers bring (see above).
        let extra_extensions: Vec<(Arc<str>, Bytes)> = if self.envelope.is_some() {
            extra
                .iter()
                .filter(|(name, _)| {
                    &**name != crate::trace::TRACEPARENT
                        && &**name != crate::trace::TRACESTATE
                        && crate::envelope::extension_name_problem(name).is_none()
                })
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        headers.extend(extra);
        let record = OutboxRecord {
            topic,
            key: Some(key),
            payload,
            headers,
            id: Some(id_value),
        };
        let Some(envelope) = &self.envelope else {
            return Ok(Mapped::Record(record));
        };
        let type_ = resolved.type_.and_then(|i| text(tuple, i));
        let mut extensions: Vec<(Arc<str>, Bytes)> = resolved
            .headers
            .iter()
            .filter_map(|(name, idx)| Some((name.clone(), text(tuple, *idx)?)))
            .collect();
        let replaced_extra;
        let replaces: &[Arc<str>] = if extra_extensions.is_empty() {
            &resolved.replaced
        } else {
            replaced_extra = resolved
                .replaced
                .iter()
                .cloned()
                .chain(extra_extensions.iter().map(|(n, _)| n.clone()))
                .collect::<Vec<_>>();
            extensions.extend(extra_extensions);
            &replaced_extra
        };
        // The table replay knows no transaction (all zeros): no `time` then.
        let time = (txn.commit_lsn != Lsn::ZERO || txn.commit_time != 0).then(|| {
            &self
                .provenance
                .as_ref()
                .expect("provenance is set above whenever an envelope is")
                .time_text
        });
        let id = record
            .id
            .clone()
            .expect("the record was given its id above");
        let subject = record.key.clone();
        let facts = EventFacts {
            id: &id,
            type_: type_.as_deref(),
            subject: subject.as_deref(),
            time: time.map(|t| &t[..]),
            content_type: resolved.payload_is_json.then_some(JSON_CONTENT_TYPE),
            extensions: &extensions,
            replaces,
        };
        Ok(Mapped::Record(envelope.apply(record, &facts)))
    }
}

/// The text of column `idx`, or `None` for NULL / absent / TOAST-unchanged.
fn text(tuple: &TupleData, idx: usize) -> Option<Bytes> {
    match tuple.columns.get(idx)? {
        Column::Text(b) | Column::Binary(b) => Some(b.clone()),
        Column::Null | Column::UnchangedToast => None,
    }
}

/// Whether `bytes` are one JSON value (RFC 8259: UTF-8, nothing but whitespace
/// around it). This runs on every row of a checked column, so it allocates only
/// for the error: UTF-8 is checked first (serde_json's byte-slice reader does
/// not check it inside strings, and a bytea payload can hold anything), then
/// the value is parsed and thrown away (`IgnoredAny` builds nothing).
fn validate_json(bytes: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// bytea's text output (`\x0123…`, the default `bytea_output = hex`) to raw bytes.
fn decode_bytea(raw: &[u8]) -> Result<Bytes, String> {
    let hex = raw
        .strip_prefix(b"\\x")
        .ok_or_else(|| "bytea is not in hex output format; set bytea_output = hex".to_string())?;
    if hex.len() % 2 != 0 {
        return Err("bytea hex text has an odd number of digits".into());
    }
    let nibble = |c: u8| -> Result<u8, String> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!(
                "bytea hex text has a non-hex character {:?}",
                c as char
            )),
        }
    };
    let mut out = Vec::with_capacity(hex.len() / 2);
    for pair in hex.chunks_exact(2) {
        out.push((nibble(pair[0])? << 4) | nibble(pair[1])?);
    }
    Ok(Bytes::from(out))
}

/// Kafka's rule for topic names.
pub fn is_legal_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_TOPIC_LEN
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// RFC 3339, UTC, microseconds.
pub fn format_commit_time(pg_micros: i64) -> String {
    let t: SystemTime = pg_micros_to_system_time(pg_micros);
    humantime::format_rfc3339_micros(t).to_string()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::RelationColumn;

    fn table() -> TableName {
        TableName {
            schema: "public".into(),
            name: "outbox_events".into(),
        }
    }

    fn relation(oid: u32, cols: &[(&str, u32)]) -> Relation {
        Relation {
            xid: None,
            oid,
            namespace: "public".into(),
            name: "outbox_events".into(),
            replica_identity: b'd',
            columns: cols
                .iter()
                .map(|(n, t)| RelationColumn {
                    flags: 0,
                    name: n.to_string(),
                    type_oid: *t,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn debezium_relation() -> Relation {
        relation(
            16384,
            &[
                ("id", 2950),
                ("aggregatetype", 25),
                ("aggregateid", 25),
                ("type", 25),
                ("payload", 3802),
                ("created_at", 1184),
            ],
        )
    }

    fn t(s: &str) -> Column {
        Column::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn insert(oid: u32, cols: Vec<Column>) -> Insert {
        Insert {
            xid: None,
            relation_oid: oid,
            tuple: TupleData { columns: cols },
        }
    }

    const TXN: TxnInfo = TxnInfo {
        xid: 747,
        commit_lsn: Lsn(0x16_B374_D848),
        commit_time: 0,
    };

    fn record(m: Mapped) -> OutboxRecord {
        match m {
            Mapped::Record(r) => r,
            other => panic!("expected a record, got {other:?}"),
        }
    }

    fn header<'a>(r: &'a OutboxRecord, name: &str) -> Option<&'a [u8]> {
        r.headers
            .iter()
            .find(|(k, _)| &**k == name)
            .map(|(_, v)| v.as_ref())
    }

    #[test]
    fn debezium_defaults_map_a_row() {
        let mut m = OutboxMapper::new(MappingConfig::default(), table());
        m.on_relation(&debezium_relation()).unwrap();
        let payload = r#"{"total": 12.5, "name": "Zoë ✓"}"#;
        let r = record(
            m.map_insert(
                &insert(
                    16384,
                    vec![
                        t("9f1c"),
                        t("Order"),
                        t("order-42"),
                        t("OrderCreated"),
                        t(payload),
                        t("2026-11-24 10:00:00+00"),
                    ],
                ),
                &TXN,
            )
            .unwrap(),
        );
        assert_eq!(&*r.topic, "outbox.event.Order");
        assert_eq!(r.key.as_deref(), Some(&b"order-42"[..]));
        assert_eq!(r.payload.as_deref(), Some(payload.as_bytes()));
        assert_eq!(header(&r, "id"), Some(&b"9f1c"[..]));
        assert_eq!(header(&r, "type"), Some(&b"OrderCreated"[..]));
        assert_eq!(header(&r, HEADER_LSN), Some(&b"16/B374D848"[..]));
        assert_eq!(header(&r, HEADER_XID), Some(&b"747"[..]));
        assert_eq!(
            header(&r, HEADER_COMMIT_TIME),
            Some(&b"2000-01-01T00:00:00.000000Z"[..])
        );
    }

    #[test]
    fn provenance_headers_follow_the_transaction() {
        let mut m = OutboxMapper::new(MappingConfig::default(), table());
        m.on_relation(&debezium_relation()).unwrap();
        let row = |id: &str| {
            insert(
                16384,
                vec![t(id), t("Order"), t("k"), t("T"), t("{}"), Column::Null],
            )
        };
        let a = record(m.map_insert(&row("1"), &TXN).unwrap());
        let b = record(m.map_insert(&row("2"), &TXN).unwrap());
        for name in [HEADER_LSN, HEADER_XID, HEADER_COMMIT_TIME] {
            assert_eq!(header(&a, name), header(&b, name), "{name}");
        }
        let next = TxnInfo {
            xid: 748,
            commit_lsn: Lsn(0x16_B374_E000),
            commit_time: 1_000_000,
        };
        let c = record(m.map_insert(&row("3"), &next).unwrap());
        assert_eq!(header(&c, HEADER_LSN), Some(&b"16/B374E000"[..]));
        assert_eq!(header(&c, HEADER_XID), Some(&b"748"[..]));
        assert_eq!(
            header(&c, HEADER_COMMIT_TIME),
            Some(&b"2000-01-01T00:00:01.000000Z"[..])
        );
        // Back to an earlier transaction's values (a replay): no stale cache.
        let d = record(m.map_insert(&row("4"), &TXN).unwrap());
        assert_eq!(header(&d, HEADER_XID), Some(&b"747"[..]));
    }

    #[test]
    fn columns_are_matched_by_name_after_alter_table() {
        let mut m = OutboxMapper::new(MappingConfig::default(), table());
        // A new column in front and a different order: matching is by name.
        m.on_relation(&relation(
            16384,
            &[
                ("tenant", 25),
                ("payload", 3802),
                ("type", 25),
                ("aggregateid", 25),
                ("aggregatetype", 25),
                ("id", 2950),
            ],
        ))
        .unwrap();
        let r = record(
            m.map_insert(
                &insert(
                    16384,
                    vec![t("acme"), t("{}"), t("T"), t("k"), t("Customer"), t("1")],
                ),
                &TXN,
            )
            .unwrap(),
        );
        assert_eq!(&*r.topic, "outbox.event.Customer");
        assert_eq!(r.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(header(&r, "id"), Some(&b"1"[..]));
    }

    #[test]
    fn custom_columns_fixed_topic_and_extra_headers() {
        let cfg = MappingConfig {
            id_column: "idempotency_key".into(),
            key_column: "saga_id".into(),
            route_column: "unused".into(),
            payload_column: "body".into(),
            type_column: Some("event_type".into()),
            topic: Some("sagas".into()),
            header_columns: vec!["tenant".into()],
            provenance_headers: false,
            ..MappingConfig::default()
        };
        let mut m = OutboxMapper::new(cfg, table());
        m.on_relation(&relation(
            1,
            &[
                ("idempotency_key", 25),
                ("saga_id", 25),
                ("event_type", 25),
                ("body", 17),
                ("tenant", 25),
            ],
        ))
        .unwrap();
        let r = record(
            m.map_insert(
                &insert(
                    1,
                    vec![t("k1"), t("s1"), t("Started"), t("\\x00ff41"), Column::Null],
                ),
                &TXN,
            )
            .unwrap(),
        );
        assert_eq!(&*r.topic, "sagas");
        assert_eq!(
            r.payload.as_deref(),
            Some(&[0u8, 0xff, 0x41][..]),
            "bytea decoded"
        );
        assert_eq!(header(&r, "type"), Some(&b"Started"[..]));
        assert_eq!(header(&r, "tenant"), None, "NULL header column is omitted");
        assert_eq!(header(&r, HEADER_LSN), None);
    }

    #[test]
    fn missing_column_names_the_fix() {
        let mut m = OutboxMapper::new(MappingConfig::default(), table());
        let err = m
            .on_relation(&relation(1, &[("id", 25), ("payload", 25)]))
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("aggregateid"), "{msg}");
        assert!(msg.contains("id, payload"), "{msg}");
        assert!(!err.is_poison());
    }

    #[test]
    fn poison_rows_are_errors_not_records() {
        let mut m = OutboxMapper::new(MappingConfig::default(), table());
        m.on_relation(&debezium_relation()).unwrap();
        let null_key = insert(
            16384,
            vec![
                t("1"),
                t("Order"),
                Column::Null,
                t("T"),
                t("{}"),
                Column::Null,
            ],
        );
        let e = m.map_insert(&null_key, &TXN).unwrap_err();
        assert!(e.is_poison());
        assert!(e.to_string().contains("id=1"), "{e}");
        let bad_topic = insert(
            16384,
            vec![
                t("2"),
                t("Order/../x"),
                t("k"),
                t("T"),
                t("{}"),
                Column::Null,
            ],
        );
        let e = m.map_insert(&bad_topic, &TXN).unwrap_err();
        assert!(matches!(e, MappingError::InvalidTopic { .. }), "{e}");
    }

    fn payload_row(id: &str, payload: Column) -> Insert {
        insert(
            16384,
            vec![t(id), t("Order"), t("k"), t("T"), payload, Column::Null],
        )
    }

    fn mapper_with(format: PayloadFormat, payload_oid: u32) -> OutboxMapper {
        let cfg = MappingConfig {
            payload_format: format,
            ..MappingConfig::default()
        };
        let mut m = OutboxMapper::new(cfg, table());
        let mut rel = debezium_relation();
        rel.columns[4].type_oid = payload_oid;
        m.on_relation(&rel).unwrap();
        m
    }

    #[test]
    fn json_format_checks_text_payloads() {
        let mut m = mapper_with(PayloadFormat::Json, 25);
        for good in [
            r#"{"a": [1, 2.5, "Zoë"]}"#,
            " {} \n",
            "42",
            r#""s""#,
            "null",
        ] {
            let r = record(m.map_insert(&payload_row("1", t(good)), &TXN).unwrap());
            assert_eq!(r.payload.as_deref(), Some(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "",
            "{",
            r#"{"a": 1} x"#,
            "{'a': 1}",
            "not json",
            r#"{"a": "\q"}"#,
        ] {
            let e = m
                .map_insert(&payload_row("7", t(bad)), &TXN)
                .expect_err(bad);
            assert_eq!(e.poison_class(), Some("invalid_payload"), "{bad:?}");
            assert!(e.is_poison());
            assert_eq!(e.original_topic(), Some("outbox.event.Order"));
            let msg = e.to_string();
            assert!(msg.contains("id=7"), "{msg}");
            assert!(msg.contains("payload_format"), "names the fix: {msg}");
        }
        // NULL is no payload (a record without a value), not bad JSON.
        let r = record(m.map_insert(&payload_row("2", Column::Null), &TXN).unwrap());
        assert_eq!(r.payload, None);
    }

    #[test]
    fn json_format_trusts_json_columns_and_raw_checks_nothing() {
        // PostgreSQL validated json/jsonb on input: not parsed again (the bytes
        // here could never come from such a column; they show no check runs).
        for oid in [JSON_OID, JSONB_OID] {
            let mut m = mapper_with(PayloadFormat::Json, oid);
            assert!(m.map_insert(&payload_row("1", t("{")), &TXN).is_ok());
        }
        let mut m = mapper_with(PayloadFormat::Raw, 25);
        let r = record(
            m.map_insert(&payload_row("1", t("plain text")), &TXN)
                .unwrap(),
        );
        assert_eq!(r.payload.as_deref(), Some(&b"plain text"[..]));
        assert_eq!(MappingConfig::default().payload_format, PayloadFormat::Raw);
    }

    #[test]
    fn json_format_checks_decoded_bytea() {
        let mut m = mapper_with(PayloadFormat::Json, BYTEA_OID);
        let r = record(m.map_insert(&payload_row("1", t("\\x7b7d")), &TXN).unwrap());
        assert_eq!(r.payload.as_deref(), Some(&b"{}"[..]));
        // `"\xff"`: a JSON string holding a byte that is not UTF-8.
        let e = m
            .map_insert(&payload_row("2", t("\\x22ff22")), &TXN)
            .unwrap_err();
        assert_eq!(e.poison_class(), Some("invalid_payload"));
        assert!(e.to_string().contains("UTF-8"), "{e}");
    }

    #[test]
    fn other_tables_and_unknown_relations() {
        let mut m = OutboxMapper::new(MappingConfig::default(), table());
        let mut other = debezium_relation();
        other.oid = 7;
        other.name = "audit".into();
        m.on_relation(&other).unwrap();
        assert_eq!(
            m.map_insert(&insert(7, vec![]), &TXN).unwrap(),
            Mapped::OtherTable {
                table: "public.audit".into()
            }
        );
        assert_eq!(
            m.map_insert(&insert(8, vec![]), &TXN).unwrap_err(),
            MappingError::UnknownRelation(8)
        );
    }

    #[test]
    fn trace_columns_become_headers_when_the_table_has_them() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut rel = debezium_relation();
        for c in ["traceparent", "tracestate"] {
            rel.columns.push(RelationColumn {
                flags: 0,
                name: c.into(),
                type_oid: 25,
                type_modifier: -1,
            });
        }
        let row = |tp: Column| {
            insert(
                16384,
                vec![
                    t("1"),
                    t("Order"),
                    t("k"),
                    t("T"),
                    t("{}"),
                    Column::Null,
                    tp,
                    t("a=b"),
                ],
            )
        };
        let mut m = OutboxMapper::new(MappingConfig::default(), table());
        m.on_relation(&rel).unwrap();
        let r = record(m.map_insert(&row(t(parent)), &TXN).unwrap());
        let names: Vec<&str> = r.headers.iter().map(|(k, _)| &**k).collect();
        assert_eq!(
            names,
            [
                "id",
                "type",
                HEADER_LSN,
                HEADER_XID,
                HEADER_COMMIT_TIME,
                "traceparent",
                "tracestate"
            ]
        );
        assert_eq!(header(&r, "traceparent"), Some(parent.as_bytes()));
        // Not valid W3C: carried all the same. NULL: no header.
        let r = record(m.map_insert(&row(t("garbage")), &TXN).unwrap());
        assert_eq!(header(&r, "traceparent"), Some(&b"garbage"[..]));
        let r = record(m.map_insert(&row(Column::Null), &TXN).unwrap());
        assert_eq!(header(&r, "traceparent"), None);

        // Listed as a header column too: one header, where the list puts it.
        let cfg = MappingConfig {
            header_columns: vec!["traceparent".into()],
            ..MappingConfig::default()
        };
        let mut m = OutboxMapper::new(cfg, table());
        m.on_relation(&rel).unwrap();
        let r = record(m.map_insert(&row(t(parent)), &TXN).unwrap());
        assert_eq!(
            r.headers
                .iter()
                .filter(|(k, _)| &**k == "traceparent")
                .count(),
            1
        );

        // Off, or a column of another name that the table lacks.
        let off = MappingConfig {
            trace_column: None,
            tracestate_column: None,
            ..MappingConfig::default()
        };
        let mut m = OutboxMapper::new(off, table());
        m.on_relation(&rel).unwrap();
        let r = record(m.map_insert(&row(t(parent)), &TXN).unwrap());
        assert_eq!(header(&r, "traceparent"), None);
        let named = MappingConfig {
            trace_column: Some("trace_ctx".into()),
            ..MappingConfig::default()
        };
        let err = OutboxMapper::new(named, table())
            .on_relation(&rel)
            .unwrap_err();
        assert!(err.to_string().contains("trace_column"), "{err}");
    }

    #[test]
    fn topic_legality() {
        assert!(is_legal_topic("outbox.event.Order_v2-x"));
        for bad in ["", ".", "..", "a b", "a/b", "ünï", &"x".repeat(250)] {
            assert!(!is_legal_topic(bad), "{bad:?}");
        }
    }

    #[test]
    fn bytea_decoding_rejects_bad_text() {
        assert!(decode_bytea(b"00ff").is_err());
        assert!(decode_bytea(b"\\x0").is_err());
        assert!(decode_bytea(b"\\xzz").is_err());
        assert_eq!(&decode_bytea(b"\\x").unwrap()[..], b"");
    }
}
