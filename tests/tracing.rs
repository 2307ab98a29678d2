//! Spans from the relay (`--otlp-endpoint`), end to end: the relay binary
//! against a real PostgreSQL and tansu, exporting to an OTLP/HTTP receiver in
//! the test (axum, decoding the protobuf with `opentelemetry-proto`). One span
//! per record, from the commit time to the broker's acknowledgement, a child
//! of the row's valid W3C `traceparent`; an invalid one is carried in the
//! record but never becomes a parent.

mod harness;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use harness::outbox::DEADLINE;
use harness::traced::{consume_all, env_with, insert, Sent, INVALID_PARENT, VALID_PARENT};
use harness::{wait_for, RelayProcess};

/// A valid parent whose flags say "not sampled".
const UNSAMPLED_PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";

type Received = Arc<Mutex<Vec<(Span, String)>>>;

/// An OTLP/HTTP traces receiver on 127.0.0.1: every span it is sent, with
/// the `service.name` of its resource.
async fn receiver() -> (String, Received, tokio::task::JoinHandle<()>) {
    async fn traces(State(spans): State<Received>, body: Bytes) -> StatusCode {
        let Ok(req) = ExportTraceServiceRequest::decode(body) else {
            return StatusCode::BAD_REQUEST;
        };
        let mut out = spans.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    out.push((span, service.clone()));
                }
            }
        }
        StatusCode::OK
    }
    let received: Received = Arc::default();
    let app = axum::Router::new()
        .route("/v1/traces", post(traces))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, received, task)
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_span_per_record_from_commit_to_ack_under_the_rows_traceparent() {
    let (url, received, server) = receiver().await;
    let env =
        env_with("ADD COLUMN tenant text, ADD COLUMN traceparent text, ADD COLUMN tracestate text")
            .await;
    let client = env.client().await;
    let mut relay = RelayProcess::spawn(
        &env.args(&["--otlp-endpoint", &url]),
        &[("RUST_LOG", "info,outbox_relay=debug")],
    );
    env.wait_streaming(&mut relay).await;
    let sent = insert(
        &client,
        &[
            (
                "Order",
                r#"{"n": 1}"#,
                None,
                Some(VALID_PARENT),
                Some("vendor=x"),
            ),
            ("Order", r#"{"n": 2}"#, None, Some(INVALID_PARENT), None),
            ("Customer", r#"{"n": 3}"#, None, None, None),
            (
                "Customer",
                r#"{"n": 4}"#,
                None,
                Some(UNSAMPLED_PARENT),
                None,
            ),
        ],
        true,
    )
    .await;
    // Every record arrives, with its trace context carried unchanged.
    let records = consume_all(&env, &sent, |c| c.header_str("id").unwrap().to_string()).await;
    let consumed_at = SystemTime::now();
    for (s, c) in &records {
        assert_eq!(c.header_str("traceparent"), s.traceparent.as_deref());
        assert_eq!(c.header_str("tracestate"), s.tracestate.as_deref());
    }
    // The spans of the three sampled records (the unsampled parent's flag is
    // respected: no span for it).
    let spans = wait_for(DEADLINE, "three spans at the receiver", || {
        let received = received.clone();
        async move {
            let r = received.lock().unwrap();
            (r.len() >= 3).then(|| r.clone())
        }
    })
    .await;
    let commit_lsn_of = |s: &Sent| -> String {
        let (_, c) = records.iter().find(|(r, _)| r.id == s.id).unwrap();
        c.header_str("outbox-relay-commit-lsn").unwrap().to_string()
    };
    let span_of = |s: &Sent| -> Option<&Span> {
        let lsn = commit_lsn_of(s);
        spans
            .iter()
            .map(|(span, _)| span)
            .find(|span| attr(span, "outbox_relay.commit_lsn").as_deref() == Some(&lsn))
    };
    for (span, service) in &spans {
        assert_eq!(service, "outbox-relay");
        assert_eq!(span.name, "outbox-relay publish");
        assert_eq!(attr(span, "messaging.system").as_deref(), Some("kafka"));
    }
    let consumed_ns = consumed_at.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    for s in &sent[..3] {
        let span = span_of(s).unwrap_or_else(|| panic!("no span for {s:?}: {spans:?}"));
        // From the commit time (to the microsecond) to the acknowledgement,
        // which came before the test read the record back.
        assert_eq!(
            span.start_time_unix_nano,
            s.commit_unix_micros as u64 * 1000,
            "start = commit time"
        );
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
        assert!(
            span.end_time_unix_nano <= consumed_ns,
            "acknowledged before it was consumed"
        );
        assert_eq!(
            attr(span, "outbox_relay.record_ordinal").as_deref(),
            Some("0")
        );
    }
    // The valid parent: same trace, its span id as parent.
    let child = span_of(&sent[0]).unwrap();
    assert_eq!(hex(&child.trace_id), VALID_PARENT[3..35]);
    assert_eq!(hex(&child.parent_span_id), VALID_PARENT[36..52]);
    // Invalid and absent: a trace of its own, no parent.
    for s in &sent[1..3] {
        let root = span_of(s).unwrap();
        assert!(root.parent_span_id.is_empty(), "{root:?}");
        assert_ne!(hex(&root.trace_id), VALID_PARENT[3..35]);
        assert_ne!(hex(&root.trace_id), INVALID_PARENT[3..35].to_lowercase());
    }
    assert!(span_of(&sent[3]).is_none(), "unsampled parent: no span");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        received.lock().unwrap().len(),
        3,
        "one span per sampled record, no more"
    );
    assert!(relay.is_running(), "relay log:\n{}", relay.log());
    relay.sigterm();
    relay.wait_exit(DEADLINE).await.expect("relay stops");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_the_last_records_are_exported_on_sigterm() {
    let (url, received, server) = receiver().await;
    let env =
        env_with("ADD COLUMN tenant text, ADD COLUMN traceparent text, ADD COLUMN tracestate text")
            .await;
    let client = env.client().await;
    let mut relay = RelayProcess::spawn(
        &env.args(&["--otlp-endpoint", &url]),
        &[("RUST_LOG", "info,outbox_relay=debug")],
    );
    env.wait_streaming(&mut relay).await;
    let sent = insert(
        &client,
        &[("Order", "{}", None, Some(VALID_PARENT), None)],
        true,
    )
    .await;
    consume_all(&env, &sent, |c| c.header_str("id").unwrap().to_string()).await;
    // Stopped at once, before the export interval comes round: the span
    // still goes out (the exporter is flushed at exit).
    relay.sigterm();
    let status = relay.wait_exit(DEADLINE).await.expect("relay stops");
    assert!(status.success(), "relay log:\n{}", relay.log());
    let spans = received.lock().unwrap().clone();
    assert_eq!(spans.len(), 1, "{spans:?}\nrelay log:\n{}", relay.log());
    assert_eq!(hex(&spans[0].0.trace_id), VALID_PARENT[3..35]);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_never_stops_the_stream() {
    // Nothing listens on this port: exports fail, records flow.
    let port = harness::free_port();
    let env =
        env_with("ADD COLUMN tenant text, ADD COLUMN traceparent text, ADD COLUMN tracestate text")
            .await;
    let client = env.client().await;
    let mut relay = RelayProcess::spawn(
        &env.args(&["--otlp-endpoint", &format!("http://127.0.0.1:{port}")]),
        &[("RUST_LOG", "info,outbox_relay=debug")],
    );
    env.wait_streaming(&mut relay).await;
    let rows: Vec<_> = (0..20)
        .map(|_| ("Order", "{}", None, Some(VALID_PARENT), None))
        .collect();
    let sent = insert(&client, &rows, true).await;
    consume_all(&env, &sent, |c| c.header_str("id").unwrap().to_string()).await;
    assert!(relay.is_running(), "relay log:\n{}", relay.log());
    relay.sigterm();
    let status = relay
        .wait_exit(DEADLINE)
        .await
        .expect("relay stops despite the collector");
    assert!(status.success(), "relay log:\n{}", relay.log());
}
