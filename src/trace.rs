//! W3C trace context through the relay, and the relay's own spans.
//!
//! * The outbox's trace columns (default: `traceparent` and `tracestate`, when
//!   the table has them) are carried into every record as the headers of the
//!   same names, byte for byte, valid or not (the mapper does that).
//! * With `--otlp-endpoint`, the relay adds one span per record, from the
//!   transaction's commit time to the broker's acknowledgement, as a child of
//!   the record's `traceparent` when that is valid W3C ([`TraceParent::parse`]);
//!   a `traceparent` that is not valid is passed on unchanged but never
//!   becomes a parent (the span then starts a trace of its own). Spans go to
//!   an OTLP/HTTP collector (protobuf) through the `opentelemetry` SDK's batch
//!   processor: a bounded queue on its own thread, so a slow or absent
//!   collector costs spans, never the stream.
//! * Off (the default), the hot path pays two atomic loads per record (produce, ack)
//!   ([`spans`] is `None`): no header lookup, no clock, no allocation.
//!
//! The sampling decision follows the parent (`ParentBased(AlwaysOn)`): a row
//! whose `traceparent` says "not sampled" gets no exported span.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};

use crate::config::{Config, Problem};
use crate::kafka::DeliveryToken;
use crate::lsn::pg_micros_to_system_time;
use crate::outbox::OutboxRecord;

/// Header (and CloudEvents extension attribute) of the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// Header (and CloudEvents extension attribute) of the W3C trace state.
pub const TRACESTATE: &str = "tracestate";
/// Name of the relay's span for one record.
pub const SPAN_NAME: &str = "outbox-relay publish";
/// How often the batch processor exports.
const EXPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Spans waiting for export, at most; more are dropped (counted by the SDK).
const MAX_QUEUED_SPANS: usize = 8192;
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// A valid W3C `traceparent`: the parent of the record's span. Copy, so it
/// rides in the record's [`DeliveryToken`] to the acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// The W3C Trace Context (level 1) rule: `version-traceid-parentid-flags`,
    /// lower-case hex of 2, 32, 16 and 2 digits; version `ff` is invalid;
    /// trace id and parent id not all zeros; version `00` has exactly these
    /// four fields, a later version may add fields after a `-`.
    ///
    /// Written out rather than taken from `opentelemetry_sdk`'s
    /// `TraceContextPropagator`: that one accepts ids of any length
    /// (`00-1-2-01`), which the W3C rule does not.
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
            if s.len() != 2 * N {
                return None;
            }
            let nib = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            let mut out = [0u8; N];
            for (i, pair) in s.chunks_exact(2).enumerate() {
                out[i] = (nib(pair[0])? << 4) | nib(pair[1])?;
            }
            Some(out)
        }
        if value.len() < 55 {
            return None;
        }
        let (head, rest) = value.split_at(55);
        let [version] = hex::<1>(&head[0..2])?;
        if version == 0xff || head[2] != b'-' || head[35] != b'-' || head[52] != b'-' {
            return None;
        }
        match (version, rest.first()) {
            (0, None) => {}
            (0, Some(_)) => return None,
            (_, None | Some(b'-')) => {}
            (_, Some(_)) => return None,
        }
        let trace_id = hex::<16>(&head[3..35])?;
        let parent_id = hex::<8>(&head[36..52])?;
        let [flags] = hex::<1>(&head[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The span context a span is started under.
    fn context(&self) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.parent_id),
            TraceFlags::new(self.flags) & TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }
}

/// The relay's span exporter, set once at start when `--otlp-endpoint` is given.
pub struct Spans {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

static SPANS: OnceLock<Spans> = OnceLock::new();

/// The exporter, when spans are on.
#[inline]
pub fn spans() -> Option<&'static Spans> {
    SPANS.get()
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP span exporter for {endpoint}: {reason}; check --otlp-endpoint (http://host:4318)")]
pub struct SpansError {
    endpoint: String,
    reason: String,
}

/// `http://host:4318` → `http://host:4318/v1/traces`; a URL with a path is
/// taken as the full traces URL.
pub fn traces_url(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(u) if u.path() == "/" || u.path().is_empty() => {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        }
        _ => endpoint.to_string(),
    }
}

/// Turn spans on (process-wide), exporting to `endpoint`. Call once, inside
/// the runtime or outside it; a second call is an error.
pub fn init(endpoint: &str) -> Result<(), SpansError> {
    let err = |reason: String| SpansError {
        endpoint: endpoint.to_string(),
        reason,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(traces_url(endpoint))
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(EXPORT_INTERVAL)
                .with_max_queue_size(MAX_QUEUED_SPANS)
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("outbox-relay")
                .build(),
        )
        .build();
    let tracer = provider.tracer("outbox-relay");
    SPANS
        .set(Spans { provider, tracer })
        .map_err(|_| err("spans are already set up".into()))
}

/// Export what is queued and stop (at exit). Nothing when spans are off.
pub fn shutdown() {
    if let Some(s) = spans() {
        if let Err(e) = s.provider.shutdown() {
            tracing::warn!(error = %e, "could not export the last spans");
        }
    }
}

/// The parent a record's span will have: its valid `traceparent` header.
/// `None` without a call to the header list when spans are off.
#[inline]
pub fn parent_of(record: &OutboxRecord) -> Option<TraceParent> {
    spans()?;
    let (_, v) = record.headers.iter().find(|(k, _)| &**k == TRACEPARENT)?;
    TraceParent::parse(v)
}

impl Spans {
    /// The span of one record, acknowledged by the broker at `acked`.
    pub fn acknowledged(&self, token: &DeliveryToken, acked: SystemTime) {
        use opentelemetry::trace::Span as _;
        let parent = token.trace.map(|p| p.context()).unwrap_or_default();
        let mut span = self
            .tracer
            .span_builder(SPAN_NAME)
            .with_kind(SpanKind::Producer)
            .with_start_time(pg_micros_to_system_time(token.commit_time))
            .with_attributes([
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new(
                    "outbox_relay.commit_lsn",
                    token.position.commit_lsn.to_string(),
                ),
                KeyValue::new("outbox_relay.record_ordinal", token.position.ordinal as i64),
            ])
            .start_with_context(&self.tracer, &parent);
        span.end_with_timestamp(acked);
    }
}

/// Start-time checks of `relay.otlp_endpoint`.
pub fn validate(cfg: &Config, out: &mut Vec<Problem>) {
    let Some(endpoint) = &cfg.relay.otlp_endpoint else {
        return;
    };
    let fix = "set relay.otlp_endpoint (--otlp-endpoint, OUTBOX_RELAY_OTLP_ENDPOINT) to the collector's OTLP/HTTP address, e.g. http://127.0.0.1:4318";
    match url::Url::parse(endpoint) {
        Ok(u) if u.scheme() == "http" && u.host().is_some() => {}
        Ok(u) if u.scheme() == "https" => out.push(Problem::new(
            format!("relay.otlp_endpoint {endpoint:?} uses https, which the relay's span exporter does not speak"),
            "run a collector beside the relay and point --otlp-endpoint at it over http://",
        )),
        _ => out.push(Problem::new(
            format!("relay.otlp_endpoint {endpoint:?} is not an http:// URL"),
            fix,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn valid_traceparents_parse() {
        let p = TraceParent::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(p.trace_id[0], 0x0a);
        assert_eq!(p.parent_id[7], 0x31);
        assert_eq!(p.flags, 1);
        // A later version may carry more fields.
        assert!(TraceParent::parse(format!("01{}-what-ever", &GOOD[2..]).as_bytes()).is_some());
        assert!(TraceParent::parse(format!("01{}", &GOOD[2..]).as_bytes()).is_some());
    }

    #[test]
    fn invalid_traceparents_are_not_parents() {
        let bad = [
            "",
            "00-1-2-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-B7AD6B7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
            " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ];
        for b in bad {
            assert_eq!(TraceParent::parse(b.as_bytes()), None, "{b:?}");
        }
        // Non-UTF-8 bytes never panic.
        let mut raw = GOOD.as_bytes().to_vec();
        raw[10] = 0xff;
        assert_eq!(TraceParent::parse(&raw), None);
    }

    #[test]
    fn endpoint_urls() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://127.0.0.1:4318/"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/custom/path"),
            "http://c:4318/custom/path"
        );
        let mut cfg = Config::default();
        for (endpoint, ok) in [
            ("http://127.0.0.1:4318", true),
            ("https://collector:4318", false),
            ("collector:4318", false),
        ] {
            cfg.relay.otlp_endpoint = Some(endpoint.into());
            let mut out = Vec::new();
            validate(&cfg, &mut out);
            assert_eq!(out.is_empty(), ok, "{endpoint}: {out:?}");
        }
    }

    #[test]
    fn off_means_no_parent_lookup() {
        // Spans are off in unit tests (nothing calls `init`).
        let record = OutboxRecord {
            topic: "t".into(),
            key: None,
            payload: None,
            headers: vec![(
                TRACEPARENT.into(),
                bytes::Bytes::from_static(GOOD.as_bytes()),
            )],
            id: None,
        };
        assert_eq!(parent_of(&record), None);
    }
}
