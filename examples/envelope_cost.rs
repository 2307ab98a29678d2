//! What the envelope and the span hooks cost per record: a timed loop over the
//! mapper and the two span hooks of the relay loop (`trace::parent_of` when a
//! record is produced, `trace::spans()` when it is acknowledged). Not a test:
//! a measurement, run by hand on a quiet machine.
//!
//! ```text
//! cargo run --release --example envelope_cost
//! ```
//!
//! Spans "on" export to a port where nothing listens (127.0.0.1:9): the
//! batch processor drops what it cannot send, so the loop measures the
//! relay's own cost of making each span.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use outbox_relay::config::{MappingConfig, TableName};
use outbox_relay::envelope::{Envelope, EnvelopeMode};
use outbox_relay::kafka::{DeliveryToken, RecordPosition};
use outbox_relay::outbox::{Mapped, OutboxMapper, OutboxRecord, TxnInfo};
use outbox_relay::pgoutput::{Column, Insert, Relation, RelationColumn, TupleData};
use outbox_relay::{trace, Lsn};

const N: u32 = 1_000_000;
const ROUNDS: usize = 5;

fn relation() -> Relation {
    let cols = [
        ("id", 2950),
        ("aggregatetype", 25),
        ("aggregateid", 25),
        ("type", 25),
        ("payload", 3802),
        ("tenant", 25),
        ("traceparent", 25),
    ];
    Relation {
        xid: None,
        oid: 16384,
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

fn row() -> Insert {
    let t = |s: &str| Column::Text(Bytes::copy_from_slice(s.as_bytes()));
    Insert {
        xid: None,
        relation_oid: 16384,
        tuple: TupleData {
            columns: vec![
                t("9f1c2d4e-0000-4000-8000-000000000001"),
                t("Order"),
                t("order-42"),
                t("OrderCreated"),
                t(r#"{"orderId": 42, "total": 12.5, "items": [{"sku": "A-1", "qty": 2}]}"#),
                t("acme"),
                t("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ],
        },
    }
}

const TXN: TxnInfo = TxnInfo {
    xid: 747,
    commit_lsn: Lsn(0x16_B374_D848),
    commit_time: 849_000_000_000_000,
};

/// Best of `ROUNDS` rounds of `N` calls, in ns per call.
fn best(mut f: impl FnMut()) -> f64 {
    (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..N {
                f();
            }
            start.elapsed()
        })
        .min()
        .map(|d: Duration| d.as_nanos() as f64 / N as f64)
        .unwrap()
}

fn mapper(mode: EnvelopeMode) -> OutboxMapper {
    let cfg = MappingConfig {
        header_columns: vec!["tenant".into()],
        envelope: mode,
        ..MappingConfig::default()
    };
    let mut m = OutboxMapper::new(cfg, TableName::default()).with_envelope(Envelope::new(
        mode,
        "/outbox-relay/app/public.outbox_events",
    ));
    m.on_relation(&relation()).unwrap();
    m
}

fn record() -> OutboxRecord {
    match mapper(EnvelopeMode::None).map_insert(&row(), &TXN).unwrap() {
        Mapped::Record(r) => r,
        other => panic!("{other:?}"),
    }
}

/// The span hooks of one record's life in the relay loop.
fn hooks(record: &OutboxRecord, token: &mut DeliveryToken, now: SystemTime) {
    token.trace = trace::parent_of(black_box(record));
    if let Some(spans) = trace::spans() {
        spans.acknowledged(token, now);
    }
    black_box(&token);
}

fn main() {
    let ins = row();
    println!("per record, best of {ROUNDS} x {N} (ns):");
    for mode in [
        EnvelopeMode::None,
        EnvelopeMode::CloudeventsBinary,
        EnvelopeMode::CloudeventsStructured,
    ] {
        let mut m = mapper(mode);
        let ns = best(|| {
            black_box(m.map_insert(black_box(&ins), &TXN).unwrap());
        });
        println!("  map_insert, envelope {mode:?}: {ns:.0}");
    }

    let record = record();
    let mut tracker = outbox_relay::ack::AckTracker::new(Default::default());
    let mut token = DeliveryToken {
        generation: 1,
        txn: tracker.begin(0).unwrap(),
        bytes: record.size(),
        commit_time: TXN.commit_time,
        position: RecordPosition::default(),
        trace: None,
        handed: None,
    };
    let now = SystemTime::now();
    // The same loop without the hooks: what the loop itself costs.
    let base = best(|| {
        token.trace = black_box(None);
        black_box(&token);
    });
    println!("  loop without the span hooks (baseline): {base:.1}");
    let off = best(|| hooks(&record, &mut token, now));
    println!("  span hooks, --otlp-endpoint unset: {off:.1}");
    trace::init("http://127.0.0.1:9").unwrap();
    let on = best(|| hooks(&record, &mut token, now));
    println!("  span hooks, --otlp-endpoint set (parse traceparent, make and end a span): {on:.0}");
    trace::shutdown();
}
