//! Scenarios 2 and 3: steady insert rates, commit → consumer latency, for the
//! relay and for the polling baseline on the same load.
//!
//! One window = one subject, one transaction shape, one rate: a fresh topic, a
//! consumer reading it from the start, writers for `warmup + window`, then a
//! drain until every committed row was read (or a timeout, reported as
//! missing). Only rows committed inside the window count for latency and CPU.

use std::time::Duration;

use crate::load::{self, LatencyConsumer, WriterPlan};
use crate::process::Guarded;
use crate::resources;
use crate::results::BucketLatency;
use crate::results::Window;
use crate::scenarios::{
    between, path_str, relay_histograms, sql, Buckets, Ctx, POLL_TABLE, RELAY_TABLE,
};

/// Who moves rows to Kafka in a window.
pub enum Subject<'a> {
    /// The relay, its events written as table rows or as logical decoding
    /// messages.
    Relay(&'a mut Guarded, crate::catchup::Source),
    Polling {
        interval: Duration,
    },
    /// No database: raw rdkafka paced at the rate, stamped at send time. What
    /// the producer → broker → consumer path alone costs (the floor under
    /// every subject's latency).
    BrokerFloor,
}

fn interval_label(d: Duration) -> String {
    if d.as_millis() % 1000 == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

pub fn subject_label(s: &Subject<'_>) -> String {
    match s {
        Subject::Relay(_, crate::catchup::Source::Rows) => "relay".into(),
        Subject::Relay(_, crate::catchup::Source::Messages) => "relay-messages".into(),
        Subject::Polling { interval } => format!("poll-{}", interval_label(*interval)),
        Subject::BrokerFloor => "broker-floor".into(),
    }
}

/// Runs one window.
pub async fn window(
    ctx: &Ctx,
    subject: &mut Subject<'_>,
    rows_per_txn: usize,
    rate: u64,
) -> Result<Window, String> {
    let s = &ctx.settings;
    let mut label = subject_label(subject);
    if ctx.broker.kind() == crate::broker::Kind::Mock {
        label.push_str("@mock");
    }
    let shape = format!("tx{rows_per_txn}_r{rate}");
    let writers = if rows_per_txn == 1 {
        s.writers
    } else {
        s.txn_writers
    };
    let (table, aggregatetype, topic, measure) = match subject {
        Subject::Relay(..) => {
            let agg = format!("steady_{shape}");
            let topic = format!("outbox.event.{agg}");
            (RELAY_TABLE, agg, topic, s.window)
        }
        Subject::Polling { interval } => {
            let topic = format!("outbox.poll.{}.{shape}", interval_label(*interval));
            let measure = if *interval >= Duration::from_secs(1) {
                s.slow_poll_window.max(s.window)
            } else {
                s.window
            };
            (POLL_TABLE, format!("poll_{shape}"), topic, measure)
        }
        Subject::BrokerFloor => ("", String::new(), format!("bench.floor.{shape}"), s.window),
    };
    say!(
        "steady: {label}, {rows_per_txn} row(s)/txn, {rate} events/s, {} s",
        measure.as_secs_f64()
    );
    ctx.broker.create_topic(&topic).await?;

    // The polling relay of this window (the relay runs across windows).
    let mut poller = None;
    if let Subject::Polling { interval } = subject {
        let client = sql(ctx).await?;
        client
            .batch_execute(&format!("TRUNCATE {POLL_TABLE}"))
            .await
            .map_err(|e| format!("truncate {POLL_TABLE}: {e}"))?;
        let args = vec![
            "--postgres-url".into(),
            ctx.pg.url(),
            "--brokers".into(),
            ctx.broker.bootstrap(),
            "--table".into(),
            POLL_TABLE.into(),
            "--topic".into(),
            topic.clone(),
            "--interval".into(),
            interval_label(*interval),
            "--batch".into(),
            s.poll_batch.to_string(),
            "--summary".into(),
            path_str(&ctx.scratch_path("poll-relay.json")),
        ];
        poller = Some(ctx.spawn_self("poll-relay", &args)?);
    }
    let consumer = LatencyConsumer::start(&ctx.broker.bootstrap(), &topic, s.fetch_wait_ms)?;
    consumer.wait_ready().await;
    if let Subject::BrokerFloor = subject {
        let summary = ctx.scratch_path("floor.json");
        let _ = std::fs::remove_file(&summary);
        let args = vec![
            "--brokers".into(),
            ctx.broker.bootstrap(),
            "--topic".into(),
            topic.clone(),
            "--count".into(),
            "0".into(),
            "--payload-bytes".into(),
            s.payload_bytes.to_string(),
            "--rate".into(),
            rate.to_string(),
            "--duration".into(),
            format!("{}ms", (s.warmup + measure).as_millis()),
            "--warmup".into(),
            format!("{}ms", s.warmup.as_millis()),
            "--summary".into(),
            path_str(&summary),
        ];
        poller = Some(ctx.spawn_raw_producer(args)?);
    }
    let subject_pid = match (&*subject, &poller) {
        (Subject::Relay(r, _), _) => r.pid(),
        (_, Some(p)) => p.pid(),
        _ => unreachable!("polling and floor windows have their process"),
    };

    let plan = WriterPlan {
        messages: matches!(subject, Subject::Relay(_, crate::catchup::Source::Messages)),
        table: table.to_string(),
        aggregatetype,
        rate: rate as f64,
        rows_per_txn,
        writers,
        payload_bytes: s.payload_bytes,
        warmup: s.warmup,
        measure,
    };
    let walsender = match subject {
        Subject::Relay(..) => Some(sample_walsender(ctx, s.warmup, measure).await?),
        _ => None,
    };
    let snap_a = std::cell::RefCell::new(None);
    let ack_a = std::cell::RefCell::new(None);
    let (outcome, snap_b) = if let Subject::BrokerFloor = subject {
        let producer = poller.as_mut().expect("spawned above");
        floor_outcome(ctx, &plan, producer, &snap_a).await?
    } else {
        let outcome = load::run_writers(&ctx.pg.url(), &plan, || {
            *snap_a.borrow_mut() = Some(ctx.snapshot(Some(subject_pid)));
            if let Subject::Relay(..) = subject {
                *ack_a.borrow_mut() = Some(relay_histograms(ctx.relay_http_port.get()));
            }
        })
        .await?;
        (outcome, ctx.snapshot(Some(subject_pid)))
    };
    let snap_a = snap_a.into_inner().ok_or("the window never opened")?;

    let drain = match subject {
        Subject::Relay(..) | Subject::BrokerFloor => Duration::from_secs(15),
        Subject::Polling { interval } => *interval + Duration::from_secs(15),
    };
    let stamps = consumer.finish(outcome.rows_total, drain).await?;
    // The relay's share: commit → broker acknowledgement, from its own
    // histogram, over the records it acknowledged from the window's start to
    // the end of the drain.
    let mut stages = Vec::new();
    let ack = match (ack_a.into_inner(), &*subject) {
        (Some(Ok(a)), Subject::Relay(..)) => match relay_histograms(ctx.relay_http_port.get()) {
            Ok(b) => {
                let get = |h: &[(String, Buckets)], k: &str| {
                    h.iter()
                        .find(|(name, _)| name == k)
                        .map(|(_, b)| b.clone())
                        .unwrap_or_default()
                };
                for stage in outbox_relay::metrics::STAGES {
                    stages.push((
                        stage.to_string(),
                        BucketLatency::between(&get(&a, stage), &get(&b, stage)),
                    ));
                }
                Some(BucketLatency::between(&get(&a, ""), &get(&b, "")))
            }
            Err(e) => {
                say!("  warning: no relay latency histogram: {e}");
                None
            }
        },
        (Some(Err(e)), _) => {
            say!("  warning: no relay latency histogram: {e}");
            None
        }
        // The paced producer measured send → ack exactly: the broker's part.
        (_, Subject::BrokerFloor) => std::fs::read(ctx.scratch_path("floor.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .map(|v| BucketLatency {
                samples: v["delivered"].as_f64().unwrap_or(0.0),
                p50_ms: v["ack_p50_ms"].as_f64().unwrap_or(0.0),
                p99_ms: v["ack_p99_ms"].as_f64().unwrap_or(0.0),
                p999_ms: v["ack_p999_ms"].as_f64().unwrap_or(0.0),
                within_10ms_pct: f64::NAN,
            }),
        _ => None,
    };
    let (walsender, max_unsent_wal_bytes) = match walsender {
        Some(task) => task.await.map_err(|e| e.to_string())?,
        None => (Vec::new(), 0),
    };
    let mut outcome = outcome;
    if let Subject::BrokerFloor = subject {
        // The producer counts what it sent; "in the window" is by send time.
        outcome.rows_in_window = stamps
            .iter()
            .filter(|st| {
                st.commit_us >= outcome.window_start_us && st.commit_us < outcome.window_end_us
            })
            .count() as u64;
        outcome.achieved_rate = outcome.rows_in_window as f64 / measure.as_secs_f64();
    }
    let mut peak_kb = resources::sample(subject_pid).map(|p| p.vm_hwm_kb);
    if let Some(mut p) = poller {
        if let Subject::BrokerFloor = subject {
            p.wait_sampling(Duration::from_secs(30));
        }
        p.stop(Duration::from_secs(10));
        if let Some(last) = p.sample() {
            peak_kb = Some(last.vm_hwm_kb.max(peak_kb.unwrap_or(0)));
        }
    }
    if let Subject::Relay(r, _) = subject {
        if let Some(status) = r.try_status() {
            return Err(format!(
                "the relay exited ({status}):\n{}",
                crate::catchup::tail_str(&ctx.relay_log(), 30)
            ));
        }
    }
    ctx.broker.delete_topics(&[topic]).await;

    let d = between(&snap_a, &snap_b);
    // Per-event CPU of whoever moves records (relay, poller, producer) and of
    // the broker counts the records that reached the consumer during the
    // window (what they did, even when they lag); PostgreSQL's and the
    // benchmark's count the rows committed (what the writers did).
    let moved = stamps
        .iter()
        .filter(|st| st.recv_us >= outcome.window_start_us && st.recv_us < outcome.window_end_us)
        .count() as u64;
    let (process, _, broker, _) = d.usages(moved, peak_kb);
    let (_, postgres, _, bench) = d.usages(outcome.rows_in_window, None);
    if let Some(dir) = &s.dump_stamps {
        let mut csv = String::from("commit_us,recv_us\n");
        for st in &stamps {
            csv.push_str(&format!("{},{}\n", st.commit_us, st.recv_us));
        }
        let file = dir.join(format!("{label}_{shape}.csv"));
        std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&file, csv))
            .map_err(|e| format!("write {}: {e}", file.display()))?;
    }
    let received = stamps.len() as u64;
    let latency = load::latency(&stamps, outcome.window_start_us, outcome.window_end_us);
    let w = Window {
        subject: label,
        broker_kind: ctx.broker.kind().to_string(),
        rows_per_txn,
        writers,
        target_rate: rate,
        achieved_rate: outcome.achieved_rate,
        sustained: outcome.achieved_rate >= 0.95 * rate as f64,
        max_writer_delay_ms: outcome.max_behind_ms,
        rows_total: outcome.rows_total,
        received,
        missing: outcome.rows_total.saturating_sub(received),
        latency,
        process,
        postgres,
        broker,
        bench,
        machine: d.machine,
        walsender,
        max_unsent_wal_bytes,
        ack,
        stages,
    };
    say!(
        "  achieved {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, missing {}",
        w.achieved_rate,
        w.latency.p50_ms,
        w.latency.p99_ms,
        w.latency.p999_ms,
        w.latency.max_ms,
        w.missing
    );
    Ok(w)
}

/// The broker floor's "writers": the paced producer process. Samples the
/// window's start after the warm-up, waits for the producer to finish.
async fn floor_outcome(
    ctx: &Ctx,
    plan: &WriterPlan,
    producer: &mut Guarded,
    snap_a: &std::cell::RefCell<Option<crate::scenarios::Snapshot>>,
) -> Result<(load::WriterOutcome, crate::scenarios::Snapshot), String> {
    let spawned_us = load::now_micros();
    let pid = producer.pid();
    tokio::time::sleep(plan.warmup).await;
    *snap_a.borrow_mut() = Some(ctx.snapshot(Some(pid)));
    tokio::time::sleep(plan.measure).await;
    let snap_b = ctx.snapshot(Some(pid));
    let status = producer
        .wait_sampling(Duration::from_secs(60))
        .ok_or("the paced producer did not finish")?;
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ctx.scratch_path("floor.json")).unwrap_or_default())
            .map_err(|_| format!("the paced producer failed ({status})"))?;
    let start_us = summary["start_us"].as_i64().unwrap_or(spawned_us);
    let warmup_us = plan.warmup.as_micros() as i64;
    let outcome = load::WriterOutcome {
        rows_total: summary["delivered"].as_u64().unwrap_or(0),
        rows_in_window: 0,
        achieved_rate: 0.0,
        max_behind_ms: 0.0,
        window_start_us: start_us + warmup_us,
        window_end_us: start_us + warmup_us + plan.measure.as_micros() as i64,
    };
    Ok((outcome, snap_b))
}

/// Samples the relay's walsender every 20 ms during the measurement window.
async fn sample_walsender(
    ctx: &Ctx,
    warmup: Duration,
    measure: Duration,
) -> Result<tokio::task::JoinHandle<(Vec<(String, f64)>, u64)>, String> {
    let client = sql(ctx).await?;
    Ok(tokio::spawn(async move {
        tokio::time::sleep(warmup + Duration::from_millis(50)).await;
        let end = tokio::time::Instant::now() + measure;
        let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
        let mut total = 0u64;
        let mut max_unsent = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while tokio::time::Instant::now() < end {
            tick.tick().await;
            let rows = match client
                .query(
                    "SELECT coalesce(a.wait_event, 'cpu'), \
                            (pg_current_wal_lsn() - r.sent_lsn)::int8 \
                     FROM pg_stat_replication r JOIN pg_stat_activity a USING (pid) \
                     WHERE r.application_name = 'outbox-relay'",
                    &[],
                )
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    say!("warning: sampling pg_stat_replication: {e}");
                    break;
                }
            };
            for row in rows {
                let event: String = row.get(0);
                let unsent: Option<i64> = row.get(1);
                *counts.entry(event).or_default() += 1;
                total += 1;
                max_unsent = max_unsent.max(unsent.unwrap_or(0).max(0) as u64);
            }
        }
        let mut shares: Vec<(String, f64)> = counts
            .into_iter()
            .map(|(k, n)| (k, 100.0 * n as f64 / total.max(1) as f64))
            .collect();
        shares.sort_by(|a, b| b.1.total_cmp(&a.1));
        (shares, max_unsent)
    }))
}
