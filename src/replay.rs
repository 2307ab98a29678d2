//! Replay within what PostgreSQL allows (a logical slot cannot be rewound):
//!
//! * **bookmarks**: `bookmark create NAME` copies the live slot
//!   (`pg_copy_logical_replication_slot`) into `<slot>_bookmark_<NAME>`, which
//!   retains WAL from that point; `replay --from-bookmark NAME` streams that
//!   range to Kafka again through the same mapping, marking each record with a
//!   `replay` header, up to `--to-lsn` (default: the server's WAL position when
//!   the replay starts);
//! * **table replay**: `replay --from-id/--from-time` re-publishes rows still in
//!   the outbox table, in id or `created_at` order;
//! * **peek**: show pending events of a slot without consuming them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{pin_mut, TryStreamExt};
use tokio_util::sync::CancellationToken;

use crate::ack::AckTracker;
use crate::config::Config;
use crate::envelope::Envelope;
use crate::kafka::{DeliveryToken, KafkaSink, KafkaSinkError, SinkEvent, SinkSettings};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::outbox::message::{classify, MessageError, MessageKind};
use crate::outbox::{Mapped, MappingError, OutboxMapper, TxnInfo};
use crate::pgoutput::{Column, Decoder, Message, Relation, RelationColumn, TupleData};
use crate::relay::{Relay, RelayError, StreamOptions, HEADER_REPLAY};
use crate::setup::describe_pg_error;
use crate::sql::{self, SqlConnection};
use crate::status::BOOKMARK_INFIX;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("bookmark name {0:?} is invalid: use lowercase letters, digits and underscores, and keep <slot>_bookmark_<name> within 63 characters")]
    BadName(String),
    #[error("bookmark {0:?} does not exist; list them with `outbox-relay bookmark list`")]
    NoBookmark(String),
    #[error("bookmark {0:?} already exists; drop it first or pick another name")]
    BookmarkExists(String),
    #[error(
        "slot {0:?} does not exist, so there is nothing to bookmark; start the relay once first"
    )]
    NoSlot(String),
    #[error("{0}")]
    Usage(String),
    /// The configuration cannot be used (e.g. a malformed connection string).
    #[error("{0}")]
    Config(String),
    #[error("PostgreSQL: {0}")]
    Sql(String),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(transparent)]
    Kafka(#[from] KafkaSinkError),
    #[error("{0}")]
    Mapping(#[from] MappingError),
    #[error("Kafka did not acknowledge {0} replayed records; run the replay again (it is at-least-once)")]
    Undelivered(u64),
    #[error("--to-lsn {to} is at or below bookmark {name}'s position {position}: the range [{position}, {to}) is empty; bookmark {name} is kept (a replay covers commits from the bookmark's position up to, not including, --to-lsn)")]
    EmptyRange {
        name: String,
        position: Lsn,
        to: Lsn,
    },
    /// A bookmark replay failed or stopped after it chose its end: the advice
    /// names the same end, so running it again does not widen the range.
    #[error("{error}; bookmark {name} is kept: run `outbox-relay replay --from-bookmark {name} --to-lsn {end}` to replay the same range")]
    Interrupted {
        error: String,
        name: String,
        end: Lsn,
    },
    #[error("the id column {column} of {table} has type {ty}, whose order is not insertion order (gen_random_uuid() is random): --from-id/--to-id would pick a random subset in random order. Use --from-time/--to-time, or pass --force if the ids are ordered (e.g. UUIDv7)")]
    UnorderedId {
        table: String,
        column: String,
        ty: String,
    },
}

/// What a bookmark replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BookmarkReplayed {
    /// The bookmark's position: the range's start (inclusive, commit LSN).
    pub from: Lsn,
    /// The range's end (exclusive, commit LSN): `--to-lsn` or the server's WAL
    /// position when the replay started.
    pub to: Lsn,
    /// Records sent and acknowledged.
    pub records: u64,
}

impl From<tokio_postgres::Error> for ReplayError {
    fn from(e: tokio_postgres::Error) -> Self {
        ReplayError::Sql(describe_pg_error(&e))
    }
}

impl From<sql::SqlConnectError> for ReplayError {
    fn from(e: sql::SqlConnectError) -> Self {
        match e {
            sql::SqlConnectError::Postgres(e) => e.into(),
            sql::SqlConnectError::Config(e) => ReplayError::Config(e.to_string()),
            sql::SqlConnectError::NoServer(e) => ReplayError::Sql(e),
        }
    }
}

/// `<slot>_bookmark_<name>`, validated.
pub fn bookmark_slot(slot: &str, name: &str) -> Result<String, ReplayError> {
    let full = format!("{slot}{BOOKMARK_INFIX}{name}");
    let ok = !name.is_empty()
        && full.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(full)
    } else {
        Err(ReplayError::BadName(name.to_string()))
    }
}

async fn slot_exists(client: &SqlConnection, slot: &str) -> Result<bool, ReplayError> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .is_some())
}

/// `bookmark create NAME`: returns the bookmark's slot and position.
pub async fn create_bookmark(cfg: &Config, name: &str) -> Result<(String, Lsn), ReplayError> {
    let slot = &cfg.postgres.slot;
    let target = bookmark_slot(slot, name)?;
    let client = sql::connect(&cfg.postgres).await?;
    if !slot_exists(&client, slot).await? {
        return Err(ReplayError::NoSlot(slot.clone()));
    }
    if slot_exists(&client, &target).await? {
        return Err(ReplayError::BookmarkExists(name.to_string()));
    }
    let row = client
        .query_one(
            "SELECT lsn::text FROM pg_copy_logical_replication_slot($1, $2)",
            &[slot, &target],
        )
        .await?;
    let lsn: Option<String> = row.get(0);
    let lsn = lsn.and_then(|l| l.parse().ok()).unwrap_or(Lsn::ZERO);
    Ok((target, lsn))
}

/// `bookmark drop NAME`.
pub async fn drop_bookmark(cfg: &Config, name: &str) -> Result<(), ReplayError> {
    let target = bookmark_slot(&cfg.postgres.slot, name)?;
    let client = sql::connect(&cfg.postgres).await?;
    if !slot_exists(&client, &target).await? {
        return Err(ReplayError::NoBookmark(name.to_string()));
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&target])
        .await?;
    Ok(())
}

/// What `replay --from-bookmark` does.
#[derive(Debug, Clone)]
pub struct BookmarkReplay {
    pub name: String,
    pub to_lsn: Option<Lsn>,
    pub topic_override: Option<String>,
    /// Keep the bookmark where it is (nothing is confirmed on it), so the same
    /// range can be replayed again; otherwise it is dropped after success.
    pub keep: bool,
}

/// `replay --from-bookmark`: stream the bookmark's retained range again:
/// every transaction whose commit LSN is in `[bookmark position, end)`.
pub async fn replay_bookmark(
    cfg: &Config,
    replay: &BookmarkReplay,
    shutdown: CancellationToken,
) -> Result<BookmarkReplayed, ReplayError> {
    let target = bookmark_slot(&cfg.postgres.slot, &replay.name)?;
    let client = sql::connect(&cfg.postgres).await?;
    let Some(position) = bookmark_position(&client, &target).await? else {
        return Err(ReplayError::NoBookmark(replay.name.clone()));
    };
    let end = match replay.to_lsn {
        Some(l) => l,
        None => {
            let row = client
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await?;
            row.get::<_, String>(0)
                .parse()
                .map_err(|e| ReplayError::Sql(format!("{e}")))?
        }
    };
    if end <= position {
        // Nothing would be replayed, and success would drop the bookmark.
        return Err(ReplayError::EmptyRange {
            name: replay.name.clone(),
            position,
            to: end,
        });
    }
    let interrupted = |error: String| ReplayError::Interrupted {
        error,
        name: replay.name.clone(),
        end,
    };
    let mut replay_cfg = cfg.clone();
    replay_cfg.postgres.slot = target.clone();
    replay_cfg.postgres.create_slot = false;
    replay_cfg.postgres.create_publication = false;
    tracing::info!(
        bookmark = %replay.name, slot = %target, from = %position, to = %end,
        "replaying commits in [from, to); if interrupted, run it again with --to-lsn {end} for the same range"
    );
    let metrics = Metrics::new();
    let finished = Relay::with_metrics(replay_cfg, shutdown, metrics.clone())
        .stream_options(StreamOptions {
            start_lsn: None,
            end_lsn: Some(end),
            confirm: !replay.keep,
            replay_header: Some(format!("bookmark:{}", replay.name)),
            topic_override: replay.topic_override.clone(),
        })
        .run_to_end()
        .await
        .map_err(|e| interrupted(e.to_string()))?;
    let records = metrics.snapshot().acked_records;
    if !finished {
        return Err(interrupted(format!(
            "replay stopped before reaching {end} ({records} records sent so far)"
        )));
    }
    if !replay.keep {
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&target])
            .await
            .map_err(|e| interrupted(describe_pg_error(&e)))?;
        tracing::info!(bookmark = %replay.name, "bookmark dropped after replay");
    }
    Ok(BookmarkReplayed {
        from: position,
        to: end,
        records,
    })
}

/// The bookmark slot's position (`confirmed_flush_lsn`); `None` when it does not exist.
async fn bookmark_position(client: &SqlConnection, slot: &str) -> Result<Option<Lsn>, ReplayError> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| {
        r.get::<_, Option<String>>(0)
            .and_then(|l| l.parse().ok())
            .unwrap_or(Lsn::ZERO)
    }))
}

/// Which rows `replay --from-id/--from-time` re-publishes.
#[derive(Debug, Clone)]
pub enum TableRange {
    /// `id >= from [AND id <= to]`, in id order.
    Id { from: String, to: Option<String> },
    /// `time_column >= from [AND time_column < to]`, in time then id order.
    Time {
        column: String,
        from: String,
        to: Option<String>,
    },
}

/// `replay --from-id/--from-time`: re-publish rows read from the table.
/// Returns the number of records acknowledged.
pub async fn replay_table(
    cfg: &Config,
    range: &TableRange,
    topic_override: Option<String>,
    force: bool,
) -> Result<u64, ReplayError> {
    let client = sql::connect(&cfg.postgres).await?;
    let table = &cfg.postgres.table;
    let columns = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8 FROM pg_attribute a \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&table.to_string()],
        )
        .await?;
    if columns.is_empty() {
        return Err(ReplayError::Usage(format!("table {table} has no columns")));
    }
    let relation = Relation {
        xid: None,
        oid: 0,
        namespace: table.schema.clone(),
        name: table.name.clone(),
        replica_identity: b'd',
        columns: columns
            .iter()
            .map(|r| RelationColumn {
                flags: 0,
                name: r.get(0),
                type_oid: r.get::<_, i64>(1) as u32,
                type_modifier: -1,
            })
            .collect(),
    };
    // Provenance (LSN, xid, commit time) is unknown for rows read from the table.
    let mut mapping = cfg.mapping.clone();
    mapping.provenance_headers = false;
    let mut mapper =
        OutboxMapper::new(mapping, table.clone()).with_envelope(Envelope::for_config(cfg));
    mapper.on_relation(&relation)?;

    let quote = |c: &str| crate::config::quote_ident(c).into_owned();
    let select = relation
        .columns
        .iter()
        .map(|c| format!("{}::text", quote(&c.name)))
        .collect::<Vec<_>>()
        .join(", ");
    let id = quote(&cfg.mapping.id_column);
    let (filter, order, params): (String, String, Vec<String>) = match range {
        TableRange::Id { from, to } => {
            // Compare in the id column's own type (uuid, bigint, text...).
            let ty = column_type(&client, table, &cfg.mapping.id_column).await?;
            match id_order(&ty) {
                IdOrder::Insertion => {}
                IdOrder::Random if !force => {
                    return Err(ReplayError::UnorderedId {
                        table: table.to_string(),
                        column: cfg.mapping.id_column.clone(),
                        ty,
                    })
                }
                IdOrder::Random | IdOrder::Unknown => tracing::warn!(
                    column = %cfg.mapping.id_column, r#type = %ty,
                    "the id column's order may not be insertion order: the id range may pick rows out of insertion order"
                ),
            }
            let mut f = format!("{id} >= CAST($1::text AS {ty})");
            let mut p = vec![from.clone()];
            if let Some(to) = to {
                f.push_str(&format!(" AND {id} <= CAST($2::text AS {ty})"));
                p.push(to.clone());
            }
            (f, id.clone(), p)
        }
        TableRange::Time { column, from, to } => {
            let c = quote(column);
            let mut f = format!("{c} >= $1::text::timestamptz");
            let mut p = vec![from.clone()];
            if let Some(to) = to {
                f.push_str(&format!(" AND {c} < $2::text::timestamptz"));
                p.push(to.clone());
            }
            (f, format!("{c}, {id}"), p)
        }
    };
    let query = format!("SELECT {select} FROM {table} WHERE {filter} ORDER BY {order}");

    let settings = SinkSettings::from_config(cfg);
    let mut sink = KafkaSink::new(&settings)?;
    let mut tracker = AckTracker::new(Lsn::ZERO);
    tracker
        .begin(0)
        .expect("a fresh tracker has no open transaction");
    let mut known_topics = std::collections::HashSet::new();
    let txn = TxnInfo {
        xid: 0,
        commit_lsn: Lsn::ZERO,
        commit_time: 0,
    };
    let (mut sent, mut acked, mut failed) = (0u64, 0u64, 0u64);
    let max_in_flight = cfg.relay.max_in_flight_records as u64;

    let rows = client.query_raw(query.as_str(), params.iter()).await?;
    pin_mut!(rows);
    while let Some(row) = rows.try_next().await? {
        let tuple = TupleData {
            columns: (0..row.len())
                .map(|i| match row.get::<_, Option<&str>>(i) {
                    Some(v) => Column::Text(Bytes::copy_from_slice(v.as_bytes())),
                    None => Column::Null,
                })
                .collect(),
        };
        let insert = crate::pgoutput::Insert {
            xid: None,
            relation_oid: 0,
            tuple,
        };
        let Mapped::Record(mut record) = mapper.map_insert(&insert, &txn)? else {
            continue;
        };
        if let Some(t) = &topic_override {
            record.topic = Arc::from(t.as_str());
        }
        record
            .headers
            .push((Arc::from(HEADER_REPLAY), Bytes::from_static(b"table")));
        if known_topics.insert(record.topic.clone()) {
            sink.prepare_topic(&record.topic).await?;
        }
        let token = DeliveryToken {
            generation: 0,
            txn: tracker
                .record_sent()
                .expect("the replay transaction is open"),
            bytes: record.size(),
            commit_time: 0,
            position: Default::default(),
            trace: None,
            handed: None,
        };
        loop {
            match sink.send(&record, token) {
                Ok(()) => break,
                Err(KafkaSinkError::QueueFull) => {
                    wait_one(&mut sink, &mut acked, &mut failed).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        sent += 1;
        while sent - acked - failed >= max_in_flight {
            wait_one(&mut sink, &mut acked, &mut failed).await;
        }
    }
    while acked + failed < sent {
        wait_one(&mut sink, &mut acked, &mut failed).await;
    }
    sink.close(Duration::from_secs(1)).await;
    if failed > 0 {
        return Err(ReplayError::Undelivered(failed));
    }
    Ok(acked)
}

/// Whether ordering by an id column of this type follows insertion order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdOrder {
    /// Integers (serial, bigserial, identity columns): sequences only grow.
    Insertion,
    /// `uuid`: `gen_random_uuid()` (the shipped table's default) is random.
    Random,
    /// Anything else (text, ULIDs, ...): depends on how ids are made.
    Unknown,
}

fn id_order(format_type: &str) -> IdOrder {
    match format_type {
        "smallint" | "integer" | "bigint" => IdOrder::Insertion,
        "uuid" => IdOrder::Random,
        _ => IdOrder::Unknown,
    }
}

async fn column_type(
    client: &SqlConnection,
    table: &crate::config::TableName,
    column: &str,
) -> Result<String, ReplayError> {
    let row = client
        .query_opt(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = $1::text::regclass AND a.attname = $2 AND NOT a.attisdropped",
            &[&table.to_string(), &column],
        )
        .await?
        .ok_or_else(|| ReplayError::Usage(format!("table {table} has no column {column:?}")))?;
    Ok(row.get(0))
}

async fn wait_one(sink: &mut KafkaSink, acked: &mut u64, failed: &mut u64) {
    match sink.next_event().await {
        Some(SinkEvent::Delivered(_)) => *acked += 1,
        Some(SinkEvent::Failed(f)) => {
            tracing::error!(error = %f.error, topic = %f.topic, "replayed record not acknowledged");
            *failed += 1;
        }
        Some(SinkEvent::Fatal(reason)) => {
            tracing::error!(%reason, "fatal producer error during replay");
        }
        None => {}
    }
}

/// One pending event, as `peek` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Peeked {
    pub lsn: String,
    pub topic: String,
    pub key: Option<String>,
    pub id: Option<String>,
    pub payload: Option<String>,
}

/// `peek`: the next `limit` outbox records waiting in `slot` (the live slot,
/// or a bookmark's), decoded and mapped, without consuming them.
pub async fn peek(cfg: &Config, slot: &str, limit: usize) -> Result<Vec<Peeked>, ReplayError> {
    let client = sql::connect(&cfg.postgres).await?;
    if !slot_exists(&client, slot).await? {
        return Err(ReplayError::NoSlot(slot.to_string()));
    }
    let publication = format!("\"{}\"", cfg.postgres.publication.replace('"', "\"\""));
    // Each record costs at least Begin + Insert + Commit messages; ask for more
    // until `limit` records are decoded or the slot has nothing further.
    let mut changes = (limit as i32).saturating_mul(3).saturating_add(8);
    loop {
        let (found, more) = peek_changes(cfg, &client, slot, &publication, changes, limit).await?;
        if found.len() >= limit || !more || changes >= i32::MAX / 8 {
            return Ok(found);
        }
        changes = changes.saturating_mul(4);
    }
}

/// One peek of at most `changes` messages: the records found, and whether the
/// slot may hold more (the server returned as many messages as asked).
async fn peek_changes(
    cfg: &Config,
    client: &SqlConnection,
    slot: &str,
    publication: &str,
    changes: i32,
    limit: usize,
) -> Result<(Vec<Peeked>, bool), ReplayError> {
    // Streamed: the client holds one message at a time and stops reading at
    // `limit` records (dropping the stream discards the rest). PostgreSQL itself
    // stops only at a transaction boundary, so it decodes the first
    // transaction in full on its side (spilling to disk past work_mem).
    let pg_error = |e: tokio_postgres::Error| {
        let text = describe_pg_error(&e);
        if text.contains("is active for PID") {
            ReplayError::Usage(format!(
                "{text}: the running relay holds the slot; peek a bookmark instead \
                     (outbox-relay bookmark create NAME, then peek --bookmark NAME)"
            ))
        } else {
            ReplayError::Sql(text)
        }
    };
    // Messages (pg_logical_emit_message) are shown like rows when they are on.
    let messages = if cfg.mapping.message_prefix.is_some() {
        "true"
    } else {
        "false"
    };
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&slot, &changes, &publication, &messages];
    let rows = client
        .query_raw(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
             'proto_version', '1', 'publication_names', $3, 'messages', $4)",
            params,
        )
        .await
        .map_err(pg_error)?;
    pin_mut!(rows);
    let mut seen = 0usize;
    let mut decoder = Decoder::new();
    let mut mapper = OutboxMapper::new(cfg.mapping.clone(), cfg.postgres.table.clone())
        .with_envelope(Envelope::for_config(cfg));
    let mut txn = None;
    let mut out = Vec::new();
    while let Some(row) = rows.try_next().await.map_err(pg_error)? {
        seen += 1;
        let lsn: String = row.get(0);
        let data: Vec<u8> = row.get(1);
        match decoder
            .decode(Bytes::from(data))
            .map_err(|e| ReplayError::Sql(e.to_string()))?
        {
            Message::Begin(b) => {
                txn = Some(TxnInfo {
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                    commit_time: b.commit_time,
                })
            }
            Message::Relation(r) => mapper.on_relation(&r)?,
            Message::Insert(ins) => {
                let Some(t) = txn else { continue };
                if let Mapped::Record(r) = mapper.map_insert(&ins, &t)? {
                    out.push(peeked(lsn, r));
                    if out.len() >= limit {
                        return Ok((out, true));
                    }
                }
            }
            Message::Message(m)
                if classify(&m, cfg.mapping.message_prefix.as_deref()) == MessageKind::Event =>
            {
                let Some(t) = txn else { continue };
                let r = mapper.map_message(&m, &t).map_err(|e| match e {
                    MessageError::Mapping(e) => ReplayError::Mapping(e),
                    e => ReplayError::Usage(e.to_string()),
                })?;
                out.push(peeked(lsn, r));
                if out.len() >= limit {
                    return Ok((out, true));
                }
            }
            _ => {}
        }
    }
    Ok((out, seen >= changes as usize))
}

fn peeked(lsn: String, r: crate::outbox::OutboxRecord) -> Peeked {
    let text = |b: &Option<Bytes>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
    Peeked {
        lsn,
        topic: r.topic.to_string(),
        key: text(&r.key),
        id: text(&r.id),
        payload: text(&r.payload),
    }
}
