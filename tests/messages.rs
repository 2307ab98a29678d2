//! Events without a table: transactional logical decoding messages
//! (`pg_logical_emit_message(true, 'outbox', ...)`, `sql/05_emit.sql`'s
//! `outbox_emit`) relayed beside the outbox table's rows, with the same
//! guarantees: commit order per key, acknowledgement before the slot moves,
//! poison handling, stable ids across a relay kill.

mod harness;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use harness::outbox::{Env, DEADLINE};
use harness::{
    current_wal_lsn, lsn_to_u64, pg_versions, wait_until, Consumed, PgVersion, RelayProcess,
};

const EMIT_SQL: &str = include_str!("../sql/05_emit.sql");
const AGGREGATES: [&str; 3] = ["Order", "Customer", "Payment"];

/// One event the test wrote, as the record must look.
#[derive(Debug, Clone)]
struct Event {
    seq: u64,
    /// Index of its transaction (events of one transaction share a commit LSN).
    txn: usize,
    topic: String,
    key: String,
    /// `None`: derived by the relay from the commit LSN and `msg_lsn`.
    id: Option<String>,
    msg_lsn: Option<u64>,
    event_type: String,
    payload: Vec<u8>,
    /// Extra headers (messages only), in order.
    headers: Vec<(String, String)>,
}

/// The documented derivation (README, `outbox::message::derived_id`): RFC 9562
/// version 8 from the commit LSN (first 8 bytes) and the message LSN (last 8).
fn derived_id(commit_lsn: u64, lsn: u64) -> String {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&commit_lsn.to_be_bytes());
    b[8..].copy_from_slice(&lsn.to_be_bytes());
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

async fn setup(env: &Env) -> tokio_postgres::Client {
    let client = env.client().await;
    client.batch_execute(EMIT_SQL).await.expect("05_emit.sql");
    client
}

/// `txns` transactions mixing rows, `outbox_emit` calls (with and without
/// an id) and hand-written messages; returns the events in commit order.
async fn mixed_load(
    client: &mut tokio_postgres::Client,
    first_seq: u64,
    txns: usize,
) -> Vec<Event> {
    let mut seq = first_seq;
    let mut out = Vec::new();
    for t in 0..txns {
        let tx = client.transaction().await.unwrap();
        for _ in 0..(1 + t % 4) {
            let agg = AGGREGATES[(seq % 3) as usize];
            // Few keys, so rows and messages share them.
            let key = format!("{}-{}", agg.to_lowercase(), seq % 2);
            let topic = format!("outbox.event.{agg}");
            let ev = match seq % 5 {
                0 | 4 => {
                    let row = tx
                        .query_one(
                            "INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload) \
                             VALUES ($1, $2, $3, jsonb_build_object('seq', $4::bigint, 'text', 'naïve ☕ \"q\"')) \
                             RETURNING id::text, payload::text",
                            &[&agg, &key, &format!("{agg}Row"), &(seq as i64)],
                        )
                        .await
                        .unwrap();
                    Event {
                        seq,
                        txn: first_seq as usize * 1000 + t,
                        topic,
                        key,
                        id: Some(row.get(0)),
                        msg_lsn: None,
                        event_type: format!("{agg}Row"),
                        payload: row.get::<_, String>(1).into_bytes(),
                        headers: vec![],
                    }
                }
                1 => {
                    // outbox_emit without an id: the relay derives it.
                    let payload = format!(r#"{{"seq": {seq}, "n": 1.50, "list": [1, "two"]}}"#);
                    let row = tx
                        .query_one(
                            "SELECT outbox_emit($1, $2, $3, $4::text::jsonb, \
                             jsonb_build_object('tenant', 't' || $5::text))::text, $4::text::jsonb::text",
                            &[&agg, &key, &format!("{agg}Emitted"), &payload, &seq.to_string()],
                        )
                        .await
                        .unwrap();
                    Event {
                        seq,
                        txn: first_seq as usize * 1000 + t,
                        topic,
                        key,
                        id: None,
                        msg_lsn: Some(lsn_to_u64(&row.get::<_, String>(0))),
                        event_type: format!("{agg}Emitted"),
                        payload: row.get::<_, String>(1).into_bytes(),
                        headers: vec![("tenant".into(), format!("t{seq}"))],
                    }
                }
                2 => {
                    // outbox_emit with an id and a non-object payload.
                    let id = format!("emit-{seq}");
                    let row = tx
                        .query_one(
                            "SELECT outbox_emit($1, $2, $3, '[1, \"two\", null]'::jsonb, '{}', $4)::text",
                            &[&agg, &key, &format!("{agg}Listed"), &id],
                        )
                        .await
                        .unwrap();
                    Event {
                        seq,
                        txn: first_seq as usize * 1000 + t,
                        topic,
                        key,
                        id: Some(id),
                        msg_lsn: Some(lsn_to_u64(&row.get::<_, String>(0))),
                        event_type: format!("{agg}Listed"),
                        payload: br#"[1, "two", null]"#.to_vec(),
                        headers: vec![],
                    }
                }
                _ => {
                    // Written by hand: the payload must arrive byte for byte as
                    // written (spacing, 1.50, escapes), headers in order.
                    let payload =
                        format!(r#"{{ "seq" :{seq},  "n": 1.50, "s": "caf\u00e9 \"q\" ☕" }}"#);
                    let content = format!(
                        r#"{{ "aggregatetype": "{agg}", "aggregateid":"{key}",
                              "type" : "{agg}Raw", "payload" :  {payload} ,
                              "headers": {{"z-first": "1", "a-second": "2"}} }}"#
                    );
                    let row = tx
                        .query_one(
                            "SELECT pg_logical_emit_message(true, 'outbox', $1)::text",
                            &[&content],
                        )
                        .await
                        .unwrap();
                    Event {
                        seq,
                        txn: first_seq as usize * 1000 + t,
                        topic,
                        key,
                        id: None,
                        msg_lsn: Some(lsn_to_u64(&row.get::<_, String>(0))),
                        event_type: format!("{agg}Raw"),
                        payload: payload.into_bytes(),
                        headers: vec![
                            ("z-first".into(), "1".into()),
                            ("a-second".into(), "2".into()),
                        ],
                    }
                }
            };
            out.push(ev);
            seq += 1;
        }
        tx.commit().await.unwrap();
    }
    out
}

/// The event a record is for: by its explicit id, else by its derived id.
fn event_of<'a>(
    c: &Consumed,
    by_id: &HashMap<String, &'a Event>,
    by_lsn: &HashMap<u64, &'a Event>,
) -> &'a Event {
    let id = c.header_str("id").expect("every record has an id header");
    if let Some(e) = by_id.get(id) {
        return e;
    }
    let commit = lsn_to_u64(c.header_str("outbox-relay-commit-lsn").unwrap());
    by_lsn
        .values()
        .find(|e| e.id.is_none() && derived_id(commit, e.msg_lsn.unwrap()) == id)
        .unwrap_or_else(|| panic!("record with unknown id {id}: {c:?}"))
}

/// Every event arrived with every field; per key, first deliveries are in
/// commit order; the events of one transaction share a commit LSN. Returns
/// the records per event (duplicates included), after checking duplicates
/// carry the same id.
fn check(events: &[Event], consumed: &[Consumed]) -> BTreeMap<u64, usize> {
    let by_id: HashMap<String, &Event> = events
        .iter()
        .filter_map(|e| e.id.clone().map(|id| (id, e)))
        .collect();
    let by_lsn: HashMap<u64, &Event> = events
        .iter()
        .filter_map(|e| e.msg_lsn.map(|l| (l, e)))
        .collect();
    let mut sorted: Vec<&Consumed> = consumed.iter().collect();
    sorted.sort_by_key(|c| (c.topic.clone(), c.partition, c.offset));
    let mut copies: BTreeMap<u64, usize> = BTreeMap::new();
    let mut ids: HashMap<u64, String> = HashMap::new();
    let mut last_per_key: HashMap<(String, Vec<u8>), u64> = HashMap::new();
    let mut commit_of_txn: HashMap<usize, String> = HashMap::new();
    for c in sorted {
        let e = event_of(c, &by_id, &by_lsn);
        let id = c.header_str("id").unwrap().to_string();
        assert_eq!(c.topic, e.topic, "topic of {e:?}");
        assert_eq!(c.key.as_deref(), Some(e.key.as_bytes()), "key of {e:?}");
        assert_eq!(
            c.payload.as_deref(),
            Some(&e.payload[..]),
            "payload of {e:?} must be byte-identical: {:?}",
            c.payload.as_deref().map(String::from_utf8_lossy)
        );
        assert_eq!(c.header_str("type"), Some(e.event_type.as_str()));
        assert!(c.header("outbox-relay-xid").is_some());
        assert!(c.header("outbox-relay-commit-time").is_some());
        let commit = c.header_str("outbox-relay-commit-lsn").unwrap().to_string();
        if let Some(expected) = &e.id {
            assert_eq!(&id, expected);
        } else {
            assert_eq!(id, derived_id(lsn_to_u64(&commit), e.msg_lsn.unwrap()));
        }
        // Extra headers come last, in the order written.
        let tail: Vec<(String, String)> = c.headers[c.headers.len() - e.headers.len()..]
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8(v.clone()).unwrap()))
            .collect();
        assert_eq!(tail, e.headers, "extra headers of {e:?}");
        // Rows and messages of one transaction: one commit LSN.
        let prev = commit_of_txn.entry(e.txn).or_insert_with(|| commit.clone());
        assert_eq!(*prev, commit, "transaction {} split across commits", e.txn);
        // Duplicates carry the same id (derived ids included).
        let first = ids.entry(e.seq).or_insert_with(|| id.clone());
        assert_eq!(*first, id, "a duplicate of {e:?} has another id");
        *copies.entry(e.seq).or_insert(0) += 1;
        if copies[&e.seq] > 1 {
            continue;
        }
        let key = (c.topic.clone(), c.key.clone().unwrap_or_default());
        if let Some(prev) = last_per_key.insert(key.clone(), e.seq) {
            assert!(
                prev < e.seq,
                "per-key order broken for {key:?}: {} after {prev}",
                e.seq
            );
        }
    }
    let distinct: HashSet<&String> = commit_of_txn.values().collect();
    assert_eq!(
        distinct.len(),
        commit_of_txn.len(),
        "one commit LSN per transaction"
    );
    let missing: Vec<u64> = events
        .iter()
        .filter(|e| !copies.contains_key(&e.seq))
        .map(|e| e.seq)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} events missing: {missing:?}",
        missing.len(),
        events.len()
    );
    copies
}

/// Read every topic until each event arrived at least once.
async fn consume(env: &Env, events: &[Event]) -> Vec<Consumed> {
    let mut per_topic: BTreeMap<&str, usize> = BTreeMap::new();
    for e in events {
        *per_topic.entry(&e.topic).or_insert(0) += 1;
    }
    let mut all = Vec::new();
    for (topic, n) in per_topic {
        all.extend(env.broker.consume(topic, n, DEADLINE).await);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_and_messages_of_one_transaction_keep_commit_order_and_every_field() {
    for version in pg_versions() {
        let env = Env::new(version).await;
        let mut client = setup(&env).await;
        let mut relay = env.relay();
        env.wait_streaming(&mut relay).await;
        let mut events = mixed_load(&mut client, 0, 40).await;

        // Never published: a rolled-back transaction's message and row,
        // non-transactional messages (twice: one warning), other prefixes.
        let valid = |seq: i64| {
            format!(
                r#"{{"aggregatetype":"Order","aggregateid":"order-0","type":"Never","payload":{{"seq":{seq}}}}}"#
            )
        };
        {
            let tx = client.transaction().await.unwrap();
            tx.execute(
                "SELECT outbox_emit('Order', 'order-0', 'Never', '{\"seq\": -1}')",
                &[],
            )
            .await
            .unwrap();
            tx.execute(
                "INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload) \
                 VALUES ('Order', 'order-0', 'Never', '{\"seq\": -2}')",
                &[],
            )
            .await
            .unwrap();
            tx.rollback().await.unwrap();
        }
        for (transactional, prefix, seq) in [
            (false, "outbox", -3),
            (false, "outbox", -4),
            (true, "outbox-other", -5),
            (true, "audit", -6),
        ] {
            client
                .execute(
                    "SELECT pg_logical_emit_message($1, $2, $3)",
                    &[&transactional, &prefix, &valid(seq)],
                )
                .await
                .unwrap();
        }
        // Events after them, on the same key: once these arrived, the ones
        // before would have too.
        let next = events.last().unwrap().seq + 1;
        events.extend(mixed_load(&mut client, next, 8).await);
        let end = lsn_to_u64(&current_wal_lsn(&client).await);

        let consumed = consume(&env, &events).await;
        let copies = check(&events, &consumed);
        assert!(
            copies.values().all(|&n| n == 1),
            "no duplicates without a fault"
        );
        // Nothing beyond them arrives (read for a while: offsets cannot be trusted).
        let mut total = 0;
        for topic in AGGREGATES.map(|a| format!("outbox.event.{a}")) {
            let all = env.broker.consume_for(&topic, Duration::from_secs(3)).await;
            for c in &all {
                assert_ne!(c.header_str("type"), Some("Never"), "{c:?}");
            }
            total += all.len();
        }
        assert_eq!(
            total,
            events.len(),
            "PostgreSQL {version}: exactly the events"
        );
        // Acknowledged messages move the slot like rows do.
        wait_until(DEADLINE, "the slot passes the last transaction", || async {
            env.confirmed(&client).await >= end
        })
        .await;
        let log = relay.log();
        assert_eq!(
            log.matches("non-transactional logical decoding messages")
                .count(),
            1,
            "one warning per prefix\n{log}"
        );
        assert!(relay.is_running(), "{log}");
        eprintln!(
            "PostgreSQL {version}: {} events ({} messages) in {} records",
            events.len(),
            events.iter().filter(|e| e.msg_lsn.is_some()).count(),
            consumed.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_messages_relays_rows_only_and_peek_shows_messages() {
    let env = Env::new(PgVersion::V15).await;
    let mut client = setup(&env).await;
    // peek before the relay consumes: a bookmark-free look at the live slot.
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE outbox_events WITH (publish = 'insert')",
            env.publication
        ))
        .await
        .unwrap();
    harness::create_logical_slot(&client, &env.slot).await;
    let events = mixed_load(&mut client, 0, 3).await;
    let out = std::process::Command::new(RelayProcess::binary())
        .args([
            "peek",
            "--postgres-url",
            &env.pg.url(),
            "--slot",
            &env.slot,
            "--publication",
            &env.publication,
            "--kafka-brokers",
            &env.broker.bootstrap(),
            "--limit",
            "100",
            "--json",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(shown.len(), events.len(), "{text}");
    for (e, s) in events.iter().zip(&shown) {
        assert_eq!(
            s["payload"].as_str().unwrap().as_bytes(),
            &e.payload[..],
            "{text}"
        );
        assert_eq!(s["topic"], e.topic.as_str());
        assert_eq!(s["key"], e.key.as_str());
        if let Some(id) = &e.id {
            assert_eq!(s["id"], id.as_str());
        }
    }
    let messages = events.iter().filter(|e| e.msg_lsn.is_some()).count();
    assert!(messages >= 2, "the load has messages: {events:?}");

    // --no-messages: rows only.
    let mut relay = RelayProcess::spawn(&env.args(&["--no-messages"]), &[]);
    env.wait_streaming(&mut relay).await;
    let rows: Vec<&Event> = events.iter().filter(|e| e.msg_lsn.is_none()).collect();
    let mut total = 0;
    for topic in AGGREGATES.map(|a| format!("outbox.event.{a}")) {
        let expect = rows.iter().filter(|e| e.topic == topic).count();
        if expect == 0 {
            continue;
        }
        env.broker.consume(&topic, expect, DEADLINE).await;
        let all = env.broker.consume_for(&topic, Duration::from_secs(3)).await;
        for c in &all {
            assert!(
                rows.iter().any(|e| e.id.as_deref() == c.header_str("id")),
                "only rows: {c:?}"
            );
        }
        total += all.len();
    }
    assert_eq!(total, rows.len(), "{}", relay.log());
}

const BAD: &[&str] = &[
    "this is not json",
    r#"{"aggregatetype":"Order","aggregateid":"order-0","type":"T"}"#,
    r#"{"aggregatetype":"Order","aggregateid":42,"type":"T","payload":{}}"#,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_reason_and_content_and_the_stream_goes_on() {
    let env = Env::new(PgVersion::V17).await;
    let mut client = setup(&env).await;
    let mut relay = RelayProcess::spawn(
        &env.args(&["--dead-letter-topic", "outbox.dead_letter"]),
        &[],
    );
    env.wait_streaming(&mut relay).await;
    let mut events = mixed_load(&mut client, 0, 5).await;
    for bad in BAD {
        client
            .execute("SELECT pg_logical_emit_message(true, 'outbox', $1)", &[bad])
            .await
            .unwrap();
    }
    let next = events.last().unwrap().seq + 1;
    events.extend(mixed_load(&mut client, next, 5).await);
    check(&events, &consume(&env, &events).await);

    let dead = env
        .broker
        .consume("outbox.dead_letter", BAD.len(), DEADLINE)
        .await;
    assert_eq!(dead.len(), BAD.len(), "{}", relay.log());
    for (c, bad) in dead.iter().zip(BAD) {
        assert_eq!(
            c.header_str("outbox-relay-error-class"),
            Some("invalid_message")
        );
        let reason = c.header_str("outbox-relay-error-reason").unwrap();
        assert!(reason.contains("is not an outbox event"), "{reason}");
        assert!(c.header("outbox-relay-commit-lsn").is_some());
        assert!(c.header("id").is_some(), "a dead letter has an id too");
        // The raw content, as emitted.
        assert_eq!(c.payload.as_deref(), Some(bad.as_bytes()));
    }
    let reasons: Vec<&str> = dead
        .iter()
        .map(|c| c.header_str("outbox-relay-error-reason").unwrap())
        .collect();
    assert!(
        reasons[1].contains("missing field `payload`"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("invalid type"), "{reasons:?}");
    assert!(relay.is_running(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_stops_the_relay_under_the_stop_policy_and_is_not_skipped() {
    let env = Env::new(PgVersion::V15).await;
    let mut client = setup(&env).await;
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    let events = mixed_load(&mut client, 0, 3).await;
    check(&events, &consume(&env, &events).await);
    let before = lsn_to_u64(&current_wal_lsn(&client).await);
    client
        .execute(
            "SELECT pg_logical_emit_message(true, 'outbox', $1)",
            &[&BAD[0]],
        )
        .await
        .unwrap();
    let status = relay.wait_exit(DEADLINE).await.expect("the relay stops");
    assert!(!status.success());
    let log = relay.log();
    assert!(log.contains("poison row (invalid_message)"), "{log}");
    assert!(log.contains("--dead-letter-topic"), "names the fix: {log}");
    let confirmed = env.confirmed(&client).await;
    assert!(
        confirmed <= before + 1024,
        "the slot moved past the malformed message\n{log}"
    );
    let again = RelayProcess::spawn(&env.args(&[]), &[]).wait_timeout(DEADLINE);
    assert!(
        again.is_some_and(|s| !s.success()),
        "a restart meets the same message again"
    );
}

/// Message-heavy load in one statement per transaction: 10 events, 8 of them
/// messages without an id (derived), every 50 ms.
async fn message_load(client: &tokio_postgres::Client, txns: u64) -> u64 {
    for t in 0..txns {
        let s = t * 10;
        client
            .batch_execute(&format!(
                "BEGIN;
                 SELECT outbox_emit('Order', 'order-' || (g % 5), 'OrderEmitted', \
                        jsonb_build_object('seq', g)) FROM generate_series({s}, {s} + 7) g;
                 INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload) \
                 SELECT 'Order', 'order-' || (g % 5), 'OrderRow', jsonb_build_object('seq', g) \
                 FROM generate_series({s} + 8, {s} + 9) g;
                 COMMIT;"
            ))
            .await
            .expect("load");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    txns * 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_kill_in_a_message_heavy_load_loses_nothing_and_duplicates_keep_their_ids() {
    for version in pg_versions() {
        let env = Env::new(version).await;
        let _client = setup(&env).await;
        let args = env.args(&[
            "--reconnect-backoff-min",
            "100ms",
            "--reconnect-backoff-max",
            "500ms",
        ]);
        let mut relay = RelayProcess::spawn(&args, &[]);
        env.wait_streaming(&mut relay).await;
        let writer = {
            let client = env.client().await;
            tokio::spawn(async move { message_load(&client, 150).await })
        };
        let mut kills = 0;
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            relay.kill9();
            kills += 1;
            relay = RelayProcess::spawn(&args, &[]);
            env.wait_streaming(&mut relay).await;
        }
        let n = writer.await.unwrap();
        // Read until every seq arrived; then everything the topic holds.
        let mut want = n as usize;
        let all = loop {
            let got = env
                .broker
                .consume("outbox.event.Order", want, DEADLINE)
                .await;
            let seqs: HashSet<i64> = got.iter().map(seq_of).collect();
            if seqs.len() >= n as usize || got.len() < want {
                break got;
            }
            want = got.len() + (n as usize - seqs.len());
        };
        let all = {
            let more = env
                .broker
                .consume_for("outbox.event.Order", Duration::from_secs(3))
                .await;
            if more.len() > all.len() {
                more
            } else {
                all
            }
        };
        let mut ids: HashMap<i64, String> = HashMap::new();
        let mut copies = 0usize;
        for c in &all {
            let id = c.header_str("id").unwrap().to_string();
            if let Some(first) = ids.insert(seq_of(c), id.clone()) {
                assert_eq!(first, id, "a duplicate of seq {} has another id", seq_of(c));
                copies += 1;
            }
        }
        let missing: Vec<u64> = (0..n).filter(|s| !ids.contains_key(&(*s as i64))).collect();
        assert!(
            missing.is_empty(),
            "PostgreSQL {version}: missing {missing:?}"
        );
        let derived = all
            .iter()
            .filter(|c| c.header_str("type") == Some("OrderEmitted"))
            .count();
        assert!(derived > 0);
        eprintln!(
            "PostgreSQL {version}: {n} events (80 % messages with derived ids), {kills} relay kills: {copies} duplicates, each with its first copy's id"
        );
    }
}

fn seq_of(c: &Consumed) -> i64 {
    let v: serde_json::Value = serde_json::from_slice(c.payload.as_deref().unwrap()).unwrap();
    v["seq"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_emit_refuses_what_would_be_poison_and_needs_no_privilege() {
    for version in pg_versions() {
        let env = Env::new(version).await;
        let client = setup(&env).await;
        for (call, needle) in [
            ("outbox_emit(NULL, '1', 'T', '{}')", "must not be NULL"),
            (
                "outbox_emit('A', '1', 'T', '{}', '[1]')",
                "headers must be a JSON object",
            ),
            (
                "outbox_emit('A', '1', 'T', '{}', '{\"h\": 1}')",
                "header h must be a JSON string",
            ),
        ] {
            let e = client
                .batch_execute(&format!("SELECT {call}"))
                .await
                .expect_err(call);
            let text = format!("{:?}", e.as_db_error());
            assert!(text.contains(needle), "{call}: {text}");
        }
        // An application role without any special privilege may emit.
        client.batch_execute("CREATE ROLE app LOGIN").await.unwrap();
        let url = format!("postgres://app@127.0.0.1:{}/postgres", env.pg.port());
        let (app, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let lsn: String = app
            .query_one("SELECT outbox_emit('A', '1', 'T', 'null', NULL)::text", &[])
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL {version}: {:?}", e.as_db_error()))
            .get(0);
        assert!(lsn_to_u64(&lsn) > 0);
    }
}

/// The relay binary with `args` and the env's connection flags.
fn command(env: &Env, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(RelayProcess::binary())
        .args(args)
        .args([
            "--postgres-url",
            &env.pg.url(),
            "--slot",
            &env.slot,
            "--publication",
            &env.publication,
            "--kafka-brokers",
            &env.broker.bootstrap(),
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bookmark_replay_resends_messages_with_the_same_ids() {
    let env = Env::new(PgVersion::V17).await;
    let mut client = setup(&env).await;
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    let a = mixed_load(&mut client, 0, 3).await;
    let after_a = lsn_to_u64(&current_wal_lsn(&client).await);
    wait_until(DEADLINE, "slot confirms batch A", || async {
        env.confirmed(&client).await >= after_a
    })
    .await;
    let (ok, out) = command(&env, &["bookmark", "create", "bm"]);
    assert!(ok, "{out}");
    let b = mixed_load(&mut client, 1000, 6).await;
    let all: Vec<Event> = a.iter().chain(&b).cloned().collect();
    let consumed = consume(&env, &all).await;
    check(&all, &consumed);
    // The ids and payloads batch B was first delivered with.
    let first: HashMap<String, Option<Vec<u8>>> = consumed
        .iter()
        .filter(|c| seq_of_event(c) >= 1000)
        .map(|c| (c.header_str("id").unwrap().to_string(), c.payload.clone()))
        .collect();
    assert_eq!(first.len(), b.len());

    let (ok, out) = command(
        &env,
        &[
            "replay",
            "--from-bookmark",
            "bm",
            "--topic-override",
            "replayed",
        ],
    );
    assert!(ok, "replay: {out}");
    env.broker.consume("replayed", b.len(), DEADLINE).await;
    let replayed = env
        .broker
        .consume_for("replayed", Duration::from_secs(2))
        .await;
    assert_eq!(replayed.len(), b.len(), "exactly batch B, once");
    for c in &replayed {
        let id = c.header_str("id").unwrap();
        assert_eq!(
            first.get(id),
            Some(&c.payload),
            "replayed {id} with the id and payload of its first delivery"
        );
        assert_eq!(c.header_str("replay"), Some("bookmark:bm"));
    }
    let messages = b.iter().filter(|e| e.msg_lsn.is_some()).count();
    assert!(messages > 0 && b.iter().any(|e| e.id.is_none()));
}

/// The seq of a record of [`mixed_load`]: in the payload, or in the id of the
/// non-object payloads (`emit-<seq>`).
fn seq_of_event(c: &Consumed) -> u64 {
    if let Some(seq) = c.header_str("id").and_then(|id| id.strip_prefix("emit-")) {
        return seq.parse().unwrap();
    }
    let v: serde_json::Value = serde_json::from_slice(c.payload.as_deref().unwrap()).unwrap();
    v["seq"].as_u64().unwrap()
}
