//! Scenario 1, catch-up: a backlog of N committed events, then the time until
//! the relay has them all acknowledged by Kafka (its slot is confirmed past the
//! backlog's end, which the relay only does after the broker acked every record
//! before it). Compared in the same run with
//!
//! * the ceiling: what the server can send at all, the faster of
//!   `pg_recvlogical` streaming pgoutput from an identical slot to `/dev/null`
//!   until the same end LSN, and the benchmark's minimal Rust client on the
//!   relay's replication code reading and discarding it ([`crate::rawstream`]);
//! * raw rdkafka producing the same records to the broker — what the broker
//!   can take at all.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::load::{self, pad};
use crate::process::{self, Guarded};
use crate::results::{CatchUp, CatchUpRun};
use crate::scenarios::{
    between, current_lsn, path_str, slot_confirmed, sql, wait_log, Ctx, CEILING_SLOT, PUBLICATION,
    RELAY_SLOT, RELAY_TABLE,
};

/// The Rust client's ceiling slot.
const CEILING_SLOT_RUST: &str = "bench_ceiling_rust";

pub const CATCHUP_TYPE: &str = "catchup";
const RAW_TOPIC: &str = "bench.raw_producer";
const STEP_TIMEOUT: Duration = Duration::from_secs(900);

/// Table, publication, relay slot (idempotent). The slot exists before any
/// row is written, so every benchmark row reaches the relay.
pub async fn prepare(ctx: &Ctx) -> Result<(), String> {
    let client = sql(ctx).await?;
    client
        .batch_execute(&load::create_table_sql(RELAY_TABLE))
        .await
        .map_err(|e| format!("create {RELAY_TABLE}: {e}"))?;
    client
        .batch_execute(&load::create_table_sql(crate::scenarios::POLL_TABLE))
        .await
        .map_err(|e| format!("create the polling table: {e}"))?;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&PUBLICATION],
        )
        .await
        .map_err(|e| e.to_string())?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {PUBLICATION} FOR TABLE {RELAY_TABLE} WITH (publish = 'insert')"
            ))
            .await
            .map_err(|e| format!("create publication: {e}"))?;
    }
    ensure_slot(&client, RELAY_SLOT).await
}

async fn recreate_slot(client: &tokio_postgres::Client, slot: &str) -> Result<(), String> {
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| format!("drop slot {slot}: {e}"))?;
    ensure_slot(client, slot).await
}

async fn ensure_slot(client: &tokio_postgres::Client, slot: &str) -> Result<(), String> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| e.to_string())?
        .is_some();
    if !exists {
        client
            .query_one(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .map_err(|e| format!("create slot {slot}: {e}"))?;
    }
    Ok(())
}

/// What a catch-up backlog is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// Rows of the outbox table.
    Rows,
    /// Transactional logical decoding messages with prefix `outbox` (the
    /// event JSON `sql/05_emit.sql`'s `outbox_emit` builds), no table.
    Messages,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Rows => "rows",
            Source::Messages => "messages",
        }
    }
}

/// Inserts the backlog with a server-side procedure (one COMMIT per
/// `txn_rows` events), on two connections at once.
async fn insert_backlog(ctx: &Ctx, txn_rows: usize, source: Source) -> Result<f64, String> {
    let s = &ctx.settings;
    let client = sql(ctx).await?;
    let write = match source {
        Source::Rows => format!(
            "INSERT INTO {RELAY_TABLE} (aggregatetype, aggregateid, type, payload)
                   SELECT '{CATCHUP_TYPE}', ((first + i + g) % 1000)::text, 'BenchEvent',
                          jsonb_build_object('seq', first + i + g, 'pad', pad)"
        ),
        Source::Messages => format!(
            "PERFORM pg_logical_emit_message(true, 'outbox', jsonb_build_object(
                     'aggregatetype', '{CATCHUP_TYPE}', 'aggregateid', ((first + i + g) % 1000)::text,
                     'type', 'BenchEvent',
                     'payload', jsonb_build_object('seq', first + i + g, 'pad', pad))::text)"
        ),
    };
    client
        .batch_execute(&format!(
            "CREATE OR REPLACE PROCEDURE bench_backlog(first int8, n int8, per_txn int, pad text)
             LANGUAGE plpgsql AS $$
             DECLARE i int8 := 0;
             BEGIN
               WHILE i < n LOOP
                 {write}
                   FROM generate_series(0, LEAST(per_txn, n - i) - 1) AS g;
                 COMMIT;
                 i := i + per_txn;
               END LOOP;
             END $$;"
        ))
        .await
        .map_err(|e| format!("create the backlog procedure: {e}"))?;
    let began = Instant::now();
    let parts = 2u64;
    let mut tasks = Vec::new();
    for p in 0..parts {
        let first = (s.events * p / parts) as i64;
        let n = (s.events * (p + 1) / parts) as i64 - first;
        let c = sql(ctx).await?;
        let per_txn = txn_rows as i32;
        let pad = pad(s.payload_bytes);
        tasks.push(tokio::spawn(async move {
            c.execute(
                "CALL bench_backlog($1, $2, $3, $4)",
                &[&first, &n, &per_txn, &pad],
            )
            .await
            .map_err(|e| format!("insert the backlog: {e}"))
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(began.elapsed().as_secs_f64())
}

/// Runs the scenario; returns its figures and the relay, still running (the
/// steady scenario goes on with it).
pub async fn run(
    ctx: &mut Ctx,
    txn_rows: usize,
    source: Source,
) -> Result<(CatchUp, Guarded), String> {
    let s = ctx.settings.clone();
    let client = sql(ctx).await?;
    // A fresh slot, like the ceiling's: an advanced one keeps its old
    // restart_lsn, and the walsender would first decode everything written
    // since (the polling windows' updates and deletes: measured at 47-76 µs
    // of PostgreSQL CPU per event instead of 25, the relay at 0.33-0.49× the
    // ceiling on the catch-up that followed them).
    recreate_slot(&client, RELAY_SLOT).await?;
    ensure_slot(&client, CEILING_SLOT).await?;
    ensure_slot(&client, CEILING_SLOT_RUST).await?;
    let lsn_before = current_lsn(&client).await?;
    say!(
        "catch-up ({}): inserting a backlog of {} events as {} ({txn_rows} per transaction)",
        ctx.broker.kind(),
        s.events,
        source.name(),
    );
    let backlog_insert_s = insert_backlog(ctx, txn_rows, source).await?;
    let end_lsn = current_lsn(&client).await?;
    // Let the writers' dust settle (autovacuum, bgwriter) before timing.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut out = CatchUp {
        broker: ctx.broker.kind().to_string(),
        events: s.events,
        payload_bytes: s.payload_bytes,
        txn_rows,
        source: source.name().to_string(),
        backlog_insert_s,
        wal_bytes: end_lsn.saturating_sub(lsn_before),
        ..CatchUp::default()
    };

    // 1. The ceiling: pg_recvlogical over an identical slot, output discarded.
    say!("catch-up: pg_recvlogical ceiling");
    let endpos = format!("{:X}/{:X}", end_lsn >> 32, end_lsn & 0xffff_ffff);
    let (o, e) = ctx.log_file("pg_recvlogical.log")?;
    let mut cmd = Command::new(ctx.pg.bindir().join("pg_recvlogical"));
    cmd.arg("-d")
        .arg(ctx.pg.conninfo())
        .args(["--slot", CEILING_SLOT, "--start", "--no-loop", "-F", "0"])
        .arg("--endpos")
        .arg(&endpos)
        // `messages`: the stream the relay reads (it asks for logical
        // decoding messages by default).
        .args(["-o", "proto_version=1", "-o", "messages=true", "-o"])
        .arg(format!("publication_names={PUBLICATION}"))
        .args(["-f", "/dev/null"])
        .stdin(Stdio::null())
        .stdout(o)
        .stderr(e);
    let a = ctx.snapshot(None);
    let mut recv = process::spawn("pg_recvlogical", &mut cmd, libc::SIGTERM)
        .map_err(|e| format!("spawn pg_recvlogical: {e}"))?;
    let status = recv
        .wait_sampling(STEP_TIMEOUT)
        .ok_or("pg_recvlogical did not reach the end LSN in time")?;
    let mut b = ctx.snapshot(None);
    let last = recv.sample().unwrap_or_default();
    b.subject = Some(last.clone());
    if !status.success() {
        return Err(format!(
            "pg_recvlogical failed ({status}): {}",
            std::fs::read_to_string(ctx.scratch_path("pg_recvlogical.log")).unwrap_or_default()
        ));
    }
    out.ceiling_pg_recvlogical = catch_up_run(
        ctx,
        "pg_recvlogical → /dev/null",
        &a,
        &b,
        Some(last.vm_hwm_kb),
    );

    // 1b. The same stream read by a minimal client on the relay's own
    //     replication code, discarded.
    say!("catch-up: Rust replication client ceiling");
    let summary = ctx.scratch_path("raw-stream.json");
    let _ = std::fs::remove_file(&summary);
    let args = vec![
        "--port".into(),
        ctx.pg.port().to_string(),
        "--slot".into(),
        CEILING_SLOT_RUST.into(),
        "--publication".into(),
        PUBLICATION.into(),
        "--end-lsn".into(),
        endpos.clone(),
        "--summary".into(),
        path_str(&summary),
    ];
    let a = ctx.snapshot(None);
    let mut reader = ctx.spawn_self("raw-stream", &args)?;
    let status = reader
        .wait_sampling(STEP_TIMEOUT)
        .ok_or("the Rust replication client did not reach the end LSN in time")?;
    let mut b = ctx.snapshot(None);
    let last = reader.sample().unwrap_or_default();
    b.subject = Some(last.clone());
    if !status.success() || !summary.is_file() {
        return Err(format!(
            "the Rust replication client failed ({status}): {}",
            std::fs::read_to_string(ctx.scratch_path("raw-stream.log")).unwrap_or_default()
        ));
    }
    out.ceiling_rust_client = catch_up_run(
        ctx,
        "Rust replication client → discard",
        &a,
        &b,
        Some(last.vm_hwm_kb),
    );
    out.ceiling = if out.ceiling_rust_client.events_per_s > out.ceiling_pg_recvlogical.events_per_s
    {
        out.ceiling_rust_client.clone()
    } else {
        out.ceiling_pg_recvlogical.clone()
    };
    for slot in [CEILING_SLOT, CEILING_SLOT_RUST] {
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .map_err(|e| format!("drop the ceiling slot {slot}: {e}"))?;
    }

    // 2. Raw rdkafka: the same records, straight to a fresh broker.
    say!("catch-up: raw rdkafka producer");
    ctx.fresh_broker().await?;
    ctx.broker.create_topic(RAW_TOPIC).await?;
    let summary = ctx.scratch_path("raw-produce.json");
    let args = vec![
        "--brokers".into(),
        ctx.broker.bootstrap(),
        "--topic".into(),
        RAW_TOPIC.into(),
        "--count".into(),
        s.events.to_string(),
        "--payload-bytes".into(),
        s.payload_bytes.to_string(),
        "--summary".into(),
        path_str(&summary),
    ];
    let a = ctx.snapshot(None);
    let mut raw = ctx.spawn_raw_producer(args)?;
    let status = raw
        .wait_sampling(STEP_TIMEOUT)
        .ok_or("the raw producer did not finish in time")?;
    let mut b = ctx.snapshot(None);
    let last = raw.sample().unwrap_or_default();
    b.subject = Some(last.clone());
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary).unwrap_or_default()).map_err(|_| {
            format!(
                "the raw producer failed ({status}): {}",
                std::fs::read_to_string(ctx.scratch_path("raw-produce.log")).unwrap_or_default()
            )
        })?;
    let delivered = summary["delivered"].as_u64().unwrap_or(0);
    if delivered != s.events {
        return Err(format!(
            "the raw producer delivered {delivered} of {} records",
            s.events
        ));
    }
    out.raw_producer = catch_up_run(ctx, "raw rdkafka producer", &a, &b, Some(last.vm_hwm_kb));
    // Its own clock (first send → last ack) excludes process and client start.
    if let Some(t) = summary["elapsed_s"].as_f64() {
        out.raw_producer.elapsed_s = t;
        out.raw_producer.events_per_s = s.events as f64 / t;
    }
    ctx.broker.delete_topics(&[RAW_TOPIC.to_string()]).await;

    // 3. The relay, from process start to the slot confirmed past the backlog
    //    (on a fresh broker too: tansu slows down as it fills).
    say!("catch-up: outbox-relay");
    ctx.fresh_broker().await?;
    let topic = format!("outbox.event.{CATCHUP_TYPE}");
    ctx.broker.create_topic(&topic).await?;
    let a = ctx.snapshot(None);
    let mut relay = ctx.spawn_relay()?;
    let started = Instant::now();
    let mut perf = match &s.perf_relay {
        Some(file) => {
            // Attach once the relay streams: `perf -p` samples the threads that
            // exist when it starts (librdkafka's and tokio's are up by then).
            wait_log(ctx, &mut relay, "streaming", Duration::from_secs(30)).await;
            let mut cmd = Command::new("perf");
            cmd.args(["record", "-F", "1999", "--call-graph", "dwarf,32768", "-o"])
                .arg(file)
                .arg("-p")
                .arg(relay.pid().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            Some(
                process::spawn("perf", &mut cmd, libc::SIGINT)
                    .map_err(|e| format!("spawn perf (apt-get install linux-perf): {e}"))?,
            )
        }
        None => None,
    };
    let mut streaming_at = None;
    let mut peak_kb = 0;
    loop {
        if let Some(smp) = relay.sample() {
            peak_kb = peak_kb.max(smp.vm_hwm_kb);
        }
        if streaming_at.is_none() && ctx.relay_log().contains("streaming") {
            streaming_at = Some(started.elapsed().as_secs_f64());
        }
        if let Some(status) = relay.try_status() {
            return Err(format!(
                "the relay exited ({status}) during catch-up:\n{}",
                tail_str(&ctx.relay_log(), 30)
            ));
        }
        if slot_confirmed(&client, RELAY_SLOT)
            .await?
            .is_some_and(|l| l >= end_lsn)
        {
            break;
        }
        if started.elapsed() > STEP_TIMEOUT {
            return Err("the relay did not catch up in time".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut b = ctx.snapshot(None);
    b.subject = relay.sample();
    let (voluntary, involuntary) = crate::resources::context_switches(relay.pid());
    out.relay_context_switches_per_event = (
        voluntary as f64 / s.events as f64,
        involuntary as f64 / s.events as f64,
    );
    if let Some(p) = perf.as_mut() {
        p.stop(Duration::from_secs(60));
    }
    let mut a2 = a.clone();
    a2.subject = None; // the relay's CPU counts from its start
    out.relay = catch_up_run(ctx, "outbox-relay", &a2, &b, Some(peak_kb));
    out.relay_startup_s = streaming_at;
    out.relay_ratio_to_ceiling = if out.ceiling.events_per_s > 0.0 {
        out.relay.events_per_s / out.ceiling.events_per_s
    } else {
        0.0
    };
    out.relay_cpu_ratio_to_raw = if out.raw_producer.process.cpu_per_event_us > 0.0 {
        out.relay.process.cpu_per_event_us / out.raw_producer.process.cpu_per_event_us
    } else {
        0.0
    };
    if wait_log(ctx, &mut relay, "streaming", Duration::from_secs(1))
        .await
        .is_none()
    {
        say!("warning: the relay log has no 'streaming' line");
    }

    say!("catch-up: counting the relay's records in Kafka");
    let bootstrap = ctx.broker.bootstrap();
    let events = s.events;
    let mock = ctx.broker.kind() == crate::broker::Kind::Mock;
    out.relay_records_verified = if mock {
        None
    } else {
        Some(
            tokio::task::spawn_blocking(move || {
                load::count_records(&bootstrap, &topic, events, Duration::from_secs(300))
            })
            .await
            .map_err(|e| e.to_string())?,
        )
    };
    ctx.broker
        .delete_topics(&[format!("outbox.event.{CATCHUP_TYPE}")])
        .await;
    Ok((out, relay))
}

fn catch_up_run(
    ctx: &Ctx,
    what: &str,
    a: &crate::scenarios::Snapshot,
    b: &crate::scenarios::Snapshot,
    hwm_kb: Option<u64>,
) -> CatchUpRun {
    let d = between(a, b);
    let events = ctx.settings.events;
    let (process, postgres, broker, _) = d.usages(events, hwm_kb);
    CatchUpRun {
        what: what.to_string(),
        elapsed_s: d.wall_s,
        events_per_s: events as f64 / d.wall_s,
        process,
        postgres,
        broker,
        machine: d.machine,
    }
}

pub fn tail_str(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
