//! The CloudEvents 1.0 envelope over a mapped record (Kafka protocol binding).
//!
//! The envelope is a transformation of a record the mapper already made, given
//! the facts of its event ([`EventFacts`]): it knows nothing of where the record
//! came from (an outbox row or a logical-decoding message), so every kind of
//! event gets the same envelope.
//!
//! * `none` (the default): the record is left exactly as it is.
//! * `cloudevents-binary`: the value stays the payload; the context attributes
//!   travel as `ce_`-prefixed headers (`ce_specversion`, `ce_id`, `ce_source`,
//!   `ce_type`, `ce_time`, `ce_subject`, one `ce_<name>` per extension
//!   attribute) and `content-type` carries `datacontenttype`.
//! * `cloudevents-structured`: the value is one `application/cloudevents+json`
//!   object holding every attribute and the payload under `data` (JSON
//!   payloads) or `data_base64` (anything else); header `content-type` says so.
//!
//! In both modes the record key stays the partitioning key, and the headers
//! the event attributes now carry (`id`, `type`, the extension columns) are
//! replaced by them; the other headers (provenance, `traceparent`,
//! `tracestate`) stay as they are.
//!
//! Attribute values come from the outbox and are sent as they are: a value
//! that breaks an attribute's format (a `source` that is not a URI reference,
//! bytes that are not UTF-8) never stops the stream. Only extension attribute
//! *names* are checked, once, at start ([`validate`]).
//!
//! Pure: no IO.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;

use crate::config::{Config, Problem};
use crate::outbox::OutboxRecord;

/// `specversion` of every event.
pub const SPEC_VERSION: &str = "1.0";
/// `content-type` of a structured-mode record.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";
/// `datacontenttype` of JSON payloads.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// The Kafka binding's prefix of attribute headers in binary mode.
pub const HEADER_PREFIX: &str = "ce_";
/// The Kafka binding's header for `datacontenttype` (binary mode) and the
/// event format (structured mode).
pub const HEADER_CONTENT_TYPE: &str = "content-type";
/// The spec recommends extension names of at most this many characters.
pub const RECOMMENDED_NAME_LEN: usize = 20;

/// Names of the CloudEvents 1.0 context attributes (and the structured
/// format's data members): an extension may not take one of them.
const RESERVED: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
];

/// What a record looks like on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum EnvelopeMode {
    /// The records as they always were.
    #[default]
    None,
    /// CloudEvents binary content mode: `ce_*` headers, value = payload.
    CloudeventsBinary,
    /// CloudEvents structured content mode: value = the event as JSON.
    CloudeventsStructured,
}

impl EnvelopeMode {
    pub fn is_cloudevents(self) -> bool {
        self != EnvelopeMode::None
    }
}

/// The facts of one event that the record alone does not tell.
#[derive(Debug, Clone)]
pub struct EventFacts<'a> {
    /// `id`: the outbox row id (or the message's event id).
    pub id: &'a [u8],
    /// `type`; `None` when the event has none (the topic stands in, as
    /// `type` is required).
    pub type_: Option<&'a [u8]>,
    /// `subject`: the aggregate id.
    pub subject: Option<&'a [u8]>,
    /// `time`: the commit time, RFC 3339; `None` when unknown (rows
    /// replayed from the table): `time` is optional in CloudEvents.
    pub time: Option<&'a [u8]>,
    /// `datacontenttype`, when known (`application/json` for JSON payloads).
    /// JSON payloads go under `data` in structured mode, others base64.
    pub content_type: Option<&'static str>,
    /// Extension attributes: (name, value). Names were checked at start.
    pub extensions: &'a [(Arc<str>, Bytes)],
    /// Headers of the record that these attributes carry from now on (the
    /// mapper's `id`, `type` and extension headers): dropped from the record.
    pub replaces: &'a [Arc<str>],
}

/// The envelope of a relay: its mode and its `source`.
#[derive(Debug, Clone)]
pub struct Envelope {
    mode: EnvelopeMode,
    source: Bytes,
    /// Header names, made once.
    names: Names,
}

#[derive(Debug, Clone)]
struct Names {
    specversion: Arc<str>,
    id: Arc<str>,
    source: Arc<str>,
    type_: Arc<str>,
    time: Arc<str>,
    subject: Arc<str>,
    content_type: Arc<str>,
}

impl Envelope {
    /// `None` for mode `none`: nothing to do, not even a call.
    pub fn new(mode: EnvelopeMode, source: impl Into<Bytes>) -> Option<Envelope> {
        let h = |n: &str| Arc::from(format!("{HEADER_PREFIX}{n}"));
        mode.is_cloudevents().then(|| Envelope {
            mode,
            source: source.into(),
            names: Names {
                specversion: h("specversion"),
                id: h("id"),
                source: h("source"),
                type_: h("type"),
                time: h("time"),
                subject: h("subject"),
                content_type: Arc::from(HEADER_CONTENT_TYPE),
            },
        })
    }

    /// The envelope a configuration asks for: `mapping.ce_source`, or
    /// `/outbox-relay/<database>/<table>`.
    pub fn for_config(cfg: &Config) -> Option<Envelope> {
        let source = cfg.mapping.ce_source.clone().unwrap_or_else(|| {
            let db = cfg
                .postgres
                .replication_connect_config()
                .map(|c| c.dbname)
                .unwrap_or_default();
            default_source(&db, &cfg.postgres.table.to_string())
        });
        Envelope::new(cfg.mapping.envelope, source)
    }

    pub fn mode(&self) -> EnvelopeMode {
        self.mode
    }

    /// `record` in this envelope.
    pub fn apply(&self, mut record: OutboxRecord, facts: &EventFacts<'_>) -> OutboxRecord {
        let kept = std::mem::take(&mut record.headers)
            .into_iter()
            .filter(|(name, _)| !facts.replaces.iter().any(|r| r == name));
        let type_ = facts.type_.unwrap_or(record.topic.as_bytes());
        match self.mode {
            EnvelopeMode::None => {
                record.headers = kept.collect();
                record
            }
            EnvelopeMode::CloudeventsBinary => {
                let n = &self.names;
                let mut headers = Vec::with_capacity(10 + facts.extensions.len());
                headers.push((n.specversion.clone(), Bytes::from_static(b"1.0")));
                headers.push((n.id.clone(), Bytes::copy_from_slice(facts.id)));
                headers.push((n.source.clone(), self.source.clone()));
                headers.push((n.type_.clone(), Bytes::copy_from_slice(type_)));
                if let Some(t) = facts.time {
                    headers.push((n.time.clone(), Bytes::copy_from_slice(t)));
                }
                if let Some(s) = facts.subject {
                    headers.push((n.subject.clone(), Bytes::copy_from_slice(s)));
                }
                if let Some(ct) = facts.content_type {
                    headers.push((n.content_type.clone(), Bytes::from_static(ct.as_bytes())));
                }
                for (name, value) in facts.extensions {
                    headers.push((Arc::from(format!("{HEADER_PREFIX}{name}")), value.clone()));
                }
                headers.extend(kept);
                record.headers = headers;
                record
            }
            EnvelopeMode::CloudeventsStructured => {
                let kept: Vec<_> = kept.collect();
                let trace = |name: &str| {
                    kept.iter()
                        .find(|(n, _)| &**n == name)
                        .map(|(_, v)| v.as_ref())
                };
                let mut event = serde_json::Map::new();
                let s = |b: &[u8]| serde_json::Value::String(String::from_utf8_lossy(b).into());
                event.insert("specversion".into(), SPEC_VERSION.into());
                event.insert("id".into(), s(facts.id));
                event.insert("source".into(), s(&self.source));
                event.insert("type".into(), s(type_));
                if let Some(t) = facts.time {
                    event.insert("time".into(), s(t));
                }
                if let Some(subject) = facts.subject {
                    event.insert("subject".into(), s(subject));
                }
                let json_data = facts.content_type == Some(JSON_CONTENT_TYPE);
                if let Some(ct) = facts.content_type {
                    event.insert("datacontenttype".into(), ct.into());
                }
                for (name, value) in facts.extensions {
                    event.insert(name.to_string(), s(value));
                }
                // The distributed-tracing extension: the event carries its
                // trace context itself in this mode.
                for name in [crate::trace::TRACEPARENT, crate::trace::TRACESTATE] {
                    if let Some(v) = trace(name) {
                        event.insert(name.into(), s(v));
                    }
                }
                match (&record.payload, json_data) {
                    (None, _) => {}
                    (Some(p), false) => {
                        event.insert(
                            "data_base64".into(),
                            base64::engine::general_purpose::STANDARD.encode(p).into(),
                        );
                    }
                    // A JSON payload goes in as it is (spliced below, see there).
                    (Some(_), true) => {}
                }
                let mut value =
                    serde_json::to_vec(&event).expect("a map of strings always serializes");
                if let (Some(p), true) = (&record.payload, json_data) {
                    // `data` is the payload's own JSON text: it is valid JSON
                    // (a json/jsonb column, or checked under payload_format =
                    // json), so it is spliced in rather than parsed and
                    // written again. The map ends in `}`; `event` is never
                    // empty, so a comma separates.
                    value.pop();
                    value.reserve(p.len() + 10);
                    value.extend_from_slice(b",\"data\":");
                    value.extend_from_slice(p);
                    value.push(b'}');
                }
                record.payload = Some(Bytes::from(value));
                let mut headers = Vec::with_capacity(1 + kept.len());
                headers.push((
                    self.names.content_type.clone(),
                    Bytes::from_static(STRUCTURED_CONTENT_TYPE.as_bytes()),
                ));
                headers.extend(kept);
                record.headers = headers;
                record
            }
        }
    }
}

/// `/outbox-relay/<database>/<table>`.
pub fn default_source(database: &str, table: &str) -> String {
    format!("/outbox-relay/{database}/{table}")
}

/// Why `name` cannot be a CloudEvents extension attribute name, if it cannot.
pub fn extension_name_problem(name: &str) -> Option<String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Some(
            "CloudEvents attribute names are lower-case letters a-z and digits 0-9 only".into(),
        );
    }
    if RESERVED.contains(&name) {
        return Some(format!(
            "{name:?} is a CloudEvents context attribute, not an extension"
        ));
    }
    None
}

/// Start-time checks of the envelope settings (called by the config's validation).
pub fn validate(cfg: &Config, out: &mut Vec<Problem>) {
    let m = &cfg.mapping;
    if !m.envelope.is_cloudevents() {
        return;
    }
    for column in &m.header_columns {
        if let Some(why) = extension_name_problem(column) {
            out.push(Problem::new(
                format!(
                    "header column {column:?} cannot become a CloudEvents extension attribute under mapping.envelope = {}: {why}",
                    mode_name(m.envelope)
                ),
                format!("rename the column (e.g. ALTER TABLE ... RENAME COLUMN {column} TO {}) or remove it from mapping.header_columns (--header-column)", suggested_name(column)),
            ));
        } else if column.len() > RECOMMENDED_NAME_LEN {
            out.push(Problem::info(
                format!("header column {column:?} is longer than the {RECOMMENDED_NAME_LEN} characters CloudEvents recommends for attribute names"),
                "a shorter column name is kinder to consumers that limit attribute names",
            ));
        }
        if [crate::trace::TRACEPARENT, crate::trace::TRACESTATE].contains(&column.as_str()) {
            out.push(Problem::new(
                format!("mapping.header_columns lists {column:?}, which the trace context settings carry"),
                format!("remove it from mapping.header_columns (--header-column); set mapping.{}_column (--{}-column) instead", if column == crate::trace::TRACEPARENT { "trace" } else { "tracestate" }, if column == crate::trace::TRACEPARENT { "trace" } else { "tracestate" }),
            ));
        }
    }
    if let Some(source) = &m.ce_source {
        if source.trim() != source || source.contains(char::is_whitespace) {
            out.push(Problem::new(
                format!("mapping.ce_source {source:?} contains blanks; CloudEvents source is a URI-reference"),
                "set mapping.ce_source (--ce-source) to a URI reference, e.g. /orders-service or urn:example:orders",
            ));
        }
    }
}

fn mode_name(mode: EnvelopeMode) -> &'static str {
    match mode {
        EnvelopeMode::None => "none",
        EnvelopeMode::CloudeventsBinary => "cloudevents-binary",
        EnvelopeMode::CloudeventsStructured => "cloudevents-structured",
    }
}

fn suggested_name(column: &str) -> String {
    let s: String = column
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if s.is_empty() {
        "ext1".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> OutboxRecord {
        OutboxRecord {
            topic: Arc::from("outbox.event.Order"),
            key: Some(Bytes::from_static(b"order-42")),
            payload: Some(Bytes::from_static(br#"{"total": 12.5}"#)),
            headers: vec![
                (Arc::from("id"), Bytes::from_static(b"9f1c")),
                (Arc::from("type"), Bytes::from_static(b"OrderCreated")),
                (Arc::from("tenant"), Bytes::from_static(b"acme")),
                (Arc::from("outbox-relay-xid"), Bytes::from_static(b"747")),
                (
                    Arc::from("traceparent"),
                    Bytes::from_static(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                ),
            ],
            id: Some(Bytes::from_static(b"9f1c")),
        }
    }

    fn facts<'a>(
        ext: &'a [(Arc<str>, Bytes)],
        replaces: &'a [Arc<str>],
        ct: Option<&'static str>,
    ) -> EventFacts<'a> {
        EventFacts {
            id: b"9f1c",
            type_: Some(b"OrderCreated"),
            subject: Some(b"order-42"),
            time: Some(b"2026-12-03T10:00:00.000000Z"),
            content_type: ct,
            extensions: ext,
            replaces,
        }
    }

    fn names(r: &OutboxRecord) -> Vec<&str> {
        r.headers.iter().map(|(k, _)| &**k).collect()
    }

    #[test]
    fn none_is_no_envelope() {
        assert!(Envelope::new(EnvelopeMode::None, "/x").is_none());
    }

    #[test]
    fn binary_mode_headers_in_order() {
        let env = Envelope::new(
            EnvelopeMode::CloudeventsBinary,
            "/outbox-relay/app/public.outbox_events",
        )
        .unwrap();
        let ext = [(Arc::from("tenant"), Bytes::from_static(b"acme"))];
        let replaces = [Arc::from("id"), Arc::from("type"), Arc::from("tenant")];
        let r = env.apply(record(), &facts(&ext, &replaces, Some(JSON_CONTENT_TYPE)));
        assert_eq!(
            names(&r),
            [
                "ce_specversion",
                "ce_id",
                "ce_source",
                "ce_type",
                "ce_time",
                "ce_subject",
                "content-type",
                "ce_tenant",
                "outbox-relay-xid",
                "traceparent"
            ]
        );
        assert_eq!(r.payload, record().payload, "the value stays the payload");
        assert_eq!(r.key, record().key);
        assert_eq!(
            &r.headers[2].1[..],
            b"/outbox-relay/app/public.outbox_events"
        );
        assert_eq!(&r.headers[6].1[..], b"application/json");
    }

    #[test]
    fn structured_mode_json_and_base64() {
        let env = Envelope::new(EnvelopeMode::CloudeventsStructured, "/s").unwrap();
        let ext = [(Arc::from("tenant"), Bytes::from_static(b"acme"))];
        let replaces = [Arc::from("id"), Arc::from("type"), Arc::from("tenant")];
        let r = env.apply(record(), &facts(&ext, &replaces, Some(JSON_CONTENT_TYPE)));
        assert_eq!(
            names(&r),
            ["content-type", "outbox-relay-xid", "traceparent"]
        );
        let v: serde_json::Value = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "9f1c");
        assert_eq!(v["source"], "/s");
        assert_eq!(v["type"], "OrderCreated");
        assert_eq!(v["subject"], "order-42");
        assert_eq!(v["time"], "2026-12-03T10:00:00.000000Z");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["tenant"], "acme");
        assert_eq!(
            v["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(v["data"]["total"], 12.5);
        assert!(v.get("data_base64").is_none());

        // Not known to be JSON: base64, and no datacontenttype.
        let mut raw = record();
        raw.payload = Some(Bytes::from_static(&[0, 0xff, b'{']));
        let r = env.apply(raw, &facts(&[], &replaces, None));
        let v: serde_json::Value = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        assert_eq!(v["data_base64"], "AP97");
        assert!(v.get("data").is_none());
        assert!(v.get("datacontenttype").is_none());

        // No payload: no data at all.
        let mut empty = record();
        empty.payload = None;
        let r = env.apply(empty, &facts(&[], &replaces, Some(JSON_CONTENT_TYPE)));
        let v: serde_json::Value = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        assert!(v.get("data").is_none() && v.get("data_base64").is_none());
    }

    #[test]
    fn malformed_values_still_make_an_event() {
        let env = Envelope::new(EnvelopeMode::CloudeventsStructured, "not a uri").unwrap();
        let ext = [(Arc::from("tenant"), Bytes::from_static(&[0xff, 0xfe]))];
        let mut f = facts(&ext, &[], Some(JSON_CONTENT_TYPE));
        f.type_ = None;
        f.subject = Some(&[0xc3]);
        let r = env.apply(record(), &f);
        let v: serde_json::Value = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        assert_eq!(
            v["type"], "outbox.event.Order",
            "the topic stands in for a NULL type"
        );
        assert_eq!(v["tenant"], "\u{fffd}\u{fffd}");
        assert_eq!(v["source"], "not a uri");
    }

    #[test]
    fn extension_names_follow_the_spec() {
        for good in ["tenant", "sagaid2", "x"] {
            assert_eq!(extension_name_problem(good), None, "{good}");
        }
        for bad in [
            "Tenant",
            "saga_id",
            "idempotency-key",
            "",
            "ünï",
            "id",
            "data",
            "time",
        ] {
            assert!(extension_name_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn invalid_header_columns_are_config_errors_naming_them() {
        let mut cfg = Config::default();
        cfg.mapping.envelope = EnvelopeMode::CloudeventsBinary;
        cfg.mapping.header_columns = vec![
            "tenant".into(),
            "saga_id".into(),
            "averyveryverylongcolumnname".into(),
        ];
        let mut out = Vec::new();
        validate(&cfg, &mut out);
        let errors: Vec<_> = out.iter().filter(|p| p.is_error()).collect();
        assert_eq!(errors.len(), 1, "{out:?}");
        assert!(errors[0].what.contains("\"saga_id\""), "{}", errors[0].what);
        assert!(errors[0].fix.contains("sagaid"), "{}", errors[0].fix);
        assert_eq!(out.len(), 2, "the long name is a notice: {out:?}");
        // Under `none` header names are free, as before.
        cfg.mapping.envelope = EnvelopeMode::None;
        let mut out = Vec::new();
        validate(&cfg, &mut out);
        assert!(out.is_empty());
    }
}
