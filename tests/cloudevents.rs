//! CloudEvents envelope and trace context, end to end: the relay binary against
//! a real PostgreSQL and tansu. Every record is compared field by field with
//! what the row and its transaction say, and read back with the CloudEvents
//! SDK (`cloudevents-sdk`, its generic binary/structured readers over the
//! record's headers and value, as the Kafka protocol binding describes them).
//!
//! The default mode (`none`) is compared whole (key, value, every header in
//! order) with the records of the relay before envelopes existed.

mod harness;

use cloudevents::event::{AttributeValue, Data, ExtensionValue};
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, Encoding, Error as CeError, MessageAttributeValue,
    MessageDeserializer, Result as CeResult, StructuredDeserializer, StructuredSerializer,
};
use cloudevents::{AttributesReader, Event};

use harness::outbox::DEADLINE;
use harness::traced::{check_commit_lsn, consume_all, env_on, env_with, insert, RowSpec, Sent};
use harness::{Consumed, PgVersion};

use harness::traced::{INVALID_PARENT, VALID_PARENT};

fn h(name: &str, value: impl AsRef<[u8]>) -> (String, Vec<u8>) {
    (name.to_string(), value.as_ref().to_vec())
}

mod default_mode_is_byte_identical_to_records_without_envelopes {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg15() {
        super::default_mode_is_byte_identical(super::PgVersion::V15).await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg17() {
        super::default_mode_is_byte_identical(super::PgVersion::V17).await;
    }
}

async fn default_mode_is_byte_identical(version: PgVersion) {
    let env = env_on(version, "").await;
    let client = env.client().await;
    // Once with no envelope flag at all, once with `none` spelled out (each
    // round on topics of its own).
    for (extra, aggs) in [
        (&[][..], ["Order", "Customer"]),
        (&["--envelope", "none"][..], ["Invoice", "Shipment"]),
    ] {
        let mut relay = harness::RelayProcess::spawn(
            &env.args(extra),
            &[("RUST_LOG", "info,outbox_relay=debug")],
        );
        env.wait_streaming(&mut relay).await;
        let sent = insert(
            &client,
            &[
                (
                    aggs[0],
                    r#"{"total": 12.5, "name": "Zoë ✓"}"#,
                    None,
                    None,
                    None,
                ),
                (aggs[0], r#"[1, "two", null]"#, None, None, None),
                (aggs[1], r#""just a string""#, None, None, None),
            ],
            false,
        )
        .await;
        let records = consume_all(&env, &sent, |c| c.header_str("id").unwrap().to_string()).await;
        for (s, c) in records {
            // The record as the relay made it before envelopes and trace
            // columns existed: key, value, and exactly these headers in order.
            let expected = Consumed {
                topic: format!("outbox.event.{}", s.aggregatetype),
                partition: c.partition,
                offset: c.offset,
                key: Some(s.aggregateid.clone().into_bytes()),
                payload: Some(s.payload.clone()),
                headers: vec![
                    h("id", &s.id),
                    h("type", &s.event_type),
                    h(
                        "outbox-relay-commit-lsn",
                        check_commit_lsn(s, c.header("outbox-relay-commit-lsn").unwrap()),
                    ),
                    h("outbox-relay-xid", &s.xid),
                    h("outbox-relay-commit-time", &s.commit_time),
                ],
                timestamp: c.timestamp,
            };
            assert_eq!(c, expected);
        }
        relay.sigterm();
        relay.wait_exit(DEADLINE).await.expect("relay stops");
    }
}

/// The columns the envelope tests add: an extension attribute and the W3C
/// trace context.
const TRACED_COLUMNS: &str =
    "ADD COLUMN tenant text, ADD COLUMN traceparent text, ADD COLUMN tracestate text";

/// Rows with and without tenant, valid and invalid trace parents.
fn traced_rows() -> Vec<RowSpec<'static>> {
    vec![
        (
            "Order",
            r#"{"total": 12.5, "name": "Zoë ✓"}"#,
            Some("acme"),
            Some(VALID_PARENT),
            Some("vendor=x,other=y"),
        ),
        (
            "Order",
            r#"[1, "two", null]"#,
            None,
            Some(INVALID_PARENT),
            None,
        ),
        (
            "Customer",
            r#"{"a": {"b": "c\"q"}}"#,
            Some("globex"),
            None,
            None,
        ),
        (
            "Customer",
            "42",
            Some("initech"),
            Some("not a traceparent at all"),
            Some("x=1"),
        ),
    ]
}

const SOURCE: &str = "/outbox-relay/postgres/public.outbox_events";

/// The attributes every record must carry, checked on the SDK's event.
fn check_event(s: &Sent, event: &Event) {
    assert_eq!(event.specversion().as_str(), "1.0");
    assert_eq!(event.id(), s.id);
    assert_eq!(event.source().as_str(), SOURCE);
    assert_eq!(event.ty(), s.event_type);
    assert_eq!(event.subject(), Some(s.aggregateid.as_str()));
    let time = event
        .time()
        .expect("time")
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    assert_eq!(time, s.commit_time);
    assert_eq!(event.datacontenttype(), Some("application/json"));
    match &s.tenant {
        Some(t) => assert_eq!(
            event.extension("tenant"),
            Some(&ExtensionValue::String(t.clone()))
        ),
        None => assert_eq!(event.extension("tenant"), None),
    }
    let payload: serde_json::Value = serde_json::from_slice(&s.payload).unwrap();
    let data = match event.data().expect("data") {
        Data::Json(v) => v.clone(),
        Data::Binary(b) => serde_json::from_slice(b).unwrap(),
        Data::String(t) => serde_json::from_str(t).unwrap(),
    };
    assert_eq!(data, payload, "data of {}", s.id);
    // Every attribute the SDK saw is one of ours.
    for (name, value) in event.iter_attributes() {
        assert!(
            matches!(
                name,
                "specversion" | "id" | "source" | "type" | "time" | "subject" | "datacontenttype"
            ),
            "unexpected attribute {name} = {value}"
        );
        let _: &AttributeValue = &value;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_records_follow_the_kafka_binding() {
    let env = env_with(TRACED_COLUMNS).await;
    let client = env.client().await;
    let mut relay = harness::RelayProcess::spawn(
        &env.args(&[
            "--envelope",
            "cloudevents-binary",
            "--header-column",
            "tenant",
        ]),
        &[("RUST_LOG", "info,outbox_relay=debug")],
    );
    env.wait_streaming(&mut relay).await;
    let sent = insert(&client, &traced_rows(), true).await;
    let records = consume_all(&env, &sent, |c| c.header_str("ce_id").unwrap().to_string()).await;
    for (s, c) in records {
        let mut headers = vec![
            h("ce_specversion", "1.0"),
            h("ce_id", &s.id),
            h("ce_source", SOURCE),
            h("ce_type", &s.event_type),
            h("ce_time", &s.commit_time),
            h("ce_subject", &s.aggregateid),
            h("content-type", "application/json"),
        ];
        if let Some(t) = &s.tenant {
            headers.push(h("ce_tenant", t));
        }
        headers.push(h(
            "outbox-relay-commit-lsn",
            check_commit_lsn(s, c.header("outbox-relay-commit-lsn").unwrap()),
        ));
        headers.push(h("outbox-relay-xid", &s.xid));
        headers.push(h("outbox-relay-commit-time", &s.commit_time));
        // Carried byte for byte, valid W3C or not.
        if let Some(p) = &s.traceparent {
            headers.push(h("traceparent", p));
        }
        if let Some(t) = &s.tracestate {
            headers.push(h("tracestate", t));
        }
        assert_eq!(c.headers, headers, "headers of {}", s.id);
        assert_eq!(
            c.key.as_deref(),
            Some(s.aggregateid.as_bytes()),
            "key: the partitioning key"
        );
        assert_eq!(
            c.payload.as_deref(),
            Some(&s.payload[..]),
            "value: the payload itself"
        );

        let reader = KafkaRecord::of(&c);
        assert_eq!(reader.encoding(), Encoding::BINARY);
        let event = MessageDeserializer::into_event(reader).expect("the SDK reads the record");
        check_event(s, &event);
    }
    assert!(relay.is_running(), "relay log:\n{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_records_are_cloudevents_json() {
    let env = env_with(TRACED_COLUMNS).await;
    let client = env.client().await;
    let mut relay = harness::RelayProcess::spawn(
        &env.args(&[
            "--envelope",
            "cloudevents-structured",
            "--header-column",
            "tenant",
            "--ce-source",
            SOURCE,
        ]),
        &[("RUST_LOG", "info,outbox_relay=debug")],
    );
    env.wait_streaming(&mut relay).await;
    let sent = insert(&client, &traced_rows(), true).await;
    let records = consume_all(&env, &sent, |c| {
        let v: serde_json::Value = serde_json::from_slice(c.payload.as_deref().unwrap()).unwrap();
        v["id"].as_str().unwrap().to_string()
    })
    .await;
    for (s, c) in records {
        let mut headers = vec![
            h(
                "content-type",
                "application/cloudevents+json; charset=UTF-8",
            ),
            h(
                "outbox-relay-commit-lsn",
                check_commit_lsn(s, c.header("outbox-relay-commit-lsn").unwrap()),
            ),
            h("outbox-relay-xid", &s.xid),
            h("outbox-relay-commit-time", &s.commit_time),
        ];
        if let Some(p) = &s.traceparent {
            headers.push(h("traceparent", p));
        }
        if let Some(t) = &s.tracestate {
            headers.push(h("tracestate", t));
        }
        assert_eq!(c.headers, headers, "headers of {}", s.id);
        assert_eq!(c.key.as_deref(), Some(s.aggregateid.as_bytes()));

        // The value, member by member.
        let v: serde_json::Value = serde_json::from_slice(c.payload.as_deref().unwrap()).unwrap();
        let mut expected = serde_json::json!({
            "specversion": "1.0",
            "id": s.id,
            "source": SOURCE,
            "type": s.event_type,
            "time": s.commit_time,
            "subject": s.aggregateid,
            "datacontenttype": "application/json",
            "data": serde_json::from_slice::<serde_json::Value>(&s.payload).unwrap(),
        });
        let obj = expected.as_object_mut().unwrap();
        if let Some(t) = &s.tenant {
            obj.insert("tenant".into(), t.as_str().into());
        }
        // The distributed-tracing extension, also when not valid W3C.
        if let Some(p) = &s.traceparent {
            obj.insert("traceparent".into(), p.as_str().into());
        }
        if let Some(t) = &s.tracestate {
            obj.insert("tracestate".into(), t.as_str().into());
        }
        assert_eq!(v, expected, "value of {}", s.id);

        let reader = KafkaRecord::of(&c);
        assert_eq!(reader.encoding(), Encoding::STRUCTURED);
        let event = MessageDeserializer::into_event(reader).expect("the SDK reads the record");
        check_event(s, &event);
        if let Some(p) = &s.traceparent {
            assert_eq!(
                event.extension("traceparent"),
                Some(&ExtensionValue::String(p.clone()))
            );
        }
    }
    assert!(relay.is_running(), "relay log:\n{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_sends_other_payloads_base64() {
    // A bytea payload (not known to be JSON): data_base64, no datacontenttype.
    let env =
        env_with("ALTER COLUMN payload TYPE bytea USING convert_to(payload::text, 'UTF8')").await;
    let client = env.client().await;
    let mut relay = harness::RelayProcess::spawn(
        &env.args(&["--envelope", "cloudevents-structured"]),
        &[("RUST_LOG", "info,outbox_relay=debug")],
    );
    env.wait_streaming(&mut relay).await;
    let row = client
        .query_one(
            "INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload) \
             VALUES ('Blob', 'b-1', 'BlobStored', '\\x00ff7b41'::bytea) RETURNING id::text",
            &[],
        )
        .await
        .unwrap();
    let id: String = row.get(0);
    let got = env.broker.consume("outbox.event.Blob", 1, DEADLINE).await;
    assert_eq!(got.len(), 1);
    let v: serde_json::Value = serde_json::from_slice(got[0].payload.as_deref().unwrap()).unwrap();
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["data_base64"], "AP97QQ==");
    assert!(
        v.get("data").is_none() && v.get("datacontenttype").is_none(),
        "{v}"
    );
    let event = MessageDeserializer::into_event(KafkaRecord::of(&got[0])).unwrap();
    assert_eq!(
        event.data(),
        Some(&Data::Binary(vec![0x00, 0xff, 0x7b, 0x41]))
    );
    assert_eq!(event.ty(), "BlobStored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_extension_column_is_a_configuration_error_naming_it() {
    let env = env_with("ADD COLUMN saga_id text").await;
    let mut relay = harness::RelayProcess::spawn(
        &env.args(&[
            "--envelope",
            "cloudevents-binary",
            "--header-column",
            "saga_id",
        ]),
        &[],
    );
    let status = relay
        .wait_exit(DEADLINE)
        .await
        .expect("the relay refuses to start");
    assert!(!status.success());
    let log = relay.log();
    assert!(log.contains("\"saga_id\""), "names the column:\n{log}");
    assert!(log.contains("sagaid"), "suggests a name:\n{log}");
}

// ---------------------------------------------------------------------------
// The CloudEvents SDK's generic readers over a Kafka record (headers and
// value), following the Kafka protocol binding. The SDK's own rdkafka binding
// would do the same, but needs rdkafka's `cmake-build` feature: a second
// librdkafka build, and a different one from the relay's.
// ---------------------------------------------------------------------------

const CE_PREFIX: &str = "ce_";

struct KafkaRecord {
    headers: Vec<(String, Vec<u8>)>,
    value: Option<Vec<u8>>,
}

impl KafkaRecord {
    fn of(c: &Consumed) -> KafkaRecord {
        KafkaRecord {
            headers: c.headers.clone(),
            value: c.payload.clone(),
        }
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

fn utf8(v: Vec<u8>) -> CeResult<String> {
    String::from_utf8(v).map_err(|e| CeError::Other {
        source: Box::new(e),
    })
}

impl BinaryDeserializer for KafkaRecord {
    fn deserialize_binary<R: Sized, V: BinarySerializer<R>>(self, mut visitor: V) -> CeResult<R> {
        if self.encoding() != Encoding::BINARY {
            return Err(CeError::WrongEncoding {});
        }
        let version = self.header("ce_specversion").expect("binary mode").to_vec();
        let spec_version = cloudevents::event::SpecVersion::try_from(utf8(version)?.as_str())?;
        let attributes = spec_version.attribute_names();
        visitor = visitor.set_spec_version(spec_version)?;
        for (name, value) in self.headers {
            if name == "content-type" {
                visitor = visitor.set_attribute(
                    "datacontenttype",
                    MessageAttributeValue::String(utf8(value)?),
                )?;
            } else if let Some(attr) = name.strip_prefix(CE_PREFIX) {
                if attr == "specversion" {
                    continue;
                }
                let value = MessageAttributeValue::String(utf8(value)?);
                visitor = if attributes.contains(&attr) {
                    visitor.set_attribute(attr, value)?
                } else {
                    visitor.set_extension(attr, value)?
                };
            }
        }
        match self.value {
            Some(v) => visitor.end_with_data(v),
            None => visitor.end(),
        }
    }
}

impl StructuredDeserializer for KafkaRecord {
    fn deserialize_structured<R: Sized, V: StructuredSerializer<R>>(
        self,
        visitor: V,
    ) -> CeResult<R> {
        if self.encoding() != Encoding::STRUCTURED {
            return Err(CeError::WrongEncoding {});
        }
        visitor.set_structured_event(self.value.unwrap_or_default())
    }
}

impl MessageDeserializer for KafkaRecord {
    fn encoding(&self) -> Encoding {
        let structured = self
            .header("content-type")
            .is_some_and(|v| v.starts_with(b"application/cloudevents+json"));
        match (structured, self.header("ce_specversion")) {
            (true, _) => Encoding::STRUCTURED,
            (false, Some(_)) => Encoding::BINARY,
            _ => Encoding::UNKNOWN,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_survives_kill_9_mid_stream() {
    use harness::outbox::{insert_rows, Expected};
    use std::collections::{HashMap, HashSet};
    let env = env_with("").await;
    let client = env.client().await;
    let args = env.args(&["--envelope", "cloudevents-structured"]);
    let mut relay = harness::RelayProcess::spawn(&args, &[]);
    env.wait_streaming(&mut relay).await;
    // A writer commits while the relay is killed and restarted.
    let url = env.pg.url();
    let writer = tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        // Paced, so that the kill lands while rows are still coming.
        let mut seq = 0;
        for _ in 0..60 {
            seq = insert_rows(&client, seq, 10, 8).await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        seq
    });
    harness::wait_until(DEADLINE, "some records arrived", || async {
        !env.broker
            .consume_for("outbox.event.Order", std::time::Duration::from_millis(300))
            .await
            .is_empty()
    })
    .await;
    relay.kill9();
    assert!(!writer.is_finished(), "killed while the writer commits");
    let mut relay = harness::RelayProcess::spawn(&args, &[]);
    env.wait_streaming(&mut relay).await;
    writer.await.unwrap();
    let expected = Expected::read(&client).await;
    let rows: HashMap<&str, _> = expected.rows.iter().map(|r| (r.id.as_str(), r)).collect();
    // Every row arrives at least once, each copy a whole CloudEvent.
    let mut seen = HashSet::new();
    for (topic, n) in expected.per_topic() {
        let mut want = n;
        loop {
            let got = env.broker.consume(&topic, want, DEADLINE).await;
            let mut ids = HashSet::new();
            for c in &got {
                let event = MessageDeserializer::into_event(KafkaRecord::of(c))
                    .expect("every record is a CloudEvent");
                let row = rows
                    .get(event.id())
                    .unwrap_or_else(|| panic!("unknown id {}", event.id()));
                assert_eq!(event.ty(), row.event_type);
                assert_eq!(event.subject(), Some(row.aggregateid.as_str()));
                assert_eq!(c.key.as_deref(), Some(row.aggregateid.as_bytes()));
                let Some(Data::Json(data)) = event.data() else {
                    panic!("JSON data in {c:?}");
                };
                let payload: serde_json::Value = serde_json::from_str(&row.payload).unwrap();
                assert_eq!(data, &payload);
                ids.insert(event.id().to_string());
            }
            if ids.len() >= n || got.len() < want {
                assert_eq!(ids.len(), n, "every row of {topic} arrived");
                seen.extend(ids);
                break;
            }
            want = got.len() + (n - ids.len());
        }
    }
    assert_eq!(seen.len(), expected.rows.len());
    assert!(relay.is_running(), "relay log:\n{}", relay.log());
}
