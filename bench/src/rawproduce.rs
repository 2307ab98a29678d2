//! The broker-side comparison for catch-up: raw rdkafka producing the same
//! records (same topic shape, key, ~1 KB payload, the relay's five headers)
//! with the relay's producer settings, as fast as the broker acknowledges.
//! Runs as its own process (`outbox-bench raw-produce ...`) for clean CPU and
//! memory figures.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde::Serialize;

use outbox_relay::outbox::{format_commit_time, HEADER_COMMIT_TIME, HEADER_LSN, HEADER_XID};

use crate::load::pad;
use crate::polling::producer_settings;

#[derive(Debug, Args)]
pub struct RawArgs {
    #[arg(long)]
    pub brokers: String,
    #[arg(long)]
    pub topic: String,
    #[arg(long)]
    pub count: u64,
    #[arg(long, default_value_t = 1000)]
    pub payload_bytes: usize,
    /// Where to write the summary (JSON).
    #[arg(long)]
    pub summary: PathBuf,
    /// Paced mode (the broker floor of the latency scenario): send at this
    /// rate, records/s, stamping each with the send time as its commit time,
    /// for `--duration`; `--count` is then ignored.
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Paced mode: send → ack figures count only records sent after this
    /// (the first idempotent produce waits for a producer id).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warmup: Option<std::time::Duration>,
    /// Extra librdkafka property (repeatable), as the relay gets it.
    #[arg(long = "property", value_name = "KEY=VALUE", value_parser = outbox_relay::cli::parse_kafka_property)]
    pub properties: Vec<(String, String)>,
}

#[derive(Debug, Serialize)]
struct Summary {
    sent: u64,
    delivered: u64,
    failed: u64,
    /// From the first send to the last acknowledgement.
    elapsed_s: f64,
    /// Wall clock of the first send, µs since the Unix epoch.
    start_us: i64,
    /// Send → broker acknowledgement (delivery report), ms: the broker's part
    /// of the relay's commit → ack latency.
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    ack_p999_ms: f64,
}

#[derive(Default)]
struct Counts {
    delivered: AtomicU64,
    failed: AtomicU64,
    /// Send → ack, µs, of every delivered record.
    ack_us: std::sync::Mutex<Vec<u32>>,
    began: std::sync::OnceLock<Instant>,
}

struct Ctx(Arc<Counts>);

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    /// Send time, µs since the producer began, or `usize::MAX` when the
    /// record's ack latency is not counted (warm-up).
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, sent_us: usize) {
        match result {
            Ok(_) => {
                if let (Some(began), true) = (self.0.began.get(), sent_us != usize::MAX) {
                    let now = began.elapsed().as_micros() as usize;
                    let mut v = self.0.ack_us.lock().unwrap_or_else(|p| p.into_inner());
                    v.push(now.saturating_sub(sent_us).min(u32::MAX as usize) as u32);
                }
                self.0.delivered.fetch_add(1, Ordering::Relaxed)
            }
            Err(_) => self.0.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

pub fn main(args: RawArgs) -> Result<(), String> {
    let counts = Arc::new(Counts::default());
    let mut settings = producer_settings(&args.brokers);
    settings.properties.extend(args.properties.iter().cloned());
    let producer: ThreadedProducer<Ctx> = settings
        .client_config()
        .create_with_context(Ctx(counts.clone()))
        .map_err(|e| format!("create the producer: {e}"))?;
    let pad = pad(args.payload_bytes);
    let fixed_commit_time = format_commit_time(0);
    let began = Instant::now();
    let _ = counts.began.set(began);
    let ack_from_us = args.warmup.unwrap_or_default().as_micros() as usize;
    let start_us = crate::load::now_micros();
    let paced = args.rate.map(|r| {
        let d = args.duration.unwrap_or(Duration::from_secs(10));
        (Duration::from_secs_f64(1.0 / r), began + d)
    });
    let mut sent = 0u64;
    for seq in 0.. {
        let commit_time = match paced {
            None if seq >= args.count => break,
            None => fixed_commit_time.clone(),
            Some((period, end)) => {
                let due = began + period.mul_f64(seq as f64);
                if due >= end {
                    break;
                }
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
            }
        };
        // What the relay sends for a row: payload as jsonb renders it, key, headers.
        let payload = format!("{{\"pad\": \"{pad}\", \"seq\": {seq}}}");
        let key = (seq % 1000).to_string();
        let id = format!("00000000-0000-4000-8000-{seq:012x}");
        let lsn = format!("0/{:X}", seq * 1200);
        let xid = (seq + 1000).to_string();
        loop {
            let headers = OwnedHeaders::new_with_capacity(5)
                .insert(Header {
                    key: "id",
                    value: Some(id.as_str()),
                })
                .insert(Header {
                    key: "type",
                    value: Some("BenchEvent"),
                })
                .insert(Header {
                    key: HEADER_LSN,
                    value: Some(lsn.as_str()),
                })
                .insert(Header {
                    key: HEADER_XID,
                    value: Some(xid.as_str()),
                })
                .insert(Header {
                    key: HEADER_COMMIT_TIME,
                    value: Some(commit_time.as_str()),
                });
            let sent_us = match began.elapsed().as_micros() as usize {
                t if paced.is_some() && t < ack_from_us => usize::MAX,
                t => t,
            };
            let record = BaseRecord::with_opaque_to(&args.topic, sent_us)
                .key(key.as_str())
                .payload(payload.as_str())
                .headers(headers);
            match producer.send(record) {
                Ok(()) => {
                    sent += 1;
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_micros(500));
                }
                Err((e, _)) => return Err(format!("produce: {e}")),
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while counts.delivered.load(Ordering::Relaxed) + counts.failed.load(Ordering::Relaxed) < sent
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed_s = began.elapsed().as_secs_f64();
    let _ = producer.flush(Duration::from_secs(5));
    let mut ack = std::mem::take(&mut *counts.ack_us.lock().unwrap_or_else(|p| p.into_inner()));
    ack.sort_unstable();
    let pct = |q: f64| -> f64 {
        if ack.is_empty() {
            return 0.0;
        }
        let i = ((ack.len() as f64 * q).ceil() as usize).clamp(1, ack.len()) - 1;
        f64::from(ack[i]) / 1000.0
    };
    let summary = Summary {
        ack_p50_ms: pct(0.5),
        ack_p99_ms: pct(0.99),
        ack_p999_ms: pct(0.999),
        sent,
        start_us,
        delivered: counts.delivered.load(Ordering::Relaxed),
        failed: counts.failed.load(Ordering::Relaxed),
        elapsed_s,
    };
    std::fs::write(
        &args.summary,
        serde_json::to_vec(&summary).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("write {}: {e}", args.summary.display()))
}
