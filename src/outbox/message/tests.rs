use super::*;
use crate::config::{MappingConfig, TableName};

fn txn() -> TxnInfo {
    TxnInfo {
        xid: 731,
        commit_lsn: Lsn(0x16B_3748),
        commit_time: 0,
    }
}

fn mapper(cfg: MappingConfig) -> OutboxMapper {
    OutboxMapper::new(
        cfg,
        TableName {
            schema: "public".into(),
            name: "outbox_events".into(),
        },
    )
}

fn msg(content: &str) -> LogicalMessage {
    LogicalMessage {
        xid: None,
        transactional: true,
        lsn: Lsn(0x16B_3700),
        prefix: "outbox".into(),
        content: Bytes::copy_from_slice(content.as_bytes()),
    }
}

fn header<'a>(r: &'a OutboxRecord, name: &str) -> Option<&'a [u8]> {
    r.headers
        .iter()
        .find(|(k, _)| &**k == name)
        .map(|(_, v)| &v[..])
}

#[test]
fn an_event_maps_like_a_row_with_the_payload_as_written() {
    let mut m = mapper(MappingConfig::default());
    let content = r#"{"id":"e-1","aggregatetype":"Order","aggregateid":"42","type":"OrderCreated",
        "payload":  {"b": 1.50, "a" : [1,2]} ,"headers":{"tenant":"t1","trace":"x"}}"#;
    let r = m.map_message(&msg(content), &txn()).unwrap();
    assert_eq!(&*r.topic, "outbox.event.Order");
    assert_eq!(r.key.as_deref(), Some(&b"42"[..]));
    // Not re-serialised: spacing, member order and 1.50 stay as written.
    assert_eq!(
        r.payload.as_deref(),
        Some(&br#"{"b": 1.50, "a" : [1,2]}"#[..])
    );
    assert_eq!(header(&r, "id"), Some(&b"e-1"[..]));
    assert_eq!(header(&r, "type"), Some(&b"OrderCreated"[..]));
    assert_eq!(header(&r, "tenant"), Some(&b"t1"[..]));
    assert_eq!(header(&r, "trace"), Some(&b"x"[..]));
    assert_eq!(
        header(&r, crate::outbox::HEADER_LSN),
        Some(&b"0/16B3748"[..])
    );
    assert_eq!(header(&r, crate::outbox::HEADER_XID), Some(&b"731"[..]));
    assert_eq!(r.id.as_deref(), Some(&b"e-1"[..]));
    // Extra headers come after the relay's own, in the order written.
    let names: Vec<&str> = r.headers.iter().map(|(k, _)| &**k).collect();
    assert_eq!(names.last(), Some(&"trace"));
    assert!(names.iter().position(|n| *n == "tenant") > names.iter().position(|n| *n == "id"));
}

#[test]
fn payload_may_be_any_json_value() {
    let mut m = mapper(MappingConfig::default());
    for payload in ["null", "\"text\"", "12.0e3", "[]", "true"] {
        let content =
            format!(r#"{{"aggregatetype":"A","aggregateid":"1","type":"T","payload":{payload}}}"#);
        let r = m.map_message(&msg(&content), &txn()).unwrap();
        assert_eq!(r.payload.as_deref(), Some(payload.as_bytes()), "{payload}");
    }
}

#[test]
fn without_an_id_the_id_is_derived_from_the_wal_and_stable() {
    let mut m = mapper(MappingConfig::default());
    let content = r#"{"aggregatetype":"A","aggregateid":"1","type":"T","payload":{}}"#;
    let a = m.map_message(&msg(content), &txn()).unwrap();
    let b = mapper(MappingConfig::default())
        .map_message(&msg(content), &txn())
        .unwrap();
    assert_eq!(
        header(&a, "id"),
        Some(&b"00000000-016b-8748-8000-0000016b3700"[..])
    );
    assert_eq!(header(&a, "id"), header(&b, "id"));
    // Another message of the same transaction gets another id.
    let mut other = msg(content);
    other.lsn = Lsn(0x16B_3710);
    let c = m.map_message(&other, &txn()).unwrap();
    assert_ne!(header(&a, "id"), header(&c, "id"));
}

#[test]
fn derived_ids_are_rfc_9562_version_8_and_keep_the_message_lsn() {
    let id = derived_id(Lsn(u64::MAX), Lsn(0x0123_4567_89AB_CDEF));
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "8", "version nibble: {id}");
    assert!("89ab".contains(&id[19..20]), "variant: {id}");
    // The message LSN keeps all but its top two bits (zero below 4 EiB of WAL).
    assert_eq!(&id[19..], "8123-456789abcdef");
    assert_eq!(&id[..18], "ffffffff-ffff-8fff");
}

#[test]
fn the_row_mapping_applies_fixed_topic_and_type_column() {
    let cfg = MappingConfig {
        topic: Some("events".into()),
        type_column: None,
        provenance_headers: false,
        ..MappingConfig::default()
    };
    let mut m = mapper(cfg);
    let content = r#"{"id":"7","aggregatetype":"A","aggregateid":"1","type":"T","payload":1}"#;
    let r = m.map_message(&msg(content), &txn()).unwrap();
    assert_eq!(&*r.topic, "events");
    assert_eq!(
        header(&r, "type"),
        None,
        "no type column: no type header, as for rows"
    );
    assert_eq!(header(&r, crate::outbox::HEADER_LSN), None);
}

#[test]
fn an_illegal_topic_is_the_row_class_invalid_topic() {
    let mut m = mapper(MappingConfig::default());
    let content = r#"{"aggregatetype":"Or der","aggregateid":"1","type":"T","payload":1}"#;
    let e = m.map_message(&msg(content), &txn()).unwrap_err();
    assert_eq!(e.poison_class(), Some("invalid_topic"), "{e}");
    assert_eq!(e.original_topic(), Some("outbox.event.Or der"));
}

#[test]
fn malformed_events_are_invalid_messages_naming_the_problem() {
    let cases: &[(&[u8], &str)] = &[
        (b"not json", "expected"),
        (b"\xff\xfe", "UTF-8"),
        (br#"[1,2]"#, "invalid type"),
        (
            br#"{"aggregateid":"1","type":"T","payload":1}"#,
            "aggregatetype",
        ),
        (
            br#"{"aggregatetype":"A","aggregateid":"1","type":"T"}"#,
            "payload",
        ),
        (
            br#"{"aggregatetype":"A","aggregateid":1,"type":"T","payload":1}"#,
            "invalid type",
        ),
        (
            br#"{"aggregatetype":"A","aggregateid":"1","type":"T","payload":1,"headers":{"h":2}}"#,
            "invalid type",
        ),
        (
            br#"{"aggregatetype":"A","aggregateid":"1","type":"T","payload":1,"paylod":2}"#,
            "paylod",
        ),
        (
            br#"{"aggregatetype":"A","aggregateid":"1","type":"T","payload":1} x"#,
            "trailing",
        ),
    ];
    for (content, needle) in cases {
        let mut m = mapper(MappingConfig::default());
        let mut message = msg("");
        message.content = Bytes::copy_from_slice(content);
        let e = m.map_message(&message, &txn()).unwrap_err();
        assert_eq!(e.poison_class(), Some("invalid_message"), "{e}");
        let text = e.to_string();
        assert!(text.contains(needle), "{needle:?} not in {text}");
        assert!(
            text.contains("0/16B3700") && text.contains("outbox_emit"),
            "{text}"
        );
    }
}

#[test]
fn classify_by_prefix_and_transactional_flag() {
    let mut m = msg("{}");
    assert_eq!(classify(&m, Some("outbox")), MessageKind::Event);
    assert_eq!(classify(&m, None), MessageKind::Foreign);
    assert_eq!(classify(&m, Some("other")), MessageKind::Foreign);
    m.transactional = false;
    assert_eq!(classify(&m, Some("outbox")), MessageKind::NonTransactional);
}

#[test]
fn dead_letter_content_is_the_raw_text_or_hex() {
    let m = msg("{broken");
    assert_eq!(&OutboxMapper::message_content(&m)[..], b"{broken");
    let mut b = msg("");
    b.content = Bytes::from_static(b"\xff\x00");
    let text = OutboxMapper::message_content(&b);
    assert!(String::from_utf8_lossy(&text).contains("ff00"));
    assert_eq!(
        OutboxMapper::message_id(&msg(r#"{"id":"x","junk":1}"#)).as_deref(),
        Some(&b"x"[..])
    );
}

#[test]
fn under_a_cloudevents_envelope_message_headers_become_extensions_and_trace_context() {
    use crate::envelope::{Envelope, EnvelopeMode};
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let content = format!(
        r#"{{"aggregatetype":"Order","aggregateid":"42","type":"OrderCreated","payload":{{"n":1}},
        "headers":{{"tenant":"t1","traceparent":"{parent}","Not-An-Attribute":"kept"}}}}"#
    );
    let cfg = MappingConfig {
        type_column: Some("type".into()),
        ..MappingConfig::default()
    };
    let mut m = mapper(cfg.clone()).with_envelope(Envelope::new(
        EnvelopeMode::CloudeventsBinary,
        "/outbox-relay/app/outbox_events",
    ));
    let r = m.map_message(&msg(&content), &txn()).unwrap();
    assert_eq!(header(&r, "ce_tenant"), Some(&b"t1"[..]));
    assert_eq!(
        header(&r, "tenant"),
        None,
        "the extension replaces the header"
    );
    assert_eq!(header(&r, "traceparent"), Some(parent.as_bytes()));
    assert_eq!(header(&r, "ce_traceparent"), None);
    assert_eq!(header(&r, "Not-An-Attribute"), Some(&b"kept"[..]));
    assert_eq!(header(&r, "ce_type"), Some(&b"OrderCreated"[..]));

    let mut m = mapper(cfg).with_envelope(Envelope::new(
        EnvelopeMode::CloudeventsStructured,
        "/outbox-relay/app/outbox_events",
    ));
    let r = m.map_message(&msg(&content), &txn()).unwrap();
    let event: serde_json::Value = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
    assert_eq!(event["tenant"], "t1");
    assert_eq!(event["traceparent"], parent);
    assert_eq!(event["data"], serde_json::json!({"n": 1}));
    assert_eq!(header(&r, "tenant"), None);
}
