//! Rows with trace context and extension columns, written one transaction
//! each, with what PostgreSQL says about their transactions (xid, commit time,
//! the WAL window of the commit): for the CloudEvents and tracing tests.
#![allow(dead_code)]

use std::collections::HashMap;

use super::outbox::{Env, DEADLINE};
use super::{current_wal_lsn, lsn_to_u64, Consumed, PgCluster, PgVersion};

pub const VALID_PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// Upper-case hex: not W3C, carried unchanged all the same.
pub const INVALID_PARENT: &str = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01";

/// A row to write: (aggregatetype, payload JSON, tenant, traceparent, tracestate).
pub type RowSpec<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

/// One row as written, with what its transaction says.
#[derive(Debug, Clone)]
pub struct Sent {
    pub id: String,
    pub aggregatetype: String,
    pub aggregateid: String,
    pub event_type: String,
    /// The payload as PostgreSQL renders it (jsonb text, or bytea's bytes).
    pub payload: Vec<u8>,
    pub tenant: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub xid: String,
    /// `outbox-relay-commit-time` / `ce_time`, formatted by PostgreSQL.
    pub commit_time: String,
    /// The commit time in µs since the Unix epoch.
    pub commit_unix_micros: i64,
    /// WAL positions around the commit (the commit LSN lies between).
    pub lsn_before: u64,
    pub lsn_after: u64,
}

/// A cluster with `track_commit_timestamp` (the test reads each
/// transaction's commit time) and the outbox table with optional extra columns.
pub async fn env_with(extra_columns: &str) -> Env {
    env_on(PgVersion::V17, extra_columns).await
}

/// [`env_with`] on PostgreSQL `version`.
pub async fn env_on(version: PgVersion, extra_columns: &str) -> Env {
    let pg = PgCluster::start(version, &[("track_commit_timestamp", "on")]);
    let env = Env::with_pg(pg).await;
    if !extra_columns.is_empty() {
        env.client()
            .await
            .batch_execute(&format!("ALTER TABLE outbox_events {extra_columns}"))
            .await
            .unwrap();
    }
    env
}

/// Insert `rows` in one transaction each; the columns tenant/traceparent/
/// tracestate are written only when `traced`.
pub async fn insert(
    client: &tokio_postgres::Client,
    rows: &[RowSpec<'_>],
    traced: bool,
) -> Vec<Sent> {
    let mut out = Vec::new();
    for (i, (agg, payload_json, tenant, parent, state)) in rows.iter().enumerate() {
        let before = lsn_to_u64(&current_wal_lsn(client).await);
        client.batch_execute("BEGIN").await.unwrap();
        let key = format!("{}-{i}", agg.to_lowercase());
        let event_type = format!("{agg}Happened");
        let row = if traced {
            client
                .query_one(
                    "INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload, tenant, traceparent, tracestate) \
                     VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7) \
                     RETURNING id::text, payload::text, pg_current_xact_id()::text",
                    &[agg, &key, &event_type, payload_json, tenant, parent, state],
                )
                .await
                .unwrap()
        } else {
            client
                .query_one(
                    "INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload) \
                     VALUES ($1, $2, $3, $4::text::jsonb) \
                     RETURNING id::text, payload::text, pg_current_xact_id()::text",
                    &[agg, &key, &event_type, payload_json],
                )
                .await
                .unwrap()
        };
        client.batch_execute("COMMIT").await.unwrap();
        let xid: String = row.get(2);
        let commit = client
            .query_one(
                "SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                 (extract(epoch FROM t) * 1000000)::bigint \
                 FROM pg_xact_commit_timestamp($1::text::xid) AS t",
                &[&xid],
            )
            .await
            .unwrap();
        let after = lsn_to_u64(&current_wal_lsn(client).await);
        out.push(Sent {
            id: row.get(0),
            aggregatetype: agg.to_string(),
            aggregateid: key,
            event_type,
            payload: row.get::<_, String>(1).into_bytes(),
            tenant: tenant.map(str::to_string),
            traceparent: parent.map(str::to_string),
            tracestate: state.map(str::to_string),
            xid,
            commit_time: commit.get(0),
            commit_unix_micros: commit.get(1),
            lsn_before: before,
            lsn_after: after,
        });
    }
    out
}

/// Every record of `sent`'s topics, matched to its row by `id_of`.
pub async fn consume_all<'a>(
    env: &Env,
    sent: &'a [Sent],
    id_of: impl Fn(&Consumed) -> String,
) -> Vec<(&'a Sent, Consumed)> {
    let mut per_topic: HashMap<String, usize> = HashMap::new();
    for s in sent {
        *per_topic
            .entry(format!("outbox.event.{}", s.aggregatetype))
            .or_default() += 1;
    }
    let by_id: HashMap<&str, &Sent> = sent.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut out = Vec::new();
    for (topic, n) in per_topic {
        let got = env.broker.consume(&topic, n, DEADLINE).await;
        assert_eq!(got.len(), n, "records on {topic}");
        for c in got {
            let id = id_of(&c);
            let s = by_id
                .get(id.as_str())
                .unwrap_or_else(|| panic!("record for unknown id {id}: {c:?}"));
            out.push((*s, c));
        }
    }
    assert_eq!(out.len(), sent.len());
    out
}

/// The commit LSN header: an LSN inside the window around the commit.
pub fn check_commit_lsn(s: &Sent, value: &[u8]) -> Vec<u8> {
    let lsn = lsn_to_u64(std::str::from_utf8(value).unwrap());
    assert!(
        s.lsn_before < lsn && lsn <= s.lsn_after,
        "commit LSN {lsn:X} outside {:X}..{:X}",
        s.lsn_before,
        s.lsn_after
    );
    value.to_vec()
}
