//! The polling baseline: the common outbox relay design, which exists only in
//! this benchmark. Runs as its own process (`outbox-bench poll-relay ...`) so
//! its CPU and memory can be read from `/proc` like the relay's.
//!
//! ```text
//! loop {
//!     BEGIN;
//!     SELECT ... FROM outbox ORDER BY created_at LIMIT batch FOR UPDATE SKIP LOCKED;
//!     publish every row (idempotent producer, acks=all) and wait for the acks;
//!     DELETE the published rows;
//!     COMMIT;
//!     if the batch was not full: sleep(interval)
//! }
//! ```
//!
//! Each record carries the row's commit time (`pg_xact_commit_timestamp(xmin)`,
//! hence `track_commit_timestamp = on`) in the same header as the relay's, so
//! the same consumer measures both.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Args;
use futures_util::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;

use outbox_relay::kafka::SinkSettings;

use crate::load::COMMIT_TIME_HEADER;

#[derive(Debug, Args)]
pub struct PollArgs {
    #[arg(long)]
    pub postgres_url: String,
    #[arg(long)]
    pub brokers: String,
    #[arg(long)]
    pub table: String,
    #[arg(long)]
    pub topic: String,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub interval: Duration,
    #[arg(long, default_value_t = 1000)]
    pub batch: i64,
    /// Where to write the summary (JSON) at exit.
    #[arg(long)]
    pub summary: PathBuf,
}

#[derive(Debug, Default, Serialize)]
struct Summary {
    polls: u64,
    published: u64,
}

/// The producer settings the relay uses (idempotent, acks=all, linger 1 ms).
pub fn producer_settings(brokers: &str) -> SinkSettings {
    SinkSettings {
        brokers: brokers.to_string(),
        properties: Default::default(),
        create_topics: false,
        topic_partitions: 1,
        topic_replication_factor: 1,
        max_in_flight_records: 100_000,
    }
}

pub fn main(args: PollArgs) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(run(args))
}

async fn run(args: PollArgs) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let (mut client, conn) = tokio_postgres::connect(&args.postgres_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let producer: FutureProducer = producer_settings(&args.brokers)
        .client_config()
        .create()
        .map_err(|e| format!("create the producer: {e}"))?;
    let select = client
        .prepare(&format!(
            "SELECT id::text, aggregateid, type, payload::text, pg_xact_commit_timestamp(xmin) \
             FROM {} ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED",
            args.table
        ))
        .await
        .map_err(|e| format!("prepare select: {e}"))?;
    let delete = client
        .prepare(&format!(
            "DELETE FROM {} WHERE id = ANY($1::text[]::uuid[])",
            args.table
        ))
        .await
        .map_err(|e| format!("prepare delete: {e}"))?;
    let mut summary = Summary::default();
    let result = loop {
        let polled = async {
            let tx = client.transaction().await?;
            let rows = tx.query(&select, &[&args.batch]).await?;
            let sends = rows.iter().map(|row| {
                let id: &str = row.get(0);
                let key: &str = row.get(1);
                let type_: &str = row.get(2);
                let payload: &str = row.get(3);
                let committed: Option<SystemTime> = row.get(4);
                let commit_time = committed
                    .map(|t| humantime::format_rfc3339_micros(t).to_string())
                    .unwrap_or_default();
                let headers = OwnedHeaders::new_with_capacity(3)
                    .insert(Header {
                        key: "id",
                        value: Some(id),
                    })
                    .insert(Header {
                        key: "type",
                        value: Some(type_),
                    })
                    .insert(Header {
                        key: COMMIT_TIME_HEADER,
                        value: Some(commit_time.as_str()),
                    });
                producer.send(
                    FutureRecord::to(&args.topic)
                        .key(key)
                        .payload(payload)
                        .headers(headers),
                    Duration::from_secs(30),
                )
            });
            let acks = join_all(sends).await;
            let n = rows.len();
            if let Some(Err((e, _))) = acks.into_iter().find(|a| a.is_err()) {
                // Roll back: the rows stay for the next poll (at-least-once).
                return Ok::<_, tokio_postgres::Error>(Err(format!("produce: {e}")));
            }
            let ids: Vec<&str> = rows.iter().map(|r| r.get::<_, &str>(0)).collect();
            tx.execute(&delete, &[&ids]).await?;
            tx.commit().await?;
            Ok(Ok(n))
        }
        .await;
        let n = match polled {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => break Err(e),
            Err(e) => break Err(format!("poll: {e}")),
        };
        summary.polls += 1;
        summary.published += n as u64;
        if (n as i64) < args.batch {
            tokio::select! {
                _ = term.recv() => break Ok(()),
                _ = tokio::time::sleep(args.interval) => {}
            }
        }
    };
    let _ = std::fs::write(
        &args.summary,
        serde_json::to_vec(&summary).unwrap_or_default(),
    );
    result
}
